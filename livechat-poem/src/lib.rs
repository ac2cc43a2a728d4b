//! # livechat-poem
//!
//! The HTTP face of the livechat module for [poem]: the agent routes of
//! issue #2 as a poem-openapi service, request authentication (the host's
//! [`Authenticator`], or the shipped [`JwtAuthenticator`]), `X-Tenant-ID`
//! handling, and the one mapping from errors to the JSON error envelope.
//! Handlers only extract, call [`livechat_core::ChatService`] and convert.
//!
//! A host mounts it under `/livechat` next to its own routes:
//!
//! ```no_run
//! use std::sync::Arc;
//! use livechat_core::{ChatConfig, ChatService, store::{self, Migrator, SeaOrmStore}};
//! use livechat_poem::{JwtAuthenticator, Livechat, envelope};
//! use poem::{EndpointExt, Route, Server, listener::{Listener, TcpListener}};
//! use sea_orm_migration::MigratorTrait;
//!
//! # async fn host() -> Result<(), Box<dyn std::error::Error>> {
//! let db = store::connect("sqlite://livechat.db?mode=rwc").await?;
//! Migrator::up(&db, None).await?;
//! let chat = ChatService::new(SeaOrmStore::new(db), ChatConfig::default());
//! let livechat = Livechat::new(
//!     chat,
//!     Arc::new(JwtAuthenticator::hs256(b"host secret")),
//!     b"visitor token secret",
//! );
//!
//! let app = Route::new()
//!     .nest("/livechat", livechat.endpoint())
//!     .at("/openapi.json", livechat.spec_endpoint("/livechat"))
//!     .nest("/docs", livechat.swagger_ui("/livechat"))
//!     // This route decodes every path first: one that does not decode
//!     // (`/livechat/sessions/%ff`) gets the JSON envelope too.
//!     .catch_all_error(envelope);
//! // TCP_NODELAY: small WebSocket frames are not held back by Nagle.
//! let acceptor = TcpListener::bind("127.0.0.1:8080").into_acceptor().await?;
//! Server::new_with_acceptor(livechat_poem::NoDelay(acceptor)).run(app).await?;
//! # Ok(()) }
//! ```

mod api;
mod auth;
mod customer;
mod dto;
mod error;
mod fanout;
mod limits;
mod net;
mod renewals;
mod slots;
mod tenants;
mod visitor;
mod ws;

use std::sync::Arc;

use livechat_core::bus::EventBus;
use livechat_core::{
    ChatService, NotificationInbox, PresenceStatus, TenantId, TicketDirectory, UserId,
};
use poem::{Endpoint, EndpointExt, IntoEndpoint, Response};
use poem_openapi::OpenApiService;

pub use api::{AgentContext, AssignRequest, RoutingSettings};
pub use auth::{
    AuthError, Authenticator, JwtAuthenticator, Principal, SUPPORT_AGENT, TENANT_HEADER,
    VERIFIED_TOKENS, parse_tenant_header, tenant_from_headers,
};
pub use customer::{ChatStart, ContactRequest, LinkRequest, StartChatRequest};
pub use dto::*;
pub use error::{ApiError, ErrorBody, ErrorDetail, MAX_BODY_BYTES, MAX_QUERY_PARAMETERS, envelope};
pub use limits::{ANY_CUSTOMER_FACTOR, ANY_TENANT_FACTOR, RateLimits};
pub use net::NoDelay;
pub use tenants::TenantDirectory;
pub use visitor::{IdentitySecrets, VISITOR_TOKEN_TTL, VisitorTokens};
pub use ws::{RealtimeConfig, same_origin};

/// The livechat routes, ready to nest into a host's poem app.
#[derive(Clone)]
pub struct Livechat {
    chat: ChatService,
    authenticator: Arc<dyn Authenticator>,
    visitor_tokens: VisitorTokens,
    identity_secrets: IdentitySecrets,
    tickets: Option<Arc<dyn TicketDirectory>>,
    notifications: Option<Arc<dyn NotificationInbox>>,
    realtime: Option<(Arc<dyn EventBus>, RealtimeConfig)>,
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    /// This node's WebSockets, each until it has unregistered its
    /// connection ([`Self::closed`]).
    sockets: tokio_util::task::TaskTracker,
    /// The customer routes' rate limits ([`Self::rate_limits`]).
    limits: Arc<limits::Limiters>,
    /// Which tenants offer chat ([`Self::tenants`]).
    tenants: Option<Arc<dyn TenantDirectory>>,
}

impl std::fmt::Debug for Livechat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Livechat")
            .field("chat", &self.chat)
            .finish_non_exhaustive()
    }
}

impl Livechat {
    /// Routes over `chat`, authenticating host tokens with `authenticator`
    /// and signing visitor tokens with `visitor_secret` (shared by all
    /// nodes, apart from the host's JWT secret), valid for
    /// [`VISITOR_TOKEN_TTL`] ([`Self::visitor_token_ttl`]).
    ///
    /// # Panics
    /// When `visitor_secret` is empty ([`VisitorTokens::new`]).
    pub fn new(
        chat: ChatService,
        authenticator: Arc<dyn Authenticator>,
        visitor_secret: &[u8],
    ) -> Self {
        Self {
            chat,
            authenticator,
            visitor_tokens: VisitorTokens::new(visitor_secret),
            identity_secrets: IdentitySecrets::new(),
            tickets: None,
            notifications: None,
            realtime: None,
            shutdown: Arc::new(tokio::sync::watch::channel(false).0),
            sockets: tokio_util::task::TaskTracker::new(),
            limits: Arc::new(limits::Limiters::new(&RateLimits::default())),
            tenants: None,
        }
    }

    /// Asks `tenants` whether a tenant offers live chat before a customer
    /// starts a chat in it or reads its availability (400
    /// `invalid_tenant` when it does not; 503 when the host cannot tell).
    /// Without it (default) any tenant id is served: `X-Tenant-ID` is the
    /// client's to choose, so an anonymous start may then name a tenant
    /// the host does not have.
    #[must_use]
    pub fn tenants(mut self, tenants: Arc<dyn TenantDirectory>) -> Self {
        self.tenants = Some(tenants);
        self
    }

    /// Sets how long the visitor tokens this node issues are valid
    /// (default [`VISITOR_TOKEN_TTL`], 30 days): a visitor whose
    /// token expired starts over as a new visitor. Tokens issued before
    /// keep their own expiry.
    #[must_use]
    pub fn visitor_token_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.visitor_tokens = self.visitor_tokens.with_ttl(ttl);
        self
    }

    /// Limits what one client may do over the customer routes (default:
    /// [`RateLimits::default`], 10 chat starts a minute per client address
    /// and tenant, 10 messages a second per customer, bursts of twice
    /// that); over a limit a request answers 429 `rate_limited` with
    /// `Retry-After`. Behind a reverse proxy, name the header that carries
    /// the client's address ([`RateLimits::client_ip_header`]). The limits
    /// are this node's: with `n` nodes behind a balancer a client may get
    /// up to `n` times as much.
    #[must_use]
    pub fn rate_limits(mut self, limits: RateLimits) -> Self {
        self.limits = Arc::new(limits::Limiters::new(&limits));
        self
    }

    /// Serves the WebSocket gateway at `/ws` over `bus` (issue #4). The
    /// service's store must publish on the same bus
    /// ([`livechat_core::store::SeaOrmStore::with_bus`]), so committed
    /// messages reach connections on every node.
    ///
    /// # Panics
    /// When `config` is not coherent ([`RealtimeConfig::check`]: a ping
    /// interval not below the connection TTL would let connections expire,
    /// and agents drop out, between pings; a presence grace plus ping
    /// interval above the connection TTL would not be honoured), a
    /// configuration mistake refused at start.
    #[must_use]
    pub fn realtime(mut self, bus: Arc<dyn EventBus>, config: RealtimeConfig) -> Self {
        if let Err(problem) = config.check() {
            panic!("RealtimeConfig: {problem}");
        }
        // A host's bus that panics loses its event, not the connection
        // or an announcement recorded as made.
        self.realtime = Some((livechat_core::bus::guarded(bus), config));
        self
    }

    /// Housekeeping, to run periodically on one node or several (the
    /// example host: every minute): deletes the connection rows of crashed
    /// nodes (their TTL ran out) and tells each tenant's agents, over the
    /// event bus, that such an agent is offline when they have no live
    /// connection left and (with a presence TTL) their liveness ran out
    /// too, once ([`ChatService::purge_expired_connections`]). A connection
    /// still open whose row it deleted (its node was cut off from the
    /// database for longer than the TTL) is registered again, with its
    /// joins, at its next renewal.
    /// Their next connection announces them back. Agents' replies that only
    /// such a dead customer connection followed (stored since its last
    /// renewal, in a session no live customer connection follows) get a
    /// `message.missed` event, which the ticket bridge turns into the
    /// customer's notification. Returns the agents announced offline, as
    /// `(tenant, agent)`.
    ///
    /// Without [`Self::realtime`] (a worker running housekeeping) only the
    /// customers' rows are deleted and their replies' `message.missed`
    /// events written, with [`RealtimeConfig`]'s default connection TTL
    /// (the nodes' own unless the host changed it); agents' rows are left
    /// to a node with the gateway
    /// ([`ChatService::purge_expired_connections_unannounced`]): the purge
    /// records each announcement as made, so that no other node makes it
    /// again, and such a node has no bus to make it on; it used to take
    /// every crashed node's agents' announcements and leave them online in
    /// every console.
    ///
    /// # Errors
    /// [`livechat_core::ChatError::Storage`] when the rows could not be
    /// read or deleted.
    pub async fn purge_expired_connections(
        &self,
    ) -> Result<Vec<(TenantId, UserId)>, livechat_core::ChatError> {
        let Some((bus, config)) = &self.realtime else {
            self.chat
                .purge_expired_connections_unannounced(RealtimeConfig::default().connection_ttl)
                .await?;
            return Ok(Vec::new());
        };
        let offline = self
            .chat
            .purge_expired_connections(config.connection_ttl)
            .await?;
        for &(tenant, agent) in &offline {
            ws::publish_presence(&**bus, tenant, agent, PresenceStatus::Offline);
        }
        Ok(offline)
    }

    /// Housekeeping for every tenant (call it periodically, like
    /// [`Self::purge_expired_connections`], after it): tickets the WAITING
    /// chats without a ticket, of every tenant, while no agent online takes
    /// them (none online, or none who takes their department)
    /// ([`ChatService::ticket_unattended_chats`]). An agent's status change
    /// and the presence grace after an agent's last WebSocket closes do this
    /// at once for their tenant; housekeeping catches agents whose liveness
    /// ran out unseen (a crashed node, an HTTP-only agent whose heartbeats
    /// stopped). Returns the chats ticketed.
    ///
    /// # Errors
    /// [`livechat_core::ChatError::Storage`] when the sessions could not be
    /// read or written.
    pub async fn ticket_unattended_chats(
        &self,
    ) -> Result<Vec<livechat_core::ChatSession>, livechat_core::ChatError> {
        self.chat.ticket_unattended_chats(None).await
    }

    /// Housekeeping for every tenant (call it periodically, like
    /// [`Self::purge_expired_connections`]): tells each tenant's agents,
    /// over the event bus, that an agent whose presence ran out without a
    /// live connection is offline, once across nodes
    /// ([`ChatService::announce_expired_presence`]): an agent who used only
    /// the HTTP routes and sent no heartbeat for the presence TTL. Their
    /// next heartbeat, connection or status change announces them back.
    /// Returns the agents announced offline, as `(tenant, agent)`. Does
    /// nothing without [`Self::realtime`] (nobody to tell) or without a
    /// presence TTL.
    ///
    /// # Errors
    /// [`livechat_core::ChatError::Storage`] when the presences could not
    /// be read or written.
    pub async fn announce_expired_presence(
        &self,
    ) -> Result<Vec<(TenantId, UserId)>, livechat_core::ChatError> {
        let Some((bus, _)) = &self.realtime else {
            return Ok(Vec::new());
        };
        let offline = self.chat.announce_expired_presence().await?;
        for &(tenant, agent) in &offline {
            ws::publish_presence(&**bus, tenant, agent, PresenceStatus::Offline);
        }
        Ok(offline)
    }

    /// Housekeeping for every tenant (call it periodically, after
    /// [`Self::announce_expired_presence`]): hands back the OPEN customer
    /// chats of agents gone for the routing policy's `hand_back_after`
    /// (`RoutingPolicy::hand_back_after`) since they were announced
    /// offline ([`ChatService::hand_back_chats_of_absent_agents`]); their
    /// customers' connections get `session_updated`, and the tenant's
    /// agent connections `queue_updated`. Returns the agents whose chats were
    /// handed back. Without [`Self::realtime`] nobody is announced offline,
    /// so nothing is handed back.
    ///
    /// # Errors
    /// [`livechat_core::ChatError::Storage`] when the presences or sessions
    /// could not be read or written.
    pub async fn hand_back_chats_of_absent_agents(
        &self,
    ) -> Result<Vec<(TenantId, UserId)>, livechat_core::ChatError> {
        self.chat.hand_back_chats_of_absent_agents().await
    }

    /// Housekeeping for every tenant (call it periodically, on any one node
    /// or on every node): deletes the outbox's settled events older than
    /// `retention` ([`ChatService::prune_outbox`]), once they are
    /// dispatched to every consumer. Returns how many it deleted.
    ///
    /// # Errors
    /// [`livechat_core::ChatError::InvalidInput`] for a retention under
    /// [`livechat_core::MIN_OUTBOX_RETENTION`] (a day);
    /// [`livechat_core::ChatError::Storage`] when a statement failed.
    pub async fn prune_outbox(
        &self,
        retention: std::time::Duration,
    ) -> Result<u64, livechat_core::ChatError> {
        self.chat.prune_outbox(retention).await
    }

    /// Closes every WebSocket of this node with 1001 (going away), for a
    /// graceful shutdown; call it when the server stops accepting, then
    /// wait for [`Self::closed`] before closing the database.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.sockets.close();
    }

    /// Waits, after [`Self::shutdown`], until every WebSocket of this node
    /// has ended and removed its connection's row, and the presence check
    /// of each agent whose last connection closed has run (after
    /// [`RealtimeConfig::presence_grace`]: announced offline unless they
    /// reconnected on another node, and their tenant's waiting chats
    /// ticketed if nobody is online any more). Until then a socket may
    /// still need the database: closed before, the rows stay and count as
    /// live until their TTL (the customer "connected", so an agent's reply
    /// makes no notification; an agent still eligible past the grace
    /// period), and an agent gone with this node stays announced online
    /// until another node's housekeeping. poem's graceful shutdown does not
    /// wait for upgraded connections. Resolves at once without WebSockets
    /// or presence checks pending; never before `shutdown`; with agents
    /// connected, no sooner than the presence grace.
    pub async fn closed(&self) {
        self.sockets.wait().await;
    }

    /// Accept identity hashes signed with these per-tenant secrets.
    #[must_use]
    pub fn identity_secrets(mut self, secrets: IdentitySecrets) -> Self {
        self.identity_secrets = secrets;
        self
    }

    /// Where `GET /tickets` reads tickets (without it those routes answer
    /// 503 `unavailable`).
    #[must_use]
    pub fn tickets(mut self, tickets: Arc<dyn TicketDirectory>) -> Self {
        self.tickets = Some(tickets);
        self
    }

    /// Where `GET /customer/notifications` reads notifications (without it
    /// those routes answer 503 `unavailable`).
    #[must_use]
    pub fn notifications(mut self, inbox: Arc<dyn NotificationInbox>) -> Self {
        self.notifications = Some(inbox);
        self
    }

    fn service(
        &self,
        server_url: &str,
    ) -> OpenApiService<(api::AgentApi, customer::CustomerApi), ()> {
        let customer_state = Arc::new(customer::CustomerState {
            authenticator: self.authenticator.clone(),
            visitor_tokens: self.visitor_tokens.clone(),
            identity_secrets: self.identity_secrets.clone(),
            notifications: self.notifications.clone(),
            limits: self.limits.clone(),
            tenants: self.tenants.clone(),
        });
        OpenApiService::new(
            (
                api::AgentApi {
                    chat: self.chat.clone(),
                    tickets: self.tickets.clone(),
                    bus: self.realtime.as_ref().map(|(bus, _)| bus.clone()),
                },
                customer::CustomerApi {
                    chat: self.chat.clone(),
                    state: customer_state,
                },
            ),
            "livechat",
            env!("CARGO_PKG_VERSION"),
        )
        .description(
            "Multi-tenant live chat. Every route needs `X-Tenant-ID: <positive integer>`. \
             Agent routes need `Authorization: Bearer <token>` with the SUPPORT_AGENT role; \
             customer routes take a host Bearer token or `Authorization: Visitor <token>`. \
             Errors are `{\"error\": {\"code\", \"message\"}}`.",
        )
        .server(server_url)
    }

    /// The routes as one endpoint, to nest at `/livechat`. Every error it
    /// returns is in the JSON envelope; bodies over 64 KiB get 413.
    pub fn endpoint(&self) -> impl Endpoint<Output = Response> + use<> {
        let state = Arc::new(api::AuthState {
            authenticator: self.authenticator.clone(),
        });
        let mut routes = poem::Route::new();
        if let Some((bus, config)) = &self.realtime {
            let gateway = Arc::new(ws::Gateway {
                chat: self.chat.clone(),
                bus: bus.clone(),
                authenticator: self.authenticator.clone(),
                visitor_tokens: self.visitor_tokens.clone(),
                config: config.clone(),
                shutdown: self.shutdown.subscribe(),
                sockets: self.sockets.clone(),
                fanout: std::sync::OnceLock::new(),
                limits: self.limits.clone(),
                renewals: renewals::Renewals::default(),
                slots: slots::ConnectionSlots::new(config.max_connections_per_user),
            });
            routes = routes.at("/ws", poem::get(ws::ws_endpoint).data(gateway));
        }
        Outer {
            routes: routes.nest("/", self.service("/livechat").into_endpoint()),
            state,
            allowed: Arc::new(AllowedMethods::new(&self.spec_json(""))),
        }
    }

    /// `GET` endpoint serving the OpenAPI document (JSON), with the routes
    /// under `server_url` (where the host nested [`Self::endpoint`]).
    pub fn spec_endpoint(&self, server_url: &str) -> impl Endpoint + use<> {
        let spec = self.spec_json(server_url);
        poem::endpoint::make_sync(move |_| {
            Response::builder()
                .content_type("application/json")
                .body(spec.clone())
        })
    }

    /// Swagger UI for the routes under `server_url` (with `GET /ws` when
    /// the gateway is enabled, as in [`Self::spec_json`]).
    pub fn swagger_ui(&self, server_url: &str) -> impl Endpoint + use<> {
        let service = self.service(server_url);
        let mut html = service.swagger_ui_html();
        // The page embeds the document verbatim; swap in the completed one.
        let generated = service.spec();
        html = html.replacen(
            &generated,
            &completed(&generated, self.realtime.is_some()),
            1,
        );
        poem::endpoint::make_sync(move |_| poem::web::Html(html.clone()))
    }

    /// The OpenAPI document as JSON text: every operation lists the
    /// `X-Tenant-ID` header, and the customer routes their `Authorization`
    /// (the `CustomerAuth` scheme: `Bearer` or `Visitor`, optional when a
    /// chat is started with a `browser_uuid`), which the routes read
    /// themselves. With the gateway enabled ([`Self::realtime`]) it also
    /// lists `GET /ws` (the upgrade, its headers and its error answers;
    /// the frames are in the README).
    #[must_use]
    pub fn spec_json(&self, server_url: &str) -> String {
        completed(&self.service(server_url).spec(), self.realtime.is_some())
    }
}

/// Marks the optional properties of an object `schema` `nullable`
/// (OpenAPI 3.0): each is an `Option` in Rust, which the API mostly
/// writes as `null` (`"agent_id": null` while a chat waits; those marked
/// `skip_serializing_if_is_none` are left out instead) and accepts as
/// `null` in a body, while poem-openapi only leaves it out of
/// `required`, so a client generated from the document would refuse the
/// `null`s it receives. A property that is a bare `$ref` is wrapped in
/// `allOf`, since OpenAPI 3.0 ignores the siblings of a `$ref`.
fn mark_nullable(schema: &mut serde_json::Value) {
    let required: Vec<String> = schema["required"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    for (name, property) in properties.iter_mut() {
        if required.contains(name) {
            continue;
        }
        let Some(object) = property.as_object_mut() else {
            continue;
        };
        if let Some(reference) = object.remove("$ref") {
            object.insert(
                "allOf".to_owned(),
                serde_json::json!([{ "$ref": reference }]),
            );
        }
        object.insert("nullable".to_owned(), serde_json::Value::Bool(true));
    }
}

/// The `X-Tenant-ID` header parameter, as every route reads it.
pub(crate) fn tenant_parameter() -> serde_json::Value {
    serde_json::json!({
        "name": TENANT_HEADER,
        "in": "header",
        "required": true,
        "description": "The tenant the request acts in: a positive integer the credential allows \
            (400 `invalid_tenant` when missing, malformed or given more than once).",
        "schema": {"type": "integer", "format": "int64", "minimum": 1},
    })
}

/// `spec` (the generated OpenAPI document) completed with what the
/// routes read from the request themselves, which poem-openapi cannot
/// see: the `X-Tenant-ID` header on every operation and the customer
/// routes' credential (`CustomerAuth`); with `ws`, the path item of
/// `GET /ws` too. Every optional property of a schema is marked
/// `nullable` ([`mark_nullable`]). `spec` unchanged if it does not parse
/// (it always does: poem-openapi printed it).
fn completed(spec: &str, ws: bool) -> String {
    use serde_json::{Value, json};
    let Ok(mut document) = serde_json::from_str::<Value>(spec) else {
        return spec.to_owned();
    };
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.values_mut().for_each(mark_nullable);
    }
    // The envelope every route's errors carry.
    let error_content = document
        .pointer("/paths/~1sessions/post/responses/401/content")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(schemes) = document
        .as_object_mut()
        .map(|d| d.entry("components").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
        .map(|c| c.entry("securitySchemes").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
    {
        schemes.insert(
            CUSTOMER_AUTH.to_owned(),
            json!({
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "`Bearer <host token>` (an identified host user) or \
                    `Visitor <visitor token>` (from the chat start of an anonymous visitor).",
            }),
        );
    }
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return spec.to_owned();
    };
    for (path, item) in paths.iter_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in operations.iter_mut() {
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            if let Some(parameters) = operation
                .entry("parameters")
                .or_insert_with(|| json!([]))
                .as_array_mut()
                && !parameters.iter().any(|p| p["name"] == TENANT_HEADER)
            {
                parameters.insert(0, tenant_parameter());
            }
            // Every operation shares the error responses of `ApiError`;
            // those a read never answers are left out: nothing to conflict
            // with (but a ticket whose opening is still in the outbox:
            // 409 `ticket_pending`), and the availability flag needs no
            // credential and reads no row. (413 stays: any request's body
            // is checked.) Only a customer's start and message are rate
            // limited (429).
            if let Some(responses) = operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
            {
                let never: &[&str] = match (path.as_str(), method.as_str()) {
                    ("/customer/availability", _) => &["401", "403", "404", "409", "429"],
                    ("/customer/chats" | "/customer/chats/{id}/messages", "post") => &[],
                    ("/tickets/{id}", "get") => &["429"],
                    (_, "get") => &["409", "429"],
                    _ => &["429"],
                };
                for status in never {
                    responses.remove(*status);
                }
            }
            if path.starts_with("/customer/") && path != "/customer/availability" {
                // Starting a chat may identify the visitor by its
                // `browser_uuid` alone: the credential is optional there.
                let security = if path == "/customer/chats" && method == "post" {
                    json!([{CUSTOMER_AUTH: []}, {}])
                } else {
                    json!([{CUSTOMER_AUTH: []}])
                };
                operation.insert("security".to_owned(), security);
            }
        }
    }
    if ws {
        paths.insert("/ws".to_owned(), ws::openapi_path_item(&error_content));
    }
    serde_json::to_string_pretty(&document).unwrap_or_else(|_| spec.to_owned())
}

/// The OpenAPI security scheme of the customer routes' `Authorization`.
const CUSTOMER_AUTH: &str = "CustomerAuth";

/// The outer layer of [`Livechat::endpoint`]: puts the authentication
/// state in the request, reads the body within [`MAX_BODY_BYTES`],
/// refuses a query parameter given twice or not UTF-8
/// ([`error::check_query`]), calls
/// the routes, renders every error in the JSON envelope ([`envelope`])
/// and marks every answer `Cache-Control: no-store`: chats, tickets and
/// presence are private and change by the second, so no browser or proxy
/// cache may keep or replay them (README "Routes").
/// One layer rather than poem's three (`data`, `around`,
/// `catch_all_error`): each layer moves the request and the future of the
/// layers inside it, and those moves were 6–7% of the server's CPU at 64
/// senders (issue #5 profile; with this layer 5.4–6%). The body's read
/// is boxed: its future (about 4 KiB, mostly poem's body collector)
/// would otherwise be part of this layer's and be copied by every layer
/// of the host's above it, on every request (6.3% → 4.7% of the CPU in
/// moves, BENCHMARKS.md "A profile on the machine of 2026-12-05").
struct Outer<E> {
    routes: E,
    state: Arc<api::AuthState>,
    allowed: Arc<AllowedMethods>,
}

impl<E: Endpoint> Endpoint for Outer<E> {
    type Output = Response;

    async fn call(&self, mut req: poem::Request) -> poem::Result<Response> {
        req.extensions_mut().insert(self.state.clone());
        let mut response = if let Err(refused) = Box::pin(error::read_body(&mut req)).await {
            poem::IntoResponse::into_response(refused)
        } else if let Err(refused) = error::check_query(&req) {
            poem::IntoResponse::into_response(refused)
        } else {
            // Kept for a 405's `Allow`: its bytes are shared, not copied
            // (after poem's nesting, sharing them allocates a small header).
            let uri = req.uri().clone();
            match self.routes.call(req).await {
                Ok(response) => poem::IntoResponse::into_response(response),
                Err(err) => {
                    let wrong_method = err.is::<poem::error::MethodNotAllowedError>();
                    let mut response = envelope(err).await;
                    if wrong_method && let Some(allow) = self.allowed.of(uri).await {
                        response
                            .headers_mut()
                            .insert(poem::http::header::ALLOW, allow);
                    }
                    response
                }
            }
        };
        response.headers_mut().insert(
            poem::http::header::CACHE_CONTROL,
            poem::http::HeaderValue::from_static("no-store"),
        );
        Ok(response)
    }
}

/// The methods each route of [`Livechat::endpoint`] answers, read from
/// the OpenAPI document, for the `Allow` header that a 405 must carry (RFC
/// 9110 §15.5.6: `DELETE /livechat/sessions` answered 405 without it).
/// `HEAD` is listed beside `GET`, which poem answers for it. The paths are
/// matched by a `poem::Route` of their own, so a path matches here exactly
/// when it matches a route.
struct AllowedMethods(poem::Route);

impl AllowedMethods {
    /// From `spec`, the document of [`Livechat::spec_json`] (paths relative
    /// to the routes' root, `{id}` for a path parameter).
    fn new(spec: &str) -> Self {
        let document: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let mut route = poem::Route::new();
        for (path, item) in document["paths"].as_object().into_iter().flatten() {
            let mut methods: Vec<String> = item
                .as_object()
                .into_iter()
                .flatten()
                .map(|(method, _)| method.to_ascii_uppercase())
                .filter(|method| poem::http::Method::from_bytes(method.as_bytes()).is_ok())
                .collect();
            if methods.iter().any(|m| m == "GET") {
                methods.push("HEAD".to_owned());
            }
            let Ok(allow) = poem::http::HeaderValue::from_str(&methods.join(", ")) else {
                continue;
            };
            // `{id}` in the document, `:id` in poem's routes.
            let pattern = path.replace('{', ":").replace('}', "");
            route = route.at(
                pattern,
                poem::endpoint::make_sync(move |_| {
                    let mut response = Response::default();
                    response
                        .headers_mut()
                        .insert(poem::http::header::ALLOW, allow.clone());
                    response
                }),
            );
        }
        Self(route)
    }

    /// The `Allow` value of the route `uri`'s path matches, if any.
    async fn of(&self, uri: poem::http::Uri) -> Option<poem::http::HeaderValue> {
        let request = poem::Request::builder().uri(uri).finish();
        let response = self.0.call(request).await.ok()?;
        response.headers().get(poem::http::header::ALLOW).cloned()
    }
}
