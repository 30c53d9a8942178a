//! Slow readers on topics with history: a reader that stops for longer than its outbox holds
//! but not longer than the history keeps gets every message, in order, once it reads again;
//! one that stops for longer gets a counted gap and the gap callback, then the overflow policy.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fdcast::{EventId, FdStats, HistoryLimits, Mode, Overflow, Registry};

const T: Duration = Duration::from_secs(20);
/// Small enough that a stalled reader overflows it after a few hundred messages.
const OUTBOX_LIMIT: usize = 2000;

fn keep_messages(max_messages: usize) -> HistoryLimits {
    HistoryLimits {
        max_messages,
        ..HistoryLimits::default()
    }
}

fn registry(history: HistoryLimits, overflow: Overflow) -> Registry {
    let reg = Registry::new().unwrap();
    reg.set_history(history);
    reg.set_outbox_limit(OUTBOX_LIMIT);
    reg.set_overflow(overflow);
    reg
}

/// A subscriber's end (fdcast writes to it) and its reader's end, with small kernel buffers.
fn slow_pair() -> (UnixStream, UnixStream) {
    let (ours, theirs) = socketpair();
    make_slow(ours.as_raw_fd(), theirs.as_raw_fd());
    theirs.set_nonblocking(true).unwrap();
    (ours, theirs)
}

/// One line per message, so a raw stream splits back into messages.
fn line(topic: &str, n: u64) -> String {
    format!("{topic}:{n:06}\n")
}

fn publish_lines(reg: &Registry, topic: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        reg.publish(topic.as_bytes(), line(topic, n).as_bytes())
            .unwrap();
    }
}

/// The message numbers of `topic` in a raw stream of lines, in the order they arrived.
fn numbers(bytes: &[u8], topic: &str) -> Vec<u64> {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "a torn line");
    text.lines()
        .filter_map(|line| line.strip_prefix(topic)?.strip_prefix(':'))
        .map(|n| n.parse().unwrap())
        .collect()
}

/// Reads `reader` while dispatching, until `fd` has nothing queued and is behind on nothing.
fn read_until_caught_up(reg: &Registry, fd: RawFd, reader: &UnixStream) -> Vec<u8> {
    let start = Instant::now();
    let mut out = Vec::new();
    loop {
        let (bytes, eof) = read_now(reader.as_raw_fd());
        out.extend_from_slice(&bytes);
        assert!(!eof, "EOF after {} bytes", out.len());
        let stats = reg.fd_stats(fd).unwrap();
        if stats.catching_up == 0 && stats.queued_bytes == 0 {
            let (rest, eof) = read_available(reader.as_raw_fd(), Duration::from_millis(100), T);
            out.extend_from_slice(&rest);
            assert!(!eof, "EOF after {} bytes", out.len());
            return out;
        }
        assert!(
            start.elapsed() < T,
            "still behind after {T:?}: {stats:?}, {} bytes read",
            out.len()
        );
        reg.dispatch(Some(Duration::from_millis(5))).unwrap();
    }
}

type GapLog = Arc<Mutex<Vec<(RawFd, Vec<u8>, u64)>>>;

fn log_gaps(reg: &Registry) -> GapLog {
    let log = GapLog::default();
    let sink = Arc::clone(&log);
    reg.set_gap_callback(Some(Box::new(move |fd, topic: &[u8], lost| {
        sink.lock().unwrap().push((fd, topic.to_vec(), lost));
    })));
    log
}

#[test]
fn a_reader_stalled_inside_the_history_gets_everything_in_order() {
    for overflow in [Overflow::DropMessage, Overflow::Evict] {
        let reg = registry(keep_messages(10_000), overflow);
        let gaps = log_gaps(&reg);
        let (sub, reader) = slow_pair();
        let fd = sub.as_raw_fd();
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        publish_lines(&reg, "t", 1..=5000);
        let behind = reg.fd_stats(fd).unwrap();
        assert_eq!(behind.catching_up, 1, "{overflow:?}: {behind:?}");
        assert_eq!(
            (behind.dropped, behind.lost_to_gaps),
            (0, 0),
            "{overflow:?}"
        );
        assert!(
            behind.queued_bytes <= OUTBOX_LIMIT as u64 + 16,
            "{behind:?}"
        );

        let got = numbers(&read_until_caught_up(&reg, fd, &reader), "t");
        assert_eq!(got, (1..=5000).collect::<Vec<_>>(), "{overflow:?}");
        let stats = reg.fd_stats(fd).unwrap();
        assert_eq!(
            stats,
            FdStats {
                delivered: 5000,
                ..FdStats::default()
            },
            "{overflow:?}"
        );
        let totals = reg.stats();
        assert_eq!(
            (
                totals.deliveries,
                totals.dropped_messages,
                totals.lost_to_gaps
            ),
            (5000, 0, 0)
        );
        assert_eq!(totals.evicted_fds, 0);
        assert!(gaps.lock().unwrap().is_empty());

        // Live again: the next message goes straight out.
        publish_lines(&reg, "t", 5001..=5001);
        let next = read_exact_timeout(reader.as_raw_fd(), line("t", 5001).len(), T);
        assert_eq!(numbers(&next, "t"), [5001]);
    }
}

#[test]
fn without_history_the_same_reader_drops_as_before() {
    let reg = registry(HistoryLimits::default(), Overflow::DropMessage);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe(b"t", fd, Mode::Raw).unwrap();
    publish_lines(&reg, "t", 1..=5000);
    let stats = reg.fd_stats(fd).unwrap();
    assert_eq!(stats.catching_up, 0);
    assert!(stats.dropped > 0, "{stats:?}");
    let got = numbers(&drain_with_dispatch(&reg, fd, reader.as_raw_fd(), T), "t");
    let stats = reg.fd_stats(fd).unwrap();
    assert_eq!(got.len() as u64 + stats.dropped, 5000, "{stats:?}");
    assert_eq!(stats.delivered, got.len() as u64);
    assert!(got.windows(2).all(|pair| pair[0] < pair[1]));
    assert_eq!(reg.stats().dropped_messages, stats.dropped);
}

#[test]
fn a_reader_stalled_past_the_history_gets_a_counted_gap_then_the_newest() {
    const KEPT: u64 = 100;
    const PUBLISHED: u64 = 5000;
    let reg = registry(keep_messages(KEPT as usize), Overflow::DropMessage);
    let gaps = log_gaps(&reg);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe(b"t", fd, Mode::Raw).unwrap();
    publish_lines(&reg, "t", 1..=PUBLISHED);
    assert!(gaps.lock().unwrap().is_empty(), "found when it reads again");

    let got = numbers(&read_until_caught_up(&reg, fd, &reader), "t");
    // What reached the kernel or the outbox before it fell behind, then the history.
    let before = got
        .iter()
        .take_while(|&&n| n < PUBLISHED - KEPT + 1)
        .count();
    assert!(before > 0 && (before as u64) < PUBLISHED - KEPT);
    let oldest = PUBLISHED - KEPT + 1;
    let mut want: Vec<u64> = (1..=before as u64).collect();
    want.extend(oldest..=PUBLISHED);
    assert_eq!(got, want);
    let lost = oldest - (before as u64 + 1);
    assert_eq!(*gaps.lock().unwrap(), [(fd, b"t".to_vec(), lost)]);
    let stats = reg.fd_stats(fd).unwrap();
    assert_eq!(
        stats,
        FdStats {
            delivered: got.len() as u64,
            lost_to_gaps: lost,
            ..FdStats::default()
        }
    );
    assert_eq!(stats.delivered + stats.lost_to_gaps, PUBLISHED);
    assert_eq!(reg.stats().lost_to_gaps, lost);
    assert_eq!(reg.stats().evicted_fds, 0);
}

#[test]
fn under_evict_a_reader_that_falls_off_the_history_is_told_then_evicted() {
    const KEPT: u64 = 100;
    let reg = registry(keep_messages(KEPT as usize), Overflow::Evict);
    let gaps = log_gaps(&reg);
    let evictions = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&evictions);
    reg.set_evict_callback(Some(Box::new(move |fd, reason| {
        sink.lock().unwrap().push((fd, reason));
    })));
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe(b"t", fd, Mode::Raw).unwrap();
    publish_lines(&reg, "t", 1..=5000);
    // The first message it is owed leaves the history with the publish after the ring
    // filled past it: one message lost, and the fd goes.
    assert_eq!(*gaps.lock().unwrap(), [(fd, b"t".to_vec(), 1)]);
    assert_eq!(*evictions.lock().unwrap(), [(fd, libc::ENOBUFS)]);
    assert!(reg.fd_stats(fd).is_err(), "forgotten");
    let totals = reg.stats();
    assert_eq!((totals.evicted_fds, totals.lost_to_gaps), (1, 1));
    let got = numbers(&read_to_eof(reader.as_raw_fd(), T), "t");
    assert!(
        got.iter().copied().eq(1..=got.len() as u64),
        "whole frames, in order"
    );
}

#[test]
fn several_topics_on_one_fd_each_arrive_whole_and_in_order() {
    let reg = registry(keep_messages(10_000), Overflow::DropMessage);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    for topic in ["a", "b", "c"] {
        reg.subscribe(topic.as_bytes(), fd, Mode::Raw).unwrap();
    }
    for n in 1..=3000 {
        for topic in ["a", "b", "c"] {
            publish_lines(&reg, topic, n..=n);
        }
    }
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 3);
    let bytes = read_until_caught_up(&reg, fd, &reader);
    for topic in ["a", "b", "c"] {
        assert_eq!(
            numbers(&bytes, topic),
            (1..=3000).collect::<Vec<_>>(),
            "{topic}"
        );
    }
    let stats = reg.fd_stats(fd).unwrap();
    assert_eq!(
        (stats.delivered, stats.dropped, stats.lost_to_gaps),
        (9000, 0, 0)
    );
}

#[test]
fn a_topic_far_behind_does_not_hold_back_another_topic_of_the_fd() {
    let reg = registry(keep_messages(10_000), Overflow::DropMessage);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    for topic in ["far", "near"] {
        reg.subscribe(topic.as_bytes(), fd, Mode::Raw).unwrap();
    }
    publish_lines(&reg, "far", 1..=3000);
    publish_lines(&reg, "near", 1..=20);
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 2);
    let bytes = read_until_caught_up(&reg, fd, &reader);
    let text = std::str::from_utf8(&bytes).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = |wanted: &str| lines.iter().position(|line| *line == wanted).unwrap();
    // Each refill of an outbox of OUTBOX_LIMIT bytes takes a few hundred of these lines: the
    // near topic gets its turn within the first few, not after all of the far one.
    assert!(
        at(line("near", 20).trim_end()) < at(line("far", 1000).trim_end()),
        "the near topic waited for the far one"
    );
    assert_eq!(numbers(&bytes, "far"), (1..=3000).collect::<Vec<_>>());
    assert_eq!(numbers(&bytes, "near"), (1..=20).collect::<Vec<_>>());
}

#[test]
fn corked_publishes_catch_up_too() {
    let reg = registry(keep_messages(10_000), Overflow::DropMessage);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe(b"t", fd, Mode::Raw).unwrap();
    reg.cork();
    for n in 1..=4000 {
        publish_lines(&reg, "t", n..=n);
        if n % 64 == 0 {
            reg.flush();
        }
    }
    reg.flush();
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 1);
    let got = numbers(&read_until_caught_up(&reg, fd, &reader), "t");
    assert_eq!(got, (1..=4000).collect::<Vec<_>>());
    assert_eq!(reg.stats().dropped_messages, 0);
    reg.uncork();
}

/// The offsets of the SSE events in `bytes`, which must all carry ids of one epoch.
fn sse_offsets(bytes: &[u8]) -> Vec<u64> {
    let text = std::str::from_utf8(bytes).unwrap();
    let mut epoch = None;
    text.split_terminator("\n\n")
        .map(|event| {
            let line = event.lines().next().unwrap();
            let id = EventId::parse(line.strip_prefix("id: ").unwrap().as_bytes()).unwrap();
            assert_eq!(*epoch.get_or_insert(id.epoch), id.epoch);
            id.offset
        })
        .collect()
}

#[test]
fn concurrent_publishers_while_a_reader_catches_up_deliver_each_message_once_in_order() {
    const PER_THREAD: u64 = 3000;
    const THREADS: u64 = 3;
    let reg = Arc::new(registry(keep_messages(100_000), Overflow::DropMessage));
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe(b"t", fd, Mode::Sse).unwrap();
    // Behind before the publishers start, so that they race its catching up.
    publish_lines(&reg, "t", 1..=2000);
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 1);
    let publishers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let reg = Arc::clone(&reg);
            thread::spawn(move || {
                for n in 0..PER_THREAD {
                    reg.publish(b"t", format!("p{thread}-{n}").as_bytes())
                        .unwrap();
                }
            })
        })
        .collect();
    let mut bytes = Vec::new();
    while publishers.iter().any(|publisher| !publisher.is_finished()) {
        bytes.extend(read_now(reader.as_raw_fd()).0);
        reg.dispatch(Some(Duration::from_millis(1))).unwrap();
    }
    for publisher in publishers {
        publisher.join().unwrap();
    }
    bytes.extend(read_until_caught_up(&reg, fd, &reader));
    let total = 2000 + THREADS * PER_THREAD;
    assert_eq!(sse_offsets(&bytes), (1..=total).collect::<Vec<_>>());
    let stats = reg.fd_stats(fd).unwrap();
    assert_eq!(
        (stats.delivered, stats.dropped, stats.lost_to_gaps),
        (total, 0, 0)
    );
}

#[test]
fn a_replay_that_overflows_the_outbox_catches_up_instead_of_dropping() {
    let reg = registry(keep_messages(10_000), Overflow::DropMessage);
    publish_lines(&reg, "t", 1..=3000);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe_tail(b"t", fd, Mode::Raw, 3000).unwrap();
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 1);
    publish_lines(&reg, "t", 3001..=3500);
    let got = numbers(&read_until_caught_up(&reg, fd, &reader), "t");
    assert_eq!(got, (1..=3500).collect::<Vec<_>>());
}

#[test]
fn unsubscribing_a_topic_it_is_behind_on_ends_the_catching_up() {
    let reg = registry(keep_messages(10_000), Overflow::DropMessage);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    let id = reg.subscribe(b"t", fd, Mode::Raw).unwrap();
    reg.subscribe(b"keep", fd, Mode::Raw).unwrap();
    publish_lines(&reg, "t", 1..=3000);
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 1);
    reg.unsubscribe(id).unwrap();
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 0);
    let got = numbers(&read_until_caught_up(&reg, fd, &reader), "t");
    assert!(got.iter().copied().eq(1..=got.len() as u64));
    assert!(got.len() < 3000, "nothing more is owed");
    assert_eq!(reg.fd_stats(fd).unwrap().lost_to_gaps, 0);
}

#[test]
fn fd_stats_know_only_the_fds_fdcast_knows() {
    let reg = Registry::new().unwrap();
    let (sub, _reader) = socketpair();
    assert!(matches!(
        reg.fd_stats(sub.as_raw_fd()),
        Err(fdcast::Error::NotFound)
    ));
    assert!(matches!(reg.fd_stats(-1), Err(fdcast::Error::BadFd)));
    reg.subscribe(b"t", sub.as_raw_fd(), Mode::Raw).unwrap();
    reg.publish(b"t", b"x").unwrap();
    let stats = reg.fd_stats(sub.as_raw_fd()).unwrap();
    assert_eq!(
        stats,
        FdStats {
            delivered: 1,
            ..FdStats::default()
        }
    );
}

#[test]
fn history_made_anew_while_a_reader_is_behind_is_a_gap_of_everything_it_skipped() {
    let reg = registry(keep_messages(10_000), Overflow::DropMessage);
    let gaps = log_gaps(&reg);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe(b"t", fd, Mode::Raw).unwrap();
    publish_lines(&reg, "t", 1..=3000);
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 1);
    // Off and on again: a new epoch, and what it was owed is gone.
    reg.set_history(HistoryLimits::default());
    reg.set_history(keep_messages(10_000));
    publish_lines(&reg, "t", 3001..=3100);
    let got = numbers(&read_until_caught_up(&reg, fd, &reader), "t");
    let before = got.iter().take_while(|&&n| n <= 3000).count();
    let mut want: Vec<u64> = (1..=before as u64).collect();
    want.extend(3001..=3100);
    assert_eq!(got, want);
    let lost = 3000 - before as u64;
    assert_eq!(*gaps.lock().unwrap(), [(fd, b"t".to_vec(), lost)]);
    let stats = reg.fd_stats(fd).unwrap();
    assert_eq!(
        (stats.lost_to_gaps, stats.delivered),
        (lost, got.len() as u64)
    );
}

#[test]
fn what_ages_out_of_the_history_while_a_reader_is_behind_is_a_gap() {
    let reg = registry(
        HistoryLimits {
            max_age: Some(Duration::from_millis(300)),
            ..HistoryLimits::default()
        },
        Overflow::DropMessage,
    );
    let gaps = log_gaps(&reg);
    let (sub, reader) = slow_pair();
    let fd = sub.as_raw_fd();
    reg.subscribe(b"t", fd, Mode::Raw).unwrap();
    publish_lines(&reg, "t", 1..=3000);
    assert_eq!(reg.fd_stats(fd).unwrap().catching_up, 1);
    thread::sleep(Duration::from_millis(400));
    // No publish since: only the refill can tell that the history aged out.
    let got = numbers(&read_until_caught_up(&reg, fd, &reader), "t");
    assert!(got.iter().copied().eq(1..=got.len() as u64));
    let lost = 3000 - got.len() as u64;
    assert!(lost > 0);
    assert_eq!(*gaps.lock().unwrap(), [(fd, b"t".to_vec(), lost)]);
    assert_eq!(reg.fd_stats(fd).unwrap().lost_to_gaps, lost);
}
