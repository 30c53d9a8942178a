//! Concurrency: publishers, subscription churn, a dispatcher and readers all at once. No torn
//! frames, per-publisher order kept on every fd, nothing lost, and no deadlock (watchdog).

mod common;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Mode, Overflow, Registry};

const PUBLISHERS: u8 = 4;
const ROUNDS: u32 = 1500;
const SEND_EVERY: u32 = 10;

/// A test message: publisher, seq (per publisher, consecutive on every fd), filler.
fn body(p: u8, seq: u32) -> Vec<u8> {
    let mut b = vec![p];
    b.extend_from_slice(&seq.to_be_bytes());
    let pad = (seq as usize * 7 + p as usize * 13) % 200;
    b.extend(std::iter::repeat_n(p ^ seq as u8, pad));
    b
}

fn check_body(b: &[u8]) -> (u8, u32) {
    assert!(b.len() >= 5, "short body: torn frame?");
    let p = b[0];
    assert!(p < PUBLISHERS, "bad publisher id {p}: torn frame?");
    let seq = u32::from_be_bytes(b[1..5].try_into().unwrap());
    assert!(b == body(p, seq).as_slice(), "corrupt body p={p} seq={seq}");
    (p, seq)
}

/// Seqs per publisher that reach each reader fd.
fn per_publisher_total() -> u32 {
    2 * ROUNDS + ROUNDS / SEND_EVERY
}

/// Reads `fd` until every publisher's frames arrived, checking order as it goes.
fn reader(stream: UnixStream, ws: bool) -> HashMap<u8, u32> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let fd = stream.as_raw_fd();
    let mut next: HashMap<u8, u32> = (0..PUBLISHERS).map(|p| (p, 0)).collect();
    let total = per_publisher_total();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while next.values().any(|&n| n < total) {
        let n = match read_once(fd, &mut chunk) {
            Ok(0) => panic!("EOF; progress {next:?}"),
            Ok(n) => n,
            Err(e) => panic!("read: {e}; progress {next:?}"),
        };
        buf.extend_from_slice(&chunk[..n]);
        let (bodies, used): (Vec<Vec<u8>>, usize) = if ws {
            let (frames, used) = parse_ws_frames(&buf);
            let bodies = frames
                .into_iter()
                .map(|f| {
                    assert_eq!(f.opcode, 2);
                    // Each WS payload is one whole length-prefixed body.
                    let mut inner = parse_lp_all(&f.payload);
                    assert_eq!(inner.len(), 1);
                    inner.pop().unwrap()
                })
                .collect();
            (bodies, used)
        } else {
            parse_lp_frames(&buf)
        };
        buf.drain(..used);
        for b in bodies {
            let (p, seq) = check_body(&b);
            let want = next.get_mut(&p).unwrap();
            assert_eq!(seq, *want, "publisher {p}: order broken or frame lost");
            *want += 1;
        }
    }
    assert!(buf.is_empty(), "extra bytes after the last frame");
    next
}

#[test]
fn publishers_churn_dispatcher_and_readers() {
    with_watchdog(90, || {
        let reg = Arc::new(Registry::new().unwrap());
        reg.set_outbox_limit(64 << 20);
        reg.set_overflow(Overflow::DropMessage);

        let (raw_w, raw_r) = socketpair();
        let (ws_w, ws_r) = socketpair();
        make_slow(raw_w.as_raw_fd(), raw_r.as_raw_fd());
        make_slow(ws_w.as_raw_fd(), ws_r.as_raw_fd());
        let (raw_fd, ws_fd) = (raw_w.as_raw_fd(), ws_w.as_raw_fd());
        for p in 0..PUBLISHERS {
            let topic = format!("p{p}");
            reg.subscribe(topic.as_bytes(), raw_fd, Mode::Raw).unwrap();
            reg.subscribe(topic.as_bytes(), ws_fd, Mode::WsBinary)
                .unwrap();
        }
        reg.subscribe(b"shared", raw_fd, Mode::Raw).unwrap();
        reg.subscribe(b"shared", ws_fd, Mode::WsBinary).unwrap();

        let readers = [
            thread::spawn(move || reader(raw_r, false)),
            thread::spawn(move || reader(ws_r, true)),
        ];

        let stop = Arc::new(AtomicBool::new(false));
        let dispatcher = {
            let (reg, stop) = (reg.clone(), stop.clone());
            thread::spawn(move || {
                let mut calls = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    reg.dispatch(Some(Duration::from_millis(20))).unwrap();
                    calls += 1;
                }
                calls
            })
        };

        let start_line = Arc::new(Barrier::new(PUBLISHERS as usize + 3));
        let publishers: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let (reg, go) = (reg.clone(), start_line.clone());
                thread::spawn(move || {
                    go.wait();
                    let own = format!("p{p}");
                    let mut seq = 0u32;
                    for round in 0..ROUNDS {
                        let m = reg
                            .publish(own.as_bytes(), &lp_encode(&body(p, seq)))
                            .unwrap();
                        assert_eq!(m, 2);
                        seq += 1;
                        let m = reg.publish(b"shared", &lp_encode(&body(p, seq))).unwrap();
                        assert!(m >= 2);
                        seq += 1;
                        if round % SEND_EVERY == 0 {
                            let f = lp_encode(&body(p, seq));
                            reg.send(raw_fd, Mode::Raw, &f).unwrap();
                            reg.send(ws_fd, Mode::WsBinary, &f).unwrap();
                            seq += 1;
                        }
                    }
                    seq
                })
            })
            .collect();

        // Subscription churn on other fds: other topics, and the shared topic too (those fds
        // never read, so frames queue for them until unsubscribe_fd drops them).
        let churners: Vec<_> = (0..2)
            .map(|c| {
                let (reg, go) = (reg.clone(), start_line.clone());
                thread::spawn(move || {
                    go.wait();
                    let mut ops = 0u32;
                    for i in 0..150 {
                        let pairs: Vec<_> = (0..4).map(|_| socketpair()).collect();
                        let fds: Vec<RawFd> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
                        let topic = format!("churn{c}-{}", i % 5);
                        let mut ids = Vec::new();
                        for (k, &fd) in fds.iter().enumerate() {
                            ids.push(reg.subscribe(topic.as_bytes(), fd, Mode::Sse).unwrap());
                            if k % 2 == 0 {
                                reg.subscribe(b"shared", fd, Mode::WsBinary).unwrap();
                            }
                        }
                        assert!(reg.publish(topic.as_bytes(), b"churn").unwrap() >= 4);
                        assert!(reg.subscribers_for(topic.as_bytes()).len() >= 4);
                        reg.unsubscribe(ids[1]).unwrap();
                        let _ = reg.stats();
                        let _ = reg.subscriber_count();
                        for &fd in &fds {
                            reg.unsubscribe_fd(fd).unwrap();
                            assert_eq!(reg.pending_bytes(fd).unwrap(), 0);
                        }
                        ops += 1;
                        drop(pairs);
                    }
                    ops
                })
            })
            .collect();

        start_line.wait();
        for h in publishers {
            assert_eq!(h.join().unwrap(), per_publisher_total());
        }
        for h in churners {
            assert_eq!(h.join().unwrap(), 150);
        }
        for h in readers {
            let progress = h.join().unwrap();
            assert!(progress.values().all(|&n| n == per_publisher_total()));
        }
        stop.store(true, Ordering::SeqCst);
        assert!(dispatcher.join().unwrap() > 0);

        let st = reg.stats();
        assert_eq!(st.dropped_messages, 0);
        assert_eq!(st.evicted_fds, 0);
        assert_eq!(st.queued_bytes, 0);
        assert_eq!(reg.subscriber_count(), 2 * (PUBLISHERS as usize + 1));
        assert_eq!(st.subscriptions, 2 * (PUBLISHERS as u64 + 1));
        assert_eq!(st.fds, 2);
        assert_eq!(st.topics, PUBLISHERS as u64 + 1);
        assert_eq!(
            st.publishes,
            PUBLISHERS as u64 * 2 * ROUNDS as u64 + 2 * 150,
            "publish count"
        );
        drop(raw_w);
        drop(ws_w);
    });
}

/// Many threads publishing to one topic with many subscribers while the subscribers are being
/// removed and re-added: no deadlock, no panic, counters consistent at the end.
#[test]
fn publish_while_unsubscribing_same_topic() {
    with_watchdog(60, || {
        let reg = Arc::new(Registry::new().unwrap());
        let pairs: Arc<Vec<_>> = Arc::new((0..16).map(|_| socketpair()).collect());
        for (a, b) in pairs.iter() {
            make_slow(a.as_raw_fd(), b.as_raw_fd());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for t in 0..3u8 {
            let (reg, stop) = (reg.clone(), stop.clone());
            hs.push(thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    reg.publish(b"hot", &lp_encode(&body(t, n))).unwrap();
                    n += 1;
                }
            }));
        }
        {
            let (reg, pairs, stop) = (reg.clone(), pairs.clone(), stop.clone());
            hs.push(thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    reg.dispatch(Some(Duration::from_millis(5))).unwrap();
                    for (_, b) in pairs.iter() {
                        let _ = read_now(b.as_raw_fd());
                    }
                }
            }));
        }
        let start = Instant::now();
        let mut i = 0usize;
        while start.elapsed() < Duration::from_secs(3) {
            let (a, _) = &pairs[i % pairs.len()];
            let fd = a.as_raw_fd();
            match i % 3 {
                0 => {
                    reg.subscribe(b"hot", fd, Mode::Raw).unwrap();
                }
                1 => {
                    reg.unsubscribe_fd(fd).unwrap();
                }
                _ => reg.set_outbox_limit(if i % 2 == 0 { 4096 } else { 1 << 20 }),
            }
            i += 1;
        }
        stop.store(true, Ordering::SeqCst);
        for h in hs {
            h.join().unwrap();
        }
        reg.clear();
        let st = reg.stats();
        assert_eq!(
            (st.subscriptions, st.topics, st.fds, st.queued_bytes),
            (0, 0, 0, 0)
        );
        assert!(st.publishes > 0);
        assert_eq!(st.evicted_fds, 0);
    });
}

/// `queued_bytes` is a gauge that publishes and flushes move with no lock held, so a reader
/// may see it a little behind; it must never read below zero (as a u64, wrapped to ~2^64)
/// nor above what the outboxes can hold, while publishers, a dispatcher and readers race.
#[test]
fn the_queued_bytes_gauge_stays_within_the_outboxes() {
    const READERS: usize = 8;
    const LIMIT: usize = 1 << 16;
    const FRAME: usize = 3000;
    with_watchdog(60, || {
        let registry = Arc::new(Registry::new().unwrap());
        registry.set_outbox_limit(LIMIT);
        let pairs: Vec<_> = (0..READERS).map(|_| socketpair_nonblocking()).collect();
        for (ours, _) in &pairs {
            registry
                .subscribe(b"t", ours.as_raw_fd(), Mode::Raw)
                .unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |work: Box<dyn Fn(&Registry) + Send>| {
            let (registry, stop) = (Arc::clone(&registry), Arc::clone(&stop));
            thread::spawn(move || {
                let mut highest = 0;
                while !stop.load(Ordering::Relaxed) {
                    work(&registry);
                    highest = highest.max(registry.stats().queued_bytes);
                }
                highest
            })
        };
        let mut threads = Vec::new();
        for _ in 0..2 {
            threads.push(spawn(Box::new(|registry| {
                let _ = registry.publish(b"t", &[7u8; FRAME]);
            })));
        }
        threads.push(spawn(Box::new(|registry| {
            registry.dispatch(Some(Duration::from_millis(1))).unwrap();
        })));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            for (_, peer) in &pairs {
                let _ = read_now(peer.as_raw_fd());
            }
        }
        stop.store(true, Ordering::Relaxed);
        let highest = threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .max()
            .unwrap();
        // Each outbox holds at most its limit plus the frame that passed it; a flush's
        // writes may be subtracted a moment after publishes added theirs: twice that.
        let bound = (2 * READERS * (LIMIT + FRAME)) as u64;
        assert!(
            highest <= bound,
            "queued_bytes read {highest} (bound {bound})"
        );
    });
}
