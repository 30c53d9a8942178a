//! WebSocket frames written by fdcast, checked by tungstenite (a real client) and by a strict
//! byte-level parser.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use fdcast::{Mode, Registry};
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocket};

const SIZES: [usize; 6] = [0, 125, 126, 65535, 65536, 1 << 20];

/// The messages the tests publish: for each size a text then a binary message.
fn messages() -> Vec<(Mode, Vec<u8>)> {
    let mut v = Vec::new();
    for (i, &n) in SIZES.iter().enumerate() {
        v.push((Mode::WsText, utf8_text(n).into_bytes()));
        v.push((Mode::WsBinary, pattern_bytes(n, i as u32 + 1)));
    }
    v
}

/// Spawns a tungstenite client reading `n` messages from `stream`.
fn spawn_reader<S: Read + Write + Send + 'static>(
    stream: S,
    n: usize,
) -> (thread::JoinHandle<Vec<Message>>, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let mut ws = WebSocket::from_raw_socket(stream, Role::Client, None);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            match ws.read() {
                Ok(m) => out.push(m),
                Err(e) => panic!("tungstenite read of message {i} failed: {e}"),
            }
        }
        let _ = tx.send(());
        out
    });
    (h, rx)
}

fn check_messages(got: &[Message], want: &[(Mode, Vec<u8>)]) {
    assert_eq!(got.len(), want.len());
    for (i, (m, (mode, payload))) in got.iter().zip(want).enumerate() {
        match (mode, m) {
            (Mode::WsText, Message::Text(t)) => {
                assert!(
                    t.as_bytes() == payload.as_slice(),
                    "message {i}: text of {} bytes differs (got {} bytes)",
                    payload.len(),
                    t.len()
                )
            }
            (Mode::WsBinary, Message::Binary(b)) => {
                assert!(
                    b.as_ref() == payload.as_slice(),
                    "message {i}: binary of {} bytes differs (got {} bytes)",
                    payload.len(),
                    b.len()
                )
            }
            (mode, m) => panic!("message {i}: expected {mode:?}, got {m:?}"),
        }
    }
}

/// Publishes every message through two topics (text, binary) subscribed by `fd`, with a
/// tungstenite client reading the other end, dispatching until everything is flushed.
fn publish_all_sizes<S: Read + Write + Send + 'static>(fd: RawFd, peer: S) {
    let reg = Registry::new().unwrap();
    reg.set_outbox_limit(16 << 20);
    reg.subscribe(b"text", fd, Mode::WsText).unwrap();
    reg.subscribe(b"bin", fd, Mode::WsBinary).unwrap();
    let want = messages();
    let (h, done) = spawn_reader(peer, want.len());
    for (mode, payload) in &want {
        let topic: &[u8] = if *mode == Mode::WsText {
            b"text"
        } else {
            b"bin"
        };
        assert_eq!(reg.publish(topic, payload).unwrap(), 1);
    }
    dispatch_until_flushed(&reg, fd, Duration::from_secs(20));
    let got = join_within(h, &done, Duration::from_secs(20));
    check_messages(&got, &want);
    let st = reg.stats();
    assert_eq!(st.publishes, want.len() as u64);
    assert_eq!(st.deliveries, want.len() as u64);
    assert_eq!(st.dropped_messages, 0);
    assert_eq!(st.queued_bytes, 0);
}

#[test]
fn all_sizes_over_socketpair() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        publish_all_sizes(a.as_raw_fd(), b);
        drop(a);
    });
}

#[test]
fn all_sizes_over_nonblocking_socketpair_with_small_buffers() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        a.set_nonblocking(true).unwrap();
        make_slow(a.as_raw_fd(), b.as_raw_fd());
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        publish_all_sizes(a.as_raw_fd(), b);
        // fdcast leaves socket flags alone.
        assert!(is_nonblocking(a.as_raw_fd()));
        drop(a);
    });
}

#[test]
fn all_sizes_over_tcp_loopback() {
    with_watchdog(30, || {
        let (server, client) = tcp_pair();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        publish_all_sizes(server.as_raw_fd(), client);
        // A blocking socket stays blocking: fdcast uses MSG_DONTWAIT, not O_NONBLOCK.
        assert!(!is_nonblocking(server.as_raw_fd()));
        drop(server);
    });
}

#[test]
fn all_sizes_via_send() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let fd = a.as_raw_fd();
        let reg = Registry::new().unwrap();
        reg.set_outbox_limit(16 << 20);
        let want = messages();
        let (h, done) = spawn_reader(b, want.len());
        for (mode, payload) in &want {
            reg.send(fd, *mode, payload).unwrap();
        }
        dispatch_until_flushed(&reg, fd, Duration::from_secs(20));
        let got = join_within(h, &done, Duration::from_secs(20));
        check_messages(&got, &want);
        assert_eq!(reg.subscriber_count(), 0);
        drop(a);
    });
}

/// Exact bytes: FIN + opcode, no mask, minimal payload-length encoding at each boundary.
#[test]
fn exact_header_bytes() {
    with_watchdog(30, || {
        let (a, b) = socketpair();
        let fd = a.as_raw_fd();
        let reg = Registry::new().unwrap();
        reg.set_outbox_limit(16 << 20);
        reg.subscribe(b"t", fd, Mode::WsBinary).unwrap();
        let want = messages();
        let mut expected = Vec::new();
        for (mode, payload) in &want {
            let op = if *mode == Mode::WsText { 1 } else { 2 };
            reg.send(fd, *mode, payload).unwrap();
            expected.extend_from_slice(&ws_encode(op, payload));
        }
        let got = drain_with_dispatch(&reg, fd, b.as_raw_fd(), Duration::from_secs(20));
        assert_eq!(got.len(), expected.len());
        // Header checks with a readable failure before the full comparison.
        let frames = parse_ws_all(&got);
        assert_eq!(frames.len(), want.len());
        for (f, (mode, payload)) in frames.iter().zip(&want) {
            assert_eq!(f.opcode, if *mode == Mode::WsText { 1 } else { 2 });
            assert!(f.payload == *payload);
        }
        assert!(got == expected);
        // Spot-check the header encodings themselves.
        assert_eq!(&ws_encode(2, &[0u8; 125])[..2], &[0x82, 125]);
        assert_eq!(&ws_encode(2, &[0u8; 126])[..4], &[0x82, 126, 0, 126]);
        assert_eq!(&ws_encode(2, &[0u8; 65536])[..4], &[0x82, 127, 0, 0]);
        drop(a);
        drop(b);
    });
}

/// A WsText and a WsBinary subscriber of one topic each get their own opcode; a RAW
/// subscriber of the same topic gets the payload bytes alone.
#[test]
fn mixed_modes_on_one_topic() {
    with_watchdog(30, || {
        let (t1, t2) = socketpair();
        let (b1, b2) = socketpair();
        let (r1, r2) = socketpair();
        let reg = Registry::new().unwrap();
        reg.subscribe(b"room", t1.as_raw_fd(), Mode::WsText)
            .unwrap();
        reg.subscribe(b"room", b1.as_raw_fd(), Mode::WsBinary)
            .unwrap();
        reg.subscribe(b"room", r1.as_raw_fd(), Mode::Raw).unwrap();
        let p = "héllo wörld".as_bytes();
        assert_eq!(reg.publish(b"room", p).unwrap(), 3);
        let d = Duration::from_secs(5);
        let n = ws_encode(1, p).len();
        assert_eq!(read_exact_timeout(t2.as_raw_fd(), n, d), ws_encode(1, p));
        assert_eq!(read_exact_timeout(b2.as_raw_fd(), n, d), ws_encode(2, p));
        assert_eq!(read_exact_timeout(r2.as_raw_fd(), p.len(), d), p);
        for s in [&t2, &b2, &r2] {
            assert!(read_quiet(s.as_raw_fd()).is_empty());
        }

        // The same through tungstenite, over TCP.
        let (srv, cli) = tcp_pair();
        cli.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        reg.subscribe(b"room", srv.as_raw_fd(), Mode::WsText)
            .unwrap();
        let (h, done) = spawn_reader(cli, 1);
        assert_eq!(reg.publish(b"room", p).unwrap(), 4);
        dispatch_until_flushed(&reg, srv.as_raw_fd(), Duration::from_secs(10));
        let got = join_within(h, &done, Duration::from_secs(10));
        assert_eq!(
            got,
            vec![Message::Text(std::str::from_utf8(p).unwrap().into())]
        );
    });
}
