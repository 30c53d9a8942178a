//! Model-based property test: random sequences of registry operations run against the real
//! `fdcast::Registry` (over real socketpairs) and against a small in-memory model of the
//! documented behaviour (include/fdcast.h, README), and the two must agree after every step.
//!
//! What the model predicts exactly:
//! - every return value (subscription ids, match counts, errors, flush counts);
//! - `subscriber_count`, `subscribers_for`, every field of `stats()`, `pending_bytes` per fd;
//! - which frames the overflow policy drops or evicts for, and which fds are evicted (the
//!   evict callback's log);
//! - with history on: every topic's kept messages and ids (SSE frames carry them), which
//!   subscribers fall behind on a topic instead of dropping, the cursor of each, the frames a
//!   drained outbox is refilled with from the history, and every gap (the gap callback's log,
//!   `lost_to_gaps`); `fd_stats` of every fd, field by field;
//! - the bytes every peer receives, frame by frame, and that a live connection eventually
//!   receives every frame it was owed (checked at `Settle` steps and at the end).
//!
//! The one thing it cannot know is how many bytes the kernel takes from a write to a socket
//! whose reader has stopped: that depends on skb accounting. So it *observes* it, through the
//! reader end and independently of fdcast: the bytes that reached the kernel for a connection
//! are the bytes its reader has read plus `FIONREAD` on the reader. Everything fdcast decides
//! (drop, queue, evict) depends only on that figure and on the model's own bookkeeping, so the
//! predictions stay exact. Nothing runs concurrently with the steps, so the figure cannot move
//! between the observation and the next call.
//!
//! The operations: subscribe (valid, invalid, refused topics), unsubscribe (live, stale and
//! bogus ids), unsubscribe_fd, clear, publish, publish_except, send (also to a bad fd),
//! dispatch, cork / flush / uncork, a reader that stops reading or resumes, a reader that
//! vanishes (close) or half-closes, an fd number closed and reused for a new socket (dup2)
//! either properly (unsubscribe_fd first) or relying on the fd-reuse guard, the outbox limit,
//! the overflow policy and the history (off, or 1, 3 or 50 messages per topic) changed at any
//! time, and settling (drain everything).
//!
//! An fd behind on a topic is refilled whenever a flush drains its outbox, which happens
//! exactly when everything owed to it so far has reached the kernel: the observed figure
//! above also tells the model when a refill happened, and the refill itself is predicted.
//!
//! Cases: 256 by default (about a second), `PROPTEST_CASES=n` for more. A failing case is shrunk and saved to
//! `tests/model.proptest-regressions`, which is replayed first on every run.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fdcast::{EventId, FdStats, HistoryLimits, Mode, Overflow, Registry};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

const SLOTS: usize = 4;
const LIMITS: [usize; 7] = [0, 1, 64, 700, 4000, 20_000, 1 << 20];
/// Messages kept per topic: 0 is history off.
const KEEPS: [usize; 4] = [0, 1, 3, 50];
/// Topics by index: 0-3 valid, 4 refused by the authorizer, 5-6 invalid (0 and 4097 bytes).
const TOPIC_COUNT: usize = 7;
const VALID_TOPICS: usize = 4;
const DENIED_TOPIC: usize = 4;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the random cases exercised, across all cases of a run: printed, and the test fails if
/// the generator stops reaching any of it (a model that is never put to the test proves
/// nothing).
struct Coverage {
    steps: AtomicU64,
    partial_writes: AtomicU64,
    drops: AtomicU64,
    overflow_evictions: AtomicU64,
    failed_writes: AtomicU64,
    torn_by_forget: AtomicU64,
    reuse_guard: AtomicU64,
    corked_frames: AtomicU64,
    behind: AtomicU64,
    refilled_frames: AtomicU64,
    gaps: AtomicU64,
}

static COVERAGE: Coverage = Coverage {
    steps: AtomicU64::new(0),
    partial_writes: AtomicU64::new(0),
    drops: AtomicU64::new(0),
    overflow_evictions: AtomicU64::new(0),
    failed_writes: AtomicU64::new(0),
    torn_by_forget: AtomicU64::new(0),
    reuse_guard: AtomicU64::new(0),
    corked_frames: AtomicU64::new(0),
    behind: AtomicU64::new(0),
    refilled_frames: AtomicU64::new(0),
    gaps: AtomicU64::new(0),
};

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn topic(index: usize) -> Vec<u8> {
    match index {
        0 => b"a".to_vec(),
        1 => b"b".to_vec(),
        2 => b"t\0x".to_vec(),
        3 => vec![b'z'; fdcast::MAX_TOPIC_LEN],
        4 => b"deny".to_vec(),
        5 => Vec::new(),
        _ => vec![b'y'; fdcast::MAX_TOPIC_LEN + 1],
    }
}

fn mode(index: u8) -> Mode {
    Mode::ALL[usize::from(index) % Mode::ALL.len()]
}

// -------------------------------------------------------------------------------------------
// operations
// -------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Payload {
    /// ASCII with CR, LF and CRLF sprinkled in, `len` bytes.
    Ascii(u16, u8),
    /// Multi-byte UTF-8 text of `len` bytes.
    Utf8(u16),
    /// Bytes that are not UTF-8.
    Invalid(u16, u8),
    Empty,
    /// The WebSocket length boundaries and a frame larger than any socket buffer here.
    Big(u8),
}

impl Payload {
    fn bytes(&self) -> Vec<u8> {
        match *self {
            Payload::Ascii(len, seed) => (0..usize::from(len))
                .map(|i| {
                    let x = (i * 7 + usize::from(seed) * 13) % 41;
                    match x {
                        0 => b'\n',
                        1 => b'\r',
                        _ => b'a' + (x % 26) as u8,
                    }
                })
                .collect(),
            Payload::Utf8(len) => utf8_text(usize::from(len)).into_bytes(),
            Payload::Invalid(len, seed) => {
                let mut bytes = pattern_bytes(usize::from(len), u32::from(seed));
                let at = usize::from(seed) % (bytes.len() + 1);
                bytes.insert(at, 0xff);
                bytes
            }
            Payload::Empty => Vec::new(),
            Payload::Big(which) => {
                let len = [125, 126, 65_535, 65_536, 100_000][usize::from(which) % 5];
                (0..len).map(|i| b'A' + (i % 23) as u8).collect()
            }
        }
    }

    fn text() -> impl Strategy<Value = Payload> {
        prop_oneof![
            8 => (0..600u16, any::<u8>()).prop_map(|(l, s)| Payload::Ascii(l, s)),
            2 => (0..3000u16, any::<u8>()).prop_map(|(l, s)| Payload::Ascii(l, s)),
            2 => (0..400u16).prop_map(Payload::Utf8),
            1 => Just(Payload::Empty),
            1 => (0..5u8).prop_map(Payload::Big),
        ]
    }

    fn any() -> impl Strategy<Value = Payload> {
        prop_oneof![
            6 => Payload::text(),
            1 => (0..300u16, any::<u8>()).prop_map(|(l, s)| Payload::Invalid(l, s)),
        ]
    }
}

#[derive(Clone, Debug)]
enum Op {
    Subscribe {
        slot: usize,
        topic: usize,
        mode: u8,
    },
    /// `pick` chooses among the ids handed out so far; values >= 200 are bogus ids.
    Unsubscribe {
        pick: u8,
    },
    UnsubscribeFd {
        slot: usize,
    },
    Clear,
    Publish {
        topic: usize,
        payload: Payload,
        except: Option<usize>,
    },
    Send {
        slot: usize,
        mode: u8,
        payload: Payload,
    },
    SendBadFd {
        negative: bool,
    },
    Dispatch,
    Cork,
    Uncork,
    Flush,
    StopReading {
        slot: usize,
    },
    Resume {
        slot: usize,
    },
    /// The reader closes its end without reading what is queued.
    Vanish {
        slot: usize,
    },
    /// The reader shuts down its sending direction (`shutdown(SHUT_WR)`); it still reads.
    HalfClose {
        slot: usize,
    },
    /// The host does it right: `unsubscribe_fd`, then the fd number gets a new socket.
    ReuseClean {
        slot: usize,
    },
    /// The host forgets `unsubscribe_fd`: the fd number gets a new socket (dup2) and the next
    /// call on it, a subscribe, must drop the old file's subscriptions and bytes.
    ReuseThenSubscribe {
        slot: usize,
        topic: usize,
        mode: u8,
    },
    /// The same, the next call being a send.
    ReuseThenSend {
        slot: usize,
        mode: u8,
        payload: Payload,
    },
    SetLimit {
        limit: usize,
    },
    SetPolicy {
        evict: bool,
    },
    /// Messages kept per topic (0: history off).
    SetHistory {
        keep: usize,
    },
    /// Every reader reads, dispatch runs until nothing is owed to a live connection.
    Settle,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let slot = || 0..SLOTS;
    prop_oneof![
        10 => (slot(), 0..TOPIC_COUNT, 0..4u8)
            .prop_map(|(slot, topic, mode)| Op::Subscribe { slot, topic, mode }),
        3 => any::<u8>().prop_map(|pick| Op::Unsubscribe { pick }),
        2 => slot().prop_map(|slot| Op::UnsubscribeFd { slot }),
        1 => Just(Op::Clear),
        14 => (0..TOPIC_COUNT, Payload::any(), proptest::option::weighted(0.3, slot()))
            .prop_map(|(topic, payload, except)| Op::Publish { topic, payload, except }),
        5 => (slot(), 0..4u8, Payload::any())
            .prop_map(|(slot, mode, payload)| Op::Send { slot, mode, payload }),
        1 => any::<bool>().prop_map(|negative| Op::SendBadFd { negative }),
        4 => Just(Op::Dispatch),
        2 => Just(Op::Cork),
        2 => Just(Op::Uncork),
        2 => Just(Op::Flush),
        8 => slot().prop_map(|slot| Op::StopReading { slot }),
        2 => slot().prop_map(|slot| Op::Resume { slot }),
        1 => slot().prop_map(|slot| Op::Vanish { slot }),
        1 => slot().prop_map(|slot| Op::HalfClose { slot }),
        2 => slot().prop_map(|slot| Op::ReuseClean { slot }),
        2 => (slot(), 0..VALID_TOPICS, 0..4u8)
            .prop_map(|(slot, topic, mode)| Op::ReuseThenSubscribe { slot, topic, mode }),
        1 => (slot(), 0..4u8, Payload::text())
            .prop_map(|(slot, mode, payload)| Op::ReuseThenSend { slot, mode, payload }),
        4 => (0..LIMITS.len()).prop_map(|i| Op::SetLimit { limit: LIMITS[i] }),
        2 => any::<bool>().prop_map(|evict| Op::SetPolicy { evict }),
        4 => (0..KEEPS.len()).prop_map(|i| Op::SetHistory { keep: KEEPS[i] }),
        1 => Just(Op::Settle),
    ]
}

// -------------------------------------------------------------------------------------------
// the model, and the real sockets it describes
// -------------------------------------------------------------------------------------------

/// One connection: the socket behind a slot's fd number from its creation until the number
/// is reused, and the reader at the other end.
struct Conn {
    /// The reader end; `None` once the reader vanished.
    reader: Option<UnixStream>,
    reading: bool,
    /// Writes to it fail: its reader vanished, or fdcast shut it down (FDCAST_EVICT).
    broken: bool,
    /// fdcast shut it down: the reader must see EOF after the last byte that reached it.
    shut_down: bool,
    /// Still the file behind its slot's fd number (false once the number was reused).
    attached: bool,
    /// Every byte owed to the reader, in order: the frames accepted for it, truncated where
    /// fdcast forgot the fd (its unwritten bytes are discarded then).
    expected: Vec<u8>,
    /// End offsets in `expected` of frames not yet wholly in the kernel.
    frame_ends: VecDeque<usize>,
    /// (start, end, description) of every frame appended, for failure messages.
    frames: Vec<(usize, usize, String)>,
    /// Bytes that reached the kernel: read so far plus FIONREAD.
    kernel: usize,
    received: Vec<u8>,
    /// fdcast put it on the corked flush list since the last flush.
    awaiting_flush: bool,
    /// Topics fdcast's peer for it is behind on, in fdcast's order.
    lags: Vec<Lag>,
    /// fdcast's per-fd counters of the peer it has for this connection now.
    counters: FdStats,
}

/// A subscription behind on its topic: it gets the topic's messages from `cursor` on from the
/// history, and `newest` is the newest one it skipped.
#[derive(Clone, Debug)]
struct Lag {
    topic: Vec<u8>,
    epoch: u64,
    cursor: u64,
    newest: u64,
}

impl Lag {
    fn owed(&self) -> u64 {
        self.newest + 1 - self.cursor
    }
}

/// A topic's history as the model knows it.
#[derive(Default)]
struct Ring {
    /// Learned from the first id a publish returns (drawn at random by fdcast).
    epoch: Option<u64>,
    last_offset: u64,
    kept: VecDeque<(u64, Vec<u8>)>,
}

impl Ring {
    fn oldest(&self) -> u64 {
        self.kept
            .front()
            .map_or(self.last_offset + 1, |(offset, _)| *offset)
    }

    fn keep_at_most(&mut self, keep: usize) {
        while self.kept.len() > keep {
            self.kept.pop_front();
        }
    }
}

impl Conn {
    fn pending(&self) -> usize {
        self.expected.len() - self.kernel
    }

    /// fdcast forgot the fd: whatever had not reached the kernel is gone for good.
    fn forget(&mut self) {
        if self
            .frames
            .iter()
            .any(|(s, e, _)| *s < self.kernel && self.kernel < *e)
        {
            count(&COVERAGE.torn_by_forget);
        }
        self.expected.truncate(self.kernel);
        self.frame_ends.clear();
        self.awaiting_flush = false;
        self.lags.clear();
        self.counters = FdStats::default();
    }

    fn append(&mut self, bytes: &[u8], what: String) {
        let start = self.expected.len();
        self.expected.extend_from_slice(bytes);
        self.frame_ends.push_back(self.expected.len());
        self.frames.push((start, self.expected.len(), what));
    }

    /// Describes where `received` first differs from `expected`.
    fn mismatch(&self) -> Option<String> {
        let at = self
            .received
            .iter()
            .zip(&self.expected)
            .position(|(a, b)| a != b)
            .or((self.received.len() > self.expected.len()).then_some(self.expected.len()))?;
        let frame = self
            .frames
            .iter()
            .enumerate()
            .find(|(_, (s, e, _))| *s <= at && at < *e)
            .map(|(i, (s, _, what))| format!("frame #{i} ({what}), byte {} of it", at - s))
            .unwrap_or_else(|| "past every frame the model expected".into());
        Some(format!(
            "byte {at} differs: {frame}; received {} bytes, expected {} so far",
            self.received.len(),
            self.expected.len()
        ))
    }
}

struct Slot {
    /// Owns the fd number for the whole case; `dup2` puts new sockets behind it.
    fd: OwnedFd,
    conn: usize,
}

/// What the model says a frame handed to one connection becomes.
enum Fate {
    /// Accepted: written now, queued, or both.
    Accepted,
    /// A zero-length frame: nothing to write, counted as delivered at once.
    Empty,
    Dropped,
    /// FDCAST_EVICT: evicted with ENOBUFS and shut down.
    Overflowed,
    /// Behind on the message's topic: it comes from the history later.
    Behind,
    /// Behind, and `lost` messages it was owed left the history; `evict`: FDCAST_EVICT.
    Gap {
        lost: u64,
        evict: bool,
    },
    /// The write failed: evicted with the peer's errno.
    Failed,
}

struct World {
    reg: Registry,
    evictions: Arc<Mutex<Vec<(RawFd, i32)>>>,
    slots: Vec<Slot>,
    conns: Vec<Conn>,
    /// (topic, slot) -> (subscription id, mode).
    subs: BTreeMap<(Vec<u8>, usize), (u64, Mode)>,
    /// Every subscription id handed out in this case.
    issued: Vec<u64>,
    limit: usize,
    evict_policy: bool,
    corked: bool,
    publishes: u64,
    deliveries: u64,
    dropped: u64,
    evicted: u64,
    /// Evictions the model predicts and the callback has not reported yet: fd -> whether the
    /// reason is ENOBUFS (else EPIPE or ECONNRESET).
    predicted_evictions: Vec<(RawFd, bool)>,
    /// Messages kept per topic; 0: history off.
    keep: usize,
    rings: BTreeMap<Vec<u8>, Ring>,
    lost_to_gaps: u64,
    /// The gap callback's log, and the gaps the model predicts it has not reported yet.
    gaps: GapLog,
    predicted_gaps: Vec<(RawFd, Vec<u8>, u64)>,
    step: usize,
}

type GapLog = Arc<Mutex<Vec<(RawFd, Vec<u8>, u64)>>>;

/// The frame fdcast sends for a message its topic's history numbered `id` (SSE carries it).
fn encode_with_id(mode: Mode, payload: &[u8], id: Option<EventId>) -> Vec<u8> {
    match (mode, id) {
        (Mode::Sse, Some(id)) => {
            let mut frame = format!("id: {id}\n").into_bytes();
            frame.extend(sse_encode(payload));
            frame
        }
        _ => encode(mode, payload),
    }
}

fn new_conn() -> (UnixStream, Conn) {
    let (w, r) = UnixStream::pair().expect("socketpair");
    // Small buffers, so a reader that stops fills the kernel within a few frames.
    set_sndbuf(w.as_raw_fd(), 4096);
    set_rcvbuf(r.as_raw_fd(), 4096);
    r.set_nonblocking(true).unwrap();
    let conn = Conn {
        reader: Some(r),
        reading: true,
        broken: false,
        shut_down: false,
        attached: true,
        expected: Vec::new(),
        frame_ends: VecDeque::new(),
        frames: Vec::new(),
        kernel: 0,
        received: Vec::new(),
        awaiting_flush: false,
        lags: Vec::new(),
        counters: FdStats::default(),
    };
    (w, conn)
}

fn fionread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer it is given.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", io::Error::last_os_error());
    n as usize
}

/// Reads everything available; returns whether EOF was seen.
fn drain_into(reader: &UnixStream, out: &mut Vec<u8>) -> bool {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match read_once(reader.as_raw_fd(), &mut buf) {
            Ok(0) => return true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return true,
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn encode(mode: Mode, payload: &[u8]) -> Vec<u8> {
    match mode {
        Mode::Raw => payload.to_vec(),
        Mode::WsText => ws_encode(1, payload),
        Mode::WsBinary => ws_encode(2, payload),
        Mode::Sse => sse_encode(payload),
        // The model keeps no history: an id mode's frame starts with an empty id and its LF.
        Mode::WsTextId => ws_encode(1, &[b"\n", payload].concat()),
        Mode::WsBinaryId => ws_encode(2, &[b"\n", payload].concat()),
    }
}

impl World {
    fn new() -> World {
        let reg = Registry::new().expect("registry");
        let evictions = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&evictions);
        reg.set_evict_callback(Some(Box::new(move |fd, reason| {
            log.lock().unwrap().push((fd, reason));
        })));
        reg.set_authorizer(Some(Box::new(|topic: &[u8], _, _| topic != b"deny")));
        let gaps = GapLog::default();
        let gap_log = Arc::clone(&gaps);
        reg.set_gap_callback(Some(Box::new(move |fd, topic: &[u8], lost| {
            gap_log.lock().unwrap().push((fd, topic.to_vec(), lost));
        })));
        let mut world = World {
            reg,
            evictions,
            slots: Vec::new(),
            conns: Vec::new(),
            subs: BTreeMap::new(),
            issued: Vec::new(),
            limit: fdcast::DEFAULT_OUTBOX_LIMIT,
            evict_policy: false,
            corked: false,
            publishes: 0,
            deliveries: 0,
            dropped: 0,
            evicted: 0,
            predicted_evictions: Vec::new(),
            keep: 0,
            rings: BTreeMap::new(),
            lost_to_gaps: 0,
            gaps,
            predicted_gaps: Vec::new(),
            step: 0,
        };
        for _ in 0..SLOTS {
            let (w, conn) = new_conn();
            world.conns.push(conn);
            world.slots.push(Slot {
                fd: OwnedFd::from(w),
                conn: world.conns.len() - 1,
            });
        }
        world
    }

    fn fd(&self, slot: usize) -> RawFd {
        self.slots[slot].fd.as_raw_fd()
    }

    fn conn_of(&mut self, slot: usize) -> &mut Conn {
        let index = self.slots[slot].conn;
        &mut self.conns[index]
    }

    fn has_subs(&self, slot: usize) -> bool {
        self.subs.keys().any(|(_, s)| *s == slot)
    }

    /// Whether fdcast should hold a peer for the slot's fd: it has subscriptions or bytes
    /// queued (`fds` in the stats counts exactly those).
    fn known(&self, slot: usize) -> bool {
        self.has_subs(slot) || self.conns[self.slots[slot].conn].pending() > 0
    }

    /// fdcast forgets the slot's fd: subscriptions and unwritten bytes go.
    fn forget(&mut self, slot: usize) -> usize {
        let before = self.subs.len();
        self.subs.retain(|(_, s), _| *s != slot);
        self.conn_of(slot).forget();
        before - self.subs.len()
    }

    fn evict(&mut self, slot: usize, overflow: bool) {
        self.forget(slot);
        self.evicted += 1;
        let fd = self.fd(slot);
        self.predicted_evictions.push((fd, overflow));
        if overflow {
            let conn = self.conn_of(slot);
            conn.broken = true;
            conn.shut_down = true;
        }
    }

    /// What becomes of `frame` handed to the slot's fd now: written, queued, dropped or the
    /// fd evicted, by the documented write path.
    fn fate(&self, slot: usize, frame: &[u8]) -> Fate {
        let conn = &self.conns[self.slots[slot].conn];
        let queued = conn.pending();
        if frame.is_empty() {
            Fate::Empty
        } else if queued > 0 && queued + frame.len() > self.limit {
            if self.evict_policy {
                Fate::Overflowed
            } else {
                Fate::Dropped
            }
        } else if queued == 0 && !self.corked && conn.broken {
            Fate::Failed
        } else {
            Fate::Accepted
        }
    }

    /// Applies a fate to the model; the caller evicts `Overflowed`/`Failed` ones afterwards,
    /// as fdcast does at the end of a publish.
    fn apply(&mut self, slot: usize, frame: &[u8], fate: &Fate, what: String) {
        match fate {
            Fate::Accepted => {
                let corked = self.corked;
                let conn = self.conn_of(slot);
                conn.append(frame, what);
                if corked {
                    count(&COVERAGE.corked_frames);
                    conn.awaiting_flush = true;
                }
            }
            Fate::Empty => {
                self.deliveries += 1;
                self.conn_of(slot).counters.delivered += 1;
            }
            Fate::Dropped => {
                count(&COVERAGE.drops);
                self.dropped += 1;
                self.conn_of(slot).counters.dropped += 1;
            }
            Fate::Overflowed => count(&COVERAGE.overflow_evictions),
            Fate::Failed => count(&COVERAGE.failed_writes),
            Fate::Behind => count(&COVERAGE.behind),
            // The caller records the gap, which needs the topic.
            Fate::Gap { .. } => count(&COVERAGE.gaps),
        }
    }

    /// Observes the kernel's side of every connection (see the module docs), advancing the
    /// delivery count over the frames that are now wholly in the kernel.
    fn observe(&mut self) {
        for i in 0..self.conns.len() {
            let conn = &mut self.conns[i];
            let Some(reader) = conn.reader.as_ref() else {
                continue;
            };
            if conn.reading {
                let _eof = drain_into(reader, &mut conn.received);
            }
            let kernel = conn.received.len() + fionread(reader.as_raw_fd());
            assert!(
                kernel >= conn.kernel,
                "conn {i}: the kernel holds fewer bytes than before"
            );
            // A flush that drains the outbox of an fd behind on topics refills it from their
            // history, and writes on: as long as the kernel took everything owed so far, a
            // refill happened. (An eviction it leads to keeps what reached the kernel.)
            if kernel <= conn.expected.len() {
                conn.kernel = kernel;
                while conn.frame_ends.front().is_some_and(|&end| end <= kernel) {
                    conn.frame_ends.pop_front();
                    conn.counters.delivered += 1;
                    self.deliveries += 1;
                }
            }
            while !self.conns[i].lags.is_empty()
                && kernel >= self.conns[i].expected.len()
                && self.refill(i)
            {}
            let conn = &mut self.conns[i];
            assert!(
                kernel <= conn.expected.len(),
                "conn {i}: {} bytes reached the reader, the model owes it only {}",
                kernel,
                conn.expected.len()
            );
            conn.kernel = kernel;
            if conn
                .frames
                .iter()
                .rev()
                .take(4)
                .any(|(s, e, _)| *s < kernel && kernel < *e)
            {
                count(&COVERAGE.partial_writes);
            }
            while conn.frame_ends.front().is_some_and(|&end| end <= kernel) {
                conn.frame_ends.pop_front();
                conn.counters.delivered += 1;
                self.deliveries += 1;
            }
            if let Some(what) = conn.mismatch() {
                panic!("conn {i}: received bytes differ from the model: {what}");
            }
        }
    }

    /// The slot whose fd is connection `conn` now, if any.
    fn slot_of(&self, conn: usize) -> Option<usize> {
        (0..SLOTS).find(|&slot| self.slots[slot].conn == conn && self.conns[conn].attached)
    }

    /// Records a gap of `lost` messages of `topic` for the slot's fd.
    fn gap(&mut self, slot: usize, topic: &[u8], lost: u64) {
        let fd = self.fd(slot);
        self.lost_to_gaps += lost;
        self.conn_of(slot).counters.lost_to_gaps += lost;
        self.predicted_gaps.push((fd, topic.to_vec(), lost));
    }

    /// What fdcast does when connection `conn`'s outbox drains while it is behind on topics:
    /// for each, in its order (each refill starting one topic further on), from the cursor on, the kept messages framed in the
    /// subscription's mode while they fit under the outbox limit (an empty outbox takes any
    /// frame); a gap first if the history dropped messages it was owed. Returns whether it
    /// queued anything.
    fn refill(&mut self, conn: usize) -> bool {
        let slot = self
            .slot_of(conn)
            .expect("only a connection fdcast knows is behind");
        let mut queued = 0;
        let mut evict = false;
        let topics: Vec<Vec<u8>> = self.conns[conn]
            .lags
            .iter()
            .map(|lag| lag.topic.clone())
            .collect();
        // The next refill starts one topic further on.
        if !topics.is_empty() {
            self.conns[conn].lags.rotate_left(1);
        }
        for topic in topics {
            let Some(at) = self.conns[conn]
                .lags
                .iter()
                .position(|lag| lag.topic == topic)
            else {
                continue;
            };
            let mode = self.subs.get(&(topic.clone(), slot)).map(|(_, mode)| *mode);
            let lag = self.conns[conn].lags[at].clone();
            let ring = self
                .rings
                .get(&topic)
                .filter(|ring| ring.epoch == Some(lag.epoch));
            let (Some(ring), Some(mode)) = (ring, mode) else {
                self.conns[conn].lags.swap_remove(at);
                if mode.is_some() {
                    self.gap(slot, &topic, lag.owed());
                    count(&COVERAGE.gaps);
                    evict |= self.evict_policy;
                }
                continue;
            };
            let mut cursor = lag.cursor;
            let (oldest, last, epoch) = (ring.oldest(), ring.last_offset, lag.epoch);
            let kept: Vec<(u64, Vec<u8>)> = ring
                .kept
                .iter()
                .filter(|(offset, _)| *offset >= cursor.max(oldest))
                .cloned()
                .collect();
            if cursor < oldest {
                self.gap(slot, &topic, oldest - cursor);
                count(&COVERAGE.gaps);
                if self.evict_policy {
                    evict = true;
                    continue;
                }
                cursor = oldest;
            }
            for (offset, payload) in kept {
                if mode.requires_utf8() && std::str::from_utf8(&payload).is_err()
                    || payload.is_empty() && mode == Mode::Raw
                {
                    cursor = offset + 1;
                    continue;
                }
                let id = EventId { epoch, offset };
                let frame = encode_with_id(mode, &payload, Some(id));
                if queued > 0 && queued + frame.len() > self.limit {
                    break;
                }
                queued += frame.len();
                count(&COVERAGE.refilled_frames);
                let what = format!("step {} refill {m:?} {id}", self.step, m = mode);
                self.conns[conn].append(&frame, what);
                cursor = offset + 1;
            }
            if cursor > last {
                self.conns[conn].lags.swap_remove(at);
            } else {
                self.conns[conn].lags[at].cursor = cursor;
            }
        }
        if evict {
            self.evict(slot, true);
            return false;
        }
        queued > 0
    }

    fn set_history(&mut self, keep: usize) {
        self.reg.set_history(HistoryLimits {
            max_messages: keep,
            ..HistoryLimits::default()
        });
        self.keep = keep;
        if keep == 0 {
            self.rings.clear();
        }
        for ring in self.rings.values_mut() {
            ring.keep_at_most(keep);
        }
    }

    /// The gap callback reported exactly the predicted gaps.
    fn check_gaps(&mut self) {
        let mut got = std::mem::take(&mut *self.gaps.lock().unwrap());
        let mut want = std::mem::take(&mut self.predicted_gaps);
        got.sort();
        want.sort();
        assert_eq!(got, want, "gaps reported, predicted");
    }

    fn take_evictions(&self) -> Vec<(RawFd, i32)> {
        std::mem::take(&mut *self.evictions.lock().unwrap())
    }

    /// The evict callback reported exactly the predicted evictions.
    fn check_evictions(&mut self) {
        let mut got = self.take_evictions();
        let mut want = std::mem::take(&mut self.predicted_evictions);
        got.sort();
        want.sort();
        assert_eq!(
            got.len(),
            want.len(),
            "evictions reported {got:?}, predicted {want:?}"
        );
        for ((fd, reason), (want_fd, overflow)) in got.iter().zip(&want) {
            assert_eq!(
                fd, want_fd,
                "evictions reported {got:?}, predicted {want:?}"
            );
            if *overflow {
                assert_eq!(*reason, libc::ENOBUFS, "fd {fd}: overflow eviction reason");
            } else {
                assert!(
                    [libc::EPIPE, libc::ECONNRESET].contains(reason),
                    "fd {fd}: eviction reason {reason}, expected EPIPE or ECONNRESET"
                );
            }
        }
    }

    /// Registry state equals the model's.
    fn check_state(&self) {
        for conn in &self.conns {
            assert!(
                conn.lags.is_empty() || conn.pending() > 0,
                "the model has a connection behind with nothing queued"
            );
        }
        assert_eq!(
            self.reg.subscriber_count(),
            self.subs.len(),
            "subscriber_count"
        );
        for t in 0..VALID_TOPICS {
            let topic = topic(t);
            let mut got = self.reg.subscribers_for(&topic);
            got.sort();
            let mut want: Vec<RawFd> = self
                .subs
                .keys()
                .filter(|(tp, _)| *tp == topic)
                .map(|(_, s)| self.fd(*s))
                .collect();
            want.sort();
            assert_eq!(got, want, "subscribers_for(topic #{t})");
        }
        let mut queued = 0;
        let mut fds = 0;
        for slot in 0..SLOTS {
            let known = self.known(slot);
            let pending = if known {
                self.conns[self.slots[slot].conn].pending()
            } else {
                0
            };
            queued += pending;
            fds += usize::from(known);
            assert_eq!(
                self.reg.pending_bytes(self.fd(slot)).unwrap(),
                pending,
                "pending_bytes of slot {slot}"
            );
            let conn = &self.conns[self.slots[slot].conn];
            let got = self.reg.fd_stats(self.fd(slot));
            if known {
                let want = FdStats {
                    queued_bytes: pending as u64,
                    catching_up: conn.lags.len() as u64,
                    ..conn.counters
                };
                assert_eq!(got.unwrap(), want, "fd_stats of slot {slot}");
            } else {
                assert_eq!(
                    got.unwrap_err().errno(),
                    libc::ENOENT,
                    "fd_stats of slot {slot}"
                );
            }
        }
        let topics: BTreeSet<&Vec<u8>> = self.subs.keys().map(|(t, _)| t).collect();
        let want = fdcast::Stats {
            publishes: self.publishes,
            deliveries: self.deliveries,
            dropped_messages: self.dropped,
            lost_to_gaps: self.lost_to_gaps,
            evicted_fds: self.evicted,
            queued_bytes: queued as u64,
            subscriptions: self.subs.len() as u64,
            topics: topics.len() as u64,
            fds: fds as u64,
        };
        assert_eq!(self.reg.stats(), want, "stats");
    }

    /// Puts a new socket behind the slot's fd number; the old one is closed (its reader
    /// will read what reached it, then EOF).
    fn reuse(&mut self, slot: usize) {
        let (w, conn) = new_conn();
        // SAFETY: both are open fds owned by this test; dup2 atomically replaces the file
        // behind the slot's number, which the slot keeps owning.
        let rc = unsafe { libc::dup2(w.as_raw_fd(), self.fd(slot)) };
        assert!(rc >= 0, "dup2: {}", io::Error::last_os_error());
        drop(w);
        self.conn_of(slot).attached = false;
        self.conns.push(conn);
        self.slots[slot].conn = self.conns.len() - 1;
    }

    fn subscribe(&mut self, slot: usize, t: usize, m: Mode) {
        let topic = topic(t);
        let got = self.reg.subscribe(&topic, self.fd(slot), m);
        if t > DENIED_TOPIC {
            assert_eq!(
                got.unwrap_err().errno(),
                libc::EINVAL,
                "subscribe bad topic"
            );
            return;
        }
        if t == DENIED_TOPIC {
            assert_eq!(got.unwrap_err().errno(), libc::EACCES, "subscribe refused");
            return;
        }
        let got = got.expect("subscribe");
        match self.subs.get_mut(&(topic.clone(), slot)) {
            Some((id, mode)) => {
                *mode = m;
                assert_eq!(got, *id, "subscribing again returns the same id");
            }
            None => {
                assert!(got > 0, "subscription id {got}");
                assert!(
                    !self.issued.contains(&got),
                    "subscription id {got} was handed out before"
                );
                self.issued.push(got);
                self.subs.insert((topic, slot), (got, m));
            }
        }
    }

    fn publish(&mut self, t: usize, payload: &[u8], except: Option<usize>) {
        let topic = topic(t);
        let except_fd = except.map(|slot| self.fd(slot));
        let got = self.reg.publish_with_id(&topic, payload, except_fd);
        if t > VALID_TOPICS {
            assert_eq!(got.unwrap_err().errno(), libc::EINVAL, "publish bad topic");
            return;
        }
        if self.keep > 0 {
            // fdcast makes the topic's history before it checks the payload.
            self.rings.entry(topic.clone()).or_default();
        }
        let recipients: Vec<(usize, Mode)> = self
            .subs
            .iter()
            .filter(|((tp, s), _)| *tp == topic && Some(*s) != except)
            .map(|((_, s), (_, m))| (*s, *m))
            .collect();
        let needs_utf8 = recipients.iter().any(|(_, m)| m.requires_utf8());
        if needs_utf8 && std::str::from_utf8(payload).is_err() {
            assert_eq!(
                got.unwrap_err().errno(),
                libc::EILSEQ,
                "publish invalid UTF-8"
            );
            return;
        }
        let (matched, id) = got.unwrap();
        assert_eq!(matched, recipients.len(), "publish matched");
        self.publishes += 1;
        let numbered = self.number(&topic, id);
        let mut evictions = Vec::new();
        for (slot, m) in recipients {
            let frame = encode_with_id(m, payload, id);
            let fate = match numbered {
                Some((id, oldest)) => self.fate_numbered(slot, &frame, &topic, id, oldest),
                None => self.fate(slot, &frame),
            };
            let what = format!("step {} publish {m:?} {} bytes", self.step, payload.len());
            self.apply(slot, &frame, &fate, what);
            match fate {
                Fate::Overflowed => evictions.push((slot, true)),
                Fate::Failed => evictions.push((slot, false)),
                Fate::Gap { lost, evict } => {
                    self.gap(slot, &topic, lost);
                    if evict {
                        evictions.push((slot, true));
                    }
                }
                _ => {}
            }
        }
        if let Some(ring) = self.rings.get_mut(&topic) {
            let offset = ring.last_offset + 1;
            ring.last_offset = offset;
            ring.kept.push_back((offset, payload.to_vec()));
            ring.keep_at_most(self.keep);
        }
        for (slot, overflow) in evictions {
            self.evict(slot, overflow);
        }
    }

    /// Checks the id a publish to `topic` got (none with history off; the next offset of the
    /// topic's epoch, learned from the first one, with it on); returns it with the oldest
    /// offset the topic's history keeps before this message.
    fn number(&mut self, topic: &[u8], id: Option<EventId>) -> Option<(EventId, u64)> {
        let Some(ring) = self.rings.get_mut(topic) else {
            assert_eq!(id, None, "an id with history off");
            return None;
        };
        let id = id.expect("an id with history on");
        assert_eq!(
            *ring.epoch.get_or_insert(id.epoch),
            id.epoch,
            "one epoch per history"
        );
        assert_eq!(id.offset, ring.last_offset + 1, "offsets count publishes");
        Some((id, ring.oldest()))
    }

    /// `fate` for a message its topic's history keeps: a subscriber behind on the topic
    /// skips it (finding a gap under FDCAST_EVICT if the history dropped what it is owed, or
    /// if the history was made anew), and one it would overflow falls behind instead.
    fn fate_numbered(
        &mut self,
        slot: usize,
        frame: &[u8],
        topic: &[u8],
        id: EventId,
        oldest: u64,
    ) -> Fate {
        if frame.is_empty() {
            return Fate::Empty;
        }
        let evict = self.evict_policy;
        let conn = self.conn_of(slot);
        if let Some(lag) = conn.lags.iter_mut().find(|lag| lag.topic == topic) {
            let mut lost = 0;
            if lag.epoch != id.epoch {
                lost = lag.owed();
                *lag = Lag {
                    topic: topic.to_vec(),
                    epoch: id.epoch,
                    cursor: id.offset,
                    newest: id.offset,
                };
            } else {
                if evict && lag.cursor < oldest {
                    lost = oldest - lag.cursor;
                }
                lag.newest = lag.newest.max(id.offset);
            }
            return if lost == 0 {
                Fate::Behind
            } else {
                Fate::Gap { lost, evict }
            };
        }
        match self.fate(slot, frame) {
            Fate::Dropped | Fate::Overflowed => {
                self.conn_of(slot).lags.push(Lag {
                    topic: topic.to_vec(),
                    epoch: id.epoch,
                    cursor: id.offset,
                    newest: id.offset,
                });
                Fate::Behind
            }
            other => other,
        }
    }

    fn send(&mut self, slot: usize, m: Mode, payload: &[u8]) {
        let got = self.reg.send(self.fd(slot), m, payload);
        if m.requires_utf8() && std::str::from_utf8(payload).is_err() {
            assert_eq!(got.unwrap_err().errno(), libc::EILSEQ, "send invalid UTF-8");
            return;
        }
        let frame = encode(m, payload);
        let fate = self.fate(slot, &frame);
        let what = format!("step {} send {m:?} {} bytes", self.step, payload.len());
        self.apply(slot, &frame, &fate, what);
        match fate {
            Fate::Behind | Fate::Gap { .. } => unreachable!("a send is in no topic's history"),
            Fate::Accepted | Fate::Empty => got.expect("send"),
            Fate::Dropped => {
                assert_eq!(got.unwrap_err().errno(), libc::ENOBUFS, "send dropped");
            }
            Fate::Overflowed => {
                assert_eq!(got.unwrap_err().errno(), libc::ENOBUFS, "send overflowed");
                self.evict(slot, true);
            }
            Fate::Failed => {
                let errno = got.unwrap_err().errno();
                assert!(
                    [libc::EPIPE, libc::ECONNRESET].contains(&errno),
                    "send to a dead peer: errno {errno}"
                );
                self.evict(slot, false);
            }
        }
    }

    /// Every reader reads and dispatch runs until no live connection is owed a byte and
    /// every dead one with queued bytes was evicted.
    fn settle(&mut self) {
        for slot in 0..SLOTS {
            let conn = &self.conns[self.slots[slot].conn];
            if self.known(slot) && conn.broken && conn.pending() > 0 {
                self.evict(slot, false);
            }
        }
        for conn in &mut self.conns {
            conn.reading = conn.reader.is_some();
        }
        let start = Instant::now();
        loop {
            self.reg.dispatch(Some(Duration::ZERO)).expect("dispatch");
            self.observe();
            for conn in &mut self.conns {
                conn.awaiting_flush = false;
            }
            let owed: Vec<usize> = (0..SLOTS)
                .filter(|&s| self.known(s) && self.conns[self.slots[s].conn].pending() > 0)
                .collect();
            let reported = self.evictions.lock().unwrap().len();
            if owed.is_empty() && reported >= self.predicted_evictions.len() {
                return;
            }
            assert!(
                start.elapsed() < SETTLE_TIMEOUT,
                "settle: slots {owed:?} still owed bytes, {reported} of {} evictions \
                 reported, after {SETTLE_TIMEOUT:?} of dispatch (lost wakeup?)",
                self.predicted_evictions.len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Subscribe {
                slot,
                topic,
                mode: m,
            } => self.subscribe(slot, topic, mode(m)),
            Op::Unsubscribe { pick } => {
                let id = match self.issued.len() {
                    n if n > 0 && pick < 200 => self.issued[usize::from(pick) % n],
                    _ => {
                        let unissued = self.issued.iter().max().map_or(1, |max| max + 1);
                        [0, u64::MAX, unissued][usize::from(pick) % 3]
                    }
                };
                let got = self.reg.unsubscribe(id);
                let key = self
                    .subs
                    .iter()
                    .find(|(_, (sub_id, _))| *sub_id == id)
                    .map(|(k, _)| k.clone());
                match key {
                    Some(key) => {
                        got.expect("unsubscribe a live id");
                        self.subs.remove(&key);
                        // Nothing more is owed on a topic it left.
                        let (topic, slot) = key;
                        self.conn_of(slot).lags.retain(|lag| lag.topic != topic);
                    }
                    None => assert_eq!(got.unwrap_err().errno(), libc::ENOENT, "unsubscribe"),
                }
            }
            Op::UnsubscribeFd { slot } => {
                let got = self.reg.unsubscribe_fd(self.fd(slot)).unwrap();
                assert_eq!(got, self.forget(slot), "unsubscribe_fd count");
            }
            Op::Clear => {
                self.reg.clear();
                for slot in 0..SLOTS {
                    self.forget(slot);
                }
            }
            Op::Publish {
                topic,
                ref payload,
                except,
            } => self.publish(topic, &payload.bytes(), except),
            Op::Send {
                slot,
                mode: m,
                ref payload,
            } => self.send(slot, mode(m), &payload.bytes()),
            Op::SendBadFd { negative } => {
                let fd = if negative { -1 } else { i32::MAX - 1 };
                let got = self.reg.send(fd, Mode::Raw, b"x");
                assert_eq!(got.unwrap_err().errno(), libc::EBADF, "send to a bad fd");
            }
            Op::Dispatch => {
                for slot in 0..SLOTS {
                    let conn = &self.conns[self.slots[slot].conn];
                    if self.known(slot) && conn.broken && conn.pending() > 0 {
                        self.evict(slot, false);
                    }
                }
                self.reg.dispatch(Some(Duration::ZERO)).expect("dispatch");
                for conn in &mut self.conns {
                    conn.awaiting_flush = false;
                }
            }
            Op::Cork => {
                self.reg.cork();
                self.corked = true;
            }
            Op::Uncork | Op::Flush => {
                let mut listed = Vec::new();
                for slot in 0..SLOTS {
                    let conn = &self.conns[self.slots[slot].conn];
                    if conn.awaiting_flush {
                        if conn.broken {
                            self.evict(slot, false);
                        } else {
                            listed.push((self.slots[slot].conn, conn.kernel));
                        }
                    }
                }
                let got = if matches!(op, Op::Uncork) {
                    self.corked = false;
                    self.reg.uncork()
                } else {
                    self.reg.flush()
                };
                for conn in &mut self.conns {
                    conn.awaiting_flush = false;
                }
                self.observe();
                let progressed = listed
                    .iter()
                    .filter(|(c, before)| self.conns[*c].kernel > *before)
                    .count();
                assert_eq!(got, progressed, "fds written to by flush/uncork");
            }
            Op::StopReading { slot } => self.conn_of(slot).reading = false,
            Op::Resume { slot } => {
                let before = self.conn_of(slot).kernel;
                let conn = self.conn_of(slot);
                conn.reading = conn.reader.is_some();
                self.observe();
                assert_eq!(
                    self.conn_of(slot).kernel,
                    before,
                    "FIONREAD disagreed with what the reader then read"
                );
            }
            Op::Vanish { slot } => {
                let conn = self.conn_of(slot);
                conn.reader = None;
                conn.reading = false;
                conn.broken = true;
            }
            Op::HalfClose { slot } => {
                if let Some(reader) = &self.conn_of(slot).reader {
                    // Fails with ENOTCONN once fdcast shut the socket down; that is fine.
                    let _ = reader.shutdown(std::net::Shutdown::Write);
                }
            }
            Op::ReuseClean { slot } => {
                let got = self.reg.unsubscribe_fd(self.fd(slot)).unwrap();
                assert_eq!(got, self.forget(slot), "unsubscribe_fd count");
                self.reuse(slot);
            }
            Op::ReuseThenSubscribe {
                slot,
                topic,
                mode: m,
            } => {
                if self.known(slot) {
                    count(&COVERAGE.reuse_guard);
                    self.forget(slot);
                }
                self.reuse(slot);
                self.subscribe(slot, topic, mode(m));
            }
            Op::ReuseThenSend {
                slot,
                mode: m,
                ref payload,
            } => {
                if self.known(slot) {
                    count(&COVERAGE.reuse_guard);
                    self.forget(slot);
                }
                self.reuse(slot);
                self.send(slot, mode(m), &payload.bytes());
            }
            Op::SetLimit { limit } => {
                self.reg.set_outbox_limit(limit);
                self.limit = limit;
            }
            Op::SetPolicy { evict } => {
                self.reg.set_overflow(if evict {
                    Overflow::Evict
                } else {
                    Overflow::DropMessage
                });
                self.evict_policy = evict;
            }
            Op::SetHistory { keep } => self.set_history(keep),
            Op::Settle => self.settle(),
        }
        self.observe();
        self.check_evictions();
        self.check_gaps();
        self.forget_counters_of_forgotten_fds();
        self.check_state();
    }

    /// fdcast drops its peer for an fd it no longer knows, counters and all.
    fn forget_counters_of_forgotten_fds(&mut self) {
        for slot in 0..SLOTS {
            if !self.known(slot) {
                self.conn_of(slot).counters = FdStats::default();
            }
        }
    }

    /// The end of a case: settle, then every reader got exactly what the model owes it, and
    /// the ones whose writer is closed or shut down see EOF right after.
    fn finish(mut self) {
        self.settle();
        self.check_evictions();
        self.check_gaps();
        self.forget_counters_of_forgotten_fds();
        self.check_state();
        for (i, conn) in self.conns.iter_mut().enumerate() {
            let Some(reader) = conn.reader.take() else {
                continue;
            };
            let mut rest = Vec::new();
            let eof = drain_into(&reader, &mut rest);
            conn.received.extend_from_slice(&rest);
            if let Some(what) = conn.mismatch() {
                panic!("conn {i} at the end: {what}");
            }
            assert_eq!(
                conn.received.len(),
                conn.expected.len(),
                "conn {i}: frames owed but never received"
            );
            let closed = !conn.attached || conn.shut_down;
            assert_eq!(
                eof, closed,
                "conn {i}: EOF seen {eof}, writer closed {closed}"
            );
        }
        self.reg.clear();
        let st = self.reg.stats();
        assert_eq!(
            (st.subscriptions, st.topics, st.fds, st.queued_bytes),
            (0, 0, 0, 0),
            "after clear"
        );
    }
}

fn run_case(ops: &[Op]) {
    let mut world = World::new();
    world.check_state();
    for (step, op) in ops.iter().enumerate() {
        count(&COVERAGE.steps);
        world.step = step;
        world.run(op);
    }
    world.finish();
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    Config {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/model.proptest-regressions",
        ))),
        ..Config::default()
    }
}

#[test]
fn registry_agrees_with_the_model_after_every_step() {
    with_watchdog(600, || {
        let mut runner = TestRunner::new(config());
        let result = runner.run(&proptest::collection::vec(op_strategy(), 1..120), |ops| {
            run_case(&ops);
            Ok(())
        });
        if let Err(err) = result {
            panic!("{err}");
        }
        let c = &COVERAGE;
        let figures = [
            ("steps", &c.steps),
            ("partly written frames", &c.partial_writes),
            ("frames dropped", &c.drops),
            ("overflow evictions", &c.overflow_evictions),
            ("failed writes", &c.failed_writes),
            ("frames torn by forgetting the fd", &c.torn_by_forget),
            ("fd-reuse guard", &c.reuse_guard),
            ("corked frames", &c.corked_frames),
            ("frames of subscribers behind on their topic", &c.behind),
            ("frames refilled from the history", &c.refilled_frames),
            ("gaps", &c.gaps),
        ];
        for (what, counter) in figures {
            let n = counter.load(Ordering::Relaxed);
            eprintln!("model coverage: {what}: {n}");
            assert!(n > 0, "the random cases never exercised: {what}");
        }
    });
}

/// Hand-picked sequences that the random search reaches only rarely: a partly written frame
/// under every policy, eviction of a shut-down socket that is subscribed again, corked
/// frames for a peer that vanished, and the fd-reuse guard with bytes queued.
#[test]
fn hand_picked_sequences_agree_with_the_model() {
    use Op::*;
    let big = Payload::Big(4);
    let small = Payload::Ascii(300, 1);
    let cases: Vec<Vec<Op>> = vec![
        // A stopped reader, a frame larger than the socket buffer, then drops and an evict.
        vec![
            Subscribe {
                slot: 0,
                topic: 0,
                mode: 2,
            },
            StopReading { slot: 0 },
            Publish {
                topic: 0,
                payload: big.clone(),
                except: None,
            },
            SetLimit { limit: 700 },
            Publish {
                topic: 0,
                payload: small.clone(),
                except: None,
            },
            SetPolicy { evict: true },
            Publish {
                topic: 0,
                payload: small.clone(),
                except: None,
            },
            Subscribe {
                slot: 0,
                topic: 1,
                mode: 3,
            },
            Publish {
                topic: 1,
                payload: small.clone(),
                except: None,
            },
            Settle,
        ],
        // Corked frames for a reader that vanishes, flushed by dispatch.
        vec![
            Subscribe {
                slot: 1,
                topic: 0,
                mode: 0,
            },
            Cork,
            Publish {
                topic: 0,
                payload: small.clone(),
                except: None,
            },
            Vanish { slot: 1 },
            Dispatch,
            Uncork,
        ],
        // The reuse guard with a partly written frame queued for the old socket.
        vec![
            Subscribe {
                slot: 2,
                topic: 2,
                mode: 1,
            },
            StopReading { slot: 2 },
            Publish {
                topic: 2,
                payload: big.clone(),
                except: None,
            },
            ReuseThenSubscribe {
                slot: 2,
                topic: 2,
                mode: 3,
            },
            Publish {
                topic: 2,
                payload: small.clone(),
                except: None,
            },
            ReuseThenSend {
                slot: 2,
                mode: 0,
                payload: small.clone(),
            },
            Settle,
        ],
        // unsubscribe_fd mid-frame, then the same socket subscribes again.
        vec![
            Subscribe {
                slot: 3,
                topic: 0,
                mode: 0,
            },
            StopReading { slot: 3 },
            Publish {
                topic: 0,
                payload: big.clone(),
                except: None,
            },
            UnsubscribeFd { slot: 3 },
            Subscribe {
                slot: 3,
                topic: 0,
                mode: 0,
            },
            Publish {
                topic: 0,
                payload: small.clone(),
                except: None,
            },
            Resume { slot: 3 },
            Settle,
        ],
        // Limit 0, send behind queued bytes, publish_except.
        vec![
            SetLimit { limit: 0 },
            Subscribe {
                slot: 0,
                topic: 0,
                mode: 0,
            },
            Subscribe {
                slot: 1,
                topic: 0,
                mode: 3,
            },
            StopReading { slot: 0 },
            Publish {
                topic: 0,
                payload: big.clone(),
                except: Some(1),
            },
            Send {
                slot: 0,
                mode: 2,
                payload: small.clone(),
            },
            Publish {
                topic: 0,
                payload: Payload::Empty,
                except: None,
            },
            Publish {
                topic: 0,
                payload: Payload::Invalid(5, 2),
                except: Some(1),
            },
            Publish {
                topic: 0,
                payload: Payload::Invalid(5, 2),
                except: None,
            },
            Settle,
        ],
        // Behind on a topic while corked, then history turned off: what it was owed is a gap,
        // found when its outbox drains, and FDCAST_EVICT evicts it.
        vec![
            Subscribe {
                slot: 1,
                topic: 3,
                mode: 0,
            },
            Cork,
            SetHistory { keep: 1 },
            SetLimit { limit: 0 },
            SetPolicy { evict: true },
            Publish {
                topic: 3,
                payload: Payload::Ascii(1, 0),
                except: None,
            },
            Publish {
                topic: 3,
                payload: Payload::Ascii(1, 0),
                except: None,
            },
            SetHistory { keep: 0 },
            Settle,
        ],
    ];
    // A stalled reader on a topic with history, under each policy and history size: it falls
    // behind, then catches up (SSE frames with ids), or falls off the history (a gap, found
    // when it drains under FDCAST_DROP_MESSAGE, at once under FDCAST_EVICT).
    let mut cases = cases;
    for (keep, evict, mode) in [(50, false, 3), (3, false, 0), (3, true, 0), (1, false, 1)] {
        let mut ops = vec![
            SetHistory { keep },
            SetPolicy { evict },
            SetLimit { limit: 700 },
            Subscribe {
                slot: 0,
                topic: 0,
                mode,
            },
            Subscribe {
                slot: 0,
                topic: 1,
                mode,
            },
            Subscribe {
                slot: 1,
                topic: 0,
                mode,
            },
            StopReading { slot: 0 },
        ];
        for n in 0..40u8 {
            ops.push(Publish {
                topic: usize::from(n % 3 == 0),
                payload: Payload::Ascii(500, n),
                except: None,
            });
        }
        ops.extend([Dispatch, Resume { slot: 0 }, Dispatch, Settle]);
        cases.push(ops);
    }
    with_watchdog(120, move || {
        for ops in &cases {
            run_case(ops);
        }
    });
}
