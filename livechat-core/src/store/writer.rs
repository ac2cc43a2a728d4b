//! The connection an append queue's committer stores its batches on
//! (issue #5).
//!
//! sqlx pings every pooled connection when it is given back to its pool
//! (`PoolConnection::return_to_pool`): on PostgreSQL one more round trip,
//! and a wake-up of the server's backend, per batch. A [`Writer`] runs
//! sea-orm statements on one connection ([`Conn`]); on PostgreSQL one
//! taken out of the pool for good, which the committer keeps between batches
//! ([`super::messages`]' `AppendQueue`): a batch of known sessions is one
//! round trip and nothing else. Outside the pool, it does not hold up the
//! pool's `close` (which waits for every checked-out connection); it is
//! closed when its queue is dropped, or replaced when it fails.
//!
//! SQLite's committer takes its pool's one connection, which every other
//! read and write also needs, only for a run of batches it stores back to
//! back with their syncs overlapped ([`Conn::Sqlite`], kept in the pool's
//! count: `super::messages`' `pipeline` module); a lone append goes
//! through a pool transaction as before. Sending `BEGIN IMMEDIATE` with a batch's
//! first statement and `COMMIT` with its last, through such a connection,
//! was tried: sqlx's worker thread hands each statement's result over on
//! its own, and a lone send then took four more context switches and
//! 15–25 µs more CPU.

// Without a database feature `Conn` has no variant: nothing here runs.
#![cfg_attr(
    not(any(feature = "postgres", feature = "sqlite")),
    allow(unused_imports, unused_variables, dead_code)
)]

use std::sync::Arc;

use sea_orm::sea_query::Values;
use sea_orm::sqlx::Connection as _;
#[cfg(feature = "postgres")]
use sea_orm::sqlx::PgConnection;
use sea_orm::sqlx::{AssertSqlSafe, query_with};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseConnectionType, DbBackend, DbErr, ExecResult,
    QueryResult, RuntimeErr, Statement,
};
use sea_query_sqlx::SqlxValues;

/// A connection the append committer runs its statements on.
#[derive(Debug)]
pub(super) enum Conn {
    /// A PostgreSQL connection opened by the store's pool and taken out of
    /// it (`PoolConnection::detach`: the pool may open another in its
    /// place). Dropped, it is closed.
    #[cfg(feature = "postgres")]
    Postgres(PgConnection),
    /// The SQLite pool's connection, checked out: dropped, it goes back to
    /// the pool (or is closed, if marked so).
    #[cfg(feature = "sqlite")]
    Sqlite(sea_orm::sqlx::pool::PoolConnection<sea_orm::sqlx::Sqlite>),
}

impl Conn {
    /// A connection from `db`'s pool, waiting as the pool's
    /// `acquire_timeout` allows: on PostgreSQL taken out of the pool
    /// ([`Conn::Postgres`]), on SQLite checked out and counted in it as
    /// any other ([`Conn::Sqlite`]).
    ///
    /// # Errors
    /// [`DbErr::ConnectionAcquire`] when the pool timed out or is closed,
    /// [`DbErr::Conn`] when a new connection could not be opened,
    /// [`DbErr::Custom`] for a database of another kind.
    pub(super) async fn acquire(db: &DatabaseConnection) -> Result<Self, DbErr> {
        match &db.inner {
            #[cfg(feature = "postgres")]
            DatabaseConnectionType::SqlxPostgresPoolConnection(_) => db
                .get_postgres_connection_pool()
                .acquire()
                .await
                .map(|conn| Self::Postgres(conn.detach()))
                .map_err(acquire_error),
            #[cfg(feature = "sqlite")]
            DatabaseConnectionType::SqlxSqlitePoolConnection(_) => db
                .get_sqlite_connection_pool()
                .acquire()
                .await
                .map(Self::Sqlite)
                .map_err(acquire_error),
            _ => Err(DbErr::Custom(
                "the append committer's own connection is a PostgreSQL or SQLite one".into(),
            )),
        }
    }

    /// Closes the connection when it is dropped instead of giving it back
    /// to its pool (which opens a new one when needed); a PostgreSQL
    /// connection, outside any pool, is closed when dropped anyway. (Only
    /// SQLite's runs give a connection up so.)
    #[cfg(feature = "sqlite")]
    pub(super) fn close_on_drop(&mut self) {
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => {}
            #[cfg(feature = "sqlite")]
            Self::Sqlite(ref mut conn) => conn.close_on_drop(),
        }
    }

    /// Whether the connection still answers (one round trip), for one
    /// idle for a while, as the pool tests its own before handing them out.
    pub(super) async fn ping(&mut self) -> bool {
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(ref mut conn) => conn.ping().await.is_ok(),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(ref mut conn) => conn.ping().await.is_ok(),
        }
    }

    fn backend(&self) -> DbBackend {
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => DbBackend::Postgres,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_) => DbBackend::Sqlite,
        }
    }

    async fn execute(&mut self, sql: &str, values: Values) -> Result<ExecResult, DbErr> {
        let args = SqlxValues(values);
        let exec_error = |e| DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)));
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(ref mut conn) => query_with(AssertSqlSafe(sql), args)
                .execute(conn)
                .await
                .map(Into::into)
                .map_err(exec_error),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(ref mut conn) => query_with(AssertSqlSafe(sql), args)
                .execute(&mut **conn)
                .await
                .map(Into::into)
                .map_err(exec_error),
        }
    }

    async fn query_all(&mut self, sql: &str, values: Values) -> Result<Vec<QueryResult>, DbErr> {
        let args = SqlxValues(values);
        let query_error = |e| DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)));
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(ref mut conn) => query_with(AssertSqlSafe(sql), args)
                .fetch_all(conn)
                .await
                .map(|rows| rows.into_iter().map(Into::into).collect())
                .map_err(query_error),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(ref mut conn) => query_with(AssertSqlSafe(sql), args)
                .fetch_all(&mut **conn)
                .await
                .map(|rows| rows.into_iter().map(Into::into).collect())
                .map_err(query_error),
        }
    }
}

/// sea-orm's mapping of a pool's acquire error.
fn acquire_error(error: sea_orm::sqlx::Error) -> DbErr {
    use sea_orm::ConnAcquireErr;
    match error {
        sea_orm::sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
        sea_orm::sqlx::Error::PoolClosed => {
            DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed)
        }
        other => DbErr::Conn(RuntimeErr::SqlxError(Arc::new(other))),
    }
}

/// A [`Conn`] as a sea-orm connection: each statement is sent on it as
/// is, committed on its own unless the caller sent `BEGIN` (an SQLite
/// run does, and its `COMMIT` or `ROLLBACK`).
#[derive(Debug)]
pub(super) struct Writer {
    conn: tokio::sync::Mutex<Conn>,
    backend: DbBackend,
}

impl Writer {
    /// Statements on `conn`.
    pub(super) fn new(conn: Conn) -> Self {
        Self {
            backend: conn.backend(),
            conn: tokio::sync::Mutex::new(conn),
        }
    }

    /// The connection, for the next batch or the pool.
    pub(super) fn into_conn(self) -> Conn {
        self.conn.into_inner()
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Writer {
    fn get_database_backend(&self) -> DbBackend {
        self.backend
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let values = stmt.values.unwrap_or(Values(Vec::new()));
        self.conn.lock().await.execute(&stmt.sql, values).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.execute_raw(Statement::from_string(self.backend, sql))
            .await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        Ok(self.query_all_raw(stmt).await?.into_iter().next())
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let values = stmt.values.unwrap_or(Values(Vec::new()));
        self.conn.lock().await.query_all(&stmt.sql, values).await
    }
}
