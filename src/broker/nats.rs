//! NATS core, spoken in its text protocol on one connection that both subscribes and
//! publishes.
//!
//! The session: the server speaks first with `INFO {json}`; we answer `CONNECT {json}` and
//! `PING`, and the session is open when that PING's `PONG` arrives (an `-ERR` before it, e.g.
//! `'Authorization Violation'`, fails the connection attempt). Every INFO, the first and the
//! ones a cluster sends later, updates the payload limit from its `max_payload`: the broker
//! refuses larger publishes before they are queued, as the server would refuse them by
//! closing the connection.
//!
//! A topic's subject is `prefix.topic`, escaped when the topic is not a plain subject
//! (`topic::nats_subject`). Each subscription gets a numeric sid, fresh per connection;
//! a `MSG` names its subscription by sid, so the topic is looked up by sid and never decoded
//! from the subject. A MSG for a sid we no longer hold (it was in flight when we wrote UNSUB)
//! is skipped.
//!
//! NATS does not acknowledge SUB and UNSUB, but answers commands in order: after a run of
//! them we write a PING, and its PONG says the run is in effect. A FIFO of the PINGs in
//! flight, each with the number of changes it confirms, turns PONGs into confirmations.
//!
//! # Our own messages
//! CONNECT says `"echo":false`: the server never delivers a connection's own publishes to
//! that connection's subscriptions (NATS 1.2 and later), so nothing that arrives is ours and
//! `ignored` stays 0. (The field is `echo`; a `no_echo` field would be ignored by the server,
//! and our publishes would come back.) Under shared history our publishes do come back, on
//! purpose, through our JetStream consumers: that is when this process delivers them.
//!
//! # Shared history
//! With history on, the session shares it through JetStream (`jetstream`): CONNECT asks for
//! headers (`HMSG`) and for a 503 status when the API has no responders, the handshake makes
//! sure the stream exists, publishes go out as `HPUB` with our origin header, and a topic is
//! subscribed through a push consumer instead of its subject.
//!
//! # What a hostile server cannot do
//! Make us buffer without bound (a control line has at most 8 KiB, an INFO 64 KiB; a MSG or
//! HMSG claiming more than 64 MiB, or twice the server's own `max_payload`, is refused before
//! it is buffered), or make us panic (every field is parsed with checks; `fuzz_read` runs the
//! parser on arbitrary bytes).

#![forbid(unsafe_code)]

mod jetstream;

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::outbound::{Encode, Publishes};
use super::stream::{Protocol, Sink, StreamEngine, Tls, TlsStart};
use super::url::BrokerUrl;
use super::{BrokerStats, Engine, Received, SharedHistory, topic};
use crate::error::Error;
use jetstream::{Headers, Own};

/// NATS's default `max_payload`, the limit until the server's INFO says otherwise.
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// The largest `max_payload` a NATS server can be configured with: no MSG is longer.
const MAX_MSG_LEN: u64 = 64 << 20;
/// The longest control line accepted (the server's own limit for ours is 4 KiB).
const MAX_CONTROL_LINE: usize = 8 << 10;
/// INFO gets more room: it lists the cluster's servers (`connect_urls`), long in a large
/// cluster.
const MAX_INFO_LINE: usize = 64 << 10;

/// An engine, and the encoder that writes its publishes' commands as they are queued.
pub(crate) type EngineWithEncoder = (Box<dyn Engine>, Box<dyn Encode>);

/// The engine for a `nats://[user:password@|token@]host[:port][,host[:port]…]` URL; `name`
/// is the subject prefix. It keeps `limit` at the server's `max_payload`; the encoder it
/// returns writes the `PUB` of each publish as it is queued. History is shared through
/// JetStream (see `jetstream`) while `history` says it is on.
pub(crate) fn engine(
    url: &str,
    name: &str,
    limit: &Arc<AtomicUsize>,
    history: Arc<SharedHistory>,
) -> Result<EngineWithEncoder, Error> {
    let mut url = BrokerUrl::parse(url, 4222)?;
    let mut protocol = NatsProtocol::new(&url, name, Arc::clone(limit))?;
    protocol.history = Some(history);
    let encoder = Box::new(PubEncoder::new(name, Arc::clone(&protocol.own)));
    // The server's INFO comes in the clear; TLS starts after it.
    let secure = url.scheme == "tls";
    let tls = Tls::from_url(&mut url, secure, TlsStart::AfterGreeting)?;
    let engine = StreamEngine::new(protocol, &url.hosts, tls)?;
    limit.store(DEFAULT_MAX_PAYLOAD, Ordering::Relaxed);
    Ok((Box::new(engine), encoder))
}

/// Writes `PUB <subject> <length>\r\n<payload>\r\n`, for the broker's queue (see
/// [`Encode`]) and for [`NatsProtocol::publish`]; a shared publish's record (empty topic), as
/// its `HPUB` (see `jetstream`).
pub(crate) struct PubEncoder {
    prefix: Box<[u8]>,
    own: Arc<Own>,
    /// The last topic published to, and its control line `PUB <subject> <length>\r\n`
    /// (empty before the first): runs of publishes to one topic are the common case, often
    /// of one length, and the line is written once for them.
    topic: Vec<u8>,
    line: Vec<u8>,
    /// Where the length starts in `line`, and the length it holds.
    length_at: usize,
    length: Option<usize>,
    /// Scratch for a subject, and for a shared publish's headers.
    subject: Vec<u8>,
    header: Vec<u8>,
    /// Per topic, the number of the last shared publish to it (see `jetstream`), by which
    /// receivers tell a loss. Forgotten whole past [`MAX_NUMBERED_TOPICS`] or
    /// [`MAX_NUMBERED_BYTES`] of names: the topics' numbers start again at 1, which receivers
    /// take as a new count, not a loss.
    numbers: HashMap<Box<[u8]>, u64>,
    /// The bytes of the names in `numbers`.
    numbered_bytes: usize,
}

/// Topics a publisher keeps a shared-publish number for, and the bytes of their names (a
/// topic may be 4 KiB long: 65,536 of those would hold 256 MiB).
const MAX_NUMBERED_TOPICS: usize = 1 << 16;
const MAX_NUMBERED_BYTES: usize = 4 << 20;

impl PubEncoder {
    fn new(prefix: &str, own: Arc<Own>) -> PubEncoder {
        PubEncoder {
            prefix: Box::from(prefix.as_bytes()),
            own,
            topic: Vec::new(),
            line: Vec::new(),
            length_at: 0,
            length: None,
            subject: Vec::new(),
            header: Vec::new(),
            numbers: HashMap::new(),
            numbered_bytes: 0,
        }
    }
}

impl Encode for PubEncoder {
    fn encode(&mut self, topic: &[u8], payload: &[u8], out: &mut Vec<u8>) {
        if self.topic != topic || self.line.is_empty() {
            topic::nats_subject(&self.prefix, topic, &mut self.subject);
            self.line.clear();
            self.line.extend_from_slice(b"PUB ");
            self.line.extend_from_slice(&self.subject);
            self.line.push(b' ');
            self.length_at = self.line.len();
            self.length = None;
            self.topic.clear();
            self.topic.extend_from_slice(topic);
        }
        if self.length != Some(payload.len()) {
            self.line.truncate(self.length_at);
            write_decimal(&mut self.line, payload.len() as u64);
            self.line.extend_from_slice(b"\r\n");
            self.length = Some(payload.len());
        }
        out.reserve(self.line.len() + payload.len() + 2);
        out.extend_from_slice(&self.line);
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
    }

    fn encode_shared(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
        out: &mut Vec<u8>,
    ) {
        let number = match self.numbers.get_mut(topic) {
            Some(number) => {
                *number += 1;
                *number
            }
            None => {
                if self.numbers.len() == MAX_NUMBERED_TOPICS
                    || self.numbered_bytes + topic.len() > MAX_NUMBERED_BYTES
                {
                    self.numbers.clear();
                    self.numbered_bytes = 0;
                }
                self.numbers.insert(Box::from(topic), 1);
                self.numbered_bytes += topic.len();
                1
            }
        };
        self.own.encode(
            &self.prefix,
            (topic, payload, except, number),
            (&mut self.subject, &mut self.header),
            out,
        );
    }

    fn interest(&mut self, topic: &[u8], subscribe: bool) {
        self.own.mark(topic, subscribe);
    }
}

/// The `PUB` (and `HPUB`) commands a [`PubEncoder`] wrote, one at a time: (the command, its payload's
/// length). Stops at the first it cannot read (none, from our own encoder).
fn pub_commands(mut rest: &[u8]) -> impl Iterator<Item = (&[u8], usize)> {
    std::iter::from_fn(move || {
        let line_end = rest.windows(2).position(|pair| pair == b"\r\n")?;
        let line = rest.get(..line_end)?;
        let length = line.rsplit(|&b| b == b' ').next().and_then(decimal)?;
        let end = line_end
            .checked_add(2)?
            .checked_add(usize::try_from(length).ok()?)?
            .checked_add(2)?;
        let command = rest.get(..end)?;
        rest = rest.get(end..)?;
        Some((command, length as usize))
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Session {
    /// Connected; the server has not sent its INFO yet.
    AwaitingInfo,
    /// CONNECT and PING written; the PONG opens the session.
    AwaitingPong,
    /// The PONG came; the JetStream stream's answer opens the session.
    AwaitingStream,
    Open,
}

/// A PING in flight.
struct Ping {
    /// Subscription changes written before it, and after the previous PING.
    changes: usize,
    /// Subscriptions live when it was written: in effect once its PONG arrives.
    live: usize,
    /// Publishes written before it, and after the previous PING: taken by the server once its
    /// PONG arrives.
    publishes: usize,
}

pub(crate) struct NatsProtocol {
    prefix: Box<[u8]>,
    /// Writes the PUB of a publish handed over as a record (the broker's queue writes them
    /// itself: `publish_encoded`).
    encoder: PubEncoder,
    /// CONNECT's credential fields, as JSON members with their leading commas ("" for none).
    credentials: String,
    /// The broker's payload limit, shared with the publishers' check.
    limit: Arc<AtomicUsize>,
    /// The connection switches to TLS after the INFO (a `tls://` URL).
    tls: bool,
    /// Publishes written and not yet added to the stats.
    published: u64,
    /// Publishes not written because they exceed the server's `max_payload` (it would close
    /// the connection), not yet added to the stats.
    refused: u64,
    // Per connection, from `start`:
    session: Session,
    next_sid: u64,
    topics: HashMap<u64, Box<[u8]>>,
    sids: HashMap<Box<[u8]>, u64>,
    pings: VecDeque<Ping>,
    /// Subscription changes written since the last PING.
    unpinged: usize,
    /// Publishes written since the last PING.
    unpinged_publishes: usize,
    /// Publishes written before a PING whose PONG has not arrived.
    pinged_publishes: usize,
    /// Subscription changes written and not yet confirmed by a PONG.
    unconfirmed: usize,
    /// Subscriptions in effect, as the last PONG confirmed them.
    subscribed: usize,
    /// This server's `max_payload`, for the MSG length guard.
    max_payload: usize,
    /// CONNECT said `headers:true`: HMSG may come.
    headers: bool,
    /// Scratch for a subject.
    subject: Vec<u8>,
    /// The registry's history settings (the engine's protocol; not the tests').
    history: jetstream::History,
    /// Shared with the publishers' encoder: this registry's origin and its publishes' count.
    own: Arc<Own>,
    js: jetstream::State,
}

impl NatsProtocol {
    /// Subscribes `subject` for `topic` under the next sid; returns the sid.
    fn write_sub(&mut self, topic: &[u8], subject: &[u8], out: &mut Vec<u8>) -> u64 {
        let sid = self.next_sid;
        self.next_sid += 1;
        out.reserve(subject.len() + 32);
        out.extend_from_slice(b"SUB ");
        out.extend_from_slice(subject);
        out.push(b' ');
        write_decimal(out, sid);
        out.extend_from_slice(b"\r\n");
        self.topics.insert(sid, Box::from(topic));
        self.sids.insert(Box::from(topic), sid);
        self.unpinged += 1;
        self.unconfirmed += 1;
        sid
    }

    fn new(url: &BrokerUrl, name: &str, limit: Arc<AtomicUsize>) -> Result<NatsProtocol, Error> {
        let tls = match url.scheme.as_str() {
            "nats" => false,
            "tls" => true,
            _ => {
                return Err(Error::InvalidArgument(
                    "a NATS URL starts with nats:// or tls://",
                ));
            }
        };
        if !url.path.is_empty() {
            return Err(Error::InvalidArgument(
                "a NATS URL has no path (nats://host:port)",
            ));
        }
        topic::check_nats_prefix(name)?;
        let own = Arc::new(Own::new());
        Ok(NatsProtocol {
            prefix: Box::from(name.as_bytes()),
            encoder: PubEncoder::new(name, Arc::clone(&own)),
            credentials: credentials(url.user.as_deref(), url.password.as_deref()),
            limit,
            tls,
            published: 0,
            refused: 0,
            session: Session::AwaitingInfo,
            next_sid: 1,
            topics: HashMap::new(),
            sids: HashMap::new(),
            pings: VecDeque::new(),
            unpinged: 0,
            unpinged_publishes: 0,
            pinged_publishes: 0,
            unconfirmed: 0,
            subscribed: 0,
            max_payload: DEFAULT_MAX_PAYLOAD,
            headers: false,
            subject: Vec::new(),
            history: None,
            own,
            js: jetstream::State::default(),
        })
    }

    fn info(&mut self, json: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if let Some(max_payload) = json_field(json, b"max_payload")
            .and_then(decimal)
            .filter(|&n| n > 0)
        {
            self.max_payload = usize::try_from(max_payload).unwrap_or(usize::MAX);
            self.limit.store(self.max_payload, Ordering::Relaxed);
        }
        if self.session != Session::AwaitingInfo {
            return Ok(());
        }
        if !self.tls && json_field(json, b"tls_required") == Some(b"true") {
            return Err(Error::Unreachable(
                "NATS: the server requires TLS: use a tls:// URL".into(),
            ));
        }
        // `"echo":false` is the echo filter (see the module's doc). Shared history needs
        // headers (ours, the heartbeats') and a 503 for an API nobody answers.
        self.headers = self.js.on;
        out.extend_from_slice(if self.js.on {
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"headers\":true,\
              \"no_responders\":true,\"lang\":\"rust-fdcast\",\"version\":\""
        } else {
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"headers\":false,\
              \"lang\":\"rust-fdcast\",\"version\":\""
        });
        out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
        out.extend_from_slice(b"\",\"protocol\":1");
        out.extend_from_slice(self.credentials.as_bytes());
        out.extend_from_slice(b"}\r\n");
        self.handshake_shared(out);
        out.extend_from_slice(b"PING\r\n");
        self.pings.push_back(Ping {
            changes: 0,
            live: 0,
            publishes: 0,
        });
        self.session = Session::AwaitingPong;
        Ok(())
    }

    /// A PING whose PONG confirms the subscription changes and publishes written since the
    /// last one.
    fn ping(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"PING\r\n");
        self.pings.push_back(Ping {
            changes: std::mem::take(&mut self.unpinged),
            live: self.sids.len(),
            publishes: std::mem::take(&mut self.unpinged_publishes),
        });
        self.pinged_publishes += self.pings.back().map_or(0, |ping| ping.publishes);
    }

    fn pong(&mut self) {
        // A PONG we did not ask for confirms nothing.
        let Some(ping) = self.pings.pop_front() else {
            return;
        };
        self.unconfirmed = self.unconfirmed.saturating_sub(ping.changes);
        self.pinged_publishes = self.pinged_publishes.saturating_sub(ping.publishes);
        self.subscribed = ping.live;
        if self.session == Session::AwaitingPong {
            self.session = if self.js.stream_pending {
                Session::AwaitingStream
            } else {
                Session::Open
            };
        }
    }

    fn server_error(&self, text: &[u8]) -> Result<(), Error> {
        let text = trim(text);
        let text = text
            .strip_prefix(b"'")
            .and_then(|text| text.strip_suffix(b"'"))
            .unwrap_or(text);
        let message = String::from_utf8_lossy(text);
        if self.session != Session::Open {
            return Err(Error::Unreachable(format!("NATS: {message}")));
        }
        // A refused SUB or PUB: the server carries on, and so do we.
        if starts_with_ignore_case(text, b"Permissions Violation") {
            return Ok(());
        }
        Err(Error::Backend(format!("NATS: {message}")))
    }

    /// A MSG (an HMSG when `with_headers`) whose control line is `args` and whose payload
    /// starts at `rest[body]`: the bytes it spans in `rest`, or `None` while its payload is
    /// incomplete.
    fn message(
        &mut self,
        args: &[u8],
        rest: &[u8],
        body: usize,
        with_headers: bool,
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> Result<Option<usize>, Error> {
        let bad = || protocol_error(format_args!("a bad MSG line: {}", shown(args)));
        // subject, sid, [reply,] [header length,] length
        let mut words: [&[u8]; 5] = [&[]; 5];
        let mut count = 0;
        for field in fields(args) {
            *words.get_mut(count).ok_or_else(bad)? = field;
            count += 1;
        }
        let numbers = 1 + usize::from(with_headers);
        if count < 2 + numbers || count > 3 + numbers {
            return Err(bad());
        }
        let (subject, sid) = (words[0], words[1]);
        let reply = (count == 3 + numbers).then_some(words[2]);
        let len = decimal(words[count - 1]).ok_or_else(bad)?;
        let header_len = if with_headers {
            decimal(words[count - 2])
                .filter(|&n| n <= len)
                .ok_or_else(bad)?
        } else {
            0
        };
        if len > MAX_MSG_LEN || len > (self.max_payload as u64).saturating_mul(2) {
            return Err(protocol_error(format_args!(
                "a MSG of {len} bytes, more than the server's max_payload allows"
            )));
        }
        // At most 64 MiB past `body`: no overflow.
        let end = body + len as usize;
        let Some(terminator) = rest.get(end..end + 2) else {
            return Ok(None);
        };
        if terminator != b"\r\n" {
            return Err(protocol_error("a MSG payload not followed by CRLF"));
        }
        let payload_at = body + header_len as usize;
        let (Some(header_block), Some(payload)) =
            (rest.get(body..payload_at), rest.get(payload_at..end))
        else {
            return Ok(Some(end + 2));
        };
        let headers = if with_headers {
            Headers::parse(header_block)
        } else {
            None
        };
        let Some(sid) = decimal(sid) else {
            return Ok(Some(end + 2));
        };
        if self.js.api_sid != 0 && sid == self.js.api_sid {
            self.api_answer(subject, headers, payload, out, sink);
        } else if self.js.is_consumer(sid) {
            self.consumer_message(sid, reply, headers, payload, out, sink);
        } else if let Some(topic) = self.topics.get(&sid) {
            sink.received.push(Received::new(topic, payload));
            sink.stats.received += 1;
        }
        Ok(Some(end + 2))
    }
}

impl Protocol for NatsProtocol {
    const NAME: &'static str = "NATS";

    /// Adds the publishes written, and those refused, since the last report to `stats`.
    fn report(&mut self, stats: &mut BrokerStats) {
        stats.published += std::mem::take(&mut self.published);
        stats.dropped += std::mem::take(&mut self.refused);
    }

    fn start(&mut self, _out: &mut Vec<u8>) {
        // The server speaks first: nothing to write before its INFO.
        self.session = Session::AwaitingInfo;
        self.next_sid = 1;
        self.topics.clear();
        self.sids.clear();
        self.pings.clear();
        self.unpinged = 0;
        self.unpinged_publishes = 0;
        self.pinged_publishes = 0;
        self.unconfirmed = 0;
        self.subscribed = 0;
        self.max_payload = DEFAULT_MAX_PAYLOAD;
        self.headers = false;
        self.start_shared();
    }

    fn read(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> Result<usize, Error> {
        self.report(sink.stats);
        self.report_unsynced(sink);
        let mut used = 0;
        loop {
            let rest = input.get(used..).unwrap_or_default();
            let Some((line, body)) = control_line(rest)? else {
                return Ok(used);
            };
            let (op, args) = split_op(line);
            let is = |keyword: &[u8]| op.eq_ignore_ascii_case(keyword);
            if self.session == Session::AwaitingInfo && !is(b"INFO") && !is(b"-ERR") {
                return Err(Error::Unreachable(format!(
                    "NATS: the server began with {} instead of INFO (is it a NATS server?)",
                    shown(line)
                )));
            }
            let len = if is(b"MSG") || (self.headers && is(b"HMSG")) {
                match self.message(args, rest, body, is(b"HMSG"), out, sink)? {
                    Some(len) => len,
                    None => return Ok(used),
                }
            } else if is(b"PING") {
                out.extend_from_slice(b"PONG\r\n");
                body
            } else if is(b"PONG") {
                self.pong();
                body
            } else if is(b"INFO") {
                self.info(args, out)?;
                body
            } else if is(b"+OK") {
                body
            } else if is(b"-ERR") {
                self.server_error(args)?;
                body
            } else if is(b"HMSG") {
                return Err(protocol_error("HMSG, though CONNECT said headers:false"));
            } else {
                return Err(protocol_error(format_args!(
                    "an unknown operation: {}",
                    shown(line)
                )));
            };
            used += len;
        }
    }

    fn is_open(&self) -> bool {
        self.session == Session::Open
    }

    fn greeted(&self) -> bool {
        self.session != Session::AwaitingInfo
    }

    fn subscribe(&mut self, topic: &[u8], out: &mut Vec<u8>) {
        if self.sids.contains_key(topic) {
            return;
        }
        if self.js.on {
            return self.subscribe_shared(topic, out);
        }
        topic::nats_subject(&self.prefix, topic, &mut self.subject);
        let subject = std::mem::take(&mut self.subject);
        self.write_sub(topic, &subject, out);
        self.subject = subject;
    }

    fn unsubscribe(&mut self, topic: &[u8], out: &mut Vec<u8>) {
        let Some(sid) = self.sids.remove(topic) else {
            return;
        };
        self.topics.remove(&sid);
        out.extend_from_slice(b"UNSUB ");
        write_decimal(out, sid);
        out.extend_from_slice(b"\r\n");
        self.unsubscribed_shared(sid, topic, out);
        self.unpinged += 1;
        self.unconfirmed += 1;
    }

    fn end_of_subscriptions(&mut self, out: &mut Vec<u8>) {
        if self.unpinged == 0 {
            return;
        }
        self.ping(out);
    }

    fn publish(&mut self, topic: &[u8], payload: &[u8], out: &mut Vec<u8>) {
        // A limit lowered by a later INFO may find publishes checked against the old one.
        if payload.len() > self.max_payload {
            self.refused += 1;
            return;
        }
        let mut parked = self.take_parked();
        let out = parked.as_mut().unwrap_or(out);
        self.encoder.encode(topic, payload, out);
        self.published += 1;
        self.unpinged_publishes += 1;
        self.put_parked(parked);
    }

    /// The queue's `PUB`s go out as they are, unless one carries more than the server's
    /// `max_payload` (lowered by an INFO after they were checked): then one by one, without
    /// those. (Under shared history they may be parked first: see `jetstream`.)
    fn publish_encoded(&mut self, publishes: &mut Publishes, out: &mut Vec<u8>) {
        let mut parked = self.take_parked();
        let out = parked.as_mut().unwrap_or(out);
        let count = if publishes.largest_payload() <= self.max_payload {
            let count = publishes.len();
            publishes.move_commands_to(out);
            count
        } else {
            let mut count = 0;
            for (command, length) in pub_commands(publishes.commands()) {
                if length > self.max_payload {
                    self.refused += 1;
                } else {
                    out.extend_from_slice(command);
                    count += 1;
                }
            }
            publishes.clear();
            count
        };
        self.published += count as u64;
        self.unpinged_publishes += count;
        self.put_parked(parked);
    }

    /// Once HOLD_AFTER publishes are written since the last PING, a PING: until its PONG,
    /// new publishes wait (`holding_publishes`) and then go out together. `always` (a
    /// disable) sends the parked ones too (see `jetstream`).
    fn end_of_publishes(&mut self, out: &mut Vec<u8>, always: bool) {
        if always {
            // The last word (a disable): parked publishes go now, consumer or not.
            out.append(&mut self.js.parked);
        }
        if self.unpinged_publishes == 0
            || (!always && self.unpinged_publishes < super::stream::HOLD_AFTER)
        {
            return;
        }
        self.ping(out);
    }

    fn holding_publishes(&self) -> bool {
        self.pinged_publishes > 0
    }

    /// The PONG confirms no publish, it only paces the publishers' writes: a dispatch turn
    /// writes what is queued at once, so that the server always has the next batch to read
    /// (waiting for each PONG left it idle for a round trip per batch).
    fn dispatch_sends_held(&self) -> bool {
        true
    }

    fn awaiting_answers(&self) -> bool {
        !self.pings.is_empty()
    }

    fn unconfirmed(&self) -> usize {
        self.unconfirmed
    }

    /// NATS core confirms no publish: once written, a publish's fate is the server's.
    fn in_flight(&self) -> usize {
        0
    }

    fn subscribed(&self) -> usize {
        self.subscribed
    }

    fn shares_history(&self) -> bool {
        self.history.is_some()
    }

    fn deadline(&self) -> Option<Instant> {
        if self.js.on {
            self.silence_deadline()
        } else {
            None
        }
    }

    fn on_deadline(&mut self, now: Instant, out: &mut Vec<u8>) {
        if self.js.on {
            self.replace_silent(now, out);
        }
    }
}

/// CONNECT's credential members: `user`/`pass` when the URL has a password, `auth_token`
/// when it has only a user part (`nats://token@host`, as the NATS clients read it).
fn credentials(user: Option<&str>, password: Option<&str>) -> String {
    let mut json = String::new();
    match (user, password) {
        (user, Some(password)) => {
            if let Some(user) = user {
                json.push_str(",\"user\":");
                json_string(&mut json, user);
            }
            json.push_str(",\"pass\":");
            json_string(&mut json, password);
        }
        (Some(token), None) => {
            json.push_str(",\"auth_token\":");
            json_string(&mut json, token);
        }
        (None, None) => {}
    }
    json
}

/// Appends `text` as a JSON string literal.
fn json_string(json: &mut String, text: &str) {
    json.push('"');
    for c in text.chars() {
        match c {
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            '\n' => json.push_str("\\n"),
            '\r' => json.push_str("\\r"),
            '\t' => json.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                json.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => json.push(c),
        }
    }
    json.push('"');
}

/// The control line at the front of `rest`, without its line end, and where the bytes after
/// it start; `None` while it is incomplete. A bare LF ends a line too, as in the NATS clients.
fn control_line(rest: &[u8]) -> Result<Option<(&[u8], usize)>, Error> {
    let limit = if starts_with_ignore_case(rest, b"INFO") {
        MAX_INFO_LINE
    } else {
        MAX_CONTROL_LINE
    };
    let window = rest.get(..limit + 2).unwrap_or(rest);
    match window.iter().position(|&b| b == b'\n') {
        Some(at) => {
            let line = window.get(..at).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > limit {
                return Err(protocol_error(format_args!(
                    "a control line longer than {limit} bytes"
                )));
            }
            Ok(Some((line, at + 1)))
        }
        None if window.len() == limit + 2 => Err(protocol_error(format_args!(
            "a control line longer than {limit} bytes"
        ))),
        None => Ok(None),
    }
}

/// A control line's operation and its arguments (leading blanks trimmed).
fn split_op(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| is_blank(b)) {
        Some(at) => {
            let (op, args) = line.split_at(at);
            let start = args
                .iter()
                .position(|&b| !is_blank(b))
                .unwrap_or(args.len());
            (op, args.get(start..).unwrap_or_default())
        }
        None => (line, &[]),
    }
}

fn is_blank(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// The blank-separated fields of a control line's arguments.
fn fields(args: &[u8]) -> impl Iterator<Item = &[u8]> {
    args.split(|&b| is_blank(b))
        .filter(|field| !field.is_empty())
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_blank(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| !is_blank(b))
        .map_or(start, |at| at + 1);
    bytes.get(start..end).unwrap_or_default()
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// A non-empty run of decimal digits that fits a u64.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &digit| {
        if digit.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        } else {
            None
        }
    })
}

/// Appends `n` in decimal, without allocating.
fn write_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The raw text of `key`'s value at the top level of the JSON object `json`; `None` when it
/// is absent or the JSON cannot be read that far. Iterative and bounds-checked: any bytes at
/// all give an answer without panic, in one pass.
fn json_field<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut at = skip_space(json, 0);
    if json.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_space(json, at);
        if json.get(at) != Some(&b'"') {
            return None;
        }
        let name_end = json_value_end(json, at)?;
        let name = json.get(at + 1..name_end - 1)?;
        at = skip_space(json, name_end);
        if json.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(json, at + 1);
        let value_end = json_value_end(json, at)?;
        if name == key {
            return json.get(at..value_end);
        }
        at = skip_space(json, value_end);
        if json.get(at) != Some(&b',') {
            return None;
        }
        at += 1;
    }
}

fn skip_space(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(|b| b" \t\r\n".contains(b)) {
        at += 1;
    }
    at
}

/// Where the JSON value starting at `json[start]` ends (one past its last byte).
fn json_value_end(json: &[u8], start: usize) -> Option<usize> {
    let string_end = |start: usize| -> Option<usize> {
        let mut at = start + 1;
        loop {
            match json.get(at)? {
                b'"' => return Some(at + 1),
                b'\\' => at += 2,
                _ => at += 1,
            }
        }
    };
    match json.get(start)? {
        b'"' => string_end(start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = start;
            loop {
                match json.get(at)? {
                    b'"' => {
                        at = string_end(at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
        }
        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
            let tail = json.get(start..)?;
            let len = tail
                .iter()
                .position(|b| b",}] \t\r\n".contains(b))
                .unwrap_or(tail.len());
            Some(start + len)
        }
        _ => None,
    }
}

/// The first bytes of a line, for an error message.
fn shown(line: &[u8]) -> String {
    format!(
        "{:?}",
        String::from_utf8_lossy(line.get(..64).unwrap_or(line))
    )
}

fn protocol_error(what: impl Display) -> Error {
    Error::Backend(format!("NATS: protocol error: {what}"))
}

/// For the fuzz target (`fuzz/fuzz_targets/nats_parse.rs`): runs `bytes[1..]`, as what a
/// server sends, through a fresh protocol, read whole and read in chunks of `bytes[0] % 64 +
/// 1` bytes, and panics if an invariant breaks: `read` uses no more than it is given, acts
/// only on whole commands (so both readings end alike: the same messages, errors, replies
/// and state), writes only CONNECT, PING and PONG (and, under shared history, SUB, UNSUB and
/// PUB with their JSON bodies), and delivers only subscribed topics.
/// `bytes[0] & 0x40` starts from an open session with subscriptions awaiting their PONG;
/// `bytes[0] & 0x80` shares history (JetStream, inbox `_INBOX.f.`: the API's sid is 1, and
/// when open, the stream is created and the topics' consumers are sids 2 and 3, their
/// creations answered by `_INBOX.f.a.2` and `_INBOX.f.a.3`).
#[doc(hidden)]
pub fn fuzz_read(bytes: &[u8]) {
    let Some((&control, stream)) = bytes.split_first() else {
        return;
    };
    let open = control & 0x40 != 0;
    let shared = control & 0x80 != 0;
    let whole = fuzz_run(stream, stream.len().max(1), open, shared);
    let chunked = fuzz_run(stream, usize::from(control % 64) + 1, open, shared);
    assert_eq!(whole, chunked, "reading in chunks changed the outcome");
}

#[derive(Debug, PartialEq)]
struct FuzzOutcome {
    delivered: Vec<(Vec<u8>, Vec<u8>, Option<super::Stream>)>,
    error: Option<String>,
    written: Vec<u8>,
    unused: Vec<u8>,
    stats: BrokerStats,
    open: bool,
    unconfirmed: usize,
    subscribed: usize,
}

fn fuzz_run(stream: &[u8], step: usize, open: bool, shared: bool) -> FuzzOutcome {
    let url = BrokerUrl {
        scheme: "nats".into(),
        user: Some("u".into()),
        password: Some("p".into()),
        hosts: vec![("127.0.0.1".into(), 4222)],
        path: String::new(),
        query: Vec::new(),
    };
    let limit = Arc::new(AtomicUsize::new(DEFAULT_MAX_PAYLOAD));
    let mut nats = NatsProtocol::new(&url, "app", limit).expect("a valid URL and prefix");
    if shared {
        let history = Arc::new(SharedHistory::default());
        history.set(crate::history::HistoryLimits {
            max_messages: 5,
            ..Default::default()
        });
        nats.history = Some(history);
    }
    let mut received = Vec::new();
    let mut stats = BrokerStats::default();
    let mut scratch = Vec::new();
    nats.start(&mut scratch);
    nats.js.fix_inbox(b"_INBOX.f.");
    let topics: [&[u8]; 2] = [b"news", b"a b"];
    let mut changes = 0;
    if open {
        let mut sink = Sink {
            received: &mut received,
            stats: &mut stats,
        };
        let handshake: &[u8] = if shared {
            b"INFO {\"max_payload\":4096}\r\nPONG\r\nMSG _INBOX.f.a.1 1 57\r\n\
              {\"created\":\"2026-12-06T17:50:30Z\",\"state\":{\"last_seq\":3}}\r\n"
        } else {
            b"INFO {\"max_payload\":4096}\r\nPONG\r\n"
        };
        let used = nats.read(handshake, &mut scratch, &mut sink);
        assert!(matches!(used, Ok(n) if n == handshake.len()) && nats.is_open());
        for topic in topics {
            nats.subscribe(topic, &mut scratch);
        }
        // An unsubscribed topic's mirror is told so on the next read, before what it reads.
        if !shared {
            nats.subscribe(b"gone", &mut scratch);
            nats.unsubscribe(b"gone", &mut scratch);
        }
        nats.end_of_subscriptions(&mut scratch);
        changes = if shared { 2 } else { 4 };
        assert_eq!(nats.unconfirmed(), changes);
    }
    let mut input = Vec::new();
    let mut written = Vec::new();
    let mut error = None;
    for chunk in stream.chunks(step) {
        input.extend_from_slice(chunk);
        let (delivered, wrote) = (received.len(), written.len());
        let mut sink = Sink {
            received: &mut received,
            stats: &mut stats,
        };
        match nats.read(&input, &mut written, &mut sink) {
            Ok(used) => {
                assert!(used <= input.len(), "used {used} of {} bytes", input.len());
                assert!(
                    used > 0 || (received.len() == delivered && written.len() == wrote),
                    "acted on a command it did not use"
                );
                input.drain(..used);
            }
            Err(err) => {
                error = Some(format!("{} {err:?}", err.errno()));
                break;
            }
        }
        // A consumer recreated after a gap is one more change each time.
        assert!(shared || nats.unconfirmed() <= changes);
        assert!(nats.subscribed() <= topics.len());
    }
    for message in &received {
        assert!(
            topics.contains(&message.topic()),
            "delivered an unsubscribed topic"
        );
    }
    for line in written
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
    {
        let js = shared
            && (line == b"\r"
                || [&b"SUB "[..], b"UNSUB ", b"PUB ", b"{"]
                    .iter()
                    .any(|op| line.starts_with(op)));
        assert!(
            line == b"PING\r" || line == b"PONG\r" || line.starts_with(b"CONNECT {") || js,
            "wrote {:?}",
            String::from_utf8_lossy(line)
        );
    }
    FuzzOutcome {
        delivered: received
            .iter()
            .map(|message| {
                (
                    message.topic().to_vec(),
                    message.payload().to_vec(),
                    message.stream,
                )
            })
            .collect(),
        unused: if error.is_none() { input } else { Vec::new() },
        error,
        written,
        stats,
        open: nats.is_open(),
        unconfirmed: nats.unconfirmed(),
        subscribed: nats.subscribed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::stream::testing::{self, Feed};
    use crate::broker::topic::MAX_SUBJECT_LEN;

    fn protocol(url: &str, prefix: &str) -> NatsProtocol {
        let limit = Arc::new(AtomicUsize::new(DEFAULT_MAX_PAYLOAD));
        NatsProtocol::new(&BrokerUrl::parse(url, 4222).unwrap(), prefix, limit).unwrap()
    }

    const INFO: &[u8] = b"INFO {\"server_id\":\"x\",\"version\":\"2.9.10\",\"proto\":1,\
        \"headers\":true,\"max_payload\":1048576} \r\n";

    /// A protocol whose session is open, with prefix "app".
    fn open() -> NatsProtocol {
        let mut nats = protocol("nats://127.0.0.1", "app");
        nats.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        assert!(nats.is_open());
        nats
    }

    /// An open protocol subscribed (and confirmed) to `topics`, sids 1, 2, ... in order.
    fn subscribed(topics: &[&[u8]]) -> NatsProtocol {
        let mut nats = open();
        let mut out = Vec::new();
        for topic in topics {
            nats.subscribe(topic, &mut out);
        }
        nats.end_of_subscriptions(&mut out);
        Feed::default().all(&mut nats, b"PONG\r\n").unwrap();
        assert_eq!(nats.unconfirmed(), 0);
        nats
    }

    fn msg(subject: &str, sid: u64, reply: Option<&str>, payload: &[u8]) -> Vec<u8> {
        let reply = reply.map(|reply| format!(" {reply}")).unwrap_or_default();
        let mut line = format!("MSG {subject} {sid}{reply} {}\r\n", payload.len()).into_bytes();
        line.extend_from_slice(payload);
        line.extend_from_slice(b"\r\n");
        line
    }

    fn connect_line(credentials: &str) -> Vec<u8> {
        format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false,\"headers\":false,\
             \"lang\":\"rust-fdcast\",\"version\":\"{}\",\"protocol\":1{credentials}}}\r\nPING\r\n",
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes()
    }

    #[test]
    fn the_handshake_answers_info_with_connect_and_opens_on_its_pong() {
        let limit = Arc::new(AtomicUsize::new(DEFAULT_MAX_PAYLOAD));
        let url = BrokerUrl::parse("nats://127.0.0.1", 4222).unwrap();
        let mut nats = NatsProtocol::new(&url, "app", Arc::clone(&limit)).unwrap();
        let mut out = Vec::new();
        nats.start(&mut out);
        assert!(out.is_empty(), "the server speaks first");
        assert!(!nats.is_open());

        let mut feed = Feed::default();
        feed.bytes(
            &mut nats,
            b"INFO {\"max_payload\":2048,\"x\":[1,{\"max_payload\":9}]}",
        )
        .unwrap();
        assert!(
            feed.out.is_empty(),
            "INFO is incomplete without its line end"
        );
        feed.all(&mut nats, b"\r\n").unwrap();
        assert_eq!(limit.load(Ordering::Relaxed), 2048);
        assert_eq!(feed.out, connect_line(""));
        assert!(!nats.is_open(), "open only once the PING is answered");
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        assert!(nats.is_open());

        // A later INFO (a cluster's update) changes the limit and writes nothing.
        feed.out.clear();
        feed.all(
            &mut nats,
            b"info\t{\"connect_urls\":[\"a:1\"],\"max_payload\":65536}\r\n",
        )
        .unwrap();
        assert_eq!(limit.load(Ordering::Relaxed), 65536);
        assert!(feed.out.is_empty());

        // A new connection forgets the session, not the limit.
        nats.start(&mut out);
        assert!(!nats.is_open());
        assert_eq!(limit.load(Ordering::Relaxed), 65536);
    }

    #[test]
    fn credentials_are_sent_json_escaped() {
        let mut nats = protocol("nats://al%22i%5Cce:p%0A%01%C3%A9@127.0.0.1", "app");
        nats.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        assert_eq!(
            feed.out,
            connect_line(r#","user":"al\"i\\ce","pass":"p\n\u0001é""#)
        );

        let mut nats = protocol("nats://s3cr%22t@127.0.0.1", "app");
        nats.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        assert_eq!(feed.out, connect_line(r#","auth_token":"s3cr\"t""#));

        let mut nats = protocol("nats://:pw@127.0.0.1", "app");
        nats.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        assert_eq!(feed.out, connect_line(r#","pass":"pw""#));
    }

    #[test]
    fn an_error_before_the_session_opens_fails_the_connection() {
        let mut nats = protocol("nats://u:bad@127.0.0.1", "app");
        nats.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        let err = feed
            .bytes(&mut nats, b"-ERR 'Authorization Violation'\r\n")
            .unwrap_err();
        assert_eq!(err.errno(), libc::ECONNREFUSED);
        assert!(
            format!("{err:?}").contains("NATS: Authorization Violation"),
            "{err:?}"
        );
        assert!(!nats.is_open());

        // Even before INFO (a server refusing connections).
        let mut nats = protocol("nats://127.0.0.1", "app");
        nats.start(&mut Vec::new());
        let err = Feed::default()
            .bytes(&mut nats, b"-ERR 'maximum connections exceeded'\r\n")
            .unwrap_err();
        assert_eq!(err.errno(), libc::ECONNREFUSED);
    }

    #[test]
    fn a_server_that_does_not_begin_with_info_is_refused() {
        for first in [
            &b"+OK\r\n"[..],
            b"PING\r\n",
            b"MSG a 1 0\r\n\r\n",
            b"-NOAUTH x\r\n",
        ] {
            let mut nats = protocol("nats://127.0.0.1", "app");
            nats.start(&mut Vec::new());
            let mut feed = Feed::default();
            let err = feed.bytes(&mut nats, first).unwrap_err();
            assert!(
                matches!(err.errno(), libc::ECONNREFUSED | libc::EIO),
                "{err:?}"
            );
            assert!(feed.out.is_empty());
        }
    }

    #[test]
    fn a_server_requiring_tls_is_refused() {
        let mut nats = protocol("nats://127.0.0.1", "app");
        nats.start(&mut Vec::new());
        let mut feed = Feed::default();
        let err = feed
            .bytes(
                &mut nats,
                b"INFO {\"tls_required\":true,\"max_payload\":1}\r\n",
            )
            .unwrap_err();
        assert_eq!(err.errno(), libc::ECONNREFUSED);
        assert!(feed.out.is_empty(), "no credentials sent in the clear");
    }

    #[test]
    fn messages_are_delivered_with_or_without_reply_to() {
        let mut nats = subscribed(&[b"news", b"two words"]);
        let mut feed = Feed::default();
        let stream = [
            msg("app.news", 1, None, b"hello"),
            msg("app.two%20words", 2, Some("_INBOX.x"), b"with reply"),
            msg("app.news", 1, None, b""),
            msg("app.news", 1, None, b"bin\r\n\0ary"),
            b"msg\tapp.news\t 1  \t3\r\nlow\r\n".to_vec(),
        ]
        .concat();
        feed.all(&mut nats, &stream).unwrap();
        assert_eq!(
            feed.delivered(),
            vec![
                (b"news".to_vec(), b"hello".to_vec()),
                (b"two words".to_vec(), b"with reply".to_vec()),
                (b"news".to_vec(), b"".to_vec()),
                (b"news".to_vec(), b"bin\r\n\0ary".to_vec()),
                (b"news".to_vec(), b"low".to_vec()),
            ]
        );
        assert_eq!(feed.stats.received, 5);
        assert_eq!((feed.stats.ignored, feed.stats.malformed), (0, 0));
        assert!(feed.out.is_empty());
    }

    #[test]
    fn an_incomplete_message_is_left_unused_until_it_is_whole() {
        let mut nats = subscribed(&[b"news"]);
        let mut feed = Feed::default();
        feed.bytes(&mut nats, b"MSG app.news 1 5\r\nhel").unwrap();
        assert_eq!(feed.input, b"MSG app.news 1 5\r\nhel");
        feed.bytes(&mut nats, b"lo\r").unwrap();
        assert!(feed.received.is_empty());
        feed.all(&mut nats, b"\n").unwrap();
        assert_eq!(
            feed.delivered(),
            vec![(b"news".to_vec(), b"hello".to_vec())]
        );
    }

    #[test]
    fn every_split_of_the_stream_gives_the_same_outcome() {
        let stream = [
            msg("app.a", 1, None, b"first"),
            b"PING\r\n".to_vec(),
            msg("app.b", 2, Some("reply.to"), b"x\r\ny"),
            b"+OK\r\n".to_vec(),
            msg("app.gone", 99, None, b"skipped"),
            b"INFO {\"max_payload\":2000000}\r\n".to_vec(),
            b"-ERR 'Permissions Violation for Subscription to \"app.z\"'\r\n".to_vec(),
            b"PONG\r\n".to_vec(),
            msg("app.a", 1, None, b""),
            b"ping\n".to_vec(),
        ]
        .concat();
        let expected = vec![
            (b"a".to_vec(), b"first".to_vec()),
            (b"b".to_vec(), b"x\r\ny".to_vec()),
            (b"a".to_vec(), b"".to_vec()),
        ];
        let run = |chunks: &[&[u8]]| {
            let mut nats = subscribed(&[b"a", b"b"]);
            let mut out = Vec::new();
            nats.subscribe(b"c", &mut out);
            nats.end_of_subscriptions(&mut out);
            let mut feed = Feed::default();
            for chunk in chunks {
                feed.bytes(&mut nats, chunk).unwrap();
            }
            assert!(feed.input.is_empty());
            assert_eq!(feed.delivered(), expected);
            assert_eq!(feed.out, b"PONG\r\nPONG\r\n");
            assert_eq!((nats.unconfirmed(), nats.subscribed()), (0, 3));
        };
        for at in 0..=stream.len() {
            let (head, tail) = stream.split_at(at);
            run(&[head, tail]);
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        run(&bytes);
    }

    #[test]
    fn a_server_ping_is_answered_with_pong() {
        let mut nats = open();
        let mut feed = Feed::default();
        feed.all(&mut nats, b"PING\r\nPing\r\n").unwrap();
        assert_eq!(feed.out, b"PONG\r\nPONG\r\n");
        // Not mistaken for the answer to one of ours.
        assert_eq!(nats.unconfirmed(), 0);
    }

    #[test]
    fn messages_for_unknown_sids_are_skipped() {
        let mut nats = subscribed(&[b"news"]);
        let mut out = Vec::new();
        nats.unsubscribe(b"news", &mut out);
        assert_eq!(out, b"UNSUB 1\r\n");
        let mut feed = Feed::default();
        let stream = [
            msg("app.news", 1, None, b"in flight before UNSUB"),
            msg("app.other", 7, None, b"never ours"),
            b"MSG app.x notanumber 2\r\nab\r\n".to_vec(),
            msg("app.x", u64::MAX, None, b"max"),
        ]
        .concat();
        feed.all(&mut nats, &stream).unwrap();
        assert!(feed.received.is_empty());
        assert_eq!((feed.stats.received, feed.stats.malformed), (0, 0));
    }

    #[test]
    fn bad_message_lines_are_protocol_errors() {
        let bad: &[&[u8]] = &[
            b"MSG\r\n",
            b"MSG app.news\r\n",
            b"MSG app.news 1\r\n",
            b"MSG app.news 1 reply 5 extra\r\nhello\r\n",
            b"MSG app.news 1 -5\r\nhello\r\n",
            b"MSG app.news 1 +5\r\nhello\r\n",
            b"MSG app.news 1 5x\r\nhello\r\n",
            b"MSG app.news 1 99999999999999999999999\r\n",
            b"MSG app.news 1 5\r\nhello!!",
            b"MSG app.news 1 5\r\nhello\n\n",
            b"MSG app.news 1 0\r\nXY",
            b"HMSG app.news 1 0 0\r\n\r\n",
            b"WHAT\r\n",
            b"\r\n",
            b" PING\r\n",
        ];
        for stream in bad {
            let mut nats = subscribed(&[b"news"]);
            let mut feed = Feed::default();
            let err = feed.bytes(&mut nats, stream).unwrap_err();
            assert_eq!(
                err.errno(),
                libc::EIO,
                "{:?}",
                String::from_utf8_lossy(stream)
            );
            assert!(feed.received.is_empty());
        }
    }

    #[test]
    fn huge_lengths_and_long_lines_are_refused_before_they_are_buffered() {
        let mut nats = subscribed(&[b"news"]);
        // The server said max_payload 1 MiB: twice that is the most a MSG may claim.
        Feed::default()
            .bytes(&mut nats, b"MSG app.news 1 2097152\r\n")
            .unwrap();
        let err = Feed::default()
            .bytes(&mut nats, b"MSG app.news 1 2097153\r\n")
            .unwrap_err();
        assert_eq!(err.errno(), libc::EIO);

        let mut nats = subscribed(&[b"news"]);
        Feed::default()
            .all(&mut nats, b"INFO {\"max_payload\":1000000000}\r\n")
            .unwrap();
        let claim = format!("MSG app.news 1 {}\r\n", (64 << 20) + 1);
        assert!(Feed::default().bytes(&mut nats, claim.as_bytes()).is_err());

        let mut nats = subscribed(&[b"news"]);
        let mut feed = Feed::default();
        feed.bytes(&mut nats, &vec![b'M'; MAX_CONTROL_LINE + 1])
            .unwrap();
        assert!(feed.bytes(&mut nats, b"M").is_err());

        // INFO has more room, up to its own limit.
        let mut nats = subscribed(&[b"news"]);
        let long_info = [
            b"INFO {\"a\":\"".as_slice(),
            &vec![b'x'; MAX_CONTROL_LINE * 2],
            b"\"}",
        ]
        .concat();
        let mut feed = Feed::default();
        feed.bytes(&mut nats, &long_info).unwrap();
        feed.all(&mut nats, b"\r\n").unwrap();
        let too_long = [b"INFO ".as_slice(), &vec![b'x'; MAX_INFO_LINE]].concat();
        let mut feed = Feed::default();
        feed.bytes(&mut nats, &too_long[..MAX_INFO_LINE]).unwrap();
        assert!(feed.bytes(&mut nats, &too_long[MAX_INFO_LINE..]).is_err());
    }

    #[test]
    fn subscriptions_are_confirmed_by_the_pong_of_their_ping() {
        let mut nats = open();
        let mut out = Vec::new();
        nats.subscribe(b"a", &mut out);
        nats.subscribe(b"b", &mut out);
        nats.subscribe(b"a", &mut out);
        nats.end_of_subscriptions(&mut out);
        assert_eq!(out, b"SUB app.a 1\r\nSUB app.b 2\r\nPING\r\n");
        assert_eq!((nats.unconfirmed(), nats.subscribed()), (2, 0));

        out.clear();
        nats.unsubscribe(b"a", &mut out);
        nats.unsubscribe(b"never", &mut out);
        nats.subscribe(b"c", &mut out);
        nats.end_of_subscriptions(&mut out);
        assert_eq!(out, b"UNSUB 1\r\nSUB app.c 3\r\nPING\r\n");
        assert_eq!(nats.unconfirmed(), 4);

        // Nothing changed since: no PING.
        out.clear();
        nats.end_of_subscriptions(&mut out);
        assert!(out.is_empty());

        let mut feed = Feed::default();
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        assert_eq!((nats.unconfirmed(), nats.subscribed()), (2, 2));
        feed.all(&mut nats, b"pong\r\n").unwrap();
        assert_eq!((nats.unconfirmed(), nats.subscribed()), (0, 2));
        // One more, unasked for, changes nothing.
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        assert_eq!((nats.unconfirmed(), nats.subscribed()), (0, 2));

        // A new connection starts with no subscription and sid 1.
        nats.start(&mut out);
        assert_eq!((nats.unconfirmed(), nats.subscribed()), (0, 0));
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        out.clear();
        nats.subscribe(b"c", &mut out);
        assert_eq!(out, b"SUB app.c 1\r\n");
    }

    #[test]
    fn only_permission_violations_are_survived_once_open() {
        let mut nats = subscribed(&[b"news"]);
        let mut feed = Feed::default();
        feed.all(
            &mut nats,
            b"-ERR 'Permissions Violation for Publish to \"app.news\"'\r\n\
              -err 'permissions violation for subscription to \"app.x\"'\r\n",
        )
        .unwrap();
        feed.all(&mut nats, &msg("app.news", 1, None, b"still here"))
            .unwrap();
        assert_eq!(feed.received.len(), 1);
        assert_eq!(
            feed.stats,
            BrokerStats {
                received: 1,
                ..BrokerStats::default()
            }
        );

        for fatal in [
            &b"-ERR 'Stale Connection'\r\n"[..],
            b"-ERR 'Slow Consumer'\r\n",
            b"-ERR\r\n",
        ] {
            let mut nats = subscribed(&[b"news"]);
            let err = Feed::default().bytes(&mut nats, fatal).unwrap_err();
            assert_eq!(err.errno(), libc::EIO);
        }
    }

    #[test]
    fn a_run_of_publishes_ends_in_a_ping_and_later_ones_wait_for_its_pong() {
        use crate::broker::stream::HOLD_AFTER;
        let mut nats = open();
        let mut out = Vec::new();
        // A short run: no PING, nothing held.
        for _ in 0..HOLD_AFTER - 1 {
            nats.publish(b"news", b"x", &mut out);
        }
        nats.end_of_publishes(&mut out, false);
        assert!(!out.ends_with(b"PING\r\n"));
        assert!(!nats.holding_publishes());
        // The run that reaches HOLD_AFTER: a PING, and publishes wait for its PONG.
        nats.publish(b"news", b"x", &mut out);
        nats.end_of_publishes(&mut out, false);
        assert!(out.ends_with(b"PUB app.news 1\r\nx\r\nPING\r\n"));
        assert!(nats.holding_publishes());
        assert_eq!(nats.in_flight(), 0);
        let mut feed = Feed::default();
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        assert!(!nats.holding_publishes());
        assert_eq!(feed.stats.published, HOLD_AFTER as u64);
    }

    #[test]
    fn publishes_are_written_as_pub_and_counted_on_the_next_read() {
        let mut nats = open();
        let mut out = Vec::new();
        nats.publish(b"news", b"hello", &mut out);
        nats.publish(b"a.b", b"", &mut out);
        nats.publish(b"x y", b"\r\n", &mut out);
        assert_eq!(
            out,
            b"PUB app.news 5\r\nhello\r\nPUB app.a.b 0\r\n\r\nPUB app.x%20y 2\r\n\r\n\r\n"
        );
        assert_eq!(nats.in_flight(), 0);
        let mut feed = Feed::default();
        feed.all(&mut nats, b"PING\r\n").unwrap();
        assert_eq!(feed.stats.published, 3);
        feed.all(&mut nats, b"PING\r\n").unwrap();
        assert_eq!(feed.stats.published, 3);
    }

    #[test]
    fn a_topic_published_again_gets_its_own_subject_whatever_came_between() {
        let mut nats = open();
        let mut out = Vec::new();
        nats.publish(b"news", b"1", &mut out);
        nats.publish(b"news", b"2", &mut out);
        nats.publish(b"new", b"3", &mut out);
        nats.subscribe(b"x y", &mut out);
        nats.publish(b"news", b"4", &mut out);
        assert_eq!(
            out,
            b"PUB app.news 1\r\n1\r\nPUB app.news 1\r\n2\r\nPUB app.new 1\r\n3\r\n\
              SUB app.x%20y 1\r\nPUB app.news 1\r\n4\r\n"
        );
    }

    #[test]
    fn a_publish_over_the_servers_max_payload_is_dropped_not_written() {
        let mut nats = open();
        Feed::default()
            .all(&mut nats, b"INFO {\"max_payload\":4}\r\n")
            .unwrap();
        let mut out = Vec::new();
        nats.publish(b"t", b"12345", &mut out);
        nats.publish(b"t", b"1234", &mut out);
        assert_eq!(out, b"PUB app.t 4\r\n1234\r\n");
        let mut stats = BrokerStats::default();
        nats.report(&mut stats);
        assert_eq!((stats.published, stats.dropped), (1, 1));
    }

    /// `publishes` queued as the broker's queue does: each PUB written at push time.
    fn queued(publishes: &[(&[u8], &[u8])]) -> Publishes {
        let mut encoder = PubEncoder::new("app", Arc::new(Own::new()));
        let mut queued = Publishes::default();
        for (topic, payload) in publishes {
            queued.push_encoded(topic, payload, &mut encoder);
        }
        queued
    }

    #[test]
    fn queued_pubs_go_out_as_written_and_are_counted() {
        let mut nats = open();
        let mut queue = queued(&[(b"news", b"1"), (b"x y", b"\r\n"), (b"news", b"")]);
        let mut out = b"SUB app.a 1\r\n".to_vec();
        nats.publish_encoded(&mut queue, &mut out);
        assert_eq!(
            out,
            b"SUB app.a 1\r\nPUB app.news 1\r\n1\r\nPUB app.x%20y 2\r\n\r\n\r\n\
              PUB app.news 0\r\n\r\n"
        );
        assert!(queue.is_empty());
        // Into an empty output the queue's buffer is handed over whole.
        let mut queue = queued(&[(b"t", b"abc")]);
        let mut out = Vec::new();
        nats.publish_encoded(&mut queue, &mut out);
        assert_eq!(out, b"PUB app.t 3\r\nabc\r\n");
        let mut stats = BrokerStats::default();
        nats.report(&mut stats);
        assert_eq!((stats.published, stats.dropped), (4, 0));
    }

    #[test]
    fn queued_pubs_over_a_max_payload_lowered_since_are_dropped_and_counted() {
        let mut nats = open();
        let mut queue = queued(&[
            (b"t", b"1234"),
            (b"t", b"12345"),
            (b"t", b"\r\n\r\n"),
            (b"u", b"123456"),
            (b"t", b""),
        ]);
        Feed::default()
            .all(&mut nats, b"INFO {\"max_payload\":4}\r\n")
            .unwrap();
        let mut out = Vec::new();
        nats.publish_encoded(&mut queue, &mut out);
        assert_eq!(
            out,
            b"PUB app.t 4\r\n1234\r\nPUB app.t 4\r\n\r\n\r\n\r\nPUB app.t 0\r\n\r\n"
        );
        assert!(queue.is_empty());
        let mut stats = BrokerStats::default();
        nats.report(&mut stats);
        assert_eq!((stats.published, stats.dropped), (3, 2));
    }

    #[test]
    fn awkward_topics_get_valid_subjects() {
        let long = vec![b'x'; 4096];
        let topics: Vec<&[u8]> = vec![
            b"two words",
            b"tab\there",
            b"a.b",
            b"a..b",
            b".",
            b"*",
            b">",
            b"a.*.>",
            "日本語".as_bytes(),
            b"\xff\x00\r\n",
            b"100%",
            &long,
        ];
        let mut nats = open();
        for topic in topics {
            let mut out = Vec::new();
            nats.subscribe(topic, &mut out);
            nats.publish(topic, b"p", &mut out);
            let text = String::from_utf8(out.clone()).expect("ASCII");
            let mut lines = text.split("\r\n");
            let sub: Vec<&str> = lines.next().unwrap().split(' ').collect();
            let publish: Vec<&str> = lines.next().unwrap().split(' ').collect();
            assert_eq!((sub.len(), publish.len()), (3, 3), "{text:?}");
            assert_eq!((sub[0], publish[0]), ("SUB", "PUB"));
            let subject = sub[1];
            assert_eq!(subject, publish[1]);
            assert!(subject.len() <= MAX_SUBJECT_LEN);
            assert!(subject.starts_with("app."));
            assert!(
                subject.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "{subject}"
            );
            for token in subject.split('.') {
                assert!(
                    !token.is_empty() && token != "*" && token != ">",
                    "{subject}"
                );
            }
        }
    }

    #[test]
    fn the_info_scanner_reads_only_top_level_fields_and_never_panics() {
        assert_eq!(
            json_field(b"{\"max_payload\":12}", b"max_payload"),
            Some(&b"12"[..])
        );
        assert_eq!(
            json_field(
                b" { \"a\" : \"}\\\"\" , \"max_payload\" : 7 } ",
                b"max_payload"
            ),
            Some(&b"7"[..])
        );
        assert_eq!(
            json_field(
                b"{\"n\":{\"max_payload\":1},\"max_payload\":2}",
                b"max_payload"
            ),
            Some(&b"2"[..])
        );
        assert_eq!(
            json_field(b"{\"x\":[\"]\",{}],\"k\":true}", b"k"),
            Some(&b"true"[..])
        );
        for junk in [
            &b""[..],
            b"{",
            b"{\"",
            b"{\"max_payload\"",
            b"{\"max_payload\":",
            b"{\"max_payload\":}",
            b"{\"a\":[[[",
            b"{\"a\":\"\\",
            b"{\"a\"::1,\"max_payload\":1}",
            b"[\"max_payload\",1]",
            b"{\"a\":1 \"max_payload\":1}",
            b"{}}]]",
        ] {
            assert_eq!(json_field(junk, b"max_payload"), None, "{junk:?}");
        }
        // Values that are not a positive number leave the limit alone.
        for info in [
            &b"INFO {\"max_payload\":-1}\r\n"[..],
            b"INFO {\"max_payload\":0}\r\n",
            b"INFO {\"max_payload\":\"5\"}\r\n",
            b"INFO {\"max_payload\":1e3}\r\n",
            b"INFO {\"max_payload\":99999999999999999999999}\r\n",
            b"INFO not json\r\n",
            b"INFO\r\n",
        ] {
            let limit = Arc::new(AtomicUsize::new(DEFAULT_MAX_PAYLOAD));
            let url = BrokerUrl::parse("nats://127.0.0.1", 4222).unwrap();
            let mut nats = NatsProtocol::new(&url, "app", Arc::clone(&limit)).unwrap();
            nats.start(&mut Vec::new());
            let mut feed = Feed::default();
            feed.all(&mut nats, info).unwrap();
            assert_eq!(limit.load(Ordering::Relaxed), DEFAULT_MAX_PAYLOAD);
            assert!(feed.out.starts_with(b"CONNECT "));
        }
    }

    #[test]
    fn engine_checks_the_url_and_prefix() {
        let limit = Arc::new(AtomicUsize::new(0));
        let history = Arc::new(SharedHistory::default());
        let errno = |url: &str, name: &str| {
            engine(url, name, &limit, Arc::clone(&history))
                .err()
                .map(|err| err.errno())
        };
        assert_eq!(errno("nats://127.0.0.1", "app"), None);
        assert_eq!(
            errno("NATS://u:p@127.0.0.1:4223,127.0.0.1:4224", "a.b"),
            None
        );
        assert_eq!(errno("tls://127.0.0.1", "app"), None);
        assert_eq!(
            errno("tls://127.0.0.1?ca=/nonexistent.pem", "app"),
            Some(libc::EINVAL)
        );
        assert_eq!(
            errno("nats://127.0.0.1?ca=ca.pem", "app"),
            Some(libc::EINVAL)
        );
        assert_eq!(errno("redis://127.0.0.1", "app"), Some(libc::EINVAL));
        assert_eq!(errno("nats://127.0.0.1/x", "app"), Some(libc::EINVAL));
        assert_eq!(
            errno("nats://127.0.0.1?timeout=1", "app"),
            Some(libc::EINVAL)
        );
        assert_eq!(errno("nats://127.0.0.1:0", "app"), Some(libc::EINVAL));
        for bad in ["", "a b", "a..b", "a.*", ">", "100%", &"p".repeat(256)] {
            assert_eq!(errno("nats://127.0.0.1", bad), Some(libc::EINVAL), "{bad}");
        }
        engine("nats://127.0.0.1", "app", &limit, history).unwrap();
        assert_eq!(limit.load(Ordering::Relaxed), 1 << 20);
    }

    #[test]
    fn the_shared_history_seeds_reach_the_consumers() {
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/corpus/nats_parse/js_open_deliveries"
        ))
        .unwrap();
        let outcome = fuzz_run(&seed[1..], seed.len(), true, true);
        assert_eq!(outcome.error, None);
        let streams: Vec<_> = outcome
            .delivered
            .iter()
            .map(|(topic, _, stream)| (topic.as_slice(), *stream))
            .collect();
        // The handshake's stream was created at 2026-12-06T17:50:30Z.
        let id = |offset| crate::history::EventId {
            epoch: 1_796_579_430_000_000_000,
            offset,
        };
        let message = |offset| super::super::Stream::Message {
            id: id(offset),
            except: None,
        };
        use super::super::Stream::{Kept, Synced};
        assert_eq!(
            streams,
            vec![
                (&b"news"[..], Some(Synced(id(3)))),
                (b"news", Some(Kept(id(4)))),
                (b"news", Some(Kept(id(7)))),
                (b"news", Some(message(9))),
                // Nothing kept: synced from the newest sequence known when it was asked for.
                (b"a b", Some(Synced(id(3)))),
                (b"a b", Some(message(12))),
            ]
        );
        assert!(
            String::from_utf8_lossy(&outcome.written).contains("PUB $JS.FC.fdcast_app.C1.x 0\r\n")
        );
    }

    #[test]
    fn the_fuzz_seeds_pass_the_fuzz_checks() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/nats_parse");
        let mut seeds = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            fuzz_read(&std::fs::read(entry.unwrap().path()).unwrap());
            seeds += 1;
        }
        assert!(seeds > 0);
        fuzz_read(b"");
        fuzz_read(b"\x40");
    }

    /// Drives the protocol over a real connection to the NATS server at FDCAST_NATS_URL
    /// (default nats://127.0.0.1:4222): fails when that server is down.
    #[test]
    fn real_nats_delivers_others_messages_and_does_not_echo_ours() {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::time::{Duration, Instant};

        let url =
            std::env::var("FDCAST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let parsed = BrokerUrl::parse(&url, 4222).unwrap();
        let address = (parsed.hosts[0].0.as_str(), parsed.hosts[0].1);
        let prefix = testing::unique_name();
        let limit = Arc::new(AtomicUsize::new(0));
        let mut nats = NatsProtocol::new(&parsed, &prefix, Arc::clone(&limit)).unwrap();
        let connect = || testing::connect_to(address, "NATS", &url);
        let mut ours = connect();
        let mut feed = Feed::default();
        let mut pump = |nats: &mut NatsProtocol,
                        feed: &mut Feed,
                        out: &mut Vec<u8>,
                        done: &dyn Fn(&NatsProtocol, &Feed) -> bool| {
            testing::pump(&mut ours, nats, feed, out, done)
        };
        let mut out = Vec::new();
        nats.start(&mut out);
        pump(&mut nats, &mut feed, &mut out, &|nats, _| nats.is_open());
        assert!(
            limit.load(Ordering::Relaxed) > 0,
            "INFO's max_payload was read"
        );

        let long = vec![b'L'; 4096];
        let topics: [&[u8]; 3] = [b"news", "é *>".as_bytes(), &long];
        for topic in topics {
            nats.subscribe(topic, &mut out);
        }
        nats.end_of_subscriptions(&mut out);
        pump(&mut nats, &mut feed, &mut out, &|nats, _| {
            nats.unconfirmed() == 0
        });
        assert_eq!(nats.subscribed(), 3);

        // Another client publishes on the subjects, computed as a plain client would.
        let mut other = connect();
        other
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut info = [0u8; 5];
        other.read_exact(&mut info).unwrap();
        assert_eq!(&info, b"INFO ");
        let mut command = b"CONNECT {\"verbose\":false,\"echo\":false}\r\n".to_vec();
        let mut subjects = Vec::new();
        for (topic, payload) in topics.iter().zip([&b"hello"[..], b"awk", b"long"]) {
            let mut subject = Vec::new();
            topic::nats_subject(prefix.as_bytes(), topic, &mut subject);
            command.extend_from_slice(b"PUB ");
            command.extend_from_slice(&subject);
            command.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
            command.extend_from_slice(payload);
            command.extend_from_slice(b"\r\n");
            subjects.push(subject);
        }
        command.extend_from_slice(format!("SUB {prefix}.news 1\r\nPING\r\n").as_bytes());
        other.write_all(&command).unwrap();
        pump(&mut nats, &mut feed, &mut out, &|_, feed| {
            feed.stats.received == 3
        });
        assert_eq!(
            feed.delivered(),
            vec![
                (b"news".to_vec(), b"hello".to_vec()),
                ("é *>".as_bytes().to_vec(), b"awk".to_vec()),
                (long.clone(), b"long".to_vec()),
            ]
        );

        // The other client's SUB is in effect once its PONG arrives; then we publish.
        let mut seen = Vec::new();
        let read_until = |other: &mut TcpStream, seen: &mut Vec<u8>, what: &[u8]| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !seen.windows(what.len()).any(|window| window == what) {
                assert!(
                    Instant::now() < deadline,
                    "the other client never saw {what:?}"
                );
                let mut chunk = [0u8; 4096];
                let n = other.read(&mut chunk).unwrap();
                assert!(n > 0, "NATS closed the other connection");
                seen.extend_from_slice(&chunk[..n]);
            }
        };
        read_until(&mut other, &mut seen, b"PONG\r\n");
        nats.publish(b"news", b"mine!", &mut out);
        // A subscription change and its PING: its PONG comes after any echo of our publish.
        nats.subscribe(b"later", &mut out);
        nats.end_of_subscriptions(&mut out);
        pump(&mut nats, &mut feed, &mut out, &|nats, _| {
            nats.unconfirmed() == 0
        });
        read_until(
            &mut other,
            &mut seen,
            format!("MSG {prefix}.news 1 5\r\nmine!\r\n").as_bytes(),
        );
        assert_eq!(feed.received.len(), 3, "our own publish came back");
        assert_eq!(feed.stats.ignored, 0);
        feed.bytes(&mut nats, b"").unwrap();
        assert_eq!(feed.stats.published, 1);
    }
}
