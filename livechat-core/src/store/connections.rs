//! [`ConnectionRepository`] for the SeaORM store: live WebSocket
//! connections of every node, with expiry so a crashed node's connections
//! stop counting (issue #4).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sea_orm::sea_query::{Alias, Asterisk, Expr, ExprTrait, Query, SelectStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, prelude::DateTimeUtc,
};

use super::entity::{connection, connection_join, message};
use super::sessions::find_session;
use super::{Recorded, SeaOrmStore, host_id, record_event};
use crate::error::ChatError;
use crate::events::{EventKind, MessagePosted};
use crate::ids::{CustomerId, SessionId, TenantId, UserId};
use crate::model::{ChatMessage, SenderType, now};
use crate::repository::{
    ConnectionOwner, ConnectionRepository, PurgedConnections, SessionConnections,
};

fn expiry(ttl: Duration) -> chrono::DateTime<chrono::Utc> {
    now() + crate::model::span(ttl)
}

/// `livechat_connections.role` of an agent's connection.
pub(super) const AGENT: &str = "agent";

/// `livechat_connections.role` of a customer's connection.
pub(super) const CUSTOMER: &str = "customer";

/// `SELECT COUNT(*)` of the connections of `role` following a session
/// that are live (unexpired) at `at`, on any node (column `n`). `tenant`
/// and `session` are values, or the outer query's columns for a
/// correlated subquery (the group commit reads a session's customer
/// connections in its lock and checks them again in its guarded write).
///
/// The session's joins are read by their session index
/// (`livechat_connection_joins_session`) and each joined connection is checked by its primary key, in a
/// scalar subquery that PostgreSQL neither joins nor hashes: as a join,
/// the plan depended on the statistics, and two kinds seen in practice
/// each made one plan read every connection row (issue #5): with the
/// connections never analyzed (autovacuum had analyzed only the
/// sessions, messages and outbox of the benchmark's cross-node scenario),
/// a nested loop scanned `livechat_connections` once per joined
/// connection; with them analyzed while empty and 20,000 connections
/// since, a batch-wide form (the batch's sessions `(tenant_id, id) IN` an
/// uncorrelated subquery) scanned them all once per statement. Bound in
/// this order: the values of `tenant` and `session`, `role`, `at`.
pub(super) fn live_connections(
    role: &str,
    tenant: impl Into<Expr>,
    session: impl Into<Expr>,
    at: chrono::DateTime<chrono::Utc>,
) -> SelectStatement {
    let live = Query::select()
        .expr(
            Expr::col((connection::Entity, connection::Column::Role))
                .eq(role)
                .and(Expr::col((connection::Entity, connection::Column::ExpiresAt)).gt(at)),
        )
        .from(connection::Entity)
        .and_where(
            Expr::col((connection::Entity, connection::Column::Id)).equals((
                connection_join::Entity,
                connection_join::Column::ConnectionId,
            )),
        )
        .to_owned();
    Query::select()
        .expr_as(Expr::col(Asterisk).count(), Alias::new("n"))
        .from(connection_join::Entity)
        .and_where(
            Expr::col((connection_join::Entity, connection_join::Column::TenantId)).eq(tenant),
        )
        .and_where(
            Expr::col((connection_join::Entity, connection_join::Column::SessionId)).eq(session),
        )
        .and_where(Expr::SubQuery(None, Box::new(live.into())))
        .to_owned()
}

async fn count_role(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    session: SessionId,
    role: &str,
) -> Result<u64, DbErr> {
    let count: i64 = conn
        .query_one(&live_connections(
            role,
            tenant.get(),
            session.as_uuid(),
            now(),
        ))
        .await?
        .map_or(Ok(0), |row| row.try_get("", "n"))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

impl ConnectionRepository for SeaOrmStore {
    async fn register_connection(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        owner: ConnectionOwner,
        node: &str,
        ttl: Duration,
    ) -> Result<(), ChatError> {
        let (role, agent, customer) = match owner {
            ConnectionOwner::Agent(a) => (AGENT, Some(a.get()), None),
            ConnectionOwner::Customer(c) => (CUSTOMER, None, Some(c.as_uuid())),
        };
        connection::Entity::insert(connection::ActiveModel {
            id: Set(id),
            tenant_id: Set(tenant.get()),
            role: Set(role.to_owned()),
            agent_id: Set(agent),
            customer_id: Set(customer),
            node_id: Set(node.chars().take(64).collect()),
            expires_at: Set(expiry(ttl)),
        })
        .exec_without_returning(&self.db)
        .await?;
        Ok(())
    }

    async fn touch_connection(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        ttl: Duration,
    ) -> Result<(), ChatError> {
        connection::Entity::update_many()
            .col_expr(connection::Column::ExpiresAt, Expr::value(expiry(ttl)))
            .filter(connection::Column::Id.eq(id))
            .filter(connection::Column::TenantId.eq(tenant.get()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn join_session(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        session: SessionId,
    ) -> Result<(), ChatError> {
        connection_join::Entity::insert(connection_join::ActiveModel {
            connection_id: Set(id),
            session_id: Set(session.as_uuid()),
            tenant_id: Set(tenant.get()),
        })
        .on_conflict_do_nothing()
        .exec_without_returning(&self.db)
        .await?;
        Ok(())
    }

    async fn leave_session(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        session: SessionId,
    ) -> Result<(), ChatError> {
        connection_join::Entity::delete_many()
            .filter(connection_join::Column::ConnectionId.eq(id))
            .filter(connection_join::Column::SessionId.eq(session.as_uuid()))
            .filter(connection_join::Column::TenantId.eq(tenant.get()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn unregister_connection(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
    ) -> Result<(), ChatError> {
        connection_join::Entity::delete_many()
            .filter(connection_join::Column::ConnectionId.eq(id))
            .filter(connection_join::Column::TenantId.eq(tenant.get()))
            .exec(&self.db)
            .await?;
        connection::Entity::delete_many()
            .filter(connection::Column::Id.eq(id))
            .filter(connection::Column::TenantId.eq(tenant.get()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn session_connections(
        &self,
        tenant: TenantId,
        session: SessionId,
    ) -> Result<SessionConnections, ChatError> {
        Ok(SessionConnections {
            customers: count_role(&self.db, tenant, session, CUSTOMER).await?,
            agents: count_role(&self.db, tenant, session, AGENT).await?,
        })
    }

    async fn agent_connected(&self, tenant: TenantId, agent: UserId) -> Result<bool, ChatError> {
        let n = connection::Entity::find()
            .filter(connection::Column::TenantId.eq(tenant.get()))
            .filter(connection::Column::AgentId.eq(agent.get()))
            .filter(connection::Column::ExpiresAt.gt(now()))
            .count(&self.db)
            .await?;
        Ok(n > 0)
    }

    async fn purge_expired_connections(
        &self,
        connection_ttl: Duration,
    ) -> Result<PurgedConnections, ChatError> {
        let at = now();
        let tx = self.begin_write().await?;
        let rows: Vec<(uuid::Uuid, i64, String, Option<i64>, DateTimeUtc)> =
            connection::Entity::find()
                .select_only()
                .column(connection::Column::Id)
                .column(connection::Column::TenantId)
                .column(connection::Column::Role)
                .column(connection::Column::AgentId)
                .column(connection::Column::ExpiresAt)
                .filter(connection::Column::ExpiresAt.lte(at))
                .into_tuple()
                .all(&tx)
                .await?;
        if rows.is_empty() {
            return Ok(PurgedConnections::default());
        }
        let mut agents = rows
            .iter()
            .filter_map(|&(_, tenant, _, agent, _)| Some((tenant, agent?)))
            .map(|(tenant, agent)| Ok((host_id(tenant)?, host_id(agent)?)))
            .collect::<Result<Vec<(TenantId, UserId)>, ChatError>>()?;
        agents.sort_unstable();
        agents.dedup();
        // Each expired customer connection's window of replies it counted
        // as seen: from its last renewal to its expiry.
        let windows: HashMap<uuid::Uuid, (DateTimeUtc, DateTimeUtc)> = rows
            .iter()
            .filter(|(_, _, role, _, _)| role == CUSTOMER)
            .map(|&(id, _, _, _, expires_at)| {
                (
                    id,
                    (expires_at - crate::model::span(connection_ttl), expires_at),
                )
            })
            .collect();
        let expired: Vec<uuid::Uuid> = rows.into_iter().map(|(id, ..)| id).collect();
        // Deleted with RETURNING: a purge running at the same time on
        // another node deletes (and so reads) none of these joins.
        let joins = connection_join::Entity::delete_many()
            .filter(connection_join::Column::ConnectionId.is_in(expired.clone()))
            .exec_with_returning(&tx)
            .await?;
        let connections = connection::Entity::delete_many()
            .filter(connection::Column::Id.is_in(expired))
            .exec(&tx)
            .await?
            .rows_affected;
        let mut sessions: BTreeMap<(i64, uuid::Uuid), (DateTimeUtc, DateTimeUtc)> = BTreeMap::new();
        for join in joins {
            if let Some(&(from, until)) = windows.get(&join.connection_id) {
                sessions
                    .entry((join.tenant_id, join.session_id))
                    .and_modify(|w| *w = (Ord::min(w.0, from), Ord::max(w.1, until)))
                    .or_insert((from, until));
            }
        }
        let mut ev = self.recorder();
        let mut missed_replies = 0;
        for ((tenant, session), window) in sessions {
            missed_replies +=
                record_missed_replies(&tx, &mut ev, host_id(tenant)?, session, window, at).await?;
        }
        self.commit(tx, ev).await?;
        Ok(PurgedConnections {
            connections,
            agents,
            missed_replies,
        })
    }
}

/// Writes a `message.missed` event for each agent reply of `session`
/// stored within `(from, until)` (`from` inclusive), unless a live customer
/// connection follows the session at `at` or the session has a ticket (or
/// no customer): see [`ConnectionRepository::purge_expired_connections`].
/// Returns the events written.
async fn record_missed_replies(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    tenant: TenantId,
    session: uuid::Uuid,
    (from, until): (DateTimeUtc, DateTimeUtc),
    at: DateTimeUtc,
) -> Result<u64, ChatError> {
    let id = SessionId::from_uuid(session);
    let Some(row) = find_session(tx, tenant, id).await? else {
        return Ok(0);
    };
    let Some(customer) = row.customer_id else {
        return Ok(0);
    };
    if row.ticket_id.is_some() {
        return Ok(0);
    }
    let live: i64 = tx
        .query_one(&live_connections(CUSTOMER, tenant.get(), session, at))
        .await?
        .map_or(Ok(0), |r| r.try_get("", "n"))?;
    if live > 0 {
        return Ok(0);
    }
    let replies = message::Entity::find()
        .filter(message::Column::TenantId.eq(tenant.get()))
        .filter(message::Column::SessionId.eq(session))
        .filter(message::Column::SenderType.eq(SenderType::Agent.as_str()))
        .filter(message::Column::CreatedAt.gte(from))
        .filter(message::Column::CreatedAt.lt(until))
        .order_by_asc(message::Column::Seq)
        .all(tx)
        .await?;
    let mut written = 0;
    for reply in replies {
        let missed = MessagePosted {
            message: ChatMessage::try_from(reply)?,
            session_customer_id: Some(CustomerId::from_uuid(customer)),
            ticket_id: None,
            customer_connected: false,
        };
        record_event(tx, ev, tenant, Some(id), EventKind::MessageMissed, &missed).await?;
        written += 1;
    }
    Ok(written)
}
