//! Keep-alive frames for idle WebSocket and SSE subscribers, and the reactor's timer.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Registry;
use crate::frame::{Frame, Mode};
use crate::outbox::{Delivery, Peer};

#[derive(Default)]
pub(super) struct Heartbeat {
    interval: Option<Duration>,
    next_due: Option<Instant>,
}

/// The keep-alive frames: an empty WebSocket ping, and an SSE comment line, which
/// EventSource ignores.
const WEBSOCKET_PING: &[u8] = &[0x89, 0x00];
const SSE_COMMENT: &[u8] = b":\n\n";

impl Registry {
    /// Keeps idle streams alive through proxies: every `interval` (`None`: never, the
    /// default), `dispatch` sends an empty ping to each WebSocket subscriber and an SSE comment
    /// line (`:\n\n`) to each SSE subscriber that has taken no frame for a whole interval and
    /// has nothing queued. The reactor's timer makes `poll_fd` readable when one is due.
    pub fn set_heartbeat(&self, interval: Option<Duration>) {
        {
            let mut heartbeat = self.heartbeat.lock();
            heartbeat.interval = interval.filter(|interval| !interval.is_zero());
            heartbeat.next_due = heartbeat.interval.map(|interval| Instant::now() + interval);
        }
        self.arm_timer();
    }

    /// Sends the keep-alive frames if they are due; returns how many fds got one.
    pub(super) fn beat_if_due(&self) -> usize {
        let ended = {
            let mut heartbeat = self.heartbeat.lock();
            let (Some(interval), Some(due)) = (heartbeat.interval, heartbeat.next_due) else {
                return 0;
            };
            let now = Instant::now();
            if now < due {
                return 0;
            }
            heartbeat.next_due = Some(now + interval);
            // Writes in the period that ends now were stamped with its tick; an fd stamped
            // earlier has been idle for at least a whole interval.
            self.heartbeat_tick.fetch_add(1, Ordering::Relaxed)
        };
        let current = ended + 1;
        let mut keepalive: HashMap<RawFd, (Arc<Peer>, Mode)> = HashMap::new();
        self.index.read().for_each_subscriber(|subscriber| {
            let mode = match subscriber.mode {
                Mode::WsText | Mode::WsBinary => Mode::WsBinary,
                Mode::Sse => Mode::Sse,
                Mode::Raw => return,
            };
            let entry = keepalive
                .entry(subscriber.fd)
                .or_insert_with(|| (Arc::clone(&subscriber.peer), mode));
            // A WebSocket ping wins over an SSE comment on an fd subscribed both ways.
            if mode == Mode::WsBinary {
                entry.1 = mode;
            }
        });
        let ping = Frame::encode(Mode::Raw, WEBSOCKET_PING).expect("RAW frames allocate nothing");
        let comment = Frame::encode(Mode::Raw, SSE_COMMENT).expect("RAW frames allocate nothing");
        let mut sent = 0;
        for (peer, mode) in keepalive.into_values() {
            let frame = if mode == Mode::Sse { &comment } else { &ping };
            match peer.heartbeat(frame, ended - 1, current, &self.reactor) {
                None => {}
                Some(Delivery::Queued { bytes }) => {
                    self.counters
                        .queued_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    sent += 1;
                }
                Some(delivery) => sent += usize::from(!self.evict_if_failed(&peer, &delivery)),
            }
        }
        sent
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
