//! Entities as the service hands them out: plain data, serializable, no
//! storage or HTTP types.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{MessageId, SessionId, TenantId, UserId};

/// The current time truncated to microseconds: the precision both databases
/// keep, so a value read back equals the value written.
#[must_use]
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Lifecycle of a chat session.
///
/// `OPEN → CLOSED` for agent-started chats (issue #2). Customer-started chats
/// add a `WAITING` state before `OPEN`; the type is non-exhaustive for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum SessionStatus {
    /// Messages may be posted.
    Open,
    /// Ended; read-only.
    Closed,
}

impl SessionStatus {
    /// The stored and wire form: `OPEN`, `CLOSED`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Closed => "CLOSED",
        }
    }

    /// Parses the stored and wire form; `None` for anything else.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "OPEN" => Some(Self::Open),
            "CLOSED" => Some(Self::Closed),
            _ => None,
        }
    }
}

/// Who started a session. Decides which "one active session" rule applies
/// (DESIGN.md invariant 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionOrigin {
    /// Started by a support agent (`POST /livechat/sessions`).
    Agent,
}

impl SessionOrigin {
    /// The stored form.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
        }
    }
}

/// A conversation in one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSession {
    /// UUIDv7.
    pub id: SessionId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The agent serving the session; `None` only while a customer-started
    /// session waits for routing (reserved for the queue).
    pub agent_id: Option<UserId>,
    /// Lifecycle state.
    pub status: SessionStatus,
    /// When the session was started (UTC, microseconds).
    pub created_at: DateTime<Utc>,
    /// Last change of the session row, including each new message.
    pub updated_at: DateTime<Utc>,
    /// When the session was closed; `None` while not closed.
    pub closed_at: Option<DateTime<Utc>>,
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
    /// The user who sent it.
    pub sender_id: UserId,
    /// Position in the session: 1, 2, 3 … with no gaps (DESIGN.md invariant 4).
    pub seq: i64,
    /// The text as sent.
    pub message: String,
    /// The sender's idempotency key, when one was given (DESIGN.md invariant 6).
    pub client_msg_id: Option<String>,
    /// When it was stored (UTC, microseconds).
    pub created_at: DateTime<Utc>,
}

/// An agent's chosen availability (issue #2). Liveness (connections and
/// heartbeats) is tracked apart and combined with this into eligibility.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// Available for chats.
    Online,
    /// Away from the desk.
    Away,
    /// Working, not taking new chats.
    Busy,
    /// Signed off.
    Offline,
}

impl PresenceStatus {
    /// The stored and wire form: `online`, `away`, `busy`, `offline`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Away => "away",
            Self::Busy => "busy",
            Self::Offline => "offline",
        }
    }

    /// Parses the stored and wire form; `None` for anything else.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "online" => Some(Self::Online),
            "away" => Some(Self::Away),
            "busy" => Some(Self::Busy),
            "offline" => Some(Self::Offline),
            _ => None,
        }
    }
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
}
