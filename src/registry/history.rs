//! Per-topic history and resume: the registry's side of history.rs. With history on, every
//! publish to a topic keeps its payload once in the topic's ring and gets an id there; a
//! reader that subscribes with [`Registry::subscribe_since`] or [`Registry::subscribe_tail`]
//! gets the kept messages it asks for before any live one.
//!
//! No gap and no duplicate between replay and live: a publish holds its topic's ring lock
//! from the choice of its id through its fan-out, and a resume holds it from its subscribe
//! through its replay, so each message is either already in the ring when the reader
//! subscribes (replayed) or published after (live), never both or neither.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::Mutex;

use super::publish::Outcomes;
use super::{Registry, check_topic};
use crate::error::Error;
use crate::frame::{Frame, Mode, ReplayEncoder};
use crate::history::{EventId, HistoryLimits, Ring, random_epoch};
use crate::index::SubscriptionId;
use crate::outbox::{InHistory, Peer, WritePolicy};

/// A topic's kept payloads, each shared by every replay of it.
pub(super) type TopicRing = Ring<Arc<[u8]>>;

/// Replayed frames queued before they are written out (IOV_MAX is 1024 on Linux).
const REPLAY_WRITE_FRAMES: usize = 256;

/// Below this many topics, no sweep for topics whose ring emptied by age.
const MIN_SWEEP_TOPICS: usize = 64;

/// Every topic's history. Locked only to find (or make) a topic's ring, to sweep, and to
/// change the limits; a ring's own lock is taken after it, never before.
#[derive(Default)]
pub(super) struct Histories {
    limits: HistoryLimits,
    topics: HashMap<Box<[u8]>, Arc<Mutex<TopicRing>>>,
    /// The topic count at which the next sweep runs.
    sweep_at: usize,
}

impl Histories {
    /// Drops the topics whose ring is empty once aged messages go, unless a publish or a
    /// resume holds it; runs when the topic count has doubled since the last sweep, so it
    /// costs O(1) per new topic.
    fn sweep(&mut self, now: Instant) {
        self.topics.retain(|_, ring| {
            if Arc::strong_count(ring) > 1 {
                return true;
            }
            let Some(mut ring) = ring.try_lock() else {
                return true;
            };
            ring.evict(now);
            // A synced mirror stays even empty: its topic's fill is not asked for again.
            ring.len() > 0 || ring.is_synced()
        });
        self.sweep_at = (self.topics.len() * 2).max(MIN_SWEEP_TOPICS);
    }
}

/// Which kept messages a resuming reader gets.
#[derive(Clone, Copy)]
enum Resume {
    /// Every kept message after this id.
    Since(EventId),
    /// The last n kept messages.
    Tail(usize),
}

impl Registry {
    /// Sets how much history every topic keeps (see [`HistoryLimits`]); all limits 0 turn
    /// history off and drop every kept message. Topics that keep history give each publish
    /// an id, put it in their SSE frames (`id: <epoch>-<offset>` before the `data:` lines),
    /// and let readers resume with [`Registry::subscribe_since`]. Changing the limits keeps
    /// each topic's epoch and applies the new limits to what it keeps.
    ///
    /// With a Redis broker enabled, history is shared across processes through Redis
    /// streams; with a NATS broker whose server runs JetStream, through one JetStream stream
    /// (registry/shared.rs): ids are the streams'. Switching history on or off then starts
    /// the broker's session anew.
    pub fn set_history(&self, limits: HistoryLimits) {
        let switched = {
            let mut histories = self.histories.write();
            histories.limits = limits;
            let switched = self.broker.set_history(limits);
            if limits.is_off() {
                histories.topics.clear();
                histories.sweep_at = 0;
                self.history_on.store(false, Ordering::Relaxed);
            } else {
                let now = Instant::now();
                for ring in histories.topics.values() {
                    ring.lock().set_limits(limits, now);
                }
                self.history_on.store(true, Ordering::Relaxed);
            }
            switched
        };
        self.history_set(switched);
    }

    /// Drops every topic's history (kept on, with the same limits): the next message of a
    /// topic starts a history of the kind the broker now calls for.
    pub(super) fn restart_histories(&self) {
        let mut histories = self.histories.write();
        histories.topics.clear();
        histories.sweep_at = 0;
    }

    /// Gives `topic` the ring `ring` (tests: a mirror without a broker).
    #[cfg(test)]
    pub(super) fn insert_history(&self, topic: &[u8], ring: TopicRing) {
        self.histories
            .write()
            .topics
            .insert(Box::from(topic), Arc::new(Mutex::new(ring)));
    }

    /// The ring of `topic` if it has one (none when history is off).
    pub(super) fn existing_history(&self, topic: &[u8]) -> Option<Arc<Mutex<TopicRing>>> {
        self.histories.read().topics.get(topic).cloned()
    }

    /// The ring of `topic`, made (with a fresh epoch) if it has none; `None` when history is
    /// off.
    pub(super) fn topic_history(&self, topic: &[u8]) -> Option<Arc<Mutex<TopicRing>>> {
        {
            // Publishers of different topics meet only here, and only to read.
            let histories = self.histories.read();
            if histories.limits.is_off() {
                return None;
            }
            if let Some(ring) = histories.topics.get(topic) {
                return Some(Arc::clone(ring));
            }
        }
        let mut histories = self.histories.write();
        if histories.limits.is_off() {
            return None;
        }
        if let Some(ring) = histories.topics.get(topic) {
            return Some(Arc::clone(ring));
        }
        if histories.topics.len() >= histories.sweep_at {
            histories.sweep(Instant::now());
        }
        let ring = if self.shares_history() {
            Ring::shared(histories.limits, random_epoch())
        } else {
            Ring::new(histories.limits, random_epoch())
        };
        let ring = Arc::new(Mutex::new(ring));
        histories.topics.insert(Box::from(topic), Arc::clone(&ring));
        Some(ring)
    }

    /// Subscribes `fd` to `topic` and queues for it, before any live message, every kept
    /// message after `last` (in order, SSE frames with their ids). Returns the subscription
    /// and whether the history still held every message after `last` (same epoch, none
    /// evicted); when it did not, every kept message is replayed. With history off, nothing
    /// is replayed and the answer is false.
    ///
    /// Replayed frames go through the outbox like live ones: those that do not fit the
    /// outbox limit meet the overflow policy. A kept payload that is not UTF-8 is skipped for
    /// a mode that needs UTF-8. Subscribing a (topic, fd) pair that already subscribes
    /// replays all the same.
    ///
    /// Under shared history, a topic's mirror not filled from its stream yet is filled
    /// first: this waits for it (driving the broker, no lock held, up to 5 s); `recovered`
    /// then says whether the mirror holds every stream entry after `last`.
    pub fn subscribe_since(
        &self,
        topic: &[u8],
        fd: RawFd,
        mode: Mode,
        last: EventId,
    ) -> Result<(SubscriptionId, bool), Error> {
        self.subscribe_replaying(topic, fd, mode, Resume::Since(last))
    }

    /// Subscribes `fd` to `topic` and queues for it the last `n` kept messages, before any
    /// live one (`tail -n N -f`), as [`Registry::subscribe_since`] does.
    pub fn subscribe_tail(
        &self,
        topic: &[u8],
        fd: RawFd,
        mode: Mode,
        n: usize,
    ) -> Result<SubscriptionId, Error> {
        self.subscribe_replaying(topic, fd, mode, Resume::Tail(n))
            .map(|(id, _)| id)
    }

    /// Queues `messages` for `peer` as a corked publish would, and, unless the registry is
    /// corked (then the host's flush writes them, as it does live frames), writes them out
    /// every [`REPLAY_WRITE_FRAMES`] frames or half an outbox limit: a few `writev`s instead
    /// of a `send` per frame, while the outbox limit still meets about what immediate writes
    /// would have left queued.
    /// A replayed frame that does not fit leaves the fd behind on the topic, as a live one
    /// does: the rest comes from the history as the outbox drains.
    fn replay<'a>(
        &self,
        peer: &Arc<Peer>,
        (topic, mode): (&[u8], Mode),
        (epoch, oldest_kept): (u64, u64),
        messages: impl Iterator<Item = (u64, EventId, &'a Arc<[u8]>)>,
        outcomes: &mut Outcomes,
    ) {
        let policy = self.write_policy();
        let queue_only = WritePolicy {
            corked: true,
            ..policy
        };
        let write_at = (policy.outbox_limit / 2).max(1);
        let (mut frames, mut bytes) = (0, 0);
        let mut encoder = ReplayEncoder::new(mode);
        for (offset, id, payload) in messages {
            let frame = encoder.encode(payload, id);
            bytes += frame.as_ref().map_or(0, Frame::len);
            frames += 1;
            let at = InHistory {
                topic,
                id: EventId { epoch, offset },
                oldest_kept,
            };
            outcomes.deliver(peer, frame.as_ref(), |frame| {
                self.deliver(peer, frame, Some(at), queue_only)
            });
            if !policy.corked && (frames == REPLAY_WRITE_FRAMES || bytes >= write_at) {
                (frames, bytes) = (0, 0);
                let written = peer.flush(policy.check_identity, &self.reactor);
                if !outcomes.record_write(peer, written) {
                    return;
                }
            }
        }
        if !policy.corked {
            let written = peer.flush(policy.check_identity, &self.reactor);
            outcomes.record_write(peer, written);
        }
    }

    fn subscribe_replaying(
        &self,
        topic: &[u8],
        fd: RawFd,
        mode: Mode,
        resume: Resume,
    ) -> Result<(SubscriptionId, bool), Error> {
        check_topic(topic)?;
        let Some(ring) = self.topic_history(topic) else {
            return Ok((self.subscribe(topic, fd, mode)?, false));
        };
        let shared = ring.lock().is_shared();
        let asked = shared && {
            let last = match resume {
                Resume::Since(last) => Some(last),
                Resume::Tail(_) => None,
            };
            self.await_mirror(topic, &ring, last)
        };
        let mut ring = ring.lock();
        let subscribed = self.subscribe(topic, fd, mode);
        if asked {
            // Subscribed, the fd keeps the channel; refused, nothing does. The ring's lock is
            // held (ring, then index), so a message cannot slip between subscribe and replay.
            self.release_mirror(topic);
        }
        let subscription = subscribed?;
        ring.evict(Instant::now());
        let replay = match resume {
            Resume::Since(last) => ring.since(last),
            Resume::Tail(n) => ring.tail_replay(n),
        };
        let recovered = replay.recovered;
        let peer = self.index.read().peer(fd).cloned();
        let mut outcomes = Outcomes::default();
        if let Some(peer) = peer {
            let replayable = (replay.first_offset..)
                .zip(replay.messages)
                .map(|(offset, (id, payload))| (offset, id, payload))
                .filter(|(_, _, payload)| {
                    !mode.requires_utf8() || std::str::from_utf8(payload).is_ok()
                });
            let positions = (ring.epoch(), ring.oldest_offset());
            self.replay(&peer, (topic, mode), positions, replayable, &mut outcomes);
        }
        drop(ring);
        self.settle(topic, outcomes);
        Ok((subscription, recovered))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn topics_whose_messages_aged_out_are_dropped_when_the_topic_count_doubles() {
        let registry = Registry::new().unwrap();
        registry.set_history(HistoryLimits {
            max_age: Some(Duration::from_millis(1)),
            ..HistoryLimits::default()
        });
        for n in 0..MIN_SWEEP_TOPICS {
            registry
                .publish(format!("old{n}").as_bytes(), b"x")
                .unwrap();
        }
        let held = registry.topic_history(b"old0").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        registry.publish(b"new", b"x").unwrap();
        let histories = registry.histories.read();
        let mut kept: Vec<&[u8]> = histories.topics.keys().map(|topic| &topic[..]).collect();
        kept.sort();
        // The one a caller still holds stays, whatever it keeps.
        assert_eq!(kept, [&b"new"[..], b"old0"]);
        drop(histories);
        drop(held);
    }

    #[test]
    fn turning_history_off_forgets_every_topic() {
        let registry = Registry::new().unwrap();
        registry.set_history(HistoryLimits {
            max_messages: 4,
            ..HistoryLimits::default()
        });
        registry.publish(b"a", b"x").unwrap();
        assert!(registry.history_on.load(Ordering::Relaxed));
        registry.set_history(HistoryLimits::default());
        assert!(registry.histories.read().topics.is_empty());
        assert!(registry.topic_history(b"a").is_none());
        assert!(!registry.history_on.load(Ordering::Relaxed));
    }
}
