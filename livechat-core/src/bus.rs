//! The event bus: real-time fan-out of committed changes and ephemeral
//! signals (typing, read receipts, liveness) to every node's connections
//! (issue #4, DESIGN.md "Scale").
//!
//! The bus is a fast path, not the record: committed changes are already in
//! the outbox and the message table, so a client that misses a bus event
//! (a lagging receiver, a Redis outage) catches up by `seq` from storage.
//! [`InProcessBus`] serves one node; the Redis implementation (feature
//! `redis`) connects nodes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::events::DomainEvent;
use crate::ids::{CustomerId, SessionId, TenantId, UserId};
use crate::model::{PresenceStatus, SenderType};

/// Whether a participant started or stopped typing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypingState {
    /// Started typing.
    Start,
    /// Stopped typing.
    Stop,
}

/// Who did something in a session (typing, reading).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    /// Agent or customer.
    pub sender_type: SenderType,
    /// The agent's user id, or an identified customer's host user id.
    pub sender_id: Option<UserId>,
    /// The customer, for customers.
    pub customer_id: Option<CustomerId>,
}

/// A signal that is relayed, not stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Ephemeral {
    /// Someone in a session is typing.
    Typing {
        /// The session.
        session_id: SessionId,
        /// Who.
        by: Participant,
        /// Start or stop.
        state: TypingState,
    },
    /// Someone read a session up to `seq`.
    Read {
        /// The session.
        session_id: SessionId,
        /// Who.
        by: Participant,
        /// Highest `seq` read.
        seq: i64,
    },
    /// An agent's effective presence changed (connection liveness).
    Presence {
        /// The agent.
        agent_id: UserId,
        /// Their status as others should see it.
        status: PresenceStatus,
    },
}

/// What travels on the bus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "bus", rename_all = "snake_case")]
pub enum BusEvent {
    /// A committed domain event (the outbox row's content).
    Domain(Arc<DomainEvent>),
    /// A relayed signal within a tenant.
    Ephemeral {
        /// The tenant.
        tenant_id: TenantId,
        /// The signal.
        event: Ephemeral,
    },
    /// This node may have missed events (a receiver lagged, the bus
    /// reconnected, or another node asked: it could not publish some of
    /// its events); connections re-read what they follow. Publishing it
    /// delivers it locally only.
    Resync,
}

impl BusEvent {
    /// The tenant concerned (`None` for [`BusEvent::Resync`]).
    #[must_use]
    pub fn tenant(&self) -> Option<TenantId> {
        match self {
            Self::Domain(e) => Some(e.tenant_id),
            Self::Ephemeral { tenant_id, .. } => Some(*tenant_id),
            Self::Resync => None,
        }
    }
}

/// Publishes events to every node and hands them to local subscribers.
/// Stored as `Arc<dyn EventBus>`.
pub trait EventBus: Send + Sync + 'static {
    /// Publishes `event` without waiting; failures are logged and reported
    /// by [`EventBus::is_degraded`], never returned.
    fn publish(&self, event: BusEvent);

    /// A receiver of every event published on any node, from now on. A
    /// receiver that falls behind gets `Lagged` and must resync from storage.
    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>>;

    /// Whether the bus currently cannot reach other nodes (this node still
    /// serves its own clients). While it says so, an agent's message
    /// stored through this bus counts no customer as connected (it is
    /// notified), and `livechat-poem`'s gateway renews no customer
    /// connection and makes up the replies of one that ends: a bus that
    /// says so for long, or wrongly, makes every reply a notification.
    fn is_degraded(&self) -> bool {
        false
    }
}

/// `bus` with its [`EventBus::publish`] shielded from panics: a panic is
/// caught and logged (error level), and the event goes undelivered. The
/// store ([`crate::store::SeaOrmStore::with_bus`]) and `livechat-poem`'s
/// gateway wrap the bus a host gives them this way: they publish after a
/// commit, and a host's bus that panicked there failed a committed request,
/// closed an SQLite store mid-run as if its sync had failed, killed a
/// connection, or lost an offline announcement recorded as made.
#[must_use]
pub fn guarded(bus: Arc<dyn EventBus>) -> Arc<dyn EventBus> {
    Arc::new(Guarded(bus))
}

/// See [`guarded`].
struct Guarded(Arc<dyn EventBus>);

impl EventBus for Guarded {
    fn publish(&self, event: BusEvent) {
        let published = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.0.publish(event);
        }));
        if published.is_err() {
            tracing::error!("the event bus panicked publishing an event; it is not delivered live");
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>> {
        self.0.subscribe()
    }

    fn is_degraded(&self) -> bool {
        self.0.is_degraded()
    }
}

/// A single-node bus: a tokio broadcast channel.
#[derive(Clone, Debug)]
pub struct InProcessBus {
    tx: broadcast::Sender<Arc<BusEvent>>,
}

impl InProcessBus {
    /// Default capacity of the broadcast buffer (events a receiver may fall
    /// behind before it lags).
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// A bus with [`Self::DEFAULT_CAPACITY`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A bus whose receivers may fall `capacity` events behind.
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Delivers to local subscribers (used by bus implementations that
    /// receive from other nodes).
    pub fn deliver(&self, event: Arc<BusEvent>) {
        // No receiver is not an error: nobody is connected.
        let _ = self.tx.send(event);
    }
}

impl Default for InProcessBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus for InProcessBus {
    fn publish(&self, event: BusEvent) {
        self.deliver(Arc::new(event));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>> {
        self.tx.subscribe()
    }
}
