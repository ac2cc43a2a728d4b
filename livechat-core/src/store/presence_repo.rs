//! [`PresenceRepository`] for the SeaORM store.

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QuerySelect, QueryTrait};

use super::entity::{connection, presence, routing as routing_entity};
use super::routing::{drain_queue, eligible_agents, lock_tenant};
use super::{SeaOrmStore, abort, host_id, record_event};
use crate::config::RoutingPolicy;
use crate::error::ChatError;
use crate::events::EventKind;
use crate::ids::{TenantId, UserId};
use crate::model::{AgentPresence, PresenceStatus, now};
use crate::repository::{EligibleAgent, PresenceRepository};

impl PresenceRepository for SeaOrmStore {
    async fn set_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
        policy: &RoutingPolicy,
    ) -> Result<AgentPresence, ChatError> {
        let presence = AgentPresence {
            tenant_id: tenant,
            agent_id: agent,
            status,
            updated_at: now(),
        };
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        presence::Entity::insert(presence::ActiveModel {
            tenant_id: Set(tenant.get()),
            agent_id: Set(agent.get()),
            status: Set(status.as_str().to_owned()),
            updated_at: Set(presence.updated_at),
            last_seen_at: Set(presence.updated_at),
            last_assigned_at: Set(None),
            offline_announced_at: Set(None),
        })
        .on_conflict(
            // The change itself is announced: no offline announcement stands.
            OnConflict::columns([presence::Column::TenantId, presence::Column::AgentId])
                .update_columns([
                    presence::Column::Status,
                    presence::Column::UpdatedAt,
                    presence::Column::LastSeenAt,
                    presence::Column::OfflineAnnouncedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(&tx)
        .await?;
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
        }
        self.commit(tx, ev).await?;
        Ok(presence)
    }

    async fn heartbeat(
        &self,
        tenant: TenantId,
        agent: UserId,
        policy: &RoutingPolicy,
    ) -> Result<AgentPresence, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        let updated = presence::Entity::update_many()
            .col_expr(presence::Column::LastSeenAt, Expr::value(now()))
            .filter(presence::Column::TenantId.eq(tenant.get()))
            .filter(presence::Column::AgentId.eq(agent.get()))
            .exec_with_returning(&tx)
            .await?;
        let Some(row) = updated.into_iter().next() else {
            return abort(tx, ChatError::NotFound).await;
        };
        let presence = AgentPresence::try_from(row)?;
        if presence.status == PresenceStatus::Online {
            drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        }
        self.commit(tx, ev).await?;
        Ok(presence)
    }

    async fn expire_liveness(
        &self,
        tenant: TenantId,
        agent: UserId,
        grace: std::time::Duration,
        policy: &RoutingPolicy,
    ) -> Result<(), ChatError> {
        let Some(ttl) = policy.presence_ttl else {
            return Ok(());
        };
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
        let stale_from = now() - ttl + grace;
        presence::Entity::update_many()
            .col_expr(presence::Column::LastSeenAt, Expr::value(stale_from))
            .filter(presence::Column::TenantId.eq(tenant.get()))
            .filter(presence::Column::AgentId.eq(agent.get()))
            .filter(presence::Column::LastSeenAt.gt(stale_from))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn announce_offline(&self, tenant: TenantId, agent: UserId) -> Result<bool, ChatError> {
        let now = now();
        let live = connection::Entity::find()
            .select_only()
            .column(connection::Column::Id)
            .filter(connection::Column::TenantId.eq(tenant.get()))
            .filter(connection::Column::AgentId.eq(agent.get()))
            .filter(connection::Column::ExpiresAt.gt(now))
            .into_query();
        let announced = presence::Entity::update_many()
            .col_expr(presence::Column::OfflineAnnouncedAt, Expr::value(now))
            .filter(presence::Column::TenantId.eq(tenant.get()))
            .filter(presence::Column::AgentId.eq(agent.get()))
            .filter(presence::Column::OfflineAnnouncedAt.is_null())
            .filter(Expr::not_exists(live))
            .exec(&self.db)
            .await?;
        Ok(announced.rows_affected > 0)
    }

    async fn announce_expired_presence(
        &self,
        stale_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<(TenantId, UserId)>, ChatError> {
        let now = now();
        let live = connection::Entity::find()
            .select_only()
            .column(connection::Column::Id)
            .filter(
                Expr::col((connection::Entity, connection::Column::TenantId))
                    .equals((presence::Entity, presence::Column::TenantId)),
            )
            .filter(
                Expr::col((connection::Entity, connection::Column::AgentId))
                    .equals((presence::Entity, presence::Column::AgentId)),
            )
            .filter(connection::Column::ExpiresAt.gt(now))
            .into_query();
        presence::Entity::update_many()
            .col_expr(presence::Column::OfflineAnnouncedAt, Expr::value(now))
            .filter(presence::Column::OfflineAnnouncedAt.is_null())
            .filter(presence::Column::Status.ne(PresenceStatus::Offline.as_str()))
            .filter(presence::Column::LastSeenAt.lt(stale_before))
            .filter(Expr::not_exists(live))
            .exec_with_returning(&self.db)
            .await?
            .into_iter()
            .map(|row| Ok((host_id(row.tenant_id)?, host_id(row.agent_id)?)))
            .collect()
    }

    async fn clear_offline_announcement(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<Option<AgentPresence>, ChatError> {
        presence::Entity::update_many()
            .col_expr(
                presence::Column::OfflineAnnouncedAt,
                Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
            )
            .filter(presence::Column::TenantId.eq(tenant.get()))
            .filter(presence::Column::AgentId.eq(agent.get()))
            .filter(presence::Column::OfflineAnnouncedAt.is_not_null())
            .exec_with_returning(&self.db)
            .await?
            .into_iter()
            .next()
            .map(AgentPresence::try_from)
            .transpose()
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

    async fn eligible_agents(
        &self,
        tenant: TenantId,
        policy: &RoutingPolicy,
    ) -> Result<Vec<EligibleAgent>, ChatError> {
        let capacity = self.agent_capacity(tenant, policy).await?;
        eligible_agents(&self.db, tenant, policy, capacity).await
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
