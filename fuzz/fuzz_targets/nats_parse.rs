//! The NATS protocol parser, through `fdcast::fuzz_nats_read`, on arbitrary server bytes.
//! Properties (checked inside the library, where the parser's state is visible):
//! - never panics, whatever the server sends;
//! - `read` uses no more bytes than it is given, and acts only on whole commands, so reading
//!   the stream whole or in chunks of 1 to 64 bytes ends alike: the same messages delivered,
//!   the same error, the same bytes written back, the same subscription state;
//! - it writes back only CONNECT, PING and PONG, and delivers only subscribed topics.
//!
//! - under shared history, it writes only SUB, UNSUB and PUB (with JSON bodies) besides.
//!
//! Input: byte 0 picks the chunk size (bits 0-5), whether the session starts open with
//! subscriptions awaiting their PONG (bit 6), and whether it shares history through JetStream
//! (bit 7: HMSG, the API's answers, consumers' deliveries, heartbeats and flow control); the
//! rest is what the server sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fdcast::fuzz_nats_read(data));
