//! [`ConnectionRepository`] for the SeaORM store: live WebSocket
//! connections of every node, with expiry so a crashed node's connections
//! stop counting (issue #4).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use sea_orm::sea_query::{Alias, Asterisk, Expr, ExprTrait, Query, SelectStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, QueryTrait, prelude::DateTimeUtc,
};

use super::entity::{connection, connection_join, message, outbox, session};
use super::routing::lock_tenant;
use super::{Recorded, SeaOrmStore, host_id, record_event};
use crate::config::RoutingPolicy;
use crate::error::ChatError;
use crate::events::{EventKind, MessagePosted, MessagePostedHead};
use crate::ids::{CustomerId, SessionId, TenantId, TicketId, UserId};
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
    async fn register_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        node: &str,
        ttl: Duration,
    ) -> Result<(), ChatError> {
        let expires_at = expiry(ttl);
        let row = |one: &(TenantId, uuid::Uuid, ConnectionOwner)| row(one, node, expires_at);
        // A chunk that fails is tried again row by row, and the chunks
        // after it are tried too: one failure (a pooled connection timing
        // out in a reconnect storm) leaves out as few connections as it
        // can, since a connection left without its row counts as not
        // connected until its first renewal registers it.
        let mut failure = None;
        for chunk in connections.chunks(REGISTRATION_CHUNK) {
            let inserted = connection::Entity::insert_many(chunk.iter().map(row))
                .exec_without_returning(&self.db)
                .await;
            if inserted.is_ok() {
                continue;
            }
            for one in chunk {
                if let Err(e) = connection::Entity::insert(row(one))
                    .exec_without_returning(&self.db)
                    .await
                {
                    failure.get_or_insert(e);
                }
            }
        }
        failure.map_or(Ok(()), |e| Err(e.into()))
    }

    async fn touch_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        node: &str,
        ttl: Duration,
    ) -> Result<Vec<uuid::Uuid>, ChatError> {
        let mut restored = Vec::new();
        for chunk in connections.chunks(RENEWAL_CHUNK) {
            let expires_at = expiry(ttl);
            let ids: Vec<(TenantId, uuid::Uuid)> =
                chunk.iter().map(|&(tenant, id, _)| (tenant, id)).collect();
            let renewed = connection::Entity::update_many()
                .col_expr(connection::Column::ExpiresAt, Expr::value(expires_at))
                .filter(named(
                    connection::Column::TenantId,
                    connection::Column::Id,
                    &ids,
                ))
                .exec(&self.db)
                .await?;
            if renewed.rows_affected >= chunk.len() as u64 {
                continue;
            }
            // Some rows are gone: register those connections again (one
            // more read, only then). A row of that id in another tenant
            // is not the connection's, but is not replaced either.
            let present: HashSet<uuid::Uuid> = connection::Entity::find()
                .select_only()
                .column(connection::Column::Id)
                .filter(connection::Column::Id.is_in(ids.iter().map(|&(_, id)| id)))
                .into_tuple()
                .all(&self.db)
                .await?
                .into_iter()
                .collect();
            let missing: Vec<_> = chunk
                .iter()
                .filter(|(_, id, _)| !present.contains(id))
                .map(|one| row(one, node, expires_at))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let ids: Vec<uuid::Uuid> = missing
                .iter()
                .filter_map(|row| row.id.try_as_ref().copied())
                .collect();
            for rows in missing.chunks(REGISTRATION_CHUNK) {
                connection::Entity::insert_many(rows.to_vec())
                    .on_conflict_do_nothing()
                    .exec_without_returning(&self.db)
                    .await?;
            }
            restored.extend(ids);
        }
        Ok(restored)
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
        silent_since: Option<DateTimeUtc>,
    ) -> Result<u64, ChatError> {
        if let Some(heard_at) = silent_since {
            return self.unregister_silent(tenant, id, heard_at).await;
        }
        self.unregister_connections(&[(tenant, id)]).await?;
        Ok(0)
    }

    async fn unregister_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid)],
    ) -> Result<(), ChatError> {
        // Every chunk is tried whatever failed before: a chunk left
        // behind counts as connected until its rows expire.
        let mut failure = None;
        for chunk in connections.chunks(RENEWAL_CHUNK) {
            if let Err(e) = self.unregister_chunk(chunk).await {
                failure.get_or_insert(e);
            }
        }
        failure.map_or(Ok(()), |e| Err(e.into()))
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

    async fn connected_agents(
        &self,
        tenant: TenantId,
        agents: &[UserId],
    ) -> Result<Vec<UserId>, ChatError> {
        let ids: Vec<i64> = connection::Entity::find()
            .select_only()
            .column(connection::Column::AgentId)
            .distinct()
            .filter(connection::Column::TenantId.eq(tenant.get()))
            .filter(connection::Column::AgentId.is_in(agents.iter().map(|a| a.get())))
            .filter(connection::Column::ExpiresAt.gt(now()))
            .into_tuple()
            .all(&self.db)
            .await?;
        ids.into_iter().map(host_id).collect()
    }

    async fn purge_expired_connections(
        &self,
        connection_ttl: Duration,
        customers_only: bool,
    ) -> Result<PurgedConnections, ChatError> {
        let mut purged = PurgedConnections::default();
        loop {
            let at = now();
            // Read outside a write transaction: most runs find nothing.
            let ids: Vec<uuid::Uuid> = connection::Entity::find()
                .select_only()
                .column(connection::Column::Id)
                .filter(connection::Column::ExpiresAt.lte(at))
                .apply_if(customers_only.then_some(CUSTOMER), |query, role| {
                    query.filter(connection::Column::Role.eq(role))
                })
                .limit(PURGE_CHUNK)
                .into_tuple()
                .all(&self.db)
                .await?;
            let full = ids.len() as u64 == PURGE_CHUNK;
            if ids.is_empty() {
                break;
            }
            let chunk = self.purge_chunk(ids, at, connection_ttl).await?;
            purged.connections += chunk.connections;
            purged.agents.extend(chunk.agents);
            purged.missed_replies += chunk.missed_replies;
            // A chunk another node purged first deleted nothing here.
            if !full || chunk.connections == 0 {
                break;
            }
        }
        purged.agents.sort_unstable();
        purged.agents.dedup();
        Ok(purged)
    }
}

impl SeaOrmStore {
    /// Removes up to [`RENEWAL_CHUNK`] connections and their joins in one
    /// transaction: the connection rows first, then the joins, the order
    /// in which the purge (`purge_chunk`) and a silent connection's
    /// removal take them, so that they cannot deadlock each other on
    /// PostgreSQL.
    async fn unregister_chunk(&self, chunk: &[(TenantId, uuid::Uuid)]) -> Result<(), DbErr> {
        let tx = self.begin_write().await?;
        connection::Entity::delete_many()
            .filter(named(
                connection::Column::TenantId,
                connection::Column::Id,
                chunk,
            ))
            .exec(&tx)
            .await?;
        connection_join::Entity::delete_many()
            .filter(named(
                connection_join::Column::TenantId,
                connection_join::Column::ConnectionId,
                chunk,
            ))
            .exec(&tx)
            .await?;
        tx.commit().await
    }
}

/// Rows whose `(tenant, connection)` columns are one of `connections`,
/// matched as pairs: a connection named with another tenant matches
/// nothing.
/// The row of connection `id` of `owner` in `tenant`, open on `node` (its
/// first 64 characters) until `expires_at`.
fn row(
    &(tenant, id, owner): &(TenantId, uuid::Uuid, ConnectionOwner),
    node: &str,
    expires_at: DateTimeUtc,
) -> connection::ActiveModel {
    let (role, agent, customer) = match owner {
        ConnectionOwner::Agent(a) => (AGENT, Some(a.get()), None),
        ConnectionOwner::Customer(c) => (CUSTOMER, None, Some(c.as_uuid())),
    };
    connection::ActiveModel {
        id: Set(id),
        tenant_id: Set(tenant.get()),
        role: Set(role.to_owned()),
        agent_id: Set(agent),
        customer_id: Set(customer),
        node_id: Set(node.chars().take(64).collect()),
        expires_at: Set(expires_at),
    }
}

fn named(
    tenant: impl sea_orm::sea_query::IntoColumnRef,
    connection: impl sea_orm::sea_query::IntoColumnRef,
    connections: &[(TenantId, uuid::Uuid)],
) -> sea_orm::sea_query::SimpleExpr {
    Expr::tuple([Expr::col(tenant), Expr::col(connection)])
        .in_tuples(connections.iter().map(|&(tenant, id)| (tenant.get(), id)))
}

/// Connections inserted per statement by `register_connections` (seven
/// bound values each).
const REGISTRATION_CHUNK: usize = 100;

/// Connections renewed per statement by `touch_connections`, and removed
/// per transaction by `unregister_connections` (two bound values each,
/// far below either database's limit on bound values).
const RENEWAL_CHUNK: usize = 500;

/// Expired connections purged per write transaction, so that a crashed
/// node with many customers does not hold SQLite's write lock for long.
const PURGE_CHUNK: u64 = 100;

/// How long after a connection's expiry a reply may still have counted it:
/// an append checks the session's connections before it takes the time it
/// stores (at most a lock wait of 5 s apart on PostgreSQL).
const MISSED_REPLY_SLACK: Duration = Duration::from_secs(10);

impl SeaOrmStore {
    /// One transaction of [`ConnectionRepository::purge_expired_connections`]:
    /// deletes those of `ids` still expired at `at` and their joins, both
    /// with `RETURNING` (a connection renewed since it was read is kept,
    /// and of two purges at once only the one that deletes a row reads it,
    /// the other waiting for its lock on PostgreSQL), then, under the
    /// routing locks of the tenants concerned, writes the `message.missed`
    /// events of the customer connections among them.
    /// Those events are for the outbox's consumers only, so they are not
    /// published on the bus.
    async fn purge_chunk(
        &self,
        ids: Vec<uuid::Uuid>,
        at: DateTimeUtc,
        connection_ttl: Duration,
    ) -> Result<PurgedConnections, ChatError> {
        let tx = self.begin_write().await?;
        let deleted = connection::Entity::delete_many()
            .filter(connection::Column::Id.is_in(ids))
            .filter(connection::Column::ExpiresAt.lte(at))
            .exec_with_returning(&tx)
            .await?;
        if deleted.is_empty() {
            tx.commit().await?;
            return Ok(PurgedConnections::default());
        }
        let agents = deleted
            .iter()
            .filter_map(|c| Some((c.tenant_id, c.agent_id?)))
            .map(|(tenant, agent)| Ok((host_id(tenant)?, host_id(agent)?)))
            .collect::<Result<Vec<(TenantId, UserId)>, ChatError>>()?;
        // Each expired customer connection's window of replies it may have
        // counted as seen: from its last renewal to (shortly after) its
        // expiry.
        let windows: HashMap<uuid::Uuid, Window> = deleted
            .iter()
            .filter(|c| c.role == CUSTOMER)
            .map(|c| {
                let from = c.expires_at - crate::model::span(connection_ttl);
                let until = c.expires_at + crate::model::span(MISSED_REPLY_SLACK);
                (c.id, (from, until))
            })
            .collect();
        let ids = deleted.iter().map(|c| c.id).collect();
        let mut ev = self.recorder();
        let missed_replies = drop_joins_and_record_missed(&tx, &mut ev, ids, &windows, at).await?;
        tx.commit().await?;
        Ok(PurgedConnections {
            connections: deleted.len() as u64,
            agents,
            missed_replies,
        })
    }

    /// [`ConnectionRepository::unregister_connection`] of a connection
    /// that went silent at `heard_at`: deleted with its joins, and the
    /// `message.missed` events of the replies stored since, in one
    /// transaction.
    async fn unregister_silent(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        heard_at: DateTimeUtc,
    ) -> Result<u64, ChatError> {
        let at = now();
        let tx = self.begin_write().await?;
        let deleted = connection::Entity::delete_many()
            .filter(connection::Column::Id.eq(id))
            .filter(connection::Column::TenantId.eq(tenant.get()))
            .exec_with_returning(&tx)
            .await?;
        let windows: HashMap<uuid::Uuid, Window> = deleted
            .iter()
            .filter(|c| c.role == CUSTOMER)
            .map(|c| {
                let until = at + crate::model::span(MISSED_REPLY_SLACK);
                (c.id, (heard_at, until))
            })
            .collect();
        let mut ev = self.recorder();
        let missed = drop_joins_and_record_missed(&tx, &mut ev, vec![id], &windows, at).await?;
        tx.commit().await?;
        Ok(missed)
    }
}

/// Deletes the joins of the connections `ids` (deleted in `tx`) and,
/// under the routing locks of the tenants concerned, writes the
/// `message.missed` events of the sessions they followed for the replies
/// stored within each customer connection's window in `windows`
/// ([`record_missed_replies`]). Returns the events written.
async fn drop_joins_and_record_missed(
    tx: &sea_orm::DatabaseTransaction,
    ev: &mut Recorded,
    ids: Vec<uuid::Uuid>,
    windows: &HashMap<uuid::Uuid, Window>,
    at: DateTimeUtc,
) -> Result<u64, ChatError> {
    let joins = connection_join::Entity::delete_many()
        .filter(connection_join::Column::ConnectionId.is_in(ids))
        .exec_with_returning(tx)
        .await?;
    // By session id, the order appends lock sessions in.
    let mut sessions: BTreeMap<(uuid::Uuid, i64), Vec<Window>> = BTreeMap::new();
    for join in joins {
        if let Some(&window) = windows.get(&join.connection_id) {
            sessions
                .entry((join.session_id, join.tenant_id))
                .or_default()
                .push(window);
        }
    }
    // The tenants' routing rows before their sessions' rows, in tenant
    // order: the lock order of every transaction that writes several
    // sessions (routing drains the queue, a status change hands chats
    // back), so this one cannot deadlock with them on PostgreSQL.
    let mut tenants: Vec<i64> = sessions.keys().map(|&(_, tenant)| tenant).collect();
    tenants.sort_unstable();
    tenants.dedup();
    for tenant in tenants {
        lock_tenant(tx, host_id(tenant)?, &RoutingPolicy::default()).await?;
    }
    let mut missed_replies = 0;
    for ((session, tenant), windows) in sessions {
        missed_replies +=
            record_missed_replies(tx, ev, host_id(tenant)?, session, &windows, at).await?;
    }
    Ok(missed_replies)
}

/// The condition of the partial index `livechat_outbox_missed` (migration
/// m0010), which [`missed_replies_of`] repeats word for word: neither
/// database matches a bound value with a partial index's condition.
const MISSED_ONLY: &str = "kind = 'message.missed'";

/// The replies of `session` that have a `message.missed` event already
/// (their message ids), through the index of those events by session.
async fn missed_replies_of(
    tx: &impl ConnectionTrait,
    tenant: TenantId,
    session: uuid::Uuid,
) -> Result<HashSet<uuid::Uuid>, ChatError> {
    #[derive(serde::Deserialize)]
    struct Of {
        id: uuid::Uuid,
    }
    let payloads: Vec<String> = missed_query(tenant, session).into_tuple().all(tx).await?;
    Ok(payloads
        .iter()
        .filter_map(|payload| serde_json::from_str::<Of>(payload).ok())
        .map(|of| of.id)
        .collect())
}

/// The read of [`missed_replies_of`].
fn missed_query(tenant: TenantId, session: uuid::Uuid) -> sea_orm::Select<outbox::Entity> {
    outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Payload)
        .filter(super::outbox_tenant_unindexed(tenant))
        .filter(outbox::Column::SessionId.eq(session))
        .filter(Expr::cust(MISSED_ONLY))
}

/// A dead customer connection's window of replies, `[from, until)`.
type Window = (DateTimeUtc, DateTimeUtc);

/// Writes a `message.missed` event for each agent reply of `session`
/// stored within one of `windows` whose `message.posted` said a customer
/// connection followed the session and no ticket (a reply that was not
/// notified), unless a live customer connection follows the session at
/// `at` or it has no customer: see
/// [`ConnectionRepository::purge_expired_connections`]. The session's row
/// is locked first (PostgreSQL), so an append that counted the dead
/// connection and is still being stored is waited for and read. Returns
/// the events written.
async fn record_missed_replies(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    tenant: TenantId,
    session: uuid::Uuid,
    windows: &[Window],
    at: DateTimeUtc,
) -> Result<u64, ChatError> {
    let id = SessionId::from_uuid(session);
    let Some(row) = session::Entity::find_by_id(session)
        .filter(session::Column::TenantId.eq(tenant.get()))
        .lock_exclusive()
        .one(tx)
        .await?
    else {
        return Ok(0);
    };
    let Some(customer) = row.customer_id else {
        return Ok(0);
    };
    let live: i64 = tx
        .query_one(&live_connections(CUSTOMER, tenant.get(), session, at))
        .await?
        .map_or(Ok(0), |r| r.try_get("", "n"))?;
    if live > 0 {
        return Ok(0);
    }
    let within = windows
        .iter()
        .fold(Condition::any(), |any, &(from, until)| {
            any.add(
                Condition::all()
                    .add(message::Column::CreatedAt.gte(from))
                    .add(message::Column::CreatedAt.lt(until)),
            )
        });
    let replies = message::Entity::find()
        .filter(message::Column::TenantId.eq(tenant.get()))
        .filter(message::Column::SessionId.eq(session))
        .filter(message::Column::SenderType.eq(SenderType::Agent.as_str()))
        .filter(within)
        .order_by_asc(message::Column::Seq)
        .all(tx)
        .await?;
    if replies.is_empty() {
        return Ok(0);
    }
    // A `message.posted` event's id is its message's.
    let events: Vec<(uuid::Uuid, String)> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Id)
        .column(outbox::Column::Payload)
        .filter(outbox::Column::Id.is_in(replies.iter().map(|r| r.id).collect::<Vec<_>>()))
        .filter(outbox::Column::Kind.eq(EventKind::MessagePosted.as_str()))
        .into_tuple()
        .all(tx)
        .await?;
    let unnotified: HashSet<uuid::Uuid> = events
        .into_iter()
        .filter(|(_, payload)| {
            serde_json::from_str::<MessagePostedHead>(payload).is_ok_and(|e| !e.notifies())
        })
        .map(|(id, _)| id)
        .collect();
    if unnotified.is_empty() {
        return Ok(0);
    }
    let missed_already = missed_replies_of(tx, tenant, session).await?;
    let mut written = 0;
    for reply in replies {
        // Written once, though several of the customer's connections
        // (tabs) counted it: each one's close or purge comes here.
        if !unnotified.contains(&reply.id) || missed_already.contains(&reply.id) {
            continue;
        }
        let missed = MessagePosted {
            message: ChatMessage::try_from(reply)?,
            session_customer_id: Some(CustomerId::from_uuid(customer)),
            ticket_id: row.ticket_id.map(TicketId::from_uuid),
            customer_connected: false,
        };
        record_event(tx, ev, tenant, Some(id), EventKind::MessageMissed, &missed).await?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use sea_orm::{DbBackend, QueryTrait, Statement};

    use super::missed_query;
    use crate::ids::TenantId;

    /// The read of a session's `message.missed` events.
    fn missed(backend: DbBackend) -> Statement {
        missed_query(TenantId::new(1).unwrap(), uuid::Uuid::now_v7()).build(backend)
    }

    /// Issue #5: the read of a session's `message.missed` events, inside
    /// the write transaction of a connection's close or purge, goes
    /// through their partial index, not the tenant index of every event.
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn the_missed_replies_are_read_by_their_index_on_sqlite() {
        use sea_orm_migration::MigratorTrait;
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let plan = crate::store::test_sqlite::sqlite_plan(&db, missed(DbBackend::Sqlite)).await;
        let text = plan.join("\n");
        assert!(text.contains("livechat_outbox_missed"), "{text}");
    }

    /// The same on PostgreSQL under the generic plan, with statistics of
    /// 20,000 events of the tenant.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn the_missed_replies_are_read_by_their_index_on_postgres() {
        use sea_orm::{ConnectionTrait, TransactionTrait};

        use crate::store::test_postgres::{generic_plan, migrated_postgres};
        let db = migrated_postgres().await;
        for sql in [
            "INSERT INTO livechat_outbox \
             (id, tenant_id, session_id, kind, payload, created_at, available_at, dispatched_at) \
             SELECT gen_random_uuid(), 1, gen_random_uuid(), \
             CASE WHEN g % 1000 = 0 THEN 'message.missed' ELSE 'message.posted' END, '{}', \
             now(), now(), now() FROM generate_series(1, 20000) g",
            "ANALYZE livechat_outbox",
        ] {
            db.execute_unprepared(sql).await.unwrap();
        }
        let tx = db.begin().await.unwrap();
        let plan = generic_plan(&tx, "missed", missed(DbBackend::Postgres)).await;
        let text = plan.join("\n");
        assert!(text.contains("livechat_outbox_missed"), "{text}");
        assert!(!text.contains("Seq Scan"), "{text}");
        tx.rollback().await.unwrap();
    }
}
