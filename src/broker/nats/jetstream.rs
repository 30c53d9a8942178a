//! History shared across processes through NATS JetStream: the session's side.
//!
//! With history on when the session starts (or switched on since: the session starts anew),
//! every topic's history is kept by one JetStream stream per broker name, which captures the
//! subjects `<name>.>`; the stream's sequence numbers are the ids.
//!
//! - The handshake adds, before its PING: a subscription to this connection's API inbox
//!   (`_INBOX.<random>.a.*`) and `$JS.API.STREAM.CREATE.<stream>` with the registry's limits.
//!   The session opens once the stream answered. A stream that exists with another
//!   configuration (another process's limits) is used as it is (`STREAM.INFO`); a server
//!   without JetStream (no responders, or an error) leaves history per process
//!   ([`SharedHistory::set_unavailable`]), and the session goes on as plain NATS core.
//! - A publish goes out as `HPUB` on the topic's subject with the header
//!   `Fdcast-Origin: <origin> <seq> <except fd> <number>` (`number`: 1, 2, 3, ... per topic
//!   of this registry): the stream stores it, plain subscribers
//!   get the payload (headers stripped for clients without them), and it comes back to this
//!   process through its consumer, to be delivered here with its id, skipping the except fd.
//! - A topic subscribed gets an ephemeral push consumer filtered on its subject, delivering
//!   to `_INBOX.<random>.d.<sid>` (subscribed exactly: a wildcard on the inbox would get the
//!   deliveries twice). The first consumer of a topic starts from the topic's oldest kept
//!   message: its create answer says how many it had then (`delivered.consumer_seq +
//!   num_pending`), and those are the mirror's fill (`Stream::Kept`); what follows, and our
//!   own publishes made after the topic's interest was queued, are messages. Deliveries are
//!   held until the answer and, for a fill, until the fill is whole (its last kept message
//!   delivered, or none left pending), so that a resume waiting for the mirror finds all of
//!   it.
//! - Every delivery's reply subject (`$JS.ACK.…`) carries its stream and consumer sequences.
//!   A consumer sequence that skips (a delivery lost), an idle heartbeat naming a later
//!   one, or a consumer the server has said nothing of for three heartbeats (deleted on the
//!   server: the session's deadline, `Protocol::deadline`) recreates the consumer from the
//!   last stream sequence delivered plus one; so does every reconnect (`by_start_sequence`),
//!   so nothing is delivered twice or skipped.
//! - The stream's `created` time, in nanoseconds, is the ids' epoch: a stream deleted and
//!   created again gets another, and an old id never resumes into it.
//!
//! What JetStream does not let us know: whether messages of a topic were discarded (by its
//! per-subject limit) before the consumer delivered them. Stream sequences are shared by all
//! topics, so a jump says nothing; the consumer's own sequence counts deliveries, not
//! messages. Hence a fill's first message is where the mirror's coverage starts (an older id
//! is reported not recovered), and a resumed consumer reports a hole when a loss was possible
//! (the topic held its limit, or the stream's first sequence passed the last one delivered).
//! What fdcast publishers send tells more: each numbers its publishes per topic, and a
//! number that skips, by publisher (`Followed`), is a loss (`Stream::Lost`: a gap for the
//! topic's readers; a hole only, during a fill). A burst over the limit that outruns a
//! consumer thus reaches its readers incomplete but counted; only plain clients' messages
//! can go missing unnoticed.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{NatsProtocol, Session, decimal, json_field, write_decimal};
use crate::broker::stream::Sink;
use crate::broker::{Received, SharedHistory, Stream, topic};
use crate::history::{EventId, random_epoch};

/// The header that marks a publish of this registry.
pub(crate) const ORIGIN_HEADER: &[u8] = b"Fdcast-Origin";
/// Consumers' idle heartbeat.
const HEARTBEAT_NS: u64 = 5_000_000_000;
/// A consumer the server has said nothing of for this long (three missed idle heartbeats)
/// is gone (deleted on the server, say): it is replaced, as after a lost delivery.
const SILENCE: Duration = Duration::from_nanos(3 * HEARTBEAT_NS);
/// How long the server keeps a consumer nobody listens to (ours, after a lost connection).
const INACTIVE_NS: u64 = 30_000_000_000;
/// Messages a subject keeps when history has neither a count nor an age limit.
pub(crate) const DEFAULT_PER_SUBJECT: usize = 1000;

/// What the publishers' encoder and the session share: this registry's origin, the count of
/// its shared publishes, and, per topic whose interest is queued, that count then.
pub(crate) struct Own {
    /// The origin, and its 16 hex digits as the header carries them.
    id: u64,
    origin: Box<[u8]>,
    seq: AtomicU64,
    marks: Mutex<HashMap<Box<[u8]>, u64>>,
}

impl Own {
    pub(crate) fn new() -> Own {
        let id = random_epoch();
        Own {
            id,
            origin: format!("{id:016x}").into_bytes().into(),
            seq: AtomicU64::new(0),
            marks: Mutex::new(HashMap::new()),
        }
    }

    /// Writes a shared publish as its `HPUB`, with this registry's origin, its number,
    /// `except` and its `number` on the topic in the origin header. `subject` and `header`
    /// are the caller's scratch.
    pub(super) fn encode(
        &self,
        prefix: &[u8],
        (topic, payload, except, number): (&[u8], &[u8], Option<RawFd>, u64),
        (subject, header): (&mut Vec<u8>, &mut Vec<u8>),
        out: &mut Vec<u8>,
    ) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        topic::nats_subject(prefix, topic, subject);
        header.clear();
        header.extend_from_slice(b"NATS/1.0\r\n");
        header.extend_from_slice(ORIGIN_HEADER);
        header.extend_from_slice(b": ");
        header.extend_from_slice(&self.origin);
        header.push(b' ');
        write_decimal(header, seq);
        header.push(b' ');
        match except {
            Some(fd) => write_decimal(header, u64::try_from(fd).unwrap_or(0)),
            None => header.push(b'-'),
        }
        header.push(b' ');
        write_decimal(header, number);
        header.extend_from_slice(b"\r\n\r\n");
        out.reserve(subject.len() + header.len() + payload.len() + 32);
        out.extend_from_slice(b"HPUB ");
        out.extend_from_slice(subject);
        out.push(b' ');
        write_decimal(out, header.len() as u64);
        out.push(b' ');
        write_decimal(out, (header.len() + payload.len()) as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(header);
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
    }

    /// Notes, as `topic`'s interest is queued, how many publishes were encoded before it.
    pub(super) fn mark(&self, topic: &[u8], subscribe: bool) {
        let mut marks = self.marks.lock();
        if subscribe {
            marks.insert(Box::from(topic), self.seq.load(Ordering::Relaxed));
        } else {
            marks.remove(topic);
        }
    }

    fn take_mark(&self, topic: &[u8]) -> u64 {
        self.marks
            .lock()
            .remove(topic)
            .unwrap_or_else(|| self.seq.load(Ordering::Relaxed))
    }
}

/// A delivery's `Fdcast-Origin` header, read once for both its uses: whether this registry
/// published it (`seq`, `except`), and the publisher's number on the topic (absent from
/// the headers of registries that did not number them yet).
#[derive(Clone, Copy)]
struct OriginHeader {
    origin: u64,
    seq: u64,
    except: Option<RawFd>,
    number: Option<u64>,
}

impl OriginHeader {
    fn parse(value: &[u8]) -> Option<OriginHeader> {
        let mut words = value.split(|&b| b == b' ');
        let origin = words.next().filter(|origin| origin.len() == 16)?;
        let origin = origin.iter().try_fold(0u64, |id, &digit| {
            Some(id << 4 | u64::from(char::from(digit).to_digit(16)?))
        })?;
        let seq = decimal(words.next()?)?;
        let except = match words.next()? {
            b"-" => None,
            fd => Some(RawFd::try_from(decimal(fd)?).ok()?),
        };
        let number = words.next().and_then(decimal);
        Some(OriginHeader {
            origin,
            seq,
            except,
            number,
        })
    }
}

/// An API request in flight, by the number in its reply subject.
enum Request {
    Stream,
    StreamInfo,
    /// A consumer's creation, by its subscription's sid.
    Consumer(u64),
    /// A consumer's deletion (its answer changes nothing).
    Delete,
}

/// A delivery held until its consumer's create answer.
struct Delivery {
    sseq: u64,
    cseq: u64,
    /// When the stream stored it.
    stored: u64,
    /// What the consumer had left to deliver after it.
    pending: u64,
    payload: Vec<u8>,
    own: Option<(u64, Option<RawFd>)>,
    /// Its publisher's origin and number on the topic, if an fdcast registry published it.
    numbered: Option<(u64, u64)>,
}

/// Publishers a topic remembers the last number of; past it, the one heard from least
/// recently is forgotten (its next message is not checked).
const MAX_ORIGINS: usize = 1024;

/// What a synced topic's consumers have delivered.
struct Followed {
    /// The last stream sequence.
    last: u64,
    /// Per publishing registry (its origin): the last number it gave a message of the topic,
    /// and that message's stream sequence.
    origins: HashMap<u64, (u64, u64)>,
}

impl Followed {
    fn after(last: u64) -> Followed {
        Followed {
            last,
            origins: HashMap::new(),
        }
    }

    /// Notes message `number` of publisher `origin`, at stream sequence `sseq`; returns how
    /// many of its messages were skipped since its last one here. A number not above the
    /// last is a publisher that started counting again (it forgot the topic): nothing is
    /// known lost.
    fn lost_before(&mut self, origin: u64, number: u64, sseq: u64) -> u64 {
        if let Some((last, heard)) = self.origins.get_mut(&origin) {
            let lost = number.saturating_sub(*last).saturating_sub(1);
            (*last, *heard) = (number, sseq);
            return lost;
        }
        if self.origins.len() >= MAX_ORIGINS {
            let quietest = self
                .origins
                .iter()
                .min_by_key(|(_, (_, heard))| *heard)
                .map(|(&origin, _)| origin);
            if let Some(quietest) = quietest {
                self.origins.remove(&quietest);
            }
        }
        self.origins.insert(origin, (number, sseq));
        0
    }
}

/// One topic's consumer, by the sid of its deliver subject.
struct Consumer {
    topic: Box<[u8]>,
    /// The server's name for it, from its create answer.
    name: Option<Box<[u8]>>,
    /// Resumed after this stream sequence (after a reconnect or a gap); `None`: it fills the
    /// topic's mirror from the oldest kept message.
    resume: Option<u64>,
    /// Our publishes numbered above this were made after the topic's interest was queued.
    mark: u64,
    /// The newest stream sequence known as it was requested.
    stream_last: u64,
    /// Consumer sequences up to this are the topic's messages kept when it was created; known
    /// from its create answer.
    backlog: Option<u64>,
    /// When the server made it (ns since 1970, from the create answer, if it said): what the
    /// stream stored since is live, even at a consumer sequence of the backlog's (the
    /// topic's limit discarded part of the fill before the consumer got to it).
    created: Option<u64>,
    /// Its deliveries are handed on as they come: the answer is in, and the fill whole.
    filled: bool,
    /// Deliveries until then.
    held: Vec<Delivery>,
    /// The last consumer sequence seen.
    cseq: u64,
    /// Whether its start (a sync or a hole) was told.
    started: bool,
    /// When the server last spoke of it (created, a delivery, a heartbeat, flow control).
    heard: Instant,
}

/// The session's shared-history state.
#[derive(Default)]
pub(super) struct State {
    /// This session shares history (history was on when it started, and JetStream answers).
    pub(super) on: bool,
    /// The stream's answer is awaited (the handshake).
    pub(super) stream_pending: bool,
    /// `_INBOX.<random>.`, per connection.
    inbox: Vec<u8>,
    stream: Box<[u8]>,
    /// The sid of the API inbox (0: none).
    pub(super) api_sid: u64,
    next_request: u64,
    requests: HashMap<u64, Request>,
    consumers: HashMap<u64, Consumer>,
    /// The ids' epoch: the stream's creation time in nanoseconds (0 before the first answer).
    epoch: u64,
    /// The stream's `max_msgs_per_subject` (0: none), and its first and newest sequences as
    /// last known.
    per_subject: u64,
    stream_first: u64,
    stream_last: u64,
    /// Per topic whose mirror is synced: the last stream sequence delivered, and each
    /// publisher's last number. Kept across reconnects (of one stream), so that the next
    /// consumer resumes after it and a loss meanwhile shows.
    followed: HashMap<Box<[u8]>, Followed>,
    /// Topics unsubscribed, whose mirrors are to be told so.
    unsynced: Vec<Box<[u8]>>,
    /// Publishes written while a consumer's creation was awaited, sent once none is (or at a
    /// disable).
    pub(super) parked: Vec<u8>,
}

impl State {
    /// Uses `inbox` instead of a random one (the fuzz target compares two runs' output).
    pub(super) fn fix_inbox(&mut self, inbox: &[u8]) {
        self.inbox = inbox.to_vec();
    }

    /// Whether `sid` is one of this session's consumers.
    pub(super) fn is_consumer(&self, sid: u64) -> bool {
        self.consumers.contains_key(&sid)
    }
}

/// The JetStream stream of a broker name: `fdcast_` followed by the name with every byte
/// outside `A-Z a-z 0-9 -` written `_XX` (upper-case hex), so that two names never share one.
pub(crate) fn stream_name(name: &[u8]) -> Vec<u8> {
    let mut stream = b"fdcast_".to_vec();
    for &byte in name {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            stream.push(byte);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            stream.extend_from_slice(&[
                b'_',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]);
        }
    }
    stream
}

/// The stream's configuration for the registry's limits: a topic's count limit is the
/// stream's per-subject limit, its age limit the stream's; with neither, a subject keeps
/// [`DEFAULT_PER_SUBJECT`]. Bytes are limited by each process's mirror only.
pub(crate) fn stream_config(stream: &[u8], prefix: &[u8], limits: (usize, u64)) -> Vec<u8> {
    let (max_messages, max_age_ms) = limits;
    let per_subject: i64 = match (max_messages, max_age_ms) {
        (0, 0) => DEFAULT_PER_SUBJECT as i64,
        (0, _) => -1,
        (n, _) => i64::try_from(n).unwrap_or(i64::MAX),
    };
    let mut json = b"{\"name\":".to_vec();
    json_bytes(&mut json, stream);
    json.extend_from_slice(b",\"subjects\":[");
    let mut subjects = prefix.to_vec();
    subjects.extend_from_slice(b".>");
    json_bytes(&mut json, &subjects);
    json.extend_from_slice(
        format!(
            "],\"retention\":\"limits\",\"max_msgs_per_subject\":{per_subject},\
             \"max_age\":{},\"storage\":\"file\",\"discard\":\"old\",\"num_replicas\":1}}",
            max_age_ms.saturating_mul(1_000_000)
        )
        .as_bytes(),
    );
    json
}

/// Appends ASCII `bytes` as a JSON string.
fn json_bytes(json: &mut Vec<u8>, bytes: &[u8]) {
    json.push(b'"');
    for &byte in bytes {
        match byte {
            b'"' | b'\\' => json.extend_from_slice(&[b'\\', byte]),
            0x20..=0x7e => json.push(byte),
            _ => json.extend_from_slice(format!("\\u{byte:04x}").as_bytes()),
        }
    }
    json.push(b'"');
}

/// A JSON string value's text (no escapes expected in what is read with it).
fn json_text(value: &[u8]) -> Option<&[u8]> {
    value.strip_prefix(b"\"")?.strip_suffix(b"\"")
}

/// A JSON number's value, negative ones as 0.
fn json_count(value: &[u8]) -> Option<u64> {
    if value.starts_with(b"-") {
        return Some(0);
    }
    decimal(value)
}

/// An RFC 3339 UTC time (`2026-12-06T17:50:30.840370237Z`, as the server writes it) in
/// nanoseconds since 1970.
pub(crate) fn rfc3339_nanos(text: &[u8]) -> Option<u64> {
    let number = |range: std::ops::Range<usize>| decimal(text.get(range)?);
    if text.get(4) != Some(&b'-')
        || text.get(7) != Some(&b'-')
        || !matches!(text.get(10), Some(b'T' | b't'))
        || text.get(13) != Some(&b':')
        || text.get(16) != Some(&b':')
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1970..=2500).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let rest = text.get(19..)?;
    let (fraction, zone) = match rest.strip_prefix(b".") {
        Some(rest) => {
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 || digits > 9 {
                return None;
            }
            let value = decimal(&rest[..digits])? * 10u64.pow(9 - digits as u32);
            (value, &rest[digits..])
        }
        None => (0, rest),
    };
    if !matches!(zone, b"Z" | b"z") {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    seconds.checked_mul(1_000_000_000)?.checked_add(fraction)
}

/// What a JetStream delivery's reply subject says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Ack<'a> {
    pub(crate) consumer: &'a [u8],
    pub(crate) stream_seq: u64,
    pub(crate) consumer_seq: u64,
    /// When the stream stored the message (ns since 1970, the server's clock).
    pub(crate) stored: u64,
    pub(crate) pending: u64,
}

/// Reads `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`
/// and the newer form with a domain and an account hash after `ACK` (and a token at the end).
pub(crate) fn ack(reply: &[u8]) -> Option<Ack<'_>> {
    let tokens: Vec<&[u8]> = reply.split(|&b| b == b'.').collect();
    if tokens.first() != Some(&&b"$JS"[..]) || tokens.get(1) != Some(&&b"ACK"[..]) {
        return None;
    }
    let base = match tokens.len() {
        9 => 2,
        11 | 12 => 4,
        _ => return None,
    };
    Some(Ack {
        consumer: tokens.get(base + 1).filter(|name| !name.is_empty())?,
        stream_seq: decimal(tokens.get(base + 3)?)?,
        consumer_seq: decimal(tokens.get(base + 4)?)?,
        stored: decimal(tokens.get(base + 5)?)?,
        pending: decimal(tokens.get(base + 6)?)?,
    })
}

/// A message's header block (`NATS/1.0[ <status>[ <description>]]\r\n` and `Key: value`
/// lines): its status (0: none) and its lines.
#[derive(Clone, Copy)]
pub(crate) struct Headers<'a> {
    pub(crate) status: u16,
    lines: &'a [u8],
}

impl<'a> Headers<'a> {
    pub(crate) fn parse(block: &'a [u8]) -> Option<Headers<'a>> {
        let end = block.windows(2).position(|pair| pair == b"\r\n")?;
        let version = block.get(..end)?;
        let rest = version.strip_prefix(b"NATS/1.0")?;
        let status = match rest.iter().position(|&b| b != b' ') {
            None => 0,
            Some(start) => {
                let code = rest.get(start..start + 3)?;
                u16::try_from(decimal(code)?).ok()?
            }
        };
        Some(Headers {
            status,
            lines: block.get(end + 2..)?,
        })
    }

    /// The first value of `key` (compared without case), trimmed.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        self.lines.split(|&b| b == b'\n').find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            let (name, value) = line.split_at(colon);
            if !name.eq_ignore_ascii_case(key) {
                return None;
            }
            Some(super::trim(value.get(1..)?))
        })
    }
}

/// Parked publishes' bytes beyond which they go out whatever is awaited.
const MAX_PARKED: usize = 64 << 20;

impl NatsProtocol {
    /// Where publishes go now: `Some` (the parked ones) while a consumer's creation is
    /// awaited, so that our own publishes reach the stream after the consumer exists: one
    /// stored before could be discarded (the topic's per-subject limit) before the consumer
    /// reads it, and this process, whose subscriber asked for it, would never deliver it.
    pub(super) fn take_parked(&mut self) -> Option<Vec<u8>> {
        let creating = self
            .js
            .requests
            .values()
            .any(|request| matches!(request, Request::Consumer(_)));
        let park = self.js.on
            && (creating || !self.js.parked.is_empty())
            && self.js.parked.len() < MAX_PARKED;
        park.then(|| std::mem::take(&mut self.js.parked))
    }

    pub(super) fn put_parked(&mut self, parked: Option<Vec<u8>>) {
        if let Some(parked) = parked {
            self.js.parked = parked;
        }
    }

    /// Sends the parked publishes once no consumer's creation is awaited.
    fn release_parked(&mut self, out: &mut Vec<u8>) {
        let creating = self
            .js
            .requests
            .values()
            .any(|request| matches!(request, Request::Consumer(_)));
        if !creating {
            out.append(&mut self.js.parked);
        }
    }

    /// A new connection: the shared-history part of the session starts again.
    pub(super) fn start_shared(&mut self) {
        let on = self.history.as_ref().is_some_and(|history| history.is_on());
        let js = &mut self.js;
        if on != js.on {
            // Switched: nothing of the other way's mirrors holds.
            js.followed.clear();
        }
        js.on = on;
        js.stream_pending = on;
        js.api_sid = 0;
        js.next_request = 0;
        js.requests.clear();
        js.consumers.clear();
        // Lost with the connection, as a publish written to it would be.
        js.parked.clear();
        js.inbox = format!("_INBOX.{:016x}.", random_epoch()).into_bytes();
    }

    /// The handshake's shared-history part, before its PING: the API inbox and the stream.
    pub(super) fn handshake_shared(&mut self, out: &mut Vec<u8>) {
        if !self.js.on {
            return;
        }
        let sid = self.next_sid;
        self.next_sid += 1;
        self.js.api_sid = sid;
        out.extend_from_slice(b"SUB ");
        out.extend_from_slice(&self.js.inbox);
        out.extend_from_slice(b"a.* ");
        write_decimal(out, sid);
        out.extend_from_slice(b"\r\n");
        self.js.stream = stream_name(&self.prefix).into();
        let limits = self
            .history
            .as_ref()
            .map_or((0, 0), |history| history.limits());
        let config = stream_config(&self.js.stream, &self.prefix, limits);
        self.request(b"STREAM.CREATE.", Request::Stream, &config, out);
    }

    /// `PUB $JS.API.<api><stream> <inbox>a.<n> <len>` and the body.
    fn request(&mut self, api: &[u8], request: Request, body: &[u8], out: &mut Vec<u8>) {
        self.request_on(api, b"", request, body, out);
    }

    /// `request`, with `.<suffix>` after the stream's name when `suffix` is not empty.
    fn request_on(
        &mut self,
        api: &[u8],
        suffix: &[u8],
        request: Request,
        body: &[u8],
        out: &mut Vec<u8>,
    ) {
        let js = &mut self.js;
        js.next_request += 1;
        let n = js.next_request;
        js.requests.insert(n, request);
        out.extend_from_slice(b"PUB $JS.API.");
        out.extend_from_slice(api);
        out.extend_from_slice(&js.stream);
        if !suffix.is_empty() {
            out.push(b'.');
            out.extend_from_slice(suffix);
        }
        out.push(b' ');
        out.extend_from_slice(&js.inbox);
        out.extend_from_slice(b"a.");
        write_decimal(out, n);
        out.push(b' ');
        write_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }

    /// An answer on the API inbox: `subject` is the reply subject it came on.
    pub(super) fn api_answer(
        &mut self,
        subject: &[u8],
        headers: Option<Headers<'_>>,
        body: &[u8],
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) {
        let mut api_prefix = self.js.inbox.clone();
        api_prefix.extend_from_slice(b"a.");
        let Some(request) = subject
            .strip_prefix(&api_prefix[..])
            .and_then(decimal)
            .and_then(|n| self.js.requests.remove(&n))
        else {
            return;
        };
        // A status (503: no responders) is no answer of the API's.
        let error = headers.is_some_and(|headers| headers.status >= 300)
            || json_field(body, b"error").is_some();
        match request {
            Request::Stream | Request::StreamInfo => {
                let exists = json_field(body, b"error")
                    .and_then(|error| json_field(error, b"err_code"))
                    .is_some_and(|code| code == b"10058");
                if exists && matches!(request, Request::Stream) {
                    // Another process made it with other limits: it is used as it is.
                    self.request(b"STREAM.INFO.", Request::StreamInfo, b"", out);
                } else if error || !self.stream_answer(body) {
                    self.jetstream_unavailable();
                }
            }
            Request::Delete => {}
            Request::Consumer(sid) => {
                if error {
                    sink.stats.malformed += 1;
                } else {
                    self.consumer_created(sid, body, out, sink);
                }
            }
        }
        self.release_parked(out);
    }

    /// The stream's configuration and state; false if they cannot be read.
    fn stream_answer(&mut self, body: &[u8]) -> bool {
        let Some(epoch) = json_field(body, b"created")
            .and_then(json_text)
            .and_then(rfc3339_nanos)
        else {
            return false;
        };
        let config = json_field(body, b"config").unwrap_or_default();
        let state = json_field(body, b"state").unwrap_or_default();
        let js = &mut self.js;
        if epoch != js.epoch {
            // Another stream: no mirror follows it yet.
            js.followed.clear();
            js.epoch = epoch;
        }
        js.per_subject = json_field(config, b"max_msgs_per_subject")
            .and_then(json_count)
            .unwrap_or(0);
        js.stream_first = json_field(state, b"first_seq")
            .and_then(json_count)
            .unwrap_or(0);
        js.stream_last = json_field(state, b"last_seq")
            .and_then(json_count)
            .unwrap_or(0);
        js.stream_pending = false;
        if let Some(history) = &self.history {
            history.set_unavailable(false);
        }
        if self.session == Session::AwaitingStream {
            self.session = Session::Open;
        }
        true
    }

    /// The server keeps no stream for us: this session is plain NATS core, and history stays
    /// per process.
    fn jetstream_unavailable(&mut self) {
        self.js.on = false;
        self.js.stream_pending = false;
        self.js.followed.clear();
        if let Some(history) = &self.history {
            history.set_unavailable(true);
        }
        if self.session == Session::AwaitingStream {
            self.session = Session::Open;
        }
    }

    /// Subscribes a topic's deliveries and asks for its consumer.
    pub(super) fn subscribe_shared(&mut self, topic: &[u8], out: &mut Vec<u8>) {
        let mark = self.own.take_mark(topic);
        let resume = self.js.followed.get(topic).map(|followed| followed.last);
        self.new_consumer(topic, resume, mark, out);
    }

    fn new_consumer(&mut self, topic: &[u8], resume: Option<u64>, mark: u64, out: &mut Vec<u8>) {
        // Each consumer delivers to an inbox of its own, named by the sid that subscribes it.
        let mut deliver = self.js.inbox.clone();
        deliver.extend_from_slice(b"d.");
        write_decimal(&mut deliver, self.next_sid);
        let sid = self.write_sub(topic, &deliver, out);

        topic::nats_subject(&self.prefix, topic, &mut self.subject);
        let mut body = b"{\"stream_name\":".to_vec();
        json_bytes(&mut body, &self.js.stream);
        body.extend_from_slice(b",\"config\":{\"deliver_subject\":");
        json_bytes(&mut body, &deliver);
        body.extend_from_slice(b",\"filter_subject\":");
        json_bytes(&mut body, &self.subject);
        match resume {
            Some(last) => body.extend_from_slice(
                format!(
                    ",\"deliver_policy\":\"by_start_sequence\",\"opt_start_seq\":{}",
                    last.saturating_add(1)
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(b",\"deliver_policy\":\"all\""),
        }
        body.extend_from_slice(
            format!(
                ",\"ack_policy\":\"none\",\"flow_control\":true,\"idle_heartbeat\":{HEARTBEAT_NS},\
                 \"mem_storage\":true,\"inactive_threshold\":{INACTIVE_NS},\
                 \"replay_policy\":\"instant\"}}}}"
            )
            .as_bytes(),
        );
        self.js.consumers.insert(
            sid,
            Consumer {
                topic: Box::from(topic),
                name: None,
                resume,
                mark,
                stream_last: self.js.stream_last,
                backlog: None,
                created: None,
                filled: false,
                held: Vec::new(),
                cseq: 0,
                started: false,
                heard: Instant::now(),
            },
        );
        self.request(b"CONSUMER.CREATE.", Request::Consumer(sid), &body, out);
    }

    /// A topic unsubscribed: its consumer goes, and its mirror no longer follows (told on
    /// the next read).
    pub(super) fn unsubscribed_shared(&mut self, sid: u64, topic: &[u8], out: &mut Vec<u8>) {
        if let Some(consumer) = self.js.consumers.remove(&sid) {
            self.delete_consumer(&consumer, out);
            self.js.followed.remove(topic);
            self.js.unsynced.push(Box::from(topic));
        }
    }

    /// Deletes a consumer we no longer read, once its name is known (the server would drop
    /// it anyway once nobody listened for its inactive threshold).
    fn delete_consumer(&mut self, consumer: &Consumer, out: &mut Vec<u8>) {
        if let Some(name) = consumer.name.as_deref().filter(|name| is_token(name)) {
            self.request_on(b"CONSUMER.DELETE.", name, Request::Delete, b"", out);
        }
    }

    /// Tells the registry of the mirrors that stopped following.
    pub(super) fn report_unsynced(&mut self, sink: &mut Sink<'_>) {
        for topic in self.js.unsynced.drain(..) {
            sink.received
                .push(Received::streamed(&topic, b"", Stream::Unsynced));
        }
    }

    /// A delivery, heartbeat or flow-control request on consumer `sid`.
    pub(super) fn consumer_message(
        &mut self,
        sid: u64,
        reply: Option<&[u8]>,
        headers: Option<Headers<'_>>,
        payload: &[u8],
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) {
        let Some(ack) = reply.and_then(ack) else {
            return self.consumer_status(sid, reply, headers, out, sink);
        };
        let Some(consumer) = self.js.consumers.get_mut(&sid) else {
            return;
        };
        consumer.heard = Instant::now();
        if ack.consumer_seq <= consumer.cseq {
            return;
        }
        if Some(ack.consumer_seq) != consumer.cseq.checked_add(1) {
            // A delivery went missing: start again after the last one delivered.
            return self.recreate(sid, out);
        }
        consumer.cseq = ack.consumer_seq;
        self.js.stream_last = self.js.stream_last.max(ack.stream_seq);
        let origin = headers
            .and_then(|headers| headers.get(ORIGIN_HEADER))
            .and_then(OriginHeader::parse);
        let delivery = Delivery {
            sseq: ack.stream_seq,
            cseq: ack.consumer_seq,
            stored: ack.stored,
            pending: ack.pending,
            payload: Vec::new(),
            own: origin
                .filter(|header| header.origin == self.own.id)
                .map(|header| (header.seq, header.except)),
            numbered: origin.and_then(|header| Some((header.origin, header.number?))),
        };
        let Some(consumer) = self.js.consumers.get_mut(&sid) else {
            return;
        };
        if consumer.filled {
            return self.consume(sid, &delivery, payload, sink);
        }
        consumer.held.push(Delivery {
            payload: payload.to_vec(),
            ..delivery
        });
        self.release_held(sid, sink);
    }

    /// A message on a consumer's subject without an ack subject: an idle heartbeat, or a
    /// flow-control request.
    fn consumer_status(
        &mut self,
        sid: u64,
        reply: Option<&[u8]>,
        headers: Option<Headers<'_>>,
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) {
        let Some(headers) = headers.filter(|headers| headers.status == 100) else {
            sink.stats.malformed += 1;
            return;
        };
        if let Some(consumer) = self.js.consumers.get_mut(&sid) {
            consumer.heard = Instant::now();
        }
        // Flow control: an empty publish to the reply subject lets the consumer go on.
        for to in [reply, headers.get(b"Nats-Consumer-Stalled")]
            .into_iter()
            .flatten()
            .filter(|to| is_subject(to))
        {
            out.extend_from_slice(b"PUB ");
            out.extend_from_slice(to);
            out.extend_from_slice(b" 0\r\n\r\n");
        }
        let last = headers.get(b"Nats-Last-Consumer").and_then(decimal);
        if let (Some(last), Some(consumer)) = (last, self.js.consumers.get(&sid))
            && last > consumer.cseq
        {
            self.recreate(sid, out);
        }
    }

    /// When the consumer heard from least recently turns silent for [`SILENCE`].
    pub(super) fn silence_deadline(&self) -> Option<Instant> {
        let heard = self
            .js
            .consumers
            .values()
            .map(|consumer| consumer.heard)
            .min()?;
        Some(heard + SILENCE)
    }

    /// Replaces every consumer the server has said nothing of for [`SILENCE`] at `now`.
    pub(super) fn replace_silent(&mut self, now: Instant, out: &mut Vec<u8>) {
        let silent: Vec<u64> = self
            .js
            .consumers
            .iter()
            .filter(|(_, consumer)| now >= consumer.heard + SILENCE)
            .map(|(&sid, _)| sid)
            .collect();
        for sid in silent {
            self.recreate(sid, out);
        }
    }

    /// Replaces consumer `sid` by one that starts after the last stream sequence delivered
    /// (or fills again, if its mirror was not started).
    fn recreate(&mut self, sid: u64, out: &mut Vec<u8>) {
        let Some(consumer) = self.js.consumers.remove(&sid) else {
            return;
        };
        self.topics.remove(&sid);
        self.sids.remove(&consumer.topic);
        out.extend_from_slice(b"UNSUB ");
        write_decimal(out, sid);
        out.extend_from_slice(b"\r\n");
        self.delete_consumer(&consumer, out);
        self.unpinged += 1;
        self.unconfirmed += 1;
        let resume = if consumer.started {
            self.js
                .followed
                .get(&consumer.topic)
                .map(|followed| followed.last)
        } else {
            consumer.resume
        };
        self.new_consumer(&consumer.topic, resume, consumer.mark, out);
        self.ping(out);
    }

    /// A consumer's create answer: how many messages it found kept; what it delivered
    /// meanwhile goes on.
    fn consumer_created(&mut self, sid: u64, body: &[u8], out: &mut Vec<u8>, sink: &mut Sink<'_>) {
        let delivered = json_field(body, b"delivered")
            .and_then(|delivered| json_field(delivered, b"consumer_seq"))
            .and_then(json_count);
        let pending = json_field(body, b"num_pending").and_then(json_count);
        let (Some(delivered), Some(pending)) = (delivered, pending) else {
            sink.stats.malformed += 1;
            return self.recreate(sid, out);
        };
        let Some(consumer) = self.js.consumers.get_mut(&sid) else {
            return;
        };
        consumer.name = json_field(body, b"name").and_then(json_text).map(Box::from);
        consumer.backlog = Some(delivered.saturating_add(pending));
        consumer.created = json_field(body, b"created")
            .and_then(json_text)
            .and_then(rfc3339_nanos);
        self.release_held(sid, sink);
    }

    /// Hands on consumer `sid`'s held deliveries once its create answer is in and, for a
    /// fill, once the fill is whole: its last kept message delivered (or none left pending,
    /// should some have been discarded meanwhile), so that a resume waiting for the mirror
    /// finds all of it.
    fn release_held(&mut self, sid: u64, sink: &mut Sink<'_>) {
        let Some(consumer) = self.js.consumers.get_mut(&sid) else {
            return;
        };
        let Some(backlog) = consumer.backlog else {
            return;
        };
        let created = consumer.created;
        let whole = consumer.resume.is_some()
            || backlog == 0
            || consumer.held.last().is_some_and(|last| {
                last.cseq >= backlog
                    || last.pending == 0
                    || created.is_some_and(|created| last.stored >= created)
            });
        if !whole {
            return;
        }
        consumer.filled = true;
        let held = std::mem::take(&mut consumer.held);
        if backlog == 0 && consumer.resume.is_none() {
            self.start_consumer(sid, None, sink);
        }
        for delivery in &held {
            self.consume(sid, delivery, &delivery.payload, sink);
        }
    }

    /// Tells the registry where consumer `sid`'s messages start, before its first one
    /// (`first`: its stream sequence; `None` when it found none kept).
    fn start_consumer(&mut self, sid: u64, first: Option<u64>, sink: &mut Sink<'_>) {
        let js = &mut self.js;
        let Some(consumer) = js.consumers.get_mut(&sid) else {
            return;
        };
        consumer.started = true;
        let id = |offset| EventId {
            epoch: js.epoch,
            offset,
        };
        match consumer.resume {
            None => {
                // The topic's messages before the first kept one may have been discarded, or
                // be none: an id before it cannot be told from a loss.
                let covers = first.map_or(consumer.stream_last, |first| first.saturating_sub(1));
                sink.received.push(Received::streamed(
                    &consumer.topic,
                    b"",
                    Stream::Synced(id(covers)),
                ));
                js.followed
                    .insert(consumer.topic.clone(), Followed::after(covers));
            }
            Some(after) => {
                // Messages of the topic after `after` may be gone if the stream dropped its
                // oldest past it, or if the topic holds as many as it may keep.
                let suspect = js.stream_first > after.saturating_add(1)
                    || (js.per_subject > 0
                        && consumer.backlog.is_some_and(|n| n >= js.per_subject));
                if let Some(first) =
                    first.filter(|&first| first > after.saturating_add(1) && suspect)
                {
                    sink.received.push(Received::streamed(
                        &consumer.topic,
                        b"",
                        Stream::Hole(id(first.saturating_sub(1))),
                    ));
                }
            }
        }
    }

    /// A delivery of consumer `sid`, once its create answer is in.
    fn consume(&mut self, sid: u64, delivery: &Delivery, payload: &[u8], sink: &mut Sink<'_>) {
        let started = match self.js.consumers.get(&sid) {
            Some(consumer) => consumer.started,
            None => return,
        };
        if !started {
            self.start_consumer(sid, Some(delivery.sseq), sink);
        }
        let js = &mut self.js;
        let Some(consumer) = js.consumers.get(&sid) else {
            return;
        };
        let Some(followed) = js.followed.get_mut(&consumer.topic) else {
            return;
        };
        if delivery.sseq <= followed.last {
            return;
        }
        followed.last = delivery.sseq;
        let lost = delivery.numbered.map_or(0, |(origin, number)| {
            followed.lost_before(origin, number, delivery.sseq)
        });
        let id = EventId {
            epoch: js.epoch,
            offset: delivery.sseq,
        };
        let filling = consumer.resume.is_none()
            && consumer
                .backlog
                .is_some_and(|backlog| delivery.cseq <= backlog)
            && consumer
                .created
                .is_none_or(|created| delivery.stored < created);
        let live_own = delivery.own.is_some_and(|(seq, _)| seq > consumer.mark);
        let kept = filling && !live_own;
        if lost > 0 {
            // The topic's limit discarded them before the consumer got to them (or they were
            // lost on the way to the stream): gone for every process that had not delivered
            // them yet. Their ids lie somewhere before this one.
            let before = EventId {
                offset: delivery.sseq.saturating_sub(1),
                ..id
            };
            let note = if kept {
                Stream::Hole(before)
            } else {
                Stream::Lost {
                    before,
                    count: lost,
                }
            };
            sink.received
                .push(Received::streamed(&consumer.topic, b"", note));
        }
        let stream = if kept {
            Stream::Kept(id)
        } else {
            if delivery.own.is_none() {
                sink.stats.received += 1;
            }
            Stream::Message {
                id,
                except: delivery.own.and_then(|(_, except)| except),
            }
        };
        sink.received
            .push(Received::streamed(&consumer.topic, payload, stream));
    }
}

/// A subject we may publish to: printable ASCII, no blank.
fn is_subject(subject: &[u8]) -> bool {
    !subject.is_empty() && subject.iter().all(|&b| (0x21..=0x7e).contains(&b))
}

/// A subject token: a subject without dots or wildcards.
fn is_token(token: &[u8]) -> bool {
    is_subject(token) && !token.iter().any(|b| b".*>".contains(b))
}

/// The history settings a sharing protocol reads, if any.
pub(super) type History = Option<Arc<SharedHistory>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerStats;
    use crate::broker::stream::Protocol;
    use crate::broker::stream::testing::Feed;
    use crate::broker::url::BrokerUrl;
    use crate::history::HistoryLimits;
    use std::sync::atomic::AtomicUsize;

    const INFO: &[u8] = b"INFO {\"server_id\":\"x\",\"headers\":true,\"max_payload\":1048576}\r\n";
    const CREATED: &str = "2026-12-06T17:50:30.840370237Z";
    const EPOCH: u64 = 1_796_579_430_840_370_237;

    fn stream_answer(created: &str) -> String {
        format!(
            "{{\"type\":\"io.nats.jetstream.api.v1.stream_create_response\",\"config\":{{\
             \"name\":\"fdcast_app\",\"subjects\":[\"app.\\u003e\"],\"max_msgs_per_subject\":5,\
             \"max_age\":0}},\"created\":\"{created}\",\"state\":{{\"messages\":0,\
             \"first_seq\":1,\"last_seq\":3}},\"did_create\":true}}"
        )
    }

    fn msg(subject: &str, sid: u64, reply: &str, payload: &[u8]) -> Vec<u8> {
        let mut line = format!("MSG {subject} {sid} {reply} {}\r\n", payload.len()).into_bytes();
        line.extend_from_slice(payload);
        line.extend_from_slice(b"\r\n");
        line
    }

    fn hmsg(subject: &str, sid: u64, reply: &str, headers: &str, payload: &[u8]) -> Vec<u8> {
        let total = headers.len() + payload.len();
        let mut line = format!(
            "HMSG {subject} {sid} {reply} {} {total}\r\n{headers}",
            headers.len()
        )
        .into_bytes();
        line.extend_from_slice(payload);
        line.extend_from_slice(b"\r\n");
        line
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn with_history(max_messages: usize) -> (NatsProtocol, Arc<SharedHistory>) {
        let limit = Arc::new(AtomicUsize::new(1 << 20));
        let url = BrokerUrl::parse("nats://127.0.0.1", 4222).unwrap();
        let mut nats = NatsProtocol::new(&url, "app", limit).unwrap();
        let history = Arc::new(SharedHistory::default());
        history.set(HistoryLimits {
            max_messages,
            ..HistoryLimits::default()
        });
        nats.history = Some(Arc::clone(&history));
        nats.start(&mut Vec::new());
        (nats, history)
    }

    fn inbox(nats: &NatsProtocol) -> String {
        text(&nats.js.inbox)
    }

    /// A session through its handshake, the stream created (`CREATED`).
    fn open() -> (NatsProtocol, Feed) {
        let (mut nats, _) = with_history(5);
        let mut feed = handshake(&mut nats, CREATED);
        assert!(nats.is_open());
        feed.out.clear();
        (nats, feed)
    }

    /// A connection's handshake, through the answer of a stream made at `created`.
    fn handshake(nats: &mut NatsProtocol, created: &str) -> Feed {
        let mut feed = Feed::default();
        feed.all(nats, INFO).unwrap();
        feed.all(nats, b"PONG\r\n").unwrap();
        let answer = stream_answer(created);
        let reply = format!("{}a.1", inbox(nats));
        feed.all(nats, &msg(&reply, 1, "", answer.as_bytes()))
            .unwrap();
        feed
    }

    fn id(offset: u64) -> EventId {
        EventId {
            epoch: EPOCH,
            offset,
        }
    }

    fn streams(feed: &mut Feed) -> Vec<(Vec<u8>, Vec<u8>, Stream)> {
        feed.received
            .drain(..)
            .map(|received| {
                (
                    received.topic().to_vec(),
                    received.payload().to_vec(),
                    received.stream.expect("a shared message"),
                )
            })
            .collect()
    }

    fn ack(consumer_seq: u64, stream_seq: u64, pending: u64) -> String {
        format!("$JS.ACK.fdcast_app.C1.1.{stream_seq}.{consumer_seq}.1796579430840370237.{pending}")
    }

    /// Subscribes `news` (sid 2) and answers its consumer with `backlog` kept messages.
    fn consumer(nats: &mut NatsProtocol, feed: &mut Feed, backlog: u64) {
        let mut out = Vec::new();
        nats.subscribe(b"news", &mut out);
        nats.end_of_subscriptions(&mut out);
        let reply = format!("{}a.2", inbox(nats));
        let answer = format!(
            "{{\"type\":\"io.nats.jetstream.api.v1.consumer_create_response\",\"name\":\"C1\",\
             \"delivered\":{{\"consumer_seq\":0,\"stream_seq\":0}},\"num_pending\":{backlog}}}"
        );
        feed.all(nats, &msg(&reply, 1, "", answer.as_bytes()))
            .unwrap();
    }

    #[test]
    fn the_handshake_creates_the_stream_and_opens_on_its_answer() {
        let (mut nats, history) = with_history(5);
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        let inbox = inbox(&nats);
        assert!(inbox.starts_with("_INBOX.") && inbox.len() == 24, "{inbox}");
        let config = "{\"name\":\"fdcast_app\",\"subjects\":[\"app.>\"],\"retention\":\"limits\",\
                      \"max_msgs_per_subject\":5,\"max_age\":0,\"storage\":\"file\",\
                      \"discard\":\"old\",\"num_replicas\":1}";
        let expected = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false,\"headers\":true,\
             \"no_responders\":true,\"lang\":\"rust-fdcast\",\"version\":\"{}\",\"protocol\":1}}\r\n\
             SUB {inbox}a.* 1\r\nPUB $JS.API.STREAM.CREATE.fdcast_app {inbox}a.1 {}\r\n{config}\r\n\
             PING\r\n",
            env!("CARGO_PKG_VERSION"),
            config.len()
        );
        assert_eq!(text(&feed.out), expected);
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        assert!(!nats.is_open(), "open once the stream answers");
        let answer = stream_answer(CREATED);
        feed.all(
            &mut nats,
            &msg(&format!("{inbox}a.1"), 1, "", answer.as_bytes()),
        )
        .unwrap();
        assert!(nats.is_open());
        assert_eq!(nats.js.epoch, EPOCH);
        assert_eq!(
            (
                nats.js.per_subject,
                nats.js.stream_first,
                nats.js.stream_last
            ),
            (5, 1, 3)
        );
        assert!(!history.is_unavailable());
    }

    #[test]
    fn a_stream_made_with_other_limits_is_used_as_it_is() {
        let (mut nats, history) = with_history(7);
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        let inbox = inbox(&nats);
        feed.out.clear();
        let refused = "{\"type\":\"io.nats.jetstream.api.v1.stream_create_response\",\"error\":\
                       {\"code\":400,\"err_code\":10058,\"description\":\"stream name already in \
                       use with a different configuration\"}}";
        feed.all(
            &mut nats,
            &msg(&format!("{inbox}a.1"), 1, "", refused.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            text(&feed.out),
            format!("PUB $JS.API.STREAM.INFO.fdcast_app {inbox}a.2 0\r\n\r\n")
        );
        assert!(!nats.is_open());
        let answer = stream_answer(CREATED);
        feed.all(
            &mut nats,
            &msg(&format!("{inbox}a.2"), 1, "", answer.as_bytes()),
        )
        .unwrap();
        assert!(nats.is_open() && nats.js.on);
        assert_eq!(nats.js.per_subject, 5, "the stream's own limit");
        assert!(!history.is_unavailable());
    }

    #[test]
    fn a_server_without_jetstream_leaves_history_per_process() {
        for answer in [
            hmsg("{inbox}a.1", 1, "", "NATS/1.0 503\r\n\r\n", b""),
            msg(
                "{inbox}a.1",
                1,
                "",
                b"{\"error\":{\"code\":503,\"err_code\":10039,\"description\":\"jetstream not enabled\"}}",
            ),
        ] {
            let (mut nats, history) = with_history(5);
            let mut feed = Feed::default();
            feed.all(&mut nats, INFO).unwrap();
            feed.all(&mut nats, b"PONG\r\n").unwrap();
            let answer = text(&answer).replace("{inbox}", &inbox(&nats));
            feed.all(&mut nats, answer.as_bytes()).unwrap();
            assert!(nats.is_open() && !nats.js.on);
            assert!(history.is_unavailable());
            // Plain NATS core from now on.
            let mut out = Vec::new();
            nats.subscribe(b"news", &mut out);
            assert_eq!(out, b"SUB app.news 2\r\n");
        }
    }

    #[test]
    fn a_topics_consumer_fills_its_mirror_then_delivers() {
        let (mut nats, mut feed) = open();
        let inbox = inbox(&nats);
        let mut out = Vec::new();
        nats.subscribe(b"news", &mut out);
        let request = text(&out);
        assert!(
            request.starts_with(&format!(
                "SUB {inbox}d.2 2\r\nPUB $JS.API.CONSUMER.CREATE.fdcast_app {inbox}a.2 "
            )),
            "{request}"
        );
        assert!(request.contains(&format!(
            "{{\"stream_name\":\"fdcast_app\",\"config\":{{\"deliver_subject\":\"{inbox}d.2\",\
             \"filter_subject\":\"app.news\",\"deliver_policy\":\"all\",\"ack_policy\":\"none\",\
             \"flow_control\":true,\"idle_heartbeat\":5000000000,\"mem_storage\":true,\
             \"inactive_threshold\":30000000000,\"replay_policy\":\"instant\"}}}}\r\n"
        )));
        // A delivery before the answer waits for it.
        feed.all(&mut nats, &msg("app.news", 2, &ack(1, 4, 1), b"k4"))
            .unwrap();
        assert!(feed.received.is_empty());
        let answer = "{\"name\":\"C1\",\"delivered\":{\"consumer_seq\":1,\"stream_seq\":4},\
                      \"num_pending\":1}";
        feed.all(
            &mut nats,
            &msg(&format!("{inbox}a.2"), 1, "", answer.as_bytes()),
        )
        .unwrap();
        assert!(feed.received.is_empty(), "the fill is not whole yet");
        feed.all(&mut nats, &msg("app.news", 2, &ack(2, 7, 0), b"k7"))
            .unwrap();
        feed.all(&mut nats, &msg("app.news", 2, &ack(3, 9, 0), b"m9"))
            .unwrap();
        let news = b"news".to_vec();
        assert_eq!(
            streams(&mut feed),
            vec![
                (news.clone(), vec![], Stream::Synced(id(3))),
                (news.clone(), b"k4".to_vec(), Stream::Kept(id(4))),
                (news.clone(), b"k7".to_vec(), Stream::Kept(id(7))),
                (
                    news.clone(),
                    b"m9".to_vec(),
                    Stream::Message {
                        id: id(9),
                        except: None
                    }
                ),
            ]
        );
        assert_eq!(feed.stats.received, 1);
        // A delivery seen already is skipped.
        feed.all(&mut nats, &msg("app.news", 2, &ack(3, 9, 0), b"m9"))
            .unwrap();
        assert!(feed.received.is_empty());
    }

    #[test]
    fn what_the_stream_stored_after_a_fills_consumer_was_made_is_live() {
        let (mut nats, mut feed) = open();
        let inbox = inbox(&nats);
        nats.subscribe(b"news", &mut Vec::new());
        // Three kept when the consumer was made; the topic's limit discards two of them
        // before it delivers them, and two new ones take their consumer sequences.
        let answer = format!(
            "{{\"name\":\"C1\",\"created\":\"{CREATED}\",\
             \"delivered\":{{\"consumer_seq\":0,\"stream_seq\":0}},\"num_pending\":3}}"
        );
        feed.all(
            &mut nats,
            &msg(&format!("{inbox}a.2"), 1, "", answer.as_bytes()),
        )
        .unwrap();
        let created: u64 = 1_796_579_430_840_370_237;
        let stored_ack = |cseq: u64, sseq: u64, stored: u64| {
            format!("$JS.ACK.fdcast_app.C1.1.{sseq}.{cseq}.{stored}.0")
        };
        for (cseq, sseq, stored, payload) in [
            (1, 6, created - 5, &b"k6"[..]),
            (2, 8, created + 1, b"m8"),
            (3, 9, created + 2, b"m9"),
        ] {
            feed.all(
                &mut nats,
                &msg("app.news", 2, &stored_ack(cseq, sseq, stored), payload),
            )
            .unwrap();
        }
        let news = b"news".to_vec();
        let live = |sseq, payload: &[u8]| {
            (
                news.clone(),
                payload.to_vec(),
                Stream::Message {
                    id: id(sseq),
                    except: None,
                },
            )
        };
        assert_eq!(
            streams(&mut feed),
            vec![
                (news.clone(), vec![], Stream::Synced(id(5))),
                (news.clone(), b"k6".to_vec(), Stream::Kept(id(6))),
                live(8, b"m8"),
                live(9, b"m9"),
            ]
        );
    }

    #[test]
    fn a_topic_with_nothing_kept_is_synced_from_the_streams_newest() {
        let (mut nats, mut feed) = open();
        consumer(&mut nats, &mut feed, 0);
        assert_eq!(
            streams(&mut feed),
            vec![(b"news".to_vec(), vec![], Stream::Synced(id(3)))]
        );
    }

    #[test]
    fn own_publishes_carry_the_origin_and_come_back_with_their_except_fd() {
        let (mut nats, mut feed) = open();
        let own = Arc::clone(&nats.own);
        // Published before the topic's interest: history if the consumer finds it kept.
        let mut encoder = super::super::PubEncoder::new("app", Arc::clone(&own));
        let mut before = Vec::new();
        crate::broker::outbound::Encode::encode_shared(
            &mut encoder,
            b"news",
            b"old",
            None,
            &mut before,
        );
        let origin = text(&own.origin);
        let header = format!("NATS/1.0\r\nFdcast-Origin: {origin} 1 - 1\r\n\r\n");
        assert_eq!(
            text(&before),
            format!(
                "HPUB app.news {} {}\r\n{header}old\r\n",
                header.len(),
                header.len() + 3
            )
        );
        crate::broker::outbound::Encode::interest(&mut encoder, b"news", true);
        let mut after = Vec::new();
        crate::broker::outbound::Encode::encode_shared(
            &mut encoder,
            b"news",
            b"new",
            Some(9),
            &mut after,
        );
        assert!(text(&after).contains(&format!("Fdcast-Origin: {origin} 2 9 2\r\n")));
        consumer(&mut nats, &mut feed, 2);
        feed.received.clear();
        feed.all(
            &mut nats,
            &hmsg("app.news", 2, &ack(1, 5, 1), &header, b"old"),
        )
        .unwrap();
        let header = format!("NATS/1.0\r\nFdcast-Origin: {origin} 2 9 2\r\n\r\n");
        feed.all(
            &mut nats,
            &hmsg("app.news", 2, &ack(2, 6, 0), &header, b"new"),
        )
        .unwrap();
        // Another registry's header is anybody's message.
        let header = "NATS/1.0\r\nFdcast-Origin: 0123456789abcdef 3 4 1\r\n\r\n";
        feed.all(
            &mut nats,
            &hmsg("app.news", 2, &ack(3, 8, 0), header, b"theirs"),
        )
        .unwrap();
        let news = b"news".to_vec();
        assert_eq!(
            streams(&mut feed)[1..],
            [
                (news.clone(), b"old".to_vec(), Stream::Kept(id(5))),
                (
                    news.clone(),
                    b"new".to_vec(),
                    Stream::Message {
                        id: id(6),
                        except: Some(9)
                    }
                ),
                (
                    news.clone(),
                    b"theirs".to_vec(),
                    Stream::Message {
                        id: id(8),
                        except: None
                    }
                ),
            ]
        );
        assert_eq!(feed.stats.received, 1, "ours are not received from others");
    }

    #[test]
    fn each_topic_numbers_its_shared_publishes() {
        let own = Arc::new(Own::new());
        let mut encoder = super::super::PubEncoder::new("app", Arc::clone(&own));
        let mut out = Vec::new();
        for topic in [b"a", b"b", b"a", b"a", b"b"] {
            crate::broker::outbound::Encode::encode_shared(
                &mut encoder,
                topic,
                b"x",
                None,
                &mut out,
            );
        }
        let origin = text(&own.origin);
        let numbers: Vec<String> = text(&out)
            .lines()
            .filter_map(|line| line.strip_prefix(&format!("Fdcast-Origin: {origin} ")))
            .map(str::to_owned)
            .collect();
        assert_eq!(numbers, ["1 - 1", "2 - 1", "3 - 2", "4 - 3", "5 - 2"]);

        // Past 4 MiB of topic names the numbers are forgotten and start again at 1.
        let long_topics = (4 << 20) / 4096;
        for n in 0..=long_topics {
            let topic = format!("{n:04096}");
            crate::broker::outbound::Encode::encode_shared(
                &mut encoder,
                topic.as_bytes(),
                b"x",
                None,
                &mut Vec::new(),
            );
        }
        let mut out = Vec::new();
        crate::broker::outbound::Encode::encode_shared(&mut encoder, b"a", b"x", None, &mut out);
        assert!(text(&out).contains(" - 1\r\n"), "{}", text(&out));
    }

    #[test]
    fn past_its_publisher_limit_a_topic_forgets_the_quietest() {
        let mut followed = Followed::after(0);
        let mut sseq = 0;
        let mut hear = |followed: &mut Followed, origin: u64, number: u64| {
            sseq += 1;
            followed.lost_before(origin, number, sseq)
        };
        for origin in 0..MAX_ORIGINS as u64 {
            assert_eq!(hear(&mut followed, origin, 1), 0);
        }
        // Origin 0 speaks again: origin 1 is now the quietest, and goes for a newcomer.
        assert_eq!(hear(&mut followed, 0, 3), 1);
        assert_eq!(hear(&mut followed, 9999, 1), 0);
        assert_eq!(followed.origins.len(), MAX_ORIGINS);
        assert_eq!(hear(&mut followed, 0, 5), 1, "origin 0 still checked");
        assert_eq!(hear(&mut followed, 1, 9), 0, "origin 1 starts afresh");
        assert_eq!(
            hear(&mut followed, 2, 9),
            0,
            "origin 2 made room for origin 1"
        );
    }

    #[test]
    fn a_publishers_skipped_numbers_are_a_loss_told_once() {
        let (mut nats, mut feed) = open();
        consumer(&mut nats, &mut feed, 0);
        feed.received.clear();
        let news = b"news".to_vec();
        let deliver =
            |nats: &mut NatsProtocol, feed: &mut Feed, n: u64, sseq: u64, header: &str| {
                let payload = format!("m{sseq}");
                feed.all(
                    nats,
                    &hmsg("app.news", 2, &ack(n, sseq, 0), header, payload.as_bytes()),
                )
                .unwrap();
            };
        let theirs = |number: u64| {
            format!("NATS/1.0\r\nFdcast-Origin: 0123456789abcdef {number} - {number}\r\n\r\n")
        };
        let other = "NATS/1.0\r\nFdcast-Origin: fedcba9876543210 9 - 7\r\n\r\n";
        deliver(&mut nats, &mut feed, 1, 10, &theirs(1));
        // Another publisher's first message starts its count, whatever its number.
        deliver(&mut nats, &mut feed, 2, 11, other);
        deliver(&mut nats, &mut feed, 3, 12, &theirs(2));
        // Numbers 3 to 5 were discarded before the consumer got to them.
        deliver(&mut nats, &mut feed, 4, 20, &theirs(6));
        // A publisher that starts counting again lost nothing.
        deliver(&mut nats, &mut feed, 5, 21, &theirs(1));
        let message = |sseq| {
            (
                news.clone(),
                format!("m{sseq}").into_bytes(),
                Stream::Message {
                    id: id(sseq),
                    except: None,
                },
            )
        };
        assert_eq!(
            streams(&mut feed),
            [
                message(10),
                message(11),
                message(12),
                (
                    news.clone(),
                    vec![],
                    Stream::Lost {
                        before: id(19),
                        count: 3
                    }
                ),
                message(20),
                message(21),
            ]
        );

        // Across a reconnect, the count goes on: the topic's limit discarded two meanwhile.
        nats.start(&mut Vec::new());
        let mut feed = handshake(&mut nats, CREATED);
        consumer(&mut nats, &mut feed, 1);
        feed.received.clear();
        deliver(&mut nats, &mut feed, 1, 30, &theirs(4));
        assert_eq!(
            streams(&mut feed),
            [
                (
                    news.clone(),
                    vec![],
                    Stream::Lost {
                        before: id(29),
                        count: 2
                    }
                ),
                message(30),
            ]
        );
    }

    #[test]
    fn publishes_wait_while_a_consumer_is_created() {
        let (mut nats, mut feed) = open();
        let mut out = Vec::new();
        nats.subscribe(b"news", &mut out);
        out.clear();
        nats.publish(b"other", b"x", &mut out);
        assert!(out.is_empty(), "parked");
        let reply = format!("{}a.2", inbox(&nats));
        let answer = "{\"name\":\"C1\",\"delivered\":{\"consumer_seq\":0},\"num_pending\":0}";
        feed.all(&mut nats, &msg(&reply, 1, "", answer.as_bytes()))
            .unwrap();
        assert!(text(&feed.out).ends_with("PUB app.other 1\r\nx\r\n"));
        nats.publish(b"other", b"y", &mut out);
        assert_eq!(out, b"PUB app.other 1\r\ny\r\n");
    }

    #[test]
    fn a_disable_sends_the_parked_publishes() {
        let (mut nats, _) = open();
        let mut out = Vec::new();
        nats.subscribe(b"news", &mut out);
        out.clear();
        nats.publish(b"other", b"x", &mut out);
        nats.end_of_publishes(&mut out, false);
        assert!(out.is_empty(), "parked");
        nats.end_of_publishes(&mut out, true);
        assert_eq!(out, b"PUB app.other 1\r\nx\r\nPING\r\n");
    }

    #[test]
    fn a_skipped_delivery_recreates_the_consumer_after_the_last_one() {
        let (mut nats, mut feed) = open();
        let inbox = inbox(&nats);
        consumer(&mut nats, &mut feed, 0);
        feed.all(&mut nats, &msg("app.news", 2, &ack(1, 10, 0), b"a"))
            .unwrap();
        feed.out.clear();
        // Consumer sequence 2 never came.
        feed.all(&mut nats, &msg("app.news", 2, &ack(3, 12, 0), b"c"))
            .unwrap();
        let out = text(&feed.out);
        assert!(
            out.starts_with(&format!(
                "UNSUB 2\r\nPUB $JS.API.CONSUMER.DELETE.fdcast_app.C1 {inbox}a.3 0\r\n\r\n\
                 SUB {inbox}d.3 3\r\nPUB $JS.API.CONSUMER.CREATE.fdcast_app {inbox}a.4 "
            )),
            "{out}"
        );
        assert!(out.contains("\"deliver_policy\":\"by_start_sequence\",\"opt_start_seq\":11"));
        assert!(out.ends_with("PING\r\n"));
        // The old subscription's deliveries are no one's now.
        feed.all(&mut nats, &msg("app.news", 2, &ack(4, 13, 0), b"d"))
            .unwrap();
        let reply = format!("{inbox}a.4");
        let answer = "{\"name\":\"C2\",\"delivered\":{\"consumer_seq\":0},\"num_pending\":3}";
        feed.all(&mut nats, &msg(&reply, 1, "", answer.as_bytes()))
            .unwrap();
        for (cseq, sseq, payload) in [(1, 11, b"b"), (2, 12, b"c"), (3, 13, b"d")] {
            feed.all(&mut nats, &msg("app.news", 3, &ack(cseq, sseq, 0), payload))
                .unwrap();
        }
        let got: Vec<_> = streams(&mut feed)
            .into_iter()
            .map(|(_, payload, stream)| (payload, stream))
            .collect();
        let message = |offset| Stream::Message {
            id: id(offset),
            except: None,
        };
        assert_eq!(
            got,
            vec![
                (vec![], Stream::Synced(id(3))),
                (b"a".to_vec(), message(10)),
                (b"b".to_vec(), message(11)),
                (b"c".to_vec(), message(12)),
                (b"d".to_vec(), message(13)),
            ]
        );
    }

    #[test]
    fn a_consumer_the_server_falls_silent_about_is_replaced() {
        let (mut nats, mut feed) = open();
        let inbox = inbox(&nats);
        assert_eq!(
            Protocol::deadline(&nats),
            None,
            "no consumer, nothing to hear"
        );
        consumer(&mut nats, &mut feed, 0);
        feed.all(&mut nats, &msg("app.news", 2, &ack(1, 10, 0), b"a"))
            .unwrap();
        feed.out.clear();
        let due = Protocol::deadline(&nats).expect("a consumer is listened for");
        // Before the silence is long enough, nothing happens.
        let mut out = Vec::new();
        nats.on_deadline(due - Duration::from_millis(1), &mut out);
        assert!(out.is_empty(), "{}", text(&out));
        // A heartbeat is the server speaking of it: the deadline moves on.
        std::thread::sleep(Duration::from_millis(2));
        let headers = "NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1\r\n\r\n";
        let n = headers.len();
        let heartbeat = format!("HMSG {inbox}d.2 2  {n} {n}\r\n{headers}\r\n");
        feed.all(&mut nats, heartbeat.as_bytes()).unwrap();
        let later = Protocol::deadline(&nats).unwrap();
        assert!(later > due);
        // Silent past it (deleted on the server, say): replaced after the last delivered.
        nats.on_deadline(later, &mut out);
        let out = text(&out);
        assert!(out.starts_with("UNSUB 2\r\n"), "{out}");
        assert!(out.contains("\"opt_start_seq\":11"), "{out}");
    }

    #[test]
    fn heartbeats_reveal_lost_deliveries_and_flow_control_is_answered() {
        let (mut nats, mut feed) = open();
        let inbox = inbox(&nats);
        consumer(&mut nats, &mut feed, 0);
        feed.all(&mut nats, &msg("app.news", 2, &ack(1, 10, 0), b"a"))
            .unwrap();
        feed.out.clear();
        let deliver = format!("{inbox}d.2");
        // As the server writes them: no reply subject, two blanks.
        let heartbeat = |last: u64| {
            let headers = format!(
                "NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: {last}\r\n\
                 Nats-Last-Stream: 16\r\n\r\n"
            );
            let n = headers.len();
            format!("HMSG {deliver} 2  {n} {n}\r\n{headers}\r\n")
        };
        let flow = hmsg(
            &deliver,
            2,
            "$JS.FC.fdcast_app.C1.xyz",
            "NATS/1.0 100 FlowControl Request\r\n\r\n",
            b"",
        );
        feed.all(&mut nats, &flow).unwrap();
        assert_eq!(text(&feed.out), "PUB $JS.FC.fdcast_app.C1.xyz 0\r\n\r\n");
        feed.out.clear();
        feed.all(&mut nats, heartbeat(1).as_bytes()).unwrap();
        assert!(feed.out.is_empty(), "nothing missed");
        feed.all(&mut nats, heartbeat(2).as_bytes()).unwrap();
        let out = text(&feed.out);
        assert!(out.starts_with("UNSUB 2\r\n"), "{out}");
        assert!(out.contains("\"opt_start_seq\":11"), "{out}");
        assert_eq!(feed.stats.malformed, 0);
    }

    #[test]
    fn a_reconnect_resumes_each_consumer_after_its_last_delivery() {
        let (mut nats, mut feed) = open();
        consumer(&mut nats, &mut feed, 0);
        feed.all(&mut nats, &msg("app.news", 2, &ack(1, 10, 0), b"a"))
            .unwrap();
        for (created, resumes) in [(CREATED, true), ("2026-12-06T18:00:00Z", false)] {
            nats.start(&mut Vec::new());
            handshake(&mut nats, created);
            let mut out = Vec::new();
            nats.subscribe(b"news", &mut out);
            let out = text(&out);
            // Another stream (created anew): the mirror fills again.
            assert_eq!(
                out.contains("\"deliver_policy\":\"by_start_sequence\",\"opt_start_seq\":11"),
                resumes,
                "{out}"
            );
            assert_eq!(out.contains("\"deliver_policy\":\"all\""), !resumes);
        }
    }

    #[test]
    fn a_resume_past_a_possible_loss_is_a_hole() {
        let (mut nats, mut feed) = open();
        consumer(&mut nats, &mut feed, 0);
        feed.all(&mut nats, &msg("app.news", 2, &ack(1, 10, 0), b"a"))
            .unwrap();
        // The topic holds as many as it may keep (5) when the consumer resumes.
        nats.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut nats, INFO).unwrap();
        feed.all(&mut nats, b"PONG\r\n").unwrap();
        let reply = format!("{}a.1", inbox(&nats));
        let answer = stream_answer(CREATED);
        feed.all(&mut nats, &msg(&reply, 1, "", answer.as_bytes()))
            .unwrap();
        let sid = nats.next_sid;
        consumer_at(&mut nats, &mut feed, 5);
        feed.all(&mut nats, &msg("app.news", sid, &ack(1, 20, 4), b"x"))
            .unwrap();
        let got: Vec<_> = streams(&mut feed)
            .into_iter()
            .map(|(_, _, stream)| stream)
            .collect();
        assert_eq!(
            got,
            vec![
                Stream::Hole(id(19)),
                Stream::Message {
                    id: id(20),
                    except: None
                }
            ]
        );
    }

    /// Subscribes `news` on a session after a reconnect and answers its consumer.
    fn consumer_at(nats: &mut NatsProtocol, feed: &mut Feed, pending: u64) {
        let mut out = Vec::new();
        nats.subscribe(b"news", &mut out);
        let reply = format!("{}a.2", inbox(nats));
        let answer = format!(
            "{{\"name\":\"C3\",\"delivered\":{{\"consumer_seq\":0}},\"num_pending\":{pending}}}"
        );
        feed.all(nats, &msg(&reply, 1, "", answer.as_bytes()))
            .unwrap();
    }

    #[test]
    fn an_unsubscribed_topic_unsyncs_its_mirror() {
        let (mut nats, mut feed) = open();
        consumer(&mut nats, &mut feed, 0);
        feed.received.clear();
        let mut out = Vec::new();
        nats.unsubscribe(b"news", &mut out);
        assert_eq!(
            text(&out),
            format!(
                "UNSUB 2\r\nPUB $JS.API.CONSUMER.DELETE.fdcast_app.C1 {}a.3 0\r\n\r\n",
                inbox(&nats)
            )
        );
        feed.all(&mut nats, b"PING\r\n").unwrap();
        assert_eq!(
            streams(&mut feed),
            vec![(b"news".to_vec(), vec![], Stream::Unsynced)]
        );
        // Its deliveries still in flight are no one's.
        feed.all(&mut nats, &msg("app.news", 2, &ack(1, 10, 0), b"a"))
            .unwrap();
        assert!(feed.received.is_empty());
        let mut stats = BrokerStats::default();
        nats.report(&mut stats);
    }

    #[test]
    fn ack_subjects_are_read_in_both_forms() {
        assert_eq!(
            super::ack(b"$JS.ACK.s.c.1.16.5.1796580964781583609.2"),
            Some(Ack {
                consumer: b"c",
                stream_seq: 16,
                consumer_seq: 5,
                stored: 1_796_580_964_781_583_609,
                pending: 2
            })
        );
        assert_eq!(
            super::ack(b"$JS.ACK.dom.HASH.s.c.1.16.5.1796580964781583609.2.tok"),
            Some(Ack {
                consumer: b"c",
                stream_seq: 16,
                consumer_seq: 5,
                stored: 1_796_580_964_781_583_609,
                pending: 2
            })
        );
        for junk in [
            &b""[..],
            b"$JS.ACK",
            b"$JS.ACK.s.c.1.x.5.1.2",
            b"$JS.ACK.s..1.16.5.1.2",
            b"$JS.NAK.s.c.1.16.5.1.2",
            b"_INBOX.x.s.c.1.16.5.1.2",
            b"$JS.ACK.s.c.1.16.5.1.2.3",
            b"$JS.ACK.s.c.1.99999999999999999999999.5.1.2",
        ] {
            assert_eq!(super::ack(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn headers_give_their_status_and_values() {
        let headers = Headers::parse(
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\nnats-last-stream:16 \r\n\r\n",
        )
        .unwrap();
        assert_eq!(headers.status, 100);
        assert_eq!(headers.get(b"nats-last-consumer"), Some(&b"5"[..]));
        assert_eq!(headers.get(b"Nats-Last-Stream"), Some(&b"16"[..]));
        assert_eq!(headers.get(b"Nats-Last"), None);
        let headers = Headers::parse(b"NATS/1.0\r\nFdcast-Origin: a 1 -\r\n\r\n").unwrap();
        assert_eq!(headers.status, 0);
        assert_eq!(headers.get(ORIGIN_HEADER), Some(&b"a 1 -"[..]));
        assert_eq!(Headers::parse(b"NATS/1.0 503\r\n\r\n").unwrap().status, 503);
        for junk in [
            &b""[..],
            b"NATS/1.0",
            b"HTTP/1.0\r\n\r\n",
            b"NATS/1.0 5x\r\n",
        ] {
            assert!(Headers::parse(junk).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn created_times_are_read_to_the_nanosecond() {
        assert_eq!(rfc3339_nanos(CREATED.as_bytes()), Some(EPOCH));
        assert_eq!(rfc3339_nanos(b"1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_nanos(b"2000-02-29T23:59:59.5Z"),
            Some(951_868_799_500_000_000)
        );
        for junk in [
            &b""[..],
            b"2026-12-06",
            b"2026-12-06T17:50:30",
            b"2026-12-06T17:50:30.Z",
            b"2026-12-06T17:50:30.1234567890Z",
            b"2026-13-06T17:50:30Z",
            b"2026-12-06T17:50:30+01:00",
            b"0001-01-01T00:00:00Z",
        ] {
            assert_eq!(rfc3339_nanos(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn stream_names_and_configs() {
        assert_eq!(stream_name(b"app"), b"fdcast_app");
        assert_eq!(stream_name(b"a.b_c-D9"), b"fdcast_a_2Eb_5Fc-D9");
        assert_ne!(stream_name(b"a.b"), stream_name(b"a_b"));
        let config = |limits| text(&stream_config(b"s", b"p\"q", limits));
        assert!(config((0, 0)).contains("\"max_msgs_per_subject\":1000,\"max_age\":0,"));
        assert!(config((0, 1500)).contains("\"max_msgs_per_subject\":-1,\"max_age\":1500000000,"));
        assert!(config((7, 10)).contains("\"max_msgs_per_subject\":7,\"max_age\":10000000,"));
        assert!(config((0, 0)).contains("\"subjects\":[\"p\\\"q.>\"]"));
    }
}
