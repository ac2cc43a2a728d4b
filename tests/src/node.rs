//! A real example-server node on a loopback port, and a WebSocket client
//! (tokio-tungstenite) for the real-time tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use livechat_core::bus::EventBus;
use poem::listener::{Acceptor, Listener, TcpListener};
use sea_orm::DatabaseConnection;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

/// One running node.
pub struct Node {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The module handle (for `shutdown`).
    pub livechat: livechat_poem::Livechat,
    /// The service over the node's store and bus.
    pub chat: livechat_core::ChatService,
    server: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Serves the example host over `db` and `bus` on a free port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(
        db: DatabaseConnection,
        config: &livechat_example_server::Config,
        bus: Arc<dyn EventBus>,
    ) -> Self {
        Self::start_with(db, config, bus, config.realtime()).await
    }

    /// As [`Self::start`] with explicit gateway settings.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start_with(
        db: DatabaseConnection,
        config: &livechat_example_server::Config,
        bus: Arc<dyn EventBus>,
        realtime: livechat_poem::RealtimeConfig,
    ) -> Self {
        let host = livechat_example_server::build_with(db.clone(), config, bus.clone(), realtime);
        let chat = livechat_core::ChatService::new(
            livechat_core::store::SeaOrmStore::new(db).with_bus(bus),
            config.chat_config(),
        );
        Self::serve(host.endpoint, host.livechat, chat).await
    }

    /// The library alone, mounted under `/livechat`, on a free port:
    /// `chat` (its store publishing on `bus`, with the chat rules the
    /// test chose) behind [`crate::SECRET`]'s tokens, with the gateway
    /// on `bus`.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start_library(
        chat: livechat_core::ChatService,
        bus: Arc<dyn EventBus>,
        realtime: livechat_poem::RealtimeConfig,
    ) -> Self {
        use poem::EndpointExt;
        let livechat = livechat_poem::Livechat::new(
            chat.clone(),
            Arc::new(livechat_poem::JwtAuthenticator::hs256(
                crate::SECRET.as_bytes(),
            )),
            b"library visitor secret",
        )
        .realtime(bus, realtime);
        let endpoint = poem::Route::new()
            .nest("/livechat", livechat.endpoint())
            .boxed();
        Self::serve(endpoint, livechat, chat).await
    }

    async fn serve(
        endpoint: poem::endpoint::BoxEndpoint<'static, poem::Response>,
        livechat: livechat_poem::Livechat,
        chat: livechat_core::ChatService,
    ) -> Self {
        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .expect("bind");
        let addr = *acceptor.local_addr()[0]
            .as_socket_addr()
            .expect("tcp address");
        let server = tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(livechat_poem::NoDelay(acceptor))
                .run(endpoint)
                .await;
        });
        Self {
            addr,
            livechat,
            chat,
            server,
        }
    }

    /// A node over a fresh database on `backend` (in-process bus) with
    /// agent 7 online in tenant 1, serving the chat (about `topic`) of host
    /// user 900: the app (which keeps the database), the node and that
    /// chat's id.
    ///
    /// # Panics
    /// When the database, the node or the chat cannot be set up.
    pub async fn with_served_chat(
        backend: crate::Backend,
        topic: &str,
    ) -> (crate::App, Self, livechat_core::SessionId) {
        let app = crate::App::new(backend).await;
        let node = Self::start(
            app.db.clone(),
            &app.config,
            Arc::new(livechat_core::bus::InProcessBus::new()),
        )
        .await;
        node.chat
            .set_agent_status(
                crate::t(1),
                crate::u(7),
                livechat_core::PresenceStatus::Online,
            )
            .await
            .expect("agent 7 online");
        let started = crate::start_user_chat(&node.chat, 1, 900, topic).await;
        (app, node, started.session.id)
    }

    /// `ws://…/livechat/ws`.
    #[must_use]
    pub fn ws_url(&self) -> String {
        format!("ws://{}/livechat/ws", self.addr)
    }

    /// `http://…` + `path`.
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A new anonymous visitor's chat in tenant 1 started over HTTP, with
    /// `topic`: the answer's JSON body (`201`, or an error).
    ///
    /// # Panics
    /// When the request cannot be sent or its body is not JSON.
    pub async fn start_visitor_chat(&self, topic: &str) -> Value {
        let resp = reqwest::Client::new()
            .post(self.url("/livechat/customer/chats"))
            .header("X-Tenant-ID", "1")
            .header("Content-Type", "application/json")
            .body(
                serde_json::json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": topic})
                    .to_string(),
            )
            .send()
            .await
            .expect("request sent");
        serde_json::from_str(&resp.text().await.expect("body")).expect("JSON body")
    }

    /// Stops serving (the port is released).
    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a [`WsClient`] receives next ([`WsClient::next_incoming`]).
#[derive(Debug)]
pub enum Incoming {
    /// A text frame, as sent.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// The server closed: the close frame's code, `None` without one.
    Closed(Option<u16>),
    /// Nothing within the wait.
    Nothing,
}

/// A WebSocket client speaking the livechat protocol.
pub struct WsClient {
    stream: Stream,
}

/// How long a test waits for an expected frame.
pub const FRAME_WAIT: Duration = Duration::from_secs(20);

impl WsClient {
    /// Connects with `Authorization: <authorization>` and `X-Tenant-ID`.
    ///
    /// # Errors
    /// The handshake error (e.g. a 401 answer).
    pub async fn connect_with_header(
        url: &str,
        authorization: &str,
        tenant: i64,
    ) -> Result<Self, tungstenite::Error> {
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("Authorization", authorization.parse().expect("header"));
        req.headers_mut()
            .insert("X-Tenant-ID", tenant.to_string().parse().expect("header"));
        let (stream, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Self { stream })
    }

    /// Connects without credentials (a browser) and sends nothing yet.
    ///
    /// # Panics
    /// When the handshake fails.
    pub async fn connect_bare(url: &str) -> Self {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("handshake");
        Self { stream }
    }

    /// Connects like a browser and authenticates with the first frame;
    /// returns after `ready`.
    ///
    /// # Panics
    /// When the handshake fails or `ready` does not come.
    pub async fn connect_with_frame(url: &str, token: &str, tenant: i64) -> Self {
        let mut c = Self::connect_bare(url).await;
        c.send(serde_json::json!({"type": "auth", "token": token, "tenant_id": tenant}))
            .await;
        c.expect("ready").await;
        c
    }

    /// Sends a JSON frame.
    ///
    /// # Panics
    /// When the socket is closed.
    pub async fn send(&mut self, frame: Value) {
        self.stream
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    /// Sends raw text.
    ///
    /// # Panics
    /// When the socket is closed.
    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    /// Sends a binary frame.
    ///
    /// # Panics
    /// When the socket is closed.
    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.stream
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .expect("send");
    }

    /// Sends raw text; `false` when the socket is closed (for clients that
    /// may be closed by what they sent).
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.stream
            .send(Message::Text(text.to_owned().into()))
            .await
            .is_ok()
    }

    /// Sends a binary frame; `false` when the socket is closed.
    pub async fn try_send_binary(&mut self, bytes: &[u8]) -> bool {
        self.stream
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .is_ok()
    }

    /// What arrives next within `wait`, as it is: a text frame (not
    /// parsed), a binary one, the close (with its code), or nothing.
    pub async fn next_incoming(&mut self, wait: Duration) -> Incoming {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Incoming::Text(t.to_string()),
                Ok(Some(Ok(Message::Binary(b)))) => return Incoming::Binary(b.to_vec()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Incoming::Closed(frame.map(|f| u16::from(f.code)));
                }
                Ok(Some(Err(_)) | None) => return Incoming::Closed(None),
                Err(_) => return Incoming::Nothing,
            }
        }
    }

    /// The next JSON frame, or `None` on close/timeout.
    pub async fn next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(serde_json::from_str(&t).expect("JSON frame"));
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Ok(Some(Ok(Message::Binary(_)))) => panic!("unexpected binary frame"),
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => {
                    return None;
                }
            }
        }
    }

    /// The next frame of type `ty`, skipping others.
    ///
    /// # Panics
    /// When none comes within [`FRAME_WAIT`].
    pub async fn expect(&mut self, ty: &str) -> Value {
        loop {
            match self.next(FRAME_WAIT).await {
                Some(f) if f["type"] == ty => return f,
                Some(_) => {}
                None => panic!("no `{ty}` frame"),
            }
        }
    }

    /// Reads until the server closes; returns the close code (skipping
    /// other frames), `None` when the stream ends without a close frame.
    pub async fn close_code(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    eprintln!("websocket ended without a close frame: {e}");
                    return None;
                }
                _ => return None,
            }
        }
    }

    /// Collects frames until `wait` passes with nothing new.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(f) = self.next(wait).await {
            out.push(f);
        }
        out
    }

    /// Closes the connection with a close frame (1000), as a browser tab
    /// closing does, and waits (10 s at most) for the server's.
    ///
    /// # Panics
    /// When the close frame cannot be sent.
    pub async fn close(mut self) {
        self.stream
            .send(Message::Close(None))
            .await
            .expect("close frame");
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }

    /// Drops the connection without a close handshake.
    pub fn drop_now(self) {
        drop(self);
    }
}
