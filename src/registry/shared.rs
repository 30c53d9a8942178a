//! History shared across processes (a Redis broker, or a NATS broker with JetStream, with
//! history on): the registry's side.
//!
//! The engine numbers nothing itself: the stream does (broker/redis/shared.rs,
//! broker/nats/jetstream.rs). A publish here is not delivered at once; it goes to the
//! broker, which hands it back with its stream id when the stream has added it, in the
//! server's order among other processes' messages. Every message with an id is kept in the
//! topic's *mirror* (a shared ring) and fanned out under the mirror's lock, as a local
//! publish with history is, so replay and live never overlap or gap. A mirror is *synced*
//! once the engine filled it from the stream after subscribing the topic (its id channel, its
//! consumer), and stays so while the topic stays subscribed (a reconnect fetches what it
//! missed); a resume on a mirror not synced yet waits for the fill.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Registry;
use super::history::TopicRing;
use super::publish::check_utf8;
use super::publish::{Message, Outcomes};
use crate::broker::Stream;
use crate::error::Error;
use crate::history::EventId;
use crate::io;
use crate::outbox::WritePolicy;

/// How long a resume waits for a mirror to be filled from the stream.
pub(super) const MIRROR_WAIT: Duration = Duration::from_secs(5);
/// A resume from an id this far past the mirror's newest does not wait for the mirror to
/// reach it: it is not an id of this stream (a local epoch, say).
const MIRROR_AHEAD: u64 = 60_000;
/// The longest single wait on the broker's socket: another thread may read it meanwhile.
const WAIT_SLICE: Duration = Duration::from_millis(10);

impl Registry {
    /// Whether a resume keeps `topic`'s channel subscribed while it waits for the mirror.
    pub(super) fn mirror_pinned(&self, topic: &[u8]) -> bool {
        self.mirror_pins.lock().contains_key(topic)
    }

    /// Whether publishes and resumes go through the broker's streams now.
    pub(super) fn shares_history(&self) -> bool {
        self.broker_enabled.load(Ordering::Acquire) && self.broker.shares_history()
    }

    /// A publish under shared history: counts the local subscribers it will reach (refusing,
    /// before anything is sent, a payload that is not UTF-8 when one of them needs it), and
    /// hands it to the broker, which delivers it here once Redis has given it its id.
    pub(super) fn publish_shared(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
    ) -> Result<usize, Error> {
        let matched = {
            let index = self.index.read();
            let except_mode = except.and_then(|fd| index.mode_of(topic, fd));
            match index.snapshot(topic) {
                None => 0,
                Some(list) => {
                    check_utf8(payload, list.utf8_subscribers(), except_mode)?;
                    list.subscribers().len() - usize::from(except_mode.is_some())
                }
            }
        };
        self.counters.publishes.fetch_add(1, Ordering::Relaxed);
        self.broker
            .forward_shared(topic, payload, except, &self.reactor);
        Ok(matched)
    }

    /// A message or note of shared history, as the engine received it; returns whether it
    /// was a message delivered (not one seen already, nor a note or a fill's entry).
    pub(super) fn deliver_streamed(
        &self,
        topic: &[u8],
        payload: &[u8],
        stream: Stream,
        policy: WritePolicy,
    ) -> bool {
        let ring = if self.history_on.load(Ordering::Relaxed) {
            self.topic_history(topic)
        } else {
            None
        };
        let Some(ring) = ring else {
            // History was turned off meanwhile: a message is delivered as any other.
            match stream {
                Stream::Message { except, .. } => {
                    let _ = self.deliver_with(topic, payload, except, policy);
                    return true;
                }
                Stream::Lost { count, .. } => self.report_lost(topic, count),
                _ => {}
            }
            return false;
        };
        let now = Instant::now();
        let mut ring = ring.lock();
        match stream {
            Stream::Message { id, except } => {
                if !ring.is_new(id) {
                    // Seen already: a fill brought it, or it is our own echo.
                    return false;
                }
                let message = Message {
                    topic,
                    payload,
                    except,
                    id: Some(id),
                    position: Some(EventId {
                        epoch: ring.epoch(),
                        offset: ring.last_offset() + 1,
                    }),
                    oldest_kept: ring.oldest_offset(),
                };
                let mut outcomes = Outcomes::default();
                // A payload a local subscriber cannot take reaches nobody here, but stays in
                // the mirror: the mirror is the stream's.
                let _ = self.deliver_message(message, policy, &mut outcomes);
                ring.push_shared(id, Arc::from(payload), payload.len(), now);
                drop(ring);
                self.settle(topic, outcomes);
                return true;
            }
            Stream::Kept(id) => {
                ring.push_shared(id, Arc::from(payload), payload.len(), now);
            }
            Stream::Synced(covers_from) => ring.sync(covers_from),
            Stream::Hole(id) => ring.hole_until(id),
            Stream::Lost { before, count } => {
                ring.hole_until(before);
                drop(ring);
                self.report_lost(topic, count);
            }
            Stream::Unsynced => ring.unsync(),
        }
        false
    }

    /// `count` messages of `topic` never reached this process: each local subscriber of the
    /// topic lost them, counted and told as a gap. Nobody is evicted for it: the fd did not
    /// fall behind, and a resume could not recover them either.
    fn report_lost(&self, topic: &[u8], count: u64) {
        let peers: Vec<_> = {
            let index = self.index.read();
            index.snapshot(topic).map_or_else(Vec::new, |list| {
                list.subscribers()
                    .iter()
                    .map(|subscriber| Arc::clone(&subscriber.peer))
                    .collect()
            })
        };
        for peer in peers {
            peer.count_lost(count);
            self.report_gap(&peer, topic, count, false);
        }
    }

    /// Before a resume on a shared mirror: makes sure the topic's id channel is subscribed,
    /// and drives the broker (with no lock held) until the mirror is synced and has reached
    /// `last`, or [`MIRROR_WAIT`] passes. Returns whether it pinned the channel (the topic's
    /// last local subscriber leaving meanwhile does not unsubscribe it), for
    /// [`Registry::release_mirror`] to unpin once the resume has subscribed or failed.
    pub(super) fn await_mirror(
        &self,
        topic: &[u8],
        ring: &Arc<Mutex<TopicRing>>,
        last: Option<EventId>,
    ) -> bool {
        let ready = |ring: &TopicRing| {
            ring.is_synced()
                && last.is_none_or(|last| {
                    let newest = ring.last_id();
                    last <= newest || last.epoch > newest.epoch.saturating_add(MIRROR_AHEAD)
                })
        };
        if ready(&ring.lock()) {
            return false;
        }
        let Some(broker) = self.broker.read().clone() else {
            return false;
        };
        // Interest is a set on the engine's side: asking again for a topic subscribed is a
        // no-op, and the topic's first local subscriber will ask once more. Asked under the
        // index's write lock, as every change of interest is, so that it is ordered with
        // them.
        let index = self.write_index();
        *self.mirror_pins.lock().entry(Box::from(topic)).or_default() += 1;
        broker.interest(topic, true);
        drop(index);
        broker.kick(&self.reactor);
        let deadline = Instant::now() + MIRROR_WAIT;
        loop {
            self.broker_service();
            if ready(&ring.lock()) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let wait = broker.wait();
            let slice = (deadline - now).min(WAIT_SLICE);
            let slice = wait
                .deadline
                .map_or(slice, |due| slice.min(due.saturating_duration_since(now)));
            match wait.socket {
                Some((socket, for_write)) => {
                    let _ = io::wait_fd(socket, for_write, Some(slice));
                }
                None => std::thread::sleep(slice),
            }
        }
        true
    }

    /// Unpins what [`Registry::await_mirror`] pinned, and gives the channel back unless the
    /// topic has a local subscriber or another waiting resume now. Under the index's write
    /// lock, as every change of interest is.
    pub(super) fn release_mirror(&self, topic: &[u8]) {
        let index = self.write_index();
        let pinned = {
            let mut pins = self.mirror_pins.lock();
            let pinned = pins.get_mut(topic).map_or(0, |pins| {
                *pins -= 1;
                *pins
            });
            if pinned == 0 {
                pins.remove(topic);
            }
            pinned > 0
        };
        let broker = self.broker.read().clone();
        if let Some(broker) = &broker
            && !pinned
            && index.subscribers_into(topic, &mut []) == 0
        {
            broker.interest(topic, false);
        }
        drop(index);
        if let Some(broker) = broker {
            broker.kick(&self.reactor);
        }
    }

    /// History was set: a switch on or off while a sharing broker is installed starts its
    /// session anew (it subscribes and publishes the other way), and every topic's history
    /// anew (its ids change form).
    pub(super) fn history_set(&self, switched: bool) {
        if !switched {
            return;
        }
        let broker = self.broker.read().clone();
        if let Some(broker) = broker {
            broker.history_switched(&self.reactor);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::frame::Mode;
    use crate::history::{HistoryLimits, Ring};

    fn stream_id(ms: u64, seq: u64) -> EventId {
        EventId {
            epoch: ms,
            offset: seq,
        }
    }

    /// A registry with history on whose topic `t` has a mirror, as a sharing broker makes.
    fn with_mirror(max_messages: usize) -> Registry {
        let registry = Registry::new().unwrap();
        let limits = HistoryLimits {
            max_messages,
            ..HistoryLimits::default()
        };
        registry.set_history(limits);
        registry.insert_history(b"t", Ring::shared(limits, 99));
        registry
    }

    fn note(registry: &Registry, payload: &[u8], stream: Stream) -> bool {
        registry.deliver_streamed(b"t", payload, stream, registry.write_policy())
    }

    fn message(id: EventId) -> Stream {
        Stream::Message { id, except: None }
    }

    /// Reads what is there now.
    fn drain(peer: &mut UnixStream) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            match peer.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) => panic!("{err}"),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn a_mirror_delivers_each_stream_id_once_and_resumes_by_it() {
        let registry = with_mirror(4);
        let (live, mut live_peer) = UnixStream::pair().unwrap();
        live_peer.set_nonblocking(true).unwrap();
        registry
            .subscribe(b"t", live.as_raw_fd(), Mode::Sse)
            .unwrap();

        // A fill: history, not delivered; then messages, the one seen already skipped.
        assert!(!note(&registry, b"", Stream::Synced(stream_id(1, 0))));
        assert!(!note(&registry, b"a", Stream::Kept(stream_id(2, 0))));
        assert!(!note(&registry, b"b", Stream::Kept(stream_id(3, 0))));
        assert!(!note(&registry, b"b", message(stream_id(3, 0))));
        assert!(note(&registry, b"c", message(stream_id(5, 7))));
        assert_eq!(drain(&mut live_peer), "id: 5-7\ndata: c\n\n");

        // Resumes: by the stream's ids.
        let (resumer, mut resumer_peer) = UnixStream::pair().unwrap();
        resumer_peer.set_nonblocking(true).unwrap();
        let (_, recovered) = registry
            .subscribe_since(b"t", resumer.as_raw_fd(), Mode::Sse, stream_id(2, 0))
            .unwrap();
        assert!(recovered);
        assert_eq!(
            drain(&mut resumer_peer),
            "id: 3-0\ndata: b\n\nid: 5-7\ndata: c\n\n"
        );
        let (old, mut old_peer) = UnixStream::pair().unwrap();
        old_peer.set_nonblocking(true).unwrap();
        let (_, recovered) = registry
            .subscribe_since(b"t", old.as_raw_fd(), Mode::WsTextId, stream_id(0, 5))
            .unwrap();
        assert!(!recovered, "before the fill's floor");
        assert_eq!(drain(&mut old_peer).matches('\n').count(), 3, "all 3 kept");

        // The sender's fd is skipped; the message is kept all the same.
        let stream = Stream::Message {
            id: stream_id(6, 0),
            except: Some(live.as_raw_fd()),
        };
        assert!(note(&registry, b"d", stream));
        assert_eq!(drain(&mut live_peer), "");
        assert_eq!(drain(&mut resumer_peer), "id: 6-0\ndata: d\n\n");

        // Unsynced, a resume from a kept id is no recovery (there is no broker to wait for).
        note(&registry, b"", Stream::Unsynced);
        let (late, _late_peer) = UnixStream::pair().unwrap();
        let (_, recovered) = registry
            .subscribe_since(b"t", late.as_raw_fd(), Mode::Sse, stream_id(5, 7))
            .unwrap();
        assert!(!recovered);
    }

    #[test]
    fn a_slow_reader_catches_up_from_the_mirror_with_the_streams_ids() {
        const N: u64 = 200;
        let registry = with_mirror(N as usize);
        registry.set_outbox_limit(64 << 10);
        let (slow, mut slow_peer) = UnixStream::pair().unwrap();
        slow_peer.set_nonblocking(true).unwrap();
        registry
            .subscribe(b"t", slow.as_raw_fd(), Mode::Sse)
            .unwrap();
        note(&registry, b"", Stream::Synced(EventId::ZERO));
        let payload = "x".repeat(10 << 10);
        for n in 1..=N {
            // Sparse ids, as a stream's are.
            assert!(note(
                &registry,
                payload.as_bytes(),
                message(stream_id(n * 10, n % 3))
            ));
        }
        let fd_stats = registry.fd_stats(slow.as_raw_fd()).unwrap();
        assert_eq!(fd_stats.catching_up, 1, "the reader fell behind");
        let mut got = String::new();
        for _ in 0..10_000 {
            got.push_str(&drain(&mut slow_peer));
            registry
                .dispatch(Some(std::time::Duration::from_millis(1)))
                .unwrap();
            if registry.fd_stats(slow.as_raw_fd()).unwrap().catching_up == 0
                && registry.pending_bytes(slow.as_raw_fd()).unwrap() == 0
            {
                break;
            }
        }
        got.push_str(&drain(&mut slow_peer));
        let ids: Vec<&str> = got
            .split("\n\n")
            .filter(|frame| !frame.is_empty())
            .map(|frame| frame.lines().next().unwrap())
            .collect();
        let want: Vec<String> = (1..=N)
            .map(|n| format!("id: {}", stream_id(n * 10, n % 3)))
            .collect();
        assert_eq!(ids, want);
        assert_eq!(registry.stats().lost_to_gaps, 0);
    }

    #[test]
    fn a_loss_on_the_brokers_side_is_a_gap_for_every_subscriber_and_a_hole() {
        let registry = with_mirror(10);
        let told = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&told);
        registry.set_gap_callback(Some(Box::new(move |fd, topic: &[u8], lost| {
            log.lock().push((fd, topic.to_vec(), lost));
        })));
        let (first, _first_peer) = UnixStream::pair().unwrap();
        let (second, _second_peer) = UnixStream::pair().unwrap();
        let (elsewhere, _elsewhere_peer) = UnixStream::pair().unwrap();
        for (fd, topic) in [(&first, b"t"), (&second, b"t"), (&elsewhere, b"u")] {
            registry
                .subscribe(topic, fd.as_raw_fd(), Mode::Sse)
                .unwrap();
        }
        note(&registry, b"", Stream::Synced(EventId::ZERO));
        assert!(note(&registry, b"a", message(stream_id(1, 0))));
        let lost = Stream::Lost {
            before: stream_id(4, 0),
            count: 3,
        };
        assert!(!note(&registry, b"", lost));
        assert!(note(&registry, b"e", message(stream_id(5, 0))));

        let mut told = told.lock().clone();
        told.sort_unstable();
        let mut want = vec![
            (first.as_raw_fd(), b"t".to_vec(), 3),
            (second.as_raw_fd(), b"t".to_vec(), 3),
        ];
        want.sort_unstable();
        assert_eq!(told, want);
        for (fd, lost) in [(&first, 3), (&second, 3), (&elsewhere, 0)] {
            assert_eq!(
                registry.fd_stats(fd.as_raw_fd()).unwrap().lost_to_gaps,
                lost
            );
        }
        assert_eq!(registry.stats().lost_to_gaps, 6);

        // A resume from before the loss is no recovery; from its last id, it is.
        let (resumer, _resumer_peer) = UnixStream::pair().unwrap();
        let (_, recovered) = registry
            .subscribe_since(b"t", resumer.as_raw_fd(), Mode::Sse, stream_id(1, 0))
            .unwrap();
        assert!(!recovered);
        let (later, _later_peer) = UnixStream::pair().unwrap();
        let (_, recovered) = registry
            .subscribe_since(b"t", later.as_raw_fd(), Mode::Sse, stream_id(4, 0))
            .unwrap();
        assert!(recovered);
    }
}
