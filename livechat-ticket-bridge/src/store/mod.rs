//! The default sinks: tickets and notifications in the host's database,
//! through SeaORM (SQLite or PostgreSQL), for hosts without their own
//! ticket module (issue #3).

mod entity;
mod migration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use livechat_core::store::older_than;
use livechat_core::{
    ChatError, CustomerId, EventId, Notification, NotificationId, NotificationInbox, PageSize,
    Priority, SessionId, TenantId, Ticket, TicketDirectory, TicketFilter, TicketId, TicketReason,
    TicketRequested, TicketStatus, UserId,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

pub use migration::BridgeMigrator;

use crate::sink::{NotificationSink, SinkError, TicketSink};
use entity::{notification, ticket};

/// Stores tickets in `livechat_tickets` and notifications in
/// `livechat_notifications`, and reads them back for the HTTP layer.
///
/// - As [`TicketSink`] and [`NotificationSink`] it is idempotent: the row's
///   primary key is the ticket id (allocated with the request) or the
///   notification id (the id of the agent reply it is about, equal to its
///   `message.posted` event's id, not a `message.missed` event's),
///   inserted `ON CONFLICT (id) DO NOTHING`, so a redelivered event, or
///   both events of one reply, leave exactly one row. Database errors are
///   [`SinkError::Retryable`].
/// - As [`TicketDirectory`] and [`NotificationInbox`] every query is filtered
///   by tenant (DESIGN.md invariant 1); lists are newest first.
///
/// The tables must exist: run [`BridgeMigrator`] on the connection first.
/// Share one value between the dispatcher's two sink lists with an `Arc`.
#[derive(Clone, Debug)]
pub struct SeaOrmSinks {
    db: DatabaseConnection,
}

impl SeaOrmSinks {
    /// Wraps an open connection (SQLite or PostgreSQL) on which
    /// [`BridgeMigrator`] has run.
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The underlying connection.
    #[must_use]
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }
}

fn retryable(e: DbErr) -> SinkError {
    SinkError::Retryable(format!("database: {e}"))
}

const fn reason_str(reason: TicketReason) -> &'static str {
    match reason {
        TicketReason::NoAgentOnline => "no_agent_online",
        TicketReason::AgentOffline => "agent_offline",
    }
}

fn parse_reason(s: &str) -> Option<TicketReason> {
    [TicketReason::NoAgentOnline, TicketReason::AgentOffline]
        .into_iter()
        .find(|r| reason_str(*r) == s)
}

/// The ticket's subject: the customer's topic, else who the request was for.
fn subject(request: &TicketRequested) -> String {
    match (&request.topic, request.agent_id) {
        (Some(topic), _) => topic.clone(),
        (None, Some(agent)) => format!("Chat request for agent {agent}"),
        (None, None) => "Chat request".to_owned(),
    }
}

/// When `id` was allocated: its UUIDv7 timestamp (millisecond precision),
/// so that a late or retried delivery does not move what it dates. Now,
/// for a non-v7 id. A ticket's id dates its request (when no eligible
/// agent was found); a `session.closed` event's id dates the close.
fn allocated_at(id: uuid::Uuid) -> DateTime<Utc> {
    id.get_timestamp()
        .and_then(|ts| {
            let (secs, nanos) = ts.to_unix();
            DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
        })
        .unwrap_or_else(livechat_core::now)
}

fn corrupt(what: &str) -> ChatError {
    ChatError::Storage(DbErr::Custom(format!("unexpected stored value: {what}")))
}

fn host_id<T: TryFrom<i64>>(v: i64) -> Result<T, ChatError> {
    T::try_from(v).map_err(|_| corrupt("non-positive id"))
}

impl TryFrom<ticket::Model> for Ticket {
    type Error = ChatError;
    fn try_from(m: ticket::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: TicketId::from_uuid(m.id),
            tenant_id: host_id(m.tenant_id)?,
            reason: parse_reason(&m.reason).ok_or_else(|| corrupt("ticket reason"))?,
            session_id: m.session_id.map(SessionId::from_uuid),
            customer_id: m.customer_id.map(CustomerId::from_uuid),
            agent_id: m.agent_id.map(host_id::<UserId>).transpose()?,
            subject: m.subject,
            department: m.department,
            priority: Priority::parse(&m.priority).ok_or_else(|| corrupt("ticket priority"))?,
            status: TicketStatus::parse(&m.status).ok_or_else(|| corrupt("ticket status"))?,
            created_at: m.created_at,
            closed_at: m.closed_at,
        })
    }
}

impl TryFrom<notification::Model> for Notification {
    type Error = ChatError;
    fn try_from(m: notification::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: NotificationId::from_uuid(m.id),
            tenant_id: host_id(m.tenant_id)?,
            customer_id: CustomerId::from_uuid(m.customer_id),
            session_id: m.session_id.map(SessionId::from_uuid),
            ticket_id: m.ticket_id.map(TicketId::from_uuid),
            kind: m.kind,
            title: m.title,
            body: m.body,
            created_at: m.created_at,
            read_at: m.read_at,
        })
    }
}

/// The name of [`SeaOrmSinks`] as a sink of either kind.
const TABLES: &str = "livechat tables";

#[async_trait]
impl TicketSink for SeaOrmSinks {
    /// `livechat tables`, for both kinds.
    fn name(&self) -> String {
        TABLES.to_owned()
    }

    /// Inserts the ticket `OPEN` under `request.ticket_id`; a second delivery
    /// of the same request changes nothing.
    async fn open_ticket(&self, request: &TicketRequested, _key: EventId) -> Result<(), SinkError> {
        ticket::Entity::insert(ticket::ActiveModel {
            id: Set(request.ticket_id.as_uuid()),
            tenant_id: Set(request.tenant_id.get()),
            reason: Set(reason_str(request.reason).to_owned()),
            session_id: Set(request.session_id.map(|s| s.as_uuid())),
            customer_id: Set(request.customer_id.map(|c| c.as_uuid())),
            agent_id: Set(request.agent_id.map(UserId::get)),
            subject: Set(subject(request)),
            department: Set(request.department.clone()),
            priority: Set(request.priority.as_str().to_owned()),
            status: Set(TicketStatus::Open.as_str().to_owned()),
            created_at: Set(allocated_at(request.ticket_id.as_uuid())),
            closed_at: Set(None),
        })
        .on_conflict_do_nothing()
        .exec_without_returning(&self.db)
        .await
        .map_err(retryable)?;
        Ok(())
    }

    /// Sets an `OPEN` ticket of `tenant` to `CLOSED` with `closed_at` = the
    /// time of the close, taken from `key` (the `session.closed` or `ticket.closed` event's
    /// UUIDv7 id, allocated when the close was committed), not from the
    /// delivery, which a retried sink may hold up for minutes; a closed,
    /// unknown or other tenant's ticket is left alone.
    async fn close_ticket(
        &self,
        tenant: TenantId,
        id: TicketId,
        key: EventId,
    ) -> Result<(), SinkError> {
        while_open(tenant, id)
            .col_expr(
                ticket::Column::Status,
                Expr::value(TicketStatus::Closed.as_str()),
            )
            .col_expr(
                ticket::Column::ClosedAt,
                Expr::value(allocated_at(key.as_uuid())),
            )
            .exec(&self.db)
            .await
            .map_err(retryable)?;
        Ok(())
    }

    /// Sets an `OPEN` ticket's `agent_id` to the agent now serving its
    /// session (a closed, unknown or other tenant's ticket is left alone);
    /// a second delivery writes the same.
    async fn assign_ticket(
        &self,
        tenant: TenantId,
        id: TicketId,
        agent: UserId,
        _key: EventId,
    ) -> Result<(), SinkError> {
        while_open(tenant, id)
            .col_expr(ticket::Column::AgentId, Expr::value(agent.get()))
            .exec(&self.db)
            .await
            .map_err(retryable)?;
        Ok(())
    }

    /// Clears an `OPEN` ticket's `agent_id` (its chat went back to the
    /// queue); a closed, unknown or other tenant's ticket is left alone.
    async fn unassign_ticket(
        &self,
        tenant: TenantId,
        id: TicketId,
        _key: EventId,
    ) -> Result<(), SinkError> {
        while_open(tenant, id)
            .col_expr(ticket::Column::AgentId, Expr::value(Option::<i64>::None))
            .exec(&self.db)
            .await
            .map_err(retryable)?;
        Ok(())
    }
}

/// An update of ticket `id` of `tenant` while it is OPEN (the sink calls
/// add their columns; a closed, unknown or other tenant's ticket is left
/// alone).
fn while_open(tenant: TenantId, id: TicketId) -> sea_orm::UpdateMany<ticket::Entity> {
    ticket::Entity::update_many()
        .filter(ticket::Column::Id.eq(id.as_uuid()))
        .filter(ticket::Column::TenantId.eq(tenant.get()))
        .filter(ticket::Column::Status.eq(TicketStatus::Open.as_str()))
}

#[async_trait]
impl NotificationSink for SeaOrmSinks {
    /// `livechat tables`, for both kinds.
    fn name(&self) -> String {
        TABLES.to_owned()
    }

    /// Inserts the notification under its id; a second delivery changes nothing.
    async fn notify(&self, n: &Notification, _key: EventId) -> Result<(), SinkError> {
        notification::Entity::insert(notification::ActiveModel {
            id: Set(n.id.as_uuid()),
            tenant_id: Set(n.tenant_id.get()),
            customer_id: Set(n.customer_id.as_uuid()),
            session_id: Set(n.session_id.map(|s| s.as_uuid())),
            ticket_id: Set(n.ticket_id.map(|t| t.as_uuid())),
            kind: Set(n.kind.clone()),
            title: Set(n.title.clone()),
            body: Set(n.body.clone()),
            created_at: Set(n.created_at),
            read_at: Set(n.read_at),
        })
        .on_conflict_do_nothing()
        .exec_without_returning(&self.db)
        .await
        .map_err(retryable)?;
        Ok(())
    }
}

#[async_trait]
impl TicketDirectory for SeaOrmSinks {
    async fn list_tickets(
        &self,
        tenant: TenantId,
        filter: TicketFilter,
        before: Option<TicketId>,
        limit: PageSize,
    ) -> Result<Vec<Ticket>, ChatError> {
        let mut query = ticket::Entity::find().filter(ticket::Column::TenantId.eq(tenant.get()));
        if let Some(status) = filter.status {
            query = query.filter(ticket::Column::Status.eq(status.as_str()));
        }
        if let Some(department) = filter.department {
            query = query.filter(ticket::Column::Department.eq(department));
        }
        if let Some(before) = before {
            let cursor = ticket::Entity::find_by_id(before.as_uuid())
                .filter(ticket::Column::TenantId.eq(tenant.get()))
                .one(&self.db)
                .await?
                .ok_or_else(|| ChatError::InvalidPage(livechat_core::INVALID_CURSOR.into()))?;
            query = query.filter(older_than(
                ticket::Column::CreatedAt,
                ticket::Column::Id,
                cursor.created_at,
                before.as_uuid(),
            ));
        }
        query
            .order_by_desc(ticket::Column::CreatedAt)
            .order_by_desc(ticket::Column::Id)
            .limit(limit.get())
            .all(&self.db)
            .await?
            .into_iter()
            .map(Ticket::try_from)
            .collect()
    }

    async fn get_ticket(&self, tenant: TenantId, id: TicketId) -> Result<Ticket, ChatError> {
        ticket::Entity::find_by_id(id.as_uuid())
            .filter(ticket::Column::TenantId.eq(tenant.get()))
            .one(&self.db)
            .await?
            .ok_or(ChatError::NotFound)?
            .try_into()
    }
}

/// Notifications addressed to one of `customers` (none when it is empty).
fn addressed_to(customers: &[CustomerId]) -> sea_orm::sea_query::SimpleExpr {
    notification::Column::CustomerId.is_in(customers.iter().map(|c| c.as_uuid()))
}

impl SeaOrmSinks {
    async fn find_notification(
        &self,
        tenant: TenantId,
        customers: &[CustomerId],
        id: NotificationId,
    ) -> Result<Notification, ChatError> {
        notification::Entity::find_by_id(id.as_uuid())
            .filter(notification::Column::TenantId.eq(tenant.get()))
            .filter(addressed_to(customers))
            .one(&self.db)
            .await?
            .ok_or(ChatError::NotFound)?
            .try_into()
    }
}

#[async_trait]
impl NotificationInbox for SeaOrmSinks {
    async fn list_notifications(
        &self,
        tenant: TenantId,
        customers: &[CustomerId],
        before: Option<NotificationId>,
        limit: PageSize,
    ) -> Result<Vec<Notification>, ChatError> {
        let mut query = notification::Entity::find()
            .filter(notification::Column::TenantId.eq(tenant.get()))
            .filter(addressed_to(customers));
        if let Some(before) = before {
            let cursor = notification::Entity::find_by_id(before.as_uuid())
                .filter(notification::Column::TenantId.eq(tenant.get()))
                .filter(addressed_to(customers))
                .one(&self.db)
                .await?
                .ok_or_else(|| ChatError::InvalidPage(livechat_core::INVALID_CURSOR.into()))?;
            query = query.filter(older_than(
                notification::Column::CreatedAt,
                notification::Column::Id,
                cursor.created_at,
                before.as_uuid(),
            ));
        }
        query
            .order_by_desc(notification::Column::CreatedAt)
            .order_by_desc(notification::Column::Id)
            .limit(limit.get())
            .all(&self.db)
            .await?
            .into_iter()
            .map(Notification::try_from)
            .collect()
    }

    /// Sets `read_at` once (the first read time is kept) and returns the
    /// notification.
    async fn mark_read(
        &self,
        tenant: TenantId,
        customers: &[CustomerId],
        id: NotificationId,
    ) -> Result<Notification, ChatError> {
        notification::Entity::update_many()
            .col_expr(
                notification::Column::ReadAt,
                Expr::value(livechat_core::now()),
            )
            .filter(notification::Column::Id.eq(id.as_uuid()))
            .filter(notification::Column::TenantId.eq(tenant.get()))
            .filter(addressed_to(customers))
            .filter(notification::Column::ReadAt.is_null())
            .exec(&self.db)
            .await?;
        self.find_notification(tenant, customers, id).await
    }
}
