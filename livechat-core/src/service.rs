//! [`ChatService`]: every business rule of the chat, over a [`ChatStore`].

use crate::config::ChatConfig;
use crate::error::ChatError;
use crate::ids::{SessionId, TenantId, UserId};
use crate::model::{AgentPresence, ChatMessage, ChatSession, PresenceStatus, SessionStatus};
use crate::repository::{AppendedMessage, ChatStore};
use crate::store::SeaOrmStore;
use crate::validate::{ClientMsgId, MessageBody, PageSize};

/// The chat rules (issue #2). Adapters call it and never decide themselves.
///
/// Cheap to clone when the store is (the SeaORM store is a pooled handle).
#[derive(Clone, Debug)]
pub struct ChatService<S = SeaOrmStore> {
    store: S,
    config: ChatConfig,
}

impl<S: ChatStore> ChatService<S> {
    /// A service with the given limits.
    pub fn new(store: S, config: ChatConfig) -> Self {
        Self { store, config }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The limits in force.
    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    /// Sets `agent`'s chosen status in `tenant` (`PUT /agents/me/status`).
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn set_agent_status(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
    ) -> Result<AgentPresence, ChatError> {
        self.store.set_presence(tenant, agent, status).await
    }

    /// Starts an agent chat for `agent` (the caller when `None`).
    ///
    /// Rules (issue #2): the agent's chosen status must be `online`; at most
    /// one OPEN agent-started session per (tenant, agent), enforced by the
    /// database so concurrent starts give exactly one session.
    ///
    /// # Errors
    /// [`ChatError::AgentOffline`], [`ChatError::ActiveSessionExists`].
    pub async fn start_session(
        &self,
        tenant: TenantId,
        caller: UserId,
        agent: Option<UserId>,
    ) -> Result<ChatSession, ChatError> {
        let agent = agent.unwrap_or(caller);
        let online = self
            .store
            .get_presence(tenant, agent)
            .await?
            .is_some_and(|p| p.status == PresenceStatus::Online);
        if !online {
            return Err(ChatError::AgentOffline(agent));
        }
        self.store.create_agent_session(tenant, agent).await
    }

    /// One session of the tenant.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] (also for other tenants' sessions).
    pub async fn get_session(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> Result<ChatSession, ChatError> {
        self.store.get_session(tenant, id).await
    }

    /// The tenant's sessions, newest first; `limit` defaults to
    /// [`ChatConfig::default_page_size`].
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] for a `limit` outside `1..=max_page_size`.
    pub async fn list_sessions(
        &self,
        tenant: TenantId,
        status: Option<SessionStatus>,
        limit: Option<i64>,
    ) -> Result<Vec<ChatSession>, ChatError> {
        let limit = PageSize::parse(limit, &self.config)?;
        self.store.list_sessions(tenant, status, limit).await
    }

    /// Closes a session; closing a CLOSED session returns it unchanged.
    ///
    /// # Errors
    /// [`ChatError::NotFound`].
    pub async fn close_session(
        &self,
        tenant: TenantId,
        caller: UserId,
        id: SessionId,
    ) -> Result<ChatSession, ChatError> {
        self.store.close_session(tenant, id, caller).await
    }

    /// Posts `text` from `sender` to an OPEN session; it gets the next `seq`.
    /// A `client_msg_id` already used in the session returns the original
    /// message with `created: false` (DESIGN.md invariant 6).
    ///
    /// # Errors
    /// [`ChatError::InvalidMessage`] (blank), [`ChatError::MessageTooLong`]
    /// (over [`ChatConfig::max_message_chars`]),
    /// [`ChatError::InvalidClientMsgId`], [`ChatError::SessionClosed`],
    /// [`ChatError::NotFound`].
    pub async fn post_message(
        &self,
        tenant: TenantId,
        sender: UserId,
        session: SessionId,
        text: String,
        client_msg_id: Option<String>,
    ) -> Result<AppendedMessage, ChatError> {
        let body = MessageBody::parse(text, self.config.max_message_chars)?;
        let key = client_msg_id.map(ClientMsgId::parse).transpose()?;
        self.store
            .append_message(tenant, session, sender, &body, key.as_ref())
            .await
    }

    /// Messages with `seq > after_seq` (default 0), ascending, at most
    /// `limit` (default 50, max 200).
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] (negative `after_seq`, bad `limit`),
    /// [`ChatError::NotFound`].
    pub async fn list_messages(
        &self,
        tenant: TenantId,
        session: SessionId,
        after_seq: Option<i64>,
        limit: Option<i64>,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        let limit = PageSize::parse(limit, &self.config)?;
        let after_seq = after_seq.unwrap_or(0);
        if after_seq < 0 {
            return Err(ChatError::InvalidPage(
                "after_seq must not be negative".into(),
            ));
        }
        self.store
            .list_messages(tenant, session, after_seq, limit)
            .await
    }
}
