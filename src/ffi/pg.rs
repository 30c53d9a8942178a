//! Cross-process fan-out through PostgreSQL LISTEN/NOTIFY.

use std::ffi::{c_char, c_int};
use std::time::Duration;

use super::boundary::{boundary, c_str, fill_optional, registry, returning_i64, returning_status};
use super::fdcast;

/// Counters of the PostgreSQL backend, filled by fdcast_pg_get_stats().
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct fdcast_pg_stats {
    /// Notifications the server confirmed.
    pub sent: u64,
    /// Notifications from other registries delivered to local subscribers.
    pub received: u64,
    /// This registry's own notifications, come back and ignored (same backend pid).
    pub ignored_self: u64,
    /// Notifications on the channel not in the `<len>:<topic><payload>` format, ignored.
    pub malformed: u64,
    /// Times the connection was re-established after a loss.
    pub reconnects: u64,
    /// Notifications waiting to be sent or confirmed now.
    pub queued: u64,
    /// 1 while the LISTEN is in effect, 0 while connecting or reconnecting.
    pub connected: u64,
    /// Notifications not forwarded: the queue was full (65536), the server refused them, or
    /// they were in flight when the connection broke.
    pub dropped: u64,
}

/// Connects to PostgreSQL and LISTENs on `channel`, returning once the LISTEN is in effect
/// (or the connection attempt failed: by default it waits up to 10 s, or the conninfo's
/// `connect_timeout`). `conninfo` is a libpq connection string or a `postgresql://` URI;
/// TLS follows its `sslmode`. `channel` is used as a quoted identifier (case kept, 1 to 63
/// bytes).
///
/// From then on every publish also NOTIFYs the channel, whether or not a local subscriber
/// matched, in the format `<decimal topic byte length>:<topic><payload>` shared with
/// Tep::Broadcast; a publish whose notification NOTIFY cannot carry (8000 bytes or more,
/// length prefix included; NUL bytes; invalid UTF-8 in topic or payload) fails with
/// -EMSGSIZE or -EILSEQ before anything is written anywhere. Publishing never waits for the
/// server. Notifications from other registries (not this connection's own) are delivered to
/// local subscribers by fdcast_dispatch() (the connection's socket is inside fdcast_fd()) or
/// fdcast_pg_poll_once(). A lost connection is re-established with backoff (100 ms doubling
/// to 5 s) and LISTEN re-issued; publishes meanwhile wait in a bounded queue.
///
/// Returns 0, or -EINVAL (NULL `fc`, `conninfo` or `channel`; a conninfo libpq refuses; a
/// bad channel name), -ENOTSUP (built without the `pg` feature), -EALREADY (already enabled), -ECONNREFUSED (the server could not be
/// reached, refused the connection or the authentication, or did not answer in time), -EIO
/// (the LISTEN failed); fdcast_last_error() then holds libpq's or the server's message.
///
/// Thread: any; blocks the calling thread while connecting.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_pg_enable(
    fc: *mut fdcast,
    conninfo: *const c_char,
    channel: *const c_char,
) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle and NUL-terminated strings.
        let (registry, conninfo, channel) = unsafe {
            (
                registry(fc)?,
                c_str(conninfo, "conninfo is NULL or not UTF-8")?,
                c_str(channel, "channel is NULL or not UTF-8")?,
            )
        };
        registry.pg_enable(conninfo, channel)
    })
}

/// Waits up to `timeout_ms` (0: do not wait; negative: until one arrives) for notifications
/// from other registries and delivers them to local subscribers; also does any due
/// reconnect. For hosts that drive the backend themselves (the Tep::Broadcast v1 style);
/// fdcast_dispatch() does the same as part of its work.
///
/// Returns how many notifications it delivered, or -EINVAL (NULL `fc`), -ENOTCONN (the
/// backend is not enabled).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_pg_poll_once(fc: *mut fdcast, timeout_ms: c_int) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        Ok(registry.pg_poll_once(timeout)? as i64)
    })
}

/// UNLISTENs and disconnects (after pushing out notifications still buffered, for up to a
/// second); the registry is local-only again, so NOTIFY's limits no longer apply. A no-op
/// when not enabled, after a failed enable, or with a NULL `fc`.
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_pg_disable(fc: *mut fdcast) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        if let Ok(registry) = unsafe { registry(fc) } {
            registry.pg_disable();
        }
    })
}

/// Fills `*out` with the PostgreSQL backend's counters (zeros when it is not enabled). A NULL
/// `out` is a no-op; a NULL `fc` fills zeros.
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_pg_get_stats(fc: *const fdcast, out: *mut fdcast_pg_stats) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        let stats = unsafe { registry(fc) }
            .map(|registry| registry.pg_stats())
            .unwrap_or_default();
        // SAFETY: the header requires NULL or a pointer to a writable fdcast_pg_stats.
        unsafe {
            fill_optional(
                out,
                fdcast_pg_stats {
                    sent: stats.sent,
                    received: stats.received,
                    ignored_self: stats.ignored_self,
                    malformed: stats.malformed,
                    reconnects: stats.reconnects,
                    queued: stats.queued,
                    connected: stats.connected,
                    dropped: stats.dropped,
                },
            )
        };
    })
}
