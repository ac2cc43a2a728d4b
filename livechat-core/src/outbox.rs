//! Consuming the outbox (DESIGN.md invariant 5).
//!
//! [`OutboxConsumer`] is the one reader that spans tenants: it exists for
//! background dispatchers (the ticket bridge, cross-node fan-out) and is
//! never reachable from a request. Events are handed out in order per
//! session and per receiver: an event does not reach a receiver while an
//! earlier event of the same session is undispatched and has not reached
//! that receiver, so a retry holds back that session's later events for
//! the receivers still missing it, but not for those that have it, and no
//! other session's. (A consumer's receivers are its sinks, by name: a
//! failing webhook does not hold up the in-app tickets and notifications.)

use std::future::Future;
use std::sync::Arc;
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
    /// Earlier delivery attempts that failed (0 on the first; an attempt
    /// held back by an earlier event, [`OutboxConsumer::hold`], does not
    /// count).
    pub attempts: i32,
    /// The receivers (by name) the event is still owed to after earlier
    /// attempts: the others have it. `None` before the first attempt (all
    /// of them).
    pub pending_for: Option<Vec<String>>,
    /// Earlier events of the same session that wait for a retry, still
    /// owed to some receivers: this one must not reach those before them.
    /// `None` when nothing of its session waits ahead of it.
    pub behind: Option<Behind>,
    /// The end of the lease of the claim that handed the event out, as
    /// stored (the claim's token): settling or releasing the event with it
    /// changes the event only while that claim still holds it, so a
    /// dispatcher pass that outlived its lease cannot undo what the claim
    /// after it did. `None` for an event no claim handed out
    /// ([`Self::new`]); a consumer of its own that leaves it `None` gets
    /// settlements that change the event whoever holds it, as before the
    /// token.
    pub lease: Option<DateTime<Utc>>,
}

impl PendingEvent {
    /// A first attempt: owed to every receiver, nothing ahead.
    #[must_use]
    pub const fn new(event: DomainEvent) -> Self {
        Self {
            event,
            attempts: 0,
            pending_for: None,
            behind: None,
            lease: None,
        }
    }

    /// Whether the event is still owed to the receiver `name` (it did not
    /// accept it on an earlier attempt).
    #[must_use]
    pub fn owed_to(&self, name: &str) -> bool {
        self.pending_for
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }

    /// Whether an earlier event of the session waits for the receiver
    /// `name`: this one may not reach it now ([`Behind::until`]).
    #[must_use]
    pub fn held_from(&self, name: &str) -> bool {
        self.behind
            .as_ref()
            .is_some_and(|b| b.waiting_for.iter().any(|n| n == name))
    }
}

/// Earlier events of a [`PendingEvent`]'s session that wait for a retry,
/// still owed to some receivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behind {
    /// The receivers those events are still owed to (never empty: an
    /// earlier event owed to all of them, or claimed elsewhere, holds its
    /// session's later events back altogether).
    pub waiting_for: Vec<String>,
    /// When the first of those events is due again: until then the event
    /// waits for those receivers ([`OutboxConsumer::hold`]).
    pub until: DateTime<Utc>,
}

/// Claims and settles committed events.
///
/// Every settlement and release takes the `lease` of the claim that handed
/// the events out ([`PendingEvent::lease`]): with `Some`, an event is
/// changed only while that claim still holds it (its lease not taken over
/// by a later claim, nor the event settled meanwhile); with `None`, any
/// undispatched event is. A claim whose lease ran out while its dispatcher
/// was still delivering may have been taken over by another claim, whose
/// settlement must stand.
pub trait OutboxConsumer: Send + Sync {
    /// Claims up to `limit` undispatched events whose retry time has come,
    /// oldest first, each leased for `lease` (a crashed dispatcher's claims
    /// expire and are handed out again: at least once); the events of one
    /// claim share one [`PendingEvent::lease`]. A session's events
    /// come in order, from its earliest undispatched one up to the first
    /// that is claimed elsewhere or waits for a retry owed to every
    /// receiver: an event is never handed out while an earlier one of its
    /// session is pending elsewhere. Past earlier events that wait for a
    /// retry owed to some receivers only ([`Self::retry_later`],
    /// [`Self::hold`]), later events are handed out with
    /// [`PendingEvent::behind`] naming those receivers, which the later
    /// event must not reach before them; a later event owed only to such
    /// receivers (one held before, [`Self::hold`]) is not handed out until
    /// they are through, and a long run of such events does not hide newer
    /// events of other sessions from the claim. An event of a kind this version does not know
    /// (a newer version's, during a rolling upgrade) is not handed out: it
    /// is given back at once for a dispatcher that knows it, and its
    /// session's later events wait behind it. A damaged event of a known
    /// kind (its tenant or payload does not decode) is failed with the
    /// reason ([`Self::mark_failed`]) and stays in the outbox for an
    /// operator, so that it holds up neither the claim nor its session's
    /// later events.
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
    /// are unknown, already settled or, with a `lease`, no longer held by
    /// that claim are ignored.
    fn mark_dispatched(
        &self,
        ids: &[EventId],
        lease: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Records a failed attempt and makes the event claimable again at
    /// `retry_at`, owed to the receivers `pending_for` only (those that
    /// failed, and those it was held from; the others have it). The
    /// session's later events are held from those receivers until it is
    /// through, and go on to the others. `pending_for` empty means every
    /// receiver, as on the first attempt.
    fn retry_later(
        &self,
        id: EventId,
        lease: Option<DateTime<Utc>>,
        retry_at: DateTime<Utc>,
        error: &str,
        pending_for: &[String],
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Puts back an event that reached every receiver it could but is
    /// still owed to `pending_for`, from which an earlier event of its
    /// session held it ([`PendingEvent::behind`]): it is claimable again
    /// at `until`, its attempts unchanged (nothing failed). `pending_for`
    /// empty means every receiver.
    fn hold(
        &self,
        id: EventId,
        lease: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
        pending_for: &[String],
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Gives up on the event (a permanent failure): it is settled with the
    /// error recorded, and the session's later events proceed.
    fn mark_failed(
        &self,
        id: EventId,
        lease: Option<DateTime<Utc>>,
        error: &str,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Ends the lease of claimed events the consumer did not handle (they
    /// wait behind an earlier event of their session that it retries, or
    /// their dispatcher is stopping), so that they are handed out again
    /// at once, not only when their lease runs out. They keep their place:
    /// an event is never handed out while an earlier one of its session is
    /// pending. Ids that are unknown, settled or, with a `lease`, no
    /// longer held by that claim are ignored. The default releases nothing
    /// (the events wait for their lease).
    fn release(
        &self,
        ids: &[EventId],
        lease: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<(), ChatError>> + Send {
        let _ = (ids, lease);
        async { Ok(()) }
    }
}

/// Which committed events the host's outbox consumers act on (issue #5).
///
/// The store still writes every domain event to the outbox in the
/// transaction of its change (DESIGN.md invariant 5), but an event this
/// interest rejects is written already settled (`dispatched_at` = its
/// creation time): no consumer scans, claims or settles it, so it costs
/// one row write and no entry in the index of pending events. Most
/// `message.posted` events need no ticket or notification, so with the
/// ticket bridge's interest (`Dispatcher::outbox_interest`) such a message
/// costs the dispatcher nothing.
///
/// The function runs inside the writing transaction, once per event: it
/// must be cheap, must not block, and must answer from the event alone
/// (the same event always gets the same answer). It must not panic: a
/// panic there abandons the transaction (nothing of it is stored) and, in
/// a group commit, fails every append of the batch. Without an interest (the
/// default) every event is written pending. Configure it only when every
/// consumer of the outbox is covered: an event it rejects is never handed
/// out by [`OutboxConsumer::claim_pending`].
#[derive(Clone)]
pub struct OutboxInterest(Arc<dyn Fn(&DomainEvent) -> bool + Send + Sync>);

impl OutboxInterest {
    /// An interest in the events for which `wants` is `true`.
    pub fn new(wants: impl Fn(&DomainEvent) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(wants))
    }

    /// Whether a consumer acts on `event` (its row is written pending).
    #[must_use]
    pub fn wants(&self, event: &DomainEvent) -> bool {
        (self.0)(event)
    }
}

impl std::fmt::Debug for OutboxInterest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutboxInterest(..)")
    }
}
