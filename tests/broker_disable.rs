//! `broker_disable` right after a burst, with no dispatch in the publishing registry: every
//! publish still reaches another registry, through each engine (PostgreSQL, Redis, NATS at
//! FDCAST_PG_URL, FDCAST_REDIS_URL, FDCAST_NATS_URL; a missing server fails the test).
//! Before, closing the connection with the server's answers unread reset it, and the server
//! dropped the commands it had not read yet; and the publish hold (HOLD_AFTER) leaves a
//! burst's tail for the shutdown to send.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Mode, Registry};

/// Only a bound on a hang: the test never judges speed.
const T: Duration = Duration::from_secs(30);
const MESSAGES: usize = 1000;

fn name(engine: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (id, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    match engine {
        "nats" => format!("fdcast_disable.{id}.{n}"),
        "redis" => format!("fdcast_disable:{id}:{n}:"),
        _ => format!("fdcast_disable_{id}_{n}"),
    }
}

fn burst_then_disable(url: &str, engine: &str) {
    let name = name(engine);
    let receiver = Registry::new().unwrap();
    receiver.set_outbox_limit(64 << 20);
    let (ours, theirs) = socketpair_nonblocking();
    receiver
        .subscribe(b"burst", ours.as_raw_fd(), Mode::Raw)
        .unwrap();
    receiver.broker_enable(url, &name).unwrap();

    let sender = Registry::new().unwrap();
    sender.broker_enable(url, &name).unwrap();
    let mut want = Vec::new();
    for seq in 0..MESSAGES {
        let message = format!("{seq:06}\n");
        sender.publish(b"burst", message.as_bytes()).unwrap();
        want.extend_from_slice(message.as_bytes());
    }
    sender.broker_disable();
    assert_eq!(sender.broker_stats().dropped, 0);

    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < want.len() {
        assert!(
            start.elapsed() < T,
            "{engine}: {} of {MESSAGES} messages arrived",
            got.len() / 7
        );
        receiver.dispatch(Some(Duration::from_millis(20))).unwrap();
        got.extend(read_now(theirs.as_raw_fd()).0);
    }
    assert_eq!(got, want, "{engine}: not every message, once, in order");
}

fn main() {
    let env = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.into());
    burst_then_disable(
        &env("FDCAST_PG_URL", "postgresql://127.0.0.1:5432/test"),
        "pg",
    );
    burst_then_disable(&env("FDCAST_REDIS_URL", "redis://127.0.0.1:6379"), "redis");
    burst_then_disable(&env("FDCAST_NATS_URL", "nats://127.0.0.1:4222"), "nats");
    println!("broker_disable: ok");
}
