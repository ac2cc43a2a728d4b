//! SQLite's group commit with each batch's sync overlapped with the next
//! batch (issue #5, BENCHMARKS.md "What bounds the two write-path
//! targets").
//!
//! With `synchronous=FULL` a commit returns only after SQLite's `fsync` of
//! the WAL, and the server's core waits meanwhile: at 64 concurrent
//! senders it was 19% idle. So, when a batch holds more than one append
//! (the appends queue concurrently), the committer checks the pool's one
//! connection out for a run of up to [`MAX_RUN`] batches and sets it to
//! `synchronous=NORMAL`: a batch's `COMMIT` then writes the WAL without
//! syncing it, a blocking thread syncs the WAL file (`fdatasync`), and the
//! committer goes on with the next batch meanwhile. The rules that keep a
//! `201` meaning "on disk" and DESIGN.md invariant 4 (a client never sees
//! a `seq` that a power loss could take back):
//!
//! - A batch's callers are answered, and its events published, only once
//!   the WAL is synced after its commit, and after every earlier batch of
//!   the run is settled (in order: a later sync covers the earlier
//!   commits, and events are published in `seq` order).
//! - Nothing but the committer reads a commit before its sync: the run
//!   holds the pool's only connection, which goes back to the pool only
//!   after every sync of the run has ended, set to its own `synchronous`
//!   level again. Other requests wait for it (at most one run, as they
//!   wait behind a write transaction anyway). The committer's own reads
//!   of earlier batches (a `seq`, a repeated `client_msg_id`) decide
//!   answers that are given only after a later sync, which covers them.
//!   The passive checkpointer's connection syncs the WAL before it copies
//!   any of it into the database file.
//! - A failure gives the connection up closed, never back to the pool
//!   unsynced: a failed statement or commit (after the earlier batches'
//!   syncs, and a sync for a failed commit, which may have been written;
//!   the batch is then settled as [`SeaOrmStore::commit_batch`] would,
//!   through the pool).
//! - A failed sync fails that batch's callers and every later one's in
//!   the run with an error of a lost database (503; the outcome is
//!   unknown, as for a failed commit), stops the run, and closes the
//!   store's pool at once, so that nothing reads a commit the disk may
//!   not hold: later requests get 503 until the process restarts
//!   ([`close_after_failed_sync`]). The committer's task dropped midway
//!   (a panic, a cancelled task) closes the pool the same way, since its
//!   batches' syncs may still be running (`Held`'s `Drop`).
//!
//! This holds for the connections of the store's own pool and
//! checkpointer. Another connection opened on the same file (another
//! process, or a second pool of the host's) could read a run's commit
//! before its sync; [`crate::store::connect`]'s one-connection pool is
//! meant to be the file's only user.
//!
//! A lone append (a batch of one) commits with its own sync as before:
//! the run's two extra statements and the hand-off of the sync to another
//! thread would make it slower, and there is nothing to overlap.

use std::path::PathBuf;
use std::sync::Arc;

use sea_orm::DatabaseConnectionType;
use sea_orm::sqlx::SqlitePool;
use sea_orm::{ConnectionTrait, DbErr, RuntimeErr};
use tokio::task::JoinHandle;

use super::super::writer::{Conn, Writer};
use super::{AppendRequest, BatchFailure, LockWait, Outcomes, SeaOrmStore};
use crate::events::DomainEvent;

/// Most batches one run stores before it gives the connection back, so
/// that other requests waiting for it get a turn (one batch is at most
/// `MAX_BATCH` appends, about 1.3 ms for 32 on the benchmark machine).
pub(super) const MAX_RUN: usize = 8;

/// The WAL file of the store's SQLite database, when runs apply: a file
/// in WAL mode whose connection syncs each commit (`synchronous` `FULL`
/// or `EXTRA`).
#[derive(Debug, Clone)]
pub(super) struct WalFile {
    /// The WAL's path (`<database>-wal`).
    path: PathBuf,
    /// The connection's own `synchronous` level (2 or 3), restored after
    /// a run.
    level: i64,
}

impl WalFile {
    /// What `conn`'s database is: `None` when runs do not apply (memory
    /// database, another journal mode, `synchronous` below `FULL`).
    async fn of(writer: &Writer) -> Result<Option<Self>, DbErr> {
        let row = writer
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Sqlite,
                "SELECT (SELECT file FROM pragma_database_list WHERE name = 'main') AS file, \
                 (SELECT journal_mode FROM pragma_journal_mode) AS journal, \
                 (SELECT synchronous FROM pragma_synchronous) AS level",
            ))
            .await?
            .ok_or_else(|| DbErr::Custom("no row from SQLite's pragmas".into()))?;
        let file: String = row.try_get("", "file")?;
        let journal: String = row.try_get("", "journal")?;
        let level: i64 = row.try_get("", "level")?;
        Ok(
            (!file.is_empty() && journal.eq_ignore_ascii_case("wal") && level >= 2).then(|| Self {
                path: PathBuf::from(format!("{file}-wal")),
                level,
            }),
        )
    }

    /// Opens the WAL file for the sync of one batch, before that batch's
    /// commit (for writing, as some systems need that to flush a file;
    /// never created or truncated). On the committer's thread: opening a
    /// file SQLite holds open is a system call that does no I/O, and a
    /// hand-off to a blocking thread per batch cost more than it (a
    /// context switch each on a server's one core). Linux reports a
    /// failed write-back to every handle open when it failed, but to a
    /// handle opened later only if no handle has seen it yet: SQLite's
    /// own checkpoints (the checkpointer's, or one run by a commit, whose
    /// result SQLite ignores) sync the WAL on their handles and could see
    /// it first, and a handle opened after them would sync clean with the
    /// batch's frames lost.
    fn open(&self) -> Opened {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(unsynced)
    }

    /// Syncs the WAL file's data to disk through `opened` ([`Self::open`]),
    /// on a blocking thread.
    async fn sync(opened: Opened) -> Result<(), DbErr> {
        let file = opened?;
        match tokio::task::spawn_blocking(move || file.sync_data()).await {
            Ok(result) => result.map_err(unsynced),
            Err(join) => Err(unsynced(std::io::Error::other(join))),
        }
    }
}

/// The WAL file opened for one batch's sync, or why it could not be (the
/// sync then fails).
type Opened = Result<std::fs::File, DbErr>;

/// A test's hold on one sync of a run (a semaphore without permits until
/// the test adds one, or closes it to fail the sync); nothing outside
/// tests.
#[cfg(test)]
pub(super) type SyncGate = Option<Arc<tokio::sync::Semaphore>>;
#[cfg(not(test))]
#[derive(Debug)]
pub(super) struct SyncGate;

/// The error of a batch whose sync failed or could not be run: an I/O
/// error, as a lost database is (503), and its outcome unknown.
fn unsynced(error: std::io::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(Arc::new(sea_orm::sqlx::Error::Io(
        error,
    ))))
}

/// The pool's connection during a run: closed when dropped unless the run
/// set its `synchronous` level back ([`Held::give_back`]).
struct Held {
    writer: Option<Writer>,
    /// The pool it came from, closed if the run is dropped midway.
    pool: SqlitePool,
}

impl Held {
    fn writer(&self) -> &Writer {
        self.writer.as_ref().expect("present until given back")
    }

    /// Sets the connection's `synchronous` level back to `level` and
    /// returns it to the pool; closes it if that fails.
    async fn give_back(mut self, level: i64) {
        let writer = self.writer.take().expect("present until given back");
        let restored = writer
            .execute_unprepared(&format!("PRAGMA synchronous = {level}"))
            .await;
        let mut conn = writer.into_conn();
        if let Err(error) = restored {
            tracing::warn!(%error, "SQLite connection closed: its synchronous level not restored");
            conn.close_on_drop();
        }
    }
}

impl Held {
    /// Returns the connection to the pool as it was (nothing was changed).
    fn give_back_unchanged(mut self) {
        drop(self.writer.take());
    }

    /// Closes the connection, with nothing of the run left unsynced (or
    /// the pool closed already).
    fn close(mut self) {
        if let Some(writer) = self.writer.take() {
            writer.into_conn().close_on_drop();
        }
    }
}

/// Dropped without [`Held::give_back`], [`Held::give_back_unchanged`] or
/// [`Held::close`]: the committer's task panicked or was cancelled
/// midway through a run, and its settling tasks may still be syncing.
/// A new connection could read their commits first, so the pool is
/// closed ([`close_after_failed_sync`]'s fail-stop).
impl Drop for Held {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.into_conn().close_on_drop();
            tracing::error!("an SQLite run ended midway: the store's database is closed");
            drop(self.pool.close());
        }
    }
}

/// Closes `pool` after a failed sync of its WAL, so that no connection
/// of it reads the database again: every later request gets 503
/// (`PoolClosed`) until the process restarts. sqlx marks the pool closed
/// at once (the checkpointer stops too); its connections close as they
/// come back. Retrying the sync is no remedy: after a failed `fsync`
/// Linux may report the next one clean with the pages lost. What the
/// restarted process finds is what the disk holds: SQLite's WAL recovery
/// stops at the first frame that is not intact. (SQLite with
/// `synchronous=FULL` fails such a commit before it is visible;
/// PostgreSQL stops on a failed `fsync` for the same reason.)
fn close_after_failed_sync(pool: &SqlitePool) {
    tracing::error!(
        "a sync of the SQLite WAL failed: the store's database is closed until restart"
    );
    drop(pool.close());
}

impl SeaOrmStore {
    /// Whether `batch` is stored in a run: several appends, on an SQLite
    /// pool of one connection (with more, the others could read a commit
    /// before its sync), of a database not known to be one runs do not
    /// apply to.
    pub(super) fn runs_apply(&self, batch: &[AppendRequest]) -> bool {
        let sqlite = matches!(
            self.db.inner,
            DatabaseConnectionType::SqlxSqlitePoolConnection(_)
        ) && self.pool().options().get_max_connections() == 1;
        // Once found not to apply (`Some(None)`), never checked again.
        batch.len() > 1 && sqlite && !matches!(self.appends.wal.get(), Some(None))
    }

    /// Stores `first` and the batches queued after it in one run (module
    /// docs), or `first` alone as [`Self::commit_batch`] does when runs
    /// do not apply to the database or its connection cannot be had.
    pub(super) async fn commit_run(&self, first: Vec<AppendRequest>) {
        let Ok(conn) = Conn::acquire(&self.db).await else {
            return self.commit_batch(first).await;
        };
        let held = Held {
            writer: Some(Writer::new(conn)),
            pool: self.pool().clone(),
        };
        let wal = match self.wal_file(held.writer()).await {
            Ok(Some(wal)) => wal,
            Ok(None) => {
                held.give_back_unchanged();
                return self.commit_batch(first).await;
            }
            Err(error) => {
                tracing::warn!(%error, "SQLite pragmas unreadable: batch committed alone");
                held.close();
                return self.commit_batch(first).await;
            }
        };
        if let Err(error) = held
            .writer()
            .execute_unprepared("PRAGMA synchronous = NORMAL")
            .await
        {
            tracing::warn!(%error, "SQLite synchronous level not set: batch committed alone");
            held.close();
            return self.commit_batch(first).await;
        }
        let mut settled: Option<JoinHandle<bool>> = None;
        let mut batch = first;
        let mut stored = 0;
        loop {
            // As in `commit_batch`: stable, so a session's appends keep
            // their arrival (= seq) order.
            batch.sort_by_key(|r| r.session.as_uuid());
            // The WAL's handle for this batch's sync, opened before its
            // commit (`WalFile::open`).
            let this = wal.open();
            match self.store_held(held.writer(), &batch).await {
                Ok((outcomes, events, wrote)) => {
                    let earlier = settled.take();
                    let store = self.clone();
                    let gate = self.sync_gate();
                    settled = Some(tokio::spawn(async move {
                        let synced = if wrote {
                            store.synced(this, gate).await
                        } else {
                            Ok(())
                        };
                        // At once, before waiting for the earlier batches:
                        // the run commits nothing more on a failed sync.
                        if synced.is_err() {
                            close_after_failed_sync(store.pool());
                        }
                        let in_order = match earlier {
                            Some(earlier) => earlier.await.unwrap_or(false),
                            None => true,
                        };
                        let stored = match synced {
                            Ok(()) if in_order => Ok((outcomes, events)),
                            Ok(()) => Err(unsynced(std::io::Error::other(
                                "an earlier batch's sync of the SQLite WAL failed",
                            ))),
                            Err(error) => Err(error),
                        };
                        let ok = stored.is_ok();
                        store
                            .settle(
                                batch,
                                stored.map_err(|error| BatchFailure {
                                    error,
                                    at_commit: true,
                                }),
                            )
                            .await;
                        ok
                    }));
                }
                Err(failure) => {
                    // Earlier batches first (their order, and the
                    // connection not given up before their syncs), then
                    // this one through the pool, as `commit_batch` does.
                    let mut synced = match settled.take() {
                        Some(earlier) => earlier.await.unwrap_or(false),
                        None => true,
                    };
                    // A commit that failed may have been written even so:
                    // synced before anyone else may read it.
                    if failure.at_commit {
                        synced &= WalFile::sync(this).await.is_ok();
                    }
                    self.give_up(held, synced).await;
                    return self.settle(batch, Err(failure)).await;
                }
            }
            stored += 1;
            // A closed pool: a sync failed; nothing more is committed.
            if stored == MAX_RUN || self.pool().is_closed() {
                break;
            }
            match self.next_in_run(&mut settled).await {
                Some(next) => batch = next,
                None => break,
            }
        }
        let all_synced = match settled {
            Some(last) => last.await.unwrap_or(false),
            None => true,
        };
        if all_synced {
            held.give_back(wal.level).await;
        } else {
            self.give_up(held, false).await;
        }
    }

    /// Gives a run's connection up closed; when a commit of the run may be
    /// readable but not on disk (`synced` false: a sync failed), closes
    /// the store's pool too ([`close_after_failed_sync`]).
    async fn give_up(&self, held: Held, synced: bool) {
        if synced {
            held.close();
        } else {
            let closing = self.pool().close();
            held.close();
            closing.await;
        }
    }

    /// The store's SQLite pool (runs apply to no other).
    fn pool(&self) -> &SqlitePool {
        self.db.get_sqlite_connection_pool()
    }

    /// The run's next batch: the appends queued, or while the last batch
    /// waits for its sync, the first to arrive (its callers, answered,
    /// send their next appends then; giving the connection back and
    /// taking it again for them would cost two statements and leave the
    /// core idle during the last sync). `None` once the last batch is
    /// settled with nothing queued, or if its sync failed (`settled`
    /// then says so).
    async fn next_in_run(
        &self,
        settled: &mut Option<JoinHandle<bool>>,
    ) -> Option<Vec<AppendRequest>> {
        loop {
            if self.pool().is_closed() {
                return None;
            }
            if let Some(next) = self.appends.take_queued() {
                return Some(next);
            }
            let last = settled.as_mut()?;
            tokio::select! {
                () = self.appends.arrived.notified() => {}
                ok = last => {
                    // Settled: `commit_run` finds the outcome here.
                    let ok = ok.unwrap_or(false);
                    *settled = Some(tokio::spawn(async move { ok }));
                    return if ok { self.appends.take_queued() } else { None };
                }
            }
        }
    }

    /// The WAL file of this store's database, learnt on the run's
    /// connection the first time.
    async fn wal_file(&self, writer: &Writer) -> Result<Option<WalFile>, DbErr> {
        if let Some(wal) = self.appends.wal.get() {
            return Ok(wal.clone());
        }
        let wal = WalFile::of(writer).await?;
        // Only the committer sets it: this run's answer is the one kept.
        Ok(self.appends.wal.get_or_init(|| wal).clone())
    }

    /// What holds the next sync of a run back: in tests, the gate queued
    /// for it, if any ([`super::AppendQueue`]); nothing otherwise.
    fn sync_gate(&self) -> SyncGate {
        #[cfg(test)]
        return super::unpoisoned(&self.appends.sync_gates).pop_front();
        #[cfg(not(test))]
        SyncGate
    }

    /// Syncs the WAL through `opened`, once `gate` opens (tests only).
    async fn synced(&self, opened: Opened, gate: SyncGate) -> Result<(), DbErr> {
        #[cfg(test)]
        if let Some(gate) = gate
            && gate.acquire().await.is_err()
        {
            // A closed gate stands for a failed sync.
            return Err(unsynced(std::io::Error::other("the test failed this sync")));
        }
        #[cfg(not(test))]
        let SyncGate = gate;
        WalFile::sync(opened).await
    }

    /// One batch of a run on its connection: as [`Self::store_batch`]'s
    /// transaction, whose commit does not sync. `true` with the outcomes
    /// when something was written.
    async fn store_held(
        &self,
        writer: &Writer,
        batch: &[AppendRequest],
    ) -> Result<(Outcomes, Vec<DomainEvent>, bool), BatchFailure> {
        writer
            .execute_unprepared("BEGIN IMMEDIATE")
            .await
            .map_err(BatchFailure::before)?;
        let (outcomes, events, wrote) = self
            .stage_and_write(writer, batch, LockWait::Optimistic)
            .await
            .map_err(BatchFailure::before)?;
        if wrote {
            writer
                .execute_unprepared("COMMIT")
                .await
                .map_err(BatchFailure::commit)?;
        } else {
            writer
                .execute_unprepared("ROLLBACK")
                .await
                .map_err(BatchFailure::before)?;
        }
        Ok((outcomes, events, wrote))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use sea_orm::{ActiveModelTrait, ConnectionTrait};
    use sea_orm_migration::MigratorTrait;
    use tokio::sync::Semaphore;

    use super::super::unpoisoned;
    use super::MAX_RUN;
    use crate::error::ChatError;
    use crate::ids::{SessionId, TenantId};
    use crate::model::{Sender, SessionOrigin, SessionStatus};
    use crate::repository::{AppendedMessage, MessageRepository, PendingAppend};
    use crate::store::sessions::new_row;
    use crate::store::{Migrator, SeaOrmStore, connect};
    use crate::validate::{MessageBody, PageSize};

    /// A new SQLite file's URL.
    fn new_file() -> (String, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("livechat-run-{}.db", uuid::Uuid::now_v7()));
        (format!("sqlite://{}?mode=rwc", path.display()), path)
    }

    /// An open session of tenant 1 in the migrated database `db`.
    async fn open_session(db: &sea_orm::DatabaseConnection) -> SessionId {
        Migrator::up(db, None).await.unwrap();
        let row = new_row(
            TenantId::new(1).unwrap(),
            SessionOrigin::Agent,
            SessionStatus::Open,
        );
        SessionId::from_uuid(row.insert(db).await.unwrap().id)
    }

    /// A store on a new SQLite file as [`connect`] opens it (WAL,
    /// `synchronous=FULL`, one connection) and an open session in it.
    async fn store_with_session() -> (SeaOrmStore, SessionId, std::path::PathBuf) {
        let (url, path) = new_file();
        let db = connect(&url).await.unwrap();
        let session = open_session(&db).await;
        (SeaOrmStore::new(db), session, path)
    }

    fn send(store: &SeaOrmStore, tenant: i64, session: SessionId, text: &str) -> PendingAppend {
        store.append_message(
            TenantId::new(tenant).unwrap(),
            session,
            Sender::System,
            MessageBody::parse(text.into(), 100).unwrap(),
            None,
            SessionStatus::ALL,
        )
    }

    /// Holds the next sync of a run not yet started until a permit is
    /// added to the gate returned.
    fn hold_next_sync(store: &SeaOrmStore) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        unpoisoned(&store.appends.sync_gates).push_back(gate.clone());
        gate
    }

    /// The answers of appends awaited in turn on a task of their own.
    type Answers = tokio::task::JoinHandle<Vec<Result<AppendedMessage, ChatError>>>;

    /// Awaits each of `appends` in turn, on a task of its own.
    fn answers(appends: Vec<PendingAppend>) -> Answers {
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for append in appends {
                answers.push(append.await);
            }
            answers
        })
    }

    /// How many messages the file at `path` holds, read on a connection
    /// of its own (which sees commits whether synced or not).
    async fn committed(path: &std::path::Path) -> i64 {
        let other = sea_orm::Database::connect(format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let n = scalar(&other, "SELECT count(*) FROM livechat_messages").await;
        other.close().await.unwrap();
        n
    }

    /// Waits until the file at `path` holds `n` messages (at most 10 s).
    async fn until_committed(path: &std::path::Path, n: i64, why: &str) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while committed(path).await != n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{why}: {} committed, not {n}",
            committed(path).await
        );
    }

    /// A batch of two appends ("1", "2") to `session`, committed with
    /// its sync held back: its gate and answers.
    async fn held_batch(
        store: &SeaOrmStore,
        session: SessionId,
        path: &std::path::Path,
    ) -> (Arc<Semaphore>, Answers) {
        let gate = hold_next_sync(store);
        let appends = answers(vec![
            send(store, 1, session, "1"),
            send(store, 1, session, "2"),
        ]);
        until_committed(path, 2, "the batch was not committed").await;
        (gate, appends)
    }

    /// Two batches of two appends to `session` committed in one run,
    /// each sync held back: the second queued while the first waits for
    /// its sync. Each batch's gate and answers.
    async fn two_batches_in_a_run(
        store: &SeaOrmStore,
        session: SessionId,
        path: &std::path::Path,
    ) -> [(Arc<Semaphore>, Answers); 2] {
        let (gate_1, first) = held_batch(store, session, path).await;
        let gate_2 = hold_next_sync(store);
        let second = answers(vec![
            send(store, 1, session, "3"),
            send(store, 1, session, "4"),
        ]);
        until_committed(path, 4, "the second batch waited for the first's sync").await;
        [(gate_1, first), (gate_2, second)]
    }

    /// Removes the database file at `path` and its WAL and shared-memory
    /// files.
    fn remove(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// The one number `sql` answers on `db`.
    async fn scalar(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
        db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            sql,
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap()
    }

    fn page() -> PageSize {
        PageSize::parse(None, &crate::ChatConfig::default()).unwrap()
    }

    /// Issue #5 and DESIGN.md invariant 4: the appends of a run are
    /// answered only once the WAL is synced after their commit, and until
    /// then no other request sees them (the run holds the pool's one
    /// connection); the connection goes back to the pool, not closed, at
    /// its own `synchronous` level. A batch's refusal stays its own.
    #[tokio::test]
    async fn a_run_is_answered_and_seen_only_once_synced() {
        let (store, session, path) = store_with_session().await;
        let gate = hold_next_sync(&store);
        // Queued together before the committer runs: one batch of three.
        let appends = answers(vec![
            send(&store, 1, session, "one"),
            send(&store, 1, session, "two"),
            send(&store, 2, session, "another tenant's"),
        ]);
        until_committed(&path, 2, "the batch was not committed").await;
        assert!(!appends.is_finished(), "answered before the WAL was synced");
        let tenant = TenantId::new(1).unwrap();
        let read = tokio::time::timeout(
            Duration::from_millis(300),
            store.list_messages(tenant, session, 0, page()),
        )
        .await;
        assert!(read.is_err(), "an unsynced commit was readable: {read:?}");

        gate.add_permits(1);
        let answers = appends.await.unwrap();
        let seqs: Vec<i64> = answers[..2]
            .iter()
            .map(|a| a.as_ref().unwrap().message.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        assert!(
            matches!(answers[2], Err(ChatError::NotFound)),
            "{:?}",
            answers[2]
        );
        let pool = store.connection().get_sqlite_connection_pool();
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool.num_idle() != 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the run's connection is back in the pool");
        let level = scalar(store.connection(), "PRAGMA synchronous").await;
        assert_eq!(level, 2, "the pool's connection syncs its commits again");
        let listed = store
            .list_messages(tenant, session, 0, page())
            .await
            .unwrap();
        assert_eq!(listed.len(), 2);
        remove(&path);
    }

    /// Issue #5: appends queued while a run's batch waits for its sync are
    /// committed in the same run meanwhile (the overlap the run is for);
    /// a later batch whose sync ends first still waits for the earlier
    /// one, and the batches are answered and published in `seq` order.
    #[tokio::test]
    async fn a_run_commits_the_next_batch_while_the_last_one_syncs() {
        use crate::bus::{BusEvent, EventBus, InProcessBus};
        let (store, session, path) = store_with_session().await;
        let bus = Arc::new(InProcessBus::new());
        let store = store.with_bus(bus.clone());
        let mut events = bus.subscribe();
        let [(gate_1, first), (gate_2, second)] =
            two_batches_in_a_run(&store, session, &path).await;

        gate_2.add_permits(1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !first.is_finished() && !second.is_finished(),
            "answered before the first batch's sync"
        );
        assert!(
            events.try_recv().is_err(),
            "published before the first batch's sync"
        );

        gate_1.add_permits(1);
        let mut stored = first.await.unwrap();
        stored.extend(second.await.unwrap());
        let stored: Vec<_> = stored.into_iter().map(|a| a.unwrap().message).collect();
        assert_eq!(
            stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        for message in &stored {
            let event = events.recv().await.unwrap();
            let BusEvent::Domain(event) = &*event else {
                panic!("{event:?}")
            };
            assert_eq!(
                event.id.as_uuid(),
                message.id.as_uuid(),
                "published out of order"
            );
        }
        remove(&path);
    }

    /// A batch's sync goes through a handle of the WAL opened before its
    /// commit: Linux reports a failed write-back to the handles open when
    /// it failed, and to one opened later only if no other handle (SQLite's
    /// own checkpoints sync the WAL on theirs) saw it first. Here the WAL
    /// is moved aside between the commit and its sync: a handle opened for
    /// the sync would find no file, and the batch would fail.
    #[tokio::test]
    async fn a_batch_syncs_through_a_handle_opened_before_its_commit() {
        let (store, session, path) = store_with_session().await;
        let (gate, appends) = held_batch(&store, session, &path).await;
        let wal = format!("{}-wal", path.display());
        let aside = format!("{}-wal.aside", path.display());
        std::fs::rename(&wal, &aside).unwrap();
        gate.add_permits(1);
        let answers = appends.await.unwrap();
        std::fs::rename(&aside, &wal).unwrap();
        for answer in &answers {
            assert!(answer.is_ok(), "{answer:?}");
        }
        assert!(!store.pool().is_closed(), "no sync failed");
        remove(&path);
    }

    /// Issue #5: a run stores at most [`MAX_RUN`] batches, and the batch
    /// that arrives after its last one is stored by the next run, not
    /// lost.
    #[tokio::test]
    async fn appends_past_a_full_run_are_stored_by_the_next() {
        let (store, session, path) = store_with_session().await;
        let gate = hold_next_sync(&store);
        let mut pending = Vec::new();
        for batch in 0..MAX_RUN + 2 {
            pending.push(answers(vec![
                send(&store, 1, session, &format!("{batch}a")),
                send(&store, 1, session, &format!("{batch}b")),
            ]));
            if batch < MAX_RUN {
                // Each a batch of its own in the run.
                let n = 2 * (batch as i64 + 1);
                until_committed(&path, n, "a batch was not committed in the run").await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            committed(&path).await,
            2 * MAX_RUN as i64,
            "a run stores MAX_RUN batches"
        );
        gate.add_permits(1);
        let mut seqs = Vec::new();
        for batch in pending {
            for answer in batch.await.unwrap() {
                seqs.push(answer.expect("stored").message.seq);
            }
        }
        let expected: Vec<i64> = (1..=2 * (MAX_RUN as i64 + 2)).collect();
        assert_eq!(seqs, expected);
        remove(&path);
    }

    /// A host's bus that panics while a run publishes what it stored does
    /// not take the store down: the appends are answered as stored, later
    /// ones are stored, and the events after the panicking one are still
    /// published.
    #[tokio::test]
    async fn a_panicking_bus_does_not_close_the_store() {
        use crate::bus::{BusEvent, EventBus};
        use std::sync::atomic::{AtomicUsize, Ordering};

        /// Panics on its first event, records the ids of the others.
        struct FirstPanics(AtomicUsize, std::sync::Mutex<Vec<uuid::Uuid>>);
        impl EventBus for FirstPanics {
            fn publish(&self, event: BusEvent) {
                assert!(self.0.fetch_add(1, Ordering::SeqCst) > 0, "host bus");
                if let BusEvent::Domain(event) = event {
                    unpoisoned(&self.1).push(event.id.as_uuid());
                }
            }
            fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<BusEvent>> {
                tokio::sync::broadcast::channel(1).1
            }
        }

        let (store, session, path) = store_with_session().await;
        let bus = Arc::new(FirstPanics(
            AtomicUsize::new(0),
            std::sync::Mutex::default(),
        ));
        let store = store.with_bus(bus.clone());
        let first = answers(vec![
            send(&store, 1, session, "1"),
            send(&store, 1, session, "2"),
        ])
        .await
        .unwrap();
        let stored: Vec<_> = first
            .into_iter()
            .map(|a| a.expect("stored despite the bus").message)
            .collect();
        let third = send(&store, 1, session, "3")
            .await
            .expect("the store stays open");
        assert_eq!(third.message.seq, 3);
        assert_eq!(committed(&path).await, 3);
        assert_eq!(
            *unpoisoned(&bus.1),
            [stored[1].id.as_uuid(), third.message.id.as_uuid()],
            "the events after the panicking one are published"
        );
        remove(&path);
    }

    /// Issue #5: when a run's sync fails, its callers get an error of a
    /// lost database (503) and the store's pool is closed, so that no
    /// request reads the commit the disk may not hold: later ones get
    /// 503 too, until a restart.
    #[tokio::test]
    async fn a_failed_sync_fails_its_batch_and_closes_the_store() {
        let (store, session, path) = store_with_session().await;
        let (gate, appends) = held_batch(&store, session, &path).await;
        gate.close();
        for answer in appends.await.unwrap() {
            let error = answer.expect_err("the sync failed");
            assert!(error.is_unavailable(), "{error:?}");
        }
        let later = store
            .list_messages(TenantId::new(1).unwrap(), session, 0, page())
            .await
            .expect_err("the store is closed");
        assert!(later.is_unavailable(), "{later:?}");
        assert!(store.connection().get_sqlite_connection_pool().is_closed());
        remove(&path);
    }

    /// Issue #5: when an earlier batch's sync fails, a later batch of the
    /// run whose own sync succeeded fails too (its commit follows one the
    /// disk may not hold), and the run commits nothing after the failure.
    #[tokio::test]
    async fn a_batch_after_a_failed_sync_fails_too() {
        let (store, session, path) = store_with_session().await;
        let [(gate_1, first), (gate_2, second)] =
            two_batches_in_a_run(&store, session, &path).await;
        gate_2.add_permits(1);
        gate_1.close();
        for answer in first
            .await
            .unwrap()
            .into_iter()
            .chain(second.await.unwrap())
        {
            let error = answer.expect_err("after a failed sync");
            assert!(error.is_unavailable(), "{error:?}");
        }
        let third = send(&store, 1, session, "5")
            .await
            .expect_err("store closed");
        assert!(third.is_unavailable(), "{third:?}");
        assert_eq!(committed(&path).await, 4);
        remove(&path);
    }

    /// Issue #5: a statement that fails in a run gives the connection up
    /// closed after the earlier batches' syncs, and that batch's appends
    /// are retried one by one through the pool (no deadlock on its one
    /// connection): only the failing one fails, and the pool's new
    /// connection syncs its commits.
    #[tokio::test]
    async fn a_failed_statement_in_a_run_is_retried_append_by_append() {
        let (store, session, path) = store_with_session().await;
        store
            .connection()
            .execute_unprepared(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON livechat_messages                  WHEN NEW.body = 'boom' BEGIN SELECT RAISE(ABORT, 'boom'); END",
            )
            .await
            .unwrap();
        let (gate, first) = held_batch(&store, session, &path).await;
        let second = answers(vec![
            send(&store, 1, session, "ok"),
            send(&store, 1, session, "boom"),
        ]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        gate.add_permits(1);
        let (first, second) = tokio::time::timeout(Duration::from_secs(10), async {
            (first.await.unwrap(), second.await.unwrap())
        })
        .await
        .expect("no deadlock");
        let seqs: Vec<i64> = first
            .iter()
            .map(|a| a.as_ref().unwrap().message.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(second[0].as_ref().expect("retried alone").message.seq, 3);
        assert!(second[1].is_err(), "{:?}", second[1]);
        let level = scalar(store.connection(), "PRAGMA synchronous").await;
        assert_eq!(level, 2);
        assert!(!store.connection().get_sqlite_connection_pool().is_closed());
        remove(&path);
    }

    /// Issue #5: over a pool of several connections (a host's own), which
    /// could read a commit before its sync, batches commit with their own
    /// sync: no run, so no sync is ever held back.
    #[tokio::test]
    async fn a_pool_of_several_connections_runs_nothing() {
        let (url, path) = new_file();
        let mut options = sea_orm::ConnectOptions::new(url);
        options.max_connections(4).map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
        });
        let db = sea_orm::Database::connect(options).await.unwrap();
        let session = open_session(&db).await;
        let store = SeaOrmStore::new(db);
        let gate = hold_next_sync(&store);
        let appends = answers(vec![
            send(&store, 1, session, "one"),
            send(&store, 1, session, "two"),
        ]);
        let answers = tokio::time::timeout(Duration::from_secs(10), appends)
            .await
            .expect("no sync held back")
            .unwrap();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(gate.available_permits(), 0);
        assert_eq!(
            unpoisoned(&store.appends.sync_gates).len(),
            1,
            "a run synced"
        );
        remove(&path);
    }
}
