//! The example host: a small SaaS backend with its own users, tenants and
//! login, that mounts the livechat routes under `/livechat`.
//!
//! Routes: `POST /auth/login`, `GET /health`, `GET /openapi.json`, Swagger UI
//! at `/docs`, and the library under `/livechat`.
//!
//! Configuration (environment):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `LIVECHAT_ADDR` | `127.0.0.1:8080` | listen address |
//! | `DATABASE_URL` | `sqlite://livechat.db?mode=rwc` | SQLite file (created on first run) or `postgres://…` |
//! | `LIVECHAT_JWT_SECRET` | a development secret (logged as a warning) | HS256 secret shared by login and the library; set but blank: refused |
//! | `LIVECHAT_VISITOR_SECRET` | a development secret (logged as a warning) | signs the library's visitor tokens; the same on every node; set but blank: refused |
//! | `LIVECHAT_IDENTITY_SECRETS` | none | per-tenant identity-hash secrets, `1:secret,2:other` (an empty secret is refused) |
//! | `LIVECHAT_AGENT_CAPACITY` | `5` | default maximum OPEN sessions per agent |
//! | `LIVECHAT_WEBHOOK_URL` | none | also deliver tickets and notifications as signed webhooks (an `http://` or `https://` URL) |
//! | `LIVECHAT_WEBHOOK_SECRET` | none (required with the URL) | HMAC secret of the webhook signature |
//! | `LIVECHAT_PRESENCE_TTL_SECS` | `60` | an agent without a heartbeat (WebSocket ping, status change or heartbeat call) for this long is not eligible; this and the two below are 1–86,400 seconds |
//! | `LIVECHAT_PING_INTERVAL_SECS` | `20` | WebSocket ping interval; below the presence TTL |
//! | `LIVECHAT_PRESENCE_GRACE_SECS` | `10` | how long an agent whose last connection closed stays eligible; at most `LIVECHAT_PRESENCE_TTL_SECS` minus `LIVECHAT_PING_INTERVAL_SECS` |
//! | `LIVECHAT_HAND_BACK_AFTER_SECS` | `120` | how long an agent may be gone (announced offline without choosing `offline`) before housekeeping hands their customer chats to other agents; 1–86,400 seconds, or `off` to leave the chats with them |
//! | `LIVECHAT_CORS_ORIGINS` | none | comma list of browser origins allowed for HTTP (CORS) and WebSocket; `*` allows any |
//! | `LIVECHAT_CORS_CREDENTIALS` | `false` | send `Access-Control-Allow-Credentials: true` |
//! | `REDIS_URL` | none (single node) | Redis for cross-node fan-out, e.g. `redis://127.0.0.1:6379` |
//! | `LIVECHAT_REDIS_CHANNEL` | `livechat:events` | the pub/sub channel of this deployment's nodes; deployments sharing a Redis server each need their own (pub/sub ignores the database number) |
//! | `LIVECHAT_WS_SEND_RATE` | `10` | `send_message` frames per second per WebSocket (burst twice that) |
//! | `LIVECHAT_WS_MAX_PER_USER` | `50` | live WebSockets one agent or customer may hold in a tenant on this node; `0`: no cap |
//! | `LIVECHAT_CHAT_START_RATE` | `10` | customer chat starts per minute per client address and tenant (burst twice that); `0`: unlimited |
//! | `LIVECHAT_CUSTOMER_SEND_RATE` | `10` | a customer's messages per second, over HTTP and their WebSockets together (burst twice that); `0`: unlimited |
//! | `LIVECHAT_CLIENT_IP_HEADER` | none: the peer address | the header your reverse proxy sets to the client's address (`X-Real-IP`, or `X-Forwarded-For`: its last address) |
//! | `LIVECHAT_SQLITE_SYNCHRONOUS` | `full` | SQLite commit durability: `full` (a 201 means on disk) or `normal` |
//! | `LIVECHAT_OUTBOX_RETENTION_DAYS` | `7` | housekeeping deletes outbox events settled for every sink (delivered, or failed for good) once they are this old; 1–3,650 days, or `off` to keep them all |
//! | `LIVECHAT_CHAT_TENANTS` | `host` | which tenants customers may start chats in and read availability of: `host`, those of the host's `host_tenants` table (others: 400 `invalid_tenant`); `any`, every tenant id a client names |
//!
//! Tickets and notifications are materialized by the ticket bridge's
//! dispatcher, which runs next to the HTTP server with the default SeaORM
//! sinks (and the webhook sink when configured).
//! Demo data (seeded idempotently): tenants 1 and 2; `admin@livechat.com`
//! (user 1, roles `ADMIN` and `SUPPORT_AGENT`, every tenant) and
//! `agent1@livechat.com` … `agent5@livechat.com` (users 2–6,
//! `SUPPORT_AGENT`, tenants 1 and 2), all with password `password`.

use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use livechat_core::bus::{EventBus, InProcessBus};
use livechat_core::store::{self, Migrator, SeaOrmStore};
use livechat_core::{ChatConfig, ChatService};
use livechat_poem::{
    IdentitySecrets, JwtAuthenticator, Livechat, RateLimits, RealtimeConfig, envelope,
};
use livechat_ticket_bridge::{
    BridgeMigrator, Dispatcher, DispatcherConfig, SeaOrmSinks, Url, WebhookSink,
};
use poem::http::StatusCode;
use poem::listener::{Listener, TcpListener};
use poem::middleware::{Cors, Tracing};
use poem::web::{Data, Json};
use poem::{Endpoint, EndpointExt, IntoResponse, Response, Route, Server, get, handler, post};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    Schema,
};
use sea_orm_migration::MigratorTrait;
use serde::{Deserialize, Serialize};

/// The secret used when `LIVECHAT_JWT_SECRET` is unset. Development only.
pub const DEV_JWT_SECRET: &str = "livechat-development-secret-change-me";

/// The secret used when `LIVECHAT_VISITOR_SECRET` is unset. Development only.
pub const DEV_VISITOR_SECRET: &str = "livechat-development-visitor-secret-change-me";

/// How long a login token is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 60 * 60);

/// Settings read from the environment. Its `Debug` leaves the secrets
/// out (the two signing secrets, the webhook's, and the passwords of the
/// database and Redis URLs).
#[derive(Clone)]
pub struct Config {
    /// `LIVECHAT_ADDR`.
    pub addr: String,
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `LIVECHAT_JWT_SECRET`.
    pub jwt_secret: String,
    /// Whether [`DEV_JWT_SECRET`] is in use.
    pub jwt_secret_is_default: bool,
    /// `LIVECHAT_VISITOR_SECRET`.
    pub visitor_secret: String,
    /// `LIVECHAT_IDENTITY_SECRETS`, parsed.
    pub identity_secrets: IdentitySecrets,
    /// `LIVECHAT_AGENT_CAPACITY`.
    pub agent_capacity: i64,
    /// `LIVECHAT_WEBHOOK_URL` and `LIVECHAT_WEBHOOK_SECRET`.
    pub webhook: Option<(Url, String)>,
    /// `LIVECHAT_PRESENCE_TTL_SECS`.
    pub presence_ttl: Duration,
    /// `LIVECHAT_PING_INTERVAL_SECS`.
    pub ping_interval: Duration,
    /// `LIVECHAT_PRESENCE_GRACE_SECS`.
    pub presence_grace: Duration,
    /// `LIVECHAT_HAND_BACK_AFTER_SECS` (`off`: `None`).
    pub hand_back_after: Option<Duration>,
    /// `LIVECHAT_OUTBOX_RETENTION_DAYS` (`off`: `None`).
    pub outbox_retention: Option<Duration>,
    /// `LIVECHAT_CORS_ORIGINS`.
    pub cors_origins: Vec<String>,
    /// `LIVECHAT_CORS_CREDENTIALS`.
    pub cors_credentials: bool,
    /// `REDIS_URL`.
    pub redis_url: Option<String>,
    /// `LIVECHAT_REDIS_CHANNEL`: the pub/sub channel the nodes of this
    /// deployment share ([`livechat_core::redis_bus::DEFAULT_CHANNEL`] by
    /// default). Deployments sharing one Redis server need channels of
    /// their own: pub/sub ignores the URL's database number.
    pub redis_channel: String,
    /// `LIVECHAT_SQLITE_SYNCHRONOUS` (`full` or `normal`).
    pub sqlite_durability: store::SqliteDurability,
    /// `LIVECHAT_WS_SEND_RATE`: `send_message` frames per second per connection.
    pub ws_send_rate: u32,
    /// `LIVECHAT_WS_MAX_PER_USER`: live WebSockets per agent or customer
    /// in a tenant on this node (`0`: no cap).
    pub ws_max_per_user: usize,
    /// `LIVECHAT_CHAT_START_RATE`, `LIVECHAT_CUSTOMER_SEND_RATE` and
    /// `LIVECHAT_CLIENT_IP_HEADER`: the customer routes' limits.
    pub rate_limits: RateLimits,
    /// `LIVECHAT_CHAT_TENANTS` (`host` or `any`).
    pub chat_tenants: ChatTenants,
}

/// Which tenants offer live chat to customers (`LIVECHAT_CHAT_TENANTS`):
/// what the example answers [`livechat_poem::Livechat::tenants`] with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChatTenants {
    /// The tenants of the host's own `host_tenants` table (default): a
    /// customer naming another in `X-Tenant-ID` gets 400
    /// `invalid_tenant` at a chat start or an availability read, before
    /// anything is stored. Each such request reads the table once (a
    /// primary-key lookup); when it cannot be read, 503 `unavailable`.
    #[default]
    Host,
    /// Every tenant id a client names (the library without a directory).
    Any,
}

/// [`ChatTenants::Host`]: a tenant offers chat when the host's
/// `host_tenants` table has it.
struct HostTenants {
    db: DatabaseConnection,
}

#[async_trait::async_trait]
impl livechat_poem::TenantDirectory for HostTenants {
    async fn offers_chat(&self, tenant: livechat_core::TenantId) -> Result<bool, String> {
        host::tenant::Entity::find_by_id(tenant.get())
            .one(&self.db)
            .await
            .map(|found| found.is_some())
            .map_err(|e| format!("reading the host's tenants failed: {e}"))
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("database_url", &redact(&self.database_url))
            .field("jwt_secret", &"***")
            .field("jwt_secret_is_default", &self.jwt_secret_is_default)
            .field("visitor_secret", &"***")
            .field("identity_secrets", &self.identity_secrets)
            .field("agent_capacity", &self.agent_capacity)
            .field(
                "webhook",
                &self
                    .webhook
                    .as_ref()
                    .map(|(url, _)| url.origin().ascii_serialization()),
            )
            .field("presence_ttl", &self.presence_ttl)
            .field("ping_interval", &self.ping_interval)
            .field("presence_grace", &self.presence_grace)
            .field("hand_back_after", &self.hand_back_after)
            .field("outbox_retention", &self.outbox_retention)
            .field("cors_origins", &self.cors_origins)
            .field("cors_credentials", &self.cors_credentials)
            .field("redis_url", &self.redis_url.as_deref().map(redact))
            .field("sqlite_durability", &self.sqlite_durability)
            .field("ws_send_rate", &self.ws_send_rate)
            .field("ws_max_per_user", &self.ws_max_per_user)
            .field("rate_limits", &self.rate_limits)
            .field("chat_tenants", &self.chat_tenants)
            .finish()
    }
}

impl Config {
    /// Settings for an app on `database_url` with the given JWT secret and
    /// defaults elsewhere (tests, embedding).
    #[must_use]
    pub fn new(database_url: &str, jwt_secret: &str) -> Self {
        Self {
            addr: "127.0.0.1:0".into(),
            database_url: database_url.into(),
            jwt_secret: jwt_secret.into(),
            jwt_secret_is_default: false,
            visitor_secret: format!("{jwt_secret}-visitor"),
            identity_secrets: IdentitySecrets::new(),
            agent_capacity: 5,
            webhook: None,
            presence_ttl: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            presence_grace: Duration::from_secs(10),
            hand_back_after: Some(Duration::from_secs(120)),
            outbox_retention: Some(Duration::from_secs(7 * 86_400)),
            cors_origins: Vec::new(),
            cors_credentials: false,
            redis_url: None,
            redis_channel: livechat_core::redis_bus::DEFAULT_CHANNEL.to_owned(),
            sqlite_durability: store::SqliteDurability::Full,
            ws_send_rate: 10,
            ws_max_per_user: RealtimeConfig::default().max_connections_per_user,
            rate_limits: RateLimits::default(),
            chat_tenants: ChatTenants::Host,
        }
    }

    /// The gateway settings these values give.
    #[must_use]
    pub fn realtime(&self) -> RealtimeConfig {
        RealtimeConfig {
            ping_interval: self.ping_interval,
            connection_ttl: self.presence_ttl,
            presence_grace: self.presence_grace,
            allowed_origins: self.cors_origins.clone(),
            send_rate_per_sec: self.ws_send_rate,
            max_connections_per_user: self.ws_max_per_user,
            ..RealtimeConfig::default()
        }
    }
}

/// Longest presence TTL, grace or ping interval accepted, in seconds (a
/// day): longer ones are configuration mistakes.
const MAX_SECS: u64 = 86_400;

/// A rate from `value` (`name`'s): a whole number, `0` for unlimited;
/// `default` when unset.
fn rate(name: &str, value: Option<String>, default: u32) -> Result<u32, String> {
    value.map_or(Ok(default), |v| {
        v.trim()
            .parse()
            .map_err(|_| format!("{name} must be a whole number (0: unlimited)"))
    })
}

fn secs(name: &str, value: Option<String>, default: u64) -> Result<Duration, String> {
    match value {
        None => Ok(Duration::from_secs(default)),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=MAX_SECS).contains(n))
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{name} must be 1-{MAX_SECS} seconds")),
    }
}

impl Config {
    /// Reads the variables of the table in the crate docs.
    ///
    /// # Errors
    /// A message naming a malformed variable.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`Self::from_env`], reading each variable with `lookup`.
    ///
    /// # Errors
    /// A message naming a malformed variable.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        // A secret set but blank is a template's unfilled variable, not a
        // request for the public development secret (one node of several
        // would accept tokens anyone can sign).
        for name in ["LIVECHAT_JWT_SECRET", "LIVECHAT_VISITOR_SECRET"] {
            if lookup(name).is_some_and(|v| v.trim().is_empty()) {
                return Err(format!("{name} is set but empty"));
            }
        }
        let secret = var("LIVECHAT_JWT_SECRET");
        let webhook = match (var("LIVECHAT_WEBHOOK_URL"), var("LIVECHAT_WEBHOOK_SECRET")) {
            (None, _) => None,
            (Some(_), None) => {
                return Err("LIVECHAT_WEBHOOK_URL needs LIVECHAT_WEBHOOK_SECRET".into());
            }
            (Some(url), Some(secret)) => {
                let url = Url::parse(&url).map_err(|e| format!("LIVECHAT_WEBHOOK_URL: {e}"))?;
                // `localhost:9000/hook` parses, with the scheme `localhost`.
                if !matches!(url.scheme(), "http" | "https") {
                    return Err("LIVECHAT_WEBHOOK_URL must be an http:// or https:// URL".into());
                }
                Some((url, secret))
            }
        };
        let config = Self {
            addr: match var("LIVECHAT_ADDR") {
                None => "127.0.0.1:8080".into(),
                // A host (a name or an address) and a port: refused here,
                // with the other settings, not after the migrations.
                Some(addr)
                    if addr.trim().rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok()
                    }) =>
                {
                    addr.trim().to_owned()
                }
                Some(_) => {
                    return Err(
                        "LIVECHAT_ADDR must be a host and a port, e.g. 127.0.0.1:8080".into(),
                    );
                }
            },
            database_url: var("DATABASE_URL")
                .unwrap_or_else(|| "sqlite://livechat.db?mode=rwc".into()),
            jwt_secret_is_default: secret.is_none(),
            jwt_secret: secret.unwrap_or_else(|| DEV_JWT_SECRET.into()),
            visitor_secret: var("LIVECHAT_VISITOR_SECRET")
                .unwrap_or_else(|| DEV_VISITOR_SECRET.into()),
            identity_secrets: var("LIVECHAT_IDENTITY_SECRETS")
                .map(|s| IdentitySecrets::parse(&s))
                .transpose()
                .map_err(|e| format!("LIVECHAT_IDENTITY_SECRETS: {e}"))?
                .unwrap_or_default(),
            agent_capacity: var("LIVECHAT_AGENT_CAPACITY")
                .map(|v| v.parse::<i64>().ok().filter(|n| (1..=100).contains(n)))
                .map(|v| v.ok_or("LIVECHAT_AGENT_CAPACITY must be 1-100"))
                .transpose()?
                .unwrap_or(5),
            webhook,
            presence_ttl: secs(
                "LIVECHAT_PRESENCE_TTL_SECS",
                var("LIVECHAT_PRESENCE_TTL_SECS"),
                60,
            )?,
            ping_interval: secs(
                "LIVECHAT_PING_INTERVAL_SECS",
                var("LIVECHAT_PING_INTERVAL_SECS"),
                20,
            )?,
            presence_grace: secs(
                "LIVECHAT_PRESENCE_GRACE_SECS",
                var("LIVECHAT_PRESENCE_GRACE_SECS"),
                10,
            )?,
            hand_back_after: match var("LIVECHAT_HAND_BACK_AFTER_SECS") {
                Some(v) if v.trim().eq_ignore_ascii_case("off") => None,
                v => Some(secs("LIVECHAT_HAND_BACK_AFTER_SECS", v, 120)?),
            },
            outbox_retention: match var("LIVECHAT_OUTBOX_RETENTION_DAYS") {
                Some(v) if v.trim().eq_ignore_ascii_case("off") => None,
                None => Some(Duration::from_secs(7 * 86_400)),
                Some(v) => Some(
                    v.trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|days| (1..=3_650).contains(days))
                        .map(|days| Duration::from_secs(days * 86_400))
                        .ok_or("LIVECHAT_OUTBOX_RETENTION_DAYS must be 1-3650 days, or off")?,
                ),
            },
            cors_origins: var("LIVECHAT_CORS_ORIGINS")
                .map(|v| {
                    v.split(',')
                        .map(|o| o.trim().to_owned())
                        .filter(|o| !o.is_empty())
                        .map(|o| {
                            // poem's `Cors` panics on an origin that is not
                            // a header value.
                            if o.parse::<poem::http::HeaderValue>().is_ok() {
                                Ok(o)
                            } else {
                                Err(format!(
                                    "LIVECHAT_CORS_ORIGINS: {o:?} is not a valid origin"
                                ))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .unwrap_or_default(),
            cors_credentials: var("LIVECHAT_CORS_CREDENTIALS")
                .is_some_and(|v| v == "true" || v == "1"),
            redis_url: var("REDIS_URL"),
            redis_channel: match var("LIVECHAT_REDIS_CHANNEL") {
                None => livechat_core::redis_bus::DEFAULT_CHANNEL.to_owned(),
                Some(v) if v.trim() != v => {
                    return Err(
                        "LIVECHAT_REDIS_CHANNEL must be a channel name without surrounding spaces"
                            .into(),
                    );
                }
                Some(v) => v,
            },
            sqlite_durability: match var("LIVECHAT_SQLITE_SYNCHRONOUS").as_deref() {
                None | Some("full") => store::SqliteDurability::Full,
                Some("normal") => store::SqliteDurability::Normal,
                Some(_) => return Err("LIVECHAT_SQLITE_SYNCHRONOUS must be full or normal".into()),
            },
            ws_send_rate: match var("LIVECHAT_WS_SEND_RATE") {
                None => 10,
                Some(v) => v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("LIVECHAT_WS_SEND_RATE must be a positive integer")?,
            },
            ws_max_per_user: match var("LIVECHAT_WS_MAX_PER_USER") {
                None => RealtimeConfig::default().max_connections_per_user,
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| "LIVECHAT_WS_MAX_PER_USER must be a whole number (0: no cap)")?,
            },
            rate_limits: RateLimits {
                chat_starts_per_minute: rate(
                    "LIVECHAT_CHAT_START_RATE",
                    var("LIVECHAT_CHAT_START_RATE"),
                    RateLimits::default().chat_starts_per_minute,
                )?,
                customer_messages_per_sec: rate(
                    "LIVECHAT_CUSTOMER_SEND_RATE",
                    var("LIVECHAT_CUSTOMER_SEND_RATE"),
                    RateLimits::default().customer_messages_per_sec,
                )?,
                client_ip_header: var("LIVECHAT_CLIENT_IP_HEADER")
                    .map(|v| {
                        poem::http::HeaderName::from_bytes(v.trim().as_bytes()).map_err(|_| {
                            format!("LIVECHAT_CLIENT_IP_HEADER: {v:?} is not a header name")
                        })
                    })
                    .transpose()?,
            },
            chat_tenants: match var("LIVECHAT_CHAT_TENANTS")
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref()
            {
                None | Some("host") => ChatTenants::Host,
                Some("any") => ChatTenants::Any,
                Some(_) => return Err("LIVECHAT_CHAT_TENANTS must be host or any".into()),
            },
        };
        // The gateway's connection TTL is the presence TTL.
        if config.ping_interval >= config.presence_ttl {
            return Err(
                "LIVECHAT_PING_INTERVAL_SECS must be below LIVECHAT_PRESENCE_TTL_SECS".into(),
            );
        }
        if config.realtime().check().is_err() {
            return Err(
                "LIVECHAT_PRESENCE_GRACE_SECS plus LIVECHAT_PING_INTERVAL_SECS must not exceed \
                 LIVECHAT_PRESENCE_TTL_SECS (the grace would end sooner)"
                    .into(),
            );
        }
        Ok(config)
    }

    /// The chat rules' settings these values give.
    #[must_use]
    pub fn chat_config(&self) -> ChatConfig {
        let mut config = ChatConfig::default();
        config.routing.default_capacity = self.agent_capacity;
        config.routing.presence_ttl = Some(self.presence_ttl);
        config.routing.hand_back_after = self.hand_back_after;
        config
    }
}

/// The host's own tables (not the library's).
mod host {
    pub mod user {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "host_users")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub id: i64,
            #[sea_orm(unique)]
            pub email: String,
            pub password_hash: String,
            /// Comma-separated role names.
            pub roles: String,
            /// Comma-separated tenant ids; empty means every tenant.
            pub tenant_ids: String,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod tenant {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "host_tenants")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub id: i64,
            pub name: String,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }
}

/// Opens the database, runs the library's and the host's migrations, and
/// seeds the demo data (idempotent).
///
/// # Errors
/// Database errors.
pub async fn prepare_database(url: &str) -> Result<DatabaseConnection, sea_orm::DbErr> {
    prepare_database_with(url, store::SqliteDurability::Full).await
}

/// As [`prepare_database`], with SQLite's commit durability.
///
/// # Errors
/// Database errors.
pub async fn prepare_database_with(
    url: &str,
    durability: store::SqliteDurability,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let db = store::connect_with(url, durability).await?;
    Migrator::up(&db, None).await?;
    BridgeMigrator::up(&db, None).await?;
    let schema = Schema::new(db.get_database_backend());
    db.execute(
        schema
            .create_table_from_entity(host::tenant::Entity)
            .if_not_exists(),
    )
    .await?;
    db.execute(
        schema
            .create_table_from_entity(host::user::Entity)
            .if_not_exists(),
    )
    .await?;
    seed(&db).await?;
    Ok(db)
}

async fn seed(db: &DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    for (id, name) in [(1, "Tenant One"), (2, "Tenant Two")] {
        host::tenant::Entity::insert(host::tenant::ActiveModel {
            id: Set(id),
            name: Set(name.into()),
        })
        .on_conflict_do_nothing()
        .exec_without_returning(db)
        .await?;
    }
    let mut users = vec![(
        1,
        "admin@livechat.com".to_owned(),
        "ADMIN,SUPPORT_AGENT",
        "",
    )];
    for n in 1..=5 {
        users.push((
            n + 1,
            format!("agent{n}@livechat.com"),
            "SUPPORT_AGENT",
            "1,2",
        ));
    }
    for (id, email, roles, tenants) in users {
        let exists = host::user::Entity::find_by_id(id).one(db).await?.is_some();
        if exists {
            continue;
        }
        let hash = hash_password("password").map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?;
        host::user::Entity::insert(host::user::ActiveModel {
            id: Set(id),
            email: Set(email),
            password_hash: Set(hash),
            roles: Set(roles.into()),
            tenant_ids: Set(tenants.into()),
        })
        .on_conflict_do_nothing()
        .exec_without_returning(db)
        .await?;
    }
    Ok(())
}

fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Claims of the host's tokens; what [`JwtAuthenticator`] reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: i64,
    /// Role names.
    pub roles: Vec<String>,
    /// Allowed tenants; absent means every tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_ids: Option<Vec<i64>>,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
}

/// Signs an HS256 token for `claims` with `secret`.
///
/// # Errors
/// Only if serialization fails.
pub fn issue_token(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

struct HostState {
    db: DatabaseConnection,
    jwt_secret: String,
    bus: Arc<dyn EventBus>,
}

#[derive(Deserialize)]
struct LoginRequest {
    email: String,
    password: String,
}

#[derive(Serialize)]
struct LoginUser {
    id: i64,
    email: String,
    roles: Vec<String>,
    tenant_ids: Option<Vec<i64>>,
}

#[derive(Serialize)]
struct LoginResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    user: LoginUser,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Largest login body read, in bytes: an e-mail and a password.
const LOGIN_BODY_MAX: usize = 4 * 1024;

/// Most password checks running at once (Argon2, 19 MiB each); further
/// logins wait for one to end.
const CONCURRENT_PASSWORD_CHECKS: usize = 4;

/// The permits of [`CONCURRENT_PASSWORD_CHECKS`].
static PASSWORD_CHECKS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(CONCURRENT_PASSWORD_CHECKS);

/// A hash no password matches in practice, verified when the e-mail is
/// unknown so that the answer takes as long as for a wrong password (no
/// oracle of which accounts exist).
static UNKNOWN_USER_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    hash_password(SaltString::generate(&mut OsRng).as_str()).unwrap_or_default()
});

/// `POST /auth/login`: every answer, the token's above all, is marked
/// `Cache-Control: no-store` (RFC 6749 §5.1), as the library's are.
#[handler]
async fn login(
    state: Data<&Arc<HostState>>,
    headers: &poem::http::HeaderMap,
    body: poem::Body,
) -> Response {
    let mut response = login_answer(&state, headers, body).await;
    response.headers_mut().insert(
        poem::http::header::CACHE_CONTROL,
        poem::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// Whether `headers` give the body as JSON (`application/json` or
/// `application/…+json`, with or without parameters such as `charset`),
/// as the library's routes take it.
fn is_json(headers: &poem::http::HeaderMap) -> bool {
    headers
        .get(poem::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|essence| essence.trim().to_ascii_lowercase())
        .is_some_and(|essence| {
            essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"))
        })
}

async fn login_answer(
    state: &HostState,
    headers: &poem::http::HeaderMap,
    body: poem::Body,
) -> Response {
    // As the library's routes: a body that is not declared JSON is refused
    // (so no HTML form, whose types a page may send to any site, can log
    // in), it is read within a limit (poem's `Json` reads any size), and
    // refusals are in the envelope.
    if !is_json(headers) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "expected Content-Type: application/json",
        );
    }
    let body: LoginRequest = match body.into_bytes_limit(LOGIN_BODY_MAX).await {
        // An object only: serde would also read the fields from an array.
        Ok(bytes) => {
            match serde_json::from_slice::<serde_json::Value>(&bytes).and_then(
                |value| match value {
                    serde_json::Value::Object(_) => serde_json::from_value(value),
                    _ => Err(serde::de::Error::custom("not an object")),
                },
            ) {
                Ok(body) => body,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_body",
                        &format!("expected {{\"email\", \"password\"}}: {e}"),
                    );
                }
            }
        }
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("request body is larger than {LOGIN_BODY_MAX} bytes"),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_body", &e.to_string()),
    };
    let invalid = || {
        error(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong e-mail or password",
        )
    };
    let user = match host::user::Entity::find()
        .filter(host::user::Column::Email.eq(body.email.trim().to_lowercase()))
        .one(&state.db)
        .await
    {
        Ok(user) => user,
        Err(err) => {
            tracing::error!(error = %err, "login lookup failed");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "database unavailable",
            );
        }
    };
    // An unknown e-mail is checked against a hash no password matches,
    // so that it takes as long as a wrong password.
    let password = body.password.clone();
    let hash = user
        .as_ref()
        .map_or_else(|| UNKNOWN_USER_HASH.clone(), |u| u.password_hash.clone());
    // Each check holds Argon2's 19 MiB: a flood of logins waits here
    // instead of taking a blocking thread (and its memory) each, up to
    // tokio's 512 (~9.5 GiB).
    let Ok(_permit) = PASSWORD_CHECKS.acquire().await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "server stopping",
        );
    };
    let verified = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false);
    let Some(user) = user.filter(|_| verified) else {
        return invalid();
    };
    let roles: Vec<String> = user
        .roles
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    let tenant_ids: Option<Vec<i64>> = (!user.tenant_ids.is_empty()).then(|| {
        user.tenant_ids
            .split(',')
            .filter_map(|t| t.parse().ok())
            .collect()
    });
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: user.id,
        roles: roles.clone(),
        tenant_ids: tenant_ids.clone(),
        iat: now,
        exp: now + i64::try_from(TOKEN_TTL.as_secs()).unwrap_or(i64::MAX),
    };
    match issue_token(&state.jwt_secret, &claims) {
        Ok(token) => Json(LoginResponse {
            access_token: token,
            token_type: "Bearer",
            expires_in: TOKEN_TTL.as_secs(),
            user: LoginUser {
                id: user.id,
                email: user.email,
                roles,
                tenant_ids,
            },
        })
        .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "token signing failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            )
        }
    }
}

/// How long `/health` waits for the database's answer before it reports it
/// unreachable.
const HEALTH_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[handler]
async fn health(state: Data<&Arc<HostState>>) -> Response {
    let bus = if state.bus.is_degraded() {
        "degraded"
    } else {
        "ok"
    };
    // A load balancer's check has a short deadline of its own: while the
    // database is down the pool keeps trying to connect, so the ping is
    // bounded here rather than by the pool's acquire timeout.
    let ping = tokio::time::timeout(HEALTH_PING_TIMEOUT, state.db.ping())
        .await
        .unwrap_or_else(|_| Err(sea_orm::DbErr::Custom("no answer within 2 s".into())));
    match ping {
        Ok(()) if bus == "ok" => {
            Json(serde_json::json!({"status": "ok", "database": "ok", "bus": bus})).into_response()
        }
        Ok(()) => Json(serde_json::json!({"status": "degraded", "database": "ok", "bus": bus}))
            .into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "health: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"status": "degraded", "database": "unreachable", "bus": bus})),
            )
                .into_response()
        }
    }
}

/// The ticket bridge's dispatcher over `db`: the default SeaORM sinks, and
/// the webhook sink when configured.
#[must_use]
pub fn dispatcher(db: DatabaseConnection, config: &Config) -> Dispatcher<SeaOrmStore> {
    let tables = Arc::new(SeaOrmSinks::new(db.clone()));
    let mut dispatcher = Dispatcher::new(SeaOrmStore::new(db), DispatcherConfig::default())
        .ticket_sink(tables.clone())
        .notification_sink(tables);
    if let Some((url, secret)) = &config.webhook {
        let webhook = Arc::new(WebhookSink::new(url.clone(), secret.as_bytes().to_vec()));
        dispatcher = dispatcher
            .ticket_sink(webhook.clone())
            .notification_sink(webhook);
    }
    dispatcher
}

/// The host app and the handle of its livechat module.
pub struct HostApp {
    /// Every route of the host, livechat under `/livechat`.
    pub endpoint: poem::endpoint::BoxEndpoint<'static, Response>,
    /// The livechat module (for [`Livechat::shutdown`]).
    pub livechat: Livechat,
    /// The event bus the module publishes on.
    pub bus: Arc<dyn EventBus>,
    /// The ticket bridge's dispatcher over the same database
    /// ([`dispatcher`]); the store writes the events it ignores already
    /// settled (its outbox interest), so it must be the one that runs
    /// ([`Dispatcher::run`]; [`run`] does).
    pub dispatcher: Dispatcher<SeaOrmStore>,
}

/// The whole host app over an open, migrated database, on a fresh
/// in-process bus (one node).
pub fn app(
    db: DatabaseConnection,
    config: &Config,
) -> poem::endpoint::BoxEndpoint<'static, Response> {
    build(db, config, Arc::new(InProcessBus::new())).endpoint
}

/// The whole host app over an open, migrated database and `bus`.
pub fn build(db: DatabaseConnection, config: &Config, bus: Arc<dyn EventBus>) -> HostApp {
    build_with(db, config, bus, config.realtime())
}

/// `endpoint`, whose 405 for a method it does not take names the methods
/// it does in `Allow` (RFC 9110 §15.5.6), in the JSON envelope, as the
/// library's routes answer.
fn allowing(endpoint: impl Endpoint + 'static, allow: &'static str) -> impl Endpoint {
    endpoint.catch_error(move |err: poem::error::MethodNotAllowedError| async move {
        let mut response = envelope(err.into()).await;
        response.headers_mut().insert(
            poem::http::header::ALLOW,
            poem::http::HeaderValue::from_static(allow),
        );
        response
    })
}

/// As [`build`], with explicit WebSocket gateway settings.
pub fn build_with(
    db: DatabaseConnection,
    config: &Config,
    bus: Arc<dyn EventBus>,
    realtime: RealtimeConfig,
) -> HostApp {
    // Events the ticket bridge does not act on are written settled: this
    // dispatcher never reads them.
    let dispatcher = dispatcher(db.clone(), config);
    let store = SeaOrmStore::new(db.clone())
        .with_bus(bus.clone())
        .with_outbox_interest(dispatcher.outbox_interest());
    let chat = ChatService::new(store, config.chat_config());
    let tables = Arc::new(SeaOrmSinks::new(db.clone()));
    let livechat = Livechat::new(
        chat,
        Arc::new(JwtAuthenticator::hs256(config.jwt_secret.as_bytes())),
        config.visitor_secret.as_bytes(),
    )
    .identity_secrets(config.identity_secrets.clone())
    .rate_limits(config.rate_limits.clone())
    .tickets(tables.clone())
    .notifications(tables)
    .realtime(bus.clone(), realtime);
    let livechat = match config.chat_tenants {
        ChatTenants::Host => livechat.tenants(Arc::new(HostTenants { db: db.clone() })),
        ChatTenants::Any => livechat,
    };
    let state = Arc::new(HostState {
        db,
        jwt_secret: config.jwt_secret.clone(),
        bus: bus.clone(),
    });
    // Made now, not at the first unknown e-mail, whose answer would take
    // longer than the others' (`login`).
    std::sync::LazyLock::force(&UNKNOWN_USER_HASH);
    let host_routes = Route::new()
        .at("/auth/login", allowing(post(login), "POST"))
        .at("/health", allowing(get(health), "GET, HEAD"))
        .data(state)
        .catch_all_error(envelope);
    let routes = Route::new()
        .nest("/livechat", livechat.endpoint())
        .at("/openapi.json", livechat.spec_endpoint("/livechat"))
        .nest("/docs", livechat.swagger_ui("/livechat"))
        .nest("/", host_routes);
    let endpoint = if config.cors_origins.is_empty() {
        // This route decodes the path before it reaches `livechat` or the
        // host's routes: a path that does not decode (`%ff`) is refused
        // here, in the envelope too.
        routes
            .catch_all_error(envelope)
            .with(Tracing)
            .map_to_response()
            .boxed()
    } else {
        // A 429's `Retry-After` is not a header page script may read
        // unless the answer exposes it.
        let mut cors = Cors::new()
            .allow_credentials(config.cors_credentials)
            .expose_header("Retry-After");
        if !config.cors_origins.iter().any(|o| o == "*") {
            // Compared without regard to case, as the WebSocket route does;
            // a predicate also makes poem add `Vary: Origin`, which its
            // exact list leaves out (a cache must not serve one origin's
            // answer to another).
            let allowed = config.cors_origins.clone();
            cors = cors.allow_origins_fn(move |origin| {
                allowed
                    .iter()
                    .any(|o| livechat_poem::same_origin(o, origin))
            });
        }
        // The middleware's own refusal (403, origin not allowed) gets the
        // JSON envelope too (DESIGN.md: every 4xx).
        routes
            .with(cors)
            .catch_all_error(envelope)
            .with(Tracing)
            .map_to_response()
            .after(|response| async move { response.map(vary_on_origin) })
            .boxed()
    };
    HostApp {
        endpoint,
        livechat,
        bus,
        dispatcher,
    }
}

/// Marks `response` as depending on the request's `Origin` (`Vary`), and a
/// preflight's also on the method and headers it asked for, which it
/// echoes. With CORS on, every answer depends on them: with `Origin` it
/// carries `Access-Control-Allow-Origin` or is refused, without it carries
/// neither, so no cache may give one origin's answer to another. poem's
/// middleware marks only the answers to listed origins, and neither its
/// preflights nor the answers to requests without `Origin`.
fn vary_on_origin(mut response: Response) -> Response {
    use poem::http::HeaderValue;
    use poem::http::header::{ACCESS_CONTROL_ALLOW_METHODS, VARY};
    // poem's middleware sets `Vary: Origin` on the answers it marks, and
    // no `Vary` on preflights.
    let varies = response.headers().get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|n| n.trim().eq_ignore_ascii_case("origin"))
        })
    });
    if !varies {
        let value = if response
            .headers()
            .contains_key(ACCESS_CONTROL_ALLOW_METHODS)
        {
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        } else {
            "Origin"
        };
        response
            .headers_mut()
            .append(VARY, HeaderValue::from_static(value));
    }
    response
}

/// Runs the server until SIGINT or SIGTERM, then drains in-flight requests
/// (up to 10 s).
///
/// # Errors
/// Database set-up or listener failures.
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if config.jwt_secret_is_default {
        tracing::warn!(
            "LIVECHAT_JWT_SECRET is not set: using the development secret; never do this in production"
        );
    }
    if config.visitor_secret == DEV_VISITOR_SECRET {
        tracing::warn!(
            "LIVECHAT_VISITOR_SECRET is not set: using the development secret; never do this in production"
        );
    }
    let db = prepare_database_with(&config.database_url, config.sqlite_durability).await?;
    tracing::info!(addr = %config.addr, database = %redact(&config.database_url), "livechat example server starting");
    let redis = match &config.redis_url {
        None => None,
        Some(url) => {
            let bus =
                livechat_core::redis_bus::RedisBus::connect(url, config.redis_channel.as_str())
                    .await?;
            tracing::info!(node = %bus.node_id(), channel = %config.redis_channel, "event bus: Redis");
            Some(bus)
        }
    };
    let bus: Arc<dyn EventBus> = match &redis {
        None => Arc::new(InProcessBus::new()),
        Some(bus) => Arc::new(bus.clone()),
    };
    // Bound before anything runs in the background: a node that cannot
    // listen (its address taken by another node) stops before its
    // dispatcher claims outbox events it would leave to their lease.
    let acceptor = TcpListener::bind(config.addr.clone())
        .into_acceptor()
        .await?;
    let host = build(db.clone(), &config, bus);
    let livechat = host.livechat.clone();
    let sockets = host.livechat.clone();
    let housekeeper = tokio::spawn(housekeeping(host.livechat.clone(), config.outbox_retention));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let dispatcher = tokio::spawn(host.dispatcher.run(async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    let signal = async move {
        shutdown_signal().await;
        // Stop accepting (the server) and close every WebSocket with 1001.
        livechat.shutdown();
    };
    Server::new_with_acceptor(livechat_poem::NoDelay(acceptor))
        .run_with_graceful_shutdown(host.endpoint, signal, Some(Duration::from_secs(10)))
        .await?;
    // The WebSockets remove their connections' rows as they close; the
    // agents whose last connection was here are announced offline (their
    // tenant's waiting chats ticketed) once the presence grace has passed,
    // unless they reconnected to another node meanwhile.
    let wait = config.presence_grace + Duration::from_secs(10);
    if tokio::time::timeout(wait, sockets.closed()).await.is_err() {
        tracing::warn!(
            "WebSockets still open, or presence checks still running, {} s after the stop: \
             their connections expire by TTL",
            wait.as_secs()
        );
    }
    let _ = stop_tx.send(true);
    let _ = dispatcher.await;
    housekeeper.abort();
    // Publishing to Redis is queued: what the stop itself published (the
    // agents' offline announcements, recorded as made, which no node
    // repeats) goes out before the process ends.
    if let Some(redis) = &redis
        && !redis.flush(Duration::from_secs(5)).await
    {
        tracing::warn!(
            "events still queued for Redis 5 s after the stop: other nodes may miss them"
        );
    }
    db.close().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Every minute, deletes the connection rows of crashed nodes and announces
/// their agents offline (`Livechat::purge_expired_connections`), then
/// announces offline the agents whose presence ran out without a
/// connection (`Livechat::announce_expired_presence`: agents who used only
/// the HTTP routes and stopped sending heartbeats), then hands back the
/// chats of agents gone for `LIVECHAT_HAND_BACK_AFTER_SECS`
/// (`Livechat::hand_back_chats_of_absent_agents`), then tickets the chats
/// left waiting in tenants with no agent online
/// (`Livechat::ticket_unattended_chats`), then deletes the outbox events
/// dispatched to every sink older than `outbox_retention`
/// (`Livechat::prune_outbox`; `None`: none).
async fn housekeeping(livechat: livechat_poem::Livechat, outbox_retention: Option<Duration>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    // A pass that overran (a long prune) is followed by the next a minute
    // later, not by a burst of the ticks it missed.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        log_announced(
            livechat.purge_expired_connections().await,
            "agents of crashed nodes announced offline",
            "purging expired connections failed",
        );
        log_announced(
            livechat.announce_expired_presence().await,
            "agents whose presence ran out announced offline",
            "announcing expired presence failed",
        );
        log_announced(
            livechat.hand_back_chats_of_absent_agents().await,
            "chats of agents gone past LIVECHAT_HAND_BACK_AFTER_SECS handed back",
            "handing back the chats of absent agents failed",
        );
        match livechat.ticket_unattended_chats().await {
            Ok(chats) if !chats.is_empty() => {
                tracing::info!(
                    chats = chats.len(),
                    "waiting chats ticketed: no agent online"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ticketing waiting chats failed"),
        }
        if let Some(retention) = outbox_retention {
            match livechat.prune_outbox(retention).await {
                Ok(0) => {}
                Ok(events) => tracing::info!(events, "dispatched outbox events pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning the outbox failed"),
            }
        }
    }
}

/// Logs one housekeeping step: how many agents it announced offline (when
/// any), or its failure.
fn log_announced<T>(
    result: Result<Vec<T>, livechat_core::ChatError>,
    announced: &str,
    failed: &str,
) {
    match result {
        Ok(offline) if !offline.is_empty() => {
            tracing::info!(agents = offline.len(), "{announced}");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "{failed}"),
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}

#[cfg(test)]
mod config_tests {
    use super::{Config, Duration};

    fn config(vars: &[(&str, &str)]) -> Result<Config, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_vars(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    /// A configuration printed with `{:?}` (a host's log line) shows no
    /// secret.
    #[test]
    fn the_configurations_debug_leaves_secrets_out() {
        let config = config(&[
            ("DATABASE_URL", "postgres://app:db-pass@db.internal/lc"),
            ("LIVECHAT_JWT_SECRET", "jwt-secret-value"),
            ("LIVECHAT_VISITOR_SECRET", "visitor-secret-value"),
            (
                "LIVECHAT_WEBHOOK_URL",
                "https://desk.example.com/hooks/T0K3N",
            ),
            ("LIVECHAT_WEBHOOK_SECRET", "webhook-secret-value"),
            ("LIVECHAT_IDENTITY_SECRETS", "1:identity-secret-value"),
            ("REDIS_URL", "redis://:redis-pass@cache.internal:6379"),
        ])
        .unwrap();
        let debug = format!("{config:?}");
        for secret in [
            "db-pass",
            "jwt-secret-value",
            "visitor-secret-value",
            "T0K3N",
            "webhook-secret-value",
            "identity-secret-value",
            "redis-pass",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("db.internal"), "{debug}");
    }

    /// Values the server could not use are refused at startup with a
    /// message naming the variable, not met later as a panic or as every
    /// delivery failing.
    #[test]
    fn unusable_values_are_refused_by_name() {
        assert!(config(&[]).is_ok());
        for (vars, named) in [
            (
                &[
                    ("LIVECHAT_WEBHOOK_URL", "localhost:9000/hook"),
                    ("LIVECHAT_WEBHOOK_SECRET", "s"),
                ][..],
                "LIVECHAT_WEBHOOK_URL",
            ),
            (
                &[
                    ("LIVECHAT_WEBHOOK_URL", "ftp://example.com/hook"),
                    ("LIVECHAT_WEBHOOK_SECRET", "s"),
                ][..],
                "LIVECHAT_WEBHOOK_URL",
            ),
            (
                &[("LIVECHAT_PRESENCE_TTL_SECS", "10000000000000")][..],
                "LIVECHAT_PRESENCE_TTL_SECS",
            ),
            (
                &[("LIVECHAT_PRESENCE_GRACE_SECS", "86401")][..],
                "LIVECHAT_PRESENCE_GRACE_SECS",
            ),
            (
                &[
                    ("LIVECHAT_PRESENCE_TTL_SECS", "60"),
                    ("LIVECHAT_PING_INTERVAL_SECS", "20"),
                    ("LIVECHAT_PRESENCE_GRACE_SECS", "45"),
                ][..],
                "LIVECHAT_PRESENCE_GRACE_SECS",
            ),
            (
                &[("LIVECHAT_PING_INTERVAL_SECS", "0")][..],
                "LIVECHAT_PING_INTERVAL_SECS",
            ),
            (
                &[("LIVECHAT_HAND_BACK_AFTER_SECS", "0")][..],
                "LIVECHAT_HAND_BACK_AFTER_SECS",
            ),
            (
                &[("LIVECHAT_HAND_BACK_AFTER_SECS", "never")][..],
                "LIVECHAT_HAND_BACK_AFTER_SECS",
            ),
            (&[("LIVECHAT_JWT_SECRET", " ")][..], "LIVECHAT_JWT_SECRET"),
            (
                &[("LIVECHAT_VISITOR_SECRET", "")][..],
                "LIVECHAT_VISITOR_SECRET",
            ),
            (
                &[("LIVECHAT_OUTBOX_RETENTION_DAYS", "0")][..],
                "LIVECHAT_OUTBOX_RETENTION_DAYS",
            ),
            (
                &[("LIVECHAT_OUTBOX_RETENTION_DAYS", "3651")][..],
                "LIVECHAT_OUTBOX_RETENTION_DAYS",
            ),
            (
                &[
                    ("LIVECHAT_PING_INTERVAL_SECS", "120"),
                    ("LIVECHAT_PRESENCE_TTL_SECS", "60"),
                ][..],
                "LIVECHAT_PING_INTERVAL_SECS",
            ),
            (
                &[(
                    "LIVECHAT_CORS_ORIGINS",
                    "https://a.example,https://b\u{7f}.example",
                )][..],
                "LIVECHAT_CORS_ORIGINS",
            ),
            (
                &[("LIVECHAT_IDENTITY_SECRETS", "1:alpha,2:")][..],
                "LIVECHAT_IDENTITY_SECRETS",
            ),
            (
                &[("LIVECHAT_WS_SEND_RATE", "0")][..],
                "LIVECHAT_WS_SEND_RATE",
            ),
            (
                &[("LIVECHAT_WS_MAX_PER_USER", "-1")][..],
                "LIVECHAT_WS_MAX_PER_USER",
            ),
            (
                &[("LIVECHAT_SQLITE_SYNCHRONOUS", "off")][..],
                "LIVECHAT_SQLITE_SYNCHRONOUS",
            ),
            (
                &[("LIVECHAT_CHAT_TENANTS", "1,2")][..],
                "LIVECHAT_CHAT_TENANTS",
            ),
            (
                &[("LIVECHAT_REDIS_CHANNEL", " staging ")][..],
                "LIVECHAT_REDIS_CHANNEL",
            ),
            (&[("LIVECHAT_ADDR", "8080")][..], "LIVECHAT_ADDR"),
            (&[("LIVECHAT_ADDR", "127.0.0.1:80800")][..], "LIVECHAT_ADDR"),
        ] {
            let refused = config(vars).err().unwrap_or_default();
            assert!(refused.contains(named), "{vars:?}: {refused}");
        }
        let ok = config(&[
            ("LIVECHAT_WEBHOOK_URL", "https://example.com/hook?token=t"),
            ("LIVECHAT_WEBHOOK_SECRET", "s"),
            ("LIVECHAT_PRESENCE_TTL_SECS", "86400"),
            (
                "LIVECHAT_CORS_ORIGINS",
                "https://a.example, https://b.example",
            ),
        ])
        .unwrap();
        assert_eq!(ok.cors_origins.len(), 2);
        assert_eq!(ok.hand_back_after, Some(Duration::from_secs(120)));
        assert_eq!(
            ok.chat_config().routing.hand_back_after,
            Some(Duration::from_secs(120))
        );
        assert_eq!(ok.realtime().max_connections_per_user, 50);
        let uncapped = config(&[("LIVECHAT_WS_MAX_PER_USER", "0")]).unwrap();
        assert_eq!(uncapped.realtime().max_connections_per_user, 0);
        let off = config(&[("LIVECHAT_HAND_BACK_AFTER_SECS", " OFF ")]).unwrap();
        assert_eq!(off.chat_config().routing.hand_back_after, None);
        let soon = config(&[("LIVECHAT_HAND_BACK_AFTER_SECS", "30")]).unwrap();
        assert_eq!(soon.hand_back_after, Some(Duration::from_secs(30)));
        assert_eq!(ok.outbox_retention, Some(Duration::from_secs(7 * 86_400)));
        let kept = config(&[("LIVECHAT_OUTBOX_RETENTION_DAYS", "off")]).unwrap();
        assert_eq!(kept.outbox_retention, None);
        assert_eq!(ok.chat_tenants, super::ChatTenants::Host);
        assert_eq!(ok.redis_channel, "livechat:events");
        let staging = config(&[("LIVECHAT_REDIS_CHANNEL", "livechat:staging")]).unwrap();
        assert_eq!(staging.redis_channel, "livechat:staging");
        let any = config(&[("LIVECHAT_CHAT_TENANTS", " Any ")]).unwrap();
        assert_eq!(any.chat_tenants, super::ChatTenants::Any);
        let month = config(&[("LIVECHAT_OUTBOX_RETENTION_DAYS", "30")]).unwrap();
        assert_eq!(
            month.outbox_retention,
            Some(Duration::from_secs(30 * 86_400))
        );
    }
}
