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
use crate::model::{ChatMessage, Contact, Priority, SenderType};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// A session was started; payload: the [`ChatSession`](crate::ChatSession).
    #[serde(rename = "session.started")]
    SessionStarted,
    /// A session's agent changed: it got one (routing, queue drain, claim
    /// or transfer), or, handed back to the queue (its agent went offline
    /// or was gone too long), it has none (`agent_id` null, status
    /// WAITING); payload: the [`ChatSession`](crate::ChatSession) after the
    /// change.
    #[serde(rename = "session.assigned")]
    SessionAssigned,
    /// A customer changed the session's contact details, the session
    /// moved to another customer (its visitor was linked to an identified
    /// customer), or it got a ticket while it waited; payload: the session,
    /// plus `contact_updated: true` for a contact change.
    #[serde(rename = "session.updated")]
    SessionUpdated,
    /// No eligible agent could take a request, so a ticket must open;
    /// payload: [`TicketRequested`].
    #[serde(rename = "ticket.requested")]
    TicketRequested,
    /// An agent closed a ticket (one opened for a request no agent could
    /// take); payload: [`TicketClosed`]. A ticket of a session also closes
    /// with its session (`session.closed` carries its `ticket_id`).
    #[serde(rename = "ticket.closed")]
    TicketClosed,
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
    /// An agent's reply that a customer may not have seen although a
    /// customer connection followed the session when it was stored, with
    /// no other customer connection following the session now: that
    /// connection's node stopped renewing it (it crashed) and its TTL ran
    /// out, written by the housekeeping purge of expired connections for
    /// each reply stored since the connection's last renewal; or its client
    /// went silent and its node closed it for no heartbeat, written by that
    /// close for each reply stored since the client was last heard. Once
    /// per reply. Payload: the reply's [`MessagePosted`] as of then
    /// (`customer_connected` false), so that the reply still becomes a
    /// notification (issue #4, offline notifications).
    #[serde(rename = "message.missed")]
    MessageMissed,
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
            Self::TicketClosed => "ticket.closed",
            Self::CustomerLinked => "customer.linked",
            Self::SessionClosed => "session.closed",
            Self::MessagePosted => "message.posted",
            Self::MessageMissed => "message.missed",
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
            Self::TicketClosed,
            Self::CustomerLinked,
            Self::SessionClosed,
            Self::MessagePosted,
            Self::MessageMissed,
            Self::AgentStatusChanged,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A committed state change, as stored in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// UUIDv7; the idempotency key for every consumer. A `message.posted`
    /// event's id is its message's id (events stored before that rule have
    /// their own), so a retried send can publish the same event again.
    pub id: EventId,
    /// The tenant the change happened in.
    pub tenant_id: TenantId,
    /// The session concerned, if any (events of one session are consumed in order).
    pub session_id: Option<SessionId>,
    /// What happened.
    pub kind: EventKind,
    /// The changed entity as JSON (see [`EventKind`] for each shape).
    pub payload: EventPayload,
    /// Commit time of the change (UTC, microseconds).
    pub created_at: DateTime<Utc>,
}

/// The JSON text of a [`DomainEvent`]'s payload, exactly as stored in the
/// outbox's `payload` column and as carried on the bus (serialized inline,
/// not as a string).
///
/// Kept as text rather than a `serde_json::Value`: an event is serialized
/// once, for the outbox row, and each consumer decodes the type it needs
/// ([`Self::decode`]). Building, decoding and dropping a `Value` for every
/// stored message was ~5% of the server's CPU in the issue #5 fan-out
/// profile. Two payloads are equal when their texts are. The Redis bus
/// keeps a payload's text as published; a payload read through
/// `BusEvent`'s derived `Deserialize` (below) has its keys in alphabetical
/// order, so compare decoded values then.
#[derive(Clone, Debug, Serialize)]
#[serde(transparent)]
pub struct EventPayload(Box<serde_json::value::RawValue>);

/// Read through a `serde_json::Value`: inside the internally tagged
/// `BusEvent`, serde buffers the event before this runs, and raw text
/// cannot be taken from that buffer. Neither storage nor the Redis bus
/// reads payloads this way: stored ones use [`EventPayload::from_json`],
/// and the Redis bus reads each message in one pass, keeping the payload's
/// text (issue #5 cross-node profile).
impl<'de> Deserialize<'de> for EventPayload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Self::new(&value).map_err(serde::de::Error::custom)
    }
}

impl EventPayload {
    /// Serializes `payload`.
    ///
    /// # Errors
    /// When `payload` does not serialize to JSON (a map with non-string
    /// keys, a failing `Serialize` implementation).
    pub fn new<T: Serialize + ?Sized>(payload: &T) -> serde_json::Result<Self> {
        serde_json::value::to_raw_value(payload).map(Self)
    }

    /// Wraps JSON text (a stored payload), after checking it is JSON.
    ///
    /// # Errors
    /// When `json` is not one JSON value.
    pub fn from_json(json: String) -> serde_json::Result<Self> {
        serde_json::value::RawValue::from_string(json).map(Self)
    }

    /// Wraps JSON text serde_json has already checked (a payload read
    /// whole from the Redis bus).
    #[cfg(feature = "redis")]
    pub(crate) fn from_raw(raw: Box<serde_json::value::RawValue>) -> Self {
        Self(raw)
    }

    /// The JSON text.
    #[must_use]
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// Decodes the payload as `T` (see [`EventKind`] for each kind's type).
    ///
    /// # Errors
    /// When the payload does not have `T`'s shape.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> serde_json::Result<T> {
        serde_json::from_str(self.0.get())
    }

    /// The payload as a `serde_json::Value`, for reading a field or two
    /// without a type.
    #[must_use]
    pub fn value(&self) -> serde_json::Value {
        // The text is one JSON value by construction; `Null` is unreachable.
        self.decode().unwrap_or(serde_json::Value::Null)
    }
}

impl PartialEq for EventPayload {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

/// Why a ticket was requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketReason {
    /// A customer's chat found no agent online who takes it (none online,
    /// or none who takes its department): it started while none did, or
    /// it was waiting when the last one who did left.
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
    /// The department the customer asked for at start, if any: a help
    /// desk's group or team. Absent from events written before it existed
    /// (read as `None`).
    #[serde(default)]
    pub department: Option<String>,
    /// Queue priority.
    pub priority: Priority,
    /// Contact details given at start.
    pub contact: Option<Contact>,
    /// The first message: the one given at start, or, for a chat ticketed
    /// while it waited, the first of [`Self::messages`] (if any).
    pub first_message: Option<String>,
    /// The customer messages written before the ticket opened that it is
    /// about, oldest first, at most
    /// [`TICKET_MESSAGES_MAX`](crate::TICKET_MESSAGES_MAX) (the first is
    /// `first_message`): for a chat ticketed while it waited, those since
    /// the last agent message (all of them from the first when no agent
    /// answered; for a chat handed back to the queue, the request left
    /// unanswered), or the latest when the customer wrote nothing since.
    /// A chat ticketed while it waited may hold several, which would
    /// otherwise reach a help desk only through the chat's history. Later
    /// ones reach the ticket sinks one by one.
    /// Absent from events written before it existed (read as empty).
    #[serde(default)]
    pub messages: Vec<String>,
}

/// Most customer messages a [`TicketRequested`] carries
/// ([`TicketRequested::messages`]); the chat's history holds the rest.
pub const TICKET_MESSAGES_MAX: u64 = 20;

/// Payload of [`EventKind::TicketClosed`]: the ticket an agent closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClosed {
    /// The ticket.
    pub ticket_id: TicketId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The agent who closed it.
    pub closed_by: UserId,
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

/// The fields of a [`MessagePosted`] payload that decide what it asks of
/// its consumers, read without the message itself (a flattened struct,
/// slow to decode; the ticket bridge's outbox interest asks it of every
/// message inside its writing transaction, issue #5 profile).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct MessagePostedHead {
    /// Who wrote the message.
    pub sender_type: SenderType,
    /// The session's customer, for customer chats.
    pub session_customer_id: Option<CustomerId>,
    /// The session's ticket, if it was ticketed.
    pub ticket_id: Option<TicketId>,
    /// Whether a customer connection followed the session when the
    /// message was stored.
    #[serde(default)]
    pub customer_connected: bool,
}

impl MessagePostedHead {
    /// An agent's reply the customer would otherwise miss, and so is
    /// notified: the session is ticketed (issue #3) or no customer
    /// connection followed it live (issue #4). The one rule: the ticket
    /// bridge notifies by it, and the purge of a crashed node's
    /// connections (`message.missed`) finds the replies it did not
    /// notify by it.
    #[must_use]
    pub fn notifies(&self) -> bool {
        self.sender_type == SenderType::Agent
            && self.session_customer_id.is_some()
            && (self.ticket_id.is_some() || !self.customer_connected)
    }

    /// The ticket a customer's message adds to: the session's, when it
    /// has one (the ticket bridge's `TicketSink::ticket_message`).
    #[must_use]
    pub fn ticket_message(&self) -> Option<TicketId> {
        self.ticket_id
            .filter(|_| self.sender_type == SenderType::Customer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusEvent;

    #[test]
    fn a_payload_is_its_json_text_and_crosses_the_bus_whole() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Shape {
            seq: i64,
            message: String,
        }
        let shape = Shape {
            seq: 7,
            message: "Halo \"du\"".into(),
        };
        let payload = EventPayload::new(&shape).unwrap();
        assert_eq!(payload.json(), r#"{"seq":7,"message":"Halo \"du\""}"#);
        assert_eq!(payload.decode::<Shape>().unwrap(), shape);
        assert_eq!(payload.value()["seq"], 7);
        assert!(EventPayload::from_json("{\"seq\":".into()).is_err());
        // Inside the bus's tagged envelope, as another node reads it.
        let event = BusEvent::Domain(std::sync::Arc::new(DomainEvent {
            id: EventId::generate(),
            tenant_id: TenantId::new(2).unwrap(),
            session_id: None,
            kind: EventKind::MessagePosted,
            payload,
            created_at: crate::now(),
        }));
        let text = serde_json::to_string(&event).unwrap();
        assert!(text.contains(r#""payload":{"seq":7,"#), "inline: {text}");
        let BusEvent::Domain(read) = serde_json::from_str::<BusEvent>(&text).unwrap() else {
            panic!("not a domain event");
        };
        assert_eq!(read.payload.decode::<Shape>().unwrap(), shape);
    }
}
