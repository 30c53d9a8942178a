//! The internal `mio::Poll`: fds with queued bytes are watched for writability, and its
//! epoll fd is the one fd the host adds to its own loop (`fdcast_fd`).

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

use crate::error::Error;
use crate::io as sys;

/// Reserved tokens; fd tokens are the fd numbers, which are never this large.
const WAKER_TOKEN: Token = Token(usize::MAX);
const TIMER_TOKEN: Token = Token(usize::MAX - 1);
const BACKEND_TOKEN: Token = Token(usize::MAX - 2);
const EVENTS_PER_WAIT: usize = 1024;

pub(crate) struct Reactor {
    poll: Mutex<(Poll, Events)>,
    /// A clone of the poll's registry, so any thread may watch an fd while another waits.
    registry: mio::Registry,
    waker: Waker,
    /// A timerfd for deadlines (a backend's reconnect), so the host needs no timer of its own.
    timer: OwnedFd,
    /// Set by `wake_backend`: the next `wait` reports the backend as ready.
    backend_due: AtomicBool,
    poll_fd: RawFd,
}

/// What woke a wait, besides writable fds.
#[derive(Default)]
pub(crate) struct Wakeups {
    /// The cross-process backend's socket is ready.
    pub(crate) backend: bool,
    /// The timer set with `set_timer` fired.
    pub(crate) timer: bool,
}

impl Reactor {
    pub(crate) fn new() -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = Waker::new(poll.registry(), WAKER_TOKEN)?;
        let timer = sys::timer_create()?;
        registry.register(
            &mut SourceFd(&timer.as_raw_fd()),
            TIMER_TOKEN,
            Interest::READABLE,
        )?;
        let poll_fd = poll.as_raw_fd();
        Ok(Reactor {
            poll: Mutex::new((poll, Events::with_capacity(EVENTS_PER_WAIT))),
            registry,
            waker,
            timer,
            backend_due: AtomicBool::new(false),
            poll_fd,
        })
    }

    pub(crate) fn poll_fd(&self) -> RawFd {
        self.poll_fd
    }

    /// Starts watching `fd` for writability. mio is edge-triggered, and epoll reports an fd
    /// that is already writable when it is added, so no edge is missed between the write
    /// that would block and this call.
    pub(crate) fn watch(&self, fd: RawFd) -> io::Result<()> {
        let token = Token(fd as usize);
        match self
            .registry
            .register(&mut SourceFd(&fd), token, Interest::WRITABLE)
        {
            // The fd number is still registered for an old file the host closed and a dup
            // keeps alive; re-registering points it at the current one.
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                self.registry
                    .reregister(&mut SourceFd(&fd), token, Interest::WRITABLE)
            }
            other => other,
        }
    }

    /// Stops watching `fd`. Errors are ignored: epoll already forgot an fd the host closed.
    pub(crate) fn unwatch(&self, fd: RawFd) {
        let _ = self.registry.deregister(&mut SourceFd(&fd));
    }

    #[cfg_attr(not(feature = "pg"), allow(dead_code))]
    /// Watches the backend's socket with `interest`, replacing any earlier registration of
    /// `previous` (libpq may switch sockets while connecting, possibly to the same number).
    pub(crate) fn watch_backend(
        &self,
        previous: Option<RawFd>,
        fd: RawFd,
        interest: Interest,
    ) -> io::Result<()> {
        if let Some(previous) = previous {
            self.unwatch(previous);
        }
        self.registry
            .register(&mut SourceFd(&fd), BACKEND_TOKEN, interest)
    }

    #[cfg_attr(not(feature = "pg"), allow(dead_code))]
    /// Arms the timer to make `wait` return after `after`, or disarms it.
    pub(crate) fn set_timer(&self, after: Option<Duration>) {
        // Cannot fail for a valid timerfd and itimerspec; if it ever did, the backend would
        // only retry at the next publish or dispatch instead of on time.
        let _ = sys::timer_set(&self.timer, after);
    }

    /// Makes a concurrent or the next `wait` return.
    pub(crate) fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// Makes a concurrent or the next `wait` return and report the backend as ready, for work
    /// its socket will not report: the rest of an edge-triggered read cut short, or a
    /// connection lost on a publisher's thread, whose reconnect only a service of the backend
    /// schedules (a plain `wake` reports neither).
    #[cfg_attr(
        not(any(feature = "pg", feature = "redis", feature = "nats")),
        allow(dead_code)
    )]
    pub(crate) fn wake_backend(&self) {
        self.backend_due.store(true, Ordering::Release);
        self.wake();
    }

    /// Waits up to `timeout` (`None`: forever) and appends to `ready` each fd found
    /// writable. The poll is locked only for the wait itself, so the caller handles the fds
    /// (and runs callbacks) with no lock held. Only one thread may wait at a time: a second
    /// gets [`Error::Busy`].
    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        ready: &mut Vec<RawFd>,
    ) -> Result<Wakeups, Error> {
        let mut guard = self.poll.try_lock().ok_or(Error::Busy)?;
        let (poll, events) = &mut *guard;
        let mut wakeups = Wakeups::default();
        match poll.poll(events, timeout) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(wakeups),
            Err(err) => return Err(Error::Io(err)),
        }
        for event in events.iter() {
            match event.token() {
                WAKER_TOKEN => {}
                TIMER_TOKEN => {
                    sys::timer_clear(&self.timer);
                    wakeups.timer = true;
                }
                BACKEND_TOKEN => wakeups.backend = true,
                Token(fd) => ready.push(fd as RawFd),
            }
        }
        if self.backend_due.swap(false, Ordering::AcqRel) {
            wakeups.backend = true;
        }
        Ok(wakeups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_backend_wake_reports_the_backend() {
        let reactor = Reactor::new().unwrap();
        let mut ready = Vec::new();
        reactor.wake();
        let wakeups = reactor
            .wait(Some(Duration::from_secs(1)), &mut ready)
            .unwrap();
        assert!(!wakeups.backend && !wakeups.timer);
        reactor.wake_backend();
        let wakeups = reactor
            .wait(Some(Duration::from_secs(1)), &mut ready)
            .unwrap();
        assert!(wakeups.backend);
        let wakeups = reactor.wait(Some(Duration::ZERO), &mut ready).unwrap();
        assert!(!wakeups.backend, "reported once");
        assert!(ready.is_empty());
    }
}
