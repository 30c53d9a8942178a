//! Publishing to a topic, and sending to one fd.

use std::ffi::{c_char, c_int, c_void};

use super::boundary::{bytes, registry, returning_i64, returning_status};
use super::{ModeArg, fdcast, mode_from_c};

/// Writes `payload[0..len)` (0 bytes allowed), framed per subscriber mode, to every
/// subscriber of `topic[0..topic_len)`. Equivalent to fdcast_publish_except(..., -1).
///
/// Each frame is encoded once per mode. Writes never block: what the kernel does not take
/// waits in the fd's outbox (flushed by fdcast_dispatch), and a frame once started is always
/// completed, so readers never see a torn frame. A frame that would push a non-empty outbox
/// past the outbox limit is handled by the overflow policy. A subscriber whose write reports
/// the peer gone (EPIPE, ECONNRESET, ENOTCONN, EBADF, or any other hard error) is evicted,
/// and the evict callback runs on this thread before this call returns. Never raises
/// SIGPIPE.
///
/// Ownership: `topic` and `payload` are only read during the call; fdcast copies what it
/// queues.
///
/// Returns how many subscribers matched (0 when none; evicted and overflowing ones count),
/// or -EINVAL (NULL `fc`; NULL `topic`; bad `topic_len`; NULL `payload` with `len` > 0),
/// -EILSEQ (the payload is not valid UTF-8 and a FDCAST_WS_TEXT, FDCAST_WS_TEXT_ID or
/// FDCAST_SSE subscriber would receive it: nothing was written to anyone).
///
/// Thread: any; publishes to different topics run in parallel.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_publish(
    fc: *mut fdcast,
    topic: *const c_char,
    topic_len: usize,
    payload: *const c_void,
    len: usize,
) -> i64 {
    // SAFETY: forwarded with the same contract.
    unsafe { fdcast_publish_except(fc, topic, topic_len, payload, len, -1) }
}

/// fdcast_publish(), skipping the subscriber `except_fd` (typically the sender of a chat
/// message), which is not counted. `except_fd` -1 (or any negative value) skips none.
///
/// Returns as fdcast_publish().
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_publish_except(
    fc: *mut fdcast,
    topic: *const c_char,
    topic_len: usize,
    payload: *const c_void,
    len: usize,
    except_fd: c_int,
) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle, `topic_len` readable topic bytes and
        // `len` readable payload bytes.
        let (registry, topic, payload) = unsafe {
            (
                registry(fc)?,
                bytes(topic.cast(), topic_len, "topic is NULL")?,
                bytes(payload.cast(), len, "payload is NULL with a non-zero len")?,
            )
        };
        let except = (except_fd >= 0).then_some(except_fd);
        let matched = registry.publish_except(topic, payload, except)?;
        Ok(matched as i64)
    })
}

/// Writes one frame of `payload[0..len)`, framed per `mode`, to `fd`, subscribed or not,
/// through the same outbox as broadcasts, so it never overtakes or splits queued frames. Use
/// it instead of write(2) on any fd fdcast may hold queued bytes for (e.g. to answer an HTTP
/// request on a connection that is also subscribed). Like fdcast_subscribe, it sets
/// O_NONBLOCK on an fd that is not a socket, and applies the fd-reuse guard. A frame sent
/// in FDCAST_WS_TEXT_ID or FDCAST_WS_BINARY_ID has an empty id: a LF, then the payload.
///
/// Returns 0 when the frame was written or queued, or -EINVAL (NULL `fc`; NULL `payload`
/// with `len` > 0; `mode` not an fdcast_mode), -EBADF (`fd` negative or not open), -EILSEQ
/// (FDCAST_WS_TEXT, FDCAST_WS_TEXT_ID or FDCAST_SSE with a payload that is not valid UTF-8),
/// -ENOBUFS (the outbox is full: the frame was dropped, or under FDCAST_EVICT the fd was evicted), or the
/// peer's errno (e.g. -EPIPE, -ECONNRESET) when the peer is gone, after evicting the fd and
/// calling the evict callback.
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_send(
    fc: *mut fdcast,
    fd: c_int,
    mode: ModeArg,
    payload: *const c_void,
    len: usize,
) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle and `len` readable payload bytes.
        let (registry, payload) = unsafe {
            (
                registry(fc)?,
                bytes(payload.cast(), len, "payload is NULL with a non-zero len")?,
            )
        };
        registry.send(fd, mode_from_c(mode)?, payload)
    })
}
