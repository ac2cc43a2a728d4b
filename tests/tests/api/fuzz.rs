//! Random requests to every route of the OpenAPI document (proptest):
//! whatever the body, query, path id, credential and tenant header, the
//! answer is never a 5xx and always the documented JSON shape, `{"data":
//! …}` or `{"error": {"code", "message"}}` (DESIGN.md "HTTP conventions":
//! bad input gets a clear error, never a panic or a 500). Random
//! WebSocket frames from an agent and a customer likewise get only JSON
//! frames of the documented types (README "Frames"), or a documented
//! close, and the node keeps serving.

use livechat_tests::{App, Backend, check_property, test_runtime};
use poem::http::Method;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

/// A JSON value of the kinds that break parsers and databases: huge and
/// negative numbers, NUL, lone surrogates' replacement, long strings,
/// deep nesting, and the field names the routes know.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(json!(0)),
            Just(json!(-1)),
            Just(json!(1)),
            Just(json!(9_223_372_036_854_775_807_i64)),
            Just(json!(18_446_744_073_709_551_615_u64)),
            Just(json!(1e300)),
            Just(json!(0.5)),
        ],
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((field(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// A string of the kinds that break validation: empty, blank, invisible,
/// NUL, control characters, long, non-ASCII, UUID-like, numbers.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" \t\n".to_owned()),
        Just("\u{200B}\u{FEFF}".to_owned()),
        Just("a\u{0}b".to_owned()),
        Just("\u{1F469}\u{200D}\u{1F4BB} é 中文".to_owned()),
        Just("x".repeat(10_001)),
        Just("y".repeat(101)),
        Just(uuid::Uuid::nil().to_string()),
        Just("01".to_owned()),
        Just("-5".to_owned()),
        Just("online".to_owned()),
        Just("me".to_owned()),
        Just("ana@example.com".to_owned()),
        "[ -~]{0,40}",
        any::<String>(),
    ]
}

/// A body field name: mostly ones the routes read.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop_oneof![
            Just("message"),
            Just("client_msg_id"),
            Just("status"),
            Just("departments"),
            Just("agent_id"),
            Just("agent_capacity"),
            Just("topic"),
            Just("priority"),
            Just("department"),
            Just("contact"),
            Just("name"),
            Just("email"),
            Just("phone"),
            Just("browser_uuid"),
            Just("user_id"),
            Just("identity_hash"),
            Just("visitor_token"),
        ]
        .prop_map(str::to_owned),
        1 => "[a-z_]{1,12}",
    ]
}

/// One random request.
#[derive(Clone, Debug)]
struct Request {
    route: usize,
    id: IdKind,
    query: Vec<(String, String)>,
    body: Body,
    credential: Credential,
    tenant: TenantKind,
}

/// The `X-Tenant-ID` a request sends.
#[derive(Clone, Debug)]
enum TenantKind {
    /// The case's own tenant.
    Own,
    Missing,
    Raw(String),
}

#[derive(Clone, Debug)]
enum IdKind {
    Own,
    Random,
    Garbage(String),
}

#[derive(Clone, Debug)]
enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>),
    /// The route's valid body ([`template`]) with fields replaced
    /// (`Some`) or removed (`None`).
    Template(Vec<(String, Option<Value>)>),
}

/// A body the route accepts, for [`Body::Template`] to alter.
fn template(method: &Method, path: &str) -> Value {
    let write = *method != Method::GET;
    match path {
        "/livechat/agents/me/status" if write => {
            json!({"status": "online", "departments": ["Sales"]})
        }
        "/livechat/sessions/{id}/assign" => json!({"agent_id": 7}),
        "/livechat/sessions/{id}/messages" | "/livechat/customer/chats/{id}/messages" if write => {
            json!({"message": "hi", "client_msg_id": "k-1"})
        }
        "/livechat/settings/routing" if write => json!({"agent_capacity": 3}),
        "/livechat/customer/chats" if write => json!({
            "topic": "Help",
            "message": "Hello",
            "department": "Sales",
            "priority": "high",
            "browser_uuid": uuid::Uuid::now_v7(),
        }),
        "/livechat/customer/chats/{id}/contact" => {
            json!({"name": "Ana", "email": "ana@example.com"})
        }
        _ => json!({}),
    }
}

#[derive(Clone, Copy, Debug)]
enum Credential {
    None,
    Agent,
    OtherTenantAgent,
    Visitor,
    Garbage,
}

fn request() -> impl Strategy<Value = Request> {
    let id = prop_oneof![
        3 => Just(IdKind::Own),
        1 => Just(IdKind::Random),
        1 => "[ -~]{0,40}".prop_map(IdKind::Garbage),
    ];
    let query_name = prop_oneof![
        Just("limit"),
        Just("cursor"),
        Just("after_seq"),
        Just("status"),
        Just("agent_id"),
        Just("department"),
    ]
    .prop_map(str::to_owned);
    let query = proptest::collection::vec((query_name, string()), 0..3);
    let body = prop_oneof![
        1 => Just(Body::None),
        3 => json_value().prop_map(Body::Json),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Body::Raw),
        4 => proptest::collection::vec((field(), proptest::option::of(json_value())), 0..3)
            .prop_map(Body::Template),
    ];
    let credential = prop_oneof![
        1 => Just(Credential::None),
        3 => Just(Credential::Agent),
        1 => Just(Credential::OtherTenantAgent),
        3 => Just(Credential::Visitor),
        1 => Just(Credential::Garbage),
    ];
    let tenant = prop_oneof![
        6 => Just(TenantKind::Own),
        1 => Just(TenantKind::Missing),
        1 => string().prop_map(TenantKind::Raw),
    ];
    (any::<usize>(), id, query, body, credential, tenant).prop_map(
        |(route, id, query, body, credential, tenant)| Request {
            route,
            id,
            query,
            body,
            credential,
            tenant,
        },
    )
}

/// A route of the document: its method and path template.
#[derive(Debug)]
struct Route {
    method: Method,
    path: String,
}

/// The app and its routes.
struct Fixture {
    app: App,
    routes: Vec<Route>,
}

/// What one case's requests act on, in a tenant of its own: an agent
/// online with a session of their own, and a visitor's chat (served by
/// that agent) with its token.
struct Actors {
    tenant: i64,
    agent: i64,
    session: String,
    chat: String,
    visitor: String,
}

async fn actors(app: &App, tenant: i64) -> Actors {
    let agent = 7;
    let session = app.open_session(agent, tenant).await;
    let (code, started) = app
        .call(
            Method::POST,
            "/livechat/customer/chats",
            None,
            Some(&tenant.to_string()),
            Some(json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": "Fuzz", "message": "Hi"})),
        )
        .await;
    assert_eq!(code, 201, "{started}");
    let chat = started["data"]["session"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let visitor = format!(
        "Visitor {}",
        started["data"]["visitor_token"].as_str().unwrap()
    );
    Actors {
        tenant,
        agent,
        session,
        chat,
        visitor,
    }
}

async fn fixture(backend: Backend) -> Fixture {
    let app = App::new(backend).await;
    let (code, spec) = App::decode(app.client.get("/openapi.json").send().await).await;
    assert_eq!(code, 200);
    let mut routes = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            routes.push(Route {
                method,
                path: format!("/livechat{path}"),
            });
        }
    }
    assert!(
        routes.len() > 20,
        "the document lists the routes: {routes:?}"
    );
    Fixture { app, routes }
}

impl Fixture {
    async fn send(&self, actors: &Actors, r: &Request) -> Result<(), TestCaseError> {
        let route = &self.routes[r.route % self.routes.len()];
        let own = if route.path.contains("/customer/") {
            &actors.chat
        } else {
            &actors.session
        };
        let id = match &r.id {
            IdKind::Own => own.clone(),
            IdKind::Random => uuid::Uuid::now_v7().to_string(),
            IdKind::Garbage(g) => form_urlencoded::byte_serialize(g.as_bytes()).collect::<String>(),
        };
        let mut path = route.path.replace("{id}", &id);
        if !r.query.is_empty() {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&r.query)
                .finish();
            path = format!("{path}?{query}");
        }
        let mut req = self.app.client.request(route.method.clone(), &path);
        match r.credential {
            Credential::None => {}
            Credential::Agent => {
                req = req.header(
                    "Authorization",
                    format!("Bearer {}", App::agent(actors.agent)),
                );
            }
            Credential::OtherTenantAgent => {
                req = req.header(
                    "Authorization",
                    format!(
                        "Bearer {}",
                        App::token(8, &["SUPPORT_AGENT"], Some(&[actors.tenant + 1]))
                    ),
                );
            }
            Credential::Visitor => req = req.header("Authorization", actors.visitor.clone()),
            Credential::Garbage => req = req.header("Authorization", "Bearer x.y.z"),
        }
        let tenant = match &r.tenant {
            TenantKind::Own => Some(actors.tenant.to_string()),
            TenantKind::Missing => None,
            TenantKind::Raw(raw) => Some(raw.clone()),
        };
        if let Some(tenant) = tenant
            && let Ok(value) = poem::http::HeaderValue::from_str(&tenant)
        {
            req = req.header("X-Tenant-ID", value);
        }
        req = match &r.body {
            Body::None => req,
            Body::Json(v) => req.body_json(v),
            Body::Raw(bytes) => req
                .header("Content-Type", "application/json")
                .body(bytes.clone()),
            Body::Template(changes) => {
                let mut body = template(&route.method, &route.path);
                for (field, value) in changes {
                    match value {
                        Some(v) => body[field] = v.clone(),
                        None => {
                            body.as_object_mut().map(|o| o.remove(field));
                        }
                    }
                }
                req.body_json(&body)
            }
        };
        let resp = req.send().await;
        let status = resp.0.status();
        let is_ws = route.path.ends_with("/ws");
        let bytes = resp.0.into_body().into_vec().await.expect("body");
        let what = || format!("{} {path} {r:?}", route.method);
        prop_assert!(
            !status.is_server_error(),
            "{status} for {}: {}",
            what(),
            String::from_utf8_lossy(&bytes)
        );
        if is_ws && status.is_success() {
            return Ok(());
        }
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
            TestCaseError::fail(format!(
                "{status} not JSON ({e}) for {}: {}",
                what(),
                String::from_utf8_lossy(&bytes)
            ))
        })?;
        if status.is_success() {
            prop_assert!(body.get("data").is_some(), "{status} {body} for {}", what());
        } else {
            prop_assert!(
                body["error"]["code"].is_string() && body["error"]["message"].is_string(),
                "{status} {body} for {}",
                what()
            );
        }
        Ok(())
    }
}

livechat_tests::property_on_both_databases!(
    random_requests_get_documented_answers => fuzz(256, 96),
    random_websocket_frames_get_documented_answers => fuzz_websocket(64, 32),
);

fn fuzz(backend: Backend, cases: u32) {
    let runtime = test_runtime(2);
    let fixture = runtime.block_on(fixture(backend));
    // Each case has its own tenant, with its agent, session and chat.
    let next_tenant = std::sync::atomic::AtomicI64::new(1);
    check_property(
        cases,
        proptest::collection::vec(request(), 1..8),
        |requests| {
            runtime.block_on(async {
                let tenant = next_tenant.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
                let actors = actors(&fixture.app, tenant).await;
                for r in &requests {
                    fixture.send(&actors, r).await?;
                }
                Ok(())
            })
        },
    );
}

/// The server's frame types (README "Frames").
const SERVER_FRAMES: [&str; 13] = [
    "ready",
    "joined",
    "new_message",
    "ack",
    "typing",
    "read",
    "session_updated",
    "presence_updated",
    "queue_updated",
    "resync",
    "left",
    "pong",
    "error",
];

/// One random WebSocket frame from a client.
#[derive(Clone, Debug)]
enum Frame {
    /// A JSON object of a client type (or another), with random fields,
    /// `session_id` mostly the chat's.
    Json {
        customer: bool,
        ty: String,
        own_session: bool,
        /// Changes to the type's valid frame ([`frame_template`]): a
        /// field replaced (`Some`) or removed (`None`).
        fields: Vec<(String, Option<Value>)>,
    },
    /// Any text.
    Text { customer: bool, text: String },
    /// A binary frame.
    Binary { customer: bool, bytes: Vec<u8> },
}

fn frame() -> impl Strategy<Value = Frame> {
    let ty = prop_oneof![
        Just("auth"),
        Just("ping"),
        Just("join_session"),
        Just("leave_session"),
        Just("send_message"),
        Just("typing"),
        Just("read"),
        Just("JOIN_SESSION"),
    ]
    .prop_map(str::to_owned);
    let ty = prop_oneof![8 => ty, 1 => string()];
    let name = prop_oneof![
        Just("session_id"),
        Just("client_msg_id"),
        Just("message"),
        Just("state"),
        Just("seq"),
        Just("after_seq"),
        Just("token"),
        Just("tenant_id"),
        Just("type"),
    ]
    .prop_map(str::to_owned);
    let value = prop_oneof![
        Just(json!("start")),
        Just(json!("stop")),
        Just(json!(0)),
        Just(json!(3)),
        json_value(),
    ];
    prop_oneof![
        8 => (
            any::<bool>(),
            ty,
            proptest::bool::weighted(0.8),
            proptest::collection::vec((name, proptest::option::of(value)), 0..3)
        )
            .prop_map(|(customer, ty, own_session, fields)| Frame::Json {
                customer,
                ty,
                own_session,
                fields,
            }),
        1 => (any::<bool>(), string()).prop_map(|(customer, text)| Frame::Text { customer, text }),
        1 => (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(customer, bytes)| Frame::Binary { customer, bytes }),
    ]
}

/// A valid frame of type `ty` about `session`.
fn frame_template(ty: &str, session: livechat_core::SessionId) -> serde_json::Map<String, Value> {
    let frame = match ty {
        "join_session" => json!({"session_id": session, "after_seq": 0}),
        "leave_session" => json!({"session_id": session}),
        "send_message" => json!({"session_id": session, "client_msg_id": "k-1", "message": "hi"}),
        "typing" => json!({"session_id": session, "state": "start"}),
        "read" => json!({"session_id": session, "seq": 1}),
        "auth" => json!({"token": App::agent(7), "tenant_id": 1}),
        _ => json!({}),
    };
    let mut frame = frame.as_object().cloned().unwrap_or_default();
    frame.insert("type".into(), json!(ty));
    frame
}

/// Reads what `client` receives up to the `pong` for the ping sent after
/// `sent`: every frame JSON of a known type, an error with a code; or
/// the close, with a code the README names (`None` returned).
async fn answered(
    client: &mut livechat_tests::node::WsClient,
    sent: &Frame,
) -> Result<Option<()>, TestCaseError> {
    use livechat_tests::node::Incoming;

    if !client.try_send_text(r#"{"type":"ping"}"#).await {
        return Ok(None);
    }
    loop {
        match client
            .next_incoming(std::time::Duration::from_secs(10))
            .await
        {
            Incoming::Text(text) => {
                let frame: Value = serde_json::from_str(&text).map_err(|e| {
                    TestCaseError::fail(format!("not JSON ({e}): {text} after {sent:?}"))
                })?;
                let ty = frame["type"].as_str().unwrap_or_default();
                prop_assert!(SERVER_FRAMES.contains(&ty), "{frame} after {sent:?}");
                if ty == "error" {
                    // Bad input is refused, never an internal failure (the
                    // frames' 5xx).
                    let code = frame["code"].as_str().unwrap_or_default();
                    prop_assert!(
                        !code.is_empty()
                            && !matches!(code, "internal_error" | "unavailable")
                            && frame["message"].is_string(),
                        "{frame} after {sent:?}"
                    );
                }
                if ty == "pong" {
                    return Ok(Some(()));
                }
            }
            Incoming::Closed(code) => {
                // Policy (too many bad frames), too big, too slow.
                prop_assert!(
                    matches!(code, Some(1008 | 1009 | 1013)),
                    "closed with {code:?} after {sent:?}"
                );
                return Ok(None);
            }
            Incoming::Binary(bytes) => {
                return Err(TestCaseError::fail(format!(
                    "a binary frame ({} bytes) after {sent:?}",
                    bytes.len()
                )));
            }
            Incoming::Nothing => {
                return Err(TestCaseError::fail(format!("no pong after {sent:?}")));
            }
        }
    }
}

fn fuzz_websocket(backend: Backend, cases: u32) {
    use livechat_tests::node::{Node, WsClient};

    let runtime = test_runtime(2);
    let (_app, node, session) = runtime.block_on(Node::with_served_chat(backend, "Fuzz"));
    check_property(cases, proptest::collection::vec(frame(), 1..12), |frames| {
        // Tokens of each case's own (they expire after ten minutes).
        let agent = format!("Bearer {}", App::agent(7));
        let customer = format!("Bearer {}", App::token(900, &["USER"], Some(&[1])));
        runtime.block_on(async {
            let connect = |auth: String| {
                let url = node.ws_url();
                async move {
                    let mut c = WsClient::connect_with_header(&url, &auth, 1)
                        .await
                        .expect("handshake");
                    c.expect("ready").await;
                    c
                }
            };
            let mut clients = [
                Some(connect(agent.clone()).await),
                Some(connect(customer.clone()).await),
            ];
            for sent in &frames {
                let (customer, sent_ok) = match sent {
                    Frame::Json {
                        customer,
                        ty,
                        own_session,
                        fields,
                    } => {
                        let mut object = frame_template(ty, session);
                        if !*own_session && object.contains_key("session_id") {
                            object.insert("session_id".into(), json!(uuid::Uuid::now_v7()));
                        }
                        for (name, value) in fields {
                            match value {
                                Some(v) => object.insert(name.clone(), v.clone()),
                                None => object.remove(name),
                            };
                        }
                        let text = Value::Object(object).to_string();
                        match clients[usize::from(*customer)].as_mut() {
                            Some(c) => (*customer, c.try_send_text(&text).await),
                            None => continue,
                        }
                    }
                    Frame::Text { customer, text } => {
                        match clients[usize::from(*customer)].as_mut() {
                            Some(c) => (*customer, c.try_send_text(text).await),
                            None => continue,
                        }
                    }
                    Frame::Binary { customer, bytes } => {
                        match clients[usize::from(*customer)].as_mut() {
                            Some(c) => (*customer, c.try_send_binary(bytes).await),
                            None => continue,
                        }
                    }
                };
                let slot = &mut clients[usize::from(customer)];
                let open = match (sent_ok, slot.as_mut()) {
                    (true, Some(c)) => answered(c, sent).await?.is_some(),
                    _ => false,
                };
                if !open {
                    *slot = None;
                }
            }
            // The node still serves: a new connection is ready and pongs.
            let mut fresh = connect(agent.clone()).await;
            prop_assert!(answered(&mut fresh, &frames[0]).await?.is_some());
            Ok(())
        })
    });
}
