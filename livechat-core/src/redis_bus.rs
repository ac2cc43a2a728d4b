//! [`RedisBus`]: the multi-node [`EventBus`] over Redis pub/sub (feature
//! `redis`; issue #4 "Scale-out", DESIGN.md "Scale").
//!
//! Every node publishes the events of its own clients to one Redis channel
//! and hands what it receives from the other nodes to its local subscribers.
//! Redis is a fast path, not the record: a node that loses Redis keeps
//! serving its own clients, reports [`EventBus::is_degraded`], reconnects,
//! and then tells its connections to re-read from storage
//! ([`BusEvent::Resync`]), which they do by `seq`; if it could not send
//! some of its events meanwhile, it asks the other nodes to do the same.
//! Nothing committed is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisError, Value,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

use crate::bus::{BusEvent, Ephemeral, EventBus, InProcessBus};
use crate::events::{DomainEvent, EventKind, EventPayload};
use crate::ids::{EventId, SessionId, TenantId};

/// The Redis channel nodes share when the host configures none.
pub const DEFAULT_CHANNEL: &str = "livechat:events";

/// Events waiting to be published; beyond this, publishes are dropped
/// (and logged) so memory stays bounded while Redis is slow.
const OUTGOING_CAPACITY: usize = 65_536;
/// Bytes of events waiting to be published (their JSON); beyond this too,
/// publishes are dropped: 65,536 messages of a host's longest text could
/// otherwise hold gigabytes while Redis is slow but connected.
const OUTGOING_BYTES: usize = 64 * 1024 * 1024;
/// Most queued events sent in one round trip (one pipeline of `PUBLISH`es).
const PUBLISH_BATCH: usize = 512;
/// Events received from the link are taken in batches of at most this
/// many, and all of those waiting are taken after each publishing round
/// trip: taken one per turn of the bus's loop, whose other turns publish
/// (a round trip each), a node that always had something to publish took
/// in about one event per round trip, and fell ever further behind the
/// other nodes.
const RECEIVE_BATCH: usize = 1024;
/// Most events received left waiting on the link once the bus has taken
/// what it could: past it the node cannot keep up, and it drops the link
/// (every local connection is resynced from the database when it is
/// back) rather than hold an ever longer backlog in memory.
const MAX_RECEIVE_BACKLOG: usize = 65_536;
/// First delay before reconnecting; doubled after each failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Limit on establishing a connection (an unreachable host must not hang).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Limit on any command's reply (PUBLISH, SUBSCRIBE, PING).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle connection is checked with PING, so a silently dead
/// link (no FIN, e.g. a network partition) is noticed.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// A link that fails sooner than this after it was opened (e.g. Redis
/// refuses this node's `PUBLISH`) is reopened only after a backoff, so a
/// lasting refusal does not spin.
const SHORT_LINK: Duration = Duration::from_secs(1);
/// Least time between two resync requests of one node: every request
/// makes every connection of the other nodes re-read what it follows.
const RESYNC_REQUEST_EVERY: Duration = Duration::from_secs(1);

/// Least time between two warnings of skipped malformed messages (those in
/// between are counted, and logged at debug): a newer node's events of a
/// kind this node does not know would otherwise log one warning each.
pub const MALFORMED_WARN_EVERY: Duration = Duration::from_secs(60);

/// Messages of the channel skipped as malformed, for [`receive`]'s log.
#[derive(Debug, Default)]
struct Malformed {
    /// When the last warning was logged.
    warned_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Skipped since that warning.
    skipped: AtomicU64,
}

impl Malformed {
    /// Counts one more skipped message; `Some(n)` when a warning is due
    /// now, `n` the messages skipped since the last one (this one
    /// included).
    fn skip(&self, now: std::time::Instant) -> Option<u64> {
        let skipped = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned_at = self
            .warned_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if warned_at.is_some_and(|at| now.duration_since(at) < MALFORMED_WARN_EVERY) {
            return None;
        }
        *warned_at = Some(now);
        self.skipped.fetch_sub(skipped, Ordering::Relaxed);
        Some(skipped)
    }
}

/// What travels on the Redis channel: the publishing node and the event.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    node: Uuid,
    event: &'a BusEvent,
}

/// [`EnvelopeOut`] as received.
#[derive(Deserialize)]
struct EnvelopeIn {
    node: Uuid,
    event: EventIn,
}

/// A [`BusEvent`] as received: the fields of all its variants side by
/// side, read in one pass over the message, with a domain event's payload
/// kept as the JSON text it arrived as.
///
/// `BusEvent`'s own decoder is serde's internally tagged enum: it buffers
/// the whole event in a tree before it reads the `bus` tag, and a payload
/// can then only be read through a `serde_json::Value` and written back to
/// text (see [`crate::EventPayload`]). That was about a tenth of the
/// receiving node's CPU in the issue #5 cross-node profile. The wire format
/// is unchanged: this reads what [`EnvelopeOut`] writes.
#[derive(Deserialize)]
struct EventIn {
    bus: BusKind,
    id: Option<EventId>,
    tenant_id: Option<TenantId>,
    session_id: Option<SessionId>,
    kind: Option<EventKind>,
    payload: Option<Box<serde_json::value::RawValue>>,
    created_at: Option<DateTime<Utc>>,
    event: Option<Ephemeral>,
}

/// The `bus` tag of a [`BusEvent`].
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum BusKind {
    Domain,
    Ephemeral,
    Resync,
}

impl EventIn {
    /// The event, or the name of a field its variant needs and it lacks.
    fn into_event(self) -> Result<BusEvent, &'static str> {
        Ok(match self.bus {
            BusKind::Domain => BusEvent::Domain(Arc::new(DomainEvent {
                id: self.id.ok_or("id")?,
                tenant_id: self.tenant_id.ok_or("tenant_id")?,
                session_id: self.session_id,
                kind: self.kind.ok_or("kind")?,
                payload: EventPayload::from_raw(self.payload.ok_or("payload")?),
                created_at: self.created_at.ok_or("created_at")?,
            })),
            BusKind::Ephemeral => BusEvent::Ephemeral {
                tenant_id: self.tenant_id.ok_or("tenant_id")?,
                event: self.event.ok_or("event")?,
            },
            BusKind::Resync => BusEvent::Resync,
        })
    }
}

/// Reads one message of the channel: the publishing node and its event.
fn decode(payload: &[u8]) -> Result<(Uuid, BusEvent), String> {
    let envelope: EnvelopeIn = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let event = envelope
        .event
        .into_event()
        .map_err(|field| format!("missing field `{field}` in the event"))?;
    Ok((envelope.node, event))
}

/// An [`EventBus`] that connects nodes through Redis pub/sub (issue #4).
///
/// - [`EventBus::publish`] never blocks or waits: the event is delivered to
///   this node's subscribers at once (no Redis round trip, and even while
///   Redis is down), then queued for a background task that `PUBLISH`es
///   `{"node": "<this node's uuid>", "event": <BusEvent as JSON>}` on the
///   channel. `publish(BusEvent::Resync)` stays local (see resync
///   requests below). The task sends everything queued meanwhile (up to
///   512 events) as one pipeline of `PUBLISH`es, in one round trip: one
///   round trip per event bounded a node to a few thousand events a
///   second, below what one node stores (issue #5 cross-node scenario).
/// - The same task is `SUBSCRIBE`d to the channel and delivers every event
///   from other nodes to the local subscribers; messages carrying this
///   node's id (already delivered) are skipped, malformed ones (or an event
///   of a kind this version does not know, from a newer node during a
///   rolling upgrade) are skipped and logged without their content (which
///   holds customers' messages), at warn at most once a minute
///   ([`MALFORMED_WARN_EVERY`]) with the number skipped since. Received events are taken in batches, and all of those
///   waiting after each publishing round trip, so a node that always has
///   something to publish keeps up with the others; one that still falls
///   more than 65,536 received events behind drops its link and resyncs
///   (below), rather than hold the backlog in memory.
/// - When the connection drops or Redis is unreachable, the bus reports
///   [`EventBus::is_degraded`], keeps serving locally, drops the publishes
///   it cannot send (logged at debug), and reconnects with backoff (100 ms
///   doubling to 2 s). Once subscribed again it clears the flag and
///   delivers a local [`BusEvent::Resync`]: this node's connections re-read
///   what they follow from storage by `seq`.
/// - When it dropped any event (lost link, or a full publish queue:
///   65,536 events or 64 MiB of their JSON), the
///   other nodes missed it, though their own links may never have dropped:
///   once it can publish again and its publish queue is empty (after the
///   backlog, so an overflow does not turn into a stream of requests), and
///   at most once a second (`RESYNC_REQUEST_EVERY`), the bus publishes a
///   resync request (`{"node": …, "event": {"bus": "resync"}}`), and
///   every other node delivers it as a local [`BusEvent::Resync`]. Every
///   connection of the deployment then re-reads the sessions it follows,
///   one read per session: the price of an outage or an overflow.
/// - The background task ends when the last clone is dropped, or on
///   [`RedisBus::shutdown`].
///
/// The connection speaks RESP3 (Redis 6 or later, or a compatible server),
/// which lets one connection both publish and receive.
#[derive(Clone, Debug)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Uuid,
    channel: String,
    local: InProcessBus,
    outgoing: mpsc::Sender<String>,
    /// Bytes queued on `outgoing` ([`OUTGOING_BYTES`] at most).
    queued_bytes: Arc<AtomicUsize>,
    degraded: Arc<AtomicBool>,
    /// An event was not sent to the other nodes since the last resync
    /// request.
    dropped: Arc<AtomicBool>,
    /// Publishing round trips made ([`RedisBus::publish_round_trips`]).
    round_trips: Arc<AtomicU64>,
    /// Events queued and events the worker is done with
    /// ([`RedisBus::flush`]).
    progress: Arc<Progress>,
    stop: watch::Sender<bool>,
}

/// How far the background task is through the events queued for it: each
/// event is counted in `queued` before it is queued (and settled at once
/// if it could not be), then in `settled` once its `PUBLISH` returned or
/// it was given up (the link down), and `done` wakes whoever waits for
/// that, or for a resync request sent ([`RedisBus::flush`]).
#[derive(Debug, Default)]
struct Progress {
    queued: AtomicU64,
    settled: AtomicU64,
    done: tokio::sync::Notify,
}

impl Progress {
    fn settle(&self, events: usize) {
        self.settled
            .fetch_add(u64::try_from(events).unwrap_or(u64::MAX), Ordering::SeqCst);
        self.done.notify_waiters();
    }
}

impl Inner {
    /// Queues `payload` for the background task, within
    /// [`OUTGOING_CAPACITY`] events and [`OUTGOING_BYTES`] bytes. Past
    /// either the event is dropped, marked as such (`dropped`, before it
    /// counts as settled, so a flush does not take it as sent), and
    /// `Full(first)` says whether it is the first since the last resync
    /// request.
    fn queue(&self, payload: String) -> Result<(), Refused> {
        let len = payload.len();
        let full = || Refused::Full(!self.dropped.swap(true, Ordering::SeqCst));
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > OUTGOING_BYTES {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(full());
        }
        // Counted before it can be taken, so that a flush never sees
        // events settled past ones it counted but not yet queued.
        self.progress.queued.fetch_add(1, Ordering::SeqCst);
        self.outgoing.try_send(payload).map_err(|e| {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            let refused = match e {
                mpsc::error::TrySendError::Full(_) => full(),
                mpsc::error::TrySendError::Closed(_) => {
                    self.dropped.store(true, Ordering::SeqCst);
                    Refused::Closed
                }
            };
            self.progress.settle(1);
            refused
        })
    }
}

/// Why [`Inner::queue`] did not queue an event.
enum Refused {
    /// The queue is full; whether this is the first event dropped since
    /// the last resync request.
    Full(bool),
    /// The background task has stopped.
    Closed,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// The open link: a RESP3 connection subscribed to the channel, and the
/// receiver of what the server pushes on it.
struct Link {
    conn: MultiplexedConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
}

impl RedisBus {
    /// Connects to the Redis at `url` (`redis://[user:password@]host[:port][/db]`,
    /// or `rediss://` when the `redis` crate's TLS features are enabled),
    /// subscribes to `channel`, and starts the background task. Every node
    /// of a deployment names the same `channel` ([`DEFAULT_CHANNEL`] will
    /// do); deployments sharing one Redis server need one each, since
    /// pub/sub ignores the database number of the URL (`/1` and `/2` hear
    /// each other's events).
    /// Must be called within a Tokio runtime.
    ///
    /// Once this returns, events published on other nodes reach
    /// [`EventBus::subscribe`] receivers of this one.
    ///
    /// # Errors
    /// When `url` is invalid, or Redis cannot be reached, authenticated
    /// against, or subscribed to at start (later outages are handled by
    /// reconnecting, see [`RedisBus`]).
    pub async fn connect(url: &str, channel: impl Into<String>) -> Result<Self, RedisError> {
        Self::connect_with_local(url, channel, InProcessBus::new()).await
    }

    /// [`RedisBus::connect`] delivering to `local` (for a host that chooses
    /// the local buffer's capacity, see [`InProcessBus::with_capacity`]).
    ///
    /// # Errors
    /// As [`RedisBus::connect`].
    pub async fn connect_with_local(
        url: &str,
        channel: impl Into<String>,
        local: InProcessBus,
    ) -> Result<Self, RedisError> {
        let channel = channel.into();
        let info = url.into_connection_info()?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(settings))?;
        let link = open_link(&client, &channel).await?;

        let node = Uuid::now_v7();
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let degraded = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let round_trips = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(Progress::default());
        let (stop, stop_rx) = watch::channel(false);
        let worker = Worker {
            node,
            client,
            channel: channel.clone(),
            local: local.clone(),
            outgoing: outgoing_rx,
            queued_bytes: Arc::clone(&queued_bytes),
            degraded: Arc::clone(&degraded),
            dropped: Arc::clone(&dropped),
            round_trips: Arc::clone(&round_trips),
            progress: Arc::clone(&progress),
            malformed: Malformed::default(),
            requested_at: None,
            stop: stop_rx,
        };
        tokio::spawn(worker.run(link));
        tracing::info!(%node, channel = %channel, "redis event bus connected");
        Ok(Self {
            inner: Arc::new(Inner {
                node,
                channel,
                local,
                outgoing,
                queued_bytes,
                degraded,
                dropped,
                round_trips,
                progress,
                stop,
            }),
        })
    }

    /// This node's id, sent with every published event so the node can
    /// recognise (and skip) its own events coming back from Redis.
    #[must_use]
    pub fn node_id(&self) -> Uuid {
        self.inner.node
    }

    /// The Redis channel this bus publishes and listens on.
    #[must_use]
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// How many round trips to Redis this bus has made to publish events
    /// (resync requests included) since it connected. Each carries every
    /// event queued at the time, up to 512; against the number of events
    /// published, it shows how far publishing is behind (one round trip
    /// per event: it keeps up with nothing to spare).
    #[must_use]
    pub fn publish_round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// Waits, at most `timeout`, until every event this node published
    /// before the call has been sent to Redis, and the other nodes were
    /// asked to resync if any event of this node was given up since they
    /// last were (the link down, a full queue). Returns whether it came to
    /// that: `false` on the timeout (Redis unreachable: the other nodes
    /// missed events and will not hear of it from this node) or when the
    /// bus was stopped first.
    ///
    /// A host calls it at a graceful stop, after the last events it cares
    /// about (its WebSockets closed, its agents' offline announcements
    /// made: `Livechat::closed` of `livechat-poem`) and before returning:
    /// publishing is queued, and a queue dropped with the runtime loses
    /// announcements that are recorded as made, which no node repeats.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let progress = &self.inner.progress;
        let target = progress.queued.load(Ordering::SeqCst);
        let mut stop = self.inner.stop.subscribe();
        let sent = async {
            loop {
                let done = progress.done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if progress.settled.load(Ordering::SeqCst) >= target
                    && !self.inner.dropped.load(Ordering::SeqCst)
                {
                    return true;
                }
                tokio::select! {
                    () = &mut done => {}
                    () = stopped(&mut stop) => return false,
                }
            }
        };
        tokio::time::timeout(timeout, sent).await.unwrap_or(false)
    }

    /// Stops the background task now (for every clone) and closes the Redis
    /// connection. Afterwards the bus only delivers locally and reports
    /// degraded (so the store counts no customer as connected to an
    /// agent's reply, and the gateway makes up the replies of every
    /// customer connection that ends: call it after the node's WebSockets
    /// have closed, `Livechat::closed`, and [`Self::flush`]). Dropping the
    /// last clone does the same.
    pub fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        self.inner.degraded.store(true, Ordering::Relaxed);
    }
}

impl EventBus for RedisBus {
    fn publish(&self, event: BusEvent) {
        let event = Arc::new(event);
        if !matches!(*event, BusEvent::Resync) {
            let envelope = EnvelopeOut {
                node: self.inner.node,
                event: &event,
            };
            match serde_json::to_string(&envelope) {
                Ok(payload) => match self.inner.queue(payload) {
                    Ok(()) => {}
                    // Warned once until the resync request that follows
                    // (one per overflow, not one per event).
                    Err(Refused::Full(true)) => tracing::warn!(
                        "redis event bus: publish queue full, events not sent to other nodes until it drains; they will be asked to resync"
                    ),
                    Err(Refused::Full(false)) => tracing::debug!(
                        "redis event bus: publish queue full, event not sent to other nodes"
                    ),
                    Err(Refused::Closed) => {
                        tracing::debug!("redis event bus stopped, event delivered locally only");
                    }
                },
                Err(e) => tracing::warn!(error = %e, "redis event bus: cannot serialize event"),
            }
        }
        self.inner.local.deliver(event);
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>> {
        self.inner.local.subscribe()
    }

    fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }
}

/// Opens a RESP3 connection whose pushes arrive on a channel, and
/// subscribes it to `channel`.
async fn open_link(client: &Client, channel: &str) -> Result<Link, RedisError> {
    let (push_tx, pushes) = mpsc::unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_push_sender(push_tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    conn.subscribe(channel).await?;
    Ok(Link { conn, pushes })
}

/// The background task's state (everything but the handles' [`Inner`], so
/// dropping the last [`RedisBus`] stops it).
struct Worker {
    node: Uuid,
    client: Client,
    channel: String,
    local: InProcessBus,
    outgoing: mpsc::Receiver<String>,
    /// Bytes queued on `outgoing`, given back as events are taken off it.
    queued_bytes: Arc<AtomicUsize>,
    degraded: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
    round_trips: Arc<AtomicU64>,
    progress: Arc<Progress>,
    malformed: Malformed,
    /// When this node last asked the others to resync.
    requested_at: Option<tokio::time::Instant>,
    stop: watch::Receiver<bool>,
}

/// Why [`Worker::serve`] returned.
enum Ended {
    /// Shutdown or every handle dropped: the task ends.
    Stopped,
    /// The connection is gone: reconnect.
    Lost,
}

impl Worker {
    async fn run(mut self, first: Link) {
        let mut link = first;
        loop {
            let opened = tokio::time::Instant::now();
            if let Ended::Stopped = self.serve(link).await {
                break;
            }
            self.degraded.store(true, Ordering::Relaxed);
            tracing::warn!(channel = %self.channel, "redis event bus lost its connection; serving local clients only, reconnecting");
            let pause = if opened.elapsed() < SHORT_LINK {
                BACKOFF_MAX
            } else {
                Duration::ZERO
            };
            match self.reconnect(pause).await {
                Some(next) => link = next,
                None => break,
            }
            self.degraded.store(false, Ordering::Relaxed);
            tracing::info!(channel = %self.channel, "redis event bus reconnected; resyncing local connections");
            self.local.deliver(Arc::new(BusEvent::Resync));
        }
        self.degraded.store(true, Ordering::Relaxed);
        tracing::debug!(channel = %self.channel, "redis event bus stopped");
    }

    /// Publishes queued events and delivers received ones until the link
    /// fails or the bus stops; first, and whenever an event was dropped,
    /// asks the other nodes to resync.
    async fn serve(&mut self, mut link: Link) -> Ended {
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await; // The first tick is immediate.
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        let mut received = Vec::new();
        loop {
            let may_request = self.outgoing.is_empty()
                && self
                    .requested_at
                    .is_none_or(|at| at.elapsed() >= RESYNC_REQUEST_EVERY);
            if may_request && self.dropped.swap(false, Ordering::Relaxed) {
                let request = match serde_json::to_string(&EnvelopeOut {
                    node: self.node,
                    event: &BusEvent::Resync,
                }) {
                    Ok(request) => request,
                    Err(e) => {
                        tracing::warn!(error = %e, "redis event bus: cannot serialize a resync request");
                        continue;
                    }
                };
                if let Err(e) = self.send(&mut link, &[request]).await {
                    self.dropped.store(true, Ordering::Relaxed);
                    tracing::debug!(error = %e, "redis event bus: resync request failed");
                    return Ended::Lost;
                }
                self.requested_at = Some(tokio::time::Instant::now());
                self.progress.done.notify_waiters();
                tracing::info!(channel = %self.channel, "redis event bus: events were dropped; asked the other nodes to resync");
            }
            tokio::select! {
                () = stopped(&mut self.stop) => return Ended::Stopped,
                n = self.outgoing.recv_many(&mut batch, PUBLISH_BATCH) => {
                    if n == 0 {
                        return Ended::Stopped;
                    }
                    let taken = batch.iter().map(String::len).sum();
                    self.queued_bytes.fetch_sub(taken, Ordering::Relaxed);
                    let sent = self.send(&mut link, &batch).await;
                    if sent.is_err() {
                        // Before the batch counts as settled: a flush must
                        // not take it as sent.
                        self.dropped.store(true, Ordering::SeqCst);
                    }
                    self.progress.settle(batch.len());
                    batch.clear();
                    if let Err(e) = sent {
                        // Some of the batch may have gone out: the others
                        // are asked to resync either way.
                        tracing::debug!(error = %e, "redis event bus: publish failed, events delivered locally only");
                        return Ended::Lost;
                    }
                    // What arrived during the round trip, before the next.
                    if let Err(ended) = self.take_in(&mut link, &mut received) {
                        return ended;
                    }
                }
                n = link.pushes.recv_many(&mut received, RECEIVE_BATCH) => {
                    if n == 0 {
                        return Ended::Lost;
                    }
                    if let Err(ended) = self.deliver_received(&mut received) {
                        return ended;
                    }
                    if let Err(ended) = self.take_in(&mut link, &mut received) {
                        return ended;
                    }
                },
                _ = health.tick() => {
                    if let Err(e) = redis::cmd("PING").query_async::<Value>(&mut link.conn).await {
                        tracing::debug!(error = %e, "redis event bus: health check failed");
                        return Ended::Lost;
                    }
                }
            }
        }
    }

    /// Delivers `received` (emptied) to the local subscribers; `Err` when
    /// the link reported its disconnection.
    fn deliver_received(&self, received: &mut Vec<PushInfo>) -> Result<(), Ended> {
        for push in received.drain(..) {
            match push.kind {
                PushKind::Disconnection => return Err(Ended::Lost),
                PushKind::Message => {
                    receive(self.node, &self.local, &push.data, &self.malformed);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Delivers every event waiting on the link, in batches of
    /// [`RECEIVE_BATCH`], without waiting for more; drops the link when
    /// more than [`MAX_RECEIVE_BACKLOG`] are still waiting after taking as
    /// many (the node cannot keep up).
    fn take_in(&self, link: &mut Link, received: &mut Vec<PushInfo>) -> Result<(), Ended> {
        let mut taken = 0;
        while taken < MAX_RECEIVE_BACKLOG {
            while received.len() < RECEIVE_BATCH {
                match link.pushes.try_recv() {
                    Ok(push) => received.push(push),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Err(Ended::Lost),
                }
            }
            if received.is_empty() {
                return Ok(());
            }
            taken += received.len();
            self.deliver_received(received)?;
        }
        if link.pushes.len() > MAX_RECEIVE_BACKLOG {
            tracing::warn!(
                channel = %self.channel,
                waiting = link.pushes.len(),
                "redis event bus: this node cannot keep up with the other nodes' events; reconnecting to resync"
            );
            return Err(Ended::Lost);
        }
        Ok(())
    }

    /// `PUBLISH`es `payloads` on the channel, in order, as one pipeline
    /// (one round trip).
    async fn send(&self, link: &mut Link, payloads: &[String]) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        for payload in payloads {
            pipe.cmd("PUBLISH").arg(&self.channel).arg(payload).ignore();
        }
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        pipe.query_async::<()>(&mut link.conn).await
    }

    /// After `first` (zero, or a backoff when the last link failed at
    /// once), reconnects and resubscribes with backoff, dropping the
    /// publishes that arrive meanwhile; `None` when the bus stops first.
    async fn reconnect(&mut self, first: Duration) -> Option<Link> {
        if !first.is_zero() && !self.pause(first).await {
            return None;
        }
        let mut delay = BACKOFF_MIN;
        loop {
            tokio::select! {
                () = stopped(&mut self.stop) => return None,
                link = open_link(&self.client, &self.channel) => match link {
                    Ok(link) => return Some(link),
                    Err(e) => tracing::debug!(error = %e, retry_in = ?delay, "redis event bus: reconnect failed"),
                },
            }
            if !self.pause(delay).await {
                return None;
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// Waits `delay`, dropping the publishes that arrive meanwhile;
    /// `false` when the bus stops first.
    async fn pause(&mut self, delay: Duration) -> bool {
        let pause = tokio::time::sleep(delay);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = stopped(&mut self.stop) => return false,
                () = &mut pause => return true,
                payload = self.outgoing.recv() => match payload {
                    None => return false,
                    Some(payload) => {
                        self.queued_bytes.fetch_sub(payload.len(), Ordering::Relaxed);
                        self.dropped.store(true, Ordering::Relaxed);
                        self.progress.settle(1);
                        tracing::debug!("redis event bus down: event delivered locally only");
                    }
                },
            }
        }
    }
}

/// Delivers one pushed message (`[channel, payload]`) unless it is
/// malformed or this node's own.
fn receive(node: Uuid, local: &InProcessBus, data: &[Value], malformed: &Malformed) {
    let skipped = |error: &str, bytes: usize| match malformed.skip(std::time::Instant::now()) {
        Some(skipped) => tracing::warn!(
            error,
            bytes,
            skipped,
            "redis event bus: malformed message (or an event kind this version does not know), skipped"
        ),
        None => tracing::debug!(error, bytes, "redis event bus: malformed message, skipped"),
    };
    let Some(Value::BulkString(payload)) = data.get(1) else {
        skipped("not a [channel, payload] message", 0);
        return;
    };
    match decode(payload) {
        Ok((from, _)) if from == node => {}
        Ok((from, BusEvent::Resync)) => {
            tracing::info!(%from, "redis event bus: another node dropped events; resyncing local connections");
            local.deliver(Arc::new(BusEvent::Resync));
        }
        Ok((_, event)) => local.deliver(Arc::new(event)),
        Err(e) => skipped(&e, payload.len()),
    }
}

/// Resolves once the bus is asked to stop (or every handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    //! Against a real `redis-server` (Debian package `redis-server`), started
    //! per test on a free port.

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::*;
    use crate::{PresenceStatus, UserId};

    /// A throwaway redis-server (minimal twin of the tests crate's harness).
    struct Server {
        port: u16,
        dir: PathBuf,
        child: Option<Child>,
    }

    impl Server {
        fn start() -> Self {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let dir = std::env::temp_dir().join(format!(
                "livechat-redis-unit-{}-{}",
                std::process::id(),
                Uuid::now_v7().simple()
            ));
            std::fs::create_dir_all(&dir).expect("redis temp dir");
            let mut server = Self {
                port,
                dir,
                child: None,
            };
            server.spawn();
            server
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        fn spawn(&mut self) {
            let child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run redis-server ({e}): install the Debian package `redis-server`"
                    )
                });
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.answers_ping() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn answers_ping(&self) -> bool {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
                return false;
            };
            let mut buf = [0_u8; 7];
            s.set_read_timeout(Some(Duration::from_secs(1))).is_ok()
                && s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
        }

        fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn restart(&mut self) {
            self.stop();
            self.spawn();
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn channel() -> String {
        format!("livechat:test:{}", Uuid::now_v7().simple())
    }

    /// A node on `server`'s `channel`, as a host connects one.
    async fn connected(server: &Server, channel: &str) -> RedisBus {
        RedisBus::connect(&server.url(), channel)
            .await
            .expect("node")
    }

    /// A node on `server`'s `channel` whose local subscribers buffer
    /// `capacity` events.
    async fn node(server: &Server, channel: &str, capacity: usize) -> RedisBus {
        RedisBus::connect_with_local(
            &server.url(),
            channel,
            InProcessBus::with_capacity(capacity),
        )
        .await
        .expect("node")
    }

    /// A `message.posted` event of tenant 2. Its payload's keys are out of
    /// alphabetical order: read through a `Value`, the text would come
    /// back reordered.
    fn message_posted(session: Option<SessionId>) -> BusEvent {
        BusEvent::Domain(Arc::new(DomainEvent {
            id: EventId::generate(),
            tenant_id: TenantId::new(2).expect("tenant"),
            session_id: session,
            kind: EventKind::MessagePosted,
            payload: EventPayload::from_json(r#"{"seq":7,"message":"Halo \"du\""}"#.into())
                .expect("json"),
            created_at: crate::now(),
        }))
    }

    fn presence(agent: i64) -> BusEvent {
        BusEvent::Ephemeral {
            tenant_id: TenantId::new(1).expect("tenant"),
            event: Ephemeral::Presence {
                agent_id: UserId::new(agent).expect("user"),
                status: PresenceStatus::Online,
            },
        }
    }

    async fn next(rx: &mut broadcast::Receiver<Arc<BusEvent>>) -> BusEvent {
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no event within 5 s")
            .expect("receiver open and not lagging");
        (*event).clone()
    }

    /// The next event that is not a resync.
    async fn past_resyncs(rx: &mut broadcast::Receiver<Arc<BusEvent>>) -> BusEvent {
        loop {
            let event = next(rx).await;
            if event != BusEvent::Resync {
                return event;
            }
        }
    }

    async fn quiet(rx: &mut broadcast::Receiver<Arc<BusEvent>>) {
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await {
            panic!("unexpected event: {got:?}");
        }
    }

    /// As [`quiet`], but a resync (another node's request, which may
    /// arrive after the events that follow it on this node) is let by.
    async fn quiet_past_resyncs(rx: &mut broadcast::Receiver<Arc<BusEvent>>) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
        while let Ok(got) = tokio::time::timeout_at(deadline, rx.recv()).await {
            assert!(
                matches!(&got, Ok(event) if **event == BusEvent::Resync),
                "unexpected event: {got:?}"
            );
        }
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Malformed messages are warned about at most once a minute, each
    /// warning with the number skipped since the last.
    #[test]
    fn malformed_messages_are_warned_about_once_a_minute() {
        let malformed = Malformed::default();
        let start = std::time::Instant::now();
        assert_eq!(malformed.skip(start), Some(1));
        for s in 1..=3 {
            assert_eq!(malformed.skip(start + Duration::from_secs(s)), None);
        }
        assert_eq!(
            malformed.skip(start + MALFORMED_WARN_EVERY + Duration::from_secs(1)),
            Some(4)
        );
        assert_eq!(malformed.skip(start + MALFORMED_WARN_EVERY * 2), None);
    }

    /// A graceful stop flushes what the node queued: every event published
    /// before `flush` reaches the other nodes although the bus is shut
    /// down right after (without it, the queue went with the task).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_sends_every_queued_event_before_a_stop() {
        const EVENTS: i64 = 5_000;
        let mut server = Server::start();
        let channel = channel();
        let a = connected(&server, &channel).await;
        let b = node(&server, &channel, 2 * 5_000).await;
        let mut rb = b.subscribe();
        for agent in 1..=EVENTS {
            a.publish(presence(agent));
        }
        assert!(a.flush(Duration::from_secs(10)).await, "flushed");
        a.shutdown();
        for agent in 1..=EVENTS {
            assert_eq!(past_resyncs(&mut rb).await, presence(agent));
        }
        // With Redis gone, what is published is given up: the flush says
        // it was not sent.
        server.stop();
        b.publish(presence(1));
        assert!(!b.flush(Duration::from_secs(2)).await, "not sent");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fan_out_between_nodes_exactly_once() {
        let server = Server::start();
        let channel = channel();
        let a = connected(&server, &channel).await;
        let b = connected(&server, &channel).await;
        assert_ne!(a.node_id(), b.node_id());
        assert_eq!(a.channel(), channel);
        assert!(!a.is_degraded() && !b.is_degraded());
        let (mut ra, mut rb) = (a.subscribe(), b.subscribe());

        a.publish(presence(1));
        assert_eq!(next(&mut ra).await, presence(1));
        assert_eq!(next(&mut rb).await, presence(1));

        let domain = message_posted(Some(SessionId::generate()));
        b.publish(domain.clone());
        assert_eq!(next(&mut rb).await, domain);
        assert_eq!(next(&mut ra).await, domain);

        // Resync is local only.
        a.publish(BusEvent::Resync);
        assert_eq!(next(&mut ra).await, BusEvent::Resync);

        // Nothing twice, nothing echoed back.
        quiet(&mut ra).await;
        quiet(&mut rb).await;
    }

    /// Issue #5 cross-node scenario: a node storing faster than one Redis
    /// round trip per event fell seconds behind. Queued events now go out
    /// together, in order. On one thread, the bus's task runs only once all
    /// 2,000 are queued.
    #[tokio::test]
    async fn queued_events_are_published_together_in_order() {
        let server = Server::start();
        let channel = channel();
        let a = connected(&server, &channel).await;
        let b = node(&server, &channel, 4096).await;
        let mut rb = b.subscribe();
        let events = 2_000;
        for agent in 1..=events {
            a.publish(presence(agent));
        }
        for agent in 1..=events {
            assert_eq!(next(&mut rb).await, presence(agent));
        }
        let batches = (events as u64).div_ceil(PUBLISH_BATCH as u64);
        assert_eq!(a.publish_round_trips(), batches);
        assert!(
            batches * 100 <= events as u64,
            "far fewer than one per event"
        );
        quiet(&mut rb).await;
    }

    /// A node that always has something to publish still takes in the
    /// other nodes' events at once: its loop took one of them per turn
    /// (its own events, echoed back by Redis, among them), and each other
    /// turn was a publishing round trip, so it fell behind by the second.
    /// Counted in round trips, not time: once Redis has taken A's 2,000
    /// events, B, still publishing, delivers all of them before its third
    /// round trip after that starts (one per turn, with tens of thousands
    /// of its own echoes ahead of them, it delivered none).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_busy_publishing_takes_in_the_others_events() {
        let server = Server::start();
        let channel = channel();
        let a = connected(&server, &channel).await;
        let b = node(&server, &channel, 32_768).await;
        // A probe: every event reaches it, B's too.
        let c = node(&server, &channel, 131_072).await;
        let mut rc = c.subscribe();
        let wait = |what: &'static str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done() {
                assert!(Instant::now() < deadline, "timed out waiting until {what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // B's own, delivered locally before this receiver subscribed.
        for agent in 100_001..=160_000 {
            b.publish(presence(agent));
        }
        let mut rb = b.subscribe();
        let events = 2_000;
        for agent in 1..=events {
            a.publish(presence(agent));
        }
        // Redis has taken all of A's events once another node has
        // received the one A published after them.
        a.publish(presence(events + 1));
        let marker = events + 1;
        let seen = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match rc.recv().await {
                    Ok(event) => {
                        if let BusEvent::Ephemeral {
                            event: Ephemeral::Presence { agent_id, .. },
                            ..
                        } = &*event
                            && agent_id.get() == marker
                        {
                            return;
                        }
                    }
                    Err(e) => panic!("the probe fell behind: {e}"),
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "A's events reach the other nodes");
        // B has more to publish, whether or not it was done: its next
        // round trips read A's events (Redis wrote them to B's link
        // before their replies).
        for agent in 200_001..=210_000 {
            b.publish(presence(agent));
        }
        let from = b.publish_round_trips();
        let b = tokio::task::spawn_blocking(move || {
            wait("B made three more round trips", &|| {
                b.publish_round_trips() >= from + 3
            });
            b
        })
        .await
        .unwrap();
        let mut taken = 0;
        loop {
            match rb.try_recv() {
                Ok(event) => {
                    if let BusEvent::Ephemeral {
                        event: Ephemeral::Presence { agent_id, .. },
                        ..
                    } = &*event
                        && agent_id.get() <= events
                    {
                        taken += 1;
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(e) => panic!("the receiver fell behind: {e}"),
            }
        }
        assert_eq!(taken, events, "all of A's, while B publishes");
        drop((a, b, c));
    }

    #[test]
    fn events_are_read_as_published_in_one_pass() {
        let node = Uuid::now_v7();
        for event in [
            message_posted(Some(SessionId::generate())),
            message_posted(None),
            presence(3),
            BusEvent::Resync,
        ] {
            let text = serde_json::to_vec(&EnvelopeOut {
                node,
                event: &event,
            })
            .expect("json");
            let (from, read) = decode(&text).expect("decodes");
            assert_eq!(from, node);
            // Equal payloads are equal texts: this one was not re-written.
            assert_eq!(read, event, "{}", String::from_utf8_lossy(&text));
        }
        let missing = format!(
            r#"{{"node":"{node}","event":{{"bus":"domain","id":"{}","tenant_id":2,"kind":"message.posted","created_at":"2026-12-03T00:00:00Z"}}}}"#,
            EventId::generate()
        );
        assert_eq!(
            decode(missing.as_bytes()).expect_err("no payload"),
            "missing field `payload` in the event"
        );
        let unknown = format!(r#"{{"node":"{node}","event":{{"bus":"gossip"}}}}"#);
        assert!(decode(unknown.as_bytes()).is_err());
        let ephemeral =
            format!(r#"{{"node":"{node}","event":{{"bus":"ephemeral","tenant_id":1}}}}"#);
        assert_eq!(
            decode(ephemeral.as_bytes()).expect_err("no event"),
            "missing field `event` in the event"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_and_foreign_messages() {
        let server = Server::start();
        let channel = channel();
        let bus = connected(&server, &channel).await;
        let mut rx = bus.subscribe();
        let raw = Client::open(server.url()).expect("client");
        let mut raw = raw
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        let foreign = serde_json::to_string(&EnvelopeOut {
            node: Uuid::now_v7(),
            event: &presence(3),
        })
        .expect("json");
        let own = serde_json::to_string(&EnvelopeOut {
            node: bus.node_id(),
            event: &presence(4),
        })
        .expect("json");
        let resync = serde_json::to_string(&EnvelopeOut {
            node: Uuid::now_v7(),
            event: &BusEvent::Resync,
        })
        .expect("json");
        for payload in ["not json", "{\"node\": 1}", &own, &resync, &foreign] {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(payload)
                .query_async(&mut raw)
                .await
                .expect("publish");
        }
        // Another node's resync request is delivered as a local resync.
        assert_eq!(next(&mut rx).await, BusEvent::Resync);
        assert_eq!(next(&mut rx).await, presence(3));
        quiet(&mut rx).await;
        assert!(!bus.is_degraded());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_degrades_serves_locally_and_resyncs() {
        let mut server = Server::start();
        let channel = channel();
        let a = connected(&server, &channel).await;
        let b = connected(&server, &channel).await;
        let (mut ra, mut rb) = (a.subscribe(), b.subscribe());

        server.stop();
        wait_until("both nodes are degraded", || {
            a.is_degraded() && b.is_degraded()
        })
        .await;
        a.publish(presence(5));
        assert_eq!(
            next(&mut ra).await,
            presence(5),
            "local delivery while down"
        );
        quiet(&mut rb).await;

        server.restart();
        wait_until("both nodes recovered", || {
            !a.is_degraded() && !b.is_degraded()
        })
        .await;
        assert_eq!(next(&mut rb).await, BusEvent::Resync);
        assert_eq!(next(&mut ra).await, BusEvent::Resync);

        a.publish(presence(6));
        // Besides its own resync, each node may get the other's resync
        // request (`a` dropped `presence(5)`; `b`'s link dropped too),
        // unless it subscribed again after it: at any point from here.
        assert_eq!(past_resyncs(&mut rb).await, presence(6));
        assert_eq!(past_resyncs(&mut ra).await, presence(6));
        b.publish(presence(7));
        assert_eq!(past_resyncs(&mut ra).await, presence(7));
        assert_eq!(past_resyncs(&mut rb).await, presence(7));
        // `a`'s request can follow `presence(6)` on its link (queued
        // first, it went first) and so reach `b` after `b`'s own
        // `presence(7)`.
        quiet_past_resyncs(&mut ra).await;
        quiet_past_resyncs(&mut rb).await;
    }

    /// Only `a`'s publishes fail (its user may not `PUBLISH` for a while);
    /// `b`'s link never drops, so only `a`'s resync request tells `b`'s
    /// connections that they missed events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_dropped_events_asks_the_others_to_resync() {
        let server = Server::start();
        let channel = channel();
        let admin = Client::open(server.url()).expect("client");
        let admin = admin
            .get_multiplexed_async_connection()
            .await
            .expect("admin connection");
        let acl = |rule: &'static str| {
            let mut admin = admin.clone();
            async move {
                let _: Value = redis::cmd("ACL")
                    .arg("SETUSER")
                    .arg("node-a")
                    .arg(rule)
                    .query_async(&mut admin)
                    .await
                    .expect("ACL SETUSER");
            }
        };
        for rule in ["on", ">secret", "~*", "&*", "+@all"] {
            acl(rule).await;
        }
        let url_a = format!("redis://node-a:secret@127.0.0.1:{}/", server.port);
        let a = RedisBus::connect(&url_a, channel.clone()).await.expect("a");
        let b = connected(&server, &channel).await;
        let (mut ra, mut rb) = (a.subscribe(), b.subscribe());

        acl("-publish").await;
        a.publish(presence(5));
        assert_eq!(next(&mut ra).await, presence(5), "local delivery");
        wait_until("a noticed", || a.is_degraded()).await;
        quiet(&mut rb).await;

        acl("+publish").await;
        assert_eq!(next(&mut rb).await, BusEvent::Resync, "a's request");
        assert!(!b.is_degraded(), "b's own link never dropped");
        wait_until("a recovered", || !a.is_degraded()).await;
        a.publish(presence(6));
        assert_eq!(next(&mut rb).await, presence(6));
        quiet(&mut rb).await;
    }

    /// A full publish queue drops events: `a` asks the other nodes to
    /// resync once, after its backlog, not once per dropped event. On one
    /// thread, the bus's task runs only after every publish: the queue
    /// keeps its first `OUTGOING_CAPACITY` events and drops the rest.
    #[tokio::test]
    async fn an_overflow_asks_for_one_resync() {
        let server = Server::start();
        let channel = channel();
        let a = node(&server, &channel, 1).await;
        let b = node(&server, &channel, 2 * OUTGOING_CAPACITY).await;
        let mut rb = b.subscribe();
        for n in 0..OUTGOING_CAPACITY + 20_000 {
            a.publish(presence(i64::try_from(n % 1000).expect("small") + 1));
        }
        let (mut events, mut resyncs) = (0, 0);
        while let Ok(got) = tokio::time::timeout(Duration::from_secs(2), rb.recv()).await {
            match got.as_deref() {
                Ok(BusEvent::Resync) => resyncs += 1,
                Ok(_) => events += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(events, OUTGOING_CAPACITY, "the queue overflowed");
        assert_eq!(resyncs, 1, "one request after {events} events");
    }

    /// The publish queue is bounded by bytes as well as by events: large
    /// events (a host's longest messages) queued while the bus's task
    /// cannot send are dropped past `OUTGOING_BYTES`, and `a` asks the
    /// other nodes to resync once. On one thread the task runs only after
    /// every publish.
    #[tokio::test]
    async fn large_events_overflow_the_queue_by_bytes() {
        let server = Server::start();
        let channel = channel();
        let a = node(&server, &channel, 1).await;
        let b = node(&server, &channel, 1024).await;
        let mut rb = b.subscribe();
        let text = "x".repeat(1024 * 1024);
        let large = BusEvent::Domain(Arc::new(DomainEvent {
            id: EventId::generate(),
            tenant_id: TenantId::new(2).expect("tenant"),
            session_id: None,
            kind: EventKind::MessagePosted,
            payload: EventPayload::new(&serde_json::json!({"seq": 1, "message": text}))
                .expect("json"),
            created_at: crate::now(),
        }));
        let size = serde_json::to_string(&EnvelopeOut {
            node: a.node_id(),
            event: &large,
        })
        .expect("json")
        .len();
        let fit = OUTGOING_BYTES / size;
        assert!(fit < OUTGOING_CAPACITY / 2, "bounded by bytes, not count");
        for _ in 0..fit + 10 {
            a.publish(large.clone());
        }
        let (mut events, mut resyncs) = (0, 0);
        while let Ok(got) = tokio::time::timeout(Duration::from_secs(3), rb.recv()).await {
            match got.as_deref() {
                Ok(BusEvent::Resync) => resyncs += 1,
                Ok(_) => events += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(events, fit, "the queue held {fit} events of {size} bytes");
        assert_eq!(resyncs, 1);
        assert_eq!(
            a.inner.queued_bytes.load(Ordering::Relaxed),
            0,
            "all given back"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_fails_when_unreachable_and_tasks_end_on_drop() {
        let mut server = Server::start();
        let url = server.url();
        let bus = RedisBus::connect(&url, DEFAULT_CHANNEL).await.expect("bus");
        let mut rx = bus.subscribe();
        let clone = bus.clone();
        drop(bus);
        clone.publish(presence(8));
        assert_eq!(next(&mut rx).await, presence(8));
        drop(clone);
        // The background task held the last sender: once it ends, receivers close.
        let closed = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(closed, Ok(Err(broadcast::error::RecvError::Closed))),
            "{closed:?}"
        );

        let bus = RedisBus::connect(&url, DEFAULT_CHANNEL).await.expect("bus");
        bus.shutdown();
        assert!(bus.is_degraded());
        bus.publish(presence(9)); // Local only, no panic.

        server.stop();
        assert!(RedisBus::connect(&url, DEFAULT_CHANNEL).await.is_err());
        assert!(
            RedisBus::connect("not a url", DEFAULT_CHANNEL)
                .await
                .is_err()
        );
    }
}
