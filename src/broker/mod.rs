//! Cross-process fan-out through a message engine: PostgreSQL LISTEN/NOTIFY, Redis pub/sub
//! and NATS, each behind the [`Engine`] seam, chosen by the URL's scheme.
//!
//! The contract every engine keeps:
//! - it is a non-blocking state machine: `advance` does every piece of work that needs no
//!   waiting (connection steps, due reconnects, reading, writing) and returns; its socket sits
//!   in the registry's reactor under the backend token, its deadlines in the reactor's timer;
//! - it takes its work from [`Outbound`]: changes of interest always (it keeps the set of
//!   topics it should be subscribed to, and re-issues them after a reconnect), publishes only
//!   when it can send them, so that publishes made while it is down wait in the bounded queue;
//! - what it receives from other publishers it appends to `received`, and the registry
//!   delivers them with no broker lock held.
//!
//! Locks: `Outbound`'s queue is a leaf, held only to queue or take. `engine` is held while
//! the engine does non-blocking I/O, by `dispatch` or by a publisher that finds it free
//! (`try_lock`): a publisher never waits for another thread's I/O. Whoever releases the
//! engine looks at the queue again, so nothing queued meanwhile is stranded.

// A build with no engine keeps the seam (enable answers ENOTSUP) and uses none of the rest.
#![cfg_attr(
    not(any(feature = "pg", feature = "redis", feature = "nats")),
    allow(dead_code, unused_variables, unreachable_code)
)]

#[cfg(feature = "pg")]
mod libpq;
#[cfg(feature = "nats")]
pub(crate) mod nats;
mod outbound;
#[cfg(feature = "pg")]
mod pg;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod redis_cluster;
#[cfg(any(feature = "redis", feature = "nats"))]
mod stream;
#[cfg(any(feature = "redis", feature = "nats"))]
mod tls;
#[cfg(any(feature = "redis", feature = "nats"))]
pub(crate) mod topic;
#[cfg(any(feature = "redis", feature = "nats"))]
mod url;
#[cfg(feature = "pg")]
pub(crate) mod wire;

use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::Error;
use crate::history::{EventId, HistoryLimits};
use crate::io;
use crate::reactor::Reactor;
pub(crate) use outbound::Outbound;
use outbound::{Encode, InterestChange, Publishes};

/// Counters of a broker, whichever its engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Publishes the engine took: confirmed by the server (PostgreSQL, Redis), or written to
    /// the socket (NATS, which confirms nothing).
    pub published: u64,
    /// Messages from other publishers delivered to local subscribers.
    pub received: u64,
    /// This registry's own publishes, come back and ignored.
    pub ignored: u64,
    /// Messages the engine delivered that are not in the expected format, ignored.
    pub malformed: u64,
    /// Times the connection was re-established after a loss.
    pub reconnects: u64,
    /// Publishes waiting to be sent or confirmed now.
    pub queued: u64,
    /// Publishes not forwarded: the queue was full, the server refused them, or they were in
    /// flight when the connection broke (with Redis and shared history: those the stream
    /// does not hold after the reconnect).
    pub dropped: u64,
    /// 1 while the session is up and subscribed, 0 while connecting or reconnecting.
    pub connected: u64,
    /// Topics the engine is subscribed to now (PostgreSQL: 0, it listens on one channel).
    pub topics: u64,
}

/// Counters of the PostgreSQL backend, as `fdcast_pg_get_stats` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgStats {
    /// Notifications the server confirmed.
    pub sent: u64,
    /// Notifications from other registries delivered to local subscribers.
    pub received: u64,
    /// This registry's own notifications, come back and ignored.
    pub ignored_self: u64,
    /// Notifications on the channel not in the `<len>:<topic><payload>` format, ignored.
    pub malformed: u64,
    /// Times the connection was re-established after a loss.
    pub reconnects: u64,
    /// Notifications waiting to be sent or confirmed now.
    pub queued: u64,
    /// 1 while the LISTEN is in effect, 0 while connecting or reconnecting.
    pub connected: u64,
    /// Notifications not forwarded: the queue was full, or the server refused them.
    pub dropped: u64,
}

impl From<BrokerStats> for PgStats {
    fn from(stats: BrokerStats) -> PgStats {
        PgStats {
            sent: stats.published,
            received: stats.received,
            ignored_self: stats.ignored,
            malformed: stats.malformed,
            reconnects: stats.reconnects,
            queued: stats.queued,
            connected: stats.connected,
            dropped: stats.dropped,
        }
    }
}

/// One message from another publisher: a buffer holding its topic and payload.
pub(crate) struct Received {
    pub(crate) buffer: Vec<u8>,
    pub(crate) topic: Range<usize>,
    pub(crate) payload: Range<usize>,
    /// Under shared history: the stream's word on it (see [`Stream`]).
    pub(crate) stream: Option<Stream>,
}

/// What an engine that shares history (Redis, NATS JetStream) says of a received message or of a topic's
/// mirror, in the order the server put them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
pub(crate) enum Stream {
    /// A message with the stream's id: kept in the topic's mirror and delivered, unless the
    /// mirror has it already; `except` is the local sender's, for a publish of this process.
    Message { id: EventId, except: Option<RawFd> },
    /// An entry a fill brought: kept in the mirror, not delivered (it is history).
    Kept(EventId),
    /// The topic's mirror starts afresh, holding every stream entry after this id (the fill's
    /// entries follow as `Kept`, then the messages that arrived meanwhile).
    Synced(EventId),
    /// Entries up to this id may be missing from the mirror (trimmed before a reconnect
    /// fetched them); the entries fetched follow as messages.
    Hole(EventId),
    /// `count` messages of the topic, with ids up to `before`, were lost on the broker's side
    /// before this process delivered them (a publisher's numbering skipped them): a hole in
    /// the mirror as [`Stream::Hole`], and a gap for every local subscriber of the topic.
    #[cfg_attr(not(any(feature = "nats", feature = "redis")), allow(dead_code))]
    Lost { before: EventId, count: u64 },
    /// The mirror no longer follows the stream (its channel was unsubscribed).
    Unsynced,
}

impl Received {
    /// A note or message of shared history (`payload` empty for a note).
    #[cfg(any(feature = "redis", feature = "nats"))]
    pub(crate) fn streamed(topic: &[u8], payload: &[u8], stream: Stream) -> Received {
        Received {
            stream: Some(stream),
            ..Received::new(topic, payload)
        }
    }

    #[cfg(any(feature = "redis", feature = "nats"))]
    pub(crate) fn new(topic: &[u8], payload: &[u8]) -> Received {
        let mut buffer = Vec::with_capacity(topic.len() + payload.len());
        buffer.extend_from_slice(topic);
        buffer.extend_from_slice(payload);
        Received {
            buffer,
            topic: 0..topic.len(),
            payload: topic.len()..topic.len() + payload.len(),
            stream: None,
        }
    }

    pub(crate) fn topic(&self) -> &[u8] {
        &self.buffer[self.topic.clone()]
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.buffer[self.payload.clone()]
    }
}

/// What an engine works with during one turn.
pub(crate) struct Context<'a> {
    pub(crate) reactor: &'a Reactor,
    pub(crate) outbound: &'a Outbound,
    pub(crate) received: &'a mut Vec<Received>,
}

impl Context<'_> {
    /// Takes the queued changes of interest, and the publishes too when `publishes` is given.
    pub(crate) fn take(
        &self,
        interest: &mut Vec<InterestChange>,
        publishes: Option<&mut Publishes>,
    ) {
        self.outbound.take(interest, publishes);
    }
}

/// Where an engine waits next: a socket (and whether for writing too), and a deadline.
#[derive(Clone, Copy, Default)]
pub(crate) struct Wait {
    pub(crate) socket: Option<(RawFd, bool)>,
    pub(crate) deadline: Option<Instant>,
}

/// One engine's connection and protocol (see the module's contract).
pub(crate) trait Engine: Send {
    /// Does every piece of work that needs no waiting.
    fn advance(&mut self, cx: &mut Context<'_>);
    /// A publisher's turn: takes what is queued and writes what the socket takes now, without
    /// reading (received messages are for `dispatch` to deliver).
    fn write(&mut self, cx: &mut Context<'_>);
    /// `write` for the last time, before `shut_down`: everything queued goes out, whatever
    /// the engine would otherwise hold back for a batch.
    fn drain(&mut self, cx: &mut Context<'_>) {
        self.write(cx);
    }
    /// What `advance` waits for now.
    fn wait(&self) -> Wait;
    /// Connected, with every topic of interest (or the channel) subscribed and confirmed.
    fn is_ready(&self) -> bool;
    /// Why the last connection attempt failed, once.
    fn take_failure(&mut self) -> Option<Error>;
    /// The engine's own counters (the queue's are added by the broker).
    fn stats(&self) -> BrokerStats;
    /// Unsubscribes, pushes out what is still buffered (for up to a second), disconnects.
    fn shut_down(&mut self, reactor: &Reactor);
    /// How long `enable` waits for the connection and the subscriptions.
    fn connect_timeout(&self) -> Duration {
        DEFAULT_CONNECT_TIMEOUT
    }
    /// Whether the engine shares history across processes when history is on: it then
    /// takes shared publishes ([`Handoff::push_shared_publish`]) and reports what it
    /// receives with [`Stream`] notes, in the order its server gave them.
    fn shares_history(&self) -> bool {
        false
    }
    /// History was turned on or off: an engine that shares history starts a new session,
    /// which subscribes and publishes the new way (Redis switching off: once the publishes
    /// in flight are answered, see `Protocol::answers_before_switch`).
    fn history_switched(&mut self, _reactor: &Reactor) {}
}

/// History as the registry sets it, for an engine that shares it (Redis, NATS): whether it is
/// on, and how much a topic's stream keeps.
#[derive(Default)]
pub(crate) struct SharedHistory {
    on: AtomicBool,
    max_messages: AtomicUsize,
    max_age_ms: AtomicU64,
    /// Set by an engine whose server cannot keep the streams (NATS without JetStream): history
    /// stays per process.
    unavailable: AtomicBool,
}

impl SharedHistory {
    /// Whether history is on.
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Whether the engine found its server unable to keep the streams, on its last session.
    pub(crate) fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::Acquire)
    }

    /// Records whether the server can keep the streams (NATS: whether JetStream answered).
    #[cfg_attr(not(any(feature = "nats", feature = "redis")), allow(dead_code))]
    pub(crate) fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::Release);
    }

    /// The count limit (0: none) and the age limit in milliseconds (0: none).
    #[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
    pub(crate) fn limits(&self) -> (usize, u64) {
        (
            self.max_messages.load(Ordering::Relaxed),
            self.max_age_ms.load(Ordering::Relaxed),
        )
    }

    /// Records new limits; returns whether history was switched on or off.
    fn set(&self, limits: HistoryLimits) -> bool {
        self.max_messages
            .store(limits.max_messages, Ordering::Relaxed);
        let age = limits.max_age.map_or(0, |age| {
            u64::try_from(age.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.max_age_ms.store(age, Ordering::Relaxed);
        self.on.swap(!limits.is_off(), Ordering::AcqRel) == limits.is_off()
    }
}

/// What the registry keeps across its brokers: the queue publishes are handed to, and what
/// they are checked against. It outlives every broker, so that a publish reaches it with no
/// lock and no reference count; each broker installs its engine's encoder and limits in it as
/// it connects (one broker at a time: enable waits for the previous disable).
#[derive(Default)]
pub(crate) struct Handoff {
    outbound: Outbound,
    /// The engine of the last broker installed (its `Scheme as u8`; 0 before the first),
    /// which the checks follow.
    engine: AtomicU8,
    /// Its payload limit, which an engine that learns it from the server keeps up to date.
    payload_limit: Arc<AtomicUsize>,
    /// Counts the brokers installed: a broker drives the engine only while it is the last
    /// one (a thread that still holds a disabled broker must not take the next one's work).
    generation: AtomicU64,
    /// The registry's history settings, which a sharing engine reads as it goes.
    history: Arc<SharedHistory>,
    /// Whether the engine of the last broker installed shares history (Redis, not Cluster;
    /// NATS).
    shares: AtomicBool,
}

impl Handoff {
    /// Refuses, before anything is written anywhere, a publish the engine cannot carry.
    #[cfg_attr(not(feature = "pg"), allow(unused_variables))] // only NOTIFY limits the topic
    pub(crate) fn check(&self, topic: &[u8], payload: &[u8]) -> Result<(), Error> {
        let scheme = Scheme::from_id(self.engine.load(Ordering::Relaxed));
        #[cfg(feature = "pg")]
        if matches!(scheme, Some(Scheme::Postgres)) {
            return wire::check(topic, payload);
        }
        let limit = self.payload_limit.load(Ordering::Relaxed);
        if payload.len() > limit {
            return Err(Error::PayloadTooLarge {
                engine: scheme.map_or("broker", Scheme::name),
                limit,
            });
        }
        Ok(())
    }

    /// Queues a publish (already checked); returns whether the engine should be driven for
    /// it now (see [`Outbound::push_publish`]).
    pub(crate) fn push_publish(&self, topic: &[u8], payload: &[u8]) -> bool {
        self.outbound.push_publish(topic, payload)
    }

    /// Queues a publish whose history is shared (see [`Outbound::push_shared_publish`]).
    pub(crate) fn push_shared_publish(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
    ) -> bool {
        self.outbound.push_shared_publish(topic, payload, except)
    }

    /// Whether publishes and topics go through the streams: history is on and the broker
    /// installed last shares it.
    pub(crate) fn shares_history(&self) -> bool {
        self.shares.load(Ordering::Acquire)
            && self.history.is_on()
            && !self.history.is_unavailable()
    }

    /// Records new history limits; returns whether history was switched on or off while a
    /// sharing broker is installed.
    pub(crate) fn set_history(&self, limits: HistoryLimits) -> bool {
        self.history.set(limits) && self.shares.load(Ordering::Acquire)
    }
}

/// How long a shared publish's record is (see [`write_shared_record`]).
pub(crate) fn shared_record_len(topic: &[u8], payload: &[u8]) -> usize {
    8 + topic.len() + payload.len()
}

/// A shared publish as a queue without an encoder keeps it, as the payload of a record with
/// an empty topic: the topic's length (u32, native order), the topic, the except fd (i32,
/// native order, -1 for none), then the payload.
pub(crate) fn write_shared_record(
    out: &mut Vec<u8>,
    topic: &[u8],
    payload: &[u8],
    except: Option<RawFd>,
) {
    out.extend_from_slice(&(topic.len() as u32).to_ne_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&except.unwrap_or(-1).to_ne_bytes());
    out.extend_from_slice(payload);
}

/// A shared publish's record, for tests.
#[cfg(test)]
pub(crate) fn shared_record(topic: &[u8], payload: &[u8], except: Option<RawFd>) -> Vec<u8> {
    let mut record = Vec::with_capacity(shared_record_len(topic, payload));
    write_shared_record(&mut record, topic, payload, except);
    record
}

/// The parts of a shared publish's record (see [`write_shared_record`]): topic, except fd,
/// payload.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // only Redis queues records
pub(crate) fn split_shared_record(record: &[u8]) -> Option<(&[u8], Option<RawFd>, &[u8])> {
    let (len, rest) = record.split_first_chunk::<4>()?;
    let len = u32::from_ne_bytes(*len) as usize;
    let topic = rest.get(..len)?;
    let (except, payload) = rest.get(len..)?.split_first_chunk::<4>()?;
    let except = RawFd::from_ne_bytes(*except);
    Some((topic, (except >= 0).then_some(except), payload))
}

/// A connected engine, taking its work from the registry's [`Handoff`].
pub(crate) struct Broker {
    handoff: Arc<Handoff>,
    /// Which install of `handoff` this broker is.
    generation: u64,
    engine: Mutex<Box<dyn Engine>>,
    /// Whether the engine subscribes per topic (Redis, NATS) rather than to one channel.
    routes_interest: bool,
    /// Whether the engine shares history (see [`Engine::shares_history`]).
    shares_history: bool,
    /// The engine's name, for messages: "PostgreSQL", "Redis", "Redis Cluster", "NATS".
    kind: &'static str,
}

/// How long `enable` waits for the connection and the subscriptions, unless the URL says
/// otherwise (PostgreSQL's `connect_timeout`).
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The engine a URL names, before connecting.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Postgres = 1,
    Redis,
    RedisCluster,
    Nats,
}

impl Scheme {
    /// The engine's name, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scheme::Postgres => "PostgreSQL",
            Scheme::Redis => "Redis",
            Scheme::RedisCluster => "Redis Cluster",
            Scheme::Nats => "NATS",
        }
    }

    /// The scheme whose `as u8` is `id`; `None` for 0 (no broker installed yet).
    fn from_id(id: u8) -> Option<Scheme> {
        [
            Scheme::Postgres,
            Scheme::Redis,
            Scheme::RedisCluster,
            Scheme::Nats,
        ]
        .into_iter()
        .find(|&scheme| scheme as u8 == id)
    }

    /// The engine for `url`: by its scheme, or PostgreSQL for a libpq `key=value` conninfo.
    pub(crate) fn of(url: &str) -> Result<Scheme, Error> {
        let Some((scheme, _)) = url.split_once("://") else {
            if url.contains('=') {
                return Ok(Scheme::Postgres);
            }
            return Err(Error::InvalidArgument(
                "the broker URL has no scheme (postgresql://, redis://, redis+cluster://, nats://)",
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "postgresql" | "postgres" => Ok(Scheme::Postgres),
            "redis" | "rediss" => Ok(Scheme::Redis),
            "redis+cluster" | "rediss+cluster" => Ok(Scheme::RedisCluster),
            "nats" | "tls" => Ok(Scheme::Nats),
            _ => Err(Error::InvalidArgument(
                "unknown broker scheme (postgresql://, redis://, redis+cluster://, nats://)",
            )),
        }
    }
}

impl Broker {
    /// Connects to the engine `scheme` names at `url` and completes the session handshake,
    /// blocking the caller (not any registry lock) up to the connect timeout; `name` is the
    /// PostgreSQL channel, or the Redis (Cluster) channel / NATS subject prefix. Returns the broker and
    /// the deadline by which `settle` should finish the subscriptions.
    pub(crate) fn connect(
        scheme: Scheme,
        url: &str,
        name: &str,
        reactor: &Reactor,
        handoff: &Arc<Handoff>,
    ) -> Result<(Broker, Instant), Error> {
        #[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(unused_variables))]
        let limit = &handoff.payload_limit;
        // Only NATS queues its publishes as the engine's commands.
        let (engine, encoder): (Box<dyn Engine>, Option<Box<dyn Encode>>) = match scheme {
            #[cfg(feature = "pg")]
            Scheme::Postgres => (Box::new(pg::PgEngine::new(url, name)?), None),
            #[cfg(feature = "redis")]
            Scheme::Redis => (
                redis::engine(url, name, limit, Arc::clone(&handoff.history))?,
                None,
            ),
            #[cfg(feature = "redis")]
            Scheme::RedisCluster => (redis_cluster::engine(url, name, limit)?, None),
            #[cfg(feature = "nats")]
            Scheme::Nats => {
                let (engine, pub_encoder) =
                    nats::engine(url, name, limit, Arc::clone(&handoff.history))?;
                (engine, Some(pub_encoder))
            }
            #[cfg(not(feature = "pg"))]
            Scheme::Postgres => return Err(Error::NotSupported("pg")),
            #[cfg(not(feature = "redis"))]
            Scheme::Redis => return Err(Error::NotSupported("redis")),
            #[cfg(not(feature = "nats"))]
            Scheme::Nats => return Err(Error::NotSupported("nats")),
            #[cfg(not(feature = "redis"))]
            Scheme::RedisCluster => return Err(Error::NotSupported("redis-cluster")),
        };
        // The last broker stops driving first; what a publish that raced its disable left
        // queued goes with it.
        let generation = handoff.generation.fetch_add(1, Ordering::AcqRel) + 1;
        handoff.outbound.reset(encoder);
        handoff.engine.store(scheme as u8, Ordering::Relaxed);
        handoff.history.set_unavailable(false);
        let shares_history = engine.shares_history();
        handoff.shares.store(shares_history, Ordering::Release);
        let deadline = Instant::now() + engine.connect_timeout();
        let broker = Broker {
            handoff: Arc::clone(handoff),
            generation,
            engine: Mutex::new(engine),
            routes_interest: scheme != Scheme::Postgres,
            shares_history,
            kind: scheme.name(),
        };
        let mut ignored = Vec::new();
        if let Err(err) = broker.settle(reactor, deadline, &mut ignored) {
            broker.engine.lock().shut_down(reactor);
            return Err(err);
        }
        Ok((broker, deadline))
    }

    /// Drives the engine, blocking the caller, until it is ready (connected, and every topic
    /// of interest subscribed) or `deadline` passes. Messages received meanwhile are appended
    /// to `received`.
    pub(crate) fn settle(
        &self,
        reactor: &Reactor,
        deadline: Instant,
        received: &mut Vec<Received>,
    ) -> Result<(), Error> {
        loop {
            let wait = {
                let mut engine = self.engine.lock();
                engine.advance(&mut Context {
                    reactor,
                    outbound: &self.handoff.outbound,
                    received,
                });
                if engine.is_ready() && !self.handoff.outbound.is_dirty() {
                    return Ok(());
                }
                if let Some(failure) = engine.take_failure() {
                    return Err(failure);
                }
                engine.wait()
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Unreachable(format!(
                    "{}: no session within the connect timeout",
                    self.kind
                )));
            }
            let until = wait.deadline.map_or(deadline, |due| due.min(deadline));
            match wait.socket {
                Some((socket, for_write)) => {
                    io::wait_fd(socket, for_write, Some(until - now))?;
                }
                None => std::thread::sleep((until - now).min(Duration::from_millis(50))),
            }
        }
    }

    /// Where this broker takes its publishes from.
    #[cfg(test)]
    pub(crate) fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    pub(crate) fn routes_interest(&self) -> bool {
        self.routes_interest
    }

    pub(crate) fn is_postgres(&self) -> bool {
        self.kind == "PostgreSQL"
    }

    /// Records that `topic` gained its first local subscriber or lost its last. Called under
    /// the registry's index lock, so it only queues; [`Broker::kick`] writes it out.
    pub(crate) fn interest(&self, topic: &[u8], subscribe: bool) {
        if self.routes_interest {
            self.handoff.outbound.push_interest(topic, subscribe);
        }
    }

    /// Writes what is queued if no other thread is driving the engine: after a publish the
    /// [`Handoff`] queued for it now, or changes of interest. Never waits for the server or
    /// for another thread's I/O; while the engine holds publishes for the server's answer,
    /// `dispatch` sends them.
    pub(crate) fn kick(&self, reactor: &Reactor) {
        if self.handoff.outbound.is_dirty() {
            self.drive(reactor, false, &mut Vec::new());
        }
    }

    /// `dispatch`'s turn: every piece of work that needs no waiting; returns what arrived.
    pub(crate) fn service(&self, reactor: &Reactor, received: &mut Vec<Received>) {
        self.drive(reactor, true, received);
    }

    /// Runs the engine: waiting for the lock when `full` (dispatch), else only if it is free;
    /// then again, if free, for as long as something was queued meanwhile.
    fn drive(&self, reactor: &Reactor, full: bool, received: &mut Vec<Received>) {
        if self.handoff.generation.load(Ordering::Acquire) != self.generation {
            return;
        }
        let mut engine = if full {
            self.engine.lock()
        } else {
            match self.engine.try_lock() {
                Some(engine) => engine,
                None => return,
            }
        };
        loop {
            let mut cx = Context {
                reactor,
                outbound: &self.handoff.outbound,
                received,
            };
            if full {
                engine.advance(&mut cx);
            } else {
                engine.write(&mut cx);
            }
            drop(engine);
            // A push that found the engine busy relies on this look.
            if !self.handoff.outbound.is_dirty() {
                return;
            }
            engine = match self.engine.try_lock() {
                Some(engine) => engine,
                None => return,
            };
        }
    }

    /// What the engine waits for; for hosts that drive the broker themselves.
    pub(crate) fn wait(&self) -> Wait {
        self.engine.lock().wait()
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.engine.lock().wait().deadline
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        let engine = self.engine.lock().stats();
        let (queued, dropped) = self.handoff.outbound.counts();
        BrokerStats {
            queued: engine.queued + queued,
            dropped: engine.dropped + dropped,
            ..engine
        }
    }

    /// History was switched on or off: see [`Engine::history_switched`].
    pub(crate) fn history_switched(&self, reactor: &Reactor) {
        self.engine.lock().history_switched(reactor);
    }

    /// Whether this broker's engine shares history (when history is on): Redis always, NATS
    /// unless its server answered that it has no JetStream.
    pub(crate) fn shares_history(&self) -> bool {
        self.shares_history && !self.handoff.history.is_unavailable()
    }

    pub(crate) fn shut_down(&self, reactor: &Reactor) {
        let mut engine = self.engine.lock();
        // What is still queued goes out first, as far as the engine can send it now.
        engine.drain(&mut Context {
            reactor,
            outbound: &self.handoff.outbound,
            received: &mut Vec::new(),
        });
        engine.shut_down(reactor);
    }
}

/// The first reconnect delay, and the longest.
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(100);
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(5);

/// Doubles a reconnect delay, up to `MAX_RETRY`.
pub(crate) fn next_retry(delay: Duration) -> Duration {
    (delay * 2).min(MAX_RETRY)
}

/// How long a disable keeps pushing out what the engine still buffers and reading the
/// server's answers to it: long enough for a healthy server, short enough that a dead one does
/// not hang the host's shutdown.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_settings_tell_a_switch_from_new_limits() {
        let history = SharedHistory::default();
        let limits = |max_messages, age_ms| HistoryLimits {
            max_messages,
            max_age: (age_ms > 0).then(|| Duration::from_millis(age_ms)),
            ..HistoryLimits::default()
        };
        assert!(!history.is_on());
        assert!(history.set(limits(5, 0)), "on");
        assert!(!history.set(limits(7, 250)), "new limits");
        assert_eq!(history.limits(), (7, 250));
        assert!(history.is_on());
        assert!(history.set(limits(0, 0)), "off");
        assert!(!history.set(limits(0, 0)));
        assert!(!history.is_on());

        let handoff = Handoff::default();
        assert!(
            !handoff.set_history(limits(5, 0)),
            "no sharing broker installed"
        );
        assert!(!handoff.shares_history());
        let record = shared_record(b"topic", b"pay load", Some(7));
        assert_eq!(
            split_shared_record(&record),
            Some((&b"topic"[..], Some(7), &b"pay load"[..]))
        );
        let record = shared_record(b"t", b"", None);
        assert_eq!(
            split_shared_record(&record),
            Some((&b"t"[..], None, &b""[..]))
        );
        assert_eq!(split_shared_record(&record[..3]), None);
    }

    #[test]
    fn the_scheme_picks_the_engine() {
        assert!(matches!(
            Scheme::of("postgresql://h/db"),
            Ok(Scheme::Postgres)
        ));
        assert!(matches!(
            Scheme::of("postgres://h/db"),
            Ok(Scheme::Postgres)
        ));
        assert!(matches!(
            Scheme::of("host=h dbname=test"),
            Ok(Scheme::Postgres)
        ));
        assert!(matches!(Scheme::of("redis://h:1/0"), Ok(Scheme::Redis)));
        assert!(matches!(Scheme::of("REDISS://h"), Ok(Scheme::Redis)));
        assert!(matches!(
            Scheme::of("redis+cluster://a:1,b:2"),
            Ok(Scheme::RedisCluster)
        ));
        assert!(matches!(Scheme::of("nats://h"), Ok(Scheme::Nats)));
        assert!(matches!(Scheme::of("tls://h"), Ok(Scheme::Nats)));
        for bad in ["", "h:1", "http://h", "kafka://h"] {
            assert_eq!(
                Scheme::of(bad).err().map(|e| e.errno()),
                Some(libc::EINVAL),
                "{bad}"
            );
        }
    }
}
