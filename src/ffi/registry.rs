//! Creating and releasing a registry, and its subscriptions.

use std::ffi::{c_char, c_int};
use std::ptr;

use super::boundary::{
    boundary, bytes, free_handle, int_array, last_error, new_handle, registry, returning_i64,
    returning_status, set_last_error,
};
use super::{ModeArg, fdcast, mode_from_c};
use crate::registry::Registry;

/// Creates an empty registry with its own poller (one epoll fd, owned by the registry).
///
/// Returns the handle, or NULL if memory or the poller could not be had (then
/// fdcast_last_error() says why). Release it with fdcast_free().
///
/// Thread: any.
#[must_use]
#[unsafe(no_mangle)]
pub extern "C" fn fdcast_new() -> *mut fdcast {
    boundary(ptr::null_mut(), || match Registry::new() {
        Ok(registry) => new_handle(registry),
        Err(err) => {
            set_last_error(&format!("cannot create the poller: {err}"));
            ptr::null_mut()
        }
    })
}

/// Releases a registry: every subscription, every queued byte and its poller. Closes no host
/// fd. NULL is a no-op.
///
/// Thread: any, but no other call on `fc` may be in flight, and `fc` is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_free(fc: *mut fdcast) {
    boundary((), || {
        // SAFETY: the header requires NULL or a handle from fdcast_new, freed once with no
        // call in flight.
        unsafe { free_handle(fc) }
    })
}

/// The version of the library actually loaded, e.g. "0.1.0" (compare FDCAST_VERSION_STRING,
/// the version of the header compiled against). A static string: do not free it.
///
/// Thread: any.
#[unsafe(no_mangle)]
pub extern "C" fn fdcast_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A human-readable detail for the last failing fdcast call on this thread (for example which
/// argument was wrong), or "" if none has failed. Never NULL.
///
/// Ownership: the string belongs to the library and stays valid until the next failing call
/// on this thread; copy it to keep it. Successful calls do not clear it.
///
/// Thread: any; each thread has its own message.
#[unsafe(no_mangle)]
pub extern "C" fn fdcast_last_error() -> *const c_char {
    boundary(c"".as_ptr(), last_error)
}

/// Subscribes `fd` to the topic `topic[0..topic_len)` (any bytes, NUL included, 1 to
/// FDCAST_MAX_TOPIC_LEN of them), with frames built per `mode`.
///
/// Idempotent per (topic, fd): subscribing again returns the same id and sets the mode. The
/// authorizer, if set, runs on every call whose arguments are valid, before anything changes.
/// If `fd` is not a socket (a pipe, FIFO or character device), fdcast sets O_NONBLOCK on it,
/// since only sockets can be written non-blocking per call. If `fd` is known but now refers
/// to a different open file than when fdcast first saw it (closed and reused without
/// fdcast_unsubscribe_fd), the old file's subscriptions and queued bytes are dropped first.
/// The fd stays the host's: fdcast never closes it.
///
/// Returns the subscription id (> 0), or -EINVAL (NULL `fc`; NULL `topic`; `topic_len` 0 or
/// over FDCAST_MAX_TOPIC_LEN; `mode` not an fdcast_mode), -EBADF (`fd` negative or not open),
/// -EACCES (the authorizer refused), -ENOSPC (2^63 - 1 ids were handed out: an id is never
/// handed out twice, so a stale one names nothing).
///
/// Thread: any.
#[must_use]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_subscribe(
    fc: *mut fdcast,
    topic: *const c_char,
    topic_len: usize,
    fd: c_int,
    mode: ModeArg,
) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle and `topic_len` readable bytes.
        let (registry, topic) = unsafe {
            (
                registry(fc)?,
                bytes(topic.cast(), topic_len, "topic is NULL")?,
            )
        };
        let mode = mode_from_c(mode)?;
        registry.subscribe(topic, fd, mode).map(|id| id as i64)
    })
}

/// Removes the subscription `sub_id`. Frames already queued for its fd stay queued and are
/// delivered.
///
/// Returns 0, -EINVAL (NULL `fc`) or -ENOENT (no subscription has that id).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_unsubscribe(fc: *mut fdcast, sub_id: i64) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        let id = u64::try_from(sub_id).map_err(|_| crate::Error::NotFound)?;
        registry.unsubscribe(id)
    })
}

/// Forgets `fd`: drops every subscription of it and every byte queued for it, a partly
/// written frame included. Call it when the connection is closing, before close(2). Costs
/// O(subscriptions of `fd`), whatever the registry's size. The evict callback is not called.
///
/// Returns how many subscriptions it dropped (0 for an unknown fd), -EINVAL (NULL `fc`) or
/// -EBADF (negative `fd`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_unsubscribe_fd(fc: *mut fdcast, fd: c_int) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        registry.unsubscribe_fd(fd).map(|count| count as i64)
    })
}

/// Drops every subscription and every queued byte. NULL is a no-op. The evict callback is not
/// called. Kept history stays (fdcast_set_history(fc, 0, 0, 0) drops it).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_clear(fc: *mut fdcast) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        if let Ok(registry) = unsafe { registry(fc) } {
            registry.clear();
        }
    })
}

/// Returns the number of live subscriptions, or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_subscriber_count(fc: *const fdcast) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        Ok(registry.subscriber_count() as i64)
    })
}

/// Lists the fds subscribed to `topic[0..topic_len)`: writes up to `cap` of them to `fds`, in
/// no particular order, and returns how many there are (which may exceed `cap`: call again
/// with a larger array). `fds` may be NULL when `cap` is 0, to count only.
///
/// Returns the count, or -EINVAL (NULL `fc`; NULL `topic`; bad `topic_len`; NULL `fds` with
/// `cap` > 0).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_subscribers_for(
    fc: *const fdcast,
    topic: *const c_char,
    topic_len: usize,
    fds: *mut c_int,
    cap: usize,
) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle, `topic_len` readable bytes and `cap`
        // writable ints.
        let (registry, topic, fds) = unsafe {
            (
                registry(fc)?,
                bytes(topic.cast(), topic_len, "topic is NULL")?,
                int_array(fds, cap)?,
            )
        };
        registry
            .subscribers_into(topic, fds)
            .map(|count| count as i64)
    })
}
