//! Entities as the service hands them out: plain data, serializable, no
//! storage or HTTP types.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{CustomerId, MessageId, SessionId, TenantId, TicketId, UserId};

/// The current time truncated to microseconds: the precision both databases
/// keep, so a value read back equals the value written.
#[must_use]
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The longest span the store adds to or takes from the current time
/// (presence TTLs and grace periods, connection TTLs, outbox leases): 100
/// years. A longer setting means the same in practice ("never"), and the
/// result stays within both databases' time range, where chrono's own
/// `now() - ttl` panics past its range.
pub(crate) const MAX_SPAN: std::time::Duration =
    std::time::Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `d` as a chrono span, at most [`MAX_SPAN`].
#[must_use]
pub(crate) fn span(d: std::time::Duration) -> chrono::TimeDelta {
    // Within chrono's range: `from_std` cannot fail.
    chrono::TimeDelta::from_std(d.min(MAX_SPAN)).unwrap_or(chrono::TimeDelta::zero())
}

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            /// The stored and wire form.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),*
                }
            }

            /// Parses the stored and wire form; `None` for anything else.
            #[must_use]
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($text => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

wire_enum!(
    /// Lifecycle of a chat session: `WAITING → OPEN → CLOSED` for
    /// customer-started chats (issue #3), `OPEN → CLOSED` for agent-started
    /// ones (issue #2). A WAITING session may also close.
    SessionStatus {
        /// Queued for an agent.
        Waiting = "WAITING",
        /// Assigned to an agent; messages flow.
        Open = "OPEN",
        /// Ended; read-only.
        Closed = "CLOSED",
    }
);

wire_enum!(
    /// Who started a session; decides which "one active session" rule
    /// applies (DESIGN.md invariant 2).
    SessionOrigin {
        /// Started by a support agent (`POST /livechat/sessions`): one OPEN
        /// per (tenant, agent).
        Agent = "agent",
        /// Started by a customer (`POST /livechat/customer/chats`): one
        /// WAITING-or-OPEN per (tenant, customer).
        Customer = "customer",
    }
);

wire_enum!(
    /// Queue priority of a customer chat; the queue drains highest first,
    /// then oldest (issue #3).
    Priority {
        /// Lowest.
        Low = "low",
        /// Default.
        Normal = "normal",
        /// Before normal.
        High = "high",
        /// First.
        Urgent = "urgent",
    }
);

impl Priority {
    /// Sort key: higher drains first.
    #[must_use]
    pub const fn rank(self) -> i32 {
        match self {
            Self::Low => 1,
            Self::Normal => 2,
            Self::High => 3,
            Self::Urgent => 4,
        }
    }

    /// The priority of a stored rank.
    #[must_use]
    pub fn from_rank(rank: i32) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.rank() == rank)
    }
}

wire_enum!(
    /// Who wrote a message.
    SenderType {
        /// A support agent (`sender_id` is their user id).
        Agent = "agent",
        /// The session's customer (`sender_id` is their host user id when
        /// identified, `null` for a visitor).
        Customer = "customer",
        /// The library itself (e.g. a link merged two conversations).
        System = "system",
    }
);

wire_enum!(
    /// An agent's chosen availability (issue #2). Liveness and capacity are
    /// combined with it into eligibility (DESIGN.md invariant 3).
    PresenceStatus {
        /// Available for chats.
        Online = "online",
        /// Away from the desk.
        Away = "away",
        /// Working, not taking new chats.
        Busy = "busy",
        /// Signed off.
        Offline = "offline",
    }
);

/// The author of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// A support agent.
    Agent(UserId),
    /// The session's customer.
    Customer(CustomerId),
    /// The library.
    System,
}

/// Per-session contact details given by the customer (seed 001: name and
/// e-mail required, the rest optional). Validated by
/// [`Contact::parse`](crate::Contact::parse).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// 1–200 characters.
    pub name: String,
    /// A syntactically valid address, at most 254 characters.
    pub email: String,
    /// Up to 50 characters.
    pub phone: Option<String>,
    /// Up to 200 characters.
    pub position: Option<String>,
    /// Up to 200 characters.
    pub company: Option<String>,
}

/// A customer of a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    /// UUIDv7.
    pub id: CustomerId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The host user, for identified customers.
    pub user_id: Option<UserId>,
    /// The browser's self-generated id, for anonymous visitors.
    pub browser_uuid: Option<Uuid>,
    /// Set on a visitor linked to an identified customer: its sessions moved
    /// there and its token now acts as that customer.
    pub linked_to: Option<CustomerId>,
    /// First seen (UTC).
    pub created_at: DateTime<Utc>,
}

/// How a customer is recognized when starting a chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CustomerIdentity {
    /// An identified host user (Bearer token or identity hash).
    User(UserId),
    /// An anonymous visitor by the UUID their browser generated.
    Visitor(Uuid),
    /// A customer already known (from a visitor token).
    Known(CustomerId),
}

/// A conversation in one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSession {
    /// UUIDv7.
    pub id: SessionId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The serving agent; `None` while WAITING.
    pub agent_id: Option<UserId>,
    /// The customer, for customer-started chats.
    pub customer_id: Option<CustomerId>,
    /// Who started it.
    pub origin: SessionOrigin,
    /// Lifecycle state.
    pub status: SessionStatus,
    /// What the customer wants help with (customer chats).
    pub topic: Option<String>,
    /// Queue priority.
    pub priority: Priority,
    /// Requested department, free text.
    pub department: Option<String>,
    /// The ticket opened because no agent was eligible, if any.
    pub ticket_id: Option<TicketId>,
    /// Contact details the customer gave for this session.
    pub contact: Option<Contact>,
    /// Client IP recorded at start (customer chats).
    pub client_ip: Option<String>,
    /// Client User-Agent recorded at start (customer chats).
    pub user_agent: Option<String>,
    /// The `seq` of the latest message (0 when none).
    pub last_seq: i64,
    /// When the session was started (UTC, microseconds).
    pub created_at: DateTime<Utc>,
    /// Last change of the session row, including each new message.
    pub updated_at: DateTime<Utc>,
    /// When an agent was (last) assigned.
    pub assigned_at: Option<DateTime<Utc>>,
    /// When the session was closed; `None` while not closed.
    pub closed_at: Option<DateTime<Utc>>,
}

impl ChatSession {
    /// WAITING or OPEN.
    #[must_use]
    pub fn is_active(&self) -> bool {
        matches!(self.status, SessionStatus::Waiting | SessionStatus::Open)
    }
}

/// One message of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// UUIDv7.
    pub id: MessageId,
    /// The session it belongs to.
    pub session_id: SessionId,
    /// Owning tenant (always the session's).
    pub tenant_id: TenantId,
    /// Agent, customer or system.
    pub sender_type: SenderType,
    /// The agent's user id, or the identified customer's host user id;
    /// `None` for visitors and system messages.
    pub sender_id: Option<UserId>,
    /// The sending customer, for customer messages.
    pub customer_id: Option<CustomerId>,
    /// Position in the session: 1, 2, 3 … with no gaps (DESIGN.md invariant 4).
    pub seq: i64,
    /// The text as sent.
    pub message: String,
    /// The sender's idempotency key, when one was given (DESIGN.md invariant 6).
    pub client_msg_id: Option<String>,
    /// When it was stored (UTC, microseconds).
    pub created_at: DateTime<Utc>,
}

/// An agent's presence in one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPresence {
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The agent.
    pub agent_id: UserId,
    /// Chosen status.
    pub status: PresenceStatus,
    /// When the status was last set (UTC, microseconds).
    pub updated_at: DateTime<Utc>,
    /// The departments whose chats routing gives the agent, besides chats
    /// without a department; empty: every chat (README "Departments").
    /// Absent from events written before departments existed (read as
    /// empty).
    #[serde(default)]
    pub departments: Vec<String>,
}

/// What an agent's heartbeat did ([`crate::ChatService::heartbeat`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The agent's presence after the heartbeat.
    pub presence: AgentPresence,
    /// Whether the agent had been announced offline (their presence ran
    /// out) and is back: the heartbeat cleared that announcement in its
    /// own transaction, and the caller announces `presence` to the
    /// tenant's agents, once. Never true for a chosen status of `offline`
    /// (announced when chosen).
    pub returned: bool,
}

/// A session with its place in the queue (1 = next) while WAITING.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    /// The session.
    pub session: ChatSession,
    /// Position in the tenant's queue while WAITING, else `None`.
    pub queue_position: Option<i64>,
}
