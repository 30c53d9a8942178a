//! One fd as fdcast knows it: its identity and its outbox, the bounded queue of frames the
//! kernel has not taken yet. Every write to the fd happens here, under the fd's own lock, which
//! is what keeps frames whole and in order when several threads publish at once.
//!
//! A subscription whose topic keeps history does not lose a frame that overflows the outbox:
//! the fd falls behind on that topic instead, keeping only a cursor into the topic's history,
//! and live messages of the topic skip it; each time its outbox drains, a flush refills it
//! from the history (`Peer::catch_up`), until the cursor passes the newest message.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::frame::{Frame, Mode};
use crate::history::{EventId, Ring};
use crate::index::Keepalive;
use crate::io::{self, FileIdentity};
use crate::reactor::Reactor;

/// What happens to a frame that would push an fd's queued bytes past the outbox limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Drop that frame for that fd, and count it.
    DropMessage,
    /// Evict the fd: drop its subscriptions and queued bytes, `shutdown(2)` it, and call the
    /// evict callback with `ENOBUFS`.
    Evict,
}

/// The write-path settings a publish reads once and applies to every fd.
#[derive(Clone, Copy)]
pub(crate) struct WritePolicy {
    pub(crate) outbox_limit: usize,
    pub(crate) overflow: Overflow,
    /// Queue instead of writing, for a later flush (`fdcast_cork`).
    pub(crate) corked: bool,
    /// Check, before writing, that the fd still names the file it named when fdcast first saw
    /// it (`fdcast_set_fd_check`).
    pub(crate) check_identity: bool,
    /// The heartbeat period the write happens in; an fd that takes a frame is not idle.
    pub(crate) heartbeat_tick: u64,
}

/// The outcome of handing one frame to one fd.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The whole frame reached the kernel.
    Written,
    /// The frame, or the rest of it (`bytes`), waits in the outbox.
    Queued { bytes: usize },
    /// Corked: the frame (`bytes`) waits in an outbox that had nothing waiting for a flush,
    /// so the caller must put this peer on its flush list.
    Deferred { bytes: usize },
    /// `Overflow::DropMessage` dropped the frame, or there was no memory to queue it.
    Dropped,
    /// The fd is behind on the message's topic: the message reaches it from the topic's
    /// history once its outbox drains, and is counted then.
    Behind,
    /// As `Behind`, after finding that `lost` messages the fd was owed on the topic have left
    /// the history; `evict` says the overflow policy evicts the fd for that.
    Gap { lost: u64, evict: bool },
    /// `Overflow::Evict` applies: the caller evicts the fd.
    Overflowed,
    /// The write failed with this errno: the caller evicts the fd.
    Failed(i32),
    /// The fd was forgotten or evicted meanwhile; nothing was done.
    Closed,
    /// The fd number names another file now (closed by the host without
    /// `fdcast_unsubscribe_fd`, and reused): nothing was written; the caller forgets the fd.
    Reused,
}

/// Where a message sits in its topic's history: what lets a subscriber that cannot take it
/// now fall behind instead of losing it.
#[derive(Clone, Copy)]
pub(crate) struct InHistory<'a> {
    pub(crate) topic: &'a [u8],
    /// Its local position (a shared ring's own numbering, not the stream's id).
    pub(crate) id: EventId,
    /// The offset of the oldest message the topic's history still keeps (this one aside).
    pub(crate) oldest_kept: u64,
}

/// A subscription that fell behind: the fd gets its topic's messages from the history, from
/// `cursor` on, rather than live.
struct Lag {
    topic: Box<[u8]>,
    epoch: u64,
    /// The offset of the first message the fd was not given.
    cursor: u64,
    /// The offset of the newest message it skipped live: with the history gone, what it was
    /// owed from `cursor` through here is lost.
    newest: u64,
}

impl Lag {
    /// What the fd loses if the history it was following is gone.
    fn owed(&self) -> u64 {
        (self.newest + 1).saturating_sub(self.cursor)
    }
}

/// What one refill from a topic's history came to.
#[derive(Default)]
pub(crate) struct CatchUp {
    /// Bytes queued, for the registry's gauge.
    pub(crate) queued: usize,
    /// Kept messages no frame could be encoded for (no memory): dropped and counted.
    pub(crate) dropped: u64,
    /// Messages the fd was owed that the history no longer keeps.
    pub(crate) lost: u64,
    /// The overflow policy evicts the fd for that loss.
    pub(crate) evict: bool,
}

/// One fd's counters, as `fdcast_fd_stats` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdStats {
    /// Frames whose last byte reached the kernel (keep-alive frames aside).
    pub delivered: u64,
    /// Frames dropped by [`Overflow::DropMessage`] (or for lack of memory).
    pub dropped: u64,
    /// Messages the fd was owed on a topic with history that left the history before the
    /// fd caught up, or that a shared history's stream discarded before this process got
    /// them.
    pub lost_to_gaps: u64,
    /// Bytes waiting in the fd's outbox now.
    pub queued_bytes: u64,
    /// Topics the fd is behind on, catching up from their history.
    pub catching_up: u64,
}

/// `Peer::deliver`'s refusal: the fd takes part in a corked batch that holds frames older
/// than this one; nothing was done, and the caller spills the batches into the outboxes and
/// delivers again. A type of its own, so no publish outcome can hold it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InBatch;

/// The outcome of offering an fd a keep-alive frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The frame was written or queued (not counted as a delivery), or the write failed.
    Sent(Delivery),
    /// The fd is not idle, or has bytes queued: it is next due at the heartbeat that ends the
    /// period `next_check`.
    NotDue { next_check: u64 },
    /// The fd was forgotten or evicted.
    Closed,
}

/// The outcome of handing an fd the frames a corked batch gathered for it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Attach {
    /// Queued; `newly_awaiting` says the caller must put the peer on the flush list, and
    /// `room` is how many more bytes the outbox takes under the limit rule.
    Queued { newly_awaiting: bool, room: usize },
    /// The fd was forgotten meanwhile: its `bytes` were never queued.
    Closed { bytes: usize },
}

/// Whether an fd stays in its corked batch after the batch hands it its frames.
#[derive(Clone, Copy)]
pub(crate) enum Membership {
    /// Stays, for the batch's next frames; `limit` is the outbox limit its room is
    /// measured against, `heartbeat_tick` the period the frames count as activity in.
    Stay {
        limit: usize,
        heartbeat_tick: u64,
    },
    Leave,
}

/// Whole frames back to back, with the offset where each ends: a corked batch's frames for
/// one mode, queued as one chunk by every fd of the batch.
pub(crate) struct FrameRun {
    pub(crate) bytes: Vec<u8>,
    pub(crate) ends: Vec<usize>,
}

impl FrameRun {
    /// How many frames end in `(from, to]`. A run is mostly written whole, in one go, which
    /// needs no search.
    fn frames_ending_within(&self, from: usize, to: usize) -> usize {
        let before = if from == 0 {
            0
        } else {
            self.ends.partition_point(|&end| end <= from)
        };
        let through = if to == self.bytes.len() {
            self.ends.len()
        } else {
            self.ends.partition_point(|&end| end <= to)
        };
        through - before
    }
}

/// How many more bytes an outbox takes under the limit rule: an empty one takes a frame of any
/// size, and the limit's worth of frames.
fn room(outbox: &Outbox, limit: usize) -> usize {
    if outbox.chunks.is_empty() {
        limit
    } else {
        limit.saturating_sub(outbox.queued_bytes)
    }
}

/// The outcome of writing an fd's outbox.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// `bytes` bytes were written, completing `frames` frames; `drained` says whether the
    /// outbox is now empty.
    Progress {
        bytes: usize,
        frames: usize,
        drained: bool,
    },
    /// A write failed with `errno` after `bytes` bytes completing `frames` frames were
    /// written: the caller evicts the fd.
    Failed {
        errno: i32,
        bytes: usize,
        frames: usize,
    },
    /// The fd number names another file now: nothing was written; the caller forgets the fd.
    Reused,
}

/// Frames up to this size are copied into the fd's contiguous chunks instead of sharing the
/// frame: a 64-byte copy is cheaper than the reference count's two atomic operations, and a
/// flush then writes many frames as one iovec. Larger frames are shared: one copy, however
/// many fds queue it.
const INLINE_FRAME_MAX: usize = 512;
/// Inline chunks stop growing here, so a drained chunk frees its memory.
const INLINE_CHUNK_MAX: usize = 16 * 1024;
/// The most chunk or frame records a drained outbox keeps room for.
const RETAINED_RECORDS_MAX: usize = 64;

/// Queued bytes: small frames copied back to back, or one large frame shared with every fd
/// that queued it.
enum Chunk {
    Inline {
        bytes: Vec<u8>,
        written: usize,
    },
    Shared {
        bytes: Arc<Vec<u8>>,
        written: usize,
    },
    /// Frames whose ends the run itself records (not `Outbox::frame_ends`).
    Run {
        run: Arc<FrameRun>,
        written: usize,
    },
}

impl Chunk {
    fn unwritten(&self) -> &[u8] {
        match self {
            Chunk::Inline { bytes, written } => &bytes[*written..],
            Chunk::Shared { bytes, written } => &bytes[*written..],
            Chunk::Run { run, written } => &run.bytes[*written..],
        }
    }

    fn advance(&mut self, by: usize) {
        match self {
            Chunk::Inline { written, .. }
            | Chunk::Shared { written, .. }
            | Chunk::Run { written, .. } => *written += by,
        }
    }
}

/// Where a queued frame ends, as an offset in the fd's byte stream, so completed frames can
/// be counted however the chunks split them.
struct FrameEnd {
    end: u64,
    /// Whether completing it counts as a delivery (a heartbeat does not).
    counted: bool,
}

#[derive(Default)]
struct Outbox {
    chunks: VecDeque<Chunk>,
    frame_ends: VecDeque<FrameEnd>,
    /// Stream offsets: bytes handed to the kernel, and bytes queued, since the fd was first
    /// seen.
    stream_written: u64,
    stream_queued: u64,
    queued_bytes: usize,
    /// Set when the fd is forgotten or evicted: a publish still holding this peer from an
    /// older topic snapshot must not write to an fd number that may now be another file.
    closed: bool,
    /// Whether the reactor watches the fd for writability.
    watched: bool,
    /// Whether the peer is on the registry's flush list (frames queued while corked).
    awaiting_flush: bool,
    /// Whether the fd is a member of a corked batch (see batch.rs): frames for it wait there,
    /// so nothing may be written or queued here until the batch is attached.
    in_batch: bool,
    /// The heartbeat period of the last frame handed to this fd.
    last_active_tick: u64,
    /// Topics the fd fell behind on (mostly none).
    lags: Vec<Lag>,
    /// Counted here, under the lock every delivery takes anyway, rather than with atomics.
    delivered: u64,
    dropped: u64,
    lost_to_gaps: u64,
}

pub(crate) struct Peer {
    pub(crate) fd: RawFd,
    pub(crate) identity: FileIdentity,
    /// How many subscriptions the fd has, kept by the registry under its index lock, so that
    /// a flush can tell without that lock whether a drained fd may have to be forgotten, and
    /// a corked batch whether the fd may be a member, without a lookup per fd.
    subscriptions: AtomicUsize,
    /// The keep-alive frame the fd gets when idle (`keepalive_code`), kept like
    /// `subscriptions`, so that a heartbeat needs no index lookup.
    keepalive: AtomicU8,
    /// Whether the registry's heartbeat queue holds this peer; read and written only under
    /// the registry's heartbeat lock.
    heartbeat_queued: AtomicBool,
    /// How many topics the fd is behind on (`Outbox::lags`), so a flush tells without the
    /// lock whether to catch up.
    lagging: AtomicUsize,
    outbox: Mutex<Outbox>,
}

fn keepalive_code(keepalive: Option<Keepalive>) -> u8 {
    match keepalive {
        None => 0,
        Some(Keepalive::Ping) => 1,
        Some(Keepalive::Comment) => 2,
    }
}

impl Peer {
    /// Whether the fd still names the file fdcast first saw under its number. An fd that is
    /// not open at all passes: the write reports it (`EBADF`), as without the check.
    fn names_its_file(&self) -> bool {
        io::identify(self.fd).map_or(true, |now| now == self.identity)
    }

    pub(crate) fn new(fd: RawFd, identity: FileIdentity) -> Peer {
        Peer {
            fd,
            identity,
            subscriptions: AtomicUsize::new(0),
            keepalive: AtomicU8::new(keepalive_code(None)),
            heartbeat_queued: AtomicBool::new(false),
            lagging: AtomicUsize::new(0),
            outbox: Mutex::new(Outbox::default()),
        }
    }

    pub(crate) fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Called by the registry, under the index's write lock, whenever the fd's subscriptions
    /// change.
    pub(crate) fn set_subscriptions(&self, count: usize, keepalive: Option<Keepalive>) {
        self.subscriptions.store(count, Ordering::Relaxed);
        self.keepalive
            .store(keepalive_code(keepalive), Ordering::Relaxed);
    }

    pub(crate) fn keepalive(&self) -> Option<Keepalive> {
        match self.keepalive.load(Ordering::Relaxed) {
            1 => Some(Keepalive::Ping),
            2 => Some(Keepalive::Comment),
            _ => None,
        }
    }

    /// Whether the heartbeat queue holds this peer. Only under the registry's heartbeat lock.
    pub(crate) fn heartbeat_queued(&self) -> bool {
        self.heartbeat_queued.load(Ordering::Relaxed)
    }

    /// Only under the registry's heartbeat lock.
    pub(crate) fn set_heartbeat_queued(&self, queued: bool) {
        self.heartbeat_queued.store(queued, Ordering::Relaxed);
    }

    /// Writes `frame`, or queues it behind bytes already waiting; a frame that would take the
    /// queue past the outbox limit meets the overflow policy, unless its topic keeps history
    /// (`history`): then the fd falls behind on the topic and gets the message, and those
    /// after it, from the history (see [`Peer::catch_up`]). The bytes it queues are reported
    /// in the outcome, for the caller to add to the registry-wide gauge once per publish
    /// rather than once per fd.
    pub(crate) fn deliver(
        &self,
        frame: &Frame<'_>,
        history: Option<InHistory<'_>>,
        policy: WritePolicy,
        reactor: &Reactor,
    ) -> Result<Delivery, InBatch> {
        let mut outbox = self.outbox.lock();
        if outbox.closed {
            return Ok(Delivery::Closed);
        }
        let frame_len = frame.len();
        if frame_len == 0 {
            outbox.delivered += 1;
            return Ok(Delivery::Written);
        }
        if outbox.in_batch {
            return Err(InBatch);
        }
        if let Some(at) = history
            && !outbox.lags.is_empty()
            && let Some(behind) = outbox.skip_if_behind(at, policy.overflow)
        {
            return Ok(behind);
        }
        if !outbox.chunks.is_empty() && outbox.queued_bytes + frame_len > policy.outbox_limit {
            if let Some(at) = history {
                outbox.lags.push(Lag {
                    topic: Box::from(at.topic),
                    epoch: at.id.epoch,
                    cursor: at.id.offset,
                    newest: at.id.offset,
                });
                self.lagging.store(outbox.lags.len(), Ordering::Relaxed);
                return Ok(Delivery::Behind);
            }
            return Ok(match policy.overflow {
                Overflow::DropMessage => {
                    outbox.dropped += 1;
                    Delivery::Dropped
                }
                Overflow::Evict => Delivery::Overflowed,
            });
        }
        outbox.last_active_tick = policy.heartbeat_tick;
        if policy.corked {
            if !outbox.push(frame, 0, true) {
                outbox.dropped += 1;
                return Ok(Delivery::Dropped);
            }
            if outbox.awaiting_flush {
                return Ok(Delivery::Queued { bytes: frame_len });
            }
            outbox.awaiting_flush = true;
            return Ok(Delivery::Deferred { bytes: frame_len });
        }
        if !outbox.chunks.is_empty() {
            if !outbox.push(frame, 0, true) {
                outbox.dropped += 1;
                return Ok(Delivery::Dropped);
            }
            return Ok(Delivery::Queued { bytes: frame_len });
        }
        if policy.check_identity && !self.names_its_file() {
            return Ok(Delivery::Reused);
        }
        Ok(outbox.write_now(self.fd, self.identity.kind, frame, true, reactor))
    }

    /// Writes a keep-alive frame if the fd has taken nothing since `idle_since_tick` and has
    /// nothing queued; the frame is not counted as a delivery. `current_tick` is the period
    /// that starts now.
    pub(crate) fn heartbeat(
        &self,
        frame: &Frame<'_>,
        idle_since_tick: u64,
        current_tick: u64,
        check_identity: bool,
        reactor: &Reactor,
    ) -> Beat {
        let mut outbox = self.outbox.lock();
        if outbox.closed {
            return Beat::Closed;
        }
        if outbox.last_active_tick > idle_since_tick {
            // Idle from the end of its last active period on, it is due at the heartbeat
            // that ends the next one.
            return Beat::NotDue {
                next_check: outbox.last_active_tick + 1,
            };
        }
        if outbox.in_batch || !outbox.chunks.is_empty() {
            return Beat::NotDue {
                next_check: current_tick,
            };
        }
        if check_identity && !self.names_its_file() {
            return Beat::Sent(Delivery::Reused);
        }
        outbox.last_active_tick = current_tick;
        Beat::Sent(outbox.write_now(self.fd, self.identity.kind, frame, false, reactor))
    }

    /// Makes the fd a member of a corked batch if its outbox can take `required` more bytes
    /// under the limit rule (an empty outbox takes up to `limit`); returns how many it
    /// can take. Taking part in a batch counts as activity for the heartbeat.
    pub(crate) fn join_batch(&self, required: usize, limit: usize, tick: u64) -> Option<usize> {
        let mut outbox = self.outbox.lock();
        // A batch member's frames bypass `deliver`, which is what skips a topic the fd is
        // behind on.
        if outbox.closed || outbox.in_batch || !outbox.lags.is_empty() {
            return None;
        }
        let room = room(&outbox, limit);
        if room < required {
            return None;
        }
        outbox.in_batch = true;
        outbox.last_active_tick = tick;
        Some(room)
    }

    /// Queues the frames a corked batch gathered for the fd (`None`: it gathered none), as
    /// one chunk, and keeps or ends the fd's membership. The bytes were already added to the
    /// registry's gauge.
    pub(crate) fn take_batch_frames(
        &self,
        run: Option<Arc<FrameRun>>,
        membership: Membership,
    ) -> Attach {
        let mut outbox = self.outbox.lock();
        let bytes = run.as_ref().map_or(0, |run| run.bytes.len());
        if outbox.closed {
            outbox.in_batch = false;
            return Attach::Closed { bytes };
        }
        let mut newly_awaiting = false;
        if let Some(run) = run.filter(|run| !run.bytes.is_empty()) {
            outbox.queued_bytes += bytes;
            outbox.stream_queued += bytes as u64;
            outbox.chunks.push_back(Chunk::Run { run, written: 0 });
            newly_awaiting = !outbox.awaiting_flush;
            outbox.awaiting_flush = true;
        }
        let room = match membership {
            Membership::Stay {
                limit,
                heartbeat_tick,
            } => {
                outbox.last_active_tick = heartbeat_tick;
                room(&outbox, limit)
            }
            Membership::Leave => {
                outbox.in_batch = false;
                0
            }
        };
        Attach::Queued {
            newly_awaiting,
            room,
        }
    }

    /// Writes as much of the outbox as the fd takes, up to IOV_MAX frames per system call;
    /// what the fd refuses waits for writability. The bytes written leave this outbox's
    /// count; the caller takes them off the registry's gauge.
    pub(crate) fn flush(&self, check_identity: bool, reactor: &Reactor) -> Flush {
        let mut outbox = self.outbox.lock();
        outbox.awaiting_flush = false;
        if check_identity && !outbox.chunks.is_empty() && !self.names_its_file() {
            return Flush::Reused;
        }
        let mut bytes = 0;
        let mut frames = 0;
        while !outbox.chunks.is_empty() && !outbox.closed {
            let written = match outbox.chunks.as_slices() {
                // One chunk (a corked batch's run, mostly) needs no IOV_MAX array.
                ([only], []) | ([], [only]) => {
                    io::write_frame(self.fd, self.identity.kind, &[], only.unwritten())
                }
                _ => io::write_slices(
                    self.fd,
                    self.identity.kind,
                    outbox.chunks.iter().map(Chunk::unwritten),
                ),
            };
            let written = match written {
                Ok(written) => written,
                Err(err) => {
                    return Flush::Failed {
                        errno: errno_of(&err),
                        bytes,
                        frames,
                    };
                }
            };
            if written == 0 {
                if let Err(errno) = outbox.ensure_watched(self.fd, reactor) {
                    return Flush::Failed {
                        errno,
                        bytes,
                        frames,
                    };
                }
                return Flush::Progress {
                    bytes,
                    frames,
                    drained: false,
                };
            }
            bytes += written;
            frames += outbox.consume(written);
        }
        if !outbox.lags.is_empty() {
            // Drained while behind on a topic: whoever drained it (a flush from dispatch
            // catches up at once; a replay's write, which holds a ring, cannot) leaves the fd
            // watched, and re-arming it reports the writable fd to the next dispatch, which
            // refills the outbox from the history.
            if let Err(err) = reactor.watch(self.fd) {
                return Flush::Failed {
                    errno: errno_of(&err),
                    bytes,
                    frames,
                };
            }
            outbox.watched = true;
        } else if outbox.watched {
            reactor.unwatch(self.fd);
            outbox.watched = false;
        }
        outbox.release_backlog_capacity();
        Flush::Progress {
            bytes,
            frames,
            drained: true,
        }
    }

    /// Forgets the fd: discards its queued bytes (a partly written frame included) and stops
    /// watching it. Later deliveries to this peer do nothing.
    pub(crate) fn close(&self, reactor: &Reactor, queued_gauge: &AtomicU64) {
        let mut outbox = self.outbox.lock();
        outbox.closed = true;
        outbox.in_batch = false;
        queued_gauge.fetch_sub(outbox.queued_bytes as u64, Ordering::Relaxed);
        outbox.queued_bytes = 0;
        outbox.chunks = VecDeque::new();
        outbox.frame_ends = VecDeque::new();
        outbox.lags = Vec::new();
        self.lagging.store(0, Ordering::Relaxed);
        if outbox.watched {
            reactor.unwatch(self.fd);
            outbox.watched = false;
        }
    }

    /// Closes the peer only if nothing is queued, so an fd with no subscriptions left can be
    /// forgotten without losing bytes. Returns whether it closed.
    pub(crate) fn close_if_idle(&self, reactor: &Reactor) -> bool {
        let mut outbox = self.outbox.lock();
        if !outbox.chunks.is_empty() || outbox.in_batch || !outbox.lags.is_empty() {
            return false;
        }
        outbox.closed = true;
        if outbox.watched {
            reactor.unwatch(self.fd);
            outbox.watched = false;
        }
        true
    }

    /// The bytes queued here, and whether a corked batch holds more for the fd.
    pub(crate) fn pending(&self) -> (usize, bool) {
        let outbox = self.outbox.lock();
        (outbox.queued_bytes, outbox.in_batch)
    }

    /// How many topics the fd is behind on.
    pub(crate) fn lagging(&self) -> usize {
        self.lagging.load(Ordering::Relaxed)
    }

    /// The topics the fd is behind on, in the order to refill them: each call starts one
    /// topic further on, so that a topic far behind, which can fill the outbox on every
    /// refill, does not hold back the others until it has caught up.
    pub(crate) fn lagging_topics(&self) -> Vec<Box<[u8]>> {
        let mut outbox = self.outbox.lock();
        let topics = outbox.lags.iter().map(|lag| lag.topic.clone()).collect();
        if !outbox.lags.is_empty() {
            outbox.lags.rotate_left(1);
        }
        topics
    }

    /// Forgets the lags of topics the fd no longer subscribes to: nothing more is owed there.
    pub(crate) fn keep_lags(&self, mut subscribed: impl FnMut(&[u8]) -> bool) {
        let mut outbox = self.outbox.lock();
        outbox.lags.retain(|lag| subscribed(&lag.topic));
        self.lagging.store(outbox.lags.len(), Ordering::Relaxed);
    }

    /// Counts empty frames a corked batch delivered (they write nothing, so no flush counts
    /// them).
    pub(crate) fn count_delivered(&self, frames: u64) {
        self.outbox.lock().delivered += frames;
    }

    /// Counts a frame dropped before it reached the outbox (no memory to encode it).
    pub(crate) fn count_dropped(&self, frames: u64) {
        self.outbox.lock().dropped += frames;
    }

    /// Counts messages the fd will never get because they were lost before they reached
    /// this process (see `Stream::Lost`).
    pub(crate) fn count_lost(&self, messages: u64) {
        self.outbox.lock().lost_to_gaps += messages;
    }

    /// The fd's counters now (bytes a corked batch holds for it aside).
    pub(crate) fn stats(&self) -> FdStats {
        let outbox = self.outbox.lock();
        FdStats {
            delivered: outbox.delivered,
            dropped: outbox.dropped,
            lost_to_gaps: outbox.lost_to_gaps,
            queued_bytes: outbox.queued_bytes as u64,
            catching_up: outbox.lags.len() as u64,
        }
    }

    /// Refills the outbox from `topic`'s history (`ring`, locked by the caller, so no publish
    /// to the topic runs meanwhile) from the fd's cursor on, framed in `mode`, while the
    /// frames fit under the outbox limit; once the cursor passes the newest kept message the
    /// fd is live on the topic again, with no gap or duplicate against publishes, which take
    /// the same ring lock. Messages that left the history before the fd got them are a gap:
    /// counted, and under [`Overflow::DropMessage`] the fd goes on from the oldest kept one
    /// (found, and counted, only once that one fits, so a reader sees each gap as one jump);
    /// under [`Overflow::Evict`] nothing is refilled and the caller evicts the fd. With the
    /// history gone (`ring` None: turned off, or dropped when its messages aged out) what the
    /// fd was owed is lost; with the subscription gone (`mode` None) nothing was owed.
    pub(crate) fn catch_up(
        &self,
        topic: &[u8],
        ring: Option<&Ring<Arc<[u8]>>>,
        mode: Option<Mode>,
        policy: WritePolicy,
    ) -> CatchUp {
        let mut outbox = self.outbox.lock();
        let mut caught = CatchUp::default();
        let Some(at) = outbox.lags.iter().position(|lag| *lag.topic == *topic) else {
            return caught;
        };
        if outbox.closed {
            return caught;
        }
        let (ring, mode) = match (ring, mode) {
            (Some(ring), Some(mode)) if ring.epoch() == outbox.lags[at].epoch => (ring, mode),
            (_, mode) => {
                let lag = outbox.lags.swap_remove(at);
                self.lagging.store(outbox.lags.len(), Ordering::Relaxed);
                if mode.is_some() {
                    caught.lost = lag.owed();
                    outbox.lost_to_gaps += caught.lost;
                    caught.evict = caught.lost > 0 && policy.overflow == Overflow::Evict;
                }
                return caught;
            }
        };
        let mut cursor = outbox.lags[at].cursor;
        let oldest = ring.oldest_offset();
        let mut lost = 0;
        if cursor < oldest {
            lost = oldest - cursor;
            if policy.overflow == Overflow::Evict {
                // Counted once: until the eviction lands, a later refill finds no more lost.
                outbox.lags[at].cursor = oldest;
                outbox.lost_to_gaps += lost;
                caught.lost = lost;
                caught.evict = true;
                return caught;
            }
            cursor = oldest;
        }
        for (offset, id, payload) in ring.kept_from(cursor) {
            if mode.requires_utf8() && std::str::from_utf8(payload).is_err() {
                // As a replay does: a publish could not have sent it in this mode either.
                cursor = offset + 1;
                continue;
            }
            if payload.is_empty() && mode == Mode::Raw {
                // An empty frame writes nothing: `deliver` counted it when it was published.
                cursor = offset + 1;
                continue;
            }
            let Some(frame) = Frame::encode_with_id(mode, payload, Some(id)) else {
                outbox.dropped += 1;
                caught.dropped += 1;
                cursor = offset + 1;
                continue;
            };
            if !outbox.chunks.is_empty() && outbox.queued_bytes + frame.len() > policy.outbox_limit
            {
                break;
            }
            if !outbox.push(&frame, 0, true) {
                break;
            }
            outbox.last_active_tick = policy.heartbeat_tick;
            caught.queued += frame.len();
            cursor = offset + 1;
        }
        if lost > 0 && cursor == oldest && cursor <= ring.last_offset() {
            // Nothing after the gap fit (the outbox holds another topic's refill): the fd
            // stays where it was, and the gap is found, grown, once it can go on after it,
            // so that it is told once, as the one jump its reader sees.
            return caught;
        }
        caught.lost = lost;
        outbox.lost_to_gaps += lost;
        if cursor > ring.last_offset() {
            outbox.lags.swap_remove(at);
            self.lagging.store(outbox.lags.len(), Ordering::Relaxed);
        } else {
            outbox.lags[at].cursor = cursor;
        }
        caught
    }
}

impl Outbox {
    /// Skips a message of a topic the fd is behind on (it comes from the history later), and
    /// finds a gap if the history was made anew (a new epoch: everything the fd skipped is
    /// lost, and it goes on from this message) or, under [`Overflow::Evict`], if the history
    /// dropped messages the fd was owed (it is evicted at once). Under
    /// [`Overflow::DropMessage`] the loss of a reader that stays stalled is found when it
    /// reads again (`Peer::catch_up`): one gap, not one per publish. `None` if the fd is not
    /// behind on the topic.
    fn skip_if_behind(&mut self, at: InHistory<'_>, overflow: Overflow) -> Option<Delivery> {
        let lag = self.lags.iter_mut().find(|lag| *lag.topic == *at.topic)?;
        let mut lost = 0;
        if lag.epoch != at.id.epoch {
            lost = lag.owed();
            lag.epoch = at.id.epoch;
            lag.cursor = at.id.offset;
            lag.newest = at.id.offset;
        } else {
            if overflow == Overflow::Evict && lag.cursor < at.oldest_kept {
                lost = at.oldest_kept - lag.cursor;
                // Counted once: the frames met before the eviction lands (the rest of a
                // replay, a gap callback's resubscribe) find no more lost.
                lag.cursor = at.oldest_kept;
            }
            lag.newest = lag.newest.max(at.id.offset);
        }
        if lost == 0 {
            return Some(Delivery::Behind);
        }
        self.lost_to_gaps += lost;
        Some(Delivery::Gap {
            lost,
            evict: overflow == Overflow::Evict,
        })
    }

    /// Writes `frame` to an fd with nothing queued; queues what the kernel does not take and
    /// watches the fd for writability.
    // Every immediate delivery runs it: inlined with write_frame and write_iovecs, the path
    // compiles as one function instead of a chain of calls.
    #[inline(always)]
    fn write_now(
        &mut self,
        fd: RawFd,
        kind: io::FileKind,
        frame: &Frame<'_>,
        counted: bool,
        reactor: &Reactor,
    ) -> Delivery {
        let written = match io::write_frame(fd, kind, frame.header(), frame.body()) {
            Ok(written) => written,
            Err(err) => return Delivery::Failed(errno_of(&err)),
        };
        if written == frame.len() {
            self.stream_written += written as u64;
            self.stream_queued += written as u64;
            self.delivered += u64::from(counted);
            return Delivery::Written;
        }
        self.stream_written += written as u64;
        self.stream_queued += written as u64;
        if !self.push(frame, written, counted) {
            // The frame is started and its rest cannot be kept: only eviction avoids a torn
            // frame on a live stream.
            return Delivery::Failed(libc::ENOMEM);
        }
        if let Err(errno) = self.ensure_watched(fd, reactor) {
            return Delivery::Failed(errno);
        }
        Delivery::Queued {
            bytes: frame.len() - written,
        }
    }

    /// Queues `frame` from byte `skip` on (the part already written is skipped). False, with
    /// nothing queued, if a large frame's shared buffer cannot be allocated.
    #[must_use]
    fn push(&mut self, frame: &Frame<'_>, skip: usize, counted: bool) -> bool {
        let shared = if frame.len() > INLINE_FRAME_MAX {
            match frame.shared() {
                Some(shared) => Some(shared),
                None => return false,
            }
        } else {
            None
        };
        let remaining = frame.len() - skip;
        self.queued_bytes += remaining;
        self.stream_queued += remaining as u64;
        self.frame_ends.push_back(FrameEnd {
            end: self.stream_queued,
            counted,
        });
        if let Some(bytes) = shared {
            self.chunks.push_back(Chunk::Shared {
                bytes,
                written: skip,
            });
            return true;
        }
        let fits_last = matches!(
            self.chunks.back(),
            Some(Chunk::Inline { bytes, .. }) if bytes.len() + remaining <= INLINE_CHUNK_MAX
        );
        if !fits_last {
            self.chunks.push_back(Chunk::Inline {
                bytes: Vec::new(),
                written: 0,
            });
        }
        let Some(Chunk::Inline { bytes, .. }) = self.chunks.back_mut() else {
            unreachable!("an inline chunk is last");
        };
        frame.copy_from(skip, bytes);
        true
    }

    /// Advances past `written` bytes; returns how many counted frames were completed.
    fn consume(&mut self, mut written: usize) -> usize {
        self.queued_bytes -= written;
        self.stream_written += written as u64;
        let mut completed = 0;
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let remaining = front.unwritten().len();
            let taken = remaining.min(written);
            if let Chunk::Run { run, written: at } = front {
                completed += run.frames_ending_within(*at, *at + taken);
            }
            written -= taken;
            if taken < remaining {
                front.advance(taken);
            } else {
                self.chunks.pop_front();
            }
        }
        while let Some(frame) = self.frame_ends.front() {
            if frame.end > self.stream_written {
                break;
            }
            completed += usize::from(frame.counted);
            self.frame_ends.pop_front();
        }
        self.delivered += completed as u64;
        completed
    }

    /// Frees the queues' memory once a backlog has drained: a reader that fell a limit's
    /// worth of small frames behind left records for every one of them (16 bytes each, 256 KiB
    /// for a 1 MiB limit of 64-byte frames), which an idle fd has no use for.
    fn release_backlog_capacity(&mut self) {
        if self.frame_ends.capacity() > RETAINED_RECORDS_MAX {
            self.frame_ends = VecDeque::new();
        }
        if self.chunks.capacity() > RETAINED_RECORDS_MAX {
            self.chunks = VecDeque::new();
        }
    }

    fn ensure_watched(&mut self, fd: RawFd, reactor: &Reactor) -> Result<(), i32> {
        if !self.watched {
            reactor.watch(fd).map_err(|err| errno_of(&err))?;
            self.watched = true;
        }
        Ok(())
    }
}

fn errno_of(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_counts_the_frames_that_end_in_each_written_span() {
        let run = FrameRun {
            bytes: vec![0; 10],
            ends: vec![2, 5, 9, 10],
        };
        assert_eq!(run.frames_ending_within(0, 10), 4, "written whole");
        assert_eq!(run.frames_ending_within(0, 4), 1);
        assert_eq!(
            run.frames_ending_within(4, 5),
            1,
            "ends exactly at a frame's end"
        );
        assert_eq!(run.frames_ending_within(5, 8), 0, "inside a frame");
        assert_eq!(run.frames_ending_within(8, 10), 2, "the rest");
        let parts = [(0, 3), (3, 6), (6, 7), (7, 10)];
        let total: usize = parts
            .iter()
            .map(|&(from, to)| run.frames_ending_within(from, to))
            .sum();
        assert_eq!(
            total, 4,
            "however the writes split it, each frame counts once"
        );
    }
}
