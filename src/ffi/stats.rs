//! Per-fd counters: what fdcast did with one fd's frames.

use std::ffi::c_int;

use super::boundary::{out_param, registry, returning_status};
use super::fdcast;

/// One fd's counters, filled by fdcast_fd_stats() (the struct is named apart from the
/// function: C has one namespace for both). Every frame a publish, replay or send
/// meant for the fd ends in exactly one of `delivered`, `dropped` or `lost_to_gaps`, is still
/// queued, or is still owed from a topic's history (`catching_up`), unless the host let it go
/// (unsubscribing the topic while the fd is behind on it, or forgetting the fd with bytes
/// queued); the registry-wide fdcast_stats counts the same events for all fds together.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct fdcast_fd_counters {
    /// Frames whose last byte reached the kernel (keep-alive frames aside).
    pub delivered: u64,
    /// Frames dropped by FDCAST_DROP_MESSAGE, or for lack of memory.
    pub dropped: u64,
    /// Messages of topics with history that the fd, having fallen behind, was owed and never
    /// got because they left the history first, or that a shared history's stream discarded
    /// before this process got them (each also told to the gap callback).
    pub lost_to_gaps: u64,
    /// Bytes waiting for the fd now (in its outbox, or gathered for it while corked).
    pub queued_bytes: u64,
    /// Topics the fd is behind on now, catching up from their history.
    pub catching_up: u64,
}

/// Fills `*out` with `fd`'s counters (see fdcast_fd_counters). Counters start when fdcast first
/// sees the fd (its first subscribe or send) and end when it forgets the fd (unsubscribe_fd,
/// clear, eviction, or an fd with no subscriptions whose outbox drained).
///
/// Returns 0, -EINVAL (NULL `fc` or `out`), -EBADF (negative `fd`) or -ENOENT (an fd fdcast
/// does not know). `*out` is written only on success.
///
/// Thread: any; the fields are read together under the fd's lock, `queued_bytes` a moment
/// later.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn fdcast_fd_stats(
    fc: *const fdcast,
    fd: c_int,
    out: *mut fdcast_fd_counters,
) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires NULL or a live handle.
        let registry = unsafe { registry(fc)? };
        let out = out_param(out, "out is NULL")?;
        let stats = registry.fd_stats(fd)?;
        let stats = fdcast_fd_counters {
            delivered: stats.delivered,
            dropped: stats.dropped,
            lost_to_gaps: stats.lost_to_gaps,
            queued_bytes: stats.queued_bytes,
            catching_up: stats.catching_up,
        };
        // SAFETY: `out` is non-NULL, and the header requires it to point to a writable
        // fdcast_fd_counters.
        unsafe { out.write(stats) };
        Ok(())
    })
}
