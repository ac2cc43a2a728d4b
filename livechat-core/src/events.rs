//! Domain events and the transactional outbox (DESIGN.md invariant 5).
//!
//! Every state change writes one [`DomainEvent`] to the `livechat_outbox`
//! table in the same transaction as the change, so a committed change always
//! has its event and a rolled-back change never does. Consumers (tickets,
//! notifications, webhooks, cross-node fan-out) read committed events and use
//! [`DomainEvent::id`] as their idempotency key.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{CustomerId, EventId, SessionId, TenantId, TicketId, UserId};
use crate::model::{ChatMessage, Contact, Priority};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// A session was started; payload: the [`ChatSession`](crate::ChatSession).
    #[serde(rename = "session.started")]
    SessionStarted,
    /// A session got an agent (routing, queue drain, claim or transfer);
    /// payload: the [`ChatSession`](crate::ChatSession) after the change.
    #[serde(rename = "session.assigned")]
    SessionAssigned,
    /// A customer changed the session's contact details; payload: the session.
    #[serde(rename = "session.updated")]
    SessionUpdated,
    /// No eligible agent could take a request, so a ticket must open;
    /// payload: [`TicketRequested`].
    #[serde(rename = "ticket.requested")]
    TicketRequested,
    /// A visitor was linked to an identified customer; payload:
    /// `{"visitor_id", "customer_id"}`.
    #[serde(rename = "customer.linked")]
    CustomerLinked,
    /// A session went to CLOSED; payload: the closed session plus `closed_by`.
    #[serde(rename = "session.closed")]
    SessionClosed,
    /// A message was stored; payload: [`MessagePosted`].
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
            Self::SessionAssigned => "session.assigned",
            Self::SessionUpdated => "session.updated",
            Self::TicketRequested => "ticket.requested",
            Self::CustomerLinked => "customer.linked",
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
            Self::SessionAssigned,
            Self::SessionUpdated,
            Self::TicketRequested,
            Self::CustomerLinked,
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

/// Why a ticket was requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketReason {
    /// A customer started a chat while no agent of the tenant was online.
    NoAgentOnline,
    /// An agent-started chat named an agent who is not online.
    AgentOffline,
}

/// Payload of [`EventKind::TicketRequested`]: everything a ticket system
/// needs to open the ticket under [`TicketRequested::ticket_id`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRequested {
    /// The id the ticket must get (allocated with the request).
    pub ticket_id: TicketId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Why.
    pub reason: TicketReason,
    /// The waiting session, for customer chats.
    pub session_id: Option<SessionId>,
    /// The customer to notify, for customer chats.
    pub customer_id: Option<CustomerId>,
    /// The agent the request is addressed to (agent-started chats).
    pub agent_id: Option<UserId>,
    /// Who asked (the calling agent for agent-started chats).
    pub requested_by: Option<UserId>,
    /// The customer's topic.
    pub topic: Option<String>,
    /// Queue priority.
    pub priority: Priority,
    /// Contact details given at start.
    pub contact: Option<Contact>,
    /// The first message, when given at start.
    pub first_message: Option<String>,
}

/// Payload of [`EventKind::MessagePosted`]: the message plus what
/// consumers need to route a notification without reading the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePosted {
    /// The stored message.
    #[serde(flatten)]
    pub message: ChatMessage,
    /// The session's customer, for customer chats.
    pub session_customer_id: Option<CustomerId>,
    /// The session's ticket, if it was ticketed.
    pub ticket_id: Option<TicketId>,
    /// Whether a customer connection (any node) followed the session when
    /// the message was stored; a reply nobody sees live becomes a
    /// notification (issue #4).
    #[serde(default)]
    pub customer_connected: bool,
}
