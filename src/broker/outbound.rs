//! What the registry hands a broker: publishes to forward and changes of interest, queued
//! under a short lock by any thread and taken in bulk by whichever thread drives the engine.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Publishes waiting for the engine, at most; beyond, they are dropped and counted (the local
/// delivery still happens).
pub(crate) const MAX_QUEUED_PUBLISHES: usize = 65_536;
/// Bytes of publishes waiting for the engine, at most (topics and payloads, and the records'
/// headers or the commands' syntax).
pub(crate) const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Writes a publish as the engine's command, once, when it is queued: the engine then writes
/// the queue's bytes to its socket as they are (NATS's `PUB`), instead of copying each publish
/// again into a command of its own.
pub(crate) trait Encode: Send {
    /// Appends the command that publishes `payload` on `topic` to `out`.
    fn encode(&mut self, topic: &[u8], payload: &[u8], out: &mut Vec<u8>);
    /// Appends the command that publishes `payload` on `topic` with its history shared (see
    /// [`Outbound::push_shared_publish`]), its local delivery skipping `except`.
    fn encode_shared(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
        out: &mut Vec<u8>,
    );
    /// A change of interest is queued, after every publish encoded so far and before the
    /// next: an engine that must tell its publishes made before a subscription from those
    /// made after (NATS under shared history) notes the point here.
    fn interest(&mut self, _topic: &[u8], _subscribe: bool) {}
}

/// Publishes in order, in one buffer, in one of two forms: records (per publish the topic's
/// and the payload's length, u32 native order, then their bytes), or the engine's commands
/// written by its [`Encode`]. One allocation however many publishes.
#[derive(Default)]
pub(crate) struct Publishes {
    bytes: Vec<u8>,
    count: usize,
    /// `bytes` holds commands, not records.
    encoded: bool,
    /// The longest payload among them.
    largest_payload: usize,
}

const HEADER: usize = 8;

impl Publishes {
    pub(crate) fn push(&mut self, topic: &[u8], payload: &[u8]) {
        debug_assert!(!self.encoded, "records and commands are never mixed");
        self.bytes.reserve(HEADER + topic.len() + payload.len());
        self.bytes
            .extend_from_slice(&(topic.len() as u32).to_ne_bytes());
        self.bytes
            .extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        self.bytes.extend_from_slice(topic);
        self.bytes.extend_from_slice(payload);
        self.count += 1;
        self.largest_payload = self.largest_payload.max(payload.len());
    }

    /// Queues a shared publish as a record with an empty topic (no topic is empty) whose
    /// payload [`super::split_shared_record`] reads.
    pub(crate) fn push_shared(&mut self, topic: &[u8], payload: &[u8], except: Option<RawFd>) {
        debug_assert!(!self.encoded, "records and commands are never mixed");
        let record_len = super::shared_record_len(topic, payload);
        self.bytes.reserve(HEADER + record_len);
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(record_len as u32).to_ne_bytes());
        super::write_shared_record(&mut self.bytes, topic, payload, except);
        self.count += 1;
        self.largest_payload = self.largest_payload.max(record_len);
    }

    /// Queues a publish as `encoder` writes its command.
    pub(crate) fn push_encoded(&mut self, topic: &[u8], payload: &[u8], encoder: &mut dyn Encode) {
        debug_assert!(
            self.encoded || self.is_empty(),
            "records and commands are never mixed"
        );
        self.encoded = true;
        encoder.encode(topic, payload, &mut self.bytes);
        self.count += 1;
        self.largest_payload = self.largest_payload.max(payload.len());
    }

    /// Queues a shared publish as `encoder` writes its command.
    fn push_shared_encoded(
        &mut self,
        (topic, payload, except): (&[u8], &[u8], Option<RawFd>),
        encoder: &mut dyn Encode,
    ) {
        debug_assert!(
            self.encoded || self.is_empty(),
            "records and commands are never mixed"
        );
        self.encoded = true;
        encoder.encode_shared(topic, payload, except, &mut self.bytes);
        self.count += 1;
        self.largest_payload = self.largest_payload.max(payload.len());
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(crate) fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the publishes are the engine's commands (see [`Encode`]) rather than records.
    #[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
    pub(crate) fn is_encoded(&self) -> bool {
        self.encoded
    }

    /// The longest payload queued.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn largest_payload(&self) -> usize {
        self.largest_payload
    }

    /// The commands, in order (encoded publishes only).
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn commands(&self) -> &[u8] {
        debug_assert!(self.encoded);
        &self.bytes
    }

    /// Moves the commands to the end of `out`, and empties the queue. Into an empty `out` the
    /// buffers are swapped rather than copied: `out` takes the commands' buffer, the queue
    /// keeps `out`'s for the next publishes.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn move_commands_to(&mut self, out: &mut Vec<u8>) {
        debug_assert!(self.encoded);
        if out.is_empty() {
            std::mem::swap(out, &mut self.bytes);
        } else {
            out.extend_from_slice(&self.bytes);
        }
        self.clear();
    }

    /// Empties the queue, keeping its buffer for reuse.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.count = 0;
        self.encoded = false;
        self.largest_payload = 0;
    }

    /// The publishes in order, as (topic, payload) (records only).
    pub(crate) fn iter(&self) -> PublishIter<'_> {
        debug_assert!(!self.encoded, "commands are not records");
        PublishIter { rest: &self.bytes }
    }

    /// Appends every publish of `other`, in order, and empties it.
    pub(crate) fn append(&mut self, other: &mut Publishes) {
        if self.is_empty() {
            std::mem::swap(self, other);
            other.clear();
            return;
        }
        debug_assert_eq!(
            self.encoded, other.encoded,
            "records and commands are never mixed"
        );
        self.bytes.extend_from_slice(&other.bytes);
        self.count += other.count;
        self.largest_payload = self.largest_payload.max(other.largest_payload);
        other.clear();
    }

    /// Drops the first `n` publishes (records only).
    #[cfg(any(feature = "pg", test))]
    pub(crate) fn drop_front(&mut self, n: usize) {
        let mut cut = 0;
        let mut iter = self.iter();
        for _ in 0..n.min(self.count) {
            let before = iter.rest.len();
            iter.next();
            cut += before - iter.rest.len();
        }
        self.bytes.drain(..cut);
        self.count -= n.min(self.count);
    }
}

pub(crate) struct PublishIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PublishIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < HEADER {
            return None;
        }
        let (header, rest) = self.rest.split_at(HEADER);
        let topic_len = u32::from_ne_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let payload_len = u32::from_ne_bytes(header[4..].try_into().expect("4 bytes")) as usize;
        let (topic, rest) = rest.split_at(topic_len);
        let (payload, rest) = rest.split_at(payload_len);
        self.rest = rest;
        Some((topic, payload))
    }
}

/// A topic gained its first local subscriber (`subscribe: true`) or lost its last.
/// PostgreSQL listens on one channel and only drops these; the routing engines read them.
#[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
pub(crate) struct InterestChange {
    pub(crate) topic: Box<[u8]>,
    pub(crate) subscribe: bool,
}

#[derive(Default)]
struct Queue {
    publishes: Publishes,
    /// The engine's, when it takes its publishes as commands.
    encoder: Option<Box<dyn Encode>>,
    interest: Vec<InterestChange>,
    dropped: u64,
}

/// The queue between the registry and the engine.
#[derive(Default)]
pub(crate) struct Outbound {
    queue: Mutex<Queue>,
    /// Set by every push, cleared when the engine takes: whether the engine has something to
    /// look at that it has not seen.
    dirty: AtomicBool,
    /// Set by the engine while it leaves publishes queued until the server answers what it
    /// wrote: driving it for a new publish would take nothing.
    held: AtomicBool,
}

impl Outbound {
    /// Empties the queue and forgets its counts, for a new engine whose publishes `encoder`
    /// writes as its commands when they are pushed (`None`: as records).
    pub(crate) fn reset(&self, encoder: Option<Box<dyn Encode>>) {
        let mut queue = self.queue.lock();
        queue.publishes.clear();
        queue.interest.clear();
        queue.dropped = 0;
        queue.encoder = encoder;
        self.dirty.store(false, Ordering::Release);
        self.held.store(false, Ordering::SeqCst);
    }

    /// Queues a publish; returns whether the engine should be driven for it now. False when
    /// the queue is full (the publish is dropped and counted), and when the engine holds
    /// publishes for the server's answer: the thread that reads the answer takes them.
    pub(crate) fn push_publish(&self, topic: &[u8], payload: &[u8]) -> bool {
        self.push_with(
            topic.len() + payload.len(),
            |publishes, encoder| match encoder {
                Some(encoder) => publishes.push_encoded(topic, payload, encoder.as_mut()),
                None => publishes.push(topic, payload),
            },
        )
    }

    /// [`Outbound::push_publish`] for a publish whose history is shared: the engine adds it
    /// to the topic's stream and hands it back with its id, to be delivered here then,
    /// skipping `except`.
    pub(crate) fn push_shared_publish(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
    ) -> bool {
        self.push_with(
            topic.len() + payload.len(),
            |publishes, encoder| match encoder {
                Some(encoder) => {
                    publishes.push_shared_encoded((topic, payload, except), encoder.as_mut())
                }
                None => publishes.push_shared(topic, payload, except),
            },
        )
    }

    /// Queues with `push` unless the queue is full (`bytes`: the publish's topic and payload).
    fn push_with(
        &self,
        bytes: usize,
        push: impl FnOnce(&mut Publishes, Option<&mut Box<dyn Encode>>),
    ) -> bool {
        {
            let mut queue = self.queue.lock();
            let queue = &mut *queue;
            if queue.publishes.len() >= MAX_QUEUED_PUBLISHES
                || queue.publishes.byte_len() + bytes > MAX_QUEUED_BYTES
            {
                queue.dropped += 1;
                return false;
            }
            push(&mut queue.publishes, queue.encoder.as_mut());
            self.dirty.store(true, Ordering::Release);
        }
        // After the queue's lock: an engine that stops holding says so before it takes (under
        // that lock), so a push it does not take sees `held` false.
        !self.held.load(Ordering::SeqCst)
    }

    /// Whether the engine leaves publishes queued until the server answers; said before each
    /// `take` (the stream engines; PostgreSQL takes whatever is queued).
    #[cfg(any(feature = "redis", feature = "nats"))]
    pub(crate) fn hold_publishes(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }

    pub(crate) fn push_interest(&self, topic: &[u8], subscribe: bool) {
        let mut queue = self.queue.lock();
        if let Some(encoder) = &mut queue.encoder {
            encoder.interest(topic, subscribe);
        }
        queue.interest.push(InterestChange {
            topic: Box::from(topic),
            subscribe,
        });
        self.dirty.store(true, Ordering::Release);
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Takes the interest changes, and the publishes too if `with_publishes` (an engine that
    /// cannot send them now leaves them queued).
    pub(crate) fn take(
        &self,
        interest: &mut Vec<InterestChange>,
        publishes: Option<&mut Publishes>,
    ) {
        let mut queue = self.queue.lock();
        self.dirty.store(false, Ordering::Release);
        interest.append(&mut queue.interest);
        if let Some(publishes) = publishes {
            publishes.append(&mut queue.publishes);
        }
    }

    /// Publishes waiting, and publishes dropped because the queue was full.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let queue = self.queue.lock();
        (queue.publishes.len() as u64, queue.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_come_out_in_order_with_their_bytes() {
        let mut publishes = Publishes::default();
        publishes.push(b"a", b"");
        publishes.push(b"topic\0x", b"payload");
        publishes.push(&[0xff; 3], &[1, 2, 3, 4]);
        let seen: Vec<_> = publishes.iter().collect();
        assert_eq!(
            seen,
            vec![
                (&b"a"[..], &b""[..]),
                (&b"topic\0x"[..], &b"payload"[..]),
                (&[0xff; 3][..], &[1, 2, 3, 4][..]),
            ]
        );
        publishes.drop_front(2);
        assert_eq!(publishes.len(), 1);
        assert_eq!(
            publishes.iter().next(),
            Some((&[0xff; 3][..], &[1, 2, 3, 4][..]))
        );
    }

    #[test]
    fn a_push_asks_for_the_engine_only_while_it_does_not_hold_publishes() {
        let outbound = Outbound::default();
        assert!(outbound.push_publish(b"t", b"1"));
        outbound.hold_publishes(true);
        assert!(!outbound.push_publish(b"t", b"2"));
        assert_eq!(outbound.counts(), (2, 0), "queued all the same");
        outbound.hold_publishes(false);
        assert!(outbound.push_publish(b"t", b"3"));
        let mut taken = Publishes::default();
        outbound.take(&mut Vec::new(), Some(&mut taken));
        let payloads: Vec<_> = taken.iter().map(|(_, payload)| payload).collect();
        assert_eq!(payloads, [b"1", b"2", b"3"]);
    }

    /// Writes `<topic>=<payload>;`.
    struct Assign;

    impl Encode for Assign {
        fn encode(&mut self, topic: &[u8], payload: &[u8], out: &mut Vec<u8>) {
            out.extend_from_slice(topic);
            out.push(b'=');
            out.extend_from_slice(payload);
            out.push(b';');
        }

        fn encode_shared(
            &mut self,
            topic: &[u8],
            payload: &[u8],
            _except: Option<RawFd>,
            out: &mut Vec<u8>,
        ) {
            out.push(b'!');
            self.encode(topic, payload, out);
        }
    }

    #[test]
    fn shared_publishes_are_queued_whole_in_either_form() {
        let outbound = Outbound::default();
        assert!(outbound.push_shared_publish(b"topic", b"pay load", Some(7)));
        assert!(outbound.push_publish(b"plain", b"x"));
        let mut taken = Publishes::default();
        outbound.take(&mut Vec::new(), Some(&mut taken));
        let records: Vec<(&[u8], &[u8])> = taken.iter().collect();
        assert_eq!(records.len(), 2);
        assert_eq!(
            records[0].0, b"",
            "a shared publish is a record with no topic"
        );
        assert_eq!(
            super::super::split_shared_record(records[0].1),
            Some((&b"topic"[..], Some(7), &b"pay load"[..]))
        );
        assert_eq!(records[1], (&b"plain"[..], &b"x"[..]));
        outbound.reset(Some(Box::new(Assign)));
        assert!(outbound.push_shared_publish(b"t", b"1", None));
        assert!(outbound.push_publish(b"u", b"2"));
        let mut taken = Publishes::default();
        outbound.take(&mut Vec::new(), Some(&mut taken));
        let mut commands = Vec::new();
        taken.move_commands_to(&mut commands);
        assert_eq!(commands, b"!t=1;u=2;");
    }

    #[test]
    fn with_an_encoder_publishes_are_queued_as_commands_and_taken_in_order() {
        let outbound = Outbound::default();
        assert!(outbound.push_publish(b"left", b"over"));
        outbound.reset(Some(Box::new(Assign)));
        assert_eq!(outbound.counts(), (0, 0));
        assert!(outbound.push_publish(b"a", b"1"));
        assert!(outbound.push_publish(b"bb", b"22"));
        let mut taken = Publishes::default();
        outbound.take(&mut Vec::new(), Some(&mut taken));
        assert!(outbound.push_publish(b"c", b"333"));
        outbound.take(&mut Vec::new(), Some(&mut taken));
        assert!(taken.is_encoded());
        assert_eq!((taken.len(), taken.largest_payload()), (3, 3));
        assert_eq!(taken.commands(), b"a=1;bb=22;c=333;");
        let mut out = b"before;".to_vec();
        taken.move_commands_to(&mut out);
        assert_eq!(out, b"before;a=1;bb=22;c=333;");
        assert!(taken.is_empty() && !taken.is_encoded());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let outbound = Outbound::default();
        for _ in 0..MAX_QUEUED_PUBLISHES {
            assert!(outbound.push_publish(b"t", b"x"));
        }
        assert!(!outbound.push_publish(b"t", b"x"));
        assert_eq!(outbound.counts(), (MAX_QUEUED_PUBLISHES as u64, 1));
        let mut taken = Publishes::default();
        outbound.take(&mut Vec::new(), Some(&mut taken));
        assert_eq!(taken.len(), MAX_QUEUED_PUBLISHES);
        assert!(!outbound.is_dirty());
        assert!(outbound.push_publish(b"t", b"x"));
    }
}
