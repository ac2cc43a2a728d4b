//! # livechat-bench
//!
//! Drives a livechat server over real HTTP and WebSocket on loopback and
//! prints, per scenario, the library's figure next to a baseline measured in
//! the same run, and their ratio (issue #5). Absolute numbers on a shared
//! machine are noise; the ratio is the result.
//!
//! Scenarios:
//! 1. [`write_path`]: messages stored per second through `POST …/messages`
//!    with 1, 8 and 64 senders over distinct sessions, next to raw
//!    single-row `INSERT` + commit on the same kind of database file and
//!    durability.
//! 2. [`latency`]: send-to-receipt latency between an agent and a customer
//!    over WebSocket at a fixed open-loop rate (the send time is stamped in
//!    the message; one clock), next to the same through a raw relay.
//! 3. [`fan_out`]: deliveries per second to rooms of 10 joined clients with
//!    100-byte messages, next to a raw tokio-tungstenite broadcast hub.
//! 4. [`idle`]: resident memory per idle authenticated connection and the
//!    ping round trip while they are connected.
//!
//! The server is either started in this process ([`Target::in_process`],
//! used by the smoke test) or is the example server running elsewhere
//! (the binary starts it pinned to a core with `taskset`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

mod baseline;

pub use baseline::{RawHub, raw_insert_rate};

/// The JWT secret the bench signs tokens with (the server must use it).
pub const SECRET: &str = "livechat-bench-secret";

/// A server to drive.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:port`.
    pub base: String,
    /// The server's process id, when known (for memory figures).
    pub pid: Option<u32>,
}

impl Target {
    /// Starts the example host in this process on `database_url` (already
    /// created) and returns where it listens.
    ///
    /// # Panics
    /// When the database cannot be prepared or no port can be bound.
    pub async fn in_process(database_url: &str) -> Self {
        use poem::listener::{Acceptor, Listener, TcpListener};
        let db = livechat_example_server::prepare_database(database_url)
            .await
            .expect("database");
        let mut config = livechat_example_server::Config::new(database_url, SECRET);
        config.presence_ttl = Duration::from_secs(600);
        let mut realtime = config.realtime();
        realtime.send_rate_per_sec = 100_000;
        realtime.outbound_queue = 65_536;
        let host = livechat_example_server::build_with(
            db,
            &config,
            Arc::new(livechat_core::bus::InProcessBus::new()),
            realtime,
        );
        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .expect("bind");
        let addr = *acceptor.local_addr()[0].as_socket_addr().expect("tcp");
        let endpoint = host.endpoint;
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run(endpoint)
                .await;
        });
        Self {
            base: format!("http://{addr}"),
            pid: Some(std::process::id()),
        }
    }

    fn ws(&self) -> String {
        format!("{}/livechat/ws", self.base.replacen("http", "ws", 1))
    }
}

/// A signed agent token for `user` (every tenant).
#[must_use]
pub fn agent_token(user: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    livechat_example_server::issue_token(
        SECRET,
        &livechat_example_server::Claims {
            sub: user,
            roles: vec!["SUPPORT_AGENT".into()],
            tenant_ids: None,
            iat: now,
            exp: now + 3600,
        },
    )
    .expect("sign")
}

/// One line of a scenario's table.
#[derive(Clone, Debug)]
pub struct Row {
    /// What was measured.
    pub label: String,
    /// The library's figure.
    pub library: f64,
    /// The baseline's figure.
    pub baseline: f64,
    /// Unit of both figures.
    pub unit: &'static str,
}

impl Row {
    /// library / baseline.
    #[must_use]
    pub fn ratio(&self) -> f64 {
        if self.baseline == 0.0 {
            0.0
        } else {
            self.library / self.baseline
        }
    }
}

/// Prints a scenario's table.
pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n## {title}\n");
    println!("| case | livechat | baseline | ratio |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} {} | {:.1} {} | {:.2}× |",
            r.label,
            r.library,
            r.unit,
            r.baseline,
            r.unit,
            r.ratio()
        );
    }
}

async fn http(
    client: &reqwest::Client,
    target: &Target,
    method: reqwest::Method,
    path: &str,
    user: i64,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client
        .request(method, format!("{}{path}", target.base))
        .header("Authorization", format!("Bearer {}", agent_token(user)))
        .header("X-Tenant-ID", "1");
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Puts agent `user` online and opens an agent session; returns its id.
async fn agent_session(client: &reqwest::Client, target: &Target, user: i64) -> String {
    let (code, _) = http(
        client,
        target,
        reqwest::Method::PUT,
        "/livechat/agents/me/status",
        user,
        Some(json!({"status": "online"})),
    )
    .await;
    assert_eq!(code, 200, "set status");
    let (code, body) = http(
        client,
        target,
        reqwest::Method::POST,
        "/livechat/sessions",
        user,
        Some(json!({})),
    )
    .await;
    if code == 201 {
        return body["data"]["id"].as_str().expect("id").to_owned();
    }
    // An earlier run left it open: reuse it.
    let (_, list) = http(
        client,
        target,
        reqwest::Method::GET,
        "/livechat/sessions?status=OPEN&limit=200",
        user,
        None,
    )
    .await;
    list["data"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["agent_id"] == user))
        .and_then(|s| s["id"].as_str())
        .expect("an open session")
        .to_owned()
}

/// Scenario 1: messages per second through `POST …/messages` with `senders`
/// concurrent senders on distinct sessions, for `duration`.
pub async fn post_rate(
    target: &Target,
    senders: usize,
    duration: Duration,
    first_agent: i64,
) -> f64 {
    let client = reqwest::Client::new();
    let mut sessions = Vec::new();
    for i in 0..senders {
        let agent = first_agent + i as i64;
        sessions.push((agent, agent_session(&client, target, agent).await));
    }
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|(agent, session)| {
            let client = client.clone();
            let target = target.clone();
            tokio::spawn(async move {
                let path = format!("/livechat/sessions/{session}/messages");
                let mut stored = 0u64;
                while Instant::now() < deadline {
                    let (code, _) = http(
                        &client,
                        &target,
                        reqwest::Method::POST,
                        &path,
                        agent,
                        Some(json!({"message": "hello there, a short chat line"})),
                    )
                    .await;
                    if code == 201 {
                        stored += 1;
                    }
                }
                stored
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Scenario 1 with its baseline: one row per sender count.
pub async fn write_path(
    target: &Target,
    baseline_db: &str,
    counts: &[usize],
    duration: Duration,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut next_agent = 1000;
    for &n in counts {
        let library = post_rate(target, n, duration, next_agent).await;
        next_agent += n as i64;
        let baseline = raw_insert_rate(baseline_db, n, duration).await;
        rows.push(Row {
            label: format!("{n} sender(s)"),
            library,
            baseline,
            unit: "msg/s",
        });
    }
    rows
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(target: &Target, user: i64) -> Ws {
    let mut req = target.ws().into_client_request().expect("request");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", agent_token(user))
            .parse()
            .expect("header"),
    );
    req.headers_mut()
        .insert("X-Tenant-ID", "1".parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket");
    ws
}

/// The next JSON frame of `ty` (skipping others); `None` on close or after 10 s.
async fn expect(ws: &mut Ws, ty: &str) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).ok()?;
                if v["type"] == ty {
                    return Some(v);
                }
                if v["type"] == "error" {
                    eprintln!("error frame while waiting for {ty}: {v}");
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

async fn join(ws: &mut Ws, session: &str) {
    ws.send(Message::Text(
        json!({"type": "join_session", "session_id": session})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    expect(ws, "joined").await.expect("joined");
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Messages measured.
    pub count: u64,
}

fn percentiles(h: &Histogram<u64>) -> Latency {
    Latency {
        p50: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
        count: h.len(),
    }
}

/// Sends `count` stamped messages at `rate` per second (open loop: each
/// send is due at its scheduled time whatever happened before; latency is
/// measured from the schedule, so a stall shows) through `send` and
/// receives them on `rx`, returning the latency distribution.
async fn measure<S, R>(rate: f64, count: u64, mut send: S, mut rx: R) -> Latency
where
    S: FnMut(u64, String) -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
    R: futures_util::Stream<Item = String> + Unpin + Send + 'static,
{
    let origin = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let sender = tokio::spawn(async move {
        for i in 0..count {
            let due = origin + interval.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
            let stamp = due.duration_since(origin).as_micros();
            send(i, format!("{stamp:020}{}", "x".repeat(80))).await;
        }
    });
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut got = 0;
    while got < count {
        let Ok(Some(text)) = tokio::time::timeout(Duration::from_secs(10), rx.next()).await else {
            break;
        };
        let Some(stamp) = text.get(..20).and_then(|s| s.parse::<u128>().ok()) else {
            continue;
        };
        let now = origin.elapsed().as_micros();
        let _ = h.record(
            u64::try_from(now.saturating_sub(stamp))
                .unwrap_or(u64::MAX)
                .max(1),
        );
        got += 1;
    }
    let _ = sender.await;
    percentiles(&h)
}

/// A stream of message texts from a livechat socket.
fn livechat_texts(
    ws: futures_util::stream::SplitStream<Ws>,
) -> impl futures_util::Stream<Item = String> + Unpin + Send {
    Box::pin(ws.filter_map(|m| async move {
        let Ok(Message::Text(t)) = m else { return None };
        let v: Value = serde_json::from_str(&t).ok()?;
        (v["type"] == "new_message").then(|| v["message"].as_str().unwrap_or_default().to_owned())
    }))
}

/// Scenario 2: agent → agent latency over WebSocket at `rate` per second,
/// with the raw relay as baseline.
pub async fn latency(target: &Target, rate: f64, count: u64) -> Vec<Row> {
    let client = reqwest::Client::new();
    let session = agent_session(&client, target, 1).await;
    let mut sender = connect(target, 1).await;
    let mut receiver = connect(target, 2).await;
    join(&mut sender, &session).await;
    join(&mut receiver, &session).await;
    let (tx, mut sender_rx) = sender.split();
    // Acks and echoes are read and dropped so the socket keeps flowing.
    tokio::spawn(async move { while sender_rx.next().await.is_some() {} });
    let tx = Arc::new(tokio::sync::Mutex::new(tx));
    let (_, rx) = receiver.split();
    let s = session.clone();
    let lib = measure(
        rate,
        count,
        move |i, text| {
            let tx = tx.clone();
            let frame = json!({"type": "send_message", "session_id": s, "client_msg_id": format!("l{i}"), "message": text}).to_string();
            Box::pin(async move {
                let _ = tx.lock().await.send(Message::Text(frame.into())).await;
            })
        },
        livechat_texts(rx),
    )
    .await;
    let hub = RawHub::start().await;
    let base = hub.latency(rate, count).await;
    vec![
        Row {
            label: format!("p50 at {rate:.0} msg/s"),
            library: lib.p50,
            baseline: base.p50,
            unit: "ms",
        },
        Row {
            label: format!("p99 at {rate:.0} msg/s"),
            library: lib.p99,
            baseline: base.p99,
            unit: "ms",
        },
        Row {
            label: "messages received".into(),
            library: lib.count as f64,
            baseline: base.count as f64,
            unit: "",
        },
    ]
}

/// Scenario 3: deliveries per second to `rooms` rooms of 10 joined clients
/// (100-byte messages posted over WebSocket), with the raw hub as baseline.
pub async fn fan_out(target: &Target, rooms: usize, duration: Duration) -> Vec<Row> {
    let client = reqwest::Client::new();
    let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut senders = Vec::new();
    for r in 0..rooms {
        let agent = 2000 + r as i64;
        let session = agent_session(&client, target, agent).await;
        for member in 0..10 {
            let mut ws = connect(target, 3000 + (r * 10 + member) as i64).await;
            join(&mut ws, &session).await;
            if member == 0 {
                senders.push((ws, session.clone()));
            } else {
                let d = delivered.clone();
                tokio::spawn(async move {
                    while let Some(Ok(m)) = ws.next().await {
                        if matches!(m, Message::Text(ref t) if t.contains("\"new_message\"")) {
                            d.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        }
    }
    let start_count = delivered.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|(ws, session)| {
            tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                let body = "m".repeat(100);
                let mut i = 0u64;
                // Closed loop on acks: one message in flight per room.
                while Instant::now() < deadline {
                    let frame = json!({"type": "send_message", "session_id": session, "client_msg_id": format!("f{i}"), "message": body});
                    if tx.send(Message::Text(frame.to_string().into())).await.is_err() {
                        break;
                    }
                    i += 1;
                    loop {
                        match rx.next().await {
                            Some(Ok(Message::Text(t))) if t.contains("\"ack\"") || t.contains("\"error\"") => break,
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    // Let in-flight deliveries land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lib = (delivered.load(std::sync::atomic::Ordering::Relaxed) - start_count) as f64
        / started.elapsed().as_secs_f64();
    let hub = RawHub::start().await;
    let base = hub.fan_out(rooms, duration).await;
    vec![Row {
        label: format!("{rooms} room(s) × 10 clients, 100 B"),
        library: lib,
        baseline: base,
        unit: "deliveries/s",
    }]
}

/// Resident memory of `pid` in KiB (from `/proc/<pid>/smaps_rollup`).
#[must_use]
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with("Rss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Scenario 4: `count` idle authenticated connections: RSS growth per
/// connection of the server process and the ping round trip while they are
/// connected. The baseline is the raw hub's RSS growth for the same number
/// of idle sockets (same process when the server runs in-process).
pub async fn idle(target: &Target, count: usize) -> Vec<Row> {
    let pid = target.pid.unwrap_or_else(std::process::id);
    let before = rss_kib(pid).unwrap_or(0);
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let mut ws = connect(target, 5000 + i as i64).await;
        expect(&mut ws, "ready").await;
        conns.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let per_conn = after.saturating_sub(before) as f64 / count.max(1) as f64;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for ws in conns.iter_mut().take(200) {
        let t = Instant::now();
        let _ = ws
            .send(Message::Text(json!({"type": "ping"}).to_string().into()))
            .await;
        if expect(ws, "pong").await.is_some() {
            let _ = h.record(
                u64::try_from(t.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
    }
    let rtt = percentiles(&h);
    let hub = RawHub::start().await;
    let hub_before = rss_kib(std::process::id()).unwrap_or(0);
    let raw = hub.idle(count).await;
    let hub_after = rss_kib(std::process::id()).unwrap_or(0);
    drop(raw);
    drop(conns);
    vec![
        Row {
            label: format!("RSS growth per idle connection ({count})"),
            library: per_conn,
            baseline: hub_after.saturating_sub(hub_before) as f64 / count.max(1) as f64,
            unit: "KiB",
        },
        Row {
            label: "ping round trip p99".into(),
            library: rtt.p99,
            baseline: 0.0,
            unit: "ms",
        },
    ]
}
