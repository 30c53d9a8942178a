//! `broker_disable` right after a burst, with no dispatch in the publishing registry: every
//! publish still reaches another registry, through each engine (PostgreSQL, Redis, NATS at
//! FDCAST_PG_URL, FDCAST_REDIS_URL, FDCAST_NATS_URL; a missing server fails the test).
//! Before, closing the connection with the server's answers unread reset it, and the server
//! dropped the commands it had not read yet; and the publish hold (HOLD_AFTER) leaves a
//! burst's tail for the shutdown to send. And one registry enabling each engine in turn:
//! its checks and its publishes follow the engine enabled now.

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

/// One registry enabling each engine in turn: what it checks a publish against, and where
/// its publishes go, follow the engine enabled now (the queue they are handed to outlives
/// each broker).
fn one_registry_through_every_engine(urls: &[(&str, &str)]) {
    let sender = Registry::new().unwrap();
    for &(url, engine) in urls {
        let name = name(engine);
        let receiver = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(b"turn", ours.as_raw_fd(), Mode::Raw)
            .unwrap();
        receiver.broker_enable(url, &name).unwrap();
        sender.broker_enable(url, &name).unwrap();

        let big = vec![b'b'; 2 << 20];
        let with_nul = b"nul\0here";
        match engine {
            // NOTIFY carries neither NUL nor 8000 bytes; NATS's default max_payload is 1 MiB.
            "pg" => {
                assert_eq!(
                    sender.publish(b"turn", with_nul).unwrap_err().errno(),
                    libc::EILSEQ
                );
                assert_eq!(
                    sender.publish(b"turn", &big).unwrap_err().errno(),
                    libc::EMSGSIZE
                );
            }
            "nats" => {
                assert_eq!(
                    sender.publish(b"turn", &big).unwrap_err().errno(),
                    libc::EMSGSIZE
                );
            }
            _ => {}
        }
        let mut want = Vec::new();
        for seq in 0..100 {
            let message = format!("{engine} {seq:03}\n");
            sender.publish(b"turn", message.as_bytes()).unwrap();
            want.extend_from_slice(message.as_bytes());
        }
        if engine == "redis" {
            sender.publish(b"turn", with_nul).unwrap();
            want.extend_from_slice(with_nul);
        }
        sender.broker_disable();
        assert_eq!(
            sender.broker_stats(),
            Default::default(),
            "{engine}: disabled"
        );

        let start = Instant::now();
        let mut got = Vec::new();
        while got.len() < want.len() {
            assert!(
                start.elapsed() < T,
                "{engine}: {} of {} bytes",
                got.len(),
                want.len()
            );
            receiver.dispatch(Some(Duration::from_millis(20))).unwrap();
            got.extend(read_now(theirs.as_raw_fd()).0);
        }
        std::thread::sleep(Duration::from_millis(100));
        receiver.dispatch(Some(Duration::ZERO)).unwrap();
        got.extend(read_now(theirs.as_raw_fd()).0);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{engine}: this engine's messages, once, in order, and nothing else"
        );
    }
}

fn main() {
    let env = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.into());
    burst_then_disable(
        &env("FDCAST_PG_URL", "postgresql://127.0.0.1:5432/test"),
        "pg",
    );
    burst_then_disable(&env("FDCAST_REDIS_URL", "redis://127.0.0.1:6379"), "redis");
    burst_then_disable(&env("FDCAST_NATS_URL", "nats://127.0.0.1:4222"), "nats");
    let pg = env("FDCAST_PG_URL", "postgresql://127.0.0.1:5432/test");
    let redis = env("FDCAST_REDIS_URL", "redis://127.0.0.1:6379");
    let nats = env("FDCAST_NATS_URL", "nats://127.0.0.1:4222");
    one_registry_through_every_engine(&[
        (&pg, "pg"),
        (&redis, "redis"),
        (&nats, "nats"),
        (&redis, "redis"),
    ]);
    println!("broker_disable: ok");
}
