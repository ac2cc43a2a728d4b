//! PostgreSQL databases for the store's unit tests, on the throwaway
//! server of `livechat-tests`.

use sea_orm::{ConnectionTrait, DbBackend, Statement, TryGetable};
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
