//! Cross-process fan-out through PostgreSQL LISTEN/NOTIFY, wire-compatible with
//! Tep::Broadcast workers (see `wire`).
//!
//! One connection per registry, in libpq's non-blocking pipeline mode. Every publish becomes
//! `SELECT pg_notify($1, $2)` followed by a pipeline sync, so each runs in a transaction of
//! its own (PostgreSQL folds identical notifications within one transaction) and a publish
//! never waits for a round trip. The connection's socket sits in the registry's poller; a
//! lost connection is re-established with capped exponential backoff, driven by the
//! reactor's timer, and LISTEN re-issued. While the connection is down, notifications wait
//! in a bounded queue and go out after the reconnect; beyond the bound they are dropped and
//! counted. Notifications already handed to the server when the connection broke may or may
//! not have been delivered: LISTEN/NOTIFY is at-most-once across an outage.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::Interest;

use super::libpq::{self, ConnectProgress, Connection, FlushProgress, ResultKind};
use super::{PgStats, wire};
use crate::error::Error;
use crate::io;
use crate::reactor::Reactor;

/// How long `enable` waits for the connection and the LISTEN, unless the conninfo sets
/// `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Notifications waiting to be sent or confirmed, at most; beyond, publishes are not
/// forwarded (the local delivery still happens) and `dropped` counts them.
pub(crate) const MAX_QUEUED_NOTIFICATIONS: usize = 65_536;
/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_CHANNEL_LEN: usize = 63;

const NOTIFY_SQL: &std::ffi::CStr = c"SELECT pg_notify($1, $2)";

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

pub(crate) struct PgBackend {
    conninfo: CString,
    channel: CString,
    phase: Phase,
    /// Notifications not yet handed to libpq (while connecting or down).
    waiting: VecDeque<CString>,
    /// Statements handed to libpq whose pipeline sync has not come back.
    unconfirmed: usize,
    /// The backend pid of the current connection, to recognise our own notifications.
    own_pid: i32,
    /// The socket registered with the reactor, and whether for writing too.
    watched: Option<(RawFd, bool)>,
    /// Whether the statement whose results are being read failed (its sync still follows).
    statement_failed: bool,
    retry_delay: Duration,
    /// Why the last connection attempt failed, for `enable` to report.
    last_failure: Option<Error>,
    connected_before: bool,
    stats: PgStats,
}

/// Where the backend waits next: a socket and a direction, and a deadline.
pub(crate) struct Wait {
    pub(crate) socket: Option<(RawFd, bool)>,
    pub(crate) deadline: Option<Instant>,
}

impl PgBackend {
    /// Connects and LISTENs, blocking until the LISTEN is in effect or the attempt fails.
    pub(crate) fn enable(
        conninfo: &str,
        channel: &str,
        reactor: &Reactor,
    ) -> Result<PgBackend, Error> {
        let conninfo = libpq::c_string(conninfo)
            .ok_or(Error::InvalidArgument("conninfo contains a NUL byte"))?;
        let settings = libpq::parse_conninfo(&conninfo).map_err(Error::InvalidConninfo)?;
        if channel.is_empty() || channel.len() > MAX_CHANNEL_LEN {
            return Err(Error::InvalidArgument("a channel name is 1 to 63 bytes"));
        }
        let channel = libpq::c_string(channel).ok_or(Error::InvalidArgument(
            "the channel name contains a NUL byte",
        ))?;
        let timeout = settings
            .connect_timeout_secs
            .filter(|&secs| secs > 0)
            .map_or(DEFAULT_CONNECT_TIMEOUT, |secs| {
                Duration::from_secs(secs.max(2))
            });
        let deadline = Instant::now() + timeout;

        let mut backend = PgBackend {
            conninfo,
            channel,
            phase: Phase::Down {
                retry_at: Instant::now(),
            },
            waiting: VecDeque::new(),
            unconfirmed: 0,
            own_pid: 0,
            watched: None,
            statement_failed: false,
            retry_delay: FIRST_RETRY,
            last_failure: None,
            connected_before: false,
            stats: PgStats::default(),
        };
        let mut ignored = Vec::new();
        loop {
            backend.advance(reactor, &mut ignored);
            if matches!(backend.phase, Phase::Ready(_)) {
                return Ok(backend);
            }
            if let Some(failure) = backend.last_failure.take() {
                backend.shut_down(reactor);
                return Err(failure);
            }
            let now = Instant::now();
            if now >= deadline {
                backend.shut_down(reactor);
                return Err(Error::Unreachable(format!(
                    "no connection and LISTEN within {} s",
                    timeout.as_secs()
                )));
            }
            if let Some((socket, for_write)) = backend.wait().socket {
                io::wait_fd(socket, for_write, Some(deadline - now))?;
            }
        }
    }

    /// Queues one publish's notification; it goes out at once if the connection is ready.
    pub(crate) fn notify(&mut self, notification: String, reactor: &Reactor) {
        if self.unconfirmed + self.waiting.len() >= MAX_QUEUED_NOTIFICATIONS {
            self.stats.dropped += 1;
            return;
        }
        let notification = CString::new(notification).expect("wire::encode refuses NUL bytes");
        self.waiting.push_back(notification);
        if matches!(self.phase, Phase::Ready(_)) {
            self.send_waiting(reactor);
        }
    }

    /// Does every piece of work that needs no waiting: connection steps, reconnects that are
    /// due, reading results and notifications, sending queued notifications. Appends the
    /// `(topic, payload)` of other registries' notifications to `received`.
    pub(crate) fn advance(&mut self, reactor: &Reactor, received: &mut Vec<Vec<u8>>) {
        loop {
            let before = self.phase_name();
            match &mut self.phase {
                Phase::Down { retry_at } => {
                    if Instant::now() < *retry_at {
                        break;
                    }
                    self.start_connecting(reactor);
                }
                Phase::Connecting(connection) => match connection.poll_connect() {
                    ConnectProgress::WantRead => self.watch(reactor, false),
                    ConnectProgress::WantWrite => self.watch(reactor, true),
                    ConnectProgress::Connected => self.subscribe(reactor),
                    ConnectProgress::Failed => {
                        let message = connection.error_message();
                        self.fail(reactor, Error::Unreachable(message));
                    }
                },
                Phase::Subscribing(_) | Phase::Ready(_) => self.exchange(reactor, received),
            }
            if self.phase_name() == before {
                break;
            }
        }
    }

    /// What `advance` waits for now.
    pub(crate) fn wait(&self) -> Wait {
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

    pub(crate) fn stats(&self) -> PgStats {
        PgStats {
            queued: (self.waiting.len() + self.unconfirmed) as u64,
            connected: u64::from(matches!(self.phase, Phase::Ready(_))),
            ..self.stats
        }
    }

    /// UNLISTENs, pushes out what libpq still buffers (for up to a second), and disconnects.
    pub(crate) fn shut_down(&mut self, reactor: &Reactor) {
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
            let deadline = Instant::now() + Duration::from_secs(1);
            while connection.flush() == FlushProgress::Pending {
                let now = Instant::now();
                if now >= deadline
                    || !matches!(
                        io::wait_fd(connection.socket(), true, Some(deadline - now)),
                        Ok(true)
                    )
                {
                    break;
                }
            }
        }
        self.phase = Phase::Down {
            retry_at: Instant::now() + MAX_RETRY,
        };
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
        if !connection.send_statement(&listen, &[]) {
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
        self.unconfirmed = 1;
        self.flush_output(reactor);
    }

    /// Reads results and notifications, and writes what is queued.
    fn exchange(&mut self, reactor: &Reactor, received: &mut Vec<Vec<u8>>) {
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
        let mut ends_in_a_row = 0;
        while self.unconfirmed > 0 && !connection.is_busy() && ends_in_a_row < 2 {
            match connection.next_result() {
                None => ends_in_a_row += 1,
                Some(kind) => {
                    ends_in_a_row = 0;
                    match kind {
                        ResultKind::Ok => {}
                        ResultKind::Error(message) => {
                            self.statement_failed = true;
                            if !listening {
                                failure = Some(Error::Backend(format!("LISTEN failed: {message}")));
                            }
                        }
                        ResultKind::PipelineAborted => self.statement_failed = true,
                        ResultKind::PipelineSync => {
                            self.unconfirmed -= 1;
                            if !listening {
                                listening = true;
                            } else if self.statement_failed {
                                self.stats.dropped += 1;
                            } else {
                                self.stats.sent += 1;
                            }
                            self.statement_failed = false;
                        }
                    }
                }
            }
        }
        while let Some(notification) = connection.next_notification() {
            if notification.sender_pid == self.own_pid {
                self.stats.ignored_self += 1;
            } else if wire::decode(&notification.payload).is_some() {
                self.stats.received += 1;
                received.push(notification.payload);
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
        if matches!(self.phase, Phase::Ready(_)) {
            self.send_waiting(reactor);
        }
        self.flush_output(reactor);
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

    fn send_waiting(&mut self, reactor: &Reactor) {
        let Phase::Ready(connection) = &mut self.phase else {
            return;
        };
        while let Some(notification) = self.waiting.pop_front() {
            if !connection.send_statement(NOTIFY_SQL, &[&self.channel, &notification]) {
                self.waiting.push_front(notification);
                let message = connection.error_message();
                return self.fail(reactor, Error::Backend(message));
            }
            self.unconfirmed += 1;
        }
        self.flush_output(reactor);
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
        // Statements in flight are lost with the session: at-most-once across an outage.
        self.stats.dropped += self
            .unconfirmed
            .saturating_sub(usize::from(matches!(self.phase, Phase::Subscribing(_))))
            as u64;
        self.unconfirmed = 0;
        self.phase = Phase::Down {
            retry_at: Instant::now() + self.retry_delay,
        };
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY);
        self.last_failure = Some(error);
    }
}
