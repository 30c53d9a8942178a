//! Event-loop embedding: poll_fd readiness, dispatch wake-ups and the one-dispatcher rule.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Error, Mode, Registry};

const T: Duration = Duration::from_secs(10);

/// Publishes length-prefixed numbered frames until at least `min_frames` were published and
/// bytes are queued for `fd`. Returns the expected byte stream.
fn fill(reg: &Registry, topic: &[u8], fd: i32, min_frames: u32) -> (Vec<u8>, u32) {
    let mut expected = Vec::new();
    let mut n = 0u32;
    while n < min_frames || reg.pending_bytes(fd).unwrap() == 0 {
        let f = lp_encode(&pattern_bytes(700, n));
        assert_eq!(reg.publish(topic, &f).unwrap(), 1);
        expected.extend_from_slice(&f);
        n += 1;
        assert!(n < 10_000, "the socket never filled");
    }
    (expected, n)
}

#[test]
fn idle_registry_dispatch_returns_zero() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let pfd = reg.poll_fd();
        assert!(pfd >= 0);
        assert!(fd_is_open(pfd));
        assert_eq!(reg.poll_fd(), pfd, "poll_fd is stable");
        assert!(!poll_readable(pfd, 0), "idle poll_fd is readable");
        assert_eq!(reg.dispatch(Some(Duration::ZERO)).unwrap(), 0);
        let start = Instant::now();
        assert_eq!(reg.dispatch(Some(Duration::from_millis(50))).unwrap(), 0);
        assert!(start.elapsed() < T);
        // With subscriptions but nothing queued there is still no work.
        let (a, b) = socketpair();
        reg.subscribe(b"t", a.as_raw_fd(), Mode::Raw).unwrap();
        reg.publish(b"t", b"hi").unwrap();
        assert_eq!(read_exact_timeout(b.as_raw_fd(), 2, T), b"hi");
        assert_eq!(reg.dispatch(Some(Duration::ZERO)).unwrap(), 0);
        assert!(!poll_readable(pfd, 0));
    });
}

#[test]
fn poll_fd_becomes_readable_when_queued_fd_becomes_writable() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let pfd = reg.poll_fd();
        let (a, b) = socketpair();
        let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
        make_slow(fd, peer);
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        let (expected, _) = fill(&reg, b"t", fd, 1);
        // Dispatch whatever the registration produced; the peer is still full.
        for _ in 0..100 {
            if reg.dispatch(Some(Duration::ZERO)).unwrap() == 0 {
                break;
            }
        }
        assert!(reg.pending_bytes(fd).unwrap() > 0);

        // A host loop: poll the fdcast fd, dispatch, read, until everything arrived.
        let mut got = Vec::new();
        let start = Instant::now();
        let mut wakeups = 0;
        while got.len() < expected.len() {
            assert!(
                start.elapsed() < T,
                "stalled at {} of {}",
                got.len(),
                expected.len()
            );
            let (bytes, eof) = read_now(peer);
            assert!(!eof);
            got.extend_from_slice(&bytes);
            if reg.pending_bytes(fd).unwrap() > 0 && poll_readable(pfd, 1000) {
                wakeups += 1;
                reg.dispatch(Some(Duration::ZERO)).unwrap();
            }
        }
        assert!(wakeups > 0, "poll_fd never became readable");
        assert!(got == expected);
        assert_eq!(reg.pending_bytes(fd).unwrap(), 0);

        // Once the work is done the fd goes quiet again (a host loop must not spin).
        let mut rounds = 0;
        while reg.dispatch(Some(Duration::ZERO)).unwrap() > 0 {
            rounds += 1;
            assert!(rounds < 100, "dispatch keeps finding work");
        }
        assert!(
            !poll_readable(pfd, 50),
            "poll_fd readable with nothing to do"
        );
    });
}

#[test]
fn dispatch_forever_is_woken_by_a_later_publish() {
    with_watchdog(30, || {
        let reg = Arc::new(Registry::new().unwrap());
        let (a, b) = socketpair();
        let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
        make_slow(fd, peer);
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();

        let served = Arc::new(AtomicUsize::new(0));
        let entered = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let h = {
            let (reg, served, entered) = (reg.clone(), served.clone(), entered.clone());
            thread::spawn(move || {
                loop {
                    entered.store(true, Ordering::SeqCst);
                    match reg.dispatch(None) {
                        Ok(n) => {
                            served.fetch_add(n, Ordering::SeqCst);
                        }
                        Err(Error::Busy) => panic!("nobody else dispatches"),
                        Err(e) => panic!("dispatch: {e:?}"),
                    }
                    if served.load(Ordering::SeqCst) > 0 && reg.pending_bytes(fd).unwrap() == 0 {
                        break;
                    }
                }
                let _ = tx.send(());
            })
        };
        // Let the thread block in dispatch(None) with nothing queued.
        while !entered.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        thread::sleep(Duration::from_millis(100));
        assert_eq!(
            served.load(Ordering::SeqCst),
            0,
            "dispatch(None) returned work from nothing"
        );

        // Another thread fills the socket; the bytes are queued; the peer then reads.
        let (expected, _) = fill(&reg, b"t", fd, 1);
        let got = read_exact_timeout(peer, expected.len(), T);
        assert!(got == expected);
        join_within(h, &done, T);
        assert!(served.load(Ordering::SeqCst) >= 1);
        assert_eq!(reg.pending_bytes(fd).unwrap(), 0);
        assert_eq!(reg.stats().queued_bytes, 0);
    });
}

#[test]
fn second_concurrent_dispatch_is_busy() {
    with_watchdog(30, || {
        let reg = Arc::new(Registry::new().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let h = {
            let (reg, stop) = (reg.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match reg.dispatch(None) {
                        Ok(_) => {}
                        // The main thread's probe may hold dispatch for a moment.
                        Err(Error::Busy) => thread::sleep(Duration::from_millis(1)),
                        Err(e) => panic!("dispatch: {e:?}"),
                    }
                }
                let _ = tx.send(());
            })
        };
        // The thread blocks in dispatch(None) with no work: sooner or later a probe is Busy.
        let start = Instant::now();
        let err = loop {
            assert!(start.elapsed() < T, "dispatch never reported Busy");
            match reg.dispatch(Some(Duration::ZERO)) {
                Err(e) => break e,
                Ok(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        assert!(matches!(err, Error::Busy), "{err:?}");
        assert_eq!(err.errno(), libc::EBUSY);
        // Still busy with a timeout, and still busy a moment later.
        assert!(matches!(
            reg.dispatch(Some(Duration::from_millis(10))),
            Err(Error::Busy)
        ));

        // Everything else keeps working while dispatch(None) blocks.
        let (a, b) = socketpair();
        let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
        make_slow(fd, peer);
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        assert_eq!(reg.subscriber_count(), 1);

        // Wake the dispatcher with real work: queue bytes, then read them.
        stop.store(true, Ordering::SeqCst);
        let (expected, _) = fill(&reg, b"t", fd, 1);
        let mut got = Vec::new();
        let start = Instant::now();
        loop {
            got.extend_from_slice(&read_now(peer).0);
            match done.recv_timeout(Duration::from_millis(1)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => break,
            }
            assert!(start.elapsed() < T, "dispatch(None) was never woken");
        }
        h.join().unwrap();
        // The dispatcher may have stopped before flushing everything: finish here.
        got.extend_from_slice(&drain_with_dispatch(&reg, fd, peer, T));
        assert!(got == expected);
        // Free again.
        assert!(reg.dispatch(Some(Duration::ZERO)).is_ok());
    });
}

/// Many fds queued at once are all served by dispatch, which reports how many it served.
#[test]
fn dispatch_serves_many_fds() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let pairs: Vec<_> = (0..20).map(|_| socketpair()).collect();
        for (a, b) in &pairs {
            make_slow(a.as_raw_fd(), b.as_raw_fd());
            reg.subscribe(b"all", a.as_raw_fd(), Mode::WsBinary)
                .unwrap();
        }
        let mut frames = Vec::new();
        let mut n = 0u32;
        while pairs
            .iter()
            .any(|(a, _)| reg.pending_bytes(a.as_raw_fd()).unwrap() == 0)
        {
            let p = pattern_bytes(900, n);
            assert_eq!(reg.publish(b"all", &p).unwrap(), 20);
            frames.push(p);
            n += 1;
            assert!(n < 10_000);
        }
        let mut expected = Vec::new();
        for p in &frames {
            expected.extend_from_slice(&ws_encode(2, p));
        }
        // Drain every peer's kernel buffer once, so every queued fd becomes writable.
        let mut got: Vec<Vec<u8>> = pairs
            .iter()
            .map(|(_, b)| read_now(b.as_raw_fd()).0)
            .collect();
        let mut served = 0;
        let start = Instant::now();
        loop {
            served += reg.dispatch(Some(Duration::from_millis(10))).unwrap();
            for (g, (_, b)) in got.iter_mut().zip(&pairs) {
                g.extend_from_slice(&read_now(b.as_raw_fd()).0);
            }
            if reg.stats().queued_bytes == 0 {
                break;
            }
            assert!(start.elapsed() < T, "outboxes never drained");
        }
        for (g, (_, b)) in got.iter_mut().zip(&pairs) {
            g.extend_from_slice(&read_quiet(b.as_raw_fd()));
            assert!(
                *g == expected,
                "fd got {} of {} bytes",
                g.len(),
                expected.len()
            );
        }
        assert!(
            served >= 20,
            "dispatch reported {served} served for 20 queued fds"
        );
        assert_eq!(reg.stats().dropped_messages, 0);
    });
}
