//! Topics ↔ subscriptions ↔ fds, with the reverse index that makes forgetting an fd cost
//! O(its subscriptions). Pure bookkeeping: no I/O and no locks; the registry wraps it in one
//! `RwLock`.
//!
//! A subscription id carries its fd in the high 32 bits and a serial number in the low 32, so
//! resolving an id needs no map of its own: the fd's entry lists its (id, topic) pairs. That
//! keeps a subscription at about 80 bytes (its slot in the topic's list, the topic's fd → slot
//! map, and the fd's list) beyond the topic's bytes, which all of a topic's subscriptions share.
//!
//! Each topic's subscribers live in an `Arc`'d list that a publish clones (one atomic
//! increment) and then walks with no lock held. A change to a topic copies its list only
//! while a publish still holds the old one (`Arc::make_mut`), so subscribing is O(1)
//! amortised when no publish is in flight on that topic.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::frame::Mode;

/// Identifies one (topic, fd) subscription; always > 0 and below 2^63.
pub type SubscriptionId = u64;

fn subscription_id(fd: RawFd, serial: u32) -> SubscriptionId {
    (u64::from(fd as u32) << 32) | u64::from(serial)
}

fn fd_of(id: SubscriptionId) -> RawFd {
    (id >> 32) as u32 as RawFd
}

pub(crate) struct Subscriber<P> {
    pub(crate) fd: RawFd,
    pub(crate) mode: Mode,
    pub(crate) id: SubscriptionId,
    pub(crate) peer: Arc<P>,
}

impl<P> Clone for Subscriber<P> {
    fn clone(&self) -> Self {
        Subscriber {
            fd: self.fd,
            mode: self.mode,
            id: self.id,
            peer: Arc::clone(&self.peer),
        }
    }
}

/// The subscribers of one topic, as a publish sees them.
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

impl<P> SubscriberList<P> {
    pub(crate) fn subscribers(&self) -> &[Subscriber<P>] {
        &self.subscribers
    }

    pub(crate) fn utf8_subscribers(&self) -> usize {
        self.utf8_subscribers
    }
}

struct Topic<P> {
    /// The topic's bytes, shared with the map key and every subscribed fd's entry.
    name: Arc<[u8]>,
    list: Arc<SubscriberList<P>>,
    position_of_fd: HashMap<RawFd, u32>,
}

struct PeerEntry<P> {
    peer: Arc<P>,
    /// The fd's subscriptions: the reverse index that makes forgetting an fd O(these).
    subscriptions: Vec<(SubscriptionId, Arc<[u8]>)>,
}

pub(crate) struct Index<P> {
    topics: HashMap<Arc<[u8]>, Topic<P>>,
    peers: HashMap<RawFd, PeerEntry<P>>,
    subscription_count: usize,
    last_serial: u32,
}

impl<P> Default for Index<P> {
    fn default() -> Self {
        Index {
            topics: HashMap::new(),
            peers: HashMap::new(),
            subscription_count: 0,
            last_serial: 0,
        }
    }
}

impl<P> Index<P> {
    pub(crate) fn snapshot(&self, topic: &[u8]) -> Option<Arc<SubscriberList<P>>> {
        self.topics.get(topic).map(|topic| Arc::clone(&topic.list))
    }

    pub(crate) fn mode_of(&self, topic: &[u8], fd: RawFd) -> Option<Mode> {
        let topic = self.topics.get(topic)?;
        let position = *topic.position_of_fd.get(&fd)?;
        Some(topic.list.subscribers[position as usize].mode)
    }

    pub(crate) fn peer(&self, fd: RawFd) -> Option<&Arc<P>> {
        self.peers.get(&fd).map(|entry| &entry.peer)
    }

    /// The topic and mode of `fd`'s subscription when it has exactly one.
    pub(crate) fn sole_subscription(&self, fd: RawFd) -> Option<(&[u8], Mode)> {
        let [(_, topic)] = self.peers.get(&fd)?.subscriptions.as_slice() else {
            return None;
        };
        Some((topic, self.mode_of(topic, fd)?))
    }

    pub(crate) fn subscriptions_of(&self, fd: RawFd) -> usize {
        self.peers
            .get(&fd)
            .map_or(0, |entry| entry.subscriptions.len())
    }

    /// Adds a peer for an fd the index does not know yet.
    pub(crate) fn insert_peer(&mut self, fd: RawFd, peer: Arc<P>) {
        let previous = self.peers.insert(
            fd,
            PeerEntry {
                peer,
                subscriptions: Vec::new(),
            },
        );
        debug_assert!(previous.is_none(), "insert_peer on a known fd");
    }

    /// Subscribes `fd`, whose peer must be known, to `topic`; subscribing again only sets the
    /// mode and returns the same id.
    pub(crate) fn subscribe(&mut self, topic: &[u8], fd: RawFd, mode: Mode) -> SubscriptionId {
        let peer_entry = self
            .peers
            .get_mut(&fd)
            .expect("subscribe needs a known peer");
        if !self.topics.contains_key(topic) {
            let name: Arc<[u8]> = Arc::from(topic);
            let empty = Topic {
                name: Arc::clone(&name),
                list: Arc::new(SubscriberList {
                    subscribers: Vec::new(),
                    utf8_subscribers: 0,
                }),
                position_of_fd: HashMap::new(),
            };
            self.topics.insert(name, empty);
        }
        let topic_entry = self.topics.get_mut(topic).expect("inserted above");
        if let Some(&position) = topic_entry.position_of_fd.get(&fd) {
            let list = Arc::make_mut(&mut topic_entry.list);
            let subscriber = &mut list.subscribers[position as usize];
            let old_mode = std::mem::replace(&mut subscriber.mode, mode);
            list.utf8_subscribers = list.utf8_subscribers + usize::from(mode.requires_utf8())
                - usize::from(old_mode.requires_utf8());
            return subscriber.id;
        }
        // Serial 0 is skipped so that an id is never 0, even for fd 0.
        self.last_serial = self.last_serial.checked_add(1).unwrap_or(1);
        let id = subscription_id(fd, self.last_serial);
        let list = Arc::make_mut(&mut topic_entry.list);
        let position = u32::try_from(list.subscribers.len()).expect("fewer than 2^32 fds");
        topic_entry.position_of_fd.insert(fd, position);
        list.subscribers.push(Subscriber {
            fd,
            mode,
            id,
            peer: Arc::clone(&peer_entry.peer),
        });
        list.utf8_subscribers += usize::from(mode.requires_utf8());
        peer_entry
            .subscriptions
            .push((id, Arc::clone(&topic_entry.name)));
        self.subscription_count += 1;
        id
    }

    /// Removes one subscription; returns its fd, or `None` for an unknown id.
    pub(crate) fn unsubscribe(&mut self, id: SubscriptionId) -> Option<RawFd> {
        let fd = fd_of(id);
        let entry = self.peers.get_mut(&fd)?;
        let index = entry
            .subscriptions
            .iter()
            .position(|(subscription, _)| *subscription == id)?;
        let (_, topic) = entry.subscriptions.swap_remove(index);
        self.subscription_count -= 1;
        self.remove_from_topic(&topic, fd);
        Some(fd)
    }

    /// Forgets `fd` entirely; returns its peer and how many subscriptions it had.
    pub(crate) fn remove_peer(&mut self, fd: RawFd) -> Option<(Arc<P>, usize)> {
        let entry = self.peers.remove(&fd)?;
        for (_, topic) in &entry.subscriptions {
            self.remove_from_topic(topic, fd);
        }
        self.subscription_count -= entry.subscriptions.len();
        Some((entry.peer, entry.subscriptions.len()))
    }

    /// Empties the index; returns every peer it held.
    pub(crate) fn take_all(&mut self) -> Vec<Arc<P>> {
        self.topics.clear();
        self.subscription_count = 0;
        self.peers.drain().map(|(_, entry)| entry.peer).collect()
    }

    /// Writes up to `out.len()` fds subscribed to `topic` into `out`; returns how many there are.
    pub(crate) fn subscribers_into(&self, topic: &[u8], out: &mut [RawFd]) -> usize {
        let Some(topic) = self.topics.get(topic) else {
            return 0;
        };
        for (slot, subscriber) in out.iter_mut().zip(&topic.list.subscribers) {
            *slot = subscriber.fd;
        }
        topic.list.subscribers.len()
    }

    /// Calls `visit` with every subscription's fd, mode and peer.
    pub(crate) fn for_each_subscriber(&self, mut visit: impl FnMut(&Subscriber<P>)) {
        for topic in self.topics.values() {
            topic.list.subscribers.iter().for_each(&mut visit);
        }
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.subscription_count
    }

    pub(crate) fn topic_count(&self) -> usize {
        self.topics.len()
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    fn remove_from_topic(&mut self, topic: &[u8], fd: RawFd) {
        let Some(topic_entry) = self.topics.get_mut(topic) else {
            return;
        };
        let Some(position) = topic_entry.position_of_fd.remove(&fd) else {
            return;
        };
        if topic_entry.position_of_fd.is_empty() {
            self.topics.remove(topic);
            return;
        }
        let list = Arc::make_mut(&mut topic_entry.list);
        let removed = list.subscribers.swap_remove(position as usize);
        list.utf8_subscribers -= usize::from(removed.mode.requires_utf8());
        if let Some(moved) = list.subscribers.get(position as usize) {
            topic_entry.position_of_fd.insert(moved.fd, position);
        }
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
    fn subscribe_is_idempotent_per_topic_and_fd() {
        let mut index = index_with_peers(&[3]);
        let first = index.subscribe(b"news", 3, Mode::Raw);
        let again = index.subscribe(b"news", 3, Mode::Sse);
        assert_eq!(first, again);
        assert_eq!(index.subscription_count(), 1);
        assert_eq!(index.mode_of(b"news", 3), Some(Mode::Sse));
        assert_eq!(index.snapshot(b"news").unwrap().utf8_subscribers(), 1);
        index.subscribe(b"news", 3, Mode::WsBinary);
        assert_eq!(index.snapshot(b"news").unwrap().utf8_subscribers(), 0);
    }

    #[test]
    fn ids_are_positive_and_distinct() {
        let mut index = index_with_peers(&[3, 4]);
        let a = index.subscribe(b"a", 3, Mode::Raw);
        let b = index.subscribe(b"a", 4, Mode::Raw);
        let c = index.subscribe(b"b", 3, Mode::Raw);
        assert!(a > 0 && b > 0 && c > 0);
        assert!(a != b && b != c && a != c);
    }

    #[test]
    fn an_id_names_its_fd_and_stays_unique_across_fd_reuse() {
        let mut index = index_with_peers(&[0, 7]);
        let zero = index.subscribe(b"t", 0, Mode::Raw);
        assert!(zero > 0, "fd 0 still gets a positive id");
        let old = index.subscribe(b"t", 7, Mode::Raw);
        assert_eq!(fd_of(old), 7);
        index.remove_peer(7);
        index.insert_peer(7, Arc::new(()));
        let new = index.subscribe(b"t", 7, Mode::Raw);
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
    fn unsubscribe_removes_one_subscription_and_empty_topics() {
        let mut index = index_with_peers(&[3, 4]);
        let a = index.subscribe(b"t", 3, Mode::Raw);
        let b = index.subscribe(b"t", 4, Mode::WsText);
        assert_eq!(index.unsubscribe(a), Some(3));
        assert_eq!(index.unsubscribe(a), None);
        assert_eq!(fds_of(&index, b"t"), vec![4]);
        assert_eq!(index.subscriptions_of(3), 0);
        assert_eq!(index.sole_subscription(3), None);
        assert_eq!(index.sole_subscription(4), Some((&b"t"[..], Mode::WsText)));
        let c = index.subscribe(b"u", 4, Mode::Raw);
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
            .map(|&fd| index.subscribe(b"t", fd, Mode::Raw))
            .collect();
        index.unsubscribe(ids[0]);
        assert_eq!(index.mode_of(b"t", 4), Some(Mode::Raw));
        index.subscribe(b"t", 4, Mode::Sse);
        assert_eq!(index.mode_of(b"t", 4), Some(Mode::Sse));
        assert_eq!(index.mode_of(b"t", 2), Some(Mode::Raw));
        assert_eq!(fds_of(&index, b"t"), vec![2, 3, 4]);
    }

    #[test]
    fn remove_peer_drops_every_topic_of_the_fd_only() {
        let mut index = index_with_peers(&[5, 6]);
        for topic in [&b"a"[..], b"b", b"c"] {
            index.subscribe(topic, 5, Mode::Raw);
        }
        index.subscribe(b"a", 6, Mode::Raw);
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
        index.subscribe(b"t", 1, Mode::Raw);
        let snapshot = index.snapshot(b"t").unwrap();
        index.subscribe(b"t", 2, Mode::Raw);
        assert_eq!(snapshot.subscribers.len(), 1);
        assert_eq!(index.snapshot(b"t").unwrap().subscribers.len(), 2);
    }

    #[test]
    fn subscribers_into_reports_the_total_beyond_capacity() {
        let mut index = index_with_peers(&[1, 2, 3]);
        for fd in 1..=3 {
            index.subscribe(b"t", fd, Mode::Raw);
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
        index.subscribe(b"t", 1, Mode::Raw);
        index.subscribe(b"u", 2, Mode::Raw);
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
}
