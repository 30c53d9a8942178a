//! Corked publishes gathered per topic (src/batch.rs) behave exactly like frames queued per
//! fd: order per fd across topics, sends and subscription changes; publish_except; the outbox
//! limit; pending_bytes and the queued-bytes gauge; members that stay across flushes; and
//! heartbeats for fds whose corked topic went quiet.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use fdcast::{Mode, Overflow, Registry};

const T: Duration = Duration::from_secs(10);

fn frame(tag: &str) -> Vec<u8> {
    lp_encode(tag.as_bytes())
}

fn received(stream: &UnixStream) -> Vec<Vec<u8>> {
    parse_lp_all(&read_quiet(stream.as_raw_fd()))
}

fn tags(tags: &[&str]) -> Vec<Vec<u8>> {
    tags.iter().map(|tag| tag.as_bytes().to_vec()).collect()
}

#[test]
fn an_fd_on_two_topics_gets_corked_frames_in_publish_order() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (both, both_reader) = socketpair_nonblocking();
        let (only_a, only_a_reader) = socketpair_nonblocking();
        reg.subscribe(b"a", both.as_raw_fd(), Mode::Raw).unwrap();
        reg.subscribe(b"b", both.as_raw_fd(), Mode::Raw).unwrap();
        reg.subscribe(b"a", only_a.as_raw_fd(), Mode::Raw).unwrap();
        reg.cork();
        for (topic, tag) in [(b"a", "a1"), (b"b", "b1"), (b"a", "a2"), (b"b", "b2")] {
            reg.publish(topic, &frame(tag)).unwrap();
        }
        reg.flush();
        assert_eq!(received(&both_reader), tags(&["a1", "b1", "a2", "b2"]));
        assert_eq!(received(&only_a_reader), tags(&["a1", "a2"]));
    });
}

#[test]
fn a_send_between_corked_publishes_stays_between_them() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        reg.cork();
        reg.publish(b"t", &frame("p1")).unwrap();
        reg.send(fd, Mode::Raw, &frame("direct")).unwrap();
        reg.publish(b"t", &frame("p2")).unwrap();
        assert!(
            read_quiet(theirs.as_raw_fd()).is_empty(),
            "nothing before the flush"
        );
        reg.flush();
        assert_eq!(received(&theirs), tags(&["p1", "direct", "p2"]));
        // The same across a flush: the fd stays a member of the busy topic's batch.
        reg.publish(b"t", &frame("p3")).unwrap();
        reg.send(fd, Mode::Raw, &frame("direct2")).unwrap();
        reg.flush();
        assert_eq!(received(&theirs), tags(&["p3", "direct2"]));
    });
}

#[test]
fn subscribing_a_member_elsewhere_keeps_its_corked_frames_first() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        reg.subscribe(b"a", fd, Mode::Raw).unwrap();
        reg.cork();
        reg.publish(b"a", &frame("a1")).unwrap();
        reg.subscribe(b"b", fd, Mode::Raw).unwrap();
        reg.publish(b"b", &frame("b1")).unwrap();
        reg.publish(b"a", &frame("a2")).unwrap();
        reg.flush();
        assert_eq!(received(&theirs), tags(&["a1", "b1", "a2"]));
    });
}

#[test]
fn unsubscribing_keeps_frames_already_gathered_and_unsubscribe_fd_drops_them() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (kept, kept_reader) = socketpair_nonblocking();
        let (dropped, dropped_reader) = socketpair_nonblocking();
        let kept_id = reg.subscribe(b"t", kept.as_raw_fd(), Mode::Raw).unwrap();
        reg.subscribe(b"t", dropped.as_raw_fd(), Mode::Raw).unwrap();
        reg.cork();
        let one = frame("one");
        reg.publish(b"t", &one).unwrap();
        assert_eq!(reg.stats().queued_bytes, 2 * one.len() as u64);
        reg.unsubscribe(kept_id).unwrap();
        assert_eq!(reg.unsubscribe_fd(dropped.as_raw_fd()).unwrap(), 1);
        assert_eq!(reg.pending_bytes(kept.as_raw_fd()).unwrap(), one.len());
        assert_eq!(reg.pending_bytes(dropped.as_raw_fd()).unwrap(), 0);
        assert_eq!(reg.stats().queued_bytes, one.len() as u64);
        reg.publish(b"t", &frame("two")).unwrap();
        reg.flush();
        assert_eq!(received(&kept_reader), tags(&["one"]));
        assert!(read_quiet(dropped_reader.as_raw_fd()).is_empty());
        let stats = reg.stats();
        assert_eq!((stats.queued_bytes, stats.deliveries), (0, 1));
        assert_eq!(stats.fds, 0, "the drained, unsubscribed fd is forgotten");
    });
}

#[test]
fn publish_except_skips_the_sender_only() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| socketpair_nonblocking()).collect();
        for (ours, _) in &pairs {
            reg.subscribe(b"room", ours.as_raw_fd(), Mode::Raw).unwrap();
        }
        let sender = pairs[1].0.as_raw_fd();
        reg.cork();
        reg.publish(b"room", &frame("m1")).unwrap();
        let m2 = frame("from-1");
        assert_eq!(reg.publish_except(b"room", &m2, Some(sender)).unwrap(), 2);
        reg.publish(b"room", &frame("m3")).unwrap();
        let whole = frame("m1").len() + m2.len() + frame("m3").len();
        assert_eq!(reg.pending_bytes(sender).unwrap(), whole - m2.len());
        assert_eq!(reg.pending_bytes(pairs[0].0.as_raw_fd()).unwrap(), whole);
        assert_eq!(reg.stats().queued_bytes, (3 * whole - m2.len()) as u64);
        assert_eq!(reg.flush(), 3);
        assert_eq!(received(&pairs[1].1), tags(&["m1", "m3"]));
        for other in [0, 2] {
            assert_eq!(received(&pairs[other].1), tags(&["m1", "from-1", "m3"]));
        }
        assert_eq!(reg.stats().deliveries, 8);
    });
}

#[test]
fn corked_frames_past_the_limit_drop_as_they_would_per_fd() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        let frame_len = frame("x-00").len();
        reg.set_outbox_limit(10 * frame_len);
        reg.set_overflow(Overflow::DropMessage);
        reg.cork();
        for i in 0..25 {
            reg.publish(b"t", &frame(&format!("x-{i:02}"))).unwrap();
            assert!(reg.pending_bytes(fd).unwrap() <= 10 * frame_len);
        }
        let stats = reg.stats();
        assert_eq!(
            stats.dropped_messages, 15,
            "the limit's worth is kept, the rest dropped"
        );
        assert_eq!(stats.queued_bytes, 10 * frame_len as u64);
        reg.flush();
        let expected: Vec<Vec<u8>> = (0..10).map(|i| format!("x-{i:02}").into_bytes()).collect();
        assert_eq!(received(&theirs), expected);
    });
}

#[test]
fn a_slow_member_is_written_to_when_it_reads_again() {
    with_watchdog(60, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        make_slow(fd, theirs.as_raw_fd());
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        reg.set_outbox_limit(64 << 20);
        reg.cork();
        let mut expected = Vec::new();
        for round in 0..50 {
            for i in 0..20 {
                let payload = pattern_bytes(1000, round * 20 + i);
                reg.publish(b"t", &payload).unwrap();
                expected.extend(payload);
            }
            reg.flush();
        }
        assert!(reg.pending_bytes(fd).unwrap() > 0, "the kernel took it all");
        let got = drain_with_dispatch(&reg, fd, theirs.as_raw_fd(), T);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
        assert_eq!(reg.stats().deliveries, 1000);
        assert_eq!(reg.stats().queued_bytes, 0);
    });
}

#[test]
fn modes_share_a_batch_each_framed_for_its_subscriber() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ws, ws_reader) = socketpair_nonblocking();
        let (sse, sse_reader) = socketpair_nonblocking();
        reg.subscribe(b"t", ws.as_raw_fd(), Mode::WsText).unwrap();
        reg.subscribe(b"t", sse.as_raw_fd(), Mode::Sse).unwrap();
        reg.cork();
        reg.publish(b"t", b"one").unwrap();
        reg.publish(b"t", b"two\nlines").unwrap();
        assert!(
            reg.publish(b"t", &[0xff]).is_err(),
            "invalid UTF-8 for text modes"
        );
        reg.flush();
        let frames = parse_ws_all(&read_quiet(ws_reader.as_raw_fd()));
        let payloads: Vec<&[u8]> = frames.iter().map(|f| f.payload.as_slice()).collect();
        assert_eq!(payloads, [&b"one"[..], b"two\nlines"]);
        assert!(frames.iter().all(|f| f.opcode == 1));
        let events = parse_sse_all(&read_quiet(sse_reader.as_raw_fd()));
        assert_eq!(events, tags(&["one", "two\nlines"]));
    });
}

#[test]
fn dispatch_flushes_a_batch_and_an_uncorked_publish_is_written_at_once() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        reg.subscribe(b"t", ours.as_raw_fd(), Mode::Raw).unwrap();
        reg.cork();
        reg.publish(b"t", &frame("corked")).unwrap();
        assert!(
            poll_readable(reg.poll_fd(), 1000),
            "poll_fd readable while frames wait"
        );
        reg.dispatch(Some(Duration::ZERO)).unwrap();
        assert_eq!(received(&theirs), tags(&["corked"]));
        reg.dispatch(Some(Duration::ZERO)).unwrap();
        assert!(!poll_readable(reg.poll_fd(), 0), "nothing waits");
        reg.publish(b"t", &frame("still-corked")).unwrap();
        assert!(
            poll_readable(reg.poll_fd(), 1000),
            "readable again: frames wait"
        );
        assert_eq!(reg.uncork(), 1);
        assert_eq!(received(&theirs), tags(&["still-corked"]));
        reg.publish(b"t", &frame("immediate")).unwrap();
        assert_eq!(received(&theirs), tags(&["immediate"]));
        assert_eq!(reg.pending_bytes(ours.as_raw_fd()).unwrap(), 0);
    });
}

#[test]
fn members_of_a_quiet_corked_topic_get_heartbeats() {
    with_watchdog(30, || {
        let reg = Registry::new().unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        reg.subscribe(b"t", ours.as_raw_fd(), Mode::Sse).unwrap();
        reg.cork();
        reg.publish(b"t", b"x").unwrap();
        reg.flush();
        assert_eq!(read_quiet(theirs.as_raw_fd()), b"data: x\n\n");
        reg.set_heartbeat(Some(Duration::from_millis(50)));
        let mut beats = Vec::new();
        let started = std::time::Instant::now();
        while beats.len() < 3 * 3 && started.elapsed() < T {
            reg.dispatch(Some(Duration::from_millis(20))).unwrap();
            beats.extend(read_quiet(theirs.as_raw_fd()));
        }
        assert_eq!(
            beats, b":\n\n:\n\n:\n\n",
            "three comment lines while the topic is quiet"
        );
    });
}
