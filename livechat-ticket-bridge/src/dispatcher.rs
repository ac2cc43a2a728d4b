//! The outbox dispatcher: claims committed events, calls the sinks, settles
//! each event (issue #3, DESIGN.md invariant 5).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use livechat_core::{
    ChatError, ChatMessage, Contact, DomainEvent, EventId, EventKind, MessagePosted,
    MessagePostedHead, Notification, NotificationId, OutboxConsumer, OutboxInterest, PendingEvent,
    TenantId, TicketId, TicketRequested, UserId,
};
use serde::Deserialize;

use crate::sink::{NotificationSink, SinkError, TicketSink};

/// Most sessions a [`Dispatcher::dispatch_once`] pass delivers at the same
/// time: enough that a receiver hanging until its time limit holds up
/// little, few enough that a pass does not flood the store's pool (one
/// connection on SQLite, shared with the chat) or one webhook receiver.
pub const SESSIONS_AT_ONCE: usize = 16;

/// Most passes [`Dispatcher::run`] keeps going at once: a pass held up by
/// a receiver that hangs until its time limit does not stop the next ones,
/// which claim the events it has not (as several nodes' dispatchers do).
pub const PASSES_AT_ONCE: usize = 4;

/// Longest notification body, in characters (Unicode scalar values).
pub const NOTIFICATION_BODY_MAX_CHARS: usize = 500;

/// How long [`Dispatcher::run`], stopping, waits for the release of the
/// claims of its interrupted passes (one statement) before it leaves them
/// to run out by their lease.
pub const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// The longest lease a pass counts with, 100 years
/// ([`DispatcherConfig::lease`]); the store bounds the claim's own
/// expiry the same way.
pub const MAX_LEASE: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Tuning of a [`Dispatcher`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatcherConfig {
    /// Most events claimed per [`Dispatcher::dispatch_once`] (default 100).
    pub batch_size: u64,
    /// How long a claim is held before the event is handed out again, e.g.
    /// after a crash (default 30 s). A pass starts delivering an event
    /// only while at least [`Self::sink_timeout`] of its lease remains (at
    /// least half the lease, when the lease is shorter than twice the sink
    /// timeout), so no delivery of a pass outlives its lease: the events
    /// it has not started by then are given back for the next pass
    /// ([`DispatchReport::released`]). A pass held up by receivers that
    /// hang ([`SESSIONS_AT_ONCE`] sessions at a time, one sink time limit
    /// each) thus never delivers an event another pass has claimed since.
    /// A lease longer than [`MAX_LEASE`] (`Duration::MAX` meant as
    /// "never") counts as that.
    pub lease: Duration,
    /// Longest one sink call may take (default 15 s, above the webhook
    /// sink's own 10 s): a call still running then is dropped and counts
    /// as a retryable failure (the sink may have taken the event; it gets
    /// it again, under the same key). A call is also cut when its pass's
    /// lease runs out, which a lease shorter than twice this limit can
    /// make sooner.
    pub sink_timeout: Duration,
    /// Sleep of [`Dispatcher::run`] after a pass that found nothing to do
    /// (default 250 ms).
    pub poll_interval: Duration,
    /// Sleep of [`Dispatcher::run`] after a pass that found work but less
    /// than a full batch (default 20 ms): events arriving meanwhile are
    /// claimed and settled together, so under a steady trickle the
    /// dispatcher commits about twice per window instead of twice per
    /// event (issue #5). A full batch is followed by the next pass at once.
    pub batch_window: Duration,
    /// Delay before the first retry; doubled on each further attempt
    /// (default 1 s).
    pub backoff_base: Duration,
    /// Upper bound of the retry delay (default 5 min).
    pub backoff_max: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lease: Duration::from_secs(30),
            sink_timeout: Duration::from_secs(15),
            poll_interval: Duration::from_millis(250),
            batch_window: Duration::from_millis(20),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

impl DispatcherConfig {
    /// The delay before the next attempt of an event that has already failed
    /// `attempts` times before this one: `min(backoff_base * 2^attempts,
    /// backoff_max)`.
    #[must_use]
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exponent = u32::try_from(attempts).unwrap_or(0).min(31);
        self.backoff_base
            .saturating_mul(1_u32 << exponent)
            .min(self.backoff_max)
    }
}

/// What one [`Dispatcher::dispatch_once`] did, in events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Settled as dispatched: every sink accepted, or there was nothing to
    /// do (these are settled without a claim).
    pub delivered: usize,
    /// Put back for a later attempt (some sink answered retryable).
    pub retried: usize,
    /// Delivered to every sink it could reach, and put back for the sinks
    /// an earlier event of its session still waits for (a retry).
    pub held: usize,
    /// Given up (a sink answered permanent, or the payload did not decode).
    pub failed: usize,
    /// Claimed but not started before the pass's lease ran short
    /// ([`DispatcherConfig::lease`]): given back, in their place, for the
    /// next pass.
    pub released: usize,
}

impl DispatchReport {
    /// Events settled or put back in the pass.
    #[must_use]
    pub const fn handled(&self) -> usize {
        self.delivered + self.retried + self.held + self.failed + self.released
    }
}

/// Delivers committed outbox events to ticket and notification sinks, at
/// least once, in order per session and sink, with exponential backoff (issue #3).
///
/// Rules per event kind:
/// - `ticket.requested` → [`TicketSink::open_ticket`] on every ticket sink;
/// - `session.closed` of a session with a `ticket_id`, or `ticket.closed` →
///   [`TicketSink::close_ticket`] on every ticket sink;
/// - `session.assigned` with an agent, of a session with a `ticket_id` →
///   [`TicketSink::assign_ticket`] on every ticket sink;
/// - `session.assigned` without an agent (a hand-back to the queue), of a
///   session with a `ticket_id` → [`TicketSink::unassign_ticket`] on every
///   ticket sink;
/// - `session.updated` with `contact_updated: true` (a contact change), of
///   a session with a `ticket_id` and a contact →
///   [`TicketSink::ticket_contact`] on every ticket sink;
/// - `message.posted` by the customer in a session with a `ticket_id` →
///   [`TicketSink::ticket_message`] on every ticket sink;
/// - `message.posted` by an agent in a customer session that is ticketed or
///   whose customer had no live connection (issue #4) → a
///   [`Notification`] (`kind` `agent_reply`, id = event id, body truncated to
///   [`NOTIFICATION_BODY_MAX_CHARS`]) to every notification sink;
/// - `message.missed` (a reply only a dead customer connection followed: a
///   crashed node's, written by the purge of expired connections, or a
///   silent client's, written when its node closed it) → the same
///   notification, with the message's id and creation time;
/// - any other kind, or a kind without a sink of its type: nothing to do.
///   Such events are settled as dispatched without being claimed
///   ([`OutboxConsumer::settle_ignored`], issue #5), or, with a store
///   given [`Dispatcher::outbox_interest`], written settled in the first
///   place.
///
/// Then the event is settled: all sinks OK → dispatched; any
/// [`SinkError::Retryable`] → retried after [`DispatcherConfig::backoff`]
/// for the sinks that failed only ([`OutboxConsumer::retry_later`]);
/// otherwise a [`SinkError::Permanent`] → failed. A payload that does not
/// decode is failed at once (it would never decode on a retry either).
///
/// Order is per session and per sink (each sink by its name): an event
/// does not reach a sink that an earlier pending event of its session is
/// still owed to; it reaches the other sinks and is held from that one
/// until the earlier event is due again ([`OutboxConsumer::hold`]). So a
/// webhook that is down holds up only its own deliveries, not the in-app
/// tickets and notifications.
pub struct Dispatcher<C> {
    consumer: C,
    config: DispatcherConfig,
    /// Each with its [`TicketSink::name`].
    ticket_sinks: Vec<(String, Arc<dyn TicketSink>)>,
    /// Each with its [`NotificationSink::name`].
    notification_sinks: Vec<(String, Arc<dyn NotificationSink>)>,
    /// The events the passes in progress hold claims on, released when
    /// [`Dispatcher::run`] stops.
    in_flight: InFlight,
}

/// The claims of a dispatcher's passes in progress, by pass.
type InFlight = Arc<std::sync::Mutex<InFlightClaims>>;

/// What [`InFlight`] holds.
#[derive(Default)]
struct InFlightClaims {
    /// The key of the next pass's claim.
    next: u64,
    /// Each pass's claimed events, with its claim's token
    /// ([`PendingEvent::lease`]) and when that lease runs out here.
    passes: HashMap<u64, PassClaim>,
}

/// One pass's claim in [`InFlightClaims`].
struct PassClaim {
    lease: Option<DateTime<Utc>>,
    until: tokio::time::Instant,
    ids: Vec<EventId>,
}

/// A pass's hold on its claim in [`Dispatcher`]'s `in_flight`: given up
/// when the pass ends, settled or dropped. Each pass has its own entry,
/// so a pass that claims an event again after another pass of this
/// dispatcher settled it (a retry) is not forgotten when the first ends.
struct Claims {
    in_flight: InFlight,
    key: u64,
}

impl Claims {
    /// Records `ids`, claimed with the token `lease` for a lease that runs
    /// out at `until`, in `in_flight`.
    fn hold(
        in_flight: &InFlight,
        ids: Vec<EventId>,
        lease: Option<DateTime<Utc>>,
        until: tokio::time::Instant,
    ) -> Self {
        let mut claims = lock(in_flight);
        let key = claims.next;
        claims.next += 1;
        claims.passes.insert(key, PassClaim { lease, until, ids });
        Self {
            in_flight: in_flight.clone(),
            key,
        }
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        lock(&self.in_flight).passes.remove(&self.key);
    }
}

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, InFlightClaims> {
    in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Gives `call` at most `limit` ([`DispatcherConfig::sink_timeout`]): past
/// it, a retryable failure.
async fn timed(
    limit: Duration,
    call: impl Future<Output = Result<(), SinkError>>,
) -> Result<(), SinkError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(SinkError::Retryable(format!(
            "no answer within {} ms",
            limit.as_millis()
        )))
    })
}

impl<C: OutboxConsumer> Dispatcher<C> {
    /// A dispatcher reading `consumer`'s outbox, with no sinks yet.
    #[must_use]
    pub fn new(consumer: C, config: DispatcherConfig) -> Self {
        Self {
            consumer,
            config,
            ticket_sinks: Vec::new(),
            notification_sinks: Vec::new(),
            in_flight: Arc::default(),
        }
    }

    /// Adds a sink that gets every ticket opening, closing, assignment and
    /// unassignment, customer message and contact change, under its
    /// [`TicketSink::name`].
    ///
    /// # Panics
    /// When a ticket sink of the same name was added before: an event
    /// retried for one of them would skip the other.
    #[must_use]
    pub fn ticket_sink(mut self, sink: Arc<dyn TicketSink>) -> Self {
        let name = sink.name();
        assert!(
            self.ticket_sinks.iter().all(|(n, _)| *n != name),
            "two ticket sinks named {name:?}: give each its own TicketSink::name"
        );
        self.ticket_sinks.push((name, sink));
        self
    }

    /// Adds a sink that gets every customer notification, under its
    /// [`NotificationSink::name`].
    ///
    /// # Panics
    /// When a notification sink of the same name was added before.
    #[must_use]
    pub fn notification_sink(mut self, sink: Arc<dyn NotificationSink>) -> Self {
        let name = sink.name();
        assert!(
            self.notification_sinks.iter().all(|(n, _)| *n != name),
            "two notification sinks named {name:?}: give each its own NotificationSink::name"
        );
        self.notification_sinks.push((name, sink));
        self
    }

    /// The configuration in use.
    #[must_use]
    pub const fn config(&self) -> &DispatcherConfig {
        &self.config
    }

    /// First settles, without claiming them, the due events among the
    /// oldest [`DispatcherConfig::batch_size`] that no sink acts on
    /// ([`OutboxConsumer::settle_ignored`]: one write for them all; most
    /// `message.posted` events need no notification). Then claims one
    /// batch of due events (at most [`DispatcherConfig::batch_size`];
    /// a session's events in order), delivers each session's events in
    /// order and up to [`SESSIONS_AT_ONCE`] sessions at the same time (each
    /// event to all its sinks at once, so a receiver that hangs until its
    /// time limit holds up only its own session), and settles them: retries
    /// and failures
    /// one by one, the delivered ones
    /// together in one write at the end of the pass (so a busy outbox costs
    /// at most three commits per pass, not two per event). Deterministic: with nothing
    /// due it returns an empty report at once.
    ///
    /// # Errors
    /// The consumer's [`ChatError`] when claiming or settling fails (e.g. the
    /// database is down). Events claimed but not settled are handed out
    /// again when their lease expires, so nothing is lost.
    pub async fn dispatch_once(&self) -> Result<DispatchReport, ChatError> {
        // Events no sink acts on are settled first, without a claim.
        let sinks = self.sinks();
        let ignored = |event: &DomainEvent| sinks.ignore(event);
        let skipped = self
            .consumer
            .settle_ignored(self.config.batch_size, &ignored)
            .await?;
        // Taken before the claim, so that it is no later than the lease the
        // store records.
        let claimed_at = tokio::time::Instant::now();
        let batch = self
            .consumer
            .claim_pending(self.config.batch_size, self.config.lease)
            .await?;
        // One claim: one token for its events.
        let lease = batch.first().and_then(|pending| pending.lease);
        // Bounded: an `Instant` past its range panics.
        let span = self.config.lease.min(MAX_LEASE);
        let lease_ends = claimed_at + span;
        let margin = Ord::min(self.config.sink_timeout, span / 2);
        let start_by = lease_ends - margin;
        let claims = Claims::hold(
            &self.in_flight,
            batch.iter().map(|pending| pending.event.id).collect(),
            lease,
            lease_ends,
        );
        let mut report = DispatchReport {
            delivered: skipped,
            ..DispatchReport::default()
        };
        // Each session's events in claim (= outbox) order; an event of no
        // session on its own. The sessions are delivered at the same time:
        // a receiver that hangs until its time limit holds up only the
        // session it hangs on, not every tenant's events behind it.
        let mut sessions: Vec<Vec<PendingEvent>> = Vec::new();
        let mut of_session: std::collections::HashMap<_, usize> = std::collections::HashMap::new();
        for pending in batch {
            match pending.event.session_id {
                Some(s) => match of_session.get(&s) {
                    Some(&i) => sessions[i].push(pending),
                    None => {
                        of_session.insert(s, sessions.len());
                        sessions.push(vec![pending]);
                    }
                },
                None => sessions.push(vec![pending]),
            }
        }
        let passes: Vec<SessionPass> = {
            use futures_util::StreamExt;
            futures_util::stream::iter(
                sessions
                    .into_iter()
                    .map(|s| self.handle_session(s, lease, start_by, lease_ends)),
            )
            .buffer_unordered(SESSIONS_AT_ONCE)
            .collect()
            .await
        };
        let mut delivered = Vec::new();
        let mut unstarted = Vec::new();
        let mut outcome = Ok(());
        for pass in passes {
            report.delivered += pass.delivered.len();
            report.retried += pass.retried;
            report.held += pass.held;
            report.failed += pass.failed;
            delivered.extend(pass.delivered);
            unstarted.extend(pass.unstarted);
            if let Some(e) = pass.error {
                if outcome.is_ok() {
                    outcome = Err(e);
                } else {
                    tracing::warn!(error = %e, "settling an outbox event failed too");
                }
            }
        }
        // Settle what was delivered even when a later settlement failed; if
        // this write fails too, the events are handed out again after their
        // lease (at least once; the sinks are idempotent).
        let settled = self.consumer.mark_dispatched(&delivered, lease).await;
        if !unstarted.is_empty() {
            report.released = unstarted.len();
            tracing::debug!(
                events = unstarted.len(),
                "outbox events not started within the pass's lease given back"
            );
            self.consumer.release(&unstarted, lease).await?;
        }
        settled?;
        drop(claims);
        outcome.map(|()| report)
    }

    /// Runs [`Dispatcher::dispatch_once`] in a loop until `shutdown`
    /// resolves. After a pass the next one starts
    /// [`DispatcherConfig::poll_interval`] later when the pass found nothing
    /// to do or failed, [`DispatcherConfig::batch_window`] later when it
    /// handled less than a full batch, and at once after a full batch.
    /// A pass still running after [`DispatcherConfig::poll_interval`] (a
    /// receiver that hangs until its time limit) does not hold up the
    /// others: the next pass starts beside it and claims what it has not
    /// (its sessions' later events wait for it, in order), up to
    /// four passes at a time (`PASSES_AT_ONCE`). Errors are logged (`tracing`)
    /// and the loop goes on. Shutdown interrupts the passes in progress and
    /// releases their claims (waiting at most [`RELEASE_WAIT`]), so that
    /// their unsettled events are handed out again at once (another node's
    /// dispatcher, or this one restarted) instead of after their lease; a
    /// sink may get an event again that it took just before, which its
    /// idempotency makes harmless.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        use futures_util::StreamExt;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut passes = futures_util::stream::FuturesUnordered::new();
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    // Each pass's events with its claim's token, so that an
                    // event settled since and claimed by another pass or
                    // node is left alone; a claim whose lease ran out may
                    // be taken over at any moment: left alone too.
                    let now = tokio::time::Instant::now();
                    let held: Vec<(Option<DateTime<Utc>>, Vec<EventId>)> = lock(&self.in_flight)
                        .passes
                        .values()
                        .filter(|claim| claim.until > now)
                        .map(|claim| (claim.lease, claim.ids.clone()))
                        .collect();
                    drop(passes);
                    let release = async {
                        for (lease, ids) in &held {
                            self.consumer.release(ids, *lease).await?;
                        }
                        Ok::<(), ChatError>(())
                    };
                    match tokio::time::timeout(RELEASE_WAIT, release).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::warn!(%error, "outbox claims not released at shutdown: their lease runs out"),
                        Err(_) => tracing::warn!("outbox claims not released at shutdown in time: their lease runs out"),
                    }
                    return;
                }
                Some(result) = passes.next() => {
                    let result: Result<DispatchReport, ChatError> = result;
                    let pause = match result {
                        Ok(report) => {
                            if report.handled() > 0 {
                                tracing::debug!(
                                    delivered = report.delivered,
                                    retried = report.retried,
                                    held = report.held,
                                    failed = report.failed,
                                    "outbox dispatch pass"
                                );
                            }
                            self.pause_after(report.handled())
                        }
                        // The database being down or busy is expected to
                        // pass (the pass is made again): a warning, not an
                        // error line every poll of an outage.
                        Err(error) if error.is_unavailable() => {
                            tracing::warn!(%error, "outbox dispatch: database unavailable; trying again");
                            self.config.poll_interval
                        }
                        Err(error) => {
                            tracing::error!(%error, "outbox dispatch failed");
                            self.config.poll_interval
                        }
                    };
                    next = next.min(tokio::time::Instant::now() + pause);
                }
                () = tokio::time::sleep_until(next), if passes.len() < PASSES_AT_ONCE => {
                    passes.push(self.dispatch_once());
                    // Another pass beside this one if it is still running
                    // then; sooner when it ends.
                    next = tokio::time::Instant::now() + self.config.poll_interval;
                }
            }
        }
    }

    /// How long [`Dispatcher::run`] sleeps after a pass that handled `handled`
    /// events.
    fn pause_after(&self, handled: usize) -> Duration {
        if handled == 0 {
            self.config.poll_interval
        } else if (handled as u64) < self.config.batch_size {
            self.config.batch_window
        } else {
            Duration::ZERO
        }
    }

    /// Delivers one session's claimed events in order ([`Self::handle`]),
    /// settling them with the claim's token `lease`. Behind an event still
    /// owed to some sinks (retried, or held from them), the later events
    /// wait for those sinks only: they reach the others and are held from
    /// those ([`OutboxConsumer::hold`]). An event not started by
    /// `start_by` is not started, nor are those after it: they are given
    /// back ([`SessionPass::unstarted`]); a sink call is cut when the lease
    /// runs out at `lease_ends`, if the sink time limit does not cut it
    /// first. A settlement the store refused ends the session's pass; its
    /// unsettled events are handed out again after their lease.
    async fn handle_session(
        &self,
        events: Vec<PendingEvent>,
        lease: Option<DateTime<Utc>>,
        start_by: tokio::time::Instant,
        lease_ends: tokio::time::Instant,
    ) -> SessionPass {
        let mut pass = SessionPass::default();
        let mut waiting = Waiting::new();
        let mut events = events.into_iter();
        while let Some(pending) = events.next() {
            let id = pending.event.id;
            if tokio::time::Instant::now() >= start_by {
                pass.unstarted.push(id);
                pass.unstarted
                    .extend(events.map(|pending| pending.event.id));
                break;
            }
            let limit = Ord::min(
                self.config.sink_timeout,
                lease_ends.saturating_duration_since(tokio::time::Instant::now()),
            );
            match self.handle(pending, lease, limit, &mut waiting).await {
                Ok(Settled::Delivered) => pass.delivered.push(id),
                Ok(Settled::Retried) => pass.retried += 1,
                Ok(Settled::Held) => pass.held += 1,
                Ok(Settled::Failed) => pass.failed += 1,
                Err(e) => {
                    pass.error = Some(e);
                    break;
                }
            }
        }
        pass
    }

    /// Delivers one event to the sinks it is owed to and may reach now,
    /// and settles it, except a delivered one: those are settled together
    /// at the end of the pass. Sinks that an earlier event of the session
    /// waits for (`waiting`, or [`PendingEvent::behind`]) are not called:
    /// the event is held from them until that event is due again. A sink
    /// still owed the event afterwards is added to `waiting`.
    async fn handle(
        &self,
        pending: PendingEvent,
        lease: Option<DateTime<Utc>>,
        limit: Duration,
        waiting: &mut Waiting,
    ) -> Result<Settled, ChatError> {
        let event = &pending.event;
        let work = match self.sinks().work(event) {
            Ok(Some(work)) => work,
            Ok(None) => return Ok(Settled::Delivered),
            Err(undecodable) => return self.fail(event, lease, &undecodable).await,
        };
        // The sinks still owed the event: those to call now, and those it
        // waits for behind an earlier event, until that one is due again.
        let mut calls = Vec::new();
        let mut held: Vec<(String, DateTime<Utc>)> = Vec::new();
        let names = self.names(&work);
        // Owed only to sinks this dispatcher no longer has (renamed: a
        // webhook whose URL changed, a host sink's type moved): owed to
        // every sink it has, rather than settled unseen. At least once:
        // a sink that took it before gets it again, under the same key.
        let orphaned = pending
            .pending_for
            .as_ref()
            .is_some_and(|owed| !owed.iter().any(|n| names.contains(&n.as_str())));
        if orphaned {
            tracing::warn!(
                event_id = %event.id,
                kind = event.kind.as_str(),
                owed_to = ?pending.pending_for,
                "outbox event owed only to sinks this dispatcher does not have; delivering it to all of its sinks"
            );
        }
        for name in names {
            if !orphaned && !pending.owed_to(name) {
                continue;
            }
            let behind = pending
                .behind
                .as_ref()
                .filter(|_| pending.held_from(name))
                .map(|b| b.until);
            match [waiting.get(name).copied(), behind]
                .into_iter()
                .flatten()
                .min()
            {
                Some(until) => held.push((name.to_owned(), until)),
                None => calls.push(name),
            }
        }
        // Later events of the session wait for these sinks too.
        for (name, until) in &held {
            waiting.wait(name, *until);
        }
        let results = self.deliver(&work, event.id, &calls, limit).await;
        let mut retryable = Vec::new();
        let mut permanent = Vec::new();
        for (name, result) in calls.into_iter().zip(results) {
            match result {
                Ok(()) => {}
                Err(SinkError::Retryable(e)) => retryable.push((name, e)),
                Err(SinkError::Permanent(e)) => permanent.push(format!("{name}: {e}")),
            }
        }
        let mut owed: Vec<String> = held.iter().map(|(name, _)| name.clone()).collect();
        // Any retryable failure wins over permanent ones: the event comes
        // back for the sinks that asked for a retry (and those it was held
        // from); a sink that answered permanent is given up for.
        if !retryable.is_empty() {
            let delay = self.config.backoff(pending.attempts);
            let now = livechat_core::now();
            let retry_at = TimeDelta::from_std(delay)
                .ok()
                .and_then(|delay| now.checked_add_signed(delay))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            // Recorded with the sinks given up for (permanent), which the
            // retry no longer calls.
            let error = retryable
                .iter()
                .map(|(name, e)| format!("{name}: {e}"))
                .chain(permanent)
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(
                event_id = %event.id,
                kind = event.kind.as_str(),
                attempts = pending.attempts + 1,
                %retry_at,
                %error,
                "sink failed; will retry"
            );
            for (name, _) in &retryable {
                owed.push((*name).to_owned());
                waiting.wait(name, retry_at);
            }
            self.consumer
                .retry_later(event.id, lease, retry_at, &error, &owed)
                .await?;
            return Ok(Settled::Retried);
        }
        if !permanent.is_empty() {
            let error = permanent.join("; ");
            if held.is_empty() {
                return self.fail(event, lease, &error).await;
            }
            // Given up for those sinks; still owed to the others.
            tracing::error!(
                event_id = %event.id,
                kind = event.kind.as_str(),
                %error,
                "sink refused the event; giving up for that sink"
            );
        }
        let Some(until) = held.iter().map(|(_, until)| *until).min() else {
            return Ok(Settled::Delivered);
        };
        self.consumer.hold(event.id, lease, until, &owed).await?;
        Ok(Settled::Held)
    }

    /// Gives up on `event` (a permanent failure, or a payload that does
    /// not decode).
    async fn fail(
        &self,
        event: &DomainEvent,
        lease: Option<DateTime<Utc>>,
        error: &str,
    ) -> Result<Settled, ChatError> {
        tracing::error!(
            event_id = %event.id,
            kind = event.kind.as_str(),
            %error,
            "event cannot be delivered; giving up"
        );
        self.consumer.mark_failed(event.id, lease, error).await?;
        Ok(Settled::Failed)
    }

    /// The names of the sinks `work` goes to.
    fn names(&self, work: &Work) -> Vec<&str> {
        match work {
            Work::OpenTicket(_)
            | Work::CloseTicket(..)
            | Work::AssignTicket(..)
            | Work::UnassignTicket(..)
            | Work::TicketMessage(..)
            | Work::TicketContact(..) => {
                self.ticket_sinks.iter().map(|(n, _)| n.as_str()).collect()
            }
            Work::Notify(_) => self
                .notification_sinks
                .iter()
                .map(|(n, _)| n.as_str())
                .collect(),
        }
    }

    /// Which kinds of sink this dispatcher has.
    fn sinks(&self) -> Sinks {
        Sinks {
            tickets: !self.ticket_sinks.is_empty(),
            notifications: !self.notification_sinks.is_empty(),
        }
    }

    /// The events this dispatcher acts on, for the chat store
    /// (`SeaOrmStore::with_outbox_interest`; issue #5): the store then
    /// writes every other event already settled, and this dispatcher
    /// never reads it. The same decision as the ignored-event settlement
    /// of [`Self::dispatch_once`], taken once from the sinks added so far:
    /// add every sink before calling this. An event whose payload does not
    /// decode counts as wanted, so that it is claimed and failed in view.
    #[must_use]
    pub fn outbox_interest(&self) -> OutboxInterest {
        let sinks = self.sinks();
        OutboxInterest::new(move |event| !sinks.ignore(event))
    }

    /// Calls the sinks named `names` with `work`, all at once (a webhook
    /// that hangs does not hold up the in-app ticket or notification), each
    /// for at most `limit` ([`DispatcherConfig::sink_timeout`], or what is
    /// left of the pass's lease); one result per name, in order.
    async fn deliver(
        &self,
        work: &Work,
        key: livechat_core::EventId,
        names: &[&str],
        limit: Duration,
    ) -> Vec<Result<(), SinkError>> {
        use futures_util::future::join_all;
        // Each name is one of this dispatcher's sinks of the work's kind
        // (`Self::names`).
        let tickets = || {
            names
                .iter()
                .filter_map(|name| self.ticket_sinks.iter().find(|(n, _)| n == name))
                .map(|(_, sink)| sink)
        };
        match work {
            Work::OpenTicket(request) => {
                join_all(tickets().map(|sink| timed(limit, sink.open_ticket(request, key)))).await
            }
            Work::CloseTicket(tenant, ticket) => {
                join_all(
                    tickets().map(|sink| timed(limit, sink.close_ticket(*tenant, *ticket, key))),
                )
                .await
            }
            Work::AssignTicket(tenant, ticket, agent) => {
                join_all(
                    tickets().map(|sink| {
                        timed(limit, sink.assign_ticket(*tenant, *ticket, *agent, key))
                    }),
                )
                .await
            }
            Work::UnassignTicket(tenant, ticket) => {
                join_all(
                    tickets().map(|sink| timed(limit, sink.unassign_ticket(*tenant, *ticket, key))),
                )
                .await
            }
            Work::TicketMessage(tenant, ticket, message) => {
                join_all(
                    tickets().map(|sink| {
                        timed(limit, sink.ticket_message(*tenant, *ticket, message, key))
                    }),
                )
                .await
            }
            Work::TicketContact(tenant, ticket, contact) => {
                join_all(
                    tickets().map(|sink| {
                        timed(limit, sink.ticket_contact(*tenant, *ticket, contact, key))
                    }),
                )
                .await
            }
            Work::Notify(notification) => {
                join_all(
                    names
                        .iter()
                        .filter_map(|name| self.notification_sinks.iter().find(|(n, _)| n == name))
                        .map(|(_, sink)| timed(limit, sink.notify(notification, key))),
                )
                .await
            }
        }
    }
}

/// What [`Dispatcher::handle_session`] did with one session's events.
#[derive(Default)]
struct SessionPass {
    delivered: Vec<livechat_core::EventId>,
    retried: usize,
    held: usize,
    failed: usize,
    /// Not started before the pass's lease ran short: given back.
    unstarted: Vec<livechat_core::EventId>,
    /// A settlement the store refused.
    error: Option<ChatError>,
}

/// Which kinds of sink a dispatcher has: what its decisions depend on.
#[derive(Clone, Copy)]
struct Sinks {
    tickets: bool,
    notifications: bool,
}

impl Sinks {
    /// What the event asks of the sinks: `None` when there is nothing to
    /// do (no sink of its kind, or an event kind no sink acts on); `Err`
    /// when the payload does not decode. The one decision that delivery,
    /// the ignored-event settlement and the outbox interest read.
    fn work(self, event: &DomainEvent) -> Result<Option<Work>, String> {
        let work = match event.kind {
            EventKind::TicketRequested if self.tickets => Some(Work::OpenTicket(decode(event)?)),
            EventKind::SessionClosed | EventKind::TicketClosed if self.tickets => {
                // A closed session's ticket, if it has one; a closed
                // ticket's own id.
                #[derive(Deserialize)]
                struct Closed {
                    ticket_id: Option<TicketId>,
                }
                decode::<Closed>(event)?
                    .ticket_id
                    .map(|ticket| Work::CloseTicket(event.tenant_id, ticket))
            }
            EventKind::SessionAssigned if self.tickets => {
                // Only a ticketed session's assignment concerns the sinks;
                // one without an agent is a hand-back to the queue.
                #[derive(Deserialize)]
                struct Assigned {
                    ticket_id: Option<TicketId>,
                    agent_id: Option<UserId>,
                }
                let assigned = decode::<Assigned>(event)?;
                assigned.ticket_id.map(|ticket| match assigned.agent_id {
                    Some(agent) => Work::AssignTicket(event.tenant_id, ticket, agent),
                    None => Work::UnassignTicket(event.tenant_id, ticket),
                })
            }
            EventKind::SessionUpdated if self.tickets => {
                // Only a contact change of a ticketed session concerns the
                // sinks (the other updates carry nothing new for a ticket).
                #[derive(Deserialize)]
                struct Updated {
                    ticket_id: Option<TicketId>,
                    contact: Option<Contact>,
                    #[serde(default)]
                    contact_updated: bool,
                }
                let updated = decode::<Updated>(event)?;
                match (updated.contact_updated, updated.ticket_id, updated.contact) {
                    (true, Some(ticket), Some(contact)) => {
                        Some(Work::TicketContact(event.tenant_id, ticket, contact))
                    }
                    _ => None,
                }
            }
            EventKind::MessagePosted if self.notifications || self.tickets => {
                // Most messages need no sink, and the outbox interest asks
                // this of every message inside its writing transaction:
                // four fields decide it before the whole message (a
                // flattened struct, slow to decode) is read (issue #5
                // profile).
                match self.posted(&decode(event)?) {
                    Some(Posted::TicketMessage(ticket)) => Some(Work::TicketMessage(
                        event.tenant_id,
                        ticket,
                        decode::<MessagePosted>(event)?.message,
                    )),
                    Some(Posted::Notify) => agent_reply(event, decode(event)?).map(Work::Notify),
                    None => None,
                }
            }
            EventKind::MessageMissed if self.notifications => {
                // A reply whose customer connection died before it could
                // be seen: the notification it would have had, under the
                // same id (the message's), so one already written for it
                // is not written twice.
                agent_reply(event, decode(event)?).map(Work::Notify)
            }
            _ => None,
        };
        Ok(work)
    }

    /// No sink acts on `event` (a payload that does not decode is not
    /// ignored: it is claimed and failed). The same decision as
    /// [`Self::work`]; for a `message.posted`, which the outbox interest
    /// asks of inside the writing transaction, taken from its head alone.
    fn ignore(self, event: &DomainEvent) -> bool {
        if event.kind == EventKind::MessagePosted && (self.tickets || self.notifications) {
            return decode::<MessagePostedHead>(event)
                .is_ok_and(|head| self.posted(&head).is_none());
        }
        matches!(self.work(event), Ok(None))
    }

    /// What a `message.posted` with `head` asks of these sinks: a
    /// customer's message in a ticketed chat goes to the ticket sinks, an
    /// agent's reply the customer would miss to the notification sinks.
    fn posted(self, head: &MessagePostedHead) -> Option<Posted> {
        match head.ticket_message() {
            Some(ticket) if self.tickets => Some(Posted::TicketMessage(ticket)),
            _ if self.notifications && head.notifies() => Some(Posted::Notify),
            _ => None,
        }
    }
}

/// What a `message.posted` asks of the sinks ([`Sinks::posted`]).
enum Posted {
    /// [`TicketSink::ticket_message`] for this ticket.
    TicketMessage(TicketId),
    /// A notification of the reply ([`agent_reply`]).
    Notify,
}

/// What an event asks of the sinks (see [`Sinks::work`]).
enum Work {
    OpenTicket(TicketRequested),
    CloseTicket(TenantId, TicketId),
    AssignTicket(TenantId, TicketId, UserId),
    UnassignTicket(TenantId, TicketId),
    TicketMessage(TenantId, TicketId, ChatMessage),
    TicketContact(TenantId, TicketId, Contact),
    Notify(Notification),
}

/// How [`Dispatcher::handle`] left an event.
enum Settled {
    /// Delivered; to be marked dispatched with the rest of the pass.
    Delivered,
    /// Set to be retried later.
    Retried,
    /// Delivered where it could be; held from the sinks an earlier event
    /// of its session waits for.
    Held,
    /// Given up on.
    Failed,
}

/// The sinks an earlier event of the session being delivered is still
/// owed to, each with the time that event is due again: the session's
/// later events wait for those sinks until then.
struct Waiting(HashMap<String, DateTime<Utc>>);

impl Waiting {
    fn new() -> Self {
        Self(HashMap::new())
    }

    fn get(&self, name: &str) -> Option<&DateTime<Utc>> {
        self.0.get(name)
    }

    /// An earlier event is owed to `name` until `until` (the earliest such
    /// time is kept: the later events are looked at again then).
    fn wait(&mut self, name: &str, until: DateTime<Utc>) {
        self.0
            .entry(name.to_owned())
            .and_modify(|t| *t = Ord::min(*t, until))
            .or_insert(until);
    }
}

fn decode<T: for<'de> Deserialize<'de>>(event: &DomainEvent) -> Result<T, String> {
    event
        .payload
        .decode()
        .map_err(|e| format!("undecodable {} payload: {e}", event.kind.as_str()))
}

/// The notification of an agent's reply that [`MessagePostedHead::notifies`]
/// chose, or of a `message.missed` reply; `None` only when the session has
/// no customer, which both rule out.
fn agent_reply(event: &DomainEvent, posted: MessagePosted) -> Option<Notification> {
    let ticket_id = posted.ticket_id;
    let customer_id = posted.session_customer_id?;
    // A `message.posted` event's id is its message's (older events have
    // their own); a `message.missed` one has its own and is written later,
    // and its notification takes the message's id and time.
    let (id, created_at) = match event.kind {
        EventKind::MessageMissed => (posted.message.id.as_uuid(), posted.message.created_at),
        _ => (event.id.as_uuid(), event.created_at),
    };
    Some(Notification {
        id: NotificationId::from_uuid(id),
        tenant_id: event.tenant_id,
        customer_id,
        session_id: Some(posted.message.session_id),
        ticket_id,
        kind: "agent_reply".to_owned(),
        title: "An agent replied".to_owned(),
        body: posted
            .message
            .message
            .chars()
            .take(NOTIFICATION_BODY_MAX_CHARS)
            .collect(),
        created_at,
        read_at: None,
    })
}

#[cfg(test)]
mod tests {
    //! The dispatcher's decisions, against an in-memory consumer. The
    //! end-to-end and crash-safety tests against the real store live in the
    //! workspace's `tests/` crate.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use livechat_core::{
        ChatMessage, CustomerId, EventId, MessageId, Priority, SenderType, SessionId, TenantId,
        TicketReason, UserId,
    };
    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct Settled {
        pending: Vec<PendingEvent>,
        dispatched: Vec<EventId>,
        /// (event, retry at, still owed to)
        retried: Vec<(EventId, DateTime<Utc>, Vec<String>)>,
        /// (event, until, still owed to)
        held: Vec<(EventId, DateTime<Utc>, Vec<String>)>,
        failed: Vec<(EventId, String)>,
        released: Vec<EventId>,
    }

    #[derive(Default)]
    struct MemoryOutbox(Arc<Mutex<Settled>>);

    impl OutboxConsumer for MemoryOutbox {
        async fn claim_pending(
            &self,
            limit: u64,
            _lease: Duration,
        ) -> Result<Vec<PendingEvent>, ChatError> {
            let mut s = self.0.lock().unwrap();
            let n = s.pending.len().min(usize::try_from(limit).unwrap());
            Ok(s.pending.drain(..n).collect())
        }
        async fn mark_dispatched(
            &self,
            ids: &[EventId],
            _lease: Option<DateTime<Utc>>,
        ) -> Result<(), ChatError> {
            self.0.lock().unwrap().dispatched.extend_from_slice(ids);
            Ok(())
        }
        async fn retry_later(
            &self,
            id: EventId,
            _lease: Option<DateTime<Utc>>,
            retry_at: DateTime<Utc>,
            _error: &str,
            pending_for: &[String],
        ) -> Result<(), ChatError> {
            let owed = pending_for.to_vec();
            self.0.lock().unwrap().retried.push((id, retry_at, owed));
            Ok(())
        }
        async fn hold(
            &self,
            id: EventId,
            _lease: Option<DateTime<Utc>>,
            until: DateTime<Utc>,
            pending_for: &[String],
        ) -> Result<(), ChatError> {
            let owed = pending_for.to_vec();
            self.0.lock().unwrap().held.push((id, until, owed));
            Ok(())
        }
        async fn mark_failed(
            &self,
            id: EventId,
            _lease: Option<DateTime<Utc>>,
            error: &str,
        ) -> Result<(), ChatError> {
            self.0.lock().unwrap().failed.push((id, error.to_owned()));
            Ok(())
        }
        async fn release(
            &self,
            ids: &[EventId],
            _lease: Option<DateTime<Utc>>,
        ) -> Result<(), ChatError> {
            self.0.lock().unwrap().released.extend_from_slice(ids);
            Ok(())
        }
    }

    /// Records calls; answers with `answer` (`None` = OK). Each has a
    /// name of its own.
    struct Recorder {
        name: String,
        answer: Option<fn(String) -> SinkError>,
        calls: Mutex<Vec<String>>,
        notifications: Mutex<Vec<Notification>>,
    }

    impl Default for Recorder {
        fn default() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Self {
                name: format!("recorder {n}"),
                answer: None,
                calls: Mutex::default(),
                notifications: Mutex::default(),
            }
        }
    }

    impl Recorder {
        fn failing(answer: fn(String) -> SinkError) -> Arc<Self> {
            Arc::new(Self {
                answer: Some(answer),
                ..Self::default()
            })
        }
        fn reply(&self, call: String) -> Result<(), SinkError> {
            self.calls.lock().unwrap().push(call);
            self.answer.map_or(Ok(()), |f| Err(f("boom".into())))
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl TicketSink for Recorder {
        fn name(&self) -> String {
            self.name.clone()
        }
        async fn open_ticket(&self, r: &TicketRequested, key: EventId) -> Result<(), SinkError> {
            self.reply(format!("open {} {key}", r.ticket_id))
        }
        async fn close_ticket(
            &self,
            tenant: livechat_core::TenantId,
            ticket: TicketId,
            key: EventId,
        ) -> Result<(), SinkError> {
            self.reply(format!("close {tenant} {ticket} {key}"))
        }
        async fn ticket_message(
            &self,
            tenant: livechat_core::TenantId,
            ticket: TicketId,
            message: &ChatMessage,
            key: EventId,
        ) -> Result<(), SinkError> {
            let (seq, text) = (message.seq, &message.message);
            self.reply(format!("message {tenant} {ticket} {seq} {text} {key}"))
        }
    }

    #[async_trait]
    impl NotificationSink for Recorder {
        fn name(&self) -> String {
            self.name.clone()
        }
        async fn notify(&self, n: &Notification, key: EventId) -> Result<(), SinkError> {
            self.notifications.lock().unwrap().push(n.clone());
            self.reply(format!("notify {} {key}", n.customer_id))
        }
    }

    fn tenant() -> TenantId {
        TenantId::new(1).unwrap()
    }

    fn event(kind: EventKind, payload: serde_json::Value) -> PendingEvent {
        PendingEvent::new(DomainEvent {
            id: EventId::generate(),
            tenant_id: tenant(),
            session_id: None,
            kind,
            payload: livechat_core::EventPayload::new(&payload).unwrap(),
            created_at: livechat_core::now(),
        })
    }

    fn ticket_requested() -> (TicketId, PendingEvent) {
        let ticket_id = TicketId::generate();
        let request = TicketRequested {
            ticket_id,
            tenant_id: tenant(),
            reason: TicketReason::NoAgentOnline,
            session_id: Some(SessionId::generate()),
            customer_id: Some(CustomerId::generate()),
            agent_id: None,
            requested_by: None,
            topic: Some("Billing".into()),
            department: None,
            priority: Priority::Normal,
            contact: None,
            first_message: None,
            messages: Vec::new(),
        };
        let pending = event(
            EventKind::TicketRequested,
            serde_json::to_value(&request).unwrap(),
        );
        (ticket_id, pending)
    }

    fn message_posted(
        sender_type: SenderType,
        text: &str,
        ticket_id: Option<TicketId>,
    ) -> PendingEvent {
        let session_id = SessionId::generate();
        let posted = MessagePosted {
            message: ChatMessage {
                id: MessageId::generate(),
                session_id,
                tenant_id: tenant(),
                sender_type,
                sender_id: Some(UserId::new(7).unwrap()),
                customer_id: None,
                seq: 2,
                message: text.to_owned(),
                client_msg_id: None,
                created_at: livechat_core::now(),
            },
            session_customer_id: Some(CustomerId::generate()),
            ticket_id,
            customer_connected: true,
        };
        let mut pending = event(
            EventKind::MessagePosted,
            serde_json::to_value(&posted).unwrap(),
        );
        pending.event.session_id = Some(session_id);
        pending
    }

    fn dispatcher(
        outbox: MemoryOutbox,
        sinks: impl IntoIterator<Item = Arc<Recorder>>,
    ) -> Dispatcher<MemoryOutbox> {
        sinks.into_iter().fold(
            Dispatcher::new(outbox, DispatcherConfig::default()),
            |d, s| d.ticket_sink(s.clone()).notification_sink(s),
        )
    }

    fn outbox(events: Vec<PendingEvent>) -> MemoryOutbox {
        MemoryOutbox(Arc::new(Mutex::new(Settled {
            pending: events,
            ..Settled::default()
        })))
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let c = DispatcherConfig::default();
        assert_eq!(c.backoff(0), Duration::from_secs(1));
        assert_eq!(c.backoff(1), Duration::from_secs(2));
        assert_eq!(c.backoff(8), Duration::from_secs(256));
        assert_eq!(c.backoff(9), Duration::from_secs(300));
        assert_eq!(c.backoff(i32::MAX), Duration::from_secs(300));
        assert_eq!(c.backoff(-1), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn routes_each_kind_to_its_sinks_and_settles() {
        let (ticket_id, requested) = ticket_requested();
        let closed = event(
            EventKind::SessionClosed,
            json!({"ticket_id": ticket_id, "status": "CLOSED", "closed_by": 7}),
        );
        let closed_untracked = event(
            EventKind::SessionClosed,
            json!({"ticket_id": null, "status": "CLOSED"}),
        );
        let long = "é".repeat(600);
        let reply = message_posted(SenderType::Agent, &long, Some(TicketId::generate()));
        let from_customer = message_posted(SenderType::Customer, "hi", Some(ticket_id));
        let unticketed = message_posted(SenderType::Agent, "hi", None);
        let customer_unticketed = message_posted(SenderType::Customer, "hi", None);
        let other = event(EventKind::SessionStarted, json!({}));
        let ids: Vec<EventId> = [
            &requested,
            &closed,
            &closed_untracked,
            &reply,
            &from_customer,
            &unticketed,
            &customer_unticketed,
            &other,
        ]
        .iter()
        .map(|p| p.event.id)
        .collect();
        let reply_event = reply.event.clone();

        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let d = dispatcher(
            outbox(vec![
                requested,
                closed,
                closed_untracked,
                reply,
                from_customer,
                unticketed,
                customer_unticketed,
                other,
            ]),
            [a.clone(), b.clone()],
        );

        let report = d.dispatch_once().await.unwrap();
        assert_eq!(
            report,
            DispatchReport {
                delivered: 8,
                retried: 0,
                held: 0,
                failed: 0,
                released: 0
            }
        );
        assert_eq!(d.consumer.0.lock().unwrap().dispatched, ids);
        for sink in [&a, &b] {
            let calls = sink.calls();
            assert_eq!(calls.len(), 4, "{calls:?}");
            assert_eq!(calls[0], format!("open {ticket_id} {}", ids[0]));
            assert_eq!(calls[1], format!("close 1 {ticket_id} {}", ids[1]));
            assert!(calls[2].starts_with("notify "));
            // The customer's later message goes to the ticket (closed by
            // an agent here: the sink decides), not to the notifications.
            assert_eq!(calls[3], format!("message 1 {ticket_id} 2 hi {}", ids[4]));
        }
        let n = a.notifications.lock().unwrap()[0].clone();
        assert_eq!(n.id.as_uuid(), reply_event.id.as_uuid());
        assert_eq!(n.kind, "agent_reply");
        assert_eq!(n.title, "An agent replied");
        assert_eq!(n.body, "é".repeat(NOTIFICATION_BODY_MAX_CHARS));
        assert_eq!(n.session_id, reply_event.session_id);
        assert_eq!(n.created_at, reply_event.created_at);
        assert_eq!(n.read_at, None);

        // Nothing left: an idle pass reports nothing.
        assert_eq!(d.dispatch_once().await.unwrap(), DispatchReport::default());
    }

    /// A ticket sink that holds the first ticket it is asked to open until
    /// released (a webhook receiver that hangs), and answers every other
    /// call at once.
    struct Hanging {
        first: Mutex<Option<TicketId>>,
        release: tokio::sync::Notify,
    }

    #[async_trait]
    impl TicketSink for Hanging {
        async fn open_ticket(&self, r: &TicketRequested, _key: EventId) -> Result<(), SinkError> {
            let held = *self.first.lock().unwrap().get_or_insert(r.ticket_id) == r.ticket_id;
            if held {
                self.release.notified().await;
            }
            Ok(())
        }
        async fn close_ticket(
            &self,
            _tenant: livechat_core::TenantId,
            _ticket: TicketId,
            _key: EventId,
        ) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// A ticket sink that takes `delay` for every call, or never answers
    /// (`None`).
    struct Slow {
        delay: Option<Duration>,
        calls: AtomicUsize,
    }

    impl Slow {
        async fn answer(&self) -> Result<(), SinkError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match self.delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
            Ok(())
        }
    }

    #[async_trait]
    impl TicketSink for Slow {
        async fn open_ticket(&self, _r: &TicketRequested, _key: EventId) -> Result<(), SinkError> {
            self.answer().await
        }
        async fn close_ticket(
            &self,
            _tenant: livechat_core::TenantId,
            _ticket: TicketId,
            _key: EventId,
        ) -> Result<(), SinkError> {
            self.answer().await
        }
        async fn ticket_message(
            &self,
            _tenant: livechat_core::TenantId,
            _ticket: TicketId,
            _message: &ChatMessage,
            _key: EventId,
        ) -> Result<(), SinkError> {
            self.answer().await
        }
    }

    /// A pass starts an event only while a sink time limit of its lease
    /// remains: the session's events it has not started by then are given
    /// back, not delivered after another pass may have claimed them.
    /// Here (lease 7 s, time limit 3 s: nothing starts after 4 s) each
    /// call takes 2.5 s: the ticket and the first message start at 0 s and
    /// 2.5 s, the second message would start at 5 s.
    #[tokio::test(start_paused = true)]
    async fn a_pass_gives_back_what_it_cannot_start_within_its_lease() {
        let (ticket, mut requested) = ticket_requested();
        let session = SessionId::generate();
        requested.event.session_id = Some(session);
        let mut events = vec![requested];
        for text in ["first", "second"] {
            let mut message = message_posted(SenderType::Customer, text, Some(ticket));
            message.event.session_id = Some(session);
            events.push(message);
        }
        let last = events[2].event.id;
        let slow = Arc::new(Slow {
            delay: Some(Duration::from_millis(2500)),
            calls: AtomicUsize::new(0),
        });
        let config = DispatcherConfig {
            lease: Duration::from_secs(7),
            sink_timeout: Duration::from_secs(3),
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::new(outbox(events), config).ticket_sink(slow.clone());
        let report = d.dispatch_once().await.unwrap();
        assert_eq!((report.delivered, report.released), (2, 1), "{report:?}");
        assert_eq!(slow.calls.load(Ordering::SeqCst), 2);
        let s = d.consumer.0.lock().unwrap();
        assert_eq!(s.released, vec![last]);
        assert_eq!(s.dispatched.len(), 2);
    }

    /// A sink call that outlasts the sink time limit is a retryable
    /// failure: the pass ends and the event comes back later.
    #[tokio::test(start_paused = true)]
    async fn a_sink_call_past_the_time_limit_is_retried() {
        let (_, requested) = ticket_requested();
        let id = requested.event.id;
        let silent = Arc::new(Slow {
            delay: None,
            calls: AtomicUsize::new(0),
        });
        let config = DispatcherConfig {
            sink_timeout: Duration::from_secs(2),
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::new(outbox(vec![requested]), config).ticket_sink(silent);
        let report = tokio::time::timeout(Duration::from_secs(60), d.dispatch_once())
            .await
            .expect("the call is given up")
            .unwrap();
        assert_eq!(report.retried, 1, "{report:?}");
        assert_eq!(d.consumer.0.lock().unwrap().retried[0].0, id);
    }

    /// A call is cut when the pass's lease runs out, when that comes
    /// before the sink time limit (a lease shorter than twice the limit):
    /// no delivery outlives its claim. In virtual time: lease 4 s, limit
    /// 10 s, the call cut at 4 s.
    #[tokio::test(start_paused = true)]
    async fn a_sink_call_is_cut_when_the_lease_runs_out() {
        let (_, requested) = ticket_requested();
        let silent = Arc::new(Slow {
            delay: None,
            calls: AtomicUsize::new(0),
        });
        let config = DispatcherConfig {
            lease: Duration::from_secs(4),
            sink_timeout: Duration::from_secs(10),
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::new(outbox(vec![requested]), config).ticket_sink(silent);
        let started = tokio::time::Instant::now();
        let report = d.dispatch_once().await.unwrap();
        assert_eq!(report.retried, 1, "{report:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(4));
    }

    /// Each pass holds its own claim: a pass that claims an event again
    /// (another pass of the dispatcher retried it meanwhile) keeps it when
    /// the first pass ends, for the release at shutdown.
    #[test]
    fn each_pass_holds_its_own_claim() {
        let in_flight = InFlight::default();
        let id = EventId::generate();
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let first = Claims::hold(&in_flight, vec![id], Some(livechat_core::now()), until);
        let later = livechat_core::now() + chrono::TimeDelta::seconds(1);
        let second = Claims::hold(&in_flight, vec![id], Some(later), until);
        drop(first);
        let held: Vec<_> = lock(&in_flight)
            .passes
            .values()
            .map(|claim| (claim.lease, claim.ids.clone()))
            .collect();
        assert_eq!(held, vec![(Some(later), vec![id])]);
        drop(second);
        assert!(lock(&in_flight).passes.is_empty());
    }

    /// A sink that hangs on one session's event holds up neither the other
    /// sinks of that event (the in-app ticket) nor the other sessions'
    /// events of the pass, where they all waited behind it.
    #[tokio::test]
    async fn a_hanging_sink_holds_up_only_its_own_delivery() {
        let (first, mut a) = ticket_requested();
        let (second, mut b) = ticket_requested();
        a.event.session_id = Some(SessionId::generate());
        b.event.session_id = Some(SessionId::generate());
        let hanging = Arc::new(Hanging {
            first: Mutex::new(None),
            release: tokio::sync::Notify::new(),
        });
        let recorder = Arc::new(Recorder::default());
        let dispatcher = Dispatcher::new(outbox(vec![a, b]), DispatcherConfig::default())
            .ticket_sink(hanging.clone())
            .ticket_sink(recorder.clone());
        let pass = dispatcher.dispatch_once();
        tokio::pin!(pass);
        let both_recorded = async {
            while recorder.calls().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            _ = &mut pass => panic!("the pass ended while a delivery hangs"),
            () = both_recorded => {}
            () = tokio::time::sleep(Duration::from_secs(10)) => {
                panic!("held up behind the hanging sink: {:?}", recorder.calls());
            }
        }
        let calls = recorder.calls();
        assert!(
            calls.iter().any(|c| c.contains(&first.to_string())),
            "{calls:?}"
        );
        assert!(
            calls.iter().any(|c| c.contains(&second.to_string())),
            "{calls:?}"
        );
        hanging.release.notify_one();
        let report = pass.await.unwrap();
        assert_eq!(report.delivered, 2);
        assert_eq!(dispatcher.consumer.0.lock().unwrap().dispatched.len(), 2);
    }

    #[tokio::test]
    async fn a_retried_event_holds_its_sessions_later_events_from_the_failing_sink_only() {
        let (_, mut requested) = ticket_requested();
        let session = SessionId::generate();
        requested.event.session_id = Some(session);
        let mut behind = message_posted(SenderType::Agent, "behind", Some(TicketId::generate()));
        behind.event.session_id = Some(session);
        let (requested_id, behind_id) = (requested.event.id, behind.event.id);
        // The in-app tables take everything; the webhook is down.
        let tables = Arc::new(Recorder::default());
        let webhook = Recorder::failing(SinkError::Retryable);
        let d = dispatcher(
            outbox(vec![requested, behind]),
            [tables.clone(), webhook.clone()],
        );

        let report = d.dispatch_once().await.unwrap();
        assert_eq!((report.retried, report.held, report.delivered), (1, 1, 0));
        let s = d.consumer.0.lock().unwrap();
        let (retried, retry_at, owed) = s.retried[0].clone();
        assert_eq!((retried, owed), (requested_id, vec![webhook.name.clone()]));
        // The notification reached the tables, not the webhook, and waits
        // for the webhook until the ticket request is due again.
        assert_eq!(tables.calls().len(), 2, "{:?}", tables.calls());
        assert_eq!(webhook.calls().len(), 1, "{:?}", webhook.calls());
        assert!(webhook.calls()[0].starts_with("open "));
        assert_eq!(
            s.held,
            vec![(behind_id, retry_at, vec![webhook.name.clone()])]
        );
        assert!(s.dispatched.is_empty());
    }

    #[tokio::test]
    async fn a_retry_calls_only_the_sinks_still_owed_the_event() {
        let (_, mut requested) = ticket_requested();
        let tables = Arc::new(Recorder::default());
        let webhook = Arc::new(Recorder::default());
        requested.attempts = 2;
        requested.pending_for = Some(vec![webhook.name.clone()]);
        let id = requested.event.id;
        let d = dispatcher(outbox(vec![requested]), [tables.clone(), webhook.clone()]);

        let report = d.dispatch_once().await.unwrap();
        assert_eq!(report.delivered, 1);
        assert!(tables.calls().is_empty(), "{:?}", tables.calls());
        assert_eq!(webhook.calls().len(), 1);
        assert_eq!(d.consumer.0.lock().unwrap().dispatched, vec![id]);
    }

    #[tokio::test]
    async fn an_event_behind_a_waiting_one_is_held_from_the_sinks_it_waits_for() {
        let mut reply = message_posted(SenderType::Agent, "later", Some(TicketId::generate()));
        let tables = Arc::new(Recorder::default());
        let webhook = Arc::new(Recorder::default());
        let until = livechat_core::now() + TimeDelta::seconds(30);
        reply.behind = Some(livechat_core::Behind {
            waiting_for: vec![webhook.name.clone()],
            until,
        });
        let id = reply.event.id;
        let d = dispatcher(outbox(vec![reply]), [tables.clone(), webhook.clone()]);

        let report = d.dispatch_once().await.unwrap();
        assert_eq!((report.held, report.delivered), (1, 0));
        assert_eq!(tables.calls().len(), 1);
        assert!(webhook.calls().is_empty(), "{:?}", webhook.calls());
        let s = d.consumer.0.lock().unwrap();
        assert_eq!(s.held, vec![(id, until, vec![webhook.name.clone()])]);
        assert!(s.retried.is_empty() && s.dispatched.is_empty());
    }

    #[test]
    #[should_panic(expected = "two ticket sinks named")]
    fn two_sinks_of_one_name_are_refused() {
        let sink = Arc::new(Recorder::default());
        let _ = Dispatcher::new(outbox(Vec::new()), DispatcherConfig::default())
            .ticket_sink(sink.clone())
            .ticket_sink(sink);
    }

    #[tokio::test]
    async fn retryable_wins_and_backs_off_by_attempts() {
        let (_, mut requested) = ticket_requested();
        requested.attempts = 3;
        let id = requested.event.id;
        let ok = Arc::new(Recorder::default());
        let retryable = Recorder::failing(SinkError::Retryable);
        let d = dispatcher(
            outbox(vec![requested]),
            [
                ok.clone(),
                Recorder::failing(SinkError::Permanent),
                retryable.clone(),
            ],
        );
        let before = livechat_core::now();
        let report = d.dispatch_once().await.unwrap();
        assert_eq!(report.retried, 1);
        let s = d.consumer.0.lock().unwrap();
        assert!(s.dispatched.is_empty() && s.failed.is_empty());
        let (retried, at, ref owed) = s.retried[0];
        assert_eq!(retried, id);
        // Retried for the sink that asked for it only: the permanent one is
        // given up for, the one that took it has it.
        assert_eq!(owed, &vec![retryable.name.clone()]);
        // 1 s * 2^3 = 8 s from now.
        let delay = at - before;
        assert!(
            delay >= TimeDelta::seconds(8) && delay < TimeDelta::seconds(9),
            "{delay}"
        );
        assert_eq!(ok.calls().len(), 1);
    }

    #[test]
    fn the_outbox_interest_wants_exactly_what_the_sinks_act_on() {
        let (ticket_id, requested) = ticket_requested();
        let closed = event(EventKind::SessionClosed, json!({"ticket_id": ticket_id}));
        let closed_untracked = event(EventKind::SessionClosed, json!({"ticket_id": null}));
        let ticket_closed = event(
            EventKind::TicketClosed,
            json!({"ticket_id": ticket_id, "tenant_id": 1, "closed_by": 7}),
        );
        let reply = message_posted(SenderType::Agent, "hi", Some(ticket_id));
        let from_customer = message_posted(SenderType::Customer, "hi", Some(ticket_id));
        let customer_unticketed = message_posted(SenderType::Customer, "hi", None);
        let unticketed = message_posted(SenderType::Agent, "hi", None);
        let other = event(EventKind::SessionStarted, json!({}));
        let contact = json!({"name": "Ana", "email": "ana@example.com"});
        let contact_changed = event(
            EventKind::SessionUpdated,
            json!({"ticket_id": ticket_id, "contact": contact, "contact_updated": true}),
        );
        let contact_unticketed = event(
            EventKind::SessionUpdated,
            json!({"ticket_id": null, "contact": contact, "contact_updated": true}),
        );
        // Ticketed while it waited, or moved to a linked customer.
        let updated_otherwise = event(
            EventKind::SessionUpdated,
            json!({"ticket_id": ticket_id, "contact": contact}),
        );
        let garbage = event(EventKind::TicketRequested, json!({"ticket_id": 5}));
        let bad_message = event(EventKind::MessagePosted, json!("nope"));
        let both = dispatcher(outbox(Vec::new()), [Arc::new(Recorder::default())]);
        let tickets_only = Dispatcher::new(outbox(Vec::new()), DispatcherConfig::default())
            .ticket_sink(Arc::new(Recorder::default()));
        let none = Dispatcher::new(outbox(Vec::new()), DispatcherConfig::default());
        // (event, wanted with both kinds of sink, with only a ticket sink)
        let cases = [
            (&requested, true, true),
            (&closed, true, true),
            (&closed_untracked, false, false),
            (&ticket_closed, true, true),
            (&reply, true, false),
            (&from_customer, true, true),
            (&customer_unticketed, false, false),
            (&unticketed, false, false),
            (&other, false, false),
            (&contact_changed, true, true),
            (&contact_unticketed, false, false),
            (&updated_otherwise, false, false),
            // Undecodable: wanted, so that it is claimed and failed in view.
            (&garbage, true, true),
            (&bad_message, true, true),
        ];
        for (n, (pending, with_both, with_tickets)) in cases.into_iter().enumerate() {
            let e = &pending.event;
            assert_eq!(both.outbox_interest().wants(e), with_both, "case {n}");
            assert_eq!(
                both.outbox_interest().wants(e),
                !both.sinks().ignore(e),
                "case {n}: the interest is the settlement's decision"
            );
            assert_eq!(
                tickets_only.outbox_interest().wants(e),
                with_tickets,
                "case {n}"
            );
            assert!(!none.outbox_interest().wants(e), "case {n}: no sinks");
        }
    }

    #[tokio::test]
    async fn permanent_failure_and_bad_payload_are_failed() {
        let (_, requested) = ticket_requested();
        let garbage = event(EventKind::TicketRequested, json!({"ticket_id": 5}));
        let bad_message = event(EventKind::MessagePosted, json!("nope"));
        let ids = [requested.event.id, garbage.event.id, bad_message.event.id];
        let permanent = Recorder::failing(SinkError::Permanent);
        let d = dispatcher(
            outbox(vec![requested, garbage, bad_message]),
            [permanent.clone()],
        );
        let report = d.dispatch_once().await.unwrap();
        assert_eq!(report.failed, 3);
        let s = d.consumer.0.lock().unwrap();
        let failed: Vec<EventId> = s.failed.iter().map(|(id, _)| *id).collect();
        assert_eq!(failed, ids);
        assert!(s.failed[0].1.contains("boom"));
        assert!(s.failed[1].1.contains("undecodable ticket.requested"));
        // The sink never saw the undecodable events.
        assert_eq!(permanent.calls().len(), 1);
    }

    #[test]
    fn pauses_follow_how_full_the_pass_was() {
        let config = DispatcherConfig {
            batch_size: 10,
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::new(MemoryOutbox::default(), config);
        assert_eq!(d.pause_after(0), config.poll_interval);
        assert_eq!(d.pause_after(3), config.batch_window);
        assert_eq!(d.pause_after(10), Duration::ZERO);
    }

    /// While one pass waits for a receiver that hangs, `run` starts the
    /// next: an event written meanwhile, of another session, is delivered
    /// without waiting for the hanging one.
    #[tokio::test]
    async fn a_hanging_receiver_does_not_hold_up_later_passes() {
        let (held, mut first) = ticket_requested();
        first.event.session_id = Some(SessionId::generate());
        let hanging = Arc::new(Hanging {
            first: Mutex::new(None),
            release: tokio::sync::Notify::new(),
        });
        let recorder = Arc::new(Recorder::default());
        let outbox = outbox(vec![first]);
        let shared = outbox.0.clone();
        let d = Dispatcher::new(outbox, DispatcherConfig::default())
            .ticket_sink(hanging.clone())
            .ticket_sink(recorder.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(d.run(async {
            let _ = stopped.await;
        }));
        while hanging.first.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (later, mut second) = ticket_requested();
        second.event.session_id = Some(SessionId::generate());
        shared.lock().unwrap().pending.push(second);
        let delivered = async {
            while !recorder
                .calls()
                .iter()
                .any(|c| c.contains(&later.to_string()))
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), delivered)
            .await
            .expect("the later event waited for the hanging receiver");
        assert_eq!(*hanging.first.lock().unwrap(), Some(held), "still held");
        assert!(
            shared.lock().unwrap().dispatched.len() == 1,
            "only the later one is settled while the first hangs"
        );
        hanging.release.notify_one();
        while shared.lock().unwrap().dispatched.len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("run returns after shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn run_stops_on_shutdown() {
        let (_, requested) = ticket_requested();
        let sink = Arc::new(Recorder::default());
        let d = dispatcher(outbox(vec![requested]), [sink.clone()]);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(d.run(async {
            let _ = stopped.await;
        }));
        while sink.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("run returns after shutdown")
            .unwrap();
    }
}
