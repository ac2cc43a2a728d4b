//! The SeaORM store: every repository trait over one `DatabaseConnection`,
//! on SQLite (feature `sqlite`) or PostgreSQL (feature `postgres`).
//!
//! - [`connect`] opens a pool with the settings the rules need (SQLite: WAL,
//!   busy timeout, foreign keys, `synchronous=FULL`).
//! - [`SeaOrmStore::new`] wraps a connection the host already has; run
//!   [`Migrator`] on it first.
//!
//! Concurrency: every write runs in one transaction which, on SQLite, is
//! started `BEGIN IMMEDIATE` so that it takes the write lock up front and
//! waits (busy timeout) instead of failing on a lock upgrade. On PostgreSQL
//! the per-session `seq` is taken by an `UPDATE … RETURNING` on the session
//! row, whose row lock orders concurrent senders.

mod entity;
mod migration;

use std::time::Duration;

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectOptions, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, SqlErr, SqliteTransactionMode,
    TransactionOptions, TransactionTrait,
};
use serde::Serialize;

pub use migration::Migrator;

use crate::error::ChatError;
use crate::events::{DomainEvent, EventKind};
use crate::ids::{EventId, MessageId, SessionId, TenantId, UserId};
use crate::model::{
    AgentPresence, ChatMessage, ChatSession, PresenceStatus, SessionOrigin, SessionStatus, now,
};
use crate::repository::{
    AppendedMessage, MessageRepository, OutboxRepository, PresenceRepository, SessionRepository,
};
use crate::validate::{ClientMsgId, MessageBody, PageSize};
use entity::{message, outbox, presence, session};

/// How long an SQLite writer waits for the write lock before failing.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a connection pool for `url` (`sqlite://path?mode=rwc`,
/// `postgres://user:pass@host/db`) configured for the chat rules.
///
/// SQLite: the file is created if missing; WAL journal, busy timeout
/// [`SQLITE_BUSY_TIMEOUT`], `synchronous=FULL` (a stored message survives
/// power loss), foreign keys on, up to 8 pooled connections.
///
/// # Errors
/// [`DbErr`] when the URL is malformed or the database is unreachable.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options
        .sqlx_logging(false)
        .max_connections(if url.starts_with("sqlite:") { 8 } else { 16 })
        .acquire_timeout(Duration::from_secs(30));
    #[cfg(feature = "sqlite")]
    options.map_sqlx_sqlite_opts(|o| {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        o.create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true)
    });
    sea_orm::Database::connect(options).await
}

/// All repositories over one SeaORM connection (SQLite or PostgreSQL).
#[derive(Clone, Debug)]
pub struct SeaOrmStore {
    db: DatabaseConnection,
}

impl SeaOrmStore {
    /// Wraps an open connection. The `livechat_*` tables must exist
    /// ([`Migrator`]); with SQLite, [`connect`] gives the recommended settings.
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The underlying connection.
    #[must_use]
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Starts a write transaction (`BEGIN IMMEDIATE` on SQLite).
    async fn begin_write(&self) -> Result<DatabaseTransaction, DbErr> {
        self.db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            })
            .await
    }
}

/// Writes one outbox row inside `tx` (DESIGN.md invariant 5).
async fn record_event<T: Serialize>(
    tx: &DatabaseTransaction,
    tenant: TenantId,
    session: Option<SessionId>,
    kind: EventKind,
    payload: &T,
) -> Result<(), ChatError> {
    let payload =
        serde_json::to_string(payload).map_err(|e| DbErr::Custom(format!("event payload: {e}")))?;
    outbox::Entity::insert(outbox::ActiveModel {
        id: Set(EventId::generate().as_uuid()),
        tenant_id: Set(tenant.get()),
        session_id: Set(session.map(|s| s.as_uuid())),
        kind: Set(kind.as_str().to_owned()),
        payload: Set(payload),
        created_at: Set(now()),
        dispatched_at: Set(None),
    })
    .exec_without_returning(tx)
    .await?;
    Ok(())
}

fn corrupt(what: &str) -> ChatError {
    ChatError::Storage(DbErr::Custom(format!("unexpected stored value: {what}")))
}

fn host_id<T: TryFrom<i64, Error = ChatError>>(v: i64) -> Result<T, ChatError> {
    T::try_from(v).map_err(|_| corrupt("non-positive id"))
}

impl TryFrom<session::Model> for ChatSession {
    type Error = ChatError;
    fn try_from(m: session::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: SessionId::from_uuid(m.id),
            tenant_id: host_id(m.tenant_id)?,
            agent_id: m.agent_id.map(host_id).transpose()?,
            status: SessionStatus::parse(&m.status).ok_or_else(|| corrupt("session status"))?,
            created_at: m.created_at,
            updated_at: m.updated_at,
            closed_at: m.closed_at,
        })
    }
}

impl TryFrom<message::Model> for ChatMessage {
    type Error = ChatError;
    fn try_from(m: message::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: MessageId::from_uuid(m.id),
            session_id: SessionId::from_uuid(m.session_id),
            tenant_id: host_id(m.tenant_id)?,
            sender_id: host_id(m.sender_id)?,
            seq: m.seq,
            message: m.body,
            client_msg_id: m.client_msg_id,
            created_at: m.created_at,
        })
    }
}

impl TryFrom<presence::Model> for AgentPresence {
    type Error = ChatError;
    fn try_from(m: presence::Model) -> Result<Self, ChatError> {
        Ok(Self {
            tenant_id: host_id(m.tenant_id)?,
            agent_id: host_id(m.agent_id)?,
            status: PresenceStatus::parse(&m.status).ok_or_else(|| corrupt("presence status"))?,
            updated_at: m.updated_at,
        })
    }
}

impl TryFrom<outbox::Model> for DomainEvent {
    type Error = ChatError;
    fn try_from(m: outbox::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: EventId::from_uuid(m.id),
            tenant_id: host_id(m.tenant_id)?,
            session_id: m.session_id.map(SessionId::from_uuid),
            kind: EventKind::parse(&m.kind).ok_or_else(|| corrupt("event kind"))?,
            payload: serde_json::from_str(&m.payload).map_err(|_| corrupt("event payload"))?,
            created_at: m.created_at,
        })
    }
}

fn convert_all<M, T: TryFrom<M, Error = ChatError>>(rows: Vec<M>) -> Result<Vec<T>, ChatError> {
    rows.into_iter().map(T::try_from).collect()
}

impl SeaOrmStore {
    async fn find_session(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> Result<Option<session::Model>, DbErr> {
        session::Entity::find_by_id(id.as_uuid())
            .filter(session::Column::TenantId.eq(tenant.get()))
            .one(&self.db)
            .await
    }

    async fn find_by_client_msg_id(
        &self,
        tenant: TenantId,
        session: SessionId,
        key: &ClientMsgId,
    ) -> Result<Option<ChatMessage>, ChatError> {
        message::Entity::find()
            .filter(message::Column::TenantId.eq(tenant.get()))
            .filter(message::Column::SessionId.eq(session.as_uuid()))
            .filter(message::Column::ClientMsgId.eq(key.as_str()))
            .one(&self.db)
            .await?
            .map(ChatMessage::try_from)
            .transpose()
    }

    async fn open_session_of(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<Option<SessionId>, DbErr> {
        Ok(session::Entity::find()
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::AgentId.eq(agent.get()))
            .filter(session::Column::Origin.eq(SessionOrigin::Agent.as_str()))
            .filter(session::Column::Status.eq(SessionStatus::Open.as_str()))
            .one(&self.db)
            .await?
            .map(|m| SessionId::from_uuid(m.id)))
    }
}

impl SessionRepository for SeaOrmStore {
    async fn create_agent_session(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<ChatSession, ChatError> {
        let at = now();
        let row = session::ActiveModel {
            id: Set(SessionId::generate().as_uuid()),
            tenant_id: Set(tenant.get()),
            agent_id: Set(Some(agent.get())),
            origin: Set(SessionOrigin::Agent.as_str().to_owned()),
            status: Set(SessionStatus::Open.as_str().to_owned()),
            last_seq: Set(0),
            created_at: Set(at),
            updated_at: Set(at),
            closed_at: Set(None),
        };
        let tx = self.begin_write().await?;
        let inserted = match session::Entity::insert(row).exec_with_returning(&tx).await {
            Ok(model) => model,
            Err(err) => {
                tx.rollback().await?;
                return Err(match err.sql_err() {
                    Some(SqlErr::UniqueConstraintViolation(_)) => {
                        ChatError::ActiveSessionExists(self.open_session_of(tenant, agent).await?)
                    }
                    _ => err.into(),
                });
            }
        };
        let created = ChatSession::try_from(inserted)?;
        record_event(
            &tx,
            tenant,
            Some(created.id),
            EventKind::SessionStarted,
            &created,
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn get_session(&self, tenant: TenantId, id: SessionId) -> Result<ChatSession, ChatError> {
        self.find_session(tenant, id)
            .await?
            .ok_or(ChatError::NotFound)?
            .try_into()
    }

    async fn list_sessions(
        &self,
        tenant: TenantId,
        status: Option<SessionStatus>,
        limit: PageSize,
    ) -> Result<Vec<ChatSession>, ChatError> {
        let mut query = session::Entity::find().filter(session::Column::TenantId.eq(tenant.get()));
        if let Some(status) = status {
            query = query.filter(session::Column::Status.eq(status.as_str()));
        }
        let rows = query
            .order_by_desc(session::Column::CreatedAt)
            .order_by_desc(session::Column::Id)
            .limit(limit.get())
            .all(&self.db)
            .await?;
        convert_all(rows)
    }

    async fn close_session(
        &self,
        tenant: TenantId,
        id: SessionId,
        closed_by: UserId,
    ) -> Result<ChatSession, ChatError> {
        let at = now();
        let tx = self.begin_write().await?;
        let closed = session::Entity::update_many()
            .col_expr(
                session::Column::Status,
                Expr::value(SessionStatus::Closed.as_str()),
            )
            .col_expr(session::Column::ClosedAt, Expr::value(at))
            .col_expr(session::Column::UpdatedAt, Expr::value(at))
            .filter(session::Column::Id.eq(id.as_uuid()))
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::Status.ne(SessionStatus::Closed.as_str()))
            .exec_with_returning(&tx)
            .await?;
        let Some(row) = closed.into_iter().next() else {
            // Already closed (idempotent) or absent in this tenant.
            tx.rollback().await?;
            return self.get_session(tenant, id).await;
        };
        let closed = ChatSession::try_from(row)?;
        #[derive(Serialize)]
        struct Closed<'a> {
            #[serde(flatten)]
            session: &'a ChatSession,
            closed_by: UserId,
        }
        let payload = Closed {
            session: &closed,
            closed_by,
        };
        record_event(&tx, tenant, Some(id), EventKind::SessionClosed, &payload).await?;
        tx.commit().await?;
        Ok(closed)
    }
}

impl MessageRepository for SeaOrmStore {
    async fn append_message(
        &self,
        tenant: TenantId,
        session: SessionId,
        sender: UserId,
        body: &MessageBody,
        client_msg_id: Option<&ClientMsgId>,
    ) -> Result<AppendedMessage, ChatError> {
        // A retry whose original is stored needs no lock (and works after close).
        if let Some(key) = client_msg_id
            && let Some(message) = self.find_by_client_msg_id(tenant, session, key).await?
        {
            return Ok(AppendedMessage {
                message,
                created: false,
            });
        }

        let at = now();
        let tx = self.begin_write().await?;
        // Taking the next seq locks the session row: concurrent senders to one
        // session queue here, so seq is gap-free and unique (invariant 4).
        let locked = session::Entity::update_many()
            .col_expr(
                session::Column::LastSeq,
                Expr::col(session::Column::LastSeq).add(1),
            )
            .col_expr(session::Column::UpdatedAt, Expr::value(at))
            .filter(session::Column::Id.eq(session.as_uuid()))
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::Status.eq(SessionStatus::Open.as_str()))
            .exec_with_returning(&tx)
            .await?;
        let Some(row) = locked.into_iter().next() else {
            tx.rollback().await?;
            return Err(match self.find_session(tenant, session).await? {
                Some(_) => ChatError::SessionClosed,
                None => ChatError::NotFound,
            });
        };

        if let Some(key) = client_msg_id {
            // Under the row lock: a concurrent retry of the same key either
            // committed before us (found here) or waits behind us.
            let existing = message::Entity::find()
                .filter(message::Column::SessionId.eq(session.as_uuid()))
                .filter(message::Column::ClientMsgId.eq(key.as_str()))
                .one(&tx)
                .await?;
            if let Some(existing) = existing {
                tx.rollback().await?;
                return Ok(AppendedMessage {
                    message: existing.try_into()?,
                    created: false,
                });
            }
        }

        let stored = message::Entity::insert(message::ActiveModel {
            id: Set(MessageId::generate().as_uuid()),
            tenant_id: Set(tenant.get()),
            session_id: Set(session.as_uuid()),
            sender_id: Set(sender.get()),
            seq: Set(row.last_seq),
            body: Set(body.as_str().to_owned()),
            client_msg_id: Set(client_msg_id.map(|k| k.as_str().to_owned())),
            created_at: Set(at),
        })
        .exec_with_returning(&tx)
        .await?;
        let message = ChatMessage::try_from(stored)?;
        record_event(
            &tx,
            tenant,
            Some(session),
            EventKind::MessagePosted,
            &message,
        )
        .await?;
        tx.commit().await?;
        Ok(AppendedMessage {
            message,
            created: true,
        })
    }

    async fn list_messages(
        &self,
        tenant: TenantId,
        session: SessionId,
        after_seq: i64,
        limit: PageSize,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        if self.find_session(tenant, session).await?.is_none() {
            return Err(ChatError::NotFound);
        }
        let rows = message::Entity::find()
            .filter(message::Column::TenantId.eq(tenant.get()))
            .filter(message::Column::SessionId.eq(session.as_uuid()))
            .filter(message::Column::Seq.gt(after_seq))
            .order_by_asc(message::Column::Seq)
            .limit(limit.get())
            .all(&self.db)
            .await?;
        convert_all(rows)
    }
}

impl PresenceRepository for SeaOrmStore {
    async fn set_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
    ) -> Result<AgentPresence, ChatError> {
        let presence = AgentPresence {
            tenant_id: tenant,
            agent_id: agent,
            status,
            updated_at: now(),
        };
        let tx = self.begin_write().await?;
        presence::Entity::insert(presence::ActiveModel {
            tenant_id: Set(tenant.get()),
            agent_id: Set(agent.get()),
            status: Set(status.as_str().to_owned()),
            updated_at: Set(presence.updated_at),
        })
        .on_conflict(
            OnConflict::columns([presence::Column::TenantId, presence::Column::AgentId])
                .update_columns([presence::Column::Status, presence::Column::UpdatedAt])
                .to_owned(),
        )
        .exec_without_returning(&tx)
        .await?;
        record_event(&tx, tenant, None, EventKind::AgentStatusChanged, &presence).await?;
        tx.commit().await?;
        Ok(presence)
    }

    async fn get_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<Option<AgentPresence>, ChatError> {
        presence::Entity::find_by_id((tenant.get(), agent.get()))
            .one(&self.db)
            .await?
            .map(AgentPresence::try_from)
            .transpose()
    }
}

impl OutboxRepository for SeaOrmStore {
    async fn list_events(
        &self,
        tenant: TenantId,
        after: Option<EventId>,
        limit: PageSize,
    ) -> Result<Vec<DomainEvent>, ChatError> {
        let mut query = outbox::Entity::find().filter(outbox::Column::TenantId.eq(tenant.get()));
        if let Some(after) = after {
            query = query.filter(outbox::Column::Id.gt(after.as_uuid()));
        }
        let rows = query
            .order_by_asc(outbox::Column::Id)
            .limit(limit.get())
            .all(&self.db)
            .await?;
        convert_all(rows)
    }
}
