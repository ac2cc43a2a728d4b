//! [`OutboxRepository`] and [`OutboxConsumer`] for the SeaORM store.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
};

use super::entity::outbox;
use super::{SeaOrmStore, convert_all};
use crate::error::ChatError;
use crate::events::{DomainEvent, EventKind};
use crate::ids::{EventId, TenantId};
use crate::model::now;
use crate::outbox::{Behind, OutboxConsumer, PendingEvent};
use crate::repository::OutboxRepository;
use crate::validate::PageSize;

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

    async fn prune_events(&self, before: DateTime<Utc>, limit: u64) -> Result<u64, ChatError> {
        // Event ids are UUIDv7s taken when the event is written (a
        // `message.posted` event's is its message's): ordered by their
        // time, to the millisecond. This is the least id of `before`'s
        // millisecond, so the primary key finds the older events.
        let millis = u64::try_from(before.timestamp_millis()).unwrap_or(0);
        let bound = uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid();
        let oldest = outbox::Entity::find()
            .select_only()
            .column(outbox::Column::Id)
            .filter(outbox::Column::Id.lt(bound))
            .filter(outbox::Column::DispatchedAt.is_not_null())
            .order_by_asc(outbox::Column::Id)
            .limit(limit)
            // Nodes pruning at once take apart batches on PostgreSQL
            // (waiting, their deletes could deadlock); SQLite has one
            // writer and no row locks.
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .into_query();
        let deleted = outbox::Entity::delete_many()
            .filter(outbox::Column::Id.in_subquery(oldest))
            .exec(&self.db)
            .await?;
        Ok(deleted.rows_affected)
    }
}

/// No dispatcher holds the event's lease at `at`.
fn unleased(at: DateTime<Utc>) -> Condition {
    Condition::any()
        .add(outbox::Column::ClaimedUntil.is_null())
        .add(outbox::Column::ClaimedUntil.lt(at))
}

/// Most pages of undispatched events one claim reads (each twice the
/// claim's limit) that hold an event it could take.
const MAX_SCAN_PAGES: usize = 16;

/// Most pages one claim reads in all, pages of events held back behind
/// their sessions' earlier ones included: a backlog held behind a sink
/// that is down (a webhook) does not hide newer events of other sessions
/// until it is this long (256 pages of 200 rows for the dispatcher's
/// batch of 100: 51,200 events, a few megabytes read per claim while it
/// lasts).
const MAX_HELD_PAGES: usize = 256;

/// What a claim scan reads of an outbox row: id, session, available at,
/// claimed until, pending for.
type Scanned = (
    uuid::Uuid,
    Option<uuid::Uuid>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<String>,
);

/// The receivers named by a stored `pending_for` (a JSON array): `None`
/// for `NULL` (all of them), and for an empty or damaged value, read the
/// same way (the event reaches its receivers again, which their
/// idempotency makes harmless).
fn receivers(stored: Option<&str>) -> Option<Vec<String>> {
    stored
        .and_then(|text| serde_json::from_str::<Vec<String>>(text).ok())
        .filter(|names| !names.is_empty())
}

/// `receivers` as stored: `NULL` for none (all of them).
fn stored_receivers(receivers: &[String]) -> Option<String> {
    if receivers.is_empty() {
        None
    } else {
        serde_json::to_string(receivers).ok()
    }
}

/// What holds back a session's later events during a claim scan.
enum Ahead {
    /// Earlier events wait for a retry, owed to these receivers only.
    Partly(Behind),
    /// An earlier event is claimed elsewhere or owed to every receiver.
    Wholly,
}

impl Ahead {
    /// `ahead` after one more earlier event that is not ready: claimed
    /// elsewhere (`owed` = `None`), or waiting until `until`, still owed
    /// to `owed` (`Some(None)`: to every receiver).
    fn and_then(
        ahead: Option<&Self>,
        owed: Option<Option<Vec<String>>>,
        until: DateTime<Utc>,
    ) -> Self {
        let Some(Some(mut owed)) = owed else {
            return Self::Wholly;
        };
        let until = match ahead {
            Some(Self::Wholly) => return Self::Wholly,
            Some(Self::Partly(behind)) => {
                for name in &behind.waiting_for {
                    if !owed.contains(name) {
                        owed.push(name.clone());
                    }
                }
                Ord::min(behind.until, until)
            }
            None => until,
        };
        Self::Partly(Behind {
            waiting_for: owed,
            until,
        })
    }
}

impl OutboxConsumer for SeaOrmStore {
    async fn claim_pending(
        &self,
        limit: u64,
        lease: Duration,
    ) -> Result<Vec<PendingEvent>, ChatError> {
        let at = now();
        let lease = crate::model::span(lease);
        // Scan undispatched events from the oldest. A session's events are
        // taken from its earliest one on, in order, up to the first that is
        // claimed elsewhere or waits for a retry having reached no
        // receiver: later ones of that session wait for it. Past one that
        // waits having reached some receivers, later ones are taken for
        // those receivers only (`PendingEvent::behind`).
        // An event that is due but owed only to receivers its session's
        // earlier events wait for has nothing to do yet: it is left, not
        // claimed (it was held before; it goes on once they are through).
        // Only the columns the choice needs: payloads are read once, for
        // the rows won below. Pages follow one another until `limit` events
        // are picked, so a long run of events held behind one session's
        // retried event does not hide the other sessions' events: pages
        // with nothing to take do not count towards `MAX_SCAN_PAGES`.
        let page = Ord::max(limit.saturating_mul(2), 1);
        let mut ahead: HashMap<uuid::Uuid, Ahead> = HashMap::new();
        let mut picked = Vec::new();
        let mut after: Option<uuid::Uuid> = None;
        let mut useful_pages = 0;
        for _ in 0..MAX_HELD_PAGES {
            let mut query = outbox::Entity::find()
                .select_only()
                .columns([
                    outbox::Column::Id,
                    outbox::Column::SessionId,
                    outbox::Column::AvailableAt,
                    outbox::Column::ClaimedUntil,
                    outbox::Column::PendingFor,
                ])
                .filter(outbox::Column::DispatchedAt.is_null());
            if let Some(after) = after {
                query = query.filter(outbox::Column::Id.gt(after));
            }
            let rows: Vec<Scanned> = query
                .order_by_asc(outbox::Column::Id)
                .limit(page)
                .into_tuple()
                .all(&self.db)
                .await?;
            let full = rows.len() as u64 == page;
            after = rows.last().map(|row| row.0);
            let picked_before = picked.len();
            for (id, session_id, available_at, claimed_until, pending_for) in rows {
                let elsewhere = claimed_until.is_some_and(|c| c >= at);
                let ready = available_at <= at && !elsewhere;
                let behind = match session_id {
                    Some(s) => match ahead.get(&s) {
                        Some(Ahead::Wholly) => continue,
                        held if !ready => {
                            let owed = (!elsewhere).then(|| receivers(pending_for.as_deref()));
                            let next = Ahead::and_then(held, owed, available_at);
                            ahead.insert(s, next);
                            continue;
                        }
                        Some(Ahead::Partly(behind)) => {
                            let owed = receivers(pending_for.as_deref());
                            if owed.is_some_and(|owed| {
                                owed.iter().all(|name| behind.waiting_for.contains(name))
                            }) {
                                continue;
                            }
                            Some(behind.clone())
                        }
                        None => None,
                    },
                    None if !ready => continue,
                    None => None,
                };
                picked.push((id, session_id, behind));
                if picked.len() as u64 >= limit {
                    break;
                }
            }
            if picked.len() > picked_before {
                useful_pages += 1;
            }
            if !full || picked.len() as u64 >= limit || useful_pages >= MAX_SCAN_PAGES {
                break;
            }
        }
        if picked.is_empty() {
            return Ok(Vec::new());
        }
        // The lease, taken for the whole batch in one statement (one commit):
        // only one dispatcher wins an event at a time; a row another
        // dispatcher claimed or settled since the scan is not returned. Its
        // end is the claim's token (`PendingEvent::lease`), to the
        // microsecond both databases store: a later claim of the same event
        // can only start after it, so two claims never share one.
        let until = (at + lease).trunc_subsecs(6);
        let won = outbox::Entity::update_many()
            .col_expr(outbox::Column::ClaimedUntil, Expr::value(until))
            .filter(outbox::Column::Id.is_in(picked.iter().map(|(id, _, _)| *id)))
            .filter(outbox::Column::DispatchedAt.is_null())
            .filter(unleased(at))
            .exec_with_returning(&self.db)
            .await?;
        let mut won: HashMap<uuid::Uuid, outbox::Model> =
            won.into_iter().map(|row| (row.id, row)).collect();
        // An event another dispatcher won holds back the later events of its
        // session that this one won (they are handed out again after their
        // lease, behind it).
        let mut lost = HashSet::new();
        let mut claimed = Vec::with_capacity(won.len());
        // Won rows of a kind this version does not know, given back below.
        let mut unknown = Vec::new();
        // Won rows behind an event of their session that this claim did not
        // get: given back below too, so that they follow it as soon as it
        // is through, not after this claim's lease.
        let mut held_back = Vec::new();
        for (id, session, behind) in picked {
            let row = won.remove(&id);
            match (row, session) {
                (Some(_), Some(s)) if lost.contains(&s) => held_back.push(EventId::from_uuid(id)),
                // A kind a newer version writes (a rolling upgrade): left,
                // unleased at once, for a dispatcher that knows it; its
                // session's later events wait behind it, as behind an event
                // claimed elsewhere.
                (Some(row), session) if EventKind::parse(&row.kind).is_none() => {
                    unknown.push(EventId::from_uuid(id));
                    lost.extend(session);
                }
                (Some(row), session) => {
                    let attempts = row.attempts;
                    let pending_for = receivers(row.pending_for.as_deref());
                    match DomainEvent::try_from(row) {
                        Ok(event) => claimed.push(PendingEvent {
                            event,
                            attempts,
                            pending_for,
                            behind,
                            lease: Some(until),
                        }),
                        // A damaged row of a known kind (its tenant or
                        // payload does not decode) is failed, so that it
                        // holds up neither the claim nor, as the first
                        // pending event of its session, that session's
                        // later events; it stays in the outbox with its
                        // error for an operator, until pruned with the
                        // other settled events.
                        Err(error) => {
                            let reason = format!("cannot be decoded: {error}");
                            tracing::warn!(event = %id, %error, "outbox event failed: it cannot be decoded");
                            if let Err(e) = self
                                .mark_failed(EventId::from_uuid(id), Some(until), &reason)
                                .await
                            {
                                // Still pending (after its lease): what
                                // follows it in its session waits.
                                tracing::warn!(event = %id, error = %e, "failing an undecodable outbox event failed");
                                lost.extend(session);
                            }
                        }
                    }
                }
                (None, Some(s)) => {
                    lost.insert(s);
                }
                (None, None) => {}
            }
        }
        if !unknown.is_empty() {
            tracing::debug!(
                events = unknown.len(),
                "outbox events of kinds this version does not know left for another dispatcher"
            );
        }
        unknown.append(&mut held_back);
        if !unknown.is_empty()
            && let Err(e) = self.release(&unknown, Some(until)).await
        {
            tracing::warn!(error = %e, "giving back claimed outbox events failed; they wait for their lease");
        }
        Ok(claimed)
    }

    async fn settle_ignored(
        &self,
        limit: u64,
        ignored: &(dyn Fn(&DomainEvent) -> bool + Sync),
    ) -> Result<usize, ChatError> {
        let at = now();
        let ready = || {
            Condition::all()
                .add(outbox::Column::DispatchedAt.is_null())
                .add(outbox::Column::AvailableAt.lte(at))
                .add(unleased(at))
        };
        let rows = outbox::Entity::find()
            .filter(ready())
            .order_by_asc(outbox::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        let mut settle = Vec::new();
        for row in rows {
            let id = row.id;
            // An event that does not decode is the claim path's to fail.
            if DomainEvent::try_from(row).is_ok_and(|event| ignored(&event)) {
                settle.push(id);
            }
        }
        if settle.is_empty() {
            return Ok(0);
        }
        // Only rows still ready: one claimed or settled since is left alone.
        let settled = outbox::Entity::update_many()
            .col_expr(outbox::Column::DispatchedAt, Expr::value(at))
            .filter(outbox::Column::Id.is_in(settle))
            .filter(ready())
            .exec(&self.db)
            .await?;
        Ok(usize::try_from(settled.rows_affected).unwrap_or(usize::MAX))
    }

    async fn mark_dispatched(
        &self,
        ids: &[EventId],
        lease: Option<DateTime<Utc>>,
    ) -> Result<(), ChatError> {
        if ids.is_empty() {
            return Ok(());
        }
        unclaim(ids, lease)
            .col_expr(outbox::Column::DispatchedAt, Expr::value(now()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn release(
        &self,
        ids: &[EventId],
        lease: Option<DateTime<Utc>>,
    ) -> Result<(), ChatError> {
        if ids.is_empty() {
            return Ok(());
        }
        unclaim(ids, lease).exec(&self.db).await?;
        Ok(())
    }

    async fn retry_later(
        &self,
        id: EventId,
        lease: Option<DateTime<Utc>>,
        retry_at: DateTime<Utc>,
        error: &str,
        pending_for: &[String],
    ) -> Result<(), ChatError> {
        rescheduled(id, lease, retry_at, pending_for)
            .col_expr(
                outbox::Column::Attempts,
                Expr::col(outbox::Column::Attempts).add(1),
            )
            .col_expr(outbox::Column::LastError, Expr::value(error))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn hold(
        &self,
        id: EventId,
        lease: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
        pending_for: &[String],
    ) -> Result<(), ChatError> {
        rescheduled(id, lease, until, pending_for)
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn mark_failed(
        &self,
        id: EventId,
        lease: Option<DateTime<Utc>>,
        error: &str,
    ) -> Result<(), ChatError> {
        let at = now();
        unclaim(&[id], lease)
            .col_expr(
                outbox::Column::Attempts,
                Expr::col(outbox::Column::Attempts).add(1),
            )
            .col_expr(outbox::Column::DispatchedAt, Expr::value(at))
            .col_expr(outbox::Column::FailedAt, Expr::value(at))
            .col_expr(outbox::Column::LastError, Expr::value(error))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

/// [`unclaim`] for event `id`, handed out again from `at` to the
/// receivers `pending_for` (`retry_later` adds the attempt, `hold` nothing).
fn rescheduled(
    id: EventId,
    lease: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
    pending_for: &[String],
) -> sea_orm::UpdateMany<outbox::Entity> {
    unclaim(&[id], lease)
        .col_expr(
            outbox::Column::PendingFor,
            Expr::value(stored_receivers(pending_for)),
        )
        .col_expr(outbox::Column::AvailableAt, Expr::value(at))
}

/// An update of the events `ids` still undispatched and, with a `lease`,
/// still held by that claim, that ends their claims (`mark_dispatched`
/// adds the settlement, `mark_failed` the failure, [`rescheduled`] the
/// next attempt).
fn unclaim(ids: &[EventId], lease: Option<DateTime<Utc>>) -> sea_orm::UpdateMany<outbox::Entity> {
    let update = outbox::Entity::update_many()
        .col_expr(
            outbox::Column::ClaimedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(outbox::Column::Id.is_in(ids.iter().map(|id| id.as_uuid())))
        .filter(outbox::Column::DispatchedAt.is_null());
    match lease {
        Some(lease) => update.filter(outbox::Column::ClaimedUntil.eq(lease)),
        None => update,
    }
}
