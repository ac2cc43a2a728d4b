//! The one error type of `livechat-core`.
//!
//! Variants name what went wrong in chat terms; adapters (`livechat-poem`)
//! map each to a status code and a stable snake_case code in one place.

/// Everything a [`ChatService`](crate::ChatService) or a repository can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// The row does not exist in this tenant. Rows of other tenants and
    /// malformed ids are reported the same way (DESIGN.md invariant 1: no
    /// existence oracle).
    #[error("not found")]
    NotFound,
    /// A host-owned id was zero, negative or not a number.
    #[error("{0}")]
    InvalidId(&'static str),
    /// The agent's chosen status is not `online`, so no session may be
    /// started for them (issue #2). The request was kept as a ticket
    /// addressed to the agent (issue #3); its id is carried.
    #[error("agent {agent} is not online")]
    AgentOffline {
        /// The agent asked for.
        agent: crate::UserId,
        /// The ticket that keeps the request.
        ticket_id: crate::TicketId,
    },
    /// A claim found the session already assigned (or no longer waiting).
    #[error("session is already assigned")]
    AlreadyAssigned,
    /// The target agent of an assignment is not online.
    #[error("agent {0} is not online")]
    AgentNotOnline(crate::UserId),
    /// A field of a request is invalid (topic, contact, department,
    /// capacity…); the message names it.
    #[error("{0}")]
    InvalidInput(String),
    /// A visitor link or customer credential does not fit (e.g. the visitor
    /// belongs to another tenant).
    #[error("{0}")]
    InvalidCustomer(&'static str),
    /// The agent already has an OPEN agent-started session in this tenant
    /// (DESIGN.md invariant 2). Carries the existing session's id when it
    /// was still open right after the refusal.
    #[error("agent already has an open session")]
    ActiveSessionExists(Option<crate::SessionId>),
    /// The session is CLOSED: no messages, no assignment.
    #[error("session is closed")]
    SessionClosed,
    /// The session is still WAITING for an agent: agents claim it before
    /// writing (customers may write while waiting).
    #[error("session is waiting for an agent; claim it first")]
    SessionNotOpen,
    /// The message body is empty or only whitespace.
    #[error("message must not be empty")]
    InvalidMessage,
    /// The message body has more characters (Unicode scalar values) than
    /// allowed ([`ChatConfig::max_message_chars`](crate::ChatConfig)).
    #[error("message is longer than {max} characters")]
    MessageTooLong {
        /// The configured maximum, in characters.
        max: usize,
    },
    /// A client idempotency key is empty, too long (over 128) or not
    /// printable ASCII.
    #[error("client_msg_id must be 1-128 printable ASCII characters")]
    InvalidClientMsgId,
    /// A paging parameter is out of range (`limit` outside `1..=max`,
    /// negative `after_seq`).
    #[error("{0}")]
    InvalidPage(String),
    /// The database failed or is unreachable. The cause is for logs only.
    #[error("storage error: {0}")]
    Storage(#[from] sea_orm::DbErr),
}

impl ChatError {
    /// Whether the failure is the database being unreachable or out of
    /// connections (worth a retry; adapters answer "unavailable").
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Storage(sea_orm::DbErr::Conn(_) | sea_orm::DbErr::ConnectionAcquire(_))
        )
    }
}
