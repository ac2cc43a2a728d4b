//! Baselines measured in the same run: raw database inserts and a raw
//! tokio-tungstenite broadcast hub (no authentication, no persistence).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous,
};
use sea_orm::sqlx::{ConnectOptions, Connection};
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
/// The writers use connections of their own, outside any pool: `sqlx`'s
/// pool pings each connection given back to it, which cost the raw
/// PostgreSQL insert a second round trip (BENCHMARKS.md, "The harness's
/// own cost"). On PostgreSQL each writer has its own connection; on SQLite
/// the writers share at most 8 (`SQLITE_CONNECTIONS`), each taken for one
/// insert and handed back (more connections to one file would mostly
/// wait on its write lock).
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
            let mut conns = Vec::new();
            for _ in 0..writers.clamp(1, SQLITE_CONNECTIONS) {
                conns.push(options.connect().await.expect("baseline database"));
            }
            sea_orm::sqlx::query(
                "CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
            )
            .execute(&mut conns[0])
            .await
            .expect("baseline table");
            insert_loop(
                conns,
                writers,
                duration,
                |mut conn: SqliteConnection| async {
                    let stored = sea_orm::sqlx::query("INSERT INTO raw (body) VALUES (?)")
                        .bind(BODY)
                        .execute(&mut conn)
                        .await
                        .is_ok();
                    (conn, stored)
                },
            )
            .await
        }
        RawDb::Postgres { url } => {
            let options: PgConnectOptions = url.parse().expect("baseline database url");
            let mut conns = Vec::new();
            for _ in 0..writers.max(1) {
                conns.push(options.connect().await.expect("baseline database"));
            }
            sea_orm::sqlx::query(
                "CREATE TABLE IF NOT EXISTS raw (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)",
            )
            .execute(&mut conns[0])
            .await
            .expect("baseline table");
            insert_loop(conns, writers, duration, |mut conn: PgConnection| async {
                let stored = sea_orm::sqlx::query("INSERT INTO raw (body) VALUES ($1)")
                    .bind(BODY)
                    .execute(&mut conn)
                    .await
                    .is_ok();
                (conn, stored)
            })
            .await
        }
    }
}

/// At most this many SQLite connections serve the raw writers.
const SQLITE_CONNECTIONS: usize = 8;

const BODY: &str = "hello there, a short chat line";

/// Runs `insert` from `writers` tasks until `duration` is over, each
/// insert on a connection of `conns` taken for it and handed back;
/// successful inserts per second. The connections are closed at the end.
async fn insert_loop<C, F, Fut>(conns: Vec<C>, writers: usize, duration: Duration, insert: F) -> f64
where
    C: Connection + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (C, bool)> + Send,
{
    let (give_back, idle) = tokio::sync::mpsc::unbounded_channel();
    for conn in conns {
        let _ = give_back.send(conn);
    }
    let idle = Arc::new(Mutex::new(idle));
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let insert = insert.clone();
            let (give_back, idle) = (give_back.clone(), idle.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let Some(conn) = idle.lock().await.recv().await else {
                        break;
                    };
                    let (conn, stored) = insert(conn).await;
                    let _ = give_back.send(conn);
                    if stored {
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
    let rate = total as f64 / started.elapsed().as_secs_f64();
    drop(give_back);
    let mut idle = idle.lock().await;
    while let Ok(conn) = idle.try_recv() {
        let _ = conn.close().await;
    }
    rate
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
