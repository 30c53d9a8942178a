//! History shared across processes through Redis streams: the session's side.
//!
//! With history on when the broker connects (or switched on since: the session starts anew),
//! a topic's history is the stream at key `<prefix><topic>` (the topic's channel name, in the
//! key space), each entry one message with its payload in the field `d`. Redis gives the ids.
//!
//! - A publish runs the publish script (`EVALSHA`, loaded by `SCRIPT LOAD` in the handshake;
//!   `EVAL` after a `NOSCRIPT`): `XADD <key> MAXLEN ~ <max_messages> * d <payload>` (with no
//!   count limit, `MINID ~ <now - max_age>`; with neither, `MAXLEN ~ 1000`), `PUBLISH` of the
//!   raw payload on the topic's channel (plain subscribers see what they always saw), and
//!   `SPUBLISH` of `<id> <payload>` on the topic's *id channel*: the same name, in the shard
//!   channel space (no classic channel can meet it). The reply is the id: the publisher
//!   delivers its own message then, in the server's order among the others' pushes.
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
use std::os::fd::RawFd;

use redis_protocol::resp3::types::RangeFrame;

use super::{Expected, Fingerprint, RedisProtocol, Retained, bytes, write_command};
use crate::broker::stream::Sink;
use crate::broker::{Received, Stream, split_shared_record, topic};
use crate::history::EventId;

/// `KEYS[1]`: the stream key, which is also the channel's name. `ARGV`: payload, max
/// messages (0: none), max age in ms (0: none).
pub(crate) const PUBLISH_SCRIPT: &str = "\
local id
local n = tonumber(ARGV[2])
local age = tonumber(ARGV[3])
if n > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'd', ARGV[1])
elseif age > 0 then
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age
  if floor < 0 then floor = 0 end
  id = redis.call('XADD', KEYS[1], 'MINID', '~', string.format('%.0f', floor), '*', 'd', ARGV[1])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', '1000', '*', 'd', ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
redis.call('SPUBLISH', KEYS[1], id .. ' ' .. ARGV[1])
return id
";

/// `KEYS[1]`: the stream key. `ARGV`: the id after which to fetch ('' for the newest), how
/// many entries at most. Returns the stream's max deleted id, its first entry's id ('' when
/// empty), its last generated id, how many entries it dropped (trimmed or deleted), how
/// many it was ever given, then the entries' ids and payloads, oldest first.
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
  local d = ''
  local f = e[i][2]
  for j = 1, #f, 2 do if f[j] == 'd' then d = f[j + 1] break end end
  out[#out + 1] = e[i][1]
  out[#out + 1] = d
end
return out
";

const SCRIPTS: [&str; 2] = [PUBLISH_SCRIPT, FETCH_SCRIPT];
const PUBLISH: usize = 0;
const FETCH: usize = 1;

/// Entries a fill keeps when history has no count limit.
pub(crate) const FETCH_CAP: usize = 1000;

/// A shared publish waiting for its script's reply.
pub(super) struct Eval {
    /// Of its raw `PUBLISH`, for a session that subscribes raw channels (history switched
    /// off meanwhile): the plain echo filter's.
    pub(super) fingerprint: Fingerprint,
    pub(super) publish: Retained,
    pub(super) except: Option<RawFd>,
    /// Sent as `EVAL`: a `NOSCRIPT` cannot come.
    pub(super) whole: bool,
}

/// A fill waiting for its script's reply.
pub(super) struct Fetch {
    topic: Box<[u8]>,
    after: Option<EventId>,
    count: usize,
    whole: bool,
}

/// The session's shared-history state.
#[derive(Default)]
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
            // Switched: nothing of the other way's mirrors holds.
            self.shared.last.clear();
        }
        self.shared.on = on;
        self.shared.fetching.clear();
        self.shared.echo_after = None;
        self.shared.shas = [None, None];
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
        self.send_eval(Retained::new(topic, payload), except, false, out);
    }

    fn send_eval(
        &mut self,
        publish: Retained,
        except: Option<RawFd>,
        whole: bool,
        out: &mut Vec<u8>,
    ) {
        let (max_messages, max_age_ms) = self
            .history
            .as_ref()
            .map_or((0, 0), |history| history.limits());
        topic::redis_channel(&self.prefix, publish.topic(), &mut self.channel);
        let channel = std::mem::take(&mut self.channel);
        let whole = self.run_script(
            PUBLISH,
            &channel,
            &[
                publish.payload(),
                max_messages.to_string().as_bytes(),
                max_age_ms.to_string().as_bytes(),
            ],
            whole,
            out,
        );
        let fingerprint = self.fingerprint(&channel, publish.payload());
        self.channel = channel;
        self.publishes += 1;
        self.expected.push_back(Expected::Eval(Box::new(Eval {
            fingerprint,
            publish,
            except,
            whole,
        })));
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

    /// The publish script was refused. `NOSCRIPT` (the script cache was flushed): sent again
    /// whole. Anything else: dropped.
    pub(super) fn eval_refused(
        &mut self,
        eval: Eval,
        message: &str,
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) {
        self.publishes -= 1;
        if message.starts_with("NOSCRIPT") && !eval.whole {
            self.send_eval(eval.publish, eval.except, true, out);
        } else {
            sink.stats.dropped += 1;
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
            self.release(&fetch.topic, sink);
        }
    }

    fn apply_fill(&mut self, fetch: &Fetch, fill: Fill<'_>, sink: &mut Sink<'_>) {
        let topic = &*fetch.topic;
        let newest = fill.entries.last().map_or(fill.covers_from, |(id, _)| *id);
        match fetch.after {
            None => {
                sink.received.push(Received::streamed(
                    topic,
                    b"",
                    Stream::Synced(fill.covers_from),
                ));
                for (id, payload) in &fill.entries {
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
                for (id, payload) in &fill.entries {
                    sink.stats.received += 1;
                    let message = Stream::Message {
                        id: *id,
                        except: None,
                    };
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
    entries: Vec<(EventId, &'a [u8])>,
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
    if rest.len() % 2 != 0 {
        return None;
    }
    let mut entries = Vec::with_capacity(rest.len() / 2);
    for pair in rest.chunks(2) {
        let id = EventId::parse(bytes(&pair[0], base, input)?)?;
        let payload = bytes(&pair[1], base, input)?;
        if entries.last().is_some_and(|(last, _)| *last >= id) {
            return None;
        }
        entries.push((id, payload));
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
        if let Some((oldest, _)) = entries.first() {
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

    /// The fetch script's answer: deleted, first, last generated, gone, added, then entries.
    fn fill_reply(head: [&str; 5], entries: &[(&str, &str)]) -> Vec<u8> {
        let mut items: Vec<&[u8]> = head.iter().map(|item| item.as_bytes()).collect();
        for (id, payload) in entries {
            items.push(id.as_bytes());
            items.push(payload.as_bytes());
        }
        array(&items)
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
            assert_eq!(
                out,
                b"*7\r\n$7\r\nEVALSHA\r\n$5\r\nsha-p\r\n$1\r\n1\r\n$5\r\napp:t\r\n$4\r\nmine\r\n$2\r\n10\r\n$1\r\n0\r\n"
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

    #[test]
    fn noscript_sends_the_script_whole_and_other_refusals_drop() {
        let (mut redis, _) = open_shared(10);
        let record = crate::broker::shared_record(b"t", b"x", None);
        redis.publish(b"", &record, &mut Vec::new());
        let mut feed = Feed::default();
        feed.all(&mut redis, b"-NOSCRIPT No matching script.\r\n")
            .unwrap();
        let out = std::mem::take(&mut feed.out);
        assert!(out.starts_with(b"*7\r\n$4\r\nEVAL\r\n"));
        assert!(String::from_utf8_lossy(&out).contains("XADD"));
        assert_eq!(redis.in_flight(), 1);
        feed.all(&mut redis, b"-NOSCRIPT again\r\n").unwrap();
        assert_eq!((redis.in_flight(), feed.stats.dropped), (0, 1));
        assert!(feed.received.is_empty());
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
