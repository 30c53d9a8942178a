//! Cross-process fan-out through PostgreSQL LISTEN/NOTIFY, wire-compatible with
//! Tep::Broadcast workers (see `wire`).
//!
//! One connection per registry, in libpq's non-blocking pipeline mode. Publishes go out in
//! batches: each publish is one `SELECT pg_notify($1, $2)`, and one pipeline sync ends a batch,
//! so a batch commits as one transaction and many publishes share a round trip. PostgreSQL
//! folds identical notifications (same channel and payload) within one transaction, so a
//! batch is cut before a notification that would repeat one already in it: every publish
//! still reaches every listener once. Once 64 notifications are unconfirmed, at most two
//! batches are in flight: publishes made meanwhile wait in the engine and go out as one
//! batch when a sync comes back (`dispatch` reads it), so batches grow with the publish rate
//! while a lone publish or a short burst goes out at once. A publish call never waits for a
//! round trip. The
//! connection's socket sits in the registry's poller; a lost connection is re-established
//! with capped exponential backoff, driven by the reactor's timer, and LISTEN re-issued.
//! While the connection is down, publishes wait in the broker's bounded queue and go out
//! after the reconnect. Batches handed to the server when the connection broke may or may
//! not have been delivered: LISTEN/NOTIFY is at-most-once across an outage.

#![forbid(unsafe_code)]

use std::collections::{HashSet, VecDeque};
use std::ffi::CString;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::Interest;

use super::libpq::{self, ConnectProgress, Connection, FlushProgress, ResultKind};
use super::outbound::{InterestChange, Publishes};
use super::{
    BrokerStats, Context, DEFAULT_CONNECT_TIMEOUT, Engine, FIRST_RETRY, MAX_RETRY, Received, Wait,
    next_retry, wire,
};
use crate::error::Error;
use crate::io;
use crate::reactor::Reactor;

/// Notifications handed to libpq whose batch the server has not confirmed, at most; beyond,
/// publishes wait in the broker's queue.
const MAX_UNCONFIRMED: usize = 65_536;
/// Notifications per batch (one transaction), at most.
const MAX_BATCH: usize = 1024;
/// Batches handed to the server whose sync has not come back, at most, once `HOLD_AFTER`
/// notifications are unconfirmed. Publishes made meanwhile wait in `publishes` and go out as
/// one batch when a sync returns (`dispatch` reads it). Without this, a publisher that finds
/// the engine free sends every publish as a batch of one, a transaction each: the old
/// design's cost (one signal to every listening backend per transaction, which then wakes
/// and reads the queue). Two keep the server busy: one batch runs while the next waits.
const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Below this many unconfirmed notifications, publishes go out at once whatever is in
/// flight: a short burst needs no `dispatch` to leave, and a lone publish waits for nothing.
const HOLD_AFTER: usize = 64;
/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_CHANNEL_LEN: usize = 63;

const NOTIFY_SQL: &std::ffi::CStr = c"SELECT pg_notify($1, $2)";
/// NOTIFY_SQL prepared once per connection (with the LISTEN): a publish then costs the
/// server no parse and no plan, which were most of its time per `pg_notify`.
const NOTIFY_STATEMENT: &std::ffi::CStr = c"fdcast_notify";

/// The batches handed to libpq whose sync has not come back.
#[derive(Default)]
struct InFlight {
    /// Per batch, how many notifications it holds (the LISTEN counts as a batch of 0).
    batches: VecDeque<usize>,
    /// Notifications in `batches`.
    notifications: usize,
    /// Whether a statement of the batch whose results are being read failed.
    failed: bool,
}

/// What reading a pipeline's results settled.
enum Settled {
    /// A batch's sync came back: its notifications were sent, or (`failed`) its transaction
    /// rolled back and none of them was.
    Batch { notifications: usize, failed: bool },
    /// A statement failed (its batch's sync follows).
    Error(String),
}

impl Settled {
    /// Counts a settled batch as published or dropped.
    fn count(self, stats: &mut BrokerStats) {
        if let Settled::Batch {
            notifications,
            failed,
        } = self
        {
            if failed {
                stats.dropped += notifications as u64;
            } else {
                stats.published += notifications as u64;
            }
        }
    }
}

impl InFlight {
    /// Reads the results libpq has ready, handing each batch to `settled` as its sync comes
    /// back, and each failed statement as it comes.
    fn read_results(&mut self, connection: &mut Connection, mut settled: impl FnMut(Settled)) {
        let mut ends_in_a_row = 0;
        while !self.batches.is_empty() && !connection.is_busy() && ends_in_a_row < 2 {
            let Some(kind) = connection.next_result() else {
                ends_in_a_row += 1;
                continue;
            };
            ends_in_a_row = 0;
            match kind {
                ResultKind::Ok => {}
                ResultKind::Error(message) => {
                    self.failed = true;
                    settled(Settled::Error(message));
                }
                ResultKind::PipelineAborted => self.failed = true,
                ResultKind::PipelineSync => {
                    let notifications = self.batches.pop_front().unwrap_or(0);
                    self.notifications -= notifications;
                    settled(Settled::Batch {
                        notifications,
                        failed: std::mem::take(&mut self.failed),
                    });
                }
            }
        }
    }
}

enum Phase {
    /// No connection; the next attempt is due at `retry_at`.
    Down { retry_at: Instant },
    /// PQconnectPoll in progress.
    Connecting(Connection),
    /// Connected; LISTEN sent, its confirmation awaited.
    Subscribing(Connection),
    /// Listening; notifications flow both ways.
    Ready(Connection),
}

pub(crate) struct PgEngine {
    conninfo: CString,
    channel: CString,
    connect_timeout: Duration,
    phase: Phase,
    /// The batches handed to libpq whose sync has not come back.
    in_flight: InFlight,
    /// The batch being written: its notifications' hashes, to cut it before a repeat.
    open_batch: HashSet<u64>,
    hasher: RandomState,
    publishes: Publishes,
    interest: Vec<InterestChange>,
    /// The backend pid of the current connection, to recognise our own notifications.
    own_pid: i32,
    /// The socket registered with the reactor, and whether for writing too.
    watched: Option<(RawFd, bool)>,
    retry_delay: Duration,
    /// Why the last connection attempt failed, for `enable` to report.
    last_failure: Option<Error>,
    connected_before: bool,
    stats: BrokerStats,
}

impl PgEngine {
    /// Validates the conninfo and the channel; connecting is `advance`'s job.
    pub(crate) fn new(conninfo: &str, channel: &str) -> Result<PgEngine, Error> {
        let conninfo = libpq::c_string(conninfo)
            .ok_or(Error::InvalidArgument("conninfo contains a NUL byte"))?;
        let settings = libpq::parse_conninfo(&conninfo).map_err(Error::InvalidConninfo)?;
        if channel.is_empty() || channel.len() > MAX_CHANNEL_LEN {
            return Err(Error::InvalidArgument("a channel name is 1 to 63 bytes"));
        }
        let channel = libpq::c_string(channel).ok_or(Error::InvalidArgument(
            "the channel name contains a NUL byte",
        ))?;
        let connect_timeout = settings
            .connect_timeout_secs
            .filter(|&secs| secs > 0)
            .map_or(DEFAULT_CONNECT_TIMEOUT, |secs| {
                Duration::from_secs(secs.max(2))
            });
        Ok(PgEngine {
            conninfo,
            channel,
            connect_timeout,
            phase: Phase::Down {
                retry_at: Instant::now(),
            },
            in_flight: InFlight::default(),
            open_batch: HashSet::new(),
            hasher: RandomState::new(),
            publishes: Publishes::default(),
            interest: Vec::new(),
            own_pid: 0,
            watched: None,
            retry_delay: FIRST_RETRY,
            last_failure: None,
            connected_before: false,
            stats: BrokerStats::default(),
        })
    }

    fn phase_name(&self) -> u8 {
        match self.phase {
            Phase::Down { .. } => 0,
            Phase::Connecting(_) => 1,
            Phase::Subscribing(_) => 2,
            Phase::Ready(_) => 3,
        }
    }

    fn start_connecting(&mut self, reactor: &Reactor) {
        match Connection::start(&self.conninfo) {
            Ok(connection) => {
                self.phase = Phase::Connecting(connection);
                self.watch(reactor, true);
            }
            Err(message) => self.fail(reactor, Error::Unreachable(message)),
        }
    }

    /// Connected: enter pipeline mode and LISTEN.
    fn subscribe(&mut self, reactor: &Reactor) {
        let Phase::Connecting(connection) = &mut self.phase else {
            return;
        };
        if !connection.enter_nonblocking_pipeline() {
            let message = connection.error_message();
            return self.fail(reactor, Error::Backend(message));
        }
        let channel = self.channel.to_string_lossy().into_owned();
        let Some(listen) = connection
            .quote_identifier(&channel)
            .and_then(|quoted| libpq::c_string(&format!("LISTEN {quoted}")))
        else {
            let message = connection.error_message();
            return self.fail(reactor, Error::Backend(message));
        };
        if !(connection.send_query(&listen, &[])
            && connection.send_prepare(NOTIFY_STATEMENT, NOTIFY_SQL, 2)
            && connection.send_sync())
        {
            let message = connection.error_message();
            return self.fail(reactor, Error::Backend(message));
        }
        self.own_pid = connection.backend_pid();
        let Phase::Connecting(connection) = std::mem::replace(
            &mut self.phase,
            Phase::Down {
                retry_at: Instant::now(),
            },
        ) else {
            unreachable!("matched above");
        };
        self.phase = Phase::Subscribing(connection);
        self.in_flight.batches.clear();
        self.in_flight.batches.push_back(0);
        self.in_flight.notifications = 0;
        self.flush_output(reactor);
    }

    /// Reads results and notifications, and writes what is queued.
    fn exchange(&mut self, cx: &mut Context<'_>) {
        let reactor = cx.reactor;
        let (Phase::Subscribing(connection) | Phase::Ready(connection)) = &mut self.phase else {
            return;
        };
        // The socket is edge-triggered: read until it has nothing more.
        loop {
            if !connection.consume_input() {
                let message = connection.error_message();
                return self.fail(reactor, Error::Backend(message));
            }
            match io::wait_fd(connection.socket(), false, Some(Duration::ZERO)) {
                Ok(true) => continue,
                _ => break,
            }
        }
        let mut listening = matches!(self.phase, Phase::Ready(_));
        let mut failure = None;
        let (Phase::Subscribing(connection) | Phase::Ready(connection)) = &mut self.phase else {
            return;
        };
        let stats = &mut self.stats;
        self.in_flight
            .read_results(connection, |settled| match settled {
                Settled::Error(message) => {
                    if !listening {
                        failure = Some(Error::Backend(format!("LISTEN failed: {message}")));
                    }
                }
                // The first sync is the LISTEN's.
                Settled::Batch { .. } if !listening => listening = true,
                settled => settled.count(stats),
            });
        while let Some(notification) = connection.next_notification() {
            if notification.sender_pid == self.own_pid {
                self.stats.ignored += 1;
            } else if let Some((topic, payload)) = wire::decode_ranges(&notification.payload) {
                self.stats.received += 1;
                cx.received.push(Received {
                    buffer: notification.payload,
                    topic,
                    payload,
                    stream: None,
                });
            } else {
                self.stats.malformed += 1;
            }
        }
        if connection.is_bad() {
            let message = connection.error_message();
            return self.fail(reactor, Error::Backend(message));
        }
        if let Some(failure) = failure {
            return self.fail(reactor, failure);
        }
        if listening && matches!(self.phase, Phase::Subscribing(_)) {
            self.become_ready();
        }
    }

    fn become_ready(&mut self) {
        let phase = std::mem::replace(
            &mut self.phase,
            Phase::Down {
                retry_at: Instant::now(),
            },
        );
        if let Phase::Subscribing(connection) = phase {
            self.phase = Phase::Ready(connection);
            self.retry_delay = FIRST_RETRY;
            if self.connected_before {
                self.stats.reconnects += 1;
            }
            self.connected_before = true;
        }
    }

    /// Takes the broker's queue while the LISTEN is in effect and there is room, and hands
    /// the publishes to libpq in batches.
    fn send_queued(&mut self, cx: &Context<'_>) {
        let room = matches!(self.phase, Phase::Ready(_))
            && self.in_flight.notifications + self.publishes.len() < MAX_UNCONFIRMED;
        cx.take(&mut self.interest, room.then_some(&mut self.publishes));
        // One channel carries every topic: interest changes need nothing from PostgreSQL.
        self.interest.clear();
        self.send_batches(cx.reactor, MAX_BATCHES_IN_FLIGHT);
    }

    /// Hands the taken publishes to libpq in batches while fewer than `max_in_flight`
    /// batches are unconfirmed; the rest stays in `publishes`.
    fn send_batches(&mut self, reactor: &Reactor, max_in_flight: usize) {
        if self.in_flight.batches.len() >= max_in_flight
            && self.in_flight.notifications >= HOLD_AFTER
        {
            return;
        }
        let Phase::Ready(connection) = &mut self.phase else {
            return;
        };
        let mut sent = 0;
        let mut batch = 0;
        let mut failed = false;
        self.open_batch.clear();
        for (topic, payload) in self.publishes.iter() {
            // Checked by the broker before the publish was queued.
            let Ok(notification) = wire::encode(topic, payload) else {
                self.stats.dropped += 1;
                sent += 1;
                continue;
            };
            let hash = self.hasher.hash_one(notification.as_bytes());
            if batch == MAX_BATCH || !self.open_batch.insert(hash) {
                if !connection.send_sync() {
                    failed = true;
                    break;
                }
                self.in_flight.batches.push_back(batch);
                self.open_batch.clear();
                batch = 0;
                if self.in_flight.batches.len() >= max_in_flight
                    && self.in_flight.notifications >= HOLD_AFTER
                {
                    // The rest waits for a sync to come back.
                    break;
                }
                self.open_batch.insert(hash);
            }
            let notification = CString::new(notification).expect("wire::encode refuses NUL bytes");
            if !connection.send_prepared(NOTIFY_STATEMENT, &[&self.channel, &notification]) {
                failed = true;
                break;
            }
            batch += 1;
            self.in_flight.notifications += 1;
            sent += 1;
        }
        if batch > 0 && !failed {
            if connection.send_sync() {
                self.in_flight.batches.push_back(batch);
            } else {
                failed = true;
            }
        }
        if failed {
            let message = connection.error_message();
            self.publishes.drop_front(sent);
            return self.fail(reactor, Error::Backend(message));
        }
        if sent == self.publishes.len() {
            self.publishes.clear();
        } else {
            self.publishes.drop_front(sent);
        }
    }

    /// Pushes libpq's output buffer to the socket; watches for writability if it is not all
    /// gone.
    fn flush_output(&mut self, reactor: &Reactor) {
        let (Phase::Subscribing(connection) | Phase::Ready(connection)) = &mut self.phase else {
            return;
        };
        match connection.flush() {
            FlushProgress::Done => self.watch(reactor, false),
            FlushProgress::Pending => self.watch(reactor, true),
            FlushProgress::Failed => {
                let message = connection.error_message();
                self.fail(reactor, Error::Backend(message));
            }
        }
    }

    /// Watches the connection's current socket, for reading, and for writing too if asked.
    fn watch(&mut self, reactor: &Reactor, for_write: bool) {
        let socket = match &self.phase {
            Phase::Connecting(connection)
            | Phase::Subscribing(connection)
            | Phase::Ready(connection) => connection.socket(),
            Phase::Down { .. } => return,
        };
        let connecting = matches!(self.phase, Phase::Connecting(_));
        // Re-register at every connection step: libpq may have replaced the socket with a new
        // one under the same number, which epoll would not know.
        if !connecting && self.watched == Some((socket, for_write)) {
            return;
        }
        let interest = if for_write {
            Interest::READABLE.add(Interest::WRITABLE)
        } else {
            Interest::READABLE
        };
        let previous = self.watched.map(|(previous, _)| previous);
        if let Err(err) = reactor.watch_backend(previous, socket, interest) {
            return self.fail(reactor, Error::Io(err));
        }
        self.watched = Some((socket, for_write));
    }

    /// Drops the connection and schedules the next attempt.
    fn fail(&mut self, reactor: &Reactor, error: Error) {
        if let Some((socket, _)) = self.watched.take() {
            reactor.unwatch(socket);
        }
        // Batches in flight are lost with the session: at-most-once across an outage.
        self.stats.dropped += self.in_flight.notifications as u64;
        self.in_flight.batches.clear();
        self.in_flight.notifications = 0;
        self.in_flight.failed = false;
        self.phase = Phase::Down {
            retry_at: Instant::now() + self.retry_delay,
        };
        self.retry_delay = next_retry(self.retry_delay);
        self.last_failure = Some(error);
        // Found by a publisher's write, the failure leaves no socket to watch and no timer
        // armed for `retry_at`: only dispatch's service of the backend arms it.
        reactor.wake_backend();
    }
}

impl Engine for PgEngine {
    fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    fn advance(&mut self, cx: &mut Context<'_>) {
        loop {
            let before = self.phase_name();
            match &mut self.phase {
                Phase::Down { retry_at } => {
                    if Instant::now() < *retry_at {
                        break;
                    }
                    self.start_connecting(cx.reactor);
                }
                Phase::Connecting(connection) => match connection.poll_connect() {
                    ConnectProgress::WantRead => self.watch(cx.reactor, false),
                    ConnectProgress::WantWrite => self.watch(cx.reactor, true),
                    ConnectProgress::Connected => self.subscribe(cx.reactor),
                    ConnectProgress::Failed => {
                        let message = connection.error_message();
                        self.fail(cx.reactor, Error::Unreachable(message));
                    }
                },
                Phase::Subscribing(_) | Phase::Ready(_) => self.exchange(cx),
            }
            if self.phase_name() == before {
                break;
            }
        }
        self.send_queued(cx);
        self.flush_output(cx.reactor);
    }

    fn write(&mut self, cx: &mut Context<'_>) {
        self.send_queued(cx);
        self.flush_output(cx.reactor);
    }

    fn wait(&self) -> Wait {
        match &self.phase {
            Phase::Down { retry_at } => Wait {
                socket: None,
                deadline: Some(*retry_at),
            },
            _ => Wait {
                socket: self.watched,
                deadline: None,
            },
        }
    }

    fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    fn take_failure(&mut self) -> Option<Error> {
        self.last_failure.take()
    }

    fn stats(&self) -> BrokerStats {
        BrokerStats {
            queued: (self.publishes.len() + self.in_flight.notifications) as u64,
            connected: u64::from(matches!(self.phase, Phase::Ready(_))),
            ..self.stats
        }
    }

    /// UNLISTENs, pushes out what libpq still buffers and waits for the server to confirm it
    /// (for up to a second), and disconnects.
    fn shut_down(&mut self, reactor: &Reactor) {
        // What `write` took and the in-flight limit held back goes out too.
        self.send_batches(reactor, usize::MAX);
        if let Some((socket, _)) = self.watched.take() {
            reactor.unwatch(socket);
        }
        if let Phase::Ready(connection) = &mut self.phase {
            let channel = self.channel.to_string_lossy().into_owned();
            if let Some(unlisten) = connection
                .quote_identifier(&channel)
                .and_then(|quoted| libpq::c_string(&format!("UNLISTEN {quoted}")))
            {
                connection.send_statement(&unlisten, &[]);
            }
            // Until the server has confirmed every batch (for up to a second): closing with
            // its answers unread would reset the connection, and the server would discard
            // what it had not executed yet.
            let deadline = Instant::now() + super::SHUTDOWN_GRACE;
            loop {
                let flushed = connection.flush();
                if flushed == FlushProgress::Failed || !connection.consume_input() {
                    break;
                }
                let stats = &mut self.stats;
                self.in_flight
                    .read_results(connection, |settled| settled.count(stats));
                // Notifications arriving now reach nobody: the broker is going away.
                while connection.next_notification().is_some() {}
                let now = Instant::now();
                if (flushed == FlushProgress::Done && self.in_flight.batches.is_empty())
                    || now >= deadline
                {
                    break;
                }
                let for_write = flushed == FlushProgress::Pending;
                if io::wait_fd(connection.socket(), for_write, Some(deadline - now)).is_err() {
                    break;
                }
            }
        }
        self.phase = Phase::Down {
            retry_at: Instant::now() + MAX_RETRY,
        };
    }
}
