//! Corking: frames queue until flush/uncork/dispatch, then leave whole, in order, one write
//! per fd; the outbox limit and overflow policy still apply while corked.

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use fdcast::{Error, Mode, Registry};

const T: Duration = Duration::from_secs(10);

fn numbered(i: u32) -> Vec<u8> {
    lp_encode(format!("frame {i:05}").as_bytes())
}

#[test]
fn corked_publishes_wait_for_flush_then_arrive_in_order() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| socketpair_nonblocking()).collect();
        for (ours, _) in &pairs {
            reg.subscribe(b"t", ours.as_raw_fd(), Mode::Raw).unwrap();
        }
        reg.cork();
        let mut expected = Vec::new();
        for i in 0..100 {
            assert_eq!(reg.publish(b"t", &numbered(i)).unwrap(), 3);
            expected.extend(numbered(i));
        }
        for (_, theirs) in &pairs {
            assert!(
                read_quiet(theirs.as_raw_fd()).is_empty(),
                "corked frame was written"
            );
        }
        let stats = reg.stats();
        assert_eq!(stats.queued_bytes, 3 * expected.len() as u64);
        assert_eq!(stats.deliveries, 0);

        assert_eq!(reg.flush(), 3, "one fd written per subscriber");
        for (_, theirs) in &pairs {
            let got = read_exact_timeout(theirs.as_raw_fd(), expected.len(), T);
            assert_eq!(got, expected);
        }
        let stats = reg.stats();
        assert_eq!(stats.queued_bytes, 0);
        assert_eq!(stats.deliveries, 300);
        assert_eq!(reg.flush(), 0, "nothing left to flush");
        // Still corked after flush.
        reg.publish(b"t", b"later").unwrap();
        assert!(read_quiet(pairs[0].1.as_raw_fd()).is_empty());
        assert_eq!(reg.uncork(), 3);
        assert_eq!(read_exact_timeout(pairs[0].1.as_raw_fd(), 5, T), b"later");
    });
}

#[test]
fn uncork_returns_to_immediate_writes() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        reg.subscribe(b"t", ours.as_raw_fd(), Mode::WsBinary)
            .unwrap();
        reg.cork();
        assert_eq!(reg.uncork(), 0, "nothing queued");
        reg.publish(b"t", b"now").unwrap();
        assert_eq!(read_exact_timeout(theirs.as_raw_fd(), 5, T), b"\x82\x03now");
        assert_eq!(reg.stats().deliveries, 1);
    });
}

#[test]
fn poll_fd_becomes_readable_when_corked_frames_wait_and_dispatch_flushes_them() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        reg.subscribe(b"t", ours.as_raw_fd(), Mode::Sse).unwrap();
        reg.cork();
        assert!(!poll_readable(reg.poll_fd(), 0));
        reg.publish(b"t", b"a").unwrap();
        reg.publish(b"t", b"b").unwrap();
        assert!(poll_readable(reg.poll_fd(), 1000), "poll_fd not readable");
        assert_eq!(reg.dispatch(Some(Duration::ZERO)).unwrap(), 1);
        let expected = b"data: a\n\ndata: b\n\n";
        assert_eq!(
            read_exact_timeout(theirs.as_raw_fd(), expected.len(), T),
            expected
        );
        assert!(!poll_readable(reg.poll_fd(), 0), "poll_fd still readable");
        assert_eq!(reg.dispatch(Some(Duration::ZERO)).unwrap(), 0);
    });
}

#[test]
fn send_while_corked_queues_behind_broadcasts() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        reg.cork();
        reg.publish(b"t", b"one,").unwrap();
        reg.send(fd, Mode::Raw, b"two,").unwrap();
        reg.publish(b"t", b"three").unwrap();
        assert_eq!(reg.pending_bytes(fd).unwrap(), 13);
        reg.uncork();
        assert_eq!(
            read_exact_timeout(theirs.as_raw_fd(), 13, T),
            b"one,two,three"
        );
    });
}

#[test]
fn corked_outbox_limit_drops_whole_frames() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        let frame = numbered(0);
        reg.set_outbox_limit(frame.len() * 10);
        reg.cork();
        for i in 0..25 {
            reg.publish(b"t", &numbered(i)).unwrap();
        }
        assert_eq!(reg.pending_bytes(fd).unwrap(), frame.len() * 10);
        assert!(matches!(
            reg.send(fd, Mode::Raw, &numbered(99)),
            Err(Error::Dropped)
        ));
        let stats = reg.stats();
        assert_eq!(stats.dropped_messages, 16);
        reg.flush();
        let got = read_exact_timeout(theirs.as_raw_fd(), frame.len() * 10, T);
        let frames = parse_lp_all(&got);
        let expected: Vec<Vec<u8>> = (0..10).map(|i| numbered(i)[4..].to_vec()).collect();
        assert_eq!(frames, expected, "the first ten frames, whole and in order");
    });
}

#[test]
fn corked_frame_larger_than_the_limit_still_reaches_an_empty_outbox() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair();
        reg.subscribe(b"t", ours.as_raw_fd(), Mode::Raw).unwrap();
        reg.set_outbox_limit(0);
        reg.cork();
        let big = pattern_bytes(8192, 7);
        reg.publish(b"t", &big).unwrap();
        reg.publish(b"t", b"x").unwrap();
        assert_eq!(
            reg.stats().dropped_messages,
            1,
            "the second frame overflows"
        );
        reg.flush();
        assert_eq!(read_exact_timeout(theirs.as_raw_fd(), big.len(), T), big);
    });
}

#[test]
fn corked_burst_larger_than_the_socket_buffer_completes_through_dispatch() {
    with_watchdog(60, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        make_slow(fd, theirs.as_raw_fd());
        reg.subscribe(b"t", fd, Mode::WsBinary).unwrap();
        reg.set_outbox_limit(64 << 20);
        reg.cork();
        let count = 3000;
        for i in 0..count {
            reg.publish(b"t", &pattern_bytes(300, i)).unwrap();
        }
        reg.flush();
        assert!(
            reg.pending_bytes(fd).unwrap() > 0,
            "the burst should not fit the socket"
        );
        let got = drain_with_dispatch(&reg, fd, theirs.as_raw_fd(), T);
        let frames = parse_ws_all(&got);
        assert_eq!(frames.len(), count as usize);
        for (i, frame) in frames.iter().enumerate() {
            assert_eq!(frame.payload, pattern_bytes(300, i as u32), "frame {i}");
        }
        let stats = reg.stats();
        assert_eq!(stats.deliveries, count as u64);
        assert_eq!(stats.dropped_messages, 0);
    });
}

#[test]
fn corked_frames_to_a_closed_peer_evict_it_on_flush() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        let evicted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = evicted.clone();
        reg.set_evict_callback(Some(Box::new(move |fd, reason| {
            sink.lock().unwrap().push((fd, reason));
        })));
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        reg.cork();
        reg.publish(b"t", b"lost").unwrap();
        drop(theirs);
        assert_eq!(reg.flush(), 0);
        assert_eq!(*evicted.lock().unwrap(), vec![(fd, libc::EPIPE)]);
        assert_eq!(reg.subscriber_count(), 0);
        assert_eq!(reg.stats().queued_bytes, 0);
    });
}

#[test]
fn unsubscribe_fd_discards_corked_frames() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        reg.cork();
        reg.publish(b"t", b"gone").unwrap();
        assert_eq!(reg.unsubscribe_fd(fd).unwrap(), 1);
        assert_eq!(reg.flush(), 0);
        assert!(read_quiet(theirs.as_raw_fd()).is_empty());
        assert_eq!(reg.stats().queued_bytes, 0);
    });
}
