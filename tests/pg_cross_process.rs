//! Two OS processes fanning out through PostgreSQL: this binary re-runs itself as the
//! publishing child. Run by `cargo test`; needs the server at FDCAST_PG_URL (default
//! postgresql://127.0.0.1:5432/test) and fails without it.

mod common;

use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Mode, Registry};

const MESSAGES: u32 = 10_000;
const T: Duration = Duration::from_secs(120);

fn pg_url() -> String {
    std::env::var("FDCAST_PG_URL").unwrap_or_else(|_| "postgresql://127.0.0.1:5432/test".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(&args[2]);
    }
    let started = Instant::now();
    with_watchdog(T.as_secs() + 30, parent);
    println!(
        "pg_cross_process: ok ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// Publishes one message per framing mode, then MESSAGES numbered ones, and waits until the
/// server confirmed them all.
fn child(channel: &str) {
    let registry = Registry::new().unwrap();
    registry.pg_enable(&pg_url(), channel).unwrap();
    registry.publish(b"modes", b"one\ntwo").unwrap();
    for n in 0..MESSAGES {
        registry
            .publish(b"seq", format!("{n}\n").as_bytes())
            .unwrap();
    }
    let start = Instant::now();
    while registry.pg_stats().sent < u64::from(MESSAGES) + 1 {
        assert!(
            start.elapsed() < T,
            "child: not confirmed: {:?}",
            registry.pg_stats()
        );
        registry.dispatch(Some(Duration::from_millis(50))).unwrap();
    }
    assert_eq!(registry.pg_stats().dropped, 0);
}

fn parent() {
    let channel = format!("fdcast_xproc_{}", std::process::id());
    let registry = Registry::new().unwrap();
    registry.pg_enable(&pg_url(), &channel).unwrap();
    registry.set_outbox_limit(64 << 20);
    let modes: Vec<_> = Mode::ALL.iter().map(|_| socketpair_nonblocking()).collect();
    for (mode, (ours, _)) in Mode::ALL.iter().zip(&modes) {
        registry
            .subscribe(b"modes", ours.as_raw_fd(), *mode)
            .unwrap();
    }
    let (seq, seq_peer) = socketpair_nonblocking();
    registry
        .subscribe(b"seq", seq.as_raw_fd(), Mode::Raw)
        .unwrap();

    let mut child: Child = Command::new(std::env::current_exe().unwrap())
        .args(["child", &channel])
        .spawn()
        .expect("the child process starts");

    let expected: Vec<u8> = (0..MESSAGES)
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    let mut received = Vec::new();
    let start = Instant::now();
    while received.len() < expected.len() {
        assert!(
            start.elapsed() < T,
            "{} of {} bytes after {T:?}: {:?}",
            received.len(),
            expected.len(),
            registry.pg_stats()
        );
        registry.dispatch(Some(Duration::from_millis(20))).unwrap();
        received.extend(read_now(seq_peer.as_raw_fd()).0);
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "child failed: {status}");
        }
    }
    assert_eq!(received, expected, "every message, in order, none twice");
    assert!(
        read_quiet(seq_peer.as_raw_fd()).is_empty(),
        "nothing after the last one"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed: {status}");

    let framed: [&[u8]; 4] = [
        b"one\ntwo",
        b"\x81\x07one\ntwo",
        b"\x82\x07one\ntwo",
        b"data: one\ndata: two\n\n",
    ];
    for ((_, theirs), want) in modes.iter().zip(framed) {
        assert_eq!(read_now(theirs.as_raw_fd()).0, want);
    }
    assert_eq!(registry.pg_stats().received, u64::from(MESSAGES) + 1);
    assert_eq!(registry.pg_stats().malformed, 0);
}
