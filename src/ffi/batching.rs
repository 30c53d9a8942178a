//! Corking: queue a burst of frames, then write each fd's share in one system call.

use std::ffi::c_int;

use super::boundary::{registry, returning_i64, returning_status};
use super::fdcast;

/// Corks the registry: from now on fdcast_publish, fdcast_publish_except and fdcast_send
/// queue their frames instead of writing them (the outbox limit and overflow policy still
/// apply, and nothing is torn). fdcast_fd() becomes readable as soon as frames are queued, and
/// fdcast_dispatch() writes them, so a host that stays corked gets one write per fd per loop
/// iteration carrying every frame queued for it, as Redis does before it sleeps. Ordering per
/// fd is unchanged. Corking twice is the same as once.
///
/// Corked publishes are gathered per topic: for subscribers whose only subscription is that
/// topic, a publish appends its frame once to the topic's batch, and a flush hands each of
/// them the whole batch as one chunk (README: Corking). Limits, drops, evictions, counters,
/// fdcast_pending_bytes() and ordering are as if each frame were queued per fd.
///
/// Out of memory, a corked publish does what one that writes at once does: a frame for
/// which a payload-sized buffer cannot be had is dropped for the fds it could not be
/// gathered for and counted in dropped_messages; nothing is written in part, and the publish
/// still returns how many subscribers matched. A flush needs no new memory for the frames.
///
/// Returns 0 or -EINVAL (NULL `fc`).
///
/// Thread: any; a publish running concurrently may still write at once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_cork(fc: *mut fdcast) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        unsafe { registry(fc)? }.cork();
        Ok(())
    })
}

/// Writes everything queued while corked, at most one writev/sendmsg per fd per IOV_MAX
/// frames, and returns to writing at once. What an fd does not take waits for writability
/// (fdcast_dispatch). Fds found dead are evicted (the evict callback runs on this thread).
///
/// Returns the number of fds written to, or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_uncork(fc: *mut fdcast) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        Ok(unsafe { registry(fc)? }.uncork() as i64)
    })
}

/// Writes everything queued while corked, like fdcast_uncork(), but stays corked.
///
/// Returns the number of fds written to, or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_flush(fc: *mut fdcast) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        Ok(unsafe { registry(fc)? }.flush() as i64)
    })
}
