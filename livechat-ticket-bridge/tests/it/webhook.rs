//! `WebhookSink` against a real local HTTP server that records what it
//! receives and answers with a chosen status.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livechat_core::{CustomerId, EventId, TicketId};
use livechat_ticket_bridge::{
    EVENT_ID_HEADER, NotificationSink, SIGNATURE_HEADER, SinkError, TIMESTAMP_HEADER, TicketSink,
    Url, WebhookSink, verify_signature,
};
use poem::http::StatusCode;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{Request, Server, endpoint::make};
use serde_json::Value;

use crate::{agent_reply, customer_request, tenant};

const SECRET: &[u8] = b"whsec_test";

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
struct Received {
    event_id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Starts a receiver on 127.0.0.1 that answers `status` (after `delay`).
async fn receiver(status: StatusCode, delay: Duration) -> (Url, Arc<Mutex<Vec<Received>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let app = make(move |mut req: Request| {
        let seen = seen.clone();
        async move {
            let header = |name: &str| req.header(name).unwrap_or_default().to_owned();
            let (event_id, timestamp, signature, content_type) = (
                header(EVENT_ID_HEADER),
                header(TIMESTAMP_HEADER),
                header(SIGNATURE_HEADER),
                header("content-type"),
            );
            let body = req.take_body().into_vec().await.unwrap();
            seen.lock().unwrap().push(Received {
                event_id,
                timestamp,
                signature,
                content_type,
                body,
            });
            tokio::time::sleep(delay).await;
            status
        }
    });
    (serve(app).await, log)
}

/// Serves `app` on 127.0.0.1: the URL of its `/hooks/livechat`.
async fn serve(app: impl poem::Endpoint + 'static) -> Url {
    let acceptor = TcpListener::bind("127.0.0.1:0")
        .into_acceptor()
        .await
        .unwrap();
    let addr: SocketAddr = *acceptor.local_addr()[0].as_socket_addr().unwrap();
    tokio::spawn(Server::new_with_acceptor(acceptor).run(app));
    format!("http://{addr}/hooks/livechat").parse().unwrap()
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn only(log: &Mutex<Vec<Received>>) -> Received {
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1, "exactly one request");
    log[0].clone()
}

#[tokio::test]
async fn ticket_request_is_posted_signed() {
    let (url, log) = receiver(StatusCode::NO_CONTENT, Duration::ZERO).await;
    let sink = WebhookSink::new(url, SECRET);
    let request = customer_request(tenant(3), "Refund");
    let key = EventId::generate();
    sink.open_ticket(&request, key).await.unwrap();

    let got = only(&log);
    assert_eq!(got.event_id, key.to_string());
    assert_eq!(got.content_type, "application/json");
    assert!((now_unix() - got.timestamp.parse::<i64>().unwrap()).abs() <= 5);
    assert!(verify_signature(
        SECRET,
        &got.timestamp,
        &got.body,
        &got.signature,
        now_unix(),
        300
    ));
    // A receiver with another secret, or one checking an hour later, refuses it.
    assert!(!verify_signature(
        b"not-the-secret",
        &got.timestamp,
        &got.body,
        &got.signature,
        now_unix(),
        300
    ));
    assert!(!verify_signature(
        SECRET,
        &got.timestamp,
        &got.body,
        &got.signature,
        now_unix() + 3600,
        300
    ));

    let body = got.json();
    assert_eq!(body["event_id"], key.to_string());
    assert_eq!(body["type"], "ticket.requested");
    assert_eq!(body["tenant_id"], 3);
    assert_eq!(body["data"]["ticket_id"], request.ticket_id.to_string());
    assert_eq!(body["data"]["topic"], "Refund");
}

#[tokio::test]
async fn close_and_notification_have_their_types() {
    let (url, log) = receiver(StatusCode::OK, Duration::ZERO).await;
    let sink = WebhookSink::new(url, SECRET);
    let ticket = TicketId::generate();
    let close_key = EventId::generate();
    sink.close_ticket(tenant(1), ticket, close_key)
        .await
        .unwrap();
    let customer = CustomerId::generate();
    let (key, notification) = agent_reply(tenant(1), customer);
    sink.notify(&notification, key).await.unwrap();

    let log = log.lock().unwrap();
    assert_eq!(log.len(), 2);
    let closed = log[0].json();
    assert_eq!(closed["type"], "ticket.closed");
    assert_eq!(closed["event_id"], close_key.to_string());
    assert_eq!(closed["data"], serde_json::json!({"ticket_id": ticket}));
    let notified = log[1].json();
    assert_eq!(notified["type"], "notification.created");
    assert_eq!(notified["data"]["customer_id"], customer.to_string());
    assert_eq!(notified["data"]["kind"], "agent_reply");
    for r in log.iter() {
        assert!(verify_signature(
            SECRET,
            &r.timestamp,
            &r.body,
            &r.signature,
            now_unix(),
            300
        ));
    }
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retryable() {
    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let (url, log) = receiver(status, Duration::ZERO).await;
        let sink = WebhookSink::new(url, SECRET);
        let result = sink
            .open_ticket(&customer_request(tenant(1), "x"), EventId::generate())
            .await;
        assert!(
            matches!(result, Err(SinkError::Retryable(_))),
            "{status}: {result:?}"
        );
        only(&log);
    }
}

#[tokio::test]
async fn client_errors_are_permanent() {
    for status in [StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND] {
        let (url, log) = receiver(status, Duration::ZERO).await;
        let sink = WebhookSink::new(url, SECRET);
        let result = sink
            .open_ticket(&customer_request(tenant(1), "x"), EventId::generate())
            .await;
        assert!(
            matches!(result, Err(SinkError::Permanent(_))),
            "{status}: {result:?}"
        );
        only(&log);
    }
}

/// A receiver answering 302 to a path that accepts anything: the sink
/// does not follow it (a followed 302 turns the POST into a body-less
/// GET, whose 200 would settle the event undelivered), so the event
/// fails as permanent and only the POST reached the receiver.
#[tokio::test]
async fn redirects_are_not_followed() {
    use poem::{IntoResponse, Response};
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    let app = make(move |req: Request| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .push((req.method().to_string(), req.uri().path().to_owned()));
            if req.uri().path() == "/hooks/livechat" {
                Response::builder()
                    .status(StatusCode::FOUND)
                    .header("Location", "/elsewhere")
                    .finish()
            } else {
                StatusCode::OK.into_response()
            }
        }
    });
    let result = WebhookSink::new(serve(app).await, SECRET)
        .open_ticket(&customer_request(tenant(1), "x"), EventId::generate())
        .await;
    assert!(matches!(result, Err(SinkError::Permanent(_))), "{result:?}");
    assert_eq!(
        *hits.lock().unwrap(),
        [("POST".to_owned(), "/hooks/livechat".to_owned())]
    );
}

/// A delivery error names no part of the URL, whose query may carry a
/// secret: the error is stored in the outbox and logged.
#[tokio::test]
async fn errors_do_not_carry_the_url() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url: Url = format!("http://user:pa55word@{addr}/hook?token=s3cr3t")
        .parse()
        .unwrap();
    let result = WebhookSink::new(url, SECRET)
        .open_ticket(&customer_request(tenant(1), "x"), EventId::generate())
        .await;
    let Err(SinkError::Retryable(message)) = result else {
        panic!("{result:?}");
    };
    for secret in ["s3cr3t", "pa55word", "/hook"] {
        assert!(!message.contains(secret), "{message}");
    }
}

#[tokio::test]
async fn unreachable_receiver_is_retryable() {
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sink = WebhookSink::new(format!("http://{addr}/").parse().unwrap(), SECRET);
    let result = sink
        .open_ticket(&customer_request(tenant(1), "x"), EventId::generate())
        .await;
    assert!(matches!(result, Err(SinkError::Retryable(_))), "{result:?}");
}

#[tokio::test]
async fn slow_receiver_times_out_as_retryable() {
    let (url, log) = receiver(StatusCode::OK, Duration::from_secs(5)).await;
    let sink = WebhookSink::new(url, SECRET).with_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let result = sink
        .open_ticket(&customer_request(tenant(1), "x"), EventId::generate())
        .await;
    assert!(matches!(result, Err(SinkError::Retryable(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    only(&log);
}
