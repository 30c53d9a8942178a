//! The registry's side of cross-process fan-out: enabling and disabling a broker, handing it
//! the topics of interest, and delivering what it receives. The engines are in `crate::broker`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::Registry;
use crate::broker::{Broker, BrokerStats, Handoff, PgStats, Received, Scheme};
use crate::error::Error;
use crate::io;
use crate::reactor::Reactor;
use std::os::fd::RawFd;

/// The registry's broker, when one is enabled, and the [`Handoff`] that outlives it: a
/// publish checks and queues through the hand-off with no lock and no reference count, and
/// takes the broker only when the engine should be driven for it now.
#[derive(Default)]
pub(super) struct BrokerSlot {
    /// Read-locked only to clone the `Arc` out: the broker's own locks are never held while
    /// delivering.
    current: RwLock<Option<Arc<Broker>>>,
    handoff: Arc<Handoff>,
}

impl BrokerSlot {
    pub(super) fn read(&self) -> RwLockReadGuard<'_, Option<Arc<Broker>>> {
        self.current.read()
    }

    fn write(&self) -> RwLockWriteGuard<'_, Option<Arc<Broker>>> {
        self.current.write()
    }

    /// Refuses, before anything is written anywhere, a publish the engine cannot carry.
    pub(super) fn check(&self, topic: &[u8], payload: &[u8]) -> Result<(), Error> {
        self.handoff.check(topic, payload)
    }

    /// Whether the broker installed last shares history, and history is on.
    pub(super) fn shares_history(&self) -> bool {
        self.handoff.shares_history()
    }

    /// Records new history limits for the engine; returns whether history was switched on or
    /// off while a sharing broker is installed.
    pub(super) fn set_history(&self, limits: crate::history::HistoryLimits) -> bool {
        self.handoff.set_history(limits)
    }

    /// [`BrokerSlot::forward`] for a publish whose history is shared (see
    /// [`Handoff::push_shared_publish`]).
    pub(super) fn forward_shared(
        &self,
        topic: &[u8],
        payload: &[u8],
        except: Option<RawFd>,
        reactor: &Reactor,
    ) {
        if self.handoff.push_shared_publish(topic, payload, except) {
            let broker = self.read().clone();
            if let Some(broker) = broker {
                broker.kick(reactor);
            }
        }
    }

    /// Queues a publish (already checked) and, if the engine can take it now and no other
    /// thread is driving the engine, writes what is queued.
    pub(super) fn forward(&self, topic: &[u8], payload: &[u8], reactor: &Reactor) {
        if self.handoff.push_publish(topic, payload) {
            let broker = self.read().clone();
            if let Some(broker) = broker {
                broker.kick(reactor);
            }
        }
    }
}

impl Registry {
    /// Connects to the engine `url` names (`postgresql://` or a libpq conninfo, `redis://`,
    /// `redis+cluster://host:port[,host:port…]` (sharded pub/sub, Redis 7+), `nats://`) and returns once the session is up and every topic that has a local
    /// subscriber now is subscribed on the engine. `name` is the PostgreSQL channel, or the
    /// Redis channel / NATS subject prefix. From then on every publish is also forwarded, and
    /// other publishers' messages are delivered to local subscribers by `dispatch` (or
    /// [`Registry::broker_poll_once`]). Blocks only the calling thread.
    pub fn broker_enable(&self, url: &str, name: &str) -> Result<(), Error> {
        self.enable_broker(Scheme::of(url)?, url, name)
    }

    /// [`Registry::broker_enable`] with PostgreSQL, whatever the conninfo looks like.
    pub fn pg_enable(&self, conninfo: &str, channel: &str) -> Result<(), Error> {
        self.enable_broker(Scheme::Postgres, conninfo, channel)
    }

    fn enable_broker(&self, scheme: Scheme, url: &str, name: &str) -> Result<(), Error> {
        let already = Error::Already("a broker is already enabled: disable it first");
        if self.broker_enabled.load(Ordering::Acquire)
            || self.broker_enabling.swap(true, Ordering::AcqRel)
        {
            return Err(already);
        }
        let result = if self.broker_enabled.load(Ordering::Acquire) {
            Err(already)
        } else {
            self.connect_and_install(scheme, url, name)
        };
        self.broker_enabling.store(false, Ordering::Release);
        result
    }

    fn connect_and_install(&self, scheme: Scheme, url: &str, name: &str) -> Result<(), Error> {
        let (broker, deadline) =
            Broker::connect(scheme, url, name, &self.reactor, &self.broker.handoff)?;
        let broker = Arc::new(broker);
        {
            // Under the index lock, so that no topic is born or dies between the snapshot and
            // the start of the recording.
            let mut index = self.index.write();
            let topics = index.track_topics(broker.routes_interest());
            for topic in &topics {
                broker.interest(topic, true);
            }
            *self.broker.write() = Some(Arc::clone(&broker));
            self.broker_enabled.store(true, Ordering::Release);
        }
        if broker.shares_history() {
            // Every topic's history starts anew, its ids the stream's from now on.
            self.restart_histories();
        }
        let mut received = Vec::new();
        let settled = broker.settle(&self.reactor, deadline, &mut received);
        self.deliver_received(received);
        if let Err(err) = settled {
            self.broker_disable();
            return Err(err);
        }
        self.arm_timer();
        Ok(())
    }

    /// Disconnects the broker (after pushing out what it still buffers, for up to a second);
    /// the registry is local-only again. A no-op when none is enabled.
    pub fn broker_disable(&self) {
        let broker = {
            let mut index = self.index.write();
            index.track_topics(false);
            self.broker_enabled.store(false, Ordering::Release);
            self.broker.write().take()
        };
        if let Some(broker) = broker {
            broker.shut_down(&self.reactor);
            if broker.shares_history() {
                // Back to ids of this process's own.
                self.restart_histories();
            }
        }
        self.arm_timer();
    }

    /// Disables the broker if it is PostgreSQL's.
    pub fn pg_disable(&self) {
        if self.broker.read().as_ref().is_some_and(|b| b.is_postgres()) {
            self.broker_disable();
        }
    }

    /// Waits up to `timeout` (`None`: forever) for messages from other publishers and
    /// delivers them; returns how many it delivered. For hosts that drive the broker
    /// themselves; `dispatch` does the same as part of its work.
    pub fn broker_poll_once(&self, timeout: Option<Duration>) -> Result<usize, Error> {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        loop {
            let broker = self.broker.read().clone().ok_or(Error::NotEnabled)?;
            let delivered = self.broker_service();
            let now = Instant::now();
            if delivered > 0 || deadline.is_some_and(|deadline| now >= deadline) {
                return Ok(delivered);
            }
            let wait = broker.wait();
            let until = match (deadline, wait.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait_for = until.map(|until| until.saturating_duration_since(now));
            match wait.socket {
                Some((socket, for_write)) => {
                    io::wait_fd(socket, for_write, wait_for)?;
                }
                None => std::thread::sleep(wait_for.unwrap_or(Duration::from_millis(100))),
            }
        }
    }

    /// [`Registry::broker_poll_once`], kept for the PostgreSQL entry points.
    pub fn pg_poll_once(&self, timeout: Option<Duration>) -> Result<usize, Error> {
        self.broker_poll_once(timeout)
    }

    /// The broker's counters (all zero when none is enabled).
    pub fn broker_stats(&self) -> BrokerStats {
        let broker = self.broker.read().clone();
        broker.map(|broker| broker.stats()).unwrap_or_default()
    }

    /// The PostgreSQL broker's counters (all zero when the broker is not PostgreSQL's).
    pub fn pg_stats(&self) -> PgStats {
        let broker = self.broker.read().clone();
        broker
            .filter(|broker| broker.is_postgres())
            .map(|broker| broker.stats().into())
            .unwrap_or_default()
    }

    /// Lets the broker do its pending work, then delivers what it received, with no lock
    /// held. Returns how many messages were delivered.
    pub(super) fn broker_service(&self) -> usize {
        let Some(broker) = self.broker.read().clone() else {
            return 0;
        };
        let mut received = Vec::new();
        broker.service(&self.reactor, &mut received);
        self.arm_timer();
        self.deliver_received(received)
    }

    fn deliver_received(&self, received: Vec<Received>) -> usize {
        // The messages of one read go out as if the host had corked around them: one write
        // per fd instead of one per message (a host that corks itself flushes them with the
        // rest of its batch).
        let mut policy = self.write_policy();
        let gather = !policy.corked && received.len() > 1;
        policy.corked |= gather;
        let mut delivered = 0;
        for message in &received {
            if let Some(stream) = message.stream {
                let new = self.deliver_streamed(message.topic(), message.payload(), stream, policy);
                delivered += usize::from(new);
                continue;
            }
            // A payload a local subscriber cannot take (not UTF-8 for a WebSocket text or SSE
            // subscriber) reaches nobody; there is no caller to tell.
            let _ = self.deliver_with(message.topic(), message.payload(), None, policy);
            delivered += 1;
        }
        if gather {
            self.flush_and_spill();
        }
        delivered
    }
}
