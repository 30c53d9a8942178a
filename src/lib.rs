//! fdcast: publish one message to every file descriptor subscribed to a topic, framed per
//! subscriber as raw bytes, an RFC 6455 WebSocket frame or a Server-Sent Events block, with
//! non-blocking writes that never tear a frame and bounded per-fd outboxes.
//!
//! The safe API is [`Registry`]; the C API in `include/fdcast.h` is a thin layer over it
//! (module `ffi`). Embed it in an event loop by polling [`Registry::poll_fd`] for
//! readability and calling [`Registry::dispatch`] when it fires.

#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod batch;
mod broker;
mod error;
mod ffi;
mod frame;
mod history;
mod index;
mod io;
mod outbox;
mod reactor;
mod registry;
pub mod ws;

pub use broker::{BrokerStats, PgStats};
pub use error::Error;
pub use frame::Mode;
pub use history::{EventId, HistoryLimits, MAX_EVENT_ID_LEN};
pub use index::SubscriptionId;
pub use outbox::{FdStats, Overflow};
pub use registry::{
    Authorizer, DEFAULT_OUTBOX_LIMIT, EvictCallback, GapCallback, MAX_TOPIC_LEN, Registry, Stats,
};

/// The NATS protocol parser, for the fuzz target (fuzz/fuzz_targets/nats_parse.rs).
#[cfg(feature = "nats")]
#[doc(hidden)]
pub use broker::nats::fuzz_read as fuzz_nats_read;
