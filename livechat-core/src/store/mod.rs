//! The SeaORM store: every repository trait over one `DatabaseConnection`,
//! on SQLite (feature `sqlite`) or PostgreSQL (feature `postgres`).
//!
//! - [`connect`] opens a pool with the settings the rules need (SQLite: WAL,
//!   busy timeout, foreign keys, `synchronous=FULL`).
//! - [`SeaOrmStore::new`] wraps a connection the host already has; run
//!   [`Migrator`] on it first.
//!
//! Concurrency: every write runs in one transaction which, on SQLite, is
//! started `BEGIN IMMEDIATE` so that it takes the write lock up front and
//! waits (busy timeout) instead of failing on a lock upgrade. Message
//! appends are committed in groups: a batch locks its sessions' rows
//! (PostgreSQL: `SELECT … FOR UPDATE` in id order; SQLite: the write lock)
//! and advances each session's `last_seq` with one `UPDATE … CASE`, so
//! concurrent senders get gap-free, unique `seq` values.

mod connections;
mod customers;
mod entity;
mod messages;
mod migration;
mod outbox;
mod presence_repo;
mod routing;
mod sessions;
#[cfg(all(test, feature = "postgres"))]
mod test_postgres;
#[cfg(all(test, feature = "sqlite"))]
mod test_sqlite;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{
    ActiveValue::Set, ConnectOptions, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbErr, EntityTrait, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use serde::Serialize;

pub use migration::Migrator;

use crate::bus::{BusEvent, EventBus};
use crate::error::ChatError;
use crate::events::{DomainEvent, EventKind, EventPayload, MessagePosted};
use crate::ids::{CustomerId, EventId, MessageId, SessionId, TenantId, TicketId};
use crate::model::{
    AgentPresence, ChatMessage, ChatSession, Contact, Customer, PresenceStatus, Priority,
    SenderType, SessionOrigin, SessionStatus, now,
};
use crate::outbox::OutboxInterest;
use entity::{customer, message, outbox as outbox_entity, presence, session};

/// How long a PostgreSQL write transaction waits for a row lock held
/// elsewhere before failing with `55P03` (answered as `Unavailable`, 503):
/// the statement [`SeaOrmStore::begin_write`] runs after `BEGIN`.
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

/// The rows after a cursor row in a newest-first list ordered by
/// `created` then `id`, both descending: those created before `at`, and
/// those created at `at` with an id below `id` (the cursor row's
/// `created_at` and id). For the `before` cursors of the agents' and
/// customers' lists; a store of another crate (the ticket bridge's) uses
/// it for its own.
pub fn older_than<C: sea_orm::ColumnTrait>(
    created: C,
    id: C,
    at: chrono::DateTime<chrono::Utc>,
    cursor: uuid::Uuid,
) -> sea_orm::Condition {
    sea_orm::Condition::any().add(created.lt(at)).add(
        sea_orm::Condition::all()
            .add(created.eq(at))
            .add(id.lt(cursor)),
    )
}

/// How long an SQLite writer waits for the write lock before failing.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a pooled connection must have been idle before the pool
/// checks it with a ping when handing it out again.
///
/// Issue #5: sqlx pings a connection on every checkout by default, one more
/// round trip to PostgreSQL (or hand-off to SQLite's worker thread) for
/// each transaction and each read. sqlx also pings every connection when
/// it is given back, and closes it if that fails, so a connection that
/// broke while in use is not handed out again; the checkout ping only
/// matters for a connection that sat idle while the server, a proxy or a
/// firewall dropped it. One second: a database restart or failover takes
/// longer than that, so after one every connection the pool kept is
/// pinged before use and the dead ones are replaced without failing a
/// request; under load a connection is back in use within milliseconds
/// and is not pinged. (With 30 s, each connection the restart dropped
/// failed one request with 503.)
pub const POOL_PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// How long a request waits for a connection of a pool opened by
/// [`connect`] before it fails with [`DbErr::ConnectionAcquire`] (503
/// `unavailable` on the routes, an `unavailable` frame on the
/// WebSocket). While the database is down, sqlx keeps trying to open a
/// connection until then, so this is how long a request hangs in an
/// outage: five seconds rides out a quick restart (the request then
/// succeeds) and answers within a client's patience otherwise. (It was
/// 30 s: every request of an outage hung that long.) A busy pool hands
/// its connections on within milliseconds, far below it.
pub const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the checkpointer of a pool opened by [`connect`] copies the
/// SQLite WAL back into the database file (a passive checkpoint: it never
/// blocks a writer).
///
/// Short, so that each checkpoint has little to write (issue #5): a
/// checkpoint ends by syncing the database file, and commits that sync the
/// WAL meanwhile (every commit with `synchronous=FULL`; with `NORMAL`, the
/// first commit after the WAL starts over) wait behind that write-back on
/// the disk. At 3,000–4,000 messages a second, a checkpoint every second
/// copied 5,000–9,000 pages and such commits took 30–40 ms; every 100 ms,
/// 10–12 ms at most. An idle checkpoint costs a fraction of a millisecond.
pub const SQLITE_CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// How long the SQLite checkpointer waits after a failure (it could not
/// connect, or a checkpoint failed) before it tries again, so that a
/// lasting failure is logged once a second, not ten times.
pub const SQLITE_CHECKPOINTER_RETRY: Duration = Duration::from_secs(1);

/// WAL size, in 4 KiB pages (40 MiB), past which an SQLite commit of a pool
/// opened by [`connect`] checkpoints by itself (`wal_autocheckpoint`). The
/// checkpointer keeps what is left to copy small, but under writes without
/// pause only a checkpoint by the writer lets the WAL start over, so the
/// file grows to this size before it does.
pub const SQLITE_WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// SQLite durability of a commit (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SqliteDurability {
    /// `FULL`: a commit is on disk before it returns (the default).
    #[default]
    Full,
    /// `NORMAL`: in WAL mode, a power loss may drop the last commits (never
    /// corrupts); faster.
    Normal,
}

/// Opens a connection pool for `url` (`sqlite://path?mode=rwc`,
/// `postgres://user:pass@host/db`) configured for the chat rules.
///
/// Both: a request waits at most [`POOL_ACQUIRE_TIMEOUT`] for a
/// connection (an outage answers 503 within it), and a connection idle
/// for [`POOL_PING_AFTER_IDLE`] is pinged before use. PostgreSQL: 16
/// connections.
///
/// SQLite: the file is created if missing; WAL journal, busy timeout
/// [`SQLITE_BUSY_TIMEOUT`], `synchronous=FULL` (a stored message survives
/// power loss), foreign keys on. Decisions from the issue #5 profiles:
///
/// - **One pooled connection.** SQLite has one writer at a time; several
///   connections only add lock waits in SQLite's busy handler (which sleeps
///   in steps of up to 100 ms: tail latency) and invalidate one another's
///   page cache after every write (pages re-read with `pread`). One
///   connection queues statements in process, in order, with a warm cache.
///   Reads wait behind a write transaction; the group commit keeps those
///   short. Only over a pool of one connection are concurrent appends
///   committed in runs whose WAL syncs overlap the next batch (the
///   `messages::pipeline` module): no other connection of the pool could
///   read a commit before its sync.
/// - **Checkpoints off the commit path.** A checkpointer task on its own
///   connection runs `PRAGMA wal_checkpoint(PASSIVE)` every
///   [`SQLITE_CHECKPOINT_EVERY`] beside the writer, until the pool is
///   closed or dropped (it needs a Tokio runtime; it reconnects after a
///   failure). Commits checkpoint themselves only past
///   [`SQLITE_WAL_AUTOCHECKPOINT_PAGES`] (SQLite's default is 1,000): a
///   checkpoint inside a commit made every append queued behind it tens of
///   milliseconds slower. That threshold stays as the bound on the WAL:
///   under writes without pause a passive checkpoint never catches the
///   WAL's end, and only a checkpoint by the writer itself lets SQLite
///   start the WAL over. `journal_size_limit` (64 MiB) truncates the WAL
///   file when it starts over.
///
/// # Errors
/// [`DbErr`] when the URL is malformed or the database is unreachable.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    connect_with(url, SqliteDurability::Full).await
}

/// As [`connect`], choosing SQLite's commit durability (ignored for
/// PostgreSQL).
///
/// # Errors
/// [`DbErr`] when the URL is malformed or the database is unreachable.
pub async fn connect_with(
    url: &str,
    durability: SqliteDurability,
) -> Result<DatabaseConnection, DbErr> {
    #[cfg(not(feature = "sqlite"))]
    let _ = durability;
    let mut options = ConnectOptions::new(url);
    options
        .sqlx_logging(false)
        .max_connections(if url.starts_with("sqlite:") { 1 } else { 16 })
        .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
        .test_before_acquire_if_idle_for(POOL_PING_AFTER_IDLE);
    #[cfg(feature = "sqlite")]
    options.map_sqlx_sqlite_opts(move |o| {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        o.create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                SqliteDurability::Full => SqliteSynchronous::Full,
                SqliteDurability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma(
                "wal_autocheckpoint",
                SQLITE_WAL_AUTOCHECKPOINT_PAGES.to_string(),
            )
            .pragma("journal_size_limit", (64 * 1024 * 1024).to_string())
    });
    let db = sea_orm::Database::connect(options).await?;
    #[cfg(feature = "sqlite")]
    start_checkpointer(&db);
    Ok(db)
}

/// Starts the passive checkpointer of an SQLite pool (see [`connect`]).
#[cfg(feature = "sqlite")]
fn start_checkpointer(db: &DatabaseConnection) {
    use sea_orm::DatabaseConnectionType;
    use sea_orm::sqlx::sqlite::SqlitePoolOptions;
    if !matches!(
        db.inner,
        DatabaseConnectionType::SqlxSqlitePoolConnection(_)
    ) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no Tokio runtime: only commits checkpoint the SQLite WAL");
        return;
    };
    let pool = db.get_sqlite_connection_pool();
    let closed = pool.close_event();
    let options = pool.connect_options();
    runtime.spawn(async move {
        let checkpoints = async {
            let mut own = None;
            let mut every = tokio::time::interval(SQLITE_CHECKPOINT_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if own.is_none() {
                    match SqlitePoolOptions::new()
                        .max_connections(1)
                        .connect_with((*options).clone())
                        .await
                    {
                        Ok(pool) => own = Some(pool),
                        Err(e) => {
                            tracing::warn!(error = %e, "SQLite checkpointer could not connect");
                            tokio::time::sleep(SQLITE_CHECKPOINTER_RETRY).await;
                            continue;
                        }
                    }
                }
                let Some(pool) = &own else { continue };
                if let Err(e) = sea_orm::sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(pool)
                    .await
                {
                    tracing::warn!(error = %e, "SQLite checkpoint failed");
                    own = None;
                    tokio::time::sleep(SQLITE_CHECKPOINTER_RETRY).await;
                }
            }
        };
        tokio::select! {
            () = closed => {}
            () = checkpoints => {}
        }
    });
}

/// All repositories over one SeaORM connection (SQLite or PostgreSQL).
///
/// With an [`EventBus`] ([`SeaOrmStore::with_bus`]), the domain events of
/// each committed transaction are also published for real-time delivery,
/// right after the commit (the outbox stays the durable record).
#[derive(Clone)]
pub struct SeaOrmStore {
    db: DatabaseConnection,
    bus: Option<Arc<dyn EventBus>>,
    interest: Option<OutboxInterest>,
    appends: Arc<messages::AppendQueue>,
}

impl std::fmt::Debug for SeaOrmStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeaOrmStore")
            .field("db", &self.db)
            .field("bus", &self.bus.is_some())
            .field("interest", &self.interest.is_some())
            .finish()
    }
}

impl SeaOrmStore {
    /// Wraps an open connection. The `livechat_*` tables must exist
    /// ([`Migrator`]); with SQLite, [`connect`] gives the recommended settings.
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            bus: None,
            interest: None,
            appends: Arc::default(),
        }
    }

    /// Publishes committed domain events on `bus`. The store gets its own
    /// append queue (clones made before share the old one and publish on
    /// their own bus, if any).
    #[must_use]
    pub fn with_bus(mut self, bus: Arc<dyn EventBus>) -> Self {
        self.bus = Some(crate::bus::guarded(bus));
        self.appends = Arc::default();
        self
    }

    /// Writes the outbox rows of events `interest` rejects already settled
    /// (see [`OutboxInterest`]; issue #5); a second call replaces the
    /// interest. Gets its own append queue, as [`Self::with_bus`] does, so
    /// that one group commit never mixes two interests: clones made before
    /// keep the old queue and the old interest (or none).
    #[must_use]
    pub fn with_outbox_interest(mut self, interest: OutboxInterest) -> Self {
        self.interest = Some(interest);
        self.appends = Arc::default();
        self
    }

    /// An empty record of one transaction's events, under this store's
    /// outbox interest.
    fn recorder(&self) -> Recorded {
        Recorded {
            events: Vec::new(),
            interest: self.interest.clone(),
        }
    }

    /// Commits `tx`, then publishes the events it recorded.
    async fn commit(&self, tx: DatabaseTransaction, ev: Recorded) -> Result<(), DbErr> {
        tx.commit().await?;
        self.publish(ev.events);
        Ok(())
    }

    /// Hands the events of a committed transaction to the bus (if any).
    /// Publishing never fails the operation: the change is committed, and
    /// clients that miss a real-time event catch up by `seq`. The bus is
    /// [`crate::bus::guarded`]: a host's [`EventBus::publish`] that panics
    /// loses its event (which stays in the outbox for the ticket bridge),
    /// not the request, nor, inside an SQLite run's settle, the store.
    fn publish(&self, events: Vec<DomainEvent>) {
        if let Some(bus) = &self.bus {
            for event in events {
                bus.publish(BusEvent::Domain(Arc::new(event)));
            }
        }
    }

    /// The underlying connection.
    #[must_use]
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite (whose
    /// wait for the write lock is bounded by its busy timeout); on
    /// PostgreSQL `BEGIN` and `SET LOCAL lock_timeout` ([`LOCK_TIMEOUT`]),
    /// so that a lock held elsewhere for long (a node gone mid-transaction,
    /// whose connection the server keeps until TCP keepalive gives up, or a
    /// console's open transaction) fails the waiting request with
    /// `Unavailable` (503) instead of holding its pooled connection, and
    /// with it the node's other tenants, for as long.
    async fn begin_write(&self) -> Result<DatabaseTransaction, DbErr> {
        let tx = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            })
            .await?;
        if tx.get_database_backend() == sea_orm::DbBackend::Postgres {
            tx.execute_unprepared(LOCK_TIMEOUT).await?;
        }
        Ok(tx)
    }
}

/// The domain events of one transaction, in the order their outbox rows
/// are written, and the store's outbox interest ([`record_event`]).
struct Recorded {
    /// The events, to publish after the commit.
    events: Vec<DomainEvent>,
    interest: Option<OutboxInterest>,
}

/// Writes one outbox row inside `tx` (DESIGN.md invariant 5), settled if
/// `ev`'s interest rejects the event.
async fn record_event<T: Serialize>(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    tenant: TenantId,
    session: Option<SessionId>,
    kind: EventKind,
    payload: &T,
) -> Result<(), ChatError> {
    let recorded = outbox_row(ev.interest.as_ref(), tenant, session, kind, payload)?;
    record(tx, ev, recorded).await
}

/// As [`record_event`], for a stored message's `message.posted`
/// ([`message_event`]).
async fn record_message_event(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    posted: &MessagePosted,
) -> Result<(), ChatError> {
    let recorded = message_event(ev.interest.as_ref(), posted)?;
    record(tx, ev, recorded).await
}

/// Inserts an event's outbox row inside `tx` and keeps the event to
/// publish after the commit.
async fn record(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    (row, event): (outbox_entity::ActiveModel, DomainEvent),
) -> Result<(), ChatError> {
    outbox_entity::Entity::insert(row)
        .exec_without_returning(tx)
        .await?;
    ev.events.push(event);
    Ok(())
}

/// The outbox row and event of a stored message: `message.posted`, whose
/// event id is the message's id, so that a retry of the send that finds
/// the message publishes the same event again without reading the outbox
/// (`messages::reannouncement`).
fn message_event(
    interest: Option<&OutboxInterest>,
    posted: &MessagePosted,
) -> Result<(outbox_entity::ActiveModel, DomainEvent), ChatError> {
    let message = &posted.message;
    let (mut row, mut event) = outbox_row(
        interest,
        message.tenant_id,
        Some(message.session_id),
        EventKind::MessagePosted,
        posted,
    )?;
    row.id = Set(message.id.as_uuid());
    event.id = EventId::from_uuid(message.id.as_uuid());
    Ok((row, event))
}

/// The outbox row of an event and the event itself, for a caller that
/// inserts the row in its transaction (several at once in a group commit).
/// The row is written settled (`dispatched_at` = its creation time) when
/// `interest` rejects the event.
fn outbox_row<T: Serialize>(
    interest: Option<&OutboxInterest>,
    tenant: TenantId,
    session: Option<SessionId>,
    kind: EventKind,
    payload: &T,
) -> Result<(outbox_entity::ActiveModel, DomainEvent), ChatError> {
    // Serialized once: the row stores the event's own text (issue #5).
    let payload =
        EventPayload::new(payload).map_err(|e| DbErr::Custom(format!("event payload: {e}")))?;
    let text = payload.json().to_owned();
    let at = now();
    let event = DomainEvent {
        id: EventId::generate(),
        tenant_id: tenant,
        session_id: session,
        kind,
        payload,
        created_at: at,
    };
    let settled = interest.is_some_and(|i| !i.wants(&event));
    let row = outbox_entity::ActiveModel {
        id: Set(event.id.as_uuid()),
        tenant_id: Set(tenant.get()),
        session_id: Set(session.map(|s| s.as_uuid())),
        kind: Set(kind.as_str().to_owned()),
        payload: Set(text),
        created_at: Set(at),
        attempts: Set(0),
        available_at: Set(at),
        claimed_until: Set(None),
        last_error: Set(None),
        dispatched_at: Set(settled.then_some(at)),
        failed_at: Set(None),
        pending_for: Set(None),
    };
    Ok((row, event))
}

fn corrupt(what: &str) -> ChatError {
    ChatError::Storage(DbErr::Custom(format!("unexpected stored value: {what}")))
}

/// The outcomes of a housekeeping step run for each tenant (or agent) in
/// turn: a failure is logged and the others go on, so one tenant's
/// damaged rows or failing transaction do not hold up the rest. The step
/// fails only when every attempt failed (the database is down).
#[derive(Debug)]
pub(super) struct EachTenant<T> {
    /// The step, for the log.
    what: &'static str,
    done: Vec<T>,
    succeeded: bool,
    first_error: Option<ChatError>,
}

impl<T> EachTenant<T> {
    /// Outcomes of the step `what` (for the log), none yet.
    pub(super) fn new(what: &'static str) -> Self {
        Self {
            what,
            done: Vec::new(),
            succeeded: false,
            first_error: None,
        }
    }

    /// Records the step's outcome for `of` (a tenant, or a tenant and an
    /// agent): its results, or its error, logged.
    pub(super) fn record(
        &mut self,
        of: impl std::fmt::Debug,
        outcome: Result<impl IntoIterator<Item = T>, ChatError>,
    ) {
        let what = self.what;
        match outcome {
            Ok(done) => {
                self.succeeded = true;
                self.done.extend(done);
            }
            Err(error) => {
                tracing::warn!(%error, of = ?of, what, "housekeeping step failed; the others go on");
                self.first_error.get_or_insert(error);
            }
        }
    }

    /// What was done, or the first error when every attempt failed.
    pub(super) fn finish(self) -> Result<Vec<T>, ChatError> {
        match self.first_error {
            Some(error) if !self.succeeded => Err(error),
            _ => Ok(self.done),
        }
    }
}

fn host_id<T: TryFrom<i64, Error = ChatError>>(v: i64) -> Result<T, ChatError> {
    T::try_from(v).map_err(|_| corrupt("non-positive id"))
}

impl TryFrom<session::Model> for ChatSession {
    type Error = ChatError;
    fn try_from(m: session::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: SessionId::from_uuid(m.id),
            tenant_id: host_id(m.tenant_id)?,
            agent_id: m.agent_id.map(host_id).transpose()?,
            customer_id: m.customer_id.map(CustomerId::from_uuid),
            origin: SessionOrigin::parse(&m.origin).ok_or_else(|| corrupt("session origin"))?,
            status: SessionStatus::parse(&m.status).ok_or_else(|| corrupt("session status"))?,
            topic: m.topic,
            priority: Priority::from_rank(m.priority_rank).ok_or_else(|| corrupt("priority"))?,
            department: m.department,
            ticket_id: m.ticket_id.map(TicketId::from_uuid),
            contact: m
                .contact
                .map(|c| serde_json::from_str::<Contact>(&c))
                .transpose()
                .map_err(|_| corrupt("contact"))?,
            client_ip: m.client_ip,
            user_agent: m.user_agent,
            last_seq: m.last_seq,
            created_at: m.created_at,
            updated_at: m.updated_at,
            assigned_at: m.assigned_at,
            closed_at: m.closed_at,
        })
    }
}

impl TryFrom<message::Model> for ChatMessage {
    type Error = ChatError;
    fn try_from(m: message::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: MessageId::from_uuid(m.id),
            session_id: SessionId::from_uuid(m.session_id),
            tenant_id: host_id(m.tenant_id)?,
            sender_type: SenderType::parse(&m.sender_type).ok_or_else(|| corrupt("sender type"))?,
            sender_id: m.sender_id.map(host_id).transpose()?,
            customer_id: m.customer_id.map(CustomerId::from_uuid),
            seq: m.seq,
            message: m.body,
            client_msg_id: m.client_msg_id,
            created_at: m.created_at,
        })
    }
}

/// The departments a presence row's agent serves (empty: every one).
pub(super) fn departments_of(m: &presence::Model) -> Result<Vec<String>, ChatError> {
    m.departments
        .as_deref()
        .map(serde_json::from_str::<Vec<String>>)
        .transpose()
        .map_err(|_| corrupt("presence departments"))
        .map(Option::unwrap_or_default)
}

impl TryFrom<presence::Model> for AgentPresence {
    type Error = ChatError;
    fn try_from(m: presence::Model) -> Result<Self, ChatError> {
        Ok(Self {
            tenant_id: host_id(m.tenant_id)?,
            agent_id: host_id(m.agent_id)?,
            status: PresenceStatus::parse(&m.status).ok_or_else(|| corrupt("presence status"))?,
            updated_at: m.updated_at,
            departments: departments_of(&m)?,
        })
    }
}

impl TryFrom<customer::Model> for Customer {
    type Error = ChatError;
    fn try_from(m: customer::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: CustomerId::from_uuid(m.id),
            tenant_id: host_id(m.tenant_id)?,
            user_id: m.user_id.map(host_id).transpose()?,
            browser_uuid: m.browser_uuid,
            linked_to: m.linked_to.map(CustomerId::from_uuid),
            created_at: m.created_at,
        })
    }
}

impl TryFrom<outbox_entity::Model> for DomainEvent {
    type Error = ChatError;
    fn try_from(m: outbox_entity::Model) -> Result<Self, ChatError> {
        Ok(Self {
            id: EventId::from_uuid(m.id),
            tenant_id: host_id(m.tenant_id)?,
            session_id: m.session_id.map(SessionId::from_uuid),
            kind: EventKind::parse(&m.kind).ok_or_else(|| corrupt("event kind"))?,
            payload: EventPayload::from_json(m.payload).map_err(|_| corrupt("event payload"))?,
            created_at: m.created_at,
        })
    }
}

fn convert_all<M, T: TryFrom<M, Error = ChatError>>(rows: Vec<M>) -> Result<Vec<T>, ChatError> {
    rows.into_iter().map(T::try_from).collect()
}

/// Rolls back `tx` and returns `err` (the rollback's own failure wins).
async fn abort<T>(tx: DatabaseTransaction, err: ChatError) -> Result<T, ChatError> {
    tx.rollback().await?;
    Err(err)
}

/// `tenant_id = tenant` for a read of the outbox, written so that no index
/// on `tenant_id` serves it (a unary `+`, the same value on both
/// databases): the tenant index holds every event of the tenant's history,
/// and the reads that use this have a partial index of far fewer rows.
/// SQLite, without statistics, took the tenant index for its equality.
pub(super) fn outbox_tenant_unindexed(tenant: TenantId) -> sea_orm::sea_query::SimpleExpr {
    use sea_orm::sea_query::ExprTrait as _;
    sea_orm::sea_query::Expr::cust(r#"+"livechat_outbox"."tenant_id""#).eq(tenant.get())
}
