//! [`MessageRepository`] for the SeaORM store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use chrono::{DateTime, Utc};

use sea_orm::sea_query::{
    Alias, BinOper, CaseStatement, CommonTableExpression, Expr, ExprTrait, InsertStatement,
    LockBehavior, LockType, Query, WithClause,
};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr,
    EntityTrait, FromQueryResult, Iterable, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Statement, Value,
};
use tokio::sync::oneshot;

use super::entity::{customer, message, outbox, session};
use super::sessions::find_session;
use super::writer::{Conn, Writer};
use super::{POOL_PING_AFTER_IDLE, SeaOrmStore, convert_all, message_event};
use crate::error::{ChatError, is_connection_lost, sql_state};
use crate::events::{DomainEvent, EventKind, EventPayload, MessagePosted};
use crate::ids::{CustomerId, EventId, MessageId, SessionId, TenantId, TicketId, UserId};
use crate::model::{ChatMessage, Sender, SenderType, SessionStatus, now};
use crate::outbox::OutboxInterest;
use crate::repository::{AppendedMessage, MessageRepository, PendingAppend};
use crate::validate::{ClientMsgId, MessageBody, PageSize};

#[cfg(feature = "sqlite")]
mod pipeline;

/// Most appends committed together in one transaction.
const MAX_BATCH: usize = 128;

/// Appends waiting for the next group commit, shared by all clones of a
/// [`SeaOrmStore`].
///
/// Group commit (issue #5): concurrent `append_message` calls queue here;
/// one task at a time (the "committer", started by the call that finds none
/// running) takes everything queued, stores it in one transaction — one
/// fsync for the whole batch — and answers each caller only after the
/// commit, so a `201` still means the message is on disk. Appends that
/// arrive while a batch commits form the next batch, so the batch size
/// follows the load: a lone sender commits alone, 64 concurrent senders
/// share commits.
#[derive(Debug, Default)]
pub(super) struct AppendQueue {
    state: Mutex<QueueState>,
    /// On PostgreSQL, each session this queue's batches read or wrote as
    /// it was after them: a batch of known sessions skips its read, since
    /// its write checks every column staging uses anyway; a refusal
    /// staged from it is decided again from a fresh read, since nothing
    /// is written to check it ([`SeaOrmStore::store_unlocked`]). Only the
    /// committer uses it.
    known: Mutex<HashMap<uuid::Uuid, LockedSession>>,
    /// On PostgreSQL, the connection the committer wrote its last batch
    /// on, taken out of the pool, and when. Given back to the pool after
    /// each batch, sqlx would ping it: one round trip more per batch
    /// (issue #5). One idle for longer than [`POOL_PING_AFTER_IDLE`] is
    /// pinged before its next batch, as the pool does with its own.
    held: Mutex<Option<(Conn, Instant)>>,
    /// On SQLite, the database's WAL file if runs apply to it (unset
    /// until a run has looked; [`pipeline`]).
    #[cfg(feature = "sqlite")]
    wal: std::sync::OnceLock<Option<pipeline::WalFile>>,
    /// Woken by each append queued, for a run waiting for its next batch.
    #[cfg(feature = "sqlite")]
    arrived: tokio::sync::Notify,
    /// Gates tests queue, one for each next sync of a run, in order.
    #[cfg(all(test, feature = "sqlite"))]
    sync_gates: Mutex<std::collections::VecDeque<Arc<tokio::sync::Semaphore>>>,
}

/// Most sessions an [`AppendQueue`] remembers; past this it forgets them
/// all (about 150 bytes each).
const MAX_KNOWN: usize = 16_384;

#[derive(Debug, Default)]
struct QueueState {
    pending: Vec<AppendRequest>,
    committing: bool,
}

#[derive(Debug)]
struct AppendRequest {
    tenant: TenantId,
    session: SessionId,
    sender: Sender,
    body: MessageBody,
    key: Option<ClientMsgId>,
    allowed: &'static [SessionStatus],
    reply: oneshot::Sender<Result<AppendedMessage, ChatError>>,
}

/// `mutex`, locked even if a holder panicked: every critical section of
/// this module's mutexes is a single lookup, insert, removal, push or
/// take, which leaves the data consistent.
fn unpoisoned<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AppendQueue {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, LockedSession>> {
        unpoisoned(&self.known)
    }

    /// The held connection, pinged first if idle for longer than
    /// [`POOL_PING_AFTER_IDLE`] (and closed if it does not answer), or a
    /// new one from `db`'s pool.
    async fn writer_conn(&self, db: &sea_orm::DatabaseConnection) -> Result<Conn, DbErr> {
        let held = unpoisoned(&self.held).take();
        if let Some((mut conn, used)) = held
            && (used.elapsed() <= POOL_PING_AFTER_IDLE || conn.ping().await)
        {
            return Ok(conn);
        }
        Conn::acquire(db).await
    }

    /// Keeps `conn` for the next batch.
    fn hold(&self, conn: Conn) {
        *unpoisoned(&self.held) = Some((conn, Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        unpoisoned(&self.state)
    }

    /// Queues `request`; `true` when the caller must start the committer.
    fn push(&self, request: AppendRequest) -> bool {
        let mut state = self.lock();
        state.pending.push(request);
        #[cfg(feature = "sqlite")]
        self.arrived.notify_one();
        !std::mem::replace(&mut state.committing, true)
    }

    /// The next batch, or `None` (and the committer stops) when nothing is
    /// queued.
    fn take(&self) -> Option<Vec<AppendRequest>> {
        let mut state = self.lock();
        let batch = Self::drain(&mut state);
        state.committing = batch.is_some();
        batch
    }

    /// The next batch, or `None` when nothing is queued; the committer
    /// goes on either way (a run, [`pipeline`], takes its batches so).
    #[cfg(feature = "sqlite")]
    fn take_queued(&self) -> Option<Vec<AppendRequest>> {
        Self::drain(&mut self.lock())
    }

    /// Up to [`MAX_BATCH`] of the queued appends, oldest first.
    fn drain(state: &mut QueueState) -> Option<Vec<AppendRequest>> {
        if state.pending.is_empty() {
            return None;
        }
        let n = state.pending.len().min(MAX_BATCH);
        Some(state.pending.drain(..n).collect())
    }
}

/// Resets the queue if the committer ends abnormally (panic, runtime shut
/// down): queued callers get an error instead of waiting forever, and the
/// next append starts a new committer.
struct Committer {
    queue: Arc<AppendQueue>,
    finished: bool,
}

impl Drop for Committer {
    fn drop(&mut self) {
        if !self.finished {
            let mut state = self.queue.lock();
            state.pending.clear();
            state.committing = false;
        }
    }
}

/// A message ready to insert, or the outcome of an append that stores nothing.
enum Staged {
    New(Box<NewMessage>),
    /// A retry of a send an earlier commit stored: the original, and its
    /// event to publish again ([`reannouncement`]).
    Repeat(Box<(ChatMessage, DomainEvent)>),
    Done(Result<AppendedMessage, ChatError>),
}

/// The rows of one new message and its `message.posted` event.
struct NewMessage {
    row: message::ActiveModel,
    message: ChatMessage,
    event: (outbox::ActiveModel, DomainEvent),
}

impl SeaOrmStore {
    /// Commits queued appends until the queue is empty. `guard` is made
    /// before the task is spawned, so a task dropped unpolled (runtime
    /// shutting down) still resets the queue.
    async fn run_committer(self, mut guard: Committer) {
        while let Some(batch) = self.appends.take() {
            #[cfg(feature = "sqlite")]
            if self.runs_apply(&batch) {
                self.commit_run(batch).await;
                continue;
            }
            self.commit_batch(batch).await;
        }
        guard.finished = true;
    }

    /// Stores `batch` in one transaction and answers every caller. On
    /// PostgreSQL the batch is first stored without holding its sessions
    /// between statements ([`LockWait::Optimistic`],
    /// [`Self::store_unlocked`]); only if another transaction holds one of
    /// them, or changed one since it was read, is it stored again under
    /// row locks, waiting at most `lock_timeout` ([`LockWait::Bounded`]),
    /// one session's appends per transaction ([`Self::commit_waiting`]).
    /// When a statement fails before the commit, nothing of the batch is
    /// stored and each append is retried in a transaction of its own, so
    /// one request's failure is not another's; but a session row waited
    /// for past `lock_timeout` fails that session's appends at once, since
    /// each retry would wait for it again ([`BatchFailure::retryable`]). When the database is
    /// unreachable, or the commit itself fails (its outcome may be
    /// unknown), every caller gets the error: retrying could store a
    /// message twice. PostgreSQL's unlocked write first settles an
    /// outcome lost with its connection ([`Self::resolve_lost_write`]).
    async fn commit_batch(&self, mut batch: Vec<AppendRequest>) {
        // Stable: one session's appends keep their arrival (= seq) order,
        // and every batch locks session rows in the same order, so batches
        // of two nodes on PostgreSQL cannot deadlock each other.
        batch.sort_by_key(|r| r.session.as_uuid());
        let stored = self.store_batch(&batch, LockWait::Optimistic).await;
        if matches!(&stored, Err(failure) if failure.conflict()) {
            self.commit_waiting(batch).await;
        } else {
            self.settle(batch, stored).await;
        }
    }

    /// Stores a batch that found a session row held, waiting for it: each
    /// session's appends (in `seq` order) in a transaction of their own, in
    /// session id order. A transaction that waits for one session row
    /// while holding another could deadlock against a routing transaction,
    /// which holds its tenant's lock and assigns waiting sessions in queue
    /// order, not id order; PostgreSQL would then abort one of the two, and
    /// the routing change's caller would get the error. Holding at most the
    /// one row it waits for, a batch cannot be part of such a cycle.
    async fn commit_waiting(&self, mut batch: Vec<AppendRequest>) {
        while !batch.is_empty() {
            let session = batch[0].session;
            let split = batch
                .iter()
                .position(|r| r.session != session)
                .unwrap_or(batch.len());
            let rest = batch.split_off(split);
            let stored = self.store_batch(&batch, LockWait::Bounded).await;
            self.settle(batch, stored).await;
            batch = rest;
        }
    }

    /// Answers the callers of `batch` with the outcome of storing it, and
    /// publishes what it stored. A failure that surely stored nothing, of a
    /// batch of several appends, is retried append by append.
    async fn settle(&self, batch: Vec<AppendRequest>, stored: BatchResult) {
        match stored {
            Ok((outcomes, events)) => {
                // Answer, then publish: a sender's connection can send its
                // ack before the message's own `new_message`.
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = request.reply.send(outcome);
                }
                self.publish(events);
            }
            Err(failure) if batch.len() == 1 || !failure.retryable() => {
                for request in batch {
                    let _ = request.reply.send(Err(failure.error.clone().into()));
                }
            }
            Err(_) => {
                for request in batch {
                    match self
                        .store_batch(std::slice::from_ref(&request), LockWait::Bounded)
                        .await
                    {
                        Ok((mut outcomes, events)) => {
                            let outcome = outcomes.pop().unwrap_or(Err(ChatError::NotFound));
                            let _ = request.reply.send(outcome);
                            self.publish(events);
                        }
                        Err(failure) => {
                            let _ = request.reply.send(Err(failure.error.into()));
                        }
                    }
                }
            }
        }
    }

    /// One transaction for `batch`: lock all its sessions with one
    /// statement (in id order; [`lock_sessions`]), assign each append the
    /// next `seq` of its session in arrival order, then insert all messages
    /// and all outbox rows and move every touched session's `last_seq` in
    /// one more round trip ([`BatchWrites::write`]). The `client_msg_id`s
    /// of the batch are looked up with one statement under the lock, so a
    /// repeat is found whether its original committed earlier or sits
    /// earlier in the batch. On PostgreSQL, [`LockWait::Optimistic`] stores
    /// it without a transaction instead ([`Self::store_unlocked`]).
    async fn store_batch(&self, batch: &[AppendRequest], wait: LockWait) -> BatchResult {
        if wait == LockWait::Optimistic && self.db.get_database_backend() == DbBackend::Postgres {
            return self.store_unlocked(batch).await;
        }
        let tx = self.begin_write().await.map_err(BatchFailure::before)?;
        let (outcomes, events, wrote) = self
            .stage_and_write(&tx, batch, wait)
            .await
            .map_err(BatchFailure::before)?;
        if wrote {
            tx.commit().await.map_err(BatchFailure::commit)?;
        } else {
            // Nothing new (refusals and repeats): nothing to commit.
            tx.rollback().await.map_err(BatchFailure::before)?;
        }
        Ok((outcomes, events))
    }

    /// Stages `batch` in the write transaction `tx` and writes what is
    /// new: each append's outcome, the events to publish after the
    /// commit, and whether anything was written (if not, there is nothing
    /// to commit). [`Self::store_batch`] and an SQLite run
    /// ([`pipeline`]) begin and end the transaction, each its own way.
    async fn stage_and_write(
        &self,
        tx: &impl ConnectionTrait,
        batch: &[AppendRequest],
        wait: LockWait,
    ) -> Result<(Outcomes, Vec<DomainEvent>, bool), DbErr> {
        let staged = self.stage_batch(tx, batch, wait, None).await?;
        let wrote = match staged.writes {
            Some(writes) => {
                writes.write(tx).await?;
                true
            }
            None => false,
        };
        Ok((staged.outcomes, staged.events, wrote))
    }

    /// PostgreSQL's common case of [`Self::store_batch`] in two round trips
    /// instead of four (issue #5: `BEGIN`, the lock, the writes and
    /// `COMMIT` each waited for the server; at one sender they took 90,
    /// 170, 195 and 272 µs on the benchmark machine). The batch's sessions
    /// are read without a lock and the batch is staged as usual; then one
    /// statement, committed on its own, locks those sessions without
    /// waiting, checks that each still has what staging read, and writes
    /// everything ([`Guard`], [`build_write_statement`]). If one is held
    /// or changed the statement fails and stores nothing
    /// ([`BatchFailure::conflict`]), and the batch is stored again under
    /// locks. What is stored, and in what order, is what the locked path
    /// would store: staging depends only on the columns the guard checks.
    ///
    /// When this queue knows every session of the batch from its earlier
    /// batches ([`AppendQueue::known`]), even the read is skipped: one
    /// round trip. If the write then finds one changed (another node
    /// wrote to it, or it was closed, assigned or linked meanwhile), the
    /// batch is read and written once more before it goes to the locked
    /// path. A batch that staging from memory refuses in part (the
    /// session not visible to the sender, or not in an allowed status) is
    /// staged again from a fresh read before anything is written: the
    /// write's guard checks only the sessions it writes to, so a refusal
    /// from a remembered row that routing or linking has since changed
    /// would otherwise stand.
    async fn store_unlocked(&self, batch: &[AppendRequest]) -> BatchResult {
        let known = {
            let known = self.appends.known();
            batch
                .iter()
                .map(|r| {
                    let id = r.session.as_uuid();
                    Some((id, known.get(&id)?.clone()))
                })
                .collect::<Option<HashMap<_, _>>>()
        };
        let from_memory = known.is_some();
        match self.store_unlocked_from(batch, known).await {
            Err(failure) if from_memory && failure.conflict() => {
                self.store_unlocked_from(batch, None).await
            }
            // The read found the committer's connection gone (it may die
            // within `POOL_PING_AFTER_IDLE` of its last batch, unpinged):
            // nothing was written, and a new connection is taken.
            Err(failure) if failure.connection_lost() => {
                self.store_unlocked_from(batch, None).await
            }
            stored => stored,
        }
    }

    /// [`Self::store_unlocked`] from the sessions `known` (`None`: read
    /// them), remembering them as the batch leaves them, or forgetting
    /// them when it fails.
    async fn store_unlocked_from(
        &self,
        batch: &[AppendRequest],
        known: Option<HashMap<uuid::Uuid, LockedSession>>,
    ) -> BatchResult {
        let forget = || {
            let mut known = self.appends.known();
            for request in batch {
                known.remove(&request.session.as_uuid());
            }
        };
        let conn = self
            .appends
            .writer_conn(&self.db)
            .await
            .map_err(BatchFailure::before)?;
        let writer = Writer::new(conn);
        let mut known = known;
        let staged = loop {
            let from_memory = known.is_some();
            let staged = match self
                .stage_batch(&writer, batch, LockWait::Optimistic, known.take())
                .await
            {
                Ok(staged) => staged,
                Err(error) => {
                    forget();
                    return Err(BatchFailure::before(error));
                }
            };
            // The write's guard checks only the sessions it writes to. A
            // refusal decided from memory (a session remembered as WAITING
            // that routing has since assigned, a visitor's session since
            // linked to a signed-in customer, a `client_msg_id` retry to a
            // session remembered as CLOSED) would never be checked: each
            // refusal is decided again from a fresh read (the loop's
            // second and last turn).
            if !from_memory || staged.outcomes.iter().all(Result::is_ok) {
                break staged;
            }
        };
        let mut written_ids = Vec::new();
        let written = match staged.writes {
            Some(writes) => {
                written_ids = writes.message_ids();
                writer
                    .execute_raw(write_statement(DbBackend::Postgres, writes))
                    .await
                    .map(drop)
                    .map_err(BatchFailure::autocommit)
            }
            None => Ok(()),
        };
        // Stored, or refused by a conflict: the connection is as good as
        // before. After any other failure it is closed, before the write
        // is settled: a server still waiting on it mid-statement would
        // hold the sessions the settling waits for.
        if written
            .as_ref()
            .map_or_else(BatchFailure::conflict, |()| true)
        {
            self.appends.hold(writer.into_conn());
        } else {
            drop(writer);
        }
        if let Err(failure) = written {
            forget();
            if failure.at_commit {
                return self
                    .resolve_lost_write(batch, (staged.outcomes, staged.events), &written_ids)
                    .await
                    .map_err(|settling| {
                        tracing::warn!(
                            error = %settling.error,
                            lost = %failure.error,
                            "a message write lost with its connection could not be settled"
                        );
                        failure
                    });
            }
            return Err(failure);
        }
        let mut known = self.appends.known();
        if known.len() + staged.sessions.len() > MAX_KNOWN {
            known.clear();
        }
        known.extend(staged.sessions);
        Ok((staged.outcomes, staged.events))
    }

    /// Settles a write of [`Self::store_unlocked_from`] whose outcome is
    /// unknown (the connection was lost while it ran: the committer's
    /// connection can die within `POOL_PING_AFTER_IDLE` of its last batch
    /// without being pinged, or the server went away), in a transaction on
    /// another connection: it takes the routing locks of the batch's
    /// tenants, locks the batch's sessions, waiting as the locked path
    /// does, and looks for the write's messages (`ids`, made
    /// by staging). All there: the write committed, and `lost` (its
    /// outcomes and events) stands. None: nothing was stored, and the
    /// batch is staged again and written in this transaction. The lock
    /// makes the answer final: a lost statement still running holds the
    /// sessions from its `checked` lock until it ends, and one that runs
    /// later finds a session held or changed and stores nothing (its
    /// guard). So a message is stored once and its sender told so, where
    /// the sender got `503` and a retry without an `Idempotency-Key`
    /// could store it twice.
    ///
    /// # Errors
    /// When the database cannot answer, or refuses (a lock wait past
    /// `lock_timeout`): the caller keeps the lost write's failure.
    async fn resolve_lost_write(
        &self,
        batch: &[AppendRequest],
        lost: (Vec<Result<AppendedMessage, ChatError>>, Vec<DomainEvent>),
        ids: &[uuid::Uuid],
    ) -> BatchResult {
        // Every lock below, the routing rows' too, is waited for at most
        // `LOCK_TIMEOUT` (`begin_write`).
        let tx = self.begin_write().await.map_err(BatchFailure::before)?;
        // It waits for several session rows, in id order: it takes their
        // tenants' routing locks first, in tenant order, as every such
        // transaction does (routing, closes, linking), so that it queues
        // behind them instead of deadlocking against one.
        let mut tenants: Vec<TenantId> = batch.iter().map(|r| r.tenant).collect();
        tenants.sort_unstable();
        tenants.dedup();
        for tenant in tenants {
            super::routing::lock_tenant(&tx, tenant, &crate::config::RoutingPolicy::default())
                .await
                .map_err(BatchFailure::before)?;
        }
        let staged = self
            .stage_batch(&tx, batch, LockWait::Bounded, None)
            .await
            .map_err(BatchFailure::before)?;
        let found = message::Entity::find()
            .filter(message::Column::Id.is_in(ids.iter().copied()))
            .count(&tx)
            .await
            .map_err(BatchFailure::before)?;
        if found > 0 {
            // Known now: a failed rollback (dropped, it rolls back anyway)
            // must not turn it back into an unknown outcome.
            let _ = tx.rollback().await;
            return if usize::try_from(found).is_ok_and(|n| n == ids.len()) {
                Ok(lost)
            } else {
                // One statement stores all its rows or none.
                Err(BatchFailure::before(DbErr::Custom(format!(
                    "{found} of a lost write's {} messages are stored",
                    ids.len()
                ))))
            };
        }
        if let Some(writes) = staged.writes {
            writes.write(&tx).await.map_err(BatchFailure::before)?;
            tx.commit().await.map_err(BatchFailure::commit)?;
        } else {
            let _ = tx.rollback().await;
        }
        Ok((staged.outcomes, staged.events))
    }

    /// The reads and checks of [`Self::store_batch`], on `db` (a
    /// transaction, or the pool for [`Self::store_unlocked`]), from the
    /// sessions `known` instead of reading them when given (then no
    /// stored key is looked for: the write's unique index finds a repeat).
    async fn stage_batch(
        &self,
        db: &impl ConnectionTrait,
        batch: &[AppendRequest],
        wait: LockWait,
        known: Option<HashMap<uuid::Uuid, LockedSession>>,
    ) -> Result<StagedBatch, DbErr> {
        let postgres = db.get_database_backend() == DbBackend::Postgres;
        // With `LockWait::Bounded`, `db` is a transaction of `begin_write`:
        // a session row locked elsewhere for long is waited for at most
        // `LOCK_TIMEOUT`, so it does not hold up every append of the node.
        let mut ids: Vec<uuid::Uuid> = batch.iter().map(|r| r.session.as_uuid()).collect();
        ids.dedup();
        let keyed: Vec<(uuid::Uuid, &str)> = batch
            .iter()
            .filter_map(|r| r.key.as_ref().map(|k| (r.session.as_uuid(), k.as_str())))
            .collect();
        let (mut sessions, stored_keys) = match known {
            Some(known) => (known, 0),
            None if postgres && wait == LockWait::Bounded => {
                // Keys are looked up by a statement of their own on this
                // path (below): neither lock counts them.
                lock_sessions(db, padded(ids.clone()), Vec::new(), wait).await?;
                // A `FOR UPDATE` that waited (read committed) returns the
                // locked rows as the transaction it waited for left them,
                // but its subqueries as of its own start: the customer's
                // connections before that transaction removed one (a
                // silent client's removal, whose make-up of missed replies
                // ran before this reply existed, which then counted the
                // dead connection and was neither seen nor notified), or
                // their user id before a link. Read again with the rows
                // held: a new statement sees that commit and waits for
                // nothing. Only on this path, taken when the optimistic
                // write found a session held.
                let (sessions, _) = lock_sessions(db, padded(ids), Vec::new(), wait).await?;
                (sessions, 0)
            }
            None => lock_sessions(db, padded(ids), padded(keyed.clone()), wait).await?,
        };
        // Each key's message, and whether an earlier commit stored it (not
        // an earlier append of this batch).
        let mut keys: HashMap<(SessionId, &str), (ChatMessage, bool)> = HashMap::new();
        // The originals are read only when the lock counted some: a repeat
        // is rare, so a batch of new keyed messages needs no lookup. But a
        // PostgreSQL `FOR UPDATE` that waited (read committed) returns the
        // locked rows as the transaction it waited for left them, and
        // everything else, the count of stored keys too, as of when the
        // statement began: a key that transaction stored is not counted
        // (another node's send of the same key; stored again, it would
        // fail the unique index). Under a waiting lock the keys are looked
        // up by a statement of their own, which sees that commit.
        if stored_keys > 0 || (postgres && wait == LockWait::Bounded && !keyed.is_empty()) {
            let stored = message::Entity::find()
                .filter(stored_with_keys(db.get_database_backend(), keyed))
                .all(db)
                .await?;
            for row in stored {
                let session = SessionId::from_uuid(row.session_id);
                // Keys borrowed from the batch, so lookups need no allocation.
                let key = batch.iter().find_map(|r| {
                    r.key
                        .as_ref()
                        .filter(|k| {
                            r.session == session && row.client_msg_id.as_deref() == Some(k.as_str())
                        })
                        .map(ClientMsgId::as_str)
                });
                if let Some(key) = key {
                    let original = ChatMessage::try_from(row).map_err(|e| match e {
                        ChatError::Storage(e) => e,
                        other => DbErr::Custom(other.to_string()),
                    })?;
                    keys.insert((session, key), (original, true));
                }
            }
        }
        let at = now();
        // This node cannot reach the other nodes: its agents' replies do
        // not reach customers connected elsewhere, who are therefore not
        // counted (their replies are notified).
        let cut_off = self.bus.as_ref().is_some_and(|bus| bus.is_degraded());
        let mut staged = Vec::with_capacity(batch.len());
        // Each session with new messages, with its `last_seq` as read.
        let mut touched: Vec<(uuid::Uuid, i64)> = Vec::new();
        for request in batch {
            let duplicate = request
                .key
                .as_ref()
                .and_then(|k| keys.get(&(request.session, k.as_str())));
            let step = match sessions.get_mut(&request.session.as_uuid()) {
                Some(locked) if is_visible(&locked.row, request) => match duplicate {
                    // Another participant's key is not this sender's retry.
                    Some((original, _)) if !sent_by(original, request.sender) => {
                        Staged::Done(Err(ChatError::ClientMsgIdTaken))
                    }
                    Some((original, true)) => Staged::Repeat(Box::new((
                        original.clone(),
                        reannouncement(locked, original)?,
                    ))),
                    Some((original, false)) => Staged::Done(Ok(AppendedMessage {
                        message: original.clone(),
                        created: false,
                    })),
                    None => stage(request, locked, at, cut_off, self.interest.as_ref())?,
                },
                _ => Staged::Done(Err(ChatError::NotFound)),
            };
            if let Staged::New(new) = &step {
                if touched.last().map(|t| t.0) != Some(request.session.as_uuid()) {
                    touched.push((request.session.as_uuid(), new.message.seq - 1));
                }
                if let Some(key) = &request.key {
                    keys.insert(
                        (request.session, key.as_str()),
                        (new.message.clone(), false),
                    );
                }
            }
            staged.push(step);
        }
        let mut rows = Vec::new();
        let mut outbox_rows = Vec::new();
        let mut events = Vec::new();
        let mut outcomes = Vec::with_capacity(staged.len());
        for step in staged {
            outcomes.push(match step {
                Staged::New(new) => {
                    let NewMessage {
                        row,
                        message,
                        event,
                    } = *new;
                    rows.push(row);
                    outbox_rows.push(event.0);
                    events.push(event.1);
                    Ok(AppendedMessage {
                        message,
                        created: true,
                    })
                }
                Staged::Repeat(repeat) => {
                    let (message, event) = *repeat;
                    events.push(event);
                    Ok(AppendedMessage {
                        message,
                        created: false,
                    })
                }
                Staged::Done(outcome) => outcome,
            });
        }
        let count = touched.len() as i64;
        // Read without a lock: the write checks what staging read (a
        // touched session is always among those read).
        let guard = (postgres && wait == LockWait::Optimistic).then(|| Guard {
            count,
            sessions: SessionGuard::padded(
                touched
                    .iter()
                    .filter_map(|&(id, last_seq)| {
                        let session = sessions.get(&id)?;
                        Some(SessionGuard {
                            id,
                            last_seq,
                            status: session.row.status.clone(),
                            customer_id: session.row.customer_id,
                            ticket_id: session.row.ticket_id,
                            customer_user: session.customer_user,
                            customer_connected: session.customer_connections > 0,
                        })
                    })
                    .collect(),
            ),
        });
        let touched = padded(touched);
        let writes = (!rows.is_empty()).then_some(BatchWrites {
            messages: rows,
            outbox: outbox_rows,
            seqs: touched
                .into_iter()
                .map(|(id, _)| (id, sessions.get(&id).map_or(0, |s| s.row.last_seq)))
                .collect(),
            guard,
            at,
        });
        Ok(StagedBatch {
            outcomes,
            events,
            writes,
            sessions,
        })
    }
}

/// A session row locked for a batch, with what its appends need to know
/// about the session's customer, read by the same statement.
#[derive(Clone, Debug)]
struct LockedSession {
    row: LockedRow,
    /// Live customer connections following the session (any node): an
    /// agent's message to a customer with none is an offline reply (issue #3).
    customer_connections: i64,
    /// The host user id of the session's customer (`None` for visitors).
    customer_user: Option<i64>,
}

/// The columns of a locked session row that staging reads (issue #5: the
/// whole row, with its free-text columns, was copied out of SQLite for
/// every session of every batch).
#[derive(Clone, Debug, FromQueryResult)]
struct LockedRow {
    id: uuid::Uuid,
    tenant_id: i64,
    status: String,
    last_seq: i64,
    customer_id: Option<uuid::Uuid>,
    ticket_id: Option<uuid::Uuid>,
}

/// How a batch holds its session rows on PostgreSQL (SQLite's `BEGIN
/// IMMEDIATE` already holds the whole database, so there both store the
/// batch in one transaction).
///
/// Issue #5: `Optimistic` is the common case, where no other transaction
/// holds the rows: no transaction is opened and no lock waited for
/// ([`SeaOrmStore::store_unlocked`]). A batch that finds one held or
/// changed stores nothing and is stored again with `Bounded`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum LockWait {
    /// The sessions are read without a lock; the write locks them with
    /// `FOR UPDATE NOWAIT` and checks them ([`Guard`]).
    Optimistic,
    /// In a transaction of `begin_write`: `FOR UPDATE`, waiting at most
    /// its `lock_timeout` (`LOCK_TIMEOUT`).
    Bounded,
}

/// Locks the sessions `ids` (in id order) and reads each with its
/// customer's live connection count and host user id, and with `keys`
/// (the batch's (session, `client_msg_id`) pairs) how many of them are
/// already stored (the second value; 0 without keys; [`stored_with_keys`]), in
/// one statement:
/// PostgreSQL `SELECT … FOR UPDATE` ([`LockWait::Bounded`]; a plain
/// `SELECT` with [`LockWait::Optimistic`], whose write then locks and
/// checks)
/// with scalar subqueries; on SQLite the write lock taken by `BEGIN
/// IMMEDIATE` already orders appends.
///
/// Locking orders concurrent appends to a session, so `seq` is gap-free
/// and unique (DESIGN.md invariant 4). Folding the two customer reads into
/// the lock saves one or two statements per message, and counting the
/// keys saves the lookup of originals unless there are some (issue #5).
async fn lock_sessions(
    tx: &impl ConnectionTrait,
    ids: Vec<uuid::Uuid>,
    keys: Vec<(uuid::Uuid, &str)>,
    wait: LockWait,
) -> Result<(HashMap<uuid::Uuid, LockedSession>, i64), DbErr> {
    let keyed = !keys.is_empty();
    let statement = lock_statement(tx.get_database_backend(), ids, keys, now(), wait);
    let mut locked = HashMap::new();
    let mut stored_keys = 0;
    for result in tx.query_all_raw(statement).await? {
        let row = LockedRow::from_query_result(&result, "")?;
        if keyed {
            // The same count on every row.
            stored_keys = result.try_get("", STORED_KEYS)?;
        }
        locked.insert(
            row.id,
            LockedSession {
                row,
                customer_connections: result.try_get("", CUSTOMER_CONNECTIONS)?,
                customer_user: result.try_get("", CUSTOMER_USER)?,
            },
        );
    }
    Ok((locked, stored_keys))
}

/// Whether `message` is `sender`'s, for an idempotency key's retry: the
/// same agent; the session's customer, whichever customer id it had then
/// (a visitor's message stays the customer's after a link); the library.
fn sent_by(message: &ChatMessage, sender: Sender) -> bool {
    match sender {
        Sender::Agent(agent) => {
            message.sender_type == SenderType::Agent && message.sender_id == Some(agent)
        }
        Sender::Customer(_) => message.sender_type == SenderType::Customer,
        Sender::System => message.sender_type == SenderType::System,
    }
}

/// `(session_id = ? AND client_msg_id = ?) OR …` over `keys`: one index
/// lookup per (session, key) pair, where `session_id IN (…) AND
/// client_msg_id IN (…)` looks up every pairing (issue #5 fan-out profile:
/// ~10 sessions × 32–64 keys per batch) and SQLite answers a row-value
/// `IN` by a scan. PostgreSQL uses another form ([`stored_with_keys`]).
fn key_pairs<'k>(keys: impl IntoIterator<Item = (uuid::Uuid, &'k str)>) -> Condition {
    keys.into_iter()
        .fold(Condition::any(), |any, (session, key)| {
            any.add(
                Condition::all()
                    .add(Expr::col((message::Entity, message::Column::SessionId)).eq(session))
                    .add(Expr::col((message::Entity, message::Column::ClientMsgId)).eq(key)),
            )
        })
}

/// The stored messages of `keys` (a batch's (session, `client_msg_id`)
/// pairs), as a condition on `livechat_messages`: on SQLite the `OR` of
/// the pairs ([`key_pairs`]); on PostgreSQL the ids found by one lookup per
/// pair: `id IN (SELECT (SELECT id FROM livechat_messages WHERE session_id
/// = stored_pairs.column1 AND client_msg_id = stored_pairs.column2) FROM
/// (VALUES (session, key), …) AS stored_pairs)`. The lock statement counts
/// them, and the originals are read with it when that count is not zero.
///
/// Issue #5: PostgreSQL answers each pair's scalar subquery with one
/// lookup of the unique index on `(session_id, client_msg_id)`, and cannot
/// turn it into a join or a scan. The `OR` of pairs left it free to read
/// the whole index instead, and it did so once the statistics of
/// `livechat_messages` were taken while few of its rows had a
/// `client_msg_id` (every HTTP send without an `Idempotency-Key`): the
/// generic plan of the prepared lock statement walked every keyed message
/// for every batch, so that each lock took 20–30 ms after a few thousand
/// WebSocket sends and the latency scenario's queue grew to seconds. A
/// test reads both statements' plans.
fn stored_with_keys(backend: DbBackend, keys: Vec<(uuid::Uuid, &str)>) -> Condition {
    if backend != DbBackend::Postgres {
        return key_pairs(keys);
    }
    let pairs = Alias::new("stored_pairs");
    let lookup = Query::select()
        .column((message::Entity, message::Column::Id))
        .from(message::Entity)
        .and_where(
            Expr::col((message::Entity, message::Column::SessionId))
                .equals((pairs.clone(), Alias::new("column1"))),
        )
        .and_where(
            Expr::col((message::Entity, message::Column::ClientMsgId))
                .equals((pairs.clone(), Alias::new("column2"))),
        )
        .to_owned();
    let ids = Query::select()
        .expr(Expr::SubQuery(None, Box::new(lookup.into())))
        .from_values(
            keys.into_iter()
                .map(|(session, key)| (session, key.to_owned())),
            pairs,
        )
        .to_owned();
    Condition::all().add(Expr::col((message::Entity, message::Column::Id)).in_subquery(ids))
}

/// The statement of [`lock_sessions`] for `ids` and `keys` as of `at`.
/// Its SQL depends only on the database, the numbers of ids and keys and
/// `wait`, so it is built with sea-query once per those
/// ([`build_lock_statement`]) and then only bound: building it for every
/// batch took about a twentieth of a lone message's CPU (issue #5
/// profile). The values are bound in the order sea-query
/// emits them (the customer role, `at`, each key's session and key, then
/// the ids); a test compares both ways.
fn lock_statement(
    backend: DbBackend,
    ids: Vec<uuid::Uuid>,
    keys: Vec<(uuid::Uuid, &str)>,
    at: DateTime<Utc>,
    wait: LockWait,
) -> Statement {
    static SQL: SqlCache<(bool, usize, usize, LockWait)> = SqlCache::new();
    let key = (backend == DbBackend::Postgres, ids.len(), keys.len(), wait);
    let Some(sql) = SQL.get(&key) else {
        let built = build_lock_statement(backend, ids, keys, at, wait);
        SQL.put(key, &built.sql);
        return built;
    };
    let mut values = Vec::with_capacity(ids.len() + 2 * keys.len() + 2);
    values.push(Value::from(super::connections::CUSTOMER));
    values.push(Value::from(at));
    for (session, key) in keys {
        values.push(Value::from(session));
        values.push(Value::from(key));
    }
    values.extend(ids.into_iter().map(Value::from));
    Statement::from_sql_and_values(backend, sql.as_ref(), values)
}

/// SQL text kept per statement shape (the key), so that a statement whose
/// SQL depends only on its shape is built with sea-query once and then
/// only bound ([`lock_statement`], [`write_statement`]). The shapes are
/// bounded by [`MAX_BATCH`]: id and key lists are padded to powers of two
/// (8 and 9 lengths), write statements exist per message count (1–128)
/// and padded session count, per database; in practice a load uses a few
/// dozen of them.
struct SqlCache<K>(OnceLock<Mutex<HashMap<K, Arc<str>>>>);

impl<K: Eq + std::hash::Hash> SqlCache<K> {
    const fn new() -> Self {
        Self(OnceLock::new())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<str>>> {
        unpoisoned(self.0.get_or_init(Mutex::default))
    }

    /// The SQL kept for `key`.
    fn get(&self, key: &K) -> Option<Arc<str>> {
        self.map().get(key).cloned()
    }

    /// Keeps `sql` for `key`.
    fn put(&self, key: K, sql: &str) {
        self.map().insert(key, sql.into());
    }
}

/// [`lock_statement`] built with sea-query.
fn build_lock_statement(
    backend: DbBackend,
    ids: Vec<uuid::Uuid>,
    keys: Vec<(uuid::Uuid, &str)>,
    at: DateTime<Utc>,
    wait: LockWait,
) -> Statement {
    let connections = super::connections::live_connections(
        super::connections::CUSTOMER,
        Expr::col((session::Entity, session::Column::TenantId)),
        Expr::col((session::Entity, session::Column::Id)),
        at,
    );
    let customer_user = customer_user_of(session::Entity);
    let select = session::Entity::find()
        .select_only()
        .columns([
            session::Column::Id,
            session::Column::TenantId,
            session::Column::Status,
            session::Column::LastSeq,
            session::Column::CustomerId,
            session::Column::TicketId,
        ])
        .expr_as(
            Expr::SubQuery(None, Box::new(connections.into())),
            CUSTOMER_CONNECTIONS,
        )
        .expr_as(
            Expr::SubQuery(None, Box::new(customer_user.into())),
            CUSTOMER_USER,
        )
        .apply_if((!keys.is_empty()).then_some(keys), |select, keys| {
            // Uncorrelated: counted once per statement, not per session.
            let stored = Query::select()
                .expr(Expr::col((message::Entity, message::Column::Id)).count())
                .from(message::Entity)
                .cond_where(stored_with_keys(backend, keys))
                .to_owned();
            select.expr_as(Expr::SubQuery(None, Box::new(stored.into())), STORED_KEYS)
        })
        .filter(session::Column::Id.is_in(ids))
        .order_by_asc(session::Column::Id);
    match wait {
        LockWait::Optimistic => select,
        LockWait::Bounded => select.lock_exclusive(),
    }
    .build(backend)
}

/// The host user id of the customer of the session row in scope in
/// `sessions` (a table or a `WITH` query with its `customer_id` and
/// `tenant_id`), as a subquery.
fn customer_user_of<T: sea_orm::sea_query::IntoIden + Clone>(
    sessions: T,
) -> sea_orm::sea_query::SelectStatement {
    Query::select()
        .column((customer::Entity, customer::Column::UserId))
        .from(customer::Entity)
        .and_where(
            Expr::col((customer::Entity, customer::Column::Id))
                .equals((sessions.clone(), session::Column::CustomerId)),
        )
        .and_where(
            Expr::col((customer::Entity, customer::Column::TenantId))
                .equals((sessions, session::Column::TenantId)),
        )
        .to_owned()
}

const CUSTOMER_CONNECTIONS: &str = "customer_connections";
const CUSTOMER_USER: &str = "customer_user_id";
/// The guarded write's expected `customer_connected`.
const CUSTOMER_CONNECTED: &str = "customer_connected";
const STORED_KEYS: &str = "stored_keys";
/// The guarded write's sessions, locked and checked ([`build_write_statement`]).
const CHECKED: &str = "checked";
/// The guarded write's sessions as staging read them.
const EXPECTED: &str = "expected";
/// The guarded write's checked sessions whose customer is unchanged
/// ([`unchanged_customers`]).
const UNCHANGED: &str = "unchanged";
/// The guarded write's sessions, updated.
const UPDATED: &str = "updated";

/// What a staged batch writes.
struct BatchWrites {
    messages: Vec<message::ActiveModel>,
    outbox: Vec<outbox::ActiveModel>,
    /// Each session with new messages, in id order, with its new
    /// `last_seq`; padded (see [`padded`]).
    seqs: Vec<(uuid::Uuid, i64)>,
    /// What the write checks before it writes, when the sessions were read
    /// without a lock ([`LockWait::Optimistic`]).
    guard: Option<Guard>,
    at: chrono::DateTime<chrono::Utc>,
}

/// What a batch read without a lock checks in its write
/// ([`SeaOrmStore::store_unlocked`]): each session with new messages
/// still has what staging read (or knew), so staging's outcome (each
/// `seq`, each refusal, each event) stands.
#[derive(Clone)]
struct Guard {
    /// Each session with new messages, in id order, then fillers up to a
    /// power of two ([`SessionGuard::padded`]).
    sessions: Vec<SessionGuard>,
    /// How many distinct sessions `sessions` lists.
    count: i64,
}

/// What staging depends on of a session, as read or known ([`stage`],
/// [`is_visible`], [`customer_connected`]; `tenant_id` never changes).
#[derive(Clone)]
struct SessionGuard {
    id: uuid::Uuid,
    /// Before this batch's messages.
    last_seq: i64,
    status: String,
    customer_id: Option<uuid::Uuid>,
    ticket_id: Option<uuid::Uuid>,
    /// The host user id of the session's customer.
    customer_user: Option<i64>,
    /// Whether a live customer connection follows the session.
    customer_connected: bool,
}

impl SessionGuard {
    /// `sessions` followed by rows that match no session, up to a power of
    /// two: the statement has few shapes ([`padded`]), and the fillers
    /// drop out of the guard's join before its lock and the customer's
    /// checks. Repeating the last session instead, as [`padded`] does,
    /// made PostgreSQL lock that row and run both checks once per copy
    /// (`auto_explain` at 64 senders: 64 rows for a batch of 33 sessions).
    /// A filler's status is empty and its `last_seq` negative, which no
    /// session has, whatever its id.
    fn padded(mut sessions: Vec<Self>) -> Vec<Self> {
        let filler = Self {
            id: uuid::Uuid::nil(),
            last_seq: -1,
            status: String::new(),
            customer_id: None,
            ticket_id: None,
            customer_user: None,
            customer_connected: false,
        };
        if !sessions.is_empty() {
            sessions.resize(sessions.len().next_power_of_two(), filler);
        }
        sessions
    }
}

/// What staging a batch decided.
struct StagedBatch {
    /// One outcome per request, in batch order.
    outcomes: Vec<Result<AppendedMessage, ChatError>>,
    /// The events to publish after the commit.
    events: Vec<DomainEvent>,
    /// `None` when nothing new is stored.
    writes: Option<BatchWrites>,
    /// The batch's sessions as they are once `writes` is stored.
    sessions: HashMap<uuid::Uuid, LockedSession>,
}

/// What storing a batch gave: each append's outcome (in batch order) and
/// the events to publish, or why it stored nothing.
type BatchResult = Result<(Outcomes, Vec<DomainEvent>), BatchFailure>;

/// Each append's outcome, in batch order.
type Outcomes = Vec<Result<AppendedMessage, ChatError>>;

/// Why a batch stored nothing.
struct BatchFailure {
    error: DbErr,
    /// The commit itself failed: its outcome may be unknown.
    at_commit: bool,
}

impl BatchFailure {
    #[allow(clippy::needless_pass_by_value)] // used as `map_err(BatchFailure::before)`
    fn before(error: DbErr) -> Self {
        Self {
            error,
            at_commit: false,
        }
    }

    /// A failure of a batch transaction's commit: its outcome may be
    /// unknown (the connection may have gone after the commit), unless
    /// SQLite refused it for the messages' deferred foreign key (extended
    /// result code 787, `SQLITE_CONSTRAINT_FOREIGNKEY`; migration
    /// `m0004_messages_deferred_fk`): that check runs before anything is
    /// committed, so the batch stored nothing and its appends are retried
    /// one by one, as after a failed statement, and only the one whose
    /// session is gone fails.
    #[allow(clippy::needless_pass_by_value)] // used as `map_err(BatchFailure::commit)`
    fn commit(error: DbErr) -> Self {
        let refused = sql_state(&error).is_some_and(|code| code == "787");
        Self {
            error,
            at_commit: !refused,
        }
    }

    /// A failure of [`SeaOrmStore::store_unlocked`]'s write, a statement
    /// committed on its own: the database refused it (an error with a
    /// SQLSTATE), so it stored nothing, unless the connection was lost
    /// (class 08 or 57), which may have happened after the commit.
    fn autocommit(error: DbErr) -> Self {
        let refused = matches!(error, DbErr::ConnectionAcquire(_))
            || sql_state(&error).is_some_and(|code| !is_connection_lost(&code));
        Self {
            error,
            at_commit: !refused,
        }
    }

    /// The batch, stored with [`LockWait::Optimistic`], stored nothing
    /// because another transaction held one of its sessions or changed it
    /// since it was read: PostgreSQL SQLSTATE 55P03 `lock_not_available`
    /// (the write's `NOWAIT` lock), 22012 `division_by_zero` (the write's
    /// check, [`Guard`]) or 23505 `unique_violation` (a `seq` or
    /// `client_msg_id` stored meanwhile).
    fn conflict(&self) -> bool {
        !self.at_commit
            && sql_state(&self.error)
                .is_some_and(|code| matches!(code.as_str(), "55P03" | "22012" | "23505"))
    }

    /// The batch surely stored nothing because the connection was lost
    /// before its write was sent (PostgreSQL class 08 or 57, an I/O
    /// error): another connection may store it. (A connection that could
    /// not be opened, `DbErr::Conn`, is not retried.)
    fn connection_lost(&self) -> bool {
        use sea_orm::RuntimeErr;
        !self.at_commit
            && (matches!(
                &self.error,
                DbErr::Query(RuntimeErr::SqlxError(error))
                    | DbErr::Exec(RuntimeErr::SqlxError(error))
                    if matches!(**error, sea_orm::sqlx::Error::Io(_))
            ) || sql_state(&self.error).is_some_and(|code| is_connection_lost(&code)))
    }

    /// Whether retrying the appends one by one is safe and useful: the
    /// batch surely stored nothing, the database is reachable, and the
    /// batch did not wait out `lock_timeout` for a session row (55P03
    /// under [`LockWait::Bounded`], whose batches hold one session's
    /// appends: each retry would wait for the same row again, holding up
    /// the node's every append for another 5 s).
    fn retryable(&self) -> bool {
        !self.at_commit
            && !matches!(self.error, DbErr::Conn(_) | DbErr::ConnectionAcquire(_))
            && sql_state(&self.error).is_none_or(|code| code != "55P03")
    }
}

impl BatchWrites {
    /// The ids of the messages written.
    fn message_ids(&self) -> Vec<uuid::Uuid> {
        self.messages
            .iter()
            .filter_map(|row| row.id.try_as_ref().copied())
            .collect()
    }

    /// Messages and outbox rows in power-of-two chunks, and every touched
    /// session's `last_seq`, sent to the database as one statement (issue
    /// #5: one round trip for a batch's writes): on PostgreSQL the inserts
    /// are data-modifying `WITH` clauses of the `UPDATE`; SQLite, which has
    /// none, runs the statements of one string in turn, each bound to its
    /// share of the values.
    async fn write(self, tx: &impl ConnectionTrait) -> Result<(), DbErr> {
        let statement = write_statement(tx.get_database_backend(), self);
        tx.execute_raw(statement).await?;
        Ok(())
    }
}

/// The statement of [`BatchWrites::write`] and
/// [`SeaOrmStore::store_unlocked`]. Its SQL depends only on the database,
/// the number of messages (the outbox has as many rows), the number of
/// touched sessions and whether it has a guard (PostgreSQL only), so it is
/// built with sea-query once per those ([`build_write_statement`]) and
/// then only bound: building it took a few percent of the CPU per message
/// (issue #5 profile). The values are bound in the order sea-query emits
/// them: each message row's columns in the entity's order, each outbox
/// row's, then with a guard each guarded session's id, `last_seq`,
/// status, customer, ticket, customer's user and whether a customer is
/// connected, their ids again, and the customer role and `at` (the live
/// customer connections, [`unchanged_customers`]), then the `CASE` pairs
/// (id, seq), `updated_at`, and last the ids of the `IN` list, or with a
/// guard its count; a test compares both ways.
fn write_statement(backend: DbBackend, mut writes: BatchWrites) -> Statement {
    static SQL: SqlCache<(bool, usize, usize, bool)> = SqlCache::new();
    let postgres = backend == DbBackend::Postgres;
    if !postgres {
        writes.guard = None;
    }
    let key = (
        postgres,
        writes.messages.len(),
        writes.seqs.len(),
        writes.guard.is_some(),
    );
    let Some(sql) = SQL.get(&key) else {
        let built = build_write_statement(backend, writes);
        SQL.put(key, &built.sql);
        return built;
    };
    let columns = message::Column::iter().count() * writes.messages.len()
        + outbox::Column::iter().count() * writes.outbox.len();
    let seqs = writes.seqs;
    let mut values = Vec::with_capacity(columns + 3 * seqs.len() + 1);
    // A column not set would be left out of the insert; every one is set.
    for row in &writes.messages {
        values.extend(message::Column::iter().filter_map(|c| row.get(c).into_value()));
    }
    for row in &writes.outbox {
        values.extend(outbox::Column::iter().filter_map(|c| row.get(c).into_value()));
    }
    if let Some(guard) = &writes.guard {
        for session in &guard.sessions {
            values.push(Value::from(session.id));
            values.push(Value::from(session.last_seq));
            values.push(Value::from(session.status.clone()));
            values.push(Value::from(session.customer_id));
            values.push(Value::from(session.ticket_id));
            values.push(Value::from(session.customer_user));
            values.push(Value::from(session.customer_connected));
        }
        values.extend(guard.sessions.iter().map(|s| Value::from(s.id)));
        values.push(Value::from(super::connections::CUSTOMER));
        values.push(Value::from(writes.at));
    }
    for (id, seq) in &seqs {
        values.push(Value::from(*id));
        values.push(Value::from(*seq));
    }
    values.push(Value::from(writes.at));
    match writes.guard {
        Some(guard) => values.push(Value::from(guard.count)),
        None => values.extend(seqs.into_iter().map(|(id, _)| Value::from(id))),
    }
    Statement::from_sql_and_values(backend, sql.as_ref(), values)
}

/// `a IS NOT DISTINCT FROM b`: equal, or both NULL.
fn same_or_both_null(a: Expr, b: Expr) -> Expr {
    a.binary(BinOper::Custom("IS NOT DISTINCT FROM"), b)
}

/// The guarded write's `checked` ([`build_write_statement`]): the
/// sessions of `guard` whose row is as staging saw it, locked without
/// waiting, with the customer values staging saw beside them.
fn checked_sessions(guard: Guard) -> sea_orm::sea_query::SelectStatement {
    // A join with the expected rows, not an `OR` of them: PostgreSQL
    // planned an `OR` of 32 sessions' conditions for milliseconds.
    let expected = Alias::new(EXPECTED);
    let column = |i: usize| Expr::col((expected.clone(), Alias::new(format!("column{i}"))));
    let session_column = |c: session::Column| Expr::col((session::Entity, c));
    let ids: Vec<uuid::Uuid> = guard.sessions.iter().map(|s| s.id).collect();
    Query::select()
        .columns([
            (session::Entity, session::Column::Id),
            (session::Entity, session::Column::TenantId),
            (session::Entity, session::Column::CustomerId),
        ])
        .expr_as(column(6), Alias::new(CUSTOMER_USER))
        .expr_as(column(7), Alias::new(CUSTOMER_CONNECTED))
        .from(session::Entity)
        .from_values(
            guard.sessions.into_iter().map(|s| {
                (
                    s.id,
                    s.last_seq,
                    s.status,
                    s.customer_id,
                    s.ticket_id,
                    s.customer_user,
                    s.customer_connected,
                )
            }),
            expected.clone(),
        )
        .and_where(session_column(session::Column::Id).eq(column(1)))
        .and_where(session_column(session::Column::LastSeq).eq(column(2)))
        .and_where(session_column(session::Column::Status).eq(column(3)))
        .and_where(same_or_both_null(
            session_column(session::Column::CustomerId),
            column(4),
        ))
        .and_where(same_or_both_null(
            session_column(session::Column::TicketId),
            column(5),
        ))
        // Looked up by the primary key whatever the statistics say of the
        // table's size (the join alone was planned as a scan).
        .and_where(session_column(session::Column::Id).is_in(ids))
        .lock_with_tables_behavior(LockType::Update, [session::Entity], LockBehavior::Nowait)
        .to_owned()
}

/// The ids of the guarded write's `checked` sessions whose customer is as
/// staging saw it as of `at`: the same host user id, and a live customer
/// connection following the session exactly when staging saw one.
fn unchanged_customers(at: DateTime<Utc>) -> sea_orm::sea_query::SelectStatement {
    let checked = Alias::new(CHECKED);
    // Counted per checked session, each joined connection checked by its
    // key, whatever the statistics (see `live_connections`).
    let connections = super::connections::live_connections(
        super::connections::CUSTOMER,
        Expr::col((checked.clone(), session::Column::TenantId)),
        Expr::col((checked.clone(), session::Column::Id)),
        at,
    );
    Query::select()
        .column((checked.clone(), session::Column::Id))
        .from(checked.clone())
        .and_where(same_or_both_null(
            Expr::SubQuery(None, Box::new(customer_user_of(checked.clone()).into())),
            Expr::col((checked.clone(), Alias::new(CUSTOMER_USER))),
        ))
        .and_where(
            Expr::col((checked, Alias::new(CUSTOMER_CONNECTED))).eq(Expr::SubQuery(
                None,
                Box::new(connections.into()),
            )
            // A constant, not a bound value: the cached SQL's values are
            // bound by `write_statement`.
            .gt(Expr::cust("0"))),
        )
        .to_owned()
}

/// [`write_statement`] built with sea-query.
///
/// On PostgreSQL with a [`Guard`] it is one statement of its own
/// transaction, in which nothing is written unless every guarded session
/// is unchanged and free:
///
/// ```sql
/// WITH w0 AS (INSERT …), …,
///   checked AS (SELECT livechat_sessions.id, tenant_id, customer_id,
///                 expected.column6 AS customer_user_id,
///                 expected.column7 AS customer_connected
///               FROM livechat_sessions, (VALUES ($id, $last_seq, $status,
///                 $customer_id, $ticket_id, $customer_user_id,
///                 $customer_connected), …) AS expected
///               WHERE livechat_sessions.id = expected.column1
///                 AND last_seq = expected.column2 AND status = expected.column3
///                 AND customer_id IS NOT DISTINCT FROM expected.column4
///                 AND ticket_id IS NOT DISTINCT FROM expected.column5
///                 AND livechat_sessions.id IN ($id, …)
///               FOR UPDATE OF livechat_sessions NOWAIT),
///   unchanged AS MATERIALIZED (SELECT checked.id FROM checked
///                 WHERE (SELECT user_id FROM livechat_customers …)
///                         IS NOT DISTINCT FROM checked.customer_user_id
///                   AND checked.customer_connected = ((SELECT COUNT(*)
///                         FROM livechat_connection_joins …
///                         WHERE (SELECT role = $ AND expires_at > $
///                                FROM livechat_connections WHERE id = …)) > 0)),
///   updated AS (UPDATE livechat_sessions SET last_seq = CASE …, updated_at = $
///               WHERE id IN (SELECT id FROM unchanged)
///               RETURNING id)
/// SELECT 1 / CASE WHEN (SELECT count(*) FROM updated) = $count THEN 1 ELSE 0 END
/// ```
///
/// The customer's two checks run on the locked rows only: inside
/// `checked` the planner evaluated them for every row of the sessions
/// table before the join (3.6 ms a batch with 28 sessions stored; the
/// benchmark's cross-node rate halved). A session another transaction
/// holds fails `checked` at once (55P03); a
/// changed one is not updated, and the division by zero (22012) is how
/// one statement undoes its own inserts: an error is the only way, since
/// its data-modifying `WITH` clauses run whatever the main query reads.
/// The inserts run after the main query, so they never wait for a row
/// another transaction holds either.
fn build_write_statement(backend: DbBackend, writes: BatchWrites) -> Statement {
    let seqs = writes.seqs;
    let postgres = backend == DbBackend::Postgres;
    let guard = writes.guard.filter(|_| postgres);
    let mut inserts: Vec<InsertStatement> = Vec::new();
    for chunk in power_of_two_chunks(writes.messages) {
        inserts.push(message::Entity::insert_many(chunk).into_query());
    }
    for chunk in power_of_two_chunks(writes.outbox) {
        inserts.push(outbox::Entity::insert_many(chunk).into_query());
    }
    let mut last_seq = Expr::col(session::Column::LastSeq);
    let mut case: Option<CaseStatement> = None;
    for (id, seq) in &seqs {
        let when = Expr::col(session::Column::Id).eq(*id);
        case = Some(match case {
            None => Expr::case(when, *seq),
            Some(case) => case.case(when, *seq),
        });
    }
    if let Some(case) = case {
        last_seq = case.finally(last_seq).into();
    }
    let update = session::Entity::update_many()
        .col_expr(session::Column::LastSeq, last_seq)
        .col_expr(session::Column::UpdatedAt, Expr::value(writes.at));
    let update = match &guard {
        None => update
            .filter(session::Column::Id.is_in(seqs.into_iter().map(|(id, _)| id)))
            .into_query(),
        Some(_) => update
            .filter(
                session::Column::Id.in_subquery(
                    Query::select()
                        .column(session::Column::Id)
                        .from(Alias::new(UNCHANGED))
                        .to_owned(),
                ),
            )
            .into_query()
            .returning_col(session::Column::Id)
            .to_owned(),
    };
    if postgres {
        let mut with = WithClause::new();
        let mut cte = |name: String, query: sea_orm::sea_query::SubQueryStatement| {
            with.cte(
                CommonTableExpression::new()
                    .query(query)
                    .table_name(Alias::new(name))
                    .to_owned(),
            );
        };
        for (i, insert) in inserts.into_iter().enumerate() {
            cte(format!("w{i}"), insert.into());
        }
        let at = writes.at;
        let Some(guard) = guard else {
            return backend.build(&update.with(with));
        };
        let count = guard.count;
        cte(CHECKED.into(), checked_sessions(guard).into());
        // Materialized, so each checked session's customer is checked
        // once: inlined into `updated`'s `IN`, the checks ran once per
        // pair of session rows and checked rows a nested loop visited.
        with.cte(
            CommonTableExpression::new()
                .query(unchanged_customers(at))
                .table_name(Alias::new(UNCHANGED))
                .materialized(true)
                .to_owned(),
        );
        with.cte(
            CommonTableExpression::new()
                .query(update)
                .table_name(Alias::new(UPDATED))
                .to_owned(),
        );
        let check = Query::select()
            .expr(Expr::cust_with_values(
                format!(
                    r#"1 / CASE WHEN (SELECT count(*) FROM "{UPDATED}") = $1 THEN 1 ELSE 0 END"#
                ),
                [count],
            ))
            .to_owned();
        backend.build(&check.with(with))
    } else {
        let mut sql = String::new();
        let mut values = Vec::new();
        for part in inserts
            .iter()
            .map(|insert| backend.build(insert))
            .chain(std::iter::once(backend.build(&update)))
        {
            sql.push_str(&sqlite_statement(part.sql));
            sql.push_str(";\n");
            values.extend(part.values.map(|v| v.0).unwrap_or_default());
        }
        Statement::from_sql_and_values(backend, sql, values)
    }
}

/// One statement of the SQLite write string, made to run without a
/// statement journal (issue #5 profile: copying every page a batch's
/// multi-row statements touched into that journal was ~6% of the fan-out's
/// CPU). SQLite opens one for a statement that writes several rows and may
/// abort half-way, to undo its own first rows. A batch never needs that: a
/// failed statement fails the whole transaction, which is rolled back
/// ([`BatchFailure::before`]). So every statement says `OR FAIL` (a
/// constraint error stops the statement and keeps its earlier rows, which
/// the rollback then drops), and the messages' foreign key to their
/// session is checked at commit (`DEFERRABLE INITIALLY DEFERRED`,
/// migration `m0004_messages_deferred_fk`): an immediate one may abort a
/// multi-row insert whatever its conflict clause. With it the messages go
/// in as multi-row inserts, as on PostgreSQL: one statement per chunk
/// instead of one per message, and so one hand-off from sqlx's worker
/// thread per chunk (each statement's result is handed to the runtime on
/// its own, about one context switch each).
fn sqlite_statement(sql: String) -> String {
    for verb in ["INSERT ", "UPDATE "] {
        if let Some(rest) = sql.strip_prefix(verb) {
            return format!("{verb}OR FAIL {rest}");
        }
    }
    sql
}

/// `items` padded to a power-of-two length by repeating the last one, for
/// `IN (…)` lists: statements of a few distinct shapes stay in the
/// prepared-statement cache instead of being prepared anew for every batch
/// size. Repeats do not change what an `IN` or `CASE` matches.
fn padded<T: Clone>(mut items: Vec<T>) -> Vec<T> {
    if let Some(last) = items.last().cloned() {
        items.resize(items.len().next_power_of_two(), last);
    }
    items
}

/// `rows` split into chunks of power-of-two sizes, largest first (45 rows:
/// 32, 8, 4, 1), so multi-row inserts have a few distinct shapes (see
/// [`padded`]).
fn power_of_two_chunks<T>(mut rows: Vec<T>) -> Vec<Vec<T>> {
    let mut chunks = Vec::new();
    while !rows.is_empty() {
        let n = 1 << rows.len().ilog2();
        let rest = rows.split_off(n);
        chunks.push(rows);
        rows = rest;
    }
    chunks
}

/// Whether the request may see the session: same tenant (invariant 1) and,
/// for a customer, their own session.
fn is_visible(row: &LockedRow, request: &AppendRequest) -> bool {
    row.tenant_id == request.tenant.get()
        && match request.sender {
            Sender::Customer(customer) => row.customer_id == Some(customer.as_uuid()),
            Sender::Agent(_) | Sender::System => true,
        }
}

/// The `message.posted` event of `original`, a message an earlier commit
/// stored, to publish again when a retry of its send finds it (DESIGN.md
/// invariant 5: fan-out at least once). Its first publication may never
/// have happened: its node stopped between the commit and the publish, or
/// the bus dropped it (a Redis outage). Receivers skip a `seq` they have
/// already delivered. The event's id is the message's id, which is the
/// stored event's id for every message stored since that rule (an older
/// message's event is published again under a new id); its time is the
/// message's creation time, and `customer_connected` is as of the retry.
fn reannouncement(locked: &LockedSession, original: &ChatMessage) -> Result<DomainEvent, DbErr> {
    let row = &locked.row;
    let posted = MessagePosted {
        message: original.clone(),
        session_customer_id: row.customer_id.map(CustomerId::from_uuid),
        ticket_id: row.ticket_id.map(TicketId::from_uuid),
        customer_connected: customer_connected(locked, original.sender_type == SenderType::Agent),
    };
    Ok(DomainEvent {
        id: EventId::from_uuid(original.id.as_uuid()),
        tenant_id: original.tenant_id,
        session_id: Some(original.session_id),
        kind: EventKind::MessagePosted,
        payload: EventPayload::new(&posted)
            .map_err(|e| DbErr::Custom(format!("event payload: {e}")))?,
        created_at: original.created_at,
    })
}

/// `customer_connected` of an agent's (`by_agent`) `message.posted`: a
/// customer connection follows the session on some node (issue #3: an
/// agent's message to a customer with none is an offline reply).
fn customer_connected(locked: &LockedSession, by_agent: bool) -> bool {
    by_agent && locked.row.customer_id.is_some() && locked.customer_connections > 0
}

/// Checks the request against its locked session `row`, gives it the next
/// `seq` (advancing `row.last_seq`), and builds its message and outbox rows
/// (the outbox row settled if `interest` rejects the event). `cut_off`:
/// the store's bus cannot reach the other nodes, so an agent's message
/// counts no customer as connected (the customer's own node may be
/// another; one on this node gets the message live and notified too).
fn stage(
    request: &AppendRequest,
    locked: &mut LockedSession,
    at: chrono::DateTime<chrono::Utc>,
    cut_off: bool,
    interest: Option<&OutboxInterest>,
) -> Result<Staged, DbErr> {
    let (tenant, session) = (request.tenant, request.session);
    let connected =
        !cut_off && customer_connected(locked, matches!(request.sender, Sender::Agent(_)));
    let row = &mut locked.row;
    let status = SessionStatus::parse(&row.status);
    if !status.is_some_and(|s| request.allowed.contains(&s)) {
        return Ok(Staged::Done(Err(
            if status == Some(SessionStatus::Closed) {
                ChatError::SessionClosed
            } else {
                ChatError::SessionNotOpen
            },
        )));
    }

    let (sender_type, sender_id, customer_id) = match request.sender {
        Sender::Agent(agent) => (SenderType::Agent, Some(agent), None),
        Sender::Customer(customer) => {
            // `is_visible` checked that the sender is the session's customer.
            let user = locked
                .customer_user
                .map(|u| {
                    UserId::new(u).map_err(|_| {
                        DbErr::Custom("unexpected stored value: customer user id".into())
                    })
                })
                .transpose()?;
            (SenderType::Customer, user, Some(customer))
        }
        Sender::System => (SenderType::System, None, None),
    };
    let message = ChatMessage {
        id: MessageId::generate(),
        session_id: session,
        tenant_id: tenant,
        sender_type,
        sender_id,
        customer_id,
        seq: row.last_seq + 1,
        message: request.body.as_str().to_owned(),
        client_msg_id: request.key.as_ref().map(|k| k.as_str().to_owned()),
        created_at: at,
    };
    let posted = MessagePosted {
        message: message.clone(),
        session_customer_id: row.customer_id.map(CustomerId::from_uuid),
        ticket_id: row.ticket_id.map(TicketId::from_uuid),
        customer_connected: connected,
    };
    let event = match message_event(interest, &posted) {
        Ok(event) => event,
        Err(ChatError::Storage(e)) => return Err(e),
        Err(other) => return Ok(Staged::Done(Err(other))),
    };
    // Only now, when the message will be stored: a refusal above takes no
    // seq, so the next message of the session has no gap.
    row.last_seq = message.seq;
    let row = message::ActiveModel {
        id: Set(message.id.as_uuid()),
        tenant_id: Set(tenant.get()),
        session_id: Set(session.as_uuid()),
        sender_type: Set(sender_type.as_str().to_owned()),
        sender_id: Set(sender_id.map(UserId::get)),
        customer_id: Set(customer_id.map(|c: CustomerId| c.as_uuid())),
        seq: Set(message.seq),
        body: Set(message.message.clone()),
        client_msg_id: Set(message.client_msg_id.clone()),
        created_at: Set(at),
    };
    Ok(Staged::New(Box::new(NewMessage {
        row,
        message,
        event,
    })))
}

impl MessageRepository for SeaOrmStore {
    fn append_message(
        &self,
        tenant: TenantId,
        session: SessionId,
        sender: Sender,
        body: MessageBody,
        client_msg_id: Option<ClientMsgId>,
        allowed: &'static [SessionStatus],
    ) -> PendingAppend {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return PendingAppend::ready(Err(ChatError::Storage(DbErr::Custom(
                "appending a message needs a Tokio runtime".into(),
            ))));
        };
        let (reply, answer) = oneshot::channel();
        let start = self.appends.push(AppendRequest {
            tenant,
            session,
            sender,
            body,
            key: client_msg_id,
            allowed,
            reply,
        });
        if start {
            let guard = Committer {
                queue: self.appends.clone(),
                finished: false,
            };
            runtime.spawn(self.clone().run_committer(guard));
        }
        PendingAppend::queued(answer)
    }

    async fn list_messages(
        &self,
        tenant: TenantId,
        session: SessionId,
        after_seq: i64,
        limit: PageSize,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        if find_session(&self.db, tenant, session).await?.is_none() {
            return Err(ChatError::NotFound);
        }
        let rows = message::Entity::find()
            .filter(message::Column::TenantId.eq(tenant.get()))
            .filter(message::Column::SessionId.eq(session.as_uuid()))
            .filter(message::Column::Seq.gt(after_seq))
            .order_by_asc(message::Column::Seq)
            .limit(limit.get())
            .all(&self.db)
            .await?;
        convert_all(rows)
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::DbBackend;

    use sea_orm::ActiveValue::Set;

    use super::{
        BatchFailure, BatchWrites, Guard, LockWait, SessionGuard, build_lock_statement,
        build_write_statement, lock_statement, message, padded, power_of_two_chunks,
        write_statement,
    };
    #[cfg(feature = "postgres")]
    use super::{EntityTrait, QueryFilter, QueryTrait, Statement, stored_with_keys};
    use crate::events::EventKind;
    use crate::ids::{SessionId, TenantId};
    #[cfg(feature = "postgres")]
    use crate::store::test_postgres::{
        generic_plan, migrated_postgres, until_a_lock_is_awaited, value,
    };

    /// Agent 7's "hello" to `session` of tenant 1, through `store`'s
    /// append queue.
    fn hello(
        store: &crate::store::SeaOrmStore,
        session: uuid::Uuid,
    ) -> crate::repository::PendingAppend {
        use crate::repository::MessageRepository;
        store.append_message(
            TenantId::new(1).unwrap(),
            SessionId::from_uuid(session),
            crate::model::Sender::Agent(crate::ids::UserId::new(7).unwrap()),
            crate::validate::MessageBody::parse("hello".to_owned(), 100).unwrap(),
            None,
            &[crate::model::SessionStatus::Open],
        )
    }

    /// An agent's message of tenant 1 with `seq` in `session`, and its
    /// outbox row; `nulls` leaves the optional columns empty.
    fn message_rows(
        session: uuid::Uuid,
        seq: i64,
        at: chrono::DateTime<chrono::Utc>,
        nulls: bool,
    ) -> (message::ActiveModel, super::outbox::ActiveModel) {
        let message = message::ActiveModel {
            id: Set(uuid::Uuid::now_v7()),
            tenant_id: Set(1),
            session_id: Set(session),
            sender_type: Set("agent".into()),
            sender_id: Set((!nulls).then_some(7)),
            customer_id: Set((!nulls).then(uuid::Uuid::now_v7)),
            seq: Set(seq),
            body: Set(format!("message {seq}")),
            client_msg_id: Set((!nulls).then(|| format!("k{seq}"))),
            created_at: Set(at),
        };
        let (event, _) = crate::store::outbox_row(
            None,
            TenantId::new(1).unwrap(),
            (!nulls).then_some(SessionId::from_uuid(session)),
            EventKind::MessagePosted,
            &serde_json::json!({"seq": seq}),
        )
        .unwrap();
        (message, event)
    }

    /// `n` messages over `sessions` sessions; `nulls` leaves the optional
    /// columns empty (sea-query must bind a null as a value too, or cached
    /// SQL would not fit); `guarded` adds a [`Guard`] of those sessions.
    fn writes(n: usize, sessions: usize, nulls: bool, guarded: bool) -> BatchWrites {
        let at = crate::model::now();
        let ids: Vec<uuid::Uuid> = (0..sessions).map(|_| uuid::Uuid::now_v7()).collect();
        let (messages, outbox) = (0..n)
            .map(|i| message_rows(ids[i % sessions], i as i64 + 1, at, nulls))
            .unzip();
        let mut seqs: Vec<(uuid::Uuid, i64)> = ids.into_iter().zip(1..).collect();
        seqs.sort_unstable();
        let guard = guarded.then(|| Guard {
            count: seqs.len() as i64,
            sessions: SessionGuard::padded(
                seqs.iter()
                    .map(|&(id, seq)| SessionGuard {
                        id,
                        last_seq: seq - 1,
                        status: "active".into(),
                        customer_id: (!nulls).then(uuid::Uuid::now_v7),
                        ticket_id: None,
                        customer_user: (!nulls).then_some(950),
                        customer_connected: !nulls,
                    })
                    .collect(),
            ),
        });
        BatchWrites {
            messages,
            outbox,
            seqs: padded(seqs),
            guard,
            at,
        }
    }

    #[test]
    fn the_cached_write_statement_binds_what_sea_query_builds() {
        for backend in [DbBackend::Sqlite, DbBackend::Postgres] {
            for (n, sessions) in [(1, 1), (3, 2), (8, 3), (45, 5)] {
                // Fill the cache with one kind of rows, bind the other.
                for (nulls, guarded) in [(false, false), (true, false), (false, true), (true, true)]
                {
                    let _ = write_statement(backend, writes(n, sessions, !nulls, guarded));
                    let rows = writes(n, sessions, nulls, guarded);
                    let copy = BatchWrites {
                        messages: rows.messages.clone(),
                        outbox: rows.outbox.clone(),
                        seqs: rows.seqs.clone(),
                        guard: rows
                            .guard
                            .clone()
                            .filter(|_| backend == DbBackend::Postgres),
                        at: rows.at,
                    };
                    let cached = write_statement(backend, rows);
                    let built = build_write_statement(backend, copy);
                    let case = format!(
                        "{backend:?}, {n} messages, {sessions} sessions, {nulls}, {guarded}"
                    );
                    assert_eq!(cached.sql, built.sql, "{case}");
                    assert_eq!(cached.values, built.values, "{case}");
                    assert_eq!(
                        cached
                            .sql
                            .contains(r#"FOR UPDATE OF "livechat_sessions" NOWAIT"#),
                        guarded && backend == DbBackend::Postgres,
                        "{case}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_cached_lock_statement_binds_what_sea_query_builds() {
        let at = crate::model::now();
        for backend in [DbBackend::Sqlite, DbBackend::Postgres] {
            for (n, k) in [(1, 0), (2, 0), (8, 0), (1, 1), (2, 4), (8, 8)] {
                let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
                let names: Vec<String> = (0..k).map(|i| format!("key {i}")).collect();
                let keys: Vec<(uuid::Uuid, &str)> = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (ids[i % n], name.as_str()))
                    .collect();
                // The first call may fill the cache; the second binds it.
                for wait in [LockWait::Optimistic, LockWait::Bounded] {
                    let _ = lock_statement(backend, ids.clone(), keys.clone(), at, wait);
                    let cached = lock_statement(backend, ids.clone(), keys.clone(), at, wait);
                    let built = build_lock_statement(backend, ids.clone(), keys.clone(), at, wait);
                    let case = format!("{backend:?}, {n} ids, {k} keys, {wait:?}");
                    assert_eq!(cached.sql, built.sql, "{case}");
                    assert_eq!(cached.values, built.values, "{case}");
                    assert_eq!(cached.db_backend, built.db_backend);
                    if backend == DbBackend::Postgres {
                        assert_eq!(
                            cached.sql.ends_with("FOR UPDATE"),
                            wait == LockWait::Bounded,
                            "{}",
                            cached.sql
                        );
                    }
                }
            }
        }
    }

    /// Issue #5: the lock statement finds a batch's stored keys with one
    /// index lookup per (session, key) pair, once per statement, not once
    /// per locked session and key (nor by a scan, as a row-value `IN`).
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn the_lock_statement_looks_each_key_up_once_on_sqlite() {
        use sea_orm_migration::MigratorTrait;
        // One pooled connection: the in-memory database lives as long.
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
        let names: Vec<String> = (0..8).map(|i| format!("key {i}")).collect();
        let keys = names
            .iter()
            .enumerate()
            .map(|(i, name)| (ids[i % 4], name.as_str()))
            .collect();
        let at = crate::model::now();
        let lock = build_lock_statement(DbBackend::Sqlite, ids, keys, at, LockWait::Optimistic);
        let plan = crate::store::test_sqlite::sqlite_plan(&db, lock).await;
        let text = plan.join("\n");
        assert!(!text.contains("SCAN livechat_messages"), "{text}");
        assert!(text.contains("MULTI-INDEX OR"), "{text}");
        let lookups = plan
            .iter()
            .filter(|line| line.contains("livechat_messages_client_msg_id"))
            .count();
        assert_eq!(lookups, 8, "one per pair: {text}");
        assert!(
            plan.iter().any(|line| line.starts_with("SCALAR SUBQUERY")),
            "the key count is not correlated with each session: {text}"
        );
    }

    /// Issue #5: on PostgreSQL the lock statement and the read of
    /// originals look each of a batch's keys up in the index of keys, under
    /// the generic plan a prepared statement comes to, even when the
    /// statistics were taken while no message had a key (the `OR` of pairs
    /// then read every keyed message).
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn keys_are_looked_up_one_by_one_on_postgres_whatever_the_statistics() {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        let db = migrated_postgres().await;
        let session = uuid::Uuid::now_v7();
        let insert = |from: i64, to: i64, key: &str| {
            format!(
                "INSERT INTO livechat_messages \
                 (id, tenant_id, session_id, sender_type, seq, body, client_msg_id, created_at) \
                 SELECT gen_random_uuid(), 1, '{session}', 'customer', g, 'hello', {key}, now() \
                 FROM generate_series({from}, {to}) g"
            )
        };
        for sql in [
            format!(
                "INSERT INTO livechat_sessions (id, tenant_id, origin, status, created_at, updated_at) \
                 VALUES ('{session}', 1, 'widget', 'active', now(), now())"
            ),
            insert(1, 2000, "NULL"),
            "ANALYZE livechat_messages".to_owned(),
            insert(2001, 4000, "'key ' || g"),
        ] {
            db.execute_unprepared(&sql).await.unwrap();
        }
        let names: Vec<String> = (3001..3005).map(|i| format!("key {i}")).collect();
        let keys: Vec<(uuid::Uuid, &str)> = names.iter().map(|n| (session, n.as_str())).collect();
        let tx = db.begin().await.unwrap();
        let lock = build_lock_statement(
            DbBackend::Postgres,
            vec![session],
            keys.clone(),
            crate::model::now(),
            LockWait::Optimistic,
        );
        let originals = message::Entity::find()
            .filter(stored_with_keys(DbBackend::Postgres, keys))
            .build(DbBackend::Postgres);
        for (name, statement, rows) in [("lock_plan", lock, 1), ("originals_plan", originals, 4)] {
            let plan = generic_plan(&tx, name, statement).await;
            let text = plan.join("\n");
            // Every read of the messages is an index lookup, and one of
            // them looks a pair up.
            let nodes: Vec<Vec<&str>> = plan
                .iter()
                .enumerate()
                .filter(|(_, line)| line.contains(" on livechat_messages"))
                .map(|(i, _)| {
                    plan[i + 1..]
                        .iter()
                        .take_while(|line| !line.contains("->"))
                        .map(String::as_str)
                        .collect()
                })
                .collect();
            assert!(!nodes.is_empty(), "{text}");
            for node in &nodes {
                assert!(node.iter().any(|l| l.contains("Index Cond:")), "{text}");
                assert!(!node.iter().any(|l| l.contains("Rows Removed")), "{text}");
            }
            assert!(
                nodes.iter().flatten().any(|l| l.contains("Index Cond:")
                    && l.contains("session_id")
                    && l.contains("client_msg_id")),
                "{text}"
            );
            assert!(
                plan[0].contains(&format!("rows={rows} ")),
                "{name} returns {rows} row(s): {text}"
            );
        }
        tx.rollback().await.unwrap();
    }

    /// Issue #5: on PostgreSQL the lock statement counts a session's live
    /// customer connections through the index of joins and the connections'
    /// primary key, under the generic plan a prepared statement comes to,
    /// even when the statistics were taken while the tables were empty and
    /// 20,000 connections arrived since (a deploy: every client reconnects
    /// at once). The guarded write's check of a session's customer
    /// connections reads none under the same statistics when none follows
    /// the session.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn customer_connections_are_looked_up_by_index_on_postgres_whatever_the_statistics() {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        let db = migrated_postgres().await;
        let session = uuid::Uuid::now_v7();
        // `n` connections from `from` on, each joined to one of `sessions`
        // sessions (the first being `session`).
        let connections = |from: i64, n: i64, sessions: i64| {
            [
                format!(
                    "INSERT INTO livechat_connections \
                     (id, tenant_id, role, customer_id, node_id, expires_at) \
                     SELECT ('00000000-0000-7000-8000-' || lpad(g::text, 12, '0'))::uuid, 1, \
                     'customer', gen_random_uuid(), 'node', now() + interval '1 hour' \
                     FROM generate_series({from}, {from} + {n} - 1) g"
                ),
                format!(
                    "INSERT INTO livechat_connection_joins (connection_id, session_id, tenant_id) \
                     SELECT ('00000000-0000-7000-8000-' || lpad(g::text, 12, '0'))::uuid, \
                     CASE WHEN g % {sessions} = 0 THEN '{session}'::uuid \
                     ELSE ('00000000-0000-7000-9000-' || lpad((g % {sessions})::text, 12, '0'))::uuid END, 1 \
                     FROM generate_series({from}, {from} + {n} - 1) g"
                ),
            ]
        };
        db.execute_unprepared(&format!(
            "INSERT INTO livechat_sessions (id, tenant_id, origin, status, created_at, updated_at) \
             VALUES ('{session}', 1, 'widget', 'OPEN', now(), now())"
        ))
        .await
        .unwrap();
        for sql in connections(1, 0, 2) {
            db.execute_unprepared(&sql).await.unwrap();
        }
        db.execute_unprepared("ANALYZE livechat_connections, livechat_connection_joins")
            .await
            .unwrap();
        for sql in connections(5, 20_000, 5_000) {
            db.execute_unprepared(&sql).await.unwrap();
        }
        let tx = db.begin().await.unwrap();
        let lock = build_lock_statement(
            DbBackend::Postgres,
            vec![session],
            Vec::new(),
            crate::model::now(),
            LockWait::Optimistic,
        );
        let plan = generic_plan(&tx, "lock_plan", lock).await;
        let text = plan.join("\n");
        assert!(!text.contains("Seq Scan on livechat_connection"), "{text}");
        assert!(
            text.contains("Index Scan using livechat_connections_pkey"),
            "{text}"
        );
        assert!(!text.contains("Rows Removed"), "{text}");
        tx.rollback().await.unwrap();
        // The guarded write of a message to a session no connection
        // follows reads no connection at all.
        let writes = writes(1, 1, true, true);
        insert_session(&db, writes.seqs[0].0, 0, "active").await;
        let plan = analyzed_plan(&db, &write_statement(DbBackend::Postgres, writes)).await;
        assert_eq!(connection_rows(&plan[0]["Plan"]), 0, "{plan:#}");
    }

    /// Issue #5: a batch read without a lock ([`LockWait::Optimistic`])
    /// writes in one statement of its own that stores everything only if
    /// each session is free and still as read (`last_seq`, status,
    /// customer, ticket, customer connected); otherwise it fails at once as a conflict and
    /// stores nothing, so the batch can be stored again under locks.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_guarded_write_stores_nothing_if_a_session_is_held_or_changed() {
        use sea_orm::ConnectionTrait;
        use sea_orm::{DbErr, PaginatorTrait};
        let db = migrated_postgres().await;
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        for id in [a, b] {
            db.execute_unprepared(&format!(
                "INSERT INTO livechat_sessions (id, tenant_id, origin, status, created_at, updated_at) \
                 VALUES ('{id}', 1, 'widget', 'active', now(), now())"
            ))
            .await
            .unwrap();
        }
        // One message to each session, as staged from `last_seq`, `status`
        // and whether a customer is connected.
        let batch = |last_seq: [i64; 2], status: &str, connected: bool| {
            let at = crate::model::now();
            let mut writes = BatchWrites {
                messages: Vec::new(),
                outbox: Vec::new(),
                seqs: Vec::new(),
                guard: Some(Guard {
                    count: 2,
                    sessions: Vec::new(),
                }),
                at,
            };
            for (id, last_seq) in [a, b].into_iter().zip(last_seq) {
                let (message, event) = message_rows(id, last_seq + 1, at, true);
                writes.messages.push(message);
                writes.outbox.push(event);
                writes.seqs.push((id, last_seq + 1));
                if let Some(guard) = &mut writes.guard {
                    guard.sessions.push(SessionGuard {
                        id,
                        last_seq,
                        status: status.into(),
                        customer_id: None,
                        ticket_id: None,
                        customer_user: None,
                        customer_connected: connected,
                    });
                }
            }
            write_statement(DbBackend::Postgres, writes)
        };
        let conflict = |result: Result<sea_orm::ExecResult, DbErr>| {
            let failure = BatchFailure::autocommit(result.expect_err("the write fails"));
            assert!(failure.conflict(), "{:?}", failure.error);
        };
        let stored = || async {
            let messages = message::Entity::find().count(&db).await.unwrap();
            let outbox = super::outbox::Entity::find().count(&db).await.unwrap();
            let seqs: String = value(
                &db,
                "SELECT string_agg(last_seq::text, ',' ORDER BY id) AS v FROM livechat_sessions",
            )
            .await;
            (messages, outbox, seqs)
        };

        db.execute_raw(batch([0, 0], "active", false))
            .await
            .unwrap();
        assert_eq!(stored().await, (2, 2, "1,1".to_owned()));

        // Stale: staged from `last_seq` 0 while `b` is at 1 now.
        conflict(db.execute_raw(batch([1, 0], "active", false)).await);
        // Changed: staged from another status.
        conflict(db.execute_raw(batch([1, 1], "waiting", false)).await);
        // Changed: staged for a connected customer; none is.
        conflict(db.execute_raw(batch([1, 1], "active", true)).await);
        assert_eq!(stored().await, (2, 2, "1,1".to_owned()));

        // Held by another transaction: refused at once, not waited for (a
        // wait would last until the holder's rollback below; the bound is
        // generous for a loaded machine).
        let holder = holding(&db, b).await;
        let held = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            db.execute_raw(batch([1, 1], "active", false)),
        )
        .await
        .expect("no wait for the held row");
        conflict(held);
        holder.rollback().await.unwrap();
        assert_eq!(stored().await, (2, 2, "1,1".to_owned()));

        // Free again, the write goes through. On a loaded machine the first
        // attempt once still met the row locked just after the holder's
        // rollback (55P03, its cause not found): a conflict is tried again
        // for up to 5 s, anything else fails at once.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match db.execute_raw(batch([1, 1], "active", false)).await {
                Ok(_) => break,
                Err(e)
                    if tokio::time::Instant::now() < deadline
                        && BatchFailure::autocommit(e.clone()).conflict() =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("the write after the rollback: {e}"),
            }
        }
        assert_eq!(stored().await, (4, 4, "2,2".to_owned()));
    }

    /// Issue #5: the guarded write finds the sessions' live customer
    /// connections once for the batch, so it reads `livechat_connections`
    /// at most once over whatever the statistics say. With the sessions
    /// analyzed at a few rows and the connections not yet analyzed (as
    /// autovacuum left them in the benchmark's cross-node scenario), a
    /// per-session count was planned as a nested loop that scanned the
    /// whole connections table once per joined connection: here 4,400 rows
    /// read for 44.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn the_guard_reads_the_connections_once_whatever_the_statistics() {
        use sea_orm::ConnectionTrait;
        let db = migrated_postgres().await;
        let writes = writes(4, 4, true, true);
        let mut sessions: Vec<(uuid::Uuid, i64)> =
            writes.seqs.iter().map(|&(id, seq)| (id, seq - 1)).collect();
        sessions.dedup();
        with_cross_node_statistics(&db, &sessions).await;
        let statement = write_statement(DbBackend::Postgres, writes);
        let plan = analyzed_plan(&db, &statement).await;
        let read = connection_rows(&plan[0]["Plan"]);
        assert!(read <= 44, "{read} rows read: {plan:#}");
        // And the write went through: no session has a customer connected.
        db.execute_raw(statement).await.unwrap();
    }

    /// Issue #5: the staging read (the lock statement, with or without
    /// its lock) reads `livechat_connections` at most once per joined
    /// connection under the statistics of
    /// [`the_guard_reads_the_connections_once_whatever_the_statistics`],
    /// and counts each session's live customer connections.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn the_staging_read_reads_the_connections_once_whatever_the_statistics() {
        use sea_orm::ConnectionTrait;
        let db = migrated_postgres().await;
        let mut sessions: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
        sessions.sort_unstable();
        let at_zero: Vec<(uuid::Uuid, i64)> = sessions.iter().map(|&id| (id, 0)).collect();
        with_cross_node_statistics(&db, &at_zero).await;
        // Two live customer connections follow the first session, an
        // expired one the second.
        for (session, expires) in [
            (sessions[0], "now() + interval '1 hour'"),
            (sessions[0], "now() + interval '1 hour'"),
            (sessions[1], "now() - interval '1 second'"),
        ] {
            let connection = uuid::Uuid::now_v7();
            db.execute_unprepared(&format!(
                "INSERT INTO livechat_connections \
                 (id, tenant_id, role, customer_id, node_id, expires_at) \
                 VALUES ('{connection}', 1, 'customer', gen_random_uuid(), 'node', {expires}); \
                 INSERT INTO livechat_connection_joins (connection_id, session_id, tenant_id) \
                 VALUES ('{connection}', '{session}', 1)"
            ))
            .await
            .unwrap();
        }
        for wait in [LockWait::Optimistic, LockWait::Bounded] {
            let statement = build_lock_statement(
                DbBackend::Postgres,
                sessions.clone(),
                Vec::new(),
                crate::model::now(),
                wait,
            );
            let plan = analyzed_plan(&db, &statement).await;
            let read = connection_rows(&plan[0]["Plan"]);
            assert!(read <= 47, "{wait:?}: {read} rows read: {plan:#}");
            let counts: Vec<i64> = db
                .query_all_raw(statement)
                .await
                .unwrap()
                .iter()
                .map(|row| row.try_get("", super::CUSTOMER_CONNECTIONS).unwrap())
                .collect();
            assert_eq!(counts, [2, 0, 0, 0], "{wait:?}");
        }
    }

    /// `sessions` (id, `last_seq`) as `active` sessions of tenant 1, each followed by 10
    /// agent connections, 4 more agent connections following none, and
    /// the statistics autovacuum left in the benchmark's cross-node
    /// scenario: sessions, messages and outbox analyzed at a few rows, the
    /// connections and their joins never analyzed. Under them PostgreSQL
    /// planned a per-session count of connections as a nested loop that
    /// scanned the whole connections table once per joined connection.
    #[cfg(feature = "postgres")]
    async fn with_cross_node_statistics(
        db: &sea_orm::DatabaseConnection,
        sessions: &[(uuid::Uuid, i64)],
    ) {
        use sea_orm::ConnectionTrait;
        for (i, &(id, last_seq)) in sessions.iter().enumerate() {
            insert_session(db, id, last_seq, "active").await;
            for j in 0..10 {
                let connection = uuid::Uuid::now_v7();
                db.execute_unprepared(&format!(
                    "INSERT INTO livechat_connections \
                     (id, tenant_id, role, agent_id, node_id, expires_at) \
                     VALUES ('{connection}', 1, 'agent', {}, 'node', now() + interval '1 hour'); \
                     INSERT INTO livechat_connection_joins (connection_id, session_id, tenant_id) \
                     VALUES ('{connection}', '{id}', 1)",
                    i * 10 + j + 1
                ))
                .await
                .unwrap();
            }
        }
        db.execute_unprepared(
            "INSERT INTO livechat_connections (id, tenant_id, role, agent_id, node_id, expires_at) \
             SELECT gen_random_uuid(), 1, 'agent', 100 + g, 'node', now() + interval '1 hour' \
             FROM generate_series(1, 4) g; \
             ANALYZE livechat_sessions, livechat_messages, livechat_outbox",
        )
        .await
        .unwrap();
    }

    /// Rows a plan node and those under it read from
    /// `livechat_connections`: returned and filtered out, times loops.
    #[cfg(feature = "postgres")]
    fn connection_rows(node: &serde_json::Value) -> u64 {
        let own = if node["Relation Name"] == "livechat_connections" {
            let count = |key: &str| node[key].as_u64().unwrap_or(0);
            (count("Actual Rows") + count("Rows Removed by Filter")) * count("Actual Loops")
        } else {
            0
        };
        own + node["Plans"]
            .as_array()
            .map_or(0, |plans| plans.iter().map(connection_rows).sum())
    }

    /// Issue #5: the guard's rows are padded to a power of two with rows
    /// that match no session, so PostgreSQL locks and checks each session
    /// of the batch once: the plan's lock sees 3 rows for 3 sessions (with
    /// the last session repeated, it saw 4), and a session whose id is the
    /// fillers' (nil) is neither locked nor written.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn the_guard_is_padded_with_rows_that_match_no_session() {
        use sea_orm::ConnectionTrait;
        let db = migrated_postgres().await;
        let writes = writes(3, 3, true, true);
        let sessions = writes.guard.as_ref().map(|g| g.sessions.len());
        assert_eq!(sessions, Some(4));
        // Each session at the `last_seq` the guard expects (seq - 1).
        let mut sessions = writes.seqs.clone();
        sessions.dedup();
        let expected: Vec<String> = sessions.iter().map(|(_, seq)| seq.to_string()).collect();
        sessions.push((uuid::Uuid::nil(), 1));
        for (id, seq) in sessions {
            insert_session(&db, id, seq - 1, "active").await;
        }
        let statement = write_statement(DbBackend::Postgres, writes);

        let plan = analyzed_plan(&db, &statement).await;
        fn locked_rows(node: &serde_json::Value) -> Option<u64> {
            if node["Node Type"] == "LockRows" {
                return node["Actual Rows"].as_u64();
            }
            node.get("Plans")?.as_array()?.iter().find_map(locked_rows)
        }
        let root = &plan[0]["Plan"];
        assert_eq!(locked_rows(root), Some(3), "{plan:#}");

        db.execute_raw(statement).await.unwrap();
        let seqs: String = value(
            &db,
            &format!(
                "SELECT string_agg(last_seq::text, ',' ORDER BY id = '{}', id) AS v \
                 FROM livechat_sessions",
                uuid::Uuid::nil()
            ),
        )
        .await;
        assert_eq!(seqs, format!("{},0", expected.join(",")));
    }

    /// Issue #5: a node that knows a session from its earlier batches
    /// writes without reading it, and its write checks what it knew: a
    /// customer who connected or left since, or a status changed by
    /// another path, is seen by the next append as by a fresh read (the
    /// `customer_connected` of each agent message's event, and the
    /// refusal once the session is closed).
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_remembered_session_is_checked_by_the_write() {
        use sea_orm::{ConnectionTrait, QueryOrder};
        let db = migrated_postgres().await;
        let (session, customer) = customer_session(&db, Some(950), "OPEN").await;
        let store = crate::store::SeaOrmStore::new(db.clone());
        let send = || hello(&store, session);
        let connection = uuid::Uuid::now_v7();
        let steps = [
            String::new(),
            customer_connection(connection, customer, session),
            String::new(),
            format!("DELETE FROM livechat_connections WHERE id = '{connection}'"),
        ];
        for step in steps {
            if !step.is_empty() {
                db.execute_unprepared(&step).await.unwrap();
            }
            send().await.unwrap();
        }
        let connected: Vec<bool> = super::outbox::Entity::find()
            .order_by_asc(super::outbox::Column::Id)
            .all(&db)
            .await
            .unwrap()
            .into_iter()
            .map(|row| {
                let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
                payload["customer_connected"].as_bool().unwrap()
            })
            .collect();
        assert_eq!(connected, [false, true, true, false]);

        db.execute_unprepared(&format!(
            "UPDATE livechat_sessions SET status = 'CLOSED' WHERE id = '{session}'"
        ))
        .await
        .unwrap();
        assert!(matches!(send().await, Err(crate::ChatError::SessionClosed)));
        let seqs: Vec<i64> = message::Entity::find()
            .order_by_asc(message::Column::Seq)
            .all(&db)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    /// PostgreSQL: an append that waited for a session row (another
    /// transaction held it: here a silent customer connection's removal,
    /// whose make-up of missed replies ran before this reply existed)
    /// counts the customer's connections as that transaction left them.
    /// Its `FOR UPDATE` reads its subqueries as of its own start, which
    /// still counted the removed connection: the reply was neither seen
    /// nor notified.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn an_append_that_waited_counts_connections_as_committed() {
        use sea_orm::ConnectionTrait;
        let db = migrated_postgres().await;
        let (session, customer) = customer_session(&db, Some(951), "OPEN").await;
        let connection = uuid::Uuid::now_v7();
        db.execute_unprepared(&customer_connection(connection, customer, session))
            .await
            .unwrap();
        let store = crate::store::SeaOrmStore::new(db.clone());
        let held = holding(&db, session).await;
        held.execute_unprepared(&format!(
            "DELETE FROM livechat_connection_joins WHERE connection_id = '{connection}'; \
             DELETE FROM livechat_connections WHERE id = '{connection}'"
        ))
        .await
        .unwrap();
        let reply = tokio::spawn(hello(&store, session));
        // The append's lock statement starts, and waits.
        until_waiting_for_a_lock(&db).await;
        held.commit().await.unwrap();
        reply.await.unwrap().unwrap();
        let posted = super::outbox::Entity::find()
            .one(&db)
            .await
            .unwrap()
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(&posted.payload).unwrap();
        assert_eq!(payload["customer_connected"], false, "{payload}");
    }

    /// PostgreSQL: a close that waits for an append holding the session's
    /// row takes its time once it has the row, so the session's
    /// `closed_at` never precedes the `created_at` of a message stored
    /// before it (seen 0.3–3.5 ms apart under concurrent sends).
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_close_that_waited_is_timed_after_the_messages_before_it() {
        use crate::repository::SessionRepository;
        use sea_orm::ConnectionTrait;
        let db = migrated_postgres().await;
        let (session, _) = customer_session(&db, Some(952), "OPEN").await;
        db.execute_unprepared(&format!(
            "UPDATE livechat_sessions SET origin = 'customer' WHERE id = '{session}'"
        ))
        .await
        .unwrap();
        let store = crate::store::SeaOrmStore::new(db.clone());
        let held = holding(&db, session).await;
        let close = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .close_session(
                        TenantId::new(1).unwrap(),
                        SessionId::from_uuid(session),
                        crate::model::Sender::System,
                        &crate::RoutingPolicy::default(),
                    )
                    .await
            }
        });
        until_waiting_for_a_lock(&db).await;
        // The append holding the row stores its message now, and commits.
        held.execute_unprepared(&format!(
            "INSERT INTO livechat_messages \
             (id, tenant_id, session_id, sender_type, seq, body, created_at) \
             VALUES (gen_random_uuid(), 1, '{session}', 'customer', 1, 'last', clock_timestamp()); \
             UPDATE livechat_sessions SET last_seq = 1 WHERE id = '{session}'"
        ))
        .await
        .unwrap();
        held.commit().await.unwrap();
        let closed = close.await.unwrap().unwrap();
        let last = message::Entity::find().one(&db).await.unwrap().unwrap();
        assert!(
            closed.closed_at.unwrap() >= last.created_at,
            "closed at {:?}, message at {:?}",
            closed.closed_at,
            last.created_at
        );
    }

    /// A session the committer remembers as WAITING (its customer wrote
    /// while waiting) and that routing then assigned, without the
    /// committer: the agent's message is stored, not refused as
    /// `session_not_open` from memory; and a visitor's session linked to
    /// another customer meanwhile refuses the visitor from a fresh read.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_refusal_from_memory_is_decided_again_from_a_fresh_read() {
        use crate::ids::CustomerId;
        use crate::model::{Sender, SessionStatus};
        use crate::repository::MessageRepository;
        use sea_orm::ConnectionTrait;
        let db = migrated_postgres().await;
        let (session, customer) = customer_session(&db, None, "WAITING").await;
        let store = crate::store::SeaOrmStore::new(db.clone());
        let from_customer = |who: uuid::Uuid| {
            store.append_message(
                TenantId::new(1).unwrap(),
                SessionId::from_uuid(session),
                Sender::Customer(CustomerId::from_uuid(who)),
                crate::validate::MessageBody::parse("waiting".to_owned(), 100).unwrap(),
                None,
                &[SessionStatus::Waiting, SessionStatus::Open],
            )
        };
        assert_eq!(from_customer(customer).await.unwrap().message.seq, 1);
        // An agent's message while it waits is refused (from memory).
        assert!(matches!(
            hello(&store, session).await,
            Err(crate::ChatError::SessionNotOpen)
        ));
        db.execute_unprepared(&format!(
            "UPDATE livechat_sessions SET status = 'OPEN', agent_id = 7, \
             assigned_at = now() WHERE id = '{session}'"
        ))
        .await
        .unwrap();
        assert_eq!(hello(&store, session).await.unwrap().message.seq, 2);

        let other = uuid::Uuid::now_v7();
        db.execute_unprepared(&format!(
            "INSERT INTO livechat_customers (id, tenant_id, created_at) \
             VALUES ('{other}', 1, now()); \
             UPDATE livechat_sessions SET customer_id = '{other}' WHERE id = '{session}'"
        ))
        .await
        .unwrap();
        assert_eq!(from_customer(other).await.unwrap().message.seq, 3);
        assert!(matches!(
            from_customer(customer).await,
            Err(crate::ChatError::NotFound)
        ));
        assert_eq!(stored_in(&db, session).await, 3);
    }

    #[cfg(feature = "postgres")]
    /// The committer writes consecutive batches on one connection, kept
    /// out of the pool (issue #5: given back, sqlx pinged it once per
    /// batch); one idle for over [`POOL_PING_AFTER_IDLE`] whose backend
    /// died is replaced before the next batch, which stores; and the
    /// pool's `close` does not wait for it.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn the_committer_keeps_its_connection_and_replaces_a_dead_one() {
        use crate::store::POOL_PING_AFTER_IDLE;
        use crate::store::writer::Writer;
        use sea_orm::ConnectionTrait;
        use std::time::Instant;
        let db = migrated_postgres().await;
        let session = uuid::Uuid::now_v7();
        db.execute_unprepared(&format!(
            "INSERT INTO livechat_sessions \
             (id, tenant_id, origin, status, created_at, updated_at) \
             VALUES ('{session}', 1, 'agent', 'OPEN', now(), now())"
        ))
        .await
        .unwrap();
        let store = crate::store::SeaOrmStore::new(db.clone());
        let send = || hello(&store, session);
        // The held connection's backend, left as it was.
        let held_pid = || async {
            let (conn, used) = store.appends.held.lock().unwrap().take().unwrap();
            let writer = Writer::new(conn);
            let pid: i32 = value(&writer, "SELECT pg_backend_pid() AS v").await;
            *store.appends.held.lock().unwrap() = Some((writer.into_conn(), used));
            pid
        };

        assert_eq!(send().await.unwrap().message.seq, 1);
        let first = held_pid().await;
        assert_eq!(send().await.unwrap().message.seq, 2);
        assert_eq!(held_pid().await, first);

        db.execute_unprepared(&format!("SELECT pg_terminate_backend({first})"))
            .await
            .unwrap();
        let gone = format!("SELECT 1 FROM pg_stat_activity WHERE pid = {first}");
        while db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, gone.clone()))
            .await
            .unwrap()
            .is_some()
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if let Some((_, used)) = store.appends.held.lock().unwrap().as_mut() {
            *used = Instant::now()
                .checked_sub(POOL_PING_AFTER_IDLE * 2)
                .unwrap();
        }
        assert_eq!(send().await.unwrap().message.seq, 3);
        assert_ne!(held_pid().await, first);

        tokio::time::timeout(std::time::Duration::from_secs(10), db.close())
            .await
            .expect("the pool closes while the committer holds its connection")
            .unwrap();
    }

    /// The committer's connection, dead within [`POOL_PING_AFTER_IDLE`]
    /// of its last batch (so not pinged), fails the next batch's first
    /// statement. A read (a session the queue does not know) stored
    /// nothing: the batch is stored on a new connection. A write (every
    /// session known) has an unknown outcome: the batch is settled on
    /// another connection ([`SeaOrmStore::resolve_lost_write`]), which
    /// finds nothing stored and stores it, once. Either way the sender
    /// gets its message, not `503`.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_batch_lost_with_its_connection_is_stored_on_another() {
        use sea_orm::ConnectionTrait;
        let db = migrated_postgres().await;
        let (known, new) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        for session in [known, new] {
            insert_session(&db, session, 0, "OPEN").await;
        }
        let store = crate::store::SeaOrmStore::new(db.clone());
        // The committer's backend: the last to run a batch's write, or the
        // read of its sessions.
        let kill_committer = || async {
            let pid: i32 = value(
                &db,
                "SELECT pid AS v FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND (query LIKE 'WITH%' OR query LIKE '%FROM \"livechat_sessions\"%') \
                 ORDER BY state_change DESC LIMIT 1",
            )
            .await;
            db.execute_unprepared(&format!("SELECT pg_terminate_backend({pid}, 10000)"))
                .await
                .unwrap();
        };
        assert_eq!(hello(&store, known).await.unwrap().message.seq, 1);
        assert_eq!(hello(&store, known).await.unwrap().message.seq, 2);
        // Within a second of the last batch: the connection is not pinged.
        kill_committer().await;
        assert_eq!(hello(&store, new).await.unwrap().message.seq, 1);
        kill_committer().await;
        assert_eq!(hello(&store, known).await.unwrap().message.seq, 3);
        assert_eq!(hello(&store, known).await.unwrap().message.seq, 4);
        for (session, count) in [(known, 4), (new, 1)] {
            assert_eq!(stored_in(&db, session).await, count);
        }
    }

    /// A lost write that did commit keeps its outcome: settling it finds
    /// its messages under the sessions' lock and stores nothing more; one
    /// that did not is stored in the settling transaction, with the next
    /// `seq`; one still running on the server is waited for (it holds its
    /// sessions) and then found.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn settling_a_lost_write_stores_its_messages_once() {
        use super::{AppendRequest, BatchResult};
        use crate::store::writer::{Conn, Writer};
        use sea_orm::ConnectionTrait;
        use tokio::sync::oneshot;
        let db = migrated_postgres().await;
        let session = uuid::Uuid::now_v7();
        insert_session(&db, session, 0, "OPEN").await;
        let store = crate::store::SeaOrmStore::new(db.clone());
        let batch = [AppendRequest {
            tenant: TenantId::new(1).unwrap(),
            session: SessionId::from_uuid(session),
            sender: crate::model::Sender::Agent(crate::ids::UserId::new(7).unwrap()),
            body: crate::validate::MessageBody::parse("hello".to_owned(), 100).unwrap(),
            key: None,
            allowed: &[crate::model::SessionStatus::Open],
            reply: oneshot::channel().0,
        }];
        let writer = Writer::new(Conn::acquire(&db).await.unwrap());
        let seq = |result: &BatchResult| {
            result
                .as_ref()
                .ok()
                .map(|(o, _)| o[0].as_ref().unwrap().message.seq)
        };
        // The batch staged as the unlocked path does: its write, the
        // write's message ids, and its outcomes and events.
        let stage = || async {
            let staged = store
                .stage_batch(&writer, &batch, LockWait::Optimistic, None)
                .await
                .unwrap();
            let writes = staged.writes.unwrap();
            let ids = writes.message_ids();
            (writes, ids, (staged.outcomes, staged.events))
        };

        // Committed, its answer lost.
        let (writes, ids, lost) = stage().await;
        writer
            .execute_raw(write_statement(DbBackend::Postgres, writes))
            .await
            .unwrap();
        let settled = store.resolve_lost_write(&batch, lost, &ids).await;
        assert_eq!(seq(&settled), Some(1));
        assert_eq!(stored_in(&db, session).await, 1);

        // Never run.
        let (_, ids, lost) = stage().await;
        let settled = store.resolve_lost_write(&batch, lost, &ids).await;
        assert_eq!(seq(&settled), Some(2));
        assert_eq!(stored_in(&db, session).await, 2);

        // Still running on the server, its client gone: settling waits
        // for the session it holds, then finds its messages.
        let (writes, ids, lost) = stage().await;
        let running = holding(&db, session).await;
        let settling = tokio::spawn({
            let store = store.clone();
            async move {
                let settled = store.resolve_lost_write(&batch, lost, &ids).await;
                seq(&settled)
            }
        });
        until_a_lock_is_awaited(&db, "settling never waited for the session").await;
        running
            .execute_raw(write_statement(DbBackend::Postgres, writes))
            .await
            .unwrap();
        running.commit().await.unwrap();
        assert_eq!(settling.await.unwrap(), Some(3));
        assert_eq!(stored_in(&db, session).await, 3);
    }

    /// A session `id` of tenant 1 in `status` at `last_seq`, on
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    async fn insert_session(
        db: &sea_orm::DatabaseConnection,
        id: uuid::Uuid,
        last_seq: i64,
        status: &str,
    ) {
        use sea_orm::ConnectionTrait;
        db.execute_unprepared(&format!(
            "INSERT INTO livechat_sessions \
             (id, tenant_id, origin, status, last_seq, created_at, updated_at) \
             VALUES ('{id}', 1, 'widget', '{status}', {last_seq}, now(), now())"
        ))
        .await
        .unwrap();
    }

    /// A customer of tenant 1 (host user `user`, or a visitor) and a
    /// widget session of theirs in `status`: (session, customer).
    #[cfg(feature = "postgres")]
    async fn customer_session(
        db: &sea_orm::DatabaseConnection,
        user: Option<i64>,
        status: &str,
    ) -> (uuid::Uuid, uuid::Uuid) {
        use sea_orm::ConnectionTrait;
        let (session, customer) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let user = user.map_or_else(|| "NULL".to_owned(), |u| u.to_string());
        db.execute_unprepared(&format!(
            "INSERT INTO livechat_customers (id, tenant_id, user_id, created_at) \
             VALUES ('{customer}', 1, {user}, now()); \
             INSERT INTO livechat_sessions \
             (id, tenant_id, origin, status, customer_id, created_at, updated_at) \
             VALUES ('{session}', 1, 'widget', '{status}', '{customer}', now(), now())"
        ))
        .await
        .unwrap();
        (session, customer)
    }

    /// PostgreSQL statements registering `customer`'s live connection
    /// `connection` (for an hour) that follows `session`, of tenant 1.
    #[cfg(feature = "postgres")]
    fn customer_connection(
        connection: uuid::Uuid,
        customer: uuid::Uuid,
        session: uuid::Uuid,
    ) -> String {
        format!(
            "INSERT INTO livechat_connections \
             (id, tenant_id, role, customer_id, node_id, expires_at) \
             VALUES ('{connection}', 1, 'customer', '{customer}', 'node', \
             now() + interval '1 hour'); \
             INSERT INTO livechat_connection_joins (connection_id, session_id, tenant_id) \
             VALUES ('{connection}', '{session}', 1)"
        )
    }

    /// Waits (5 s at most) until a statement of the PostgreSQL server `db`
    /// waits for a lock.
    #[cfg(feature = "postgres")]
    async fn until_waiting_for_a_lock(db: &sea_orm::DatabaseConnection) {
        use sea_orm::ConnectionTrait;
        let waiting = "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
        for _ in 0..500 {
            let found = db
                .query_one_raw(sea_orm::Statement::from_string(
                    DbBackend::Postgres,
                    waiting,
                ))
                .await
                .unwrap();
            if found.is_some() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// A transaction of another connection holding `session`'s row, as a
    /// writer of another node does until it ends.
    #[cfg(feature = "postgres")]
    async fn holding(
        db: &sea_orm::DatabaseConnection,
        session: uuid::Uuid,
    ) -> sea_orm::DatabaseTransaction {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        let tx = db.begin().await.unwrap();
        tx.execute_unprepared(&format!(
            "SELECT 1 FROM livechat_sessions WHERE id = '{session}' FOR UPDATE"
        ))
        .await
        .unwrap();
        tx
    }

    /// How many messages `session` holds.
    #[cfg(feature = "postgres")]
    async fn stored_in(db: &sea_orm::DatabaseConnection, session: uuid::Uuid) -> u64 {
        use sea_orm::{ColumnTrait, PaginatorTrait, QueryFilter};
        message::Entity::find()
            .filter(message::Column::SessionId.eq(session))
            .count(db)
            .await
            .unwrap()
    }

    /// `EXPLAIN (ANALYZE, FORMAT JSON)` of `statement` on PostgreSQL, run
    /// in a transaction that is rolled back (it executes the statement).
    #[cfg(feature = "postgres")]
    async fn analyzed_plan(
        db: &sea_orm::DatabaseConnection,
        statement: &Statement,
    ) -> serde_json::Value {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        let tx = db.begin().await.unwrap();
        let plan = tx
            .query_one_raw(Statement {
                sql: format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", statement.sql),
                ..statement.clone()
            })
            .await
            .unwrap()
            .unwrap()
            .try_get("", "QUERY PLAN")
            .unwrap();
        tx.rollback().await.unwrap();
        plan
    }

    /// Issue #5: on a migrated SQLite database every foreign key a batch's
    /// write checks is deferred (`FkCounter` with P1 = 1 counts deferred
    /// violations; 0 would be an immediate check, which may abort a
    /// multi-row insert and so needs a statement journal), and a message
    /// whose session does not exist still fails: at commit, storing
    /// nothing.
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_checks_the_messages_session_at_commit() {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        use sea_orm_migration::MigratorTrait;
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let write = build_write_statement(DbBackend::Sqlite, writes(5, 2, false, false));
        let mut fk_counters = Vec::new();
        for part in write.sql.split(";\n").filter(|p| !p.is_empty()) {
            let program = db
                .query_all_raw(Statement::from_string(
                    DbBackend::Sqlite,
                    format!("EXPLAIN {part}"),
                ))
                .await
                .unwrap();
            for op in program {
                if op.try_get::<String>("", "opcode").unwrap() == "FkCounter" {
                    fk_counters.push(op.try_get::<i64>("", "p1").unwrap());
                }
            }
        }
        assert!(!fk_counters.is_empty(), "{}", write.sql);
        assert!(fk_counters.iter().all(|&p1| p1 == 1), "{fk_counters:?}");

        let tx = db.begin().await.unwrap();
        tx.execute_unprepared(&format!(
            "INSERT INTO livechat_messages (id, tenant_id, session_id, sender_type, seq, body, \
             created_at) VALUES ('{}', 1, '{}', 'agent', 1, 'hello', '2026-01-01 00:00:00')",
            uuid::Uuid::now_v7(),
            uuid::Uuid::now_v7(),
        ))
        .await
        .expect("checked at commit, not here");
        let refused = tx.commit().await.expect_err("no such session");
        assert!(
            super::BatchFailure::commit(refused).retryable(),
            "a refused commit stored nothing: its appends are retried alone"
        );
        let stored = db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT count(*) AS n FROM livechat_messages",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        assert_eq!(stored, 0);
    }

    #[test]
    fn sqlite_write_statements_run_without_a_statement_journal() {
        let statement = build_write_statement(DbBackend::Sqlite, writes(5, 2, false, false));
        let parts: Vec<&str> = statement
            .sql
            .split(";\n")
            .filter(|p| !p.is_empty())
            .collect();
        // Five messages and five outbox rows as 4 + 1 each, one update.
        assert_eq!(parts.len(), 2 + 2 + 1, "{}", statement.sql);
        for part in &parts {
            assert!(
                part.starts_with("INSERT OR FAIL ") || part.starts_with("UPDATE OR FAIL "),
                "{part}"
            );
        }
    }

    #[test]
    fn statement_shapes_are_powers_of_two() {
        assert_eq!(padded(vec![1, 2, 3]), vec![1, 2, 3, 3]);
        assert_eq!(padded(vec![7]), vec![7]);
        assert!(padded(Vec::<u8>::new()).is_empty());
        let sizes: Vec<usize> = power_of_two_chunks((0..45).collect::<Vec<_>>())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![32, 8, 4, 1]);
        let flat: Vec<i32> = power_of_two_chunks((0..45).collect()).concat();
        assert_eq!(flat, (0..45).collect::<Vec<_>>(), "order kept");
    }
}
