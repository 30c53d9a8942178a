//! The publish fan-out and `send`: every path that hands a frame to an fd.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::evict::Eviction;
use super::{Registry, check_topic, identify};
use crate::batch::Batch;
use crate::error::Error;
use crate::frame::{Frame, FrameSet, Mode};
use crate::history::EventId;
use crate::outbox::{Delivery, Flush, InBatch, InHistory, Overflow, Peer, WritePolicy};

/// A publish on its way to this registry's subscribers.
#[derive(Clone, Copy)]
pub(super) struct Message<'a> {
    pub(super) topic: &'a [u8],
    pub(super) payload: &'a [u8],
    /// The sender: it gets nothing and is not counted.
    pub(super) except: Option<RawFd>,
    /// The id its frames carry, when history is on.
    pub(super) id: Option<EventId>,
    /// Its local position in the topic's history (the id itself, but in a shared ring).
    pub(super) position: Option<EventId>,
    /// The oldest offset the topic's history keeps, when history is on.
    pub(super) oldest_kept: u64,
}

impl Message<'_> {
    /// Where the message sits in its topic's history, for the subscribers behind on it.
    fn in_history(&self) -> Option<InHistory<'_>> {
        self.position.map(|id| InHistory {
            topic: self.topic,
            id,
            oldest_kept: self.oldest_kept,
        })
    }
}

/// What one publish's deliveries came to, settled once the publish holds no lock.
#[derive(Default)]
pub(super) struct Outcomes {
    delivered: u64,
    dropped: u64,
    queued: u64,
    /// Bytes queued earlier and written since, off the queued gauge.
    written_from_queue: u64,
    /// Peers that just got their first corked frame: they go on the flush list.
    deferred: Vec<Arc<Peer>>,
    evictions: Vec<Eviction>,
    /// Peers behind on the publish's topic that lost messages to the history's limits: how
    /// many, and whether the overflow policy evicts them for it.
    gaps: Vec<(Arc<Peer>, u64, bool)>,
    /// A corked publish started gathering: `poll_fd` must turn readable.
    first_gathered: bool,
}

impl Outcomes {
    /// Records a write of `peer`'s outbox made by the caller rather than by a flush: its
    /// frames count as delivered, a failure as an eviction (run by `settle`, with no lock
    /// held), and the peer no longer awaits a flush (a write that could not finish left it
    /// watched for writability). Returns whether the fd is still usable.
    pub(super) fn record_write(&mut self, peer: &Arc<Peer>, written: Flush) -> bool {
        self.deferred
            .retain(|deferred| !Arc::ptr_eq(deferred, peer));
        match written {
            Flush::Progress { bytes, frames, .. } => {
                self.written_from_queue += bytes as u64;
                self.delivered += frames as u64;
                true
            }
            Flush::Failed {
                errno,
                bytes,
                frames,
            } => {
                self.written_from_queue += bytes as u64;
                self.delivered += frames as u64;
                self.record(peer, Delivery::Failed(errno));
                false
            }
            Flush::Reused => {
                self.record(peer, Delivery::Reused);
                false
            }
        }
    }

    /// The per-subscriber step of every publish: hands the mode's frame (`None`: no memory
    /// could be had to encode it, a drop) to `deliver`, and records the outcome.
    #[inline(always)]
    pub(super) fn deliver(
        &mut self,
        peer: &Arc<Peer>,
        frame: Option<&Frame<'_>>,
        deliver: impl FnOnce(&Frame<'_>) -> Delivery,
    ) {
        match frame {
            Some(frame) => self.record(peer, deliver(frame)),
            None => {
                peer.count_dropped(1);
                self.dropped += 1;
            }
        }
    }

    // Inlined, it costs a compare and an add.
    #[inline(always)]
    fn record(&mut self, peer: &Arc<Peer>, delivery: Delivery) {
        match delivery {
            Delivery::Written => self.delivered += 1,
            Delivery::Queued { bytes } => self.queued += bytes as u64,
            Delivery::Closed | Delivery::Behind => {}
            Delivery::Gap { lost, evict } => self.gaps.push((Arc::clone(peer), lost, evict)),
            Delivery::Deferred { bytes } => {
                self.queued += bytes as u64;
                self.deferred.push(Arc::clone(peer));
            }
            Delivery::Dropped => self.dropped += 1,
            Delivery::Overflowed | Delivery::Failed(_) | Delivery::Reused => {
                self.evictions.extend(Eviction::after(peer, &delivery));
            }
        }
    }
}

impl Registry {
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
        self.publish_with_id(topic, payload, except)
            .map(|(matched, _)| matched)
    }

    /// [`Registry::publish_except`], which also returns the id the topic's history gave the
    /// message (`None` when history is off; see [`Registry::set_history`]; `None` too under
    /// shared history, where Redis gives the id later, as the message comes back to be
    /// delivered here).
    pub fn publish_with_id(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
    ) -> Result<(usize, Option<EventId>), Error> {
        check_topic(topic)?;
        let forward = self.broker_enabled.load(Ordering::Acquire);
        if forward {
            self.broker.check(topic, payload)?;
            if self.broker.shares_history() {
                // Delivered here too once Redis gave it its id: no id to tell yet.
                return Ok((self.publish_shared(topic, payload, except)?, None));
            }
        }
        let delivered = self.deliver_numbered(topic, payload, except, self.write_policy())?;
        self.counters.publishes.fetch_add(1, Ordering::Relaxed);
        if forward {
            self.broker.forward(topic, payload, &self.reactor);
        }
        Ok(delivered)
    }

    /// Writes `payload` to this registry's subscribers of `topic`, framed per subscriber (or,
    /// corked, queues it), under `policy`; returns how many matched.
    pub(super) fn deliver_with(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
        policy: WritePolicy,
    ) -> Result<usize, Error> {
        self.deliver_numbered(topic, payload, except, policy)
            .map(|(matched, _)| matched)
    }

    /// `deliver_with`, which also keeps the message in its topic's history when history is
    /// on, and returns the id it got there.
    pub(super) fn deliver_numbered(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
        policy: WritePolicy,
    ) -> Result<(usize, Option<EventId>), Error> {
        let mut message = Message {
            topic,
            payload,
            except,
            id: None,
            position: None,
            oldest_kept: 0,
        };
        let mut outcomes = Outcomes::default();
        let history = if self.history_on.load(Ordering::Relaxed) {
            self.topic_history(topic)
        } else {
            None
        };
        let result = match history {
            None => self.deliver_message(message, policy, &mut outcomes),
            // The topic's ring stays locked from the id's choice through the fan-out, so a
            // resuming reader (history.rs) sees each message either in its replay or live.
            Some(ring) => {
                let mut ring = ring.lock();
                let id = ring.next_id();
                message.id = Some(id);
                message.position = Some(id);
                message.oldest_kept = ring.oldest_offset();
                let result = self.deliver_message(message, policy, &mut outcomes);
                if result.is_ok() {
                    ring.push(Arc::from(payload), payload.len(), Instant::now());
                }
                result
            }
        };
        self.settle(topic, outcomes);
        result.map(|matched| (matched, message.id))
    }

    pub(super) fn deliver_message(
        &self,
        message: Message<'_>,
        policy: WritePolicy,
        outcomes: &mut Outcomes,
    ) -> Result<usize, Error> {
        if policy.corked {
            self.deliver_corked(message, policy, outcomes)
        } else {
            self.deliver_immediate(message, policy, outcomes)
        }
    }

    fn deliver_immediate(
        &self,
        message: Message<'_>,
        policy: WritePolicy,
        outcomes: &mut Outcomes,
    ) -> Result<usize, Error> {
        let (list, except_mode) = {
            let index = self.index.read();
            let except_mode = message
                .except
                .and_then(|fd| index.mode_of(message.topic, fd));
            (index.snapshot(message.topic), except_mode)
        };
        let Some(list) = list else {
            return Ok(0);
        };
        check_utf8(message.payload, list.utf8_subscribers(), except_mode)?;

        let frames = FrameSet::with_id(message.payload, message.id);
        let mut matched = 0;
        for subscriber in list.subscribers() {
            if Some(subscriber.fd) == message.except {
                continue;
            }
            matched += 1;
            outcomes.deliver(&subscriber.peer, frames.get(subscriber.mode), |frame| {
                self.deliver(&subscriber.peer, frame, message.in_history(), policy)
            });
        }
        drop(list);
        Ok(matched)
    }

    /// A corked publish: appends the frames to the topic's batch, and queues them for the
    /// subscribers that cannot be members (see batch.rs). Holds the index's read lock
    /// throughout, so that the batch's members stay what the index says.
    fn deliver_corked(
        &self,
        message: Message<'_>,
        policy: WritePolicy,
        outcomes: &mut Outcomes,
    ) -> Result<usize, Error> {
        let index = self.index.read();
        let frames = FrameSet::with_id(message.payload, message.id);
        let mut batches = self.batches.lock();
        let gauge = &self.counters.queued_bytes;
        let batch = match batches.fitting(
            message.topic,
            &frames,
            policy.outbox_limit,
            gauge,
            &mut outcomes.deferred,
        ) {
            Ok(batch) => batch,
            Err(vacant) => {
                let Some(list) = index.snapshot(message.topic) else {
                    return Ok(0);
                };
                let batch = Batch::new(
                    list.subscribers(),
                    list.utf8_subscribers(),
                    &frames,
                    policy.outbox_limit,
                    policy.heartbeat_tick,
                );
                batches.insert(message.topic, vacant, batch)
            }
        };
        let except_mode = message
            .except
            .and_then(|fd| index.mode_of(message.topic, fd));
        // On refusal, a batch the publish spilled still reaches the flush list: the caller
        // settles the outcomes either way.
        check_utf8(message.payload, batch.utf8_subscribers(), except_mode)?;
        let matched = batch.subscriber_count() - usize::from(except_mode.is_some());
        for direct in batch.direct() {
            if Some(direct.fd) == message.except {
                continue;
            }
            outcomes.deliver(&direct.peer, frames.get(direct.mode), |frame| {
                // A direct member belongs to no batch, and membership changes only under the
                // batches lock, which this publish holds.
                direct
                    .peer
                    .deliver(frame, message.in_history(), policy, &self.reactor)
                    .expect("a corked batch's direct member is in no batch")
            });
        }
        let appended = batch.append(&frames, message.except);
        outcomes.first_gathered |= appended.queued > 0 && batches.start_gathering();
        drop(batches);
        drop(index);
        outcomes.queued += appended.queued;
        outcomes.delivered += appended.delivered;
        outcomes.dropped += appended.dropped;
        Ok(matched)
    }

    /// Adds a publish's (or a replay's) outcomes to the counters, lists its deferred peers for
    /// the next flush, reports the gaps found on `topic` and evicts what failed. Called with
    /// no lock held.
    pub(super) fn settle(&self, topic: &[u8], outcomes: Outcomes) {
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
        if outcomes.written_from_queue > 0 {
            self.counters
                .queued_bytes
                .fetch_sub(outcomes.written_from_queue, Ordering::Relaxed);
        }
        if !outcomes.deferred.is_empty() {
            self.await_flush(outcomes.deferred);
        }
        for (peer, lost, evict) in outcomes.gaps {
            self.report_gap(&peer, topic, lost, evict);
        }
        for eviction in outcomes.evictions {
            self.evict(eviction);
        }
        if outcomes.first_gathered {
            // While corked, poll_fd turns readable as soon as frames wait.
            self.reactor.wake();
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
            let delivery = self.deliver(&peer, &frame, None, policy);
            let error = match delivery {
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
                // Reused between lookup and write: forget the old file, then look up afresh.
                Delivery::Reused => {
                    self.evict_if_failed(&peer, &delivery);
                    continue;
                }
                Delivery::Dropped => {
                    self.counters
                        .dropped_messages
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(Error::Dropped);
                }
                Delivery::Overflowed => Error::Dropped,
                Delivery::Failed(errno) => Error::PeerGone(errno),
                Delivery::Behind | Delivery::Gap { .. } => {
                    unreachable!("a send belongs to no topic's history")
                }
            };
            self.evict_if_failed(&peer, &delivery);
            return Err(error);
        }
    }

    pub(super) fn write_policy(&self) -> WritePolicy {
        WritePolicy {
            corked: self.corked.load(Ordering::Relaxed),
            check_identity: self.fd_check.load(Ordering::Relaxed),
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
    pub(super) fn deliver(
        &self,
        peer: &Peer,
        frame: &Frame<'_>,
        history: Option<InHistory<'_>>,
        policy: WritePolicy,
    ) -> Delivery {
        loop {
            match peer.deliver(frame, history, policy, &self.reactor) {
                Err(InBatch) => self.spill_batches(),
                Ok(delivery) => return delivery,
            }
        }
    }
}

/// Refuses, before anything is written, a payload that is not UTF-8 when a recipient's mode
/// needs it: `utf8_subscribers` of the topic's, less `except` (its mode, if it subscribes).
pub(super) fn check_utf8(
    payload: &[u8],
    utf8_subscribers: usize,
    except: Option<Mode>,
) -> Result<(), Error> {
    let recipients = utf8_subscribers - usize::from(except.is_some_and(Mode::requires_utf8));
    if recipients > 0 && std::str::from_utf8(payload).is_err() {
        return Err(Error::InvalidUtf8);
    }
    Ok(())
}
