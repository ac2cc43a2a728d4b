//! [`ConnectionRepository`] for the SeaORM store: live WebSocket
//! connections of every node, with expiry so a crashed node's connections
//! stop counting (issue #4).

use std::time::Duration;

use sea_orm::sea_query::{Alias, Asterisk, Expr, ExprTrait, Query, SelectStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QuerySelect,
};

use super::entity::{connection, connection_join};
use super::{SeaOrmStore, host_id};
use crate::error::ChatError;
use crate::ids::{SessionId, TenantId, UserId};
use crate::model::now;
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

    async fn purge_expired_connections(&self) -> Result<PurgedConnections, ChatError> {
        let rows: Vec<(uuid::Uuid, i64, Option<i64>)> = connection::Entity::find()
            .select_only()
            .column(connection::Column::Id)
            .column(connection::Column::TenantId)
            .column(connection::Column::AgentId)
            .filter(connection::Column::ExpiresAt.lte(now()))
            .into_tuple()
            .all(&self.db)
            .await?;
        if rows.is_empty() {
            return Ok(PurgedConnections::default());
        }
        let mut agents = rows
            .iter()
            .filter_map(|&(_, tenant, agent)| Some((tenant, agent?)))
            .map(|(tenant, agent)| Ok((host_id(tenant)?, host_id(agent)?)))
            .collect::<Result<Vec<(TenantId, UserId)>, ChatError>>()?;
        agents.sort_unstable();
        agents.dedup();
        let expired: Vec<uuid::Uuid> = rows.into_iter().map(|(id, _, _)| id).collect();
        connection_join::Entity::delete_many()
            .filter(connection_join::Column::ConnectionId.is_in(expired.clone()))
            .exec(&self.db)
            .await?;
        let connections = connection::Entity::delete_many()
            .filter(connection::Column::Id.is_in(expired))
            .exec(&self.db)
            .await?
            .rows_affected;
        Ok(PurgedConnections {
            connections,
            agents,
        })
    }
}
