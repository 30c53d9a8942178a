//! The C boundary. Every exported function checks and converts its arguments, runs inside
//! [`boundary::boundary`] so no panic unwinds into C, and maps errors to `-errno`. The
//! doc comments here become `include/fdcast.h`.
//!
//! Conventions that hold for every function below unless its comment says otherwise:
//! - errors are negative errno values (`strerror(-rc)` describes them), and
//!   `fdcast_last_error()` gives this thread's detail for the last failure;
//! - a NULL handle, or a NULL pointer with a non-zero length, gives `-EINVAL`; a negative fd
//!   gives `-EBADF`; an enum value outside its enum gives `-EINVAL`; a failing call changes
//!   nothing;
//! - every function may be called from any thread, concurrently on the same handle, except
//!   `fdcast_free` (no call may be in flight) and `fdcast_dispatch` (one thread at a time).

// In the order the header presents them: a registry, publishing, history, the event loop,
// batching, hooks, brokers, PostgreSQL, WebSocket helpers.
mod registry;

mod publish;

mod history;

mod event_loop;

mod stats;

mod batching;

mod hooks;

mod broker;

mod pg;

mod ws;

mod boundary;

use std::ffi::c_int;

use crate::error::Error;
use crate::frame::Mode;
use crate::outbox::Overflow;
use crate::registry::Registry;

/// The longest topic, in bytes. Topics are 1 to FDCAST_MAX_TOPIC_LEN bytes, NUL included.
pub const FDCAST_MAX_TOPIC_LEN: usize = 4096;

/// The per-fd outbox limit of a new registry, in bytes (1 MiB).
pub const FDCAST_DEFAULT_OUTBOX_LIMIT: usize = 1048576;

/// The longest event id's text, in bytes, without a NUL: `<epoch>-<offset>`, two decimal
/// numbers of up to 20 digits each.
pub const FDCAST_MAX_EVENT_ID_LEN: usize = 41;

// The header's constants are literals (cbindgen cannot follow paths into the core); these
// keep them equal to the core's.
const _: () = assert!(FDCAST_MAX_TOPIC_LEN == crate::registry::MAX_TOPIC_LEN);
const _: () = assert!(FDCAST_DEFAULT_OUTBOX_LIMIT == crate::registry::DEFAULT_OUTBOX_LIMIT);
const _: () = assert!(FDCAST_MAX_EVENT_ID_LEN == crate::history::MAX_EVENT_ID_LEN);

/// A registry of topic → fd subscriptions, with its outboxes and its poller. Opaque: create
/// it with fdcast_new(), release it with fdcast_free().
#[allow(non_camel_case_types)]
pub struct fdcast {
    registry: Registry,
}

/// How a payload is framed for one subscriber.
#[allow(non_camel_case_types)]
#[repr(C)]
pub enum fdcast_mode {
    /// The payload bytes as they are (log lines, pre-framed data).
    FDCAST_RAW = 0,
    /// RFC 6455 server frame: FIN + opcode 0x1, unmasked. Payloads must be valid UTF-8.
    FDCAST_WS_TEXT = 1,
    /// RFC 6455 server frame: FIN + opcode 0x2, unmasked.
    FDCAST_WS_BINARY = 2,
    /// text/event-stream: one "data: " line per payload line (split on CRLF, LF and CR),
    /// then a blank line. Payloads must be valid UTF-8. With history on, the event starts
    /// with an "id: <epoch>-<offset>" line (see fdcast_set_history()).
    FDCAST_SSE = 3,
    /// FDCAST_WS_TEXT whose frame payload is the message's event id, a LF (0x0A), then the
    /// payload: a client splits at the first LF, keeps the id, and resumes after it with
    /// fdcast_subscribe_since() when it reconnects. The id is "<epoch>-<offset>" as
    /// fdcast_publish_id() writes it when the topic keeps history (see fdcast_set_history()),
    /// and empty otherwise (and for fdcast_send()), so the payload always follows the first
    /// LF. Byte for byte, "hi" published as message 7 of epoch 42 is
    /// 0x81 0x07 '4' '2' '-' '7' 0x0A 'h' 'i', and without history 0x81 0x03 0x0A 'h' 'i'
    /// (the RFC 6455 length counts the id and the LF). Replays use the same form. Payloads
    /// must be valid UTF-8 (ids are ASCII).
    FDCAST_WS_TEXT_ID = 4,
    /// FDCAST_WS_BINARY with the id before the payload as in FDCAST_WS_TEXT_ID:
    /// 0x82 0x07 '4' '2' '-' '7' 0x0A 'h' 'i' for "hi", message 7 of epoch 42.
    FDCAST_WS_BINARY_ID = 5,
}

/// What happens to a frame that would push an fd's queued bytes past the outbox limit.
// Never constructed in Rust: policies arrive as `OverflowArg`; this is the header's enum.
#[allow(non_camel_case_types, dead_code)]
#[repr(C)]
pub enum fdcast_overflow {
    /// The default: drop that whole frame for that fd, and count it in dropped_messages.
    FDCAST_DROP_MESSAGE = 0,
    /// Drop every subscription and queued byte of the fd, shutdown(2) it (sockets), and call
    /// the evict callback with ENOBUFS. The host still owns and closes the fd.
    FDCAST_EVICT = 1,
}

/// Counters and gauges, filled by fdcast_get_stats(). Frame counts are per (frame, fd) pair.
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct fdcast_stats {
    /// publish/publish_except calls that succeeded, those matching no subscriber included.
    pub publishes: u64,
    /// Frames whose last byte reached the kernel.
    pub deliveries: u64,
    /// Frames dropped by FDCAST_DROP_MESSAGE.
    pub dropped_messages: u64,
    /// Fds removed because the peer was gone or by FDCAST_EVICT.
    pub evicted_fds: u64,
    /// Bytes waiting in outboxes now (a gauge: read while other threads publish or flush, it
    /// may lag them by the frames in flight; it never reads below 0).
    pub queued_bytes: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
    /// Topics with at least one subscriber.
    pub topics: u64,
    /// Distinct fds with at least one subscription or queued bytes.
    pub fds: u64,
    /// Messages owed to fds that fell behind on a topic with history and left the history
    /// before those fds caught up, or that a shared history's stream discarded before this
    /// process got them (see fdcast_gap_fn).
    pub lost_to_gaps: u64,
}

/// An `fdcast_mode` as it crosses the boundary: a plain int, so an out-of-range value is
/// `-EINVAL` rather than undefined behaviour. The header spells it `fdcast_mode`.
pub type ModeArg = c_int;
/// An `fdcast_overflow` as it crosses the boundary; the header spells it `fdcast_overflow`.
pub type OverflowArg = c_int;

fn mode_from_c(mode: ModeArg) -> Result<Mode, Error> {
    Mode::ALL
        .get(usize::try_from(mode).unwrap_or(usize::MAX))
        .copied()
        .ok_or(Error::InvalidArgument("mode is not an fdcast_mode value"))
}

fn mode_to_c(mode: Mode) -> fdcast_mode {
    match mode {
        Mode::Raw => fdcast_mode::FDCAST_RAW,
        Mode::WsText => fdcast_mode::FDCAST_WS_TEXT,
        Mode::WsBinary => fdcast_mode::FDCAST_WS_BINARY,
        Mode::Sse => fdcast_mode::FDCAST_SSE,
        Mode::WsTextId => fdcast_mode::FDCAST_WS_TEXT_ID,
        Mode::WsBinaryId => fdcast_mode::FDCAST_WS_BINARY_ID,
    }
}

fn overflow_from_c(policy: OverflowArg) -> Result<Overflow, Error> {
    match policy {
        0 => Ok(Overflow::DropMessage),
        1 => Ok(Overflow::Evict),
        _ => Err(Error::InvalidArgument(
            "policy is not an fdcast_overflow value",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_convert_both_ways_and_reject_out_of_range() {
        for mode in Mode::ALL {
            assert_eq!(mode_from_c(mode_to_c(mode) as c_int).unwrap(), mode);
        }
        for bad in [-1, 6, 7, c_int::MAX, c_int::MIN] {
            assert_eq!(mode_from_c(bad).unwrap_err().errno(), libc::EINVAL);
        }
    }

    #[test]
    fn overflow_policies_reject_out_of_range() {
        assert_eq!(overflow_from_c(0).unwrap(), Overflow::DropMessage);
        assert_eq!(overflow_from_c(1).unwrap(), Overflow::Evict);
        assert!(overflow_from_c(2).is_err());
        assert!(overflow_from_c(-1).is_err());
    }
}
