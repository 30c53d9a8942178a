//! A topic's history: the last messages published to it, each kept once however many readers
//! replay it, and the positions (`EventId`s) that let a reader resume after the last one it
//! saw.
//!
//! A position is an epoch and an offset. The epoch is drawn at random when a topic's history
//! starts, so a restarted process (or a topic whose history was turned off and on) is never
//! mistaken for the old one: an id from another epoch resumes nothing and says so. Offsets
//! count the topic's publishes from 1; offset 0 names the point before the first.
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    offset: u64,
    at: Instant,
    bytes: usize,
    message: T,
}

/// What a reader resuming after some id gets.
pub(crate) struct Replay<'a, T> {
    /// Whether the history still held every message after the id: same epoch, and nothing
    /// after it evicted. When false, `messages` is still every message kept.
    pub(crate) recovered: bool,
    /// Messages after the id that are no longer kept, when the epoch is the same (a foreign
    /// epoch's loss is unknown, and counted as 0).
    // Read by the tests only until per-fd gap accounting reports it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) lost: u64,
    pub(crate) messages: Vec<(EventId, &'a T)>,
}

/// One topic's history.
pub(crate) struct Ring<T> {
    limits: HistoryLimits,
    epoch: u64,
    last_offset: u64,
    kept: VecDeque<Kept<T>>,
    kept_bytes: usize,
}

impl<T> Ring<T> {
    pub(crate) fn new(limits: HistoryLimits, epoch: u64) -> Ring<T> {
        Ring {
            limits,
            epoch,
            last_offset: 0,
            kept: VecDeque::new(),
            kept_bytes: 0,
        }
    }

    /// The id the last message got (offset 0 before the first).
    pub(crate) fn last_id(&self) -> EventId {
        self.id(self.last_offset)
    }

    /// The id the next message pushed will get.
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
    /// longer allow.
    pub(crate) fn push(&mut self, message: T, bytes: usize, now: Instant) -> EventId {
        self.last_offset += 1;
        self.kept.push_back(Kept {
            offset: self.last_offset,
            at: now,
            bytes,
            message,
        });
        self.kept_bytes += bytes;
        self.evict(now);
        self.last_id()
    }

    /// Evicts what is older than the age limit at `now`, and what is over the other limits.
    pub(crate) fn evict(&mut self, now: Instant) {
        let HistoryLimits {
            max_messages,
            max_bytes,
            max_age,
        } = self.limits;
        while self.kept.len() > 1 {
            let oldest = &self.kept[0];
            let over = (max_messages != 0 && self.kept.len() > max_messages)
                || (max_bytes != 0 && self.kept_bytes > max_bytes)
                || max_age.is_some_and(|age| now.saturating_duration_since(oldest.at) > age);
            if !over {
                break;
            }
            self.kept_bytes -= oldest.bytes;
            self.kept.pop_front();
        }
        // The newest stays through its size, not through its age.
        if let (Some(age), Some(last)) = (max_age, self.kept.back())
            && now.saturating_duration_since(last.at) > age
        {
            self.kept_bytes -= last.bytes;
            self.kept.pop_back();
        }
    }

    /// Every kept message after `last` (see [`Replay`]).
    pub(crate) fn since(&self, last: EventId) -> Replay<'_, T> {
        let oldest = self
            .kept
            .front()
            .map_or(self.last_offset + 1, |kept| kept.offset);
        let ours = last.epoch == self.epoch && last.offset <= self.last_offset;
        if !ours {
            return Replay {
                recovered: false,
                lost: 0,
                messages: self.messages_from(0),
            };
        }
        let lost = oldest.saturating_sub(last.offset + 1);
        Replay {
            recovered: lost == 0,
            lost,
            messages: self.messages_from(last.offset + 1),
        }
    }

    /// The epoch of this history's ids.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The offset of the oldest kept message; the next offset when nothing is kept.
    pub(crate) fn oldest_offset(&self) -> u64 {
        self.kept
            .front()
            .map_or(self.last_offset + 1, |kept| kept.offset)
    }

    /// The kept messages from `offset` on, oldest first, without copying them out: a reader
    /// catching up walks them one outbox at a time.
    pub(crate) fn kept_from(&self, offset: u64) -> impl Iterator<Item = (EventId, &T)> {
        let start = offset.saturating_sub(self.oldest_offset());
        self.kept
            .iter()
            .skip(usize::try_from(start).unwrap_or(usize::MAX))
            .map(|kept| (self.id(kept.offset), &kept.message))
    }

    /// The last `n` kept messages, oldest first.
    pub(crate) fn tail(&self, n: usize) -> Vec<(EventId, &T)> {
        let skip = self.kept.len().saturating_sub(n);
        self.kept
            .iter()
            .skip(skip)
            .map(|kept| (self.id(kept.offset), &kept.message))
            .collect()
    }

    fn messages_from(&self, offset: u64) -> Vec<(EventId, &T)> {
        let start = self
            .kept
            .front()
            .map_or(0, |kept| offset.saturating_sub(kept.offset));
        self.kept
            .iter()
            .skip(usize::try_from(start).unwrap_or(usize::MAX))
            .map(|kept| (self.id(kept.offset), &kept.message))
            .collect()
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
}
