//! The exported C functions, driven by arbitrary bytes read as a program of operations, the
//! way a careless C host would call them: NULL handles and NULL pointers with zero, small and
//! huge lengths (never a non-NULL pointer with a length it does not have: that is the
//! caller's undefined behaviour), topics of 0, 4095, 4096 and 4097 bytes, modes, policies
//! and opcodes outside their enums, negative, closed and out-of-range fds, fdcast's own epoll
//! fd, a pipe, /dev/null, peers that stop reading or go away, reentrant callbacks.
//!
//! Every call's return value must be one the header documents for those arguments (exactly, where
//! the arguments decide it), `fdcast_last_error()` is never NULL and never reports an
//! internal error, the counters stay consistent, and nothing crashes, leaks (LeakSanitizer at
//! exit) or panics (libfuzzer-sys aborts on any panic, even one the boundary would catch).
#![no_main]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr;

use libfuzzer_sys::fuzz_target;

// Links the library, whose `#[no_mangle]` functions the extern block below declares; nothing
// else of it is used from Rust.
extern crate fdcast;

#[repr(C)]
struct Fdcast {
    _private: [u8; 0],
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Stats {
    publishes: u64,
    deliveries: u64,
    dropped_messages: u64,
    evicted_fds: u64,
    queued_bytes: u64,
    subscriptions: u64,
    topics: u64,
    fds: u64,
    lost_to_gaps: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct FdCounters {
    delivered: u64,
    dropped: u64,
    lost_to_gaps: u64,
    queued_bytes: u64,
    catching_up: u64,
}

#[repr(C)]
#[derive(Default)]
struct PgStats {
    fields: [u64; 8],
}

type AuthorizeFn =
    Option<unsafe extern "C" fn(*mut c_void, *const c_char, usize, c_int, c_int) -> bool>;
type EvictFn = Option<unsafe extern "C" fn(*mut c_void, c_int, c_int)>;
type GapFn = Option<unsafe extern "C" fn(*mut c_void, c_int, *const c_char, usize, u64)>;

unsafe extern "C" {
    fn fdcast_new() -> *mut Fdcast;
    fn fdcast_free(fc: *mut Fdcast);
    fn fdcast_version() -> *const c_char;
    fn fdcast_last_error() -> *const c_char;
    fn fdcast_subscribe(
        fc: *mut Fdcast,
        t: *const c_char,
        tl: usize,
        fd: c_int,
        mode: c_int,
    ) -> i64;
    fn fdcast_unsubscribe(fc: *mut Fdcast, id: i64) -> c_int;
    fn fdcast_unsubscribe_fd(fc: *mut Fdcast, fd: c_int) -> i64;
    fn fdcast_clear(fc: *mut Fdcast);
    fn fdcast_subscriber_count(fc: *const Fdcast) -> i64;
    fn fdcast_subscribers_for(
        fc: *const Fdcast,
        t: *const c_char,
        tl: usize,
        fds: *mut c_int,
        cap: usize,
    ) -> i64;
    fn fdcast_publish(
        fc: *mut Fdcast,
        t: *const c_char,
        tl: usize,
        p: *const c_void,
        len: usize,
    ) -> i64;
    fn fdcast_publish_except(
        fc: *mut Fdcast,
        t: *const c_char,
        tl: usize,
        p: *const c_void,
        len: usize,
        except: c_int,
    ) -> i64;
    fn fdcast_send(fc: *mut Fdcast, fd: c_int, mode: c_int, p: *const c_void, len: usize) -> c_int;
    fn fdcast_fd(fc: *const Fdcast) -> c_int;
    fn fdcast_dispatch(fc: *mut Fdcast, timeout_ms: c_int) -> i64;
    fn fdcast_wake(fc: *mut Fdcast) -> c_int;
    fn fdcast_set_heartbeat(fc: *mut Fdcast, interval_ms: u32) -> c_int;
    fn fdcast_set_history(fc: *mut Fdcast, messages: usize, bytes: usize, age_ms: u64) -> c_int;
    fn fdcast_publish_id(
        fc: *mut Fdcast,
        t: *const c_char,
        tl: usize,
        p: *const c_void,
        len: usize,
        except_fd: c_int,
        id_out: *mut c_char,
        id_out_len: usize,
    ) -> i64;
    fn fdcast_subscribe_since(
        fc: *mut Fdcast,
        t: *const c_char,
        tl: usize,
        fd: c_int,
        mode: c_int,
        last_id: *const c_char,
        id_len: usize,
        recovered: *mut c_int,
    ) -> i64;
    fn fdcast_subscribe_tail(
        fc: *mut Fdcast,
        t: *const c_char,
        tl: usize,
        fd: c_int,
        mode: c_int,
        n: usize,
    ) -> i64;
    fn fdcast_pending_bytes(fc: *const Fdcast, fd: c_int) -> i64;
    fn fdcast_set_outbox_limit(fc: *mut Fdcast, bytes: usize) -> c_int;
    fn fdcast_set_overflow(fc: *mut Fdcast, policy: c_int) -> c_int;
    fn fdcast_set_fd_check(fc: *mut Fdcast, on: c_int) -> c_int;
    fn fdcast_get_stats(fc: *const Fdcast, out: *mut Stats);
    fn fdcast_fd_stats(fc: *const Fdcast, fd: c_int, out: *mut FdCounters) -> c_int;
    fn fdcast_set_gap_callback(fc: *mut Fdcast, f: GapFn, user: *mut c_void) -> c_int;
    fn fdcast_cork(fc: *mut Fdcast) -> c_int;
    fn fdcast_uncork(fc: *mut Fdcast) -> i64;
    fn fdcast_flush(fc: *mut Fdcast) -> i64;
    fn fdcast_set_authorizer(fc: *mut Fdcast, f: AuthorizeFn, user: *mut c_void);
    fn fdcast_set_evict_callback(fc: *mut Fdcast, f: EvictFn, user: *mut c_void);
    fn fdcast_pg_enable(fc: *mut Fdcast, conninfo: *const c_char, channel: *const c_char) -> c_int;
    fn fdcast_pg_poll_once(fc: *mut Fdcast, timeout_ms: c_int) -> i64;
    fn fdcast_pg_disable(fc: *mut Fdcast);
    fn fdcast_pg_get_stats(fc: *const Fdcast, out: *mut PgStats);
    fn fdcast_ws_accept_key(key: *const c_char, len: usize, out: *mut c_char) -> c_int;
    fn fdcast_ws_encode(
        opcode: c_int,
        p: *const c_void,
        len: usize,
        out: *mut u8,
        cap: usize,
    ) -> i64;
}

const EINVAL: i64 = libc::EINVAL as i64;
const EBADF: i64 = libc::EBADF as i64;
const MAX_TOPIC: usize = 4096;
/// fdcast_mode's values are 0 to MODES - 1.
const MODES: c_int = 6;

/// The topics an authorizer refuses: those starting with 'D'.
unsafe extern "C" fn authorize(
    user: *mut c_void,
    topic: *const c_char,
    len: usize,
    fd: c_int,
    mode: c_int,
) -> bool {
    assert!((1..=MAX_TOPIC).contains(&len) && !topic.is_null() && fd >= 0);
    assert!((0..MODES).contains(&mode), "authorizer got mode {mode}");
    // Reentrant: callbacks run with no lock held and may call fdcast.
    // SAFETY: `user` is the live handle; `topic` is `len` readable bytes for the call.
    unsafe {
        assert!(fdcast_subscriber_count(user.cast()) >= 0);
        *topic.cast::<u8>() != b'D'
    }
}

unsafe extern "C" fn on_gap(
    user: *mut c_void,
    fd: c_int,
    topic: *const c_char,
    len: usize,
    lost: u64,
) {
    assert!(fd >= 0 && lost > 0, "gap of {lost} on fd {fd}");
    assert!((1..=MAX_TOPIC).contains(&len) && !topic.is_null());
    // SAFETY: `user` is the live handle; reentrant calls are allowed.
    unsafe {
        let mut counters = FdCounters::default();
        let rc = fdcast_fd_stats(user.cast(), fd, &mut counters);
        assert!(
            rc == 0 || rc == -libc::ENOENT,
            "fd_stats in the gap callback: {rc}"
        );
        if rc == 0 {
            assert!(
                counters.lost_to_gaps >= lost,
                "{counters:?} after a gap of {lost}"
            );
        }
    }
}

unsafe extern "C" fn on_evict(user: *mut c_void, fd: c_int, reason: c_int) {
    assert!(
        fd >= 0 && reason > 0,
        "evicted fd {fd} with reason {reason}"
    );
    // SAFETY: `user` is the live handle; reentrant calls are allowed.
    unsafe {
        assert!(fdcast_subscriber_count(user.cast()) >= 0);
        assert_eq!(
            fdcast_unsubscribe_fd(user.cast(), fd),
            0,
            "evicted fd still subscribed"
        );
        assert_eq!(
            fdcast_pending_bytes(user.cast(), fd),
            0,
            "evicted fd still has bytes"
        );
    }
}

/// Reads the fuzzer's bytes as a program; 0 once exhausted.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.byte()).min(max).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head.to_vec()
    }
}

struct World {
    fc: *mut Fdcast,
    /// Subscriber sockets: (fdcast's end, the reader's end).
    sockets: Vec<(OwnedFd, UnixStream)>,
    pipe_write: OwnedFd,
    pipe_read: OwnedFd,
    dev_null: OwnedFd,
    /// A number that was an fd and is now closed.
    closed_fd: RawFd,
    ids: Vec<i64>,
    /// Big enough for every length the program may pair with it (4097 for topics, and more).
    buffer: Vec<u8>,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl World {
    fn new() -> World {
        // SAFETY: plain constructor.
        let fc = unsafe { fdcast_new() };
        assert!(!fc.is_null(), "fdcast_new failed");
        let mut sockets = Vec::new();
        for i in 0..3 {
            let (w, r) = UnixStream::pair().unwrap();
            r.set_nonblocking(true).unwrap();
            if i == 0 {
                let small: c_int = 4096;
                // SAFETY: SO_SNDBUF takes an int by pointer.
                unsafe {
                    libc::setsockopt(
                        w.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_SNDBUF,
                        (&small as *const c_int).cast(),
                        4,
                    )
                };
            }
            sockets.push((OwnedFd::from(w), r));
        }
        let (pipe_read, pipe_write) = pipe();
        let dev_null = OwnedFd::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .unwrap(),
        );
        let closed_fd = UnixStream::pair().unwrap().0.into_raw_fd();
        // SAFETY: we own it; afterwards the number names no open file (single-threaded).
        unsafe { libc::close(closed_fd) };
        let mut buffer: Vec<u8> = (0..70_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        buffer[4096] = b'\n';
        World {
            fc,
            sockets,
            pipe_write,
            pipe_read,
            dev_null,
            closed_fd,
            ids: Vec::new(),
            buffer,
        }
    }

    fn handle(&self, input: &mut Input) -> *mut Fdcast {
        if input.byte().is_multiple_of(16) {
            ptr::null_mut()
        } else {
            self.fc
        }
    }

    fn fd(&self, input: &mut Input) -> RawFd {
        match input.byte() % 13 {
            i @ 0..=2 => self.sockets[usize::from(i)].0.as_raw_fd(),
            3 => self.pipe_write.as_raw_fd(),
            4 => -1,
            5 => -1000,
            6 => i32::MIN,
            7 => self.closed_fd,
            8 => i32::MAX,
            // SAFETY: the handle is live.
            9 => unsafe { fdcast_fd(self.fc) },
            10 => self.dev_null.as_raw_fd(),
            11 => self.sockets[1].1.as_raw_fd(),
            _ => self.pipe_read.as_raw_fd(),
        }
    }

    /// A (pointer, length) pair and whether it is a valid topic.
    fn topic(&self, input: &mut Input, scratch: &mut Vec<u8>) -> (*const c_char, usize, TopicKind) {
        let base = self.buffer.as_ptr().cast::<c_char>();
        match input.byte() % 10 {
            0 => (ptr::null(), 0, TopicKind::Invalid),
            1 => (ptr::null(), 1, TopicKind::Null),
            2 => (ptr::null(), usize::MAX, TopicKind::Null),
            3 => (c"a".as_ptr(), 1, TopicKind::Valid),
            4 => (base, MAX_TOPIC - 1, TopicKind::Valid),
            5 => (base, MAX_TOPIC, TopicKind::Valid),
            6 => (base, MAX_TOPIC + 1, TopicKind::Invalid),
            7 => (base, 0, TopicKind::Invalid),
            8 => (b"Deny\0x".as_ptr().cast(), 6, TopicKind::Valid),
            _ => {
                *scratch = input.bytes(16);
                let kind = if scratch.is_empty() {
                    TopicKind::Invalid
                } else {
                    TopicKind::Valid
                };
                (scratch.as_ptr().cast(), scratch.len(), kind)
            }
        }
    }

    /// A (pointer, length) payload; `None` for NULL with a non-zero length.
    fn payload(&self, input: &mut Input, scratch: &mut Vec<u8>) -> (*const c_void, usize, bool) {
        match input.byte() % 9 {
            0 => (ptr::null(), 0, true),
            1 => (ptr::null(), 1, false),
            2 => (ptr::null(), usize::MAX, false),
            3 => (ptr::null(), isize::MAX as usize + 1, false),
            4 => (self.buffer.as_ptr().cast(), self.buffer.len(), true),
            5 => (b"\xff\xfe".as_ptr().cast(), 2, true),
            6 => (b"".as_ptr().cast(), 0, true),
            _ => {
                *scratch = input.bytes(255);
                (scratch.as_ptr().cast(), scratch.len(), true)
            }
        }
    }

    fn mode(input: &mut Input) -> c_int {
        match input.byte() % 12 {
            m @ 0..=5 => c_int::from(m),
            6 => MODES,
            7 => -1,
            8 => c_int::MAX,
            9 => c_int::MIN,
            10 => 255,
            _ => c_int::from(input.byte()) % MODES,
        }
    }

    fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        // SAFETY: a live handle and a writable struct.
        unsafe { fdcast_get_stats(self.fc, &mut stats) };
        stats
    }
}

#[derive(PartialEq, Clone, Copy)]
enum TopicKind {
    Valid,
    /// A length of 0 or over 4096, with a pointer.
    Invalid,
    /// NULL with a non-zero length.
    Null,
}

fn last_error() -> String {
    // SAFETY: never NULL by contract (checked), a NUL-terminated string.
    let message = unsafe { fdcast_last_error() };
    assert!(!message.is_null(), "fdcast_last_error returned NULL");
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    assert!(
        !text.contains("internal error"),
        "a panic was caught: {text}"
    );
    text
}

fn expect_in(rc: i64, allowed: &[i64], what: &str) {
    assert!(
        rc >= 0 && allowed.contains(&0) || allowed.contains(&rc),
        "{what} returned {rc} ({}), allowed {allowed:?}",
        last_error()
    );
}

fn step(w: &mut World, input: &mut Input) {
    let mut topic_bytes = Vec::new();
    let mut payload_bytes = Vec::new();
    let op = input.byte() % 35;
    // SAFETY (for the calls below): every pointer passed is NULL or points to at least the
    // length passed with it, as the contract requires; the handle is live or NULL.
    unsafe {
        match op {
            0 | 1 => {
                let fc = w.handle(input);
                let (t, tl, kind) = w.topic(input, &mut topic_bytes);
                let fd = w.fd(input);
                let mode = World::mode(input);
                let rc = fdcast_subscribe(fc, t, tl, fd, mode);
                let invalid =
                    fc.is_null() || kind != TopicKind::Valid || !(0..MODES).contains(&mode);
                if invalid {
                    assert_eq!(rc, -EINVAL, "subscribe with invalid arguments");
                } else if fd < 0 || fd == w.closed_fd || fd == i32::MAX {
                    assert_eq!(rc, -EBADF, "subscribe of a bad fd");
                } else if *t.cast::<u8>() == b'D' {
                    // The authorizer may be off (NULL): then it is allowed.
                    assert!(rc > 0 || rc == -i64::from(libc::EACCES), "subscribe: {rc}");
                } else {
                    assert!(rc > 0, "subscribe returned {rc}: {}", last_error());
                }
                if rc > 0 {
                    w.ids.push(rc);
                }
            }
            2 => {
                let fc = w.handle(input);
                let id = match input.byte() {
                    b if usize::from(b) < w.ids.len() => w.ids[usize::from(b)],
                    0xff => i64::MIN,
                    0xfe => -1,
                    0xfd => 0,
                    _ => i64::from(input.u32()) << 8,
                };
                let rc = i64::from(fdcast_unsubscribe(fc, id));
                if fc.is_null() {
                    assert_eq!(rc, -EINVAL);
                } else {
                    expect_in(rc, &[0, -i64::from(libc::ENOENT)], "unsubscribe");
                }
            }
            3 => {
                let fc = w.handle(input);
                let fd = w.fd(input);
                let rc = fdcast_unsubscribe_fd(fc, fd);
                match (fc.is_null(), fd < 0) {
                    (true, _) => assert_eq!(rc, -EINVAL),
                    (false, true) => assert_eq!(rc, -EBADF),
                    _ => assert!(rc >= 0, "unsubscribe_fd returned {rc}"),
                }
            }
            4 => fdcast_clear(w.handle(input)),
            5 => {
                let fc = w.handle(input);
                let rc = fdcast_subscriber_count(fc);
                if fc.is_null() {
                    assert_eq!(rc, -EINVAL);
                } else {
                    assert_eq!(
                        rc as u64,
                        w.stats().subscriptions,
                        "subscriber_count vs. stats"
                    );
                }
            }
            6 => {
                let fc = w.handle(input);
                let (t, tl, kind) = w.topic(input, &mut topic_bytes);
                let mut fds = [-7 as c_int; 8];
                let (out, cap) = match input.byte() % 4 {
                    0 => (ptr::null_mut(), 0),
                    1 => (ptr::null_mut(), 5),
                    2 => (fds.as_mut_ptr(), 1),
                    _ => (fds.as_mut_ptr(), fds.len()),
                };
                let rc = fdcast_subscribers_for(fc, t, tl, out, cap);
                if fc.is_null() || kind != TopicKind::Valid || (out.is_null() && cap > 0) {
                    assert_eq!(rc, -EINVAL, "subscribers_for with invalid arguments");
                } else {
                    assert!(rc >= 0);
                    let written = (rc as usize).min(cap);
                    assert!(fds[..written].iter().all(|&fd| fd >= 0));
                    assert!(
                        fds[written..].iter().all(|&fd| fd == -7),
                        "wrote past the count"
                    );
                }
            }
            7..=9 => {
                let fc = w.handle(input);
                let (t, tl, kind) = w.topic(input, &mut topic_bytes);
                let (p, len, ok) = w.payload(input, &mut payload_bytes);
                let rc = if op == 9 {
                    fdcast_publish_except(fc, t, tl, p, len, w.fd(input))
                } else {
                    fdcast_publish(fc, t, tl, p, len)
                };
                if fc.is_null() || kind != TopicKind::Valid || !ok {
                    assert_eq!(rc, -EINVAL, "publish with invalid arguments");
                } else {
                    expect_in(rc, &[0, -i64::from(libc::EILSEQ)], "publish");
                }
            }
            10 | 11 => {
                let fc = w.handle(input);
                let fd = w.fd(input);
                let mode = World::mode(input);
                let (p, len, ok) = w.payload(input, &mut payload_bytes);
                let rc = i64::from(fdcast_send(fc, fd, mode, p, len));
                if fc.is_null() || !ok || !(0..MODES).contains(&mode) {
                    assert_eq!(rc, -EINVAL, "send with invalid arguments");
                } else if rc < 0 {
                    // A bad fd, not UTF-8, a full outbox, or a write error of the fd (a dead
                    // peer, the epoll fd's EINVAL, a pipe read end's EBADF).
                    assert!(rc > -4096, "send returned {rc}");
                    last_error();
                }
                if fd < 0 && !fc.is_null() && ok && (0..MODES).contains(&mode) {
                    assert!(
                        rc == -EBADF || rc == -i64::from(libc::EILSEQ),
                        "send to fd {fd}: {rc}"
                    );
                }
            }
            12 => {
                let fc = w.handle(input);
                let rc = fdcast_dispatch(fc, 0);
                if fc.is_null() {
                    assert_eq!(rc, -EINVAL);
                } else {
                    assert!(rc >= 0, "dispatch returned {rc}");
                }
            }
            13 => {
                let fc = w.handle(input);
                let fd = w.fd(input);
                let rc = fdcast_pending_bytes(fc, fd);
                match (fc.is_null(), fd < 0) {
                    (true, _) => assert_eq!(rc, -EINVAL),
                    (false, true) => assert_eq!(rc, -EBADF),
                    _ => assert!(rc >= 0),
                }
            }
            14 => {
                let fc = w.handle(input);
                let bytes = match input.byte() % 5 {
                    0 => 0,
                    1 => usize::MAX,
                    2 => 1 << 20,
                    3 => 100,
                    _ => input.u32() as usize,
                };
                let rc = fdcast_set_outbox_limit(fc, bytes);
                assert_eq!(rc, if fc.is_null() { -libc::EINVAL } else { 0 });
            }
            15 => {
                let fc = w.handle(input);
                let policy = World::mode(input);
                let rc = fdcast_set_overflow(fc, policy);
                let valid = !fc.is_null() && (0..2).contains(&policy);
                assert_eq!(rc, if valid { 0 } else { -libc::EINVAL });
            }
            16 => {
                let mut stats = Stats {
                    publishes: 7,
                    ..Stats::default()
                };
                match input.byte() % 3 {
                    0 => fdcast_get_stats(ptr::null(), &mut stats),
                    1 => fdcast_get_stats(w.fc, ptr::null_mut()),
                    _ => fdcast_get_stats(w.fc, &mut stats),
                }
                if stats.publishes != 7 {
                    assert!(stats.topics <= stats.subscriptions);
                }
            }
            17 => assert!([0, -libc::EINVAL].contains(&fdcast_cork(w.handle(input)))),
            18 => assert!(fdcast_uncork(w.handle(input)) >= -EINVAL),
            19 => assert!(fdcast_flush(w.handle(input)) >= -EINVAL),
            20 => assert!([0, -libc::EINVAL].contains(&fdcast_wake(w.handle(input)))),
            21 => {
                let fc = w.handle(input);
                let fd = fdcast_fd(fc);
                assert!(if fc.is_null() {
                    fd == -libc::EINVAL
                } else {
                    fd >= 0
                });
            }
            22 => {
                // A reader drains, stops, or goes away half or whole.
                let i = usize::from(input.byte()) % w.sockets.len();
                let reader = &w.sockets[i].1;
                match input.byte() % 4 {
                    0 => {
                        let _ = libc::shutdown(reader.as_raw_fd(), libc::SHUT_RDWR);
                    }
                    1 => {
                        let _ = libc::shutdown(reader.as_raw_fd(), libc::SHUT_WR);
                    }
                    _ => {
                        let mut buf = vec![0u8; 1 << 16];
                        while libc::read(reader.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0
                        {
                        }
                    }
                }
            }
            23 => {
                let fc = w.handle(input);
                let user = w.fc.cast();
                if input.byte().is_multiple_of(2) {
                    fdcast_set_authorizer(fc, Some(authorize), user);
                } else {
                    fdcast_set_authorizer(fc, None, ptr::null_mut());
                }
                if input.byte().is_multiple_of(2) {
                    fdcast_set_evict_callback(fc, Some(on_evict), user);
                } else {
                    fdcast_set_evict_callback(fc, None, ptr::null_mut());
                }
            }
            24 => {
                let key = input.bytes(30);
                let mut out = [0x55 as c_char; 29];
                let rc = match input.byte() % 3 {
                    0 => fdcast_ws_accept_key(ptr::null(), key.len().max(1), out.as_mut_ptr()),
                    1 => fdcast_ws_accept_key(key.as_ptr().cast(), key.len(), ptr::null_mut()),
                    _ => fdcast_ws_accept_key(key.as_ptr().cast(), key.len(), out.as_mut_ptr()),
                };
                assert!(rc == 0 || rc == -libc::EINVAL);
                if rc == 0 {
                    assert_eq!(key.len(), 24);
                    assert_eq!(out[28], 0, "accept key not NUL-terminated");
                }
            }
            25 => {
                let opcode = match input.byte() % 4 {
                    0 => c_int::from(input.byte() % 11),
                    1 => -1,
                    2 => 256 + 1,
                    _ => c_int::from(input.byte()),
                };
                let (p, len, ok) = w.payload(input, &mut payload_bytes);
                let mut out = vec![0u8; 200];
                let (o, cap) = match input.byte() % 4 {
                    0 => (ptr::null_mut(), 0),
                    1 => (ptr::null_mut(), 10),
                    2 => (out.as_mut_ptr(), 3),
                    _ => (out.as_mut_ptr(), out.len()),
                };
                let rc = fdcast_ws_encode(opcode, p, len, o, cap);
                if !ok || (o.is_null() && cap > 0) {
                    assert!(rc < 0);
                }
                if rc > 0 {
                    assert!(rc as usize <= cap, "encoded {rc} bytes into {cap}");
                } else {
                    assert!(
                        [-EINVAL, -i64::from(libc::ENOBUFS), -i64::from(libc::EILSEQ)]
                            .contains(&rc),
                        "ws_encode returned {rc}"
                    );
                }
            }
            26 => {
                let fc = w.handle(input);
                let (conninfo, channel) = match input.byte() % 3 {
                    0 => (ptr::null(), c"ch".as_ptr()),
                    1 => (c"host=/nonexistent".as_ptr(), ptr::null()),
                    _ => (c"host=/nonexistent".as_ptr(), c"ch".as_ptr()),
                };
                let rc = fdcast_pg_enable(fc, conninfo, channel);
                assert!(
                    [-libc::EINVAL, -libc::ENOTSUP].contains(&rc),
                    "pg_enable: {rc}"
                );
                let rc = fdcast_pg_poll_once(fc, 0);
                assert!(rc < 0, "pg_poll_once on a build without pg: {rc}");
                let mut stats = PgStats::default();
                fdcast_pg_get_stats(fc, &mut stats);
                fdcast_pg_get_stats(fc, ptr::null_mut());
                assert!(stats.fields.iter().all(|&n| n == 0));
                fdcast_pg_disable(fc);
            }
            27 => {
                let fc = w.handle(input);
                let rc = fdcast_set_heartbeat(fc, u32::from(input.byte() % 3));
                assert_eq!(rc, if fc.is_null() { -libc::EINVAL } else { 0 });
            }
            28 => {
                let fc = w.handle(input);
                let on = World::mode(input);
                let rc = fdcast_set_fd_check(fc, on);
                let valid = !fc.is_null() && (0..2).contains(&on);
                assert_eq!(rc, if valid { 0 } else { -libc::EINVAL });
            }
            29 => {
                let fc = w.handle(input);
                let limits = input.byte();
                let rc = fdcast_set_history(
                    fc,
                    usize::from(limits % 4),
                    usize::from(limits / 4 % 3) * 64,
                    u64::from(limits / 16 % 3),
                );
                assert_eq!(rc, if fc.is_null() { -libc::EINVAL } else { 0 });
            }
            30 => {
                let fc = w.handle(input);
                let (t, tl, kind) = w.topic(input, &mut topic_bytes);
                let (p, len, ok) = w.payload(input, &mut payload_bytes);
                let mut id = [0x55 as c_char; 64];
                let (out, cap) = match input.byte() % 4 {
                    0 => (ptr::null_mut(), 42),
                    1 => (id.as_mut_ptr(), 41),
                    2 => (id.as_mut_ptr(), 42),
                    _ => (id.as_mut_ptr(), id.len()),
                };
                let rc = fdcast_publish_id(fc, t, tl, p, len, -1, out, cap);
                if fc.is_null() || kind != TopicKind::Valid || !ok || out.is_null() || cap < 42 {
                    assert_eq!(rc, -EINVAL, "publish_id with invalid arguments");
                } else {
                    expect_in(rc, &[0, -i64::from(libc::EILSEQ)], "publish_id");
                }
                if rc >= 0 {
                    let text = CStr::from_ptr(id.as_ptr()).to_bytes();
                    assert!(
                        text.is_empty() || fdcast::EventId::parse(text).is_some(),
                        "publish_id wrote {text:?}"
                    );
                }
            }
            31 => {
                let fc = w.handle(input);
                let (t, tl, kind) = w.topic(input, &mut topic_bytes);
                let fd = w.fd(input);
                let mode = World::mode(input);
                let mut recovered: c_int = 7;
                let how = input.byte() % 5;
                let id_bytes = input.bytes(45);
                let (id, id_len, id_ok) = match how {
                    0 => (ptr::null(), 3, false),
                    1 => (b"0-0".as_ptr(), 3, true),
                    2 => (
                        id_bytes.as_ptr(),
                        id_bytes.len(),
                        fdcast::EventId::parse(&id_bytes).is_some(),
                    ),
                    _ => (ptr::null(), 0, true),
                };
                let rc = if how >= 3 {
                    fdcast_subscribe_tail(fc, t, tl, fd, mode, usize::from(input.byte()))
                } else {
                    let out = if how == 1 {
                        ptr::null_mut()
                    } else {
                        &mut recovered
                    };
                    fdcast_subscribe_since(fc, t, tl, fd, mode, id.cast(), id_len, out)
                };
                let invalid = fc.is_null()
                    || kind != TopicKind::Valid
                    || !(0..MODES).contains(&mode)
                    || !id_ok;
                if invalid {
                    assert_eq!(rc, -EINVAL, "resume with invalid arguments");
                    assert_eq!(recovered, 7, "a refused resume wrote recovered");
                } else {
                    expect_in(
                        rc,
                        &[0, -EBADF, -i64::from(libc::EACCES)],
                        "subscribe_since/_tail",
                    );
                }
                if rc > 0 {
                    w.ids.push(rc);
                    assert!(how != 2 || recovered == 0 || recovered == 1);
                }
            }
            32 => {
                let fd = w.fd(input);
                let mut counters = FdCounters {
                    delivered: 7,
                    ..FdCounters::default()
                };
                let how = input.byte() % 3;
                let rc = match how {
                    0 => fdcast_fd_stats(ptr::null(), fd, &mut counters),
                    1 => fdcast_fd_stats(w.fc, fd, ptr::null_mut()),
                    _ => fdcast_fd_stats(w.fc, fd, &mut counters),
                };
                if how < 2 {
                    assert_eq!(rc, -libc::EINVAL, "fd_stats with a NULL argument");
                } else if fd < 0 {
                    assert_eq!(rc, -libc::EBADF, "fd_stats of a negative fd");
                } else {
                    assert!(rc == 0 || rc == -libc::ENOENT, "fd_stats: {rc}");
                }
                if rc == 0 {
                    assert!(counters.catching_up <= 16, "{counters:?}");
                    let totals = w.stats();
                    assert!(counters.lost_to_gaps <= totals.lost_to_gaps, "{counters:?}");
                    assert!(counters.dropped <= totals.dropped_messages, "{counters:?}");
                } else {
                    assert_eq!(counters.delivered, 7, "a failed fd_stats wrote its out");
                }
            }
            33 => {
                let fc = w.handle(input);
                let rc = if input.byte().is_multiple_of(2) {
                    fdcast_set_gap_callback(fc, Some(on_gap), w.fc.cast())
                } else {
                    fdcast_set_gap_callback(fc, None, ptr::null_mut())
                };
                assert_eq!(rc, if fc.is_null() { -libc::EINVAL } else { 0 });
            }
            _ => {
                assert!(!fdcast_version().is_null());
                last_error();
            }
        }
    }
    // Invariants after every call.
    last_error();
    let stats = w.stats();
    // SAFETY: a live handle.
    let count = unsafe { fdcast_subscriber_count(w.fc) };
    assert_eq!(count as u64, stats.subscriptions);
    assert!(stats.topics <= stats.subscriptions);
    assert!(stats.fds <= 16, "more fds than exist: {stats:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut world = World::new();
    let mut input = Input { data };
    for _ in 0..64 {
        if input.data.is_empty() {
            break;
        }
        step(&mut world, &mut input);
    }
    // SAFETY: the handle is live and no call is in flight; NULL is a no-op.
    unsafe {
        fdcast_free(world.fc);
        fdcast_free(ptr::null_mut());
    }
    let _ = (world.pipe_read.as_raw_fd(), world.dev_null.as_raw_fd());
});
