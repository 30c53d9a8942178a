//! Per-topic history: keeping messages, their ids, and resuming after one.

use std::ffi::{c_char, c_int, c_void};
use std::time::Duration;

use super::boundary::{bytes, bytes_mut, fill_optional, registry, returning_i64, returning_status};
use super::{FDCAST_MAX_EVENT_ID_LEN, ModeArg, fdcast, mode_from_c};
use crate::error::Error;
use crate::frame::Mode;
use crate::history::{EventId, HistoryLimits};
use crate::registry::Registry;

/// Sets how much history every topic keeps; all three 0 (the default) turn history off and
/// drop every kept message. A limit of 0 does not bound: `max_messages` messages,
/// `max_bytes` payload bytes, `max_age_ms` milliseconds per topic, the oldest going first;
/// the newest message of a topic is kept even when it alone is over `max_bytes`. Memory is
/// bounded per topic; topics whose messages all aged out are dropped lazily (a later resume
/// from one of their ids then reports a foreign epoch).
///
/// With history on, every publish to a topic (subscribed or not, and those a broker brings
/// from other processes) keeps its payload once, however many readers, and gets an id:
/// `<epoch>-<offset>` in decimal, the epoch random per topic per registry life (so an id from
/// a restarted process or an earlier history is never mistaken for a current one), the
/// offset 1, 2, 3, ... per topic. FDCAST_SSE frames then start with the line
/// `id: <epoch>-<offset>\n` before their `data: ` lines, e.g. "id: 42-7\ndata: hi\n\n";
/// FDCAST_WS_TEXT_ID and FDCAST_WS_BINARY_ID frames carry "42-7\nhi" as their WebSocket
/// payload (see fdcast_mode); FDCAST_RAW, FDCAST_WS_TEXT and FDCAST_WS_BINARY frames are
/// unchanged. Publishes to one topic with history are serialized with each other
/// (publishes to other topics still run in parallel). Ids are per process (a broker's other
/// processes number the same messages their own way), except with a Redis broker, or a
/// NATS broker whose server runs JetStream:
///
/// Shared history (a `redis://` broker, Redis 7+, with history on): a topic's history is
/// the Redis stream at key `<name><topic>`, each entry's payload in its field `d`, and ids
/// are the stream's ids, `<ms>-<seq>`, the same in every process, ordered as (ms, seq)
/// pairs. A publish adds to the stream (XADD MAXLEN ~ max_messages; with no count limit,
/// MINID ~ now - max_age_ms; with neither, MAXLEN ~ 1000), PUBLISHes the raw payload on the
/// topic's channel and SPUBLISHes `<id> <payload>` on the same name in the shard channel
/// space, in one script; every process (the publisher included, when Redis answers)
/// delivers the topic's messages in the stream's order with its ids, keeping a mirror of its
/// newest entries under these limits.
///
/// Shared history through NATS JetStream (a `nats://` or `tls://` broker whose server runs
/// JetStream, with history on): one stream, `fdcast_<name>` (bytes of `name` outside
/// `A-Z a-z 0-9 -` written `_XX`), keeps every topic's subject `<name>.<topic>`, at most
/// max_messages per topic (max_msgs_per_subject; with no count limit, max_age_ms only; with
/// neither, 1000); the stream's first creator sets its limits. Ids are
/// `<stream creation time in ns>-<stream sequence>`, the same in every process, sparse per
/// topic. A publish is an HPUB with the header `Fdcast-Origin` (this registry and the except
/// fd) that comes back through this process's consumer to be delivered here, in the
/// stream's order. A resume from an id older than the topic's oldest kept message is not
/// recovered (the stream cannot tell it from a loss). A server without JetStream leaves
/// history per process.
///
/// PostgreSQL and Redis Cluster brokers keep history per process. Switching history on or
/// off while a Redis or NATS broker is enabled starts the broker's session anew (publishes
/// in flight are dropped); enabling or disabling a Redis or NATS broker with history on
/// starts every topic's history anew.
///
/// Changing limits keeps each topic's epoch and evicts what the new limits do not allow.
///
/// Slow readers: with history on, a frame of a topic that would overflow an fd's outbox (live
/// or replayed) is not dropped: the fd falls behind on the topic, keeping a cursor into its
/// history (no copy), and the topic's live messages skip it; whenever fdcast drains the
/// fd's outbox (fdcast_dispatch, fdcast_flush, fdcast_uncork) it refills the outbox from
/// the history, in order, up to the outbox limit, until the fd has the newest message and is
/// live again, with no gap or duplicate. Messages that leave the history before the fd gets
/// them are a gap (see fdcast_gap_fn); then the overflow policy applies. Order: per topic,
/// each message once in publish order, always (gaps aside). Across the topics of one fd:
/// publish order while the fd is live on them; while it is behind on a topic, that topic's
/// older messages arrive after newer ones of topics it is live on, and topics it is behind on
/// take turns (each refill starts one topic further on, so one far behind holds back no
/// other). Turning history off ends every catching up: what a
/// behind fd was still owed is lost (counted as a gap when the fd next takes bytes).
///
/// Returns 0 or -EINVAL (NULL `fc`).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_set_history(
    fc: *mut fdcast,
    max_messages: usize,
    max_bytes: usize,
    max_age_ms: u64,
) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        registry.set_history(HistoryLimits {
            max_messages,
            max_bytes,
            max_age: (max_age_ms > 0).then(|| Duration::from_millis(max_age_ms)),
        });
        Ok(())
    })
}

/// fdcast_publish_except(), which also writes the id the topic's history gave the message
/// into `id_out`, as NUL-terminated text (e.g. "42-7", what SSE clients send back as
/// Last-Event-ID), or "" when history is off. Under shared history (a Redis broker, or NATS
/// with JetStream, see fdcast_set_history()) it writes "" as well: the stream gives the id,
/// one round trip later,
/// when the message is also delivered to this process's subscribers (which the return
/// value counts already). `id_out` must hold FDCAST_MAX_EVENT_ID_LEN + 1 bytes;
/// `id_out_len` says how many it holds.
///
/// Returns as fdcast_publish(), and -EINVAL also for a NULL `id_out` or an `id_out_len`
/// under FDCAST_MAX_EVENT_ID_LEN + 1 (nothing published). `id_out` is written only on
/// success.
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_publish_id(
    fc: *mut fdcast,
    topic: *const c_char,
    topic_len: usize,
    payload: *const c_void,
    len: usize,
    except_fd: c_int,
    id_out: *mut c_char,
    id_out_len: usize,
) -> i64 {
    returning_i64(|| {
        if id_out_len <= FDCAST_MAX_EVENT_ID_LEN {
            return Err(Error::InvalidArgument(
                "id_out_len is under FDCAST_MAX_EVENT_ID_LEN + 1",
            ));
        }
        // SAFETY: the header requires a live handle, `topic_len` readable topic bytes, `len`
        // readable payload bytes and `id_out_len` writable bytes at `id_out`.
        let (registry, topic, payload, id_out) = unsafe {
            (
                registry(fc)?,
                bytes(topic.cast(), topic_len, "topic is NULL")?,
                bytes(payload.cast(), len, "payload is NULL with a non-zero len")?,
                bytes_mut(id_out.cast(), id_out_len, "id_out is NULL")?,
            )
        };
        let except = (except_fd >= 0).then_some(except_fd);
        let (matched, id) = registry.publish_with_id(topic, payload, except)?;
        let text = id.map(|id| id.to_string()).unwrap_or_default();
        id_out[..text.len()].copy_from_slice(text.as_bytes());
        id_out[text.len()] = 0;
        Ok(matched as i64)
    })
}

/// fdcast_subscribe(), then queues for `fd`, before any live message, every message the
/// topic's history keeps after `last_id[0..id_len)` (an id as fdcast_publish_id() writes it
/// and SSE frames carry it, without a NUL: a browser's Last-Event-ID header, or what a
/// FDCAST_WS_TEXT_ID/FDCAST_WS_BINARY_ID client found before the first LF of the last frame
/// it got), in order, framed per `mode` (SSE frames with their `id:` lines, WebSocket id
/// modes with their ids). No message is missed or repeated between the replay and the live
/// ones, even while other threads publish to the topic.
///
/// `*recovered` (if `recovered` is not NULL) is set to 1 when the history still held every
/// message after `last_id` (same epoch, nothing after it evicted), else 0; when 0, every
/// message still kept is replayed, and the host decides what to tell its client. With
/// history off, nothing is replayed and `*recovered` is 0.
///
/// Under shared history (a Redis broker, or a NATS broker with JetStream; see
/// fdcast_set_history()) `*recovered` is 1 when this process's mirror of the topic's stream
/// holds every stream entry after `last_id`, whichever process gave the id. A process that has no subscriber of the topic yet (or
/// lost its connection and has not fetched again) first fills its mirror from the stream:
/// the call waits for that, driving the broker itself with no lock held (at most 5 s, then
/// it answers with what it has, `*recovered` 0), and so it does for an id up to a minute
/// newer than the mirror's newest (a message another process delivered a moment ago). It
/// may be called from the thread that runs fdcast_dispatch().
///
/// Replayed frames go through the fd's outbox like live ones, written a few hundred at a time
/// in one writev: the kernel takes what it can, the outbox queues what fits under the outbox
/// limit, and the overflow policy meets the rest (under FDCAST_DROP_MESSAGE those frames are
/// dropped and counted; under FDCAST_EVICT the fd is evicted). Size the outbox limit for the
/// replays you allow (about max_bytes of history) if none may be dropped. A kept payload
/// that is not valid UTF-8 is skipped for a FDCAST_WS_TEXT, FDCAST_WS_TEXT_ID or FDCAST_SSE
/// subscriber. Subscribing a (topic, fd) pair that already
/// subscribes replays all the same.
///
/// Returns the subscription id (> 0), or as fdcast_subscribe(), and -EINVAL also for a NULL
/// `last_id` or an id that does not parse (two decimal numbers without sign or leading zero,
/// joined by one '-'): then nothing changes.
///
/// Thread: any.
#[must_use]
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fdcast_subscribe_since(
    fc: *mut fdcast,
    topic: *const c_char,
    topic_len: usize,
    fd: c_int,
    mode: ModeArg,
    last_id: *const c_char,
    id_len: usize,
    recovered: *mut c_int,
) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle, `topic_len` readable topic bytes and
        // `id_len` readable bytes at `last_id`.
        let ((registry, topic, mode), last_id) = unsafe {
            (
                subscription_args(fc, topic, topic_len, mode)?,
                bytes(last_id.cast(), id_len, "last_id is NULL")?,
            )
        };
        let last = EventId::parse(last_id)
            .ok_or(Error::InvalidArgument("last_id is not an fdcast event id"))?;
        let (id, held) = registry.subscribe_since(topic, fd, mode, last)?;
        // SAFETY: the header requires NULL or a writable int.
        unsafe { fill_optional(recovered, c_int::from(held)) };
        Ok(id as i64)
    })
}

/// fdcast_subscribe(), then queues for `fd` the last `n` messages the topic's history keeps
/// (fewer if it keeps fewer), oldest first, before any live one: `tail -n N -f`. Replay and
/// live join as in fdcast_subscribe_since(), whose outbox rules and wait for a shared
/// history's mirror apply.
///
/// Returns as fdcast_subscribe().
///
/// Thread: any.
#[must_use]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_subscribe_tail(
    fc: *mut fdcast,
    topic: *const c_char,
    topic_len: usize,
    fd: c_int,
    mode: ModeArg,
    n: usize,
) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle and `topic_len` readable topic bytes.
        let (registry, topic, mode) = unsafe { subscription_args(fc, topic, topic_len, mode)? };
        registry
            .subscribe_tail(topic, fd, mode, n)
            .map(|id| id as i64)
    })
}

/// The handle, topic and mode of a subscribing call.
///
/// # Safety
/// `fc` is NULL or a live handle; a non-NULL `topic` points to `topic_len` readable bytes.
unsafe fn subscription_args<'a>(
    fc: *mut fdcast,
    topic: *const c_char,
    topic_len: usize,
    mode: ModeArg,
) -> Result<(&'a Registry, &'a [u8], Mode), Error> {
    // SAFETY: per this function's contract.
    let (registry, topic) = unsafe {
        (
            registry(fc)?,
            bytes(topic.cast(), topic_len, "topic is NULL")?,
        )
    };
    Ok((registry, topic, mode_from_c(mode)?))
}
