//! [`PresenceRepository`] for the SeaORM store.

use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait,
};

use super::entity::{connection, presence, routing as routing_entity, session};
use super::routing::{
    drain_queue, eligible_agents, fresh_since, is_online, lock_tenant, open_sessions_by_agent,
};
use super::sessions::{record_session_event, ticket_unattended};
use super::{EachTenant, SeaOrmStore, abort, host_id, record_event};
use crate::config::RoutingPolicy;
use crate::error::ChatError;
use crate::events::EventKind;
use crate::ids::{TenantId, UserId};
use crate::model::{AgentPresence, Heartbeat, PresenceStatus, SessionOrigin, SessionStatus, now};
use crate::repository::{AgentOverview, EligibleAgent, PresenceRepository};

impl PresenceRepository for SeaOrmStore {
    async fn set_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
        departments: Option<&[String]>,
        policy: &RoutingPolicy,
    ) -> Result<AgentPresence, ChatError> {
        let updated_at = now();
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        // The change itself is announced: no offline announcement stands.
        let mut columns = vec![
            presence::Column::Status,
            presence::Column::UpdatedAt,
            presence::Column::LastSeenAt,
            presence::Column::OfflineAnnouncedAt,
        ];
        if departments.is_some() {
            columns.push(presence::Column::Departments);
        }
        let departments = departments
            .filter(|d| !d.is_empty())
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| ChatError::Storage(sea_orm::DbErr::Custom(e.to_string())))?;
        let row = presence::Entity::insert(presence::ActiveModel {
            tenant_id: Set(tenant.get()),
            agent_id: Set(agent.get()),
            status: Set(status.as_str().to_owned()),
            updated_at: Set(updated_at),
            last_seen_at: Set(updated_at),
            last_assigned_at: Set(None),
            offline_announced_at: Set(None),
            departments: Set(departments),
        })
        .on_conflict(
            OnConflict::columns([presence::Column::TenantId, presence::Column::AgentId])
                .update_columns(columns)
                .to_owned(),
        )
        .exec_with_returning(&tx)
        .await?;
        let presence = AgentPresence::try_from(row)?;
        record_event(
            &tx,
            &mut ev,
            tenant,
            None,
            EventKind::AgentStatusChanged,
            &presence,
        )
        .await?;
        if status == PresenceStatus::Online {
            drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        } else if status == PresenceStatus::Offline
            && requeue_chats_of(&tx, &mut ev, tenant, agent).await? > 0
        {
            // Another agent online takes them, in queue order.
            drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        }
        // The tenant's last agent online (of a department) may have left,
        // or an agent online may have narrowed their departments: no
        // request waits unseen while nobody online can take it.
        ticket_unattended(&tx, &mut ev, tenant, policy).await?;
        self.commit(tx, ev).await?;
        Ok(presence)
    }

    async fn heartbeat(
        &self,
        tenant: TenantId,
        agent: UserId,
        policy: &RoutingPolicy,
    ) -> Result<Heartbeat, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let Some((rows, announced)) =
            renew_presences(&tx, &mut ev, tenant, &[agent], policy).await?
        else {
            return abort(tx, ChatError::NotFound).await;
        };
        let Some(row) = rows.into_iter().next() else {
            return abort(tx, ChatError::NotFound).await;
        };
        let was_announced = announced.contains(&row.agent_id);
        let presence = AgentPresence::try_from(row)?;
        self.commit(tx, ev).await?;
        Ok(Heartbeat {
            returned: was_announced && presence.status != PresenceStatus::Offline,
            presence,
        })
    }

    async fn expire_liveness(
        &self,
        tenant: TenantId,
        agents: &[UserId],
        grace: std::time::Duration,
        policy: &RoutingPolicy,
    ) -> Result<(), ChatError> {
        // With a TTL, liveness runs out `grace` from now (never later than
        // it would have). Without one it is not checked; the close is the
        // agent's last sign of life, from which `announce_offline` counts
        // the grace.
        let (last_seen, only_lowered) = match policy.presence_ttl {
            Some(ttl) => (
                now() - crate::model::span(ttl) + crate::model::span(grace),
                true,
            ),
            None => (now(), false),
        };
        if agents.is_empty() {
            return Ok(());
        }
        // Several agents' rows: the routing lock, then the rows in id
        // order, as every change of several agents' rows takes them (an
        // update alone locks them in its plan's order, and could deadlock
        // with a renewal or an announcement on PostgreSQL).
        let tx = self.begin_write().await?;
        lock_tenant(&tx, tenant, policy).await?;
        if lock_presences(&tx, tenant, agents).await?.is_empty() {
            tx.rollback().await?;
            return Ok(());
        }
        // An agent with a live connection again (a reconnect, on this node
        // or another, since the caller found none) keeps their liveness:
        // checked under the row lock, which that connection's heartbeat
        // also takes, as `announce_offline` checks it.
        presence::Entity::update_many()
            .col_expr(presence::Column::LastSeenAt, Expr::value(last_seen))
            .filter(of_agents(tenant, agents))
            .apply_if(only_lowered.then_some(last_seen), |update, at| {
                update.filter(presence::Column::LastSeenAt.gt(at))
            })
            .filter(Expr::not_exists(live_connection_of_row(now())))
            .exec(&tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn announce_offline(
        &self,
        tenant: TenantId,
        agents: &[UserId],
        stale_before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Vec<UserId>, ChatError> {
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.begin_write().await?;
        // The routing lock only orders this transaction before the rows
        // (its capacity is not used).
        lock_tenant(&tx, tenant, &RoutingPolicy::default()).await?;
        if lock_presences(&tx, tenant, agents).await?.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        // The connections are checked by a later statement than the lock.
        let now = now();
        let announced = presence::Entity::update_many()
            .col_expr(presence::Column::OfflineAnnouncedAt, Expr::value(now))
            .filter(of_agents(tenant, agents))
            .filter(presence::Column::OfflineAnnouncedAt.is_null())
            .filter(presence::Column::Status.ne(PresenceStatus::Offline.as_str()))
            .apply_if(stale_before, |update, before| {
                update.filter(presence::Column::LastSeenAt.lte(before))
            })
            .filter(Expr::not_exists(live_connection_of_row(now)))
            .exec_with_returning(&tx)
            .await?;
        tx.commit().await?;
        let recorded: std::collections::HashSet<i64> =
            announced.into_iter().map(|row| row.agent_id).collect();
        let mut recorded: Vec<UserId> = agents
            .iter()
            .copied()
            .filter(|agent| recorded.contains(&agent.get()))
            .collect();
        recorded.sort_unstable();
        recorded.dedup();
        Ok(recorded)
    }

    async fn announce_expired_presence(
        &self,
        stale_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<(TenantId, UserId)>, ChatError> {
        let tx = self.begin_write().await?;
        // The rows first (see `lock_presences`), skipping any another
        // transaction holds: usually a heartbeat or a routing change, after
        // which the agent may not be stale; a later sweep sees it again.
        // Waiting for them instead could deadlock with routing, which locks
        // several agents' rows in its own order. The rows it locked stay as
        // read until the commit, so the update only checks connections.
        let stale: Vec<(i64, i64)> = presence::Entity::find()
            .select_only()
            .column(presence::Column::TenantId)
            .column(presence::Column::AgentId)
            .filter(presence::Column::OfflineAnnouncedAt.is_null())
            .filter(presence::Column::Status.ne(PresenceStatus::Offline.as_str()))
            .filter(presence::Column::LastSeenAt.lt(stale_before))
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .into_tuple()
            .all(&tx)
            .await?;
        if stale.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let now = now();
        let live = live_connection_of_row(now);
        let announced = presence::Entity::update_many()
            .col_expr(presence::Column::OfflineAnnouncedAt, Expr::value(now))
            .filter(
                Expr::tuple([
                    Expr::col(presence::Column::TenantId),
                    Expr::col(presence::Column::AgentId),
                ])
                .in_tuples(stale),
            )
            .filter(Expr::not_exists(live))
            .exec_with_returning(&tx)
            .await?;
        tx.commit().await?;
        announced
            .into_iter()
            .map(|row| Ok((host_id(row.tenant_id)?, host_id(row.agent_id)?)))
            .collect()
    }

    async fn hand_back_chats_of_absent_agents(
        &self,
        announced_before: chrono::DateTime<chrono::Utc>,
        policy: &RoutingPolicy,
    ) -> Result<Vec<(TenantId, UserId)>, ChatError> {
        if policy.presence_ttl.is_none() {
            return Ok(Vec::new());
        }
        // Agents announced gone who still serve a customer chat; read
        // without locks, and each checked again under them.
        let serving = session::Entity::find()
            .select_only()
            .column(session::Column::Id)
            .filter(of_the_rows_agent(
                session::Entity,
                session::Column::TenantId,
                session::Column::AgentId,
            ))
            .filter(session::Column::Status.eq(SessionStatus::Open.as_str()))
            .filter(session::Column::Origin.eq(SessionOrigin::Customer.as_str()))
            .into_query();
        let candidates: Vec<(i64, i64)> = presence::Entity::find()
            .select_only()
            .column(presence::Column::TenantId)
            .column(presence::Column::AgentId)
            .filter(announced_gone(announced_before))
            .filter(Expr::exists(serving))
            .order_by_asc(presence::Column::TenantId)
            .order_by_asc(presence::Column::AgentId)
            .into_tuple()
            .all(&self.db)
            .await?;
        // Each agent on their own: one whose chats cannot be handed back
        // (rows damaged outside the library, a failing transaction) is
        // logged and skipped, and the agents after them, of this tenant
        // and the next, are handed back all the same.
        let mut each = EachTenant::new("handing back an absent agent's chats");
        for (tenant, agent) in candidates {
            let outcome = match (host_id(tenant), host_id(agent)) {
                (Ok(t), Ok(a)) => {
                    self.hand_back_chats_of(t, a, announced_before, policy)
                        .await
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            each.record((tenant, agent), outcome);
        }
        each.finish()
    }

    async fn heartbeat_agents(
        &self,
        tenant: TenantId,
        agents: &[UserId],
        policy: &RoutingPolicy,
    ) -> Result<Vec<AgentPresence>, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let Some((rows, announced)) = renew_presences(&tx, &mut ev, tenant, agents, policy).await?
        else {
            tx.rollback().await?;
            return Ok(Vec::new());
        };
        self.commit(tx, ev).await?;
        // One damaged row (written outside the library) costs only its
        // agent's announcement, not the other agents' renewals.
        Ok(rows
            .into_iter()
            .filter(|row| announced.contains(&row.agent_id))
            .filter_map(|row| {
                let agent = row.agent_id;
                AgentPresence::try_from(row)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, agent, "presence row unreadable: renewed, not announced");
                    })
                    .ok()
            })
            .collect())
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

    async fn announced_status(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<Option<PresenceStatus>, ChatError> {
        let Some(row) = presence::Entity::find_by_id((tenant.get(), agent.get()))
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        if row.offline_announced_at.is_some() {
            return Ok(Some(PresenceStatus::Offline));
        }
        AgentPresence::try_from(row).map(|p| Some(p.status))
    }

    async fn list_agents(
        &self,
        tenant: TenantId,
        status: Option<PresenceStatus>,
        policy: &RoutingPolicy,
    ) -> Result<Vec<AgentOverview>, ChatError> {
        let capacity = self.agent_capacity(tenant, policy).await?;
        let rows = presence::Entity::find()
            .filter(presence::Column::TenantId.eq(tenant.get()))
            .apply_if(status, |query, status| {
                query.filter(presence::Column::Status.eq(status.as_str()))
            })
            .order_by_asc(presence::Column::AgentId)
            .all(&self.db)
            .await?;
        let loads = open_sessions_by_agent(&self.db, tenant).await?;
        let fresh_since = fresh_since(policy);
        let mut agents = Vec::with_capacity(rows.len());
        for row in rows {
            let online = is_online(&row, fresh_since);
            let open_sessions = loads.get(&row.agent_id).copied().unwrap_or(0);
            let agent = row.agent_id;
            match AgentPresence::try_from(row) {
                Ok(presence) => agents.push(AgentOverview {
                    presence,
                    online,
                    open_sessions,
                    capacity,
                }),
                // One damaged row (written outside the library) does not
                // hide the rest of the team.
                Err(e) => tracing::warn!(
                    tenant = tenant.get(),
                    agent,
                    error = %e,
                    "presence row left out of the agent list"
                ),
            }
        }
        Ok(agents)
    }

    async fn eligible_agents(
        &self,
        tenant: TenantId,
        department: Option<&str>,
        policy: &RoutingPolicy,
    ) -> Result<Vec<EligibleAgent>, ChatError> {
        let capacity = self.agent_capacity(tenant, policy).await?;
        eligible_agents(&self.db, tenant, policy, capacity, department).await
    }

    async fn any_agent_online(
        &self,
        tenant: TenantId,
        department: Option<&str>,
        policy: &RoutingPolicy,
    ) -> Result<bool, ChatError> {
        Ok(super::routing::any_agent_online(&self.db, tenant, policy, department).await?)
    }

    async fn set_agent_capacity(
        &self,
        tenant: TenantId,
        capacity: i64,
        policy: &RoutingPolicy,
    ) -> Result<i64, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        lock_tenant(&tx, tenant, policy).await?;
        routing_entity::Entity::update_many()
            .col_expr(routing_entity::Column::AgentCapacity, Expr::value(capacity))
            .filter(routing_entity::Column::TenantId.eq(tenant.get()))
            .exec(&tx)
            .await?;
        drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        self.commit(tx, ev).await?;
        Ok(capacity)
    }

    async fn agent_capacity(
        &self,
        tenant: TenantId,
        policy: &RoutingPolicy,
    ) -> Result<i64, ChatError> {
        Ok(routing_entity::Entity::find_by_id(tenant.get())
            .one(&self.db)
            .await?
            .and_then(|r| r.agent_capacity)
            .unwrap_or(policy.default_capacity))
    }
}

/// Puts `agent`'s OPEN customer chats back in the queue (WAITING, no
/// agent), each with a `session.assigned` without an agent, when the agent chooses `offline`
/// or has been gone for the routing policy's `hand_back_after` (whatever
/// status they chose): a chat is not left with an agent who has gone. An
/// agent who is there but chooses `away` or `busy` keeps theirs. The caller, which holds the tenant's routing lock (taken
/// first by every transaction that writes several sessions), then drains
/// the queue and, with no agent online, tickets what still waits. A
/// requeued chat keeps its place by priority and age, so it is usually
/// next. A chat whose ticket an agent closed loses that ticket's id, so
/// that it gets a ticket of its own again if nobody can take it.
/// Agent-started sessions stay with their agent. Returns how many were
/// requeued.
async fn requeue_chats_of(
    tx: &DatabaseTransaction,
    ev: &mut super::Recorded,
    tenant: TenantId,
    agent: UserId,
) -> Result<usize, ChatError> {
    let open = || {
        session::Entity::find()
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::AgentId.eq(agent.get()))
            .filter(session::Column::Status.eq(SessionStatus::Open.as_str()))
            .filter(session::Column::Origin.eq(SessionOrigin::Customer.as_str()))
    };
    let ids: Vec<uuid::Uuid> = open()
        .select_only()
        .column(session::Column::Id)
        .order_by_asc(session::Column::Id)
        .lock_exclusive()
        .into_tuple()
        .all(tx)
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let at = now();
    let mut rows = session::Entity::update_many()
        .col_expr(
            session::Column::Status,
            Expr::value(SessionStatus::Waiting.as_str()),
        )
        .col_expr(session::Column::AgentId, Expr::value(Option::<i64>::None))
        .col_expr(
            session::Column::AssignedAt,
            Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        )
        // A closed ticket is let go: the chat, back in the queue, gets a
        // ticket of its own again if no agent takes it (an open one stays,
        // and its closure time is null already).
        .col_expr(
            session::Column::TicketId,
            Expr::case(
                Expr::col(session::Column::TicketClosedAt).is_null(),
                Expr::col(session::Column::TicketId),
            )
            .finally(Expr::value(Option::<uuid::Uuid>::None))
            .into(),
        )
        .col_expr(
            session::Column::TicketClosedAt,
            Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        )
        .col_expr(session::Column::UpdatedAt, Expr::value(at))
        .filter(session::Column::Id.is_in(ids))
        .filter(session::Column::TenantId.eq(tenant.get()))
        .exec_with_returning(tx)
        .await?;
    rows.sort_by_key(|row| row.id);
    let requeued = rows.len();
    for row in rows {
        // Its assignment changed, to nobody: `session.assigned` without
        // an agent, which the ticket bridge turns into the unassignment of
        // its open ticket (a help desk showed the agent who left).
        record_session_event(tx, ev, EventKind::SessionAssigned, row).await?;
    }
    Ok(requeued)
}

/// Renews the liveness of `agents` of `tenant` and clears their standing
/// offline announcements: the tenant's routing lock, then their rows in id
/// order (see `lock_presences`), whose announcements are read under the
/// lock (one being written is waited for, then cleared) and cleared by a
/// later statement; drains the queue when one of them is `online`. Returns
/// their rows as updated, with the ids of those whose announcement was
/// cleared; `None` when none of them has a presence (nothing written).
async fn renew_presences(
    tx: &DatabaseTransaction,
    ev: &mut super::Recorded,
    tenant: TenantId,
    agents: &[UserId],
    policy: &RoutingPolicy,
) -> Result<Option<(Vec<presence::Model>, std::collections::HashSet<i64>)>, ChatError> {
    let capacity = lock_tenant(tx, tenant, policy).await?;
    // Read under the lock: an announcement being written is waited for,
    // then cleared.
    let locked = lock_presences(tx, tenant, agents).await?;
    if locked.is_empty() {
        return Ok(None);
    }
    let rows = presence::Entity::update_many()
        .col_expr(presence::Column::LastSeenAt, Expr::value(now()))
        .col_expr(
            presence::Column::OfflineAnnouncedAt,
            Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        )
        .filter(of_agents(tenant, agents))
        .exec_with_returning(tx)
        .await?;
    if rows
        .iter()
        .any(|row| row.status == PresenceStatus::Online.as_str())
    {
        drain_queue(tx, ev, tenant, policy, capacity).await?;
    }
    let announced = locked
        .into_iter()
        .filter_map(|(agent, at)| at.map(|_| agent))
        .collect();
    Ok(Some((rows, announced)))
}

/// Locks the presence rows of `agents` of `tenant` in id order for the
/// rest of `tx`, waiting for any transaction that holds one (after the
/// tenant's routing lock, as every change of several agents' rows);
/// returns each locked row's agent id and standing offline announcement,
/// read under the lock (empty: none of them has a presence).
///
/// An offline announcement checks that the agent has no live connection,
/// and an agent's return clears the announcement. On PostgreSQL a
/// statement reads as of its start and skips, without waiting, a row whose
/// committed version does not match its `WHERE`. So single conditional
/// `UPDATE`s could miss each other: an announcement that waited for the
/// row missed a connection registered meanwhile (it is checked against the
/// statement's start), and a return whose clear ran while an announcement
/// was uncommitted found nothing to clear; the agent stayed announced
/// offline while connected. With the row taken first and the condition
/// checked in a later statement, which reads as of its own start, the
/// announcement and the clear are serialized: either the announcement sees
/// the connection (registered before the clear), or the clear comes after
/// it and undoes it, and the agent is announced back. SQLite has one
/// writer at a time (the transaction is `IMMEDIATE`) and no row locks; the
/// statement is then a plain read.
async fn lock_presences(
    tx: &DatabaseTransaction,
    tenant: TenantId,
    agents: &[UserId],
) -> Result<Vec<(i64, Option<chrono::DateTime<chrono::Utc>>)>, ChatError> {
    Ok(presence::Entity::find()
        .select_only()
        .column(presence::Column::AgentId)
        .column(presence::Column::OfflineAnnouncedAt)
        .filter(of_agents(tenant, agents))
        .order_by_asc(presence::Column::AgentId)
        .lock_exclusive()
        .into_tuple()
        .all(tx)
        .await?)
}

/// The presence rows of `agents` of `tenant`.
fn of_agents(tenant: TenantId, agents: &[UserId]) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(presence::Column::TenantId.eq(tenant.get()))
        .add(presence::Column::AgentId.is_in(agents.iter().map(|a| a.get())))
}

impl SeaOrmStore {
    /// One absent agent's hand-back
    /// ([`PresenceRepository::hand_back_chats_of_absent_agents`]): their
    /// tenant's routing lock, their row, the absence checked again, then
    /// their chats back to the queue. `Some` when chats went back.
    async fn hand_back_chats_of(
        &self,
        tenant: TenantId,
        agent: UserId,
        announced_before: chrono::DateTime<chrono::Utc>,
        policy: &RoutingPolicy,
    ) -> Result<Option<(TenantId, UserId)>, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        // The routing lock first, as every change of several sessions
        // takes it, then the agent's row, as a return clears the
        // announcement under it.
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        lock_presences(&tx, tenant, &[agent]).await?;
        let live = live_connection_of_row(now());
        // Liveness run out, and no sign of life since the announcement
        // either (every heartbeat clears the announcement; this also
        // holds against a row written outside the library).
        let gone = presence::Entity::find()
            .filter(agent_row(tenant, agent))
            .filter(announced_gone(announced_before))
            .apply_if(fresh_since(policy), |query, since| {
                query.filter(presence::Column::LastSeenAt.lt(since))
            })
            .filter(
                Expr::col(presence::Column::LastSeenAt)
                    .lt(Expr::col(presence::Column::OfflineAnnouncedAt)),
            )
            .filter(Expr::not_exists(live))
            .one(&tx)
            .await?
            .is_some();
        if !gone || requeue_chats_of(&tx, &mut ev, tenant, agent).await? == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        ticket_unattended(&tx, &mut ev, tenant, policy).await?;
        self.commit(tx, ev).await?;
        Ok(Some((tenant, agent)))
    }
}

/// Agents announced gone by `announced_before`, and not offline by
/// choice (the hand-back's candidates).
fn announced_gone(announced_before: chrono::DateTime<chrono::Utc>) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(presence::Column::OfflineAnnouncedAt.lte(announced_before))
        .add(presence::Column::Status.ne(PresenceStatus::Offline.as_str()))
}

/// The query of the live connections (at `now`, any node) of the agent of
/// the presence row a statement is at, for a correlated `EXISTS`.
fn live_connection_of_row(
    now: chrono::DateTime<chrono::Utc>,
) -> sea_orm::sea_query::SelectStatement {
    connection::Entity::find()
        .select_only()
        .column(connection::Column::Id)
        .filter(of_the_rows_agent(
            connection::Entity,
            connection::Column::TenantId,
            connection::Column::AgentId,
        ))
        .filter(connection::Column::ExpiresAt.gt(now))
        .into_query()
}

/// The rows of `table` whose `tenant` and `agent` columns are those of
/// the presence row a statement is at: a correlated subquery's condition.
fn of_the_rows_agent<E: sea_orm::EntityTrait>(
    table: E,
    tenant: E::Column,
    agent: E::Column,
) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(Expr::col((table, tenant)).equals((presence::Entity, presence::Column::TenantId)))
        .add(Expr::col((table, agent)).equals((presence::Entity, presence::Column::AgentId)))
}

/// `agent`'s presence row of `tenant` (the table's key).
fn agent_row(tenant: TenantId, agent: UserId) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(presence::Column::TenantId.eq(tenant.get()))
        .add(presence::Column::AgentId.eq(agent.get()))
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use sea_orm::{ConnectionTrait, TransactionTrait};

    use super::super::test_postgres::{migrated_postgres, until_a_lock_is_awaited};
    use crate::config::RoutingPolicy;
    use crate::error::ChatError;
    use crate::ids::{TenantId, UserId};
    use crate::model::PresenceStatus;
    use crate::repository::{ConnectionOwner, ConnectionRepository, PresenceRepository};
    use crate::store::SeaOrmStore;

    fn tenant() -> TenantId {
        TenantId::new(1).unwrap()
    }

    fn agent() -> UserId {
        UserId::new(7).unwrap()
    }

    /// A store on a fresh database where agent 7 of tenant 1 is online and
    /// has no connection.
    async fn agent_online() -> (sea_orm::DatabaseConnection, SeaOrmStore) {
        let db = migrated_postgres().await;
        let store = SeaOrmStore::new(db.clone());
        store
            .set_presence(
                tenant(),
                agent(),
                PresenceStatus::Online,
                None,
                &RoutingPolicy::default(),
            )
            .await
            .unwrap();
        (db, store)
    }

    /// Whether `store` records agent 7's offline announcement (with
    /// `stale_before`, see `announce_offline`).
    async fn announces(
        store: &SeaOrmStore,
        stale_before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<bool, ChatError> {
        let recorded = store
            .announce_offline(tenant(), &[agent()], stale_before)
            .await?;
        Ok(!recorded.is_empty())
    }

    /// Connects agent 7 on another node.
    async fn connect(store: &SeaOrmStore) {
        store
            .register_connections(
                &[(
                    tenant(),
                    uuid::Uuid::now_v7(),
                    ConnectionOwner::Agent(agent()),
                )],
                "node-b",
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }

    /// Runs `op` while another transaction, having run `holder_sql`, holds
    /// the agent's presence row; once `op` waits for the row, runs
    /// `meanwhile`, then commits the holder. Returns what `op` returned.
    async fn while_the_row_is_held<T, F, M>(
        holder_sql: &str,
        op: impl FnOnce(SeaOrmStore) -> F,
        meanwhile: impl FnOnce(SeaOrmStore) -> M,
    ) -> T
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ChatError>> + Send + 'static,
        M: Future<Output = ()>,
    {
        let (db, store) = agent_online().await;
        let holder = db.begin().await.unwrap();
        holder.execute_unprepared(holder_sql).await.unwrap();
        let running = tokio::spawn(op(store.clone()));
        until_a_lock_is_awaited(&db, "it never waited for the row").await;
        meanwhile(store).await;
        holder.commit().await.unwrap();
        running.await.unwrap().unwrap()
    }

    /// An agent whose last connection ended reconnects while the grace
    /// period's announcement waits for their presence row: the
    /// announcement sees the new connection and announces nothing. (A
    /// single conditional `UPDATE` read the connections as of its start
    /// and announced the connected agent offline.)
    #[tokio::test]
    async fn an_announcement_sees_a_connection_made_while_it_waited() {
        let announced = while_the_row_is_held(
            "SELECT 1 FROM livechat_agent_presence FOR UPDATE",
            |store| async move { announces(&store, None).await },
            |store| async move { connect(&store).await },
        )
        .await;
        assert!(!announced);
    }

    /// Several agents' announcement waits for their rows as one agent's
    /// does: of two agents, the one who connected meanwhile is not
    /// announced, the other is (returned in id order, whatever the order
    /// asked in).
    #[tokio::test]
    async fn an_announcement_of_several_sees_a_connection_made_while_it_waited() {
        let (db, store) = agent_online().await;
        let other = UserId::new(8).unwrap();
        store
            .set_presence(
                tenant(),
                other,
                PresenceStatus::Online,
                None,
                &RoutingPolicy::default(),
            )
            .await
            .unwrap();
        let holder = db.begin().await.unwrap();
        holder
            .execute_unprepared("SELECT 1 FROM livechat_agent_presence FOR UPDATE")
            .await
            .unwrap();
        let running = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .announce_offline(tenant(), &[other, agent(), other], None)
                    .await
            }
        });
        until_a_lock_is_awaited(&db, "it never waited for the rows").await;
        connect(&store).await;
        holder.commit().await.unwrap();
        assert_eq!(running.await.unwrap().unwrap(), vec![other]);
    }

    /// An agent's return, while an offline announcement is being written,
    /// waits for it and clears it: the agent is announced back. (A single
    /// conditional `UPDATE` skipped the row, whose committed version had
    /// no announcement, and the agent stayed announced offline.)
    #[tokio::test]
    async fn a_return_clears_an_announcement_being_written() {
        let policy = RoutingPolicy::default();
        let (beat, store) = while_the_row_is_held(
            "UPDATE livechat_agent_presence SET offline_announced_at = now()",
            |store| async move {
                let beat = store
                    .heartbeat(tenant(), agent(), &RoutingPolicy::default())
                    .await?;
                Ok((beat, store))
            },
            |_| async {},
        )
        .await;
        assert!(beat.returned);
        assert_eq!(beat.presence.agent_id, agent());
        // Cleared: the next heartbeat announces nothing.
        let again = store.heartbeat(tenant(), agent(), &policy).await.unwrap();
        assert!(!again.returned);
    }

    /// The housekeeping's sweep skips an agent whose row another
    /// transaction holds (a heartbeat, say) instead of waiting for it,
    /// and announces them on a later sweep if they are still stale.
    #[tokio::test]
    async fn the_expiry_sweep_skips_a_held_row() {
        let (db, store) = agent_online().await;
        let stale_before = chrono::Utc::now() + chrono::Duration::hours(1);
        let holder = db.begin().await.unwrap();
        holder
            .execute_unprepared("SELECT 1 FROM livechat_agent_presence FOR UPDATE")
            .await
            .unwrap();
        let swept = tokio::time::timeout(
            Duration::from_secs(20),
            store.announce_expired_presence(stale_before),
        )
        .await
        .expect("no wait for the held row")
        .unwrap();
        assert_eq!(swept, vec![]);
        holder.commit().await.unwrap();
        assert_eq!(
            store.announce_expired_presence(stale_before).await.unwrap(),
            vec![(tenant(), agent())]
        );
        // With a connection, nothing.
        assert!(
            store
                .heartbeat(tenant(), agent(), &RoutingPolicy::default())
                .await
                .unwrap()
                .returned
        );
        connect(&store).await;
        assert_eq!(
            store.announce_expired_presence(stale_before).await.unwrap(),
            vec![]
        );
    }

    /// The grace counts from the agent's latest close: with a presence TTL
    /// the close moves their liveness, without one it records the close
    /// itself; either way an announcement asked for with a `stale_before`
    /// earlier than that close records nothing, and a later one does. An
    /// agent whose chosen status is `offline` is never announced (that
    /// status was announced when chosen).
    #[tokio::test]
    async fn the_latest_close_starts_the_grace() {
        let db = migrated_postgres().await;
        let store = SeaOrmStore::new(db);
        let with_ttl = RoutingPolicy {
            presence_ttl: Some(Duration::from_secs(60)),
            ..RoutingPolicy::default()
        };
        let grace = Duration::from_secs(10);
        for policy in [RoutingPolicy::default(), with_ttl] {
            store
                .set_presence(tenant(), agent(), PresenceStatus::Online, None, &policy)
                .await
                .unwrap();
            let quiet_for = crate::model::span(policy.presence_ttl.unwrap_or(grace));
            // As the check at the end of a grace counted from `since` asks.
            let grace_from = |since| since + crate::model::span(grace) - quiet_for;
            let before_close = crate::model::now();
            store
                .expire_liveness(tenant(), &[agent()], grace, &policy)
                .await
                .unwrap();
            assert!(
                !announces(&store, Some(grace_from(before_close)))
                    .await
                    .unwrap(),
                "the close is later"
            );
            let after_close = crate::model::now();
            assert!(
                announces(&store, Some(grace_from(after_close)))
                    .await
                    .unwrap()
            );
        }
        store
            .set_presence(
                tenant(),
                agent(),
                PresenceStatus::Offline,
                None,
                &RoutingPolicy::default(),
            )
            .await
            .unwrap();
        assert!(!announces(&store, None).await.unwrap());
    }

    /// An agent connected again between the close's check for a connection
    /// and this (a reconnect on another node within the grace) keeps
    /// their liveness. It was lowered regardless: connected, they counted
    /// as stale once the grace ran out, and the tenant's waiting chats
    /// became tickets.
    #[tokio::test]
    async fn a_reconnected_agent_keeps_their_liveness() {
        use sea_orm::EntityTrait;

        let (db, store) = agent_online().await;
        let with_ttl = RoutingPolicy {
            presence_ttl: Some(Duration::from_secs(60)),
            ..RoutingPolicy::default()
        };
        let last_seen = || async {
            super::presence::Entity::find()
                .one(&db)
                .await
                .unwrap()
                .unwrap()
                .last_seen_at
        };
        let before = last_seen().await;
        connect(&store).await;
        store
            .expire_liveness(tenant(), &[agent()], Duration::ZERO, &with_ttl)
            .await
            .unwrap();
        assert!(last_seen().await >= before, "not lowered while connected");
        // Without the connection, it runs out.
        db.execute_unprepared("DELETE FROM livechat_connections")
            .await
            .unwrap();
        store
            .expire_liveness(tenant(), &[agent()], Duration::ZERO, &with_ttl)
            .await
            .unwrap();
        assert!(last_seen().await < before, "lowered");
    }

    /// Without a connection both announce, once.
    #[tokio::test]
    async fn an_agent_without_a_connection_is_announced_once() {
        let db = migrated_postgres().await;
        let store = SeaOrmStore::new(db);
        let policy = RoutingPolicy::default();
        for agent in [agent(), UserId::new(8).unwrap()] {
            store
                .set_presence(tenant(), agent, PresenceStatus::Online, None, &policy)
                .await
                .unwrap();
        }
        assert!(announces(&store, None).await.unwrap());
        assert!(!announces(&store, None).await.unwrap());
        let stale_before = chrono::Utc::now() + chrono::Duration::hours(1);
        assert_eq!(
            store.announce_expired_presence(stale_before).await.unwrap(),
            vec![(tenant(), UserId::new(8).unwrap())]
        );
        assert_eq!(
            store.announce_expired_presence(stale_before).await.unwrap(),
            vec![]
        );
    }
}
