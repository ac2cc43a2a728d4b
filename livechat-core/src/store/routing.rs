//! Routing inside a transaction: the tenant lock, eligibility (DESIGN.md
//! invariant 3), assignment, queue positions and the queue drain (issue #3).
//!
//! Every transaction that can change who serves what in a tenant first
//! locks the tenant's `livechat_routing` row (an upsert that bumps
//! `lock_version`). On PostgreSQL that row lock orders the tenant's routing
//! decisions one at a time; on SQLite the write lock of `BEGIN IMMEDIATE`
//! already does. Lock order is always routing row, then session rows.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbErr,
    EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};

use super::Recorded;
use super::entity::{presence, routing, session};
use crate::config::RoutingPolicy;
use crate::error::ChatError;
use crate::events::EventKind;
use crate::ids::{TenantId, UserId};
use crate::model::{ChatSession, PresenceStatus, SessionStatus, now};
use crate::repository::EligibleAgent;

/// Locks the tenant's routing row (creating it) and returns the tenant's
/// per-agent capacity.
pub(super) async fn lock_tenant(
    tx: &DatabaseTransaction,
    tenant: TenantId,
    policy: &RoutingPolicy,
) -> Result<i64, DbErr> {
    routing::Entity::insert(routing::ActiveModel {
        tenant_id: Set(tenant.get()),
        agent_capacity: Set(None),
        lock_version: Set(1),
    })
    .on_conflict(
        OnConflict::column(routing::Column::TenantId)
            .value(
                routing::Column::LockVersion,
                Expr::col((routing::Entity, routing::Column::LockVersion)).add(1),
            )
            .to_owned(),
    )
    .exec_without_returning(tx)
    .await?;
    let row = routing::Entity::find_by_id(tenant.get()).one(tx).await?;
    Ok(row
        .and_then(|r| r.agent_capacity)
        .unwrap_or(policy.default_capacity))
}

/// The oldest sign of life that keeps an agent fresh now: `None` without
/// a presence TTL (liveness is not checked).
pub(super) fn fresh_since(policy: &RoutingPolicy) -> Option<DateTime<Utc>> {
    policy
        .presence_ttl
        .map(|ttl| now() - crate::model::span(ttl))
}

/// Whether presence row `p` counts as online, with liveness fresh since
/// `fresh_since` ([`fresh_since`]): the rule [`online_agents`] queries.
pub(super) fn is_online(p: &presence::Model, fresh_since: Option<DateTime<Utc>>) -> bool {
    p.status == PresenceStatus::Online.as_str()
        && fresh_since.is_none_or(|since| p.last_seen_at >= since)
}

/// Agents whose chosen status is online and whose liveness is fresh.
pub(super) async fn online_agents(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    policy: &RoutingPolicy,
) -> Result<Vec<presence::Model>, DbErr> {
    let mut query = presence::Entity::find()
        .filter(presence::Column::TenantId.eq(tenant.get()))
        .filter(presence::Column::Status.eq(PresenceStatus::Online.as_str()));
    if let Some(since) = fresh_since(policy) {
        query = query.filter(presence::Column::LastSeenAt.gte(since));
    }
    query.all(conn).await
}

/// The departments an agent's presence row lists; empty: every one. A
/// list that does not decode counts as empty, so that a damaged row
/// leaves the agent taking every chat rather than none.
pub(super) fn departments(p: &presence::Model) -> Vec<String> {
    super::departments_of(p).unwrap_or_default()
}

/// Whether an agent serving `agent_departments` (empty: every one) takes
/// a chat of `department`: every agent takes a chat without one (README
/// "Departments").
pub(super) fn serves(agent_departments: &[String], department: Option<&str>) -> bool {
    match department {
        None => true,
        Some(department) => {
            agent_departments.is_empty() || agent_departments.iter().any(|d| d == department)
        }
    }
}

/// What agents serving `lists` (each agent's departments) cover: `None`
/// when one of them takes every department (or there is none: see the
/// callers), else the union of their departments.
pub(super) fn covered_departments(
    lists: impl IntoIterator<Item = impl AsRef<[String]>>,
) -> Option<Vec<String>> {
    let mut union: Vec<String> = Vec::new();
    for list in lists {
        let list = list.as_ref();
        if list.is_empty() {
            return None;
        }
        for d in list {
            if !union.contains(d) {
                union.push(d.clone());
            }
        }
    }
    Some(union)
}

/// Whether an agent of the tenant online and fresh (capacity aside) takes
/// chats of `department` (`None`: a chat without one, which every agent
/// takes): the difference between "queue" and "queue and open a ticket".
pub(super) async fn any_agent_online(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    policy: &RoutingPolicy,
    department: Option<&str>,
) -> Result<bool, DbErr> {
    Ok(online_agents(conn, tenant, policy)
        .await?
        .iter()
        .any(|p| serves(&departments(p), department)))
}

/// Whether `agent` is online and fresh in the tenant.
pub(super) async fn agent_is_online(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    agent: UserId,
    policy: &RoutingPolicy,
) -> Result<bool, DbErr> {
    Ok(online_agents(conn, tenant, policy)
        .await?
        .iter()
        .any(|p| p.agent_id == agent.get()))
}

/// DESIGN.md invariant 3: online, fresh, below capacity, and taking chats
/// of `department` (`None`: a chat without one, which every agent takes);
/// ordered least loaded first, then idle longest (oldest last assignment,
/// never-assigned first), then lowest id for determinism.
pub(super) async fn eligible_agents(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    policy: &RoutingPolicy,
    capacity: i64,
    department: Option<&str>,
) -> Result<Vec<EligibleAgent>, ChatError> {
    Ok(ranked_agents(conn, tenant, policy, capacity)
        .await?
        .into_iter()
        .filter(|(_, served)| serves(served, department))
        .map(|(agent, _)| agent)
        .collect())
}

/// The count of OPEN sessions of each agent of the tenant who serves any,
/// by agent id: an agent's load (none listed: 0).
pub(super) async fn open_sessions_by_agent(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
) -> Result<std::collections::HashMap<i64, i64>, DbErr> {
    let counts: Vec<(Option<i64>, i64)> = session::Entity::find()
        .select_only()
        .column(session::Column::AgentId)
        .column_as(Expr::col(session::Column::Id).count(), "open_sessions")
        .filter(session::Column::TenantId.eq(tenant.get()))
        .filter(session::Column::Status.eq(SessionStatus::Open.as_str()))
        .filter(session::Column::AgentId.is_not_null())
        .group_by(session::Column::AgentId)
        .into_tuple()
        .all(conn)
        .await?;
    Ok(counts
        .into_iter()
        .filter_map(|(agent, n)| agent.map(|a| (a, n)))
        .collect())
}

/// Every eligible agent (online, fresh, below capacity) in routing order,
/// each with the departments they serve (empty: every one).
async fn ranked_agents(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    policy: &RoutingPolicy,
    capacity: i64,
) -> Result<Vec<(EligibleAgent, Vec<String>)>, ChatError> {
    let online = online_agents(conn, tenant, policy).await?;
    if online.is_empty() {
        return Ok(Vec::new());
    }
    let loads = open_sessions_by_agent(conn, tenant).await?;
    let load_of = |agent: i64| loads.get(&agent).copied().unwrap_or(0);
    let mut ranked: Vec<(EligibleAgent, Option<DateTime<Utc>>, Vec<String>)> = Vec::new();
    for p in online {
        let open_sessions = load_of(p.agent_id);
        if open_sessions < capacity {
            let agent_id = UserId::new(p.agent_id).map_err(|_| super::corrupt("agent id"))?;
            ranked.push((
                EligibleAgent {
                    agent_id,
                    open_sessions,
                    capacity,
                },
                p.last_assigned_at,
                departments(&p),
            ));
        }
    }
    ranked.sort_by(|(a, a_last, _), (b, b_last, _)| {
        a.open_sessions
            .cmp(&b.open_sessions)
            .then(a_last.cmp(b_last))
            .then(a.agent_id.cmp(&b.agent_id))
    });
    Ok(ranked
        .into_iter()
        .map(|(agent, _, served)| (agent, served))
        .collect())
}

/// Gives `session` to `agent` (status OPEN), stamps the agent's last
/// assignment and writes `session.assigned`.
pub(super) async fn assign(
    tx: &DatabaseTransaction,
    ev: &mut Recorded,
    tenant: TenantId,
    session_row: &session::Model,
    agent: UserId,
) -> Result<ChatSession, ChatError> {
    let at = now();
    let updated = session::Entity::update_many()
        .col_expr(
            session::Column::Status,
            Expr::value(SessionStatus::Open.as_str()),
        )
        .col_expr(session::Column::AgentId, Expr::value(agent.get()))
        .col_expr(session::Column::AssignedAt, Expr::value(at))
        .col_expr(session::Column::UpdatedAt, Expr::value(at))
        .filter(session::Column::Id.eq(session_row.id))
        .filter(session::Column::TenantId.eq(tenant.get()))
        .exec_with_returning(tx)
        .await
        .map_err(|e| match e.sql_err() {
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
                ChatError::ActiveSessionExists(None)
            }
            _ => e.into(),
        })?;
    let row = updated.into_iter().next().ok_or(ChatError::NotFound)?;
    presence::Entity::update_many()
        .col_expr(presence::Column::LastAssignedAt, Expr::value(at))
        .filter(presence::Column::TenantId.eq(tenant.get()))
        .filter(presence::Column::AgentId.eq(agent.get()))
        .exec(tx)
        .await?;
    super::sessions::record_session_event(tx, ev, EventKind::SessionAssigned, row).await
}

/// Assigns waiting sessions, highest priority then oldest, while an
/// eligible agent exists: each to the first eligible agent, in routing
/// order, who takes its department. A chat whose department no eligible
/// agent takes keeps its place and does not hold up the chats behind it
/// (README "Departments"). Returns how many were assigned.
pub(super) async fn drain_queue(
    tx: &DatabaseTransaction,
    ev: &mut Recorded,
    tenant: TenantId,
    policy: &RoutingPolicy,
    capacity: i64,
) -> Result<usize, ChatError> {
    let mut assigned = 0;
    loop {
        // Most drains find the queue empty (a batch of heartbeats of
        // agents online drains once): one read of the queue's index then,
        // not the ranking of every agent online in the tenant.
        let waiting = any_waiting(tenant)
            .into_tuple::<uuid::Uuid>()
            .one(tx)
            .await?;
        if waiting.is_none() {
            break;
        }
        let ranked = ranked_agents(tx, tenant, policy, capacity).await?;
        if ranked.is_empty() {
            break;
        }
        let mut next = session::Entity::find()
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::Status.eq(SessionStatus::Waiting.as_str()));
        if let Some(union) = covered_departments(ranked.iter().map(|(_, served)| served)) {
            // Only department agents can take a chat now: the first chat
            // without a department or of one of theirs.
            next = next.filter(
                Condition::any()
                    .add(session::Column::Department.is_null())
                    .add(session::Column::Department.is_in(union)),
            );
        }
        let Some(next) = next
            .order_by_desc(session::Column::PriorityRank)
            .order_by_asc(session::Column::CreatedAt)
            .order_by_asc(session::Column::Id)
            .one(tx)
            .await?
        else {
            break;
        };
        let Some((agent, _)) = ranked
            .iter()
            .find(|(_, served)| serves(served, next.department.as_deref()))
        else {
            break;
        };
        assign(tx, ev, tenant, &next, agent.agent_id).await?;
        assigned += 1;
    }
    Ok(assigned)
}

/// A waiting chat of `tenant`, if any: one entry of the queue's partial
/// index (`livechat_sessions_queue`).
fn any_waiting(tenant: TenantId) -> sea_orm::Select<session::Entity> {
    session::Entity::find()
        .select_only()
        .column(session::Column::Id)
        .filter(session::Column::TenantId.eq(tenant.get()))
        .filter(session::Column::Status.eq(SessionStatus::Waiting.as_str()))
        .limit(1)
}

/// 1-based place of a WAITING session in its tenant's queue (higher
/// priority first, then older), among the chats the agents who take it
/// would take before it: for a chat with a department, those of its
/// department and those without one (README "Departments"); for a chat
/// without one, every chat. `None` when not waiting.
pub(super) async fn queue_position(
    conn: &impl ConnectionTrait,
    row: &session::Model,
) -> Result<Option<i64>, DbErr> {
    if row.status != SessionStatus::Waiting.as_str() {
        return Ok(None);
    }
    let mut ahead = session::Entity::find()
        .filter(session::Column::TenantId.eq(row.tenant_id))
        .filter(session::Column::Status.eq(SessionStatus::Waiting.as_str()));
    if let Some(department) = &row.department {
        ahead = ahead.filter(
            Condition::any()
                .add(session::Column::Department.is_null())
                .add(session::Column::Department.eq(department.as_str())),
        );
    }
    let ahead = ahead
        .filter(
            Condition::any()
                .add(session::Column::PriorityRank.gt(row.priority_rank))
                .add(
                    Condition::all()
                        .add(session::Column::PriorityRank.eq(row.priority_rank))
                        .add(
                            Condition::any()
                                .add(session::Column::CreatedAt.lt(row.created_at))
                                .add(
                                    Condition::all()
                                        .add(session::Column::CreatedAt.eq(row.created_at))
                                        .add(session::Column::Id.lt(row.id)),
                                ),
                        ),
                ),
        )
        .count(conn)
        .await?;
    Ok(Some(i64::try_from(ahead).unwrap_or(i64::MAX) + 1))
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use sea_orm::{DbBackend, QueryTrait};

    use crate::ids::TenantId;

    /// Issue #5: every batch of heartbeats of agents online drains the
    /// queue, which is usually empty: the check reads the queue's partial
    /// index, not the tenant's active chats.
    #[tokio::test]
    async fn the_queue_check_reads_the_queues_index_on_sqlite() {
        use sea_orm_migration::MigratorTrait;
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let tenant = TenantId::new(1).unwrap();
        let statement = super::any_waiting(tenant).build(DbBackend::Sqlite);
        let plan = crate::store::test_sqlite::sqlite_plan(&db, statement)
            .await
            .join("\n");
        assert!(plan.contains("livechat_sessions_queue"), "{plan}");
    }
}
