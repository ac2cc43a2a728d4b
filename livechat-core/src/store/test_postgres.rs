//! PostgreSQL databases for the store's unit tests, on the throwaway
//! server of `livechat-tests`.

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement, TryGetable, Value};
use sea_orm_migration::MigratorTrait;

/// A fresh PostgreSQL database with the store's tables.
pub(super) async fn migrated_postgres() -> sea_orm::DatabaseConnection {
    let admin = livechat_tests::postgres_admin_url();
    let url = livechat_tests::create_database(&admin, "lc_store").await;
    let db = super::connect(&url).await.unwrap();
    super::Migrator::up(&db, None).await.unwrap();
    db
}

/// Column `v` of the one row `sql` returns.
pub(super) async fn value<T: TryGetable>(db: &impl ConnectionTrait, sql: &str) -> T {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap()
        .expect("one row")
        .try_get("", "v")
        .unwrap()
}

/// Returns once a backend of `db`'s database waits for a lock (polled
/// every 5 ms); panics with `what` after 5 s.
pub(super) async fn until_a_lock_is_awaited(db: &impl ConnectionTrait, what: &str) {
    let mut polls = 0;
    while value::<i64>(
        db,
        "SELECT count(*) AS v FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )
    .await
        == 0
    {
        polls += 1;
        assert!(polls < 1_000, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// `EXPLAIN ANALYZE` of `statement` prepared as `name` on `tx`, under the
/// generic plan (`tx`'s `plan_cache_mode` becomes `force_generic_plan`),
/// one line per row.
pub(super) async fn generic_plan(
    tx: &DatabaseTransaction,
    name: &str,
    statement: Statement,
) -> Vec<String> {
    tx.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let values = statement.values.map(|v| v.0).unwrap_or_default();
    let (types, literals): (Vec<&str>, Vec<String>) = values
        .iter()
        .map(|v| match v {
            Value::String(Some(s)) => ("text", format!("'{s}'")),
            Value::ChronoDateTimeUtc(Some(t)) => ("timestamptz", format!("'{}'", t.to_rfc3339())),
            Value::Uuid(Some(u)) => ("uuid", format!("'{u}'")),
            Value::BigInt(Some(n)) => ("bigint", n.to_string()),
            other => panic!("unexpected value {other:?}"),
        })
        .unzip();
    let prepare = format!("PREPARE {name}({}) AS {}", types.join(", "), statement.sql);
    tx.execute_unprepared(&prepare).await.unwrap();
    let explain = format!(
        "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE {name}({})",
        literals.join(", ")
    );
    tx.query_all_raw(Statement::from_string(DbBackend::Postgres, explain))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "QUERY PLAN").unwrap())
        .collect()
}
