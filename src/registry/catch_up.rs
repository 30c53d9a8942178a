//! Readers that fell behind on a topic with history catch up from it; gaps; per-fd counters.
//!
//! A subscriber whose outbox cannot take a message of a topic that keeps history is not
//! dropped from it: it falls behind, keeping a cursor into the topic's history (outbox.rs),
//! and the topic's live messages skip it. Each time a flush drains its outbox, the flush
//! refills the outbox from the history, from the cursor on, under the topic's ring
//! lock, which every publish to the topic holds from its id through its fan-out: the fd is
//! live again once the cursor passes the newest message, with no gap and no duplicate.
//!
//! Only messages that leave the history (its count, byte or age limit) before the fd got
//! them are lost: a gap, counted for the fd and the registry, and told to the gap callback
//! (fd, topic, how many) with no lock held; then the overflow policy applies: the fd goes on
//! from the oldest kept message, or is evicted.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Registry;
use super::evict::{Cause, Eviction};
use crate::error::Error;
use crate::outbox::{FdStats, Peer};

impl Registry {
    /// Refills `peer`'s outbox from the history of every topic it is behind on, as far as
    /// the outbox limit allows; reports gaps and evicts as the policy says once no lock is
    /// held. Returns whether it queued anything (for the caller to write).
    pub(super) fn catch_up(&self, peer: &Arc<Peer>) -> bool {
        let policy = self.write_policy();
        let (mut queued, mut dropped) = (0, 0);
        let mut gaps = Vec::new();
        for topic in peer.lagging_topics() {
            let ring = self.existing_history(&topic);
            // Ring, index, outbox: the lock order a publish follows.
            let mut ring = ring.as_ref().map(|ring| ring.lock());
            if let Some(ring) = &mut ring {
                // As a resume does: what is past the age limit is not caught up on.
                ring.evict(Instant::now());
            }
            let mode = self.index.read().mode_of(&topic, peer.fd);
            let caught = peer.catch_up(&topic, ring.as_deref(), mode, policy);
            drop(ring);
            queued += caught.queued as u64;
            dropped += caught.dropped;
            if caught.lost > 0 {
                gaps.push((topic, caught.lost, caught.evict));
            }
        }
        if queued > 0 {
            self.counters
                .queued_bytes
                .fetch_add(queued, Ordering::Relaxed);
        }
        if dropped > 0 {
            self.counters
                .dropped_messages
                .fetch_add(dropped, Ordering::Relaxed);
        }
        for (topic, lost, evict) in gaps {
            self.report_gap(peer, &topic, lost, evict);
        }
        queued > 0
    }

    /// Counts `lost` messages of `topic` that `peer` will never get, tells the gap callback,
    /// then evicts the fd if the overflow policy says so. Called with no lock held.
    pub(super) fn report_gap(&self, peer: &Arc<Peer>, topic: &[u8], lost: u64, evict: bool) {
        self.counters
            .lost_to_gaps
            .fetch_add(lost, Ordering::Relaxed);
        let callback = self.on_gap.read().clone();
        if let Some(on_gap) = callback {
            on_gap(peer.fd, topic, lost);
        }
        if evict {
            self.evict(Eviction {
                peer: Arc::clone(peer),
                cause: Cause::Failed {
                    reason: libc::ENOBUFS,
                    shut_down: true,
                },
            });
        }
    }

    /// Sets (or, with `None`, removes) the callback told of each gap: an fd that lost
    /// messages of a topic because they left the topic's history before it caught up, or
    /// because a shared history's stream discarded them before this process got them.
    pub fn set_gap_callback(&self, callback: Option<Box<GapCallback>>) {
        *self.on_gap.write() = callback.map(Arc::from);
    }

    /// `fd`'s counters: frames delivered and dropped, messages lost to gaps, bytes queued
    /// (those a corked batch gathered for it included) and how many topics it is catching
    /// up on. [`Error::NotFound`] for an fd the registry does not know (never subscribed or
    /// sent to, or forgotten since).
    pub fn fd_stats(&self, fd: RawFd) -> Result<FdStats, Error> {
        if fd < 0 {
            return Err(Error::BadFd);
        }
        let peer = self.index.read().peer(fd).cloned().ok_or(Error::NotFound)?;
        let mut stats = peer.stats();
        stats.queued_bytes = self.pending_bytes(fd)? as u64;
        Ok(stats)
    }
}

/// Told that an fd lost messages of a topic: how many left the topic's history before the fd,
/// which had fallen behind, caught up to them.
pub type GapCallback = dyn Fn(RawFd, &[u8], u64) + Send + Sync;
