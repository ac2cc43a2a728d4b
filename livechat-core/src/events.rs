//! Domain events and the transactional outbox (DESIGN.md invariant 5).
//!
//! Every state change writes one [`DomainEvent`] to the `livechat_outbox`
//! table in the same transaction as the change, so a committed change always
//! has its event and a rolled-back change never does. Consumers (tickets,
//! notifications, webhooks, cross-node fan-out) read committed events and use
//! [`DomainEvent::id`] as their idempotency key.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{EventId, SessionId, TenantId};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// A session was started; payload: the [`ChatSession`](crate::ChatSession).
    #[serde(rename = "session.started")]
    SessionStarted,
    /// A session went to CLOSED; payload: the closed session plus `closed_by`.
    #[serde(rename = "session.closed")]
    SessionClosed,
    /// A message was stored; payload: the [`ChatMessage`](crate::ChatMessage).
    #[serde(rename = "message.posted")]
    MessagePosted,
    /// An agent chose a new status; payload: the
    /// [`AgentPresence`](crate::AgentPresence).
    #[serde(rename = "agent.status_changed")]
    AgentStatusChanged,
}

impl EventKind {
    /// The stored form, e.g. `message.posted`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SessionStarted => "session.started",
            Self::SessionClosed => "session.closed",
            Self::MessagePosted => "message.posted",
            Self::AgentStatusChanged => "agent.status_changed",
        }
    }

    /// Parses the stored form; `None` for a kind this version does not know.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::SessionStarted,
            Self::SessionClosed,
            Self::MessagePosted,
            Self::AgentStatusChanged,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A committed state change, as stored in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// UUIDv7; the idempotency key for every consumer.
    pub id: EventId,
    /// The tenant the change happened in.
    pub tenant_id: TenantId,
    /// The session concerned, if any (events of one session are consumed in order).
    pub session_id: Option<SessionId>,
    /// What happened.
    pub kind: EventKind,
    /// The changed entity as JSON (see [`EventKind`] for each shape).
    pub payload: serde_json::Value,
    /// Commit time of the change (UTC, microseconds).
    pub created_at: DateTime<Utc>,
}
