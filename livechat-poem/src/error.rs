//! The error envelope and the one place where errors become HTTP answers.
//!
//! Every 4xx/5xx body is `{"error": {"code": "snake_case", "message": "…"}}`
//! (DESIGN.md "HTTP conventions"), including malformed JSON, wrong types,
//! unknown routes and oversized bodies. A 500 says nothing internal: the
//! cause is logged with a reference that the message repeats.

use livechat_core::ChatError;
use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

/// Largest accepted request body, in bytes (issue #2): 64 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// `{"code", "message"}` inside the error envelope.
#[derive(Clone, Debug, PartialEq, Eq, Object)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `not_found`, `agent_offline`.
    pub code: String,
    /// Human-readable explanation; not stable.
    pub message: String,
    /// For `agent_offline` on `POST /sessions`: the ticket that keeps the
    /// request (issue #3).
    #[oai(skip_serializing_if_is_none)]
    pub ticket_id: Option<uuid::Uuid>,
}

/// The error envelope: `{"error": {"code", "message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Object)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// Every error answer of the API, by status.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// Bad input: `invalid_body`, `invalid_query`, `invalid_tenant`,
    /// `invalid_message`, `message_too_long`, `agent_offline`,
    /// `active_session_exists`, `session_closed`, `session_not_open`,
    /// `invalid_customer`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `unauthorized`: token missing, malformed, badly signed or expired.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// `forbidden`: an agent route without the `SUPPORT_AGENT` role, or a
    /// tenant the credential does not allow.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// `not_found`: no such row in this tenant, or a malformed id.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// A conflict with what is stored: `already_assigned` (a concurrent
    /// claim won), `client_msg_id_taken` (the key names another sender's
    /// message), `ticket_pending` (the ticket's opening is not delivered
    /// yet).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// `payload_too_large`: body over 64 KiB.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// `rate_limited`: a customer's chat starts or messages over the
    /// host's limits (`RateLimits`); nothing was done. `Retry-After`: whole
    /// seconds until one more is allowed. (`GET /ws` answers
    /// `too_many_connections` with this variant too, described in its
    /// hand-written path item: `ws::openapi_path_item`.)
    #[oai(status = 429)]
    TooManyRequests(
        Json<ErrorBody>,
        /// Seconds until the request may be made again.
        #[oai(header = "Retry-After")]
        u64,
    ),
    /// `internal_error`: logged with the reference given in the message.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `unavailable`: the database or identity provider is down, or the
    /// host's `TenantDirectory` cannot answer; also a ticket route without
    /// a `TicketDirectory`, or a notification route without a
    /// `NotificationInbox`, configured.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn body(code: &str, message: impl Into<String>) -> Json<ErrorBody> {
    Json(ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message: message.into(),
            ticket_id: None,
        },
    })
}

impl ApiError {
    /// 400 with `code`.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::BadRequest(body(code, message))
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::Unauthorized(body("unauthorized", message))
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(body("forbidden", message))
    }

    /// 404 `not_found`.
    pub fn not_found() -> Self {
        Self::NotFound(body("not_found", "not found"))
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large() -> Self {
        Self::PayloadTooLarge(body(
            "payload_too_large",
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        ))
    }

    /// 429 `rate_limited`, to be retried after `wait` (announced in whole
    /// seconds, at least 1).
    pub fn rate_limited(message: impl Into<String>, wait: std::time::Duration) -> Self {
        Self::TooManyRequests(
            body("rate_limited", message),
            crate::limits::retry_after_secs(wait),
        )
    }

    /// 429 `too_many_connections`: the user already holds
    /// `RealtimeConfig::max_connections_per_user` WebSockets on this node.
    /// `Retry-After` is `wait` in whole seconds (the connection TTL plus
    /// the ping interval: by then a connection of theirs that vanished
    /// without a close has been closed).
    pub fn too_many_connections(message: impl Into<String>, wait: std::time::Duration) -> Self {
        Self::TooManyRequests(
            body("too_many_connections", message),
            crate::limits::retry_after_secs(wait),
        )
    }

    /// 503 `unavailable`; the cause is logged.
    pub fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        Self::Unavailable(body(
            "unavailable",
            "a dependency is unavailable; retry later",
        ))
    }

    /// 500 `internal_error`; the cause is logged under a fresh reference.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        let reference = uuid::Uuid::now_v7();
        tracing::error!(%reference, error = %cause, "internal error");
        Self::Internal(body(
            "internal_error",
            format!("internal error (ref {reference})"),
        ))
    }
}

impl ApiError {
    /// The `{"code", "message"}` this error answers with.
    #[must_use]
    pub fn detail(&self) -> &ErrorDetail {
        match self {
            Self::BadRequest(b)
            | Self::Unauthorized(b)
            | Self::Forbidden(b)
            | Self::NotFound(b)
            | Self::Conflict(b)
            | Self::PayloadTooLarge(b)
            | Self::TooManyRequests(b, _)
            | Self::Internal(b)
            | Self::Unavailable(b) => &b.0.error,
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(err: ChatError) -> Self {
        match err {
            ChatError::NotFound => Self::not_found(),
            ChatError::InvalidId(msg) => Self::bad_request("invalid_body", msg),
            ChatError::AgentOffline { ticket_id, .. } => {
                let mut json = body(
                    "agent_offline",
                    format!("{err}; the request was kept as ticket {ticket_id}"),
                );
                json.0.error.ticket_id = Some(ticket_id.as_uuid());
                Self::BadRequest(json)
            }
            ChatError::AgentNotOnline(_) => Self::bad_request("agent_offline", err.to_string()),
            ChatError::AlreadyAssigned => Self::Conflict(body("already_assigned", err.to_string())),
            ChatError::TicketPending => Self::Conflict(body("ticket_pending", err.to_string())),
            ChatError::InvalidInput(msg) => Self::bad_request("invalid_body", msg),
            ChatError::InvalidCustomer(msg) => Self::bad_request("invalid_customer", msg),
            ChatError::ActiveSessionExists(existing) => Self::bad_request(
                "active_session_exists",
                match existing {
                    Some(id) => format!("agent already has an open session {id}"),
                    None => err.to_string(),
                },
            ),
            ChatError::SessionClosed => Self::bad_request("session_closed", err.to_string()),
            ChatError::SessionNotOpen => Self::bad_request("session_not_open", err.to_string()),
            ChatError::InvalidMessage | ChatError::MessageContainsNul => {
                Self::bad_request("invalid_message", err.to_string())
            }
            ChatError::MessageTooLong { .. } => {
                Self::bad_request("message_too_long", err.to_string())
            }
            ChatError::InvalidClientMsgId => Self::bad_request("invalid_body", err.to_string()),
            ChatError::ClientMsgIdTaken => {
                Self::Conflict(body("client_msg_id_taken", err.to_string()))
            }
            ChatError::InvalidPage(msg) => Self::bad_request("invalid_query", msg),
            other if other.is_unavailable() => Self::unavailable(&other),
            other => Self::internal(&other),
        }
    }
}

/// Turns every error that reaches the top of the API into the envelope.
///
/// Errors already rendered by a handler ([`ApiError`]) pass through; errors
/// from extraction are classified: body → 400 `invalid_body`, query or path
/// parameter → 400 `invalid_query`, auth scheme → 401 `unauthorized`, unknown
/// route → 404 `not_found`, a path that does not percent-decode to UTF-8
/// (`/sessions/%ff`: no id or route has such a name) → 404 `not_found`,
/// wrong method → 405 `method_not_allowed`. Every answer is marked
/// `Cache-Control: no-store`, as the library's routes mark theirs (README
/// "Routes").
///
/// A host that nests [`Livechat::endpoint`](crate::Livechat::endpoint) in
/// its own `Route` gives that route `.catch_all_error(envelope)` too: poem's
/// `Route` decodes the whole path before it calls the nested endpoint, so
/// a path that does not decode never reaches the library; so are the
/// refusals of the host's middleware (a CORS origin not allowed).
pub async fn envelope(err: poem::Error) -> Response {
    let mut response = render(err);
    response.headers_mut().insert(
        poem::http::header::CACHE_CONTROL,
        poem::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// The envelope of [`envelope`], before its `Cache-Control`.
fn render(err: poem::Error) -> Response {
    use poem::error::{MethodNotAllowedError, NotFoundError, ParsePathError};
    use poem_openapi::error::{
        AuthorizationError, ContentTypeError, ParseParamError, ParseRequestPayloadError,
    };

    // `ApiError` values come back as pre-rendered responses (no source).
    if !err.has_source() {
        return err.into_response();
    }
    let api = if err.is::<ParseRequestPayloadError>() || err.is::<ContentTypeError>() {
        ApiError::bad_request("invalid_body", err.to_string())
    } else if err.is::<ParseParamError>() {
        ApiError::bad_request("invalid_query", err.to_string())
    } else if err.is::<AuthorizationError>() {
        ApiError::unauthorized("a bearer token is required")
    } else if err.is::<NotFoundError>() || err.is::<ParsePathError>() {
        ApiError::not_found()
    } else if err.is::<MethodNotAllowedError>() {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            body("method_not_allowed", "method not allowed"),
        )
            .into_response();
    } else if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large()
    } else if err.status().is_client_error() {
        let status = err.status();
        let code = status
            .canonical_reason()
            .unwrap_or("bad_request")
            .to_ascii_lowercase()
            .replace([' ', '-'], "_");
        return (status, body(&code, err.to_string())).into_response();
    } else {
        ApiError::internal(&err)
    };
    api.into_response()
}

/// Refuses with 400 `invalid_query` a query string that gives a parameter
/// more than once (after percent-decoding: `limit` and `li%6Dit` are one
/// name), by the rule of the `X-Tenant-ID` and `Authorization` headers:
/// which copy a proxy or a reader takes must not decide what a request
/// means (`?limit=5&limit=0` was read as `limit=5`; no route takes a list
/// in its query); and one whose names or values do not percent-decode to
/// UTF-8 (`?department=%ff`: the parsers put U+FFFD in place of each bad
/// byte, and the request was answered for a department nobody named); and
/// one of more than [`MAX_QUERY_PARAMETERS`] parameters (no route takes
/// more than five; the check for repeats compares each name with the
/// earlier ones, and 16,000 names took 0.4 s of CPU before any
/// credential was looked at).
pub(crate) fn check_query(req: &poem::Request) -> Result<(), ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(());
    };
    if query.split('&').any(|pair| {
        percent_encoding::percent_decode_str(pair)
            .decode_utf8()
            .is_err()
    }) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "the query string does not percent-decode to UTF-8",
        ));
    }
    let mut names: Vec<std::borrow::Cow<'_, str>> = Vec::new();
    for (name, _) in form_urlencoded::parse(query.as_bytes()) {
        if names.len() == MAX_QUERY_PARAMETERS {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("more than {MAX_QUERY_PARAMETERS} query parameters"),
            ));
        }
        if names.contains(&name) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("query parameter `{name}` given more than once"),
            ));
        }
        names.push(name);
    }
    Ok(())
}

/// Most parameters a query string of the library's routes may have: a
/// request with more answers 400 `invalid_query`, before its credential
/// is looked at (no route takes more than five).
pub const MAX_QUERY_PARAMETERS: usize = 32;

/// Reads `req`'s body into memory, refusing bodies over [`MAX_BODY_BYTES`]
/// with 413 `payload_too_large`, whether announced by `Content-Length` or
/// streamed; a body that cannot be read is 400 `invalid_body`.
pub(crate) async fn read_body(req: &mut poem::Request) -> Result<(), ApiError> {
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(ApiError::payload_too_large());
    }
    let bytes = req
        .take_body()
        .into_bytes_limit(MAX_BODY_BYTES)
        .await
        .map_err(|e| match e {
            poem::error::ReadBodyError::PayloadTooLarge => ApiError::payload_too_large(),
            other => ApiError::bad_request("invalid_body", other.to_string()),
        })?;
    req.set_body(bytes);
    Ok(())
}
