//! The public `Registry`: the struct, its lock order, subscriptions and stats. The other jobs
//! have a file each: `publish` (fan-out and `send`), `flush` (cork, flush, dispatch),
//! `heartbeat` (keep-alive timers), `evict` (forgetting and evicting fds), `broker`
//! (cross-process fan-out), `history` (per-topic history and resume), `catch_up` (readers
//! that fell behind on a topic with history, gaps, per-fd counters) and `shared` (history
//! shared across processes through a broker).
//!
//! Locks, always taken in this order and never the other way round:
//! 0. with history on, `histories` (an `RwLock`, the map of topics to rings): read to find a
//!    topic's ring; written only to make one, to sweep emptied rings (taking only rings
//!    nobody else holds, with `try_lock`), and by `set_history` to give every ring its new
//!    limits; then one topic's
//!    ring lock: held by a publish to that topic from the choice of its id through its
//!    fan-out (so publishes to one topic with history serialize, publishes to other topics do
//!    not), by a resume from its subscribe through its replay, and by a flush refilling a
//!    lagging fd's outbox from it (catch_up.rs). Nobody takes `histories`
//!    while holding a ring, nor a second ring while holding one;
//! 1. `index` (an `RwLock`): read briefly by an immediate publish to clone a topic's
//!    subscriber list, for the whole of a corked publish (which writes nothing), and by
//!    `set_heartbeat` to queue every fd when heartbeats start; written by subscribe,
//!    unsubscribe, eviction and the fd-reuse guard;
//! 2. `batches`, the corked batches (batch.rs): held by a corked publish to append its frames,
//!    and to spill the batches into the outboxes, which every index write does first;
//! 3. one peer's outbox mutex: held for the writes to that one fd.
//!
//! An immediate publish holds no lock while it walks its subscriber list and at most one
//! outbox lock at a time, so a publish to many fds never blocks changes on other topics,
//! publishes to other topics run in parallel, and no cycle can form. `heartbeat`,
//! `flush_list` and `mirror_pins` (shared.rs) are leaf locks: nothing else is taken while
//! one is held. The reactor's poll
//! mutex is only held for the wait itself, and the hook slots are read-locked only to clone
//! the callback out; callbacks run with no lock held (a publish or resume settles its evictions
//! after releasing its topic's ring).

#![forbid(unsafe_code)]

mod broker;
mod catch_up;
mod evict;
mod flush;
mod heartbeat;
mod history;
mod publish;
mod shared;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};

use crate::batch::Batches;
use crate::error::Error;
use crate::frame::Mode;
use crate::index::{Index, SubscriptionId};
use crate::io::{self, FileIdentity, FileKind};
use crate::outbox::{Overflow, Peer};
use crate::reactor::Reactor;
pub use catch_up::GapCallback;
use heartbeat::Heartbeat;

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
    /// Messages owed to fds behind on a topic that left the topic's history before those
    /// fds caught up (see [`Registry::set_gap_callback`]).
    pub lost_to_gaps: u64,
    /// Fds removed because the peer was gone or by [`Overflow::Evict`].
    pub evicted_fds: u64,
    /// Bytes waiting in outboxes now (a gauge: read while other threads publish or flush, it
    /// may lag them by the frames in flight; it never reads below 0).
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
    lost_to_gaps: AtomicU64,
    evicted_fds: AtomicU64,
    queued_bytes: AtomicU64,
}

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
                // A resume waiting for the topic's mirror keeps its channel (shared.rs).
                if !*subscribe && self.registry.mirror_pinned(topic) {
                    continue;
                }
                broker.interest(topic, *subscribe);
            }
        }
        drop(index);
        if let Some(broker) = broker {
            broker.kick(&self.registry.reactor);
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
    /// Whether every write first checks that its fd still names the same file.
    fd_check: AtomicBool,
    corked: AtomicBool,
    /// Keep-alive settings and the queue of fds that may be due (heartbeat.rs); a leaf lock.
    heartbeat: Mutex<Heartbeat>,
    /// The current heartbeat period; every write stamps its fd with it.
    heartbeat_tick: AtomicU64,
    /// Peers with frames queued while corked, to be written by the next flush. A leaf lock:
    /// nothing else is locked while it is held.
    flush_list: Mutex<Vec<Arc<Peer>>>,
    /// Corked publishes gathered per topic (batch.rs).
    batches: Mutex<Batches>,
    /// The cross-process broker, when enabled, and the queue a publish hands it (broker.rs).
    broker: broker::BrokerSlot,
    /// Whether `broker` is `Some`, so a publish checks it without the lock.
    broker_enabled: AtomicBool,
    /// An enable is connecting (with no lock held), so a second one is refused.
    broker_enabling: AtomicBool,
    authorizer: RwLock<Option<Arc<Authorizer>>>,
    on_evict: RwLock<Option<Arc<EvictCallback>>>,
    on_gap: RwLock<Option<Arc<GapCallback>>>,
    /// Whether history is on, so a publish checks it without the lock.
    history_on: AtomicBool,
    /// Every topic's kept messages (history.rs).
    histories: RwLock<history::Histories>,
    /// Topics whose channel resumes keep subscribed while they wait for its mirror, and how
    /// many (shared.rs). A leaf lock, taken under the index's write lock.
    mirror_pins: Mutex<std::collections::HashMap<Box<[u8]>, usize>>,
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
            fd_check: AtomicBool::new(false),
            corked: AtomicBool::new(false),
            heartbeat: Mutex::new(Heartbeat::default()),
            heartbeat_tick: AtomicU64::new(1),
            flush_list: Mutex::new(Vec::new()),
            batches: Mutex::new(Batches::default()),
            broker: broker::BrokerSlot::default(),
            broker_enabled: AtomicBool::new(false),
            broker_enabling: AtomicBool::new(false),
            authorizer: RwLock::new(None),
            on_evict: RwLock::new(None),
            on_gap: RwLock::new(None),
            history_on: AtomicBool::new(false),
            histories: RwLock::new(history::Histories::default()),
            mirror_pins: Mutex::new(std::collections::HashMap::new()),
            counters: Counters::default(),
        })
    }

    /// Subscribes `fd` to `topic`. Subscribing the same (topic, fd) again returns the same id
    /// and sets the mode. Pipes and other non-sockets are made `O_NONBLOCK`. An id is never
    /// handed out twice, so a stale one names nothing; after 2^63 - 1 subscriptions (centuries
    /// at any real rate) a new one fails with `ENOSPC`.
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
        let Some(id) = index.subscribe(topic, fd, mode) else {
            self.forget_if_unused(&mut index, fd);
            return Err(Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        };
        self.subscriptions_changed(&index, &peer);
        Ok(id)
    }

    /// Tells `peer` what its fd's subscriptions now come to, after a change under the index's
    /// write lock, and queues it for heartbeats if it has a keep-alive mode.
    fn subscriptions_changed(&self, index: &Index<Peer>, peer: &Arc<Peer>) {
        let keepalive = index.keepalive_of(peer.fd);
        peer.set_subscriptions(index.subscriptions_of(peer.fd), keepalive);
        if peer.lagging() > 0 {
            peer.keep_lags(|topic| index.mode_of(topic, peer.fd).is_some());
        }
        if keepalive.is_some() {
            self.queue_heartbeat(peer);
        }
    }

    /// Removes one subscription. Frames already queued for its fd stay queued.
    pub fn unsubscribe(&self, id: SubscriptionId) -> Result<(), Error> {
        let mut index = self.write_index();
        let fd = index.unsubscribe(id).ok_or(Error::NotFound)?;
        if let Some(peer) = index.peer(fd) {
            self.subscriptions_changed(&index, peer);
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

    /// Drops every subscription and every queued byte; kept history stays.
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

    /// Sets whether every write to an fd first checks (one `fstat`) that the fd still names
    /// the file it named when fdcast first saw it. An fd the host closed without
    /// [`Registry::unsubscribe_fd`] and whose number a new file took is then forgotten
    /// before a byte meant for the old file reaches the new one, leaving only the instant
    /// between the check and the write; without the check, that lasts until the fd's next
    /// subscribe or send.
    pub fn set_fd_check(&self, on: bool) {
        self.fd_check.store(on, Ordering::Relaxed);
    }

    /// Sets (or, with `None`, removes) the authorizer that every subscribe consults.
    pub fn set_authorizer(&self, authorizer: Option<Box<Authorizer>>) {
        *self.authorizer.write() = authorizer.map(Arc::from);
    }

    /// Sets (or, with `None`, removes) the callback told of each evicted fd.
    pub fn set_evict_callback(&self, callback: Option<Box<EvictCallback>>) {
        *self.on_evict.write() = callback.map(Arc::from);
    }

    /// The registry's counters and gauges now.
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
            lost_to_gaps: counters.lost_to_gaps.load(Ordering::Relaxed),
            evicted_fds: counters.evicted_fds.load(Ordering::Relaxed),
            // Publishes and flushes move the gauge after their outbox changed, with no lock
            // held: a flush's subtraction can land before the publish's addition it drained,
            // and the u64 would read as ~2^64 for that moment. Read as signed, never below 0.
            queued_bytes: (counters.queued_bytes.load(Ordering::Relaxed) as i64).max(0) as u64,
            subscriptions: subscriptions as u64,
            topics: topics as u64,
            fds: fds as u64,
        }
    }

    /// The peer for `fd`, created if the index does not know the fd, and replacing a stale one
    /// if the fd number now refers to another file (the fd-reuse guard).
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
