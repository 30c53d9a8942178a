//! The connection half of the socket engines (Redis, NATS): a non-blocking TCP connection
//! with reconnects and capped exponential backoff, read and write buffers, the set of topics
//! the registry is interested in (re-subscribed after every reconnect), and the queue taken
//! from [`Outbound`](super::Outbound). What is said on the connection is a [`Protocol`]'s job.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::outbound::{InterestChange, Publishes};
use super::{BrokerStats, Context, Engine, FIRST_RETRY, Received, Wait, next_retry};
use crate::error::Error;
use crate::reactor::Reactor;

/// A TCP connect that has not completed in this long is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes are taken from the queue only while less than this is waiting to be written, so
/// a slow server leaves them in the bounded queue rather than in an unbounded buffer.
const OUTPUT_HIGH_WATER: usize = 1 << 20;
/// Bytes read in one turn at most; the rest waits for the next turn (the reactor is woken).
const READ_PER_TURN: usize = 8 << 20;
const READ_CHUNK: usize = 64 << 10;

/// What arrives on the connection, as a protocol reports it.
pub(crate) struct Sink<'a> {
    pub(crate) received: &'a mut Vec<Received>,
    pub(crate) stats: &'a mut BrokerStats,
}

/// One engine's wire protocol, on one connection at a time.
pub(crate) trait Protocol: Send {
    /// The engine's name, for messages.
    const NAME: &'static str;
    /// A new connection: forgets the last one's state, writes what the client says first.
    fn start(&mut self, out: &mut Vec<u8>);
    /// Handles the complete frames at the front of `input`; returns how many bytes it used.
    /// An error ends the connection (and, while enabling, is what `enable` reports).
    fn read(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> Result<usize, Error>;
    /// The session is up: subscriptions and publishes may be written.
    fn is_open(&self) -> bool;
    fn subscribe(&mut self, topic: &[u8], out: &mut Vec<u8>);
    fn unsubscribe(&mut self, topic: &[u8], out: &mut Vec<u8>);
    /// After a run of `subscribe`/`unsubscribe` calls (NATS asks for a PONG to know they are
    /// in effect).
    fn end_of_subscriptions(&mut self, _out: &mut Vec<u8>) {}
    fn publish(&mut self, topic: &[u8], payload: &[u8], out: &mut Vec<u8>);
    /// Subscription changes written and not yet confirmed.
    fn unconfirmed(&self) -> usize;
    /// Publishes written whose fate is unknown until the server answers (lost with the
    /// connection).
    fn in_flight(&self) -> usize;
    /// Topics subscribed and confirmed on this connection.
    fn subscribed(&self) -> usize;
    /// Adds what the protocol counted while writing (`publish` has no sink) to `stats`.
    fn report(&mut self, _stats: &mut BrokerStats) {}
}

enum Phase {
    Down {
        retry_at: Instant,
    },
    Connecting {
        stream: TcpStream,
        deadline: Instant,
    },
    Open {
        stream: TcpStream,
    },
}

pub(crate) struct StreamEngine<P: Protocol> {
    protocol: P,
    addresses: Vec<SocketAddr>,
    next_address: usize,
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already written.
    written: usize,
    /// Topics with a local subscriber: what the connection should be subscribed to.
    interest: HashSet<Box<[u8]>>,
    /// Whether `interest` has been written on this connection.
    subscribed: bool,
    changes: Vec<InterestChange>,
    publishes: Publishes,
    retry_delay: Duration,
    failure: Option<Error>,
    connected_before: bool,
    watched: Option<RawFd>,
    stats: BrokerStats,
}

impl<P: Protocol> StreamEngine<P> {
    /// Resolves the hosts (once: reconnects go to the same addresses) and schedules the first
    /// connection attempt for now.
    pub(crate) fn new(protocol: P, hosts: &[(String, u16)]) -> Result<StreamEngine<P>, Error> {
        let mut addresses = Vec::new();
        for (host, port) in hosts {
            match (host.as_str(), *port).to_socket_addrs() {
                Ok(found) => addresses.extend(found),
                Err(err) => {
                    return Err(Error::Unreachable(format!(
                        "{}: cannot resolve {host}: {err}",
                        P::NAME
                    )));
                }
            }
        }
        if addresses.is_empty() {
            return Err(Error::Unreachable(format!(
                "{}: no address to connect to",
                P::NAME
            )));
        }
        Ok(StreamEngine {
            protocol,
            addresses,
            next_address: 0,
            phase: Phase::Down {
                retry_at: Instant::now(),
            },
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            interest: HashSet::new(),
            subscribed: false,
            changes: Vec::new(),
            publishes: Publishes::default(),
            retry_delay: FIRST_RETRY,
            failure: None,
            connected_before: false,
            watched: None,
            stats: BrokerStats::default(),
        })
    }

    pub(crate) fn protocol_mut(&mut self) -> &mut P {
        &mut self.protocol
    }

    /// Connected, with the session open (handshake answered).
    pub(crate) fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. }) && self.protocol.is_open()
    }

    /// Lets the protocol write a command of its own once the session is open (written out
    /// by the next turn); false, and nothing written, before that.
    pub(crate) fn send(&mut self, command: impl FnOnce(&mut P, &mut Vec<u8>)) -> bool {
        if !self.is_open() {
            return false;
        }
        command(&mut self.protocol, &mut self.output);
        true
    }

    /// The address this connection reached, while it is open.
    pub(crate) fn peer(&self) -> Option<SocketAddr> {
        match &self.phase {
            Phase::Open { stream } => stream.peer_addr().ok(),
            _ => None,
        }
    }

    fn start_connecting(&mut self, reactor: &Reactor) {
        let address = self.addresses[self.next_address % self.addresses.len()];
        self.next_address = self.next_address.wrapping_add(1);
        let stream = match TcpStream::connect(address) {
            Ok(stream) => stream,
            Err(err) => {
                return self.fail(
                    reactor,
                    Error::Unreachable(format!("{}: {address}: {err}", P::NAME)),
                );
            }
        };
        let _ = stream.set_nodelay(true);
        let socket = stream.as_raw_fd();
        if let Err(err) = reactor.watch_backend(
            self.watched,
            socket,
            Interest::READABLE.add(Interest::WRITABLE),
        ) {
            return self.fail(reactor, Error::Io(err));
        }
        self.watched = Some(socket);
        self.phase = Phase::Connecting {
            stream,
            deadline: Instant::now() + CONNECT_TIMEOUT,
        };
    }

    /// Moves a connect along: `Open` once the TCP handshake is done.
    fn check_connected(&mut self, reactor: &Reactor) {
        let Phase::Connecting { stream, deadline } = &self.phase else {
            return;
        };
        if let Ok(Some(err)) | Err(err) = stream.take_error() {
            let address = self.addresses
                [(self.next_address + self.addresses.len() - 1) % self.addresses.len()];
            return self.fail(
                reactor,
                Error::Unreachable(format!("{}: {address}: {err}", P::NAME)),
            );
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(err) if err.kind() == ErrorKind::NotConnected => {
                if Instant::now() >= *deadline {
                    return self.fail(
                        reactor,
                        Error::Unreachable(format!("{}: the TCP connect timed out", P::NAME)),
                    );
                }
                return;
            }
            Err(err) => {
                return self.fail(reactor, Error::Unreachable(format!("{}: {err}", P::NAME)));
            }
        }
        let Phase::Connecting { stream, .. } = std::mem::replace(
            &mut self.phase,
            Phase::Down {
                retry_at: Instant::now(),
            },
        ) else {
            unreachable!("matched above");
        };
        self.phase = Phase::Open { stream };
        self.input.clear();
        self.output.clear();
        self.written = 0;
        self.subscribed = false;
        self.protocol.start(&mut self.output);
    }

    /// Reads until the socket has nothing more (or the turn's budget is spent), handing
    /// complete frames to the protocol.
    fn read(&mut self, reactor: &Reactor, received: &mut Vec<Received>) {
        let mut budget = READ_PER_TURN;
        loop {
            let Phase::Open { stream } = &mut self.phase else {
                return;
            };
            let filled = self.input.len();
            self.input.resize(filled + READ_CHUNK, 0);
            let result = stream.read(&mut self.input[filled..]);
            let count = match result {
                Ok(0) => {
                    self.input.truncate(filled);
                    return self.fail(
                        reactor,
                        Error::Backend(format!("{}: the server closed the connection", P::NAME)),
                    );
                }
                Ok(count) => count,
                Err(err) if err.kind() == ErrorKind::Interrupted => {
                    self.input.truncate(filled);
                    continue;
                }
                Err(err) => {
                    self.input.truncate(filled);
                    if err.kind() == ErrorKind::WouldBlock {
                        return;
                    }
                    return self.fail(reactor, Error::Backend(format!("{}: {err}", P::NAME)));
                }
            };
            self.input.truncate(filled + count);
            let mut sink = Sink {
                received,
                stats: &mut self.stats,
            };
            match self.protocol.read(&self.input, &mut self.output, &mut sink) {
                Ok(used) => {
                    self.input.drain(..used);
                }
                Err(err) => return self.fail(reactor, err),
            }
            budget = budget.saturating_sub(count);
            if budget == 0 {
                // Edge-triggered: come back for the rest in the next dispatch.
                reactor.wake();
                return;
            }
        }
    }

    /// Takes the queue's work: interest always, publishes once the session is subscribed and
    /// the output is not backed up; writes the commands for them.
    fn take(&mut self, cx: &Context<'_>) {
        let sending = matches!(self.phase, Phase::Open { .. }) && self.subscribed;
        let take_publishes = sending && self.output.len() - self.written < OUTPUT_HIGH_WATER;
        cx.take(
            &mut self.changes,
            take_publishes.then_some(&mut self.publishes),
        );
        let mut wrote_subscriptions = false;
        for change in self.changes.drain(..) {
            let changed = if change.subscribe {
                self.interest.insert(change.topic.clone())
            } else {
                self.interest.remove(&change.topic)
            };
            if changed && sending {
                if change.subscribe {
                    self.protocol.subscribe(&change.topic, &mut self.output);
                } else {
                    self.protocol.unsubscribe(&change.topic, &mut self.output);
                }
                wrote_subscriptions = true;
            }
        }
        if wrote_subscriptions {
            self.protocol.end_of_subscriptions(&mut self.output);
        }
        for (topic, payload) in self.publishes.iter() {
            self.protocol.publish(topic, payload, &mut self.output);
        }
        self.publishes.clear();
        self.protocol.report(&mut self.stats);
    }

    /// Once the session is up, subscribes the connection to every topic of interest.
    fn subscribe_all(&mut self) {
        if self.subscribed || !matches!(self.phase, Phase::Open { .. }) || !self.protocol.is_open()
        {
            return;
        }
        for topic in &self.interest {
            self.protocol.subscribe(topic, &mut self.output);
        }
        self.protocol.end_of_subscriptions(&mut self.output);
        self.subscribed = true;
        self.retry_delay = FIRST_RETRY;
        if self.connected_before {
            self.stats.reconnects += 1;
        }
        self.connected_before = true;
    }

    fn flush(&mut self, reactor: &Reactor) {
        let Phase::Open { stream } = &mut self.phase else {
            return;
        };
        while self.written < self.output.len() {
            match stream.write(&self.output[self.written..]) {
                Ok(count) => self.written += count,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                // The reactor reports the writable edge; dispatch writes the rest.
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) => {
                    return self.fail(reactor, Error::Backend(format!("{}: {err}", P::NAME)));
                }
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
            if self.output.capacity() > OUTPUT_HIGH_WATER * 2 {
                self.output.shrink_to(OUTPUT_HIGH_WATER);
            }
        } else if self.written >= OUTPUT_HIGH_WATER {
            self.output.drain(..self.written);
            self.written = 0;
        }
    }

    /// Drops the connection and schedules the next attempt.
    fn fail(&mut self, reactor: &Reactor, error: Error) {
        if let Some(socket) = self.watched.take() {
            reactor.unwatch(socket);
        }
        if matches!(self.phase, Phase::Open { .. }) {
            self.stats.dropped += self.protocol.in_flight() as u64;
        }
        self.phase = Phase::Down {
            retry_at: Instant::now() + self.retry_delay,
        };
        self.retry_delay = next_retry(self.retry_delay);
        self.subscribed = false;
        self.input.clear();
        self.output.clear();
        self.written = 0;
        self.failure = Some(error);
    }

    fn phase_number(&self) -> u8 {
        match self.phase {
            Phase::Down { .. } => 0,
            Phase::Connecting { .. } => 1,
            Phase::Open { .. } => 2,
        }
    }
}

impl<P: Protocol> Engine for StreamEngine<P> {
    fn advance(&mut self, cx: &mut Context<'_>) {
        loop {
            let before = (self.phase_number(), self.subscribed);
            match &self.phase {
                Phase::Down { retry_at } => {
                    if Instant::now() >= *retry_at {
                        self.start_connecting(cx.reactor);
                    }
                }
                Phase::Connecting { .. } => self.check_connected(cx.reactor),
                Phase::Open { .. } => {
                    self.read(cx.reactor, cx.received);
                    self.subscribe_all();
                }
            }
            if (self.phase_number(), self.subscribed) == before {
                break;
            }
        }
        self.take(cx);
        self.flush(cx.reactor);
    }

    fn write(&mut self, cx: &mut Context<'_>) {
        self.take(cx);
        self.flush(cx.reactor);
    }

    fn wait(&self) -> Wait {
        match &self.phase {
            Phase::Down { retry_at } => Wait {
                socket: None,
                deadline: Some(*retry_at),
            },
            Phase::Connecting { stream, deadline } => Wait {
                socket: Some((stream.as_raw_fd(), true)),
                deadline: Some(*deadline),
            },
            Phase::Open { stream } => Wait {
                socket: Some((stream.as_raw_fd(), self.written < self.output.len())),
                deadline: None,
            },
        }
    }

    fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
            && self.subscribed
            && self.protocol.unconfirmed() == 0
    }

    fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    fn stats(&self) -> BrokerStats {
        let open = matches!(self.phase, Phase::Open { .. }) && self.subscribed;
        BrokerStats {
            queued: if open {
                self.protocol.in_flight() as u64
            } else {
                0
            },
            connected: u64::from(open),
            topics: if open {
                self.protocol.subscribed() as u64
            } else {
                0
            },
            ..self.stats
        }
    }

    fn shut_down(&mut self, reactor: &Reactor) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while matches!(self.phase, Phase::Open { .. }) && self.written < self.output.len() {
            self.flush(reactor);
            let Phase::Open { stream } = &self.phase else {
                break;
            };
            let now = Instant::now();
            if now >= deadline
                || !matches!(
                    crate::io::wait_fd(stream.as_raw_fd(), true, Some(deadline - now)),
                    Ok(true)
                )
            {
                break;
            }
        }
        if let Some(socket) = self.watched.take() {
            reactor.unwatch(socket);
        }
        self.phase = Phase::Down {
            retry_at: Instant::now() + super::MAX_RETRY,
        };
    }
}
