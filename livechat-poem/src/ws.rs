//! The WebSocket gateway (issue #4): `GET /livechat/ws`.
//!
//! One task per connection reads client frames, takes the events the node's
//! fan-out routes to it ([`crate::fanout`]: only those of the sessions it
//! follows and of its tenant's queue), pings and writes the socket from a
//! bounded queue ([`Outbound`]): a delivery costs one task wake-up, and an
//! idle connection holds one small task (issue #5: memory per idle
//! connection). Rarely taken, deep paths (database calls, catch-up) are
//! boxed so the task's own state stays small. Delivery of
//! messages is ordered and gap-free per joined session: the connection
//! remembers the last `seq` it sent; a live message at or below it is a
//! duplicate (dropped), one beyond the next is a gap (filled from storage
//! first). Replays after `after_seq`, an overflowing event queue and bus
//! reconnects (`Resync`) all go through the same catch-up, so a client never
//! misses or repeats a message. Rules (who may join, send, what a message
//! must be) stay in [`ChatService`]; this module only speaks the protocol.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, SplitSink};
use futures_util::{FutureExt, SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use livechat_core::bus::{BusEvent, Ephemeral, EventBus, Participant, TypingState};
use livechat_core::{
    ChatError, ChatMessage, ChatService, ConnectionOwner, CustomerId, CustomerIdentity,
    DomainEvent, EventKind, PendingAppend, PresenceStatus, SenderType, SessionId, SessionStatus,
    TenantId, UserId,
};
use poem::web::Data;
use poem::web::websocket::{CloseCode, Message, WebSocket, WebSocketConfig, WebSocketStream};
use poem::{IntoResponse, Request, Response, handler};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::auth::{Authenticator, SUPPORT_AGENT, authorization_from_headers, tenant_from_headers};
use crate::error::ApiError;
use crate::fanout::{FanOut, Membership, Prepared};
use crate::limits::{self, Refused};
use crate::renewals::Kind;
use crate::slots::Slot;
use crate::visitor::VisitorTokens;

/// Tunables of the gateway (issue #4 defaults).
#[derive(Clone, Debug)]
pub struct RealtimeConfig {
    /// Server ping interval. A ping tick also renews the connection's
    /// registration and an agent's liveness, but only when the client was
    /// heard (any frame, a pong included) since the tick before the last:
    /// the server's own ping proves nothing, so a frozen client's
    /// connection runs out; and a customer's not while the bus cannot
    /// reach the other nodes ([`EventBus::is_degraded`]). Default 20 s.
    pub ping_interval: Duration,
    /// A connection silent (not even a pong) this long is closed; also the
    /// life of its registration without renewal. Default 60 s.
    pub connection_ttl: Duration,
    /// After an agent's last connection closes, how long they stay
    /// eligible (a reconnect within it causes no flap). Default 10 s.
    pub presence_grace: Duration,
    /// Time allowed for the `auth` frame of browser clients. Default 5 s.
    pub auth_timeout: Duration,
    /// Largest accepted client frame, in bytes. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Frames queued for a client before it counts as too slow and is
    /// closed with 1013. Default 1024.
    pub outbound_queue: usize,
    /// Bytes of frames queued for a client before it counts as too slow,
    /// as [`Self::outbound_queue`] counts frames: the frame count alone let
    /// one connection that reads nothing hold 1,024 frames of up to 60 KB
    /// each (a replay of long messages), ~60 MB. Default 4 MiB.
    pub outbound_queue_bytes: usize,
    /// Bus events the node's fan-out queues for one connection (at least 1).
    /// When the queue is full the next event is dropped for that
    /// connection, which then re-reads the sessions it follows (catch-up by
    /// `seq`) and gets a `resync` frame: messages are never lost; a typing
    /// or read signal, a queue or a presence frame may be.
    /// Default 1,024.
    pub event_queue: usize,
    /// `send_message` frames per second per connection (burst twice that;
    /// 0 counts as 1: a socket's sends cannot be unlimited). Default 10.
    pub send_rate_per_sec: u32,
    /// `join_session`, `typing` and `read` frames per second per
    /// connection (burst twice that); over it they get `rate_limited` and
    /// do nothing. Each is a database read or a bus publication (to every
    /// node, with Redis), which a client must not be able to flood
    /// (0 counts as 1). Default 20.
    pub signal_rate_per_sec: u32,
    /// Consecutive bad frames before closing with 1008. Default 10.
    pub max_bad_frames: u32,
    /// Live WebSocket connections one agent or one customer may hold on
    /// this node at once, in one tenant (every tab and device of theirs
    /// together; `0`: no cap). One more is refused: `429
    /// too_many_connections` at the upgrade when authenticated by header,
    /// else an `error` frame `too_many_connections` and close 1008 after
    /// its `auth` frame; both say how long to wait: `connection_ttl` plus
    /// `ping_interval`, the longest a connection that vanished without a
    /// close keeps its place (the node closes it for silence at the first
    /// ping tick past the TTL), so the cap leaves room for clients
    /// reconnecting over a flapping network. Without a cap, one visitor
    /// token (anyone's for the price of a chat start) could hold sockets
    /// until the node ran out of descriptors or memory. A credential valid
    /// in every tenant (a host token without a tenant list) holds the cap
    /// in each tenant it names. Default 50.
    pub max_connections_per_user: usize,
    /// Sessions one connection may follow at once (`join_session` frames
    /// not yet left; `0`: no cap). One more join is refused with an
    /// `error` frame `too_many_joins` (`ref` its `session_id`) and joins
    /// nothing; a join again of a session followed is not counted. Each
    /// session followed costs memory on the node and a stored join, and
    /// every resync (a Redis outage, a lag) re-reads each one; a console
    /// that joined every chat it opened and never left grew without end.
    /// Default 1,000.
    pub max_joins_per_connection: usize,
    /// Browser origins allowed to open a WebSocket (`*` for any), compared
    /// by [`same_origin`] (case and default ports aside). Requests without
    /// an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// This node's id in the connection registry.
    pub node_id: String,
}

impl RealtimeConfig {
    /// Checks that the settings work together: each ping renews a
    /// connection (and its agent's presence) for `connection_ttl`, so a
    /// `ping_interval` as long or longer leaves connections expiring, and
    /// agents dropping out, between pings (issue #4). An agent's last
    /// close keeps them eligible for `presence_grace` by lowering their
    /// liveness to run out then, never raising it: their last ping's
    /// renewal, up to `ping_interval` old, runs out `connection_ttl`
    /// after it, so a grace longer than `connection_ttl` minus
    /// `ping_interval` would not be honoured (with the presence TTL of
    /// routing equal to `connection_ttl`, as the example host has it).
    ///
    /// # Errors
    /// A sentence naming the settings when `ping_interval` is not below
    /// `connection_ttl`, or `presence_grace` plus `ping_interval` exceeds
    /// it.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.ping_interval >= self.connection_ttl {
            return Err("ping_interval must be below connection_ttl");
        }
        if self.presence_grace.saturating_add(self.ping_interval) > self.connection_ttl {
            return Err("presence_grace plus ping_interval must not exceed connection_ttl");
        }
        Ok(())
    }
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            connection_ttl: Duration::from_secs(60),
            presence_grace: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(5),
            max_frame_bytes: 64 * 1024,
            outbound_queue: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            event_queue: crate::fanout::EVENT_QUEUE,
            send_rate_per_sec: 10,
            signal_rate_per_sec: 20,
            max_bad_frames: 10,
            max_connections_per_user: 50,
            max_joins_per_connection: 1000,
            allowed_origins: Vec::new(),
            node_id: uuid::Uuid::now_v7().to_string(),
        }
    }
}

/// Everything a connection needs; shared by all connections of a node.
pub(crate) struct Gateway {
    pub(crate) chat: ChatService,
    pub(crate) bus: Arc<dyn EventBus>,
    pub(crate) authenticator: Arc<dyn Authenticator>,
    pub(crate) visitor_tokens: VisitorTokens,
    pub(crate) config: RealtimeConfig,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Each socket holds a token of it until it has unregistered
    /// (`Livechat::closed`).
    pub(crate) sockets: tokio_util::task::TaskTracker,
    /// The node's fan-out, started with the first connection.
    pub(crate) fanout: std::sync::OnceLock<Arc<FanOut>>,
    /// The customer routes' limits: a customer's messages count against
    /// one limit over HTTP and every socket (`RateLimits`).
    pub(crate) limits: Arc<crate::limits::Limiters>,
    /// The node's renewals of its connections, stored together
    /// (`renewals`).
    pub(crate) renewals: crate::renewals::Renewals,
    /// The node's connections per agent and customer
    /// (`RealtimeConfig::max_connections_per_user`).
    pub(crate) slots: Arc<crate::slots::ConnectionSlots>,
}

impl Gateway {
    /// The node's fan-out, started with the first connection.
    fn fanout(&self) -> &Arc<FanOut> {
        self.fanout
            .get_or_init(|| FanOut::start(self.bus.subscribe(), self.config.event_queue))
    }
}

/// Who is connected.
#[derive(Clone, Copy, Debug)]
enum Role {
    Agent(UserId),
    Customer {
        customer: CustomerId,
        user: Option<UserId>,
    },
}

impl Role {
    fn owner(self) -> ConnectionOwner {
        match self {
            Self::Agent(a) => ConnectionOwner::Agent(a),
            Self::Customer { customer, .. } => ConnectionOwner::Customer(customer),
        }
    }

    fn participant(self) -> Participant {
        match self {
            Self::Agent(a) => Participant {
                sender_type: SenderType::Agent,
                sender_id: Some(a),
                customer_id: None,
            },
            Self::Customer { customer, user } => Participant {
                sender_type: SenderType::Customer,
                sender_id: user,
                customer_id: Some(customer),
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Agent(_) => "agent",
            Self::Customer { .. } => "customer",
        }
    }
}

/// An authenticated connection's identity.
#[derive(Clone, Copy, Debug)]
struct Identity {
    tenant: TenantId,
    role: Role,
    /// When the credential stops being accepted: the connection is closed
    /// then (`None`: it does not expire).
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Why a credential was refused, as a close reason or HTTP error.
struct Refusal {
    code: &'static str,
    message: String,
    /// The HTTP answer when it is already made (its cause logged; boxed,
    /// as the refusal is returned through every step of authentication).
    http: Option<Box<ApiError>>,
    /// How long the client should wait before trying again, when known
    /// (`too_many_connections`).
    retry_after: Option<Duration>,
    /// The close, with no `error` frame before it, of a first frame the
    /// WebSocket layer refused as it read it ([`protocol_close`]: 1009,
    /// 1007, 1002), as it closes for a later frame.
    close: Option<(CloseCode, &'static str)>,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            http: None,
            retry_after: None,
            close: None,
        }
    }

    /// Why a credential's customer could not be resolved: `unauthorized`
    /// when it no longer exists, else what the HTTP routes answer
    /// (`unavailable` when the database cannot answer, `internal_error`
    /// otherwise), with the cause logged and never sent: the message goes
    /// to the client in an `error` frame and a close frame's reason (at
    /// most 123 bytes; these are shorter).
    fn customer(error: ChatError) -> Self {
        let api = crate::customer::unresolved_customer(error);
        let detail = api.detail();
        let code = match detail.code.as_str() {
            "unauthorized" => "unauthorized",
            "unavailable" => "unavailable",
            _ => "internal_error",
        };
        let message = detail.message.clone();
        Self {
            code,
            message,
            http: Some(Box::new(api)),
            retry_after: None,
            close: None,
        }
    }
}

impl Gateway {
    /// `identity`'s place among the node's connections: refused with
    /// `too_many_connections` when they already hold
    /// [`RealtimeConfig::max_connections_per_user`] here, with the wait
    /// that field describes.
    fn admit(&self, identity: Identity) -> Result<(Identity, Slot), Refusal> {
        match self.slots.take(identity.tenant, identity.role.owner()) {
            Some(slot) => Ok((identity, slot)),
            None => Err(Refusal {
                retry_after: Some(self.config.connection_ttl + self.config.ping_interval),
                ..Refusal::new(
                    "too_many_connections",
                    format!(
                        "this user already holds the most connections allowed at once ({}); close one first",
                        self.slots.max()
                    ),
                )
            }),
        }
    }

    /// Resolves `Bearer <host token>` or `Visitor <token>` in `tenant`.
    async fn identify(&self, credential: &str, tenant: TenantId) -> Result<Identity, Refusal> {
        let (scheme, token) = credential
            .trim()
            .split_once(' ')
            .map_or(("bearer", credential.trim()), |(s, t)| (s, t.trim()));
        if scheme.eq_ignore_ascii_case("visitor") {
            let (token_tenant, customer, expires_at) = self
                .visitor_tokens
                .verify_until(token)
                .ok_or_else(|| Refusal::new("unauthorized", "invalid or expired visitor token"))?;
            if token_tenant != tenant {
                return Err(Refusal::new(
                    "forbidden",
                    "the visitor token belongs to another tenant",
                ));
            }
            let customer = self
                .chat
                .resolve_customer(tenant, CustomerIdentity::Known(customer))
                .await
                .map_err(Refusal::customer)?;
            return Ok(Identity {
                tenant,
                role: Role::Customer {
                    customer: customer.id,
                    user: customer.user_id,
                },
                expires_at: Some(expires_at),
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Refusal::new(
                "unauthorized",
                "use `Bearer <token>` or `Visitor <token>`",
            ));
        }
        let principal = self
            .authenticator
            .authenticate(token)
            .await
            .map_err(|e| match e {
                crate::AuthError::Unavailable(cause) => {
                    tracing::warn!(error = %cause, "authentication unavailable");
                    Refusal::new("unavailable", "authentication is unavailable; retry later")
                }
                _ => Refusal::new("unauthorized", "invalid or expired token"),
            })?;
        if !principal.may_act_in(tenant) {
            return Err(Refusal::new(
                "forbidden",
                "not allowed to act in this tenant",
            ));
        }
        if principal.has_role(SUPPORT_AGENT) {
            return Ok(Identity {
                tenant,
                role: Role::Agent(principal.user_id),
                expires_at: principal.expires_at,
            });
        }
        let customer = self
            .chat
            .resolve_customer(tenant, CustomerIdentity::User(principal.user_id))
            .await
            .map_err(Refusal::customer)?;
        Ok(Identity {
            tenant,
            role: Role::Customer {
                customer: customer.id,
                user: Some(principal.user_id),
            },
            expires_at: principal.expires_at,
        })
    }
}

fn origin_allowed(config: &RealtimeConfig, req: &Request) -> bool {
    let Some(origin) = req.headers().get(poem::http::header::ORIGIN) else {
        return true;
    };
    let origin = origin.to_str().unwrap_or("");
    config
        .allowed_origins
        .iter()
        .any(|o| o == "*" || same_origin(o, origin))
}

/// Whether two serialized origins (`scheme://host[:port]`, RFC 6454) name
/// the same origin: scheme and host compared without regard to ASCII case,
/// and a port equal to the scheme's default (80 for `http`, 443 for
/// `https`) the same as none, so `https://Shop.example:443` is
/// `https://shop.example`. Values that do not parse as such are compared
/// as text, ignoring ASCII case. The rule of
/// [`RealtimeConfig::allowed_origins`]; a host's CORS check can share it.
#[must_use]
pub fn same_origin(a: &str, b: &str) -> bool {
    fn parts(origin: &str) -> Option<(String, String, Option<u16>)> {
        let uri: poem::http::Uri = origin.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let host = uri.host()?.to_ascii_lowercase();
        let default = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        let port = uri.port_u16().filter(|p| Some(*p) != default);
        // An origin has no path (a bare `/` aside), query or user info.
        let bare = uri.path_and_query().is_none_or(|p| p.as_str() == "/")
            && !uri.authority()?.as_str().contains('@');
        bare.then_some((scheme, host, port))
    }
    match (parts(a), parts(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// The OpenAPI path item of `GET /ws` (OpenAPI 3.0), added to the
/// document of a host that enabled the gateway ([`crate::Livechat::realtime`]).
/// poem-openapi cannot describe a WebSocket upgrade, so the item is written
/// here; its error answers have the same content as every other route's
/// (`error_content`, taken from the generated document: the envelope). The
/// frames are described in the README's "Real-time (WebSocket)" section.
pub(crate) fn openapi_path_item(error_content: &Value) -> Value {
    let error = |description: &str| json!({"description": description, "content": error_content});
    let mut tenant_parameter = crate::tenant_parameter();
    tenant_parameter["required"] = json!(false);
    tenant_parameter["description"] =
        json!("The tenant (positive integer); required with `Authorization`.");
    let mut too_many = error(
        "`too_many_connections`: the user already holds the most WebSockets one agent or customer may hold \
         on this node (`max_connections_per_user`, 50 by default).",
    );
    // Named and shaped as poem-openapi writes the rate-limited routes' own.
    too_many["headers"] = json!({"RETRY-AFTER": {
        "deprecated": false,
        "required": true,
        "description": "Seconds until a connection of theirs that vanished without a close has surely \
            been closed (the connection TTL plus the ping interval).",
        "schema": {"type": "integer", "format": "uint64"},
    }});
    json!({
        "get": {
            "tags": ["Realtime"],
            "summary": "Open the real-time WebSocket",
            "description": "Upgrades to a WebSocket carrying JSON text frames, each with a \
                `type` (client: `auth`, `join_session`, `leave_session`, `send_message`, \
                `typing`, `read`, `ping`; server: `ready`, `joined`, `new_message`, `ack`, \
                `typing`, `read`, `session_updated`, `queue_updated`, `presence_updated`, \
                `error`, ...). Authenticate with the `Authorization` and `X-Tenant-ID` \
                headers (checked before the upgrade), or, from a browser, without them and \
                with `{\"type\":\"auth\",\"token\":\"Bearer ...\",\"tenant_id\":1}` as the \
                first frame within 5 seconds (a refusal is an `error` frame and close code \
                1008). The server answers authentication with `ready`. The request's \
                `Origin` must be allowed. Close codes: 1001 server shutdown or no heartbeat, \
                1008 policy (authentication, too many connections, bad frames), 1013 the client reads too slowly.",
            "operationId": "open_websocket",
            "parameters": [
                tenant_parameter,
                {
                    "name": "Authorization",
                    "in": "header",
                    "required": false,
                    "description": "`Bearer <host token>` (role SUPPORT_AGENT: an agent connection; \
                        otherwise a customer connection) or `Visitor <visitor token>`. Without it, \
                        the first frame must be `auth`.",
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "101": {"description": "Switching Protocols: the WebSocket is open."},
                "400": error("`invalid_tenant`: `X-Tenant-ID` is missing, not a positive integer or given more than once; \
                    `bad_request`: not a WebSocket upgrade (a `GET` over HTTP/1.1 with `Connection: Upgrade`, \
                    `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`)."),
                "401": error("`unauthorized`: the credential is refused (also an `Authorization` header that is not ASCII, \
                    or a token whose customer no longer exists)."),
                "403": error("`forbidden`: the origin is not allowed, or the token does not allow the tenant."),
                "429": too_many,
                "500": error("`internal_error`: the customer could not be read; the message names a logged reference."),
                "503": error("`unavailable`: the host's authentication or the database cannot answer; retry later."),
            },
        }
    })
}

/// `GET /livechat/ws`: checks the origin and, when sent, the
/// `Authorization` and `X-Tenant-ID` headers, then upgrades.
#[handler]
pub(crate) async fn ws_endpoint(
    req: &Request,
    ws: poem::Result<WebSocket>,
    gateway: Data<&Arc<Gateway>>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        // Not an upgrade request, or one hyper cannot upgrade (HTTP/1.0:
        // poem's extractor then fails with a server error, 500).
        Err(e) => {
            let message = if e.status().is_client_error() {
                e.to_string()
            } else {
                "a WebSocket upgrade needs HTTP/1.1".to_owned()
            };
            return ApiError::bad_request("bad_request", message).into_response();
        }
    };
    let gateway = Arc::clone(gateway.0);
    if !origin_allowed(&gateway.config, req) {
        return ApiError::forbidden("origin not allowed").into_response();
    }
    let header_credential = match authorization_from_headers(req.headers()) {
        Ok(credential) => credential.map(str::to_owned),
        Err(msg) => return ApiError::unauthorized(msg).into_response(),
    };
    let pre_auth = match header_credential {
        None => None,
        Some(credential) => {
            let tenant = match tenant_from_headers(req.headers()) {
                Ok(t) => t,
                Err(msg) => return ApiError::bad_request("invalid_tenant", msg).into_response(),
            };
            let admitted = gateway
                .identify(&credential, tenant)
                .await
                .and_then(|identity| gateway.admit(identity));
            match admitted {
                Ok(admitted) => Some(admitted),
                // Made, and its cause logged, by `Refusal::customer`.
                Err(Refusal {
                    http: Some(http), ..
                }) => return (*http).into_response(),
                Err(r) if r.code == "forbidden" => {
                    return ApiError::forbidden(r.message).into_response();
                }
                Err(r) if r.code == "unavailable" => {
                    return ApiError::unavailable(&r.message).into_response();
                }
                Err(r) if r.code == "too_many_connections" => {
                    let wait = r.retry_after.unwrap_or(gateway.config.connection_ttl);
                    return ApiError::too_many_connections(r.message, wait).into_response();
                }
                Err(r) => return ApiError::unauthorized(r.message).into_response(),
            }
        }
    };
    // tungstenite's own limit is set above ours, so an oversized frame gets
    // an `error` frame and the connection stays usable.
    let mut ws_config = WebSocketConfig::default();
    ws_config.max_message_size = Some(gateway.config.max_frame_bytes.saturating_mul(16));
    ws_config.max_frame_size = Some(gateway.config.max_frame_bytes.saturating_mul(16));
    // tungstenite reserves 128 KiB per buffer by default; idle chat sockets
    // need little (issue #5: memory per idle connection; chat frames are a
    // few hundred bytes). Larger frames still work: the buffer grows to the
    // frame's length on demand.
    ws_config.read_buffer_size = 1024;
    // Frames queued together leave in one write: tungstenite collects them
    // up to this size, and the connection flushes after each round of
    // writes, so nothing waits for the buffer to fill. tungstenite keeps
    // its write buffer's capacity, so it stays small.
    ws_config.write_buffer_size = 4 * 1024;
    let tracked = gateway.sockets.token();
    // For the limit of a customer's messages from one address.
    let client_ip = gateway.limits.client_ip(req);
    ws.config(ws_config)
        .on_upgrade(move |socket| async move {
            serve(gateway, socket, pre_auth, client_ip).await;
            drop(tracked);
        })
        .into_response()
}

/// Client → server frames.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Auth {
        token: String,
        tenant_id: i64,
    },
    JoinSession {
        session_id: String,
        after_seq: Option<i64>,
    },
    LeaveSession {
        session_id: String,
    },
    SendMessage {
        session_id: String,
        client_msg_id: String,
        message: String,
    },
    Typing {
        session_id: String,
        state: TypingState,
    },
    Read {
        session_id: String,
        seq: i64,
    },
    Ping,
}

const KNOWN_TYPES: &[&str] = &[
    "auth",
    "join_session",
    "leave_session",
    "send_message",
    "typing",
    "read",
    "ping",
];

/// The last `seq` a `join_session` counts its connection as having: the
/// session's `last_seq` without `after_seq` (the client reads the
/// history over HTTP), else `after_seq`, never past `last_seq` (that
/// would hide the messages up to it from this connection). A join again
/// on a connection already joined never moves it forward (`sent`, the
/// last `seq` it was sent): a message committed but not yet relayed to
/// it would be dropped as already sent.
fn join_start(after_seq: Option<i64>, last_seq: i64, sent: Option<i64>) -> i64 {
    let start = after_seq.map_or(last_seq, |after| after.min(last_seq));
    sent.map_or(start, |sent| sent.min(start))
}

/// Why a `read` of a joined session up to `seq` is refused, if it is:
/// a negative `seq`, or one past `last`, the last message this
/// connection has received of the session (or knew of at the join:
/// the lesser of its `after_seq` and the session's last `seq`). A
/// receipt for a message the reader has not been sent would show the
/// other side's later messages read before they exist.
fn read_refusal(seq: i64, last: i64) -> Option<String> {
    if seq < 0 {
        Some("seq must not be negative".to_owned())
    } else if seq > last {
        Some(format!(
            "seq {seq} is past the last message this connection has received of the session ({last})"
        ))
    } else {
        None
    }
}

/// A bad frame's `error` code and message.
fn parse_frame(text: &str, max: usize) -> Result<ClientFrame, (&'static str, String)> {
    if text.len() > max {
        return Err((
            "frame_too_large",
            format!("frames are limited to {max} bytes"),
        ));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| ("invalid_json", format!("malformed JSON: {e}")))?;
    let Some(kind) = value.get("type").and_then(Value::as_str).map(str::to_owned) else {
        return Err(("invalid_frame", "a frame needs a string `type`".into()));
    };
    if !KNOWN_TYPES.contains(&kind.as_str()) {
        return Err(("unknown_type", format!("unknown frame type `{kind}`")));
    }
    serde_json::from_value(value).map_err(|e| ("invalid_frame", format!("bad `{kind}` frame: {e}")))
}

/// The `error` code and message for a refused operation: the HTTP
/// mapping of [`ApiError`] (one place decides codes and logs internal
/// errors), with request-shape codes reported as `invalid_frame`.
fn error_code(err: ChatError) -> (String, String) {
    let api = ApiError::from(err);
    let detail = api.detail();
    let code = match detail.code.as_str() {
        "invalid_body" | "invalid_query" => "invalid_frame".to_owned(),
        other => other.to_owned(),
    };
    (code, detail.message.clone())
}

/// The close code for a frame the WebSocket layer refused as it read it
/// (RFC 6455 §7.4.1): 1009 for one over its size limit (16 times
/// `max_frame_bytes`; frames between the two limits get a
/// `frame_too_large` error frame instead), 1007 for a text frame that is
/// not UTF-8, 1002 for a frame that breaks the protocol; `None` for
/// anything else (an I/O error or a closed connection: nothing can be
/// sent). poem hands tungstenite's errors over as `std::io::Error`s of
/// kind `Other` carrying tungstenite's text, so the kind is told by it
/// (a test sends an oversized frame).
fn protocol_close(error: &std::io::Error) -> Option<(CloseCode, &'static str)> {
    if error.kind() != std::io::ErrorKind::Other {
        return None;
    }
    let text = error.to_string();
    if text.contains("without closing handshake") {
        // The peer's TCP connection ended without a close frame (poem
        // reports tungstenite's `ResetWithoutClosingHandshake` as a
        // protocol error): a broken socket, not a client's fault.
        return None;
    }
    if text.starts_with("Space limit exceeded") {
        Some((CloseCode::Size, "frame too large"))
    } else if text.starts_with("UTF-8 encoding error") {
        Some((CloseCode::Invalid, "text frame is not UTF-8"))
    } else if text.starts_with("WebSocket protocol error") {
        Some((CloseCode::Protocol, "WebSocket protocol error"))
    } else {
        None
    }
}

/// `message` cut to the 123 bytes a close frame's reason may hold (RFC
/// 6455 §5.5: a control frame's payload is at most 125 bytes, two of them
/// the code), at a character boundary.
fn close_reason(message: &str) -> String {
    let mut end = message.len().min(123);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

fn frame(value: Value) -> Message {
    Message::Text(value.to_string())
}

fn error_frame(code: &str, message: &str, reference: Option<&str>) -> Message {
    frame(error_value(code, message, reference))
}

/// An `error` frame's fields.
fn error_value(code: &str, message: &str, reference: Option<&str>) -> Value {
    let mut v = json!({"type": "error", "code": code, "message": message});
    if let Some(r) = reference {
        v["ref"] = json!(r);
    }
    v
}

/// A `rate_limited` error frame for the frame `reference` names, with
/// `retry_after_ms`: whole milliseconds (at least 1) until the limit that
/// refused it lets one through again.
fn rate_limited_frame(refused: &Refused, reference: &str) -> Message {
    let mut v = error_value("rate_limited", refused.what, Some(reference));
    v["retry_after_ms"] = json!(whole_ms(refused.wait));
    frame(v)
}

/// `wait` in whole milliseconds, rounded up, at least 1 (an `error`
/// frame's `retry_after_ms`).
fn whole_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1000).max(1)).unwrap_or(u64::MAX)
}

/// A `new_message` frame's text: the message's fields and `"type"`,
/// serialized in one pass (no intermediate `Value`).
pub(crate) fn message_text(m: &ChatMessage) -> String {
    #[derive(serde::Serialize)]
    struct NewMessage<'a> {
        r#type: &'static str,
        #[serde(flatten)]
        message: &'a ChatMessage,
    }
    serde_json::to_string(&NewMessage {
        r#type: "new_message",
        message: m,
    })
    // Unreachable (every field serializes); the frame still says what it is.
    .unwrap_or_else(|_| r#"{"type":"new_message"}"#.to_owned())
}

/// An `ack` frame's text, serialized in one pass (no intermediate
/// `Value`: building and printing one was ~3% of the fan-out's CPU, issue
/// #5). Keys in the order `json!` gave them (alphabetical).
fn ack_text(client_msg_id: &str, posted: &livechat_core::AppendedMessage) -> String {
    #[derive(serde::Serialize)]
    struct Ack<'a> {
        client_msg_id: &'a str,
        duplicate: bool,
        id: livechat_core::MessageId,
        seq: i64,
        session_id: SessionId,
        r#type: &'static str,
    }
    serde_json::to_string(&Ack {
        client_msg_id,
        duplicate: !posted.created,
        id: posted.message.id,
        seq: posted.message.seq,
        session_id: posted.message.session_id,
        r#type: "ack",
    })
    // Unreachable (every field serializes); the frame still says what it is.
    .unwrap_or_else(|_| r#"{"type":"ack"}"#.to_owned())
}

fn message_frame(m: &ChatMessage) -> Message {
    Message::Text(message_text(m))
}

/// The socket's sending side and the frames queued for it, written by the
/// connection's own task (no writer task, no channel).
struct Outbound {
    sink: SplitSink<WebSocketStream, Message>,
    /// Frames not yet handed to the socket, oldest first.
    queue: VecDeque<Message>,
    /// The payload bytes of `queue`.
    queued_bytes: usize,
    /// Frames were handed to the socket and not yet flushed.
    unflushed: bool,
    /// A write failed: the socket is gone.
    broken: bool,
    /// Frames the socket has taken so far.
    taken: u64,
    /// The last write found the socket full (it could take no more until
    /// the client's side acknowledged some): frames it takes after that
    /// prove the client is there.
    stalled: bool,
}

impl Outbound {
    fn new(sink: SplitSink<WebSocketStream, Message>) -> Self {
        Self {
            sink,
            queue: VecDeque::new(),
            queued_bytes: 0,
            unflushed: false,
            broken: false,
            taken: 0,
            stalled: false,
        }
    }

    /// Whether the queue holds `frames` frames or `bytes` bytes.
    fn full(&self, frames: usize, bytes: usize) -> bool {
        self.queue.len() >= frames || self.queued_bytes >= bytes
    }

    /// Queues `message` after the others.
    fn push_back(&mut self, message: Message) {
        self.queued_bytes += frame_len(&message);
        self.queue.push_back(message);
    }

    /// Queues `message` ahead of the others (a ping).
    fn push_front(&mut self, message: Message) {
        self.queued_bytes += frame_len(&message);
        self.queue.push_front(message);
    }

    /// Drops every queued frame.
    fn clear(&mut self) {
        self.queue.clear();
        self.queued_bytes = 0;
    }

    /// Something is left to write or flush.
    fn pending(&self) -> bool {
        !self.broken && (!self.queue.is_empty() || self.unflushed)
    }

    /// Writes the queue out and flushes. Cancel-safe: a frame leaves the
    /// queue only once the socket has taken it, so a write interrupted by
    /// another event resumes where it stopped. A failed write marks the
    /// socket broken.
    async fn write(&mut self) {
        use std::task::Poll;
        let written = std::future::poll_fn(|cx| {
            while !self.queue.is_empty() {
                match self.sink.poll_ready_unpin(cx) {
                    Poll::Pending => {
                        self.stalled = true;
                        return Poll::Pending;
                    }
                    Poll::Ready(ready) => ready?,
                }
                if let Some(message) = self.queue.pop_front() {
                    self.queued_bytes = self.queued_bytes.saturating_sub(frame_len(&message));
                    self.sink.start_send_unpin(message)?;
                    self.unflushed = true;
                    self.taken += 1;
                }
            }
            if self.unflushed {
                match self.sink.poll_flush_unpin(cx) {
                    Poll::Pending => {
                        self.stalled = true;
                        return Poll::Pending;
                    }
                    Poll::Ready(flushed) => flushed?,
                }
                self.unflushed = false;
            }
            self.stalled = false;
            Poll::Ready(Ok::<(), std::io::Error>(()))
        })
        .await;
        if written.is_err() {
            self.broken = true;
            self.clear();
        } else if self.queue.capacity() > SHRINK_ABOVE {
            // A burst's queue is not kept by an idle connection.
            self.queue.shrink_to(SHRINK_ABOVE);
        }
    }
}

/// The payload bytes of `message`, as [`Outbound`] counts them.
fn frame_len(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes.len(),
        Message::Close(frame) => frame.as_ref().map_or(0, |(_, reason)| reason.len()),
    }
}

/// An emptied outbound queue keeps room for at most this many frames.
const SHRINK_ABOVE: usize = 16;

/// A connection's state.
struct Conn {
    gateway: Arc<Gateway>,
    id: uuid::Uuid,
    identity: Identity,
    /// The client's address, as the customer routes' limits take it.
    client_ip: Option<std::net::IpAddr>,
    /// Its place in the node's fan-out: which events reach it.
    membership: Membership,
    out: Outbound,
    /// Set once the connection is to close, with the close frame to send.
    closing: Option<(CloseCode, String)>,
    /// Joined sessions → last `seq` sent.
    joined: HashMap<SessionId, i64>,
    /// Joined sessions → their place in the queue as last sent while
    /// WAITING (customers see their place move), `None` otherwise.
    positions: HashMap<SessionId, Option<Place>>,
    /// Joined sessions last seen CLOSED: `typing` in them is refused.
    closed: HashSet<SessionId>,
    /// Joined sessions whose last catch-up failed (a database read):
    /// caught up again at the next ping, so a message that showed a gap,
    /// or a join's replay, is not held back until the session's next
    /// message.
    behind: HashSet<SessionId>,
    /// Joined sessions whose stored join is gone: the connection's row was
    /// purged (expired while the node could not reach the database) and
    /// registered again by a renewal (`renewals::Kind::Renew`). Followed
    /// again at once, and at each ping until stored; until then replies
    /// there count the customer as not connected.
    unfollowed: HashSet<SessionId>,
    bad_frames: u32,
    limiter: DefaultDirectRateLimiter,
    /// For `join_session`, `typing` and `read` (`signal_rate_per_sec`).
    signals: DefaultDirectRateLimiter,
    last_heard: Instant,
    /// Sends submitted and not yet answered, in submission order.
    sends: FuturesOrdered<InFlight>,
}

/// A joined session's place in the queue as last sent, with the session
/// as sent, to send again when only the place moves.
struct Place {
    position: i64,
    session: livechat_core::ChatSession,
}

/// Most bus events a connection handles in one go before it looks at its
/// other inputs (its socket's writing among them) again.
const BUS_BURST: usize = 32;

/// Most sends of one connection awaiting their commit; while this many are
/// in flight the connection's next frames wait.
const MAX_IN_FLIGHT: usize = 64;

/// A `send_message` awaiting its commit; resolves with its `client_msg_id`.
/// A refused send (rate limit) takes its place in the line too, so every
/// answer goes out in submission order.
struct InFlight {
    client_msg_id: String,
    /// `Err`: refused by a rate limit.
    append: Result<PendingAppend, Refused>,
}

/// A send's answer: the append's outcome, or the rate limit's refusal.
type Settled = Result<Result<livechat_core::AppendedMessage, ChatError>, Refused>;

impl Future for InFlight {
    /// The key, and the append's outcome.
    type Output = (String, Settled);

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        let key = |this: &mut Self| std::mem::take(&mut this.client_msg_id);
        match &mut this.append {
            Err(refused) => {
                let refused = *refused;
                std::task::Poll::Ready((key(this), Err(refused)))
            }
            Ok(append) => match std::pin::Pin::new(append).poll(cx) {
                std::task::Poll::Ready(outcome) => std::task::Poll::Ready((key(this), Ok(outcome))),
                std::task::Poll::Pending => std::task::Poll::Pending,
            },
        }
    }
}

/// How long a closing connection waits for the client's close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(30);

/// How long a catch-up waits for room in a full outbound queue.
const REPLAY_STALL: Duration = Duration::from_secs(10);

/// How long a node waits to read the session or presence it relays with a
/// lifecycle or status event ([`Conn::current_session`]) before it relays
/// the event's own copy.
const RELAYED_READ: Duration = Duration::from_secs(1);

/// `read` of the state a lifecycle or status event is relayed with (`what`
/// names it in the log), waited for at most [`RELAYED_READ`]: the node's
/// connections wait for this one read, and a slow database must not hold
/// their loops (pongs unread). `None` when it fails or takes longer.
async fn relayed_read<T>(
    what: &str,
    read: impl std::future::Future<Output = Result<T, ChatError>>,
) -> Option<T> {
    match tokio::time::timeout(RELAYED_READ, read).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, what, "reading a relayed event's state failed");
            None
        }
        Err(_) => {
            tracing::warn!(what, "reading a relayed event's state timed out");
            None
        }
    }
}

/// Pages of at most this many messages are read during catch-up (fewer
/// when the host's `ChatConfig::max_page_size` is lower).
const CATCH_UP_PAGE: i64 = 200;

impl Conn {
    /// Queues a frame; a full queue means the client cannot keep up: it is
    /// closed with 1013 and resumes with `after_seq` (issue #4). The queue
    /// counts frames the socket has not taken: before it counts as full,
    /// whatever the socket takes now is written.
    fn send(&mut self, message: Message) -> bool {
        if self.out.broken {
            return false;
        }
        let (frames, bytes) = self.queue_limits();
        if self.out.full(frames, bytes) {
            // Cancel-safe: what the socket does not take stays queued, and
            // the task's own write branch waits for the socket again.
            let _ = self.out.write().now_or_never();
        }
        if self.out.full(frames, bytes) {
            tracing::debug!(connection = %self.id, "outbound queue full: closing with 1013");
            self.close_with(
                CloseCode::Again,
                "too slow: reconnect and resume with after_seq",
            );
            return false;
        }
        self.out.push_back(message);
        true
    }

    /// For a customer's connection that ended without a close frame, when
    /// the client was last heard: the replies stored since are made up as
    /// notifications ([`unregister`]). `None` for an agent's, whose
    /// messages need no make-up.
    fn unknown_reading(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        matches!(self.identity.role, Role::Customer { .. }).then(|| heard_at(self.last_heard))
    }

    /// The outbound queue's limits: frames and bytes
    /// ([`RealtimeConfig::outbound_queue`], [`RealtimeConfig::outbound_queue_bytes`]).
    fn queue_limits(&self) -> (usize, usize) {
        let config = &self.gateway.config;
        (
            config.outbound_queue.max(1),
            config.outbound_queue_bytes.max(1),
        )
    }

    /// Queues a catch-up frame; while the queue is full it is written out
    /// first (a replay may be much longer than the queue). A client that
    /// takes no frame for [`REPLAY_STALL`] is closed with 1013.
    async fn send_replay(&mut self, message: Message) -> bool {
        let (frames, bytes) = self.queue_limits();
        while self.out.full(frames, bytes) && !self.out.broken {
            let before = self.out.queue.len();
            if tokio::time::timeout(REPLAY_STALL, self.out.write())
                .await
                .is_err()
                && self.out.queue.len() >= before
            {
                self.close_with(
                    CloseCode::Again,
                    "too slow: reconnect and resume with after_seq",
                );
                return false;
            }
        }
        self.send(message)
    }

    /// Answers the sends whose outcome is known, in order, without
    /// waiting for the others: before frames that may carry their
    /// messages (a live delivery, a replay), so that a message's `ack`
    /// comes before its own `new_message`.
    fn settle_ready_sends(&mut self) {
        while let Some(Some((client_msg_id, outcome))) = self.sends.next().now_or_never() {
            self.settle_send(&client_msg_id, outcome);
        }
    }

    /// Answers a refused frame with its `error` (code and message as
    /// [`error_code`] maps `error`), naming `reference`: the frame's
    /// `session_id` or `client_msg_id`.
    fn refuse(&mut self, error: ChatError, reference: Option<&str>) {
        let (code, message) = error_code(error);
        self.send(error_frame(&code, &message, reference));
    }

    /// Answers a committed (or refused) send with `ack` or `error`.
    fn settle_send(&mut self, client_msg_id: &str, outcome: Settled) {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(refused) => {
                self.send(rate_limited_frame(&refused, client_msg_id));
                return;
            }
        };
        match outcome {
            Ok(posted) => {
                self.send(Message::Text(ack_text(client_msg_id, &posted)));
            }
            Err(e) => {
                self.refuse(e, Some(client_msg_id));
            }
        }
    }

    /// Asks for the connection to close; the first reason given wins.
    fn close_with(&mut self, code: CloseCode, reason: &str) {
        if self.closing.is_none() {
            self.closing = Some((code, reason.to_owned()));
        }
    }

    fn is_closing(&self) -> bool {
        self.closing.is_some() || self.out.broken
    }

    fn chat(&self) -> &ChatService {
        &self.gateway.chat
    }

    fn tenant(&self) -> TenantId {
        self.identity.tenant
    }

    /// Sends every stored message of `session` after the last one sent.
    /// When a read fails, the session is `behind`: [`Self::catch_up_behind`]
    /// tries again at the next ping.
    async fn catch_up(&mut self, session: SessionId) -> Result<(), ChatError> {
        // Pages within the host's `max_page_size`, which the read checks.
        let size = i64::try_from(self.chat().config().max_page_size)
            .unwrap_or(i64::MAX)
            .clamp(1, CATCH_UP_PAGE);
        loop {
            let Some(&after) = self.joined.get(&session) else {
                return Ok(());
            };
            let page = match self
                .chat()
                .list_messages(self.tenant(), session, Some(after), Some(size))
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    self.behind.insert(session);
                    return Err(e);
                }
            };
            let full = page.len() as i64 == size;
            // A send of this connection stored since may be in the page.
            self.settle_ready_sends();
            for m in &page {
                if !self.send_replay(message_frame(m)).await {
                    return Ok(());
                }
                self.note_relayed(m);
            }
            if !full {
                self.behind.remove(&session);
                return Ok(());
            }
        }
    }

    /// Catches up the sessions whose last catch-up failed, until one fails
    /// again (the database is still unreachable: the next ping retries).
    async fn catch_up_behind(&mut self) {
        let behind: Vec<SessionId> = self.behind.iter().copied().collect();
        for s in behind {
            if let Err(e) = self.catch_up(s).await {
                tracing::warn!(error = %e, session = %s, "websocket catch-up failed again");
                return;
            }
        }
    }

    /// Stores the joins of [`Self::unfollowed`] again, until one fails (the
    /// database is still unreachable: the next ping retries).
    async fn follow_again(&mut self) {
        let unfollowed: Vec<SessionId> = self.unfollowed.iter().copied().collect();
        for s in unfollowed {
            if let Err(e) = self.chat().follow_session(self.tenant(), self.id, s).await {
                tracing::warn!(error = %e, session = %s, "websocket join not stored again");
                return;
            }
            self.unfollowed.remove(&s);
        }
    }

    /// Delivers a live message (with its prepared frame): duplicate →
    /// dropped, gap → filled first.
    async fn deliver(&mut self, m: &ChatMessage, text: &str) -> Result<(), ChatError> {
        let Some(&last) = self.joined.get(&m.session_id) else {
            return Ok(());
        };
        if m.seq <= last {
            return Ok(());
        }
        if m.seq == last + 1 {
            if self.send(Message::Text(text.to_owned())) {
                self.note_relayed(m);
            }
            return Ok(());
        }
        // A gap: rare, and deep (database reads), so boxed.
        Box::pin(self.catch_up(m.session_id)).await
    }

    /// Records `m` as the last message relayed of its session. A waiting
    /// session's remembered copy, sent again when only its place in the
    /// queue moves, takes the message's `seq` as `last_seq` and its time
    /// as `updated_at` (the message's commit wrote both), so that such a
    /// frame does not show the session older than messages already sent.
    fn note_relayed(&mut self, m: &ChatMessage) {
        self.joined.insert(m.session_id, m.seq);
        if let Some(Some(place)) = self.positions.get_mut(&m.session_id)
            && place.session.last_seq < m.seq
        {
            place.session.last_seq = m.seq;
            place.session.updated_at = place.session.updated_at.max(m.created_at);
        }
    }

    /// After events were dropped for this connection (its event queue
    /// overflowed, or the bus asked every node to resync after an outage):
    /// catches up the joined sessions, then tells the client with a
    /// `resync` frame that anything else it shows from frames (an agent's
    /// queue and team presence) may have missed changes and is to be read
    /// again over HTTP (the frames dropped are not replayed).
    ///
    /// When the database cannot be read, the sessions not caught up yet
    /// are left `behind` (caught up at the next pings) instead of each
    /// waiting out its own failed read while the connection does nothing
    /// else (a pool's acquire timeout apiece, long enough to take a
    /// healthy client's pongs for silence).
    async fn resync(&mut self) {
        let sessions: Vec<SessionId> = self.joined.keys().copied().collect();
        let mut readable = true;
        for s in sessions {
            if !readable {
                self.behind.insert(s);
                continue;
            }
            if let Err(e) = self.catch_up(s).await {
                tracing::warn!(error = %e, session = %s, "websocket resync failed; the rest follows at the next ping");
                readable = false;
                continue;
            }
            // Sent whatever changed: a dropped transfer or update (its
            // agent, ticket, contact) leaves the place and status as they
            // were.
            self.reread_session(s, true).await;
        }
        self.send(frame(json!({"type": "resync"})));
    }

    /// Re-reads a followed session and sends `session_updated` when its
    /// status or queue position changed (customers see their place move).
    async fn refresh_position(&mut self, session: SessionId) {
        self.reread_session(session, false).await;
    }

    /// Re-reads a followed session and sends `session_updated`: `always`,
    /// or when its status or queue position changed.
    async fn reread_session(&mut self, session: SessionId, always: bool) {
        let view = match self.identity.role {
            Role::Agent(_) => self.chat().get_session(self.tenant(), session).await,
            Role::Customer { customer, .. } => {
                self.chat()
                    .customer_session(self.tenant(), customer, session)
                    .await
            }
        };
        let Ok(view) = view else { return };
        let position = view.queue_position;
        let closed = view.session.status == SessionStatus::Closed;
        if always
            || self.position(session) != Some(position)
            || self.closed.contains(&session) != closed
        {
            self.note_position(&view.session, position);
            self.send_session_updated(&view.session, position);
        }
    }

    /// Remembers the queue position last sent for a joined session (and
    /// the session while it waits); a connection with any waiting session
    /// receives every session lifecycle event of its tenant (any may move
    /// its place).
    fn note_position(&mut self, session: &livechat_core::ChatSession, position: Option<i64>) {
        let place = position.map(|position| Place {
            position,
            session: session.clone(),
        });
        self.positions.insert(session.id, place);
        self.membership
            .set_waiting(self.positions.values().any(Option::is_some));
        if session.status == SessionStatus::Closed {
            self.closed.insert(session.id);
        } else {
            self.closed.remove(&session.id);
        }
    }

    /// The queue position last sent for a joined session: `Some(None)`
    /// when it was not waiting, `None` when it is not joined.
    fn position(&self, session: SessionId) -> Option<Option<i64>> {
        let place = self.positions.get(&session)?;
        Some(place.as_ref().map(|p| p.position))
    }

    /// The tenant's queue after `prepared` (each waiting session → its
    /// place), read once per event and node however many waiting customers
    /// it reaches; `None` when the read failed.
    async fn queue<'p>(&self, prepared: &'p Prepared) -> Option<&'p HashMap<SessionId, i64>> {
        let read = prepared
            .queue
            .get_or_try_init(|| self.chat().queue_positions(self.tenant()));
        match read.await {
            Ok(queue) => Some(queue),
            Err(e) => {
                tracing::warn!(error = %e, "reading the queue failed");
                None
            }
        }
    }

    /// The session of the lifecycle event `prepared` as stored now, read
    /// by the first connection of the node that relays the event and then
    /// shared ([`Prepared::current`]), or the event's own copy when the
    /// read fails. Relayed instead of the copy, so that whatever order the
    /// bus brings two nodes' events in, the last frame a client gets shows
    /// the session as it is (issue #4: any node can serve any client).
    async fn current_session<'p>(
        &self,
        prepared: &'p Prepared,
    ) -> Option<&'p livechat_core::ChatSession> {
        let copy = prepared.session.as_ref()?;
        // The row alone (`get_session` would count its queue place too).
        let store = self.chat().store();
        let read = prepared.current.get_or_init(|| {
            relayed_read(
                "session",
                livechat_core::SessionRepository::get_session(store, self.tenant(), copy.id),
            )
        });
        read.await.as_ref().or(Some(copy))
    }

    /// As [`Self::current_session`], the presence of an
    /// `agent.status_changed` event's agent ([`Prepared::presence`]), read
    /// once per node; the event's own copy when it cannot be read (`None`
    /// when that does not decode either).
    async fn current_presence<'p>(
        &self,
        event: &DomainEvent,
        prepared: &'p Prepared,
    ) -> Option<&'p livechat_core::AgentPresence> {
        let read = prepared.presence.get_or_init(|| async {
            let copy: livechat_core::AgentPresence = event.payload.decode().ok()?;
            let read = self.chat().agent_presence(self.tenant(), copy.agent_id);
            relayed_read("agent presence", read).await.or(Some(copy))
        });
        read.await.as_ref()
    }

    /// The status a presence announcement of `agent` stands for, as stored
    /// when the first connection of this node relays it (the status it
    /// carries if the read fails): an agent's departure announced by one
    /// node and return by another can arrive in either order.
    async fn announced_status(
        &self,
        agent: UserId,
        carried: PresenceStatus,
        prepared: &Prepared,
    ) -> PresenceStatus {
        let read = prepared.announced.get_or_init(|| async {
            let read = self.chat().announced_status(self.tenant(), agent);
            relayed_read("announced presence", read).await
        });
        read.await.unwrap_or(carried)
    }

    /// Stops following a joined session: its messages, its lifecycle and,
    /// when it was the last waiting one, the tenant's queue moves.
    fn leave(&mut self, session: SessionId) {
        self.joined.remove(&session);
        self.positions.remove(&session);
        self.closed.remove(&session);
        self.behind.remove(&session);
        self.unfollowed.remove(&session);
        self.membership
            .set_waiting(self.positions.values().any(Option::is_some));
        self.membership.unfollow(session);
    }

    fn send_session_updated(
        &mut self,
        session: &livechat_core::ChatSession,
        position: Option<i64>,
    ) {
        let dto = crate::dto::SessionDto::new(session.clone(), position);
        let session_json = poem_openapi::types::ToJSON::to_json(&dto).unwrap_or_default();
        self.send(frame(
            json!({"type": "session_updated", "session": session_json}),
        ));
    }

    async fn handle_domain(
        &mut self,
        event: &DomainEvent,
        prepared: &Prepared,
    ) -> Result<(), ChatError> {
        match event.kind {
            // Delivered from the prepared frame in `handle_prepared`.
            EventKind::MessagePosted => {}
            EventKind::SessionStarted
            | EventKind::SessionAssigned
            | EventKind::SessionClosed
            | EventKind::SessionUpdated => {
                let session = self.current_session(prepared).await;
                if let Role::Agent(_) = self.identity.role
                    && let Some(s) = &session
                {
                    // An agent-started chat opens OPEN with its agent, and
                    // only its `session.started` says so (a customer's
                    // chat routed at once has its `session.assigned`).
                    let agent_started = event.kind == EventKind::SessionStarted
                        && s.origin == livechat_core::SessionOrigin::Agent;
                    let queue_change = agent_started
                        || matches!(
                            event.kind,
                            EventKind::SessionAssigned | EventKind::SessionClosed
                        )
                        || s.status == SessionStatus::Waiting;
                    if queue_change {
                        self.send(frame(json!({
                            "type": "queue_updated",
                            "session_id": s.id,
                            "status": s.status,
                        })));
                    }
                }
                if let Some(s) = session
                    && self.joined.contains_key(&s.id)
                {
                    // A joined session moved to another customer: this
                    // visitor was linked to it.
                    if let Role::Customer { customer, .. } = self.identity.role
                        && s.customer_id.is_some_and(|owner| owner != customer)
                    {
                        self.follow_link().await;
                    }
                    // Not yet through `note_position`: the connection keeps
                    // receiving the tenant's lifecycle events meanwhile.
                    self.positions.insert(s.id, None);
                    let was_waiting = self.membership.is_waiting();
                    let (position, unread) = if s.status == SessionStatus::Waiting {
                        match self.queue(prepared).await {
                            Some(queue) => (queue.get(&s.id).copied(), false),
                            None => (None, true),
                        }
                    } else {
                        (None, false)
                    };
                    self.note_position(s, position);
                    self.send_session_updated(s, position);
                    // The queue could not be read: the place from a read
                    // of the session itself, so that it keeps moving. Or
                    // the connection is listed as waiting only now (its
                    // chat went back to the queue): the moves between the
                    // queue's read, shared with the connections that
                    // relayed this event first, and the listing did not
                    // reach it; its own read, now that they do, as a join
                    // of a waiting chat has.
                    if unread || (!was_waiting && self.membership.is_waiting()) {
                        self.refresh_position(s.id).await;
                    }
                }
                // Queue moves shift every waiting customer's place.
                let waiting: Vec<SessionId> = self
                    .positions
                    .iter()
                    .filter(|(id, p)| p.is_some() && Some(**id) != event.session_id)
                    .map(|(id, _)| *id)
                    .collect();
                if waiting.is_empty() {
                    return Ok(());
                }
                let Some(queue) = self.queue(prepared).await else {
                    for s in waiting {
                        self.refresh_position(s).await;
                    }
                    return Ok(());
                };
                for id in waiting {
                    // Not in the queue any more: its own lifecycle event,
                    // still to come, says what became of it.
                    let Some(&position) = queue.get(&id) else {
                        continue;
                    };
                    if let Some(Some(place)) = self.positions.get(&id)
                        && place.position != position
                    {
                        let session = place.session.clone();
                        self.note_position(&session, Some(position));
                        self.send_session_updated(&session, Some(position));
                    }
                }
            }
            EventKind::AgentStatusChanged => {
                if let Role::Agent(_) = self.identity.role {
                    // A status set over HTTP also names the departments
                    // the agent takes (README "Frames"), so a team view
                    // stays current without GET /agents.
                    // As stored now (`current_presence`): two nodes' changes
                    // can arrive in either order.
                    if let Some(p) = self.current_presence(event, prepared).await {
                        let update = json!({
                            "type": "presence_updated",
                            "agent_id": p.agent_id,
                            "status": p.status,
                            "departments": p.departments,
                        });
                        self.send(frame(update));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn handle_prepared(&mut self, prepared: &Prepared) -> Result<(), ChatError> {
        if let (BusEvent::Domain(e), Some((m, text))) = (&*prepared.event, &prepared.message) {
            if e.tenant_id == self.tenant() {
                self.deliver(m, text).await?;
            }
            return Ok(());
        }
        // Other events may read the database: boxed, off the task's state.
        Box::pin(self.handle_bus(prepared)).await
    }

    async fn handle_bus(&mut self, prepared: &Prepared) -> Result<(), ChatError> {
        match &*prepared.event {
            BusEvent::Resync => self.resync().await,
            BusEvent::Domain(e) if e.tenant_id == self.tenant() => {
                self.handle_domain(e, prepared).await?;
            }
            BusEvent::Ephemeral { tenant_id, event } if *tenant_id == self.tenant() => {
                let me = self.identity.role.participant();
                match event {
                    Ephemeral::Typing {
                        session_id,
                        by,
                        state,
                    } if self.joined.contains_key(session_id) && *by != me => {
                        self.send(frame(json!({
                            "type": "typing",
                            "session_id": session_id,
                            "sender_type": by.sender_type,
                            "sender_id": by.sender_id,
                            "customer_id": by.customer_id,
                            "state": state,
                        })));
                    }
                    Ephemeral::Read {
                        session_id,
                        by,
                        seq,
                    } if self.joined.contains_key(session_id) && *by != me => {
                        self.send(frame(json!({
                            "type": "read",
                            "session_id": session_id,
                            "sender_type": by.sender_type,
                            "sender_id": by.sender_id,
                            "customer_id": by.customer_id,
                            "seq": seq,
                        })));
                    }
                    Ephemeral::Presence { agent_id, status } => {
                        if let Role::Agent(_) = self.identity.role {
                            let status = self.announced_status(*agent_id, *status, prepared).await;
                            self.send(frame(json!({
                                "type": "presence_updated",
                                "agent_id": agent_id,
                                "status": status,
                            })));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks the caller may see `raw` and returns its id. A customer's
    /// session found as the identified customer its visitor was linked to
    /// since (`ChatService::customer_session`) makes the connection that
    /// customer's ([`Self::follow_link`]).
    async fn authorize(&mut self, raw: &str) -> Result<livechat_core::SessionView, ChatError> {
        let id: SessionId = raw.parse()?;
        match self.identity.role {
            Role::Agent(_) => self.chat().get_session(self.tenant(), id).await,
            Role::Customer { customer, .. } => {
                let view = self
                    .chat()
                    .customer_session(self.tenant(), customer, id)
                    .await?;
                // Found as the identified customer this visitor was linked
                // to since: the connection goes on as them.
                if view
                    .session
                    .customer_id
                    .is_some_and(|owner| owner != customer)
                {
                    self.follow_link().await;
                }
                Ok(view)
            }
        }
    }

    /// A visitor's connection whose visitor was linked to an identified
    /// customer since it authenticated goes on as that customer, as the
    /// visitor token does over HTTP (README "Linking"): its sends, joins,
    /// typing and read receipts are the identified customer's. The new
    /// customer when the connection's changed. Called when one of its sessions
    /// is found to belong to another customer, which is rare: a link moves
    /// the visitor's sessions (and announces an active one with
    /// `session.updated`).
    async fn follow_link(&mut self) -> Option<CustomerId> {
        let Role::Customer { customer, .. } = self.identity.role else {
            return None;
        };
        let linked = self.chat().linked_customer(self.tenant(), customer).await?;
        self.identity.role = Role::Customer {
            customer: linked.id,
            user: linked.user_id,
        };
        Some(linked.id)
    }

    fn joined_id(&self, raw: &str) -> Option<SessionId> {
        raw.parse().ok().filter(|id| self.joined.contains_key(id))
    }

    /// Whether a customer connection's sender is over their message limit
    /// (`RateLimits::customer_messages_per_sec`; counts one message when
    /// not). Agents have none beyond the connection's.
    fn customer_limit(&self) -> Result<(), Refused> {
        match self.identity.role {
            Role::Customer { customer, .. } => {
                self.gateway
                    .limits
                    .customer_message(self.tenant(), customer, self.client_ip)
            }
            Role::Agent(_) => Ok(()),
        }
    }

    /// Submits a `send_message`: it takes its place in the store's order
    /// now and is answered when committed, so later frames are read
    /// meanwhile and this connection's sends keep their order (seq and
    /// acks). A send refused by the rate limit is answered in its turn too.
    fn submit_send(&mut self, session_id: &str, client_msg_id: String, message: String) {
        // The connection's own limit, then the customer's, which their
        // HTTP messages and other sockets share.
        if let Err(refused) = limits::direct(&self.limiter, "too many messages; slow down")
            .and_then(|()| self.customer_limit())
        {
            self.sends.push_back(InFlight {
                client_msg_id,
                append: Err(refused),
            });
            return;
        }
        let append = match session_id.parse::<SessionId>() {
            Err(e) => PendingAppend::ready(Err(e)),
            Ok(id) => match self.identity.role {
                Role::Agent(agent) => self.chat().submit_message(
                    self.tenant(),
                    agent,
                    id,
                    message,
                    Some(client_msg_id.clone()),
                ),
                Role::Customer { customer, .. } => self.chat().submit_customer_message(
                    self.tenant(),
                    customer,
                    id,
                    message,
                    Some(client_msg_id.clone()),
                ),
            },
        };
        self.sends.push_back(InFlight {
            client_msg_id,
            append: Ok(append),
        });
    }

    /// Handles a well-formed client frame. Sends and pings (the hot
    /// frames) are handled in place; the rest may read the database and run
    /// boxed, off the task's state.
    async fn on_frame(&mut self, frame_in: ClientFrame) -> Result<(), ChatError> {
        match frame_in {
            ClientFrame::SendMessage {
                session_id,
                client_msg_id,
                message,
            } => {
                self.submit_send(&session_id, client_msg_id, message);
                Ok(())
            }
            ClientFrame::Ping => {
                self.send(frame(json!({"type": "pong"})));
                Ok(())
            }
            other => Box::pin(self.handle_frame(other)).await,
        }
    }

    async fn handle_frame(&mut self, frame_in: ClientFrame) -> Result<(), ChatError> {
        if let ClientFrame::JoinSession { session_id, .. }
        | ClientFrame::Typing { session_id, .. }
        | ClientFrame::Read { session_id, .. } = &frame_in
            && let Err(refused) = limits::direct(
                &self.signals,
                "too many join_session, typing and read frames; slow down",
            )
        {
            self.send(rate_limited_frame(&refused, session_id));
            return Ok(());
        }
        match frame_in {
            ClientFrame::Auth { .. } => {
                self.send(error_frame(
                    "already_authenticated",
                    "this connection is authenticated",
                    None,
                ));
            }
            ClientFrame::Ping => {
                self.send(frame(json!({"type": "pong"})));
            }
            ClientFrame::JoinSession {
                session_id,
                after_seq,
            } => {
                // The HTTP route's rule (there 400 `invalid_query`).
                if let Err(e) = livechat_core::after_seq(after_seq) {
                    self.refuse(e, Some(&session_id));
                    return Ok(());
                }
                let view = match self.authorize(&session_id).await {
                    Ok(v) => v,
                    Err(e) => {
                        self.refuse(e, Some(&session_id));
                        return Ok(());
                    }
                };
                let id = view.session.id;
                // After the access check: a session that is not the
                // caller's is `not_found` whatever the cap.
                let cap = self.gateway.config.max_joins_per_connection;
                if cap > 0 && self.joined.len() >= cap && !self.joined.contains_key(&id) {
                    self.send(error_frame(
                        "too_many_joins",
                        &format!(
                            "this connection follows {cap} sessions, the most one may; leave one first"
                        ),
                        Some(&session_id),
                    ));
                    return Ok(());
                }
                if let Err(e) = self.chat().follow_session(self.tenant(), self.id, id).await {
                    self.refuse(e, Some(&session_id));
                    return Ok(());
                }
                let start = join_start(
                    after_seq,
                    view.session.last_seq,
                    self.joined.get(&id).copied(),
                );
                // Before the catch-up's read: what it misses arrives live.
                self.membership.follow(id);
                self.joined.insert(id, start);
                self.note_position(&view.session, view.queue_position);
                self.send(frame(json!({
                    "type": "joined",
                    "session_id": id,
                    "status": view.session.status,
                    "last_seq": view.session.last_seq,
                    "queue_position": view.queue_position,
                })));
                // Joined: a replay that failed follows at the next ping.
                if let Err(e) = self.catch_up(id).await {
                    self.refuse(e, Some(&session_id));
                    return Ok(());
                }
                // The session changed (the queue moved, it was assigned or
                // closed) between the access check's read and following it:
                // read it again, now that every later change reaches this
                // connection. A CLOSED session cannot change any more.
                if view.session.status != SessionStatus::Closed {
                    self.refresh_position(id).await;
                }
            }
            ClientFrame::LeaveSession { session_id } => {
                if let Some(id) = self.joined_id(&session_id) {
                    self.leave(id);
                    if let Err(e) = self
                        .chat()
                        .unfollow_session(self.tenant(), self.id, id)
                        .await
                    {
                        // Left here; the stored join goes with the
                        // connection's rows when it ends.
                        self.refuse(e, Some(&session_id));
                        return Ok(());
                    }
                }
                self.send(frame(json!({"type": "left", "session_id": session_id})));
            }
            ClientFrame::SendMessage {
                session_id,
                client_msg_id,
                message,
            } => self.submit_send(&session_id, client_msg_id, message),
            ClientFrame::Typing { session_id, state } => match self.joined_id(&session_id) {
                Some(id) if self.closed.contains(&id) => {
                    self.refuse(ChatError::SessionClosed, Some(&session_id));
                }
                Some(id) => self.gateway.bus.publish(BusEvent::Ephemeral {
                    tenant_id: self.tenant(),
                    event: Ephemeral::Typing {
                        session_id: id,
                        by: self.identity.role.participant(),
                        state,
                    },
                }),
                None => {
                    self.send(error_frame(
                        "not_found",
                        "join the session first",
                        Some(&session_id),
                    ));
                }
            },
            ClientFrame::Read { session_id, seq } => match self.joined_id(&session_id) {
                Some(id) => {
                    match read_refusal(seq, self.joined.get(&id).copied().unwrap_or_default()) {
                        None => self.gateway.bus.publish(BusEvent::Ephemeral {
                            tenant_id: self.tenant(),
                            event: Ephemeral::Read {
                                session_id: id,
                                by: self.identity.role.participant(),
                                seq,
                            },
                        }),
                        Some(message) => {
                            self.send(error_frame("invalid_frame", &message, Some(&session_id)));
                        }
                    }
                }
                None => {
                    self.send(error_frame(
                        "not_found",
                        "join the session first",
                        Some(&session_id),
                    ));
                }
            },
        }
        Ok(())
    }

    /// A bad frame: an `error` frame, and 1008 after too many in a row.
    fn bad_frame(&mut self, code: &str, message: &str) {
        self.bad_frames += 1;
        self.send(error_frame(code, message, None));
        if self.bad_frames >= self.gateway.config.max_bad_frames {
            self.close_with(CloseCode::Policy, "too many invalid frames");
        }
    }
}

/// Waits for the `auth` frame of a browser client.
async fn first_frame_auth(
    gateway: &Gateway,
    stream: &mut futures_util::stream::SplitStream<WebSocketStream>,
) -> Result<Identity, Refusal> {
    let deadline = tokio::time::sleep(gateway.config.auth_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return Err(Refusal::new("unauthorized", "no auth frame in time")),
            next = stream.next() => {
                let message = match next {
                    Some(Ok(message)) => message,
                    // A frame over the size limit, or text that is not
                    // UTF-8: the close a later frame would get (README,
                    // Errors), not a refusal of the credential.
                    Some(Err(error)) if let Some(close) = protocol_close(&error) => {
                        return Err(Refusal {
                            close: Some(close),
                            ..Refusal::new("invalid_frame", "refused by the WebSocket layer")
                        });
                    }
                    _ => return Err(Refusal::new("unauthorized", "closed before auth")),
                };
                let text = match message {
                    Message::Text(t) => t,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    // As a later binary frame would be (README, Errors).
                    Message::Binary(_) => return Err(Refusal::new("invalid_frame", "frames are JSON text")),
                    _ => return Err(Refusal::new("unauthorized", "closed before auth")),
                };
                return match parse_frame(&text, gateway.config.max_frame_bytes) {
                    Ok(ClientFrame::Auth { token, tenant_id }) => {
                        let tenant = TenantId::new(tenant_id)
                            .map_err(|_| Refusal::new("invalid_tenant", "tenant_id must be a positive integer"))?;
                        gateway.identify(&token, tenant).await
                    }
                    Ok(_) => Err(Refusal::new("unauthorized", "the first frame must be auth")),
                    // What a later frame would get (`invalid_json`,
                    // `invalid_frame`, `frame_too_large`), then the close.
                    Err((code, message)) => Err(Refusal::new(code, message)),
                };
            }
        }
    }
}

/// Runs one connection to its end.
async fn serve(
    gateway: Arc<Gateway>,
    socket: WebSocketStream,
    pre_auth: Option<(Identity, Slot)>,
    client_ip: Option<std::net::IpAddr>,
) {
    let (mut sink, mut stream) = socket.split();
    // The slot is held until the connection has unregistered (a silent
    // client's, before the close handshake it will not answer).
    let (identity, slot) = match pre_auth {
        Some(admitted) => admitted,
        None => match Box::pin(first_frame_auth(&gateway, &mut stream))
            .await
            .and_then(|identity| gateway.admit(identity))
        {
            Ok(admitted) => admitted,
            Err(Refusal {
                close: Some((code, reason)),
                ..
            }) => {
                let _ = sink
                    .send(Message::Close(Some((code, reason.to_owned()))))
                    .await;
                return;
            }
            Err(refusal) => {
                let mut value = error_value(refusal.code, &refusal.message, None);
                if let Some(wait) = refusal.retry_after {
                    value["retry_after_ms"] = json!(whole_ms(wait));
                }
                let _ = sink.send(frame(value)).await;
                // A refusal for the client's own doing is a policy close;
                // one because the server cannot answer now says so, so
                // that a client reading only the close code retries.
                let code = match refusal.code {
                    "unavailable" => CloseCode::Again,
                    "internal_error" => CloseCode::Error,
                    _ => CloseCode::Policy,
                };
                let _ = sink
                    .send(Message::Close(Some((code, close_reason(&refusal.message)))))
                    .await;
                return;
            }
        },
    };

    let quota = |per_sec: u32| {
        let rate = NonZeroU32::new(per_sec.max(1)).unwrap_or(NonZeroU32::MIN);
        crate::limits::burst_quota(rate, Quota::per_second)
    };
    let id = uuid::Uuid::now_v7();
    let agent = matches!(identity.role, Role::Agent(_));
    let (membership, mut events) = gateway.fanout().add(id, identity.tenant, agent);
    let mut conn = Conn {
        gateway: gateway.clone(),
        id,
        identity,
        client_ip,
        membership,
        out: Outbound::new(sink),
        closing: None,
        joined: HashMap::new(),
        closed: HashSet::new(),
        behind: HashSet::new(),
        unfollowed: HashSet::new(),
        positions: HashMap::new(),
        bad_frames: 0,
        limiter: RateLimiter::direct(quota(gateway.config.send_rate_per_sec)),
        signals: RateLimiter::direct(quota(gateway.config.signal_rate_per_sec)),
        last_heard: Instant::now(),
        sends: FuturesOrdered::new(),
    };
    let owner = identity.role.owner();
    // Registered, and its agent's liveness renewed, with the node's other
    // new connections; `ready` once stored (or failed, logged).
    let _ = crate::renewals::queue(&gateway, identity.tenant, conn.id, owner, Kind::Register).await;
    conn.send(frame(json!({
        "type": "ready",
        "connection_id": conn.id,
        "role": identity.role.name(),
        "tenant_id": identity.tenant,
    })));

    let config = &gateway.config;
    let mut shutdown = gateway.shutdown.clone();
    let mut shutdown_open = true;
    let mut bus_open = true;
    let mut ping = tokio::time::interval(config.ping_interval);
    // Ticks missed while the loop was held up (a resync) come one interval
    // apart, not in a burst that would shrink the window a client has to
    // be heard in.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    // What the socket had taken at the last ping tick, and whether it was
    // full then; when the tick before it was (at first the connection's
    // start, so that the first tick renews: no ping has gone out yet).
    let (mut taken_at_tick, mut stalled) = (0, false);
    let (mut tick_before, mut last_tick) = (conn.last_heard, conn.last_heard);
    // When the client was last heard, once the connection ends with the
    // client's reading unknown: closed for not having been heard from
    // since, or its socket broken (no close frame: a frozen tab's process
    // killed, a mobile browser discarding it). The replies stored since
    // are made up as notifications (`unregister`).
    let mut silent_since: Option<chrono::DateTime<chrono::Utc>> = None;
    // A customer's connection: the ping tick that first found the bus cut
    // off from the other nodes, until one finds it back (its resync then
    // delivers what it missed).
    let mut cut_off_seen: Option<Instant> = None;
    // The end of the credential the connection was opened with: a socket
    // used to go on for as long as it stayed open, its token long expired
    // (a 12-hour login, a revoked agent's last token).
    let expiry = tokio::time::sleep(
        identity
            .expires_at
            .and_then(|at| (at - chrono::Utc::now()).to_std().ok())
            .unwrap_or_default(),
    );
    tokio::pin!(expiry);
    // The renewal of the registration, at most one at a time, runs beside
    // the loop: while the database is slow or down the loop still reads
    // (so the client's pongs count and its pings are answered) instead of
    // waiting for the store, and a healthy client is not closed for a
    // silence that was the server's. The node's renewal task stores it,
    // with the renewals of the node's other connections (`renewals`), not
    // a future of this loop: one holding a pooled connection (SQLite's
    // only one) while the loop awaited something else (a relayed event's
    // read, a join) went unpolled, and every request of the node waited
    // for that connection until their time limits (24 s for an agent's 24
    // chats handed back, one relayed read after another). The loop keeps
    // its receiver, to wait for it before the connection is removed.
    // It answers what it did (`renewals::Renewal`): when it registered
    // the connection again (its row was purged), or succeeded after a
    // failure (the row may have been purged and registered again by the
    // failed one), the connection's joins are stored again.
    let mut renewal: FuturesOrdered<
        futures_util::future::BoxFuture<'static, crate::renewals::Renewal>,
    > = FuturesOrdered::new();
    let mut renewal_failed = false;
    loop {
        if conn.is_closing() {
            break;
        }
        tokio::select! {
            () = conn.out.write(), if conn.out.pending() => {}
            changed = shutdown.changed(), if shutdown_open => {
                match changed {
                    // The module handle is gone: no shutdown can be asked for.
                    Err(_) => shutdown_open = false,
                    Ok(()) if *shutdown.borrow() => {
                        conn.close_with(CloseCode::Away, SHUTTING_DOWN);
                    }
                    Ok(()) => {}
                }
            }
            Some((client_msg_id, outcome)) = conn.sends.next(), if !conn.sends.is_empty() => {
                // A customer's chat not found: a link of this visitor may
                // have moved it (a connection joined to it learns of that
                // from the chat's update; this one may not be). The
                // connection goes on as the identified customer, so the
                // client's retry is theirs.
                let gone = matches!(outcome, Ok(Err(ChatError::NotFound)))
                    && matches!(conn.identity.role, Role::Customer { .. });
                conn.settle_send(&client_msg_id, outcome);
                if gone {
                    // Boxed: this loop's future is the connection's memory
                    // for as long as it is open, and the follow's is ~4 KiB.
                    Box::pin(conn.follow_link()).await;
                }
            }
            incoming = stream.next(), if conn.sends.len() < MAX_IN_FLIGHT => {
                let message = match incoming {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        if let Some((code, reason)) = protocol_close(&error) {
                            conn.close_with(code, reason);
                        } else {
                            // The socket broke (a reset, a tab discarded
                            // with its process): what a customer's client
                            // last read is not known.
                            silent_since = conn.unknown_reading();
                        }
                        break;
                    }
                    // Ended without a close frame: as a broken socket.
                    None => {
                        silent_since = conn.unknown_reading();
                        break;
                    }
                };
                conn.last_heard = Instant::now();
                match message {
                    Message::Text(text) => match parse_frame(&text, config.max_frame_bytes) {
                        Ok(f) => {
                            conn.bad_frames = 0;
                            if let Err(e) = conn.on_frame(f).await {
                                conn.refuse(e, None);
                            }
                        }
                        Err((code, message)) => conn.bad_frame(code, &message),
                    },
                    Message::Binary(_) => conn.bad_frame("invalid_frame", "frames are JSON text"),
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            event = events.recv() => {
                // A burst of events is handled in one go, so its frames
                // leave in one write (one system call for several frames).
                // The next event is taken only while the burst has room, so
                // none is taken and then dropped.
                let mut next = event;
                let mut handled = 0;
                loop {
                    let Some(event) = next else {
                        bus_open = false;
                        break;
                    };
                    // Answers first: a committed send's ack goes out before
                    // its own `new_message` (the store answers before it
                    // publishes).
                    conn.settle_ready_sends();
                    if let Err(e) = conn.handle_prepared(&event).await {
                        tracing::warn!(error = %e, "websocket: delivery failed");
                    }
                    handled += 1;
                    if conn.is_closing() || handled == BUS_BURST {
                        break;
                    }
                    next = match events.try_recv() {
                        Ok(event) => Some(event),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    };
                }
                // Events were dropped while the queue was full: re-read.
                // What is still queued is older than the drop, and the
                // resync's reads cover it (a message is stored before it
                // is published; sessions are read again): relayed after
                // them, it would show states that no longer hold (a chat
                // closed by a dropped event shown OPEN again).
                if conn.membership.take_lagged() {
                    while events.try_recv().is_ok() {}
                    Box::pin(conn.resync()).await;
                }
                if !bus_open {
                    break;
                }
            }
            _ = ping.tick() => {
                // The socket was full at the last tick (a write found it
                // so) and has taken frames since: the client's side
                // acknowledged some, so it is there and reading, however
                // slowly. On a slow link its pong can wait behind that
                // backlog for longer than the TTL (it was closed for "no
                // heartbeat" while reading). A socket with room proves
                // nothing: frames written to a dead peer are taken too,
                // until its buffers fill.
                if stalled && conn.out.taken != taken_at_tick {
                    conn.last_heard = Instant::now();
                }
                taken_at_tick = conn.out.taken;
                stalled = conn.out.stalled;
                // Frames wait unread while 64 sends are in flight: that is
                // the server's backlog, not a silent client.
                if conn.last_heard.elapsed() > config.connection_ttl && conn.sends.is_empty() {
                    silent_since = Some(heard_at(conn.last_heard));
                    conn.close_with(CloseCode::Away, "no heartbeat");
                    break;
                }
                // Renewed only for a client heard since the tick before
                // the last one (its pong to a recent ping, one late pong
                // or a stall's first tick forgiven): the server's own ping
                // proves nothing, and renewing on it kept a frozen client's
                // connection, and its agent's eligibility, alive until the
                // close for no heartbeat (routing gave chats to an agent
                // whose machine had gone to sleep).
                let heard = conn.last_heard >= tick_before;
                (tick_before, last_tick) = (last_tick, Instant::now());
                // Ahead of the frames not yet written (a control frame may
                // go between messages), so that a backlog does not hold it
                // up; one waiting is enough, and a full queue already
                // proves the socket is busy.
                let (frames, bytes) = conn.queue_limits();
                if !conn.out.full(frames, bytes)
                    && !matches!(conn.out.queue.front(), Some(Message::Ping(_)))
                {
                    conn.out.push_front(Message::Ping(Vec::new()));
                }
                if !conn.behind.is_empty() {
                    Box::pin(conn.catch_up_behind()).await;
                }
                if !conn.unfollowed.is_empty() {
                    Box::pin(conn.follow_again()).await;
                }
                // A customer's connection is not renewed while the bus
                // cannot reach the other nodes: their agents' replies do
                // not reach it, and once its row runs out (a TTL after
                // its last renewal: an outage longer than a blip) they
                // count it as gone and the customer is notified of them
                // instead of neither. The first renewal after the outage
                // renews it again (or registers it again, with its joins,
                // if it was purged meanwhile).
                let cut_off = matches!(owner, ConnectionOwner::Customer(_))
                    && gateway.bus.is_degraded();
                cut_off_seen = cut_off.then(|| cut_off_seen.unwrap_or(last_tick));
                if renewal.is_empty() && heard && !cut_off {
                    let stored = crate::renewals::queue(&gateway, identity.tenant, conn.id, owner, Kind::Renew);
                    renewal.push_back(
                        async move { stored.await.unwrap_or(crate::renewals::Renewal::Failed) }
                            .boxed(),
                    );
                }
            }
            Some(renewed) = renewal.next(), if !renewal.is_empty() => {
                use crate::renewals::Renewal;
                let rejoin = match renewed {
                    Renewal::Failed => {
                        renewal_failed = true;
                        false
                    }
                    Renewal::Restored => true,
                    Renewal::Stored => renewal_failed,
                };
                if rejoin {
                    renewal_failed = false;
                    conn.unfollowed.extend(conn.joined.keys().copied());
                    Box::pin(conn.follow_again()).await;
                }
            }
            () = &mut expiry, if identity.expires_at.is_some() => {
                conn.send(error_frame(
                    "unauthorized",
                    "the credential expired: reconnect with a new one and resume with after_seq",
                    None,
                ));
                conn.close_with(CloseCode::Policy, "credential expired");
                break;
            }
        }
    }
    // A write that failed broke the socket: as a socket that ended without
    // a close frame, what a customer's client last read is not known.
    if conn.out.broken && silent_since.is_none() {
        silent_since = conn.unknown_reading();
    }
    // A customer whose node is, or was since its last tick, cut off from
    // the other nodes missed their agents' replies since (at the latest) a
    // ping interval before that was first seen; counted as connected where
    // they were stored, they are made up as a silent client's would be,
    // whatever the close (a tab closed during the outage used to lose them).
    if matches!(identity.role, Role::Customer { .. }) {
        let cut_since = cut_off_seen
            .or_else(|| gateway.bus.is_degraded().then(Instant::now))
            .map(|at| heard_at(at.checked_sub(gateway.config.ping_interval).unwrap_or(at)));
        if let Some(at) = cut_since {
            silent_since = Some(silent_since.map_or(at, |since| since.min(at)));
        }
    }
    // A renewal still running ends before the connection is removed, so it
    // cannot renew the owner's liveness after the removal started the grace.
    while renewal.next().await.is_some() {}
    let conn_id = conn.id;
    tracing::debug!(connection = %conn_id, role = identity.role.name(), "websocket closing");
    if silent_since.is_some() {
        // A silent client is gone: it stops counting at once, not after
        // the close handshake it will not answer (up to 30 s a step).
        Box::pin(unregister(&gateway, identity, conn_id, silent_since)).await;
        drop(slot);
        Box::pin(close(conn, &mut stream)).await;
    } else {
        Box::pin(close(conn, &mut stream)).await;
        // With the node's other closed connections (`renewals`).
        let _ = crate::renewals::queue(
            &gateway,
            identity.tenant,
            conn_id,
            identity.role.owner(),
            Kind::Unregister,
        )
        .await;
    }
}

/// The reason of the 1001 a node's shutdown closes its connections with.
const SHUTTING_DOWN: &str = "server shutting down";

/// Ends a connection. When the client ended it, or the node is shutting
/// down, the sends already submitted are answered while the queue is
/// written (they are stored whatever happens; a client that missed an ack
/// resends with the same `client_msg_id` and gets the original). Another
/// close the server asked for (a silent client's 1001, 1008, 1013) does
/// not wait for them, as before one task per connection. Then the queued
/// frames (dropped for a slow consumer, 1013) and the close frame are
/// written, and the client's close frame is awaited. Each step is bounded
/// by [`CLOSE_HANDSHAKE`]; a broken socket skips them.
async fn close(mut conn: Conn, stream: &mut futures_util::stream::SplitStream<WebSocketStream>) {
    let answers = match &conn.closing {
        None => true,
        Some((code, reason)) => *code == CloseCode::Away && reason == SHUTTING_DOWN,
    };
    if answers && !conn.out.broken {
        let closing = conn.closing.clone();
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while !conn.sends.is_empty() && !conn.out.broken && conn.closing == closing {
                tokio::select! {
                    () = conn.out.write(), if conn.out.pending() => {}
                    Some((client_msg_id, outcome)) = conn.sends.next() => {
                        conn.settle_send(&client_msg_id, outcome);
                    }
                }
            }
        })
        .await;
    }
    if conn.out.broken {
        return;
    }
    let close_frame = conn
        .closing
        .take()
        .unwrap_or((CloseCode::Normal, String::new()));
    if close_frame.0 == CloseCode::Again {
        conn.out.clear();
    }
    conn.out.push_back(Message::Close(Some(close_frame)));
    let out = &mut conn.out;
    let flushed = tokio::time::timeout(CLOSE_HANDSHAKE, async {
        out.write().await;
        let _ = out.sink.close().await;
        !out.broken
    })
    .await;
    if flushed != Ok(true) {
        return;
    }
    // Finish the closing handshake: keep reading (and discarding) until the
    // client's close frame, so the socket is not reset while the client is
    // still reading what was sent before our close frame.
    let drain = async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, drain).await;
}

/// The wall-clock time of `heard`, an instant of this process.
fn heard_at(heard: Instant) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(heard.elapsed()).unwrap_or_default()
}

/// Removes a closed connection from the registry on its own; an agent's
/// last connection starts the presence grace period. Used for a client
/// gone silent or whose socket broke (`silent_since`: last heard then; a
/// customer's replies stored since become notifications); a connection
/// closed with a close frame is removed with the node's others
/// (`renewals::Kind::Unregister`).
async fn unregister(
    gateway: &Arc<Gateway>,
    identity: Identity,
    id: uuid::Uuid,
    silent_since: Option<chrono::DateTime<chrono::Utc>>,
) {
    match gateway
        .chat
        .unregister_connection(
            identity.tenant,
            id,
            identity.role.owner(),
            gateway.config.presence_grace,
            silent_since,
        )
        .await
    {
        Ok(true) => {
            tracing::debug!(connection = %id, "last connection of the agent closed");
            if let Role::Agent(agent) = identity.role {
                spawn_presence_check(gateway.clone(), vec![(identity.tenant, agent)]);
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "websocket: could not unregister the connection"),
    }
}

/// After the grace period, tells the tenant's agents that an agent whose
/// last connection closed is gone, unless they reconnected meanwhile (their
/// next connection announces them again: `renewals::Kind::Register`), and tickets the
/// tenant's waiting chats if no agent is online any more
/// ([`ChatService::ticket_unattended_chats`]). Tracked with the node's
/// sockets, so that a graceful stop ([`crate::Livechat::closed`]) waits
/// for it: the check died with the process, and the agent went on showing
/// online, and the chats waiting on them went without a ticket, until
/// another node's housekeeping (up to a minute).
///
/// Several agents gone at once (connections removed together,
/// `renewals::Kind::Unregister`) share one check
/// ([`ChatService::agents_gone`], which decides both steps): their
/// announcements are recorded a transaction per tenant, and each tenant's
/// waiting chats are looked at once.
pub(crate) fn spawn_presence_check(gateway: Arc<Gateway>, agents: Vec<(TenantId, UserId)>) {
    gateway.sockets.clone().spawn(async move {
        tokio::time::sleep(gateway.config.presence_grace).await;
        let grace = gateway.config.presence_grace;
        gateway
            .chat
            .agents_gone(&agents, grace, |tenant, recorded| {
                for &agent in recorded {
                    publish_presence(&*gateway.bus, tenant, agent, PresenceStatus::Offline);
                }
            })
            .await;
    });
}

/// Tells `tenant`'s agent connections, on every node, that `agent`'s
/// presence is now `status` (`presence_updated`).
pub(crate) fn publish_presence(
    bus: &dyn EventBus,
    tenant: TenantId,
    agent: UserId,
    status: PresenceStatus,
) {
    bus.publish(BusEvent::Ephemeral {
        tenant_id: tenant,
        event: Ephemeral::Presence {
            agent_id: agent,
            status,
        },
    });
}

#[cfg(test)]
mod tests {
    use super::{close_reason, join_start, rate_limited_frame, same_origin, serve};
    use crate::limits::Refused;

    /// A first join starts at `after_seq` (at most the last message) or,
    /// without it, at the last message; a join again on a connection
    /// already joined never moves it past what it was sent, so a message
    /// committed but not yet relayed to it is not taken as sent.
    #[test]
    fn a_join_again_never_skips_a_message_not_yet_sent() {
        assert_eq!(join_start(None, 7, None), 7);
        assert_eq!(join_start(Some(3), 7, None), 3);
        assert_eq!(join_start(Some(50), 7, None), 7);
        // Joined and sent up to 5 while 6 and 7 are on their way.
        assert_eq!(join_start(None, 7, Some(5)), 5);
        assert_eq!(join_start(Some(50), 7, Some(5)), 5);
        // An earlier `after_seq` replays from there, as asked.
        assert_eq!(join_start(Some(2), 7, Some(5)), 2);
    }

    /// `retry_after_ms` rounds the wait up to whole milliseconds, at least
    /// one: a client that waits that long is let through.
    #[test]
    fn a_rate_limited_frame_says_the_wait_in_whole_milliseconds_rounded_up() {
        for (wait_us, expected) in [(0, 1), (1, 1), (1_000, 1), (1_001, 2), (499_900, 500)] {
            let refused = Refused {
                what: "slow down",
                wait: std::time::Duration::from_micros(wait_us),
            };
            let poem::web::websocket::Message::Text(text) = rate_limited_frame(&refused, "r1")
            else {
                panic!("a text frame");
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                v,
                serde_json::json!({
                    "type": "error",
                    "code": "rate_limited",
                    "message": "slow down",
                    "ref": "r1",
                    "retry_after_ms": expected,
                }),
                "{wait_us} µs"
            );
        }
    }

    /// The size of the future `f` returns, without calling it.
    fn returned_size<A, B, C, D, F>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's loop is held, whole, for as long as its socket is
    /// open: what it awaits inline is memory of every idle connection
    /// (issue #5: at most 10 KiB a connection). A rare path awaited inline
    /// (the follow of a visitor's link, ~4 KiB) took the idle connection
    /// from ~5 to ~9 KiB; rare paths are boxed. The loop's own state
    /// (the connection, its timers, the `select!`'s branches) is ~2.2 KiB,
    /// bounded here at 3 KiB for room between compiler versions.
    #[test]
    fn a_connection_loop_awaits_no_large_future_inline() {
        let size = returned_size(serve);
        assert!(size <= 3072, "the connection's future is {size} bytes");
    }

    #[test]
    fn origins_compare_without_case_or_default_ports() {
        for (a, b) in [
            ("https://shop.example", "https://shop.example"),
            ("https://shop.example", "HTTPS://Shop.Example"),
            ("https://shop.example", "https://shop.example:443"),
            ("http://shop.example:80", "http://shop.example"),
            ("http://localhost:3000", "http://LOCALHOST:3000"),
            ("https://shop.example/", "https://shop.example"),
        ] {
            assert!(same_origin(a, b), "{a} = {b}");
            assert!(same_origin(b, a), "{b} = {a}");
        }
        for (a, b) in [
            ("https://shop.example", "http://shop.example"),
            ("https://shop.example", "https://shop.example:8443"),
            ("http://shop.example", "http://shop.example:443"),
            ("https://shop.example", "https://evil.example"),
            ("https://shop.example", "https://shop.example.evil.example"),
            ("https://shop.example", "https://shop.example/path"),
            ("https://shop.example", "https://user@shop.example"),
            ("https://shop.example", "null"),
            ("https://shop.example", ""),
        ] {
            assert!(!same_origin(a, b), "{a} != {b}");
            assert!(!same_origin(b, a), "{b} != {a}");
        }
    }

    #[test]
    fn a_close_reason_fits_its_frame_whole_characters_only() {
        assert_eq!(
            close_reason("no auth frame in time"),
            "no auth frame in time"
        );
        let long = format!("{}é", "x".repeat(122));
        // 124 bytes; the `é` would straddle byte 123.
        assert_eq!(close_reason(&long), "x".repeat(122));
        assert_eq!(close_reason(&"y".repeat(300)).len(), 123);
    }
}
