//! History shared across processes (a Redis broker with history on): the registry's side.
//!
//! The engine numbers nothing itself: the stream does (broker/redis/shared.rs). A publish
//! here is not delivered at once; it goes to the broker, which hands it back with its stream
//! id when Redis has added it, in the server's order among other processes' messages. Every
//! message with an id is kept in the topic's *mirror* (a shared ring) and fanned out under
//! the mirror's lock, as a local publish with history is, so replay and live never overlap
//! or gap. A mirror is *synced* once the engine filled it from the stream after subscribing
//! the topic's id channel, and stays so while the channel stays subscribed (a reconnect
//! fetches what it missed); a resume on a mirror not synced yet waits for the fill.

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
            if let Stream::Message { except, .. } = stream {
                let _ = self.deliver_with(topic, payload, except, policy);
                return true;
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
            Stream::Unsynced => ring.unsync(),
        }
        false
    }

    /// Before a resume on a shared mirror: makes sure the topic's id channel is subscribed,
    /// and drives the broker (with no lock held) until the mirror is synced and has reached
    /// `last`, or [`MIRROR_WAIT`] passes. Returns whether it asked for the channel itself
    /// (to be given back if the resume's subscribe fails).
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

    /// Gives back the interest [`Registry::await_mirror`] asked for, unless the topic has a
    /// local subscriber now. Under the index's write lock, as every change of interest is.
    pub(super) fn release_mirror(&self, topic: &[u8]) {
        let index = self.write_index();
        let broker = self.broker.read().clone();
        if let Some(broker) = &broker
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
