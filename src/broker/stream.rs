//! The connection half of the socket engines (Redis, NATS): a non-blocking TCP connection,
//! TLS on it when the URL asks (see `tls`), reconnects with capped exponential backoff, read and write buffers, the set of topics
//! the registry is interested in (re-subscribed after every reconnect), and the queue taken
//! from [`Outbound`](super::Outbound). What is said on the connection is a [`Protocol`]'s job.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::outbound::{InterestChange, Publishes};
use super::tls::{TlsOptions, TlsSettings, Transport};
use super::url::BrokerUrl;
use super::{BrokerStats, Context, Engine, FIRST_RETRY, Received, Wait, next_retry};
use crate::error::Error;
use crate::reactor::Reactor;

/// A TCP connect that has not completed in this long is abandoned and retried; so is a
/// connection whose session (TLS handshake, greeting, authentication) is not open this long
/// after the connect: a server that accepts and then says nothing is as good as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes are taken from the queue only while less than this is waiting to be written, so
/// a slow server leaves them in the bounded queue rather than in an unbounded buffer. (Small
/// in unit tests, so that a socket takes a whole high water in one write.)
const OUTPUT_HIGH_WATER: usize = if cfg!(test) { 8 << 10 } else { 1 << 20 };
/// An output buffer grown past twice the high water is given back to the allocator after
/// this long of flushes using less than an eighth of it.
const OUTPUT_SHRINK_AFTER: Duration = Duration::from_secs(1);
/// Publishes written and not yet answered (Redis: PUBLISH replies; NATS: the PONG of a PING
/// written after them) beyond which new publishes wait in the queue for the answer, which
/// `dispatch` reads, and then go out together in one write. Without this, a publisher that
/// finds the engine free writes every publish in a `write(2)` of its own (a TCP segment and
/// a wake-up of the server each): one publishing thread never got more than one per write.
/// A lone publish or a burst of up to this many still goes out at once, with no dispatch.
/// (Where the answer confirms no publish and only paces them, NATS, a dispatch turn writes
/// the held ones without waiting for it: `Protocol::dispatch_sends_held`.)
pub(crate) const HOLD_AFTER: usize = 64;
/// Bytes read in one turn at most; the rest waits for the next turn (the reactor is woken).
/// (Small in unit tests, so that a turn ends with bytes still in the socket.)
const READ_PER_TURN: usize = if cfg!(test) { 16 << 10 } else { 8 << 20 };
const READ_CHUNK: usize = if cfg!(test) { 4 << 10 } else { 64 << 10 };

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
    /// Writes publishes the queue holds as commands (a protocol whose broker queues through
    /// an [`Encode`](super::outbound::Encode)), and empties `publishes`. By default they go
    /// out as they are; a protocol that counts or checks its publishes does so here.
    fn publish_encoded(&mut self, publishes: &mut Publishes, out: &mut Vec<u8>) {
        publishes.move_commands_to(out);
    }
    /// Subscription changes written and not yet confirmed.
    fn unconfirmed(&self) -> usize;
    /// Publishes written whose fate is unknown until the server answers (lost with the
    /// connection).
    fn in_flight(&self) -> usize;
    /// The connection broke: returns how many publishes in flight are lost with it (counted
    /// dropped). A protocol that a later session can tell which of them the server ran keeps
    /// those, to count them itself then (through the sink or `report`).
    fn lose_in_flight(&mut self) -> usize {
        self.in_flight()
    }
    /// Whether enough publishes are written and not yet answered that new ones should wait
    /// for the answer (see `HOLD_AFTER`).
    fn holding_publishes(&self) -> bool;
    /// After a run of `publish` calls (NATS asks for a PONG once enough are unanswered, or
    /// for any unanswered at all when `always`).
    fn end_of_publishes(&mut self, _out: &mut Vec<u8>, _always: bool) {}
    /// Whether a dispatch turn writes the publishes held for an answer (see `HOLD_AFTER`)
    /// rather than leaving them for the answer: yes where the answer is only the batch's
    /// clock, not the publishes' fate (NATS). Publishers' own turns hold them either way.
    fn dispatch_sends_held(&self) -> bool {
        false
    }
    /// Whether a command written is still waiting for the server's answer.
    fn awaiting_answers(&self) -> bool;
    /// Topics subscribed and confirmed on this connection.
    fn subscribed(&self) -> usize;
    /// Adds what the protocol counted while writing (`publish` has no sink) to `stats`.
    fn report(&mut self, _stats: &mut BrokerStats) {}
    /// The server's greeting has been read. With `TlsStart::AfterGreeting`, TLS starts then,
    /// before anything else is read or written.
    fn greeted(&self) -> bool {
        true
    }
    /// Whether the protocol speaks history (on or off) in its session: switching history
    /// then starts a new session.
    fn shares_history(&self) -> bool {
        false
    }
    /// History was switched: whether the publishes in flight must be answered on this
    /// session before it starts anew (their answers deliver them here, and the next session
    /// could not tell whether the server ran them).
    fn answers_before_switch(&self) -> bool {
        false
    }
    /// When the open session wants `on_deadline` called, though nothing arrives (a protocol
    /// that expects the server to speak at intervals, and acts on its silence).
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// `deadline` has passed: writes what the protocol does about it to `out`.
    fn on_deadline(&mut self, _now: Instant, _out: &mut Vec<u8>) {}
}

/// When a TLS connection starts its handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsStart {
    /// As soon as TCP is connected (Redis).
    AtConnect,
    /// After the server's greeting, which comes in the clear (NATS's INFO).
    AfterGreeting,
}

/// A TLS connection's settings, and when it starts (cloned for each node of a cluster).
#[derive(Clone)]
pub(crate) struct Tls {
    settings: TlsSettings,
    start: TlsStart,
}

impl Tls {
    /// The TLS of a connection to `url` (`secure`: its scheme asks for TLS), built from its
    /// options; refuses any option left over.
    pub(crate) fn from_url(
        url: &mut BrokerUrl,
        secure: bool,
        start: TlsStart,
    ) -> Result<Option<Tls>, Error> {
        let options = TlsOptions::take(&mut url.query, secure)?;
        url.no_options_left()?;
        options
            .map(|options| {
                Ok(Tls {
                    settings: TlsSettings::new(&options)?,
                    start,
                })
            })
            .transpose()
    }
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
        stream: Transport,
        /// Where the connection went: the name its certificate must carry.
        host: Box<str>,
        /// When a session not open yet is given up.
        session_deadline: Instant,
    },
}

pub(crate) struct StreamEngine<P: Protocol> {
    protocol: P,
    /// Every address of every host, with the host's name.
    addresses: Vec<(SocketAddr, Box<str>)>,
    tls: Option<Tls>,
    next_address: usize,
    /// Addresses still to try, one right after the other, before backing off: one that
    /// refuses (the `::1` of a `localhost` served on IPv4 only, a cluster node that is down)
    /// must not fail an enable that the next one would serve.
    untried: usize,
    phase: Phase,
    /// Where reads land.
    scratch: Box<[u8]>,
    /// What the protocol left unused of the reads so far: an incomplete frame.
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already written.
    written: usize,
    /// Since when every flush has used a small part of an oversized `output`.
    output_small_since: Option<Instant>,
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
    /// Shutting down: publishes are no longer held for a batch.
    draining: bool,
    /// History was switched while publishes were in flight that the session must see
    /// answered (`Protocol::answers_before_switch`): it starts anew once they are, or at
    /// this deadline; new publishes wait for the new session.
    switch_at: Option<Instant>,
}

impl<P: Protocol> StreamEngine<P> {
    /// Resolves the hosts (once: reconnects go to the same addresses) and schedules the first
    /// connection attempt for now.
    pub(crate) fn new(
        protocol: P,
        hosts: &[(String, u16)],
        tls: Option<Tls>,
    ) -> Result<StreamEngine<P>, Error> {
        let mut addresses = Vec::new();
        for (host, port) in hosts {
            match (host.as_str(), *port).to_socket_addrs() {
                Ok(found) => {
                    addresses.extend(found.map(|address| (address, Box::from(host.as_str()))))
                }
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
            tls,
            next_address: 0,
            untried: 0,
            phase: Phase::Down {
                retry_at: Instant::now(),
            },
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            output_small_since: None,
            interest: HashSet::new(),
            subscribed: false,
            changes: Vec::new(),
            publishes: Publishes::default(),
            retry_delay: FIRST_RETRY,
            failure: None,
            connected_before: false,
            watched: None,
            stats: BrokerStats::default(),
            draining: false,
            switch_at: None,
        })
    }

    fn start_connecting(&mut self, reactor: &Reactor) {
        let (address, _) = self.addresses[self.next_address % self.addresses.len()];
        self.next_address = self.next_address.wrapping_add(1);
        if self.untried == 0 {
            self.untried = self.addresses.len();
        }
        self.untried -= 1;
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
            let (address, _) = &self.addresses
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
        let host = self.addresses
            [(self.next_address + self.addresses.len() - 1) % self.addresses.len()]
        .1
        .clone();
        let mut stream = Transport::Plain(stream);
        if let Some(tls) = self
            .tls
            .as_ref()
            .filter(|tls| tls.start == TlsStart::AtConnect)
        {
            stream = match stream.start_tls(&tls.settings, &host) {
                Ok(stream) => stream,
                Err(err) => return self.fail(reactor, err),
            };
        }
        self.phase = Phase::Open {
            stream,
            host,
            session_deadline: Instant::now() + CONNECT_TIMEOUT,
        };
        self.input.clear();
        self.output.clear();
        self.written = 0;
        self.subscribed = false;
        self.protocol.start(&mut self.output);
    }

    /// Moves a TLS handshake along; after the greeting, starts the one that waited for it.
    fn advance_tls(&mut self, reactor: &Reactor) {
        let Some(tls) = &self.tls else {
            return;
        };
        let Phase::Open { stream, host, .. } = &mut self.phase else {
            return;
        };
        let starts_now = tls.start == TlsStart::AfterGreeting
            && matches!(stream, Transport::Plain(_))
            && self.protocol.greeted();
        if stream.is_ready() && !starts_now {
            return;
        }
        let plain = std::mem::replace(stream, Transport::Closed);
        let advanced = if starts_now {
            plain.start_tls(&tls.settings, host)
        } else {
            plain.advance()
        };
        match advanced {
            Ok(advanced) => *stream = advanced,
            Err(err) => self.fail(reactor, err),
        }
    }

    /// Reads until the socket has nothing more (or the turn's budget is spent), handing
    /// complete frames to the protocol.
    fn read(&mut self, reactor: &Reactor, received: &mut Vec<Received>) {
        let mut budget = READ_PER_TURN;
        loop {
            self.advance_tls(reactor);
            let Phase::Open { stream, .. } = &mut self.phase else {
                return;
            };
            let count = match stream.read(&mut self.scratch) {
                Ok(0) => {
                    return self.fail(
                        reactor,
                        Error::Backend(format!("{}: the server closed the connection", P::NAME)),
                    );
                }
                Ok(count) => count,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) => {
                    return self.fail(reactor, Error::Backend(format!("{}: {err}", P::NAME)));
                }
            };
            let mut sink = Sink {
                received,
                stats: &mut self.stats,
            };
            let read = &self.scratch[..count];
            // With nothing left over, the frames are read where they landed and only an
            // incomplete last one is kept.
            let outcome = if self.input.is_empty() {
                self.protocol
                    .read(read, &mut self.output, &mut sink)
                    .map(|used| self.input.extend_from_slice(&read[used..]))
            } else {
                self.input.extend_from_slice(read);
                self.protocol
                    .read(&self.input, &mut self.output, &mut sink)
                    .map(|used| drop(self.input.drain(..used)))
            };
            if let Err(err) = outcome {
                return self.fail(reactor, err);
            }
            budget = budget.saturating_sub(count);
            if budget == 0 {
                // Edge-triggered: no new edge comes for what is already in the socket.
                reactor.wake_backend();
                return;
            }
        }
    }

    /// Takes the queue's work and writes it out, taking again while publishes were left
    /// queued for a backed-up output that the socket then took whole: no writable edge would
    /// come back for them, and no server reply either (NATS confirms nothing).
    fn take_and_flush(&mut self, cx: &Context<'_>, dispatching: bool) {
        loop {
            let deferred = self.take(cx, dispatching);
            self.flush(cx.reactor);
            if !deferred || self.output.len() - self.written >= OUTPUT_HIGH_WATER {
                return;
            }
        }
    }

    /// Takes the queue's work: interest always, publishes once the session is subscribed and
    /// the output is not backed up (and, unless `dispatching` with a protocol that allows it,
    /// while none are held for the server's answer); writes the commands for them. Returns
    /// whether publishes were left queued because the output was backed up.
    fn take(&mut self, cx: &Context<'_>, dispatching: bool) -> bool {
        let sending = matches!(self.phase, Phase::Open { .. }) && self.subscribed;
        let backed_up = self.output.len() - self.written >= OUTPUT_HIGH_WATER;
        // Publishes held for the server's answers are not "left behind a backed-up output":
        // the answers, read by dispatch, release them.
        let held = sending
            && !self.draining
            && (self.protocol.holding_publishes() || self.switch_at.is_some());
        cx.outbound.hold_publishes(held);
        let held_here = held && !(dispatching && self.protocol.dispatch_sends_held());
        let take_publishes = sending && !backed_up && !held_here;
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
        let published = !self.publishes.is_empty();
        if self.publishes.is_encoded() {
            self.protocol
                .publish_encoded(&mut self.publishes, &mut self.output);
        } else {
            for (topic, payload) in self.publishes.iter() {
                self.protocol.publish(topic, payload, &mut self.output);
            }
        }
        if published {
            self.protocol.end_of_publishes(&mut self.output, false);
        }
        self.publishes.clear();
        self.protocol.report(&mut self.stats);
        sending && backed_up
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
        self.advance_tls(reactor);
        let Phase::Open { stream, .. } = &mut self.phase else {
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
            let used = self.output.len();
            self.output.clear();
            self.written = 0;
            self.give_back_oversized_output(used);
        } else if self.written >= OUTPUT_HIGH_WATER {
            self.output.drain(..self.written);
            self.written = 0;
        }
    }

    /// Shrinks an output buffer grown by a burst once `OUTPUT_SHRINK_AFTER` has passed with
    /// every flush far smaller than it. Not at once: a buffer given back and grown again by
    /// the next batch costs a page fault per 4 KiB it is written.
    fn give_back_oversized_output(&mut self, used: usize) {
        let capacity = self.output.capacity();
        if capacity <= OUTPUT_HIGH_WATER * 2 || used >= capacity / 8 {
            self.output_small_since = None;
            return;
        }
        let now = Instant::now();
        match self.output_small_since {
            None => self.output_small_since = Some(now),
            Some(since) if now - since >= OUTPUT_SHRINK_AFTER => {
                self.output.shrink_to(OUTPUT_HIGH_WATER);
                self.output_small_since = None;
            }
            Some(_) => {}
        }
    }

    /// Drops the connection and schedules the next attempt.
    fn fail(&mut self, reactor: &Reactor, error: Error) {
        if let Some(socket) = self.watched.take() {
            reactor.unwatch(socket);
        }
        let was_open = matches!(self.phase, Phase::Open { .. }) && self.protocol.is_open();
        // The next session starts the new way anyway.
        self.switch_at = None;
        if matches!(self.phase, Phase::Open { .. }) {
            self.stats.dropped += self.protocol.lose_in_flight() as u64;
        }
        self.subscribed = false;
        self.input.clear();
        self.output.clear();
        self.written = 0;
        // Before the session is open, whatever ends the connection means "cannot connect"
        // (a TLS 1.3 server refuses a client certificate only after the handshake, say).
        let error = match error {
            Error::Backend(message) if !was_open => Error::Unreachable(message),
            error => error,
        };
        if was_open {
            // A lost session: the next round tries every address again.
            self.untried = 0;
        } else if self.untried > 0 {
            self.phase = Phase::Down {
                retry_at: Instant::now(),
            };
            reactor.wake_backend();
            return;
        }
        self.phase = Phase::Down {
            retry_at: Instant::now() + self.retry_delay,
        };
        self.retry_delay = next_retry(self.retry_delay);
        self.failure = Some(error);
        // Found by a publisher's write, the failure leaves no socket to watch and no timer
        // armed for `retry_at`: only dispatch's service of the backend arms it.
        reactor.wake_backend();
    }

    /// Reconnects at once: the new session subscribes and publishes the way history now
    /// calls for.
    fn restart_session(&mut self, reactor: &Reactor) {
        self.fail(
            reactor,
            Error::Backend(format!("{}: history switched", P::NAME)),
        );
        self.failure = None;
        self.phase = Phase::Down {
            retry_at: Instant::now(),
        };
        reactor.wake_backend();
    }

    fn phase_number(&self) -> u8 {
        match self.phase {
            Phase::Down { .. } => 0,
            Phase::Connecting { .. } => 1,
            Phase::Open { .. } => 2,
        }
    }
}

/// What the Redis Cluster engine needs to drive one connection per node itself.
#[cfg(feature = "redis")]
impl<P: Protocol> StreamEngine<P> {
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
            Phase::Open { stream, .. } => stream.peer_addr(),
            _ => None,
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
                Phase::Open {
                    stream,
                    session_deadline,
                    ..
                } => {
                    if !self.protocol.is_open() && Instant::now() >= *session_deadline {
                        let what = if stream.is_ready() {
                            "the server did not open a session"
                        } else {
                            "the TLS handshake did not complete (does the server speak TLS?)"
                        };
                        let error = Error::Unreachable(format!(
                            "{}: {what} within {} s",
                            P::NAME,
                            CONNECT_TIMEOUT.as_secs()
                        ));
                        self.fail(cx.reactor, error);
                        continue;
                    }
                    self.read(cx.reactor, cx.received);
                    if self
                        .switch_at
                        .is_some_and(|due| self.protocol.in_flight() == 0 || Instant::now() >= due)
                    {
                        self.restart_session(cx.reactor);
                        continue;
                    }
                    self.subscribe_all();
                    let now = Instant::now();
                    if self.protocol.is_open()
                        && self.protocol.deadline().is_some_and(|due| now >= due)
                    {
                        self.protocol.on_deadline(now, &mut self.output);
                    }
                }
            }
            if (self.phase_number(), self.subscribed) == before {
                break;
            }
        }
        self.take_and_flush(cx, true);
    }

    fn write(&mut self, cx: &mut Context<'_>) {
        self.take_and_flush(cx, false);
    }

    fn drain(&mut self, cx: &mut Context<'_>) {
        self.draining = true;
        self.write(cx);
    }

    fn shares_history(&self) -> bool {
        self.protocol.shares_history()
    }

    fn history_switched(&mut self, reactor: &Reactor) {
        if !self.protocol.shares_history() || matches!(self.phase, Phase::Down { .. }) {
            return;
        }
        if self.protocol.answers_before_switch() {
            // Dispatch reads the answers, then starts the session anew.
            self.switch_at = Some(Instant::now() + super::SHUTDOWN_GRACE);
            reactor.wake_backend();
            return;
        }
        self.restart_session(reactor);
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
            Phase::Open {
                stream,
                session_deadline,
                ..
            } => Wait {
                socket: Some((
                    stream.as_raw_fd(),
                    stream.is_ready() && self.written < self.output.len(),
                )),
                deadline: if self.protocol.is_open() {
                    match (self.protocol.deadline(), self.switch_at) {
                        (Some(due), Some(switch)) => Some(due.min(switch)),
                        (due, switch) => due.or(switch),
                    }
                } else {
                    Some(*session_deadline)
                },
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
        // Until the server has answered every publish (for up to a second): closing with its
        // answers unread would reset the connection, and the server would discard the
        // commands it had not read yet.
        if matches!(self.phase, Phase::Open { .. }) {
            self.protocol.end_of_publishes(&mut self.output, true);
        }
        let deadline = Instant::now() + super::SHUTDOWN_GRACE;
        let mut ignored = Vec::new();
        while matches!(self.phase, Phase::Open { .. }) {
            self.flush(reactor);
            // Messages arriving now reach nobody: the broker is going away.
            self.read(reactor, &mut ignored);
            ignored.clear();
            let Phase::Open { stream, .. } = &self.phase else {
                break;
            };
            let unwritten = self.written < self.output.len();
            let now = Instant::now();
            if (!unwritten && !self.protocol.awaiting_answers()) || now >= deadline {
                break;
            }
            if crate::io::wait_fd(stream.as_raw_fd(), unwritten, Some(deadline - now)).is_err() {
                break;
            }
        }
        self.protocol.report(&mut self.stats);
        if let Some(socket) = self.watched.take() {
            reactor.unwatch(socket);
        }
        self.phase = Phase::Down {
            retry_at: Instant::now() + super::MAX_RETRY,
        };
    }
}

/// A protocol's reads as the stream engine drives them, for the engines' protocol tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::{Protocol, Sink};
    use crate::broker::{BrokerStats, Received};
    use crate::error::Error;

    /// An input buffer that keeps what the protocol did not use, what it wrote back, and
    /// what it delivered.
    #[derive(Default)]
    pub(crate) struct Feed {
        pub(crate) input: Vec<u8>,
        pub(crate) out: Vec<u8>,
        pub(crate) received: Vec<Received>,
        pub(crate) stats: BrokerStats,
    }

    impl Feed {
        pub(crate) fn bytes<P: Protocol>(
            &mut self,
            protocol: &mut P,
            bytes: &[u8],
        ) -> Result<(), Error> {
            self.input.extend_from_slice(bytes);
            let mut sink = Sink {
                received: &mut self.received,
                stats: &mut self.stats,
            };
            let used = protocol.read(&self.input, &mut self.out, &mut sink)?;
            assert!(used <= self.input.len());
            self.input.drain(..used);
            Ok(())
        }

        /// Feeds `bytes`, which must be whole frames or commands: every byte is used.
        pub(crate) fn all<P: Protocol>(
            &mut self,
            protocol: &mut P,
            bytes: &[u8],
        ) -> Result<(), Error> {
            self.bytes(protocol, bytes)?;
            assert!(
                self.input.is_empty(),
                "left unused: {:?}",
                String::from_utf8_lossy(&self.input)
            );
            Ok(())
        }

        /// (topic, payload) of every message delivered so far.
        pub(crate) fn delivered(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
            self.received
                .iter()
                .map(|message| (message.topic().to_vec(), message.payload().to_vec()))
                .collect()
        }
    }

    /// A name no other test run shares, so that runs against one server never meet.
    pub(crate) fn unique_name() -> String {
        format!(
            "fdcast-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    }

    /// A connection to the test server at `address`, reads timing out after 100 ms; fails,
    /// naming `engine` and `url`, when the server is down.
    pub(crate) fn connect_to(address: (&str, u16), engine: &str, url: &str) -> TcpStream {
        let socket = TcpStream::connect(address)
            .unwrap_or_else(|err| panic!("{engine} at {url} is required: {err}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        socket
    }

    /// Writes `out` to `socket`, then reads into `feed` until `done`, writing back what the
    /// protocol answers as the engine would; fails after 5 s.
    pub(crate) fn pump<P: Protocol>(
        socket: &mut TcpStream,
        protocol: &mut P,
        feed: &mut Feed,
        out: &mut Vec<u8>,
        done: &dyn Fn(&P, &Feed) -> bool,
    ) {
        socket.write_all(out).unwrap();
        out.clear();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(protocol, feed) {
            assert!(
                Instant::now() < deadline,
                "no answer from the server in 5 s"
            );
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk) {
                Ok(0) => panic!("the server closed the connection"),
                Ok(n) => feed.bytes(protocol, &chunk[..n]).unwrap(),
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(err) => panic!("{err}"),
            }
            socket.write_all(&feed.out).unwrap();
            feed.out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::broker::Outbound;

    /// Says nothing but the publishes' payloads; open at once, confirms nothing (as NATS);
    /// counts the bytes it reads.
    #[derive(Default)]
    struct Bare {
        read: usize,
        /// What `holding_publishes` answers.
        holding: bool,
        /// What `dispatch_sends_held` answers.
        sends_held: bool,
    }

    impl Protocol for Bare {
        const NAME: &'static str = "bare";
        fn start(&mut self, _out: &mut Vec<u8>) {}
        fn read(
            &mut self,
            input: &[u8],
            _out: &mut Vec<u8>,
            _sink: &mut Sink<'_>,
        ) -> Result<usize, Error> {
            self.read += input.len();
            Ok(input.len())
        }
        fn is_open(&self) -> bool {
            true
        }
        fn subscribe(&mut self, _topic: &[u8], _out: &mut Vec<u8>) {}
        fn unsubscribe(&mut self, _topic: &[u8], _out: &mut Vec<u8>) {}
        fn publish(&mut self, _topic: &[u8], payload: &[u8], out: &mut Vec<u8>) {
            out.extend_from_slice(payload);
        }
        fn unconfirmed(&self) -> usize {
            0
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn subscribed(&self) -> usize {
            0
        }
        fn holding_publishes(&self) -> bool {
            self.holding
        }
        fn dispatch_sends_held(&self) -> bool {
            self.sends_held
        }
        fn awaiting_answers(&self) -> bool {
            false
        }
    }

    /// An engine connected to a (blocking) server socket of the test's.
    fn connected(
        reactor: &Reactor,
        outbound: &Outbound,
    ) -> (StreamEngine<Bare>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut engine =
            StreamEngine::new(Bare::default(), &[("127.0.0.1".to_string(), port)], None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !engine.is_ready() {
            assert!(Instant::now() < deadline, "no connection");
            engine.advance(&mut Context {
                reactor,
                outbound,
                received: &mut Vec::new(),
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        let (server, _) = listener.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (engine, server)
    }

    fn turn(engine: &mut StreamEngine<Bare>, reactor: &Reactor, outbound: &Outbound) {
        engine.advance(&mut Context {
            reactor,
            outbound,
            received: &mut Vec::new(),
        });
    }

    #[test]
    fn a_read_cut_short_by_its_budget_has_dispatch_come_back_for_the_rest() {
        let reactor = Reactor::new().unwrap();
        let outbound = Outbound::default();
        let (mut engine, mut server) = connected(&reactor, &outbound);
        // Twice a turn's budget, all in the engine's socket before it reads.
        server.write_all(&[b'i'; 2 * READ_PER_TURN]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ready = Vec::new();
        while !reactor
            .wait(Some(Duration::from_millis(100)), &mut ready)
            .unwrap()
            .backend
        {
            assert!(Instant::now() < deadline, "the bytes never arrived");
        }
        // Every edge the bytes caused is consumed.
        std::thread::sleep(Duration::from_millis(50));
        let _ = reactor.wait(Some(Duration::ZERO), &mut ready).unwrap();

        turn(&mut engine, &reactor, &outbound);
        assert_eq!(engine.protocol.read, READ_PER_TURN, "one turn's budget");
        // No new byte arrives to make an edge: the engine itself asks for the next turn.
        let wakeups = reactor.wait(Some(Duration::ZERO), &mut ready).unwrap();
        assert!(
            wakeups.backend,
            "dispatch is told to service the engine again"
        );
        turn(&mut engine, &reactor, &outbound);
        assert_eq!(engine.protocol.read, 2 * READ_PER_TURN);
    }

    #[test]
    fn publishes_held_for_an_answer_are_queued_without_driving_and_sent_once_released() {
        let reactor = Reactor::new().unwrap();
        let outbound = Outbound::default();
        let (mut engine, mut server) = connected(&reactor, &outbound);

        assert!(outbound.push_publish(b"t", b"first "), "not held yet");
        turn(&mut engine, &reactor, &outbound);
        assert_eq!(outbound.counts(), (0, 0), "taken and written");
        engine.protocol.holding = true;
        turn(&mut engine, &reactor, &outbound);
        assert!(
            !outbound.push_publish(b"t", b"second "),
            "held: a publisher has nothing to drive"
        );
        turn(&mut engine, &reactor, &outbound);
        assert_eq!(outbound.counts(), (1, 0), "the held publish stays queued");

        engine.protocol.holding = false;
        turn(&mut engine, &reactor, &outbound);
        assert_eq!(outbound.counts(), (0, 0));
        assert!(outbound.push_publish(b"t", b"third"), "released");
        turn(&mut engine, &reactor, &outbound);
        let want = b"first second third";
        let mut got = vec![0; want.len()];
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn where_the_answer_only_paces_publishes_dispatch_sends_them_while_held() {
        let reactor = Reactor::new().unwrap();
        let outbound = Outbound::default();
        let (mut engine, mut server) = connected(&reactor, &outbound);
        engine.protocol.holding = true;
        engine.protocol.sends_held = true;
        turn(&mut engine, &reactor, &outbound);

        assert!(
            !outbound.push_publish(b"t", b"first "),
            "held: a publisher has nothing to drive"
        );
        engine.write(&mut Context {
            reactor: &reactor,
            outbound: &outbound,
            received: &mut Vec::new(),
        });
        assert_eq!(outbound.counts(), (1, 0), "a publisher's turn holds it");
        turn(&mut engine, &reactor, &outbound);
        assert_eq!(outbound.counts(), (0, 0), "a dispatch turn takes it");
        assert!(!outbound.push_publish(b"t", b"second"), "still held");
        turn(&mut engine, &reactor, &outbound);
        let want = b"first second";
        let mut got = vec![0; want.len()];
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn publishes_left_for_a_backed_up_output_go_out_when_the_socket_takes_it_whole() {
        let reactor = Reactor::new().unwrap();
        let outbound = Outbound::default();
        let mut received = Vec::new();
        let (mut engine, mut server) = connected(&reactor, &outbound);

        // A backed-up output, which the socket (with room for it) takes in one write, and a
        // publish queued meanwhile.
        engine.output = vec![b'o'; OUTPUT_HIGH_WATER];
        engine.written = 0;
        assert!(outbound.push_publish(b"t", b"queued"));
        engine.write(&mut Context {
            reactor: &reactor,
            outbound: &outbound,
            received: &mut received,
        });
        assert_eq!(outbound.counts(), (0, 0), "the publish was taken");
        assert_eq!(engine.output.len(), engine.written, "and written");

        let mut want = vec![b'o'; OUTPUT_HIGH_WATER];
        want.extend_from_slice(b"queued");
        let mut got = vec![0; want.len()];
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }
}
