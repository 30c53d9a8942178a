//! Topics ↔ subscriptions ↔ fds, with the reverse index that makes forgetting an fd cost
//! O(its subscriptions). Pure bookkeeping: no I/O and no locks; the registry wraps it in one
//! `RwLock`.
//!
//! Topics live in a slab (a `Vec` whose free slots are reused) and are named by their slot's
//! u32 id; a `HashTable` of ids, hashed by the topic's bytes with a keyed hasher (topics may
//! come from clients: no chosen collisions), finds a topic by name. Subscription ids come from
//! one 63-bit counter, so an id is never handed out twice (not even after the subscription it
//! named is gone, nor for another fd); a table finds each live id's fd and topic, and an fd's
//! entry lists its topic ids, 4 bytes each.
//!
//! Most topics in a large deployment have one subscriber, so such a topic keeps it inline in
//! its slot: no list, no map. From two subscribers on, a topic's subscribers live in an `Arc`'d
//! list that a publish clones (one atomic increment) and then walks with no lock held. A change
//! to a topic copies its list only while a publish still holds the old one (`Arc::make_mut`),
//! so subscribing is O(1) amortised when no publish is in flight on that topic. Finding an
//! fd in a list is a linear scan up to `LINEAR_SCAN_MAX` subscribers; a larger topic also
//! keeps an fd → position map.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::RawFd;
use std::sync::Arc;

use hashbrown::HashTable;

use crate::frame::Mode;

/// Identifies one (topic, fd) subscription; always > 0 and below 2^63.
pub type SubscriptionId = u64;

/// The first id never handed out, so that every id is a non-negative C `int64_t`.
const ID_LIMIT: SubscriptionId = 1 << 63;

/// Where a live subscription is. Its id is not copied here: the subscriber in the topic holds
/// it, and the table's comparisons and rehashing read it there.
#[derive(Clone, Copy)]
struct IdEntry {
    fd: RawFd,
    topic: TopicId,
}

/// The hash of an id in the table of live ids. Only the index makes ids, counting up, so no
/// one can choose keys that collide, and a keyed hasher would buy nothing. An odd multiplier
/// permutes the residues modulo every power of two, so consecutive ids fill distinct buckets,
/// and it carries the low bits into the high ones, which the table uses as tags.
fn hash_id(id: SubscriptionId) -> u64 {
    id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The keep-alive frame an fd is sent when idle: a WebSocket ping if it has a WebSocket
/// subscription, else an SSE comment if it has an SSE one. RAW streams get none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keepalive {
    Ping,
    Comment,
}

/// Up to this many subscribers, a topic finds an fd by scanning its list: cheaper, in time
/// and memory, than a map. Above it, the topic keeps an fd → position map, and drops it again
/// only at half this size, so that a topic hovering at the threshold does not rebuild its map
/// on every change.
const LINEAR_SCAN_MAX: usize = 8;

type TopicId = u32;

pub(crate) struct Subscriber<P> {
    pub(crate) fd: RawFd,
    pub(crate) mode: Mode,
    pub(crate) peer: Arc<P>,
    id: SubscriptionId,
}

impl<P> Clone for Subscriber<P> {
    fn clone(&self) -> Self {
        Subscriber {
            fd: self.fd,
            mode: self.mode,
            peer: Arc::clone(&self.peer),
            id: self.id,
        }
    }
}

/// The subscribers of a topic with two or more, shared with the publishes walking them.
pub(crate) struct SubscriberList<P> {
    subscribers: Vec<Subscriber<P>>,
    /// How many subscribers use a mode that needs UTF-8, so a publish knows whether to
    /// validate without walking the list first.
    utf8_subscribers: usize,
}

impl<P> Clone for SubscriberList<P> {
    fn clone(&self) -> Self {
        SubscriberList {
            subscribers: self.subscribers.clone(),
            utf8_subscribers: self.utf8_subscribers,
        }
    }
}

/// The subscribers of one topic as a publish sees them: its own copy of a sole subscriber,
/// or a share of the topic's list. Either costs one atomic increment to take.
pub(crate) enum Snapshot<P> {
    One(Subscriber<P>),
    Shared(Arc<SubscriberList<P>>),
}

impl<P> Snapshot<P> {
    pub(crate) fn subscribers(&self) -> &[Subscriber<P>] {
        match self {
            Snapshot::One(subscriber) => std::slice::from_ref(subscriber),
            Snapshot::Shared(list) => &list.subscribers,
        }
    }

    pub(crate) fn utf8_subscribers(&self) -> usize {
        match self {
            Snapshot::One(subscriber) => usize::from(subscriber.mode.requires_utf8()),
            Snapshot::Shared(list) => list.utf8_subscribers,
        }
    }
}

enum Subscribers<P> {
    /// A topic's sole subscriber, inline: no list to allocate for the commonest topic.
    One(Subscriber<P>),
    /// Two or more.
    Shared {
        list: Arc<SubscriberList<P>>,
        /// Only above `LINEAR_SCAN_MAX` subscribers. Boxed, so that the slots of the many
        /// topics without one stay small.
        #[allow(clippy::box_collection)]
        position_of_fd: Option<Box<HashMap<RawFd, u32>>>,
    },
}

impl<P> Subscribers<P> {
    fn as_slice(&self) -> &[Subscriber<P>] {
        match self {
            Subscribers::One(subscriber) => std::slice::from_ref(subscriber),
            Subscribers::Shared { list, .. } => &list.subscribers,
        }
    }

    fn snapshot(&self) -> Snapshot<P> {
        match self {
            Subscribers::One(subscriber) => Snapshot::One(subscriber.clone()),
            Subscribers::Shared { list, .. } => Snapshot::Shared(Arc::clone(list)),
        }
    }

    fn position_of(&self, fd: RawFd) -> Option<usize> {
        match self {
            Subscribers::Shared {
                position_of_fd: Some(positions),
                ..
            } => positions.get(&fd).map(|&position| position as usize),
            _ => self
                .as_slice()
                .iter()
                .position(|subscriber| subscriber.fd == fd),
        }
    }

    /// Sets the mode of the subscriber at `position`; returns its id and its old mode.
    fn set_mode(&mut self, position: usize, mode: Mode) -> (SubscriptionId, Mode) {
        match self {
            Subscribers::One(subscriber) => {
                let old_mode = std::mem::replace(&mut subscriber.mode, mode);
                (subscriber.id, old_mode)
            }
            Subscribers::Shared { list, .. } => {
                let list = Arc::make_mut(list);
                let subscriber = &mut list.subscribers[position];
                let old_mode = std::mem::replace(&mut subscriber.mode, mode);
                list.utf8_subscribers = list.utf8_subscribers + usize::from(mode.requires_utf8())
                    - usize::from(old_mode.requires_utf8());
                (subscriber.id, old_mode)
            }
        }
    }

    /// Adds a subscriber whose fd is not subscribed yet.
    fn push(&mut self, subscriber: Subscriber<P>) {
        let (list, position_of_fd) = match self {
            Subscribers::One(first) => {
                let utf8_subscribers = usize::from(first.mode.requires_utf8())
                    + usize::from(subscriber.mode.requires_utf8());
                let list = SubscriberList {
                    subscribers: vec![first.clone(), subscriber],
                    utf8_subscribers,
                };
                *self = Subscribers::Shared {
                    list: Arc::new(list),
                    position_of_fd: None,
                };
                return;
            }
            Subscribers::Shared {
                list,
                position_of_fd,
            } => (Arc::make_mut(list), position_of_fd),
        };
        let position = u32::try_from(list.subscribers.len()).expect("fewer than 2^32 fds");
        list.utf8_subscribers += usize::from(subscriber.mode.requires_utf8());
        list.subscribers.push(subscriber);
        match position_of_fd {
            Some(positions) => {
                positions.insert(list.subscribers[position as usize].fd, position);
            }
            None if list.subscribers.len() > LINEAR_SCAN_MAX => {
                let positions = list
                    .subscribers
                    .iter()
                    .zip(0..)
                    .map(|(subscriber, position)| (subscriber.fd, position))
                    .collect();
                *position_of_fd = Some(Box::new(positions));
            }
            None => {}
        }
    }

    /// Removes `fd`'s subscriber from a topic that has others; returns it, if it was there.
    fn remove_one_of_several(&mut self, fd: RawFd) -> Option<Subscriber<P>> {
        let position = self.position_of(fd)?;
        let Subscribers::Shared {
            list,
            position_of_fd,
        } = self
        else {
            unreachable!("a sole subscriber is removed with its topic");
        };
        let list = Arc::make_mut(list);
        let removed = list.subscribers.swap_remove(position);
        list.utf8_subscribers -= usize::from(removed.mode.requires_utf8());
        let remaining = list.subscribers.len();
        if remaining == 1 {
            *self = Subscribers::One(list.subscribers[0].clone());
        } else if remaining <= LINEAR_SCAN_MAX / 2 {
            *position_of_fd = None;
        } else if let Some(positions) = position_of_fd {
            positions.remove(&fd);
            if let Some(moved) = list.subscribers.get(position) {
                positions.insert(moved.fd, position as u32);
            }
        }
        Some(removed)
    }
}

struct Topic<P> {
    name: Box<[u8]>,
    subscribers: Subscribers<P>,
}

struct PeerEntry<P> {
    peer: Arc<P>,
    /// The topics of the fd's subscriptions: the reverse index that makes forgetting an fd
    /// O(these).
    topics: Vec<TopicId>,
    /// How many of them are WebSocket and SSE subscriptions, which decide its keep-alive.
    websocket_subscriptions: u32,
    sse_subscriptions: u32,
}

impl<P> PeerEntry<P> {
    fn mode_count(&mut self, mode: Mode) -> Option<&mut u32> {
        match mode {
            Mode::Raw => None,
            Mode::Sse => Some(&mut self.sse_subscriptions),
            Mode::WsText | Mode::WsBinary | Mode::WsTextId | Mode::WsBinaryId => {
                Some(&mut self.websocket_subscriptions)
            }
        }
    }

    fn count_mode(&mut self, mode: Mode) {
        if let Some(count) = self.mode_count(mode) {
            *count += 1;
        }
    }

    fn uncount_mode(&mut self, mode: Mode) {
        if let Some(count) = self.mode_count(mode) {
            *count -= 1;
        }
    }

    fn keepalive(&self) -> Option<Keepalive> {
        if self.websocket_subscriptions > 0 {
            Some(Keepalive::Ping)
        } else if self.sse_subscriptions > 0 {
            Some(Keepalive::Comment)
        } else {
            None
        }
    }
}

pub(crate) struct Index<P> {
    /// Topics by id; `None` marks a free slot, whose id is in `free_topic_ids`.
    topics: Vec<Option<Topic<P>>>,
    free_topic_ids: Vec<TopicId>,
    /// The id of every topic, found by the hash of its bytes.
    topic_ids: HashTable<TopicId>,
    topic_hasher: RandomState,
    peers: HashMap<RawFd, PeerEntry<P>>,
    /// Every live subscription, by id.
    ids: HashTable<IdEntry>,
    next_id: SubscriptionId,
    /// Topics that gained their first subscriber (`true`) or lost their last, in order, while
    /// a broker routes by interest (`topic_events` is `Some`).
    topic_events: Option<Vec<(Box<[u8]>, bool)>>,
}

impl<P> Default for Index<P> {
    fn default() -> Self {
        Index {
            topics: Vec::new(),
            free_topic_ids: Vec::new(),
            topic_ids: HashTable::new(),
            topic_hasher: RandomState::new(),
            peers: HashMap::new(),
            ids: HashTable::new(),
            next_id: 1,
            topic_events: None,
        }
    }
}

impl<P> Index<P> {
    /// Starts (or stops) recording topics that gain their first subscriber or lose their
    /// last; returns every topic that has a subscriber now.
    pub(crate) fn track_topics(&mut self, on: bool) -> Vec<Box<[u8]>> {
        self.topic_events = on.then(Vec::new);
        self.topics
            .iter()
            .flatten()
            .map(|topic| topic.name.clone())
            .collect()
    }

    /// The topic events recorded since the last call.
    pub(crate) fn take_topic_events(&mut self) -> Vec<(Box<[u8]>, bool)> {
        self.topic_events
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub(crate) fn snapshot(&self, topic: &[u8]) -> Option<Snapshot<P>> {
        Some(self.topic(topic)?.subscribers.snapshot())
    }

    pub(crate) fn mode_of(&self, topic: &[u8], fd: RawFd) -> Option<Mode> {
        let subscribers = &self.topic(topic)?.subscribers;
        let position = subscribers.position_of(fd)?;
        Some(subscribers.as_slice()[position].mode)
    }

    pub(crate) fn peer(&self, fd: RawFd) -> Option<&Arc<P>> {
        self.peers.get(&fd).map(|entry| &entry.peer)
    }

    /// The topic and mode of `fd`'s subscription when it has exactly one.
    pub(crate) fn sole_subscription(&self, fd: RawFd) -> Option<(&[u8], Mode)> {
        let [topic_id] = *self.peers.get(&fd)?.topics.as_slice() else {
            return None;
        };
        let topic = self.topic_by_id(topic_id);
        let position = topic.subscribers.position_of(fd)?;
        Some((&topic.name, topic.subscribers.as_slice()[position].mode))
    }

    pub(crate) fn subscriptions_of(&self, fd: RawFd) -> usize {
        self.peers.get(&fd).map_or(0, |entry| entry.topics.len())
    }

    /// The keep-alive frame `fd` gets when idle, if any.
    pub(crate) fn keepalive_of(&self, fd: RawFd) -> Option<Keepalive> {
        self.peers.get(&fd).and_then(PeerEntry::keepalive)
    }

    /// Calls `visit` with every fd's peer.
    pub(crate) fn for_each_peer(&self, visit: impl FnMut(&Arc<P>)) {
        self.peers.values().map(|entry| &entry.peer).for_each(visit);
    }

    /// Adds a peer for an fd the index does not know yet.
    pub(crate) fn insert_peer(&mut self, fd: RawFd, peer: Arc<P>) {
        let previous = self.peers.insert(
            fd,
            PeerEntry {
                peer,
                topics: Vec::new(),
                websocket_subscriptions: 0,
                sse_subscriptions: 0,
            },
        );
        debug_assert!(previous.is_none(), "insert_peer on a known fd");
    }

    /// Subscribes `fd`, whose peer must be known, to `topic`; subscribing again only sets the
    /// mode and returns the same id. `None` once 2^63 - 1 ids have been handed out.
    pub(crate) fn subscribe(
        &mut self,
        topic: &[u8],
        fd: RawFd,
        mode: Mode,
    ) -> Option<SubscriptionId> {
        let peer_entry = self
            .peers
            .get_mut(&fd)
            .expect("subscribe needs a known peer");
        let hash = self.topic_hasher.hash_one(topic);
        let found = self.topic_ids.find(hash, |&id| {
            Self::slot(&self.topics, id).name.as_ref() == topic
        });
        if let Some(&topic_id) = found {
            let subscribers = &mut Self::slot_mut(&mut self.topics, topic_id).subscribers;
            if let Some(position) = subscribers.position_of(fd) {
                let (id, old_mode) = subscribers.set_mode(position, mode);
                peer_entry.uncount_mode(old_mode);
                peer_entry.count_mode(mode);
                return Some(id);
            }
        }
        if self.next_id == ID_LIMIT {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let subscriber = Subscriber {
            fd,
            mode,
            peer: Arc::clone(&peer_entry.peer),
            id,
        };
        let topic_id = match found {
            Some(&topic_id) => {
                Self::slot_mut(&mut self.topics, topic_id)
                    .subscribers
                    .push(subscriber);
                topic_id
            }
            None => {
                if let Some(events) = &mut self.topic_events {
                    events.push((Box::from(topic), true));
                }
                let new_topic = Topic {
                    name: Box::from(topic),
                    subscribers: Subscribers::One(subscriber),
                };
                let topic_id = match self.free_topic_ids.pop() {
                    Some(topic_id) => {
                        self.topics[topic_id as usize] = Some(new_topic);
                        topic_id
                    }
                    None => {
                        let topic_id =
                            TopicId::try_from(self.topics.len()).expect("fewer than 2^32 topics");
                        self.topics.push(Some(new_topic));
                        topic_id
                    }
                };
                let (topics, hasher) = (&self.topics, &self.topic_hasher);
                self.topic_ids.insert_unique(hash, topic_id, |&id| {
                    hasher.hash_one(&*Self::slot(topics, id).name)
                });
                topic_id
            }
        };
        peer_entry.topics.push(topic_id);
        peer_entry.count_mode(mode);
        let entry = IdEntry {
            fd,
            topic: topic_id,
        };
        let topics = &self.topics;
        self.ids.insert_unique(hash_id(id), entry, |&entry| {
            hash_id(Self::id_at(topics, entry))
        });
        Some(id)
    }

    /// Makes `next` the next id handed out, as if that many subscribes had happened.
    #[cfg(test)]
    pub(crate) fn start_ids_at(&mut self, next: SubscriptionId) {
        self.next_id = next;
    }

    /// Removes one subscription; returns its fd, or `None` for an unknown id.
    pub(crate) fn unsubscribe(&mut self, id: SubscriptionId) -> Option<RawFd> {
        let topics = &self.topics;
        let (IdEntry { fd, topic }, _) = self
            .ids
            .find_entry(hash_id(id), |&entry| Self::id_at(topics, entry) == id)
            .ok()?
            .remove();
        let removed = self.remove_from_topic(topic, fd);
        let entry = self.peers.get_mut(&fd).expect("a live id's fd is known");
        let position = entry.topics.iter().position(|&of_fd| of_fd == topic);
        entry
            .topics
            .swap_remove(position.expect("a live id's topic is among its fd's"));
        entry.uncount_mode(removed.mode);
        Some(fd)
    }

    /// Forgets `fd` entirely; returns its peer and how many subscriptions it had.
    pub(crate) fn remove_peer(&mut self, fd: RawFd) -> Option<(Arc<P>, usize)> {
        let entry = self.peers.remove(&fd)?;
        for &topic in &entry.topics {
            let removed = self.remove_from_topic(topic, fd);
            let this = |live: &IdEntry| live.fd == fd && live.topic == topic;
            if let Ok(live) = self.ids.find_entry(hash_id(removed.id), this) {
                live.remove();
            }
        }
        Some((entry.peer, entry.topics.len()))
    }

    /// Empties the index; returns every peer it held.
    pub(crate) fn take_all(&mut self) -> Vec<Arc<P>> {
        if let Some(events) = &mut self.topic_events {
            events.extend(
                self.topics
                    .iter_mut()
                    .flatten()
                    .map(|topic| (topic.name.clone(), false)),
            );
        }
        self.topics.clear();
        self.free_topic_ids.clear();
        self.topic_ids.clear();
        self.ids.clear();
        self.peers.drain().map(|(_, entry)| entry.peer).collect()
    }

    /// Writes up to `out.len()` fds subscribed to `topic` into `out`; returns how many there are.
    pub(crate) fn subscribers_into(&self, topic: &[u8], out: &mut [RawFd]) -> usize {
        let Some(topic) = self.topic(topic) else {
            return 0;
        };
        let subscribers = topic.subscribers.as_slice();
        for (slot, subscriber) in out.iter_mut().zip(subscribers) {
            *slot = subscriber.fd;
        }
        subscribers.len()
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.ids.len()
    }

    pub(crate) fn topic_count(&self) -> usize {
        self.topic_ids.len()
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    fn topic(&self, topic: &[u8]) -> Option<&Topic<P>> {
        let hash = self.topic_hasher.hash_one(topic);
        let &id = self.topic_ids.find(hash, |&id| {
            Self::slot(&self.topics, id).name.as_ref() == topic
        })?;
        Some(self.topic_by_id(id))
    }

    fn topic_by_id(&self, id: TopicId) -> &Topic<P> {
        Self::slot(&self.topics, id)
    }

    /// The topic in slot `id`, which an fd's subscription or the hash table names, so it is
    /// never free. (A function of the slab alone, so that the hash table's callbacks can
    /// borrow the slab while the table itself is borrowed mutably.)
    fn slot(topics: &[Option<Topic<P>>], id: TopicId) -> &Topic<P> {
        topics[id as usize].as_ref().expect("a live topic id")
    }

    /// The id of a live subscription.
    fn id_at(topics: &[Option<Topic<P>>], entry: IdEntry) -> SubscriptionId {
        let subscribers = &Self::slot(topics, entry.topic).subscribers;
        let position = subscribers
            .position_of(entry.fd)
            .expect("a live id's fd subscribes to its topic");
        subscribers.as_slice()[position].id
    }

    fn slot_mut(topics: &mut [Option<Topic<P>>], id: TopicId) -> &mut Topic<P> {
        topics[id as usize].as_mut().expect("a live topic id")
    }

    /// Removes `fd`'s subscriber from the topic, and the topic if it was the last; returns
    /// the subscriber.
    fn remove_from_topic(&mut self, topic_id: TopicId, fd: RawFd) -> Subscriber<P> {
        let topic = Self::slot_mut(&mut self.topics, topic_id);
        if let Subscribers::Shared { .. } = topic.subscribers {
            return topic
                .subscribers
                .remove_one_of_several(fd)
                .expect("an fd's subscription names a topic it is in");
        }
        let hash = self.topic_hasher.hash_one(&*topic.name);
        self.topic_ids
            .find_entry(hash, |&id| id == topic_id)
            .expect("a live topic is in the table")
            .remove();
        self.free_topic_ids.push(topic_id);
        let gone = self.topics[topic_id as usize]
            .take()
            .expect("a live topic id");
        if let Some(events) = &mut self.topic_events {
            events.push((gone.name, false));
        }
        let Subscribers::One(sole) = gone.subscribers else {
            unreachable!("a topic with several subscribers was handled above");
        };
        debug_assert_eq!(sole.fd, fd, "an fd's subscription names a topic it is in");
        sole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_with_peers(fds: &[RawFd]) -> Index<()> {
        let mut index = Index::default();
        for &fd in fds {
            index.insert_peer(fd, Arc::new(()));
        }
        index
    }

    fn fds_of(index: &Index<()>, topic: &[u8]) -> Vec<RawFd> {
        let mut fds = vec![0; 16];
        let count = index.subscribers_into(topic, &mut fds);
        fds.truncate(count);
        fds.sort();
        fds
    }

    #[test]
    fn topic_events_record_first_and_last_subscribers() {
        let mut index = index_with_peers(&[3, 4]);
        index.subscribe(b"before", 3, Mode::Raw).unwrap();
        assert_eq!(index.track_topics(true), vec![Box::from(&b"before"[..])]);
        let a = index.subscribe(b"a", 3, Mode::Raw).unwrap();
        index.subscribe(b"a", 4, Mode::Raw).unwrap();
        index.subscribe(b"b", 4, Mode::Raw).unwrap();
        index.unsubscribe(a);
        index.remove_peer(4);
        let events = index.take_topic_events();
        let events: Vec<(&[u8], bool)> = events.iter().map(|(t, on)| (&**t, *on)).collect();
        assert_eq!(
            events,
            vec![
                (&b"a"[..], true),
                (&b"b"[..], true),
                (&b"a"[..], false),
                (&b"b"[..], false)
            ]
        );
        index.take_all();
        assert_eq!(
            index.take_topic_events(),
            vec![(Box::from(&b"before"[..]), false)]
        );
        index.track_topics(false);
        index.insert_peer(5, Arc::new(()));
        index.subscribe(b"c", 5, Mode::Raw).unwrap();
        assert!(index.take_topic_events().is_empty());
    }

    #[test]
    fn subscribe_is_idempotent_per_topic_and_fd() {
        let mut index = index_with_peers(&[3]);
        let first = index.subscribe(b"news", 3, Mode::Raw).unwrap();
        let again = index.subscribe(b"news", 3, Mode::Sse).unwrap();
        assert_eq!(first, again);
        assert_eq!(index.subscription_count(), 1);
        assert_eq!(index.mode_of(b"news", 3), Some(Mode::Sse));
        assert_eq!(index.snapshot(b"news").unwrap().utf8_subscribers(), 1);
        index.subscribe(b"news", 3, Mode::WsBinary).unwrap();
        assert_eq!(index.snapshot(b"news").unwrap().utf8_subscribers(), 0);
    }

    #[test]
    fn ids_are_positive_and_distinct() {
        let mut index = index_with_peers(&[3, 4]);
        let a = index.subscribe(b"a", 3, Mode::Raw).unwrap();
        let b = index.subscribe(b"a", 4, Mode::Raw).unwrap();
        let c = index.subscribe(b"b", 3, Mode::Raw).unwrap();
        assert!(a > 0 && b > 0 && c > 0);
        assert!(a != b && b != c && a != c);
    }

    #[test]
    fn an_id_stays_unique_across_fd_reuse() {
        let mut index = index_with_peers(&[0, 7]);
        let zero = index.subscribe(b"t", 0, Mode::Raw).unwrap();
        assert!(zero > 0, "fd 0 still gets a positive id");
        let old = index.subscribe(b"t", 7, Mode::Raw).unwrap();
        index.remove_peer(7);
        index.insert_peer(7, Arc::new(()));
        let new = index.subscribe(b"t", 7, Mode::Raw).unwrap();
        assert_ne!(old, new);
        assert_eq!(
            index.unsubscribe(old),
            None,
            "a stale id does not touch the new one"
        );
        assert_eq!(index.unsubscribe(new), Some(7));
        assert_eq!(index.unsubscribe(u64::MAX), None);
    }

    #[test]
    fn ids_never_repeat_past_the_32_bit_mark() {
        let mut index = index_with_peers(&[7]);
        let first = index.subscribe(b"first", 7, Mode::Raw).unwrap();
        assert_eq!(index.unsubscribe(first), Some(7));
        index.start_ids_at(u64::from(u32::MAX));
        let later: Vec<SubscriptionId> = [&b"a"[..], b"b", b"c"]
            .iter()
            .map(|topic| index.subscribe(topic, 7, Mode::Raw).unwrap())
            .collect();
        assert!(!later.contains(&first), "{first} handed out again");
        assert!(later.iter().all(|&id| id > 0 && id < 1 << 63));
        assert_eq!(
            index.unsubscribe(first),
            None,
            "a stale id removed a live one"
        );
        assert_eq!(index.subscription_count(), 3);
    }

    #[test]
    fn unsubscribe_removes_one_subscription_and_empty_topics() {
        let mut index = index_with_peers(&[3, 4]);
        let a = index.subscribe(b"t", 3, Mode::Raw).unwrap();
        let b = index.subscribe(b"t", 4, Mode::WsText).unwrap();
        assert_eq!(index.unsubscribe(a), Some(3));
        assert_eq!(index.unsubscribe(a), None);
        assert_eq!(fds_of(&index, b"t"), vec![4]);
        assert_eq!(index.subscriptions_of(3), 0);
        assert_eq!(index.sole_subscription(3), None);
        assert_eq!(index.sole_subscription(4), Some((&b"t"[..], Mode::WsText)));
        let c = index.subscribe(b"u", 4, Mode::Raw).unwrap();
        assert_eq!(index.sole_subscription(4), None, "two subscriptions");
        index.unsubscribe(c);
        index.unsubscribe(b);
        assert_eq!(index.topic_count(), 0);
        assert!(index.snapshot(b"t").is_none());
    }

    #[test]
    fn swap_remove_keeps_positions_right() {
        let mut index = index_with_peers(&[1, 2, 3, 4]);
        let ids: Vec<_> = [1, 2, 3, 4]
            .iter()
            .map(|&fd| index.subscribe(b"t", fd, Mode::Raw).unwrap())
            .collect();
        index.unsubscribe(ids[0]);
        assert_eq!(index.mode_of(b"t", 4), Some(Mode::Raw));
        index.subscribe(b"t", 4, Mode::Sse).unwrap();
        assert_eq!(index.mode_of(b"t", 4), Some(Mode::Sse));
        assert_eq!(index.mode_of(b"t", 2), Some(Mode::Raw));
        assert_eq!(fds_of(&index, b"t"), vec![2, 3, 4]);
    }

    #[test]
    fn remove_peer_drops_every_topic_of_the_fd_only() {
        let mut index = index_with_peers(&[5, 6]);
        for topic in [&b"a"[..], b"b", b"c"] {
            index.subscribe(topic, 5, Mode::Raw).unwrap();
        }
        index.subscribe(b"a", 6, Mode::Raw).unwrap();
        let (_, dropped) = index.remove_peer(5).unwrap();
        assert_eq!(dropped, 3);
        assert_eq!(index.subscription_count(), 1);
        assert_eq!(index.topic_count(), 1);
        assert_eq!(fds_of(&index, b"a"), vec![6]);
        assert!(index.peer(5).is_none());
        assert!(index.remove_peer(5).is_none());
    }

    #[test]
    fn a_snapshot_is_unaffected_by_later_changes() {
        let mut index = index_with_peers(&[1, 2]);
        index.subscribe(b"t", 1, Mode::Raw).unwrap();
        let snapshot = index.snapshot(b"t").unwrap();
        index.subscribe(b"t", 2, Mode::Raw).unwrap();
        assert_eq!(snapshot.subscribers().len(), 1);
        assert_eq!(index.snapshot(b"t").unwrap().subscribers().len(), 2);
    }

    #[test]
    fn subscribers_into_reports_the_total_beyond_capacity() {
        let mut index = index_with_peers(&[1, 2, 3]);
        for fd in 1..=3 {
            index.subscribe(b"t", fd, Mode::Raw).unwrap();
        }
        let mut one = [0; 1];
        assert_eq!(index.subscribers_into(b"t", &mut one), 3);
        assert!((1..=3).contains(&one[0]));
        assert_eq!(index.subscribers_into(b"t", &mut []), 3);
        assert_eq!(index.subscribers_into(b"none", &mut one), 0);
    }

    #[test]
    fn take_all_empties_everything() {
        let mut index = index_with_peers(&[1, 2]);
        index.subscribe(b"t", 1, Mode::Raw).unwrap();
        index.subscribe(b"u", 2, Mode::Raw).unwrap();
        assert_eq!(index.take_all().len(), 2);
        assert_eq!(
            (
                index.subscription_count(),
                index.topic_count(),
                index.peer_count()
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_topic_goes_from_inline_to_shared_and_back() {
        let mut index = index_with_peers(&[1, 2]);
        let first = index.subscribe(b"t", 1, Mode::Sse).unwrap();
        let alone = index.snapshot(b"t").unwrap();
        assert!(matches!(alone, Snapshot::One(_)));
        let second = index.subscribe(b"t", 2, Mode::WsText).unwrap();
        let together = index.snapshot(b"t").unwrap();
        assert!(matches!(together, Snapshot::Shared(_)));
        assert_eq!(together.utf8_subscribers(), 2);
        assert_eq!(
            alone.subscribers().len(),
            1,
            "a snapshot keeps its one subscriber"
        );

        assert_eq!(index.unsubscribe(first), Some(1));
        let back_alone = index.snapshot(b"t").unwrap();
        assert!(matches!(back_alone, Snapshot::One(_)));
        assert_eq!(back_alone.subscribers()[0].fd, 2);
        assert_eq!(back_alone.utf8_subscribers(), 1);
        assert_eq!(
            together.subscribers().len(),
            2,
            "nor does a shared one change"
        );
        assert_eq!(
            index.subscribe(b"t", 2, Mode::Raw).unwrap(),
            second,
            "the moved subscriber keeps its id"
        );
        assert_eq!(index.snapshot(b"t").unwrap().utf8_subscribers(), 0);
        assert_eq!(back_alone.subscribers()[0].mode, Mode::WsText);
        assert_eq!(index.sole_subscription(2), Some((&b"t"[..], Mode::Raw)));
    }

    #[test]
    fn a_large_topic_keeps_positions_right_through_its_map() {
        let fds: Vec<RawFd> = (1..=20).collect();
        let mut index = index_with_peers(&fds);
        let ids: Vec<_> = fds
            .iter()
            .map(|&fd| index.subscribe(b"big", fd, Mode::Raw).unwrap())
            .collect();
        let mut remaining = fds.clone();
        // From the middle, then down past the size at which the map is dropped, and to one.
        for victim in [
            10, 3, 20, 1, 15, 7, 8, 9, 2, 4, 5, 6, 11, 12, 13, 14, 16, 17, 18,
        ] {
            assert_eq!(index.unsubscribe(ids[victim as usize - 1]), Some(victim));
            remaining.retain(|&fd| fd != victim);
            let subscribers = &index.topic(b"big").unwrap().subscribers;
            for &fd in &remaining {
                let position = subscribers.position_of(fd).expect("still subscribed");
                assert_eq!(subscribers.as_slice()[position].fd, fd);
            }
            assert_eq!(index.mode_of(b"big", victim), None);
            let mut out = vec![0; 32];
            let count = index.subscribers_into(b"big", &mut out);
            out.truncate(count);
            out.sort();
            assert_eq!(out, remaining);
        }
        assert_eq!(remaining, vec![19]);
        assert_eq!(index.subscribe(b"big", 19, Mode::Sse).unwrap(), ids[18]);
        // And back up past the threshold.
        for fd in 1..=12 {
            index.subscribe(b"big", fd, Mode::WsBinary).unwrap();
        }
        assert_eq!(index.mode_of(b"big", 19), Some(Mode::Sse));
        assert_eq!(index.mode_of(b"big", 12), Some(Mode::WsBinary));
        assert_eq!(index.snapshot(b"big").unwrap().utf8_subscribers(), 1);
        assert_eq!(index.subscription_count(), 13);
    }

    #[test]
    fn a_reused_topic_slot_does_not_revive_stale_ids() {
        let mut index = index_with_peers(&[3, 4]);
        let old = index.subscribe(b"old", 3, Mode::Raw).unwrap();
        assert_eq!(index.unsubscribe(old), Some(3));
        assert_eq!(index.topic_count(), 0);
        let new = index.subscribe(b"new", 3, Mode::Raw).unwrap();
        assert_eq!(index.topics.len(), 1, "the free slot was reused");
        assert_eq!(index.unsubscribe(old), None);
        assert!(index.snapshot(b"old").is_none());
        assert_eq!(fds_of(&index, b"new"), vec![3]);
        let other = index.subscribe(b"other", 4, Mode::Raw).unwrap();
        index.remove_peer(3);
        assert_eq!(index.unsubscribe(new), None);
        index.subscribe(b"again", 4, Mode::Raw).unwrap();
        assert_eq!(index.topics.len(), 2);
        assert_eq!(index.topic_count(), 2);
        assert_eq!(index.unsubscribe(other), Some(4));
    }

    #[test]
    fn keepalive_follows_the_modes_of_an_fds_subscriptions() {
        let mut index = index_with_peers(&[1, 2]);
        assert_eq!(index.keepalive_of(1), None);
        let raw = index.subscribe(b"a", 1, Mode::Raw).unwrap();
        assert_eq!(index.keepalive_of(1), None, "RAW streams get none");
        let sse = index.subscribe(b"b", 1, Mode::Sse).unwrap();
        assert_eq!(index.keepalive_of(1), Some(Keepalive::Comment));
        index.subscribe(b"a", 1, Mode::WsText).unwrap();
        assert_eq!(index.keepalive_of(1), Some(Keepalive::Ping), "a ping wins");
        index.subscribe(b"a", 2, Mode::WsBinary).unwrap();
        assert_eq!(
            index.unsubscribe(raw),
            Some(1),
            "the same id after a mode change"
        );
        assert_eq!(index.keepalive_of(1), Some(Keepalive::Comment));
        index.subscribe(b"b", 1, Mode::Raw).unwrap();
        assert_eq!(index.keepalive_of(1), None);
        assert_eq!(index.unsubscribe(sse), Some(1));
        assert_eq!(index.keepalive_of(2), Some(Keepalive::Ping));
        index.remove_peer(2);
        assert_eq!(index.keepalive_of(2), None);
        for mode in [Mode::WsTextId, Mode::WsBinaryId] {
            let id_mode = index.subscribe(b"c", 1, mode).unwrap();
            assert_eq!(
                index.keepalive_of(1),
                Some(Keepalive::Ping),
                "{mode:?} is WebSocket"
            );
            index.unsubscribe(id_mode);
        }
    }

    #[test]
    fn ids_run_out_below_two_to_the_63_rather_than_repeat() {
        let mut index = index_with_peers(&[1]);
        index.start_ids_at(ID_LIMIT - 1);
        let last = index.subscribe(b"a", 1, Mode::Raw).unwrap();
        assert_eq!(last, i64::MAX as u64);
        assert_eq!(index.subscribe(b"b", 1, Mode::Raw), None);
        assert_eq!(
            index.subscribe(b"a", 1, Mode::Sse),
            Some(last),
            "an existing one still"
        );
        assert_eq!(index.subscription_count(), 1);
        assert_eq!(index.unsubscribe(last), Some(1));
        assert_eq!(
            index.subscribe(b"a", 1, Mode::Raw),
            None,
            "not even a freed one"
        );
    }

    #[test]
    fn a_topic_slot_stays_small() {
        // The memory budget of a one-subscriber topic rests on this: name, inline subscriber.
        assert!(std::mem::size_of::<Option<Topic<()>>>() <= 40);
    }
}
