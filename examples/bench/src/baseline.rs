//! Baselines measured in the same run: raw database inserts and a raw
//! tokio-tungstenite broadcast hub (no authentication, no persistence).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sea_orm::sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, broadcast};
use tokio_tungstenite::tungstenite::Message;

use crate::{Latency, measure};

/// Rows per second of raw single-row `INSERT` + commit with `writers`
/// concurrent writers on the SQLite file `path`, with the library's
/// settings (WAL, `synchronous=FULL`, busy timeout) for `duration`.
///
/// # Panics
/// When the file cannot be opened.
pub async fn raw_insert_rate(path: &str, writers: usize, duration: Duration) -> f64 {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .expect("baseline database");
    sea_orm::sqlx::query(
        "CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    )
    .execute(&pool)
    .await
    .expect("baseline table");
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    if sea_orm::sqlx::query("INSERT INTO raw (body) VALUES (?)")
                        .bind("hello there, a short chat line")
                        .execute(&pool)
                        .await
                        .is_ok()
                    {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    pool.close().await;
    total as f64 / started.elapsed().as_secs_f64()
}

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Arc<str>>>>>;

/// A raw WebSocket relay: a client's first text frame names its room; every
/// later frame goes to every member of the room (the sender included).
pub struct RawHub {
    addr: std::net::SocketAddr,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

impl RawHub {
    /// Starts the hub on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let rooms: Rooms = Arc::default();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let rooms = rooms.clone();
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    let (mut tx, mut rx) = ws.split();
                    let Some(Ok(Message::Text(room))) = rx.next().await else {
                        return;
                    };
                    let room_tx = rooms
                        .lock()
                        .await
                        .entry(room.to_string())
                        .or_insert_with(|| broadcast::channel(4096).0)
                        .clone();
                    let mut sub = room_tx.subscribe();
                    let writer = tokio::spawn(async move {
                        while let Ok(text) = sub.recv().await {
                            if tx.send(Message::Text(text.as_ref().into())).await.is_err() {
                                return;
                            }
                        }
                    });
                    while let Some(Ok(m)) = rx.next().await {
                        if let Message::Text(t) = m {
                            let _ = room_tx.send(Arc::from(t.as_str()));
                        }
                    }
                    writer.abort();
                });
            }
        });
        Self { addr }
    }

    async fn client(&self, room: &str) -> Ws {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", self.addr))
            .await
            .expect("hub");
        ws.send(Message::Text(room.into())).await.expect("join");
        ws
    }

    /// Latency through the hub at `rate`, as [`crate::latency`] measures it.
    pub async fn latency(&self, rate: f64, count: u64) -> Latency {
        let sender = self.client("latency").await;
        let receiver = self.client("latency").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (tx, mut own) = sender.split();
        tokio::spawn(async move { while own.next().await.is_some() {} });
        let tx = Arc::new(Mutex::new(tx));
        let (_, rx) = receiver.split();
        let texts = Box::pin(rx.filter_map(|m| async move {
            match m {
                Ok(Message::Text(t)) => Some(t.to_string()),
                _ => None,
            }
        }));
        measure(
            rate,
            count,
            move |_, text| {
                let tx = tx.clone();
                Box::pin(async move {
                    let _ = tx.lock().await.send(Message::Text(text.into())).await;
                })
            },
            texts,
        )
        .await
    }

    /// Deliveries per second to `rooms` rooms of 10 clients, one sender per
    /// room waiting for its own copy before the next (like an ack).
    pub async fn fan_out(&self, rooms: usize, duration: Duration) -> f64 {
        let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut senders = Vec::new();
        for r in 0..rooms {
            for member in 0..10 {
                let ws = self.client(&format!("room{r}")).await;
                if member == 0 {
                    senders.push(ws);
                } else {
                    let d = delivered.clone();
                    let mut ws = ws;
                    tokio::spawn(async move {
                        while let Some(Ok(m)) = ws.next().await {
                            if m.is_text() {
                                d.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = senders
            .into_iter()
            .map(|ws| {
                tokio::spawn(async move {
                    let (mut tx, mut rx) = ws.split();
                    let body = format!(
                        "{{\"type\":\"new_message\",\"message\":\"{}\"}}",
                        "m".repeat(100)
                    );
                    while Instant::now() < deadline {
                        if tx.send(Message::Text(body.clone().into())).await.is_err() {
                            return;
                        }
                        if !matches!(rx.next().await, Some(Ok(_))) {
                            return;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        delivered.load(std::sync::atomic::Ordering::Relaxed) as f64
            / started.elapsed().as_secs_f64()
    }

    /// Opens `count` idle clients and keeps them until the result is dropped.
    pub async fn idle(&self, count: usize) -> Vec<Ws> {
        let mut v = Vec::with_capacity(count);
        for i in 0..count {
            v.push(self.client(&format!("idle{i}")).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        v
    }
}
