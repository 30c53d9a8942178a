//! Slow consumers: outbox limit, DropMessage and Evict policies, no torn frames, order kept;
//! with history on, stalled readers catch up while several threads publish.

mod common;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Error, EventId, HistoryLimits, Mode, Overflow, Registry};

const T: Duration = Duration::from_secs(20);
const N: u32 = 5000;
const LIMIT: usize = 64 * 1024;
const BODY: usize = 100;

#[derive(Clone, Copy, Debug)]
enum Fmt {
    Ws,
    Sse,
    Raw,
}

impl Fmt {
    fn mode(self) -> Mode {
        match self {
            Fmt::Ws => Mode::WsBinary,
            Fmt::Sse => Mode::Sse,
            Fmt::Raw => Mode::Raw,
        }
    }

    /// The payload published for frame `n`.
    fn payload(self, n: u32) -> Vec<u8> {
        let b = body(n);
        match self {
            Fmt::Raw => lp_encode(&b),
            _ => b,
        }
    }

    /// The bytes frame `n` puts on the wire.
    fn wire(self, n: u32) -> Vec<u8> {
        match self {
            Fmt::Ws => ws_encode(2, &body(n)),
            Fmt::Sse => sse_encode(&body(n)),
            Fmt::Raw => lp_encode(&body(n)),
        }
    }

    /// Parses a whole stream (panics on a torn frame) into frame bodies.
    fn parse_all(self, buf: &[u8]) -> Vec<Vec<u8>> {
        match self {
            Fmt::Ws => parse_ws_all(buf)
                .into_iter()
                .map(|f| {
                    assert_eq!(f.opcode, 2);
                    f.payload
                })
                .collect(),
            Fmt::Sse => parse_sse_all(buf),
            Fmt::Raw => parse_lp_all(buf),
        }
    }
}

/// A numbered ASCII body: "00000042:" then filler derived from the number.
fn body(n: u32) -> Vec<u8> {
    let mut b = format!("{n:08}:").into_bytes();
    while b.len() < BODY {
        b.push(b'a' + ((n as usize + b.len()) % 26) as u8);
    }
    b
}

fn seq_of(b: &[u8]) -> u32 {
    let n: u32 = std::str::from_utf8(&b[..8]).unwrap().parse().unwrap();
    assert_eq!(b, body(n).as_slice(), "frame {n} has the wrong content");
    n
}

/// Checks frames are whole (done by the parser), intact and in strictly increasing order.
fn check_increasing(frames: &[Vec<u8>]) -> Vec<u32> {
    let seqs: Vec<u32> = frames.iter().map(|f| seq_of(f)).collect();
    for w in seqs.windows(2) {
        assert!(w[0] < w[1], "frames out of order: {} then {}", w[0], w[1]);
    }
    seqs
}

fn drop_message_run(fmt: Fmt, limit: usize, n: u32) {
    let (a, b) = socketpair();
    let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
    make_slow(fd, peer);
    let reg = Registry::new().unwrap();
    reg.set_outbox_limit(limit);
    reg.set_overflow(Overflow::DropMessage);
    let evicted = Arc::new(Mutex::new(Vec::new()));
    let ev = evicted.clone();
    reg.set_evict_callback(Some(Box::new(move |fd, why| {
        ev.lock().unwrap().push((fd, why))
    })));
    reg.subscribe(b"feed", fd, fmt.mode()).unwrap();
    let frame_len = fmt.wire(0).len();
    let mut max_queued = 0;
    for i in 0..n {
        assert_eq!(reg.publish(b"feed", &fmt.payload(i)).unwrap(), 1);
        let st = reg.stats();
        max_queued = max_queued.max(st.queued_bytes as usize);
        assert!(
            st.queued_bytes as usize <= limit + frame_len,
            "queued_bytes {} > limit {limit} + frame {frame_len} after frame {i}",
            st.queued_bytes
        );
        assert_eq!(st.queued_bytes as usize, reg.pending_bytes(fd).unwrap());
    }
    let st = reg.stats();
    assert!(
        st.dropped_messages > 0,
        "peer never filled up: test proves nothing"
    );
    assert_eq!(reg.subscriber_count(), 1, "DropMessage must not evict");

    let got = drain_with_dispatch(&reg, fd, peer, T);
    let frames = fmt.parse_all(&got);
    let seqs = check_increasing(&frames);
    let st = reg.stats();
    assert_eq!(
        frames.len() as u64 + st.dropped_messages,
        n as u64,
        "received {} + dropped {} != published {n}",
        frames.len(),
        st.dropped_messages
    );
    assert_eq!(st.deliveries, frames.len() as u64);
    assert_eq!(st.publishes, n as u64);
    assert_eq!(st.queued_bytes, 0);
    assert_eq!(st.evicted_fds, 0);
    assert!(evicted.lock().unwrap().is_empty());
    assert_eq!(seqs[0], 0, "the first frame goes straight to the kernel");
    assert_eq!(reg.subscriber_count(), 1);

    // The connection still works afterwards, and nothing more is dropped.
    reg.publish(b"feed", &fmt.payload(n)).unwrap();
    let got = drain_with_dispatch(&reg, fd, peer, T);
    assert_eq!(got, fmt.wire(n));
}

#[test]
fn drop_message_ws_binary() {
    with_watchdog(60, || drop_message_run(Fmt::Ws, LIMIT, N));
}

#[test]
fn drop_message_sse() {
    with_watchdog(60, || drop_message_run(Fmt::Sse, LIMIT, N));
}

#[test]
fn drop_message_raw_length_prefixed() {
    with_watchdog(60, || drop_message_run(Fmt::Raw, LIMIT, N));
}

/// Limit 0: nothing is queued but the rest of a started frame.
#[test]
fn drop_message_limit_zero() {
    with_watchdog(60, || {
        drop_message_run(Fmt::Ws, 0, 2000);
        drop_message_run(Fmt::Raw, 0, 2000);
    });
}

fn evict_run(fmt: Fmt) {
    let (a, b) = socketpair();
    let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
    make_slow(fd, peer);
    let reg = Arc::new(Registry::new().unwrap());
    reg.set_outbox_limit(LIMIT);
    reg.set_overflow(Overflow::Evict);
    let evicted = Arc::new(Mutex::new(Vec::new()));
    let ev = evicted.clone();
    let weak: Weak<Registry> = Arc::downgrade(&reg);
    reg.set_evict_callback(Some(Box::new(move |efd, why| {
        // Runs with no lock held, after the fd's subscriptions are gone: calling back into
        // the registry must work (a deadlock here trips the watchdog).
        let r = weak.upgrade().unwrap();
        let still = r.subscribers_for(b"feed").contains(&efd);
        let other = r.subscribers_for(b"other").contains(&efd);
        ev.lock().unwrap().push((efd, why, still || other));
    })));
    reg.subscribe(b"feed", fd, fmt.mode()).unwrap();
    reg.subscribe(b"other", fd, Mode::Raw).unwrap();
    let mut published = 0;
    let mut expected = Vec::new();
    for i in 0..N {
        let m = reg.publish(b"feed", &fmt.payload(i)).unwrap();
        if !evicted.lock().unwrap().is_empty() {
            break;
        }
        assert_eq!(m, 1);
        published += 1;
        expected.extend_from_slice(&fmt.wire(i));
        assert!(reg.stats().queued_bytes as usize <= LIMIT + fmt.wire(i).len());
    }
    let calls = evicted.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![(fd, libc::ENOBUFS, false)],
        "evict callback: (fd, ENOBUFS) once, after the subscriptions are gone"
    );
    assert!(published > 0);
    assert_eq!(reg.subscriber_count(), 0);
    assert!(reg.subscribers_for(b"feed").is_empty());
    assert!(reg.subscribers_for(b"other").is_empty());
    assert_eq!(reg.pending_bytes(fd).unwrap(), 0);
    let st = reg.stats();
    assert_eq!(st.evicted_fds, 1);
    assert_eq!(
        (st.queued_bytes, st.fds, st.subscriptions, st.topics),
        (0, 0, 0, 0)
    );
    assert_eq!(reg.publish(b"feed", &fmt.payload(N)).unwrap(), 0);
    assert!(fd_is_open(fd), "the library never closes a host fd");

    // The peer sees the frames that reached the kernel, then EOF (the socket was shut down).
    let got = read_to_eof(peer, T);
    assert!(!got.is_empty());
    assert!(
        expected.starts_with(&got),
        "the peer's bytes are not a prefix of the published stream"
    );
    // Whole frames, in order from 0 without gaps. FDCAST_EVICT may end the
    // stream inside a frame (an aborted connection), so only the whole frames are checked.
    let whole = match fmt {
        Fmt::Ws => parse_ws_frames(&got)
            .0
            .into_iter()
            .map(|f| f.payload)
            .collect(),
        Fmt::Raw => parse_lp_frames(&got).0,
        Fmt::Sse => {
            let mut p = SseParser::default();
            p.feed(&got);
            p.events
        }
    };
    let seqs = check_increasing(&whole);
    assert_eq!(seqs, (0..whole.len() as u32).collect::<Vec<_>>());
    assert!(!whole.is_empty());
    // Nothing more is written to the evicted fd.
    reg.dispatch(Some(Duration::from_millis(20))).unwrap();
    assert_eq!(reg.stats().evicted_fds, 1);
}

#[test]
fn evict_ws_binary() {
    with_watchdog(60, || evict_run(Fmt::Ws));
}

#[test]
fn evict_sse() {
    with_watchdog(60, || evict_run(Fmt::Sse));
}

#[test]
fn evict_raw() {
    with_watchdog(60, || evict_run(Fmt::Raw));
}

/// send() on a full outbox reports the policy's verdict.
#[test]
fn send_reports_dropped_and_evicted() {
    with_watchdog(60, || {
        let (a, b) = socketpair();
        let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
        make_slow(fd, peer);
        let reg = Registry::new().unwrap();
        reg.set_outbox_limit(4096);
        let mut sent = 0;
        let err = loop {
            match reg.send(fd, Mode::Raw, &lp_encode(&body(sent))) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100_000, "never dropped");
        };
        assert!(matches!(err, Error::Dropped), "{err:?}");
        assert_eq!(err.errno(), libc::ENOBUFS);
        assert_eq!(reg.stats().dropped_messages, 1);
        // An fd with queued bytes counts in `fds` even without subscriptions.
        assert_eq!((reg.stats().fds, reg.stats().subscriptions), (1, 0));
        let got = drain_with_dispatch(&reg, fd, peer, T);
        assert_eq!(reg.stats().fds, 0);
        let frames = parse_lp_all(&got);
        assert_eq!(check_increasing(&frames), (0..sent).collect::<Vec<_>>());

        // Evict policy through send: fill again, the overflowing send evicts.
        reg.set_overflow(Overflow::Evict);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        reg.set_evict_callback(Some(Box::new(move |fd, why| {
            c.lock().unwrap().push((fd, why))
        })));
        reg.subscribe(b"t", fd, Mode::Raw).unwrap();
        let mut k = 0;
        let err = loop {
            match reg.send(fd, Mode::Raw, &lp_encode(&body(k))) {
                Ok(()) => k += 1,
                Err(e) => break e,
            }
            assert!(k < 100_000, "never evicted");
        };
        assert_eq!(err.errno(), libc::ENOBUFS, "{err:?}");
        assert_eq!(*calls.lock().unwrap(), vec![(fd, libc::ENOBUFS)]);
        assert_eq!(reg.subscriber_count(), 0);
        let _ = read_to_eof(peer, T);
    });
}

/// A frame larger than the limit still reaches a fast reader whole (README, Guarantees), and a frame that
/// would pile onto its queued remainder is dropped.
#[test]
fn frame_bigger_than_limit_reaches_fast_reader() {
    with_watchdog(60, || {
        for (mode, policy) in [
            (Mode::Raw, Overflow::DropMessage),
            (Mode::WsBinary, Overflow::DropMessage),
            (Mode::WsBinary, Overflow::Evict),
        ] {
            let (a, b) = socketpair();
            let (fd, peer) = (a.as_raw_fd(), b.as_raw_fd());
            make_slow(fd, peer);
            let reg = Registry::new().unwrap();
            reg.set_outbox_limit(1024);
            reg.set_overflow(policy);
            reg.subscribe(b"big", fd, mode).unwrap();
            let big = pattern_bytes(256 * 1024, 99);
            assert_eq!(reg.publish(b"big", &big).unwrap(), 1);
            let pending = reg.pending_bytes(fd).unwrap();
            assert!(pending > 1024, "remainder must be queued whatever its size");
            assert_eq!(
                reg.subscriber_count(),
                1,
                "an empty outbox never triggers the policy"
            );
            assert_eq!(reg.stats().dropped_messages, 0);
            if policy == Overflow::DropMessage {
                let e = reg.send(fd, mode, b"small").unwrap_err();
                assert!(matches!(e, Error::Dropped), "{e:?}");
                assert_eq!(reg.stats().dropped_messages, 1);
            }
            // A fast reader now.
            let h = thread::spawn(move || read_available(peer, Duration::from_millis(300), T).0);
            dispatch_until_flushed(&reg, fd, T);
            let got = h.join().unwrap();
            let want = if mode == Mode::Raw {
                big.clone()
            } else {
                ws_encode(2, &big)
            };
            assert_eq!(got.len(), want.len());
            assert!(got == want, "big frame corrupted");
            assert_eq!(reg.stats().deliveries, 1);
            assert_eq!(reg.stats().evicted_fds, 0);
            drop(b);
        }
    });
}

/// A frame shared by many slow fds is counted once per fd in queued_bytes.
#[test]
fn queued_bytes_counts_each_fds_share() {
    with_watchdog(60, || {
        let reg = Registry::new().unwrap();
        reg.set_outbox_limit(1 << 20);
        let pairs: Vec<_> = (0..10).map(|_| socketpair()).collect();
        for (a, b) in &pairs {
            make_slow(a.as_raw_fd(), b.as_raw_fd());
            reg.subscribe(b"fan", a.as_raw_fd(), Mode::WsBinary)
                .unwrap();
        }
        let big = pattern_bytes(200 * 1024, 5);
        assert_eq!(reg.publish(b"fan", &big).unwrap(), 10);
        let fds: Vec<RawFd> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
        let total: usize = fds.iter().map(|&fd| reg.pending_bytes(fd).unwrap()).sum();
        assert_eq!(reg.stats().queued_bytes as usize, total);
        assert!(total > 10 * 100 * 1024);
        for (a, b) in &pairs {
            let got = drain_with_dispatch(&reg, a.as_raw_fd(), b.as_raw_fd(), T);
            assert!(got == ws_encode(2, &big));
        }
        assert_eq!(reg.stats().queued_bytes, 0);
        assert_eq!(reg.stats().deliveries, 10);
    });
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

/// Rule 8: a frame queued for many fds is held once, not copied per fd.
#[test]
fn shared_frame_is_held_once() {
    with_watchdog(60, || {
        const FDS: usize = 200;
        let reg = Registry::new().unwrap();
        let pairs: Vec<_> = (0..FDS).map(|_| socketpair()).collect();
        for (a, b) in &pairs {
            make_slow(a.as_raw_fd(), b.as_raw_fd());
            reg.subscribe(b"fan", a.as_raw_fd(), Mode::WsBinary)
                .unwrap();
        }
        let big = pattern_bytes(1 << 20, 8);
        let before = rss_bytes();
        assert_eq!(reg.publish(b"fan", &big).unwrap(), FDS);
        let after = rss_bytes();
        let queued = reg.stats().queued_bytes as usize;
        assert!(
            queued > FDS * (900 << 10),
            "each fd's share counts: {queued}"
        );
        // Copies would need ~200 MiB more; one shared frame needs ~1 MiB.
        assert!(
            after.saturating_sub(before) < 64 << 20,
            "RSS grew by {} MiB for one 1 MiB frame queued to {FDS} fds",
            (after - before) >> 20
        );
        reg.clear();
        assert_eq!(reg.stats().queued_bytes, 0);
    });
}

// -------------------------------------------------------------------------------------------
// history: stalled readers catch up while four threads publish
// -------------------------------------------------------------------------------------------

/// Messages each topic keeps in the catch-up runs below.
const KEPT: u64 = 8000;
/// Small enough that a stalled reader falls behind after a few dozen messages.
const CATCH_UP_OUTBOX: usize = 2000;
const CATCH_UP_PUBLISHERS: u64 = 4;

/// What each publisher thread recorded: the id fdcast gave each of its payloads.
type Published = HashMap<u64, Vec<u8>>;

/// Publishes `per_thread` messages from each of four threads at once (with `corked`, the
/// registry is corked and each thread flushes now and then), while `during` runs on this
/// thread until they finish. Returns each message's payload by offset.
fn publish_from_four_threads(
    reg: &Arc<Registry>,
    phase: u64,
    per_thread: u64,
    corked: bool,
    mut during: impl FnMut(),
) -> Published {
    let start = Arc::new(Barrier::new(CATCH_UP_PUBLISHERS as usize));
    let threads: Vec<_> = (0..CATCH_UP_PUBLISHERS)
        .map(|thread| {
            let (reg, start) = (Arc::clone(reg), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                let mut ids = Published::new();
                for n in 0..per_thread {
                    let payload = format!("phase{phase}-p{thread}-{n:05}").into_bytes();
                    let (_, id) = reg.publish_with_id(b"feed", &payload, None).unwrap();
                    ids.insert(id.expect("history is on").offset, payload);
                    if corked && n % 32 == 31 {
                        reg.flush();
                    }
                }
                if corked {
                    reg.flush();
                }
                ids
            })
        })
        .collect();
    while threads.iter().any(|thread| !thread.is_finished()) {
        during();
    }
    let mut published = Published::new();
    for thread in threads {
        published.extend(thread.join().unwrap());
    }
    published
}

/// One stream's messages: (id, payload), in the order they arrived. SSE events carry the id
/// in an `id:` line; WebSocket id-mode frames as the payload's first line. Panics on a torn
/// or malformed frame; leaves an incomplete tail in `buf`.
fn take_messages(mode: Mode, buf: &mut Vec<u8>) -> Vec<(EventId, Vec<u8>)> {
    let mut messages = Vec::new();
    let used = match mode {
        Mode::Sse => {
            let mut at = 0;
            while let Some(end) = buf[at..].windows(2).position(|w| w == b"\n\n") {
                let event = std::str::from_utf8(&buf[at..at + end]).unwrap();
                let (id, data) = event
                    .strip_prefix("id: ")
                    .and_then(|rest| rest.split_once("\ndata: "))
                    .unwrap_or_else(|| panic!("malformed SSE event {event:?}"));
                let id = EventId::parse(id.as_bytes()).expect("an id");
                messages.push((id, data.as_bytes().to_vec()));
                at += end + 2;
            }
            at
        }
        Mode::WsTextId => {
            let (frames, used) = parse_ws_frames(buf);
            for frame in frames {
                assert_eq!(frame.opcode, 1);
                let newline = frame.payload.iter().position(|&b| b == b'\n').unwrap();
                let id = EventId::parse(&frame.payload[..newline]).expect("an id");
                messages.push((id, frame.payload[newline + 1..].to_vec()));
            }
            used
        }
        _ => unreachable!("only modes that carry ids"),
    };
    buf.drain(..used);
    messages
}

/// A stalled reader: fdcast's end, the reader's end, what it read so far.
struct Stalled {
    sub: UnixStream,
    reader: UnixStream,
    mode: Mode,
    buf: Vec<u8>,
    messages: Vec<(EventId, Vec<u8>)>,
}

impl Stalled {
    fn new(reg: &Registry, mode: Mode) -> Stalled {
        let (sub, reader) = socketpair();
        make_slow(sub.as_raw_fd(), reader.as_raw_fd());
        reader.set_nonblocking(true).unwrap();
        reg.subscribe(b"feed", sub.as_raw_fd(), mode).unwrap();
        Stalled {
            sub,
            reader,
            mode,
            buf: Vec::new(),
            messages: Vec::new(),
        }
    }

    fn fd(&self) -> RawFd {
        self.sub.as_raw_fd()
    }

    /// Reads what the kernel holds for it now.
    fn read(&mut self) {
        let (bytes, eof) = read_now(self.reader.as_raw_fd());
        assert!(!eof);
        self.buf.extend_from_slice(&bytes);
        self.messages
            .extend(take_messages(self.mode, &mut self.buf));
    }

    /// Reads while dispatching until fdcast holds nothing for it and it is behind on nothing.
    fn read_until_caught_up(&mut self, reg: &Registry) {
        let start = Instant::now();
        loop {
            self.read();
            let stats = reg.fd_stats(self.fd()).unwrap();
            if stats.catching_up == 0 && stats.queued_bytes == 0 {
                let (rest, eof) =
                    read_available(self.reader.as_raw_fd(), Duration::from_millis(100), T);
                assert!(!eof);
                self.buf.extend_from_slice(&rest);
                self.messages
                    .extend(take_messages(self.mode, &mut self.buf));
                assert!(self.buf.is_empty(), "a torn frame at the end");
                return;
            }
            assert!(start.elapsed() < T, "still behind after {T:?}: {stats:?}");
            reg.dispatch(Some(Duration::from_millis(2))).unwrap();
        }
    }

    /// Checks that it got every published message once, in id order, each with its own
    /// payload, except across gaps: each jump in offsets skips exactly the count of the
    /// next gap reported for it. Returns how many it got.
    fn check(&self, published: &Published, gaps: &[u64]) -> u64 {
        let epoch = self.messages[0].0.epoch;
        let mut gaps = gaps.iter();
        let mut next = 1;
        for (id, payload) in &self.messages {
            assert_eq!(id.epoch, epoch);
            if id.offset != next {
                let skipped = id.offset.checked_sub(next).unwrap_or_else(|| {
                    panic!("{:?}: {} again after {}", self.mode, id.offset, next - 1)
                });
                assert_eq!(
                    Some(&skipped),
                    gaps.next(),
                    "{:?}: a jump from {} to {} that no gap reported",
                    self.mode,
                    next - 1,
                    id.offset
                );
            }
            assert_eq!(
                Some(payload),
                published.get(&id.offset),
                "{:?}: the payload of message {}",
                self.mode,
                id.offset
            );
            next = id.offset + 1;
        }
        assert_eq!(gaps.next(), None, "{:?}: a gap it did not see", self.mode);
        assert_eq!(next - 1, published.len() as u64, "it got the last one");
        self.messages.len() as u64
    }
}

/// Two readers stop reading while four threads publish. One stays stopped for longer than
/// its outbox holds but not longer than the history keeps, then reads while the threads go
/// on publishing: it gets everything, in order. The other stays stopped until more than the
/// history keeps was published: it gets a gap of exactly the messages that left the history,
/// counted by the gap callback, its fd counters and the registry's.
fn stalled_readers_catch_up_while_four_threads_publish(corked: bool) {
    let reg = Arc::new(Registry::new().unwrap());
    reg.set_history(HistoryLimits {
        max_messages: KEPT as usize,
        ..HistoryLimits::default()
    });
    reg.set_outbox_limit(CATCH_UP_OUTBOX);
    reg.set_overflow(Overflow::DropMessage);
    let gaps: Arc<Mutex<Vec<(RawFd, u64)>>> = Arc::default();
    let sink = Arc::clone(&gaps);
    reg.set_gap_callback(Some(Box::new(move |fd, topic: &[u8], lost| {
        assert_eq!(topic, b"feed");
        sink.lock().unwrap().push((fd, lost));
    })));
    if corked {
        reg.cork();
    }
    let mut inside = Stalled::new(&reg, Mode::WsTextId);
    let mut past = Stalled::new(&reg, Mode::Sse);
    let fds = [inside.fd(), past.fd()];
    let bounded = |reg: &Registry| {
        // A message here is at most ~60 bytes framed.
        for fd in fds {
            let queued = reg.fd_stats(fd).unwrap().queued_bytes;
            assert!(queued <= CATCH_UP_OUTBOX as u64 + 64, "{queued} queued");
        }
    };

    // Both stopped: 4,000 messages, more than the outbox holds.
    let mut published = publish_from_four_threads(&reg, 1, 1000, corked, || {
        thread::sleep(Duration::from_millis(1));
    });
    bounded(&reg);
    for fd in fds {
        let stats = reg.fd_stats(fd).unwrap();
        assert_eq!(stats.catching_up, 1, "{stats:?}");
        assert_eq!((stats.dropped, stats.lost_to_gaps), (0, 0), "{stats:?}");
    }
    // One reads, racing 3,000 more: at most 7,000 behind, inside the history.
    published.extend(publish_from_four_threads(&reg, 2, 750, corked, || {
        inside.read();
        reg.dispatch(Some(Duration::from_millis(1))).unwrap();
    }));
    inside.read_until_caught_up(&reg);
    assert_eq!(inside.check(&published, &[]), 7000);
    // 2,000 more: 9,000 in all, past the history for the one that never read.
    published.extend(publish_from_four_threads(&reg, 3, 500, corked, || {
        inside.read();
        reg.dispatch(Some(Duration::from_millis(1))).unwrap();
    }));
    bounded(&reg);
    inside.read_until_caught_up(&reg);
    past.read_until_caught_up(&reg);
    let total = published.len() as u64;
    assert_eq!(total, 9000);

    assert_eq!(inside.check(&published, &[]), total);
    let gaps = std::mem::take(&mut *gaps.lock().unwrap());
    let past_gaps: Vec<u64> = gaps.iter().map(|&(_, lost)| lost).collect();
    assert!(
        gaps.iter().all(|&(fd, _)| fd == past.fd()),
        "only the reader that stopped past the history lost any: {gaps:?}"
    );
    let got = past.check(&published, &past_gaps);
    let lost: u64 = past_gaps.iter().sum();
    assert!(lost > 0, "it fell off the history");
    assert_eq!(got + lost, total);
    assert!(got >= KEPT, "it got at least what the history kept");
    for (reader, delivered, lost) in [(&inside, total, 0), (&past, got, lost)] {
        let stats = reg.fd_stats(reader.fd()).unwrap();
        assert_eq!(
            (stats.delivered, stats.dropped, stats.lost_to_gaps),
            (delivered, 0, lost),
            "{:?}",
            reader.mode
        );
    }
    let totals = reg.stats();
    assert_eq!(
        (
            totals.deliveries,
            totals.dropped_messages,
            totals.lost_to_gaps
        ),
        (total + got, 0, lost)
    );
    if corked {
        reg.uncork();
    }
}

#[test]
fn stalled_readers_catch_up_while_four_threads_publish_immediately() {
    with_watchdog(120, || {
        stalled_readers_catch_up_while_four_threads_publish(false)
    });
}

#[test]
fn stalled_readers_catch_up_while_four_threads_publish_corked() {
    with_watchdog(120, || {
        stalled_readers_catch_up_while_four_threads_publish(true)
    });
}

/// Each gap told: the topic, how many it lost.
type TopicGaps = Vec<(Vec<u8>, u64)>;

/// A reader behind on two topics whose refills share one outbox: while one topic's refill
/// fills it, the other's loss is not told yet; it is told once, when the reader can go on
/// after it, as the one jump the reader sees, however many messages left meanwhile.
#[test]
fn a_reader_behind_on_two_topics_is_told_each_gap_once_as_it_sees_it() {
    let reg = Registry::new().unwrap();
    reg.set_history(HistoryLimits {
        max_messages: 100,
        ..HistoryLimits::default()
    });
    // A quarter of what a topic keeps: one topic's refill fills it.
    reg.set_outbox_limit(1000);
    let gaps: Arc<Mutex<TopicGaps>> = Arc::default();
    let sink = Arc::clone(&gaps);
    reg.set_gap_callback(Some(Box::new(move |_fd, topic: &[u8], lost| {
        sink.lock().unwrap().push((topic.to_vec(), lost));
    })));
    let mut reader = Stalled::new(&reg, Mode::Sse);
    reg.unsubscribe_fd(reader.fd()).unwrap();
    let topics: [&[u8]; 2] = [b"a", b"b"];
    for topic in topics {
        reg.subscribe(topic, reader.fd(), Mode::Sse).unwrap();
    }
    let mut published = 0;
    let mut publish = |count: usize| {
        for _ in 0..count {
            published += 1;
            for topic in topics {
                let payload = format!("{}:{published:06}", topic[0] as char);
                reg.publish(topic, payload.as_bytes()).unwrap();
            }
        }
    };
    // Both fall off the history; then each refill races more publishes.
    publish(500);
    assert_eq!(reg.fd_stats(reader.fd()).unwrap().catching_up, 2);
    for _ in 0..60 {
        publish(5);
        reader.read();
        reg.dispatch(Some(Duration::from_millis(1))).unwrap();
    }
    reader.read_until_caught_up(&reg);

    let gaps = gaps.lock().unwrap();
    let mut lost = 0;
    for topic in topics {
        let mut jumps = Vec::new();
        let mut next = 1;
        for (id, payload) in &reader.messages {
            if payload[0] != topic[0] {
                continue;
            }
            let number: u64 = std::str::from_utf8(&payload[2..]).unwrap().parse().unwrap();
            assert_eq!(number, id.offset, "the id is the topic's publish count");
            assert!(id.offset >= next, "once, in order");
            if id.offset > next {
                jumps.push(id.offset - next);
            }
            next = id.offset + 1;
        }
        assert_eq!(next, published + 1, "it got the newest");
        let told: Vec<u64> = gaps
            .iter()
            .filter(|(gap_topic, _)| gap_topic == topic)
            .map(|&(_, lost)| lost)
            .collect();
        assert_eq!(
            jumps, told,
            "topic {}: the jumps seen vs the gaps told",
            topic[0] as char
        );
        lost += told.iter().sum::<u64>();
    }
    assert!(lost > 0);
    assert_eq!(reg.fd_stats(reader.fd()).unwrap().lost_to_gaps, lost);
    assert_eq!(reg.stats().lost_to_gaps, lost);
}

/// Under `Overflow::Evict`, a loss is told once, however many frames of the topic meet it
/// before the eviction lands (here a replay's): not once per frame.
#[test]
fn under_evict_a_gap_is_told_once_before_the_eviction() {
    let reg = Registry::new().unwrap();
    reg.set_history(HistoryLimits {
        max_messages: 100,
        ..HistoryLimits::default()
    });
    reg.set_outbox_limit(1000);
    let gaps: Arc<Mutex<Vec<(RawFd, u64)>>> = Arc::default();
    let sink = Arc::clone(&gaps);
    reg.set_gap_callback(Some(Box::new(move |fd, _topic: &[u8], lost| {
        sink.lock().unwrap().push((fd, lost));
    })));
    let reader = Stalled::new(&reg, Mode::Sse);
    let fd = reader.fd();
    // Behind past the history, found by no one yet (drop-message finds it on refill).
    reg.set_overflow(Overflow::DropMessage);
    for n in 0..5000 {
        reg.publish(b"feed", format!("{n}").as_bytes()).unwrap();
    }
    assert!(gaps.lock().unwrap().is_empty());
    reg.set_overflow(Overflow::Evict);
    // The replay's 50 frames each meet the loss.
    reg.subscribe_tail(b"feed", fd, Mode::Sse, 50).unwrap();
    let gaps = gaps.lock().unwrap();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let (gap_fd, lost) = gaps[0];
    assert_eq!(gap_fd, fd);
    assert!(lost > 0 && lost <= 5000 - 100, "{lost}");
    let totals = reg.stats();
    assert_eq!((totals.lost_to_gaps, totals.evicted_fds), (lost, 1));
    assert!(reg.fd_stats(fd).is_err(), "evicted");
}
