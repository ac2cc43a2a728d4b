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
//! use livechat_poem::{JwtAuthenticator, Livechat};
//! use poem::{Route, Server, listener::TcpListener};
//! use sea_orm_migration::MigratorTrait;
//!
//! # async fn host() -> Result<(), Box<dyn std::error::Error>> {
//! let db = store::connect("sqlite://livechat.db?mode=rwc").await?;
//! Migrator::up(&db, None).await?;
//! let chat = ChatService::new(SeaOrmStore::new(db), ChatConfig::default());
//! let livechat = Livechat::new(chat, Arc::new(JwtAuthenticator::hs256(b"host secret")));
//!
//! let app = Route::new()
//!     .nest("/livechat", livechat.endpoint())
//!     .at("/openapi.json", livechat.spec_endpoint("/livechat"))
//!     .nest("/docs", livechat.swagger_ui("/livechat"));
//! Server::new(TcpListener::bind("127.0.0.1:8080")).run(app).await?;
//! # Ok(()) }
//! ```

mod api;
mod auth;
mod dto;
mod error;

use std::sync::Arc;

use livechat_core::ChatService;
use poem::{Endpoint, EndpointExt, IntoEndpoint, Response};
use poem_openapi::OpenApiService;

pub use api::AgentContext;
pub use auth::{
    AuthError, Authenticator, JwtAuthenticator, Principal, SUPPORT_AGENT, TENANT_HEADER,
    parse_tenant_header,
};
pub use dto::*;
pub use error::{ApiError, ErrorBody, ErrorDetail, MAX_BODY_BYTES, envelope};

/// The livechat routes, ready to nest into a host's poem app.
#[derive(Clone)]
pub struct Livechat {
    chat: ChatService,
    authenticator: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for Livechat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Livechat")
            .field("chat", &self.chat)
            .finish_non_exhaustive()
    }
}

impl Livechat {
    /// Routes over `chat`, authenticating requests with `authenticator`.
    pub fn new(chat: ChatService, authenticator: Arc<dyn Authenticator>) -> Self {
        Self {
            chat,
            authenticator,
        }
    }

    fn service(&self, server_url: &str) -> OpenApiService<api::AgentApi, ()> {
        OpenApiService::new(
            api::AgentApi {
                chat: self.chat.clone(),
            },
            "livechat",
            env!("CARGO_PKG_VERSION"),
        )
        .description(
            "Multi-tenant live chat for support agents. Every route needs \
             `Authorization: Bearer <token>` and `X-Tenant-ID: <positive integer>`. \
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
        self.service("/livechat")
            .into_endpoint()
            .around(error::limit_body)
            .data(state)
            .catch_all_error(envelope)
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

    /// Swagger UI for the routes under `server_url`.
    pub fn swagger_ui(&self, server_url: &str) -> impl Endpoint + use<> {
        let html = self.service(server_url).swagger_ui_html();
        poem::endpoint::make_sync(move |_| poem::web::Html(html.clone()))
    }

    /// The OpenAPI document as JSON text.
    #[must_use]
    pub fn spec_json(&self, server_url: &str) -> String {
        self.service(server_url).spec()
    }
}
