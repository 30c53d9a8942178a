//! The error type of the safe API. Every variant maps to one errno, which the C boundary
//! returns negated.

#![forbid(unsafe_code)]

use std::fmt;
use std::io;

use crate::ws;

/// Why an fdcast call failed.
#[derive(Debug)]
pub enum Error {
    /// An argument is out of its range (a topic of 0 or more than [`crate::MAX_TOPIC_LEN`]
    /// bytes, for example). `EINVAL`.
    InvalidArgument(&'static str),
    /// The fd is negative or not open. `EBADF`.
    BadFd,
    /// No subscription has that id. `ENOENT`.
    NotFound,
    /// The authorizer refused the subscription. `EACCES`.
    Refused,
    /// A payload for a WebSocket text or SSE subscriber is not valid UTF-8. `EILSEQ`.
    InvalidUtf8,
    /// A PostgreSQL notification cannot carry these bytes (NUL, invalid UTF-8). `EILSEQ`.
    NotText(&'static str),
    /// A PostgreSQL notification cannot carry this much. `EMSGSIZE`.
    TooLarge,
    /// The broker's engine cannot carry a payload this large. `EMSGSIZE`.
    PayloadTooLarge {
        /// The engine: "Redis", "NATS".
        engine: &'static str,
        /// The largest payload it takes, in bytes.
        limit: usize,
    },
    /// The operation is already in effect (e.g. the backend is already enabled). `EALREADY`.
    Already(&'static str),
    /// This build lacks the feature (e.g. `pg`). `ENOTSUP`.
    NotSupported(&'static str),
    /// No broker (or PostgreSQL backend) is enabled. `ENOTCONN`.
    NotEnabled,
    /// libpq refused the connection string. `EINVAL`.
    InvalidConninfo(String),
    /// The server could not be reached or refused the connection. `ECONNREFUSED`.
    Unreachable(String),
    /// The server failed a request, or the connection broke. `EIO`.
    Backend(String),
    /// The overflow policy dropped the frame (the fd's outbox is full). `ENOBUFS`.
    Dropped,
    /// The peer is gone; the fd was evicted. Holds the write's errno (`EPIPE`, ...).
    PeerGone(i32),
    /// Another thread is inside `dispatch`. `EBUSY`.
    Busy,
    /// The memory for a payload-sized buffer could not be had. `ENOMEM`.
    NoMemory,
    /// A WebSocket helper failed: `EINVAL` for a bad key or a frame RFC 6455 forbids,
    /// `ENOBUFS` for an output buffer too small, `EPROTO` for a peer that broke the protocol,
    /// `EILSEQ` for text that is not UTF-8, `EMSGSIZE` for a payload over the limit.
    WebSocket(ws::Error),
    /// A system call failed.
    Io(io::Error),
}

impl Error {
    /// The positive errno value for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::BadFd => libc::EBADF,
            Error::NotFound => libc::ENOENT,
            Error::Refused => libc::EACCES,
            Error::InvalidUtf8 | Error::NotText(_) => libc::EILSEQ,
            Error::TooLarge | Error::PayloadTooLarge { .. } => libc::EMSGSIZE,
            Error::Already(_) => libc::EALREADY,
            Error::Unreachable(_) => libc::ECONNREFUSED,
            Error::InvalidConninfo(_) => libc::EINVAL,
            Error::NotEnabled => libc::ENOTCONN,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::Backend(_) => libc::EIO,
            Error::Dropped => libc::ENOBUFS,
            Error::PeerGone(errno) => *errno,
            Error::Busy => libc::EBUSY,
            Error::NoMemory => libc::ENOMEM,
            Error::WebSocket(err) => match err {
                ws::Error::InvalidKey | ws::Error::InvalidFrame(_) => libc::EINVAL,
                ws::Error::InvalidUtf8 => libc::EILSEQ,
                ws::Error::BufferTooSmall { .. } => libc::ENOBUFS,
                ws::Error::Protocol(ws::Rule::TextNotUtf8 | ws::Rule::CloseReasonNotUtf8) => {
                    libc::EILSEQ
                }
                ws::Error::Protocol(_) => libc::EPROTO,
                ws::Error::TooLarge { .. } => libc::EMSGSIZE,
            },
            Error::Io(err) => err.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::BadFd => f.write_str("the fd is negative or not open"),
            Error::NotFound => f.write_str("no subscription has that id"),
            Error::Refused => f.write_str("the authorizer refused the subscription"),
            Error::InvalidUtf8 => f.write_str(
                "payload is not valid UTF-8, which WebSocket text and SSE subscribers require",
            ),
            Error::NotText(why) => f.write_str(why),
            Error::TooLarge => f.write_str(
                "the PostgreSQL notification would be 8000 bytes or more (length prefix and topic included)",
            ),
            Error::PayloadTooLarge { engine, limit } => {
                write!(f, "{engine} takes payloads of at most {limit} bytes")
            }
            Error::Already(what) => f.write_str(what),
            Error::NotEnabled => f.write_str("no broker is enabled"),
            Error::NotSupported(what) => write!(f, "not supported by this build of fdcast: {what}"),
            Error::InvalidConninfo(message) => write!(f, "invalid conninfo: {message}"),
            Error::Unreachable(message) => write!(f, "cannot connect: {message}"),
            Error::Backend(message) => write!(f, "broker: {message}"),
            Error::Dropped => f.write_str("the fd's outbox is full: the frame was dropped"),
            Error::PeerGone(errno) => write!(
                f,
                "the peer is gone ({}); the fd was evicted",
                io::Error::from_raw_os_error(*errno)
            ),
            Error::Busy => f.write_str("another thread is already in dispatch"),
            Error::NoMemory => f.write_str("out of memory for the frame"),
            Error::WebSocket(err) => write!(f, "{err}"),
            Error::Io(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(err) => Some(err),
            Error::WebSocket(err) => Some(err),
            _ => None,
        }
    }
}

impl From<ws::Error> for Error {
    fn from(err: ws::Error) -> Error {
        Error::WebSocket(err)
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Error {
        Error::Io(err)
    }
}
