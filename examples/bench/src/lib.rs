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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

mod baseline;

pub use baseline::{RawDb, RawHub, raw_insert_rate, serve_hub};

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
        Self::in_process_on(
            database_url,
            Arc::new(livechat_core::bus::InProcessBus::new()),
        )
        .await
    }

    /// As [`Target::in_process`], as one node of several sharing the Redis
    /// server at `redis_url` (cross-node fan-out).
    ///
    /// # Panics
    /// As [`Target::in_process`], or when Redis cannot be reached.
    pub async fn in_process_with_redis(database_url: &str, redis_url: &str) -> Self {
        let bus = livechat_core::redis_bus::RedisBus::connect(
            redis_url,
            livechat_core::redis_bus::DEFAULT_CHANNEL,
        )
        .await
        .expect("redis");
        Self::in_process_on(database_url, Arc::new(bus)).await
    }

    async fn in_process_on(database_url: &str, bus: Arc<dyn livechat_core::bus::EventBus>) -> Self {
        use poem::listener::{Acceptor, Listener, TcpListener};
        let db = livechat_example_server::prepare_database(database_url)
            .await
            .expect("database");
        let mut config = livechat_example_server::Config::new(database_url, SECRET);
        config.presence_ttl = Duration::from_secs(600);
        config.rate_limits = livechat_poem::RateLimits::unlimited();
        let mut realtime = config.realtime();
        realtime.send_rate_per_sec = 100_000;
        realtime.outbound_queue = 65_536;
        realtime.outbound_queue_bytes = 256 * 1024 * 1024;
        let host = livechat_example_server::build_with(db, &config, bus, realtime);
        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .expect("bind");
        let addr = *acceptor.local_addr()[0].as_socket_addr().expect("tcp");
        let endpoint = host.endpoint;
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(livechat_poem::NoDelay(acceptor))
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
    token(user, "SUPPORT_AGENT", None)
}

/// A signed token of the host's logged-in `user` (a customer) in `tenant`.
#[must_use]
pub fn customer_token(user: i64, tenant: i64) -> String {
    token(user, "USER", Some(vec![tenant]))
}

fn token(user: i64, role: &str, tenant_ids: Option<Vec<i64>>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    livechat_example_server::issue_token(
        SECRET,
        &livechat_example_server::Claims {
            sub: user,
            roles: vec![role.into()],
            tenant_ids,
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
    /// The baseline's figure (`NaN` when the row has none).
    pub baseline: f64,
    /// Unit of both figures.
    pub unit: &'static str,
}

impl Row {
    /// A rate row (`msg/s`, `deliveries/s`) whose library figure is zero:
    /// the scenario did not work, whatever its baseline did (a cross-node
    /// room rate of 0.0 once went unnoticed in a table).
    #[must_use]
    pub fn delivered_nothing(&self) -> bool {
        matches!(self.unit, "msg/s" | "deliveries/s") && self.library <= 0.0
    }

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
        if r.baseline.is_nan() {
            println!("| {} | {:.1} {} | — | — |", r.label, r.library, r.unit);
        } else {
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
    for r in rows.iter().filter(|r| r.delivered_nothing()) {
        println!(
            "\n**{}: the library delivered nothing; the scenario failed.**",
            r.label
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
    http_as(client, target, method, path, &agent_token(user), 1, body).await
}

/// [`http`] with any host token, in `tenant`.
async fn http_as(
    client: &reqwest::Client,
    target: &Target,
    method: reqwest::Method,
    path: &str,
    token: &str,
    tenant: i64,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client
        .request(method, format!("{}{path}", target.base))
        .header("Authorization", format!("Bearer {token}"))
        .header("X-Tenant-ID", tenant.to_string());
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

/// What a write-path run measured.
#[derive(Clone, Copy, Debug)]
pub struct PostRate {
    /// Messages stored (`201`) per second.
    pub per_sec: f64,
    /// Server CPU time (user + system) per stored message, in microseconds,
    /// when the server's pid is known.
    pub cpu_us: Option<f64>,
}

/// CPU time (user + system) of `pid` so far, in microseconds (from
/// `/proc/<pid>/stat`, clock ticks of 10 ms).
#[must_use]
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10_000)
}

/// Scenario 1: messages per second through `POST …/messages` with `senders`
/// concurrent senders on distinct sessions, for `duration`.
pub async fn post_rate(
    target: &Target,
    senders: usize,
    duration: Duration,
    first_agent: i64,
) -> PostRate {
    let client = reqwest::Client::new();
    let mut senders_ready = Vec::new();
    for i in 0..senders {
        let agent = first_agent + i as i64;
        let session = agent_session(&client, target, agent).await;
        senders_ready.push((
            Sender::connect(target, agent).await,
            format!("/livechat/sessions/{session}/messages"),
        ));
    }
    let cpu_before = target.pid.and_then(cpu_us);
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = senders_ready
        .into_iter()
        .map(|(mut sender, path)| {
            tokio::spawn(async move {
                let mut stored = 0u64;
                while Instant::now() < deadline {
                    if sender.post(&path, MESSAGE_BODY).await == 201 {
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
    let per_sec = total as f64 / started.elapsed().as_secs_f64();
    let cpu_after = target.pid.and_then(cpu_us);
    PostRate {
        per_sec,
        cpu_us: match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if total > 0 => Some(a.saturating_sub(b) as f64 / total as f64),
            _ => None,
        },
    }
}

/// The body of every message the write scenario posts.
const MESSAGE_BODY: &str = r#"{"message": "hello there, a short chat line"}"#;

/// One agent's HTTP/1.1 connection to the server, with what a client
/// keeps between requests: its token and headers. The write scenario
/// sends through it rather than through `reqwest`, whose per-request work
/// (URL handling, its pool, its layers) and a token signed per request cost
/// this process ~50 µs of CPU a send, on the critical path of a lone
/// sender; the raw baseline's client is `sqlx`, just as lean
/// (BENCHMARKS.md, "The harness's own cost").
struct Sender {
    conn: hyper::client::conn::http1::SendRequest<http_body_util::Full<&'static [u8]>>,
    headers: hyper::HeaderMap,
}

impl Sender {
    /// Connects as agent `agent` of tenant 1.
    async fn connect(target: &Target, agent: i64) -> Self {
        let authority = target
            .base
            .strip_prefix("http://")
            .expect("an http:// base")
            .to_owned();
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (conn, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let mut headers = hyper::HeaderMap::new();
        for (name, value) in [
            (hyper::header::HOST, authority),
            (
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", agent_token(agent)),
            ),
            (hyper::header::CONTENT_TYPE, "application/json".to_owned()),
        ] {
            headers.insert(name, value.parse().expect("header"));
        }
        headers.insert("X-Tenant-ID", hyper::header::HeaderValue::from_static("1"));
        Self { conn, headers }
    }

    /// `POST`s `body` to `path`; the status, after the whole response.
    async fn post(&mut self, path: &str, body: &'static str) -> u16 {
        use http_body_util::BodyExt;
        self.conn.ready().await.expect("connection");
        let mut request = hyper::Request::post(path)
            .body(http_body_util::Full::new(body.as_bytes()))
            .expect("request");
        *request.headers_mut() = self.headers.clone();
        let response = self.conn.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        // Read to the end, so the connection takes the next request.
        let _ = response.into_body().collect().await;
        status
    }
}

/// Scenario 1 with its baseline: one row per sender count, then the server
/// CPU per message at each count. Also returns the peak library rate (for
/// the latency scenario's send rate).
///
/// With `rounds` above 1 every count is measured that many times, the
/// counts taken in turn in each round (1, 64, 1, 64, …), so that a change
/// in the machine's speed falls on every count alike; each row gives the
/// median of the rounds (the scaling rows the median of each round's own
/// ratio) and its label the library's range. On a machine whose speed
/// moves by the minute, this is what a target is read from.
pub async fn write_path(
    target: &Target,
    baseline: &RawDb,
    counts: &[usize],
    duration: Duration,
    rounds: usize,
) -> (Vec<Row>, f64) {
    let rounds = rounds.max(1);
    // Per count: the library's rates, the baseline's, the CPU figures.
    let mut library = vec![Vec::new(); counts.len()];
    let mut raw = vec![Vec::new(); counts.len()];
    let mut cpu = vec![Vec::new(); counts.len()];
    let mut next_agent = 1000;
    for _ in 0..rounds {
        for (i, &n) in counts.iter().enumerate() {
            let rate = post_rate(target, n, duration, next_agent).await;
            next_agent += n as i64;
            library[i].push(rate.per_sec);
            cpu[i].extend(rate.cpu_us);
            raw[i].push(raw_insert_rate(baseline, n, duration).await);
        }
    }
    let range = |values: &[f64]| {
        if rounds == 1 {
            String::new()
        } else {
            let (lo, hi) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            format!(", median of {rounds} (livechat {lo:.1}–{hi:.1})")
        }
    };
    let mut rows = Vec::new();
    let mut cpu_rows = Vec::new();
    let mut peak: f64 = 0.0;
    for (i, &n) in counts.iter().enumerate() {
        let rate = median(&library[i]);
        peak = peak.max(rate);
        rows.push(Row {
            label: format!("{n} sender(s){}", range(&library[i])),
            library: rate,
            baseline: median(&raw[i]),
            unit: "msg/s",
        });
        if i > 0 {
            let ratios: Vec<f64> = library[i]
                .iter()
                .zip(&library[0])
                .map(|(rate, first)| rate / first.max(f64::MIN_POSITIVE))
                .collect();
            cpu_rows.push(Row {
                label: match counts[0] {
                    1 => format!("{n} senders vs 1 sender (scaling){}", range(&ratios)),
                    first => format!("{n} senders vs {first} senders (scaling){}", range(&ratios)),
                },
                library: median(&ratios),
                baseline: 10.0,
                unit: "× (target 10)",
            });
        }
        if !cpu[i].is_empty() {
            cpu_rows.push(Row {
                label: format!("server CPU per message, {n} sender(s){}", range(&cpu[i])),
                library: median(&cpu[i]),
                baseline: f64::NAN,
                unit: "µs",
            });
        }
    }
    rows.extend(cpu_rows);
    (rows, peak)
}

/// The median of `values` (the mean of the middle two for an even count;
/// `NaN` for none).
#[must_use]
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}

/// A WebSocket client connection.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(target: &Target, user: i64) -> Ws {
    connect_as(target, &agent_token(user), 1).await
}

/// [`connect`] with any host token, in `tenant`.
async fn connect_as(target: &Target, token: &str, tenant: i64) -> Ws {
    let mut req = target.ws().into_client_request().expect("request");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    req.headers_mut()
        .insert("X-Tenant-ID", tenant.to_string().parse().expect("header"));
    // TCP_NODELAY (the last argument), as the server sets it.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
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

impl Latency {
    /// The p50 and p99 rows (`p50 <what>`, `p99 <what>`), with `base` as
    /// the baseline.
    fn percentile_rows(&self, base: &Self, what: &str) -> [Row; 2] {
        [("p50", self.p50, base.p50), ("p99", self.p99, base.p99)].map(
            |(name, library, baseline)| Row {
                label: format!("{name} {what}"),
                library,
                baseline,
                unit: "ms",
            },
        )
    }
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
///
/// The schedule is kept by a thread of its own sleeping with the kernel's
/// high-resolution timer (tens of µs late), not by a tokio timer: tokio's
/// timers tick in whole milliseconds and round a deadline up to the next
/// tick, which sent the messages in bursts once a millisecond and added
/// 0.5–1 ms of the harness's own to every figure, library and baseline
/// alike (the raw relay's p50 was 1.2–1.3 ms). Each send is driven from
/// that thread on the runtime's handle.
async fn measure<S, R>(rate: f64, count: u64, mut send: S, mut rx: R) -> Latency
where
    S: FnMut(u64, String) -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
    R: futures_util::Stream<Item = String> + Unpin + Send + 'static,
{
    let origin = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let runtime = tokio::runtime::Handle::current();
    let sender = std::thread::spawn(move || {
        for i in 0..count {
            let due = origin + interval.mul_f64(i as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let stamp = due.duration_since(origin).as_micros();
            runtime.block_on(send(i, format!("{stamp:020}{}", "x".repeat(80))));
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
    // The thread has sent everything or is about to: its last sends are
    // due before the last receipt or the 10 s timeout above.
    let _ = tokio::task::spawn_blocking(move || sender.join()).await;
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

/// Send-to-receipt latency of one session: agent `sender` connected to
/// `from` sends at `rate` per second over WebSocket, agent `sender + 1`
/// connected to `to` receives.
pub async fn session_latency(
    from: &Target,
    to: &Target,
    sender: i64,
    rate: f64,
    count: u64,
) -> Latency {
    let client = reqwest::Client::new();
    let session = agent_session(&client, from, sender).await;
    let mut tx_ws = connect(from, sender).await;
    let mut rx_ws = connect(to, sender + 1).await;
    join(&mut tx_ws, &session).await;
    join(&mut rx_ws, &session).await;
    let (tx, mut sender_rx) = tx_ws.split();
    // Acks and echoes are read and dropped so the socket keeps flowing.
    tokio::spawn(async move { while sender_rx.next().await.is_some() {} });
    let tx = Arc::new(tokio::sync::Mutex::new(tx));
    let (_, rx) = rx_ws.split();
    measure(
        rate,
        count,
        move |i, text| {
            let tx = tx.clone();
            let frame = json!({"type": "send_message", "session_id": session, "client_msg_id": format!("l{i}"), "message": text}).to_string();
            Box::pin(async move {
                let _ = tx.lock().await.send(Message::Text(frame.into())).await;
            })
        },
        livechat_texts(rx),
    )
    .await
}

/// Scenario 2: agent → agent latency over WebSocket at `rate` per second,
/// with the raw relay `hub` as baseline.
pub async fn latency(target: &Target, hub: &RawHub, rate: f64, count: u64, agent: i64) -> Vec<Row> {
    let lib = session_latency(target, target, agent, rate, count).await;
    let base = hub.latency(rate, count).await;
    let [p50, p99] = lib.percentile_rows(&base, &format!("at {rate:.0} msg/s"));
    vec![
        p50,
        p99,
        Row {
            label: "messages received".into(),
            library: lib.count as f64,
            baseline: base.count as f64,
            unit: "",
        },
    ]
}

/// Messages a fan-out sender keeps in flight (sent, not yet acknowledged).
pub const WINDOW: usize = 8;

/// Counts the text frames containing `marker` that `ws` receives, until
/// it closes or the returned task is aborted (which closes it); dropping
/// the handle leaves the task running.
pub(crate) fn count_deliveries(
    mut ws: Ws,
    counter: Arc<AtomicU64>,
    marker: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Text(ref t) if t.contains(marker)) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

/// Runs one sender per socket for `duration`, each keeping up to
/// [`WINDOW`] frames in flight (a frame is settled by a received text
/// containing `ack`), and returns the deliveries per second counted in
/// `delivered` meanwhile (in-flight deliveries are given 200 ms to land).
pub(crate) async fn windowed_senders<F>(
    senders: Vec<Ws>,
    duration: Duration,
    delivered: &AtomicU64,
    frame: F,
    ack: &'static str,
) -> f64
where
    F: Fn(usize, u64) -> String + Clone + Send + 'static,
{
    let start_count = delivered.load(Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(room, ws)| {
            let frame = frame.clone();
            tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                let mut in_flight = 0;
                let mut i = 0u64;
                loop {
                    while in_flight < WINDOW && Instant::now() < deadline {
                        if tx.send(Message::Text(frame(room, i).into())).await.is_err() {
                            return;
                        }
                        i += 1;
                        in_flight += 1;
                    }
                    if in_flight == 0 {
                        return;
                    }
                    match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                        Ok(Some(Ok(Message::Text(t))))
                            if t.contains(ack) || t.contains("\"error\"") =>
                        {
                            in_flight -= 1;
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => return,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    (delivered.load(Ordering::Relaxed) - start_count) as f64 / started.elapsed().as_secs_f64()
}

/// Deliveries per second to `rooms` rooms of 10 joined clients: each room's
/// sender (agent `first_agent + room`) is connected to `from`, its nine
/// receivers to `to`.
pub async fn room_fan_out(
    from: &Target,
    to: &Target,
    rooms: usize,
    duration: Duration,
    first_agent: i64,
) -> f64 {
    let client = reqwest::Client::new();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let mut sessions = Vec::new();
    for r in 0..rooms {
        let agent = first_agent + r as i64;
        let session = agent_session(&client, from, agent).await;
        let mut ws = connect(from, agent).await;
        join(&mut ws, &session).await;
        senders.push(ws);
        for member in 1..10 {
            let mut ws = connect(to, first_agent + 100_000 + (r * 10 + member) as i64).await;
            join(&mut ws, &session).await;
            drop(count_deliveries(ws, delivered.clone(), "\"new_message\""));
        }
        sessions.push(session);
    }
    let body = "m".repeat(100);
    windowed_senders(
        senders,
        duration,
        &delivered,
        move |room, i| {
            json!({"type": "send_message", "session_id": sessions[room], "client_msg_id": format!("f{i}"), "message": body}).to_string()
        },
        "\"ack\"",
    )
    .await
}

/// The tenant of [`queue_moves`], apart from the other scenarios' tenant 1
/// (one of the example host's two, which alone offer chat to customers
/// by default: `LIVECHAT_CHAT_TENANTS`).
const QUEUE_TENANT: i64 = 2;

/// Scenario 3, queue moves: `waiting` customers (host users of tenant 2)
/// wait in the queue of one agent of capacity 1, each connected by
/// WebSocket and joined to its session; the agent then closes its chat
/// `moves` times, and each close assigns the head of the queue, which moves
/// every other waiting customer up one place. Reports the median time from
/// a close's request until every customer concerned has its
/// `session_updated` and the server's CPU per move. No
/// baseline: the figures compare builds (BENCHMARKS.md).
pub async fn queue_moves(target: &Target, waiting: usize, moves: usize) -> Vec<Row> {
    let moves = moves.min(waiting);
    let client = reqwest::Client::new();
    let agent = agent_token(3_000_000);
    let as_agent = |method, path: String, body| {
        let (client, agent) = (&client, &agent);
        async move { http_as(client, target, method, &path, agent, QUEUE_TENANT, body).await }
    };
    let (code, _) = as_agent(
        reqwest::Method::PUT,
        "/livechat/agents/me/status".into(),
        Some(json!({"status": "online"})),
    )
    .await;
    assert_eq!(code, 200, "agent online");
    let (code, _) = as_agent(
        reqwest::Method::PUT,
        "/livechat/settings/routing".into(),
        Some(json!({"agent_capacity": 1})),
    )
    .await;
    assert_eq!(code, 200, "capacity 1");
    let updates = Arc::new(AtomicU64::new(0));
    let fds = target.pid.and_then(open_fds);
    let mut counters = Vec::new();
    let mut sessions = Vec::new();
    // The first chat is the agent's; the others wait.
    for customer in 0..=waiting {
        let token = customer_token(3_000_000 + customer as i64, QUEUE_TENANT);
        let (code, body) = http_as(
            &client,
            target,
            reqwest::Method::POST,
            "/livechat/customer/chats",
            &token,
            QUEUE_TENANT,
            Some(json!({"topic": "queue"})),
        )
        .await;
        assert!(code == 200 || code == 201, "chat start: {code} {body}");
        let session = body["data"]["session"]["id"]
            .as_str()
            .expect("session id")
            .to_owned();
        if customer > 0 {
            assert_eq!(body["data"]["queue_position"], customer, "{body}");
            let mut ws = connect_as(target, &token, QUEUE_TENANT).await;
            join(&mut ws, &session).await;
            counters.push(count_deliveries(ws, updates.clone(), "\"session_updated\""));
        }
        sessions.push(session);
    }
    let mut times = Histogram::<u64>::new(3).expect("histogram");
    let cpu_before = target.pid.and_then(cpu_us);
    for (k, open) in sessions.iter().take(moves).enumerate() {
        let before = updates.load(Ordering::Relaxed);
        let started = Instant::now();
        let (code, body) = as_agent(
            reqwest::Method::POST,
            format!("/livechat/sessions/{open}/close"),
            None,
        )
        .await;
        assert_eq!(code, 200, "close: {body}");
        // The assigned customer's update, one per customer behind it, and
        // the closed chat's own (its customer is connected after the first).
        let updates_due = (waiting - k + usize::from(k > 0)) as u64;
        let expected = before + updates_due;
        while updates.load(Ordering::Relaxed) < expected {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "move {k}: {} of {updates_due} updates",
                updates.load(Ordering::Relaxed) - before,
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let _ = times.record(started.elapsed().as_micros() as u64);
    }
    let cpu = match (cpu_before, target.pid.and_then(cpu_us)) {
        (Some(b), Some(a)) if moves > 0 => a.saturating_sub(b) as f64 / moves as f64,
        _ => f64::NAN,
    };
    // Closes the customers' sockets before the next scenario.
    for counter in counters {
        counter.abort();
    }
    if let (Some(pid), Some(fds)) = (target.pid, fds) {
        settle(pid, fds).await;
    }
    vec![
        Row {
            label: format!(
                "queue move seen by {waiting} waiting customers (median, {moves} moves)"
            ),
            library: times.value_at_quantile(0.5) as f64 / 1000.0,
            baseline: f64::NAN,
            unit: "ms",
        },
        Row {
            label: format!("server CPU per queue move, {waiting} waiting customers"),
            library: cpu,
            baseline: f64::NAN,
            unit: "µs",
        },
    ]
}

/// Scenario 3: deliveries per second to `rooms` rooms of 10 joined clients
/// (100-byte messages posted over WebSocket, [`WINDOW`] in flight per
/// room), with the raw hub as baseline.
pub async fn fan_out(target: &Target, hub: &RawHub, rooms: usize, duration: Duration) -> Vec<Row> {
    let lib = room_fan_out(target, target, rooms, duration, 2000).await;
    let base = hub.fan_out(rooms, duration).await;
    vec![Row {
        label: format!("{rooms} room(s) × 10 clients, 100 B"),
        library: lib,
        baseline: base,
        unit: "deliveries/s",
    }]
}

/// Scenario 3 beside idle connections: the rooms of [`fan_out`] while
/// `idle` other authenticated connections of the same tenant (agents who
/// follow no session, held by `holders`) sit connected; the hub's baseline
/// holds as many idle sockets, each in a room of its own. A node must not
/// pay for connections a message is not for.
pub async fn fan_out_beside_idle(
    target: &Target,
    hub: &RawHub,
    rooms: usize,
    duration: Duration,
    idle: usize,
    holders: &mut dyn Holders,
) -> Row {
    let pid = target.pid.unwrap_or_else(std::process::id);
    let fds = open_fds(pid).unwrap_or(0);
    holders
        .open(&HoldTarget::Livechat(target.clone()), 300_000, idle)
        .await;
    let lib = room_fan_out(target, target, rooms, duration, 4000).await;
    holders.release();
    settle(pid, fds).await;
    let hub_fds = open_fds(hub.pid).unwrap_or(0);
    holders
        .open(&HoldTarget::Hub(hub.addr()), 300_000, idle)
        .await;
    let base = hub.fan_out(rooms, duration).await;
    holders.release();
    settle(hub.pid, hub_fds).await;
    Row {
        label: format!("{rooms} room(s) × 10 clients, 100 B, beside {idle} idle connections"),
        library: lib,
        baseline: base,
        unit: "deliveries/s",
    }
}

/// Scenario 5: node `a` and node `b` share a database and Redis. The same
/// measurements with the receivers on `a` (single node) and on `b` (cross
/// node): latency at `rate` and room fan-out rate.
pub async fn cross_node(
    a: &Target,
    b: &Target,
    rate: f64,
    count: u64,
    rooms: usize,
    duration: Duration,
) -> Vec<Row> {
    let single = session_latency(a, a, 11, rate, count).await;
    let cross = session_latency(a, b, 13, rate, count).await;
    let single_rate = room_fan_out(a, a, rooms, duration, 4000).await;
    let cross_rate = room_fan_out(a, b, rooms, duration, 4100).await;
    let [p50, p99] =
        cross.percentile_rows(&single, &format!("at {rate:.0} msg/s (cross vs single)"));
    vec![
        p50,
        p99,
        Row {
            label: "added p50 (target ≤ 1 ms)".into(),
            library: cross.p50 - single.p50,
            baseline: 1.0,
            unit: "ms",
        },
        Row {
            label: format!("{rooms} room(s) × 10 clients (cross vs single)"),
            library: cross_rate,
            baseline: single_rate,
            unit: "deliveries/s",
        },
        Row {
            label: "messages received (cross vs single)".into(),
            library: cross.count as f64,
            baseline: single.count as f64,
            unit: "",
        },
    ]
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

/// Open file descriptors of `pid` (`/proc/<pid>/fd`).
#[must_use]
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Waits until released connections are gone from `pid` before the next
/// scenario starts beside them: at most 60 s until it holds no more than
/// `before` + 100 descriptors (the server closes and unregisters them one
/// by one), then [`PRESENCE_GRACE`] and a little more (each departed
/// agent's presence check runs then, and is published to the tenant's
/// agents), then at most 30 s until it uses under a tenth of a core.
pub async fn settle(pid: u32, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && open_fds(pid).is_some_and(|n| n > before + 100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(PRESENCE_GRACE + Duration::from_millis(500)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(start) = cpu_us(pid) else { return };
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cpu_us(pid).is_none_or(|end| end.saturating_sub(start) < 50_000) {
            return;
        }
    }
}

/// The presence grace the harness gives the servers it starts
/// (`LIVECHAT_PRESENCE_GRACE_SECS`), shorter than the example's 10 s so
/// that the presence checks of agents who left in one scenario do not run
/// during the next.
pub const PRESENCE_GRACE: Duration = Duration::from_secs(1);

/// Kernel TCP buffer memory of the whole machine in KiB (`/proc/net/sockstat`,
/// `TCP: … mem <pages>`).
#[must_use]
pub fn tcp_mem_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(word) = it.next() {
        if word == "mem" {
            return it.next()?.parse::<u64>().ok().map(|pages| pages * 4);
        }
    }
    None
}

/// Where idle connections go.
#[derive(Clone, Debug)]
pub enum HoldTarget {
    /// The library's gateway (authenticated agents, waits for `ready`).
    Livechat(Target),
    /// The raw hub at this address (each socket joins its own room).
    Hub(std::net::SocketAddr),
}

/// Opens `count` idle connections (users / rooms numbered from `first`),
/// 64 at a time, and returns them.
pub async fn hold(target: &HoldTarget, first: i64, count: usize) -> Vec<Ws> {
    let mut out = Vec::with_capacity(count);
    let mut pending = futures_util::stream::iter(0..count)
        .map(|i| {
            let target = target.clone();
            async move {
                let n = first + i as i64;
                match target {
                    HoldTarget::Livechat(t) => {
                        let mut ws = connect(&t, n).await;
                        expect(&mut ws, "ready").await.expect("ready");
                        ws
                    }
                    HoldTarget::Hub(addr) => {
                        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
                            format!("ws://{addr}/"),
                            None,
                            true,
                        )
                        .await
                        .expect("hub");
                        ws.send(Message::Text(format!("idle{n}").into()))
                            .await
                            .expect("join");
                        ws
                    }
                }
            }
        })
        .buffer_unordered(64);
    while let Some(ws) = pending.next().await {
        out.push(ws);
    }
    out
}

/// Holds idle connections for [`idle`]: in this process, or in child
/// processes (each process has its own descriptor limit).
pub trait Holders {
    /// Opens `count` connections to `target` numbered from `first` and keeps
    /// them until [`Holders::release`].
    fn open(
        &mut self,
        target: &HoldTarget,
        first: i64,
        count: usize,
    ) -> futures_util::future::BoxFuture<'_, ()>;
    /// Closes everything opened.
    fn release(&mut self);
}

/// [`Holders`] in this process (small counts, the smoke test).
#[derive(Default)]
pub struct InProcessHolders(Vec<Ws>);

impl Holders for InProcessHolders {
    fn open(
        &mut self,
        target: &HoldTarget,
        first: i64,
        count: usize,
    ) -> futures_util::future::BoxFuture<'_, ()> {
        let target = target.clone();
        Box::pin(async move {
            let held = hold(&target, first, count).await;
            self.0.extend(held);
        })
    }
    fn release(&mut self) {
        self.0.clear();
    }
}

/// What [`hold_and_measure`] measured.
struct Held {
    /// Growth of the server's resident memory, KiB.
    rss_kib: u64,
    /// Growth of the kernel's TCP memory, KiB.
    tcp_kib: u64,
    /// The connections kept in this process.
    conns: Vec<Ws>,
    /// Time until every connection was open (the livechat server's
    /// `ready` frame received), seconds.
    open_secs: f64,
    /// The server's CPU time while they opened, µs.
    open_cpu_us: u64,
}

/// Opens `count` connections to `target` (`count - kept` through
/// `holders`, `kept` in this process, returned) and measures the growth of
/// `pid`'s resident memory and of the kernel's TCP memory, and the time
/// and `pid`'s CPU the opening took.
async fn hold_and_measure(
    holders: &mut dyn Holders,
    target: &HoldTarget,
    first: i64,
    count: usize,
    kept: usize,
    pid: u32,
) -> Held {
    let rss_before = rss_kib(pid).unwrap_or(0);
    let tcp_before = tcp_mem_kib().unwrap_or(0);
    let cpu_before = cpu_us(pid).unwrap_or(0);
    let started = Instant::now();
    holders.open(target, first, count - kept).await;
    let conns = hold(target, first + (count - kept) as i64, kept).await;
    let open_secs = started.elapsed().as_secs_f64();
    let open_cpu_us = cpu_us(pid).unwrap_or(0).saturating_sub(cpu_before);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Held {
        rss_kib: rss_kib(pid).unwrap_or(0).saturating_sub(rss_before),
        tcp_kib: tcp_mem_kib().unwrap_or(0).saturating_sub(tcp_before),
        conns,
        open_secs,
        open_cpu_us,
    }
}

/// Scenario 4: `count` idle connections (`count - 200` through `holders`,
/// 200 in this process for the ping round trip): RSS growth per connection
/// of the server process, the same for the raw `hub`'s process, kernel TCP
/// memory per connection (both ends, machine-wide), the ping round trip
/// p99 while all are connected, and how fast they opened (all at once, 64
/// at a time per holder, as clients reconnecting after a restart) with
/// the server's CPU per connection opened.
pub async fn idle(
    target: &Target,
    hub: &RawHub,
    count: usize,
    holders: &mut dyn Holders,
) -> Vec<Row> {
    let pinged = count.min(200);
    let pid = target.pid.unwrap_or_else(std::process::id);
    let lib_target = HoldTarget::Livechat(target.clone());
    let lib = hold_and_measure(holders, &lib_target, 100_000, count, pinged, pid).await;
    let mut conns = lib.conns;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for ws in &mut conns {
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
    drop(conns);
    holders.release();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let hub_target = HoldTarget::Hub(hub.addr());
    let hub_held = hold_and_measure(holders, &hub_target, 0, count, pinged, hub.pid).await;
    drop(hub_held.conns);
    holders.release();
    let n = count.max(1) as f64;
    vec![
        Row {
            label: format!("RSS growth per idle connection ({count})"),
            library: lib.rss_kib as f64 / n,
            baseline: hub_held.rss_kib as f64 / n,
            unit: "KiB",
        },
        Row {
            label: "kernel TCP memory per connection (both ends)".into(),
            library: lib.tcp_kib as f64 / n,
            baseline: hub_held.tcp_kib as f64 / n,
            unit: "KiB",
        },
        Row {
            label: format!("ping round trip p99 ({} pings)", rtt.count),
            library: rtt.p99,
            baseline: f64::NAN,
            unit: "ms",
        },
        Row {
            label: format!("connections opened per second ({count} at once, 64 per holder)"),
            library: n / lib.open_secs.max(1e-9),
            baseline: n / hub_held.open_secs.max(1e-9),
            unit: "conn/s",
        },
        Row {
            label: "server CPU per connection opened".into(),
            library: lib.open_cpu_us as f64 / n,
            baseline: hub_held.open_cpu_us as f64 / n,
            unit: "µs",
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.5]), 7.5);
        assert!(median(&[]).is_nan());
    }
}
