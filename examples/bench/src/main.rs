//! `livechat-bench`: runs the scenarios against the example server and
//! prints one table per scenario (see `BENCHMARKS.md`).
//!
//! ```text
//! livechat-bench [--smoke] [--only LIST] [--databases LIST] [--idle N] [--seconds S]
//!                [--senders LIST] [--rounds N]
//! livechat-bench --server http://host:port [--server-pid PID] [--only LIST] [--senders LIST]
//!                [--rounds N]
//! ```
//!
//! - `--only`: scenarios among `write,latency,fanout,idle,crossnode`
//!   (default all).
//! - `--databases`: `sqlite-full,sqlite-normal,postgres` (default all) for
//!   the write path and latency; fan-out and idle run on `sqlite-full`,
//!   cross-node on PostgreSQL with Redis.
//! - `--idle N`: idle connections (default 19,500: the server process's
//!   descriptor limit must exceed N); the fan-out beside idle connections
//!   holds `min(N, 5,000)`.
//! - `--senders`: the write path's sender counts (default `1,8,64`); the
//!   scaling rows compare each with the first. Not for `--smoke`.
//! - `--rounds N`: measure the write path's counts N times, in turn
//!   (default 1), and report each row's median with the library's range.
//!
//! Without `--server`, the example server binary next to this one is
//! started per database, pinned to CPU 0 with `taskset`; the raw hub runs
//! in a child process pinned to CPU 0 too; this process pins itself to
//! CPU 1. PostgreSQL (fsync on) and Redis are started from the machine's
//! binaries (Debian packages `postgresql`, `redis-server`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use livechat_bench::{
    HoldTarget, Holders, InProcessHolders, PRESENCE_GRACE, RawDb, RawHub, SECRET, Target,
    cross_node, fan_out, fan_out_beside_idle, hold, idle, latency, print_table, queue_moves,
    write_path,
};

/// Idle connections held beside the fan-out rooms (scenario 3's second row).
const FAN_OUT_IDLE: usize = 5_000;

/// Customers waiting in the queue of scenario 3's queue moves, and the
/// moves measured.
const QUEUE_WAITING: usize = 1_000;
const QUEUE_MOVES: usize = 20;

const SCENARIOS: [&str; 5] = ["write", "latency", "fanout", "idle", "crossnode"];
const DATABASES: [&str; 3] = ["sqlite-full", "sqlite-normal", "postgres"];
const USAGE: &str = "usage: livechat-bench [--smoke] [--server URL [--server-pid PID]] \
[--only write,latency,fanout,idle,crossnode] [--databases sqlite-full,sqlite-normal,postgres] \
[--idle N] [--seconds S] [--senders 1,8,64] [--rounds N]";

struct Args {
    smoke: bool,
    server: Option<String>,
    pid: Option<u32>,
    only: Vec<String>,
    databases: Vec<String>,
    idle: usize,
    seconds: u64,
    /// The write scenario's sender counts (the first is the scaling
    /// reference).
    senders: Vec<usize>,
    /// How many times the write scenario measures each count, in turn.
    rounds: usize,
}

fn list(value: Option<String>, allowed: &[&str]) -> Vec<String> {
    let items: Vec<String> = value
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = items.iter().find(|i| !allowed.contains(&i.as_str())) {
        fail(&format!("unknown item {bad}; expected one of {allowed:?}"));
    }
    items
}

/// The sender counts of `--senders` (`1,8,64`); `None` when the value is
/// missing, empty, or holds anything but positive whole numbers.
fn senders(value: Option<String>) -> Option<Vec<usize>> {
    value?
        .split(',')
        .map(|n| n.trim().parse().ok().filter(|&n: &usize| n > 0))
        .collect::<Option<Vec<_>>>()
        .filter(|counts| !counts.is_empty())
}

fn fail(message: &str) -> ! {
    eprintln!("{message}\n{USAGE}");
    std::process::exit(2);
}

fn args() -> Args {
    let mut out = Args {
        smoke: false,
        server: None,
        pid: None,
        only: SCENARIOS.iter().map(|s| (*s).to_owned()).collect(),
        databases: DATABASES.iter().map(|s| (*s).to_owned()).collect(),
        idle: 19_500,
        seconds: 5,
        senders: vec![1, 8, 64],
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => out.smoke = true,
            "--server" => out.server = it.next(),
            "--server-pid" => out.pid = it.next().and_then(|p| p.parse().ok()),
            "--only" => out.only = list(it.next(), &SCENARIOS),
            "--databases" => out.databases = list(it.next(), &DATABASES),
            "--idle" => {
                out.idle = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| fail("--idle needs a number"));
            }
            "--seconds" => {
                out.seconds = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| fail("--seconds needs a number"));
            }
            "--senders" => {
                out.senders = senders(it.next())
                    .unwrap_or_else(|| fail("--senders needs positive numbers, e.g. 1,8,64"));
            }
            "--rounds" => {
                out.rounds = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n: &usize| n > 0)
                    .unwrap_or_else(|| fail("--rounds needs a positive number"));
            }
            other => fail(&format!("unknown argument {other}")),
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// An example server process (killed on drop).
struct Server {
    target: Target,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the system has written every dirty page to disk (`sync`),
/// so that the write path's pages, written back by the kernel some
/// seconds later (its `dirty_expire_centisecs`), do not compete with the
/// latency scenario's commits: on this machine one such burst (125 MB in a
/// second) held PostgreSQL's WAL flushes for 40–65 ms, in every run.
async fn flush_writes() {
    let _ = tokio::task::spawn_blocking(|| Command::new("sync").status()).await;
}

/// Starts the example server on `database_url`, pinned to CPU 0.
async fn spawn_server(database_url: &str, env: &[(&str, &str)]) -> Server {
    let exe = std::env::current_exe().expect("own path");
    let server = exe.with_file_name("livechat-example-server");
    let port = free_port();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(&server);
    cmd.env("LIVECHAT_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", database_url)
        .env("LIVECHAT_JWT_SECRET", SECRET)
        .env("LIVECHAT_VISITOR_SECRET", "bench-visitor")
        .env("LIVECHAT_PRESENCE_TTL_SECS", "600")
        .env(
            "LIVECHAT_PRESENCE_GRACE_SECS",
            PRESENCE_GRACE.as_secs().to_string(),
        )
        .env("LIVECHAT_WS_SEND_RATE", "100000")
        // Load comes from one address: the customer routes' limits off.
        .env("LIVECHAT_CHAT_START_RATE", "0")
        .env("LIVECHAT_CUSTOMER_SEND_RATE", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "start {}: {e} (build it: cargo build --release -p livechat-example-server)",
            server.display()
        )
    });
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if reqwest::get(format!("{base}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Server {
                target: Target {
                    base,
                    pid: Some(child.id()),
                },
                child,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the server did not become healthy");
}

/// The raw hub in a child process pinned to CPU 0 (killed on drop).
struct HubProcess {
    hub: RawHub,
    child: Child,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_hub() -> HubProcess {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(exe)
        .arg("--raw-hub")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the raw hub");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("hub address");
    let addr = line.trim().parse().expect("hub address");
    HubProcess {
        hub: RawHub::at(addr, child.id()),
        child,
    }
}

/// Child-process mode `--raw-hub`: serve the hub, print its address.
async fn serve_raw_hub() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr"));
    let _ = std::io::stdout().flush();
    livechat_bench::serve_hub(listener).await;
}

/// Child-process mode `--hold livechat URL|hub ADDR FIRST COUNT`: open the
/// connections, print `ready`, keep them until stdin closes.
async fn serve_hold(mut it: impl Iterator<Item = String>) {
    let kind = it.next().unwrap_or_default();
    let at = it.next().unwrap_or_default();
    let first: i64 = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let count: usize = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let target = match kind.as_str() {
        "livechat" => HoldTarget::Livechat(Target {
            base: at,
            pid: None,
        }),
        _ => HoldTarget::Hub(at.parse().expect("hub address")),
    };
    let held = hold(&target, first, count).await;
    println!("ready {}", held.len());
    let _ = std::io::stdout().flush();
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await;
    drop(held);
}

/// [`Holders`] as child processes of at most 9,000 connections each.
#[derive(Default)]
struct ChildHolders(Vec<Child>);

const PER_CHILD: usize = 9_000;

impl Holders for ChildHolders {
    fn open(
        &mut self,
        target: &HoldTarget,
        first: i64,
        count: usize,
    ) -> futures_util::future::BoxFuture<'_, ()> {
        let (kind, at) = match target {
            HoldTarget::Livechat(t) => ("livechat", t.base.clone()),
            HoldTarget::Hub(addr) => ("hub", addr.to_string()),
        };
        Box::pin(async move {
            let exe = std::env::current_exe().expect("own path");
            let mut started = Vec::new();
            let mut offset = 0;
            while offset < count {
                let n = PER_CHILD.min(count - offset);
                let child = Command::new("taskset")
                    .args(["-c", "1"])
                    .arg(&exe)
                    .args(["--hold", kind, &at])
                    .arg((first + offset as i64).to_string())
                    .arg(n.to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start a connection holder");
                started.push(child);
                offset += n;
            }
            for child in &mut started {
                let stdout = child.stdout.take().expect("stdout");
                let line = tokio::task::spawn_blocking(move || {
                    let mut line = String::new();
                    let _ = BufReader::new(stdout).read_line(&mut line);
                    line
                })
                .await
                .unwrap_or_default();
                assert!(line.starts_with("ready"), "holder failed: {line:?}");
            }
            self.0.extend(started);
        })
    }

    fn release(&mut self) {
        for mut child in self.0.drain(..) {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

fn sqlite_url(dir: &std::path::Path, name: &str) -> String {
    format!("sqlite://{}?mode=rwc", dir.join(name).display())
}

/// PostgreSQL (fsync on) started once, when first needed.
struct Postgres {
    admin: Option<String>,
}

impl Postgres {
    fn admin(&mut self) -> &str {
        self.admin.get_or_insert_with(|| {
            livechat_tests::start_postgres(livechat_tests::PgDurability::Durable)
                .unwrap_or_else(|e| panic!("{e}"))
        })
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let mut raw = std::env::args().skip(1);
    match raw.next().as_deref() {
        Some("--raw-hub") => return serve_raw_hub().await,
        Some("--hold") => return serve_hold(raw).await,
        _ => {}
    }
    let args = args();
    let dir = std::env::temp_dir().join(format!("livechat-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let secs = Duration::from_secs(args.seconds);
    let wants = |s: &str| args.only.iter().any(|o| o == s);
    println!(
        "# livechat-bench ({})",
        if args.smoke { "smoke" } else { "full" }
    );

    if args.smoke || args.server.is_some() {
        let target = match &args.server {
            Some(url) => Target {
                base: url.clone(),
                pid: args.pid,
            },
            None => Target::in_process(&sqlite_url(&dir, "smoke.db")).await,
        };
        let (secs, counts, rate, count, rooms, idle_n) = if args.smoke {
            (Duration::from_millis(500), vec![1, 8], 50.0, 50, 1, 250)
        } else {
            (secs, args.senders.clone(), 200.0, 2000, 10, 2000)
        };
        let hub = RawHub::start().await;
        let baseline = RawDb::Sqlite {
            path: dir.join("baseline.db").display().to_string(),
            full: true,
        };
        if wants("write") {
            let (rows, _) = write_path(&target, &baseline, &counts, secs, args.rounds).await;
            print_table("1. Durable write path (baseline: SQLite FULL)", &rows);
        }
        if wants("latency") {
            let rows = latency(&target, &hub, rate, count, 1).await;
            print_table("2. Delivery latency (WebSocket, open loop)", &rows);
        }
        if wants("fanout") {
            let mut rows = fan_out(&target, &hub, rooms, secs).await;
            rows.push(
                fan_out_beside_idle(
                    &target,
                    &hub,
                    rooms,
                    secs,
                    idle_n.min(FAN_OUT_IDLE),
                    &mut InProcessHolders::default(),
                )
                .await,
            );
            rows.extend(queue_moves(&target, 20, 3).await);
            print_table("3. Fan-out", &rows);
        }
        if wants("idle") {
            let rows = idle(&target, &hub, idle_n, &mut InProcessHolders::default()).await;
            print_table("4. Idle connections", &rows);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    pin_self(1);
    let hub = spawn_hub();
    let mut postgres = Postgres { admin: None };
    if wants("write") || wants("latency") {
        for db in &args.databases {
            let (url, env, baseline, title): (String, Vec<(&str, &str)>, RawDb, &str) =
                match db.as_str() {
                    "sqlite-full" => (
                        sqlite_url(&dir, "full.db"),
                        vec![("LIVECHAT_SQLITE_SYNCHRONOUS", "full")],
                        RawDb::Sqlite {
                            path: dir.join("raw-full.db").display().to_string(),
                            full: true,
                        },
                        "SQLite WAL, synchronous=FULL",
                    ),
                    "sqlite-normal" => (
                        sqlite_url(&dir, "normal.db"),
                        vec![("LIVECHAT_SQLITE_SYNCHRONOUS", "normal")],
                        RawDb::Sqlite {
                            path: dir.join("raw-normal.db").display().to_string(),
                            full: false,
                        },
                        "SQLite WAL, synchronous=NORMAL",
                    ),
                    _ => {
                        let admin = postgres.admin().to_owned();
                        (
                            livechat_tests::create_database(&admin, "bench").await,
                            vec![],
                            RawDb::Postgres {
                                url: livechat_tests::create_database(&admin, "raw").await,
                            },
                            "PostgreSQL, fsync on",
                        )
                    }
                };
            let server = spawn_server(&url, &env).await;
            let mut peak = 1000.0;
            if wants("write") {
                let (rows, p) =
                    write_path(&server.target, &baseline, &args.senders, secs, args.rounds).await;
                peak = p;
                print_table(&format!("1. Durable write path ({title})"), &rows);
            }
            if wants("latency") {
                flush_writes().await;
                let rate = (peak / 2.0).max(50.0);
                let count = (rate * secs.as_secs_f64()) as u64;
                let rows = latency(&server.target, &hub.hub, rate, count, 1).await;
                print_table(
                    &format!("2. Delivery latency ({title}; WebSocket, open loop at 50% of peak)"),
                    &rows,
                );
            }
        }
    }
    if wants("fanout") || wants("idle") {
        let server = spawn_server(&sqlite_url(&dir, "fanout.db"), &[]).await;
        if wants("fanout") {
            let mut rows = fan_out(&server.target, &hub.hub, 10, secs).await;
            let beside = args.idle.min(FAN_OUT_IDLE);
            rows.push(
                fan_out_beside_idle(
                    &server.target,
                    &hub.hub,
                    10,
                    secs,
                    beside,
                    &mut ChildHolders::default(),
                )
                .await,
            );
            rows.extend(queue_moves(&server.target, QUEUE_WAITING, QUEUE_MOVES).await);
            print_table("3. Fan-out (SQLite FULL)", &rows);
        }
        if wants("idle") {
            let rows = idle(
                &server.target,
                &hub.hub,
                args.idle,
                &mut ChildHolders::default(),
            )
            .await;
            print_table("4. Idle connections", &rows);
        }
    }
    if wants("crossnode") {
        let admin = postgres.admin().to_owned();
        let url = livechat_tests::create_database(&admin, "cross").await;
        let redis = livechat_tests::redis_server::RedisServer::start();
        let redis_env = [("REDIS_URL", redis.url.as_str())];
        let a = spawn_server(&url, &redis_env).await;
        let b = spawn_server(&url, &redis_env).await;
        let rows = cross_node(&a.target, &b.target, 500.0, 500 * args.seconds, 10, secs).await;
        print_table(
            "5. Cross-node (PostgreSQL + Redis; library = receivers on node B, baseline = on node A)",
            &rows,
        );
    }
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use super::senders;

    #[test]
    fn senders_takes_positive_counts_in_order() {
        let parse = |v: &str| senders(Some(v.to_owned()));
        assert_eq!(parse("1,8,64"), Some(vec![1, 8, 64]));
        assert_eq!(parse(" 64 "), Some(vec![64]));
        assert_eq!(parse("8, 2"), Some(vec![8, 2]));
        for bad in ["", "0", "1,0", "a", "1,,8", "-1", "1.5"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(senders(None), None);
    }
}
