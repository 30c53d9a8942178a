//! Writes to a gone peer never raise SIGPIPE, with SIGPIPE at its default disposition (which
//! kills the process). Rust's runtime ignores SIGPIPE, so each test restores SIG_DFL first.

mod common;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Error, Mode, Registry};

fn restore_sigpipe_default() {
    let prev = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_ne!(prev, libc::SIG_ERR);
    assert_eq!(sigpipe_disposition(), libc::SIG_DFL);
}

fn sigpipe_disposition() -> libc::sighandler_t {
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(
            libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old),
            0
        );
        old.sa_sigaction
    }
}

fn sigpipe_blocked_in_this_thread() -> bool {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set),
            0
        );
        libc::sigismember(&set, libc::SIGPIPE) == 1
    }
}

fn sigpipe_pending() -> bool {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        assert_eq!(libc::sigpending(&mut set), 0);
        libc::sigismember(&set, libc::SIGPIPE) == 1
    }
}

fn assert_signal_state_untouched() {
    assert_eq!(
        sigpipe_disposition(),
        libc::SIG_DFL,
        "SIGPIPE disposition changed"
    );
    assert!(!sigpipe_blocked_in_this_thread(), "SIGPIPE left blocked");
    assert!(!sigpipe_pending(), "SIGPIPE left pending");
}

type Calls = Arc<Mutex<Vec<(i32, i32)>>>;

fn registry_with_recorder() -> (Registry, Calls) {
    let reg = Registry::new().unwrap();
    assert_eq!(
        sigpipe_disposition(),
        libc::SIG_DFL,
        "Registry::new changed SIGPIPE's disposition"
    );
    let calls: Calls = Arc::default();
    let c = calls.clone();
    reg.set_evict_callback(Some(Box::new(move |fd, why| {
        c.lock().unwrap().push((fd, why))
    })));
    (reg, calls)
}

#[test]
fn publish_to_closed_socketpair_peer() {
    restore_sigpipe_default();
    with_watchdog(30, || {
        let (reg, calls) = registry_with_recorder();
        let (a, b) = socketpair();
        let fd = a.as_raw_fd();
        reg.subscribe(b"t", fd, Mode::WsText).unwrap();
        reg.subscribe(b"u", fd, Mode::Raw).unwrap();
        drop(b);
        assert_eq!(reg.publish(b"t", b"hello").unwrap(), 1);
        assert_signal_state_untouched();
        assert_eq!(*calls.lock().unwrap(), vec![(fd, libc::EPIPE)]);
        assert_eq!(reg.subscriber_count(), 0);
        assert!(reg.subscribers_for(b"u").is_empty());
        let st = reg.stats();
        assert_eq!((st.evicted_fds, st.fds, st.queued_bytes), (1, 0, 0));
        assert!(fd_is_open(fd), "the library never closes a host fd");

        let e = reg.send(fd, Mode::Raw, b"x").unwrap_err();
        assert!(matches!(e, Error::PeerGone(libc::EPIPE)), "{e:?}");
        assert_eq!(e.errno(), libc::EPIPE);
        assert_signal_state_untouched();
        assert_eq!(reg.publish(b"t", b"again").unwrap(), 0);
    });
}

#[test]
fn publish_to_pipe_with_closed_read_end() {
    restore_sigpipe_default();
    with_watchdog(30, || {
        let (reg, calls) = registry_with_recorder();
        let (r, w) = pipe();
        let fd = w.as_raw_fd();
        reg.subscribe(b"log", fd, Mode::Raw).unwrap();
        drop(r);
        assert_eq!(reg.publish(b"log", b"line\n").unwrap(), 1);
        assert_signal_state_untouched();
        assert_eq!(*calls.lock().unwrap(), vec![(fd, libc::EPIPE)]);
        assert_eq!(reg.subscriber_count(), 0);
        assert_eq!(reg.stats().evicted_fds, 1);
        assert!(fd_is_open(fd));

        let e = reg.send(fd, Mode::Raw, b"x").unwrap_err();
        assert!(matches!(e, Error::PeerGone(libc::EPIPE)), "{e:?}");
        assert_signal_state_untouched();
    });
}

#[test]
fn send_to_gone_peers() {
    restore_sigpipe_default();
    with_watchdog(30, || {
        let (reg, calls) = registry_with_recorder();
        // Unsubscribed fds.
        let (a, b) = socketpair();
        drop(b);
        let e = reg.send(a.as_raw_fd(), Mode::WsBinary, b"x").unwrap_err();
        assert!(matches!(e, Error::PeerGone(libc::EPIPE)), "{e:?}");
        let (r, w) = pipe();
        drop(r);
        let e = reg.send(w.as_raw_fd(), Mode::Sse, b"x").unwrap_err();
        assert!(matches!(e, Error::PeerGone(libc::EPIPE)), "{e:?}");
        assert_signal_state_untouched();
        // A subscribed fd: send evicts it and calls the callback.
        let (c, d) = socketpair();
        reg.subscribe(b"t", c.as_raw_fd(), Mode::Raw).unwrap();
        drop(d);
        let e = reg.send(c.as_raw_fd(), Mode::Raw, b"x").unwrap_err();
        assert!(matches!(e, Error::PeerGone(libc::EPIPE)), "{e:?}");
        assert!(
            calls
                .lock()
                .unwrap()
                .contains(&(c.as_raw_fd(), libc::EPIPE))
        );
        assert_eq!(reg.subscriber_count(), 0);
        assert_signal_state_untouched();
        assert!(fd_is_open(a.as_raw_fd()) && fd_is_open(w.as_raw_fd()));
    });
}

/// The peer goes away while bytes are queued: the flush inside dispatch finds it gone.
#[test]
fn dispatch_flush_to_gone_peers() {
    restore_sigpipe_default();
    with_watchdog(30, || {
        let (reg, calls) = registry_with_recorder();
        let (a, b) = socketpair();
        make_slow(a.as_raw_fd(), b.as_raw_fd());
        let (r, w) = pipe();
        set_pipe_size(w.as_raw_fd(), 4096);
        let fds = [a.as_raw_fd(), w.as_raw_fd()];
        for fd in fds {
            reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        }
        let chunk = vec![b'q'; 1000];
        let mut n = 0;
        while fds.iter().any(|&fd| reg.pending_bytes(fd).unwrap() == 0) {
            reg.publish(b"t", &chunk).unwrap();
            n += 1;
            assert!(n < 10_000, "could not fill the peers");
        }
        drop(b);
        drop(r);
        let start = Instant::now();
        while reg.subscriber_count() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "gone peers never evicted by dispatch"
            );
            reg.dispatch(Some(Duration::from_millis(20))).unwrap();
            assert_signal_state_untouched();
        }
        let mut got = calls.lock().unwrap().clone();
        got.sort();
        let mut want: Vec<(i32, i32)> = fds.iter().map(|&fd| (fd, libc::EPIPE)).collect();
        want.sort();
        // A socket whose peer closed with unread data may report ECONNRESET instead of EPIPE.
        assert_eq!(got.len(), 2, "{got:?}");
        for ((gfd, gwhy), (wfd, _)) in got.iter().zip(&want) {
            assert_eq!(gfd, wfd);
            assert!(
                *gwhy == libc::EPIPE || *gwhy == libc::ECONNRESET,
                "reason {gwhy}"
            );
        }
        assert!(got.contains(&(w.as_raw_fd(), libc::EPIPE)));
        let st = reg.stats();
        assert_eq!((st.evicted_fds, st.queued_bytes, st.fds), (2, 0, 0));
        assert_signal_state_untouched();
    });
}

/// Publishing from several threads at once to gone peers.
#[test]
fn concurrent_publishes_to_gone_peers() {
    restore_sigpipe_default();
    with_watchdog(30, || {
        let (reg, calls) = registry_with_recorder();
        let reg = Arc::new(reg);
        let mut keep = Vec::new();
        for _ in 0..8 {
            let (r, w) = pipe();
            reg.subscribe(b"t", w.as_raw_fd(), Mode::Raw).unwrap();
            drop(r);
            keep.push(w);
        }
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        reg.publish(b"t", b"x").unwrap();
                    }
                    assert_signal_state_untouched();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(reg.subscriber_count(), 0);
        assert_eq!(
            calls.lock().unwrap().len(),
            8,
            "one callback per evicted fd"
        );
        assert_eq!(reg.stats().evicted_fds, 8);
        assert_signal_state_untouched();
    });
}
