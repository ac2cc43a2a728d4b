//! A short run of every scenario: it completes and reports numbers. The
//! figures themselves are measured by full runs (`BENCHMARKS.md`), never
//! asserted here.

use std::time::Duration;

use livechat_bench::{
    InProcessHolders, RawDb, RawHub, Target, cross_node, fan_out, fan_out_beside_idle, idle,
    latency, queue_moves, write_path,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_reports_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::in_process(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("smoke.db").display()
    ))
    .await;
    let hub = RawHub::start().await;
    let baseline = RawDb::Sqlite {
        path: dir.path().join("raw.db").display().to_string(),
        full: true,
    };
    // Two rounds: each row is a median, its label says of how many.
    let (rows, peak) = write_path(&target, &baseline, &[1, 4], Duration::from_millis(200), 2).await;
    assert!(peak > 0.0);
    let rates: Vec<_> = rows.iter().filter(|r| r.unit == "msg/s").collect();
    assert_eq!(rates.len(), 2);
    assert!(
        rates.iter().all(|r| r.library > 0.0 && r.baseline > 0.0),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .filter(|r| r.unit != "µs")
            .all(|r| r.label.contains("median of 2")),
        "{rows:?}"
    );
    let rows = latency(&target, &hub, 50.0, 20, 1).await;
    assert_eq!(
        rows[2].library, 20.0,
        "every stamped message arrived: {rows:?}"
    );
    assert_eq!(rows[2].baseline, 20.0, "{rows:?}");
    let rows = fan_out(&target, &hub, 1, Duration::from_millis(300)).await;
    assert!(rows[0].library > 0.0 && rows[0].baseline > 0.0, "{rows:?}");
    let row = fan_out_beside_idle(
        &target,
        &hub,
        1,
        Duration::from_millis(300),
        40,
        &mut InProcessHolders::default(),
    )
    .await;
    assert!(row.library > 0.0 && row.baseline > 0.0, "{row:?}");
    // Every waiting customer saw each move (or the scenario panics).
    let rows = queue_moves(&target, 12, 3).await;
    // CPU time comes in clock ticks (10 ms): three small moves may take none.
    assert!(
        rows[0].library > 0.0 && rows[1].library.is_finite() && rows[1].library >= 0.0,
        "{rows:?}"
    );
    let rows = idle(&target, &hub, 220, &mut InProcessHolders::default()).await;
    assert!(
        rows[2].library > 0.0,
        "ping round trips were measured: {rows:?}"
    );
    assert!(
        rows[3].library > 0.0 && rows[3].baseline > 0.0,
        "opening rates were measured: {rows:?}"
    );
}

/// Two nodes over PostgreSQL and a real redis-server: the cross-node
/// scenario delivers every stamped message on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_reports_numbers() {
    let db = livechat_tests::TestDb::new(livechat_tests::Backend::Postgres).await;
    let redis = livechat_tests::redis_server::RedisServer::start();
    let a = Target::in_process_with_redis(&db.url, &redis.url).await;
    let b = Target::in_process_with_redis(&db.url, &redis.url).await;
    let rows = cross_node(&a, &b, 50.0, 20, 1, Duration::from_millis(300)).await;
    assert_eq!(rows[4].library, 20.0, "{rows:?}");
    assert_eq!(rows[4].baseline, 20.0, "{rows:?}");
    assert!(rows[3].library > 0.0 && rows[3].baseline > 0.0, "{rows:?}");
}
