//! Redis pub/sub, spoken in RESP3 on one connection that both subscribes and publishes.
//!
//! A topic's channel is the broker's prefix followed by the topic (`topic::redis_channel`).
//! The session opens with `HELLO 3` (with `AUTH` when the URL has a password) and, for a
//! database other than 0, `SELECT` (pub/sub ignores the database; a bad number still fails
//! the connection, as every other Redis client does). Redis answers commands in the order it
//! received them, so a FIFO of what each command expects pairs every answer with its command:
//! HELLO's map, SELECT's `+OK`, PUBLISH's integer (the publish is confirmed) or error (it is
//! dropped). SUBSCRIBE and UNSUBSCRIBE are answered in that same order by a `subscribe` /
//! `unsubscribe` push, or by an error reply (an ACL refusing the channel, say), so they sit
//! in the FIFO too: an error is always matched with the command it refuses.
//!
//! # Our own messages
//! Redis has no "no echo" option: a connection subscribed to a channel it publishes on
//! receives its own message. Redis executes one command at a time and writes that message
//! push next to the PUBLISH's integer reply, with nothing between them: immediately *before*
//! the reply up to Redis 7.0, immediately *after* it since Redis 7.2 (redis/redis#12326,
//! which Valkey inherits). The filter takes either side, without asking the server's version:
//!
//! - a message push equal to the Publish at the head of the FIFO is *held* until the next
//!   frame. If that frame is the Publish's integer reply, the held push was our echo: it is
//!   dropped and counted as ignored. If it is another push, or the Publish was refused (an
//!   error reply: nothing was published), the held push is delivered.
//! - after a Publish's integer reply (at least one receiver) that dropped no held push, the
//!   next frame, if it is a message push equal to that Publish, is our echo: dropped.
//!
//! Why this is exact: a push on the Publish's channel can sit next to its reply only if the
//! connection is subscribed to that channel when the PUBLISH runs (our subscriptions change
//! only by our own commands, whose confirmations are frames of their own), and then our echo
//! is on one side. A push on the other side, equal in channel and payload, is another
//! client's identical message; when the filter drops it instead of our echo and delivers our
//! echo in its place, the same bytes reach the subscribers in the same order (the reply
//! between them is not a message). "Equal" compares the payload's length and 64-bit hashes
//! of the channel and of the payload, keyed per connection (`RandomState`), so the filter is
//! exact up to a 2^-64 chance of a hash collision between two messages on the same channel,
//! one of them ours, next to one of our replies: no payload is copied per publish.
//!
//! A held push stays unconsumed in the input (`read` reports the bytes before it as used),
//! so when the frame that decides it has not arrived yet, the push is read again, whole,
//! with it: nothing is copied, and nothing of it has been acted on.
//!
//! # Sharded pub/sub (Redis Cluster)
//! The same session speaks `SSUBSCRIBE`/`SUNSUBSCRIBE`/`SPUBLISH` for the cluster engine
//! ([`Flavor::Sharded`]): messages come as `smessage` pushes and go through the same echo
//! filter. What a cluster adds is recorded in [`ClusterNotes`] for the engine to act on:
//! a publish refused with `MOVED` (kept whole in the FIFO, so it can be sent to the new
//! owner), a subscription the node gave up (its own `sunsubscribe` push when the slot moved
//! away, or a refused SSUBSCRIBE), `CLUSTER SHARDS` (or `CLUSTER SLOTS`) replies, and conditions (`CLUSTERDOWN`,
//! `TRYAGAIN`, `ASK`) after which the topology should be read again. Because a node may
//! unsubscribe us on its own, a sharded session pairs a `sunsubscribe` push with its
//! command by the channel it names, not only by its place. When that push and our own
//! SUNSUBSCRIBE of the same channel cross, the push is taken as the confirmation and the
//! node's later `MOVED` for our command answers nothing: a `MOVED` that does not name the
//! slot of the command waiting is skipped.
//!
//! # Shared history
//! With history on, a classic session shares it through Redis streams (`shared`): it loads
//! two scripts in its handshake, publishes through one (the reply carries the stream's id),
//! subscribes topics' id channels (`SSUBSCRIBE`, the shard channel space) instead of their
//! raw channels, and fills the registry's mirrors with the other. Our echo on an id channel
//! carries our reply's id, so the filter above needs no hashing for it.
//!
//! Frames are decoded by `redis-protocol`'s RESP3 decoder, which recurses once per nesting
//! level (about 1 KiB of stack each: a few KiB of `*1\r\n` would overflow a thread's stack),
//! so [`frame_len`] first finds where a frame ends, iteratively, and refuses nesting deeper
//! than Redis ever sends; the decoder then sees only whole, shallow frames.

#![forbid(unsafe_code)]

mod shared;

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use redis_protocol::resp3::decode::complete::decode_range;
use redis_protocol::resp3::types::RangeFrame;

use super::redis_cluster::key_slot;
use super::stream::{Protocol, Sink, StreamEngine, Tls, TlsStart};
use super::url::BrokerUrl;
use super::{Engine, Received, SharedHistory, topic};
use crate::error::Error;
use crate::registry::MAX_TOPIC_LEN;

/// Redis's default `proto-max-bulk-len`: the largest payload a PUBLISH can carry.
pub(crate) const MAX_BULK_LEN: usize = 512 << 20;
/// Nesting accepted in a frame. The deepest Redis sends us is HELLO's reply (a map of module
/// maps holding arrays: 3 or 4 levels).
const MAX_DEPTH: usize = 32;

/// The engine for a `redis://[user[:password]@]host[:port][/db]` URL, or `rediss://` for
/// TLS from the first byte (options `ca=`, `cert=`, `key=`, see `tls`); `name` is the
/// channel prefix. It sets `limit` to the server's default bulk limit.
/// History is shared through streams (see `shared`) while `history` says it is on.
pub(crate) fn engine(
    url: &str,
    name: &str,
    limit: &AtomicUsize,
    history: Arc<SharedHistory>,
) -> Result<Box<dyn Engine>, Error> {
    let mut url = BrokerUrl::parse(url, 6379)?;
    let mut protocol = RedisProtocol::new(&url, name)?;
    protocol.history = Some(history);
    let secure = url.scheme == "rediss";
    let tls = Tls::from_url(&mut url, secure, TlsStart::AtConnect)?;
    let engine = StreamEngine::new(protocol, &url.hosts, tls)?;
    limit.store(MAX_BULK_LEN, Ordering::Relaxed);
    Ok(Box::new(engine))
}

/// What the command at the front of the FIFO expects.
enum Expected {
    Hello,
    Select,
    /// The topic: a sharded session tells its confirmation from a node's own `sunsubscribe`
    /// by it, and names it when the node refuses.
    Subscribe(Box<[u8]>),
    Unsubscribe(Box<[u8]>),
    /// A sharded session keeps the message, to send it again where `MOVED` points.
    Publish(Fingerprint, Option<Retained>),
    /// `CLUSTER SHARDS` or `CLUSTER SLOTS`.
    Topology,
    /// `SCRIPT LOAD` of a shared-history script, in the handshake.
    ScriptLoad(usize),
    /// `SCRIPT LOAD` of the publish script after a `NOSCRIPT` (see `shared`).
    ScriptReload,
    /// A shared publish's script.
    Eval(Box<shared::Eval>),
    /// A fill's script.
    Fetch(Box<shared::Fetch>),
}

/// Which pub/sub a session speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Flavor {
    /// `SUBSCRIBE`/`PUBLISH`: one server (in a cluster, every node would carry every message).
    Classic,
    /// `SSUBSCRIBE`/`SPUBLISH` (Redis 7+): the channel lives on the shard owning its slot.
    Sharded,
}

impl Flavor {
    fn subscribe_command(self) -> &'static [u8] {
        match self {
            Flavor::Classic => b"SUBSCRIBE",
            Flavor::Sharded => b"SSUBSCRIBE",
        }
    }

    fn unsubscribe_command(self) -> &'static [u8] {
        match self {
            Flavor::Classic => b"UNSUBSCRIBE",
            Flavor::Sharded => b"SUNSUBSCRIBE",
        }
    }

    fn publish_command(self) -> &'static [u8] {
        match self {
            Flavor::Classic => b"PUBLISH",
            Flavor::Sharded => b"SPUBLISH",
        }
    }

    /// The push kinds of a message, a subscribe and an unsubscribe.
    fn push_kinds(self) -> [&'static [u8]; 3] {
        match self {
            Flavor::Classic => [b"message", b"subscribe", b"unsubscribe"],
            Flavor::Sharded => [b"smessage", b"ssubscribe", b"sunsubscribe"],
        }
    }
}

/// A publish kept whole: topic then payload in one allocation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Retained {
    bytes: Box<[u8]>,
    topic_len: usize,
    /// Times a node answered it with `MOVED` and it was sent again.
    pub(crate) redirects: u8,
}

impl Retained {
    pub(crate) fn new(topic: &[u8], payload: &[u8]) -> Retained {
        Retained {
            bytes: [topic, payload].concat().into_boxed_slice(),
            topic_len: topic.len(),
            redirects: 0,
        }
    }

    /// Bytes of topic and payload.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn topic(&self) -> &[u8] {
        &self.bytes[..self.topic_len]
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.bytes[self.topic_len..]
    }
}

/// How a cluster's slot map is asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum TopologyCommand {
    /// `CLUSTER SHARDS` (Redis 7+).
    Shards,
    /// `CLUSTER SLOTS`, for a server that refuses `CLUSTER SHARDS`.
    Slots,
}

/// A publish a node refused with `MOVED slot host:port`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Redirect {
    pub(crate) publish: Retained,
    pub(crate) slot: u16,
    /// The new owner; an empty host means the host this connection reached.
    pub(crate) node: (String, u16),
}

/// What a sharded session saw that only the cluster engine can act on; it drains these
/// after every turn.
#[derive(Default)]
pub(crate) struct ClusterNotes {
    pub(crate) redirected: Vec<Redirect>,
    /// Topics whose subscription the node dropped or refused: to be placed again.
    pub(crate) displaced: Vec<Box<[u8]>>,
    /// Whole `CLUSTER SHARDS` or `CLUSTER SLOTS` reply frames (or error frames), in order.
    pub(crate) topology: Vec<Vec<u8>>,
    /// The node answered as if the slot map had changed or the cluster were down.
    pub(crate) refresh: bool,
}

/// A published message as the echo filter compares it (see the module's doc).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fingerprint {
    channel: u64,
    payload: u64,
    payload_len: usize,
}

/// A message push that may be our echo, waiting for the next frame to tell; offsets into the
/// input of the current `read`.
struct Held {
    start: usize,
    channel: Range<usize>,
    payload: Range<usize>,
    /// On an id channel (shared history): `<id> <payload>`.
    shared: bool,
}

pub(crate) struct RedisProtocol {
    prefix: Box<[u8]>,
    flavor: Flavor,
    /// `(user, password)` for HELLO's AUTH.
    auth: Option<(String, String)>,
    db: u32,
    // Per connection, from `start`:
    expected: VecDeque<Expected>,
    /// HELLO and SELECT not yet answered; the session is open at 0.
    handshake: usize,
    /// Publish entries in `expected`.
    publishes: usize,
    /// Subscribe and Unsubscribe entries in `expected`.
    changes: usize,
    /// Channels subscribed, as the last confirmation counted them.
    subscribed: usize,
    /// The Publish whose reply was the last frame, while its echo may be the next.
    echo_after: Option<Fingerprint>,
    hasher: RandomState,
    /// Scratch for a channel name.
    channel: Vec<u8>,
    /// Filled by sharded sessions only.
    pub(crate) notes: ClusterNotes,
    /// The registry's history settings, when history may be shared (classic sessions).
    history: Option<Arc<SharedHistory>>,
    shared: shared::State,
}

impl RedisProtocol {
    fn new(url: &BrokerUrl, name: &str) -> Result<RedisProtocol, Error> {
        match url.scheme.as_str() {
            "redis" | "rediss" => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "a Redis URL starts with redis:// or rediss://",
                ));
            }
        }
        if url.hosts.len() != 1 {
            return Err(Error::InvalidArgument(
                "a redis:// URL names one host (redis+cluster:// is for several)",
            ));
        }
        let db = if url.path.is_empty() {
            0
        } else if url.path.bytes().all(|b| b.is_ascii_digit()) {
            url.path
                .parse::<u32>()
                .map_err(|_| Error::InvalidArgument("a Redis database number is too large"))?
        } else {
            return Err(Error::InvalidArgument(
                "a Redis URL's path is a database number (redis://host/2)",
            ));
        };
        RedisProtocol::with(Flavor::Classic, url, db, name)
    }

    /// A sharded session for a cluster node: the URL's credentials, database 0 (the only one
    /// a cluster has).
    pub(crate) fn sharded(url: &BrokerUrl, name: &str) -> Result<RedisProtocol, Error> {
        RedisProtocol::with(Flavor::Sharded, url, 0, name)
    }

    fn with(flavor: Flavor, url: &BrokerUrl, db: u32, name: &str) -> Result<RedisProtocol, Error> {
        topic::check_redis_prefix(name)?;
        let auth = url.password.as_ref().map(|password| {
            let user = url.user.clone().unwrap_or_else(|| "default".to_string());
            (user, password.clone())
        });
        Ok(RedisProtocol {
            prefix: Box::from(name.as_bytes()),
            flavor,
            auth,
            db,
            expected: VecDeque::new(),
            // Not open before the first `start`.
            handshake: 1,
            publishes: 0,
            changes: 0,
            subscribed: 0,
            echo_after: None,
            hasher: RandomState::new(),
            channel: Vec::new(),
            notes: ClusterNotes::default(),
            history: None,
            shared: shared::State::new(),
        })
    }

    fn fingerprint(&self, channel: &[u8], payload: &[u8]) -> Fingerprint {
        Fingerprint {
            channel: self.hasher.hash_one(channel),
            payload: self.hasher.hash_one(payload),
            payload_len: payload.len(),
        }
    }

    /// Whether a message is the publish `fingerprint` describes; the length is compared first
    /// so that most other messages cost no hashing.
    fn matches(&self, fingerprint: Fingerprint, channel: &[u8], payload: &[u8]) -> bool {
        fingerprint.payload_len == payload.len()
            && fingerprint == self.fingerprint(channel, payload)
    }

    fn head_publish(&self) -> Option<Fingerprint> {
        match self.expected.front() {
            Some(Expected::Publish(fingerprint, _)) => Some(*fingerprint),
            Some(Expected::Eval(eval)) => Some(eval.fingerprint),
            _ => None,
        }
    }

    fn deliver(&self, channel: &[u8], payload: &[u8], sink: &mut Sink<'_>) {
        match channel.strip_prefix(&*self.prefix) {
            Some(topic) if (1..=MAX_TOPIC_LEN).contains(&topic.len()) => {
                sink.received.push(Received::new(topic, payload));
                sink.stats.received += 1;
            }
            _ => sink.stats.malformed += 1,
        }
    }

    fn deliver_held(&mut self, held: Held, input: &[u8], sink: &mut Sink<'_>) {
        // The ranges were checked when the push was held.
        if let (Some(channel), Some(payload)) = (input.get(held.channel), input.get(held.payload)) {
            if held.shared {
                self.id_message(channel, payload, sink);
            } else {
                self.deliver(channel, payload, sink);
            }
        }
    }

    fn subscription(
        &mut self,
        command: &[u8],
        expected: fn(Box<[u8]>) -> Expected,
        topic: &[u8],
        out: &mut Vec<u8>,
    ) {
        topic::redis_channel(&self.prefix, topic, &mut self.channel);
        write_command(out, &[command, &self.channel]);
        self.expected.push_back(expected(Box::from(topic)));
        self.changes += 1;
    }

    /// Whether the command at the head of the FIFO is about a channel in `slot`.
    fn head_is_in_slot(&mut self, slot: u16) -> bool {
        let topic = match self.expected.front() {
            Some(Expected::Subscribe(topic) | Expected::Unsubscribe(topic)) => &**topic,
            Some(Expected::Publish(_, Some(retained))) => retained.topic(),
            _ => return false,
        };
        topic::redis_channel(&self.prefix, topic, &mut self.channel);
        key_slot(&self.channel) == slot
    }

    /// Sends again a publish a node redirected, keeping its count of redirects.
    pub(crate) fn resend(&mut self, publish: Retained, out: &mut Vec<u8>) {
        let fingerprint = self.write_publish(publish.topic(), publish.payload(), out);
        self.expected
            .push_back(Expected::Publish(fingerprint, Some(publish)));
    }

    /// Writes a publish's command and counts it in flight; the caller queues what it expects.
    fn write_publish(&mut self, topic: &[u8], payload: &[u8], out: &mut Vec<u8>) -> Fingerprint {
        topic::redis_channel(&self.prefix, topic, &mut self.channel);
        write_command(
            out,
            &[self.flavor.publish_command(), &self.channel, payload],
        );
        self.publishes += 1;
        self.fingerprint(&self.channel, payload)
    }

    /// Asks for the cluster's slot map; the reply lands in `notes.topology`.
    pub(crate) fn request_topology(&mut self, command: TopologyCommand, out: &mut Vec<u8>) {
        let subcommand: &[u8] = match command {
            TopologyCommand::Shards => b"SHARDS",
            TopologyCommand::Slots => b"SLOTS",
        };
        write_command(out, &[b"CLUSTER", subcommand]);
        self.expected.push_back(Expected::Topology);
    }

    /// Whether a subscription push names `topic`'s channel. A classic session needs not
    /// look: Redis sends no unsubscribe of its own for plain channels, so pushes come in the
    /// order of the commands.
    fn names(&self, channel: Option<&RangeFrame>, base: usize, input: &[u8], topic: &[u8]) -> bool {
        self.flavor == Flavor::Classic
            || channel
                .and_then(|channel| bytes(channel, base, input))
                .and_then(|channel| channel.strip_prefix(&*self.prefix))
                == Some(topic)
    }

    /// A push: a message, or the confirmation of a SUBSCRIBE or UNSUBSCRIBE.
    fn push(
        &mut self,
        items: &[RangeFrame],
        base: usize,
        input: &[u8],
        held: &mut Option<Held>,
        sink: &mut Sink<'_>,
    ) {
        let echo_after = self.echo_after.take();
        // A push after a held one: the held one was not our echo.
        if let Some(earlier) = held.take() {
            self.deliver_held(earlier, input, sink);
        }
        let Some(kind) = items.first().and_then(|item| bytes(item, base, input)) else {
            return;
        };
        let [message_kind, subscribe_kind, unsubscribe_kind] = if self.shared.on {
            Flavor::Sharded.push_kinds()
        } else {
            self.flavor.push_kinds()
        };
        if kind == message_kind {
            let (Some(channel), Some(payload)) = (
                items.get(1).and_then(|item| range(item, base)),
                items.get(2).and_then(|item| range(item, base)),
            ) else {
                sink.stats.malformed += 1;
                return;
            };
            let (Some(channel_bytes), Some(payload_bytes)) =
                (input.get(channel.clone()), input.get(payload.clone()))
            else {
                sink.stats.malformed += 1;
                return;
            };
            if self.shared.on {
                let ours = self
                    .head_eval_topic()
                    .is_some_and(|topic| channel_bytes.strip_prefix(&*self.prefix) == Some(topic));
                if ours {
                    *held = Some(Held {
                        start: base,
                        channel,
                        payload,
                        shared: true,
                    });
                } else {
                    self.id_message(channel_bytes, payload_bytes, sink);
                }
            } else if echo_after
                .is_some_and(|ours| self.matches(ours, channel_bytes, payload_bytes))
            {
                sink.stats.ignored += 1;
            } else if self
                .head_publish()
                .is_some_and(|ours| self.matches(ours, channel_bytes, payload_bytes))
            {
                *held = Some(Held {
                    start: base,
                    channel,
                    payload,
                    shared: false,
                });
            } else {
                self.deliver(channel_bytes, payload_bytes, sink);
            }
        } else if kind == subscribe_kind || kind == unsubscribe_kind {
            let confirms = match self.expected.front() {
                Some(Expected::Subscribe(topic)) if kind == subscribe_kind => {
                    self.names(items.get(1), base, input, topic)
                }
                Some(Expected::Unsubscribe(topic)) if kind == unsubscribe_kind => {
                    self.names(items.get(1), base, input, topic)
                }
                _ => false,
            };
            let count = match items.get(2) {
                Some(RangeFrame::Number { data, .. }) => Some(usize::try_from(*data).unwrap_or(0)),
                _ => None,
            };
            if confirms {
                if let Some(Expected::Unsubscribe(topic)) = self.expected.pop_front()
                    && self.shared.on
                {
                    self.unsubscribed_shared(&topic, sink);
                }
                self.changes -= 1;
                if let Some(count) = count {
                    self.subscribed = count;
                }
            } else if self.flavor == Flavor::Sharded && kind == unsubscribe_kind {
                // The node gave the channel's slot away and unsubscribed us itself.
                let topic = items
                    .get(1)
                    .and_then(|channel| bytes(channel, base, input))
                    .and_then(|channel| channel.strip_prefix(&*self.prefix));
                match topic {
                    Some(topic) => {
                        self.notes.displaced.push(Box::from(topic));
                        self.notes.refresh = true;
                    }
                    None => sink.stats.malformed += 1,
                }
                if let Some(count) = count {
                    self.subscribed = count;
                }
            }
            // Anything else is unsolicited (Redis sends none for plain channels): ignored.
        }
        // pong, invalidate, ...: nothing we asked for.
    }

    /// Any frame but a push: the answer to the command at the head of the FIFO.
    fn reply(
        &mut self,
        frame: &RangeFrame,
        (base, len): (usize, usize),
        input: &[u8],
        held: &mut Option<Held>,
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> Result<(), Error> {
        self.echo_after = None;
        let error = match frame {
            RangeFrame::SimpleError { data, .. } | RangeFrame::BlobError { data, .. } => {
                let message = input.get(data.0 + base..data.1 + base).unwrap_or_default();
                Some(String::from_utf8_lossy(message).into_owned())
            }
            _ => None,
        };
        if let Some((slot, _)) = error.as_deref().and_then(moved_to)
            && self.flavor == Flavor::Sharded
            && !self.head_is_in_slot(slot)
        {
            // The late refusal of a SUNSUBSCRIBE whose confirmation was taken from the
            // node's own push for the same channel (the slot moved away in between): it
            // answers nothing still waiting. A genuine answer names its command's slot.
            return Ok(());
        }
        let Some(expected) = self.expected.pop_front() else {
            return Err(protocol_error(match error {
                Some(message) => format!("an error nothing was waiting for: {message}"),
                None => "a reply nothing was waiting for".to_string(),
            }));
        };
        match (expected, error) {
            (Expected::Publish(ours, _), None) => {
                let RangeFrame::Number {
                    data: receivers, ..
                } = frame
                else {
                    return Err(protocol_error(
                        "PUBLISH answered with something else than an integer".into(),
                    ));
                };
                self.publishes -= 1;
                sink.stats.published += 1;
                if held.take().is_some() {
                    sink.stats.ignored += 1;
                } else if *receivers > 0 {
                    self.echo_after = Some(ours);
                }
            }
            (Expected::Publish(_, retained), Some(message)) => {
                self.publishes -= 1;
                // A refused PUBLISH published nothing: the held push was another client's.
                if let Some(earlier) = held.take() {
                    self.deliver_held(earlier, input, sink);
                }
                match (retained, moved_to(&message)) {
                    (Some(publish), Some((slot, node))) => {
                        self.notes.redirected.push(Redirect {
                            publish,
                            slot,
                            node,
                        });
                        self.notes.refresh = true;
                    }
                    _ => {
                        sink.stats.dropped += 1;
                        if self.flavor == Flavor::Sharded && is_cluster_condition(&message) {
                            self.notes.refresh = true;
                        }
                    }
                }
            }
            (Expected::Eval(eval), None) => {
                let held = held.take().and_then(|held| {
                    let channel = input.get(held.channel)?;
                    let payload = input.get(held.payload)?;
                    let id = held
                        .shared
                        .then(|| shared::split_id(payload).map(|(id, _)| id))
                        .flatten();
                    Some((id, channel, payload))
                });
                self.eval_reply(*eval, frame, base, input, held, sink);
            }
            (Expected::Eval(eval), Some(message)) => {
                if let Some(earlier) = held.take() {
                    self.deliver_held(earlier, input, sink);
                }
                self.eval_refused(*eval, &message, out, sink);
            }
            (Expected::Fetch(fetch), error) => {
                if let Some(earlier) = held.take() {
                    self.deliver_held(earlier, input, sink);
                }
                let answer = match (&error, frame) {
                    (Some(message), _) => Err(message.as_str()),
                    (None, RangeFrame::Array { data, .. }) => Ok((&data[..], base, input)),
                    (None, _) => Err("not an array"),
                };
                self.fetch_reply(*fetch, answer, out, sink);
            }
            (Expected::ScriptLoad(which), None) => {
                let sha = bytes(frame, base, input).ok_or_else(|| {
                    protocol_error("SCRIPT LOAD answered with something else than a string".into())
                })?;
                self.script_loaded(which, sha);
                self.handshake -= 1;
            }
            (Expected::ScriptReload, error) => {
                if let Some(earlier) = held.take() {
                    self.deliver_held(earlier, input, sink);
                }
                let answer = match &error {
                    Some(message) => Err(message.as_str()),
                    None => bytes(frame, base, input).ok_or("not a string"),
                };
                self.script_reloaded(answer, out, sink);
            }
            (Expected::ScriptLoad(_), Some(message)) => {
                return Err(Error::Unreachable(format!(
                    "Redis: SCRIPT LOAD refused (shared history needs scripting): {message}"
                )));
            }
            (Expected::Topology, _) => {
                let frame = input.get(base..base + len).unwrap_or_default();
                self.notes.topology.push(frame.to_vec());
            }
            (Expected::Subscribe(topic), Some(message))
                if self.flavor == Flavor::Sharded && is_cluster_condition(&message) =>
            {
                self.changes -= 1;
                self.notes.displaced.push(topic);
                self.notes.refresh = true;
            }
            // Whichever node has the slot now, this one holds no subscription to undo.
            (Expected::Unsubscribe(_), Some(message))
                if self.flavor == Flavor::Sharded && is_cluster_condition(&message) =>
            {
                self.changes -= 1;
                self.notes.refresh = true;
            }
            (Expected::Hello | Expected::Select, Some(message)) => {
                let hint = if message.starts_with("ERR unknown command") {
                    " (fdcast speaks RESP3: Redis 6 or later)"
                } else {
                    ""
                };
                return Err(Error::Unreachable(format!("Redis: {message}{hint}")));
            }
            (Expected::Hello, None) if matches!(frame, RangeFrame::Map { .. }) => {
                self.handshake -= 1;
            }
            (Expected::Select, None) if matches!(frame, RangeFrame::SimpleString { .. }) => {
                self.handshake -= 1;
            }
            (Expected::Hello | Expected::Select, None) => {
                return Err(protocol_error(
                    "HELLO or SELECT answered with an unexpected frame".into(),
                ));
            }
            (Expected::Subscribe(_) | Expected::Unsubscribe(_), Some(message)) => {
                return Err(Error::Backend(format!(
                    "Redis: a subscription was refused: {message}"
                )));
            }
            (Expected::Subscribe(_) | Expected::Unsubscribe(_), None) => {
                return Err(protocol_error(
                    "SUBSCRIBE answered with something else than a push".into(),
                ));
            }
        }
        Ok(())
    }
}

impl Protocol for RedisProtocol {
    const NAME: &'static str = "Redis";

    fn start(&mut self, out: &mut Vec<u8>) {
        self.expected.clear();
        self.publishes = 0;
        self.changes = 0;
        self.subscribed = 0;
        self.echo_after = None;
        // A new key per connection: no one can aim a collision at it.
        self.hasher = RandomState::new();
        match &self.auth {
            Some((user, password)) => write_command(
                out,
                &[
                    b"HELLO",
                    b"3",
                    b"AUTH",
                    user.as_bytes(),
                    password.as_bytes(),
                ],
            ),
            None => write_command(out, &[b"HELLO", b"3"]),
        }
        self.expected.push_back(Expected::Hello);
        self.handshake = 1;
        if self.db != 0 {
            write_command(out, &[b"SELECT", self.db.to_string().as_bytes()]);
            self.expected.push_back(Expected::Select);
            self.handshake += 1;
        }
        self.start_shared(out);
    }

    fn read(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> Result<usize, Error> {
        let mut used = 0;
        let mut held = None;
        while let Some(len) = frame_len(&input[used..])? {
            let frame = decode(&input[used..used + len])?;
            match &frame {
                RangeFrame::Push { data, .. } => self.push(data, used, input, &mut held, sink),
                _ => self.reply(&frame, (used, len), input, &mut held, out, sink)?,
            }
            used += len;
        }
        // Undecided: read again, whole, with the frame that decides it.
        Ok(held.map_or(used, |held| held.start))
    }

    fn is_open(&self) -> bool {
        self.handshake == 0
    }

    fn subscribe(&mut self, topic: &[u8], out: &mut Vec<u8>) {
        if self.shared.on {
            return self.subscribe_shared(topic, out);
        }
        let command = self.flavor.subscribe_command();
        self.subscription(command, Expected::Subscribe, topic, out);
    }

    fn unsubscribe(&mut self, topic: &[u8], out: &mut Vec<u8>) {
        let command = if self.shared.on {
            Flavor::Sharded.unsubscribe_command()
        } else {
            self.flavor.unsubscribe_command()
        };
        self.subscription(command, Expected::Unsubscribe, topic, out);
    }

    fn publish(&mut self, topic: &[u8], payload: &[u8], out: &mut Vec<u8>) {
        if topic.is_empty() {
            // A shared publish's record (no topic is empty).
            return self.publish_shared(payload, out);
        }
        let fingerprint = self.write_publish(topic, payload, out);
        let retained = (self.flavor == Flavor::Sharded).then(|| Retained::new(topic, payload));
        self.expected
            .push_back(Expected::Publish(fingerprint, retained));
    }

    fn unconfirmed(&self) -> usize {
        self.changes
    }

    fn in_flight(&self) -> usize {
        self.publishes
    }

    fn lose_in_flight(&mut self) -> usize {
        self.publishes - self.keep_lost_evals()
    }

    fn end_of_subscriptions(&mut self, _out: &mut Vec<u8>) {
        self.settle_unfetched();
    }

    fn report(&mut self, stats: &mut super::BrokerStats) {
        stats.dropped += std::mem::take(&mut self.shared.settled_dropped);
    }

    fn holding_publishes(&self) -> bool {
        // While the publish script is loaded again, new publishes wait behind the refused
        // ones (see `shared`).
        self.publishes >= super::stream::HOLD_AFTER || self.shared.reloading()
    }

    fn awaiting_answers(&self) -> bool {
        !self.expected.is_empty()
    }

    fn subscribed(&self) -> usize {
        self.subscribed
    }

    fn shares_history(&self) -> bool {
        self.history.is_some()
    }

    fn answers_before_switch(&self) -> bool {
        // Shared publishes are delivered here by their replies; plain ones were delivered at
        // once (and a plain session's messages must not meet the mirrors history on makes).
        let on = self.history.as_ref().is_some_and(|history| history.is_on());
        self.shared.on && !on && self.publishes > 0
    }
}

/// `MOVED <slot> <host>:<port>`: the slot and its owner (the host may be empty: the node
/// does not know its own name, and it is the one this connection reached).
pub(crate) fn moved_to(error: &str) -> Option<(u16, (String, u16))> {
    let mut words = error.split(' ');
    if words.next() != Some("MOVED") {
        return None;
    }
    let slot = words
        .next()?
        .parse::<u16>()
        .ok()
        .filter(|slot| *slot < 16384)?;
    let (host, port) = words.next()?.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|port| *port != 0)?;
    Some((slot, (host.to_string(), port)))
}

/// An error that says the slot map or the cluster's health changed, not that the command
/// was wrong.
fn is_cluster_condition(error: &str) -> bool {
    ["MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN"]
        .iter()
        .any(|condition| error.starts_with(condition))
}

/// Appends a command: a RESP array of bulk strings. No allocation beyond `out`'s growth.
pub(crate) fn write_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.reserve(16 + args.iter().map(|arg| arg.len() + 16).sum::<usize>());
    write_header(out, b'*', args.len());
    for arg in args {
        write_header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn write_header(out: &mut Vec<u8>, kind: u8, mut n: usize) {
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
    out.push(kind);
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// The length of the frame at the front of `input`, `None` while it is incomplete. Iterative,
/// and reads only the header lines (skipping blobs by their length), so neither a deep nor a
/// long frame costs stack; the decoder still checks every byte afterwards.
pub(crate) fn frame_len(input: &[u8]) -> Result<Option<usize>, Error> {
    let bad = || protocol_error("a malformed frame".into());
    // Per open aggregate, the elements it still expects.
    let mut open = [0usize; MAX_DEPTH];
    let mut depth = 0;
    let mut at = 0;
    loop {
        let Some(line_len) = input[at..].windows(2).position(|pair| pair == b"\r\n") else {
            return Ok(None);
        };
        let (&kind, argument) = input[at..at + line_len].split_first().ok_or_else(bad)?;
        at += line_len + 2;
        let elements = match kind {
            // Blob string, blob error, verbatim string: their bytes and a CRLF follow.
            b'$' | b'!' | b'=' => {
                at = at
                    .checked_add(length(argument).ok_or_else(bad)?)
                    .and_then(|end| end.checked_add(2))
                    .ok_or_else(bad)?;
                if at > input.len() {
                    return Ok(None);
                }
                0
            }
            b'*' | b'~' | b'>' => length(argument).ok_or_else(bad)?,
            b'%' => length(argument)
                .and_then(|n| n.checked_mul(2))
                .ok_or_else(bad)?,
            // Attributes: a map, then the frame it annotates.
            b'|' => length(argument)
                .and_then(|n| n.checked_mul(2))
                .and_then(|n| n.checked_add(1))
                .ok_or_else(bad)?,
            b'+' | b'-' | b':' | b',' | b'#' | b'_' | b'(' => 0,
            _ => return Err(bad()),
        };
        if elements > 0 {
            if depth == MAX_DEPTH {
                return Err(protocol_error("a frame nested too deep".into()));
            }
            open[depth] = elements;
            depth += 1;
            continue;
        }
        // An element ended: it may end the aggregates it was the last element of.
        loop {
            if depth == 0 {
                return Ok(Some(at));
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

/// A decimal length (RESP3's streamed `?` and RESP2's `-1` are not for us).
fn length(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Decodes one whole frame, as long as [`frame_len`] found it.
pub(crate) fn decode(frame: &[u8]) -> Result<RangeFrame, Error> {
    match decode_range(frame) {
        Ok(Some((decoded, len))) if len == frame.len() => Ok(decoded),
        Ok(_) => Err(protocol_error(
            "a frame whose length the decoder reads otherwise".into(),
        )),
        Err(err) => Err(protocol_error(format!(
            "a frame the decoder refuses: {err}"
        ))),
    }
}

/// A string element's range in the input; `base` is where its frame starts.
fn range(frame: &RangeFrame, base: usize) -> Option<Range<usize>> {
    match frame {
        RangeFrame::BlobString { data, .. }
        | RangeFrame::SimpleString { data, .. }
        | RangeFrame::VerbatimString { data, .. } => Some(base + data.0..base + data.1),
        _ => None,
    }
}

pub(crate) fn bytes<'a>(frame: &RangeFrame, base: usize, input: &'a [u8]) -> Option<&'a [u8]> {
    input.get(range(frame, base)?)
}

fn protocol_error(what: String) -> Error {
    Error::Backend(format!("Redis: protocol error: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::stream::testing::{self, Feed};

    fn protocol(url: &str, prefix: &str) -> RedisProtocol {
        RedisProtocol::new(&BrokerUrl::parse(url, 6379).unwrap(), prefix).unwrap()
    }

    /// A protocol whose session is open, with prefix "app:".
    fn open() -> RedisProtocol {
        let mut redis = protocol("redis://127.0.0.1", "app:");
        redis.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut redis, HELLO_REPLY).unwrap();
        assert!(redis.is_open());
        redis
    }

    const HELLO_REPLY: &[u8] =
        b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n$7\r\nmodules\r\n*0\r\n";

    fn message(channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut push = format!(">3\r\n$7\r\nmessage\r\n${}\r\n", channel.len()).into_bytes();
        push.extend_from_slice(channel);
        push.extend_from_slice(format!("\r\n${}\r\n", payload.len()).as_bytes());
        push.extend_from_slice(payload);
        push.extend_from_slice(b"\r\n");
        push
    }

    fn confirmation(kind: &str, channel: &str, count: usize) -> Vec<u8> {
        format!(
            ">3\r\n${}\r\n{kind}\r\n${}\r\n{channel}\r\n:{count}\r\n",
            kind.len(),
            channel.len()
        )
        .into_bytes()
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn handshake_sends_hello_with_auth_and_select_and_opens_on_both_replies() {
        let mut redis = protocol("redis://:s%40cret@127.0.0.1/2", "app:");
        assert!(!redis.is_open());
        let mut out = Vec::new();
        redis.start(&mut out);
        assert_eq!(
            out,
            b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$6\r\ns@cret\r\n\
              *2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n"
        );
        let mut feed = Feed::default();
        feed.all(&mut redis, HELLO_REPLY).unwrap();
        assert!(!redis.is_open(), "SELECT not answered yet");
        feed.all(&mut redis, b"+OK\r\n").unwrap();
        assert!(redis.is_open());

        let mut named = protocol("redis://alice:pw@h", "");
        let mut out = Vec::new();
        named.start(&mut out);
        assert_eq!(
            out,
            b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$2\r\npw\r\n"
        );
        let mut anonymous = protocol("redis://h/0", "");
        let mut out = Vec::new();
        anonymous.start(&mut out);
        assert_eq!(out, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n");
    }

    #[test]
    fn a_refused_hello_or_select_fails_the_connection_as_unreachable() {
        for (url, replies, expected) in [
            (
                "redis://:wrong@h",
                &b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"[..],
                "Redis: WRONGPASS invalid username-password pair or user is disabled.",
            ),
            (
                "redis://h",
                b"-NOPROTO unsupported protocol version\r\n",
                "Redis: NOPROTO",
            ),
            (
                "redis://h",
                b"-ERR unknown command 'HELLO', with args beginning with: '3'\r\n",
                "(fdcast speaks RESP3: Redis 6 or later)",
            ),
            (
                "redis://h/99",
                b"%0\r\n-ERR DB index is out of range\r\n",
                "DB index is out of range",
            ),
        ] {
            let mut redis = protocol(url, "app:");
            redis.start(&mut Vec::new());
            let err = Feed::default().bytes(&mut redis, replies).unwrap_err();
            assert_eq!(err.errno(), libc::ECONNREFUSED, "{url}");
            let Error::Unreachable(message) = err else {
                unreachable!()
            };
            assert!(message.contains(expected), "{message}");
            assert!(!redis.is_open());
        }
    }

    #[test]
    fn start_forgets_the_last_connection() {
        let mut redis = open();
        redis.subscribe(b"a", &mut Vec::new());
        redis.publish(b"a", b"x", &mut Vec::new());
        redis.start(&mut Vec::new());
        assert!(!redis.is_open());
        assert_eq!(
            (redis.unconfirmed(), redis.in_flight(), redis.subscribed()),
            (0, 0, 0)
        );
        Feed::default().all(&mut redis, HELLO_REPLY).unwrap();
        assert!(redis.is_open());
    }

    #[test]
    fn publish_writes_one_command_and_counts_its_reply() {
        let mut redis = open();
        let mut out = Vec::new();
        redis.publish(b"news", b"hello\r\nworld", &mut out);
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$8\r\napp:news\r\n$12\r\nhello\r\nworld\r\n"
        );
        redis.publish(b"news", b"", &mut out);
        redis.publish(b"news", b"x", &mut out);
        assert_eq!(redis.in_flight(), 3);
        let mut feed = Feed::default();
        feed.all(&mut redis, b":0\r\n-ERR refused\r\n:2\r\n")
            .unwrap();
        assert_eq!((feed.stats.published, feed.stats.dropped), (2, 1));
        assert_eq!(redis.in_flight(), 0);
        assert!(feed.received.is_empty());
    }

    #[test]
    fn publishes_are_held_once_hold_after_are_unanswered() {
        use crate::broker::stream::HOLD_AFTER;
        let mut redis = open();
        let mut out = Vec::new();
        for _ in 0..HOLD_AFTER - 1 {
            redis.publish(b"news", b"x", &mut out);
        }
        assert!(!redis.holding_publishes());
        redis.publish(b"news", b"x", &mut out);
        assert!(redis.holding_publishes());
        let mut feed = Feed::default();
        feed.all(&mut redis, b":0\r\n").unwrap();
        assert!(!redis.holding_publishes());
    }

    #[test]
    fn own_echo_before_the_reply_is_ignored() {
        // Redis up to 7.0: the push, then PUBLISH's reply.
        let mut redis = open();
        redis.publish(b"news", b"mine", &mut Vec::new());
        let mut feed = Feed::default();
        feed.all(
            &mut redis,
            &concat(&[&message(b"app:news", b"mine"), b":1\r\n"]),
        )
        .unwrap();
        assert!(feed.received.is_empty());
        assert_eq!((feed.stats.ignored, feed.stats.published), (1, 1));
    }

    #[test]
    fn own_echo_after_the_reply_is_ignored() {
        // Redis 7.2 and later: PUBLISH's reply, then the push.
        let mut redis = open();
        redis.publish(b"news", b"mine", &mut Vec::new());
        let mut feed = Feed::default();
        feed.all(
            &mut redis,
            &concat(&[b":1\r\n", &message(b"app:news", b"mine")]),
        )
        .unwrap();
        assert!(feed.received.is_empty());
        assert_eq!((feed.stats.ignored, feed.stats.published), (1, 1));
    }

    #[test]
    fn pipelined_identical_publishes_each_drop_one_echo_in_either_order() {
        let echo = message(b"app:t", b"same");
        for stream in [
            concat(&[&echo, b":1\r\n", &echo, b":1\r\n"]),
            concat(&[b":1\r\n", &echo, b":1\r\n", &echo]),
        ] {
            let mut redis = open();
            redis.publish(b"t", b"same", &mut Vec::new());
            redis.publish(b"t", b"same", &mut Vec::new());
            let mut feed = Feed::default();
            feed.all(&mut redis, &stream).unwrap();
            assert!(feed.received.is_empty());
            assert_eq!((feed.stats.ignored, feed.stats.published), (2, 2));
        }
    }

    #[test]
    fn an_identical_message_from_another_client_is_delivered_once_beside_our_echo() {
        let same = message(b"app:t", b"same");
        let streams = [
            // Redis <= 7.0 (echo before the reply), theirs executed just before ours.
            concat(&[&same, &same, b":2\r\n"]),
            // Redis <= 7.0 with theirs just after ours, or >= 7.2 with theirs just before.
            concat(&[&same, b":2\r\n", &same]),
            // Redis >= 7.2 (echo after the reply), theirs just after ours.
            concat(&[b":2\r\n", &same, &same]),
        ];
        for stream in streams {
            let mut redis = open();
            redis.publish(b"t", b"same", &mut Vec::new());
            let mut feed = Feed::default();
            feed.all(&mut redis, &stream).unwrap();
            assert_eq!(feed.delivered(), vec![(b"t".to_vec(), b"same".to_vec())]);
            assert_eq!((feed.stats.ignored, feed.stats.received), (1, 1));
        }
    }

    #[test]
    fn messages_from_others_are_delivered_around_our_publish() {
        let mut redis = open();
        redis.publish(b"t", b"mine", &mut Vec::new());
        let mut feed = Feed::default();
        let stream = concat(&[
            &message(b"app:t", b"before"),
            b":2\r\n",
            &message(b"app:t", b"mine"),
            &message(b"app:t", b"after"),
            &message(b"app:u", b"mine"),
        ]);
        feed.all(&mut redis, &stream).unwrap();
        assert_eq!(
            feed.delivered(),
            vec![
                (b"t".to_vec(), b"before".to_vec()),
                (b"t".to_vec(), b"after".to_vec()),
                (b"u".to_vec(), b"mine".to_vec()),
            ]
        );
        assert_eq!(feed.stats.ignored, 1);
    }

    #[test]
    fn a_held_push_followed_by_another_push_is_delivered() {
        let mut redis = open();
        redis.publish(b"t", b"same", &mut Vec::new());
        let mut feed = Feed::default();
        // Another client's copy of our message is held; the next frame is a push, not our
        // reply: the held one was theirs.
        feed.all(
            &mut redis,
            &concat(&[&message(b"app:t", b"same"), &message(b"app:u", b"x")]),
        )
        .unwrap();
        assert_eq!(
            feed.delivered(),
            vec![
                (b"t".to_vec(), b"same".to_vec()),
                (b"u".to_vec(), b"x".to_vec())
            ]
        );
        assert_eq!(redis.in_flight(), 1);
        feed.all(&mut redis, b":1\r\n").unwrap();
        assert_eq!((feed.stats.ignored, feed.received.len()), (0, 2));
    }

    #[test]
    fn a_held_push_is_delivered_when_the_publish_is_refused() {
        let mut redis = open();
        redis.publish(b"t", b"same", &mut Vec::new());
        let mut feed = Feed::default();
        feed.all(
            &mut redis,
            &concat(&[&message(b"app:t", b"same"), b"-ERR no\r\n"]),
        )
        .unwrap();
        assert_eq!(feed.delivered(), vec![(b"t".to_vec(), b"same".to_vec())]);
        assert_eq!((feed.stats.dropped, feed.stats.ignored), (1, 0));
    }

    #[test]
    fn a_held_push_waits_unconsumed_for_the_frame_that_decides_it() {
        let mut redis = open();
        redis.publish(b"t", b"mine", &mut Vec::new());
        let echo = message(b"app:t", b"mine");
        let mut feed = Feed::default();
        feed.bytes(&mut redis, &echo).unwrap();
        assert_eq!(feed.input, echo, "held, not consumed");
        assert!(feed.received.is_empty());
        feed.bytes(&mut redis, b":1").unwrap();
        assert_eq!(feed.input.len(), echo.len() + 2);
        feed.all(&mut redis, b"\r\n").unwrap();
        assert!(feed.received.is_empty());
        assert_eq!((feed.stats.ignored, feed.stats.published), (1, 1));
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_outcome() {
        let stream = concat(&[
            &confirmation("subscribe", "app:t", 1),
            &message(b"app:t", b"theirs"),
            &message(b"app:t", b"mine"),
            b":2\r\n",
            b":1\r\n",
            &message(b"app:t", b"mine"),
            &message(b"app:t", b"mine"),
            &confirmation("unsubscribe", "app:t", 0),
        ]);
        for step in [1, 2, 3, 7, 13, stream.len()] {
            let mut redis = open();
            redis.subscribe(b"t", &mut Vec::new());
            redis.publish(b"t", b"mine", &mut Vec::new());
            redis.publish(b"t", b"mine", &mut Vec::new());
            redis.unsubscribe(b"t", &mut Vec::new());
            let mut feed = Feed::default();
            for chunk in stream.chunks(step) {
                feed.bytes(&mut redis, chunk).unwrap();
            }
            assert!(feed.input.is_empty(), "step {step}");
            assert_eq!(
                feed.delivered(),
                vec![
                    (b"t".to_vec(), b"theirs".to_vec()),
                    (b"t".to_vec(), b"mine".to_vec())
                ],
                "step {step}"
            );
            assert_eq!(
                (feed.stats.ignored, feed.stats.published),
                (2, 2),
                "step {step}"
            );
            assert_eq!((redis.unconfirmed(), redis.in_flight()), (0, 0));
        }
    }

    #[test]
    fn messages_outside_the_prefix_or_topic_length_are_malformed() {
        let mut redis = open();
        let mut feed = Feed::default();
        let too_long = [b"app:".as_slice(), &[b'x'; MAX_TOPIC_LEN + 1]].concat();
        let longest = [b"app:".as_slice(), &[b'x'; MAX_TOPIC_LEN]].concat();
        let stream = concat(&[
            &message(b"other:t", b"1"),
            &message(b"app:", b"2"),
            &message(&too_long, b"3"),
            &message(&longest, b"4"),
            b">3\r\n$7\r\nmessage\r\n$5\r\napp:t\r\n:5\r\n",
            b">2\r\n$7\r\nmessage\r\n$5\r\napp:t\r\n",
        ]);
        feed.all(&mut redis, &stream).unwrap();
        assert_eq!(feed.stats.malformed, 5);
        assert_eq!(
            feed.delivered(),
            vec![(vec![b'x'; MAX_TOPIC_LEN], b"4".to_vec())]
        );
    }

    #[test]
    fn subscriptions_are_confirmed_by_their_pushes_in_order() {
        let mut redis = open();
        let mut out = Vec::new();
        redis.subscribe(b"a", &mut out);
        redis.subscribe(b"b", &mut out);
        assert_eq!(
            out,
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$5\r\napp:a\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$5\r\napp:b\r\n"
        );
        assert_eq!(redis.unconfirmed(), 2);
        let mut feed = Feed::default();
        feed.all(&mut redis, &confirmation("subscribe", "app:a", 1))
            .unwrap();
        assert_eq!((redis.unconfirmed(), redis.subscribed()), (1, 1));
        // A pong, or an unsolicited unsubscribe, confirms nothing.
        feed.all(&mut redis, b">2\r\n$4\r\npong\r\n$0\r\n\r\n")
            .unwrap();
        feed.all(&mut redis, &confirmation("unsubscribe", "app:z", 1))
            .unwrap();
        assert_eq!(redis.unconfirmed(), 1);
        feed.all(&mut redis, &confirmation("subscribe", "app:b", 2))
            .unwrap();
        assert_eq!((redis.unconfirmed(), redis.subscribed()), (0, 2));

        let mut out = Vec::new();
        redis.unsubscribe(b"a", &mut out);
        assert_eq!(out, b"*2\r\n$11\r\nUNSUBSCRIBE\r\n$5\r\napp:a\r\n");
        assert_eq!(redis.unconfirmed(), 1);
        feed.all(&mut redis, &confirmation("unsubscribe", "app:a", 1))
            .unwrap();
        assert_eq!((redis.unconfirmed(), redis.subscribed()), (0, 1));
        assert!(feed.received.is_empty());
    }

    #[test]
    fn a_refused_subscription_ends_the_connection_and_is_not_taken_for_a_publish() {
        let mut redis = open();
        redis.subscribe(b"secret", &mut Vec::new());
        redis.publish(b"t", b"x", &mut Vec::new());
        let mut feed = Feed::default();
        let err = feed
            .bytes(
                &mut redis,
                b"-NOPERM this user has no permissions to access the channel\r\n",
            )
            .unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert_eq!(feed.stats.dropped, 0);
    }

    #[test]
    fn replies_nothing_waits_for_are_protocol_errors() {
        for stream in [&b":1\r\n"[..], b"-ERR x\r\n", b"+OK\r\n", b"*0\r\n"] {
            let mut redis = open();
            let err = Feed::default().bytes(&mut redis, stream).unwrap_err();
            assert_eq!(err.errno(), libc::EIO);
        }
        let mut redis = open();
        redis.publish(b"t", b"x", &mut Vec::new());
        assert!(Feed::default().bytes(&mut redis, b"+OK\r\n").is_err());
        let mut redis = open();
        redis.subscribe(b"t", &mut Vec::new());
        assert!(Feed::default().bytes(&mut redis, b":1\r\n").is_err());
    }

    #[test]
    fn hostile_frames_are_refused_without_panic_or_stack_overflow() {
        let deep = b"*1\r\n".repeat(1 << 16);
        let hostile: Vec<Vec<u8>> = vec![
            deep,
            b"\r\n".to_vec(),
            b"?\r\n".to_vec(),
            b"$-1\r\n".to_vec(),
            b"$?\r\n".to_vec(),
            b"*?\r\n".to_vec(),
            b"$18446744073709551615\r\n".to_vec(),
            b"*18446744073709551615\r\n:1\r\n".to_vec(),
            b"%1\r\n*0\r\n:1\r\n".to_vec(),
            b"~1\r\n*0\r\n".to_vec(),
            b"=2\r\nab\r\n".to_vec(),
            b"$3\r\nabcde\r\n".to_vec(),
            b":notanumber\r\n".to_vec(),
            b">3\r\n*0\r\n_\r\n#t\r\n".to_vec(),
            b"%9223372036854775808\r\n".to_vec(),
        ];
        for frame in hostile {
            let mut redis = open();
            redis.publish(b"t", b"x", &mut Vec::new());
            // An error, or an incomplete frame: either way, no panic and nothing delivered.
            let mut feed = Feed::default();
            let _ = feed.bytes(&mut redis, &frame);
            assert!(
                feed.received.is_empty(),
                "{:?}",
                String::from_utf8_lossy(&frame[..frame.len().min(40)])
            );
        }
        let mut redis = open();
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(Feed::default().bytes(&mut redis, &deep).is_err());
    }

    #[test]
    fn frame_len_finds_whole_frames_only() {
        assert_eq!(frame_len(b"").unwrap(), None);
        assert_eq!(frame_len(b":1\r").unwrap(), None);
        assert_eq!(frame_len(b":1\r\n:2\r\n").unwrap(), Some(4));
        assert_eq!(frame_len(b"$3\r\nab").unwrap(), None);
        assert_eq!(frame_len(b"$3\r\nabc\r\n").unwrap(), Some(9));
        assert_eq!(
            frame_len(b"*2\r\n*0\r\n%1\r\n+a\r\n_\r\n").unwrap(),
            Some(19)
        );
        assert_eq!(frame_len(b"*2\r\n*1\r\n:1\r\n").unwrap(), None);
        assert_eq!(frame_len(b"|1\r\n+k\r\n+v\r\n:7\r\n").unwrap(), Some(16));
        assert_eq!(frame_len(HELLO_REPLY).unwrap(), Some(HELLO_REPLY.len()));
    }

    #[test]
    fn engine_checks_the_url_and_prefix() {
        let limit = AtomicUsize::new(0);
        let history = Arc::new(SharedHistory::default());
        let errno = |url: &str, name: &str| {
            engine(url, name, &limit, Arc::clone(&history))
                .err()
                .map(|err| err.errno())
        };
        assert_eq!(errno("redis://127.0.0.1", "app:"), None);
        assert_eq!(errno("redis://127.0.0.1:6380/15", ""), None);
        assert_eq!(errno("rediss://127.0.0.1", "app:"), None);
        for bad in [
            "rediss://127.0.0.1?ca=/nonexistent.pem",
            "rediss://127.0.0.1?cert=c.pem",
            "redis://127.0.0.1?ca=ca.pem",
            "rediss://127.0.0.1?verify=none",
        ] {
            assert_eq!(errno(bad, "app:"), Some(libc::EINVAL), "{bad}");
        }
        assert_eq!(
            errno("redis://127.0.0.1,127.0.0.2", "app:"),
            Some(libc::EINVAL)
        );
        for path in ["x", "-1", "+1", "1x", "99999999999", "?timeout=1"] {
            assert_eq!(
                errno(&format!("redis://127.0.0.1/{path}"), ""),
                Some(libc::EINVAL),
                "{path}"
            );
        }
        assert_eq!(
            errno("redis://127.0.0.1", &"p".repeat(256)),
            Some(libc::EINVAL)
        );
        engine("redis://127.0.0.1", "", &limit, history).unwrap();
        assert_eq!(limit.load(Ordering::Relaxed), 512 << 20);
    }

    /// Drives the protocol over a real connection to the Redis at FDCAST_REDIS_URL (default
    /// redis://127.0.0.1:6379): fails when that server is down.
    #[test]
    fn real_redis_delivers_others_messages_and_ignores_our_echo() {
        use std::io::{Read, Write};
        use std::time::Duration;

        let url =
            std::env::var("FDCAST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let parsed = BrokerUrl::parse(&url, 6379).unwrap();
        let address = (parsed.hosts[0].0.as_str(), parsed.hosts[0].1);
        let unique = format!("{}:", testing::unique_name());
        let mut redis = RedisProtocol::new(&parsed, &unique).unwrap();
        let connect = || testing::connect_to(address, "Redis", &url);
        let mut ours = connect();
        let mut feed = Feed::default();
        let mut pump = |redis: &mut RedisProtocol,
                        feed: &mut Feed,
                        out: &mut Vec<u8>,
                        done: &dyn Fn(&RedisProtocol, &Feed) -> bool| {
            testing::pump(&mut ours, redis, feed, out, done)
        };
        let mut out = Vec::new();
        redis.start(&mut out);
        pump(&mut redis, &mut feed, &mut out, &|redis, _| redis.is_open());
        redis.subscribe(b"news", &mut out);
        pump(&mut redis, &mut feed, &mut out, &|redis, _| {
            redis.unconfirmed() == 0
        });
        assert_eq!(redis.subscribed(), 1);

        let mut other = connect();
        let channel = format!("{unique}news");
        let command = format!("PUBLISH {channel} theirs\r\n");
        other.write_all(command.as_bytes()).unwrap();
        let mut reply = [0u8; 4];
        other
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        other.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b":1\r\n", "the subscription is in effect");
        pump(&mut redis, &mut feed, &mut out, &|_, feed| {
            feed.stats.received == 1
        });
        assert_eq!(
            feed.delivered(),
            vec![(b"news".to_vec(), b"theirs".to_vec())]
        );

        redis.publish(b"news", b"mine", &mut out);
        pump(&mut redis, &mut feed, &mut out, &|_, feed| {
            feed.stats.ignored == 1
        });
        assert_eq!(feed.stats.published, 1);
        // Then one more from the other side, after ours: delivered, and nothing else was.
        other.write_all(command.as_bytes()).unwrap();
        other.read_exact(&mut reply).unwrap();
        pump(&mut redis, &mut feed, &mut out, &|_, feed| {
            feed.stats.received == 2
        });
        assert_eq!(feed.received.len(), 2);
        assert_eq!((feed.stats.ignored, feed.stats.malformed), (1, 0));
        assert_eq!(redis.in_flight(), 0);
    }
}
