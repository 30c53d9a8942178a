//! Embedding in the host's event loop, outbox settings and statistics.

use std::ffi::c_int;
use std::time::Duration;

use super::boundary::{boundary, fill_optional, registry, returning_i64, returning_status};
use super::{OverflowArg, fdcast, fdcast_stats, overflow_from_c};
use crate::error::Error;

/// An fd for the host's own poll/epoll/select/libuv loop, to watch for readability: it
/// becomes readable when fdcast has work (an fd with queued bytes became writable, or
/// fdcast_wake() was called); then call fdcast_dispatch(fc, 0). It is an epoll fd owned by
/// the registry: do not read, write or close it. Like libuv's backend fd it is not valid in
/// a child after fork(), and is Linux-only.
///
/// Returns the fd, or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_fd(fc: *const fdcast) -> c_int {
    boundary(-libc::EIO, || {
        // SAFETY: the header requires NULL or a live handle.
        match unsafe { registry(fc) } {
            Ok(registry) => registry.poll_fd(),
            Err(_) => -libc::EINVAL,
        }
    })
}

/// Does fdcast's pending work: waits up to `timeout_ms` for it (0: return at once; -1, or any
/// negative value: wait until there is work), then flushes every outbox whose fd can take
/// bytes, evicting fds whose peer is gone (the evict callback runs on this thread).
///
/// A host without an event loop calls fdcast_dispatch(fc, -1) in a loop on a thread of its
/// own, and stops it with fdcast_wake().
///
/// Returns how many fds it served (0 on timeout, on fdcast_wake() or on EINTR), or -EINVAL
/// (NULL `fc`), -EBUSY (another thread is waiting in fdcast_dispatch).
///
/// Thread: one thread at a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_dispatch(fc: *mut fdcast, timeout_ms: c_int) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        Ok(registry.dispatch(timeout)? as i64)
    })
}

/// Makes fdcast_fd() readable and a fdcast_dispatch() that is waiting return (with 0), e.g.
/// to stop a dispatch thread. Safe to call from a signal handler's thread but not from the
/// handler itself.
///
/// Returns 0 or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_wake(fc: *mut fdcast) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        unsafe { registry(fc)? }.wake();
        Ok(())
    })
}

/// Keeps idle streams alive through proxies that cut silent connections: every
/// `interval_ms` milliseconds (0 turns it off, the default), fdcast_dispatch() sends an empty
/// WebSocket ping (0x89 0x00) to each WebSocket-mode subscriber (the _ID modes too) and an SSE
/// comment line (":\n\n", which EventSource ignores) to each FDCAST_SSE subscriber that has
/// taken no frame for a whole interval and has nothing queued. A timerfd inside fdcast_fd()
/// makes it readable when a heartbeat is due, so the host needs no timer. Keep-alive frames
/// go through the fd's outbox like any frame but are not counted as deliveries; a peer found
/// gone is evicted.
///
/// Returns 0 or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_heartbeat(fc: *mut fdcast, interval_ms: u32) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        registry.set_heartbeat(Some(Duration::from_millis(u64::from(interval_ms))));
        Ok(())
    })
}

/// Returns the number of bytes queued for `fd`, frames gathered for it while corked included
/// (0 when none or the fd is unknown), or
/// -EINVAL (NULL `fc`), -EBADF (negative `fd`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_pending_bytes(fc: *const fdcast, fd: c_int) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        Ok(registry.pending_bytes(fd)? as i64)
    })
}

/// Sets the per-fd bound on queued bytes (default FDCAST_DEFAULT_OUTBOX_LIMIT, 1 MiB). It is
/// checked before a frame's first byte is written: on an empty outbox a frame is always
/// attempted and its unwritten rest queued whatever its size; on a non-empty outbox a frame
/// that would push the queued bytes past the limit triggers the overflow policy. 0 queues
/// nothing but the rest of a started frame. Applies to later publishes and sends.
///
/// Returns 0 or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_outbox_limit(fc: *mut fdcast, bytes: usize) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        unsafe { registry(fc)? }.set_outbox_limit(bytes);
        Ok(())
    })
}

/// Sets the overflow policy (default FDCAST_DROP_MESSAGE) for later publishes and sends.
///
/// Returns 0 or -EINVAL (NULL `fc`; `policy` not an fdcast_overflow).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_overflow(fc: *mut fdcast, policy: OverflowArg) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        registry.set_overflow(overflow_from_c(policy)?);
        Ok(())
    })
}

/// Sets whether every write to an fd first checks, with one `fstat(2)`, that the fd still
/// names the file it named when fdcast first saw it (`on` 1; default 0). An fd the host closed
/// without fdcast_unsubscribe_fd, whose number a new connection then took, is forgotten before
/// a byte meant for the old connection reaches the new one (no evict callback: the number is
/// the new connection's). What remains is the instant between the check and the write. Off,
/// bytes meant for the old connection reach the new one until the number's next
/// fdcast_subscribe or fdcast_send, which forgets the old connection's state first. Applies
/// to later writes, queued bytes included.
///
/// Returns 0 or -EINVAL (NULL `fc`; `on` not 0 or 1).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_fd_check(fc: *mut fdcast, on: c_int) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        let on = match on {
            0 => false,
            1 => true,
            _ => return Err(Error::InvalidArgument("fd check: on must be 0 or 1")),
        };
        registry.set_fd_check(on);
        Ok(())
    })
}

/// Fills `*out` with the registry's counters and gauges. A NULL `out` is a no-op; a NULL
/// `fc` fills `*out` with zeros.
///
/// Thread: any; the fields are read one by one, not as one atomic snapshot.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_get_stats(fc: *const fdcast, out: *mut fdcast_stats) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        let stats = unsafe { registry(fc) }
            .map(|registry| registry.stats())
            .unwrap_or_default();
        // SAFETY: the header requires NULL or a pointer to a writable fdcast_stats.
        unsafe {
            fill_optional(
                out,
                fdcast_stats {
                    publishes: stats.publishes,
                    deliveries: stats.deliveries,
                    dropped_messages: stats.dropped_messages,
                    evicted_fds: stats.evicted_fds,
                    queued_bytes: stats.queued_bytes,
                    subscriptions: stats.subscriptions,
                    topics: stats.topics,
                    fds: stats.fds,
                    lost_to_gaps: stats.lost_to_gaps,
                },
            )
        };
    })
}
