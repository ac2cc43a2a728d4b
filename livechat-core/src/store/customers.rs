//! [`CustomerRepository`] for the SeaORM store.

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Serialize;

use super::entity::{customer, session};
use super::routing::{drain_queue, lock_tenant};
use super::sessions::{active_session_of, close_row, find_session, record_session_event};
use super::{SeaOrmStore, abort, record_event};
use crate::config::RoutingPolicy;
use crate::error::ChatError;
use crate::events::EventKind;
use crate::ids::{CustomerId, SessionId, TenantId, UserId};
use crate::model::{Customer, CustomerIdentity, Sender, now};
use crate::repository::CustomerRepository;

/// The host user id of an identified customer (`None` for visitors).
pub(super) async fn host_user_of(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    id: CustomerId,
) -> Result<Option<UserId>, ChatError> {
    let row = customer::Entity::find_by_id(id.as_uuid())
        .filter(customer::Column::TenantId.eq(tenant.get()))
        .one(conn)
        .await?;
    row.and_then(|c| c.user_id)
        .map(|u| UserId::new(u).map_err(|_| super::corrupt("customer user id")))
        .transpose()
}

async fn find_by(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    filter: impl sea_orm::sea_query::IntoCondition,
) -> Result<Option<customer::Model>, DbErr> {
    customer::Entity::find()
        .filter(customer::Column::TenantId.eq(tenant.get()))
        .filter(filter)
        .one(conn)
        .await
}

/// Finds or creates (race safe: insert-or-ignore on the unique index, then
/// read) the customer for a host user or a browser.
async fn find_or_create(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    user: Option<UserId>,
    browser: Option<uuid::Uuid>,
) -> Result<customer::Model, ChatError> {
    let filter = match (user, browser) {
        (Some(u), _) => customer::Column::UserId.eq(u.get()),
        (None, Some(b)) => customer::Column::BrowserUuid.eq(b),
        (None, None) => return Err(ChatError::InvalidCustomer("no customer identity")),
    };
    if let Some(found) = find_by(conn, tenant, filter.clone()).await? {
        return Ok(found);
    }
    customer::Entity::insert(customer::ActiveModel {
        id: Set(CustomerId::generate().as_uuid()),
        tenant_id: Set(tenant.get()),
        user_id: Set(user.map(UserId::get)),
        browser_uuid: Set(browser),
        linked_to: Set(None),
        created_at: Set(now()),
    })
    // No conflict target: the partial unique index on user or browser is
    // what a concurrent first sight hits (the primary key never collides).
    .on_conflict(OnConflict::new().do_nothing().to_owned())
    .exec_without_returning(conn)
    .await?;
    find_by(conn, tenant, filter)
        .await?
        .ok_or(ChatError::InvalidCustomer("customer could not be stored"))
}

/// Follows a visitor's link to the identified customer.
async fn follow_link(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    row: customer::Model,
) -> Result<customer::Model, ChatError> {
    match row.linked_to {
        None => Ok(row),
        Some(target) => find_by(conn, tenant, customer::Column::Id.eq(target))
            .await?
            .ok_or(ChatError::NotFound),
    }
}

/// The customer `customer` is now: the identified customer a visitor was
/// linked to, else itself (also when no such row exists, for the caller's
/// own lookup to refuse). Read inside a transaction holding the tenant's
/// routing lock, which `link_visitor` takes too, it cannot be overtaken by
/// a link.
pub(super) async fn current_customer(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    customer: CustomerId,
) -> Result<CustomerId, ChatError> {
    let row = find_by(conn, tenant, customer::Column::Id.eq(customer.as_uuid())).await?;
    Ok(match row.and_then(|r| r.linked_to) {
        Some(target) => CustomerId::from_uuid(target),
        None => customer,
    })
}

#[derive(Serialize)]
struct Linked {
    visitor_id: CustomerId,
    customer_id: CustomerId,
    closed_session: Option<SessionId>,
}

impl CustomerRepository for SeaOrmStore {
    async fn resolve_customer(
        &self,
        tenant: TenantId,
        identity: CustomerIdentity,
    ) -> Result<Customer, ChatError> {
        let row = match identity {
            CustomerIdentity::User(user) => {
                find_or_create(&self.db, tenant, Some(user), None).await?
            }
            CustomerIdentity::Visitor(browser) => {
                find_or_create(&self.db, tenant, None, Some(browser)).await?
            }
            CustomerIdentity::Known(id) => {
                find_by(&self.db, tenant, customer::Column::Id.eq(id.as_uuid()))
                    .await?
                    .ok_or(ChatError::NotFound)?
            }
        };
        follow_link(&self.db, tenant, row).await?.try_into()
    }

    async fn linked_visitors(
        &self,
        tenant: TenantId,
        customer: CustomerId,
    ) -> Result<Vec<CustomerId>, ChatError> {
        let ids: Vec<uuid::Uuid> = customer::Entity::find()
            .select_only()
            .column(customer::Column::Id)
            .filter(customer::Column::TenantId.eq(tenant.get()))
            .filter(customer::Column::LinkedTo.eq(customer.as_uuid()))
            .order_by_asc(customer::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(ids.into_iter().map(CustomerId::from_uuid).collect())
    }

    async fn link_visitor(
        &self,
        tenant: TenantId,
        visitor: CustomerId,
        user: UserId,
        policy: &RoutingPolicy,
    ) -> Result<Customer, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        let Some(visitor_row) =
            find_by(&tx, tenant, customer::Column::Id.eq(visitor.as_uuid())).await?
        else {
            return abort(tx, ChatError::NotFound).await;
        };
        let identified = find_or_create(&tx, tenant, Some(user), None).await?;
        if visitor_row.id == identified.id {
            tx.rollback().await?;
            return identified.try_into();
        }
        if visitor_row.user_id.is_some() {
            return abort(
                tx,
                ChatError::InvalidCustomer("the visitor token belongs to an identified customer"),
            )
            .await;
        }
        match visitor_row.linked_to {
            Some(target) if target == identified.id => {
                tx.rollback().await?;
                return identified.try_into();
            }
            Some(_) => {
                return abort(
                    tx,
                    ChatError::InvalidCustomer("the visitor is linked to another user"),
                )
                .await;
            }
            None => {}
        }
        let identified_id = CustomerId::from_uuid(identified.id);

        // One active session per customer: if both have one, one ends. The
        // conversation an agent is serving stays: a WAITING chat gives way
        // to an OPEN one; otherwise the visitor's ends.
        let mut closed_session = None;
        let mut freed_agent = false;
        if let Some(theirs) = active_session_of(&tx, tenant, identified_id).await?
            && let Some(visitors) = active_session_of(&tx, tenant, visitor).await?
        {
            let open = crate::model::SessionStatus::Open.as_str();
            let ending = if visitors.status == open && theirs.status != open {
                theirs
            } else {
                visitors
            };
            let closed = close_row(
                &tx,
                &mut ev,
                tenant,
                SessionId::from_uuid(ending.id),
                Sender::System,
            )
            .await?;
            freed_agent = closed.as_ref().is_some_and(|s| s.agent_id.is_some());
            closed_session = closed.map(|s| s.id);
        }
        // The visitor's active chat, if it stays open, moves below: the
        // connections following it learn its new customer from a
        // `session.updated` (a visitor's open WebSocket then acts as the
        // identified customer, as its token does over HTTP).
        let moved = active_session_of(&tx, tenant, visitor).await?;
        session::Entity::update_many()
            .col_expr(session::Column::CustomerId, Expr::value(identified.id))
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::CustomerId.eq(visitor.as_uuid()))
            .exec(&tx)
            .await?;
        // The browser id stops naming anyone: only the linked visitor token
        // (held by the logged-in browser) keeps working.
        customer::Entity::update_many()
            .col_expr(customer::Column::LinkedTo, Expr::value(identified.id))
            .col_expr(
                customer::Column::BrowserUuid,
                Expr::value(Option::<uuid::Uuid>::None),
            )
            .filter(customer::Column::Id.eq(visitor.as_uuid()))
            .exec(&tx)
            .await?;
        let linked = Linked {
            visitor_id: visitor,
            customer_id: identified_id,
            closed_session,
        };
        record_event(
            &tx,
            &mut ev,
            tenant,
            None,
            EventKind::CustomerLinked,
            &linked,
        )
        .await?;
        if let Some(moved) = moved {
            let id = SessionId::from_uuid(moved.id);
            if let Some(row) = find_session(&tx, tenant, id).await? {
                record_session_event(&tx, &mut ev, EventKind::SessionUpdated, row).await?;
            }
        }
        if freed_agent {
            drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        }
        self.commit(tx, ev).await?;
        identified.try_into()
    }
}
