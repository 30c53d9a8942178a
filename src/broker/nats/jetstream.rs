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
//!   `Fdcast-Origin: <origin> <seq> <except fd>`: the stream stores it, plain subscribers
//!   get the payload (headers stripped for clients without them), and it comes back to this
//!   process through its consumer, to be delivered here with its id, skipping the except fd.
//! - A topic subscribed gets an ephemeral push consumer filtered on its subject, delivering
//!   to `_INBOX.<random>.d.<sid>` (subscribed exactly: a wildcard on the inbox would get the
//!   deliveries twice). The first consumer of a topic starts from the topic's oldest kept
//!   message: its create answer says how many it had then (`delivered.consumer_seq +
//!   num_pending`), and those are the mirror's fill (`Stream::Kept`); what follows, and our
//!   own publishes made after the topic's interest was queued, are messages. Deliveries that
//!   arrive before the answer are held until it.
//! - Every delivery's reply subject (`$JS.ACK.…`) carries its stream and consumer sequences.
//!   A consumer sequence that skips (a delivery lost), or an idle heartbeat naming a later
//!   one, recreates the consumer from the last stream sequence delivered plus one; so does
//!   every reconnect (`by_start_sequence`), so nothing is delivered twice or skipped.
//! - The stream's `created` time, in nanoseconds, is the ids' epoch: a stream deleted and
//!   created again gets another, and an old id never resumes into it.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{NatsProtocol, Session, decimal, json_field, write_decimal};
use crate::broker::stream::Sink;
use crate::broker::{Received, SharedHistory, Stream, split_shared_record, topic};
use crate::history::{EventId, random_epoch};

/// The header that marks a publish of this registry.
pub(crate) const ORIGIN_HEADER: &[u8] = b"Fdcast-Origin";
/// Consumers' idle heartbeat.
const HEARTBEAT_NS: u64 = 5_000_000_000;
/// How long the server keeps a consumer nobody listens to (ours, after a lost connection).
const INACTIVE_NS: u64 = 30_000_000_000;
/// Messages a subject keeps when history has neither a count nor an age limit.
pub(crate) const DEFAULT_PER_SUBJECT: usize = 1000;

/// What the publishers' encoder and the session share: this registry's origin, the count of
/// its shared publishes, and, per topic whose interest is queued, that count then.
pub(crate) struct Own {
    origin: Box<[u8]>,
    seq: AtomicU64,
    marks: Mutex<HashMap<Box<[u8]>, u64>>,
}

impl Own {
    pub(crate) fn new() -> Own {
        Own {
            origin: format!("{:016x}", random_epoch()).into_bytes().into(),
            seq: AtomicU64::new(0),
            marks: Mutex::new(HashMap::new()),
        }
    }

    /// Writes a shared publish's record (see [`split_shared_record`]) as its `HPUB`; returns
    /// whether it could read it (the registry queues no other).
    pub(super) fn encode(
        &self,
        prefix: &[u8],
        record: &[u8],
        subject: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> bool {
        let Some((topic, except, payload)) = split_shared_record(record) else {
            return false;
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        topic::nats_subject(prefix, topic, subject);
        let mut header = Vec::with_capacity(64);
        header.extend_from_slice(b"NATS/1.0\r\n");
        header.extend_from_slice(ORIGIN_HEADER);
        header.extend_from_slice(b": ");
        header.extend_from_slice(&self.origin);
        header.push(b' ');
        write_decimal(&mut header, seq);
        header.push(b' ');
        match except {
            Some(fd) => write_decimal(&mut header, u64::try_from(fd).unwrap_or(0)),
            None => header.push(b'-'),
        }
        header.extend_from_slice(b"\r\n\r\n");
        out.reserve(subject.len() + header.len() + payload.len() + 32);
        out.extend_from_slice(b"HPUB ");
        out.extend_from_slice(subject);
        out.push(b' ');
        write_decimal(out, header.len() as u64);
        out.push(b' ');
        write_decimal(out, (header.len() + payload.len()) as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        true
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

    /// `(seq, except)` of a delivery's origin header, if it names this registry.
    fn ours(&self, value: &[u8]) -> Option<(u64, Option<RawFd>)> {
        let mut words = value.split(|&b| b == b' ');
        if words.next()? != &*self.origin {
            return None;
        }
        let seq = decimal(words.next()?)?;
        let except = match words.next()? {
            b"-" => None,
            fd => Some(RawFd::try_from(decimal(fd)?).ok()?),
        };
        Some((seq, except))
    }
}

/// An API request in flight, by the number in its reply subject.
enum Request {
    Stream,
    StreamInfo,
    /// A consumer's creation, by its subscription's sid.
    Consumer(u64),
}

/// A delivery held until its consumer's create answer.
struct Delivery {
    sseq: u64,
    cseq: u64,
    payload: Vec<u8>,
    own: Option<(u64, Option<RawFd>)>,
}

/// One topic's consumer, by the sid of its deliver subject.
struct Consumer {
    topic: Box<[u8]>,
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
    held: Vec<Delivery>,
    /// The last consumer sequence seen.
    cseq: u64,
    /// Whether its start (a sync or a hole) was told.
    started: bool,
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
    /// Per topic whose mirror is synced: the last stream sequence delivered. Kept across
    /// reconnects (of one stream), so that the next consumer resumes after it.
    last: HashMap<Box<[u8]>, u64>,
    /// Topics unsubscribed, whose mirrors are to be told so.
    unsynced: Vec<Box<[u8]>>,
    /// Publishes written while a consumer's creation was awaited, sent once none is.
    parked: Vec<u8>,
}

impl State {
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
            js.last.clear();
        }
        js.on = on;
        js.stream_pending = on;
        js.api_sid = 0;
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
        let js = &mut self.js;
        js.next_request += 1;
        let n = js.next_request;
        js.requests.insert(n, request);
        out.extend_from_slice(b"PUB $JS.API.");
        out.extend_from_slice(api);
        out.extend_from_slice(&js.stream);
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
            js.last.clear();
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
        self.js.last.clear();
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
        let resume = self.js.last.get(topic).copied();
        self.new_consumer(topic, resume, mark, out);
    }

    fn new_consumer(&mut self, topic: &[u8], resume: Option<u64>, mark: u64, out: &mut Vec<u8>) {
        let sid = self.next_sid;
        self.next_sid += 1;
        let mut deliver = self.js.inbox.clone();
        deliver.extend_from_slice(b"d.");
        write_decimal(&mut deliver, sid);
        out.extend_from_slice(b"SUB ");
        out.extend_from_slice(&deliver);
        out.push(b' ');
        write_decimal(out, sid);
        out.extend_from_slice(b"\r\n");
        self.topics.insert(sid, Box::from(topic));
        self.sids.insert(Box::from(topic), sid);
        self.unpinged += 1;
        self.unconfirmed += 1;

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
                    last + 1
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
                resume,
                mark,
                stream_last: self.js.stream_last,
                backlog: None,
                held: Vec::new(),
                cseq: 0,
                started: false,
            },
        );
        self.request(b"CONSUMER.CREATE.", Request::Consumer(sid), &body, out);
    }

    /// A topic unsubscribed: its consumer goes (the server drops it once nobody listens),
    /// and its mirror no longer follows (told on the next read).
    pub(super) fn unsubscribed_shared(&mut self, sid: u64, topic: &[u8]) {
        if self.js.consumers.remove(&sid).is_some() {
            self.js.last.remove(topic);
            self.js.unsynced.push(Box::from(topic));
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
        if ack.consumer_seq <= consumer.cseq {
            return;
        }
        if ack.consumer_seq != consumer.cseq + 1 {
            // A delivery went missing: start again after the last one delivered.
            return self.recreate(sid, out);
        }
        consumer.cseq = ack.consumer_seq;
        self.js.stream_last = self.js.stream_last.max(ack.stream_seq);
        let own = headers
            .and_then(|headers| headers.get(ORIGIN_HEADER))
            .and_then(|value| self.own.ours(value));
        let delivery = Delivery {
            sseq: ack.stream_seq,
            cseq: ack.consumer_seq,
            payload: Vec::new(),
            own,
        };
        let Some(consumer) = self.js.consumers.get_mut(&sid) else {
            return;
        };
        if consumer.backlog.is_none() {
            consumer.held.push(Delivery {
                payload: payload.to_vec(),
                ..delivery
            });
            return;
        }
        self.consume(sid, &delivery, payload, sink);
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
        self.unpinged += 1;
        self.unconfirmed += 1;
        let resume = if consumer.started {
            self.js.last.get(&consumer.topic).copied()
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
        let backlog = delivered.saturating_add(pending);
        consumer.backlog = Some(backlog);
        if backlog == 0 {
            self.start(sid, None, sink);
        }
        let held = self
            .js
            .consumers
            .get_mut(&sid)
            .map(|consumer| std::mem::take(&mut consumer.held))
            .unwrap_or_default();
        for delivery in &held {
            self.consume(sid, delivery, &delivery.payload, sink);
        }
    }

    /// Tells the registry where consumer `sid`'s messages start, before its first one
    /// (`first`: its stream sequence; `None` when it found none kept).
    fn start(&mut self, sid: u64, first: Option<u64>, sink: &mut Sink<'_>) {
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
                let covers = first.map_or(consumer.stream_last, |first| first - 1);
                sink.received.push(Received::streamed(
                    &consumer.topic,
                    b"",
                    Stream::Synced(id(covers)),
                ));
                js.last.insert(consumer.topic.clone(), covers);
            }
            Some(after) => {
                // Messages of the topic after `after` may be gone if the stream dropped its
                // oldest past it, or if the topic holds as many as it may keep.
                let suspect = js.stream_first > after + 1
                    || (js.per_subject > 0
                        && consumer.backlog.is_some_and(|n| n >= js.per_subject));
                if let Some(first) = first.filter(|&first| first > after + 1 && suspect) {
                    sink.received.push(Received::streamed(
                        &consumer.topic,
                        b"",
                        Stream::Hole(id(first - 1)),
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
            self.start(sid, Some(delivery.sseq), sink);
        }
        let js = &mut self.js;
        let Some(consumer) = js.consumers.get(&sid) else {
            return;
        };
        let Some(last) = js.last.get_mut(&consumer.topic) else {
            return;
        };
        if delivery.sseq <= *last {
            return;
        }
        *last = delivery.sseq;
        let id = EventId {
            epoch: js.epoch,
            offset: delivery.sseq,
        };
        let filling = consumer.resume.is_none()
            && consumer
                .backlog
                .is_some_and(|backlog| delivery.cseq <= backlog);
        let live_own = delivery.own.is_some_and(|(seq, _)| seq > consumer.mark);
        let stream = if filling && !live_own {
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

/// The history settings a sharing protocol reads, if any.
pub(super) type History = Option<Arc<SharedHistory>>;
