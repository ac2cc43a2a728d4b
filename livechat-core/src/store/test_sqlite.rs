//! SQLite helpers for the store's unit tests.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

/// `EXPLAIN QUERY PLAN` of `statement` on `db`, one line (`detail`) per
/// row.
pub(super) async fn sqlite_plan(db: &DatabaseConnection, statement: Statement) -> Vec<String> {
    let explain = Statement::from_sql_and_values(
        DbBackend::Sqlite,
        format!("EXPLAIN QUERY PLAN {}", statement.sql),
        statement.values.map(|v| v.0).unwrap_or_default(),
    );
    db.query_all_raw(explain)
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "detail").unwrap())
        .collect()
}
