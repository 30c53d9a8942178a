//! The public `Registry`: subscriptions, the publish fan-out, eviction and dispatch.
//!
//! Locks, always taken in this order and never the other way round:
//! 1. `index` (an `RwLock`): read briefly by an immediate publish to clone a topic's
//!    subscriber list, and for the whole of a corked publish (which writes nothing); written
//!    by subscribe, unsubscribe, eviction and the fd-reuse guard;
//! 2. `batches`, the corked batches (batch.rs): held by a corked publish to append its frames,
//!    and to spill the batches into the outboxes, which every index write does first;
//! 3. one peer's outbox mutex: held for the writes to that one fd.
//!
//! An immediate publish holds no lock while it walks its subscriber list and at most one
//! outbox lock at a time, so a publish to many fds never blocks changes on other topics,
//! publishes to other topics run in parallel, and no cycle can form. The reactor's poll mutex is only held for
//! the wait itself, and the hook slots are read-locked only to clone the callback out;
//! callbacks run with no lock held.

mod broker;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};

use crate::batch::{Batch, Batches};
use crate::broker::Broker;
use crate::error::Error;
use crate::frame::{Frame, FrameSet, Mode};
use crate::index::{Index, SubscriptionId};
use crate::io::{self, FileIdentity, FileKind};
use crate::outbox::{Delivery, Flush, InBatch, Overflow, Peer, WritePolicy};
use crate::reactor::Reactor;

/// The longest topic, in bytes.
pub const MAX_TOPIC_LEN: usize = 4096;
/// The outbox limit of a new registry, per fd.
pub const DEFAULT_OUTBOX_LIMIT: usize = 1 << 20;

/// Decides whether `fd` may subscribe to a topic in a mode.
pub type Authorizer = dyn Fn(&[u8], RawFd, Mode) -> bool + Send + Sync;
/// Told which fd was evicted and why (a positive errno: `EPIPE`, or `ENOBUFS` for
/// [`Overflow::Evict`]).
pub type EvictCallback = dyn Fn(RawFd, i32) + Send + Sync;

/// Counters and gauges of a registry. Frame counts are per (frame, fd) pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful publish calls, those that matched no subscriber included.
    pub publishes: u64,
    /// Frames whose last byte reached the kernel.
    pub deliveries: u64,
    /// Frames dropped by [`Overflow::DropMessage`].
    pub dropped_messages: u64,
    /// Fds removed because the peer was gone or by [`Overflow::Evict`].
    pub evicted_fds: u64,
    /// Bytes waiting in outboxes now.
    pub queued_bytes: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
    /// Topics with at least one subscriber.
    pub topics: u64,
    /// Distinct fds with at least one subscription or queued bytes.
    pub fds: u64,
}

#[derive(Default)]
struct Counters {
    publishes: AtomicU64,
    deliveries: AtomicU64,
    dropped_messages: AtomicU64,
    evicted_fds: AtomicU64,
    queued_bytes: AtomicU64,
}

#[derive(Default)]
struct Heartbeat {
    interval: Option<Duration>,
    next_due: Option<Instant>,
}

/// The keep-alive frames: an empty WebSocket ping, and an SSE comment line, which
/// EventSource ignores.
const WEBSOCKET_PING: &[u8] = &[0x89, 0x00];
const SSE_COMMENT: &[u8] = b":\n\n";

/// The index's write guard. On release it hands the topics that gained their first
/// subscriber or lost their last to the broker (which subscribes per topic), in the order they
/// happened, and then lets the broker write them out with no lock held.
struct IndexWriter<'a> {
    index: Option<RwLockWriteGuard<'a, Index<Peer>>>,
    registry: &'a Registry,
}

impl std::ops::Deref for IndexWriter<'_> {
    type Target = Index<Peer>;

    fn deref(&self) -> &Index<Peer> {
        self.index.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for IndexWriter<'_> {
    fn deref_mut(&mut self) -> &mut Index<Peer> {
        self.index.as_mut().expect("held until drop")
    }
}

impl Drop for IndexWriter<'_> {
    fn drop(&mut self) {
        let Some(mut index) = self.index.take() else {
            return;
        };
        let events = index.take_topic_events();
        if events.is_empty() {
            return;
        }
        let broker = self.registry.broker.read().clone();
        if let Some(broker) = &broker {
            for (topic, subscribe) in &events {
                broker.interest(topic, *subscribe);
            }
        }
        drop(index);
        if let Some(broker) = broker {
            broker.kick(&self.registry.reactor);
        }
    }
}

/// Why a peer is being evicted.
struct Eviction {
    peer: Arc<Peer>,
    reason: i32,
    shut_down: bool,
}

/// What flushes wrote: bytes off the queued gauge, and frames completed.
#[derive(Default)]
struct Flushed {
    bytes: u64,
    frames: u64,
}

/// What one publish's deliveries came to, settled once the publish holds no lock.
#[derive(Default)]
struct Outcomes {
    delivered: u64,
    dropped: u64,
    queued: u64,
    /// Peers that just got their first corked frame: they go on the flush list.
    deferred: Vec<Arc<Peer>>,
    evictions: Vec<Eviction>,
}

impl Outcomes {
    /// The per-subscriber step of every publish: hands the mode's frame (`None`: no memory
    /// could be had to encode it, a drop) to `deliver`, and records the outcome.
    #[inline(always)]
    fn deliver(
        &mut self,
        peer: &Arc<Peer>,
        frame: Option<&Frame<'_>>,
        deliver: impl FnOnce(&Frame<'_>) -> Delivery,
    ) {
        match frame {
            Some(frame) => self.record(peer, deliver(frame)),
            None => self.dropped += 1,
        }
    }

    // Inlined, it costs a compare and an add.
    #[inline(always)]
    fn record(&mut self, peer: &Arc<Peer>, delivery: Delivery) {
        match delivery {
            Delivery::Written => self.delivered += 1,
            Delivery::Queued { bytes } => self.queued += bytes as u64,
            Delivery::Closed => {}
            Delivery::Deferred { bytes } => {
                self.queued += bytes as u64;
                self.deferred.push(Arc::clone(peer));
            }
            Delivery::Dropped => self.dropped += 1,
            Delivery::Overflowed => self.evictions.push(Eviction {
                peer: Arc::clone(peer),
                reason: libc::ENOBUFS,
                shut_down: true,
            }),
            Delivery::Failed(errno) => self.evictions.push(Eviction {
                peer: Arc::clone(peer),
                reason: errno,
                // A started frame whose rest could not be kept: end the stream, so the peer
                // sees EOF rather than a frame that never completes.
                shut_down: errno == libc::ENOMEM,
            }),
        }
    }
}

/// A topic → fd fan-out registry. Every method may be called from any thread; `dispatch`
/// from one thread at a time.
pub struct Registry {
    index: RwLock<Index<Peer>>,
    reactor: Reactor,
    outbox_limit: AtomicUsize,
    overflow_evicts: AtomicBool,
    corked: AtomicBool,
    /// Keep-alive settings; a leaf lock.
    heartbeat: Mutex<Heartbeat>,
    /// The current heartbeat period; every write stamps its fd with it.
    heartbeat_tick: AtomicU64,
    /// Peers with frames queued while corked, to be written by the next flush. A leaf lock:
    /// nothing else is locked while it is held.
    flush_list: Mutex<Vec<Arc<Peer>>>,
    /// Corked publishes gathered per topic (batch.rs).
    batches: Mutex<Batches>,
    /// The cross-process broker, when enabled (broker.rs). Read-locked only to clone the
    /// `Arc` out: the broker's own locks are never held while delivering.
    broker: RwLock<Option<Arc<Broker>>>,
    /// Whether `broker` is `Some`, so a publish checks it without the lock.
    broker_enabled: AtomicBool,
    /// An enable is connecting (with no lock held), so a second one is refused.
    broker_enabling: AtomicBool,
    authorizer: RwLock<Option<Arc<Authorizer>>>,
    on_evict: RwLock<Option<Arc<EvictCallback>>>,
    counters: Counters,
}

impl Registry {
    /// An empty registry with its own poller.
    pub fn new() -> std::io::Result<Registry> {
        Ok(Registry {
            index: RwLock::new(Index::default()),
            reactor: Reactor::new()?,
            outbox_limit: AtomicUsize::new(DEFAULT_OUTBOX_LIMIT),
            overflow_evicts: AtomicBool::new(false),
            corked: AtomicBool::new(false),
            heartbeat: Mutex::new(Heartbeat::default()),
            heartbeat_tick: AtomicU64::new(1),
            flush_list: Mutex::new(Vec::new()),
            batches: Mutex::new(Batches::default()),
            broker: RwLock::new(None),
            broker_enabled: AtomicBool::new(false),
            broker_enabling: AtomicBool::new(false),
            authorizer: RwLock::new(None),
            on_evict: RwLock::new(None),
            counters: Counters::default(),
        })
    }

    /// Subscribes `fd` to `topic`. Subscribing the same (topic, fd) again returns the same id
    /// and sets the mode. Pipes and other non-sockets are made `O_NONBLOCK`.
    pub fn subscribe(&self, topic: &[u8], fd: RawFd, mode: Mode) -> Result<SubscriptionId, Error> {
        check_topic(topic)?;
        let identity = identify(fd)?;
        let authorizer = self.authorizer.read().clone();
        if let Some(authorize) = authorizer {
            if !authorize(topic, fd, mode) {
                return Err(Error::Refused);
            }
        }
        let mut index = self.write_index();
        let peer = self.known_peer(&mut index, fd, identity)?;
        let id = index.subscribe(topic, fd, mode);
        peer.set_subscriptions(index.subscriptions_of(fd));
        Ok(id)
    }

    /// Removes one subscription. Frames already queued for its fd stay queued.
    pub fn unsubscribe(&self, id: SubscriptionId) -> Result<(), Error> {
        let mut index = self.write_index();
        let fd = index.unsubscribe(id).ok_or(Error::NotFound)?;
        if let Some(peer) = index.peer(fd) {
            peer.set_subscriptions(index.subscriptions_of(fd));
        }
        self.forget_if_unused(&mut index, fd);
        Ok(())
    }

    /// Forgets `fd`: drops every subscription and every queued byte of it, a partly written
    /// frame included. Returns how many subscriptions it dropped.
    pub fn unsubscribe_fd(&self, fd: RawFd) -> Result<usize, Error> {
        if fd < 0 {
            return Err(Error::BadFd);
        }
        let mut index = self.write_index();
        Ok(self.forget(&mut index, fd))
    }

    /// Drops every subscription and every queued byte.
    pub fn clear(&self) {
        let mut index = self.write_index();
        for peer in index.take_all() {
            peer.close(&self.reactor, &self.counters.queued_bytes);
        }
    }

    /// Live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.index.read().subscription_count()
    }

    /// The fds subscribed to `topic` (none for an invalid topic).
    pub fn subscribers_for(&self, topic: &[u8]) -> Vec<RawFd> {
        let index = self.index.read();
        let mut fds = vec![0; index.subscribers_into(topic, &mut [])];
        index.subscribers_into(topic, &mut fds);
        fds
    }

    /// Writes up to `out.len()` fds subscribed to `topic` into `out`; returns how many fds
    /// subscribe to it.
    pub fn subscribers_into(&self, topic: &[u8], out: &mut [RawFd]) -> Result<usize, Error> {
        check_topic(topic)?;
        Ok(self.index.read().subscribers_into(topic, out))
    }

    /// Writes `payload`, framed per subscriber, to every subscriber of `topic`; returns how
    /// many subscribers matched.
    pub fn publish(&self, topic: &[u8], payload: &[u8]) -> Result<usize, Error> {
        self.publish_except(topic, payload, None)
    }

    /// [`Registry::publish`], skipping `except` (the sender), which is not counted. With a
    /// broker enabled, the publish is also forwarded to other registries, and a payload that
    /// the engine cannot carry is refused before anything is written.
    pub fn publish_except(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
    ) -> Result<usize, Error> {
        check_topic(topic)?;
        let broker = if self.broker_enabled.load(Ordering::Acquire) {
            self.broker.read().clone()
        } else {
            None
        };
        if let Some(broker) = &broker {
            broker.check(topic, payload)?;
        }
        let matched = self.deliver_local(topic, payload, except)?;
        self.counters.publishes.fetch_add(1, Ordering::Relaxed);
        if let Some(broker) = broker {
            broker.publish(topic, payload, &self.reactor);
        }
        Ok(matched)
    }

    /// Writes `payload` to this registry's subscribers of `topic`, framed per subscriber (or,
    /// corked, queues it); returns how many matched.
    fn deliver_local(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
    ) -> Result<usize, Error> {
        let policy = self.write_policy();
        if policy.corked {
            self.deliver_corked(topic, payload, except, policy)
        } else {
            self.deliver_immediate(topic, payload, except, policy)
        }
    }

    fn deliver_immediate(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
        policy: WritePolicy,
    ) -> Result<usize, Error> {
        let (list, except_mode) = {
            let index = self.index.read();
            let except_mode = except.and_then(|fd| index.mode_of(topic, fd));
            (index.snapshot(topic), except_mode)
        };
        let Some(list) = list else {
            return Ok(0);
        };
        check_utf8(payload, list.utf8_subscribers(), except_mode)?;

        let frames = FrameSet::new(payload);
        let mut matched = 0;
        let mut outcomes = Outcomes::default();
        for subscriber in list.subscribers() {
            if Some(subscriber.fd) == except {
                continue;
            }
            matched += 1;
            outcomes.deliver(&subscriber.peer, frames.get(subscriber.mode), |frame| {
                self.deliver(&subscriber.peer, frame, policy)
            });
        }
        drop(list);
        self.settle(outcomes);
        Ok(matched)
    }

    /// A corked publish: appends the frames to the topic's batch, and queues them for the
    /// subscribers that cannot be members (see batch.rs). Holds the index's read lock
    /// throughout, so that the batch's members stay what the index says.
    fn deliver_corked(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
        policy: WritePolicy,
    ) -> Result<usize, Error> {
        let index = self.index.read();
        let frames = FrameSet::new(payload);
        let mut outcomes = Outcomes::default();
        let mut batches = self.batches.lock();
        let gauge = &self.counters.queued_bytes;
        let batch = match batches.fitting(
            topic,
            &frames,
            policy.outbox_limit,
            gauge,
            &mut outcomes.deferred,
        ) {
            Ok(batch) => batch,
            Err(vacant) => {
                let Some(list) = index.snapshot(topic) else {
                    drop(batches);
                    drop(index);
                    self.settle(outcomes);
                    return Ok(0);
                };
                let batch = Batch::new(
                    list.subscribers(),
                    list.utf8_subscribers(),
                    &frames,
                    policy.outbox_limit,
                    policy.heartbeat_tick,
                );
                batches.insert(topic, vacant, batch)
            }
        };
        let except_mode = except.and_then(|fd| index.mode_of(topic, fd));
        if let Err(refused) = check_utf8(payload, batch.utf8_subscribers(), except_mode) {
            drop(batches);
            drop(index);
            // A batch the publish spilled still has to reach the flush list.
            self.settle(outcomes);
            return Err(refused);
        }
        let matched = batch.subscriber_count() - usize::from(except_mode.is_some());
        for direct in batch.direct() {
            if Some(direct.fd) == except {
                continue;
            }
            outcomes.deliver(&direct.peer, frames.get(direct.mode), |frame| {
                // A direct member belongs to no batch, and membership changes only under the
                // batches lock, which this publish holds.
                direct
                    .peer
                    .deliver(frame, policy, &self.reactor)
                    .expect("a corked batch's direct member is in no batch")
            });
        }
        let appended = batch.append(&frames, except);
        let first_gathered = appended.queued > 0 && batches.start_gathering();
        drop(batches);
        drop(index);
        outcomes.queued += appended.queued;
        outcomes.delivered += appended.delivered;
        outcomes.dropped += appended.dropped;
        self.settle(outcomes);
        if first_gathered {
            // While corked, poll_fd turns readable as soon as frames wait (API.md).
            self.reactor.wake();
        }
        Ok(matched)
    }

    /// Adds a publish's outcomes to the counters, lists its deferred peers for the next flush
    /// and evicts what failed. Called with no lock held.
    fn settle(&self, outcomes: Outcomes) {
        // Each is an atomic add on a line that every publishing thread shares: skip the
        // zeros, which a corked publish mostly has.
        for (counter, value) in [
            (&self.counters.deliveries, outcomes.delivered),
            (&self.counters.dropped_messages, outcomes.dropped),
            (&self.counters.queued_bytes, outcomes.queued),
        ] {
            if value > 0 {
                counter.fetch_add(value, Ordering::Relaxed);
            }
        }
        if !outcomes.deferred.is_empty() {
            self.await_flush(outcomes.deferred);
        }
        for eviction in outcomes.evictions {
            self.evict(eviction);
        }
    }

    /// Writes one frame to one fd, subscribed or not, through its outbox, so it never
    /// overtakes or splits queued frames.
    pub fn send(&self, fd: RawFd, mode: Mode, payload: &[u8]) -> Result<(), Error> {
        if mode.requires_utf8() && std::str::from_utf8(payload).is_err() {
            return Err(Error::InvalidUtf8);
        }
        let identity = identify(fd)?;
        let frame = Frame::encode(mode, payload).ok_or(Error::NoMemory)?;
        let policy = self.write_policy();
        loop {
            let (peer, subscribed) = self.peer_for_send(fd, identity)?;
            let eviction = match self.deliver(&peer, &frame, policy) {
                Delivery::Written => {
                    self.counters.deliveries.fetch_add(1, Ordering::Relaxed);
                    if !subscribed {
                        self.forget_if_unused(&mut self.write_index(), fd);
                    }
                    return Ok(());
                }
                Delivery::Queued { bytes } => {
                    self.counters
                        .queued_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Delivery::Deferred { bytes } => {
                    self.counters
                        .queued_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    self.await_flush(vec![peer]);
                    return Ok(());
                }
                // Forgotten between lookup and write: look the fd up afresh.
                Delivery::Closed => continue,
                Delivery::Dropped => {
                    self.counters
                        .dropped_messages
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(Error::Dropped);
                }
                Delivery::Overflowed => Eviction {
                    peer,
                    reason: libc::ENOBUFS,
                    shut_down: true,
                },
                Delivery::Failed(errno) => Eviction {
                    peer,
                    reason: errno,
                    shut_down: errno == libc::ENOMEM,
                },
            };
            let error = match eviction.reason {
                libc::ENOBUFS if eviction.shut_down => Error::Dropped,
                errno => Error::PeerGone(errno),
            };
            self.evict(eviction);
            return Err(error);
        }
    }

    /// The fd to add to the host's event loop for readability: it becomes readable when an
    /// fd with queued bytes becomes writable.
    pub fn poll_fd(&self) -> RawFd {
        self.reactor.poll_fd()
    }

    /// Waits up to `timeout` (`None`: until there is work), then flushes the outboxes that can
    /// take bytes and, while corked, every frame queued since the last flush. Returns how
    /// many fds it served.
    pub fn dispatch(&self, timeout: Option<Duration>) -> Result<usize, Error> {
        let mut ready = Vec::new();
        let timeout = if self.flush_list.lock().is_empty() && !self.batches.lock().has_frames() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let wakeups = self.reactor.wait(timeout, &mut ready)?;
        let mut served = 0;
        if wakeups.backend || wakeups.timer {
            served += self.broker_service();
        }
        if wakeups.timer {
            // Batch members are not idle and get no heartbeat: end the batches first, so
            // that those whose topic went quiet get theirs.
            self.spill_batches();
            served += self.beat_if_due();
            self.arm_timer();
        }
        let mut flushed = Flushed::default();
        for fd in ready {
            let Some(peer) = self.index.read().peer(fd).cloned() else {
                continue;
            };
            served += 1;
            self.flush_peer(&peer, &mut flushed);
        }
        self.count_flushed(flushed);
        Ok(served + self.flush())
    }

    /// Corks the registry: from now on publishes and sends queue their frames (under the same
    /// outbox limit and overflow policy) instead of writing them, until [`Registry::flush`],
    /// [`Registry::uncork`] or a `dispatch` writes them, one system call per fd.
    pub fn cork(&self) {
        self.corked.store(true, Ordering::Relaxed);
    }

    /// Writes everything queued and returns to writing at once; returns how many fds it
    /// wrote to.
    pub fn uncork(&self) -> usize {
        self.corked.store(false, Ordering::Relaxed);
        let written = self.flush();
        // The batches' members stay members past a flush; uncorked, nothing gathers.
        self.spill_batches();
        written
    }

    /// Writes every frame queued while corked, at most one system call per fd per IOV_MAX
    /// frames, staying corked; returns how many fds it wrote to.
    pub fn flush(&self) -> usize {
        let mut handed_over = Vec::new();
        {
            let mut batches = self.batches.lock();
            if !batches.is_empty() {
                let tick = self.heartbeat_tick.load(Ordering::Relaxed);
                batches.hand_over_all(&self.counters.queued_bytes, tick, &mut handed_over);
            }
        }
        let mut peers = std::mem::take(&mut *self.flush_list.lock());
        peers.extend(handed_over);
        let mut flushed = Flushed::default();
        let written = peers
            .iter()
            .filter(|peer| self.flush_peer(peer, &mut flushed))
            .count();
        self.count_flushed(flushed);
        written
    }

    /// Moves every corked batch's frames into its members' outboxes and ends the batches;
    /// the members join the flush list.
    fn spill_batches(&self) {
        let mut awaiting = Vec::new();
        {
            let mut batches = self.batches.lock();
            if !batches.is_empty() {
                batches.spill_all(&self.counters.queued_bytes, &mut awaiting);
            }
        }
        self.await_flush(awaiting);
    }

    /// The index's write lock, taken only after the corked batches are spilled into the
    /// outboxes: a change of subscriptions must not change who a gathered frame is for, nor
    /// which fds may take part in a batch (batch.rs).
    fn write_index(&self) -> IndexWriter<'_> {
        let index = self.index.write();
        self.spill_batches();
        IndexWriter {
            index: Some(index),
            registry: self,
        }
    }

    /// Makes a waiting (or the next) `dispatch` return, and `poll_fd` readable until it does.
    pub fn wake(&self) {
        self.reactor.wake();
    }

    /// Keeps idle streams alive through proxies: every `interval` (`None`: never, the
    /// default), `dispatch` sends an empty ping to each WebSocket subscriber and an SSE comment
    /// line (`:\n\n`) to each SSE subscriber that has taken no frame for a whole interval and
    /// has nothing queued. The reactor's timer makes `poll_fd` readable when one is due.
    pub fn set_heartbeat(&self, interval: Option<Duration>) {
        {
            let mut heartbeat = self.heartbeat.lock();
            heartbeat.interval = interval.filter(|interval| !interval.is_zero());
            heartbeat.next_due = heartbeat.interval.map(|interval| Instant::now() + interval);
        }
        self.arm_timer();
    }

    /// Sends the keep-alive frames if they are due; returns how many fds got one.
    fn beat_if_due(&self) -> usize {
        let ended = {
            let mut heartbeat = self.heartbeat.lock();
            let (Some(interval), Some(due)) = (heartbeat.interval, heartbeat.next_due) else {
                return 0;
            };
            let now = Instant::now();
            if now < due {
                return 0;
            }
            heartbeat.next_due = Some(now + interval);
            // Writes in the period that ends now were stamped with its tick; an fd stamped
            // earlier has been idle for at least a whole interval.
            self.heartbeat_tick.fetch_add(1, Ordering::Relaxed)
        };
        let current = ended + 1;
        let mut keepalive: HashMap<RawFd, (Arc<Peer>, Mode)> = HashMap::new();
        self.index.read().for_each_subscriber(|subscriber| {
            let mode = match subscriber.mode {
                Mode::WsText | Mode::WsBinary => Mode::WsBinary,
                Mode::Sse => Mode::Sse,
                Mode::Raw => return,
            };
            let entry = keepalive
                .entry(subscriber.fd)
                .or_insert_with(|| (Arc::clone(&subscriber.peer), mode));
            // A WebSocket ping wins over an SSE comment on an fd subscribed both ways.
            if mode == Mode::WsBinary {
                entry.1 = mode;
            }
        });
        let ping = Frame::encode(Mode::Raw, WEBSOCKET_PING).expect("RAW frames allocate nothing");
        let comment = Frame::encode(Mode::Raw, SSE_COMMENT).expect("RAW frames allocate nothing");
        let mut sent = 0;
        for (peer, mode) in keepalive.into_values() {
            let frame = if mode == Mode::Sse { &comment } else { &ping };
            match peer.heartbeat(frame, ended - 1, current, &self.reactor) {
                None => {}
                Some(Delivery::Queued { bytes }) => {
                    self.counters
                        .queued_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    sent += 1;
                }
                Some(Delivery::Failed(errno)) => self.evict(Eviction {
                    peer,
                    reason: errno,
                    shut_down: false,
                }),
                Some(_) => sent += 1,
            }
        }
        sent
    }

    /// Arms the reactor's timer for the earliest deadline: the next heartbeat or the
    /// backend's next reconnect.
    fn arm_timer(&self) {
        let heartbeat = self.heartbeat.lock().next_due;
        let broker = self.broker.read().clone();
        let reconnect = broker.and_then(|broker| broker.deadline());
        let deadline = match (heartbeat, reconnect) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.reactor
            .set_timer(deadline.map(|deadline| deadline.saturating_duration_since(Instant::now())));
    }

    /// Bytes queued for `fd` (0 when none or unknown).
    pub fn pending_bytes(&self, fd: RawFd) -> Result<usize, Error> {
        if fd < 0 {
            return Err(Error::BadFd);
        }
        let index = self.index.read();
        let Some(peer) = index.peer(fd) else {
            return Ok(0);
        };
        let (queued, in_batch) = peer.pending();
        if !in_batch {
            return Ok(queued);
        }
        let gathered = index.sole_subscription(fd).map_or(0, |(topic, mode)| {
            self.batches.lock().pending_for(topic, fd, mode)
        });
        Ok(queued + gathered)
    }

    /// Sets the per-fd bound on queued bytes (0: queue nothing but the rest of a started
    /// frame).
    pub fn set_outbox_limit(&self, bytes: usize) {
        self.outbox_limit.store(bytes, Ordering::Relaxed);
    }

    /// Sets what happens to a frame that would overflow an outbox.
    pub fn set_overflow(&self, policy: Overflow) {
        self.overflow_evicts
            .store(policy == Overflow::Evict, Ordering::Relaxed);
    }

    /// Sets (or, with `None`, removes) the authorizer that every subscribe consults.
    pub fn set_authorizer(&self, authorizer: Option<Box<Authorizer>>) {
        *self.authorizer.write() = authorizer.map(Arc::from);
    }

    /// Sets (or, with `None`, removes) the callback told of each evicted fd.
    pub fn set_evict_callback(&self, callback: Option<Box<EvictCallback>>) {
        *self.on_evict.write() = callback.map(Arc::from);
    }

    pub fn stats(&self) -> Stats {
        let (subscriptions, topics, fds) = {
            let index = self.index.read();
            (
                index.subscription_count(),
                index.topic_count(),
                index.peer_count(),
            )
        };
        let counters = &self.counters;
        Stats {
            publishes: counters.publishes.load(Ordering::Relaxed),
            deliveries: counters.deliveries.load(Ordering::Relaxed),
            dropped_messages: counters.dropped_messages.load(Ordering::Relaxed),
            evicted_fds: counters.evicted_fds.load(Ordering::Relaxed),
            queued_bytes: counters.queued_bytes.load(Ordering::Relaxed),
            subscriptions: subscriptions as u64,
            topics: topics as u64,
            fds: fds as u64,
        }
    }

    /// Writes what `peer` has queued and settles the outcome: deliveries counted, an fd left
    /// with nothing to do forgotten, a dead one evicted. Returns whether any byte was written.
    /// `totals` gathers the counters' share, for [`Registry::count_flushed`] to add once per
    /// batch of flushes.
    fn flush_peer(&self, peer: &Arc<Peer>, totals: &mut Flushed) -> bool {
        match peer.flush(&self.reactor) {
            Flush::Progress {
                bytes,
                frames,
                drained,
            } => {
                totals.bytes += bytes as u64;
                totals.frames += frames as u64;
                // Only an fd without subscriptions is forgotten once drained; checking the
                // count first keeps the index lock out of every corked flush.
                if drained && peer.subscriptions() == 0 {
                    let mut index = self.write_index();
                    if index
                        .peer(peer.fd)
                        .is_some_and(|current| Arc::ptr_eq(current, peer))
                    {
                        self.forget_if_unused(&mut index, peer.fd);
                    }
                }
                bytes > 0
            }
            Flush::Failed {
                errno,
                bytes,
                frames,
            } => {
                totals.bytes += bytes as u64;
                totals.frames += frames as u64;
                self.evict(Eviction {
                    peer: Arc::clone(peer),
                    reason: errno,
                    shut_down: false,
                });
                false
            }
        }
    }

    fn count_flushed(&self, totals: Flushed) {
        if totals.bytes > 0 {
            self.counters
                .queued_bytes
                .fetch_sub(totals.bytes, Ordering::Relaxed);
        }
        if totals.frames > 0 {
            self.counters
                .deliveries
                .fetch_add(totals.frames, Ordering::Relaxed);
        }
    }

    /// Puts peers that just got their first corked frame on the flush list, and makes
    /// `poll_fd` readable when the list stops being empty, so the host's loop dispatches.
    fn await_flush(&self, peers: Vec<Arc<Peer>>) {
        if peers.is_empty() {
            return;
        }
        let was_empty = {
            let mut list = self.flush_list.lock();
            let was_empty = list.is_empty();
            list.extend(peers);
            was_empty
        };
        if was_empty {
            self.reactor.wake();
        }
    }

    fn write_policy(&self) -> WritePolicy {
        WritePolicy {
            corked: self.corked.load(Ordering::Relaxed),
            heartbeat_tick: self.heartbeat_tick.load(Ordering::Relaxed),
            outbox_limit: self.outbox_limit.load(Ordering::Relaxed),
            overflow: if self.overflow_evicts.load(Ordering::Relaxed) {
                Overflow::Evict
            } else {
                Overflow::DropMessage
            },
        }
    }

    /// Hands one frame to one fd, spilling the corked batches first if the fd is in one, so
    /// the frame stays behind the batch's. Must not be called with `batches` locked.
    fn deliver(&self, peer: &Peer, frame: &Frame<'_>, policy: WritePolicy) -> Delivery {
        loop {
            match peer.deliver(frame, policy, &self.reactor) {
                Err(InBatch) => self.spill_batches(),
                Ok(delivery) => return delivery,
            }
        }
    }

    /// The peer for `fd`, created if the index does not know the fd, and replacing a stale one
    /// if the fd number now refers to another file (the fd-reuse guard of API.md).
    fn known_peer(
        &self,
        index: &mut Index<Peer>,
        fd: RawFd,
        identity: FileIdentity,
    ) -> Result<Arc<Peer>, Error> {
        if let Some(peer) = index.peer(fd) {
            if peer.identity == identity {
                return Ok(Arc::clone(peer));
            }
            self.forget(index, fd);
        }
        if identity.kind != FileKind::Socket {
            io::make_nonblocking(fd)?;
        }
        let peer = Arc::new(Peer::new(fd, identity));
        index.insert_peer(fd, Arc::clone(&peer));
        Ok(peer)
    }

    /// Looks `fd` up under the read lock, which is enough unless the fd is new or reused.
    /// Also says whether the fd has subscriptions, which decides whether a fully written send
    /// leaves a peer behind to forget.
    fn peer_for_send(&self, fd: RawFd, identity: FileIdentity) -> Result<(Arc<Peer>, bool), Error> {
        {
            let index = self.index.read();
            if let Some(peer) = index.peer(fd) {
                if peer.identity == identity {
                    return Ok((Arc::clone(peer), index.subscriptions_of(fd) > 0));
                }
            }
        }
        let mut index = self.write_index();
        let peer = self.known_peer(&mut index, fd, identity)?;
        Ok((peer, index.subscriptions_of(fd) > 0))
    }

    /// Drops `fd`'s subscriptions and queued bytes; returns how many subscriptions it had.
    fn forget(&self, index: &mut Index<Peer>, fd: RawFd) -> usize {
        match index.remove_peer(fd) {
            Some((peer, subscriptions)) => {
                peer.close(&self.reactor, &self.counters.queued_bytes);
                subscriptions
            }
            None => 0,
        }
    }

    /// Forgets an fd that has neither subscriptions nor queued bytes, so the index only holds
    /// fds with something to do.
    fn forget_if_unused(&self, index: &mut Index<Peer>, fd: RawFd) {
        if index.subscriptions_of(fd) > 0 {
            return;
        }
        if index
            .peer(fd)
            .is_some_and(|peer| peer.close_if_idle(&self.reactor))
        {
            index.remove_peer(fd);
        }
    }

    /// Evicts a peer whose write failed or whose outbox overflowed under
    /// [`Overflow::Evict`], then tells the host, with no lock held. A peer already forgotten
    /// (by the host, or by another thread's eviction) is left alone and not reported twice.
    fn evict(&self, eviction: Eviction) {
        let Eviction {
            peer,
            reason,
            shut_down,
        } = eviction;
        {
            let mut index = self.write_index();
            if !index
                .peer(peer.fd)
                .is_some_and(|current| Arc::ptr_eq(current, &peer))
            {
                return;
            }
            self.forget(&mut index, peer.fd);
            if shut_down {
                io::shutdown(peer.fd, peer.identity.kind);
            }
        }
        self.counters.evicted_fds.fetch_add(1, Ordering::Relaxed);
        let callback = self.on_evict.read().clone();
        if let Some(on_evict) = callback {
            on_evict(peer.fd, reason);
        }
    }
}

/// Refuses, before anything is written, a payload that is not UTF-8 when a recipient's mode
/// needs it: `utf8_subscribers` of the topic's, less `except` (its mode, if it subscribes).
fn check_utf8(payload: &[u8], utf8_subscribers: usize, except: Option<Mode>) -> Result<(), Error> {
    let recipients = utf8_subscribers - usize::from(except.is_some_and(Mode::requires_utf8));
    if recipients > 0 && std::str::from_utf8(payload).is_err() {
        return Err(Error::InvalidUtf8);
    }
    Ok(())
}

fn check_topic(topic: &[u8]) -> Result<(), Error> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(Error::InvalidArgument("a topic is 1 to 4096 bytes"));
    }
    Ok(())
}

fn identify(fd: RawFd) -> Result<FileIdentity, Error> {
    if fd < 0 {
        return Err(Error::BadFd);
    }
    io::identify(fd).map_err(|err| match err.raw_os_error() {
        Some(libc::EBADF) => Error::BadFd,
        _ => Error::Io(err),
    })
}
