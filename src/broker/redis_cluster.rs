//! Redis Cluster, through sharded pub/sub (Redis 7+): `SSUBSCRIBE`, `SUNSUBSCRIBE` and
//! `SPUBLISH`, so that a topic's traffic touches only the shard that owns its channel's slot.
//!
//! # Connections
//! - One *control* connection, to the URL's seed nodes in turn, asks `CLUSTER SHARDS` at
//!   start and whenever the slot map may have changed (`CLUSTER SLOTS` instead, from the
//!   first time a server refuses `CLUSTER SHARDS`). It stays open (a refresh then costs one
//!   round trip), and holds no subscription.
//! - One connection per primary, opened lazily: when a topic of interest or a publish is
//!   routed to a slot it owns. Each is a [`StreamEngine`] speaking the sharded flavor of the
//!   Redis session ([`RedisProtocol`], so the echo filter is the single-node engine's), fed
//!   by a queue of its own ([`Outbound`]): it keeps the topics placed on it, re-subscribes
//!   them after a reconnect, and sends publishes only while subscribed.
//! - With `rediss+cluster://`, every connection (control and primaries) is TLS from its
//!   first byte, with the URL's `ca=`, `cert=` and `key=`; a primary is reached at the
//!   `tls-port` the map gives it, and its certificate must name the address the map gives
//!   (an IP address unless the cluster announces host names).
//! - The connections live in an epoll of the engine's own (a second [`Reactor`]), whose one
//!   fd is what the registry's reactor watches and what [`Engine::wait`] names.
//!
//! # Order
//! A channel's slot depends only on its bytes, so one topic always goes to one shard and one
//! connection, in the order it was published. Across topics nothing is promised: two topics
//! on different shards travel on different connections. Across a slot move, a publish in
//! flight to the old owner comes back with `MOVED` and is sent again to the new owner, ahead
//! of what that owner's queue holds; the publishes of that topic behind it meet the same
//! `MOVED` in order. Publishes made after the slot was pointed at its new owner (by that
//! first `MOVED` or by a map refresh) would overtake those still on their way back, so a
//! [`Fence`] holds them until the old owner has answered every publish it was given before
//! the change (counted, not searched: it holds for as long as the old owner has anything
//! outstanding, of any slot). Order then holds across the move, except when the old owner
//! has not answered within 10 s (the fence gives up), or when the slot moves again while
//! fenced (the newer move is not fenced).
//!
//! # When the cluster changes
//! - `MOVED` on a publish: the slot is pointed at the node named, the publish is sent there,
//!   and the whole map is read again. A publish redirected [`MAX_REDIRECTS`] times and
//!   refused again (nodes that point at each other) is dropped and counted.
//! - A node's own `sunsubscribe` push (the slot moved away: the node unsubscribes every
//!   client of its channels) or a refused `SSUBSCRIBE`: the topic is placed again, on the
//!   owner the next map names.
//! - `CLUSTERDOWN`, `TRYAGAIN` or `ASK` on a publish: it is dropped and counted (pub/sub is
//!   fire-and-forget), and the map is read again.
//! - A lost connection: it reconnects with the usual backoff and re-subscribes its topics,
//!   and the map is read again; when a failover made another node the owner, the topics
//!   move there, and publishes queued for the old node are routed again.
//!
//! Map refreshes back off like reconnects (100 ms doubling to 5 s) while they keep being
//! asked for, so after a failover the topics reach the promoted replica within a few
//! seconds of the cluster electing it; a map question unanswered for 10 s is given up
//! with its connection. A prefix holding a `{hashtag}` puts every topic in one slot, on one
//! shard.
//!
//! # Limits
//! - Publishes waiting for shards that are down are bounded in total, as the broker's queue
//!   is (65,536 publishes or 64 MiB), however many shards wait; beyond, they are dropped and
//!   counted.
//! - `ASK` (a slot being migrated) is not followed: Redis serves sharded pub/sub from the
//!   slot's owner until the move ends, so it is not expected; if it comes the publish is
//!   dropped and counted.
//! - A node's `MOVED` that names a slot other than the one of the command it should answer
//!   is skipped (see redis.rs: a SUNSUBSCRIBE crossing the node's own `sunsubscribe`); when
//!   the next command is in the same slot, it takes that `MOVED` for its own, which is the
//!   answer it gets anyway from a node that no longer owns the slot.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::Interest;
use redis_protocol::resp3::types::RangeFrame;

use super::outbound::{InterestChange, MAX_QUEUED_BYTES, MAX_QUEUED_PUBLISHES, Publishes};
use super::redis::{self, MAX_BULK_LEN, Redirect, RedisProtocol, Retained, TopologyCommand};
use super::stream::{StreamEngine, Tls, TlsStart};
use super::url::BrokerUrl;
use super::{
    BrokerStats, Context, Engine, FIRST_RETRY, MAX_RETRY, Outbound, Received, Wait, next_retry,
    topic,
};
use crate::error::Error;
use crate::reactor::Reactor;

/// Hash slots in a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;
/// A slot no known primary owns.
const UNOWNED: u16 = u16::MAX;
/// Primaries a map may name at most (Redis Cluster's documented ceiling is 1000 nodes);
/// beyond, the map is counted malformed. Keeps shard indices below [`UNOWNED`].
const MAX_SHARDS: usize = 4096;
/// A map question unanswered this long is given up, with its connection.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_secs(10);
/// Times a publish is sent again after `MOVED`; one more `MOVED` drops it (nodes that keep
/// pointing at each other disagree about the slot until the cluster settles).
const MAX_REDIRECTS: u8 = 5;
/// Shard turns in one `advance` at most: a turn's redirects fill other shards' queues.
const PASSES: usize = 3;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0, no reflection), as the cluster
/// specification defines the key hash; one table lookup per byte.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut index = 0;
    while index < 256 {
        let mut crc = (index as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[index] = crc;
        index += 1;
    }
    table
};

pub(crate) fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)]
    })
}

/// The slot of a key or channel: only the part between the first `{` and the first `}`
/// after it is hashed, when that part is not empty (the specification's hash tags).
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&byte| byte == b'{')
        .and_then(|open| {
            let inside = &key[open + 1..];
            let close = inside.iter().position(|&byte| byte == b'}')?;
            (close > 0).then(|| &inside[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

/// Slots `start..=end`, owned by the primary at `node`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SlotRange {
    pub(crate) start: u16,
    pub(crate) end: u16,
    pub(crate) node: (String, u16),
}

/// The elements of a map question's reply, or why there are none.
fn reply_entries(frame: &[u8], command: &str) -> Result<Vec<RangeFrame>, String> {
    match redis::decode(frame).map_err(|err| err.to_string())? {
        RangeFrame::Array { data, .. } => Ok(data),
        RangeFrame::SimpleError { data, .. } | RangeFrame::BlobError { data, .. } => {
            let message = frame.get(data.0..data.1).unwrap_or_default();
            Err(format!(
                "{command} refused: {}",
                String::from_utf8_lossy(message)
            ))
        }
        _ => Err(format!(
            "{command} answered with something else than an array"
        )),
    }
}

fn number(item: Option<&RangeFrame>) -> Option<i64> {
    match item {
        Some(RangeFrame::Number { data, .. }) => Some(*data),
        _ => None,
    }
}

fn slot_number(item: Option<&RangeFrame>) -> Option<u16> {
    number(item)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| usize::from(n) < SLOTS)
}

fn port_number(item: Option<&RangeFrame>) -> Option<u16> {
    number(item)
        .and_then(|port| u16::try_from(port).ok())
        .filter(|&port| port != 0)
}

fn text<'a>(item: Option<&RangeFrame>, frame: &'a [u8]) -> Option<&'a str> {
    item.and_then(|item| redis::bytes(item, 0, frame))
        .and_then(|text| std::str::from_utf8(text).ok())
}

/// Adds the range `start..=end` owned by the node at `host` (empty: the node asked; `?`:
/// unknown, so its slots stay unowned until it is known).
fn push_range(
    ranges: &mut Vec<SlotRange>,
    (start, end): (u16, u16),
    host: &str,
    port: u16,
    asked: &str,
) -> Result<(), ()> {
    if start > end {
        return Err(());
    }
    if host != "?" {
        let host = if host.is_empty() { asked } else { host };
        ranges.push(SlotRange {
            start,
            end,
            node: (host.to_string(), port),
        });
    }
    Ok(())
}

/// Reads a `CLUSTER SLOTS` reply: per range, its first and last slot, then the primary's
/// `[host, port, id, …]`, then its replicas (ignored).
pub(crate) fn parse_slots(frame: &[u8], asked: &str) -> Result<Vec<SlotRange>, String> {
    let entries = reply_entries(frame, "CLUSTER SLOTS")?;
    let malformed = || "a malformed CLUSTER SLOTS entry".to_string();
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in &entries {
        let RangeFrame::Array { data: items, .. } = entry else {
            return Err(malformed());
        };
        let (Some(start), Some(end)) = (slot_number(items.first()), slot_number(items.get(1)))
        else {
            return Err(malformed());
        };
        let Some(RangeFrame::Array { data: primary, .. }) = items.get(2) else {
            return Err(malformed());
        };
        let host = text(primary.first(), frame).ok_or_else(malformed)?;
        let port = port_number(primary.get(1)).ok_or_else(malformed)?;
        push_range(&mut ranges, (start, end), host, port, asked).map_err(|()| malformed())?;
    }
    Ok(ranges)
}

/// The `(name, value)` pairs of a RESP3 map, or of a RESP2 array of alternating names and
/// values.
fn fields<'a>(item: &'a RangeFrame, frame: &'a [u8]) -> Option<Vec<(&'a [u8], &'a RangeFrame)>> {
    match item {
        RangeFrame::Map { data, .. } => data
            .iter()
            .map(|(name, value)| Some((redis::bytes(name, 0, frame)?, value)))
            .collect(),
        RangeFrame::Array { data, .. } if data.len() % 2 == 0 => data
            .chunks(2)
            .map(|pair| Some((redis::bytes(&pair[0], 0, frame)?, &pair[1])))
            .collect(),
        _ => None,
    }
}

fn field<'a>(fields: &[(&[u8], &'a RangeFrame)], name: &str) -> Option<&'a RangeFrame> {
    fields
        .iter()
        .find(|(key, _)| *key == name.as_bytes())
        .map(|(_, value)| *value)
}

/// Reads a `CLUSTER SHARDS` reply: per shard, `slots` (first and last slot of each range,
/// flat) and `nodes`; the node whose `role` is `master` (an `online` one if there are two)
/// owns the slots, at its `endpoint` and its `port`, or its `tls-port` when `tls`.
pub(crate) fn parse_shards(frame: &[u8], asked: &str, tls: bool) -> Result<Vec<SlotRange>, String> {
    let entries = reply_entries(frame, "CLUSTER SHARDS")?;
    let malformed = || "a malformed CLUSTER SHARDS entry".to_string();
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in &entries {
        let shard = fields(entry, frame).ok_or_else(malformed)?;
        let (
            Some(RangeFrame::Array { data: slots, .. }),
            Some(RangeFrame::Array { data: nodes, .. }),
        ) = (field(&shard, "slots"), field(&shard, "nodes"))
        else {
            return Err(malformed());
        };
        let mut primary = None;
        for node in nodes {
            let node = fields(node, frame).ok_or_else(malformed)?;
            if text(field(&node, "role"), frame) == Some("master")
                && (primary.is_none() || text(field(&node, "health"), frame) == Some("online"))
            {
                primary = Some(node);
            }
        }
        // A shard without a primary (its slots are being failed over): unowned for now.
        let Some(primary) = primary else {
            continue;
        };
        let host = text(field(&primary, "endpoint").or(field(&primary, "ip")), frame)
            .ok_or_else(malformed)?;
        let ports = if tls {
            ["tls-port", "port"]
        } else {
            ["port", "tls-port"]
        };
        let port = ports
            .iter()
            .find_map(|name| port_number(field(&primary, name)))
            .ok_or_else(malformed)?;
        if slots.len() % 2 != 0 {
            return Err(malformed());
        }
        for pair in slots.chunks(2) {
            let (Some(start), Some(end)) = (slot_number(pair.first()), slot_number(pair.get(1)))
            else {
                return Err(malformed());
            };
            push_range(&mut ranges, (start, end), host, port, asked).map_err(|()| malformed())?;
        }
    }
    Ok(ranges)
}

/// The engine for `redis+cluster://[user[:password]@]host:port[,host:port…]`, or
/// `rediss+cluster://` for TLS to every node (options `ca=`, `cert=`, `key=`, see `tls`);
/// `name` is the channel prefix. It sets `limit` to Redis's default bulk limit.
pub(crate) fn engine(url: &str, name: &str, limit: &AtomicUsize) -> Result<Box<dyn Engine>, Error> {
    let url = BrokerUrl::parse(url, 6379)?;
    match url.scheme.as_str() {
        "redis+cluster" | "rediss+cluster" => {}
        _ => {
            return Err(Error::InvalidArgument(
                "a Redis Cluster URL starts with redis+cluster:// or rediss+cluster://",
            ));
        }
    }
    if !url.path.is_empty() {
        return Err(Error::InvalidArgument(
            "a redis+cluster:// URL has no path: a cluster has database 0 only",
        ));
    }
    topic::check_redis_prefix(name)?;
    let engine = ClusterEngine::new(url, name)?;
    limit.store(MAX_BULK_LEN, Ordering::Relaxed);
    Ok(Box::new(engine))
}

/// One primary: its address, its queues, and its connection while it is needed.
struct Shard {
    node: (String, u16),
    outbound: Outbound,
    /// What this engine put in `outbound` and the connection has not taken yet.
    backlog: Backlog,
    /// Publishes another node redirected here, sent before what `outbound` holds.
    resend: VecDeque<Retained>,
    /// Publishes given to the connection (queued or resent) since it was opened, and those
    /// it answered with `MOVED`: with its own counts, what [`ClusterEngine::settled`] is.
    handed: u64,
    redirected: u64,
    stream: Option<StreamEngine<RedisProtocol>>,
}

/// The publishes of a slot whose owner changed, held until the old owner has answered
/// every publish it was given before (`until`, in [`Shard::handed`]), or until `deadline`.
struct Fence {
    shard: usize,
    until: u64,
    deadline: Instant,
    held: Publishes,
}

/// Publishes waiting for a connection, and their bytes (topics and payloads).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Backlog {
    publishes: usize,
    bytes: usize,
}

impl Backlog {
    fn add(&mut self, bytes: usize) {
        self.publishes += 1;
        self.bytes += bytes;
    }

    fn remove(&mut self, taken: Backlog) {
        self.publishes -= taken.publishes.min(self.publishes);
        self.bytes -= taken.bytes.min(self.bytes);
    }
}

/// When to read the slot map again.
struct Refresh {
    wanted: bool,
    /// A map question is on the control connection, unanswered.
    asked: bool,
    not_before: Instant,
    delay: Duration,
    last_asked: Option<Instant>,
}

pub(crate) struct ClusterEngine {
    url: BrokerUrl,
    /// The channel prefix.
    name: String,
    /// The TLS of every connection (`rediss+cluster://`).
    tls: Option<Tls>,
    topology_command: TopologyCommand,
    /// The engine's own epoll: every connection is registered here, and its fd with the
    /// registry's reactor.
    inner: Reactor,
    watching: bool,
    control: StreamEngine<RedisProtocol>,
    /// Always empty: the control connection takes nothing from the registry.
    control_outbound: Outbound,
    /// Control connection attempts failed since the last map was read.
    control_failures: usize,
    shards: Vec<Shard>,
    /// Publishes waiting in every shard's queues and fences: bounded together as the
    /// broker's queue is, however many shards there are.
    backlog: Backlog,
    /// Per slot that changed owner, its publishes held meanwhile (see [`Fence`]).
    fences: HashMap<u16, Fence>,
    /// Per slot, the index in `shards` of its owner, or [`UNOWNED`].
    owners: Vec<u16>,
    topology_known: bool,
    refresh: Refresh,
    /// Topics with a local subscriber, and the shard their subscription was given to.
    interest: HashMap<Box<[u8]>, Option<usize>>,
    /// Topics a node unsubscribed or refused: placed again, even on the same shard, once
    /// the next map is read.
    displaced: HashSet<Box<[u8]>>,
    changes: Vec<InterestChange>,
    publishes: Publishes,
    /// Counters of connections closed for good, and the engine's own.
    retired: BrokerStats,
    failure: Option<Error>,
    channel: Vec<u8>,
}

impl ClusterEngine {
    fn new(mut url: BrokerUrl, name: &str) -> Result<ClusterEngine, Error> {
        let secure = url.scheme == "rediss+cluster";
        let tls = Tls::from_url(&mut url, secure, TlsStart::AtConnect)?;
        let control = control_stream(&url, name, &tls)?;
        Ok(ClusterEngine {
            name: name.to_string(),
            url,
            tls,
            topology_command: TopologyCommand::Shards,
            inner: Reactor::new().map_err(Error::Io)?,
            watching: false,
            control,
            control_outbound: Outbound::default(),
            control_failures: 0,
            shards: Vec::new(),
            backlog: Backlog::default(),
            fences: HashMap::new(),
            owners: vec![UNOWNED; SLOTS],
            topology_known: false,
            refresh: Refresh {
                wanted: true,
                asked: false,
                not_before: Instant::now(),
                delay: FIRST_RETRY,
                last_asked: None,
            },
            interest: HashMap::new(),
            displaced: HashSet::new(),
            changes: Vec::new(),
            publishes: Publishes::default(),
            retired: BrokerStats::default(),
            failure: None,
            channel: Vec::new(),
        })
    }

    fn slot_of(&mut self, topic: &[u8]) -> u16 {
        topic::redis_channel(self.name.as_bytes(), topic, &mut self.channel);
        key_slot(&self.channel)
    }

    fn want_refresh(&mut self) {
        self.refresh.wanted = true;
    }

    /// The index of the shard at `node`, added (without a connection) if new; `None` when
    /// the servers named more nodes than a cluster has.
    fn shard_index(&mut self, node: &(String, u16)) -> Option<u16> {
        let index = match self.shards.iter().position(|shard| &shard.node == node) {
            Some(index) => index,
            None if self.shards.len() < MAX_SHARDS => {
                self.shards.push(Shard {
                    node: node.clone(),
                    outbound: Outbound::default(),
                    backlog: Backlog::default(),
                    resend: VecDeque::new(),
                    handed: 0,
                    redirected: 0,
                    stream: None,
                });
                self.shards.len() - 1
            }
            None => return None,
        };
        u16::try_from(index).ok()
    }

    /// Forgets the shards that have no connection, no queued work and no topic (nodes gone
    /// from the map), so that the list does not grow with every failover. Indices change:
    /// only before a new map is built.
    fn forget_vacant_shards(&mut self) {
        let keep: Vec<bool> = (0..self.shards.len())
            .map(|index| {
                let shard = &self.shards[index];
                shard.stream.is_some()
                    || shard.outbound.is_dirty()
                    || shard.outbound.counts().0 > 0
                    || !shard.resend.is_empty()
                    || self.interest.values().any(|placed| *placed == Some(index))
            })
            .collect();
        if keep.iter().all(|&kept| kept) {
            return;
        }
        let mut renumbered = Vec::with_capacity(keep.len());
        let mut next = 0;
        for &kept in &keep {
            renumbered.push(kept.then_some(next));
            next += usize::from(kept);
        }
        let mut index = 0;
        self.shards.retain(|_| {
            index += 1;
            keep[index - 1]
        });
        for placed in self.interest.values_mut() {
            *placed = placed.and_then(|old| renumbered[old]);
        }
        let renumber = |old: usize| renumbered.get(old).copied().flatten();
        for owner in &mut self.owners {
            *owner = renumber(usize::from(*owner)).map_or(UNOWNED, |index| index as u16);
        }
        // A fence's shard has a connection, so it is kept.
        for fence in self.fences.values_mut() {
            fence.shard = renumber(fence.shard).unwrap_or(fence.shard);
        }
    }

    /// Opens the shard's connection if it has none (the first attempt is made by the next
    /// `advance`).
    fn ensure_stream(&mut self, index: usize) {
        if self.shards[index].stream.is_some() {
            return;
        }
        let protocol = match RedisProtocol::sharded(&self.url, &self.name) {
            Ok(protocol) => protocol,
            Err(err) => {
                self.failure = Some(err);
                return;
            }
        };
        match StreamEngine::new(
            protocol,
            std::slice::from_ref(&self.shards[index].node),
            self.tls.clone(),
        ) {
            Ok(stream) => self.shards[index].stream = Some(stream),
            Err(err) => {
                self.failure = Some(err);
                self.want_refresh();
            }
        }
    }

    /// Subscribes `topic` on its slot's owner (moving it off another shard), or on the same
    /// shard again when `again`.
    fn place(&mut self, topic: &[u8], again: bool) {
        let Some(&placed) = self.interest.get(topic) else {
            return;
        };
        let slot = self.slot_of(topic);
        let owner = self.owners[usize::from(slot)];
        let owner = (owner != UNOWNED).then_some(usize::from(owner));
        if owner == placed && !again {
            return;
        }
        if let Some(old) = placed {
            self.shards[old].outbound.push_interest(topic, false);
        }
        match owner {
            Some(index) => {
                self.ensure_stream(index);
                self.shards[index].outbound.push_interest(topic, true);
            }
            None => self.want_refresh(),
        }
        if let Some(entry) = self.interest.get_mut(topic) {
            *entry = owner;
        }
    }

    fn place_all(&mut self) {
        let topics: Vec<Box<[u8]>> = self.interest.keys().cloned().collect();
        let displaced = std::mem::take(&mut self.displaced);
        for topic in topics {
            let again = displaced.contains(&topic);
            self.place(&topic, again);
        }
    }

    fn apply_interest(&mut self, changes: &mut Vec<InterestChange>) {
        for change in changes.drain(..) {
            if change.subscribe {
                if self.interest.contains_key(&change.topic) {
                    continue;
                }
                self.interest.insert(change.topic.clone(), None);
                if self.topology_known {
                    self.place(&change.topic, false);
                }
            } else {
                self.displaced.remove(&change.topic);
                if let Some(Some(index)) = self.interest.remove(&change.topic) {
                    self.shards[index]
                        .outbound
                        .push_interest(&change.topic, false);
                }
            }
        }
    }

    /// The shard owning `topic`'s slot, with its connection opened; `None` (and the map
    /// read again) when no node owns it.
    fn owner_of(&mut self, topic: &[u8]) -> Option<usize> {
        let slot = self.slot_of(topic);
        self.owner_in(slot)
    }

    fn owner_in(&mut self, slot: u16) -> Option<usize> {
        let owner = self.owners[usize::from(slot)];
        if owner == UNOWNED {
            self.want_refresh();
            return None;
        }
        let index = usize::from(owner);
        self.ensure_stream(index);
        Some(index)
    }

    /// Whether one more publish of `bytes` fits in the engine-wide bound; counts the drop
    /// when it does not.
    fn has_room(&mut self, bytes: usize) -> bool {
        let fits = self.backlog.publishes < MAX_QUEUED_PUBLISHES
            && self.backlog.bytes + bytes <= MAX_QUEUED_BYTES;
        if !fits {
            self.retired.dropped += 1;
        }
        fits
    }

    /// Queues a publish on its slot's owner; with no owner known, or no room left, it is
    /// dropped and counted.
    fn route(&mut self, topic: &[u8], payload: &[u8]) {
        let bytes = topic.len() + payload.len();
        let slot = self.slot_of(topic);
        if !self.fences.is_empty() && self.fences.contains_key(&slot) {
            if self.has_room(bytes)
                && let Some(fence) = self.fences.get_mut(&slot)
            {
                fence.held.push(topic, payload);
                self.backlog.add(bytes);
            }
            return;
        }
        let Some(index) = self.owner_in(slot) else {
            self.retired.dropped += 1;
            return;
        };
        // A full shard queue counts the drop itself (it cannot be fuller than the bound).
        if self.has_room(bytes) && self.shards[index].outbound.push_publish(topic, payload) {
            let shard = &mut self.shards[index];
            shard.backlog.add(bytes);
            shard.handed += 1;
            self.backlog.add(bytes);
        }
    }

    /// Publishes shard `index` has finished with: answered (published, refused, redirected)
    /// or lost with a connection.
    fn settled(&self, index: usize) -> u64 {
        let shard = &self.shards[index];
        let answered = shard.stream.as_ref().map_or(0, |stream| {
            let stats = stream.stats();
            stats.published + stats.dropped
        });
        shard.redirected + answered
    }

    /// `slot` left shard `old`: while `old` may still send publishes of it back with `MOVED`,
    /// the slot's new publishes wait, so that they do not overtake those.
    fn fence(&mut self, slot: u16, old: usize) {
        let until = self.shards[old].handed;
        if self.fences.contains_key(&slot)
            || self.shards[old].stream.is_none()
            || self.settled(old) >= until
        {
            return;
        }
        let fence = Fence {
            shard: old,
            until,
            deadline: Instant::now() + TOPOLOGY_TIMEOUT,
            held: Publishes::default(),
        };
        self.fences.insert(slot, fence);
    }

    /// Routes what the fences whose old owner is done (or gone, or late) held.
    fn release_fences(&mut self) {
        if self.fences.is_empty() {
            return;
        }
        let now = Instant::now();
        let done: Vec<u16> = self
            .fences
            .iter()
            .filter(|(_, fence)| {
                now >= fence.deadline
                    || self.shards[fence.shard].stream.is_none()
                    || self.settled(fence.shard) >= fence.until
            })
            .map(|(&slot, _)| slot)
            .collect();
        for slot in done {
            if let Some(fence) = self.fences.remove(&slot) {
                self.release(fence);
            }
        }
    }

    fn release(&mut self, fence: Fence) {
        for (topic, payload) in fence.held.iter() {
            self.backlog.remove(Backlog {
                publishes: 1,
                bytes: topic.len() + payload.len(),
            });
            self.route(topic, payload);
        }
    }

    /// Queues a redirected publish to be sent to shard `index` ahead of its queue.
    fn queue_resend(&mut self, index: usize, publish: Retained) {
        if self.has_room(publish.len()) {
            self.backlog.add(publish.len());
            self.shards[index].resend.push_back(publish);
        }
    }

    /// Forgets, from the bound, what shard `index`'s connection took from its queue.
    fn sync_backlog(&mut self, index: usize) {
        let shard = &mut self.shards[index];
        let left = shard.outbound.counts().0 as usize;
        if left >= shard.backlog.publishes {
            return;
        }
        let taken = shard.backlog.publishes - left;
        // The queue is taken from its front; the bytes are the proportion when not all of it.
        let bytes = if left == 0 {
            shard.backlog.bytes
        } else {
            shard.backlog.bytes / shard.backlog.publishes * taken
        };
        let taken = Backlog {
            publishes: taken,
            bytes,
        };
        shard.backlog.remove(taken);
        self.backlog.remove(taken);
    }

    /// Writes the publishes redirected to shard `index`, once its session is open, and
    /// flushes them with what its queue holds.
    fn send_resends(&mut self, index: usize, received: &mut Vec<Received>) {
        let Shard {
            outbound,
            resend,
            handed,
            stream: Some(stream),
            ..
        } = &mut self.shards[index]
        else {
            return;
        };
        if resend.is_empty() || !stream.is_open() {
            return;
        }
        for publish in resend.drain(..) {
            self.backlog.remove(Backlog {
                publishes: 1,
                bytes: publish.len(),
            });
            stream.send(|protocol, out| protocol.resend(publish, out));
            *handed += 1;
        }
        stream.write(&mut Context {
            reactor: &self.inner,
            outbound,
            received,
        });
    }

    fn route_taken(&mut self) {
        let publishes = std::mem::take(&mut self.publishes);
        for (topic, payload) in publishes.iter() {
            self.route(topic, payload);
        }
        let mut publishes = publishes;
        publishes.clear();
        self.publishes = publishes;
    }

    /// A new slot map: owners replaced, topics placed on their owners, shards that own
    /// nothing now closed (what they still queued is routed again).
    fn apply_topology(&mut self, ranges: &[SlotRange]) {
        self.forget_vacant_shards();
        let mut owners = vec![UNOWNED; SLOTS];
        for range in ranges {
            let Some(index) = self.shard_index(&range.node) else {
                self.retired.malformed += 1;
                continue;
            };
            owners[usize::from(range.start)..=usize::from(range.end)].fill(index);
        }
        let previous = std::mem::replace(&mut self.owners, owners);
        let moved: Vec<(u16, usize)> = (0..SLOTS)
            .filter(|&slot| previous[slot] != self.owners[slot] && previous[slot] != UNOWNED)
            .map(|slot| (slot as u16, usize::from(previous[slot])))
            .collect();
        for (slot, old) in moved {
            self.fence(slot, old);
        }
        self.topology_known = true;
        self.place_all();
        let mut owns = vec![false; self.shards.len()];
        for &owner in &self.owners {
            if let Some(owns) = owns.get_mut(usize::from(owner)) {
                *owns = true;
            }
        }
        for (index, owns) in owns.into_iter().enumerate() {
            if !owns && self.shards[index].stream.is_some() {
                self.retire(index);
            }
        }
    }

    fn retire(&mut self, index: usize) {
        let Some(mut stream) = self.shards[index].stream.take() else {
            return;
        };
        stream.shut_down(&self.inner);
        add_counts(&mut self.retired, &stream.stats());
        let mut stale = Vec::new();
        let mut queued = Publishes::default();
        self.shards[index]
            .outbound
            .take(&mut stale, Some(&mut queued));
        let (_, dropped) = self.shards[index].outbound.counts();
        self.retired.dropped += dropped;
        self.shards[index].outbound = Outbound::default();
        let backlog = std::mem::take(&mut self.shards[index].backlog);
        self.backlog.remove(backlog);
        // Counted per connection: the next one starts from nothing.
        self.shards[index].handed = 0;
        self.shards[index].redirected = 0;
        let resend = std::mem::take(&mut self.shards[index].resend);
        // What it had been given goes to the new owners first; then what its fences held.
        let fenced: Vec<u16> = self
            .fences
            .iter()
            .filter(|(_, fence)| fence.shard == index)
            .map(|(&slot, _)| slot)
            .collect();
        let lifted: Vec<Fence> = fenced
            .iter()
            .filter_map(|slot| self.fences.remove(slot))
            .collect();
        for publish in &resend {
            self.backlog.remove(Backlog {
                publishes: 1,
                bytes: publish.len(),
            });
        }
        for publish in resend {
            match self.owner_of(publish.topic()) {
                Some(owner) => self.queue_resend(owner, publish),
                None => self.retired.dropped += 1,
            }
        }
        for (topic, payload) in queued.iter() {
            self.route(topic, payload);
        }
        for fence in lifted {
            self.release(fence);
        }
    }

    /// A publish refused with MOVED: the slot now belongs to the node named, and the publish
    /// goes there, unless it has been redirected too often already.
    fn redirect(&mut self, from: usize, redirect: Redirect) {
        self.shards[from].redirected += 1;
        let mut publish = redirect.publish;
        publish.redirects = publish.redirects.saturating_add(1);
        if publish.redirects > MAX_REDIRECTS {
            self.retired.dropped += 1;
            self.failure = Some(Error::Backend(format!(
                "Redis Cluster: a publish to slot {} was redirected (MOVED) {MAX_REDIRECTS} \
                 times and refused again: dropped (the nodes disagree about the slot's owner)",
                redirect.slot
            )));
            self.want_refresh();
            return;
        }
        let node = if redirect.node.0.is_empty() {
            (self.shards[from].node.0.clone(), redirect.node.1)
        } else {
            redirect.node
        };
        let Some(owner) = self.shard_index(&node) else {
            self.retired.dropped += 1;
            return;
        };
        let index = usize::from(owner);
        let previous = std::mem::replace(&mut self.owners[usize::from(redirect.slot)], owner);
        self.ensure_stream(index);
        self.queue_resend(index, publish);
        self.want_refresh();
        if previous != owner && previous != UNOWNED {
            self.fence(redirect.slot, from);
        }
        // The slot's topics moved with the first publish that met MOVED; the ones behind it
        // only follow.
        if previous == owner {
            return;
        }
        let moved: Vec<Box<[u8]>> = self
            .interest
            .iter()
            .filter(|(_, placed)| **placed != Some(index))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in moved {
            if self.slot_of(&topic) == redirect.slot {
                // Subscribed afresh on the new owner: what displaced it is answered.
                self.displaced.remove(&topic);
                self.place(&topic, false);
            }
        }
    }

    /// Acts on what a shard's session noted during its turn.
    fn take_notes(&mut self, index: usize) {
        let Some(stream) = self.shards[index].stream.as_mut() else {
            return;
        };
        let failed = stream.take_failure();
        let notes = std::mem::take(&mut stream.protocol_mut().notes);
        if let Some(err) = failed {
            self.failure = Some(err);
            self.want_refresh();
        }
        if notes.refresh {
            self.want_refresh();
        }
        for topic in notes.displaced {
            if self.interest.contains_key(&topic) {
                self.displaced.insert(topic);
            }
        }
        for redirect in notes.redirected {
            self.redirect(index, redirect);
        }
    }

    fn drive_control(&mut self, received: &mut Vec<Received>) {
        if let Some(due) = self.topology_overdue_at()
            && Instant::now() >= due
        {
            // A node that takes our question and never answers would freeze the map: start
            // over on a new connection.
            self.control.shut_down(&self.inner);
            self.retired.malformed += self.control.stats().malformed;
            match control_stream(&self.url, &self.name, &self.tls) {
                Ok(control) => self.control = control,
                Err(err) => self.failure = Some(err),
            }
            self.refresh.asked = false;
            self.refresh.wanted = true;
        }
        self.control.advance(&mut Context {
            reactor: &self.inner,
            outbound: &self.control_outbound,
            received,
        });
        if let Some(err) = self.control.take_failure() {
            // The next seed is tried next: only when every seed failed in a row is it a
            // failure worth reporting (to `enable`).
            self.control_failures += 1;
            if self.control_failures >= self.url.hosts.len() {
                self.failure = Some(err);
            }
            // The question, if asked, went down with the connection.
            self.refresh.asked = false;
        }
        let notes = std::mem::take(&mut self.control.protocol_mut().notes);
        for reply in notes.topology {
            self.refresh.asked = false;
            let refused = matches!(reply.first(), Some(b'-' | b'!'));
            if refused && self.topology_command == TopologyCommand::Shards {
                // A server without CLUSTER SHARDS (or one that hides it): the older question.
                self.topology_command = TopologyCommand::Slots;
                self.refresh.wanted = true;
                self.refresh.not_before = Instant::now();
                continue;
            }
            let asked = self
                .control
                .peer()
                .map(|address| address.ip().to_string())
                .unwrap_or_default();
            let parsed = match self.topology_command {
                TopologyCommand::Shards => parse_shards(&reply, &asked, self.tls.is_some()),
                TopologyCommand::Slots => parse_slots(&reply, &asked),
            };
            match parsed {
                Ok(ranges) => {
                    self.control_failures = 0;
                    self.apply_topology(&ranges);
                    // A map that leaves a topic homeless is no answer yet.
                    if self.interest.values().any(Option::is_none) {
                        self.want_refresh();
                    }
                }
                Err(err) => {
                    self.retired.malformed += 1;
                    self.failure = Some(Error::Backend(format!("Redis Cluster: {err}")));
                    self.want_refresh();
                }
            }
        }
        let now = Instant::now();
        let command = self.topology_command;
        if self.refresh.wanted
            && !self.refresh.asked
            && now >= self.refresh.not_before
            && self
                .control
                .send(|protocol, out| protocol.request_topology(command, out))
        {
            // Asked again long after the last time: the map had been stable.
            if self
                .refresh
                .last_asked
                .is_some_and(|last| now - last > MAX_RETRY * 2)
            {
                self.refresh.delay = FIRST_RETRY;
            }
            self.refresh.wanted = false;
            self.refresh.asked = true;
            self.refresh.last_asked = Some(now);
            self.refresh.not_before = now + self.refresh.delay;
            self.refresh.delay = next_retry(self.refresh.delay);
            self.control.write(&mut Context {
                reactor: &self.inner,
                outbound: &self.control_outbound,
                received,
            });
        }
    }

    /// When an unanswered map question is given up.
    fn topology_overdue_at(&self) -> Option<Instant> {
        let asked_at = self.refresh.last_asked.filter(|_| self.refresh.asked)?;
        Some(asked_at + TOPOLOGY_TIMEOUT)
    }

    /// Takes the registry's queue: interest always, publishes once the map is known.
    fn take(&mut self, cx: &Context<'_>) {
        let mut changes = std::mem::take(&mut self.changes);
        let take_publishes = self.topology_known;
        cx.take(&mut changes, take_publishes.then_some(&mut self.publishes));
        self.apply_interest(&mut changes);
        self.changes = changes;
        self.route_taken();
    }

    fn watch(&mut self, reactor: &Reactor) {
        if self.watching {
            return;
        }
        match reactor.watch_backend(None, self.inner.poll_fd(), Interest::READABLE) {
            Ok(()) => self.watching = true,
            Err(err) => self.failure = Some(Error::Io(err)),
        }
    }

    /// Forgets the readiness the inner epoll collected: every connection is looked at now.
    fn drain_events(&self) {
        let mut ready = Vec::new();
        let _ = self.inner.wait(Some(Duration::ZERO), &mut ready);
    }

    fn shards_ready(&self) -> bool {
        self.shards.iter().all(|shard| {
            shard.stream.as_ref().is_none_or(Engine::is_ready) && !shard.outbound.is_dirty()
        })
    }
}

/// A connection to the URL's seeds, for the map questions.
fn control_stream(
    url: &BrokerUrl,
    name: &str,
    tls: &Option<Tls>,
) -> Result<StreamEngine<RedisProtocol>, Error> {
    StreamEngine::new(RedisProtocol::sharded(url, name)?, &url.hosts, tls.clone())
}

/// Adds the counters that accumulate (not the gauges) of `from` to `to`.
fn add_counts(to: &mut BrokerStats, from: &BrokerStats) {
    to.published += from.published;
    to.received += from.received;
    to.ignored += from.ignored;
    to.malformed += from.malformed;
    to.reconnects += from.reconnects;
    to.dropped += from.dropped;
}

impl Engine for ClusterEngine {
    fn advance(&mut self, cx: &mut Context<'_>) {
        self.watch(cx.reactor);
        self.drain_events();
        self.take(cx);
        self.drive_control(cx.received);
        for _ in 0..PASSES {
            for index in 0..self.shards.len() {
                self.send_resends(index, cx.received);
                let Shard {
                    outbound, stream, ..
                } = &mut self.shards[index];
                if let Some(stream) = stream {
                    stream.advance(&mut Context {
                        reactor: &self.inner,
                        outbound,
                        received: cx.received,
                    });
                }
                // The session may have opened in this turn.
                self.send_resends(index, cx.received);
                self.sync_backlog(index);
                self.take_notes(index);
            }
            self.release_fences();
            if !self.shards.iter().any(|shard| {
                shard.stream.is_some() && (shard.outbound.is_dirty() || !shard.resend.is_empty())
            }) {
                break;
            }
        }
    }

    fn write(&mut self, cx: &mut Context<'_>) {
        self.take(cx);
        let mut connecting = false;
        for index in 0..self.shards.len() {
            // Redirected publishes go before the queue: a fence lifted once their MOVED
            // answers were all in, so what it held, and what came after, must not overtake
            // them while they wait here for the next turn of `advance`.
            self.send_resends(index, cx.received);
            let shard = &mut self.shards[index];
            if let Some(stream) = shard.stream.as_mut() {
                stream.write(&mut Context {
                    reactor: &self.inner,
                    outbound: &shard.outbound,
                    received: cx.received,
                });
                connecting |= !stream.is_open() || shard.outbound.is_dirty();
                self.sync_backlog(index);
            }
        }
        if connecting || self.refresh.wanted {
            // Connecting and reading the map are `advance`'s: have dispatch come and service
            // the engine (a plain wake returns from the wait without it).
            cx.reactor.wake_backend();
        }
    }

    fn wait(&self) -> Wait {
        let mut deadline = self.control.wait().deadline;
        for stream in self.shards.iter().filter_map(|shard| shard.stream.as_ref()) {
            deadline = match (deadline, stream.wait().deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let fences = self.fences.values().map(|fence| fence.deadline);
        for due in self.topology_overdue_at().into_iter().chain(fences) {
            deadline = Some(deadline.map_or(due, |other| other.min(due)));
        }
        // Only an open control connection can ask; until then its own deadline is the one.
        if self.refresh.wanted && !self.refresh.asked && self.control.is_open() {
            let due = self.refresh.not_before;
            deadline = Some(deadline.map_or(due, |other| other.min(due)));
        }
        Wait {
            socket: Some((self.inner.poll_fd(), false)),
            deadline,
        }
    }

    fn is_ready(&self) -> bool {
        self.topology_known
            && self.displaced.is_empty()
            && self.interest.values().all(Option::is_some)
            && self.shards_ready()
    }

    fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    fn stats(&self) -> BrokerStats {
        let mut stats = self.retired;
        stats.malformed += self.control.stats().malformed;
        stats.queued += self
            .fences
            .values()
            .map(|fence| fence.held.len() as u64)
            .sum::<u64>();
        for shard in &self.shards {
            let (queued, dropped) = shard.outbound.counts();
            stats.queued += queued + shard.resend.len() as u64;
            stats.dropped += dropped;
            if let Some(stream) = &shard.stream {
                let own = stream.stats();
                add_counts(&mut stats, &own);
                stats.queued += own.queued;
                stats.topics += own.topics;
            }
        }
        stats.connected = u64::from(self.is_ready());
        stats
    }

    /// Everything queued goes to the connections that are open: what the fences hold too
    /// (their old owners' `MOVED` answers will not be read any more), and the redirected
    /// publishes ahead of each shard's queue, which is then taken whatever it holds back.
    fn drain(&mut self, cx: &mut Context<'_>) {
        self.take(cx);
        let fences: Vec<Fence> = self.fences.drain().map(|(_, fence)| fence).collect();
        for fence in fences {
            self.release(fence);
        }
        for index in 0..self.shards.len() {
            self.send_resends(index, cx.received);
            let Shard {
                outbound, stream, ..
            } = &mut self.shards[index];
            if let Some(stream) = stream {
                stream.drain(&mut Context {
                    reactor: &self.inner,
                    outbound,
                    received: cx.received,
                });
                self.sync_backlog(index);
            }
        }
    }

    /// What is still queued (for a shard that is down, redirected, or fenced) is dropped
    /// and counted.
    fn shut_down(&mut self, reactor: &Reactor) {
        let mut lost: usize = self.fences.drain().map(|(_, fence)| fence.held.len()).sum();
        for shard in &mut self.shards {
            let mut queued = Publishes::default();
            shard.outbound.take(&mut Vec::new(), Some(&mut queued));
            lost += queued.len() + shard.resend.len();
            shard.resend.clear();
            shard.backlog = Backlog::default();
            if let Some(stream) = shard.stream.as_mut() {
                stream.shut_down(&self.inner);
            }
        }
        self.backlog = Backlog::default();
        self.retired.dropped += lost as u64;
        self.control.shut_down(&self.inner);
        if self.watching {
            reactor.unwatch(self.inner.poll_fd());
            self.watching = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::stream::testing::Feed;
    use crate::broker::stream::{Protocol, Sink};

    const HELLO_REPLY: &[u8] =
        b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n$7\r\nmodules\r\n*0\r\n";

    fn url() -> BrokerUrl {
        BrokerUrl::parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", 6379).unwrap()
    }

    /// A sharded session whose handshake is answered, with prefix "app:".
    fn open_session() -> RedisProtocol {
        let mut session = RedisProtocol::sharded(&url(), "app:").unwrap();
        session.start(&mut Vec::new());
        Feed::default().bytes(&mut session, HELLO_REPLY).unwrap();
        assert!(session.is_open());
        session
    }

    fn push(kind: &[u8], channel: &[u8], last: &[u8]) -> Vec<u8> {
        let mut frame = format!(">3\r\n${}\r\n", kind.len()).into_bytes();
        frame.extend_from_slice(kind);
        frame.extend_from_slice(format!("\r\n${}\r\n", channel.len()).as_bytes());
        frame.extend_from_slice(channel);
        frame.extend_from_slice(b"\r\n");
        frame.extend_from_slice(last);
        frame
    }

    fn smessage(channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut last = format!("${}\r\n", payload.len()).into_bytes();
        last.extend_from_slice(payload);
        last.extend_from_slice(b"\r\n");
        push(b"smessage", channel, &last)
    }

    fn count_push(kind: &[u8], channel: &[u8], count: usize) -> Vec<u8> {
        push(kind, channel, format!(":{count}\r\n").as_bytes())
    }

    #[test]
    fn crc16_matches_the_specification_test_vector() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slots_follow_the_hash_tag_rules() {
        // Slots CLUSTER KEYSLOT gives for these keys.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        // Only what is inside the first non-empty {...} is hashed.
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        // An empty tag, or an unclosed one: the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") % 16384);
        assert_eq!(key_slot(b"}{"), crc16(b"}{") % 16384);
        for key in [&b""[..], b"{", b"{}", b"\xff\x00{\xfe}"] {
            assert!(usize::from(key_slot(key)) < SLOTS);
        }
    }

    const SLOTS_REPLY: &[u8] = b"*3\r\n\
        *3\r\n:0\r\n:5460\r\n*4\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n%0\r\n\
        *4\r\n:5461\r\n:10922\r\n*3\r\n$0\r\n\r\n:7001\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7004\r\n$2\r\nid\r\n\
        *3\r\n:10923\r\n:16383\r\n*3\r\n$1\r\n?\r\n:7002\r\n$2\r\nid\r\n";

    #[test]
    fn the_slot_map_is_read_from_cluster_slots() {
        let ranges = parse_slots(SLOTS_REPLY, "10.0.0.9").unwrap();
        assert_eq!(
            ranges,
            vec![
                SlotRange {
                    start: 0,
                    end: 5460,
                    node: ("127.0.0.1".into(), 7000)
                },
                // An empty host is the node that answered; replicas are ignored.
                SlotRange {
                    start: 5461,
                    end: 10922,
                    node: ("10.0.0.9".into(), 7001)
                },
                // "?" (endpoint unknown) is left out.
            ]
        );
        assert_eq!(parse_slots(b"*0\r\n", "h").unwrap(), vec![]);
        for bad in [
            &b"-CLUSTERDOWN no\r\n"[..],
            b":1\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n*2\r\n:0\r\n:1\r\n",
            b"*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            b"*1\r\n*3\r\n:9\r\n:1\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            b"*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$1\r\nh\r\n:0\r\n",
            b"*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n:5\r\n:1\r\n",
            b"*1\r\n*3\r\n:-1\r\n:1\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            b"*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$1\r\nh\r\n:70000\r\n",
        ] {
            assert!(
                parse_slots(bad, "h").is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_moved_publish_is_kept_whole_for_the_new_owner() {
        assert_eq!(
            redis::moved_to("MOVED 3999 127.0.0.1:6381"),
            Some((3999, ("127.0.0.1".into(), 6381)))
        );
        assert_eq!(
            redis::moved_to("MOVED 1 :7000"),
            Some((1, (String::new(), 7000)))
        );
        assert_eq!(
            redis::moved_to("MOVED 1 [::1]:7000"),
            Some((1, ("[::1]".into(), 7000)))
        );
        for bad in [
            "MOVED",
            "MOVED x h:1",
            "MOVED 16384 h:1",
            "MOVED 1 h",
            "MOVED 1 h:0",
            "ASK 1 h:1",
        ] {
            assert_eq!(redis::moved_to(bad), None, "{bad}");
        }

        let mut session = open_session();
        let mut out = Vec::new();
        session.publish(b"t", b"one", &mut out);
        session.publish(b"t", b"two", &mut out);
        session.publish(b"t", b"three", &mut out);
        assert!(out.starts_with(b"*3\r\n$8\r\nSPUBLISH\r\n$5\r\napp:t\r\n$3\r\none\r\n"));
        let mut feed = Feed::default();
        feed.bytes(
            &mut session,
            format!(
                "-MOVED {} 127.0.0.1:7001\r\n:0\r\n-CLUSTERDOWN The cluster is down\r\n",
                key_slot(b"app:t")
            )
            .as_bytes(),
        )
        .unwrap();
        let notes = std::mem::take(&mut session.notes);
        assert_eq!(notes.redirected.len(), 1);
        let redirect = &notes.redirected[0];
        assert_eq!(
            (redirect.publish.topic(), redirect.publish.payload()),
            (&b"t"[..], &b"one"[..])
        );
        assert_eq!((redirect.slot, redirect.node.1), (key_slot(b"app:t"), 7001));
        assert!(notes.refresh);
        // The second was published; the third refused: dropped, not redirected.
        assert_eq!((feed.stats.published, feed.stats.dropped), (1, 1));
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn the_engine_follows_moved_to_the_new_owner() {
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        // A topic in a slot the map gives an owner (the last range's node is unknown).
        let topic = (0..)
            .map(|n| format!("t{n}").into_bytes())
            .find(|topic| key_slot(&[&b"app:"[..], topic].concat()) <= 10922)
            .unwrap();
        let t = &topic[..];
        engine.apply_topology(&parse_slots(SLOTS_REPLY, "127.0.0.1").unwrap());
        engine.interest.insert(Box::from(t), None);
        engine.place_all();
        let slot = engine.slot_of(t);
        let first = usize::from(engine.owners[usize::from(slot)]);
        assert_eq!(engine.interest[t], Some(first));
        // The node at index `first` answers MOVED to a node not seen before.
        let redirect = Redirect {
            publish: redis::Retained::new(t, b"payload"),
            slot,
            node: (String::new(), 7009),
        };
        engine.redirect(first, redirect);
        let moved_to = usize::from(engine.owners[usize::from(slot)]);
        assert_ne!(moved_to, first);
        assert_eq!(engine.shards[moved_to].node, ("127.0.0.1".into(), 7009));
        assert!(engine.shards[moved_to].stream.is_some(), "connected lazily");
        // The publish goes to the new owner ahead of its queue; the subscription moves too.
        assert_eq!(engine.shards[moved_to].resend.len(), 1);
        assert_eq!(engine.stats().queued, 1);
        assert_eq!(engine.interest[t], Some(moved_to));
        let mut changes = Vec::new();
        engine.shards[first].outbound.take(&mut changes, None);
        assert!(changes.iter().any(|c| &*c.topic == t && !c.subscribe));
        assert!(engine.refresh.wanted);

        // The next map agrees and the old owner keeps its other slots: nothing moves back.
        let mut ranges = parse_slots(SLOTS_REPLY, "127.0.0.1").unwrap();
        ranges.push(SlotRange {
            start: slot,
            end: slot,
            node: ("127.0.0.1".into(), 7009),
        });
        ranges.sort_by_key(|range| range.start);
        let mut split = Vec::new();
        for range in ranges {
            if range.start < slot && slot <= range.end && range.node.1 != 7009 {
                split.push(SlotRange {
                    start: range.start,
                    end: slot - 1,
                    node: range.node.clone(),
                });
                if slot < range.end {
                    split.push(SlotRange {
                        start: slot + 1,
                        end: range.end,
                        node: range.node,
                    });
                }
            } else {
                split.push(range);
            }
        }
        engine.apply_topology(&split);
        // Shards with nothing to do were forgotten: indices changed, nodes did not.
        let owner = usize::from(engine.owners[usize::from(slot)]);
        assert_eq!(engine.shards[owner].node, ("127.0.0.1".into(), 7009));
        assert_eq!(engine.interest[t], Some(owner));
        // Three primaries own slots; only the two that got work are connected (lazily).
        assert_eq!(engine.shards.len(), 3);
        let connected = engine.shards.iter().filter(|shard| shard.stream.is_some());
        assert_eq!(connected.count(), 2);
    }

    #[test]
    fn a_node_that_owns_nothing_any_more_hands_its_queue_to_the_new_owner() {
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        let whole = |port| SlotRange {
            start: 0,
            end: 16383,
            node: ("127.0.0.1".into(), port),
        };
        engine.apply_topology(&[whole(7000)]);
        engine.interest.insert(Box::from(&b"t"[..]), None);
        engine.place_all();
        // Not connected yet: the publishes wait in the shard's queue.
        engine.route(b"t", b"1");
        engine.route(b"u", b"2");
        assert_eq!(engine.shards[0].outbound.counts(), (2, 0));
        // A failover: another node owns every slot now.
        engine.apply_topology(&[whole(7100)]);
        assert!(
            engine.shards[0].stream.is_none(),
            "the old node's connection is closed"
        );
        assert_eq!(engine.shards[0].outbound.counts(), (0, 0));
        assert_eq!(engine.shards[1].outbound.counts(), (2, 0));
        let mut changes = Vec::new();
        let mut publishes = Publishes::default();
        engine.shards[1]
            .outbound
            .take(&mut changes, Some(&mut publishes));
        let order: Vec<_> = publishes
            .iter()
            .map(|(_, payload)| payload.to_vec())
            .collect();
        assert_eq!(order, vec![b"1".to_vec(), b"2".to_vec()], "in order");
        assert!(changes.iter().any(|c| &*c.topic == b"t" && c.subscribe));
        assert_eq!(engine.interest[&b"t"[..]], Some(1));
        // A slot no node owns: the publish is dropped and counted, the map read again.
        engine.apply_topology(&[]);
        engine.refresh.wanted = false;
        engine.route(b"t", b"3");
        assert_eq!(engine.stats().dropped, 1);
        assert!(engine.refresh.wanted);
        assert_eq!(engine.interest[&b"t"[..]], None);
        assert!(!engine.is_ready());
    }

    #[test]
    fn an_unanswered_map_question_is_given_up_with_its_connection() {
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        let long_ago = Instant::now() - TOPOLOGY_TIMEOUT - Duration::from_secs(1);
        engine.refresh.wanted = false;
        engine.refresh.asked = true;
        engine.refresh.last_asked = Some(long_ago);
        assert!(
            engine
                .wait()
                .deadline
                .is_some_and(|due| due <= Instant::now())
        );
        engine.drive_control(&mut Vec::new());
        assert!(!engine.refresh.asked);
        assert!(
            engine.refresh.wanted,
            "asked again once a connection is open"
        );
    }

    #[test]
    fn a_late_moved_for_a_crossed_sunsubscribe_answers_nothing_waiting() {
        let mut session = open_session();
        let slot_of = |topic: &[u8]| key_slot(&[&b"app:"[..], topic].concat());
        let (gone, other) = (b"a".as_slice(), b"b".as_slice());
        assert_ne!(slot_of(gone), slot_of(other));
        let mut feed = Feed::default();
        session.subscribe(gone, &mut Vec::new());
        feed.bytes(&mut session, &count_push(b"ssubscribe", b"app:a", 1))
            .unwrap();
        // We unsubscribe `a` and publish on `b`; the node had just given `a`'s slot away.
        session.unsubscribe(gone, &mut Vec::new());
        session.publish(other, b"x", &mut Vec::new());
        let moved = format!("-MOVED {} 127.0.0.1:7001\r\n", slot_of(gone));
        let stream = [
            count_push(b"sunsubscribe", b"app:a", 0),
            moved.clone().into_bytes(),
            b":0\r\n".to_vec(),
        ]
        .concat();
        feed.bytes(&mut session, &stream).unwrap();
        assert_eq!((feed.stats.published, feed.stats.dropped), (1, 0));
        assert!(session.notes.redirected.is_empty());
        assert_eq!((session.unconfirmed(), session.in_flight()), (0, 0));
        // Nothing waiting at all: skipped too, rather than ending the connection.
        feed.bytes(&mut session, moved.as_bytes()).unwrap();
        assert_eq!(feed.stats.malformed, 0);
    }

    #[test]
    fn the_echo_filter_drops_our_own_smessage_on_either_side_of_the_reply() {
        let mut session = open_session();
        session.publish(b"t", b"mine", &mut Vec::new());
        session.publish(b"t", b"mine", &mut Vec::new());
        let stream = [
            smessage(b"app:t", b"theirs"),
            // Up to Redis 7.0 the echo comes before the reply...
            smessage(b"app:t", b"mine"),
            b":2\r\n".to_vec(),
            // ...since 7.2 after it.
            b":2\r\n".to_vec(),
            smessage(b"app:t", b"mine"),
            // A classic message push is not what a sharded session subscribed to.
            push(b"message", b"app:t", b"$1\r\nx\r\n"),
        ]
        .concat();
        for step in [1, 5, stream.len()] {
            let mut session = open_session();
            session.publish(b"t", b"mine", &mut Vec::new());
            session.publish(b"t", b"mine", &mut Vec::new());
            let mut feed = Feed::default();
            for chunk in stream.chunks(step) {
                feed.bytes(&mut session, chunk).unwrap();
            }
            assert_eq!(
                feed.delivered(),
                vec![(b"t".to_vec(), b"theirs".to_vec())],
                "step {step}"
            );
            assert_eq!((feed.stats.ignored, feed.stats.published), (2, 2));
        }
        assert_eq!(session.in_flight(), 2);
    }

    #[test]
    fn a_nodes_own_sunsubscribe_displaces_the_topic() {
        let mut session = open_session();
        let mut out = Vec::new();
        session.subscribe(b"a", &mut out);
        session.subscribe(b"b", &mut out);
        assert_eq!(
            &out[..],
            &b"*2\r\n$10\r\nSSUBSCRIBE\r\n$5\r\napp:a\r\n*2\r\n$10\r\nSSUBSCRIBE\r\n$5\r\napp:b\r\n"[..]
        );
        let mut feed = Feed::default();
        feed.bytes(&mut session, &count_push(b"ssubscribe", b"app:a", 1))
            .unwrap();
        feed.bytes(&mut session, &count_push(b"ssubscribe", b"app:b", 2))
            .unwrap();
        assert_eq!((session.unconfirmed(), session.subscribed()), (0, 2));
        // We unsubscribe `b`; meanwhile the node gives `a`'s slot away.
        session.unsubscribe(b"b", &mut Vec::new());
        feed.bytes(&mut session, &count_push(b"sunsubscribe", b"app:a", 1))
            .unwrap();
        assert_eq!(session.unconfirmed(), 1, "not taken for b's confirmation");
        feed.bytes(&mut session, &count_push(b"sunsubscribe", b"app:b", 0))
            .unwrap();
        assert_eq!((session.unconfirmed(), session.subscribed()), (0, 0));
        let notes = std::mem::take(&mut session.notes);
        assert_eq!(notes.displaced, vec![Box::from(&b"a"[..])]);
        assert!(notes.refresh);

        // A refused SSUBSCRIBE (the slot is elsewhere) displaces too, and ends nothing.
        session.subscribe(b"c", &mut Vec::new());
        session.unsubscribe(b"d", &mut Vec::new());
        let refusals = format!(
            "-MOVED {} h:1\r\n-MOVED {} h:1\r\n",
            key_slot(b"app:c"),
            key_slot(b"app:d")
        );
        feed.bytes(&mut session, refusals.as_bytes()).unwrap();
        assert_eq!(session.unconfirmed(), 0);
        assert_eq!(session.notes.displaced, vec![Box::from(&b"c"[..])]);
        // Any other refusal still ends the connection.
        session.subscribe(b"e", &mut Vec::new());
        let mut sink = Sink {
            received: &mut Vec::new(),
            stats: &mut BrokerStats::default(),
        };
        assert!(
            session
                .read(b"-NOPERM no\r\n", &mut Vec::new(), &mut sink)
                .is_err()
        );
    }

    #[test]
    fn engine_checks_the_url() {
        let limit = AtomicUsize::new(0);
        let errno = |url: &str| engine(url, "app:", &limit).err().map(|err| err.errno());
        assert_eq!(errno("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"), None);
        assert_eq!(errno("rediss+cluster://127.0.0.1:7000"), None);
        assert_eq!(
            errno("rediss+cluster://127.0.0.1:7000?verify=none"),
            Some(libc::EINVAL)
        );
        assert_eq!(
            errno("redis+cluster://127.0.0.1:7000?ca=/x.pem"),
            Some(libc::EINVAL),
            "a TLS option on a plain URL"
        );
        assert_eq!(
            errno("redis+cluster://127.0.0.1:7000/0"),
            Some(libc::EINVAL)
        );
        assert_eq!(errno("redis://127.0.0.1:7000"), Some(libc::EINVAL));
        engine("redis+cluster://127.0.0.1", "", &limit).unwrap();
        assert_eq!(limit.load(Ordering::Relaxed), MAX_BULK_LEN);
    }

    /// A shard: its slot ranges, and its nodes as "role port tls-port endpoint health".
    type ShardText<'a> = (&'a [(u16, u16)], &'a [&'a str]);

    /// A `CLUSTER SHARDS` reply as Redis 7 writes it in RESP3: a map per shard.
    fn shards_reply(shards: &[ShardText<'_>]) -> Vec<u8> {
        let bulk = |text: &str| format!("${}\r\n{text}\r\n", text.len());
        let mut reply = format!("*{}\r\n", shards.len());
        for (slots, nodes) in shards {
            reply += &format!("%2\r\n{}*{}\r\n", bulk("slots"), slots.len() * 2);
            for (start, end) in *slots {
                reply += &format!(":{start}\r\n:{end}\r\n");
            }
            reply += &format!("{}*{}\r\n", bulk("nodes"), nodes.len());
            for node in *nodes {
                // "-" leaves a field out, "=" is an empty one.
                let words: Vec<&str> = node.split(' ').collect();
                let names = ["role", "port", "tls-port", "endpoint", "health"];
                let present: Vec<(&str, &str)> = names
                    .iter()
                    .zip(&words)
                    .filter(|(_, value)| **value != "-")
                    .map(|(name, value)| (*name, *value))
                    .collect();
                reply += &format!("%{}\r\n{}{}", present.len() + 1, bulk("id"), bulk("abc"));
                for (name, value) in present {
                    reply += &bulk(name);
                    reply += &match value {
                        _ if name.ends_with("port") => format!(":{value}\r\n"),
                        "=" => bulk(""),
                        _ => bulk(value),
                    };
                }
            }
        }
        reply.into_bytes()
    }

    #[test]
    fn the_slot_map_is_read_from_cluster_shards() {
        let reply = shards_reply(&[
            (
                &[(0, 100), (200, 5460)],
                &[
                    "replica 7003 17003 127.0.0.1 online",
                    "master 7000 17000 127.0.0.1 online",
                ],
            ),
            // The failed primary of a failover in progress; an empty endpoint.
            (
                &[(5461, 10922)],
                &["master 7001 - - failed", "master 7004 - = online"],
            ),
            // No primary, or one whose endpoint is unknown: unowned.
            (&[(10923, 11000)], &["replica 7005 - h online"]),
            (&[(11001, 16383)], &["master 7002 - ? online"]),
        ]);
        let node = |host: &str, port| (host.to_string(), port);
        let range = |start, end, host, port| SlotRange {
            start,
            end,
            node: node(host, port),
        };
        assert_eq!(
            parse_shards(&reply, "10.0.0.9", false).unwrap(),
            vec![
                range(0, 100, "127.0.0.1", 7000),
                range(200, 5460, "127.0.0.1", 7000),
                range(5461, 10922, "10.0.0.9", 7004),
            ]
        );
        // Over TLS, the TLS port where the node has one.
        let tls = parse_shards(&reply, "10.0.0.9", true).unwrap();
        assert_eq!(tls[0].node, node("127.0.0.1", 17000));
        assert_eq!(tls[2].node, node("10.0.0.9", 7004));
        // A RESP2 reply (arrays of names and values) reads the same.
        let resp2 = String::from_utf8(reply.clone())
            .unwrap()
            .replace("%2\r\n", "*4\r\n")
            .replace("%6\r\n", "*12\r\n")
            .replace("%5\r\n", "*10\r\n")
            .into_bytes();
        assert_eq!(
            parse_shards(&resp2, "10.0.0.9", false),
            parse_shards(&reply, "10.0.0.9", false)
        );
        for bad in [
            b"-ERR unknown subcommand\r\n".to_vec(),
            b"*1\r\n:1\r\n".to_vec(),
            shards_reply(&[(&[(9, 1)], &["master 7000 - h online"])]),
            shards_reply(&[(&[(0, 16384)], &["master 7000 - h online"])]),
            shards_reply(&[(&[(0, 1)], &["master 0 - h online"])]),
            shards_reply(&[(&[(0, 1)], &["master - - h online"])]),
            b"*1\r\n%1\r\n$5\r\nslots\r\n*1\r\n:0\r\n".to_vec(),
        ] {
            assert!(
                parse_shards(&bad, "h", false).is_err(),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
    }

    #[test]
    fn a_server_refusing_cluster_shards_is_asked_cluster_slots() {
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        assert_eq!(engine.topology_command, TopologyCommand::Shards);
        let mut notes = &mut engine.control.protocol_mut().notes;
        notes
            .topology
            .push(b"-ERR unknown subcommand 'SHARDS'\r\n".to_vec());
        engine.refresh.wanted = false;
        engine.refresh.asked = true;
        engine.drive_control(&mut Vec::new());
        assert_eq!(engine.topology_command, TopologyCommand::Slots);
        assert!(engine.refresh.wanted && !engine.refresh.asked);
        assert_eq!(
            engine.retired.malformed, 0,
            "a refusal is not a malformed map"
        );
        notes = &mut engine.control.protocol_mut().notes;
        notes.topology.push(SLOTS_REPLY.to_vec());
        engine.drive_control(&mut Vec::new());
        assert!(engine.topology_known);
        assert_eq!(engine.shards.len(), 2);
    }

    #[test]
    fn a_publish_redirected_too_often_is_dropped_and_counted() {
        // The protocol keeps the count of a publish it sends again.
        let mut session = open_session();
        let mut publish = redis::Retained::new(b"t", b"p");
        publish.redirects = 3;
        session.resend(publish, &mut Vec::new());
        let moved = format!("-MOVED {} 127.0.0.1:7001\r\n", key_slot(b"app:t"));
        Feed::default()
            .bytes(&mut session, moved.as_bytes())
            .unwrap();
        let redirected = std::mem::take(&mut session.notes.redirected);
        assert_eq!(redirected[0].publish.redirects, 3);
        assert_eq!(redirected[0].publish.payload(), b"p");

        // Two nodes that each say the other owns the slot.
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        let node = |port| ("127.0.0.1".to_string(), port);
        engine.apply_topology(&[SlotRange {
            start: 0,
            end: 16383,
            node: node(7000),
        }]);
        let slot = engine.slot_of(b"t");
        let mut publish = redis::Retained::new(b"t", b"p");
        let mut from = 0;
        for hop in 1..=MAX_REDIRECTS {
            let to = if from == 0 { 7001 } else { 7000 };
            engine.redirect(
                from,
                Redirect {
                    publish,
                    slot,
                    node: node(to),
                },
            );
            from = engine
                .shards
                .iter()
                .position(|s| s.node == node(to))
                .unwrap();
            publish = engine.shards[from].resend.pop_front().expect("sent again");
            assert_eq!(publish.redirects, hop);
        }
        assert_eq!(engine.stats().dropped, 0);
        engine.redirect(
            from,
            Redirect {
                publish,
                slot,
                node: node(7000),
            },
        );
        assert!(engine.shards.iter().all(|shard| shard.resend.is_empty()));
        assert_eq!(engine.stats().dropped, 1);
        let why = engine.take_failure().unwrap().to_string();
        assert!(why.contains("redirected"), "{why}");
    }

    #[test]
    fn a_publishers_turn_sends_redirected_publishes_before_the_queue() {
        // A node of our own that answers the handshake and records what it is sent.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let node = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut socket, _) = listener.accept().unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut greeted = false;
            while let Ok(n @ 1..) = socket.read(&mut chunk) {
                seen.extend_from_slice(&chunk[..n]);
                if !greeted && seen.windows(5).any(|w| w == b"HELLO") {
                    socket.write_all(HELLO_REPLY).unwrap();
                    greeted = true;
                }
            }
            seen
        });
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        engine.apply_topology(&[SlotRange {
            start: 0,
            end: 16383,
            node: ("127.0.0.1".into(), port),
        }]);
        let reactor = Reactor::new().unwrap();
        let registry_queue = Outbound::default();
        let mut received = Vec::new();
        engine.route(b"t", b"queued-first");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !engine.shards[0].stream.as_ref().unwrap().is_open() {
            assert!(Instant::now() < deadline, "the node never answered HELLO");
            let Shard {
                outbound, stream, ..
            } = &mut engine.shards[0];
            stream.as_mut().unwrap().advance(&mut Context {
                reactor: &engine.inner,
                outbound,
                received: &mut received,
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        // A publish that came back MOVED waits to be sent again; a fence lifted since lets
        // the next publish of its topic into the queue. The publisher's turn sends both,
        // the redirected one first.
        engine.queue_resend(0, Retained::new(b"t", b"redirected"));
        assert!(registry_queue.push_publish(b"t", b"published-after"));
        engine.write(&mut Context {
            reactor: &reactor,
            outbound: &registry_queue,
            received: &mut received,
        });
        engine.shut_down(&reactor);
        let seen = node.join().unwrap();
        let at = |payload: &[u8]| {
            seen.windows(payload.len())
                .position(|w| w == payload)
                .unwrap_or_else(|| panic!("{} never sent", String::from_utf8_lossy(payload)))
        };
        assert!(at(b"queued-first") < at(b"redirected"));
        assert!(
            at(b"redirected") < at(b"published-after"),
            "the queue overtook a redirected publish"
        );
    }

    #[test]
    fn publishes_queued_for_shards_that_are_down_are_bounded_together() {
        // Two shards on ports nothing listens on: the outage outlasts the queue.
        let closed = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        let half = |start, end, port| SlotRange {
            start,
            end,
            node: ("127.0.0.1".into(), port),
        };
        engine.apply_topology(&[half(0, 8191, closed()), half(8192, 16383, closed())]);
        let reactor = Reactor::new().unwrap();
        let registry_queue = Outbound::default();
        const MORE: usize = 1000;
        let total = MAX_QUEUED_PUBLISHES + MORE;
        // Queued and taken in rounds, as dispatch would between publishes.
        for round in 0..2 {
            for n in (round * total / 2)..((round + 1) * total / 2) {
                assert!(registry_queue.push_publish(format!("t{n}").as_bytes(), b"x"));
            }
            engine.take(&Context {
                reactor: &reactor,
                outbound: &registry_queue,
                received: &mut Vec::new(),
            });
        }
        let per_shard: Vec<u64> = engine
            .shards
            .iter()
            .map(|shard| shard.outbound.counts().0)
            .collect();
        assert!(per_shard.iter().all(|&queued| queued > 0), "{per_shard:?}");
        let stats = engine.stats();
        assert_eq!(stats.queued, MAX_QUEUED_PUBLISHES as u64);
        assert_eq!(stats.dropped, MORE as u64);
        // Once a connection takes its queue, the room is there again.
        engine.shards[0]
            .outbound
            .take(&mut Vec::new(), Some(&mut Publishes::default()));
        engine.sync_backlog(0);
        engine.route(b"t0", b"x");
        engine.route(b"t1", b"x");
        assert_eq!(engine.stats().dropped, MORE as u64);
        assert_eq!(engine.backlog.publishes, per_shard[1] as usize + 2);
    }

    #[test]
    fn publishes_of_a_moved_slot_wait_for_the_old_owners_moved_answers() {
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        let node = |port| ("127.0.0.1".to_string(), port);
        let range = |start, end, port| SlotRange {
            start,
            end,
            node: node(port),
        };
        engine.apply_topology(&[range(0, 8191, 7000), range(8192, 16383, 7001)]);
        let topic = (0..)
            .map(|n| format!("t{n}").into_bytes())
            .find(|topic| (1..8191).contains(&engine.slot_of(topic)))
            .unwrap();
        let slot = engine.slot_of(&topic);
        engine.route(&topic, b"1");
        engine.route(&topic, b"2");
        // A refresh gives the slot to the other node before the first owner answered.
        engine.apply_topology(&[
            range(0, slot - 1, 7000),
            range(slot, slot, 7001),
            range(slot + 1, 8191, 7000),
            range(8192, 16383, 7001),
        ]);
        let (old, new) = (0, 1);
        assert_eq!(engine.shards[new].node, node(7001));
        engine.route(&topic, b"3");
        assert_eq!(engine.shards[new].outbound.counts(), (0, 0), "held");
        assert_eq!(engine.stats().queued, 3);
        // The old owner sends both back; only then does the third go, behind them.
        for payload in [b"1", b"2"] {
            engine.release_fences();
            assert_eq!(engine.shards[new].outbound.counts(), (0, 0), "held");
            engine.redirect(
                old,
                Redirect {
                    publish: redis::Retained::new(&topic, payload),
                    slot,
                    node: node(7001),
                },
            );
        }
        engine.release_fences();
        assert!(engine.fences.is_empty());
        let resent: Vec<&[u8]> = engine.shards[new]
            .resend
            .iter()
            .map(Retained::payload)
            .collect();
        assert_eq!(resent, [b"1", b"2"], "sent first");
        assert_eq!(engine.shards[new].outbound.counts(), (1, 0));
        assert_eq!(engine.stats().queued, 5, "two still queued at the old node");
        // With nothing of the old owner's outstanding, a move holds nothing.
        engine.retire(old);
        engine.apply_topology(&[range(0, 16383, 7001)]);
        engine.route(&topic, b"4");
        assert!(engine.fences.is_empty());
    }

    #[test]
    fn publishes_still_queued_redirected_or_fenced_at_shut_down_are_counted_dropped() {
        let mut engine = ClusterEngine::new(url(), "app:").unwrap();
        let node = |port| ("127.0.0.1".to_string(), port);
        let range = |start, end, port| SlotRange {
            start,
            end,
            node: node(port),
        };
        engine.apply_topology(&[range(0, 8191, 7000), range(8192, 16383, 7001)]);
        let topic = (0..)
            .map(|n| format!("t{n}").into_bytes())
            .find(|topic| (1..8191).contains(&engine.slot_of(topic)))
            .unwrap();
        let slot = engine.slot_of(&topic);
        // Two queued for the first owner (never connected), then the slot moves: a third
        // is fenced, and the old owner sends the first back to the new one.
        engine.route(&topic, b"1");
        engine.route(&topic, b"2");
        engine.apply_topology(&[
            range(0, slot - 1, 7000),
            range(slot, slot, 7001),
            range(slot + 1, 8191, 7000),
            range(8192, 16383, 7001),
        ]);
        engine.route(&topic, b"3");
        engine.redirect(
            0,
            Redirect {
                publish: redis::Retained::new(&topic, b"1"),
                slot,
                node: node(7001),
            },
        );
        assert_eq!(engine.fences.len(), 1);
        assert_eq!(engine.shards[1].resend.len(), 1);
        let before = engine.stats();
        assert_eq!((before.queued, before.dropped), (4, 0));

        // As `broker_disable` does: drain, then shut down; no connection is open to take them.
        let reactor = Reactor::new().unwrap();
        let registry_queue = Outbound::default();
        engine.drain(&mut Context {
            reactor: &reactor,
            outbound: &registry_queue,
            received: &mut Vec::new(),
        });
        engine.shut_down(&reactor);
        let after = engine.stats();
        assert_eq!((after.queued, after.dropped), (0, 4));
        assert_eq!(engine.backlog, Backlog::default());
    }

    /// Three primaries that speak TLS only: two registries with `rediss+cluster://` each
    /// receive the other's publish on topics of every shard once, and their own once (the
    /// local delivery; the echo is filtered). Fails when redis-server is missing.
    #[cfg(feature = "tls")]
    #[test]
    fn real_tls_cluster_delivers_between_two_registries_once_each() {
        use std::io::Read;
        use std::os::fd::AsRawFd;

        let cluster = LocalCluster::start_with(0, true);
        let certificate = cluster.certificate.as_ref().unwrap();
        let url = format!(
            "rediss+cluster://127.0.0.1:{}?ca={}",
            cluster.ports[0],
            certificate.display()
        );
        let prefix = format!("fdcast-tls-test-{}:", std::process::id());
        let mut topics: Vec<Vec<u8>> = Vec::new();
        let mut owners = std::collections::HashSet::new();
        for n in 0.. {
            let topic = format!("topic-{n}").into_bytes();
            let slot = key_slot(&[prefix.as_bytes(), &topic].concat());
            if owners.insert(cluster.owner(slot)) {
                topics.push(topic);
            }
            if owners.len() == 3 {
                break;
            }
        }
        let registries = [
            crate::Registry::new().unwrap(),
            crate::Registry::new().unwrap(),
        ];
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for registry in &registries {
            for topic in &topics {
                let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
                reader.set_nonblocking(true).unwrap();
                registry
                    .subscribe(topic, writer.as_raw_fd(), crate::Mode::Raw)
                    .unwrap();
                readers.push((reader, Vec::new()));
                writers.push(writer);
            }
            registry.broker_enable(&url, &prefix).unwrap();
            assert_eq!(registry.broker_stats().connected, 1);
            assert_eq!(registry.broker_stats().topics, topics.len() as u64);
        }
        for (index, registry) in registries.iter().enumerate() {
            for topic in &topics {
                registry
                    .publish(topic, format!("from-{index}").as_bytes())
                    .unwrap();
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut quiet_polls = 0;
        while quiet_polls < 20 {
            assert!(std::time::Instant::now() < deadline, "timed out");
            for registry in &registries {
                registry
                    .broker_poll_once(Some(Duration::from_millis(10)))
                    .unwrap();
            }
            for (reader, seen) in &mut readers {
                let mut chunk = [0u8; 64];
                while let Ok(n @ 1..) = reader.read(&mut chunk) {
                    seen.extend_from_slice(&chunk[..n]);
                }
            }
            // Once everything arrived, a while longer: a duplicate would show.
            if readers.iter().all(|(_, seen)| seen.len() >= 12) {
                quiet_polls += 1;
            }
        }
        for (_, seen) in &readers {
            assert!(
                seen == b"from-0from-1" || seen == b"from-1from-0",
                "{}",
                String::from_utf8_lossy(seen)
            );
        }
        for registry in &registries {
            let stats = registry.broker_stats();
            let each = topics.len() as u64;
            assert_eq!((stats.published, stats.received), (each, each));
            assert_eq!(
                (stats.ignored, stats.dropped, stats.malformed),
                (each, 0, 0)
            );
            registry.broker_disable();
        }
        drop(cluster);
    }

    /// Six `redis-server` processes in cluster mode (three primaries, a replica each), in a
    /// temporary directory; killed when dropped.
    struct LocalCluster {
        dir: std::path::PathBuf,
        servers: Vec<std::process::Child>,
        ports: Vec<u16>,
        /// With TLS: the certificate every node serves, trusts and presents to the others.
        certificate: Option<std::path::PathBuf>,
    }

    impl Drop for LocalCluster {
        fn drop(&mut self) {
            for server in &mut self.servers {
                let _ = server.kill();
                let _ = server.wait();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A port free now whose cluster bus port (+10000) is free too.
    fn free_port() -> u16 {
        loop {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                return port;
            }
        }
    }

    fn cli(port: u16, args: &[&str]) -> String {
        cli_with(port, &[], args)
    }

    /// `redis-cli` with `options` (TLS) before the command.
    fn cli_with(port: u16, options: &[String], args: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .args(options)
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output()
            .expect("redis-cli is required");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A self-signed certificate for 127.0.0.1 and its key, as `cert.pem` and `key.pem` in
    /// `dir`; returns the certificate's path.
    #[cfg(feature = "tls")]
    fn self_signed_certificate(dir: &std::path::Path) -> std::path::PathBuf {
        use openssl::asn1::Asn1Time;
        use openssl::bn::BigNum;
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::pkey::PKey;
        use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
        use openssl::x509::{X509, X509NameBuilder};

        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "fdcast cluster test")
            .unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        let serial = BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap();
        builder.set_serial_number(&serial).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        let constraints = BasicConstraints::new().critical().ca().build().unwrap();
        builder.append_extension(constraints).unwrap();
        let addresses = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .build(&builder.x509v3_context(None, None))
            .unwrap();
        builder.append_extension(addresses).unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let certificate = dir.join("cert.pem");
        std::fs::write(&certificate, builder.build().to_pem().unwrap()).unwrap();
        let private_key = key.private_key_to_pem_pkcs8().unwrap();
        std::fs::write(dir.join("key.pem"), private_key).unwrap();
        certificate
    }

    impl LocalCluster {
        /// Three primaries with a replica each, plain TCP.
        fn start() -> LocalCluster {
            LocalCluster::start_with(1, false)
        }

        /// Three primaries with `replicas` replicas each; with `tls`, every node speaks TLS
        /// only (clients and cluster bus), with a certificate made for the occasion.
        fn start_with(replicas: usize, tls: bool) -> LocalCluster {
            let dir = std::env::temp_dir().join(format!(
                "fdcast-cluster-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut cluster = LocalCluster {
                dir,
                servers: Vec::new(),
                ports: Vec::new(),
                certificate: None,
            };
            #[cfg(feature = "tls")]
            if tls {
                cluster.certificate = Some(self_signed_certificate(&cluster.dir));
            }
            assert_eq!(
                tls,
                cluster.certificate.is_some(),
                "TLS needs the tls feature"
            );
            for _ in 0..3 * (1 + replicas) {
                let port = free_port();
                let mut server = std::process::Command::new("redis-server");
                match &cluster.certificate {
                    None => server.args(["--port", &port.to_string()]),
                    Some(certificate) => server
                        .args(["--port", "0", "--tls-port", &port.to_string()])
                        .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                        .arg("--tls-cert-file")
                        .arg(certificate)
                        .arg("--tls-ca-cert-file")
                        .arg(certificate)
                        .arg("--tls-key-file")
                        .arg(cluster.dir.join("key.pem")),
                };
                let server = server
                    .args(["--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                    .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                    .args(["--save", "", "--appendonly", "no", "--dir"])
                    .arg(&cluster.dir)
                    // Failures detected in a second, for the failover below.
                    .args(["--cluster-node-timeout", "1000"])
                    .args(["--logfile"])
                    .arg(cluster.dir.join(format!("{port}.log")))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("redis-server (Redis 7) is required for the cluster test");
                cluster.servers.push(server);
                cluster.ports.push(port);
            }
            for &port in &cluster.ports {
                wait_until("redis-server answers PING", 10, || {
                    cluster.cli(port, &["PING"]) == "PONG"
                });
            }
            let nodes: Vec<String> = cluster
                .ports
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect();
            let created = std::process::Command::new("redis-cli")
                .args(cluster.cli_options())
                .args(["--cluster", "create"])
                .args(&nodes)
                .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
                .output()
                .expect("redis-cli is required");
            assert!(
                created.status.success(),
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&created.stdout)
            );
            for &port in &cluster.ports {
                wait_until("cluster_state:ok", 30, || {
                    cluster
                        .cli(port, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                });
                wait_until("every replica linked to its primary", 30, || {
                    let replication = cluster.cli(port, &["INFO", "replication"]);
                    replication.contains("role:master")
                        || replication.contains("master_link_status:up")
                });
            }
            cluster
        }

        /// What `redis-cli` needs to reach the nodes.
        fn cli_options(&self) -> Vec<String> {
            match &self.certificate {
                None => Vec::new(),
                Some(certificate) => vec![
                    "--tls".into(),
                    "--cacert".into(),
                    certificate.display().to_string(),
                ],
            }
        }

        fn cli(&self, port: u16, args: &[&str]) -> String {
            cli_with(port, &self.cli_options(), args)
        }

        fn is_primary(&self, port: u16) -> bool {
            self.cli(port, &["ROLE"]).lines().next() == Some("master")
        }

        fn kill(&mut self, port: u16) {
            let index = self.ports.iter().position(|&p| p == port).unwrap();
            let _ = self.servers[index].kill();
            let _ = self.servers[index].wait();
        }

        /// The port of the node owning `slot`, as that node's own map says.
        /// The port of the primary owning `slot`, as the node at `asked` maps it.
        fn owner_for(&self, asked: u16, slot: u16) -> u16 {
            let reply = self.cli(asked, &["CLUSTER", "SLOTS"]);
            // redis-cli prints one value per line: start, end, host, port, id, ...
            let lines: Vec<&str> = reply.lines().map(str::trim).collect();
            for window in lines.windows(4) {
                if let (Ok(start), Ok(end), Ok(port)) = (
                    window[0].parse::<u16>(),
                    window[1].parse::<u16>(),
                    window[3].parse::<u16>(),
                ) {
                    if start <= slot && slot <= end && self.ports.contains(&port) {
                        return port;
                    }
                }
            }
            panic!("no owner of slot {slot} in {reply}");
        }

        fn owner(&self, slot: u16) -> u16 {
            self.owner_for(self.ports[0], slot)
        }
    }

    struct Side {
        broker: crate::broker::Broker,
        reactor: Reactor,
        received: Vec<(Vec<u8>, Vec<u8>)>,
    }

    impl Side {
        fn connect(url: &str, prefix: &str) -> Side {
            let reactor = Reactor::new().unwrap();
            let (broker, _) = crate::broker::Broker::connect(
                crate::broker::Scheme::RedisCluster,
                url,
                prefix,
                &reactor,
                &Default::default(),
            )
            .unwrap();
            Side {
                broker,
                reactor,
                received: Vec::new(),
            }
        }

        fn pump(&mut self) {
            let mut received = Vec::new();
            self.broker.service(&self.reactor, &mut received);
            self.received.extend(
                received
                    .iter()
                    .map(|m| (m.topic().to_vec(), m.payload().to_vec())),
            );
        }

        fn subscribe(&mut self, topics: &[Vec<u8>]) {
            for topic in topics {
                self.broker.interest(topic, true);
            }
            self.broker.kick(&self.reactor);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut received = Vec::new();
            self.broker
                .settle(&self.reactor, deadline, &mut received)
                .unwrap();
            assert!(received.is_empty());
        }

        fn publish(&self, topic: &[u8], payload: &[u8]) {
            let handoff = self.broker.handoff();
            handoff.check(topic, payload).unwrap();
            if handoff.push_publish(topic, payload) {
                self.broker.kick(&self.reactor);
            }
        }

        fn of(&self, topic: &[u8]) -> Vec<Vec<u8>> {
            self.received
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, payload)| payload.clone())
                .collect()
        }
    }

    fn pump_until(sides: &mut [&mut Side], what: &str, mut done: impl FnMut(&[&mut Side]) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !done(sides) {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            for side in sides.iter_mut() {
                side.pump();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A registry that only publishes has no connection to a primary until its first
    /// publish to that primary's slot: a host's plain dispatch loop must open it and send the
    /// publishes (a publisher once woke dispatch without having it service the engine, and
    /// its publishes waited forever). Fails when redis-server is missing.
    #[test]
    fn a_publish_only_registry_reaches_the_shard_through_dispatch() {
        let cluster = LocalCluster::start_with(0, false);
        let url = format!("redis+cluster://127.0.0.1:{}", cluster.ports[0]);
        let prefix = format!("fdcast-test-{}-publisher:", std::process::id());
        let mut subscriber = Side::connect(&url, &prefix);
        subscriber.subscribe(&[b"news".to_vec()]);
        let publisher = crate::Registry::new().unwrap();
        publisher.broker_enable(&url, &prefix).unwrap();
        let sent: Vec<Vec<u8>> = (0..10).map(|n| format!("m{n}").into_bytes()).collect();
        for payload in &sent {
            publisher.publish(b"news", payload).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while subscriber.of(b"news").len() < sent.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "publishes never reached the shard: {:?}",
                publisher.broker_stats()
            );
            publisher.dispatch(Some(Duration::from_millis(10))).unwrap();
            subscriber.pump();
        }
        assert_eq!(subscriber.of(b"news"), sent);
    }

    /// A real Redis 7 cluster (three primaries, a replica each): topics on every shard
    /// delivered across two brokers in order, without duplicates, our own echo filtered;
    /// then a slot moves to another node and delivery continues (the subscriber re-subscribes
    /// on the new owner, the publisher follows MOVED); then that node's clients are killed
    /// (reconnect, re-subscribe); then the node itself (its replica is promoted, both
    /// brokers move there). One function: the cluster costs seconds to set up. Fails when
    /// redis-server is missing.
    #[test]
    fn real_cluster_delivers_across_shards_and_follows_a_slot_move() {
        let mut cluster = LocalCluster::start();
        let url = format!(
            "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
            cluster.ports[0], cluster.ports[1]
        );
        let prefix = format!("fdcast-test-{}:", std::process::id());
        let channel = |topic: &[u8]| [prefix.as_bytes(), topic].concat();

        // Topics until every node owns at least one; our slot agrees with the server's.
        let mut topics: Vec<Vec<u8>> = Vec::new();
        let mut owners = std::collections::HashSet::new();
        for n in 0.. {
            let topic = format!("topic-{n}").into_bytes();
            let slot = key_slot(&channel(&topic));
            let channel_text = String::from_utf8(channel(&topic)).unwrap();
            assert_eq!(
                cli(cluster.ports[0], &["CLUSTER", "KEYSLOT", &channel_text]),
                slot.to_string()
            );
            if owners.insert(cluster.owner(slot)) || topics.len() < 4 {
                topics.push(topic);
            }
            if owners.len() == 3 && topics.len() >= 4 {
                break;
            }
        }
        // Two topics in one slot by a hash tag: both move together below.
        let tagged = [b"{moving}a".to_vec(), b"{moving}b".to_vec()];
        let mut all = topics.clone();
        all.extend(tagged.iter().cloned());

        let mut a = Side::connect(&url, &prefix);
        let mut b = Side::connect(&url, &prefix);
        a.subscribe(&all[..all.len() - 1]); // A: not `{moving}b`
        b.subscribe(&all);
        assert_eq!(b.broker.stats().topics, all.len() as u64);
        assert_eq!(a.broker.stats().topics, all.len() as u64 - 1);
        assert_eq!(b.broker.stats().connected, 1);

        const EACH: usize = 40;
        for i in 0..EACH {
            for topic in &topics {
                a.publish(topic, format!("a{i}").as_bytes());
            }
        }
        for topic in &topics {
            b.publish(topic, b"from-b");
        }
        let expected: Vec<Vec<u8>> = (0..EACH).map(|i| format!("a{i}").into_bytes()).collect();
        let count = topics.len() * EACH;
        pump_until(&mut [&mut a, &mut b], "delivery across shards", |sides| {
            sides[1].received.len() >= count
                && sides[0].received.len() >= topics.len()
                && sides[0].broker.stats().ignored >= count as u64
                && sides[1].broker.stats().ignored >= topics.len() as u64
        });
        // Nothing more is coming: whatever was in flight has been looked at.
        for _ in 0..50 {
            a.pump();
            b.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
        for topic in &topics {
            assert_eq!(b.of(topic), expected, "in order, once each");
            assert_eq!(a.of(topic), vec![b"from-b".to_vec()], "our echo filtered");
        }
        assert_eq!(b.received.len(), count);
        let stats = a.broker.stats();
        assert_eq!(
            (stats.published, stats.ignored),
            (count as u64, count as u64)
        );
        assert_eq!((stats.dropped, stats.malformed, stats.queued), (0, 0, 0));

        // A registry driven by its own dispatch: the engine's epoll fd wakes the reactor.
        {
            use std::io::Read;
            use std::os::fd::AsRawFd;
            let registry = crate::Registry::new().unwrap();
            let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
            reader.set_nonblocking(true).unwrap();
            registry
                .subscribe(&topics[0], writer.as_raw_fd(), crate::Mode::Raw)
                .unwrap();
            registry.broker_enable(&url, &prefix).unwrap();
            assert_eq!(registry.broker_stats().connected, 1);
            a.publish(&topics[0], b"to-registry");
            registry.publish(&topics[1], b"from-registry").unwrap();
            let mut seen = Vec::new();
            pump_until(&mut [&mut a], "dispatch delivers", |sides| {
                registry.dispatch(Some(Duration::from_millis(20))).unwrap();
                let mut chunk = [0u8; 256];
                if let Ok(n) = (&reader).read(&mut chunk) {
                    seen.extend_from_slice(&chunk[..n]);
                }
                seen.windows(11).any(|w| w == b"to-registry")
                    && sides[0].of(&topics[1]).last().map(Vec::as_slice) == Some(b"from-registry")
            });
            registry.broker_disable();
            let _ = reader.read(&mut [0u8; 16]);
        }
        b.pump();

        // Move the tagged slot to another node, the way `redis-cli --cluster reshard` does
        // for a slot without keys.
        let slot = key_slot(&channel(&tagged[0]));
        let source = cluster.owner(slot);
        let target = *cluster
            .ports
            .iter()
            .find(|&&p| p != source && cluster.is_primary(p))
            .unwrap();
        let id = |port| cli(port, &["CLUSTER", "MYID"]);
        let (source_id, target_id) = (id(source), id(target));
        let slot_text = slot.to_string();
        assert_eq!(
            cli(
                target,
                &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id]
            ),
            "OK"
        );
        assert_eq!(
            cli(
                source,
                &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id]
            ),
            "OK"
        );
        for port in [target, source] {
            assert_eq!(
                cli(
                    port,
                    &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id]
                ),
                "OK"
            );
        }
        // B follows the source's sunsubscribe pushes to the new owner.
        let on_target = |topic: &[u8]| {
            let channel_text = String::from_utf8(channel(topic)).unwrap();
            cli(target, &["PUBSUB", "SHARDNUMSUB", &channel_text])
                .lines()
                .last()
                .unwrap_or_default()
                .to_string()
        };
        pump_until(&mut [&mut b], "B re-subscribed on the new owner", |_| {
            on_target(&tagged[1]) == "1" && on_target(&tagged[0]) != "0"
        });
        // A has not looked at its connections since the move: its map is stale, so these
        // go to the old owner, come back MOVED and are sent to the new one. More than
        // HOLD_AFTER go before A reads its connections, then A reads between publishes:
        // later ones, made once MOVED pointed the slot at the new owner while some were
        // still on their way to the old one, wait for those to come back rather than
        // overtake them.
        for i in 0..EACH {
            for topic in &tagged {
                a.publish(topic, format!("a{i}").as_bytes());
            }
            if i >= EACH - 5 {
                a.pump();
            }
        }
        pump_until(&mut [&mut a, &mut b], "delivery after the move", |sides| {
            tagged.iter().all(|topic| sides[1].of(topic).len() >= EACH)
        });
        // Both follow the move for good: a second round, after A has read the new map.
        pump_until(
            &mut [&mut a, &mut b],
            "both settled after the move",
            |sides| sides.iter().all(|side| side.broker.stats().connected == 1),
        );
        for i in EACH..2 * EACH {
            for topic in &tagged {
                a.publish(topic, format!("a{i}").as_bytes());
            }
        }
        pump_until(
            &mut [&mut a, &mut b],
            "delivery after the map refresh",
            |sides| {
                tagged
                    .iter()
                    .all(|topic| sides[1].of(topic).len() >= 2 * EACH)
            },
        );
        for _ in 0..50 {
            a.pump();
            b.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
        let expected: Vec<Vec<u8>> = (0..2 * EACH)
            .map(|i| format!("a{i}").into_bytes())
            .collect();
        for topic in &tagged {
            assert_eq!(
                b.of(topic),
                expected,
                "in order, once each, across the move"
            );
        }
        assert!(
            a.of(&tagged[0]).is_empty(),
            "our echo filtered after the move"
        );
        assert_eq!(a.broker.stats().dropped, 0);
        assert_eq!(b.broker.stats().topics, all.len() as u64);

        // Every client of the new owner is disconnected: both brokers reconnect to it and
        // subscribe again, and delivery goes on.
        let reconnects = |side: &Side| side.broker.stats().reconnects;
        let before = (reconnects(&a), reconnects(&b));
        cli(target, &["CLIENT", "KILL", "TYPE", "pubsub"]);
        cli(
            target,
            &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
        );
        pump_until(
            &mut [&mut a, &mut b],
            "reconnected and subscribed again",
            |sides| {
                reconnects(sides[0]) > before.0
                    && reconnects(sides[1]) > before.1
                    && sides.iter().all(|side| side.broker.stats().connected == 1)
            },
        );
        assert_eq!(b.broker.stats().topics, all.len() as u64);
        for topic in &tagged {
            a.publish(topic, b"after-reconnect");
        }
        pump_until(
            &mut [&mut a, &mut b],
            "delivery after the reconnect",
            |sides| {
                tagged
                    .iter()
                    .all(|topic| sides[1].of(topic).len() > 2 * EACH)
            },
        );
        for topic in &tagged {
            assert_eq!(b.of(topic).last().unwrap(), b"after-reconnect");
        }

        // The slot's owner dies and its replica takes over: both brokers find the new
        // primary in the map, subscribe there, and deliver again.
        let survivor = *cluster
            .ports
            .iter()
            .find(|&&p| p != target && cluster.is_primary(p))
            .unwrap();
        cluster.kill(target);
        let promoted = || {
            let owner = cluster.owner_for(survivor, slot);
            (owner != target).then_some(owner)
        };
        pump_until(
            &mut [&mut a, &mut b],
            "a replica took the slot over",
            |_| promoted().is_some(),
        );
        let promoted = promoted().unwrap();
        let subscribers = |topic: &[u8]| {
            let channel_text = String::from_utf8(channel(topic)).unwrap();
            cli(promoted, &["PUBSUB", "SHARDNUMSUB", &channel_text])
                .lines()
                .last()
                .unwrap_or_default()
                .to_string()
        };
        pump_until(
            &mut [&mut a, &mut b],
            "subscribed on the promoted replica",
            |sides| {
                subscribers(&tagged[1]) == "1"
                    && subscribers(&tagged[0]) == "2"
                    && sides.iter().all(|side| side.broker.stats().connected == 1)
            },
        );
        assert_eq!(b.broker.stats().topics, all.len() as u64);
        for topic in &tagged {
            a.publish(topic, b"after-failover");
        }
        pump_until(
            &mut [&mut a, &mut b],
            "delivery after the failover",
            |sides| {
                tagged.iter().all(|topic| {
                    sides[1].of(topic).last().map(Vec::as_slice) == Some(b"after-failover")
                })
            },
        );
        for topic in &tagged {
            assert_eq!(b.of(topic).len(), 2 * EACH + 2, "nothing duplicated");
        }
        assert!(
            a.of(&tagged[0]).is_empty(),
            "our echo filtered after the failover"
        );
        a.broker.shut_down(&a.reactor);
        b.broker.shut_down(&b.reactor);
        drop(cluster);
    }
}
