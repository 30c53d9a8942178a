//! Cross-process fan-out through PostgreSQL: publishes per second, and the latency from
//! `publish` in one process to the bytes on a socket in another, through LISTEN/NOTIFY.
//!
//! `cargo run --release --example pg_crossprocess -- [messages] [rate/s, 0 = flat out]`
//! The parent publishes; a child process (this binary again) subscribes a socketpair, reads
//! it and times every message against CLOCK_MONOTONIC, which both processes share. Each run
//! checks that every message arrived once, in order. Server: FDCAST_PG_URL (default
//! postgresql://127.0.0.1:5432/test).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fdcast::{Mode, Registry};

fn pg_url() -> String {
    std::env::var("FDCAST_PG_URL").unwrap_or_else(|_| "postgresql://127.0.0.1:5432/test".into())
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the machine.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("receiver") {
        return receiver(&args[2], args[3].parse().unwrap());
    }
    let messages: u64 = args.get(1).map_or(20_000, |n| n.parse().unwrap());
    let rate: u64 = args.get(2).map_or(0, |n| n.parse().unwrap());
    let channel = format!("fdcast_bench_{}", std::process::id());

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["receiver", &channel, &messages.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("receiver starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");

    let registry = Registry::new().unwrap();
    registry.pg_enable(&pg_url(), &channel).unwrap();
    let start = Instant::now();
    for seq in 0..messages {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
            while Instant::now() < due {
                registry.dispatch(Some(Duration::from_micros(200))).unwrap();
            }
        }
        let payload = format!("{seq} {}", monotonic_ns());
        registry.publish(b"bench", payload.as_bytes()).unwrap();
        if seq % 256 == 0 {
            registry.dispatch(Some(Duration::ZERO)).unwrap();
        }
    }
    while registry.pg_stats().sent < messages {
        registry.dispatch(Some(Duration::from_millis(10))).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "not confirmed: {:?}",
            registry.pg_stats()
        );
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let report = lines.next().unwrap().unwrap();
    assert!(child.wait().unwrap().success(), "receiver failed");
    let mut fields = report.split_whitespace().map(|f| f.parse::<f64>().unwrap());
    let (p50, p99, max, receive_secs) = (
        fields.next().unwrap(),
        fields.next().unwrap(),
        fields.next().unwrap(),
        fields.next().unwrap(),
    );
    let offered = if rate == 0 {
        "max".to_string()
    } else {
        rate.to_string()
    };
    println!(
        "| {messages} | {offered} | {:.0} | {:.0} | {p50:.0} | {p99:.0} | {max:.0} |",
        messages as f64 / publish_secs,
        messages as f64 / receive_secs
    );
    std::io::stdout().flush().unwrap();
}

/// Subscribes a socketpair through its own registry and connection, and prints
/// "p50_us p99_us max_us seconds" once every message arrived, in order.
fn receiver(channel: &str, messages: u64) {
    let registry = Registry::new().unwrap();
    registry.pg_enable(&pg_url(), channel).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    registry
        .subscribe(b"bench", ours.as_raw_fd(), Mode::Sse)
        .unwrap();
    println!("listening");
    std::io::stdout().flush().unwrap();

    let mut latencies = Vec::with_capacity(messages as usize);
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while (latencies.len() as u64) < messages {
        assert!(
            Instant::now() < deadline,
            "receiver: {} of {messages}",
            latencies.len()
        );
        registry.dispatch(Some(Duration::from_millis(5))).unwrap();
        loop {
            match std::io::Read::read(&mut &theirs, &mut buf) {
                Ok(n) if n > 0 => pending.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let now = monotonic_ns();
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event).unwrap();
            let body = text.strip_prefix("data: ").unwrap().trim_end();
            let mut parts = body.split(' ');
            let seq: u64 = parts.next().unwrap().parse().unwrap();
            let sent: u64 = parts.next().unwrap().parse().unwrap();
            assert_eq!(seq, latencies.len() as u64, "out of order or duplicated");
            first.get_or_insert_with(Instant::now);
            latencies.push(now.saturating_sub(sent) as f64 / 1000.0);
        }
    }
    let seconds = first
        .map_or(0.0, |first| first.elapsed().as_secs_f64())
        .max(1e-9);
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!("{} {} {} {seconds}", at(0.50), at(0.99), at(1.0));
}
