//! The only module that makes system calls on host fds: identify, write, shut down.
//!
//! Sockets are written with `sendmsg(MSG_DONTWAIT | MSG_NOSIGNAL)`, which needs neither a
//! change to the fd's flags nor to the process's signal handling. Pipes and FIFOs have no
//! such flags: they are made `O_NONBLOCK` when first seen, and written with SIGPIPE blocked
//! in the calling thread for the length of the call (the technique libpq uses), so a reader
//! that went away yields `EPIPE` instead of killing the host.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// What an fd refers to, taken with `fstat` when fdcast first sees the fd. Two fds that
/// refer to the same open file have the same `(dev, ino)`; a closed-and-reused fd number
/// almost always refers to a different one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    pub(crate) kind: FileKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    Socket,
    Fifo,
    Other,
}

/// The most slices one write takes; Linux's `IOV_MAX`.
const MAX_IOVECS: usize = 1024;

pub(crate) fn identify(fd: RawFd) -> io::Result<FileIdentity> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `struct stat` into the pointer it is given, which points to
    // storage of that type; it reads nothing else. An fd that is not open gives EBADF.
    let rc = unsafe { libc::fstat(fd, stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat returned 0, so it initialised the whole struct.
    let stat = unsafe { stat.assume_init() };
    let kind = match stat.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFIFO => FileKind::Fifo,
        _ => FileKind::Other,
    };
    Ok(FileIdentity {
        dev: stat.st_dev,
        ino: stat.st_ino,
        kind,
    })
}

/// Sets `O_NONBLOCK` on an fd that cannot be written non-blocking per call (anything but a
/// socket). Documented in the header: fdcast changes this one flag on such fds.
pub(crate) fn make_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the fd's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL takes an int of status flags; we add O_NONBLOCK to those just read.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes as much of `slices`, in order, as the kernel takes without blocking, in one system
/// call of at most [`MAX_IOVECS`] slices. `Ok(0)` for non-empty slices means the fd would
/// block; an `Err` is a hard failure of the fd (the peer is gone).
pub(crate) fn write_slices<'a>(
    fd: RawFd,
    kind: FileKind,
    slices: impl IntoIterator<Item = &'a [u8]>,
) -> io::Result<usize> {
    let mut iovecs = [const { MaybeUninit::<IoSlice<'a>>::uninit() }; MAX_IOVECS];
    let mut count = 0;
    for (slot, slice) in iovecs.iter_mut().zip(slices) {
        slot.write(IoSlice::new(slice));
        count += 1;
    }
    // SAFETY: the first `count` elements were initialised just above, and MaybeUninit<T> has
    // the layout of T, so they form a valid `[IoSlice]`.
    let bufs = unsafe { std::slice::from_raw_parts(iovecs.as_ptr().cast::<IoSlice<'a>>(), count) };
    write_iovecs(fd, kind, bufs)
}

/// [`write_slices`] for one frame, its header (possibly empty) then its body: the path of
/// every immediate delivery, so it builds two iovecs on the stack instead of an IOV_MAX
/// array, whose 16 KiB frame costs stack probes on every call.
#[inline(always)]
pub(crate) fn write_frame(
    fd: RawFd,
    kind: FileKind,
    header: &[u8],
    body: &[u8],
) -> io::Result<usize> {
    let slices = [IoSlice::new(header), IoSlice::new(body)];
    let bufs = if header.is_empty() {
        &slices[1..]
    } else {
        &slices[..]
    };
    write_iovecs(fd, kind, bufs)
}

#[inline(always)]
fn write_iovecs(fd: RawFd, kind: FileKind, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        let result = match kind {
            FileKind::Socket => send_nonblocking(fd, bufs),
            FileKind::Fifo => write_fifo(fd, bufs),
            FileKind::Other => writev(fd, bufs),
        };
        match result {
            Ok(written) => return Ok(written),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(err) => return Err(err),
        }
    }
}

#[inline(always)]
fn send_nonblocking(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    if let [only] = bufs {
        // One buffer: send(2) spares the kernel importing an iovec array.
        // SAFETY: `only` describes memory borrowed for the call; send only reads it.
        let sent = unsafe {
            libc::send(
                fd,
                only.as_ptr().cast(),
                only.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        return if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        };
    }
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with `struct iovec` on Unix; sendmsg only reads it.
    message.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    message.msg_iovlen = bufs.len() as _;
    // SAFETY: `message` points to `bufs.len()` valid iovecs borrowed for the call.
    let sent = unsafe { libc::sendmsg(fd, &message, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// Kept out of line: the signal-mask dance would weigh down the socket path it sits beside.
#[inline(never)]
fn write_fifo(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    with_sigpipe_blocked(|| writev(fd, bufs))
}

fn writev(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: IoSlice is ABI-compatible with `struct iovec`; writev reads `bufs.len()` of them,
    // each describing memory borrowed for the call. The count is at most MAX_IOVECS.
    let written = unsafe { libc::writev(fd, bufs.as_ptr() as *const libc::iovec, bufs.len() as _) };
    if written < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(written as usize)
    }
}

/// Runs `write` with SIGPIPE blocked in this thread, and consumes the SIGPIPE the write
/// raised, if any, before restoring the thread's mask. A SIGPIPE that was already pending
/// before the call belongs to the host and is left alone.
fn with_sigpipe_blocked(write: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
    let sigpipe = sigpipe_set();
    let mut previous_mask = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: both pointers are valid sigsets; the previous mask is written before use.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigpipe, previous_mask.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let was_pending = sigpipe_pending();
    let result = write();
    if matches!(&result, Err(err) if err.raw_os_error() == Some(libc::EPIPE)) && !was_pending {
        let no_wait = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: SIGPIPE is blocked, so the one our write raised is pending on this thread;
        // sigtimedwait with a zero timeout dequeues it (or returns EAGAIN if the kernel
        // directed it elsewhere). The siginfo pointer may be NULL.
        unsafe { libc::sigtimedwait(&sigpipe, std::ptr::null_mut(), &no_wait) };
    }
    // SAFETY: pthread_sigmask succeeded above, so `previous_mask` was initialised.
    unsafe {
        libc::pthread_sigmask(
            libc::SIG_SETMASK,
            previous_mask.as_ptr(),
            std::ptr::null_mut(),
        )
    };
    result
}

fn sigpipe_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset then adds a valid signal number.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGPIPE);
        set.assume_init()
    }
}

fn sigpipe_pending() -> bool {
    let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given; sigismember reads it after success.
    unsafe {
        libc::sigpending(pending.as_mut_ptr()) == 0
            && libc::sigismember(pending.as_ptr(), libc::SIGPIPE) == 1
    }
}

/// `shutdown(SHUT_RDWR)` for an evicted socket, so its peer sees the stream end. Errors are
/// ignored: the fd may already be disconnected, and it stays the host's to close.
pub(crate) fn shutdown(fd: RawFd, kind: FileKind) {
    if kind == FileKind::Socket {
        // SAFETY: shutdown takes an fd and a flag and touches no memory.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

#[cfg_attr(not(feature = "pg"), allow(dead_code))]
/// Waits up to `timeout` (`None`: forever) until `fd` is readable (`want_write` false) or
/// writable; returns whether it is. EINTR counts as not ready.
pub(crate) fn wait_fd(fd: RawFd, want_write: bool, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd,
        events: if want_write {
            libc::POLLOUT
        } else {
            libc::POLLIN
        },
        revents: 0,
    };
    let timeout_ms = timeout.map_or(-1, c_int_millis);
    // SAFETY: `pollfd` is one valid pollfd that poll reads and writes for the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(err)
        };
    }
    Ok(ready > 0)
}

#[cfg_attr(not(feature = "pg"), allow(dead_code))]
/// Rounds up, so a wait of 0.5 ms does not become a busy loop of 0 ms waits.
fn c_int_millis(timeout: Duration) -> libc::c_int {
    let millis = timeout.as_micros().div_ceil(1000);
    libc::c_int::try_from(millis).unwrap_or(libc::c_int::MAX)
}

/// A monotonic timerfd, non-blocking, for deadlines the reactor must wake up for.
pub(crate) fn timer_create() -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes a clock id and flags and returns a new fd or -1.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg_attr(not(feature = "pg"), allow(dead_code))]
/// Arms `timer` to fire once after `after` (at least 1 ns later), or disarms it with `None`.
pub(crate) fn timer_set(timer: &OwnedFd, after: Option<Duration>) -> io::Result<()> {
    let after = after.map(|after| after.max(Duration::from_nanos(1)));
    let value = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.map_or(0, |after| after.as_secs() as libc::time_t),
            tv_nsec: after.map_or(0, |after| after.subsec_nanos() as libc::c_long),
        },
    };
    // SAFETY: `value` is a valid itimerspec; the old value pointer may be NULL.
    let rc = unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &value, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Consumes a timer's expirations so it stops reading as ready.
pub(crate) fn timer_clear(timer: &OwnedFd) {
    let mut expirations = 0u64;
    // SAFETY: reads at most 8 bytes into a u64; the fd is non-blocking, so EAGAIN (nothing
    // expired) returns at once and is ignored.
    unsafe {
        libc::read(
            timer.as_raw_fd(),
            (&mut expirations as *mut u64).cast(),
            size_of::<u64>(),
        )
    };
}
