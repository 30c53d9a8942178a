//! Shared helpers for the integration tests: fd pairs, bounded reads, frame parsers and a
//! watchdog so that a deadlock fails a test instead of hanging it.
#![allow(dead_code)]

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fdcast::Registry;

// ---------------------------------------------------------------------------------------------
// fd pairs
// ---------------------------------------------------------------------------------------------

/// A connected pair of blocking Unix stream sockets.
pub fn socketpair() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("socketpair")
}

/// A connected pair of non-blocking Unix stream sockets.
pub fn socketpair_nonblocking() -> (UnixStream, UnixStream) {
    let (a, b) = socketpair();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// A pipe: (read end, write end), both close-on-exec, blocking.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A connected TCP loopback pair: (accepted server side, client side).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    server.set_nodelay(true).unwrap();
    client.set_nodelay(true).unwrap();
    (server, client)
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: libc::c_int) {
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &val as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// Makes a socket's send buffer small so a non-reading peer fills it quickly.
pub fn set_sndbuf(fd: RawFd, bytes: i32) {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes);
}

/// Makes a socket's receive buffer small so a non-reading peer fills it quickly.
pub fn set_rcvbuf(fd: RawFd, bytes: i32) {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
}

/// Small buffers on both ends of a socket pair (`w` is the end fdcast writes to).
pub fn make_slow(w: RawFd, r: RawFd) {
    set_sndbuf(w, 4096);
    set_rcvbuf(r, 4096);
}

/// Shrinks a pipe's capacity (to one page at least).
pub fn set_pipe_size(fd: RawFd, bytes: i32) {
    let rc = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, bytes) };
    assert!(rc > 0, "F_SETPIPE_SZ: {}", io::Error::last_os_error());
}

pub fn is_nonblocking(fd: RawFd) -> bool {
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(fl >= 0);
    fl & libc::O_NONBLOCK != 0
}

/// True when `fd` is still an open descriptor.
pub fn fd_is_open(fd: RawFd) -> bool {
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

// ---------------------------------------------------------------------------------------------
// bounded reads
// ---------------------------------------------------------------------------------------------

/// poll(2) for readability (or hang-up / error) with a timeout in milliseconds.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        assert!(rc >= 0, "poll: {}", io::Error::last_os_error());
        return rc > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    }
}

/// One read(2). `Ok(0)` is EOF.
pub fn read_once(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads what is available without blocking. Returns (bytes, saw_eof).
pub fn read_now(fd: RawFd) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while poll_readable(fd, 0) {
        match read_once(fd, &mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return (out, true),
            Err(e) => panic!("read: {e}"),
        }
    }
    (out, false)
}

/// Reads until nothing arrives for `idle`, EOF, or `max` elapsed. Returns (bytes, saw_eof).
pub fn read_available(fd: RawFd, idle: Duration, max: Duration) -> (Vec<u8>, bool) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while start.elapsed() < max {
        if !poll_readable(fd, idle.as_millis() as i32) {
            break;
        }
        match read_once(fd, &mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return (out, true),
            Err(e) => panic!("read: {e}"),
        }
    }
    (out, false)
}

/// Reads whatever arrives within a short quiet period; used to assert "nothing arrived".
pub fn read_quiet(fd: RawFd) -> Vec<u8> {
    read_available(fd, Duration::from_millis(100), Duration::from_secs(2)).0
}

/// Reads exactly `n` bytes or panics after `timeout`.
pub fn read_exact_timeout(fd: RawFd, n: usize, timeout: Duration) -> Vec<u8> {
    let start = Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; 64 * 1024];
    while out.len() < n {
        let left = timeout.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "timed out: read {} of {} bytes",
            out.len(),
            n
        );
        if !poll_readable(fd, left.as_millis().clamp(1, 1000) as i32) {
            continue;
        }
        let want = (n - out.len()).min(buf.len());
        match read_once(fd, &mut buf[..want]) {
            Ok(0) => panic!("EOF after {} of {} bytes", out.len(), n),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

/// Reads until EOF or panics after `timeout`.
pub fn read_to_eof(fd: RawFd, timeout: Duration) -> Vec<u8> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "no EOF within {timeout:?} ({} bytes read)",
            out.len()
        );
        if !poll_readable(fd, left.as_millis().clamp(1, 1000) as i32) {
            continue;
        }
        match read_once(fd, &mut buf) {
            Ok(0) => return out,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return out,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Reads from `peer` while driving `reg.dispatch` until nothing is queued for `sub_fd` any more
/// and the kernel buffer is drained. Panics after `timeout`.
pub fn drain_with_dispatch(
    reg: &Registry,
    sub_fd: RawFd,
    peer: RawFd,
    timeout: Duration,
) -> Vec<u8> {
    let start = Instant::now();
    let mut out = Vec::new();
    loop {
        let (bytes, eof) = read_now(peer);
        out.extend_from_slice(&bytes);
        assert!(!eof, "unexpected EOF after {} bytes", out.len());
        let pending = reg.pending_bytes(sub_fd).expect("pending_bytes");
        if pending == 0 {
            let (rest, eof) = read_available(peer, Duration::from_millis(150), timeout);
            out.extend_from_slice(&rest);
            assert!(!eof, "unexpected EOF after {} bytes", out.len());
            return out;
        }
        assert!(
            start.elapsed() < timeout,
            "still {pending} bytes pending after {timeout:?} ({} read)",
            out.len()
        );
        reg.dispatch(Some(Duration::from_millis(10)))
            .expect("dispatch");
    }
}

/// Drives dispatch until nothing is queued for `fd`, without reading (another thread reads).
pub fn dispatch_until_flushed(reg: &Registry, fd: RawFd, timeout: Duration) {
    let start = Instant::now();
    loop {
        let pending = reg.pending_bytes(fd).expect("pending_bytes");
        if pending == 0 {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "still {pending} bytes pending after {timeout:?}"
        );
        reg.dispatch(Some(Duration::from_millis(10)))
            .expect("dispatch");
    }
}

// ---------------------------------------------------------------------------------------------
// frame encoders (expected bytes) and parsers
// ---------------------------------------------------------------------------------------------

/// An RFC 6455 server frame: FIN, given opcode, unmasked, minimal length encoding.
pub fn ws_encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        v.push(n as u8);
    } else if n <= 0xffff {
        v.push(126);
        v.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        v.push(127);
        v.extend_from_slice(&(n as u64).to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Parses whole server frames from `buf`; returns the frames and how many bytes they used.
/// Panics on anything a server must not send: no FIN, RSV bits, a mask, a non-minimal length.
pub fn parse_ws_frames(buf: &[u8]) -> (Vec<WsFrame>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let b = &buf[pos..];
        if b.len() < 2 {
            break;
        }
        assert_eq!(b[0] & 0x80, 0x80, "frame at {pos}: FIN not set");
        assert_eq!(b[0] & 0x70, 0, "frame at {pos}: RSV bits set");
        assert_eq!(b[1] & 0x80, 0, "frame at {pos}: server frame is masked");
        let (len, hdr) = match b[1] & 0x7f {
            126 => {
                if b.len() < 4 {
                    break;
                }
                let l = u16::from_be_bytes([b[2], b[3]]) as usize;
                assert!(l >= 126, "frame at {pos}: non-minimal 16-bit length {l}");
                (l, 4)
            }
            127 => {
                if b.len() < 10 {
                    break;
                }
                let l = u64::from_be_bytes(b[2..10].try_into().unwrap());
                assert!(l > 0xffff, "frame at {pos}: non-minimal 64-bit length {l}");
                assert!(l >> 63 == 0, "frame at {pos}: 64-bit length has MSB set");
                (l as usize, 10)
            }
            l => (l as usize, 2),
        };
        if b.len() < hdr + len {
            break;
        }
        frames.push(WsFrame {
            opcode: b[0] & 0x0f,
            payload: b[hdr..hdr + len].to_vec(),
        });
        pos += hdr + len;
    }
    (frames, pos)
}

/// Parses all of `buf` as whole frames; panics when bytes are left over (a torn frame).
pub fn parse_ws_all(buf: &[u8]) -> Vec<WsFrame> {
    let (frames, used) = parse_ws_frames(buf);
    assert_eq!(
        used,
        buf.len(),
        "{} trailing bytes after {} whole WebSocket frames (torn frame)",
        buf.len() - used,
        frames.len()
    );
    frames
}

/// Expected SSE bytes for `payload`, as README's Modes describe them: one `data: ` line per payload line, then a blank line.
pub fn sse_encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut line_start = 0;
    while i < payload.len() {
        match payload[i] {
            b'\r' => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&payload[line_start..i]);
                out.push(b'\n');
                if payload.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                line_start = i + 1;
            }
            b'\n' => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&payload[line_start..i]);
                out.push(b'\n');
                line_start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&payload[line_start..]);
    out.extend_from_slice(b"\n\n");
    out
}

/// What an EventSource delivers as `event.data` for `payload`: CRLF and CR become LF.
pub fn sse_expected_data(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let mut i = 0;
    while i < payload.len() {
        if payload[i] == b'\r' {
            out.push(b'\n');
            if payload.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
        } else {
            out.push(payload[i]);
        }
        i += 1;
    }
    out
}

/// An incremental text/event-stream parser following the HTML EventSource processing model
/// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    after_cr: bool,
    started: bool,
    /// `data` of every dispatched event, in order.
    pub events: Vec<Vec<u8>>,
    /// Fields other than `data` seen (fdcast should send none).
    pub other_fields: Vec<Vec<u8>>,
}

impl SseParser {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        if !self.started && !bytes.is_empty() {
            self.started = true;
            if bytes.starts_with("\u{feff}".as_bytes()) {
                bytes = &bytes[3..];
            }
        }
        for &c in bytes {
            if self.after_cr {
                self.after_cr = false;
                if c == b'\n' {
                    continue;
                }
            }
            match c {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line();
                }
                b'\n' => self.end_line(),
                _ => self.line.push(c),
            }
        }
    }

    /// True when no partial line is buffered (every byte fed so far ended a line).
    pub fn at_line_start(&self) -> bool {
        self.line.is_empty()
    }

    /// True when nothing of an undispatched event is buffered.
    pub fn idle(&self) -> bool {
        self.line.is_empty() && self.data.is_empty()
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.data.is_empty() {
                return;
            }
            let mut d = std::mem::take(&mut self.data);
            if d.last() == Some(&b'\n') {
                d.pop();
            }
            self.events.push(d);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(i) => {
                let mut v = &line[i + 1..];
                if v.first() == Some(&b' ') {
                    v = &v[1..];
                }
                (&line[..i], v)
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            self.data.extend_from_slice(value);
            self.data.push(b'\n');
        } else {
            self.other_fields.push(field.to_vec());
        }
    }
}

/// Parses a whole SSE stream; panics when it ends inside an event.
pub fn parse_sse_all(buf: &[u8]) -> Vec<Vec<u8>> {
    let mut p = SseParser::default();
    p.feed(buf);
    assert!(
        p.idle(),
        "SSE stream ends inside an event after {} events (torn frame)",
        p.events.len()
    );
    assert!(p.other_fields.is_empty(), "unexpected SSE fields");
    p.events
}

/// RAW test frames: a 4-byte big-endian length, then the body.
pub fn lp_encode(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// Parses length-prefixed frames; returns the frames and how many bytes they used.
pub fn parse_lp_frames(buf: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= 4 {
        let len = u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
        if buf.len() - pos - 4 < len {
            break;
        }
        out.push(buf[pos + 4..pos + 4 + len].to_vec());
        pos += 4 + len;
    }
    (out, pos)
}

/// Parses all of `buf` as length-prefixed frames; panics on a torn frame.
pub fn parse_lp_all(buf: &[u8]) -> Vec<Vec<u8>> {
    let (frames, used) = parse_lp_frames(buf);
    assert_eq!(
        used,
        buf.len(),
        "{} trailing bytes after {} whole length-prefixed frames (torn frame)",
        buf.len() - used,
        frames.len()
    );
    frames
}

/// Valid UTF-8 text of exactly `len` bytes, with multi-byte characters in it.
pub fn utf8_text(len: usize) -> String {
    let pieces = ["héllo ", "wörld ", "✓ ", "😀 ", "abc "];
    let mut s = String::with_capacity(len);
    let mut i = 0;
    loop {
        let p = pieces[i % pieces.len()];
        if s.len() + p.len() > len {
            break;
        }
        s.push_str(p);
        i += 1;
    }
    while s.len() < len {
        s.push('x');
    }
    assert_eq!(s.len(), len);
    s
}

/// Deterministic pseudo-random bytes.
pub fn pattern_bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// watchdog
// ---------------------------------------------------------------------------------------------

/// Runs `f` on its own thread and fails the test if it does not finish within `secs`
/// (a deadlock then fails instead of hanging). A panic in `f` is re-raised here.
pub fn with_watchdog<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    let (tx, rx) = mpsc::channel::<()>();
    let h = thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(()) => unreachable!(),
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: test body did not finish within {secs} s (deadlock or hang)")
        }
    }
}

/// Joins `h`, failing if it does not finish within `timeout` (it must signal `done`).
pub fn join_within<T>(h: thread::JoinHandle<T>, done: &mpsc::Receiver<()>, timeout: Duration) -> T {
    match done.recv_timeout(timeout) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("thread did not finish within {timeout:?} (deadlock or hang)")
        }
    }
}

/// Raw fd of anything with one.
pub fn rfd<T: AsRawFd>(t: &T) -> RawFd {
    t.as_raw_fd()
}
