//! A topic's history: the last messages published to it, each kept once however many readers
//! replay it, and the positions (`EventId`s) that let a reader resume after the last one it
//! saw.
//!
//! A position is an epoch and an offset. The epoch is drawn at random when a topic's history
//! starts, so a restarted process (or a topic whose history was turned off and on) is never
//! mistaken for the old one: an id from another epoch resumes nothing and says so. Offsets
//! count the topic's publishes from 1; offset 0 names the point before the first.
//!
//! A *shared* ring mirrors a history another party numbers: a Redis stream, whose ids
//! `<ms>-<seq>` are increasing but sparse. Its ids are given with each message, compared as
//! (ms, seq) pairs, and found by binary search; "nothing lost after an id" means the ring holds
//! every entry of the stream after it (see [`Ring::since`]). Both kinds also number what they
//! keep with a local, contiguous offset (for a local ring, the id's own offset): the position a
//! reader that fell behind keeps its cursor at (outbox.rs).
//!
//! The ring is generic over what a message keeps (the registry keeps the payload, framing it
//! per reader on replay), and takes the time as an argument, so that age limits are tested
//! without sleeping.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// Where a message sits in its topic's history; its text form, `<epoch>-<offset>` in decimal
/// (the shape of a Redis stream id), is what SSE frames carry in their `id:` line and what a
/// client sends back as `Last-Event-ID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    /// Random per topic per history life.
    pub epoch: u64,
    /// The message's number within its epoch, from 1; 0 is the point before the first.
    pub offset: u64,
}

/// The longest text form: two 20-digit numbers and the dash.
pub const MAX_EVENT_ID_LEN: usize = 41;

impl EventId {
    /// Parses the text form: two decimal numbers without sign, leading zero (but `0` itself)
    /// or spaces, joined by one `-`, each fitting 64 bits. Anything else is `None`, so that
    /// every id has exactly one spelling.
    pub fn parse(text: &[u8]) -> Option<EventId> {
        if text.len() > MAX_EVENT_ID_LEN {
            return None;
        }
        let dash = text.iter().position(|&byte| byte == b'-')?;
        Some(EventId {
            epoch: parse_decimal(&text[..dash])?,
            offset: parse_decimal(&text[dash + 1..])?,
        })
    }
}

impl EventId {
    /// The zero position `0-0`, before every stream entry.
    pub(crate) const ZERO: EventId = EventId {
        epoch: 0,
        offset: 0,
    };

    /// The position just before this one, in (epoch, offset) order (`0-0` stays).
    #[cfg_attr(not(any(test, feature = "redis")), allow(dead_code))]
    pub(crate) fn before(self) -> EventId {
        match (self.epoch, self.offset) {
            (0, 0) => self,
            (epoch, 0) => EventId {
                epoch: epoch - 1,
                offset: u64::MAX,
            },
            (epoch, offset) => EventId {
                epoch,
                offset: offset - 1,
            },
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.offset)
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    let canonical = match digits {
        [] => false,
        [b'0'] => true,
        [first, ..] => *first != b'0',
    };
    if !canonical || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &digit| {
        value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// How much history a topic keeps; a limit of 0 does not bound, and all three 0 turn history
/// off. The oldest messages go first when any bound is passed; the newest message is always
/// kept, even when it alone is over `max_bytes`, so a reader can resume from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Messages kept, at most.
    pub max_messages: usize,
    /// Bytes of kept messages, at most.
    pub max_bytes: usize,
    /// How long a message is kept, at most.
    pub max_age: Option<Duration>,
}

impl HistoryLimits {
    /// Whether these limits keep no history at all.
    pub fn is_off(&self) -> bool {
        self.max_messages == 0 && self.max_bytes == 0 && self.max_age.is_none()
    }
}

struct Kept<T> {
    /// The local position: contiguous, from 1.
    offset: u64,
    /// The id readers see: `(epoch, offset)` in a local ring, the stream's in a shared one.
    id: EventId,
    at: Instant,
    bytes: usize,
    message: T,
}

/// What a reader resuming after some id gets.
pub(crate) struct Replay<'a, T> {
    /// Whether the history still held every message after the id: same epoch, and nothing
    /// after it evicted (a shared ring: it holds every stream entry after the id). When
    /// false, `messages` is still every message kept.
    pub(crate) recovered: bool,
    /// Messages after the id that are no longer kept, when the epoch is the same (a foreign
    /// epoch's loss is unknown, and counted as 0; so is a shared ring's).
    // Read by the tests only until per-fd gap accounting reports it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) lost: u64,
    /// The local position of the first of `messages` (the others follow it contiguously).
    pub(crate) first_offset: u64,
    pub(crate) messages: Vec<(EventId, &'a T)>,
}

/// Whose ids a ring keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Its own: `(epoch, offset)`.
    Local,
    /// A stream's, given with each message.
    Shared {
        /// The ring holds every stream entry after `covers_from` up to its newest: it was
        /// filled from the stream and has followed it since.
        synced: bool,
        covers_from: EventId,
        /// The newest id it has seen (the fill's floor before its first message).
        last: EventId,
    },
}

/// One topic's history.
pub(crate) struct Ring<T> {
    limits: HistoryLimits,
    epoch: u64,
    last_offset: u64,
    kind: Kind,
    kept: VecDeque<Kept<T>>,
    kept_bytes: usize,
}

impl<T> Ring<T> {
    pub(crate) fn new(limits: HistoryLimits, epoch: u64) -> Ring<T> {
        Ring {
            limits,
            epoch,
            last_offset: 0,
            kind: Kind::Local,
            kept: VecDeque::new(),
            kept_bytes: 0,
        }
    }

    /// A ring mirroring a stream, not synced yet; `epoch` names its local positions.
    pub(crate) fn shared(limits: HistoryLimits, epoch: u64) -> Ring<T> {
        Ring {
            kind: Kind::Shared {
                synced: false,
                covers_from: EventId::ZERO,
                last: EventId::ZERO,
            },
            ..Ring::new(limits, epoch)
        }
    }

    /// Whether this ring mirrors a stream.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Shared { .. })
    }

    /// A shared ring that holds every stream entry from some point on (see `sync`).
    pub(crate) fn is_synced(&self) -> bool {
        matches!(self.kind, Kind::Shared { synced: true, .. })
    }

    /// The id the last message got (offset 0 before the first); a shared ring's newest id.
    pub(crate) fn last_id(&self) -> EventId {
        match self.kind {
            Kind::Local => self.id(self.last_offset),
            Kind::Shared { last, .. } => last,
        }
    }

    /// The local position of the newest message (0 before the first).
    pub(crate) fn last_offset(&self) -> u64 {
        self.last_offset
    }

    /// The id the next message pushed will get (a local ring).
    pub(crate) fn next_id(&self) -> EventId {
        self.id(self.last_offset + 1)
    }

    /// Applies new limits (not all 0) and evicts what they no longer allow.
    pub(crate) fn set_limits(&mut self, limits: HistoryLimits, now: Instant) {
        self.limits = limits;
        self.evict(now);
    }

    // Read by the tests only until per-fd stats report it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.kept_bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.kept.len()
    }

    /// Keeps `message`, which costs `bytes`, and returns its id; evicts what the limits no
    /// longer allow (a local ring).
    pub(crate) fn push(&mut self, message: T, bytes: usize, now: Instant) -> EventId {
        let id = self.next_id();
        self.keep(id, message, bytes, now);
        id
    }

    /// Keeps `message` under the stream's `id` (a shared ring) and returns its local
    /// position; `None`, keeping nothing, when `id` is not after the newest id seen: a
    /// message seen already (its echo, or one a fill brought too).
    pub(crate) fn push_shared(
        &mut self,
        id: EventId,
        message: T,
        bytes: usize,
        now: Instant,
    ) -> Option<u64> {
        let Kind::Shared { last, .. } = &mut self.kind else {
            return None;
        };
        if id <= *last {
            return None;
        }
        *last = id;
        self.keep(id, message, bytes, now);
        Some(self.last_offset)
    }

    /// Whether a shared ring would keep a message with `id` (see [`Ring::push_shared`]).
    pub(crate) fn is_new(&self, id: EventId) -> bool {
        match self.kind {
            Kind::Local => true,
            Kind::Shared { last, .. } => id > last,
        }
    }

    fn keep(&mut self, id: EventId, message: T, bytes: usize, now: Instant) {
        self.last_offset += 1;
        self.kept.push_back(Kept {
            offset: self.last_offset,
            id,
            at: now,
            bytes,
            message,
        });
        self.kept_bytes += bytes;
        self.evict(now);
    }

    /// A shared ring starts mirroring the stream afresh: it drops what it keeps (readers
    /// behind on it find a gap) and holds, from now on, every entry after `covers_from`;
    /// the fill's entries follow, oldest first, through [`Ring::push_shared`].
    pub(crate) fn sync(&mut self, covers_from: EventId) {
        if !self.is_shared() {
            return;
        }
        self.kept.clear();
        self.kept_bytes = 0;
        self.kind = Kind::Shared {
            synced: true,
            covers_from,
            last: covers_from,
        };
    }

    /// A shared ring no longer follows the stream (its channel was unsubscribed).
    pub(crate) fn unsync(&mut self) {
        if let Kind::Shared { synced, .. } = &mut self.kind {
            *synced = false;
        }
    }

    /// The stream's entries up to `id` may not all be here (some were trimmed before this
    /// ring could fetch them): resuming from before `id` is no longer a recovery.
    pub(crate) fn hole_until(&mut self, id: EventId) {
        if let Kind::Shared { covers_from, .. } = &mut self.kind {
            *covers_from = (*covers_from).max(id);
        }
    }

    /// Evicts what is older than the age limit at `now`, and what is over the other limits.
    pub(crate) fn evict(&mut self, now: Instant) {
        let HistoryLimits {
            max_messages,
            max_bytes,
            max_age,
        } = self.limits;
        let mut evicted = None;
        while self.kept.len() > 1 {
            let oldest = &self.kept[0];
            let over = (max_messages != 0 && self.kept.len() > max_messages)
                || (max_bytes != 0 && self.kept_bytes > max_bytes)
                || max_age.is_some_and(|age| now.saturating_duration_since(oldest.at) > age);
            if !over {
                break;
            }
            self.kept_bytes -= oldest.bytes;
            evicted = self.kept.pop_front().map(|kept| kept.id);
        }
        // The newest stays through its size, not through its age.
        if let (Some(age), Some(last)) = (max_age, self.kept.back())
            && now.saturating_duration_since(last.at) > age
        {
            self.kept_bytes -= last.bytes;
            evicted = self.kept.pop_back().map(|kept| kept.id);
        }
        if let Some(id) = evicted {
            self.hole_until(id);
        }
    }

    /// Every kept message after `last` (see [`Replay`]).
    pub(crate) fn since(&self, last: EventId) -> Replay<'_, T> {
        if let Kind::Shared {
            synced,
            covers_from,
            last: newest,
        } = self.kind
        {
            let start = self.kept.partition_point(|kept| kept.id <= last);
            let recovered = synced && covers_from <= last && last <= newest;
            if !recovered {
                return self.replay_from(0, false);
            }
            return self.replay_from(start, true);
        }
        let oldest = self.oldest_offset();
        let ours = last.epoch == self.epoch && last.offset <= self.last_offset;
        if !ours {
            return self.replay_from(0, false);
        }
        let lost = oldest.saturating_sub(last.offset + 1);
        let start = (last.offset + 1).saturating_sub(oldest);
        Replay {
            lost,
            ..self.replay_from(usize::try_from(start).unwrap_or(usize::MAX), lost == 0)
        }
    }

    fn replay_from(&self, start: usize, recovered: bool) -> Replay<'_, T> {
        let start = start.min(self.kept.len());
        Replay {
            recovered,
            lost: 0,
            first_offset: self.oldest_offset() + start as u64,
            messages: self
                .kept
                .iter()
                .skip(start)
                .map(|kept| (kept.id, &kept.message))
                .collect(),
        }
    }

    /// The epoch of this history's local positions.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The local position of the oldest kept message; the next one when nothing is kept.
    pub(crate) fn oldest_offset(&self) -> u64 {
        self.kept
            .front()
            .map_or(self.last_offset + 1, |kept| kept.offset)
    }

    /// The kept messages from local position `offset` on, oldest first, with their positions
    /// and ids, without copying them out: a reader catching up walks them one outbox at a
    /// time.
    pub(crate) fn kept_from(&self, offset: u64) -> impl Iterator<Item = (u64, EventId, &T)> {
        let start = offset.saturating_sub(self.oldest_offset());
        self.kept
            .iter()
            .skip(usize::try_from(start).unwrap_or(usize::MAX))
            .map(|kept| (kept.offset, kept.id, &kept.message))
    }

    /// The last `n` kept messages, oldest first.
    #[cfg(test)]
    pub(crate) fn tail(&self, n: usize) -> Vec<(EventId, &T)> {
        self.tail_replay(n).messages
    }

    /// The last `n` kept messages as a [`Replay`] (recovered).
    pub(crate) fn tail_replay(&self, n: usize) -> Replay<'_, T> {
        self.replay_from(self.kept.len().saturating_sub(n), true)
    }

    fn id(&self, offset: u64) -> EventId {
        EventId {
            epoch: self.epoch,
            offset,
        }
    }
}

/// A fresh epoch. `RandomState` draws its keys from the operating system's random source
/// (once per thread) and changes them for every instance, so hashing nothing with a new one
/// gives an unpredictable number without any `unsafe` here.
pub(crate) fn random_epoch() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(max_messages: usize, max_bytes: usize) -> Ring<u32> {
        Ring::new(
            HistoryLimits {
                max_messages,
                max_bytes,
                max_age: None,
            },
            7,
        )
    }

    fn offsets(messages: &[(EventId, &u32)]) -> Vec<u64> {
        messages.iter().map(|(id, _)| id.offset).collect()
    }

    #[test]
    fn ids_have_one_spelling() {
        let id = EventId {
            epoch: u64::MAX,
            offset: 0,
        };
        assert_eq!(id.to_string(), "18446744073709551615-0");
        assert_eq!(EventId::parse(id.to_string().as_bytes()), Some(id));
        assert_eq!(
            EventId::parse(b"12-3"),
            Some(EventId {
                epoch: 12,
                offset: 3
            })
        );
        for bad in [
            &b""[..],
            b"-",
            b"12",
            b"12-",
            b"-3",
            b"012-3",
            b"12-03",
            b"+12-3",
            b"12--3",
            b"12-3-4",
            b" 12-3",
            b"12-3 ",
            b"18446744073709551616-0",
            b"1\xff-2",
        ] {
            assert_eq!(
                EventId::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn epochs_are_drawn_fresh() {
        let drawn: std::collections::HashSet<u64> = (0..64).map(|_| random_epoch()).collect();
        assert_eq!(drawn.len(), 64);
    }

    #[test]
    fn offsets_count_from_one_and_the_bounds_evict_the_oldest() {
        let now = Instant::now();
        let mut by_count = ring(3, 0);
        for n in 1..=5 {
            assert_eq!(by_count.push(n, 1, now).offset, u64::from(n));
        }
        assert_eq!(offsets(&by_count.tail(10)), [3, 4, 5]);

        let mut by_bytes = ring(0, 10);
        for n in 1..=4 {
            by_bytes.push(n, 4, now);
        }
        assert_eq!((by_bytes.len(), by_bytes.kept_bytes()), (2, 8));
        by_bytes.push(5, 100, now);
        assert_eq!(offsets(&by_bytes.tail(10)), [5], "the newest stays, alone");
    }

    #[test]
    fn age_evicts_everything_older_the_newest_included() {
        let start = Instant::now();
        let mut ring = Ring::new(
            HistoryLimits {
                max_age: Some(Duration::from_secs(10)),
                ..HistoryLimits::default()
            },
            7,
        );
        ring.push(1, 1, start);
        ring.push(2, 1, start + Duration::from_secs(5));
        ring.evict(start + Duration::from_secs(11));
        assert_eq!(offsets(&ring.tail(10)), [2]);
        ring.evict(start + Duration::from_secs(16));
        assert_eq!((ring.len(), ring.kept_bytes()), (0, 0));
        assert_eq!(
            ring.last_id().offset,
            2,
            "offsets go on after the ring empties"
        );
        let replay = ring.since(EventId {
            epoch: 7,
            offset: 1,
        });
        assert_eq!((replay.recovered, replay.lost), (false, 1));
    }

    #[test]
    fn resuming_replays_what_follows_and_says_whether_anything_was_lost() {
        let now = Instant::now();
        let mut ring = ring(3, 0);
        let at = |offset| EventId { epoch: 7, offset };
        let replay = ring.since(at(0));
        assert!(replay.recovered && replay.messages.is_empty());
        for n in 1..=5 {
            ring.push(n, 1, now);
        }
        // Kept: 3, 4, 5.
        for (last, recovered, lost, want) in [
            (5, true, 0, &[][..]),
            (4, true, 0, &[5][..]),
            (2, true, 0, &[3, 4, 5][..]),
            (1, false, 1, &[3, 4, 5][..]),
            (0, false, 2, &[3, 4, 5][..]),
        ] {
            let replay = ring.since(at(last));
            assert_eq!(
                (replay.recovered, replay.lost, offsets(&replay.messages)),
                (recovered, lost, want.to_vec()),
                "after {last}"
            );
        }
        for foreign in [
            EventId {
                epoch: 8,
                offset: 4,
            },
            at(6),
        ] {
            let replay = ring.since(foreign);
            assert_eq!(
                (replay.recovered, replay.lost, offsets(&replay.messages)),
                (false, 0, vec![3, 4, 5]),
                "{foreign}"
            );
        }
        assert_eq!(offsets(&ring.tail(2)), [4, 5]);
        assert_eq!(*ring.tail(1)[0].1, 5);
    }

    fn stream(ms: u64, seq: u64) -> EventId {
        EventId {
            epoch: ms,
            offset: seq,
        }
    }

    fn ids(messages: &[(EventId, &u32)]) -> Vec<EventId> {
        messages.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn stream_ids_order_as_pairs_and_step_back_across_milliseconds() {
        assert!(stream(5, 0) > stream(4, 99));
        assert!(stream(5, 10) > stream(5, 9));
        assert_eq!(stream(5, 0).before(), stream(4, u64::MAX));
        assert_eq!(stream(5, 3).before(), stream(5, 2));
        assert_eq!(EventId::ZERO.before(), EventId::ZERO);
    }

    #[test]
    fn a_shared_ring_keeps_sparse_increasing_ids_once() {
        let now = Instant::now();
        let mut ring: Ring<u32> = Ring::shared(
            HistoryLimits {
                max_messages: 3,
                ..HistoryLimits::default()
            },
            7,
        );
        assert!(!ring.is_synced());
        ring.sync(stream(10, 0));
        assert!(ring.is_synced());
        assert_eq!(ring.push_shared(stream(12, 0), 1, 1, now), Some(1));
        assert_eq!(ring.push_shared(stream(12, 0), 1, 1, now), None, "seen");
        assert_eq!(ring.push_shared(stream(11, 5), 0, 1, now), None, "older");
        assert_eq!(ring.push_shared(stream(12, 4), 2, 1, now), Some(2));
        assert_eq!(ring.push_shared(stream(20, 0), 3, 1, now), Some(3));
        assert_eq!(ring.last_id(), stream(20, 0));
        assert_eq!(ring.last_offset(), 3);

        // Everything after 10-0 is kept: any id from there on recovers.
        for (last, want) in [
            (
                stream(10, 0),
                vec![stream(12, 0), stream(12, 4), stream(20, 0)],
            ),
            (stream(12, 0), vec![stream(12, 4), stream(20, 0)]),
            (stream(12, 2), vec![stream(12, 4), stream(20, 0)]),
            (stream(20, 0), vec![]),
        ] {
            let replay = ring.since(last);
            assert!(replay.recovered, "{last}");
            assert_eq!(ids(&replay.messages), want, "{last}");
            assert_eq!(replay.first_offset, 4 - want.len() as u64, "{last}");
        }
        // Before the fill's floor, or after the newest seen: not recovered, all kept.
        for last in [stream(9, 0), stream(21, 0)] {
            let replay = ring.since(last);
            assert!(!replay.recovered, "{last}");
            assert_eq!((replay.messages.len(), replay.first_offset), (3, 1));
        }

        // Evicting 12-0 moves the floor to it.
        ring.push_shared(stream(21, 0), 4, 1, now);
        assert_eq!(
            ids(&ring.tail(10)),
            [stream(12, 4), stream(20, 0), stream(21, 0)]
        );
        assert!(!ring.since(stream(11, 0)).recovered);
        assert!(ring.since(stream(12, 0)).recovered);
        let positions: Vec<u64> = ring.kept_from(3).map(|(offset, _, _)| offset).collect();
        assert_eq!(positions, [3, 4]);

        // A hole (entries trimmed before a reconnect could fetch them).
        ring.hole_until(stream(20, 5));
        assert!(!ring.since(stream(20, 0)).recovered);
        assert!(ring.since(stream(20, 5)).recovered);

        // Unsynced, nothing recovers; a new sync starts afresh, positions going on.
        ring.unsync();
        assert!(!ring.since(stream(21, 0)).recovered);
        ring.sync(stream(30, 0));
        assert_eq!(ring.len(), 0);
        assert_eq!(ring.push_shared(stream(30, 1), 5, 1, now), Some(5));
        assert!(ring.since(stream(30, 0)).recovered);
    }

    #[test]
    fn a_local_ring_refuses_shared_pushes() {
        let mut local = ring(3, 0);
        assert_eq!(local.push_shared(stream(1, 1), 1, 1, Instant::now()), None);
        local.sync(stream(1, 0));
        assert!(!local.is_synced() && !local.is_shared());
    }
}
