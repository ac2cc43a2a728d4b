//! The signed-webhook sink (issue #3): every ticket and notification is
//! POSTed as JSON to one URL, signed with HMAC-SHA256.

use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use livechat_core::{
    ChatMessage, Contact, EventId, Notification, TenantId, TicketId, TicketRequested, UserId,
};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use sha2::Sha256;

pub use reqwest::Url;

use crate::sink::{NotificationSink, SinkError, TicketSink};

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the event id, the same as the body's `event_id`. The
/// signature covers the body, not this header: a receiver deduplicates on
/// the body's `event_id` (or refuses a request whose header differs from
/// it), so that a replayed request with another header is still a repeat.
pub const EVENT_ID_HEADER: &str = "X-Livechat-Event-Id";
/// Header carrying the send time in Unix seconds (against replay).
pub const TIMESTAMP_HEADER: &str = "X-Livechat-Timestamp";
/// Header carrying `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub const SIGNATURE_HEADER: &str = "X-Livechat-Signature";

/// Default time limit of one delivery, from connecting to the end of the
/// answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs tickets and notifications to a URL as signed JSON (issue #3).
///
/// Body (`Content-Type: application/json`):
/// `{"event_id": "<uuid>", "type": …, "tenant_id": <int>, "data": …}`,
/// where `type` and `data` are one of:
///
/// - `ticket.requested`: the [`TicketRequested`];
/// - `ticket.closed`: `{"ticket_id": "<uuid>"}`;
/// - `ticket.assigned`: `{"ticket_id": "<uuid>", "agent_id": <int>}`;
/// - `ticket.unassigned`: `{"ticket_id": "<uuid>"}`, the chat went back
///   to the queue and nobody serves it;
/// - `ticket.message`: `{"ticket_id": "<uuid>", "message": …}`, the
///   customer's later message as a [`ChatMessage`] (`id`, `session_id`,
///   `tenant_id`, `sender_type`, `sender_id`, `customer_id`, `seq`,
///   `message`, `client_msg_id`, `created_at`);
/// - `ticket.contact`: `{"ticket_id": "<uuid>", "contact": …}`, the
///   customer's new contact details as a [`Contact`] (`name`, `email`,
///   `phone`, `position`, `company`);
/// - `notification.created`: the [`Notification`].
///
/// Headers: [`EVENT_ID_HEADER`] (the event id: the same event may be sent
/// more than once; deduplicate on the signed body's `event_id`),
/// [`TIMESTAMP_HEADER`] (Unix seconds) and
/// [`SIGNATURE_HEADER`]; receivers check them with [`verify_signature`].
///
/// Outcome: 2xx is success; a timeout, a connection error, 5xx, 408 or 429
/// is [`SinkError::Retryable`]; any other status (4xx, 3xx) is
/// [`SinkError::Permanent`]. Redirects are not followed: a client following
/// a 301, 302 or 303 sends a `GET` without the body, and its 2xx would
/// count as delivered; it would also send the signature to the host the
/// redirect names. Errors never carry the URL (its query or credentials
/// may hold a secret): they are stored in the outbox and logged; nor does
/// its `Debug`, which shows the sink's name (the URL's origin and a digest
/// of the whole) and not its secret.
#[derive(Clone)]
pub struct WebhookSink {
    client: reqwest::Client,
    url: Url,
    secret: Vec<u8>,
    timeout: Duration,
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    event_id: EventId,
    #[serde(rename = "type")]
    kind: &'a str,
    tenant_id: TenantId,
    data: T,
}

/// The `data` of a webhook event about a ticket alone (`ticket.closed`,
/// `ticket.unassigned`).
#[derive(Serialize)]
struct TicketOnly {
    ticket_id: TicketId,
}

/// The `data` of a webhook `ticket.contact`.
#[derive(Serialize)]
struct TicketContact<'a> {
    ticket_id: TicketId,
    contact: &'a Contact,
}

#[derive(Serialize)]
struct AssignedTicket {
    ticket_id: TicketId,
    agent_id: UserId,
}

#[derive(Serialize)]
struct TicketMessage<'a> {
    ticket_id: TicketId,
    message: &'a ChatMessage,
}

impl WebhookSink {
    /// A sink posting to `url`, signing with `secret` (shared with the
    /// receiver), with the [`DEFAULT_TIMEOUT`].
    ///
    /// # Panics
    /// When the TLS backend cannot be initialized (as [`reqwest::Client::new`]).
    #[must_use]
    pub fn new(url: Url, secret: impl Into<Vec<u8>>) -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            // When `reqwest::Client::new` would panic too.
            .expect("the HTTP client cannot be built");
        Self {
            client,
            url,
            secret: secret.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Replaces the time limit of one delivery.
    #[must_use]
    pub const fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn post<T: Serialize>(
        &self,
        key: EventId,
        kind: &str,
        tenant: TenantId,
        data: T,
    ) -> Result<(), SinkError> {
        let body = serde_json::to_vec(&Envelope {
            event_id: key,
            kind,
            tenant_id: tenant,
            data,
        })
        .map_err(|e| SinkError::Permanent(format!("webhook body: {e}")))?;
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let signature = sign(&self.secret, &timestamp, &body);
        let response = self
            .client
            .post(self.url.clone())
            .timeout(self.timeout)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(EVENT_ID_HEADER, key.to_string())
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let e = e.without_url();
                if e.is_builder() {
                    SinkError::Permanent(format!("webhook request: {e}"))
                } else {
                    SinkError::Retryable(format!("webhook request: {e}"))
                }
            })?;
        classify(response.status())
    }
}

/// Maps a webhook answer to the sink outcome.
fn classify(status: StatusCode) -> Result<(), SinkError> {
    if status.is_success() {
        Ok(())
    } else if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Err(SinkError::Retryable(format!("webhook answered {status}")))
    } else {
        Err(SinkError::Permanent(format!("webhook answered {status}")))
    }
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The [`SIGNATURE_HEADER`] value for `body` sent at `timestamp`.
fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("sha256={}", hex::encode(tag))
}

/// Checks a webhook request for a receiver: `signature_header` must be
/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>` (compared in
/// constant time), and `timestamp` (the [`TIMESTAMP_HEADER`], Unix seconds)
/// must be within `tolerance_secs` of `now_unix`, so a captured request
/// cannot be replayed later (issue #3). `body` is the raw request body, as
/// received.
///
/// Returns `false` for a malformed header or timestamp, a stale or future
/// timestamp, or a wrong signature. A negative tolerance counts as zero.
#[must_use]
pub fn verify_signature(
    secret: &[u8],
    timestamp: &str,
    body: &[u8],
    signature_header: &str,
    now_unix: i64,
    tolerance_secs: i64,
) -> bool {
    let Ok(sent_at) = timestamp.parse::<i64>() else {
        return false;
    };
    if now_unix.abs_diff(sent_at) > u64::try_from(tolerance_secs).unwrap_or(0) {
        return false;
    }
    let Some(Ok(tag)) = signature_header.strip_prefix("sha256=").map(hex::decode) else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&tag).is_ok()
}

impl WebhookSink {
    /// The sink's name for both kinds ([`TicketSink::name`]): `webhook`,
    /// the URL's origin (scheme, host and port) and the first 12 hex digits
    /// of the SHA-256 of the whole URL, e.g. `webhook
    /// https://desk.example.com 3f9a0c5e21b7`. The name is stored with
    /// events waiting for a retry and appears in `last_error` and the
    /// logs, so it leaves out the URL's path, query and credentials, any
    /// of which may be a secret (a path like `/hooks/T00/B00/XXXX`); the
    /// digest keeps two webhooks on one host apart.
    /// The URL's origin and a digest of the whole (its path, query or user
    /// part may hold a secret): [`TicketSink::name`] and `Debug`.
    fn sink_name(&self) -> String {
        use sha2::Digest;
        let digest = Sha256::digest(self.url.as_str().as_bytes());
        format!(
            "webhook {} {}",
            self.url.origin().ascii_serialization(),
            hex::encode(&digest[..6])
        )
    }
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("name", &self.sink_name())
            .field("secret", &"***")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TicketSink for WebhookSink {
    fn name(&self) -> String {
        self.sink_name()
    }

    /// Sends `type` `ticket.requested` with the request as `data`.
    async fn open_ticket(&self, request: &TicketRequested, key: EventId) -> Result<(), SinkError> {
        self.post(key, "ticket.requested", request.tenant_id, request)
            .await
    }

    /// Sends `type` `ticket.closed` with `{"ticket_id"}` as `data`.
    async fn close_ticket(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        key: EventId,
    ) -> Result<(), SinkError> {
        let data = TicketOnly { ticket_id: ticket };
        self.post(key, "ticket.closed", tenant, data).await
    }

    /// Sends `type` `ticket.assigned` with `{"ticket_id", "agent_id"}` as
    /// `data`.
    async fn assign_ticket(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        agent: UserId,
        key: EventId,
    ) -> Result<(), SinkError> {
        let data = AssignedTicket {
            ticket_id: ticket,
            agent_id: agent,
        };
        self.post(key, "ticket.assigned", tenant, data).await
    }

    /// Sends `type` `ticket.unassigned` with `{"ticket_id"}` as `data`.
    async fn unassign_ticket(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        key: EventId,
    ) -> Result<(), SinkError> {
        let data = TicketOnly { ticket_id: ticket };
        self.post(key, "ticket.unassigned", tenant, data).await
    }

    /// Sends `type` `ticket.message` with `{"ticket_id", "message"}` as
    /// `data`.
    async fn ticket_message(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        message: &ChatMessage,
        key: EventId,
    ) -> Result<(), SinkError> {
        let data = TicketMessage {
            ticket_id: ticket,
            message,
        };
        self.post(key, "ticket.message", tenant, data).await
    }

    /// Sends `type` `ticket.contact` with `{"ticket_id", "contact"}` as
    /// `data`.
    async fn ticket_contact(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        contact: &Contact,
        key: EventId,
    ) -> Result<(), SinkError> {
        let data = TicketContact {
            ticket_id: ticket,
            contact,
        };
        self.post(key, "ticket.contact", tenant, data).await
    }
}

#[async_trait]
impl NotificationSink for WebhookSink {
    fn name(&self) -> String {
        self.sink_name()
    }

    /// Sends `type` `notification.created` with the notification as `data`.
    async fn notify(&self, notification: &Notification, key: EventId) -> Result<(), SinkError> {
        self.post(
            key,
            "notification.created",
            notification.tenant_id,
            notification,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_keeps_the_urls_secrets_out() {
        let sink = |url: &str| WebhookSink::new(Url::parse(url).unwrap(), "s");
        let name = TicketSink::name(&sink(
            "https://user:pw@desk.example.com:8443/hooks/T00/XXXX?key=k",
        ));
        assert!(
            name.starts_with("webhook https://desk.example.com:8443 "),
            "{name}"
        );
        for secret in ["user", "pw", "hooks", "XXXX", "key"] {
            assert!(!name.contains(secret), "{name}");
        }
        // Nor does its `Debug`, which leaves the signing secret out too.
        let debug = format!(
            "{:?}",
            WebhookSink::new(
                Url::parse("https://user:pw@desk.example.com/hooks/XXXX?key=k").unwrap(),
                "s3cret-value"
            )
        );
        for secret in ["user", "pw", "hooks", "XXXX", "key", "s3cret-value"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        // The same for both kinds; another path on the same host differs.
        let a = sink("https://desk.example.com/a");
        assert_eq!(TicketSink::name(&a), NotificationSink::name(&a));
        assert_ne!(
            TicketSink::name(&a),
            TicketSink::name(&sink("https://desk.example.com/b"))
        );
    }

    #[test]
    fn signature_round_trip_and_rejections() {
        let body = br#"{"event_id":"x"}"#;
        let header = sign(b"s3cret", "1700000000", body);
        assert!(header.starts_with("sha256=") && header.len() == 7 + 64);
        assert!(verify_signature(
            b"s3cret",
            "1700000000",
            body,
            &header,
            1_700_000_100,
            300
        ));
        // Wrong secret, altered body, altered timestamp.
        assert!(!verify_signature(
            b"other",
            "1700000000",
            body,
            &header,
            1_700_000_000,
            300
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            b"{}",
            &header,
            1_700_000_000,
            300
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000001",
            body,
            &header,
            1_700_000_000,
            300
        ));
        // Stale and far-future timestamps.
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            body,
            &header,
            1_700_000_301,
            300
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            body,
            &header,
            1_699_999_699,
            300
        ));
        // Malformed header or timestamp.
        for bad in ["", "sha256=", "sha256=zz", &header[7..], "sha1=00"] {
            assert!(!verify_signature(
                b"s3cret",
                "1700000000",
                body,
                bad,
                1_700_000_000,
                300
            ));
        }
        assert!(!verify_signature(
            b"s3cret",
            "soon",
            body,
            &header,
            1_700_000_000,
            300
        ));
    }

    #[test]
    fn status_classification() {
        assert!(classify(StatusCode::NO_CONTENT).is_ok());
        for retry in [500, 502, 503, 408, 429] {
            let status = StatusCode::from_u16(retry).unwrap();
            assert!(matches!(classify(status), Err(SinkError::Retryable(_))));
        }
        for permanent in [400, 401, 404, 410, 422, 301] {
            let status = StatusCode::from_u16(permanent).unwrap();
            assert!(matches!(classify(status), Err(SinkError::Permanent(_))));
        }
    }
}
