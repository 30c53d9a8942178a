//! Per-topic history: ids in SSE and WebSocket id-mode frames, resume by id and by tail,
//! recovered or not, and no gap or duplicate between replay and live while other threads
//! publish.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use fdcast::{EventId, HistoryLimits, Mode, Registry};

const T: Duration = Duration::from_secs(10);

fn keep_messages(max_messages: usize) -> HistoryLimits {
    HistoryLimits {
        max_messages,
        ..HistoryLimits::default()
    }
}

fn registry_keeping(limits: HistoryLimits) -> Registry {
    let reg = Registry::new().unwrap();
    reg.set_history(limits);
    reg
}

/// Publishes `payloads` to `topic` and returns the ids they got.
fn publish_all(reg: &Registry, topic: &[u8], payloads: &[&str]) -> Vec<EventId> {
    payloads
        .iter()
        .map(|payload| {
            let (_, id) = reg
                .publish_with_id(topic, payload.as_bytes(), None)
                .unwrap();
            id.expect("history is on")
        })
        .collect()
}

fn sse_with_id(id: EventId, payload: &str) -> String {
    format!("id: {id}\ndata: {payload}\n\n")
}

/// The ids of the SSE events in `bytes`, in order; every event must carry one.
fn sse_ids(bytes: &[u8]) -> Vec<EventId> {
    let text = std::str::from_utf8(bytes).unwrap();
    text.split_terminator("\n\n")
        .map(|event| {
            let line = event.lines().next().unwrap();
            let id = line.strip_prefix("id: ").expect("an id line first");
            EventId::parse(id.as_bytes()).expect("a well-formed id")
        })
        .collect()
}

#[test]
fn publish_ids_count_from_one_in_one_epoch_and_sse_frames_carry_them() {
    let reg = registry_keeping(keep_messages(100));
    let (live, live_peer) = socketpair();
    reg.subscribe(b"news", live.as_raw_fd(), Mode::Sse).unwrap();
    let ids = publish_all(&reg, b"news", &["one", "two", "three"]);
    assert_eq!(
        ids.iter().map(|id| id.offset).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(ids.iter().all(|id| id.epoch == ids[0].epoch));
    let expected: String = ["one", "two", "three"]
        .iter()
        .zip(&ids)
        .map(|(payload, id)| sse_with_id(*id, payload))
        .collect();
    let got = read_exact_timeout(live_peer.as_raw_fd(), expected.len(), T);
    assert_eq!(String::from_utf8(got).unwrap(), expected);
}

#[test]
fn another_topic_has_its_own_epoch_and_offsets() {
    let reg = registry_keeping(keep_messages(10));
    let a = publish_all(&reg, b"a", &["x", "y"]);
    let b = publish_all(&reg, b"b", &["z"]);
    assert_eq!((a[1].offset, b[0].offset), (2, 1));
    assert_ne!(a[0].epoch, b[0].epoch);
}

#[test]
fn resume_replays_what_came_after_the_id_in_order_then_live_per_mode() {
    let reg = registry_keeping(keep_messages(100));
    // Nobody subscribes yet: the topic keeps them anyway.
    let ids = publish_all(&reg, b"t", &["m1", "m2", "m3", "m4"]);

    let (sse, sse_peer) = socketpair();
    let (_, recovered) = reg
        .subscribe_since(b"t", sse.as_raw_fd(), Mode::Sse, ids[1])
        .unwrap();
    assert!(recovered);
    let (raw, raw_peer) = socketpair();
    reg.subscribe_since(b"t", raw.as_raw_fd(), Mode::Raw, ids[0])
        .unwrap();
    let (ws, ws_peer) = socketpair();
    reg.subscribe_since(b"t", ws.as_raw_fd(), Mode::WsText, ids[2])
        .unwrap();

    let live = publish_all(&reg, b"t", &["m5"]);

    let expected_sse = [
        sse_with_id(ids[2], "m3"),
        sse_with_id(ids[3], "m4"),
        sse_with_id(live[0], "m5"),
    ]
    .concat();
    let got = read_exact_timeout(sse_peer.as_raw_fd(), expected_sse.len(), T);
    assert_eq!(String::from_utf8(got).unwrap(), expected_sse);
    assert_eq!(read_exact_timeout(raw_peer.as_raw_fd(), 8, T), b"m2m3m4m5");
    let expected_ws = [ws_encode(0x1, b"m4"), ws_encode(0x1, b"m5")].concat();
    assert_eq!(
        read_exact_timeout(ws_peer.as_raw_fd(), expected_ws.len(), T),
        expected_ws
    );
    for peer in [&sse_peer, &raw_peer, &ws_peer] {
        assert!(read_quiet(peer.as_raw_fd()).is_empty());
    }
}

#[test]
fn resume_from_the_last_id_replays_nothing_and_is_recovered() {
    let reg = registry_keeping(keep_messages(10));
    let ids = publish_all(&reg, b"t", &["a", "b"]);
    let (fd, peer) = socketpair();
    let (_, recovered) = reg
        .subscribe_since(b"t", fd.as_raw_fd(), Mode::Sse, ids[1])
        .unwrap();
    assert!(recovered);
    assert!(read_quiet(peer.as_raw_fd()).is_empty());
}

#[test]
fn tail_replays_the_last_n_then_live() {
    let reg = registry_keeping(keep_messages(10));
    publish_all(&reg, b"log", &["l1", "l2", "l3", "l4"]);
    let (fd, peer) = socketpair();
    reg.subscribe_tail(b"log", fd.as_raw_fd(), Mode::Raw, 2)
        .unwrap();
    publish_all(&reg, b"log", &["l5"]);
    assert_eq!(read_exact_timeout(peer.as_raw_fd(), 6, T), b"l3l4l5");
    let (all, all_peer) = socketpair();
    reg.subscribe_tail(b"log", all.as_raw_fd(), Mode::Raw, 100)
        .unwrap();
    assert_eq!(
        read_exact_timeout(all_peer.as_raw_fd(), 10, T),
        b"l1l2l3l4l5"
    );
}

#[test]
fn resume_after_eviction_by_count_is_not_recovered_but_replays_what_is_kept() {
    let reg = registry_keeping(keep_messages(3));
    let ids = publish_all(&reg, b"t", &["1", "2", "3", "4", "5"]);
    let (fd, peer) = socketpair();
    let (_, recovered) = reg
        .subscribe_since(b"t", fd.as_raw_fd(), Mode::Raw, ids[0])
        .unwrap();
    assert!(!recovered, "2 was evicted");
    assert_eq!(read_exact_timeout(peer.as_raw_fd(), 3, T), b"345");
    let (fd, peer) = socketpair();
    let (_, recovered) = reg
        .subscribe_since(b"t", fd.as_raw_fd(), Mode::Raw, ids[1])
        .unwrap();
    assert!(recovered, "everything after 2 is kept");
    assert_eq!(read_exact_timeout(peer.as_raw_fd(), 3, T), b"345");
}

#[test]
fn resume_after_eviction_by_age_is_not_recovered() {
    let reg = registry_keeping(HistoryLimits {
        max_age: Some(Duration::from_millis(50)),
        ..HistoryLimits::default()
    });
    let ids = publish_all(&reg, b"t", &["old1", "old2"]);
    thread::sleep(Duration::from_millis(150));
    publish_all(&reg, b"t", &["new"]);
    let (fd, peer) = socketpair();
    let (_, recovered) = reg
        .subscribe_since(b"t", fd.as_raw_fd(), Mode::Raw, ids[0])
        .unwrap();
    assert!(!recovered);
    assert_eq!(read_exact_timeout(peer.as_raw_fd(), 3, T), b"new");
    assert!(read_quiet(peer.as_raw_fd()).is_empty());
}

#[test]
fn an_id_from_another_epoch_is_not_recovered_and_replays_everything_kept() {
    let reg = registry_keeping(keep_messages(10));
    let ids = publish_all(&reg, b"t", &["a", "b"]);
    let foreign = EventId {
        epoch: ids[0].epoch.wrapping_add(1),
        offset: 1,
    };
    let (fd, peer) = socketpair();
    let (_, recovered) = reg
        .subscribe_since(b"t", fd.as_raw_fd(), Mode::Raw, foreign)
        .unwrap();
    assert!(!recovered);
    assert_eq!(read_exact_timeout(peer.as_raw_fd(), 2, T), b"ab");
}

#[test]
fn history_off_gives_no_ids_and_resumes_nothing() {
    let reg = Registry::new().unwrap();
    let (live, live_peer) = socketpair();
    reg.subscribe(b"t", live.as_raw_fd(), Mode::Sse).unwrap();
    let (_, id) = reg.publish_with_id(b"t", b"hi", None).unwrap();
    assert_eq!(id, None);
    assert_eq!(
        read_exact_timeout(live_peer.as_raw_fd(), 10, T),
        b"data: hi\n\n"
    );
    let (fd, peer) = socketpair();
    let start = EventId {
        epoch: 1,
        offset: 0,
    };
    let (_, recovered) = reg
        .subscribe_since(b"t", fd.as_raw_fd(), Mode::Raw, start)
        .unwrap();
    assert!(!recovered);
    assert!(read_quiet(peer.as_raw_fd()).is_empty());
}

#[test]
fn turning_history_off_drops_what_is_kept() {
    let reg = registry_keeping(keep_messages(10));
    publish_all(&reg, b"t", &["a"]);
    reg.set_history(HistoryLimits::default());
    reg.set_history(keep_messages(10));
    let (fd, peer) = socketpair();
    reg.subscribe_tail(b"t", fd.as_raw_fd(), Mode::Raw, 10)
        .unwrap();
    assert!(read_quiet(peer.as_raw_fd()).is_empty());
}

#[test]
fn a_refused_publish_keeps_nothing_and_takes_no_id() {
    let reg = registry_keeping(keep_messages(10));
    let (sse, _sse_peer) = socketpair();
    reg.subscribe(b"t", sse.as_raw_fd(), Mode::Sse).unwrap();
    assert!(reg.publish_with_id(b"t", b"\xff", None).is_err());
    let ids = publish_all(&reg, b"t", &["ok"]);
    assert_eq!(ids[0].offset, 1);
}

#[test]
fn a_replay_over_the_outbox_limit_catches_up_instead_of_dropping() {
    let reg = registry_keeping(keep_messages(100));
    let payload = "x".repeat(1000);
    for _ in 0..50 {
        reg.publish(b"t", payload.as_bytes()).unwrap();
    }
    reg.set_outbox_limit(4000);
    let (fd, peer) = socketpair();
    common::set_sndbuf(fd.as_raw_fd(), 4096);
    reg.subscribe_tail(b"t", fd.as_raw_fd(), Mode::Raw, 50)
        .unwrap();
    assert_eq!(reg.fd_stats(fd.as_raw_fd()).unwrap().catching_up, 1);
    peer.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    while got.len() < 50 * 1000 {
        assert!(start.elapsed() < T, "{} bytes read", got.len());
        got.extend(read_now(peer.as_raw_fd()).0);
        reg.dispatch(Some(Duration::from_millis(5))).unwrap();
    }
    assert_eq!(
        got,
        payload.repeat(50).as_bytes(),
        "every replayed frame, whole"
    );
    let after = reg.stats();
    assert_eq!((after.deliveries, after.dropped_messages), (50, 0));
    assert_eq!(after.queued_bytes, 0);
}

#[test]
fn a_replay_is_counted_as_deliveries_and_leaves_nothing_queued() {
    let reg = registry_keeping(keep_messages(1000));
    for n in 0..600 {
        reg.publish(b"t", format!("{n:04}").as_bytes()).unwrap();
    }
    let (fd, peer) = socketpair();
    reg.subscribe_tail(b"t", fd.as_raw_fd(), Mode::Raw, 1000)
        .unwrap();
    let got = read_exact_timeout(peer.as_raw_fd(), 2400, T);
    let expected: String = (0..600).map(|n| format!("{n:04}")).collect();
    assert_eq!(String::from_utf8(got).unwrap(), expected);
    let stats = reg.stats();
    assert_eq!((stats.deliveries, stats.queued_bytes), (600, 0));
}

/// A tiny deterministic generator, so a failure replays the same schedule.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

#[test]
fn resumes_mid_stream_see_every_message_once_in_order_while_threads_publish() {
    const PUBLISHERS: usize = 3;
    const PER_PUBLISHER: usize = 2000;
    const READERS: usize = 300;
    let reg = Arc::new(registry_keeping(keep_messages(100_000)));
    let published: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let reg = Arc::clone(&reg);
            let published = Arc::clone(&published);
            thread::spawn(move || {
                for i in 0..PER_PUBLISHER {
                    let payload = format!("p{p}-{i}");
                    let (_, id) = reg.publish_with_id(b"t", payload.as_bytes(), None).unwrap();
                    published.lock().unwrap().push(id.unwrap());
                }
            })
        })
        .collect();

    let mut random = Lcg(12345);
    let mut readers: Vec<(EventId, UnixStream, UnixStream, Vec<u8>)> = Vec::new();
    while readers.len() < READERS {
        let resume_from = {
            let published = published.lock().unwrap();
            if published.is_empty() {
                None
            } else {
                Some(published[random.below(published.len())])
            }
        };
        if let Some(last) = resume_from {
            let (fd, peer) = socketpair();
            peer.set_nonblocking(true).unwrap();
            let (_, recovered) = reg
                .subscribe_since(b"t", fd.as_raw_fd(), Mode::Sse, last)
                .unwrap();
            assert!(recovered, "the history keeps everything");
            readers.push((last, fd, peer, Vec::new()));
        }
        for (_, _, peer, got) in &mut readers {
            got.extend(read_now(peer.as_raw_fd()).0);
        }
        reg.dispatch(Some(Duration::ZERO)).unwrap();
    }
    for publisher in publishers {
        publisher.join().unwrap();
    }
    let total = (PUBLISHERS * PER_PUBLISHER) as u64;
    // Written bytes are in the peer's buffer at once: once nothing is queued, a last read
    // without waiting takes the rest.
    let start = std::time::Instant::now();
    loop {
        let queued = readers
            .iter()
            .any(|(_, fd, _, _)| reg.pending_bytes(fd.as_raw_fd()).unwrap() > 0);
        for (_, _, peer, got) in &mut readers {
            got.extend(read_now(peer.as_raw_fd()).0);
        }
        if !queued {
            break;
        }
        assert!(start.elapsed() < T, "outboxes did not drain");
        reg.dispatch(Some(Duration::from_millis(1))).unwrap();
    }
    for (last, _, _, got) in readers {
        let offsets: Vec<u64> = sse_ids(&got)
            .iter()
            .inspect(|id| assert_eq!(id.epoch, last.epoch))
            .map(|id| id.offset)
            .collect();
        let expected: Vec<u64> = (last.offset + 1..=total).collect();
        assert_eq!(
            offsets, expected,
            "a reader resuming after {last} must see each later id once, in order"
        );
    }
}

#[test]
fn corked_publishes_keep_order_between_replay_and_live() {
    let reg = registry_keeping(keep_messages(100));
    let (live, live_peer) = socketpair();
    reg.subscribe(b"t", live.as_raw_fd(), Mode::Raw).unwrap();
    reg.cork();
    let ids = publish_all(&reg, b"t", &["a", "b", "c"]);
    let (fd, peer) = socketpair();
    reg.subscribe_since(b"t", fd.as_raw_fd(), Mode::Raw, ids[0])
        .unwrap();
    publish_all(&reg, b"t", &["d", "e"]);
    reg.uncork();
    assert_eq!(read_exact_timeout(peer.as_raw_fd(), 4, T), b"bcde");
    assert_eq!(read_exact_timeout(live_peer.as_raw_fd(), 5, T), b"abcde");
}

/// The id and payload of a WebSocket id-mode frame's payload: split at the first LF.
fn split_id(frame_payload: &[u8]) -> (&[u8], &[u8]) {
    let lf = frame_payload
        .iter()
        .position(|&byte| byte == b'\n')
        .expect("an id-mode frame has a LF");
    (&frame_payload[..lf], &frame_payload[lf + 1..])
}

fn ws_with_id(opcode: u8, id: EventId, payload: &str) -> Vec<u8> {
    ws_encode(opcode, format!("{id}\n{payload}").as_bytes())
}

#[test]
fn websocket_id_frames_carry_the_id_before_the_payload_live_and_replayed() {
    let reg = registry_keeping(keep_messages(100));
    let (live, live_peer) = socketpair();
    reg.subscribe(b"t", live.as_raw_fd(), Mode::WsTextId)
        .unwrap();
    let ids = publish_all(&reg, b"t", &["one", "two\nlines", ""]);
    let expected_live = [
        ws_with_id(0x1, ids[0], "one"),
        ws_with_id(0x1, ids[1], "two\nlines"),
        ws_with_id(0x1, ids[2], ""),
    ]
    .concat();
    assert_eq!(
        read_exact_timeout(live_peer.as_raw_fd(), expected_live.len(), T),
        expected_live
    );

    let (binary, binary_peer) = socketpair();
    let (_, recovered) = reg
        .subscribe_since(b"t", binary.as_raw_fd(), Mode::WsBinaryId, ids[0])
        .unwrap();
    assert!(recovered);
    let (tail, tail_peer) = socketpair();
    reg.subscribe_tail(b"t", tail.as_raw_fd(), Mode::WsTextId, 1)
        .unwrap();
    let expected_replay = [
        ws_with_id(0x2, ids[1], "two\nlines"),
        ws_with_id(0x2, ids[2], ""),
    ]
    .concat();
    assert_eq!(
        read_exact_timeout(binary_peer.as_raw_fd(), expected_replay.len(), T),
        expected_replay
    );
    let expected_tail = ws_with_id(0x1, ids[2], "");
    assert_eq!(
        read_exact_timeout(tail_peer.as_raw_fd(), expected_tail.len(), T),
        expected_tail
    );
    for peer in [&live_peer, &binary_peer, &tail_peer] {
        assert!(read_quiet(peer.as_raw_fd()).is_empty());
    }
}

#[test]
fn a_websocket_client_resumes_from_the_id_in_the_last_frame_it_got() {
    let reg = registry_keeping(keep_messages(100));
    let (first, first_peer) = socketpair();
    reg.subscribe(b"chat", first.as_raw_fd(), Mode::WsBinaryId)
        .unwrap();
    publish_all(&reg, b"chat", &["m1", "m2", "m3"]);
    let seen = read_available(first_peer.as_raw_fd(), Duration::from_millis(50), T).0;
    let frames = parse_ws_all(&seen);
    let payloads: Vec<&[u8]> = frames
        .iter()
        .map(|frame| split_id(&frame.payload).1)
        .collect();
    assert_eq!(payloads, [&b"m1"[..], b"m2", b"m3"]);
    let last_id = split_id(&frames[2].payload).0.to_vec();

    // The connection drops; messages go on; the client comes back with its last id.
    assert_eq!(reg.unsubscribe_fd(first.as_raw_fd()).unwrap(), 1);
    drop((first, first_peer));
    publish_all(&reg, b"chat", &["m4", "m5"]);
    let (again, again_peer) = socketpair();
    let last = EventId::parse(&last_id).expect("the frame's id parses");
    let (_, recovered) = reg
        .subscribe_since(b"chat", again.as_raw_fd(), Mode::WsBinaryId, last)
        .unwrap();
    assert!(recovered);
    publish_all(&reg, b"chat", &["m6"]);
    let got = read_available(again_peer.as_raw_fd(), Duration::from_millis(50), T).0;
    let frames = parse_ws_all(&got);
    let payloads: Vec<&[u8]> = frames
        .iter()
        .map(|frame| split_id(&frame.payload).1)
        .collect();
    assert_eq!(
        payloads,
        [&b"m4"[..], b"m5", b"m6"],
        "each missed one once, then live"
    );
    let offsets: Vec<u64> = frames
        .iter()
        .map(|frame| EventId::parse(split_id(&frame.payload).0).unwrap().offset)
        .collect();
    assert_eq!(offsets, [4, 5, 6]);
}

#[test]
fn websocket_id_frames_without_history_start_with_an_empty_id() {
    let reg = Registry::new().unwrap();
    let (fd, peer) = socketpair();
    reg.subscribe(b"t", fd.as_raw_fd(), Mode::WsTextId).unwrap();
    reg.publish(b"t", b"hi").unwrap();
    reg.send(fd.as_raw_fd(), Mode::WsBinaryId, b"direct")
        .unwrap();
    let expected = [ws_encode(0x1, b"\nhi"), ws_encode(0x2, b"\ndirect")].concat();
    assert_eq!(
        read_exact_timeout(peer.as_raw_fd(), expected.len(), T),
        expected
    );
}

#[test]
fn websocket_text_id_needs_utf8_and_its_replay_skips_what_is_not() {
    let reg = registry_keeping(keep_messages(10));
    let (text, _text_peer) = socketpair();
    reg.subscribe(b"t", text.as_raw_fd(), Mode::WsTextId)
        .unwrap();
    assert_eq!(
        reg.publish(b"t", b"\xff").unwrap_err().errno(),
        libc::EILSEQ
    );
    assert_eq!(
        reg.send(text.as_raw_fd(), Mode::WsTextId, b"\xff")
            .unwrap_err()
            .errno(),
        libc::EILSEQ
    );
    assert_eq!(reg.unsubscribe_fd(text.as_raw_fd()).unwrap(), 1);
    let ids = publish_all(&reg, b"t", &["a"]);
    reg.publish(b"t", b"\xfe").unwrap();
    let (binary, binary_peer) = socketpair();
    reg.subscribe_tail(b"t", binary.as_raw_fd(), Mode::WsBinaryId, 10)
        .unwrap();
    let (text, text_peer) = socketpair();
    reg.subscribe_tail(b"t", text.as_raw_fd(), Mode::WsTextId, 10)
        .unwrap();
    let second = EventId {
        offset: 2,
        ..ids[0]
    };
    let expected_binary = [
        ws_with_id(0x2, ids[0], "a"),
        ws_encode(0x2, &[format!("{second}\n").as_bytes(), b"\xfe"].concat()),
    ]
    .concat();
    assert_eq!(
        read_exact_timeout(binary_peer.as_raw_fd(), expected_binary.len(), T),
        expected_binary
    );
    let expected_text = ws_with_id(0x1, ids[0], "a");
    assert_eq!(
        read_exact_timeout(text_peer.as_raw_fd(), expected_text.len(), T),
        expected_text
    );
    assert!(read_quiet(text_peer.as_raw_fd()).is_empty());
}
