//! Tenant-scoped repository traits (DESIGN.md invariant 1).
//!
//! The [`TenantId`] is the first parameter of every method and every query is
//! filtered by it: a row of another tenant is [`ChatError::NotFound`], never
//! visible. Methods that change state also write their [`DomainEvent`] in the
//! same transaction (invariant 5).
//!
//! [`SeaOrmStore`](crate::store::SeaOrmStore) implements all of them for
//! SQLite and PostgreSQL.

use std::future::Future;

use crate::error::ChatError;
use crate::events::DomainEvent;
use crate::ids::{EventId, SessionId, TenantId, UserId};
use crate::model::{AgentPresence, ChatMessage, ChatSession, PresenceStatus, SessionStatus};
use crate::validate::{ClientMsgId, MessageBody, PageSize};

/// Sessions of one tenant.
pub trait SessionRepository: Send + Sync {
    /// Stores a new OPEN agent-started session for `agent` and its
    /// `session.started` event.
    ///
    /// # Errors
    /// [`ChatError::ActiveSessionExists`] when the agent already has an OPEN
    /// agent-started session in this tenant (enforced by a partial unique
    /// index, so concurrent calls yield exactly one session).
    fn create_agent_session(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;

    /// One session.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when it does not exist in this tenant.
    fn get_session(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;

    /// Sessions of the tenant, newest first, optionally with one status.
    fn list_sessions(
        &self,
        tenant: TenantId,
        status: Option<SessionStatus>,
        limit: PageSize,
    ) -> impl Future<Output = Result<Vec<ChatSession>, ChatError>> + Send;

    /// Moves the session to CLOSED and writes `session.closed`; a session
    /// already CLOSED is returned unchanged with no new event (idempotent).
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when it does not exist in this tenant.
    fn close_session(
        &self,
        tenant: TenantId,
        id: SessionId,
        closed_by: UserId,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;
}

/// The result of appending a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendedMessage {
    /// The stored message (the original one on an idempotent retry).
    pub message: ChatMessage,
    /// `false` when `client_msg_id` matched an earlier message and nothing
    /// new was stored.
    pub created: bool,
}

/// Messages of one tenant's sessions.
pub trait MessageRepository: Send + Sync {
    /// Stores `body` as the next message of an OPEN session, with the next
    /// `seq` assigned in the same transaction (DESIGN.md invariant 4), and its
    /// `message.posted` event. With a `client_msg_id` already used in this
    /// session, stores nothing and returns the original (invariant 6).
    ///
    /// # Errors
    /// [`ChatError::NotFound`] (no such session in this tenant),
    /// [`ChatError::SessionClosed`] (the session is not OPEN).
    fn append_message(
        &self,
        tenant: TenantId,
        session: SessionId,
        sender: UserId,
        body: &MessageBody,
        client_msg_id: Option<&ClientMsgId>,
    ) -> impl Future<Output = Result<AppendedMessage, ChatError>> + Send;

    /// Messages with `seq > after_seq`, ascending by `seq`, at most `limit`.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when the session does not exist in this tenant.
    fn list_messages(
        &self,
        tenant: TenantId,
        session: SessionId,
        after_seq: i64,
        limit: PageSize,
    ) -> impl Future<Output = Result<Vec<ChatMessage>, ChatError>> + Send;
}

/// Agents' chosen status per tenant.
pub trait PresenceRepository: Send + Sync {
    /// Sets the agent's chosen status (upsert) and writes
    /// `agent.status_changed`.
    fn set_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
    ) -> impl Future<Output = Result<AgentPresence, ChatError>> + Send;

    /// The agent's presence, `None` if they never set one in this tenant.
    fn get_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> impl Future<Output = Result<Option<AgentPresence>, ChatError>> + Send;
}

/// Read access to the tenant's committed events.
pub trait OutboxRepository: Send + Sync {
    /// Events of the tenant after `after` (exclusive; `None`: from the
    /// start), oldest first, at most `limit`.
    fn list_events(
        &self,
        tenant: TenantId,
        after: Option<EventId>,
        limit: PageSize,
    ) -> impl Future<Output = Result<Vec<DomainEvent>, ChatError>> + Send;
}

/// Everything [`ChatService`](crate::ChatService) needs from storage.
pub trait ChatStore:
    SessionRepository + MessageRepository + PresenceRepository + OutboxRepository
{
}

impl<T> ChatStore for T where
    T: SessionRepository + MessageRepository + PresenceRepository + OutboxRepository
{
}
