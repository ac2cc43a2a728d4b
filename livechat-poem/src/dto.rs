//! Wire shapes of the API (poem-openapi objects) and their conversion from
//! core entities. Field names and formats are the contract of issue #2.

use chrono::{DateTime, Utc};
use livechat_core::{AgentPresence, ChatMessage, ChatSession, PresenceStatus, SessionStatus};
use poem_openapi::{Enum, Object};
use uuid::Uuid;

/// Session status on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[oai(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionStatusDto {
    /// Messages may be posted.
    Open,
    /// Ended; read-only.
    Closed,
}

impl From<SessionStatusDto> for SessionStatus {
    fn from(s: SessionStatusDto) -> Self {
        match s {
            SessionStatusDto::Open => Self::Open,
            SessionStatusDto::Closed => Self::Closed,
        }
    }
}

impl SessionStatusDto {
    fn from_core(s: SessionStatus) -> Self {
        if s == SessionStatus::Open {
            Self::Open
        } else {
            Self::Closed
        }
    }
}

/// An agent's chosen status on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum PresenceStatusDto {
    /// Available for chats.
    Online,
    /// Away from the desk.
    Away,
    /// Working, not taking new chats.
    Busy,
    /// Signed off.
    Offline,
}

impl From<PresenceStatusDto> for PresenceStatus {
    fn from(s: PresenceStatusDto) -> Self {
        match s {
            PresenceStatusDto::Online => Self::Online,
            PresenceStatusDto::Away => Self::Away,
            PresenceStatusDto::Busy => Self::Busy,
            PresenceStatusDto::Offline => Self::Offline,
        }
    }
}

impl From<PresenceStatus> for PresenceStatusDto {
    fn from(s: PresenceStatus) -> Self {
        match s {
            PresenceStatus::Online => Self::Online,
            PresenceStatus::Away => Self::Away,
            PresenceStatus::Busy => Self::Busy,
            PresenceStatus::Offline => Self::Offline,
        }
    }
}

/// A chat session.
#[derive(Clone, Debug, Object)]
#[oai(rename = "ChatSession")]
pub struct SessionDto {
    /// UUIDv7.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: i64,
    /// The serving agent.
    pub agent_id: Option<i64>,
    /// `OPEN` or `CLOSED`.
    pub status: SessionStatusDto,
    /// RFC 3339, UTC.
    pub created_at: DateTime<Utc>,
    /// RFC 3339, UTC; changes with every message.
    pub updated_at: DateTime<Utc>,
    /// RFC 3339, UTC; `null` while not closed.
    pub closed_at: Option<DateTime<Utc>>,
}

impl From<ChatSession> for SessionDto {
    fn from(s: ChatSession) -> Self {
        Self {
            id: s.id.as_uuid(),
            tenant_id: s.tenant_id.get(),
            agent_id: s.agent_id.map(livechat_core::UserId::get),
            status: SessionStatusDto::from_core(s.status),
            created_at: s.created_at,
            updated_at: s.updated_at,
            closed_at: s.closed_at,
        }
    }
}

/// A chat message.
#[derive(Clone, Debug, Object)]
#[oai(rename = "ChatMessage")]
pub struct MessageDto {
    /// UUIDv7.
    pub id: Uuid,
    /// The session.
    pub session_id: Uuid,
    /// Owning tenant.
    pub tenant_id: i64,
    /// The sending user.
    pub sender_id: i64,
    /// Position in the session: 1, 2, 3 … with no gaps.
    pub seq: i64,
    /// The text as sent.
    pub message: String,
    /// The sender's idempotency key, if one was given.
    #[oai(skip_serializing_if_is_none)]
    pub client_msg_id: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: DateTime<Utc>,
}

impl From<ChatMessage> for MessageDto {
    fn from(m: ChatMessage) -> Self {
        Self {
            id: m.id.as_uuid(),
            session_id: m.session_id.as_uuid(),
            tenant_id: m.tenant_id.get(),
            sender_id: m.sender_id.get(),
            seq: m.seq,
            message: m.message,
            client_msg_id: m.client_msg_id,
            created_at: m.created_at,
        }
    }
}

/// An agent's presence.
#[derive(Clone, Debug, Object)]
#[oai(rename = "AgentPresence")]
pub struct PresenceDto {
    /// The agent.
    pub agent_id: i64,
    /// Chosen status.
    pub status: PresenceStatusDto,
    /// RFC 3339, UTC.
    pub updated_at: DateTime<Utc>,
}

impl From<AgentPresence> for PresenceDto {
    fn from(p: AgentPresence) -> Self {
        Self {
            agent_id: p.agent_id.get(),
            status: p.status.into(),
            updated_at: p.updated_at,
        }
    }
}

/// `PUT /agents/me/status` body.
#[derive(Clone, Debug, Object)]
pub struct SetStatusRequest {
    /// `online`, `away`, `busy` or `offline`.
    pub status: PresenceStatusDto,
}

/// `POST /sessions` body: `{}` starts a session for the caller.
#[derive(Clone, Debug, Object)]
pub struct StartSessionRequest {
    /// The agent to start the session for (positive integer); default the caller.
    pub agent_id: Option<i64>,
}

/// `POST /sessions/{id}/messages` body.
#[derive(Clone, Debug, Object)]
pub struct PostMessageRequest {
    /// 1–10,000 characters, not blank.
    pub message: StrictString,
    /// Idempotency key (1–128 printable ASCII): a retry with the same key
    /// stores nothing new and answers 200 with the original message. The
    /// `Idempotency-Key` header is an alternative.
    pub client_msg_id: Option<StrictString>,
}

/// `{"data": ChatSession}`.
#[derive(Clone, Debug, Object)]
pub struct SessionEnvelope {
    /// The session.
    pub data: SessionDto,
}

/// `{"data": [ChatSession…]}`.
#[derive(Clone, Debug, Object)]
pub struct SessionListEnvelope {
    /// Newest first.
    pub data: Vec<SessionDto>,
}

/// `{"data": ChatMessage}`.
#[derive(Clone, Debug, Object)]
pub struct MessageEnvelope {
    /// The message.
    pub data: MessageDto,
}

/// `{"data": [ChatMessage…]}` with the paging cursor beside it.
#[derive(Clone, Debug, Object)]
pub struct MessageListEnvelope {
    /// Ascending by `seq`.
    pub data: Vec<MessageDto>,
    /// The `seq` to pass as `after_seq` for the next page (the last `seq`
    /// returned, or the given `after_seq` when the page is empty).
    pub next_after_seq: i64,
}

/// `{"data": AgentPresence}`.
#[derive(Clone, Debug, Object)]
pub struct PresenceEnvelope {
    /// The presence.
    pub data: PresenceDto,
}

/// A JSON string field that accepts only JSON strings.
///
/// poem-openapi's `String` also accepts numbers and booleans (turning `5`
/// into `"5"`); request bodies use this type so that a wrong type is
/// 400 `invalid_body` as the contract says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StrictString(pub String);

impl poem_openapi::types::Type for StrictString {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> std::borrow::Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
        String::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(std::iter::once(&self.0))
    }
}

impl poem_openapi::types::ParseFromJSON for StrictString {
    fn parse_from_json(value: Option<serde_json::Value>) -> poem_openapi::types::ParseResult<Self> {
        match value {
            Some(serde_json::Value::String(s)) => Ok(Self(s)),
            other => Err(poem_openapi::types::ParseError::expected_type(
                other.unwrap_or_default(),
            )),
        }
    }
}

impl poem_openapi::types::ToJSON for StrictString {
    fn to_json(&self) -> Option<serde_json::Value> {
        Some(serde_json::Value::String(self.0.clone()))
    }
}
