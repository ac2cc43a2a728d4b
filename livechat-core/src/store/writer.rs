//! The connection an append queue's committer stores its batches on
//! (issue #5).
//!
//! sqlx pings every pooled connection when it is given back to its pool
//! (`PoolConnection::return_to_pool`): on PostgreSQL one more round trip,
//! and a wake-up of the server's backend, per batch. A [`Writer`] runs
//! sea-orm statements on a connection taken out of the pool for good
//! ([`Conn`]), which the PostgreSQL committer keeps between batches
//! ([`super::messages`]' `AppendQueue`): a batch of known sessions is one
//! round trip and nothing else. Outside the pool, it does not hold up the
//! pool's `close` (which waits for every checked-out connection); it is
//! closed when its queue is dropped, or replaced when it fails.
//!
//! SQLite's committer does not use it: its pool has one connection, which
//! every other read and write also needs, so it goes back after each
//! batch. Sending `BEGIN IMMEDIATE` with a batch's first statement and
//! `COMMIT` with its last, through such a connection, was tried: sqlx's
//! worker thread hands each statement's result over on its own, and a lone
//! send then took four more context switches and 15–25 µs more CPU.

// Without the `postgres` feature `Conn` has no variant: nothing here runs.
#![cfg_attr(
    not(feature = "postgres"),
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

/// A PostgreSQL connection opened by the store's pool and taken out of it
/// (`PoolConnection::detach`: the pool may open another in its place).
/// Dropped, it is closed. (Without the `postgres` feature there is none.)
#[derive(Debug)]
pub(super) enum Conn {
    /// A PostgreSQL connection.
    #[cfg(feature = "postgres")]
    Postgres(PgConnection),
}

impl Conn {
    /// A connection from `db`'s pool, taken out of it, waiting as the
    /// pool's `acquire_timeout` allows.
    ///
    /// # Errors
    /// [`DbErr::ConnectionAcquire`] when the pool timed out or is closed,
    /// [`DbErr::Conn`] when a new connection could not be opened,
    /// [`DbErr::Custom`] when `db` is not a PostgreSQL pool.
    pub(super) async fn acquire(db: &DatabaseConnection) -> Result<Self, DbErr> {
        match &db.inner {
            #[cfg(feature = "postgres")]
            DatabaseConnectionType::SqlxPostgresPoolConnection(_) => db
                .get_postgres_connection_pool()
                .acquire()
                .await
                .map(|conn| Self::Postgres(conn.detach()))
                .map_err(acquire_error),
            _ => Err(DbErr::Custom(
                "the append committer's own connection is a PostgreSQL one".into(),
            )),
        }
    }

    /// Whether the connection still answers (one round trip), for one
    /// idle for a while, as the pool tests its own before handing them out.
    pub(super) async fn ping(&mut self) -> bool {
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(ref mut conn) => conn.ping().await.is_ok(),
        }
    }

    async fn execute(&mut self, sql: &str, values: Values) -> Result<ExecResult, DbErr> {
        let args = SqlxValues(values);
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(ref mut conn) => query_with(AssertSqlSafe(sql), args)
                .execute(conn)
                .await
                .map(Into::into)
                .map_err(|e| DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))),
        }
    }

    async fn query_all(&mut self, sql: &str, values: Values) -> Result<Vec<QueryResult>, DbErr> {
        let args = SqlxValues(values);
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(ref mut conn) => query_with(AssertSqlSafe(sql), args)
                .fetch_all(conn)
                .await
                .map(|rows| rows.into_iter().map(Into::into).collect())
                .map_err(|e| DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)))),
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
/// is, committed on its own.
#[derive(Debug)]
pub(super) struct Writer {
    conn: tokio::sync::Mutex<Conn>,
}

impl Writer {
    /// Statements on `conn`.
    pub(super) fn new(conn: Conn) -> Self {
        Self {
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
        DbBackend::Postgres
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let values = stmt.values.unwrap_or(Values(Vec::new()));
        self.conn.lock().await.execute(&stmt.sql, values).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.execute_raw(Statement::from_string(DbBackend::Postgres, sql))
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
