//! Baselines measured in the same run: raw database inserts and a raw
//! tokio-tungstenite broadcast hub (no authentication, no persistence).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sea_orm::sqlx::postgres::PgPoolOptions;
use sea_orm::sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, broadcast};
use tokio_tungstenite::tungstenite::Message;

use crate::{Latency, measure};

/// The database a raw-insert baseline runs on: the same kind and durability
/// as the library's in the same table row.
#[derive(Clone, Debug)]
pub enum RawDb {
    /// An SQLite file (WAL, busy timeout) with `synchronous` = `FULL` when
    /// `full`, else `NORMAL`.
    Sqlite {
        /// File path.
        path: String,
        /// `synchronous=FULL` (else `NORMAL`).
        full: bool,
    },
    /// A PostgreSQL database (the server's own durability: fsync on).
    Postgres {
        /// Connection URL.
        url: String,
    },
}

/// Rows per second of raw single-row `INSERT` + commit (autocommit) with
/// `writers` concurrent writers on `db`, for `duration`.
///
/// # Panics
/// When the database cannot be opened.
pub async fn raw_insert_rate(db: &RawDb, writers: usize, duration: Duration) -> f64 {
    match db {
        RawDb::Sqlite { path, full } => {
            let options = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(if *full {
                    SqliteSynchronous::Full
                } else {
                    SqliteSynchronous::Normal
                })
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
            insert_loop(writers, duration, move || {
                let pool = pool.clone();
                async move {
                    sea_orm::sqlx::query("INSERT INTO raw (body) VALUES (?)")
                        .bind(BODY)
                        .execute(&pool)
                        .await
                        .is_ok()
                }
            })
            .await
        }
        RawDb::Postgres { url } => {
            let pool = PgPoolOptions::new()
                .max_connections(u32::try_from(writers.clamp(1, 16)).unwrap_or(16))
                .connect(url)
                .await
                .expect("baseline database");
            sea_orm::sqlx::query(
                "CREATE TABLE IF NOT EXISTS raw (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)",
            )
            .execute(&pool)
            .await
            .expect("baseline table");
            insert_loop(writers, duration, move || {
                let pool = pool.clone();
                async move {
                    sea_orm::sqlx::query("INSERT INTO raw (body) VALUES ($1)")
                        .bind(BODY)
                        .execute(&pool)
                        .await
                        .is_ok()
                }
            })
            .await
        }
    }
}

const BODY: &str = "hello there, a short chat line";

/// Runs `insert` from `writers` tasks until `duration` is over; successful
/// inserts per second.
async fn insert_loop<F, Fut>(writers: usize, duration: Duration, insert: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let insert = insert.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    if insert().await {
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
    total as f64 / started.elapsed().as_secs_f64()
}

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Arc<str>>>>>;

/// A raw WebSocket relay: a client's first text frame names its room; every
/// later frame goes to every member of the room (the sender included).
pub struct RawHub {
    addr: std::net::SocketAddr,
    /// The process serving the hub (for memory figures).
    pub pid: u32,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Serves the raw hub on `listener` until the process ends.
pub async fn serve_hub(listener: TcpListener) {
    let rooms: Rooms = Arc::default();
    while let Ok((stream, _)) = listener.accept().await {
        let rooms = rooms.clone();
        let _ = stream.set_nodelay(true);
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
}

impl RawHub {
    /// Starts the hub in this process on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve_hub(listener));
        Self {
            addr,
            pid: std::process::id(),
        }
    }

    /// A hub already listening on `addr`, served by process `pid` (e.g. a
    /// `livechat-bench --raw-hub` pinned to the server's core).
    #[must_use]
    pub const fn at(addr: std::net::SocketAddr, pid: u32) -> Self {
        Self { addr, pid }
    }

    /// Where the hub listens.
    #[must_use]
    pub const fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    async fn client(&self, room: &str) -> Ws {
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
            format!("ws://{}/", self.addr),
            None,
            true,
        )
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
    /// room keeping up to [`crate::WINDOW`] messages in flight (its own copy
    /// coming back plays the library's `ack`).
    pub async fn fan_out(&self, rooms: usize, duration: Duration) -> f64 {
        let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut senders = Vec::new();
        for r in 0..rooms {
            for member in 0..10 {
                let ws = self.client(&format!("room{r}")).await;
                if member == 0 {
                    senders.push(ws);
                } else {
                    drop(crate::count_deliveries(
                        ws,
                        delivered.clone(),
                        "new_message",
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let body = format!(
            "{{\"type\":\"new_message\",\"message\":\"{}\"}}",
            "m".repeat(100)
        );
        crate::windowed_senders(
            senders,
            duration,
            &delivered,
            move |_, _| body.clone(),
            "new_message",
        )
        .await
    }
}
