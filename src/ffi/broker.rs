//! Cross-process fan-out through a broker: PostgreSQL, Redis or NATS, chosen by the URL.

use std::ffi::{c_char, c_int};
use std::time::Duration;

use super::boundary::{boundary, c_str, fill_optional, registry, returning_i64, returning_status};
use super::fdcast;

/// Counters of the broker, filled by fdcast_broker_get_stats(). The same fields for every
/// engine.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct fdcast_broker_stats {
    /// Publishes the engine took: confirmed by the server (PostgreSQL, Redis), or written to
    /// the socket (NATS, which confirms nothing).
    pub published: u64,
    /// Messages from other publishers delivered to local subscribers.
    pub received: u64,
    /// This registry's own publishes, come back from the engine and ignored.
    pub ignored: u64,
    /// Messages the engine delivered that are not in the expected format, ignored.
    pub malformed: u64,
    /// Times the connection was re-established after a loss.
    pub reconnects: u64,
    /// Publishes waiting to be sent or confirmed now (those made while the engine is down
    /// among them).
    pub queued: u64,
    /// Publishes not forwarded: the queue was full (65536 publishes or 64 MiB), the server
    /// refused them, or they were in flight when the connection broke (with Redis and
    /// shared history: those the stream does not hold after the reconnect).
    pub dropped: u64,
    /// 1 while the session is up and subscribed, 0 while connecting or reconnecting.
    pub connected: u64,
    /// Topics the engine is subscribed to now: those with a local subscriber (PostgreSQL: 0,
    /// it listens on one channel for every topic).
    pub topics: u64,
}

/// Connects this registry to a broker, so that its publishes reach every other registry (in
/// this process or another, on this machine or another) enabled on the same broker with the
/// same `name`, and theirs reach this registry's subscribers. The URL's scheme picks the
/// engine:
///
/// | `url`                                             | engine                       | `name` is                  |
/// |---------------------------------------------------|------------------------------|----------------------------|
/// | `postgresql://…`, `postgres://…`, `key=value …`   | PostgreSQL LISTEN/NOTIFY     | the channel (1 to 63 bytes)|
/// | `redis://[user:pass@]host[:port][/db]`            | Redis pub/sub                | the channel prefix         |
/// | `nats://[user:pass@]host[:port][,host:port…]`     | NATS core                    | the subject prefix         |
/// | `redis+cluster://host:port[,host:port…]`          | Redis Cluster 7+ sharded pub/sub | the channel prefix     |
///
/// With Redis Cluster a topic's traffic touches only the shard that owns its channel's slot
/// (`SSUBSCRIBE`/`SPUBLISH`); the hosts are seeds for `CLUSTER SHARDS`, and one connection
/// per primary is opened when a topic or a publish needs it. Order holds per topic, also
/// across a slot move (for up to 10 s of waiting for the old owner's answers); a slot
/// that moves (`MOVED`) or a failover re-routes subscriptions and publishes to the new
/// owner, and a publish redirected more than 5 times is dropped and counted.
/// `rediss://`, `rediss+cluster://` (every node) and NATS `tls://` are the same over TLS
/// (1.2 or later). The server's
/// certificate is always verified, chain and name, against the system's trust store or the
/// PEM file of the `ca=` option; `cert=` and `key=` name a client certificate and its key
/// (PEM): `rediss://cache:6380?ca=/etc/ssl/my-ca.pem&cert=/etc/app.pem&key=/etc/app.key`.
/// An option fdcast does not know is refused (-EINVAL), never ignored. PostgreSQL takes
/// libpq's own options (`sslmode=verify-full`, ...).
///
/// PostgreSQL listens on one channel and receives every topic, in the Tep::Broadcast
/// format (see fdcast_pg_enable()). Redis and NATS route by interest: the registry
/// subscribes on the engine to a topic while it has a local subscriber of it, so a registry
/// receives only the traffic of its topics. A topic's Redis channel is `name` followed by
/// the topic's bytes; its NATS subject is `name.topic` when the topic is a plain subject
/// (tokens of printable ASCII other than space, `*`, `>` and `%`, separated by single dots),
/// else `name.` followed by the topic with every other byte written `%XX` (one token), and
/// `name.%SHA1.<hex>` when that is longer than 2048 bytes. Plain clients of the engine
/// interoperate: a message published on that channel or subject reaches local subscribers
/// as its raw payload, and a plain subscriber sees fdcast's publishes as their raw payload.
///
/// Returns once the session is up and every topic with a local subscriber now is
/// subscribed (by default it waits up to 10 s). From then on a publish is delivered locally
/// at once and queued for the engine; it never waits for the server. A publish the engine
/// cannot carry (PostgreSQL: see fdcast_pg_enable(); NATS: over the server's max_payload;
/// Redis: over 512 MiB) fails with -EMSGSIZE before anything is written anywhere. A
/// registry never delivers its own publish twice: the engine's echo is filtered. Messages
/// from other publishers are delivered by fdcast_dispatch() (the engine's socket is inside
/// fdcast_fd()) or fdcast_broker_poll_once(). A lost connection is re-established with
/// backoff (100 ms doubling to 5 s) and every subscription re-issued; publishes meanwhile
/// wait in a bounded queue (65536 publishes or 64 MiB, then counted drops; for a Redis
/// Cluster, in total over its shards).
///
/// With history on (fdcast_set_history()), a Redis broker (not Redis Cluster) shares it
/// through Redis streams: a publish then reaches this process's subscribers too only when
/// Redis has given it its id (one round trip, in the stream's order), and the session
/// loads two scripts (SCRIPT LOAD) and subscribes topics' id channels (SSUBSCRIBE): Redis 7
/// or later, with scripting allowed. A NATS broker shares it through JetStream when the
/// server runs it: its session then creates (or finds) the stream `fdcast_<name>`, asks for
/// headers, publishes with HPUB, and creates a consumer per topic subscribed; a publish
/// reaches this process's subscribers when its consumer delivers it back (one round trip).
/// See fdcast_set_history().
///
/// Returns 0, or -EINVAL (NULL `fc`, `url` or `name`; not UTF-8; a URL that does not
/// parse, an unknown scheme or option, a certificate file that cannot be loaded; a bad
/// name), -ENOTSUP (the engine or TLS is compiled out),
/// -EALREADY (a broker is already enabled: one per registry), -ECONNREFUSED (no address of
/// the server could be reached, or it refused the connection, the TLS handshake, the
/// certificate or the authentication, or did not answer in time), -EIO (the server refused
/// a command of the session); fdcast_last_error() says why. With several hosts, each is
/// tried in turn before the enable fails.
///
/// Thread: any; blocks the calling thread while connecting, and no other.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_broker_enable(
    fc: *mut fdcast,
    url: *const c_char,
    name: *const c_char,
) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires a live handle and NUL-terminated strings.
        let (registry, url, name) = unsafe {
            (
                registry(fc)?,
                c_str(url, "url is NULL or not UTF-8")?,
                c_str(name, "name is NULL or not UTF-8")?,
            )
        };
        registry.broker_enable(url, name)
    })
}

/// Disconnects the broker (after pushing out what it still buffers, for up to a second);
/// the registry is local-only again, so the engine's limits no longer apply. A no-op when
/// none is enabled, after a failed enable, or with a NULL `fc`.
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_broker_disable(fc: *mut fdcast) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        if let Ok(registry) = unsafe { registry(fc) } {
            registry.broker_disable();
        }
    })
}

/// Waits up to `timeout_ms` (0: do not wait; negative: until one arrives) for messages from
/// other publishers and delivers them to local subscribers; also writes queued publishes
/// and does any due reconnect. For hosts that drive the broker themselves;
/// fdcast_dispatch() does the same as part of its work.
///
/// Returns how many messages it delivered, or -EINVAL (NULL `fc`), -ENOTCONN (no broker is
/// enabled).
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_broker_poll_once(fc: *mut fdcast, timeout_ms: c_int) -> i64 {
    returning_i64(|| {
        // SAFETY: the header requires a live handle.
        let registry = unsafe { registry(fc)? };
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        Ok(registry.broker_poll_once(timeout)? as i64)
    })
}

/// Fills `*out` with the broker's counters (zeros when none is enabled). A NULL `out` is a
/// no-op; a NULL `fc` fills zeros.
///
/// Thread: any.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_broker_get_stats(fc: *const fdcast, out: *mut fdcast_broker_stats) {
    boundary((), || {
        // SAFETY: the header requires NULL or a live handle.
        let stats = unsafe { registry(fc) }
            .map(|registry| registry.broker_stats())
            .unwrap_or_default();
        // SAFETY: the header requires NULL or a pointer to a writable fdcast_broker_stats.
        unsafe {
            fill_optional(
                out,
                fdcast_broker_stats {
                    published: stats.published,
                    received: stats.received,
                    ignored: stats.ignored,
                    malformed: stats.malformed,
                    reconnects: stats.reconnects,
                    queued: stats.queued,
                    dropped: stats.dropped,
                    connected: stats.connected,
                    topics: stats.topics,
                },
            )
        };
    })
}
