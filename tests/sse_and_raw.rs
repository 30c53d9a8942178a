//! SSE framing checked by an EventSource-spec parser, RAW over pipes / socketpairs / TCP, and
//! the registry operations (subscribe, unsubscribe, publish_except, send, authorizer, fd reuse).

mod common;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fdcast::{Error, MAX_TOPIC_LEN, Mode, Registry};

const T: Duration = Duration::from_secs(10);

type AuthCall = (Vec<u8>, RawFd, Mode);

fn sse_payloads() -> Vec<&'static [u8]> {
    vec![
        b"",
        b"hello",
        b"a\nb",
        b"a\r\nb",
        b"a\rb",
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b"\r\r",
        b"\n\r",
        b"a\r\r\nb",
        b"trailing\n",
        b"trailing crlf\r\n",
        b"\nleading",
        b"x\r\n\r\ny",
        b"data: nested",
        b": not a comment",
        b"colon:inside",
        b" leading space",
        "h\u{e9}llo \u{2713} \u{1f600}".as_bytes(),
        "\u{feff}bom".as_bytes(),
        b"line1\nline2\r\nline3\rline4",
    ]
}

/// Publishes every SSE payload to `fd` and checks what the peer receives, both as exact bytes
/// and as events seen by an EventSource parser.
fn check_sse(fd: RawFd, peer: RawFd) {
    let reg = Registry::new().unwrap();
    reg.subscribe(b"news", fd, Mode::Sse).unwrap();
    let mut expected = Vec::new();
    for p in sse_payloads() {
        assert_eq!(reg.publish(b"news", p).unwrap(), 1);
        expected.extend_from_slice(&sse_encode(p));
    }
    let got = drain_with_dispatch(&reg, fd, peer, T);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
    let events = parse_sse_all(&got);
    let want: Vec<Vec<u8>> = sse_payloads().into_iter().map(sse_expected_data).collect();
    assert_eq!(events.len(), want.len(), "one event per publish");
    for (i, (e, w)) in events.iter().zip(&want).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(e),
            String::from_utf8_lossy(w),
            "event {i}"
        );
    }
}

#[test]
fn sse_over_socketpair() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        check_sse(a.as_raw_fd(), b.as_raw_fd());
    });
}

#[test]
fn sse_over_tcp() {
    with_watchdog(30, || {
        let (s, c) = tcp_pair();
        check_sse(s.as_raw_fd(), c.as_raw_fd());
    });
}

#[test]
fn sse_exact_examples() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        let reg = Registry::new().unwrap();
        let fd = a.as_raw_fd();
        let cases: [(&[u8], &[u8]); 5] = [
            (b"", b"data: \n\n"),
            (b"hi", b"data: hi\n\n"),
            (b"a\r\nb", b"data: a\ndata: b\n\n"),
            (b"a\rb\n", b"data: a\ndata: b\ndata: \n\n"),
            (b"\n", b"data: \ndata: \n\n"),
        ];
        for (p, want) in cases {
            reg.send(fd, Mode::Sse, p).unwrap();
            let got = read_exact_timeout(b.as_raw_fd(), want.len(), T);
            assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        }
        assert!(read_quiet(b.as_raw_fd()).is_empty());
    });
}

fn raw_payloads() -> Vec<Vec<u8>> {
    vec![
        b"first line\n".to_vec(),
        Vec::new(),
        vec![0u8, 1, 2, 255, 254, b'\r', b'\n'],
        pattern_bytes(70_000, 7),
        b"last\n".to_vec(),
    ]
}

fn check_raw(fd: RawFd, peer: RawFd) {
    let reg = Registry::new().unwrap();
    reg.subscribe(b"log", fd, Mode::Raw).unwrap();
    let mut expected = Vec::new();
    for p in raw_payloads() {
        assert_eq!(reg.publish(b"log", &p).unwrap(), 1);
        expected.extend_from_slice(&p);
    }
    let got = drain_with_dispatch(&reg, fd, peer, T);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "RAW bytes differ");
    assert_eq!(reg.stats().dropped_messages, 0);
}

#[test]
fn raw_over_pipe() {
    with_watchdog(30, || {
        let (r, w) = pipe();
        assert!(!is_nonblocking(w.as_raw_fd()));
        check_raw(w.as_raw_fd(), r.as_raw_fd());
        // Documented: a non-socket fd is made O_NONBLOCK by subscribe; it stays open.
        assert!(is_nonblocking(w.as_raw_fd()));
        assert!(fd_is_open(w.as_raw_fd()));
    });
}

#[test]
fn raw_over_small_pipe() {
    with_watchdog(30, || {
        let (r, w) = pipe();
        set_pipe_size(w.as_raw_fd(), 4096);
        check_raw(w.as_raw_fd(), r.as_raw_fd());
    });
}

#[test]
fn raw_over_socketpair() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        make_slow(a.as_raw_fd(), b.as_raw_fd());
        check_raw(a.as_raw_fd(), b.as_raw_fd());
        assert!(
            !is_nonblocking(a.as_raw_fd()),
            "socket flags are left alone"
        );
    });
}

#[test]
fn raw_over_tcp() {
    with_watchdog(30, || {
        let (s, c) = tcp_pair();
        check_raw(s.as_raw_fd(), c.as_raw_fd());
    });
}

#[test]
fn send_to_unsubscribed_fd_in_each_mode() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
        let reg = Registry::new().unwrap();
        let p = "payload ✓".as_bytes();
        reg.send(fd, Mode::Raw, p).unwrap();
        reg.send(fd, Mode::WsText, p).unwrap();
        reg.send(fd, Mode::WsBinary, p).unwrap();
        reg.send(fd, Mode::Sse, p).unwrap();
        let mut want = p.to_vec();
        want.extend_from_slice(&ws_encode(1, p));
        want.extend_from_slice(&ws_encode(2, p));
        want.extend_from_slice(&sse_encode(p));
        assert_eq!(read_exact_timeout(peer, want.len(), T), want);
        assert!(read_quiet(peer).is_empty());
        assert_eq!(reg.subscriber_count(), 0, "send does not subscribe");
        assert!(reg.send(-1, Mode::Raw, p).unwrap_err().errno() == libc::EBADF);

        // To a pipe, too.
        let (r, w) = pipe();
        reg.send(w.as_raw_fd(), Mode::Raw, b"to pipe").unwrap();
        assert_eq!(read_exact_timeout(r.as_raw_fd(), 7, T), b"to pipe");
        assert!(
            is_nonblocking(w.as_raw_fd()),
            "send sets O_NONBLOCK on a pipe"
        );
    });
}

#[test]
fn publish_except_skips_sender() {
    with_watchdog(30, || {
        let (a1, a2) = socketpair();
        let (b1, b2) = socketpair();
        let (c1, c2) = socketpair();
        let reg = Registry::new().unwrap();
        reg.subscribe(b"chat", a1.as_raw_fd(), Mode::Raw).unwrap();
        reg.subscribe(b"chat", b1.as_raw_fd(), Mode::Raw).unwrap();
        assert_eq!(
            reg.publish_except(b"chat", b"1", Some(a1.as_raw_fd()))
                .unwrap(),
            1
        );
        assert_eq!(reg.publish_except(b"chat", b"2", None).unwrap(), 2);
        // An fd that is not subscribed excludes no one.
        assert_eq!(
            reg.publish_except(b"chat", b"3", Some(c1.as_raw_fd()))
                .unwrap(),
            2
        );
        assert_eq!(
            reg.publish_except(b"nobody", b"4", Some(a1.as_raw_fd()))
                .unwrap(),
            0
        );
        assert_eq!(read_quiet(a2.as_raw_fd()), b"23");
        assert_eq!(read_quiet(b2.as_raw_fd()), b"123");
        assert!(read_quiet(c2.as_raw_fd()).is_empty());
        assert_eq!(reg.stats().publishes, 4);
    });
}

#[test]
fn subscribe_is_idempotent_and_sets_mode() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        let fd = a.as_raw_fd();
        let reg = Registry::new().unwrap();
        let id1 = reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        assert!(id1 > 0);
        let id2 = reg.subscribe(b"t", fd, Mode::WsText).unwrap();
        assert_eq!(id1, id2);
        assert_eq!(reg.subscriber_count(), 1);
        assert_eq!(reg.subscribers_for(b"t"), vec![fd]);
        reg.publish(b"t", b"x").unwrap();
        assert_eq!(read_quiet(b.as_raw_fd()), ws_encode(1, b"x"));
        let id3 = reg.subscribe(b"t2", fd, Mode::Raw).unwrap();
        assert_ne!(id3, id1);
        let st = reg.stats();
        assert_eq!((st.subscriptions, st.topics, st.fds), (2, 2, 1));
    });
}

#[test]
fn unsubscribe_unsubscribe_fd_and_clear() {
    with_watchdog(30, || {
        let (a, _a2) = socketpair();
        let (b, _b2) = socketpair();
        let reg = Registry::new().unwrap();
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        let ida = reg.subscribe(b"x", fa, Mode::Raw).unwrap();
        reg.subscribe(b"y", fa, Mode::Raw).unwrap();
        reg.subscribe(b"z", fa, Mode::Raw).unwrap();
        reg.subscribe(b"x", fb, Mode::Raw).unwrap();
        assert_eq!(reg.subscriber_count(), 4);

        reg.unsubscribe(ida).unwrap();
        let e = reg.unsubscribe(ida).unwrap_err();
        assert!(matches!(e, Error::NotFound), "{e:?}");
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(matches!(reg.unsubscribe(987_654_321), Err(Error::NotFound)));
        assert_eq!(reg.subscriber_count(), 3);
        assert_eq!(reg.subscribers_for(b"x"), vec![fb]);

        assert_eq!(reg.unsubscribe_fd(fa).unwrap(), 2);
        assert_eq!(reg.unsubscribe_fd(fa).unwrap(), 0);
        assert!(reg.unsubscribe_fd(-1).unwrap_err().errno() == libc::EBADF);
        assert_eq!(reg.subscriber_count(), 1);
        assert!(reg.subscribers_for(b"y").is_empty());

        reg.subscribe(b"y", fa, Mode::Raw).unwrap();
        reg.clear();
        assert_eq!(reg.subscriber_count(), 0);
        let st = reg.stats();
        assert_eq!((st.subscriptions, st.topics, st.fds), (0, 0, 0));
        assert_eq!(reg.publish(b"x", b"p").unwrap(), 0);
        assert_eq!(
            reg.stats().publishes,
            1,
            "a publish matching no one still counts"
        );
    });
}

#[test]
fn subscribers_for_lists_fds() {
    with_watchdog(30, || {
        let pairs: Vec<_> = (0..5).map(|_| socketpair()).collect();
        let reg = Registry::new().unwrap();
        let mut fds: Vec<RawFd> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
        for &fd in &fds {
            reg.subscribe(b"all", fd, Mode::Raw).unwrap();
        }
        reg.subscribe(b"one", fds[2], Mode::Sse).unwrap();
        // A topic with a NUL byte is its own topic, distinct from its prefix.
        reg.subscribe(b"all\0x", fds[3], Mode::Raw).unwrap();
        let mut got = reg.subscribers_for(b"all");
        got.sort();
        fds.sort();
        assert_eq!(got, fds);
        assert_eq!(reg.subscribers_for(b"one"), vec![pairs[2].0.as_raw_fd()]);
        assert_eq!(reg.subscribers_for(b"all\0x"), vec![pairs[3].0.as_raw_fd()]);
        assert!(reg.subscribers_for(b"none").is_empty());
        assert_eq!(reg.publish(b"all\0x", b"n").unwrap(), 1);
        assert_eq!(reg.stats().topics, 3);
    });
}

#[test]
fn invalid_utf8_writes_nothing_to_anyone() {
    with_watchdog(30, || {
        let (raw1, raw2) = socketpair();
        let (txt1, txt2) = socketpair();
        let (sse1, sse2) = socketpair();
        let (bin1, bin2) = socketpair();
        let reg = Registry::new().unwrap();
        reg.subscribe(b"t", raw1.as_raw_fd(), Mode::Raw).unwrap();
        let id_txt = reg.subscribe(b"t", txt1.as_raw_fd(), Mode::WsText).unwrap();
        let id_sse = reg.subscribe(b"t", sse1.as_raw_fd(), Mode::Sse).unwrap();
        reg.subscribe(b"t", bin1.as_raw_fd(), Mode::WsBinary)
            .unwrap();
        let bad: [&[u8]; 5] = [
            b"ok\xff",
            b"\xe2\x9c",         // truncated 3-byte sequence
            b"\xc0\x80",         // overlong NUL
            b"\xed\xa0\x80",     // UTF-16 surrogate
            b"\xf4\x90\x80\x80", // above U+10FFFF
        ];
        for p in bad {
            let e = reg.publish(b"t", p).unwrap_err();
            assert!(matches!(e, Error::InvalidUtf8), "{e:?}");
            assert_eq!(e.errno(), libc::EILSEQ);
            let e = reg
                .publish_except(b"t", p, Some(raw1.as_raw_fd()))
                .unwrap_err();
            assert!(matches!(e, Error::InvalidUtf8), "{e:?}");
        }
        for s in [&raw2, &txt2, &sse2, &bin2] {
            assert!(
                read_quiet(s.as_raw_fd()).is_empty(),
                "bytes written on EILSEQ"
            );
        }
        let st = reg.stats();
        assert_eq!(st.publishes, 0, "failed publishes are not counted");
        assert_eq!(st.deliveries, 0);

        // send: invalid for text modes, fine for binary ones.
        let e = reg
            .send(txt1.as_raw_fd(), Mode::WsText, b"\xff")
            .unwrap_err();
        assert!(matches!(e, Error::InvalidUtf8), "{e:?}");
        let e = reg.send(sse1.as_raw_fd(), Mode::Sse, b"\xff").unwrap_err();
        assert!(matches!(e, Error::InvalidUtf8), "{e:?}");
        assert!(read_quiet(txt2.as_raw_fd()).is_empty());
        assert!(read_quiet(sse2.as_raw_fd()).is_empty());
        reg.send(raw1.as_raw_fd(), Mode::Raw, b"\xff").unwrap();
        assert_eq!(read_quiet(raw2.as_raw_fd()), b"\xff");

        // Without text-mode subscribers the same payload goes through.
        reg.unsubscribe(id_txt).unwrap();
        reg.unsubscribe(id_sse).unwrap();
        assert_eq!(reg.publish(b"t", b"ok\xff").unwrap(), 2);
        assert_eq!(read_quiet(raw2.as_raw_fd()), b"ok\xff");
        assert_eq!(read_quiet(bin2.as_raw_fd()), ws_encode(2, b"ok\xff"));
    });
}

/// Replaces the file behind `fd` with `new` (atomically, like close + a new fd that gets the
/// same number, but without racing other tests for the number). Returns the fd, now owned.
fn reuse_fd_number(old: impl IntoRawFd, new: OwnedFd) -> OwnedFd {
    let fd = old.into_raw_fd();
    let rc = unsafe { libc::dup2(new.as_raw_fd(), fd) };
    assert_eq!(rc, fd);
    drop(new);
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Subscribes `fd` to "old" and leaves queued bytes behind a non-reading peer.
fn fill_old(reg: &Registry, fd: RawFd, peer: RawFd) {
    make_slow(fd, peer);
    reg.subscribe(b"old", fd, Mode::Raw).unwrap();
    let chunk = vec![b'O'; 1000];
    for _ in 0..200 {
        reg.publish(b"old", &chunk).unwrap();
        if reg.pending_bytes(fd).unwrap() > 0 {
            break;
        }
    }
    assert!(
        reg.pending_bytes(fd).unwrap() > 0,
        "could not fill the old socket"
    );
}

#[test]
fn fd_reuse_guard_on_subscribe() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (old, old_peer) = socketpair();
        let fd = old.as_raw_fd();
        fill_old(&reg, fd, old_peer.as_raw_fd());
        let (new, new_peer) = socketpair();
        let fd2 = reuse_fd_number(old, OwnedFd::from(new));
        assert_eq!(fd2.as_raw_fd(), fd);
        // The old connection is closed now: its peer sees EOF.
        let _ = read_to_eof(old_peer.as_raw_fd(), T);

        reg.subscribe(b"new", fd, Mode::Raw).unwrap();
        assert!(
            reg.subscribers_for(b"old").is_empty(),
            "old topic inherited"
        );
        assert_eq!(reg.subscriber_count(), 1);
        assert_eq!(reg.pending_bytes(fd).unwrap(), 0, "old bytes inherited");
        assert_eq!(reg.publish(b"old", b"stale").unwrap(), 0);
        assert_eq!(reg.publish(b"new", b"fresh").unwrap(), 1);
        for _ in 0..5 {
            reg.dispatch(Some(Duration::from_millis(10))).unwrap();
        }
        assert_eq!(read_quiet(new_peer.as_raw_fd()), b"fresh");
        let st = reg.stats();
        assert_eq!(st.queued_bytes, 0);
        assert_eq!(st.subscriptions, 1);
        assert_eq!(st.evicted_fds, 0, "the reuse guard is not an eviction");
    });
}

#[test]
fn fd_reuse_guard_on_send() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let evicted = Arc::new(Mutex::new(Vec::new()));
        let ev = evicted.clone();
        reg.set_evict_callback(Some(Box::new(move |fd, why| {
            ev.lock().unwrap().push((fd, why))
        })));
        let (old, old_peer) = socketpair();
        let fd = old.as_raw_fd();
        fill_old(&reg, fd, old_peer.as_raw_fd());
        // A pipe this time: a different kind of file behind the same number.
        let (r, w) = pipe();
        let _fd2 = reuse_fd_number(old, w);
        drop(old_peer);

        reg.send(fd, Mode::Raw, b"fresh").unwrap();
        assert!(
            reg.subscribers_for(b"old").is_empty(),
            "old topic inherited"
        );
        assert_eq!(reg.subscriber_count(), 0);
        for _ in 0..5 {
            reg.dispatch(Some(Duration::from_millis(10))).unwrap();
        }
        assert_eq!(read_quiet(r.as_raw_fd()), b"fresh");
        assert_eq!(reg.publish(b"old", b"stale").unwrap(), 0);
        assert!(read_quiet(r.as_raw_fd()).is_empty());
        assert!(
            evicted.lock().unwrap().is_empty(),
            "no evict callback for the reuse guard"
        );
        assert_eq!(reg.stats().queued_bytes, 0);
    });
}

#[test]
fn authorizer_refuses_without_change() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        let fd = a.as_raw_fd();
        let reg = Registry::new().unwrap();
        let calls: Arc<Mutex<Vec<AuthCall>>> = Arc::default();
        let c = calls.clone();
        reg.set_authorizer(Some(Box::new(move |topic, fd, mode| {
            c.lock().unwrap().push((topic.to_vec(), fd, mode));
            topic != b"secret"
        })));
        let e = reg.subscribe(b"secret", fd, Mode::Sse).unwrap_err();
        assert!(matches!(e, Error::Refused), "{e:?}");
        assert_eq!(e.errno(), libc::EACCES);
        assert_eq!(reg.subscriber_count(), 0);
        assert!(reg.subscribers_for(b"secret").is_empty());
        assert_eq!(reg.stats().fds, 0);
        let id = reg.subscribe(b"public", fd, Mode::Raw).unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            vec![
                (b"secret".to_vec(), fd, Mode::Sse),
                (b"public".to_vec(), fd, Mode::Raw)
            ]
        );

        // The authorizer runs on every call, re-subscriptions included; a refusal changes
        // nothing (the mode stays RAW, the subscription stays).
        reg.set_authorizer(Some(Box::new(|_, _, _| false)));
        assert!(matches!(
            reg.subscribe(b"public", fd, Mode::WsText),
            Err(Error::Refused)
        ));
        assert_eq!(reg.subscriber_count(), 1);
        assert_eq!(reg.publish(b"public", b"raw").unwrap(), 1);
        assert_eq!(read_quiet(b.as_raw_fd()), b"raw");

        // None allows all again.
        reg.set_authorizer(None);
        assert_eq!(reg.subscribe(b"public", fd, Mode::WsText).unwrap(), id);
        reg.subscribe(b"secret", fd, Mode::Raw).unwrap();
        assert_eq!(reg.subscriber_count(), 2);
    });
}

#[test]
fn topic_length_limits() {
    with_watchdog(30, || {
        let (a, _b) = socketpair();
        let fd = a.as_raw_fd();
        let reg = Registry::new().unwrap();
        assert_eq!(MAX_TOPIC_LEN, 4096);
        let long = vec![b't'; MAX_TOPIC_LEN + 1];
        for topic in [&b""[..], &long[..]] {
            let e = reg.subscribe(topic, fd, Mode::Raw).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
            assert_eq!(e.errno(), libc::EINVAL);
            assert!(matches!(
                reg.publish(topic, b"p"),
                Err(Error::InvalidArgument(_))
            ));
            assert!(matches!(
                reg.publish_except(topic, b"p", None),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert_eq!(reg.subscriber_count(), 0);
        assert_eq!(reg.stats().publishes, 0);
        let max = vec![0u8; MAX_TOPIC_LEN];
        reg.subscribe(&max, fd, Mode::Raw).unwrap();
        assert_eq!(reg.publish(&max, b"p").unwrap(), 1);
        assert_eq!(reg.subscribers_for(&max), vec![fd]);
    });
}

#[test]
fn bad_fds() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let e = reg.subscribe(b"t", -1, Mode::Raw).unwrap_err();
        assert!(matches!(e, Error::BadFd), "{e:?}");
        assert_eq!(e.errno(), libc::EBADF);
        // An fd number that is not open.
        let (r, w) = pipe();
        let closed = r.as_raw_fd();
        drop(r);
        drop(w);
        let big: RawFd = 1_000_000;
        assert!(!fd_is_open(big));
        assert!(matches!(
            reg.subscribe(b"t", big, Mode::Raw),
            Err(Error::BadFd)
        ));
        assert!(matches!(reg.send(big, Mode::Raw, b"x"), Err(Error::BadFd)));
        assert!(reg.pending_bytes(-1).unwrap_err().errno() == libc::EBADF);
        assert_eq!(reg.pending_bytes(big).unwrap(), 0);
        assert_eq!(reg.pending_bytes(closed).unwrap(), 0);
        assert_eq!(reg.subscriber_count(), 0);
    });
}

#[test]
fn unsubscribe_keeps_queued_frames_but_unsubscribe_fd_drops_them() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        // unsubscribe(id): queued frames are still delivered, whole.
        let (a, b) = socketpair();
        let fd = a.as_raw_fd();
        make_slow(fd, b.as_raw_fd());
        let id = reg.subscribe(b"q", fd, Mode::Raw).unwrap();
        let mut expected = Vec::new();
        let mut n = 0u32;
        while reg.pending_bytes(fd).unwrap() == 0 || n < 50 {
            let f = lp_encode(&pattern_bytes(500, n));
            reg.publish(b"q", &f).unwrap();
            expected.extend_from_slice(&f);
            n += 1;
            assert!(n < 10_000, "socket never filled");
        }
        reg.unsubscribe(id).unwrap();
        assert_eq!(reg.subscriber_count(), 0);
        assert!(
            reg.pending_bytes(fd).unwrap() > 0,
            "queued bytes were dropped by unsubscribe"
        );
        let got = drain_with_dispatch(&reg, fd, b.as_raw_fd(), T);
        assert!(
            got == expected,
            "got {} of {} bytes",
            got.len(),
            expected.len()
        );
        assert_eq!(parse_lp_all(&got).len(), n as usize);

        // unsubscribe_fd: queued bytes are dropped.
        let (c, d) = socketpair();
        let fd = c.as_raw_fd();
        make_slow(fd, d.as_raw_fd());
        reg.subscribe(b"q", fd, Mode::Raw).unwrap();
        reg.subscribe(b"q2", fd, Mode::Raw).unwrap();
        let mut k = 0;
        while reg.pending_bytes(fd).unwrap() == 0 {
            reg.publish(b"q", &[b'z'; 500]).unwrap();
            k += 1;
            assert!(k < 10_000, "socket never filled");
        }
        assert_eq!(reg.unsubscribe_fd(fd).unwrap(), 2);
        assert_eq!(reg.pending_bytes(fd).unwrap(), 0);
        let st = reg.stats();
        assert_eq!((st.queued_bytes, st.fds, st.subscriptions), (0, 0, 0));
        let got = drain_with_dispatch(&reg, fd, d.as_raw_fd(), T);
        assert!(got.len() < k * 500, "dropped bytes were still sent");
        assert!(got.iter().all(|&x| x == b'z'));
    });
}

/// Rule 6: a write that fails with EBADF (the host closed a subscribed fd without
/// unsubscribe_fd) evicts the fd. The fd is moved to a high number first so that no other
/// test's fd can take the number while it is closed.
#[test]
fn closed_subscribed_fd_is_evicted_with_ebadf() {
    with_watchdog(30, || {
        let (a, _b) = socketpair();
        let high = unsafe { libc::fcntl(a.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 900) };
        assert!(high >= 900, "F_DUPFD: {}", std::io::Error::last_os_error());
        let reg = Registry::new().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        reg.set_evict_callback(Some(Box::new(move |fd, why| {
            c.lock().unwrap().push((fd, why))
        })));
        reg.subscribe(b"t", high, Mode::Raw).unwrap();
        assert_eq!(unsafe { libc::close(high) }, 0);
        assert_eq!(reg.publish(b"t", b"x").unwrap(), 1);
        assert_eq!(*calls.lock().unwrap(), vec![(high, libc::EBADF)]);
        assert_eq!(reg.subscriber_count(), 0);
        assert_eq!(reg.stats().evicted_fds, 1);
        assert!(matches!(reg.send(high, Mode::Raw, b"x"), Err(Error::BadFd)));
        assert!(matches!(
            reg.subscribe(b"t", high, Mode::Raw),
            Err(Error::BadFd)
        ));
    });
}

/// With `set_fd_check`, a publish to an fd whose number a new file took (closed without
/// `unsubscribe_fd`) forgets the old file's subscriptions and reaches nobody; without it, the
/// new file receives the old file's topics until the number's next subscribe or send.
#[test]
fn fd_check_stops_a_publish_at_a_reused_number() {
    with_watchdog(30, || {
        for check in [false, true] {
            let reg = Registry::new().unwrap();
            let evicted = Arc::new(Mutex::new(Vec::new()));
            let ev = evicted.clone();
            reg.set_evict_callback(Some(Box::new(move |fd, why| {
                ev.lock().unwrap().push((fd, why))
            })));
            reg.set_fd_check(check);
            let (old, _old_peer) = socketpair();
            let fd = old.as_raw_fd();
            reg.subscribe(b"old", fd, Mode::Raw).unwrap();
            let (new, new_peer) = socketpair();
            let _fd2 = reuse_fd_number(old, OwnedFd::from(new));

            assert_eq!(reg.publish(b"old", b"stale").unwrap(), 1);
            let leaked = read_quiet(new_peer.as_raw_fd());
            if !check {
                assert_eq!(leaked, b"stale", "the window the check closes");
                continue;
            }
            assert!(leaked.is_empty(), "{leaked:?} reached the new file");
            assert_eq!(
                reg.subscriber_count(),
                0,
                "the old file's topics are forgotten"
            );
            assert_eq!(reg.publish(b"old", b"stale").unwrap(), 0);
            assert!(evicted.lock().unwrap().is_empty(), "no evict callback");
            assert_eq!(reg.stats().evicted_fds, 0);
        }
    });
}

/// The corked path checks once per flush: frames queued for the old file reach nobody.
#[test]
fn fd_check_stops_a_corked_flush_at_a_reused_number() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        reg.set_fd_check(true);
        let (old, _old_peer) = socketpair();
        let fd = old.as_raw_fd();
        reg.subscribe(b"old", fd, Mode::Raw).unwrap();
        reg.cork();
        assert_eq!(reg.publish(b"old", b"stale").unwrap(), 1);
        let (new, new_peer) = socketpair();
        let _fd2 = reuse_fd_number(old, OwnedFd::from(new));
        reg.flush();
        reg.uncork();
        assert!(read_quiet(new_peer.as_raw_fd()).is_empty());
        assert_eq!(reg.subscriber_count(), 0);
        assert_eq!(reg.stats().queued_bytes, 0);
        assert_eq!(reg.pending_bytes(fd).unwrap(), 0);
    });
}
