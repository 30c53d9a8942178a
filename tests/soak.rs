//! Soak under faults (`make soak`; budget FDCAST_SOAK_SECS, default 60; FDCAST_SOAK_TRACE=1
//! prints RSS, live heap and queued bytes as it goes), after a shorter one with history on
//! (FDCAST_SOAK_HISTORY_SECS, default 12; see `history_soak`).
//!
//! With history on: 100 readers of 6 topics in the modes that carry ids, four publisher
//! threads, a dispatch thread; readers stop for a quarter of what the history keeps (they
//! fall behind and must catch up from it) or for twice it (they fall off it: gaps), and
//! reconnect resuming from the last id they read (`subscribe_since`). Each reader checks that
//! every message arrives once, in id order, except across jumps, and each jump must be a gap
//! the callback reported for that reader and topic, with the same count; the counts sum to
//! each fd's `lost_to_gaps` and the registry's; queued bytes stay within the outbox limits.
//!
//! 2,000 subscriber connections (half TCP over loopback, half socketpairs; 4,000 sockets with
//! the client ends) on 16 topics in every mode; two publisher threads; a dispatch thread; and
//! one host thread that plays both the server (accept, subscribe, close) and the clients
//! (read fast, read slowly, stop reading) and injects faults: clients that reset the
//! connection (SO_LINGER 0), half-close, or vanish, and a host that closes fds without
//! `unsubscribe_fd` so that their numbers are reused by new connections.
//!
//! Every client parses its stream strictly (RAW length-prefixed, WebSocket, SSE), checks each
//! frame's content and that each publisher's frames arrive in order. A new connection first
//! gets a HELLO frame through `send` right after it subscribes; bytes before the HELLO are
//! frames that fdcast wrote to the fd number for its previous owner (possible only when the
//! host closed it without `unsubscribe_fd`, in the window before the reuse guard runs): they
//! are counted, and must be zero for numbers whose previous owner was closed properly.
//!
//! At the end: every fd closed properly, then no subscription, fd or byte is left in fdcast,
//! /proc/self/fd is back to its count before the soak, no heap is left allocated, RSS (after
//! malloc_trim, both times with publishers paused and every live client drained) is within
//! 10% of its level after warm-up, plus what more is queued for stalled clients, no torn or malformed frame was seen, and the counters account for every frame:
//! frames parsed by clients <= deliveries, and deliveries + drops + discarded = frames handed
//! to fdcast (publish matches + sends), where "discarded" are frames dropped with their fd
//! (unsubscribe_fd, eviction, the reuse guard), which must be >= 0 and 0 when no fd was ever
//! forgotten with bytes queued.

mod common;

/// Counts live heap bytes, so the end of the soak can tell a leak from allocator retention.
struct CountingAllocator;

static LIVE_HEAP: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_HEAP.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on unchanged.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_HEAP.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_HEAP.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

use std::collections::HashMap;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{read_once, set_rcvbuf, set_sndbuf};
use fdcast::{Mode, Registry};

const CONNECTIONS: usize = 2000;
const TOPICS: usize = 16;
/// The most read-buffer room a client keeps between reads.
const CLIENT_BUFFER_KEPT: usize = 16 * 1024;
const PUBLISHERS: usize = 2;

fn main() {
    let secs: u64 = std::env::var("FDCAST_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    raise_fd_limit(4 * CONNECTIONS as u64 + 1000);
    // Fewer malloc arenas: less fragmentation across the threads, steadier RSS.
    // SAFETY: mallopt before any thread is started.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let history_secs: u64 = std::env::var("FDCAST_SOAK_HISTORY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    println!("{}", history_soak(Duration::from_secs(history_secs)));
    let report = soak(Duration::from_secs(secs));
    println!("{report}");
    println!("1 passed, 0 failed");
}

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        assert!(
            lim.rlim_max >= want,
            "RLIMIT_NOFILE hard limit {} < {want}",
            lim.rlim_max
        );
        lim.rlim_cur = lim.rlim_cur.max(want);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Resident memory, after glibc has returned the free memory it holds (malloc_trim), so
/// that allocator retention does not pass for growth.
fn rss_kib() -> u64 {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

// -------------------------------------------------------------------------------------------
// frames: a length-prefixed ASCII body inside each mode's framing
// -------------------------------------------------------------------------------------------

/// "T07 P1 S0000001234 <filler>": topic, publisher, sequence; filler derived from them. Its
/// length (100 to 1,300 bytes) has no byte >= 0x80, CR or LF, so the length prefix is ASCII
/// on one line and the whole frame stays UTF-8 and one SSE data line.
fn body(topic: usize, publisher: usize, seq: u64) -> Vec<u8> {
    let mut b = format!("T{topic:02} P{publisher} S{seq:010} ").into_bytes();
    let mut len = 100 + (seq as usize * 37 + topic * 11) % 1000;
    if len & 0x80 != 0 {
        len += 0x80;
    }
    if matches!(len & 0xff, 0x0a | 0x0d) {
        len += 1; // no CR or LF in the prefix either: one SSE data line per frame
    }
    let fill = len - b.len();
    b.extend((0..fill).map(|i| b'a' + ((seq as usize + i) % 26) as u8));
    b
}

fn lp(body: &[u8]) -> Vec<u8> {
    let prefix = (body.len() as u32).to_be_bytes();
    assert!(
        prefix.iter().all(|b| b.is_ascii()),
        "the length prefix stays UTF-8"
    );
    let mut v = prefix.to_vec();
    v.extend_from_slice(body);
    v
}

fn hello(conn_id: u64) -> Vec<u8> {
    lp(format!("HELLO {conn_id:012}").as_bytes())
}

fn encode(mode: Mode, payload: &[u8]) -> Vec<u8> {
    match mode {
        Mode::Raw => payload.to_vec(),
        Mode::WsText => common::ws_encode(1, payload),
        Mode::WsBinary => common::ws_encode(2, payload),
        Mode::Sse => common::sse_encode(payload),
        // No history in this part of the soak: an id mode's frame starts with an empty id and its LF.
        Mode::WsTextId => common::ws_encode(1, &[b"\n", payload].concat()),
        Mode::WsBinaryId => common::ws_encode(2, &[b"\n", payload].concat()),
    }
}

/// Takes one whole frame off the front of `buf`; `Ok(None)` when incomplete, `Err` when the
/// bytes cannot be a frame of this mode (a torn or corrupt stream).
fn take_frame(mode: Mode, buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    match mode {
        Mode::Raw => Ok(take_lp(buf)),
        Mode::WsText | Mode::WsBinary | Mode::WsTextId | Mode::WsBinaryId => {
            let (frames, used) = parse_one_ws(buf)?;
            match frames {
                None => Ok(None),
                Some(payload) => {
                    let payload = if matches!(mode, Mode::WsTextId | Mode::WsBinaryId) {
                        payload
                            .strip_prefix(b"\n")
                            .ok_or("WebSocket id-mode payload without its empty id")?
                            .to_vec()
                    } else {
                        payload
                    };
                    let inner = take_lp(&payload).ok_or("WebSocket payload is not one frame")?;
                    if inner.1 != payload.len() {
                        return Err("WebSocket payload longer than its frame".into());
                    }
                    Ok(Some((inner.0, used)))
                }
            }
        }
        Mode::Sse => {
            let Some(end) = buf.windows(2).position(|w| w == b"\n\n") else {
                if buf.len() > 2000 {
                    return Err("SSE event longer than any sent".into());
                }
                return Ok(None);
            };
            let event = &buf[..end + 2];
            let data = event
                .strip_prefix(b"data: ")
                .and_then(|d| d.strip_suffix(b"\n\n"))
                .ok_or("SSE event is not one data line")?;
            if data.contains(&b'\n') || data.contains(&b'\r') {
                return Err("SSE data split across lines".into());
            }
            let inner = take_lp(data).ok_or("SSE data is not one frame")?;
            if inner.1 != data.len() {
                return Err("SSE data longer than its frame".into());
            }
            Ok(Some((inner.0, end + 2)))
        }
    }
}

fn take_lp(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let len = u32::from_be_bytes(buf.get(..4)?.try_into().unwrap()) as usize;
    let body = buf.get(4..4 + len)?;
    Some((body.to_vec(), 4 + len))
}

fn parse_one_ws(b: &[u8]) -> Result<(Option<Vec<u8>>, usize), String> {
    if b.len() < 2 {
        return Ok((None, 0));
    }
    if b[0] & 0xf0 != 0x80 || b[1] & 0x80 != 0 || b[1] & 0x7f == 127 {
        return Err(format!("bad WebSocket header {:02x} {:02x}", b[0], b[1]));
    }
    let (len, header) = match b[1] & 0x7f {
        126 if b.len() < 4 => return Ok((None, 0)),
        126 => {
            let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
            if len < 126 {
                return Err(format!("non-minimal WebSocket length {len}"));
            }
            (len, 4)
        }
        len => (usize::from(len), 2),
    };
    if b.len() < header + len {
        return Ok((None, 0));
    }
    Ok((Some(b[header..header + len].to_vec()), header + len))
}

// -------------------------------------------------------------------------------------------
// connections
// -------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Pace {
    Fast,
    Slow,
    Stalled,
}

struct Conn {
    id: u64,
    /// fdcast's end, open until the host closes it.
    _server: OwnedFd,
    client: OwnedFd,
    tcp: bool,
    mode: Mode,
    pace: Pace,
    buf: Vec<u8>,
    seen_hello: bool,
    /// The last sequence number seen per publisher, per topic.
    last_seq: HashMap<(usize, usize), u64>,
    topics: Vec<usize>,
    /// Whether the previous owner of this fd number was closed without unsubscribe_fd.
    number_was_closed_sloppily: bool,
}

#[derive(Default)]
struct Figures {
    connections_made: u64,
    frames_parsed: u64,
    bytes_read: u64,
    inherited_bytes: u64,
    inherited_on_proper_reuse: u64,
    resets: u64,
    half_closes: u64,
    vanishes: u64,
    sloppy_closes: u64,
    proper_closes: u64,
    stalls: u64,
    evictions_seen: u64,
    numbers_reused: u64,
    sends: u64,
    discarded_bytes_seen: u64,
}

struct Host {
    reg: Arc<Registry>,
    listener: TcpListener,
    conns: HashMap<RawFd, Conn>,
    next_id: u64,
    /// fd numbers used so far (to count reuse).
    closed_numbers: std::collections::HashSet<RawFd>,
    rng: u64,
    fig: Figures,
    handed: Arc<AtomicU64>,
    /// Live connections whose client stopped reading.
    stalled: usize,
}

impl Host {
    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n
    }

    fn connect(&mut self) {
        self.connect_at(None);
    }

    /// A new connection; with `at`, its server end takes that fd number (whose old file
    /// the dup2 closes).
    fn connect_at(&mut self, at: Option<RawFd>) {
        let tcp = self.rand(2) == 0;
        let (server, client): (OwnedFd, OwnedFd) = if tcp {
            let client = TcpStream::connect(self.listener.local_addr().unwrap()).unwrap();
            let (server, _) = self.listener.accept().unwrap();
            client.set_nonblocking(true).unwrap();
            (server.into(), client.into())
        } else {
            let (s, c) = UnixStream::pair().unwrap();
            c.set_nonblocking(true).unwrap();
            (s.into(), c.into())
        };
        let server = match at {
            Some(number) if number != server.as_raw_fd() => {
                // SAFETY: both fds are ours; dup2 atomically replaces the file at `number`.
                let rc = unsafe { libc::dup2(server.as_raw_fd(), number) };
                assert_eq!(rc, number, "dup2: {}", io::Error::last_os_error());
                drop(server);
                self.fig.numbers_reused += 1;
                // SAFETY: `number` now names the new socket, owned by nobody else.
                unsafe { OwnedFd::from_raw_fd(number) }
            }
            _ => server,
        };
        let sloppy_reuse = at.is_some();
        set_sndbuf(server.as_raw_fd(), 16 * 1024);
        if !tcp {
            // Not on TCP: shrinking an established connection's receive buffer can leave its
            // window shut after the reader drains it, until the sender's zero-window probe
            // (backing off to minutes) notices: bytes then sit in the kernel, not in fdcast.
            set_rcvbuf(client.as_raw_fd(), 16 * 1024);
        }
        let fd = server.as_raw_fd();
        if !sloppy_reuse && self.closed_numbers.contains(&fd) {
            self.fig.numbers_reused += 1;
        }
        self.closed_numbers.insert(fd);
        let mode = Mode::ALL[self.rand(Mode::ALL.len() as u64) as usize];
        let pace = match self.rand(10) {
            0 => Pace::Stalled,
            1 | 2 => Pace::Slow,
            _ => Pace::Fast,
        };
        let id = self.next_id;
        self.next_id += 1;
        // HELLO first: `send` runs the fd-reuse guard, so everything before it in the stream
        // can only be frames written for a previous owner of the number.
        self.reg.send(fd, mode, &hello(id)).expect("hello");
        self.handed.fetch_add(1, Ordering::Relaxed);
        self.fig.sends += 1;
        let mut topics = Vec::new();
        for _ in 0..1 + self.rand(3) {
            let t = self.rand(TOPICS as u64) as usize;
            if !topics.contains(&t) {
                self.reg
                    .subscribe(format!("topic{t}").as_bytes(), fd, mode)
                    .expect("subscribe");
                topics.push(t);
            }
        }
        self.fig.connections_made += 1;
        let conn = Conn {
            id,
            _server: server,
            client,
            tcp,
            mode,
            pace,
            buf: Vec::new(),
            seen_hello: false,
            last_seq: HashMap::new(),
            topics,
            number_was_closed_sloppily: sloppy_reuse,
        };
        self.conns.insert(fd, conn);
    }

    /// Reads what a client has; parses strictly.
    fn read_client(conn: &mut Conn, fig: &mut Figures, max: usize) -> Result<bool, String> {
        let mut chunk = [0u8; 16 * 1024];
        let mut total = 0;
        let mut eof = false;
        while total < max {
            let want = chunk.len().min(max - total);
            match read_once(conn.client.as_raw_fd(), &mut chunk[..want]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    total += n;
                    fig.bytes_read += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    eof = true;
                    break;
                }
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        if !conn.seen_hello {
            let marker = encode(conn.mode, &hello(conn.id));
            match conn.buf.windows(marker.len()).position(|w| w == marker) {
                Some(at) => {
                    if at > 0 {
                        fig.inherited_bytes += at as u64;
                        if !conn.number_was_closed_sloppily {
                            fig.inherited_on_proper_reuse += 1;
                        }
                    }
                    conn.buf.drain(..at + marker.len());
                    conn.seen_hello = true;
                    fig.frames_parsed += 1;
                }
                None => return Ok(eof),
            }
        }
        let mut at = 0;
        while let Some((body, used)) = take_frame(conn.mode, &conn.buf[at..])
            .map_err(|e| format!("conn {} ({:?}): {e}", conn.id, conn.mode))?
        {
            at += used;
            let text = std::str::from_utf8(&body).map_err(|_| "body not ASCII")?;
            let t: usize = text[1..3]
                .parse()
                .map_err(|_| format!("bad body {text:?}"))?;
            let p: usize = text[5..6]
                .parse()
                .map_err(|_| format!("bad body {text:?}"))?;
            let seq: u64 = text[8..18]
                .parse()
                .map_err(|_| format!("bad body {text:?}"))?;
            if body != self::body(t, p, seq) {
                return Err(format!("conn {}: corrupt body {text:?}", conn.id));
            }
            if !conn.topics.contains(&t) {
                return Err(format!(
                    "conn {}: frame of topic {t}, not subscribed",
                    conn.id
                ));
            }
            if let Some(&last) = conn.last_seq.get(&(t, p)) {
                if seq <= last {
                    return Err(format!(
                        "conn {}: topic {t} publisher {p}: {seq} after {last}",
                        conn.id
                    ));
                }
            }
            conn.last_seq.insert((t, p), seq);
            fig.frames_parsed += 1;
        }
        conn.buf.drain(..at);
        // A stalled client reads its whole backlog at once when it resumes; keeping that room
        // would make this process's memory depend on which clients happened to stall, and
        // the RSS check is about fdcast's.
        conn.buf.shrink_to(CLIENT_BUFFER_KEPT);
        if conn.buf.capacity() > 16 * 1024 && conn.buf.len() < 4096 {
            conn.buf.shrink_to(4096);
        }
        Ok(eof)
    }

    /// The host closes a connection: properly (unsubscribe_fd, then close), or not: then a
    /// new connection gets the number at once (dup2, the tightest reuse there is), and the
    /// fd-reuse guard must keep the old subscriptions and bytes away from it.
    fn close(&mut self, fd: RawFd, proper: bool) {
        let conn = self.conns.remove(&fd).expect("known conn");
        if proper {
            self.fig.discarded_bytes_seen += self.reg.pending_bytes(fd).unwrap() as u64;
            self.reg.unsubscribe_fd(fd).unwrap();
            self.fig.proper_closes += 1;
            drop(conn);
        } else {
            self.fig.sloppy_closes += 1;
            let Conn {
                _server, client, ..
            } = conn;
            // The number stays open: dup2 replaces the file behind it.
            let _ = _server.into_raw_fd();
            drop(client);
            self.connect_at(Some(fd));
        }
    }

    fn inject_fault(&mut self) {
        let fds: Vec<RawFd> = self.conns.keys().copied().collect();
        let fd = fds[self.rand(fds.len() as u64) as usize];
        let kind = self.rand(6);
        let conn = self.conns.get_mut(&fd).unwrap();
        match kind {
            0 => {
                // Reset: SO_LINGER 0 and close the client end: RST on TCP.
                if conn.tcp {
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: SO_LINGER takes a struct linger by pointer.
                    unsafe {
                        libc::setsockopt(
                            conn.client.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&linger as *const libc::linger).cast(),
                            size_of::<libc::linger>() as libc::socklen_t,
                        )
                    };
                }
                self.fig.resets += 1;
                self.replace_client_with_nothing(fd);
            }
            1 => {
                self.fig.vanishes += 1;
                self.replace_client_with_nothing(fd);
            }
            2 => {
                // SAFETY: shutdown on an fd we own.
                unsafe { libc::shutdown(conn.client.as_raw_fd(), libc::SHUT_WR) };
                self.fig.half_closes += 1;
                // The host reads EOF and closes its end, properly or not.
                let proper = self.rand(3) != 0;
                self.close(fd, proper);
            }
            3 => {
                // At most a tenth stall at once, so memory reaches its steady level early.
                if self.stalled < CONNECTIONS / 10 && conn.pace != Pace::Stalled {
                    conn.pace = Pace::Stalled;
                    self.fig.stalls += 1;
                }
            }
            4 => conn.pace = Pace::Fast,
            _ => {
                let proper = self.rand(3) != 0;
                self.close(fd, proper);
            }
        }
    }

    /// The client end goes away; the host notices later (its own read fails) and closes.
    fn replace_client_with_nothing(&mut self, fd: RawFd) {
        let conn = self.conns.get_mut(&fd).unwrap();
        let (dead, _) = UnixStream::pair().unwrap();
        // Swapping in a fresh socket closes the real client end now.
        conn.client = OwnedFd::from(dead);
        conn.pace = Pace::Stalled;
        conn.seen_hello = true;
        conn.topics.clear();
    }
}

/// Every live client reads everything (whatever its pace) and dispatch runs until nothing is
/// queued for them, in fdcast or in the kernel, and nothing more arrives: a state in which
/// memory can be compared.
fn settle(host: &mut Host, reg: &Registry) -> Result<(), String> {
    let settle_start = Instant::now();
    let mut quiet_rounds = 0;
    loop {
        // EBUSY while the dispatch thread runs (the warm-up checkpoint): it flushes then.
        match reg.dispatch(Some(Duration::from_millis(5))) {
            Ok(_) => {}
            Err(e) if e.errno() == libc::EBUSY => {}
            Err(e) => panic!("dispatch: {e}"),
        }
        let read_before = host.fig.bytes_read;
        let mut owed = 0;
        let fds: Vec<RawFd> = host.conns.keys().copied().collect();
        for fd in fds {
            let conn = host.conns.get_mut(&fd).unwrap();
            if conn.topics.is_empty() {
                continue;
            }
            Host::read_client(conn, &mut host.fig, usize::MAX)?;
            // Queued in fdcast, or still in the kernel's send queue (TCP).
            let mut in_kernel: libc::c_int = 0;
            // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
            unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut in_kernel) };
            owed += reg.pending_bytes(fd).unwrap() + in_kernel.max(0) as usize;
        }
        // Nothing queued in fdcast, and nothing more arriving (TCP may still hold some in
        // the kernel's send buffer) for a few rounds.
        quiet_rounds = if owed == 0 && host.fig.bytes_read == read_before {
            quiet_rounds + 1
        } else {
            0
        };
        if quiet_rounds == 5 {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(10));
        if settle_start.elapsed() >= Duration::from_secs(30) {
            for (&fd, c) in &host.conns {
                let pending = reg.pending_bytes(fd).unwrap();
                if pending > 0 && !c.topics.is_empty() {
                    let (mut outq, mut inq) = (0 as libc::c_int, 0 as libc::c_int);
                    // SAFETY: TIOCOUTQ (SIOCOUTQ) and FIONREAD write one int.
                    unsafe {
                        libc::ioctl(fd, libc::TIOCOUTQ, &mut outq);
                        libc::ioctl(c.client.as_raw_fd(), libc::FIONREAD, &mut inq);
                    }
                    eprintln!(
                        "stuck: fd {fd} conn {} tcp {} {:?} {:?} sloppy-reuse {} pending \
                         {pending} client buf {}, kernel send queue {outq}, client receive \
                         queue {inq}",
                        c.id,
                        c.tcp,
                        c.mode,
                        c.pace,
                        c.number_was_closed_sloppily,
                        c.buf.len()
                    );
                }
            }
        }
        assert!(
            settle_start.elapsed() < Duration::from_secs(30),
            "{owed} bytes still queued for live clients after 30 s of dispatch"
        );
    }
}

fn soak(duration: Duration) -> String {
    let fds_before = open_fds();
    let heap_before = LIVE_HEAP.load(Ordering::Relaxed);
    let reg = Arc::new(Registry::new().unwrap());
    reg.set_outbox_limit(16 * 1024);
    let evicted = Arc::new(Mutex::new(Vec::new()));
    {
        let evicted = evicted.clone();
        reg.set_evict_callback(Some(Box::new(move |fd, _| {
            evicted.lock().unwrap().push(fd)
        })));
    }
    let handed = Arc::new(AtomicU64::new(0));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut host = Host {
        reg: reg.clone(),
        listener,
        conns: HashMap::new(),
        next_id: 1,
        closed_numbers: Default::default(),
        rng: 0x9e37_79b9_7f4a_7c15,
        fig: Figures::default(),
        handed: handed.clone(),
        stalled: 0,
    };
    for _ in 0..CONNECTIONS {
        host.connect();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for p in 0..PUBLISHERS {
        let (reg, stop, pause, handed) = (reg.clone(), stop.clone(), pause.clone(), handed.clone());
        threads.push(thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if pause.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                for t in 0..TOPICS {
                    let payload = lp(&body(t, p, seq));
                    let matched = reg
                        .publish(format!("topic{t}").as_bytes(), &payload)
                        .expect("publish");
                    handed.fetch_add(matched as u64, Ordering::Relaxed);
                }
                seq += 1;
                thread::sleep(Duration::from_millis(50));
            }
            seq
        }));
    }
    let dispatcher = {
        let (reg, stop) = (reg.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                reg.dispatch(Some(Duration::from_millis(20))).unwrap();
            }
        })
    };

    let start = Instant::now();
    // Memory reaches its steady level (stalled outboxes full, buffers grown) within ~20 s.
    let warm_up = (duration * 3 / 4).min(Duration::from_secs(30));
    let mut rss_warm = None;
    let mut heap_warm = 0;
    let mut queued_warm = 0;
    let mut round = 0u64;
    let mut failure = None;
    while start.elapsed() < duration && failure.is_none() {
        round += 1;
        // Clients read.
        let fds: Vec<RawFd> = host.conns.keys().copied().collect();
        for fd in fds {
            let conn = host.conns.get_mut(&fd).unwrap();
            let max = match conn.pace {
                Pace::Fast => usize::MAX,
                Pace::Slow if round % 10 == 0 => 2048,
                _ => continue,
            };
            if let Err(e) = Host::read_client(conn, &mut host.fig, max) {
                failure = Some(e);
                break;
            }
        }
        // Faults, and the host's reactions.
        host.stalled = host
            .conns
            .values()
            .filter(|c| c.pace == Pace::Stalled && !c.topics.is_empty())
            .count();
        for _ in 0..4 {
            host.inject_fault();
        }
        let evictions: Vec<RawFd> = std::mem::take(&mut *evicted.lock().unwrap());
        for fd in evictions {
            host.fig.evictions_seen += 1;
            if host.conns.contains_key(&fd) {
                host.close(fd, true);
            }
        }
        // Clients whose end is gone get closed by the host after a while.
        if round % 5 == 0 {
            let dead: Vec<RawFd> = host
                .conns
                .iter()
                .filter(|(_, c)| c.topics.is_empty())
                .map(|(&fd, _)| fd)
                .collect();
            for fd in dead {
                let proper = host.rand(3) != 0;
                host.close(fd, proper);
            }
        }
        while host.conns.len() < CONNECTIONS {
            host.connect();
        }
        if rss_warm.is_none() && start.elapsed() >= warm_up {
            // The post-warm-up level, taken like the final one: publishers paused, every
            // live client drained (stalled ones stay stalled afterwards).
            pause.store(true, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(30));
            if let Err(e) = settle(&mut host, &reg) {
                failure = Some(e);
            }
            rss_warm = Some(rss_kib());
            heap_warm = LIVE_HEAP.load(Ordering::Relaxed);
            queued_warm = reg.stats().queued_bytes;
            pause.store(false, Ordering::SeqCst);
        }
        if std::env::var_os("FDCAST_SOAK_TRACE").is_some() && round % 100 == 0 {
            let st = reg.stats();
            eprintln!(
                "soak: {:>5.1} s RSS {} KiB, heap {} KiB, queued {} B, {} fds, {} stalled",
                start.elapsed().as_secs_f64(),
                rss_kib(),
                LIVE_HEAP.load(Ordering::Relaxed) / 1024,
                st.queued_bytes,
                st.fds,
                host.conns
                    .values()
                    .filter(|c| c.pace == Pace::Stalled)
                    .count()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    reg.wake();
    let published: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    dispatcher.join().unwrap();
    if let Some(e) = failure {
        panic!("soak: {e}");
    }

    // Settle: every live client reads everything; dispatch until nothing is queued for them.
    settle(&mut host, &reg).unwrap_or_else(|e| panic!("soak: {e}"));
    // Whatever the live clients have not parsed yet is torn.
    for conn in host.conns.values() {
        if !conn.topics.is_empty() && conn.seen_hello {
            assert!(
                conn.buf.is_empty(),
                "conn {} ({:?}, tcp {}, sloppy reuse {}): {} bytes of a torn frame: {:?}",
                conn.id,
                conn.mode,
                conn.tcp,
                conn.number_was_closed_sloppily,
                conn.buf.len(),
                String::from_utf8_lossy(&conn.buf[..conn.buf.len().min(80)])
            );
        }
    }
    // Outboxes drained, every connection still open.
    let rss_end = rss_kib();
    let heap_end = LIVE_HEAP.load(Ordering::Relaxed);
    // Stalled clients' outboxes are what fdcast was asked to hold, and how many are stalled,
    // and how full, differs between the two points: RSS may grow by as much as they did.
    let queued_growth_kib = reg.stats().queued_bytes.saturating_sub(queued_warm) / 1024;
    let rss_warm = rss_warm.expect("warm-up ended");

    let st = reg.stats();
    let fds: Vec<RawFd> = host.conns.keys().copied().collect();
    for fd in fds {
        host.close(fd, true);
    }
    let after = reg.stats();
    assert_eq!(
        (
            after.subscriptions,
            after.topics,
            after.fds,
            after.queued_bytes
        ),
        (0, 0, 0, 0),
        "fdcast holds something after every fd was closed properly"
    );
    let handed = handed.load(Ordering::Relaxed);
    let f = std::mem::take(&mut host.fig);
    assert!(
        f.frames_parsed <= st.deliveries,
        "clients parsed more frames than were delivered"
    );
    assert!(
        st.deliveries + st.dropped_messages <= handed,
        "deliveries {} + drops {} exceed the {handed} frames handed to fdcast",
        st.deliveries,
        st.dropped_messages
    );
    let discarded = handed - st.deliveries - st.dropped_messages;
    assert_eq!(
        f.inherited_on_proper_reuse, 0,
        "a properly reused fd number inherited frames"
    );
    drop(host);
    drop(reg);
    let fds_after = open_fds();
    let heap_after = LIVE_HEAP.load(Ordering::Relaxed);
    assert!(
        heap_after - heap_before < 256 * 1024,
        "{} bytes of heap still live after teardown (leak)",
        heap_after - heap_before
    );
    assert_eq!(
        fds_after, fds_before,
        "fds leaked: {fds_before} before, {fds_after} after"
    );
    assert!(
        rss_end * 10 <= rss_warm * 11 + queued_growth_kib * 10,
        "RSS {rss_end} KiB at the end, {rss_warm} KiB after warm-up (both settled): over \
         10% growth beyond the {queued_growth_kib} KiB more queued for stalled clients (live \
         heap {} KiB -> {} KiB)",
        heap_warm / 1024,
        heap_end / 1024
    );
    let rss_after_teardown = rss_kib();
    assert!(
        rss_after_teardown * 10 <= rss_warm * 11,
        "RSS {rss_after_teardown} KiB after teardown, {rss_warm} KiB after warm-up"
    );
    let faults = f.resets + f.half_closes + f.vanishes + f.sloppy_closes + f.stalls;
    assert!(f.resets > 0 && f.vanishes > 0 && f.half_closes > 0 && f.sloppy_closes > 0);
    assert!(
        f.numbers_reused > 0 && f.evictions_seen > 0,
        "no fd reuse or eviction happened"
    );
    format!(
        "soak: {} s, {CONNECTIONS} connections live ({} made, {} sockets), {} publishes \
         ({handed} frames handed with {} sends, {} delivered, {} dropped, {discarded} discarded with their \
         fd), {} frames parsed by clients, {faults} faults injected ({} resets, {} half-closes, \
         {} vanished, {} closed without unsubscribe_fd, {} stalls), {} evictions, {} fd numbers \
         reused, {} bytes inherited through sloppy reuse, {} queued bytes discarded by \
         unsubscribe_fd, torn frames 0, fd leaks {}, heap leak {} B, RSS {rss_warm} KiB after \
         warm-up -> {rss_end} KiB at the end (both settled) -> {rss_after_teardown} KiB \
         after teardown",
        duration.as_secs(),
        f.connections_made,
        2 * f.connections_made,
        published * TOPICS as u64,
        f.sends,
        st.deliveries,
        st.dropped_messages,
        f.frames_parsed,
        f.resets,
        f.half_closes,
        f.vanishes,
        f.sloppy_closes,
        f.stalls,
        st.evicted_fds,
        f.numbers_reused,
        f.inherited_bytes,
        f.discarded_bytes_seen,
        fds_after - fds_before,
        heap_after - heap_before,
    )
}

// -------------------------------------------------------------------------------------------
// history: stalled readers catch up or fall off the history, resumers, gaps accounted
// -------------------------------------------------------------------------------------------

const HISTORY_CONNECTIONS: usize = 100;
const HISTORY_TOPICS: usize = 6;
const HISTORY_PUBLISHERS: usize = 4;
/// Messages each topic keeps: a reader stalled for a quarter of it catches up, one stalled
/// for twice it falls off.
const KEPT: u64 = 600;
const HISTORY_OUTBOX_LIMIT: usize = 16 * 1024;
/// The longest framed message: a body, its SSE or WebSocket framing and the id.
const MAX_FRAME: u64 = 1400;

/// What a stalled reader waits for before it reads again: its topics' publish counts.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Stall {
    Reading,
    /// Until this many more messages were published to each of its topics.
    Short(u64),
    Long(u64),
}

/// One topic's order as a reader sees it.
#[derive(Clone)]
struct TopicOrder {
    epoch: Option<u64>,
    /// The offset it must get next (unless across a gap): 1 for a reader subscribed before
    /// the first publish.
    next: u64,
    /// A resume that did not recover may skip what left the history; no gap is reported.
    unrecovered_resume: bool,
    /// Subscribed after publishing began without an id to resume from: where it starts is
    /// not known, so a gap before its first message cannot be told from where it started.
    start_unknown: bool,
    /// The jumps it saw, each the count of a gap that must have been reported.
    jumps: Vec<u64>,
    /// The jump to its first message after an unrecovered resume or an unknown start: what
    /// the history no longer held when it subscribed (not a gap), and the gaps reported
    /// while its replay waited behind other topics' (they are part of this jump).
    skipped_at_start: Option<u64>,
    last_seq: HashMap<usize, u64>,
}

impl TopicOrder {
    fn from_start(start_unknown: bool) -> TopicOrder {
        TopicOrder {
            epoch: None,
            next: 1,
            unrecovered_resume: false,
            start_unknown,
            jumps: Vec::new(),
            skipped_at_start: None,
            last_seq: HashMap::new(),
        }
    }
}

struct HistoryConn {
    _server: OwnedFd,
    client: OwnedFd,
    mode: Mode,
    buf: Vec<u8>,
    topics: HashMap<usize, TopicOrder>,
    stall: Stall,
    /// Each topic's publish count when the stall began.
    stalled_at: HashMap<usize, u64>,
}

/// Takes every whole message off `buf`: (id, body). Err on a torn or malformed frame.
fn take_id_messages(
    mode: Mode,
    buf: &mut Vec<u8>,
) -> Result<Vec<(fdcast::EventId, Vec<u8>)>, String> {
    let mut messages = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let (id, body, used) = match mode {
            Mode::Sse => {
                let Some(end) = rest.windows(2).position(|w| w == b"\n\n") else {
                    if rest.len() > 2000 {
                        return Err("SSE event longer than any sent".into());
                    }
                    break;
                };
                let event = std::str::from_utf8(&rest[..end]).map_err(|_| "SSE not UTF-8")?;
                let (id, data) = event
                    .strip_prefix("id: ")
                    .and_then(|rest| rest.split_once("\ndata: "))
                    .ok_or_else(|| format!("SSE event without its id: {event:?}"))?;
                if data.contains('\n') {
                    return Err("SSE data split across lines".into());
                }
                (id.as_bytes().to_vec(), data.as_bytes().to_vec(), end + 2)
            }
            _ => {
                let (payload, used) = parse_one_ws(rest)?;
                let Some(payload) = payload else { break };
                let newline = payload
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or("WebSocket id-mode payload without its id")?;
                (
                    payload[..newline].to_vec(),
                    payload[newline + 1..].to_vec(),
                    used,
                )
            }
        };
        let id = fdcast::EventId::parse(&id).ok_or_else(|| format!("bad id {id:?}"))?;
        messages.push((id, body));
        at += used;
    }
    buf.drain(..at);
    Ok(messages)
}

/// The state every history reader shares: how many messages each topic got so far, and
/// every gap the callback was told of.
struct HistoryShared {
    published: Vec<AtomicU64>,
    gaps: Mutex<Vec<(RawFd, usize, u64)>>,
}

impl HistoryConn {
    /// Reads what the kernel holds and checks it: every message once, in id order, except
    /// across jumps (recorded, to be matched with reported gaps).
    fn read(&mut self) -> Result<(), String> {
        let (bytes, eof) = common::read_now(self.client.as_raw_fd());
        if eof {
            return Err("EOF on a history reader".into());
        }
        self.buf.extend_from_slice(&bytes);
        for (id, body) in take_id_messages(self.mode, &mut self.buf)? {
            let text = std::str::from_utf8(&body).map_err(|_| "body not ASCII")?;
            let field = |range: std::ops::Range<usize>| {
                text.get(range)
                    .and_then(|field| field.parse::<u64>().ok())
                    .ok_or_else(|| format!("bad body {text:?}"))
            };
            let (t, p, seq) = (field(1..3)? as usize, field(5..6)? as usize, field(8..18)?);
            if body != self::body(t, p, seq) {
                return Err(format!("corrupt body {text:?}"));
            }
            let order = self
                .topics
                .get_mut(&t)
                .ok_or_else(|| format!("a message of topic {t}, not subscribed"))?;
            if order.epoch.is_some_and(|epoch| epoch != id.epoch) {
                return Err(format!("topic {t}: epoch changed to {}", id.epoch));
            }
            if id.offset != order.next {
                if id.offset < order.next {
                    return Err(format!(
                        "topic {t}: {} after {} (duplicate or out of order)",
                        id.offset,
                        order.next - 1
                    ));
                }
                let unknown_start = order.epoch.is_none() && order.start_unknown;
                if order.unrecovered_resume || unknown_start {
                    order.skipped_at_start = Some(id.offset - order.next);
                } else {
                    order.jumps.push(id.offset - order.next);
                }
            }
            if order.last_seq.get(&p).is_some_and(|&last| seq <= last) {
                return Err(format!("topic {t} publisher {p}: {seq} not after the last"));
            }
            order.last_seq.insert(p, seq);
            order.epoch = Some(id.epoch);
            order.next = id.offset + 1;
            order.unrecovered_resume = false;
        }
        Ok(())
    }

    /// Whether a stalled reader has waited long enough.
    fn stall_over(&self, shared: &HistoryShared) -> bool {
        let wait = match self.stall {
            Stall::Reading => return true,
            Stall::Short(wait) | Stall::Long(wait) => wait,
        };
        self.stalled_at
            .iter()
            .all(|(&t, &at)| shared.published[t].load(Ordering::Relaxed) >= at + wait)
    }
}

struct HistoryFigures {
    short_stalls: u64,
    /// Short stalls still behind on the history when they ended: they catch up from it.
    short_stalls_caught_up: u64,
    long_stalls: u64,
    resumes: u64,
    unrecovered_resumes: u64,
    /// The most bytes queued for all readers at once (the sum of their fd counters).
    max_queued: u64,
}

/// Connects a reader to `topics`: resuming from `resume_from` (each topic's order so far)
/// or plainly subscribing.
/// `epochs`: each topic's epoch, as far as any reader saw it.
fn history_connect(
    reg: &Registry,
    mode: Mode,
    topics: &[usize],
    resume_from: Option<HashMap<usize, TopicOrder>>,
    epochs: &HashMap<usize, u64>,
    figures: &mut HistoryFigures,
) -> HistoryConn {
    let (server, client) = UnixStream::pair().unwrap();
    client.set_nonblocking(true).unwrap();
    common::make_slow(server.as_raw_fd(), client.as_raw_fd());
    let fd = server.as_raw_fd();
    let mut orders = HashMap::new();
    for &t in topics {
        let topic = format!("h{t}");
        let mut order = TopicOrder::from_start(false);
        let from = resume_from.as_ref().and_then(|from| from.get(&t));
        // One that never got a message of the topic resumes from where it started.
        let epoch = from.and_then(|from| from.epoch.or(epochs.get(&t).copied()));
        match (from, epoch) {
            (Some(from), Some(epoch)) if from.epoch.is_some() || !from.start_unknown => {
                order = from.clone();
                order.jumps.clear();
                order.skipped_at_start = None;
                let last = fdcast::EventId {
                    epoch,
                    offset: from.next - 1,
                };
                let (_, recovered) = reg
                    .subscribe_since(topic.as_bytes(), fd, mode, last)
                    .expect("subscribe_since");
                figures.resumes += 1;
                if !recovered {
                    figures.unrecovered_resumes += 1;
                    order.unrecovered_resume = true;
                }
            }
            (from, _) => {
                order.start_unknown = from.is_some();
                reg.subscribe(topic.as_bytes(), fd, mode)
                    .expect("subscribe");
            }
        }
        orders.insert(t, order);
    }
    HistoryConn {
        _server: server.into(),
        client: client.into(),
        mode,
        buf: Vec::new(),
        topics: orders,
        stall: Stall::Reading,
        stalled_at: HashMap::new(),
    }
}

/// Checks a reader's jumps against the gaps reported for its fd: equal when it read to the
/// end (`whole`), a prefix when it was closed early. Returns the gaps reported for it.
fn match_gaps(fd: RawFd, conn: &HistoryConn, gaps: &[(RawFd, usize, u64)], whole: bool) -> u64 {
    let mut reported_total = 0;
    for (&t, order) in &conn.topics {
        let reported: Vec<u64> = gaps
            .iter()
            .filter(|&&(gap_fd, topic, _)| gap_fd == fd && topic == t)
            .map(|&(_, _, lost)| lost)
            .collect();
        reported_total += reported.iter().sum::<u64>();
        // Gaps reported before its first message belong to the jump to it.
        let before_first = order.skipped_at_start.unwrap_or(0);
        let matches = (0..=reported.len()).any(|first| {
            let (before, after) = reported.split_at(first);
            before.iter().sum::<u64>() <= before_first
                && if whole {
                    after == order.jumps
                } else {
                    after.starts_with(&order.jumps)
                }
        });
        assert!(
            matches,
            "fd {fd} topic {t}: jumps {:?} (and {before_first} at the start) vs gaps reported \
             {reported:?}",
            order.jumps
        );
    }
    reported_total
}

/// History on, with every fd number used once (closed fds stay open, unsubscribed, until
/// the end), so that each gap the callback reports belongs to one reader.
fn history_soak(duration: Duration) -> String {
    const ID_MODES: [Mode; 3] = [Mode::Sse, Mode::WsTextId, Mode::WsBinaryId];
    let fds_before = open_fds();
    let heap_before = LIVE_HEAP.load(Ordering::Relaxed);
    let reg = Arc::new(Registry::new().unwrap());
    reg.set_outbox_limit(HISTORY_OUTBOX_LIMIT);
    reg.set_history(fdcast::HistoryLimits {
        max_messages: KEPT as usize,
        ..Default::default()
    });
    let shared = Arc::new(HistoryShared {
        published: (0..HISTORY_TOPICS).map(|_| AtomicU64::new(0)).collect(),
        gaps: Mutex::new(Vec::new()),
    });
    {
        let shared = shared.clone();
        reg.set_gap_callback(Some(Box::new(move |fd, topic: &[u8], lost| {
            let t = std::str::from_utf8(&topic[1..]).unwrap().parse().unwrap();
            shared.gaps.lock().unwrap().push((fd, t, lost));
        })));
    }
    let mut figures = HistoryFigures {
        short_stalls: 0,
        short_stalls_caught_up: 0,
        long_stalls: 0,
        resumes: 0,
        unrecovered_resumes: 0,
        max_queued: 0,
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut conns: HashMap<RawFd, HistoryConn> = HashMap::new();
    for _ in 0..HISTORY_CONNECTIONS {
        let mode = ID_MODES[rand(3) as usize];
        let mut topics: Vec<usize> = (0..1 + rand(3))
            .map(|_| rand(HISTORY_TOPICS as u64) as usize)
            .collect();
        topics.sort();
        topics.dedup();
        let conn = history_connect(&reg, mode, &topics, None, &HashMap::new(), &mut figures);
        conns.insert(conn._server.as_raw_fd(), conn);
    }
    // Closed readers: their fds (unsubscribed, still open) and what they saw.
    let mut closed: Vec<(RawFd, HistoryConn)> = Vec::new();

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for p in 0..HISTORY_PUBLISHERS {
        let (reg, stop, shared) = (reg.clone(), stop.clone(), shared.clone());
        threads.push(thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for t in 0..HISTORY_TOPICS {
                    reg.publish(format!("h{t}").as_bytes(), &body(t, p, seq))
                        .expect("publish");
                    shared.published[t].fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    let dispatcher = {
        let (reg, stop) = (reg.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                reg.dispatch(Some(Duration::from_millis(20))).unwrap();
            }
        })
    };
    let frame_bound = HISTORY_OUTBOX_LIMIT as u64 + MAX_FRAME;
    let start = Instant::now();
    let mut failure = None;
    let mut round = 0u64;
    while start.elapsed() < duration && failure.is_none() {
        round += 1;
        let fds: Vec<RawFd> = conns.keys().copied().collect();
        let mut queued = 0;
        for &fd in &fds {
            let conn = conns.get_mut(&fd).unwrap();
            // Each fd's own count: the registry's gauge may run ahead of it while a dispatch
            // pass writes refill after refill (it subtracts what was written at the end).
            let stats = reg.fd_stats(fd).unwrap();
            queued += stats.queued_bytes;
            if stats.queued_bytes > frame_bound {
                failure = Some(format!("fd {fd}: {} bytes queued", stats.queued_bytes));
            }
            if conn.stall != Stall::Reading {
                if !conn.stall_over(&shared) {
                    continue;
                }
                if matches!(conn.stall, Stall::Short(_)) && stats.catching_up > 0 {
                    figures.short_stalls_caught_up += 1;
                }
                conn.stall = Stall::Reading;
            }
            if let Err(e) = conn.read() {
                failure = Some(format!("fd {fd} ({:?}): {e}", conn.mode));
                break;
            }
        }
        figures.max_queued = figures.max_queued.max(queued);
        // A few readers stop, for a quarter of the history or for twice it.
        for _ in 0..2 {
            let fd = fds[rand(fds.len() as u64) as usize];
            let conn = conns.get_mut(&fd).unwrap();
            if conn.stall != Stall::Reading {
                continue;
            }
            conn.stall = if rand(4) == 0 {
                figures.long_stalls += 1;
                Stall::Long(2 * KEPT)
            } else {
                figures.short_stalls += 1;
                Stall::Short(KEPT / 4)
            };
            conn.stalled_at = conn
                .topics
                .keys()
                .map(|&t| (t, shared.published[t].load(Ordering::Relaxed)))
                .collect();
        }
        // One reader reconnects now and then, resuming from the ids it read.
        if round % 4 == 0 {
            let fd = fds[rand(fds.len() as u64) as usize];
            if conns[&fd].stall == Stall::Reading {
                let mut old = conns.remove(&fd).unwrap();
                if let Err(e) = old.read() {
                    failure = Some(format!("fd {fd}: {e}"));
                }
                reg.unsubscribe_fd(fd).unwrap();
                let topics: Vec<usize> = old.topics.keys().copied().collect();
                let epochs: HashMap<usize, u64> = conns
                    .values()
                    .chain([&old])
                    .flat_map(|conn| &conn.topics)
                    .filter_map(|(&t, order)| Some((t, order.epoch?)))
                    .collect();
                let conn = history_connect(
                    &reg,
                    old.mode,
                    &topics,
                    Some(old.topics.clone()),
                    &epochs,
                    &mut figures,
                );
                conns.insert(conn._server.as_raw_fd(), conn);
                closed.push((fd, old));
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    reg.wake();
    for thread in threads {
        thread.join().unwrap();
    }
    dispatcher.join().unwrap();
    if let Some(e) = failure {
        panic!("history soak: {e}");
    }

    // Every reader reads again, until nothing is queued or owed to anyone.
    let settle_start = Instant::now();
    loop {
        reg.dispatch(Some(Duration::from_millis(5))).unwrap();
        let mut owed = false;
        for (&fd, conn) in conns.iter_mut() {
            conn.stall = Stall::Reading;
            conn.read()
                .unwrap_or_else(|e| panic!("history soak: fd {fd}: {e}"));
            let stats = reg.fd_stats(fd).unwrap();
            owed |= stats.catching_up > 0 || stats.queued_bytes > 0;
        }
        if !owed {
            break;
        }
        assert!(
            settle_start.elapsed() < Duration::from_secs(30),
            "history readers still behind after 30 s"
        );
    }
    for (&fd, conn) in conns.iter_mut() {
        let (rest, _) = common::read_available(
            conn.client.as_raw_fd(),
            Duration::from_millis(20),
            Duration::from_secs(5),
        );
        conn.buf.extend_from_slice(&rest);
        conn.read()
            .unwrap_or_else(|e| panic!("history soak: fd {fd}: {e}"));
        assert!(conn.buf.is_empty(), "fd {fd}: a torn frame at the end");
    }

    // Every jump a reader saw is a gap reported for it, with the same count, in order.
    let gaps = std::mem::take(&mut *shared.gaps.lock().unwrap());
    let mut total_matched = 0;
    for (&fd, conn) in &conns {
        let reported = match_gaps(fd, conn, &gaps, true);
        let stats = reg.fd_stats(fd).unwrap();
        assert_eq!(
            stats.lost_to_gaps, reported,
            "fd {fd}: lost_to_gaps vs gaps reported"
        );
        assert_eq!(
            stats.dropped, 0,
            "fd {fd}: history readers fall behind, never drop"
        );
        total_matched += reported;
    }
    for (fd, conn) in &closed {
        total_matched += match_gaps(*fd, conn, &gaps, false);
    }
    let lost: u64 = gaps.iter().map(|&(_, _, lost)| lost).sum();
    let st = reg.stats();
    assert_eq!(
        total_matched, lost,
        "a gap reported for an fd no reader had"
    );
    assert_eq!(
        st.lost_to_gaps, lost,
        "registry lost_to_gaps vs gaps reported"
    );
    assert_eq!(st.dropped_messages, 0);
    assert!(
        lost > 0 && figures.long_stalls > 0,
        "no reader fell off the history"
    );
    assert!(
        figures.short_stalls_caught_up > 0,
        "no stalled reader caught up from the history"
    );
    assert!(figures.resumes > 0);

    let published: u64 = shared
        .published
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .sum();
    for (fd, _) in conns.iter() {
        reg.unsubscribe_fd(*fd).unwrap();
    }
    let after = reg.stats();
    assert_eq!(
        (after.subscriptions, after.fds, after.queued_bytes),
        (0, 0, 0),
        "fdcast holds something after every history reader left"
    );
    let gap_count = gaps.len();
    drop((conns, closed, gaps));
    reg.set_gap_callback(None);
    drop(reg);
    drop(shared);
    let heap_after = LIVE_HEAP.load(Ordering::Relaxed);
    assert!(
        heap_after - heap_before < 256 * 1024,
        "{} bytes of heap still live after the history soak (leak)",
        heap_after - heap_before
    );
    assert_eq!(open_fds(), fds_before, "fds leaked by the history soak");
    format!(
        "history soak: {} s, {HISTORY_CONNECTIONS} readers on {HISTORY_TOPICS} topics \
         keeping {KEPT} messages, {published} publishes from {HISTORY_PUBLISHERS} threads, \
         {} short stalls ({} caught up from the history), {} long stalls, {gap_count} gaps \
         losing {lost} messages (each matched by its reader), {} resumes ({} not recovered), \
         at most {} bytes queued (per fd at most the outbox limit and a frame)",
        duration.as_secs(),
        figures.short_stalls,
        figures.short_stalls_caught_up,
        figures.long_stalls,
        figures.resumes,
        figures.unrecovered_resumes,
        figures.max_queued,
    )
}
