//! History shared across processes through Redis streams: the session's side.
//!
//! With history on when the broker connects (or switched on since: the session starts anew),
//! a topic's history is the stream at key `<prefix><topic>` (the topic's channel name, in the
//! key space), each entry one message with its payload in the field `d`. Redis gives the ids.
//!
//! - A publish runs the publish script (`EVALSHA`, loaded by `SCRIPT LOAD` in the handshake):
//!   `XADD <key> MAXLEN ~ <max_messages> * d <payload> o <origin> <n> <except>` (with no
//!   count limit, `MINID ~ <now - max_age>`; with neither, `MAXLEN ~ 1000`), `PUBLISH` of the
//!   raw payload on the topic's channel (plain subscribers see what they always saw), and
//!   `SPUBLISH` of `<id> <payload>` on the topic's *id channel*: the same name, in the shard
//!   channel space (no classic channel can meet it). The reply is the id: the publisher
//!   delivers its own message then, in the server's order among the others' pushes.
//! - The field `o` names this engine's origin (random), the publish's number and the fd it
//!   skips (`-`: none), as NATS's origin header does. A fill after a lost connection fetches
//!   the publishes whose reply the connection took with it, if Redis ran them: the origin
//!   tells them from the others' (an entry without `o` is another's), so their except fd is
//!   honoured and each is counted once: published when the fill finds it, dropped when the
//!   fill of its topic does not, or when no fill can tell (its topic is not subscribed).
//! - A `NOSCRIPT` (the script cache was flushed) holds the publishes: the publish script is
//!   loaded again (`SCRIPT LOAD`), every publish written before that load and refused is kept
//!   in order, new ones wait in the broker's queue, and once the load is answered (so every
//!   command before it is) the refused ones go out again in their order, then the new ones:
//!   one publisher's order holds. (Another client's load landing between two of our
//!   pipelined publishes can still run the later one first: nothing can undo that.)
//! - The session subscribes to a topic's id channel (`SSUBSCRIBE`), not the raw one, and
//!   right after asks the fetch script for the stream's newest entries (after the last id
//!   it delivered, when it subscribes again after a lost connection): what arrives for the
//!   topic in between is held until the answer, so the registry's mirror gets the fill, then
//!   the messages after it, each once.
//! - A fill after a reconnect counts what it missed: the stream's `entries-added` now,
//!   against the count the session kept (the fill's, one more per message since), less
//!   the entries fetched, is how many were trimmed meanwhile or lay past the fetch's count:
//!   `Stream::Lost`, a gap for the topic's readers. Exact while every writer of the stream
//!   announces its entries on the id channel (the publish script, or a plain client as the
//!   README shows); an entry added or deleted otherwise counts as missed.
//! - Our own message comes back on the id channel next to the script's reply (before it up
//!   to Redis 7.0, after it since 7.2): it carries the reply's id, which no other message
//!   can, so it is told apart exactly and dropped.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::BuildHasher;
use std::io::Write;
use std::os::fd::RawFd;

use redis_protocol::resp3::types::RangeFrame;

use super::{Expected, Fingerprint, RedisProtocol, Retained, bytes, write_command};
use crate::broker::stream::Sink;
use crate::broker::{Received, Stream, split_shared_record, topic};
use crate::history::EventId;

/// `KEYS[1]`: the stream key, which is also the channel's name. `ARGV`: payload, max
/// messages (0: none), max age in ms (0: none), origin (`<origin> <n> <except fd or ->`).
pub(crate) const PUBLISH_SCRIPT: &str = "\
local id
local n = tonumber(ARGV[2])
local age = tonumber(ARGV[3])
if n > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'd', ARGV[1], 'o', ARGV[4])
elseif age > 0 then
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age
  if floor < 0 then floor = 0 end
  id = redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%.0f', floor), '*',
    'd', ARGV[1], 'o', ARGV[4])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', '1000', '*', 'd', ARGV[1], 'o', ARGV[4])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
redis.call('SPUBLISH', KEYS[1], id .. ' ' .. ARGV[1])
return id
";

/// `KEYS[1]`: the stream key. `ARGV`: the id after which to fetch ('' for the newest), how
/// many entries at most. Returns the stream's max deleted id, its first entry's id ('' when
/// empty), its last generated id, how many entries it dropped (trimmed or deleted), how
/// many it was ever given, then per entry, oldest first: its id, payload and origin (`''`:
/// none, a plain client's).
pub(crate) const FETCH_SCRIPT: &str = "\
local e
if ARGV[1] == '' then
  e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])
else
  e = redis.call('XREVRANGE', KEYS[1], '+', '(' .. ARGV[1], 'COUNT', ARGV[2])
end
local deleted, first, last, gone, total = '0-0', '', '0-0', '0', '0'
if redis.call('TYPE', KEYS[1]).ok == 'stream' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local length, added = 0, 0
  for i = 1, #info, 2 do
    local k, v = info[i], info[i + 1]
    if k == 'max-deleted-entry-id' then deleted = v
    elseif k == 'last-generated-id' then last = v
    elseif k == 'length' then length = v
    elseif k == 'entries-added' then added = v
    elseif k == 'first-entry' then if v then first = v[1] end end
  end
  gone = tostring(added - length)
  total = tostring(added)
end
local out = {deleted, first, last, gone, total}
for i = #e, 1, -1 do
  local d, o = '', ''
  local f = e[i][2]
  for j = 1, #f, 2 do
    if f[j] == 'd' then d = f[j + 1] elseif f[j] == 'o' then o = f[j + 1] end
  end
  out[#out + 1] = e[i][1]
  out[#out + 1] = d
  out[#out + 1] = o
end
return out
";

const SCRIPTS: [&str; 2] = [PUBLISH_SCRIPT, FETCH_SCRIPT];
const PUBLISH: usize = 0;
const FETCH: usize = 1;

/// Entries a fill keeps when history has no count limit.
pub(crate) const FETCH_CAP: usize = 1000;

/// A shared publish waiting for its script's reply (or, refused by `NOSCRIPT`, for the
/// script to be loaded again).
pub(super) struct Eval {
    /// Of its raw `PUBLISH`, for a session that subscribes raw channels (history switched
    /// off meanwhile): the plain echo filter's.
    pub(super) fingerprint: Fingerprint,
    pub(super) publish: Retained,
    pub(super) except: Option<RawFd>,
    /// Its number, in its entry's origin.
    seq: u64,
    /// `NOSCRIPT`s it got: after two (the cache flushed again right after our load), it
    /// goes whole, as `EVAL`, which cannot get one.
    refused: u8,
}

/// A fill waiting for its script's reply.
pub(super) struct Fetch {
    topic: Box<[u8]>,
    after: Option<EventId>,
    count: usize,
    whole: bool,
}

/// The session's shared-history state.
pub(super) struct State {
    /// This connection subscribes id channels and publishes through the script (history was
    /// on when it started).
    pub(super) on: bool,
    /// The scripts' SHA-1s, as `SCRIPT LOAD` answered.
    shas: [Option<Box<[u8]>>; 2],
    /// Per topic subscribed and filled: what was delivered. Kept across reconnects, so that
    /// the next fill fetches what was missed, and counts what it can no longer fetch.
    last: HashMap<Box<[u8]>, Followed>,
    /// Per topic whose fill is awaited: how many fills, and what arrived meanwhile.
    fetching: HashMap<Box<[u8]>, (usize, Vec<Received>)>,
    /// The id (and topic hash) of our publish whose reply was the last frame, while its echo
    /// may be the next.
    pub(super) echo_after: Option<(EventId, u64)>,
    /// This engine's origin, in every entry it adds: kept across reconnects, so that a fill
    /// after one knows this engine's entries.
    origin: Box<[u8]>,
    /// Scratch for a publish's origin argument.
    origin_arg: Vec<u8>,
    /// Shared publishes numbered so far.
    seq: u64,
    /// Per topic: the numbers of publishes written on a connection that broke before their
    /// reply. Redis may have run them: the topic's next fill tells.
    lost: HashMap<Box<[u8]>, Vec<u64>>,
    /// Publishes found lost where no sink was at hand, for `report` to count as dropped.
    pub(super) settled_dropped: u64,
    /// After a `NOSCRIPT`, until the `SCRIPT LOAD` sent then is answered: the publishes
    /// refused (and any taken meanwhile), in their order.
    reload: Option<Vec<Eval>>,
}

impl State {
    pub(super) fn new() -> State {
        State {
            on: false,
            shas: [None, None],
            last: HashMap::new(),
            fetching: HashMap::new(),
            echo_after: None,
            origin: format!("{:016x}", crate::history::random_epoch())
                .into_bytes()
                .into(),
            origin_arg: Vec::new(),
            seq: 0,
            lost: HashMap::new(),
            settled_dropped: 0,
            reload: None,
        }
    }

    /// Whether publishes wait for the publish script to be loaded again.
    pub(super) fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// `(n, except)` of an entry's origin, if it names this engine.
    fn ours(&self, origin: &[u8]) -> Option<(u64, Option<RawFd>)> {
        let mut words = origin.split(|&byte| byte == b' ');
        if words.next()? != &*self.origin {
            return None;
        }
        let seq = std::str::from_utf8(words.next()?).ok()?.parse().ok()?;
        let except = match words.next()? {
            b"-" => None,
            fd => Some(std::str::from_utf8(fd).ok()?.parse().ok()?),
        };
        Some((seq, except))
    }

    /// Whether `seq` was lost on `topic`; forgets it.
    fn found_lost(&mut self, topic: &[u8], seq: u64) -> bool {
        let Some(seqs) = self.lost.get_mut(topic) else {
            return false;
        };
        let Some(at) = seqs.iter().position(|&lost| lost == seq) else {
            return false;
        };
        seqs.swap_remove(at);
        true
    }
}

/// What a topic's id channel delivered.
#[derive(Clone, Copy)]
struct Followed {
    /// The newest id.
    id: EventId,
    /// How many entries the stream had been given through this id (`entries-added`): the
    /// fill's count, one more per newer message since, each the publish script's XADD. A
    /// fetch after a reconnect finds how many were added since, and so how many of those
    /// it can no longer get (trimmed meanwhile, or past its count).
    added: u64,
}

impl RedisProtocol {
    /// The shared-history part of the handshake: loads the scripts.
    pub(super) fn start_shared(&mut self, out: &mut Vec<u8>) {
        let on = self.history.as_ref().is_some_and(|history| history.is_on());
        if on != self.shared.on {
            // Switched: nothing of the other way's mirrors holds, and no fill will tell
            // whether the publishes lost ran.
            self.shared.last.clear();
            let lost: usize = self.shared.lost.drain().map(|(_, seqs)| seqs.len()).sum();
            self.shared.settled_dropped += lost as u64;
        }
        self.shared.on = on;
        self.shared.fetching.clear();
        self.shared.echo_after = None;
        self.shared.shas = [None, None];
        self.shared.reload = None;
        if !on {
            return;
        }
        for (which, script) in SCRIPTS.iter().enumerate() {
            write_command(out, &[b"SCRIPT", b"LOAD", script.as_bytes()]);
            self.expected.push_back(Expected::ScriptLoad(which));
            self.handshake += 1;
        }
    }

    /// `SCRIPT LOAD`'s answer.
    pub(super) fn script_loaded(&mut self, which: usize, sha: &[u8]) {
        self.shared.shas[which] = Some(Box::from(sha));
    }

    /// Runs a script by its SHA-1 (or whole, when `whole` or not loaded); returns whether it
    /// went whole.
    fn run_script(
        &self,
        which: usize,
        key: &[u8],
        args: &[&[u8]],
        whole: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let mut command: Vec<&[u8]> = Vec::with_capacity(4 + args.len());
        let sha = self.shared.shas[which].as_deref().filter(|_| !whole);
        match sha {
            Some(sha) => command.extend([&b"EVALSHA"[..], sha]),
            None => command.extend([&b"EVAL"[..], SCRIPTS[which].as_bytes()]),
        }
        command.extend([&b"1"[..], key]);
        command.extend(args);
        write_command(out, &command);
        sha.is_none()
    }

    /// Writes a shared publish (a record [`split_shared_record`] reads); a malformed record,
    /// which the registry never queues, is dropped.
    pub(super) fn publish_shared(&mut self, record: &[u8], out: &mut Vec<u8>) {
        let Some((topic, except, payload)) = split_shared_record(record) else {
            return;
        };
        topic::redis_channel(&self.prefix, topic, &mut self.channel);
        self.shared.seq += 1;
        let eval = Eval {
            fingerprint: self.fingerprint(&self.channel, payload),
            publish: Retained::new(topic, payload),
            except,
            seq: self.shared.seq,
            refused: 0,
        };
        self.publishes += 1;
        match &mut self.shared.reload {
            // Taken while the script is loaded again (a drain takes held publishes): after
            // the refused ones.
            Some(refused) => refused.push(eval),
            None => self.send_eval(eval, out),
        }
    }

    /// Writes a publish counted in `publishes`, and expects its reply.
    fn send_eval(&mut self, eval: Eval, out: &mut Vec<u8>) {
        let (max_messages, max_age_ms) = self
            .history
            .as_ref()
            .map_or((0, 0), |history| history.limits());
        let mut origin = std::mem::take(&mut self.shared.origin_arg);
        origin.clear();
        origin.extend_from_slice(&self.shared.origin);
        // Writing to a Vec cannot fail.
        let _ = match eval.except {
            Some(fd) => write!(origin, " {} {fd}", eval.seq),
            None => write!(origin, " {} -", eval.seq),
        };
        topic::redis_channel(&self.prefix, eval.publish.topic(), &mut self.channel);
        let channel = std::mem::take(&mut self.channel);
        self.run_script(
            PUBLISH,
            &channel,
            &[
                eval.publish.payload(),
                max_messages.to_string().as_bytes(),
                max_age_ms.to_string().as_bytes(),
                &origin,
            ],
            eval.refused >= 2,
            out,
        );
        self.channel = channel;
        self.shared.origin_arg = origin;
        self.expected.push_back(Expected::Eval(Box::new(eval)));
    }

    /// Subscribes a topic's id channel, then asks for its fill.
    pub(super) fn subscribe_shared(&mut self, topic: &[u8], out: &mut Vec<u8>) {
        self.subscription(b"SSUBSCRIBE", Expected::Subscribe, topic, out);
        let after = self.shared.last.get(topic).map(|followed| followed.id);
        let (max_messages, _) = self
            .history
            .as_ref()
            .map_or((0, 0), |history| history.limits());
        let keep = if max_messages == 0 {
            FETCH_CAP
        } else {
            max_messages
        };
        self.send_fetch(Box::from(topic), after, keep + 1, false, out);
    }

    fn send_fetch(
        &mut self,
        topic: Box<[u8]>,
        after: Option<EventId>,
        count: usize,
        whole: bool,
        out: &mut Vec<u8>,
    ) {
        topic::redis_channel(&self.prefix, &topic, &mut self.channel);
        let channel = std::mem::take(&mut self.channel);
        let after_text = after.map(|id| id.to_string()).unwrap_or_default();
        let whole = self.run_script(
            FETCH,
            &channel,
            &[after_text.as_bytes(), count.to_string().as_bytes()],
            whole,
            out,
        );
        self.channel = channel;
        self.shared.fetching.entry(topic.clone()).or_default().0 += 1;
        self.expected.push_back(Expected::Fetch(Box::new(Fetch {
            topic,
            after,
            count,
            whole,
        })));
    }

    /// The id channel of a topic was unsubscribed: its mirror no longer follows.
    pub(super) fn unsubscribed_shared(&mut self, topic: &[u8], sink: &mut Sink<'_>) {
        self.shared.last.remove(topic);
        sink.received
            .push(Received::streamed(topic, b"", Stream::Unsynced));
    }

    /// Hands a message or note of `topic` on: to the registry, or, while the topic's fill is
    /// awaited, to the fill's queue.
    fn emit(&mut self, topic: &[u8], payload: &[u8], stream: Stream, sink: &mut Sink<'_>) {
        let received = Received::streamed(topic, payload, stream);
        if let Some((_, held)) = self.shared.fetching.get_mut(topic) {
            held.push(received);
            return;
        }
        self.note_last(topic, stream);
        sink.received.push(received);
    }

    fn note_last(&mut self, topic: &[u8], stream: Stream) {
        let id = match stream {
            Stream::Message { id, .. }
            | Stream::Kept(id)
            | Stream::Synced(id)
            | Stream::Hole(id)
            | Stream::Lost { before: id, .. } => id,
            Stream::Unsynced => return,
        };
        if let Some(followed) = self.shared.last.get_mut(topic)
            && id > followed.id
        {
            if let Stream::Message { .. } = stream {
                followed.added += 1;
            }
            followed.id = id;
        }
    }

    /// A message on an id channel (`smessage`): `<id> <payload>`.
    pub(super) fn id_message(&mut self, channel: &[u8], payload: &[u8], sink: &mut Sink<'_>) {
        let parsed = channel
            .strip_prefix(&*self.prefix)
            .filter(|topic| (1..=crate::registry::MAX_TOPIC_LEN).contains(&topic.len()))
            .zip(split_id(payload));
        let Some((topic, (id, payload))) = parsed else {
            sink.stats.malformed += 1;
            return;
        };
        let topic_hash = self.hasher.hash_one(topic);
        if self.shared.echo_after.take() == Some((id, topic_hash)) {
            sink.stats.ignored += 1;
            return;
        }
        sink.stats.received += 1;
        self.emit(topic, payload, Stream::Message { id, except: None }, sink);
    }

    /// Whether the held id-channel push (see `Held`) is the echo of the publish at the head
    /// of the FIFO: same topic. Decided by the reply's id.
    pub(super) fn head_eval_topic(&self) -> Option<&[u8]> {
        match self.expected.front() {
            Some(Expected::Eval(eval)) => Some(eval.publish.topic()),
            _ => None,
        }
    }

    /// The publish script's answer: the message's id. `held` is the id-channel push held
    /// before it (`(id, channel, payload)`), `None` if none.
    pub(super) fn eval_reply(
        &mut self,
        eval: Eval,
        frame: &RangeFrame,
        base: usize,
        input: &[u8],
        held: Option<(Option<EventId>, &[u8], &[u8])>,
        sink: &mut Sink<'_>,
    ) {
        self.publishes -= 1;
        let id = bytes(frame, base, input).and_then(EventId::parse);
        let Some(id) = id else {
            sink.stats.dropped += 1;
            if let Some((_, channel, payload)) = held {
                self.deliver_any(channel, payload, sink);
            }
            return;
        };
        sink.stats.published += 1;
        let topic_hash = self.hasher.hash_one(eval.publish.topic());
        match held {
            // Our echo on the id channel (Redis up to 7.0), or on the raw channel (a session
            // that subscribes raw channels: the plain filter's reasoning).
            Some((Some(held_id), _, _)) if held_id == id => sink.stats.ignored += 1,
            Some((None, _, _)) => sink.stats.ignored += 1,
            Some((_, channel, payload)) => {
                self.deliver_any(channel, payload, sink);
                self.shared.echo_after = Some((id, topic_hash));
            }
            None => {
                self.shared.echo_after = Some((id, topic_hash));
                self.echo_after = Some(eval.fingerprint);
            }
        }
        let except = eval.except;
        self.emit(
            eval.publish.topic(),
            eval.publish.payload(),
            Stream::Message { id, except },
            sink,
        );
    }

    /// A message push on a raw or id channel, as `push` would have delivered it.
    fn deliver_any(&mut self, channel: &[u8], payload: &[u8], sink: &mut Sink<'_>) {
        if self.shared.on {
            self.id_message(channel, payload, sink);
        } else {
            self.deliver(channel, payload, sink);
        }
    }

    /// The publish script was refused. `NOSCRIPT` (the script cache was flushed): kept, in
    /// order, for the script to be loaded again; the first one asks for the load. Anything
    /// else: dropped.
    pub(super) fn eval_refused(
        &mut self,
        mut eval: Eval,
        message: &str,
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) {
        if !message.starts_with("NOSCRIPT") || eval.refused >= 2 {
            self.publishes -= 1;
            sink.stats.dropped += 1;
            return;
        }
        eval.refused += 1;
        let refused = self.shared.reload.get_or_insert_with(|| {
            // Answered after every command written before it: by then every publish that
            // may be refused has been.
            write_command(out, &[b"SCRIPT", b"LOAD", PUBLISH_SCRIPT.as_bytes()]);
            self.expected.push_back(Expected::ScriptReload);
            Vec::new()
        });
        refused.push(eval);
    }

    /// The publish script loaded again (`Ok`: its SHA-1), or refused: the publishes held for
    /// it go out in their order, or are dropped.
    pub(super) fn script_reloaded(
        &mut self,
        answer: Result<&[u8], &str>,
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) {
        let mut held = self.shared.reload.take().unwrap_or_default();
        // Refusals and publishes taken meanwhile interleave; the numbers are their order.
        held.sort_unstable_by_key(|eval| eval.seq);
        match answer {
            Ok(sha) => {
                self.shared.shas[PUBLISH] = Some(Box::from(sha));
                for eval in held {
                    self.send_eval(eval, out);
                }
            }
            Err(_) => {
                self.publishes -= held.len();
                sink.stats.dropped += held.len() as u64;
            }
        }
    }

    /// The connection broke: keeps the publishes that were waiting for their reply, for
    /// their topic's next fill to tell whether Redis ran them; returns how many.
    pub(super) fn keep_lost_evals(&mut self) -> usize {
        let mut kept = 0;
        for expected in &self.expected {
            if let Expected::Eval(eval) = expected {
                let topic = eval.publish.topic();
                match self.shared.lost.get_mut(topic) {
                    Some(seqs) => seqs.push(eval.seq),
                    None => {
                        self.shared.lost.insert(Box::from(topic), vec![eval.seq]);
                    }
                }
                kept += 1;
            }
        }
        kept
    }

    /// After the session's subscriptions: the publishes lost on topics no fill will fetch
    /// are dropped (no one here can tell whether they ran, and no one here needs them).
    pub(super) fn settle_unfetched(&mut self) {
        let fetching = &self.shared.fetching;
        let mut dropped = 0;
        self.shared.lost.retain(|topic, seqs| {
            let keep = fetching.contains_key(topic);
            if !keep {
                dropped += seqs.len() as u64;
            }
            keep
        });
        self.shared.settled_dropped += dropped;
    }

    /// A fill of `topic` answered (or refused): its publishes lost and not found in it did
    /// not run (or were trimmed, or are older than a fill its count cut): dropped.
    fn settle_fetched(&mut self, topic: &[u8], sink: &mut Sink<'_>) {
        if let Some(seqs) = self.shared.lost.remove(topic) {
            sink.stats.dropped += seqs.len() as u64;
        }
    }

    /// The fetch script's answer, or its refusal (`None`: the message).
    pub(super) fn fetch_reply(
        &mut self,
        fetch: Fetch,
        frame: Result<(&[RangeFrame], usize, &[u8]), &str>,
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) {
        let done = match frame {
            Err(message) if message.starts_with("NOSCRIPT") && !fetch.whole => {
                // Sent again whole, which counts one more fill awaited: this one is not.
                if let Some((fills, _)) = self.shared.fetching.get_mut(&fetch.topic) {
                    *fills -= 1;
                }
                let topic = fetch.topic.clone();
                self.send_fetch(topic, fetch.after, fetch.count, true, out);
                false
            }
            Err(_) => {
                // The key holds something else than a stream, say: the mirror stays unsynced.
                sink.stats.malformed += 1;
                true
            }
            Ok((items, base, input)) => {
                match parse_fill(items, base, input, fetch.after, fetch.count) {
                    Some(fill) => self.apply_fill(&fetch, fill, sink),
                    None => sink.stats.malformed += 1,
                }
                true
            }
        };
        if done {
            self.settle_fetched(&fetch.topic, sink);
            self.release(&fetch.topic, sink);
        }
    }

    fn apply_fill(&mut self, fetch: &Fetch, fill: Fill<'_>, sink: &mut Sink<'_>) {
        let topic = &*fetch.topic;
        let newest = fill
            .entries
            .last()
            .map_or(fill.covers_from, |entry| entry.0);
        match fetch.after {
            None => {
                sink.received.push(Received::streamed(
                    topic,
                    b"",
                    Stream::Synced(fill.covers_from),
                ));
                for (id, payload, origin) in &fill.entries {
                    // History even if ours (its subscribers were waiting for this fill), but
                    // one lost with a connection ran.
                    if let Some((seq, _)) = self.shared.ours(origin)
                        && self.shared.found_lost(topic, seq)
                    {
                        sink.stats.published += 1;
                    }
                    sink.received
                        .push(Received::streamed(topic, payload, Stream::Kept(*id)));
                }
            }
            Some(after) => {
                // Given to the stream since `after`, and not fetched: never delivered here.
                let lost = self.shared.last.get(topic).map_or(0, |followed| {
                    fill.added
                        .saturating_sub(followed.added)
                        .saturating_sub(fill.entries.len() as u64)
                });
                let note = if lost > 0 {
                    Some(Stream::Lost {
                        before: fill.covers_from.max(after),
                        count: lost,
                    })
                } else {
                    (fill.covers_from > after).then_some(Stream::Hole(fill.covers_from))
                };
                if let Some(note) = note {
                    sink.received.push(Received::streamed(topic, b"", note));
                }
                for (id, payload, origin) in &fill.entries {
                    // Ours: a publish whose reply a lost connection took (counted now), or
                    // one delivered from a fill lost with it (counted already).
                    let except = match self.shared.ours(origin) {
                        Some((seq, except)) => {
                            if self.shared.found_lost(topic, seq) {
                                sink.stats.published += 1;
                            }
                            except
                        }
                        None => {
                            sink.stats.received += 1;
                            None
                        }
                    };
                    let message = Stream::Message { id: *id, except };
                    sink.received
                        .push(Received::streamed(topic, payload, message));
                }
            }
        }
        // The count restarts from the stream's own, at its last generated id (newer than
        // any entry fetched, when the newest were deleted).
        let followed = Followed {
            id: newest,
            added: fill.added,
        };
        match self.shared.last.entry(Box::from(topic)) {
            Entry::Occupied(mut last) => {
                let id = last.get().id.max(newest);
                *last.get_mut() = Followed { id, ..followed };
            }
            Entry::Vacant(vacant) => {
                vacant.insert(followed);
            }
        }
    }

    /// A fill of `topic` answered: what arrived for it meanwhile goes on, after the fill.
    fn release(&mut self, topic: &[u8], sink: &mut Sink<'_>) {
        let Some((fills, _)) = self.shared.fetching.get_mut(topic) else {
            return;
        };
        *fills -= 1;
        if *fills > 0 {
            return;
        }
        let Some((_, held)) = self.shared.fetching.remove(topic) else {
            return;
        };
        for received in held {
            if let Some(stream) = received.stream {
                self.note_last(topic, stream);
            }
            sink.received.push(received);
        }
    }
}

/// `<id> <payload>`.
pub(crate) fn split_id(message: &[u8]) -> Option<(EventId, &[u8])> {
    let space = message.iter().position(|&byte| byte == b' ')?;
    Some((EventId::parse(&message[..space])?, &message[space + 1..]))
}

/// A fetch script's answer, read.
struct Fill<'a> {
    /// The mirror holds every entry after this once the entries are in.
    covers_from: EventId,
    /// How many entries the stream was ever given (`entries-added`).
    added: u64,
    /// Id, payload and origin (empty: none).
    entries: Vec<(EventId, &'a [u8], &'a [u8])>,
}

fn parse_fill<'a>(
    items: &[RangeFrame],
    base: usize,
    input: &'a [u8],
    after: Option<EventId>,
    count: usize,
) -> Option<Fill<'a>> {
    let text = |at: usize| items.get(at).and_then(|item| bytes(item, base, input));
    let deleted = EventId::parse(text(0)?)?;
    let first = match text(1)? {
        b"" => None,
        first => Some(EventId::parse(first)?),
    };
    let last_generated = EventId::parse(text(2)?)?;
    let gone: u64 = std::str::from_utf8(text(3)?).ok()?.parse().ok()?;
    let added: u64 = std::str::from_utf8(text(4)?).ok()?.parse().ok()?;
    let rest = items.get(5..)?;
    if rest.len() % 3 != 0 {
        return None;
    }
    let mut entries: Vec<(EventId, &[u8], &[u8])> = Vec::with_capacity(rest.len() / 3);
    for entry in rest.chunks(3) {
        let id = EventId::parse(bytes(&entry[0], base, input)?)?;
        let payload = bytes(&entry[1], base, input)?;
        let origin = bytes(&entry[2], base, input)?;
        if entries.last().is_some_and(|last| last.0 >= id) {
            return None;
        }
        entries.push((id, payload, origin));
    }
    // Nothing dropped: every entry is there. Else what the stream still holds is complete
    // from its first entry on (trimming takes the oldest), but for deletions.
    let mut covers_from = match (gone, first) {
        (0, _) => EventId::ZERO,
        (_, Some(first)) => first.before().max(deleted),
        (_, None) => last_generated,
    };
    if let Some(after) = after {
        covers_from = covers_from.max(after);
    }
    if entries.len() >= count {
        // Cut by the count: older entries were not fetched.
        if let Some((oldest, _, _)) = entries.first() {
            covers_from = covers_from.max(oldest.before());
        }
    }
    Some(Fill {
        covers_from,
        added,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::broker::SharedHistory;
    use crate::broker::stream::Protocol;
    use crate::broker::stream::testing::Feed;
    use crate::broker::url::BrokerUrl;
    use crate::history::HistoryLimits;

    const HELLO_REPLY: &[u8] =
        b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n$7\r\nmodules\r\n*0\r\n";

    fn blob(text: &[u8]) -> Vec<u8> {
        [format!("${}\r\n", text.len()).as_bytes(), text, b"\r\n"].concat()
    }

    fn smessage(channel: &[u8], id: &str, payload: &[u8]) -> Vec<u8> {
        let body = [id.as_bytes(), b" ", payload].concat();
        [
            b">3\r\n$8\r\nsmessage\r\n".as_slice(),
            &blob(channel),
            &blob(&body),
        ]
        .concat()
    }

    fn array(items: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", items.len()).into_bytes();
        for item in items {
            out.extend_from_slice(&blob(item));
        }
        out
    }

    /// A session with shared history on, open (scripts loaded as "sha-p" and "sha-f").
    fn open_shared(max_messages: usize) -> (RedisProtocol, Arc<SharedHistory>) {
        let url = BrokerUrl::parse("redis://127.0.0.1", 6379).unwrap();
        let mut redis = RedisProtocol::new(&url, "app:").unwrap();
        let history = Arc::new(SharedHistory::default());
        history.set(HistoryLimits {
            max_messages,
            ..HistoryLimits::default()
        });
        redis.history = Some(Arc::clone(&history));
        let mut out = Vec::new();
        redis.start(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(text.matches("SCRIPT").count(), 2, "{text}");
        let mut feed = Feed::default();
        feed.all(&mut redis, HELLO_REPLY).unwrap();
        assert!(!redis.is_open(), "the scripts are part of the handshake");
        feed.all(&mut redis, &[blob(b"sha-p"), blob(b"sha-f")].concat())
            .unwrap();
        assert!(redis.is_open());
        (redis, history)
    }

    fn notes(feed: &Feed) -> Vec<(Vec<u8>, Vec<u8>, Option<Stream>)> {
        feed.received
            .iter()
            .map(|r| (r.topic().to_vec(), r.payload().to_vec(), r.stream))
            .collect()
    }

    fn id(text: &str) -> EventId {
        EventId::parse(text.as_bytes()).unwrap()
    }

    /// The fetch script's answer: deleted, first, last generated, gone, added, then entries
    /// (of no origin).
    fn fill_reply(head: [&str; 5], entries: &[(&str, &str)]) -> Vec<u8> {
        let entries: Vec<_> = entries
            .iter()
            .map(|&(id, d)| (id, d, String::new()))
            .collect();
        fill_reply_from(head, &entries)
    }

    /// [`fill_reply`] with each entry's origin.
    fn fill_reply_from(head: [&str; 5], entries: &[(&str, &str, String)]) -> Vec<u8> {
        let mut items: Vec<&[u8]> = head.iter().map(|item| item.as_bytes()).collect();
        for (id, payload, origin) in entries {
            items.push(id.as_bytes());
            items.push(payload.as_bytes());
            items.push(origin.as_bytes());
        }
        array(&items)
    }

    fn origin(redis: &RedisProtocol) -> String {
        String::from_utf8(redis.shared.origin.to_vec()).unwrap()
    }

    /// The payloads of the `EVALSHA`/`EVAL` publishes in `out`, in order.
    fn evals(out: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(out);
        text.split("*8\r\n")
            .skip(1)
            .map(|command| command.split("\r\n").nth(9).unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_subscription_fetches_and_holds_what_arrives_until_the_fill() {
        let (mut redis, _) = open_shared(3);
        let mut out = Vec::new();
        redis.subscribe(b"t", &mut out);
        assert_eq!(
            out,
            [
                b"*2\r\n$10\r\nSSUBSCRIBE\r\n$5\r\napp:t\r\n".as_slice(),
                b"*6\r\n$7\r\nEVALSHA\r\n$5\r\nsha-f\r\n$1\r\n1\r\n$5\r\napp:t\r\n$0\r\n\r\n$1\r\n4\r\n"
            ]
            .concat()
        );
        let mut feed = Feed::default();
        let stream = [
            b">3\r\n$10\r\nssubscribe\r\n$5\r\napp:t\r\n:1\r\n".as_slice(),
            // Arrives between the subscription and the fill: held for after it.
            &smessage(b"app:t", "5-0", b"five"),
            &fill_reply(
                ["0-0", "1-0", "5-0", "1", "4"],
                &[("2-0", "two"), ("4-0", "four"), ("5-0", "five")],
            ),
            &smessage(b"app:t", "6-0", b"six"),
        ]
        .concat();
        feed.all(&mut redis, &stream).unwrap();
        let t = b"t".to_vec();
        assert_eq!(
            notes(&feed),
            vec![
                (
                    t.clone(),
                    vec![],
                    Some(Stream::Synced(id("0-18446744073709551615")))
                ),
                (t.clone(), b"two".to_vec(), Some(Stream::Kept(id("2-0")))),
                (t.clone(), b"four".to_vec(), Some(Stream::Kept(id("4-0")))),
                (t.clone(), b"five".to_vec(), Some(Stream::Kept(id("5-0")))),
                (
                    t.clone(),
                    b"five".to_vec(),
                    Some(Stream::Message {
                        id: id("5-0"),
                        except: None
                    })
                ),
                (
                    t.clone(),
                    b"six".to_vec(),
                    Some(Stream::Message {
                        id: id("6-0"),
                        except: None
                    })
                ),
            ]
        );

        // After a lost connection the fill fetches after the newest id delivered.
        redis.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut redis, HELLO_REPLY).unwrap();
        feed.all(&mut redis, &[blob(b"sha-p"), blob(b"sha-f")].concat())
            .unwrap();
        let mut out = Vec::new();
        redis.subscribe(b"t", &mut out);
        assert!(
            String::from_utf8_lossy(&out).contains("$3\r\n6-0\r\n$1\r\n4\r\n"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        let stream = [
            b">3\r\n$10\r\nssubscribe\r\n$5\r\napp:t\r\n:1\r\n".as_slice(),
            // 7-0 and 8-0 were added (the stream's 6th and 7th) and trimmed before the
            // fetch: two lost, a hole up to 8-0.
            &fill_reply(
                ["0-0", "9-0", "10-0", "7", "9"],
                &[("9-0", "nine"), ("10-0", "ten")],
            ),
        ]
        .concat();
        feed.all(&mut redis, &stream).unwrap();
        let message = |text: &str| Stream::Message {
            id: id(text),
            except: None,
        };
        assert_eq!(
            notes(&feed),
            vec![
                (
                    t.clone(),
                    vec![],
                    Some(Stream::Lost {
                        before: id("8-18446744073709551615"),
                        count: 2
                    })
                ),
                (t.clone(), b"nine".to_vec(), Some(message("9-0"))),
                (t.clone(), b"ten".to_vec(), Some(message("10-0"))),
            ]
        );
        // Unsubscribed: the mirror no longer follows, and the next fill starts afresh.
        redis.unsubscribe(b"t", &mut Vec::new());
        feed.all(
            &mut redis,
            b">3\r\n$12\r\nsunsubscribe\r\n$5\r\napp:t\r\n:0\r\n",
        )
        .unwrap();
        assert_eq!(feed.received.last().unwrap().stream, Some(Stream::Unsynced));
        let mut out = Vec::new();
        redis.subscribe(b"t", &mut out);
        assert!(String::from_utf8_lossy(&out).contains("$0\r\n\r\n$1\r\n4\r\n"));
    }

    #[test]
    fn our_publish_is_delivered_on_its_reply_and_its_echo_dropped_on_either_side() {
        let record = crate::broker::shared_record(b"t", b"mine", Some(9));
        let mine = |text: &str| Stream::Message {
            id: id(text),
            except: Some(9),
        };
        let theirs = |text: &str| Stream::Message {
            id: id(text),
            except: None,
        };
        // (what Redis sends, what is delivered in order)
        let cases: Vec<(Vec<u8>, Vec<Stream>)> = vec![
            // Redis 7.0: the echo before the reply.
            (
                [smessage(b"app:t", "7-1", b"mine"), blob(b"7-1")].concat(),
                vec![mine("7-1")],
            ),
            // Redis 7.2: after it.
            (
                [blob(b"7-1"), smessage(b"app:t", "7-1", b"mine")].concat(),
                vec![mine("7-1")],
            ),
            // Another's identical message just before ours, and none of ours (not
            // subscribed): delivered.
            (
                [smessage(b"app:t", "7-0", b"mine"), blob(b"7-1")].concat(),
                vec![theirs("7-0"), mine("7-1")],
            ),
            // Another's just after ours.
            (
                [
                    blob(b"7-1"),
                    smessage(b"app:t", "7-1", b"mine"),
                    smessage(b"app:t", "7-2", b"mine"),
                ]
                .concat(),
                vec![mine("7-1"), theirs("7-2")],
            ),
        ];
        for (stream, want) in cases {
            let (mut redis, _) = open_shared(10);
            let mut out = Vec::new();
            redis.publish(b"", &record, &mut out);
            let origin = format!("{} 1 9", origin(&redis));
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!(
                    "*8\r\n$7\r\nEVALSHA\r\n$5\r\nsha-p\r\n$1\r\n1\r\n$5\r\napp:t\r\n\
                     $4\r\nmine\r\n$2\r\n10\r\n$1\r\n0\r\n${}\r\n{origin}\r\n",
                    origin.len()
                )
            );
            assert_eq!(redis.in_flight(), 1);
            let mut feed = Feed::default();
            for chunk in stream.chunks(5) {
                feed.bytes(&mut redis, chunk).unwrap();
            }
            assert!(feed.input.is_empty());
            let got: Vec<Stream> = feed.received.iter().filter_map(|r| r.stream).collect();
            assert_eq!(got, want);
            assert_eq!((redis.in_flight(), feed.stats.published), (0, 1));
        }
    }

    fn publish(redis: &mut RedisProtocol, topic: &[u8], payload: &[u8], except: Option<RawFd>) {
        let record = crate::broker::shared_record(topic, payload, except);
        redis.publish(b"", &record, &mut Vec::new());
    }

    const NOSCRIPT: &[u8] = b"-NOSCRIPT No matching script. Please use EVAL.\r\n";

    #[test]
    fn noscript_holds_publishes_until_the_script_is_loaded_and_keeps_their_order() {
        let (mut redis, _) = open_shared(10);
        let mut out = Vec::new();
        for payload in ["1", "2", "3", "4"] {
            let record = crate::broker::shared_record(b"t", payload.as_bytes(), None);
            redis.publish(b"", &record, &mut out);
        }
        assert_eq!(evals(&out), ["1", "2", "3", "4"]);
        let mut feed = Feed::default();
        // The cache is flushed between 1 and 2: 2 is refused first, and only a load is sent.
        feed.all(&mut redis, &[blob(b"1-1"), NOSCRIPT.to_vec()].concat())
            .unwrap();
        let load = array(&[b"SCRIPT", b"LOAD", PUBLISH_SCRIPT.as_bytes()]);
        assert_eq!(std::mem::take(&mut feed.out), load);
        assert!(redis.holding_publishes(), "new publishes wait in the queue");
        // One taken meanwhile (a drain takes held publishes) waits behind the refused ones.
        let mut out = Vec::new();
        publish(&mut redis, b"t", b"5", None);
        redis.publish(
            b"",
            &crate::broker::shared_record(b"t", b"6", None),
            &mut out,
        );
        assert!(out.is_empty());
        feed.all(&mut redis, &[NOSCRIPT, NOSCRIPT].concat())
            .unwrap();
        assert!(feed.out.is_empty(), "the load is asked for once");
        assert_eq!(redis.in_flight(), 5);
        // Loaded: every refused one goes out again, in order, then the ones held.
        feed.all(&mut redis, &blob(b"sha-p2")).unwrap();
        let out = std::mem::take(&mut feed.out);
        assert_eq!(evals(&out), ["2", "3", "4", "5", "6"]);
        assert_eq!(String::from_utf8_lossy(&out).matches("sha-p2").count(), 5);
        assert!(!redis.holding_publishes());
        // Flushed again right after the load: the publishes refused twice go whole.
        feed.all(&mut redis, &[NOSCRIPT, NOSCRIPT].concat())
            .unwrap();
        assert_eq!(std::mem::take(&mut feed.out), load);
        feed.all(
            &mut redis,
            &[blob(b"4-0"), b"-ERR other\r\n".to_vec(), NOSCRIPT.to_vec()].concat(),
        )
        .unwrap();
        feed.all(&mut redis, &blob(b"sha-p3")).unwrap();
        let out = String::from_utf8(std::mem::take(&mut feed.out)).unwrap();
        assert_eq!(evals(out.as_bytes()), ["2", "3", "6"]);
        assert_eq!(out.matches("*8\r\n$4\r\nEVAL\r\n").count(), 2, "{out}");
        assert_eq!(out.matches("sha-p3").count(), 1);
        let delivered: Vec<_> = feed.delivered().into_iter().map(|(_, p)| p).collect();
        assert_eq!(delivered, [b"1".to_vec(), b"4".to_vec()]);
        assert_eq!(
            (redis.in_flight(), feed.stats.published, feed.stats.dropped),
            (3, 2, 1)
        );

        // Sent whole, a refusal is final.
        feed.all(&mut redis, NOSCRIPT).unwrap();
        assert!(!redis.holding_publishes());
        assert_eq!((redis.in_flight(), feed.stats.dropped), (2, 2));

        // A refused load drops what it held.
        let (mut redis, _) = open_shared(10);
        let mut feed = Feed::default();
        publish(&mut redis, b"t", b"x", None);
        feed.all(&mut redis, NOSCRIPT).unwrap();
        feed.all(&mut redis, b"-ERR scripting disabled\r\n")
            .unwrap();
        assert_eq!((redis.in_flight(), feed.stats.dropped), (0, 1));
        assert!(!redis.holding_publishes());
    }

    #[test]
    fn a_fetch_refused_by_noscript_goes_whole_and_then_releases_what_it_held() {
        let (mut redis, _) = open_shared(3);
        redis.subscribe(b"t", &mut Vec::new());
        let mut feed = Feed::default();
        let stream = [
            b">3\r\n$10\r\nssubscribe\r\n$5\r\napp:t\r\n:1\r\n".as_slice(),
            &smessage(b"app:t", "5-0", b"five"),
            NOSCRIPT,
        ]
        .concat();
        feed.all(&mut redis, &stream).unwrap();
        assert!(feed.out.starts_with(b"*6\r\n$4\r\nEVAL\r\n"));
        assert!(feed.received.is_empty(), "held for the fill");
        feed.all(
            &mut redis,
            &fill_reply(["0-0", "5-0", "5-0", "0", "1"], &[("5-0", "five")]),
        )
        .unwrap();
        let got: Vec<_> = feed.received.iter().filter_map(|r| r.stream).collect();
        assert_eq!(
            got,
            [
                Stream::Synced(EventId::ZERO),
                Stream::Kept(id("5-0")),
                Stream::Message {
                    id: id("5-0"),
                    except: None
                }
            ]
        );
    }

    #[test]
    fn a_fill_after_a_lost_connection_honours_our_except_fd_and_counts_each_publish_once() {
        let (mut redis, _) = open_shared(10);
        redis.subscribe(b"t", &mut Vec::new());
        let mut feed = Feed::default();
        let stream = [
            b">3\r\n$10\r\nssubscribe\r\n$5\r\napp:t\r\n:1\r\n".as_slice(),
            &fill_reply(["0-0", "1-0", "1-0", "0", "1"], &[("1-0", "one")]),
        ]
        .concat();
        feed.all(&mut redis, &stream).unwrap();
        // In flight when the connection breaks: 1, 2 and 3 on t (2 never runs), 4 on u.
        publish(&mut redis, b"t", b"a", Some(9));
        publish(&mut redis, b"t", b"b", None);
        publish(&mut redis, b"t", b"c", Some(9));
        publish(&mut redis, b"u", b"d", Some(4));
        assert_eq!(redis.in_flight(), 4);
        assert_eq!(redis.lose_in_flight(), 0, "none counted dropped yet");

        let mut out = Vec::new();
        redis.start(&mut out);
        let mut feed = Feed::default();
        feed.all(&mut redis, HELLO_REPLY).unwrap();
        feed.all(&mut redis, &[blob(b"sha-p"), blob(b"sha-f")].concat())
            .unwrap();
        // What the engine does once the session is open: t is subscribed again, u is not.
        let mut out = Vec::new();
        redis.subscribe(b"t", &mut out);
        redis.end_of_subscriptions(&mut out);
        assert!(String::from_utf8_lossy(&out).contains("$3\r\n1-0\r\n"));
        redis.report(&mut feed.stats);
        assert_eq!(feed.stats.dropped, 1, "4: no fill can tell");

        let ours = |n: u64, except: &str| format!("{} {n} {except}", origin(&redis));
        let stream = [
            b">3\r\n$10\r\nssubscribe\r\n$5\r\napp:t\r\n:1\r\n".as_slice(),
            &fill_reply_from(
                ["0-0", "1-0", "3-0", "0", "5"],
                &[
                    ("2-0", "a", ours(1, "9")),
                    ("2-1", "plain", String::new()),
                    ("2-2", "other", "00000000deadbeef 1 9".to_string()),
                    ("3-0", "c", ours(3, "9")),
                ],
            ),
        ]
        .concat();
        feed.all(&mut redis, &stream).unwrap();
        let message = |text: &str, except| Stream::Message {
            id: id(text),
            except,
        };
        let t = b"t".to_vec();
        assert_eq!(
            notes(&feed),
            vec![
                (t.clone(), b"a".to_vec(), Some(message("2-0", Some(9)))),
                (t.clone(), b"plain".to_vec(), Some(message("2-1", None))),
                (t.clone(), b"other".to_vec(), Some(message("2-2", None))),
                (t.clone(), b"c".to_vec(), Some(message("3-0", Some(9)))),
            ]
        );
        // 1 and 3 published, 2 and 4 dropped, each once; the others' two received.
        assert_eq!(
            (
                feed.stats.published,
                feed.stats.dropped,
                feed.stats.received
            ),
            (2, 2, 2)
        );
        redis.report(&mut feed.stats);
        assert_eq!(feed.stats.dropped, 2);
    }

    #[test]
    fn lost_publishes_in_a_first_fill_are_history_and_a_switch_drops_the_rest() {
        // Published to t before t's first fill answered, then the connection broke.
        let (mut redis, history) = open_shared(10);
        publish(&mut redis, b"t", b"a", Some(9));
        publish(&mut redis, b"v", b"b", None);
        assert_eq!(redis.lose_in_flight(), 0);
        redis.start(&mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut redis, HELLO_REPLY).unwrap();
        feed.all(&mut redis, &[blob(b"sha-p"), blob(b"sha-f")].concat())
            .unwrap();
        redis.subscribe(b"t", &mut Vec::new());
        redis.subscribe(b"v", &mut Vec::new());
        redis.end_of_subscriptions(&mut Vec::new());
        let ours = format!("{} 1 9", origin(&redis));
        let stream = [
            b">3\r\n$10\r\nssubscribe\r\n$5\r\napp:t\r\n:1\r\n".as_slice(),
            &fill_reply_from(["0-0", "2-0", "2-0", "0", "1"], &[("2-0", "a", ours)]),
        ]
        .concat();
        feed.all(&mut redis, &stream).unwrap();
        let got: Vec<_> = feed.received.iter().filter_map(|r| r.stream).collect();
        assert_eq!(
            got,
            [Stream::Synced(EventId::ZERO), Stream::Kept(id("2-0"))]
        );
        assert_eq!((feed.stats.published, feed.stats.received), (1, 0));
        // v's fill never answers: history is switched off, and the next session cannot
        // tell whether b ran.
        history.set(HistoryLimits::default());
        assert_eq!(redis.lose_in_flight(), 0);
        redis.start(&mut Vec::new());
        redis.report(&mut feed.stats);
        assert_eq!(feed.stats.dropped, 1);
    }

    #[test]
    fn history_switched_off_waits_for_the_publishes_in_flight_only() {
        let (mut redis, history) = open_shared(10);
        publish(&mut redis, b"t", b"x", None);
        assert!(!redis.answers_before_switch(), "history is still on");
        history.set(HistoryLimits::default());
        assert!(redis.answers_before_switch());
        Feed::default().all(&mut redis, &blob(b"1-0")).unwrap();
        assert!(!redis.answers_before_switch(), "answered");
    }

    #[test]
    fn malformed_id_messages_are_counted_not_delivered() {
        let (mut redis, _) = open_shared(10);
        let mut feed = Feed::default();
        for bad in [&b"x"[..], b"7 x", b"07-1 x", b"7-1"] {
            let push = [
                b">3\r\n$8\r\nsmessage\r\n".as_slice(),
                &blob(b"app:t"),
                &blob(bad),
            ]
            .concat();
            feed.all(&mut redis, &push).unwrap();
        }
        feed.all(&mut redis, &smessage(b"other:t", "1-1", b"x"))
            .unwrap();
        assert_eq!((feed.stats.malformed, feed.received.len()), (5, 0));
        assert_eq!(split_id(b"1-2 a b"), Some((id("1-2"), &b"a b"[..])));
        assert_eq!(split_id(b"1-2 "), Some((id("1-2"), &b""[..])));
    }

    #[test]
    fn a_fill_cut_by_its_count_covers_from_its_oldest() {
        let reply = fill_reply(
            ["0-0", "1-0", "9-0", "0", "3"],
            &[("7-0", "a"), ("8-0", "b"), ("9-0", "c")],
        );
        let frame = crate::broker::redis::decode(&reply).unwrap();
        let RangeFrame::Array { data, .. } = frame else {
            unreachable!()
        };
        let cut = parse_fill(&data, 0, &reply, None, 3).unwrap();
        assert_eq!(cut.covers_from, id("6-18446744073709551615"));
        let whole = parse_fill(&data, 0, &reply, None, 4).unwrap();
        assert_eq!(whole.covers_from, EventId::ZERO, "nothing ever dropped");
        assert_eq!(whole.entries.len(), 3);
        let after = parse_fill(&data, 0, &reply, Some(id("6-5")), 4).unwrap();
        assert_eq!(after.covers_from, id("6-5"));
        // Deleted entries count, and an empty stream covers up to its last id.
        let reply = fill_reply(["8-0", "", "9-0", "3", "3"], &[]);
        let RangeFrame::Array { data, .. } = crate::broker::redis::decode(&reply).unwrap() else {
            unreachable!()
        };
        assert_eq!(
            parse_fill(&data, 0, &reply, None, 4).unwrap().covers_from,
            id("9-0")
        );
        let unordered = fill_reply(
            ["0-0", "1-0", "9-0", "0", "2"],
            &[("8-0", "b"), ("7-0", "a")],
        );
        let RangeFrame::Array { data, .. } = crate::broker::redis::decode(&unordered).unwrap()
        else {
            unreachable!()
        };
        assert!(parse_fill(&data, 0, &unordered, None, 4).is_none());
    }
}
