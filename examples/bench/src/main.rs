//! `livechat-bench`: runs the scenarios against the example server and
//! prints one table per scenario (see `BENCHMARKS.md`).
//!
//! ```text
//! livechat-bench [--smoke] [--server http://host:port --server-pid PID]
//! ```
//!
//! Without `--server`, the example server binary next to this one is
//! started on an SQLite file, pinned to CPU 0 with `taskset`, and this
//! process pins itself to CPU 1.

use std::process::{Command, Stdio};
use std::time::Duration;

use livechat_bench::{SECRET, Target, fan_out, idle, latency, print_table, write_path};

struct Args {
    smoke: bool,
    server: Option<String>,
    pid: Option<u32>,
}

fn args() -> Args {
    let mut out = Args {
        smoke: false,
        server: None,
        pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => out.smoke = true,
            "--server" => out.server = it.next(),
            "--server-pid" => out.pid = it.next().and_then(|p| p.parse().ok()),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: livechat-bench [--smoke] [--server URL --server-pid PID]"
                );
                std::process::exit(2);
            }
        }
    }
    out
}

fn pin_self(cpu: u32) {
    let _ = Command::new("taskset")
        .args(["-cp", &cpu.to_string(), &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
}

async fn spawn_server(dir: &std::path::Path) -> (Target, std::process::Child) {
    let exe = std::env::current_exe().expect("own path");
    let server = exe.with_file_name("livechat-example-server");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(&server);
    let mut child = cmd
        .env("LIVECHAT_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.join("bench.db").display()),
        )
        .env("LIVECHAT_JWT_SECRET", SECRET)
        .env("LIVECHAT_VISITOR_SECRET", "bench-visitor")
        .env("LIVECHAT_PRESENCE_TTL_SECS", "600")
        .env("LIVECHAT_WS_SEND_RATE", "100000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "start {}: {e} (build it: cargo build --release -p livechat-example-server)",
                server.display()
            )
        });
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if reqwest::get(format!("{base}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return (
                Target {
                    base,
                    pid: Some(child.id()),
                },
                child,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the server did not become healthy");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args = args();
    let dir = std::env::temp_dir().join(format!("livechat-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut child = None;
    let target = match (&args.server, args.smoke) {
        (Some(url), _) => Target {
            base: url.clone(),
            pid: args.pid,
        },
        (None, true) => {
            Target::in_process(&format!(
                "sqlite://{}?mode=rwc",
                dir.join("smoke.db").display()
            ))
            .await
        }
        (None, false) => {
            pin_self(1);
            let (t, c) = spawn_server(&dir).await;
            child = Some(c);
            t
        }
    };
    let (secs, counts, rate, count, rooms, idle_n) = if args.smoke {
        (Duration::from_millis(500), vec![1, 8], 50.0, 50, 1, 50)
    } else {
        (
            Duration::from_secs(5),
            vec![1, 8, 64],
            200.0,
            2000,
            10,
            2000,
        )
    };
    println!(
        "# livechat-bench ({})",
        if args.smoke { "smoke" } else { "full" }
    );
    let baseline_db = dir.join("baseline.db");
    print_table(
        "1. Durable write path (SQLite, synchronous=FULL)",
        &write_path(&target, &baseline_db.display().to_string(), &counts, secs).await,
    );
    print_table(
        "2. Delivery latency (WebSocket, open loop)",
        &latency(&target, rate, count).await,
    );
    print_table("3. Fan-out", &fan_out(&target, rooms, secs).await);
    print_table("4. Idle connections", &idle(&target, idle_n).await);
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
