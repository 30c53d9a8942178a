//! Keep-alive: idle WebSocket subscribers get pings and idle SSE subscribers comment lines,
//! driven by the timer inside `poll_fd`; busy fds and RAW subscribers get nothing.

mod common;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Mode, Registry};

const T: Duration = Duration::from_secs(10);
const PING: &[u8] = b"\x89\x00";
const COMMENT: &[u8] = b":\n\n";

/// Waits on `poll_fd` as a host loop would, dispatching when it is readable, until `done`.
fn run_loop_until(registry: &Registry, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < T, "condition not reached within {T:?}");
        if poll_readable(registry.poll_fd(), 50) {
            registry.dispatch(Some(Duration::ZERO)).unwrap();
        }
    }
}

#[test]
fn idle_websocket_and_sse_subscribers_get_keepalives_and_raw_ones_do_not() {
    with_watchdog(30, || {
        let registry = Registry::new().unwrap();
        let (ws, ws_peer) = socketpair_nonblocking();
        let (sse, sse_peer) = socketpair_nonblocking();
        let (raw, raw_peer) = socketpair_nonblocking();
        registry
            .subscribe(b"t", ws.as_raw_fd(), Mode::WsText)
            .unwrap();
        registry
            .subscribe(b"t", sse.as_raw_fd(), Mode::Sse)
            .unwrap();
        registry
            .subscribe(b"t", raw.as_raw_fd(), Mode::Raw)
            .unwrap();
        registry.set_heartbeat(Some(Duration::from_millis(30)));

        let mut ws_got = Vec::new();
        let mut sse_got = Vec::new();
        run_loop_until(&registry, || {
            ws_got.extend(read_now(ws_peer.as_raw_fd()).0);
            sse_got.extend(read_now(sse_peer.as_raw_fd()).0);
            ws_got.len() >= 2 * PING.len() && sse_got.len() >= 2 * COMMENT.len()
        });
        assert!(ws_got.chunks(2).all(|chunk| chunk == PING), "{ws_got:?}");
        assert!(
            sse_got.chunks(3).all(|chunk| chunk == COMMENT),
            "{sse_got:?}"
        );
        assert!(
            read_now(raw_peer.as_raw_fd()).0.is_empty(),
            "RAW got a keep-alive"
        );
        assert_eq!(
            registry.stats().deliveries,
            0,
            "keep-alives are not deliveries"
        );

        // Frames still parse for a real client: a ping between two text frames.
        registry.publish(b"t", b"after").unwrap();
        let tail = read_now(ws_peer.as_raw_fd()).0;
        assert!(tail.ends_with(b"\x81\x05after"), "{tail:?}");
    });
}

#[test]
fn a_busy_fd_gets_no_keepalive() {
    with_watchdog(30, || {
        let registry = Registry::new().unwrap();
        let (busy, busy_peer) = socketpair_nonblocking();
        let (idle, idle_peer) = socketpair_nonblocking();
        registry
            .subscribe(b"busy", busy.as_raw_fd(), Mode::WsBinary)
            .unwrap();
        registry
            .subscribe(b"idle", idle.as_raw_fd(), Mode::WsBinary)
            .unwrap();
        registry.set_heartbeat(Some(Duration::from_millis(20)));
        let mut idle_got = Vec::new();
        let mut busy_got = Vec::new();
        let mut published = 0;
        run_loop_until(&registry, || {
            // A frame before every dispatch: the busy fd is never idle for a whole period.
            registry.publish(b"busy", b"x").unwrap();
            published += 1;
            busy_got.extend(read_now(busy_peer.as_raw_fd()).0);
            idle_got.extend(read_now(idle_peer.as_raw_fd()).0);
            idle_got.len() >= 3 * PING.len()
        });
        busy_got.extend(read_available(busy_peer.as_raw_fd(), Duration::from_millis(50), T).0);
        assert_eq!(
            busy_got,
            b"\x82\x01x".repeat(published),
            "the busy fd got a ping"
        );
    });
}

#[test]
fn poll_fd_turns_readable_when_a_heartbeat_is_due_and_stops_when_turned_off() {
    with_watchdog(30, || {
        let registry = Registry::new().unwrap();
        let (ws, ws_peer) = socketpair_nonblocking();
        registry
            .subscribe(b"t", ws.as_raw_fd(), Mode::WsText)
            .unwrap();
        assert!(
            !poll_readable(registry.poll_fd(), 100),
            "readable with no heartbeat"
        );
        registry.set_heartbeat(Some(Duration::from_millis(40)));
        assert!(
            poll_readable(registry.poll_fd(), 5000),
            "not readable when due"
        );
        assert_eq!(registry.dispatch(Some(Duration::ZERO)).unwrap(), 1);
        assert_eq!(read_now(ws_peer.as_raw_fd()).0, PING);
        registry.set_heartbeat(None);
        assert!(
            !poll_readable(registry.poll_fd(), 200),
            "readable after turning it off"
        );
        assert!(read_now(ws_peer.as_raw_fd()).0.is_empty());
    });
}

#[test]
fn a_keepalive_to_a_closed_peer_evicts_it() {
    with_watchdog(30, || {
        let registry = Registry::new().unwrap();
        let evicted = Arc::new(Mutex::new(Vec::new()));
        let sink = evicted.clone();
        registry.set_evict_callback(Some(Box::new(move |fd, reason| {
            sink.lock().unwrap().push((fd, reason));
        })));
        let (sse, sse_peer) = socketpair_nonblocking();
        let fd = sse.as_raw_fd();
        registry.subscribe(b"t", fd, Mode::Sse).unwrap();
        drop(sse_peer);
        registry.set_heartbeat(Some(Duration::from_millis(20)));
        run_loop_until(&registry, || !evicted.lock().unwrap().is_empty());
        assert_eq!(*evicted.lock().unwrap(), vec![(fd, libc::EPIPE)]);
        assert_eq!(registry.subscriber_count(), 0);
    });
}

#[test]
fn heartbeats_follow_subscriptions_made_and_changed_after_they_start() {
    with_watchdog(30, || {
        let registry = Registry::new().unwrap();
        registry.set_heartbeat(Some(Duration::from_millis(20)));
        let (late, late_peer) = socketpair_nonblocking();
        let (switched, switched_peer) = socketpair_nonblocking();
        registry
            .subscribe(b"t", late.as_raw_fd(), Mode::WsBinary)
            .unwrap();
        registry
            .subscribe(b"t", switched.as_raw_fd(), Mode::Sse)
            .unwrap();
        let mut switched_got = Vec::new();
        run_loop_until(&registry, || {
            switched_got.extend(read_now(switched_peer.as_raw_fd()).0);
            !switched_got.is_empty()
        });
        assert!(switched_got.starts_with(COMMENT), "{switched_got:?}");

        // Now RAW only (ticks run only in this thread's dispatch, so none is under way): no
        // keep-alive from the next tick on, while the other fd goes on getting them.
        registry
            .subscribe(b"t", switched.as_raw_fd(), Mode::Raw)
            .unwrap();
        read_now(switched_peer.as_raw_fd());
        let mut late_got = read_now(late_peer.as_raw_fd()).0;
        let pings_before = late_got.len() / PING.len();
        run_loop_until(&registry, || {
            late_got.extend(read_now(late_peer.as_raw_fd()).0);
            late_got.len() / PING.len() >= pings_before + 3
        });
        assert!(
            late_got.chunks(2).all(|chunk| chunk == PING),
            "{late_got:?}"
        );
        assert!(
            read_now(switched_peer.as_raw_fd()).0.is_empty(),
            "a RAW-only fd got a keep-alive"
        );
    });
}
