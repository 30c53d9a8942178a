//! Backends that carry publishes between processes. PostgreSQL LISTEN/NOTIFY is the first
//! (behind the `pg` feature); the wire format and counters do not depend on it.

#[cfg(feature = "pg")]
mod libpq;
#[cfg(feature = "pg")]
pub(crate) mod pg;
#[cfg(feature = "pg")]
pub(crate) mod wire;

/// Counters of the PostgreSQL backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgStats {
    /// Notifications the server confirmed.
    pub sent: u64,
    /// Notifications from other registries delivered to local subscribers.
    pub received: u64,
    /// This registry's own notifications, come back and ignored.
    pub ignored_self: u64,
    /// Notifications on the channel not in the `<len>:<topic><payload>` format, ignored.
    pub malformed: u64,
    /// Times the connection was re-established after a loss.
    pub reconnects: u64,
    /// Notifications waiting to be sent or confirmed now.
    pub queued: u64,
    /// 1 while the LISTEN is in effect, 0 while connecting or reconnecting.
    pub connected: u64,
    /// Notifications not forwarded: the queue was full, or the server refused them.
    pub dropped: u64,
}
