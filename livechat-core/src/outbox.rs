//! Consuming the outbox (DESIGN.md invariant 5).
//!
//! [`OutboxConsumer`] is the one reader that spans tenants: it exists for
//! background dispatchers (the ticket bridge, cross-node fan-out) and is
//! never reachable from a request. Events are handed out in order per
//! session: an event is not claimable while an earlier event of the same
//! session is undispatched, so a retry holds back that session's later
//! events but no other session's.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::ChatError;
use crate::events::DomainEvent;
use crate::ids::EventId;

/// An event handed to a dispatcher.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingEvent {
    /// The committed event.
    pub event: DomainEvent,
    /// Earlier delivery attempts (0 on the first).
    pub attempts: i32,
}

/// Claims and settles committed events.
pub trait OutboxConsumer: Send + Sync {
    /// Claims up to `limit` undispatched events whose retry time has come,
    /// oldest first, each leased for `lease` (a crashed dispatcher's claims
    /// expire and are handed out again: at least once). A session's events
    /// come in order, from its earliest undispatched one up to the first
    /// that is not ready (claimed elsewhere, or waiting for a retry): an
    /// event is never handed out while an earlier one of its session is
    /// pending elsewhere.
    fn claim_pending(
        &self,
        limit: u64,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<PendingEvent>, ChatError>> + Send;

    /// Settles, without claiming them, the ready undispatched events among
    /// the oldest `limit` for which `ignored` is `true`: events the
    /// consumer has nothing to do for cost it one write instead of a claim
    /// (a second write) and a settlement (issue #5: most `message.posted`
    /// events need no ticket or notification). An event claimed elsewhere
    /// or waiting for a retry is left alone; the rest stay undispatched for
    /// [`Self::claim_pending`]. Settling an ignored event ahead of an
    /// earlier event of its session that is still pending keeps the
    /// per-session order of everything the consumer acts on. Returns how
    /// many events were settled. The default settles none.
    fn settle_ignored(
        &self,
        limit: u64,
        ignored: &(dyn Fn(&DomainEvent) -> bool + Sync),
    ) -> impl Future<Output = Result<usize, ChatError>> + Send {
        let _ = (limit, ignored);
        async { Ok(0) }
    }

    /// Marks the events delivered, all in one write (a dispatcher settles a
    /// whole pass at once: one commit instead of one per event). Ids that
    /// are unknown or already settled are ignored.
    fn mark_dispatched(
        &self,
        ids: &[EventId],
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Records a failed attempt and makes the event claimable again at
    /// `retry_at`.
    fn retry_later(
        &self,
        id: EventId,
        retry_at: DateTime<Utc>,
        error: &str,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Gives up on the event (a permanent failure): it is settled with the
    /// error recorded, and the session's later events proceed.
    fn mark_failed(
        &self,
        id: EventId,
        error: &str,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;
}
