//! Random requests to every route of the OpenAPI document (proptest):
//! whatever the body, query, path id, credential and tenant header, the
//! answer is never a 5xx and always the documented JSON shape, `{"data":
//! …}` or `{"error": {"code", "message"}}` (DESIGN.md "HTTP conventions":
//! bad input gets a clear error, never a panic or a 500).

use livechat_tests::{App, Backend};
use poem::http::Method;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
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

fn fuzz(backend: Backend, cases: u32) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fixture = runtime.block_on(fixture(backend));
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    // Each case has its own tenant, with its agent, session and chat.
    let next_tenant = std::sync::atomic::AtomicI64::new(1);
    let result = runner.run(&proptest::collection::vec(request(), 1..8), |requests| {
        runtime.block_on(async {
            let tenant = next_tenant.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
            let actors = actors(&fixture.app, tenant).await;
            for r in &requests {
                fixture.send(&actors, r).await?;
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn random_requests_get_documented_answers_on_sqlite() {
    fuzz(Backend::Sqlite, 256);
}

#[test]
fn random_requests_get_documented_answers_on_postgres() {
    fuzz(Backend::Postgres, 96);
}
