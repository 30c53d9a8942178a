//! Forgetting fds and evicting dead ones: the one place that turns a failed delivery into an
//! eviction, and the one that carries it out.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Registry;
use crate::index::Index;
use crate::io;
use crate::outbox::{Delivery, Peer};

/// A peer to evict, and why.
pub(super) struct Eviction {
    pub(super) peer: Arc<Peer>,
    pub(super) cause: Cause,
}

pub(super) enum Cause {
    /// The peer is gone or its outbox overflowed: the host is told `reason` (a positive
    /// errno), and the stream is ended first when `shut_down`.
    Failed { reason: i32, shut_down: bool },
    /// The fd number names another file: the old file's subscriptions and bytes are dropped
    /// without a word to the host (whose fd that number now is) or a touch of the new file,
    /// as the reuse guard of subscribe and send does.
    Reused,
}

impl Eviction {
    /// The eviction a delivery's outcome calls for, if any: an overflow under
    /// [`crate::Overflow::Evict`], a failed write, or a reused fd number. Every write path
    /// (publish, send, heartbeat, flush) decides it here.
    pub(super) fn after(peer: &Arc<Peer>, delivery: &Delivery) -> Option<Eviction> {
        let cause = match *delivery {
            // The policy ends the stream: the fd's queued bytes, perhaps the rest of a started
            // frame, are dropped with it.
            Delivery::Overflowed => Cause::Failed {
                reason: libc::ENOBUFS,
                shut_down: true,
            },
            // A started frame whose rest could not be kept: end the stream, so the peer sees
            // EOF rather than a frame that never completes.
            Delivery::Failed(errno) => Cause::Failed {
                reason: errno,
                shut_down: errno == libc::ENOMEM,
            },
            Delivery::Reused => Cause::Reused,
            _ => return None,
        };
        Some(Eviction {
            peer: Arc::clone(peer),
            cause,
        })
    }
}

impl Registry {
    /// Evicts `peer` if `delivery` calls for it; returns whether it did.
    pub(super) fn evict_if_failed(&self, peer: &Arc<Peer>, delivery: &Delivery) -> bool {
        match Eviction::after(peer, delivery) {
            Some(eviction) => {
                self.evict(eviction);
                true
            }
            None => false,
        }
    }

    /// Evicts a peer whose write failed or whose outbox overflowed under
    /// [`Overflow::Evict`], then tells the host, with no lock held; forgets one whose fd
    /// number names another file now, telling no one. A peer already forgotten
    /// (by the host, or by another thread's eviction) is left alone and not reported twice.
    pub(super) fn evict(&self, eviction: Eviction) {
        let Eviction { peer, cause } = eviction;
        let reason = {
            let mut index = self.write_index();
            if !index
                .peer(peer.fd)
                .is_some_and(|current| Arc::ptr_eq(current, &peer))
            {
                return;
            }
            self.forget(&mut index, peer.fd);
            match cause {
                Cause::Failed { reason, shut_down } => {
                    if shut_down {
                        io::shutdown(peer.fd, peer.identity.kind);
                    }
                    reason
                }
                Cause::Reused => return,
            }
        };
        self.counters.evicted_fds.fetch_add(1, Ordering::Relaxed);
        let callback = self.on_evict.read().clone();
        if let Some(on_evict) = callback {
            on_evict(peer.fd, reason);
        }
    }

    /// Drops `fd`'s subscriptions and queued bytes; returns how many subscriptions it had.
    pub(super) fn forget(&self, index: &mut Index<Peer>, fd: RawFd) -> usize {
        match index.remove_peer(fd) {
            Some((peer, subscriptions)) => {
                peer.close(&self.reactor, &self.counters.queued_bytes);
                subscriptions
            }
            None => 0,
        }
    }

    /// Forgets an fd that has neither subscriptions nor queued bytes, so the index only holds
    /// fds with something to do.
    pub(super) fn forget_if_unused(&self, index: &mut Index<Peer>, fd: RawFd) {
        if index.subscriptions_of(fd) > 0 {
            return;
        }
        if index
            .peer(fd)
            .is_some_and(|peer| peer.close_if_idle(&self.reactor))
        {
            index.remove_peer(fd);
        }
    }
}
