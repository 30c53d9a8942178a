//! Keep-alive frames for idle WebSocket and SSE subscribers, and the reactor's timer.
//!
//! Time is cut into periods of one interval, numbered by `Registry::heartbeat_tick`; every
//! write stamps its fd with the period it happens in, and the heartbeat that ends period `t`
//! sends a keep-alive to each fd last stamped before `t`. Only fds that may be due are looked
//! at: the queue holds each fd with a keep-alive mode once, under the period at whose end it
//! is next due, and a tick takes out only the fds due at its end. An fd that took frames
//! meanwhile goes back under the period after its last one; one that lost its keep-alive
//! subscriptions, or was forgotten, is dropped. Subscribing queues an fd that gains one.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Registry;
use crate::frame::{Frame, Mode};
use crate::index::Keepalive;
use crate::outbox::{Beat, Delivery, Peer};

#[derive(Default)]
pub(super) struct Heartbeat {
    interval: Option<Duration>,
    next_due: Option<Instant>,
    /// Fds by the period at whose end they are next due (only while `interval` is set). A
    /// peer is here at most once: its `heartbeat_queued` flag says so.
    queue: BTreeMap<u64, Vec<Arc<Peer>>>,
}

impl Heartbeat {
    /// Queues `peer` for the end of `period` unless it is queued already.
    fn enqueue(&mut self, peer: &Arc<Peer>, period: u64) {
        if !peer.heartbeat_queued() {
            peer.set_heartbeat_queued(true);
            self.queue.entry(period).or_default().push(Arc::clone(peer));
        }
    }
}

/// The keep-alive frames: an empty WebSocket ping, and an SSE comment line, which
/// EventSource ignores.
const WEBSOCKET_PING: &[u8] = &[0x89, 0x00];
const SSE_COMMENT: &[u8] = b":\n\n";

/// What one heartbeat tick did.
#[derive(Default)]
pub(super) struct Beats {
    /// Fds that got a keep-alive frame.
    pub(super) sent: usize,
    /// Fds the tick looked at: its cost.
    examined: usize,
}

impl Registry {
    /// Keeps idle streams alive through proxies: every `interval` (`None`: never, the
    /// default), `dispatch` sends an empty ping to each WebSocket subscriber and an SSE comment
    /// line (`:\n\n`) to each SSE subscriber that has taken no frame for a whole interval and
    /// has nothing queued. The reactor's timer makes `poll_fd` readable when one is due.
    pub fn set_heartbeat(&self, interval: Option<Duration>) {
        {
            // The index first (the lock order), so that no fd gains a keep-alive unseen
            // between this walk and the switch.
            let index = self.index.read();
            let mut heartbeat = self.heartbeat.lock();
            let was_on = heartbeat.interval.is_some();
            heartbeat.interval = interval.filter(|interval| !interval.is_zero());
            heartbeat.next_due = heartbeat.interval.map(|interval| Instant::now() + interval);
            match (was_on, heartbeat.interval.is_some()) {
                (false, true) => {
                    let period = self.heartbeat_tick.load(Ordering::Relaxed);
                    index.for_each_peer(|peer| {
                        if peer.keepalive().is_some() {
                            heartbeat.enqueue(peer, period);
                        }
                    });
                }
                (true, false) => {
                    for peer in std::mem::take(&mut heartbeat.queue).into_values().flatten() {
                        peer.set_heartbeat_queued(false);
                    }
                }
                _ => {}
            }
        }
        self.arm_timer();
    }

    /// Queues a peer that has a keep-alive mode for heartbeats, if they are on. Called
    /// under the index's write lock, after the change that gave it the mode.
    pub(super) fn queue_heartbeat(&self, peer: &Arc<Peer>) {
        let mut heartbeat = self.heartbeat.lock();
        if heartbeat.interval.is_some() {
            // Due at the end of the period now running, as if idle since before it.
            heartbeat.enqueue(peer, self.heartbeat_tick.load(Ordering::Relaxed));
        }
    }

    /// Sends the keep-alive frames if they are due at `now`.
    pub(super) fn beat_if_due(&self, now: Instant) -> Beats {
        let (ended, due) = {
            let mut heartbeat = self.heartbeat.lock();
            let (Some(interval), Some(next_due)) = (heartbeat.interval, heartbeat.next_due) else {
                return Beats::default();
            };
            if now < next_due {
                return Beats::default();
            }
            heartbeat.next_due = Some(now + interval);
            let ended = self.heartbeat_tick.fetch_add(1, Ordering::Relaxed);
            let later = heartbeat.queue.split_off(&(ended + 1));
            let due = std::mem::replace(&mut heartbeat.queue, later);
            (ended, due)
        };
        let current = ended + 1;
        let ping = Frame::encode(Mode::Raw, WEBSOCKET_PING).expect("RAW frames allocate nothing");
        let comment = Frame::encode(Mode::Raw, SSE_COMMENT).expect("RAW frames allocate nothing");
        let mut beats = Beats::default();
        let mut requeue = Vec::new();
        for peer in due.into_values().flatten() {
            beats.examined += 1;
            // Read again under the heartbeat lock below before the peer leaves the queue, so
            // that a subscribe that gives it a keep-alive meanwhile cannot be missed.
            let frame = match peer.keepalive() {
                Some(Keepalive::Ping) => &ping,
                Some(Keepalive::Comment) => &comment,
                None => {
                    requeue.push((peer, None));
                    continue;
                }
            };
            let next_check = match peer.heartbeat(
                frame,
                ended - 1,
                current,
                self.fd_check.load(Ordering::Relaxed),
                &self.reactor,
            ) {
                Beat::Closed => continue,
                Beat::NotDue { next_check } => next_check,
                Beat::Sent(Delivery::Queued { bytes }) => {
                    self.counters
                        .queued_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    beats.sent += 1;
                    current + 1
                }
                Beat::Sent(delivery) => {
                    if self.evict_if_failed(&peer, &delivery) {
                        continue;
                    }
                    beats.sent += 1;
                    current + 1
                }
            };
            requeue.push((peer, Some(next_check)));
        }
        if !requeue.is_empty() {
            let mut heartbeat = self.heartbeat.lock();
            let on = heartbeat.interval.is_some();
            for (peer, next_check) in requeue {
                match next_check {
                    Some(period) if on => {
                        heartbeat.queue.entry(period).or_default().push(peer);
                    }
                    // It had lost its keep-alive mode, and a subscribe gave it one again
                    // while it still counted as queued: due at the next tick.
                    None if on && peer.keepalive().is_some() => {
                        heartbeat.queue.entry(current).or_default().push(peer);
                    }
                    // Heartbeats off, or no keep-alive mode: out of the queue until a
                    // subscribe or `set_heartbeat` queues it again.
                    _ => peer.set_heartbeat_queued(false),
                }
            }
        }
        beats
    }

    /// Arms the reactor's timer for the earliest deadline: the next heartbeat or the
    /// backend's next reconnect.
    pub(super) fn arm_timer(&self) {
        let heartbeat = self.heartbeat.lock().next_due;
        let broker = self.broker.read().clone();
        let reconnect = broker.and_then(|broker| broker.deadline());
        let deadline = match (heartbeat, reconnect) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.reactor
            .set_timer(deadline.map(|deadline| deadline.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_tick_examines_the_fds_with_keepalives_not_every_subscription() {
        let registry = Registry::new().unwrap();
        let raw = File::options().write(true).open("/dev/null").unwrap();
        for topic in 0..10_000 {
            let topic = format!("raw/{topic}");
            registry
                .subscribe(topic.as_bytes(), raw.as_raw_fd(), Mode::Raw)
                .unwrap();
        }
        let (ws, _ws_peer) = UnixStream::pair().unwrap();
        let (sse, _sse_peer) = UnixStream::pair().unwrap();
        registry
            .subscribe(b"a", ws.as_raw_fd(), Mode::WsText)
            .unwrap();
        registry.subscribe(b"b", ws.as_raw_fd(), Mode::Sse).unwrap();
        registry
            .subscribe(b"a", sse.as_raw_fd(), Mode::Sse)
            .unwrap();
        let interval = Duration::from_secs(3600);
        registry.set_heartbeat(Some(interval));

        let first = registry.beat_if_due(Instant::now() + interval);
        assert_eq!((first.sent, first.examined), (2, 2));
        // Both were just sent a keep-alive: neither is idle for the whole next period.
        let second = registry.beat_if_due(Instant::now() + 2 * interval);
        assert_eq!((second.sent, second.examined), (0, 0));
        let third = registry.beat_if_due(Instant::now() + 3 * interval);
        assert_eq!((third.sent, third.examined), (2, 2));
    }

    #[test]
    fn an_fd_leaves_the_queue_with_its_last_keepalive_mode_and_comes_back_with_one() {
        let registry = Registry::new().unwrap();
        let (ws, ws_peer) = UnixStream::pair().unwrap();
        ws_peer.set_nonblocking(true).unwrap();
        let interval = Duration::from_secs(3600);
        registry.set_heartbeat(Some(interval));
        let id = registry
            .subscribe(b"t", ws.as_raw_fd(), Mode::WsText)
            .unwrap();
        registry.subscribe(b"t", ws.as_raw_fd(), Mode::Raw).unwrap();
        let mut at = Instant::now();
        let mut beat = || {
            at += 2 * interval;
            let beats = registry.beat_if_due(at);
            (beats.sent, beats.examined)
        };
        assert_eq!(beat(), (0, 1), "looked at once, then dropped");
        assert_eq!(beat(), (0, 0));
        registry.subscribe(b"t", ws.as_raw_fd(), Mode::Sse).unwrap();
        assert_eq!(beat(), (1, 1));
        let mut got = [0; 16];
        assert_eq!((&ws_peer).read(&mut got).unwrap(), SSE_COMMENT.len());

        registry.set_heartbeat(None);
        registry.set_heartbeat(Some(interval));
        // Queued again; it took a keep-alive in the period before, so is not due until the
        // next.
        assert_eq!(beat(), (0, 1));
        assert_eq!(beat(), (1, 1));
        registry.unsubscribe(id).unwrap();
        assert_eq!(beat(), (0, 0));
        assert_eq!(
            beat(),
            (0, 1),
            "forgotten: looked at once more, and dropped"
        );
        assert_eq!(beat(), (0, 0));
    }
}
