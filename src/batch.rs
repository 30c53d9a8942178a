//! Corked publishes gathered per topic instead of per fd.
//!
//! While corked, a publish appends its frame once to its topic's batch (one buffer per mode)
//! instead of copying it into every subscriber's outbox; a flush then hands each subscriber
//! the batch's frames as one shared chunk. A burst of K publishes to N fds thus costs K
//! appends and N writes of K frames each, as a hand-written coalescing loop does, where
//! queueing per fd cost N·K locks, copies and frame records. A batch, and who its members
//! are, outlives the flush while its topic keeps being published to, so a host that stays
//! corked pays for finding the members once, not once per loop iteration.
//!
//! What keeps this equivalent to queueing per fd (the registry's tests and model check it):
//! - **Order.** Only an fd whose one subscription is this topic becomes a member; any other
//!   subscriber gets the frames through its outbox at publish time, in publish order. A
//!   member's outbox receives nothing while it is a member: a send or an immediate publish
//!   to it gets `Err(InBatch)` and spills the batches first, and every change to the
//!   index spills them under the index's write lock, which corked publishes hold for reading,
//!   so a batch's members are always what the index says.
//! - **The outbox limit.** A member joins only when its outbox has room for a quarter of the
//!   limit, and a batch is spilled before its frames for a mode would exceed the smallest
//!   room of its members, so every frame a batch takes is one the member's outbox would
//!   have taken. Drops and overflow evictions therefore only ever happen in the outboxes of
//!   non-members, exactly where per-fd queueing has them, and a batch never holds more than
//!   one outbox limit per mode.
//! - **Accounting.** A frame's bytes join the registry's queued-bytes gauge when appended, once
//!   per member; deliveries are counted when a member's write completes them.
//! - **Memory.** Every payload-sized buffer is reserved fallibly when a frame is appended,
//!   where a failure is a counted drop, as it is for a publish that writes at once; handing
//!   frames over reserves nothing it cannot do without (a member excepted from a frame gets
//!   frames of its own as they are appended, not a filtered copy at the flush).

#![forbid(unsafe_code)]

use std::hash::{BuildHasher, RandomState};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::frame::{FrameSet, Mode};
use crate::index::Subscriber;
use crate::outbox::{Attach, FrameRun, Membership, Peer};

/// The batches of the topics published to lately.
#[derive(Default)]
pub(crate) struct Batches {
    /// Found by a hash computed once per publish; keyed, as topics may come from clients.
    by_topic: HashTable<(Box<[u8]>, Batch)>,
    hasher: RandomState,
    /// Whether any batch gathered a frame since the last hand-over: the first one makes
    /// `poll_fd` readable.
    gathering: bool,
    /// The last topic looked up and its hash: a burst mostly publishes to one topic, and
    /// comparing its bytes costs a fraction of hashing them.
    last_topic: Vec<u8>,
    last_hash: u64,
}

/// Where a topic without a fitting batch goes: its hash, for [`Batches::insert`].
pub(crate) struct Vacant(u64);

/// A subscriber that gets the topic's frames through its outbox.
pub(crate) struct Direct {
    pub(crate) fd: RawFd,
    pub(crate) mode: Mode,
    pub(crate) peer: Arc<Peer>,
}

struct Member {
    fd: RawFd,
    peer: Arc<Peer>,
    /// Once a publish excepted this fd (`publish_except`), its own frames: the batch's
    /// without those. Built as frames are appended, so that every payload-sized allocation
    /// happens where a failing one can be counted as a drop.
    own: Option<FrameRun>,
}

#[derive(Default)]
struct ModeBatch {
    members: Vec<Member>,
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// Indices in `members` of those with frames of their own (members never move while
    /// the batch lives), so that a frame reaches them without a scan of every member.
    with_own: Vec<usize>,
}

/// One topic's corked frames and the subscribers they are for.
pub(crate) struct Batch {
    /// The outbox limit the members' room was taken under.
    limit: usize,
    /// The smallest room of any member: the most bytes a mode's frames may reach.
    room: usize,
    utf8_subscribers: usize,
    direct: Vec<Direct>,
    modes: [ModeBatch; Mode::COUNT],
    /// Whether a publish came since the last flush: a batch without one ends at the flush,
    /// so that its members, idle, get heartbeats again.
    published: bool,
}

/// What appending one publish's frames did, for the registry's counters.
#[derive(Default)]
pub(crate) struct Appended {
    /// Bytes now waiting for members.
    pub(crate) queued: u64,
    /// Empty frames, complete at once.
    pub(crate) delivered: u64,
    /// Frames no memory could be found for.
    pub(crate) dropped: u64,
}

impl Batches {
    pub(crate) fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }

    /// Whether a frame was gathered since the last hand-over: there is something to flush.
    pub(crate) fn has_frames(&self) -> bool {
        self.gathering
    }

    /// Notes that a frame is about to be gathered; returns whether it is the first since the
    /// last hand-over, which must make `poll_fd` readable.
    pub(crate) fn start_gathering(&mut self) -> bool {
        !std::mem::replace(&mut self.gathering, true)
    }

    /// The topic's batch if it can take this publish's frames under `limit`; a batch that
    /// cannot is spilled into its members' outboxes (peers newly awaiting a flush are pushed
    /// to `awaiting`), and the caller starts a new one with [`Batches::insert`].
    pub(crate) fn fitting(
        &mut self,
        topic: &[u8],
        frames: &FrameSet<'_>,
        limit: usize,
        queued_gauge: &AtomicU64,
        awaiting: &mut Vec<Arc<Peer>>,
    ) -> Result<&mut Batch, Vacant> {
        let hash = self.hash_of(topic);
        let Ok(entry) = self.by_topic.find_entry(hash, |(key, _)| **key == *topic) else {
            return Err(Vacant(hash));
        };
        if entry.get().1.fits(frames, limit) {
            return Ok(&mut entry.into_mut().1);
        }
        let ((_, batch), _) = entry.remove();
        batch.spill(queued_gauge, awaiting);
        Err(Vacant(hash))
    }

    fn hash_of(&mut self, topic: &[u8]) -> u64 {
        if *topic != *self.last_topic {
            self.last_hash = self.hasher.hash_one(topic);
            self.last_topic.clear();
            self.last_topic.extend_from_slice(topic);
        }
        self.last_hash
    }

    pub(crate) fn insert(&mut self, topic: &[u8], vacant: Vacant, batch: Batch) -> &mut Batch {
        let hasher = &self.hasher;
        let entry = self.by_topic.entry(
            vacant.0,
            |(key, _)| **key == *topic,
            |(key, _)| hasher.hash_one(&**key),
        );
        debug_assert!(matches!(entry, Entry::Vacant(_)), "a topic has one batch");
        &mut entry.insert((Box::from(topic), batch)).into_mut().1
    }

    /// Spills every batch into its members' outboxes, ending them.
    pub(crate) fn spill_all(&mut self, queued_gauge: &AtomicU64, awaiting: &mut Vec<Arc<Peer>>) {
        self.gathering = false;
        for (_, batch) in self.by_topic.drain() {
            batch.spill(queued_gauge, awaiting);
        }
    }

    /// Hands every batch's frames to its members' outboxes for a flush. Batches published to
    /// since the last flush keep their members; the others end.
    pub(crate) fn hand_over_all(
        &mut self,
        queued_gauge: &AtomicU64,
        heartbeat_tick: u64,
        awaiting: &mut Vec<Arc<Peer>>,
    ) {
        self.gathering = false;
        self.by_topic.retain(|(_, batch)| {
            if !batch.published {
                std::mem::take(batch).spill(queued_gauge, awaiting);
                return false;
            }
            batch.hand_over(queued_gauge, heartbeat_tick, awaiting);
            true
        });
    }

    /// Bytes the topic's batch holds for `fd`, a member in `mode`.
    pub(crate) fn pending_for(&self, topic: &[u8], fd: RawFd, mode: Mode) -> usize {
        let hash = self.hasher.hash_one(topic);
        self.by_topic
            .find(hash, |(key, _)| **key == *topic)
            .map_or(0, |(_, batch)| batch.modes[mode.index()].pending_for(fd))
    }
}

impl Batch {
    /// A batch for a topic's `subscribers`: those with no other subscription and room in
    /// their outbox join as members, the others are delivered to directly.
    pub(crate) fn new(
        subscribers: &[Subscriber<Peer>],
        utf8_subscribers: usize,
        frames: &FrameSet<'_>,
        limit: usize,
        heartbeat_tick: u64,
    ) -> Batch {
        let mut batch = Batch {
            limit,
            utf8_subscribers,
            ..Batch::default()
        };
        for subscriber in subscribers {
            let required = frames
                .get(subscriber.mode)
                .map(|frame| frame.len().max(limit / 4));
            let room = required
                .filter(|_| subscriber.peer.subscriptions() == 1)
                .and_then(|required| subscriber.peer.join_batch(required, limit, heartbeat_tick));
            match room {
                Some(room) => {
                    batch.room = batch.room.min(room);
                    batch.modes[subscriber.mode.index()].members.push(Member {
                        fd: subscriber.fd,
                        peer: Arc::clone(&subscriber.peer),
                        own: None,
                    });
                }
                None => batch.direct.push(Direct {
                    fd: subscriber.fd,
                    mode: subscriber.mode,
                    peer: Arc::clone(&subscriber.peer),
                }),
            }
        }
        batch
    }

    /// Whether the frames fit every mode's members, under the limit the batch was made for.
    fn fits(&self, frames: &FrameSet<'_>, limit: usize) -> bool {
        limit == self.limit
            && Mode::ALL.iter().all(|&mode| {
                let batch = &self.modes[mode.index()];
                batch.members.is_empty()
                    || frames
                        .get(mode)
                        .is_none_or(|frame| batch.bytes.len() + frame.len() <= self.room)
            })
    }

    pub(crate) fn utf8_subscribers(&self) -> usize {
        self.utf8_subscribers
    }

    pub(crate) fn subscriber_count(&self) -> usize {
        self.direct.len()
            + self
                .modes
                .iter()
                .map(|mode| mode.members.len())
                .sum::<usize>()
    }

    pub(crate) fn direct(&self) -> &[Direct] {
        &self.direct
    }

    /// Appends this publish's frame to every mode that has members, skipping `except`.
    ///
    /// Memory follows the rule of a publish that writes at once: a frame whose buffer cannot
    /// be grown is a counted drop, never an abort, and never written in part. When the
    /// batch's own buffer (or the excepted member's first copy of the frames so far) cannot
    /// be had, the frame is dropped for every member of the mode; when one member's own
    /// frames cannot take it, for that member alone.
    pub(crate) fn append(&mut self, frames: &FrameSet<'_>, except: Option<RawFd>) -> Appended {
        self.published = true;
        let mut appended = Appended::default();
        for mode in Mode::ALL {
            let batch = &mut self.modes[mode.index()];
            if batch.members.is_empty() {
                continue;
            }
            let excepted = except.and_then(|fd| batch.members.iter().position(|m| m.fd == fd));
            let recipients = (batch.members.len() - usize::from(excepted.is_some())) as u64;
            let Some(frame) = frames.get(mode) else {
                appended.dropped += batch.count_dropped(excepted);
                continue;
            };
            if frame.len() == 0 {
                appended.delivered += recipients;
                for (at, member) in batch.members.iter().enumerate() {
                    if Some(at) != excepted {
                        member.peer.count_delivered(1);
                    }
                }
                continue;
            }
            let separated = excepted.is_none_or(|member| batch.separate(member));
            if !separated || !reserve_frame(&mut batch.bytes, &mut batch.ends, frame.len()) {
                appended.dropped += batch.count_dropped(excepted);
                continue;
            }
            frame.copy_from(0, &mut batch.bytes);
            batch.ends.push(batch.bytes.len());
            appended.queued += recipients * frame.len() as u64;
            let ModeBatch {
                members, with_own, ..
            } = batch;
            for &member in with_own.iter().filter(|&&at| Some(at) != excepted) {
                let Some(own) = &mut members[member].own else {
                    continue;
                };
                if reserve_frame(&mut own.bytes, &mut own.ends, frame.len()) {
                    frame.copy_from(0, &mut own.bytes);
                    own.ends.push(own.bytes.len());
                } else {
                    members[member].peer.count_dropped(1);
                    appended.dropped += 1;
                    appended.queued -= frame.len() as u64;
                }
            }
        }
        appended
    }

    /// Hands every member its frames as one outbox chunk and ends the batch.
    fn spill(mut self, queued_gauge: &AtomicU64, awaiting: &mut Vec<Arc<Peer>>) {
        for batch in &mut self.modes {
            batch.hand_over(Membership::Leave, queued_gauge, awaiting);
        }
    }

    /// Hands every member its frames as one outbox chunk; the members stay, with the room
    /// their outboxes have left.
    fn hand_over(
        &mut self,
        queued_gauge: &AtomicU64,
        heartbeat_tick: u64,
        awaiting: &mut Vec<Arc<Peer>>,
    ) {
        let membership = Membership::Stay {
            limit: self.limit,
            heartbeat_tick,
        };
        self.published = false;
        self.room = usize::MAX;
        for batch in &mut self.modes {
            let room = batch.hand_over(membership, queued_gauge, awaiting);
            self.room = self.room.min(room);
        }
    }
}

impl Default for Batch {
    fn default() -> Batch {
        Batch {
            limit: 0,
            room: usize::MAX,
            utf8_subscribers: 0,
            direct: Vec::new(),
            modes: Default::default(),
            published: false,
        }
    }
}

impl ModeBatch {
    /// Queues the gathered frames in every member's outbox; returns the smallest room left.
    fn hand_over(
        &mut self,
        membership: Membership,
        queued_gauge: &AtomicU64,
        awaiting: &mut Vec<Arc<Peer>>,
    ) -> usize {
        // The next round of a busy topic gathers about as much again: start it at this
        // round's size rather than growing it from nothing.
        let run = (!self.bytes.is_empty()).then(|| {
            let (bytes_len, frame_count) = (self.bytes.len(), self.ends.len());
            // A quieter round than the last leaves room a slow member would hold unseen: its
            // queued bytes count the frames, not the buffer.
            if self.bytes.capacity() > 2 * bytes_len + 4096 {
                self.bytes.shrink_to_fit();
            }
            Arc::new(FrameRun {
                bytes: std::mem::replace(&mut self.bytes, presized(bytes_len)),
                ends: std::mem::replace(&mut self.ends, presized(frame_count)),
            })
        });
        let mut smallest_room = usize::MAX;
        for member in &mut self.members {
            let own_run = match (member.own.take(), &run) {
                (Some(own), Some(_)) => Some(Arc::new(own)),
                (_, run) => run.clone(),
            };
            match member.peer.take_batch_frames(own_run, membership) {
                Attach::Queued {
                    newly_awaiting,
                    room,
                } => {
                    smallest_room = smallest_room.min(room);
                    if newly_awaiting {
                        awaiting.push(Arc::clone(&member.peer));
                    }
                }
                Attach::Closed { bytes } => {
                    queued_gauge.fetch_sub(bytes as u64, Ordering::Relaxed);
                }
            }
        }
        self.with_own.clear();
        smallest_room
    }

    /// Counts a frame dropped for every member but the excepted one, in each member's own
    /// counters too; returns how many it dropped.
    fn count_dropped(&self, excepted: Option<usize>) -> u64 {
        let mut dropped = 0;
        for (at, member) in self.members.iter().enumerate() {
            if Some(at) != excepted {
                member.peer.count_dropped(1);
                dropped += 1;
            }
        }
        dropped
    }

    /// Gives `member` frames of its own, a copy of the batch's so far, unless it has them;
    /// false if the memory for the copy cannot be had.
    fn separate(&mut self, at: usize) -> bool {
        let member = &mut self.members[at];
        if member.own.is_some() {
            return true;
        }
        let mut own = FrameRun {
            bytes: Vec::new(),
            ends: Vec::new(),
        };
        // The batch's buffers were sized for a round like the last one: so are these when
        // the memory can be had, so that the frames still to come mostly need no regrowing.
        let copied = reserve_hoping(&mut own.bytes, self.bytes.capacity(), self.bytes.len())
            && reserve_hoping(&mut own.ends, self.ends.capacity(), self.ends.len());
        if !copied {
            return false;
        }
        own.bytes.extend_from_slice(&self.bytes);
        own.ends.extend_from_slice(&self.ends);
        member.own = Some(own);
        self.with_own.push(at);
        true
    }

    fn pending_for(&self, fd: RawFd) -> usize {
        if self.with_own.is_empty() {
            return self.bytes.len();
        }
        let Some(member) = self.members.iter().find(|member| member.fd == fd) else {
            return 0;
        };
        member
            .own
            .as_ref()
            .map_or(self.bytes.len(), |own| own.bytes.len())
    }
}

/// Makes room for one more frame of `len` bytes, or fails with nothing changed.
fn reserve_frame(bytes: &mut Vec<u8>, ends: &mut Vec<usize>, len: usize) -> bool {
    bytes.try_reserve(len).is_ok() && ends.try_reserve(1).is_ok()
}

/// Reserves room for `hoped` items in an empty buffer, or else for the `needed` ones; false,
/// with the buffer still empty, if not even those can be had.
fn reserve_hoping<T>(buffer: &mut Vec<T>, hoped: usize, needed: usize) -> bool {
    buffer.try_reserve_exact(hoped).is_ok() || buffer.try_reserve_exact(needed).is_ok()
}

/// An empty buffer with room for `capacity` items when the memory can be had: the room only
/// spares the next round regrowing it, so without the memory the buffer starts empty.
fn presized<T>(capacity: usize) -> Vec<T> {
    let mut buffer = Vec::new();
    // Failure leaves `buffer` empty, which is all this needs.
    let _ = buffer.try_reserve_exact(capacity);
    buffer
}
