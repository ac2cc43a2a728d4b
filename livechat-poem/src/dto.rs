//! Wire shapes of the API (poem-openapi objects) and their conversion from
//! core entities. Field names and formats are the contract of issue #2.

use chrono::{DateTime, Utc};
use livechat_core::{
    AgentPresence, ChatMessage, ChatSession, Contact, Notification, PresenceStatus, Priority,
    SenderType, SessionStatus, SessionView, Ticket, TicketStatus,
};
use poem_openapi::{Enum, Object};
use uuid::Uuid;

/// Session status on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[oai(rename = "SessionStatus", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionStatusDto {
    /// Queued for an agent.
    Waiting,
    /// Messages may be posted.
    Open,
    /// Ended; read-only.
    Closed,
}

impl From<SessionStatusDto> for SessionStatus {
    fn from(s: SessionStatusDto) -> Self {
        match s {
            SessionStatusDto::Waiting => Self::Waiting,
            SessionStatusDto::Open => Self::Open,
            SessionStatusDto::Closed => Self::Closed,
        }
    }
}

impl From<SessionStatus> for SessionStatusDto {
    fn from(s: SessionStatus) -> Self {
        match s {
            SessionStatus::Waiting => Self::Waiting,
            SessionStatus::Open => Self::Open,
            SessionStatus::Closed => Self::Closed,
        }
    }
}

/// Queue priority on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[oai(rename = "Priority", rename_all = "lowercase")]
pub enum PriorityDto {
    /// Lowest.
    Low,
    /// Default.
    Normal,
    /// Before normal.
    High,
    /// First.
    Urgent,
}

impl From<PriorityDto> for Priority {
    fn from(p: PriorityDto) -> Self {
        match p {
            PriorityDto::Low => Self::Low,
            PriorityDto::Normal => Self::Normal,
            PriorityDto::High => Self::High,
            PriorityDto::Urgent => Self::Urgent,
        }
    }
}

impl From<Priority> for PriorityDto {
    fn from(p: Priority) -> Self {
        match p {
            Priority::Low => Self::Low,
            Priority::Normal => Self::Normal,
            Priority::High => Self::High,
            Priority::Urgent => Self::Urgent,
        }
    }
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[oai(rename = "SenderType", rename_all = "lowercase")]
pub enum SenderTypeDto {
    /// A support agent.
    Agent,
    /// The session's customer.
    Customer,
    /// The library.
    System,
}

impl From<SenderType> for SenderTypeDto {
    fn from(s: SenderType) -> Self {
        match s {
            SenderType::Agent => Self::Agent,
            SenderType::Customer => Self::Customer,
            SenderType::System => Self::System,
        }
    }
}

/// An agent's chosen status on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[oai(rename = "PresenceStatus", rename_all = "lowercase")]
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

/// Contact details of a session.
#[derive(Clone, Debug, Object)]
#[oai(rename = "Contact")]
pub struct ContactDto {
    /// 1–200 characters.
    pub name: String,
    /// A valid e-mail address.
    pub email: String,
    /// Up to 50 characters.
    pub phone: Option<String>,
    /// Up to 200 characters.
    pub position: Option<String>,
    /// Up to 200 characters.
    pub company: Option<String>,
}

impl From<Contact> for ContactDto {
    fn from(c: Contact) -> Self {
        Self {
            name: c.name,
            email: c.email,
            phone: c.phone,
            position: c.position,
            company: c.company,
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
    /// The serving agent; `null` while WAITING.
    pub agent_id: Option<i64>,
    /// The customer, for customer-started chats.
    pub customer_id: Option<Uuid>,
    /// `WAITING`, `OPEN` or `CLOSED`.
    pub status: SessionStatusDto,
    /// What the customer needs help with.
    pub topic: Option<String>,
    /// Queue priority.
    pub priority: PriorityDto,
    /// Requested department.
    pub department: Option<String>,
    /// The ticket opened because no agent was eligible.
    pub ticket_id: Option<Uuid>,
    /// 1-based place in the tenant's queue while WAITING, else `null`.
    /// Filled by the answers that read it: a customer's chat start,
    /// `GET /customer/chats/{id}`, a contact update,
    /// `GET /sessions`, `GET /sessions/{id}` and the WebSocket's
    /// `session_updated`. `GET /customer/history` carries `null` even
    /// while WAITING (a close or an assignment leaves no session
    /// waiting).
    pub queue_position: Option<i64>,
    /// The `seq` of the session's latest message (0 when it has none). To
    /// read the latest `n` messages, ask for them after
    /// `max(0, last_seq - n)`.
    pub last_seq: i64,
    /// Contact details given by the customer.
    pub contact: Option<ContactDto>,
    /// RFC 3339, UTC.
    pub created_at: DateTime<Utc>,
    /// RFC 3339, UTC; changes with every message.
    pub updated_at: DateTime<Utc>,
    /// RFC 3339, UTC; `null` while not closed.
    pub closed_at: Option<DateTime<Utc>>,
}

impl SessionDto {
    /// The wire form of a session and its queue place.
    #[must_use]
    pub fn new(s: ChatSession, queue_position: Option<i64>) -> Self {
        Self {
            id: s.id.as_uuid(),
            tenant_id: s.tenant_id.get(),
            agent_id: s.agent_id.map(livechat_core::UserId::get),
            customer_id: s.customer_id.map(|c| c.as_uuid()),
            status: s.status.into(),
            topic: s.topic,
            priority: s.priority.into(),
            department: s.department,
            ticket_id: s.ticket_id.map(|t| t.as_uuid()),
            queue_position,
            last_seq: s.last_seq,
            contact: s.contact.map(Into::into),
            created_at: s.created_at,
            updated_at: s.updated_at,
            closed_at: s.closed_at,
        }
    }
}

impl From<ChatSession> for SessionDto {
    fn from(s: ChatSession) -> Self {
        Self::new(s, None)
    }
}

impl From<SessionView> for SessionDto {
    fn from(v: SessionView) -> Self {
        Self::new(v.session, v.queue_position)
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
    /// `agent`, `customer` or `system`.
    pub sender_type: SenderTypeDto,
    /// The agent's user id, or an identified customer's host user id;
    /// `null` for visitors and system messages.
    pub sender_id: Option<i64>,
    /// The sending customer, for customer messages.
    #[oai(skip_serializing_if_is_none)]
    pub customer_id: Option<Uuid>,
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
            sender_type: m.sender_type.into(),
            sender_id: m.sender_id.map(livechat_core::UserId::get),
            customer_id: m.customer_id.map(|c| c.as_uuid()),
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
    /// The departments whose chats routing gives the agent, besides chats
    /// without a department; empty: every chat.
    pub departments: Vec<String>,
}

impl From<AgentPresence> for PresenceDto {
    fn from(p: AgentPresence) -> Self {
        Self {
            agent_id: p.agent_id.get(),
            status: p.status.into(),
            updated_at: p.updated_at,
            departments: p.departments,
        }
    }
}

/// `PUT /agents/me/status` body.
#[derive(Clone, Debug, Object)]
pub struct SetStatusRequest {
    /// `online`, `away`, `busy` or `offline`.
    pub status: PresenceStatusDto,
    /// The departments whose chats routing gives the agent, besides chats
    /// without a department (each 1–100 characters, trimmed; at most 20);
    /// `[]`: every chat. Left out: the departments set before (none at
    /// first: every chat).
    pub departments: Option<Vec<StrictString>>,
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
    /// Idempotency key (1–128 visible ASCII, no spaces): a retry with the same key
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

/// `{"data": [ChatSession…], "next_cursor": …}`.
#[derive(Clone, Debug, Object)]
pub struct SessionListEnvelope {
    /// Newest first.
    pub data: Vec<SessionDto>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page
    /// (one shorter than `limit`).
    pub next_cursor: Option<String>,
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

impl MessageListEnvelope {
    /// A page of messages; `next_after_seq` is the last `seq`, or
    /// `after_seq` (default 0) for an empty page.
    #[must_use]
    pub fn new(messages: Vec<ChatMessage>, after_seq: Option<i64>) -> Self {
        let next_after_seq = messages.last().map_or(after_seq.unwrap_or(0), |m| m.seq);
        Self {
            data: messages.into_iter().map(Into::into).collect(),
            next_after_seq,
        }
    }
}

/// `{"data": AgentPresence}`.
#[derive(Clone, Debug, Object)]
pub struct PresenceEnvelope {
    /// The presence.
    pub data: PresenceDto,
}

/// One agent of the tenant (`GET /agents`).
#[derive(Clone, Debug, Object)]
#[oai(rename = "Agent")]
pub struct AgentOverviewDto {
    /// The agent.
    pub agent_id: i64,
    /// Chosen status.
    pub status: PresenceStatusDto,
    /// The departments whose chats routing gives them; empty: every chat.
    pub departments: Vec<String>,
    /// When the status was last set (RFC 3339, UTC).
    pub updated_at: DateTime<Utc>,
    /// Status `online` and liveness fresh: a claim or transfer may name
    /// them.
    pub online: bool,
    /// Online and below capacity: routing could give them a chat now.
    pub available: bool,
    /// OPEN sessions they serve.
    pub open_sessions: i64,
    /// The tenant's per-agent capacity.
    pub capacity: i64,
}

impl From<livechat_core::AgentOverview> for AgentOverviewDto {
    fn from(a: livechat_core::AgentOverview) -> Self {
        let available = a.available();
        Self {
            agent_id: a.presence.agent_id.get(),
            status: a.presence.status.into(),
            departments: a.presence.departments,
            updated_at: a.presence.updated_at,
            online: a.online,
            available,
            open_sessions: a.open_sessions,
            capacity: a.capacity,
        }
    }
}

/// `{"data": [Agent…]}`, by agent id.
#[derive(Clone, Debug, Object)]
pub struct AgentListEnvelope {
    /// The agents.
    pub data: Vec<AgentOverviewDto>,
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

/// Ticket status on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[oai(rename = "TicketStatus", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TicketStatusDto {
    /// Awaiting an answer.
    Open,
    /// Its session closed, or an agent closed it.
    Closed,
}

impl From<TicketStatus> for TicketStatusDto {
    fn from(s: TicketStatus) -> Self {
        match s {
            TicketStatus::Open => Self::Open,
            TicketStatus::Closed => Self::Closed,
        }
    }
}

impl From<TicketStatusDto> for TicketStatus {
    fn from(s: TicketStatusDto) -> Self {
        match s {
            TicketStatusDto::Open => Self::Open,
            TicketStatusDto::Closed => Self::Closed,
        }
    }
}

/// A ticket.
#[derive(Clone, Debug, Object)]
#[oai(rename = "Ticket")]
pub struct TicketDto {
    /// UUIDv7 (the session's `ticket_id`).
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: i64,
    /// `no_agent_online` or `agent_offline`.
    pub reason: String,
    /// The session it keeps.
    pub session_id: Option<Uuid>,
    /// The customer.
    pub customer_id: Option<Uuid>,
    /// The agent it is addressed to.
    pub agent_id: Option<i64>,
    /// Topic or generated subject.
    pub subject: String,
    /// The department the customer asked for at start.
    pub department: Option<String>,
    /// Priority.
    pub priority: PriorityDto,
    /// `OPEN` or `CLOSED`.
    pub status: TicketStatusDto,
    /// RFC 3339, UTC.
    pub created_at: DateTime<Utc>,
    /// RFC 3339, UTC.
    pub closed_at: Option<DateTime<Utc>>,
}

impl From<Ticket> for TicketDto {
    fn from(t: Ticket) -> Self {
        Self {
            id: t.id.as_uuid(),
            tenant_id: t.tenant_id.get(),
            reason: serde_json::to_value(t.reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            session_id: t.session_id.map(|s| s.as_uuid()),
            customer_id: t.customer_id.map(|c| c.as_uuid()),
            agent_id: t.agent_id.map(livechat_core::UserId::get),
            subject: t.subject,
            department: t.department,
            priority: t.priority.into(),
            status: t.status.into(),
            created_at: t.created_at,
            closed_at: t.closed_at,
        }
    }
}

/// A customer notification.
#[derive(Clone, Debug, Object)]
#[oai(rename = "Notification")]
pub struct NotificationDto {
    /// UUIDv7.
    pub id: Uuid,
    /// `agent_reply`.
    pub kind: String,
    /// Short text.
    pub title: String,
    /// The reply (up to 500 characters).
    pub body: String,
    /// The session.
    pub session_id: Option<Uuid>,
    /// The ticket.
    pub ticket_id: Option<Uuid>,
    /// RFC 3339, UTC.
    pub created_at: DateTime<Utc>,
    /// RFC 3339, UTC; `null` while unread.
    pub read_at: Option<DateTime<Utc>>,
}

impl From<Notification> for NotificationDto {
    fn from(n: Notification) -> Self {
        Self {
            id: n.id.as_uuid(),
            kind: n.kind,
            title: n.title,
            body: n.body,
            session_id: n.session_id.map(|s| s.as_uuid()),
            ticket_id: n.ticket_id.map(|t| t.as_uuid()),
            created_at: n.created_at,
            read_at: n.read_at,
        }
    }
}
