//! A short run of every scenario: it completes and reports numbers. The
//! figures themselves are measured by full runs (`BENCHMARKS.md`), never
//! asserted here.

use std::time::Duration;

use livechat_bench::{Target, fan_out, idle, latency, write_path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_reports_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::in_process(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("smoke.db").display()
    ))
    .await;
    let rows = write_path(
        &target,
        &dir.path().join("raw.db").display().to_string(),
        &[1, 4],
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| r.library > 0.0 && r.baseline > 0.0),
        "{rows:?}"
    );
    let rows = latency(&target, 50.0, 20).await;
    assert_eq!(
        rows[2].library, 20.0,
        "every stamped message arrived: {rows:?}"
    );
    assert_eq!(rows[2].baseline, 20.0, "{rows:?}");
    let rows = fan_out(&target, 1, Duration::from_millis(300)).await;
    assert!(rows[0].library > 0.0 && rows[0].baseline > 0.0, "{rows:?}");
    let rows = idle(&target, 20).await;
    assert!(
        rows[1].library > 0.0,
        "ping round trips were measured: {rows:?}"
    );
}
