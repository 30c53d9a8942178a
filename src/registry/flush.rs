//! Cork, flush and dispatch: writing what the outboxes and corked batches hold.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Registry;
use crate::error::Error;
use crate::outbox::{Delivery, Flush, Peer};

/// What flushes wrote: bytes off the queued gauge, and frames completed.
#[derive(Default)]
pub(super) struct Flushed {
    bytes: u64,
    frames: u64,
}

impl Registry {
    /// The fd to add to the host's event loop for readability: it becomes readable when an
    /// fd with queued bytes becomes writable.
    pub fn poll_fd(&self) -> RawFd {
        self.reactor.poll_fd()
    }

    /// Makes a waiting (or the next) `dispatch` return, and `poll_fd` readable until it does.
    pub fn wake(&self) {
        self.reactor.wake();
    }

    /// Waits up to `timeout` (`None`: until there is work), then flushes the outboxes that can
    /// take bytes and, while corked, every frame queued since the last flush. Returns how
    /// many fds it served.
    pub fn dispatch(&self, timeout: Option<Duration>) -> Result<usize, Error> {
        let mut ready = Vec::new();
        let timeout = if self.flush_list.lock().is_empty() && !self.batches.lock().has_frames() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let wakeups = self.reactor.wait(timeout, &mut ready)?;
        let mut served = 0;
        if wakeups.backend || wakeups.timer {
            served += self.broker_service();
        }
        if wakeups.timer {
            // Batch members are not idle and get no heartbeat: end the batches first, so
            // that those whose topic went quiet get theirs.
            self.spill_batches();
            served += self.beat_if_due(Instant::now()).sent;
            self.arm_timer();
        }
        let mut flushed = Flushed::default();
        for fd in ready {
            let Some(peer) = self.index.read().peer(fd).cloned() else {
                continue;
            };
            served += 1;
            self.flush_peer(&peer, &mut flushed);
        }
        self.count_flushed(flushed);
        Ok(served + self.flush())
    }

    /// Corks the registry: from now on publishes and sends queue their frames (under the same
    /// outbox limit and overflow policy) instead of writing them, until [`Registry::flush`],
    /// [`Registry::uncork`] or a `dispatch` writes them, one system call per fd.
    pub fn cork(&self) {
        self.corked.store(true, Ordering::Relaxed);
    }

    /// Writes everything queued and returns to writing at once; returns how many fds it
    /// wrote to.
    pub fn uncork(&self) -> usize {
        self.corked.store(false, Ordering::Relaxed);
        self.flush_and_spill()
    }

    /// Flushes, then ends the batches: their members stay members past a flush, and
    /// uncorked, nothing gathers.
    pub(super) fn flush_and_spill(&self) -> usize {
        let written = self.flush();
        self.spill_batches();
        written
    }

    /// Writes every frame queued while corked, at most one system call per fd per IOV_MAX
    /// frames, staying corked; returns how many fds it wrote to.
    pub fn flush(&self) -> usize {
        let mut handed_over = Vec::new();
        {
            let mut batches = self.batches.lock();
            if !batches.is_empty() {
                let tick = self.heartbeat_tick.load(Ordering::Relaxed);
                batches.hand_over_all(&self.counters.queued_bytes, tick, &mut handed_over);
            }
        }
        let mut peers = std::mem::take(&mut *self.flush_list.lock());
        peers.extend(handed_over);
        let mut flushed = Flushed::default();
        let written = peers
            .iter()
            .filter(|peer| self.flush_peer(peer, &mut flushed))
            .count();
        self.count_flushed(flushed);
        written
    }

    /// Moves every corked batch's frames into its members' outboxes and ends the batches;
    /// the members join the flush list.
    pub(super) fn spill_batches(&self) {
        let mut awaiting = Vec::new();
        {
            let mut batches = self.batches.lock();
            if !batches.is_empty() {
                batches.spill_all(&self.counters.queued_bytes, &mut awaiting);
            }
        }
        self.await_flush(awaiting);
    }

    /// Writes what `peer` has queued and settles the outcome: deliveries counted, an fd left
    /// with nothing to do forgotten, a dead one evicted. An fd behind on topics with history
    /// is refilled from them each time its outbox drains, and written again. Returns whether any byte
    /// was written. `totals` gathers the counters' share, for [`Registry::count_flushed`] to
    /// add once per batch of flushes.
    pub(super) fn flush_peer(&self, peer: &Arc<Peer>, totals: &mut Flushed) -> bool {
        let mut wrote = false;
        loop {
            let outcome = peer.flush(self.fd_check.load(Ordering::Relaxed), &self.reactor);
            if let Flush::Progress { bytes, frames, .. } | Flush::Failed { bytes, frames, .. } =
                outcome
            {
                totals.bytes += bytes as u64;
                totals.frames += frames as u64;
                wrote |= bytes > 0;
            }
            match outcome {
                Flush::Progress { drained, .. } => {
                    // Refilled only once drained: whole refills of up to the outbox limit, and
                    // a refill's size that depends only on what was queued, not on how much
                    // the kernel happened to take.
                    if drained && peer.lagging() > 0 && self.catch_up(peer) {
                        continue;
                    }
                    // Only an fd without subscriptions is forgotten once drained; checking
                    // the count first keeps the index lock out of every corked flush.
                    if drained && peer.subscriptions() == 0 {
                        let mut index = self.write_index();
                        if index
                            .peer(peer.fd)
                            .is_some_and(|current| Arc::ptr_eq(current, peer))
                        {
                            self.forget_if_unused(&mut index, peer.fd);
                        }
                    }
                    return wrote;
                }
                Flush::Failed { errno, .. } => {
                    self.evict_if_failed(peer, &Delivery::Failed(errno));
                    return false;
                }
                Flush::Reused => {
                    self.evict_if_failed(peer, &Delivery::Reused);
                    return false;
                }
            }
        }
    }

    pub(super) fn count_flushed(&self, totals: Flushed) {
        if totals.bytes > 0 {
            self.counters
                .queued_bytes
                .fetch_sub(totals.bytes, Ordering::Relaxed);
        }
        if totals.frames > 0 {
            self.counters
                .deliveries
                .fetch_add(totals.frames, Ordering::Relaxed);
        }
    }

    /// Puts peers that just got their first corked frame on the flush list, and makes
    /// `poll_fd` readable when the list stops being empty, so the host's loop dispatches.
    pub(super) fn await_flush(&self, peers: Vec<Arc<Peer>>) {
        if peers.is_empty() {
            return;
        }
        let was_empty = {
            let mut list = self.flush_list.lock();
            let was_empty = list.is_empty();
            list.extend(peers);
            was_empty
        };
        if was_empty {
            self.reactor.wake();
        }
    }
}
