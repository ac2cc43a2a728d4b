//! The example host: login with seeded users, health, OpenAPI, unknown
//! routes, and the library on a connection the host opened itself.

use livechat_tests::{App, Backend, TestDb, on_both_databases};
use poem::http::Method;
use serde_json::json;

on_both_databases!(
    seeded_login_drives_the_library,
    migrations_on_a_host_connection
);

async fn seeded_login_drives_the_library(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    // Seeding twice is idempotent.
    livechat_example_server::prepare_database(&test_db.url)
        .await
        .unwrap();
    let db = livechat_example_server::prepare_database(&test_db.url)
        .await
        .unwrap();
    let config = livechat_example_server::Config::new(&test_db.url, "host-secret");
    let client = poem::test::TestClient::new(livechat_example_server::app(db.clone(), &config));

    let login = |email: &'static str, password: &'static str| {
        client
            .post("/auth/login")
            .body_json(&json!({"email": email, "password": password}))
            .send()
    };
    let (code, body) = App::decode(login("agent1@livechat.com", "password").await).await;
    assert_eq!(code, 200, "{body}");
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    let token = body["access_token"].as_str().unwrap().to_owned();
    let agent_id = body["user"]["id"].as_i64().unwrap();

    for (email, password) in [
        ("agent1@livechat.com", "wrong"),
        ("nobody@livechat.com", "password"),
    ] {
        let (code, body) = App::decode(login(email, password).await).await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (401, Some("invalid_credentials"))
        );
    }
    let resp = client
        .post("/auth/login")
        .content_type("application/json")
        .body("{")
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_body", "{body}");
    // Without a JSON content type (a form's, or none), with the wrong
    // fields, or not an object (serde reads a struct from an array too):
    // 400 too (not 415). The JSON type with a charset is JSON.
    let good = r#"{"email": "agent1@livechat.com", "password": "password"}"#;
    for (content_type, raw, expected) in [
        (None, good, 400),
        (Some("text/plain"), good, 400),
        (Some("application/x-www-form-urlencoded"), good, 400),
        (Some("application/json"), r#"{"mail": 5}"#, 400),
        (
            Some("application/json"),
            r#"["agent1@livechat.com", "password"]"#,
            400,
        ),
        (Some("Application/JSON; charset=utf-8"), good, 200),
    ] {
        let mut req = client.post("/auth/login").body(raw);
        if let Some(content_type) = content_type {
            req = req.content_type(content_type);
        }
        let resp = req.send().await;
        assert_eq!(
            resp.0
                .headers()
                .get("cache-control")
                .and_then(|v| v.to_str().ok()),
            Some("no-store"),
            "every login answer, the token's above all"
        );
        let (code, body) = App::decode(resp).await;
        assert_eq!(code, expected, "{content_type:?} {raw}: {body}");
        if expected == 400 {
            assert_eq!(body["error"]["code"], "invalid_body", "{body}");
        }
    }
    // A body past the login's limit is refused unread: 413.
    let resp = client
        .post("/auth/login")
        .content_type("application/json")
        .body(format!(
            r#"{{"email": "a@b.co", "password": "{}"}}"#,
            "x".repeat(64 * 1024)
        ))
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    // The login token drives the library.
    let call = |method: Method, path: &str, body: Option<serde_json::Value>| {
        let mut req = client
            .request(method, path)
            .header("Authorization", format!("Bearer {token}"))
            .header("X-Tenant-ID", "1");
        if let Some(b) = body {
            req = req.body_json(&b);
        }
        req.send()
    };
    let (code, _) = App::decode(
        call(
            Method::PUT,
            "/livechat/agents/me/status",
            Some(json!({"status": "online"})),
        )
        .await,
    )
    .await;
    assert_eq!(code, 200);
    let (code, s) =
        App::decode(call(Method::POST, "/livechat/sessions", Some(json!({}))).await).await;
    assert_eq!(code, 201, "{s}");
    assert_eq!(s["data"]["agent_id"], agent_id);

    // Customers chat in the host's own tenants only (its `host_tenants`
    // table: 1 and 2); another is refused before anything is stored.
    let start = |tenant: &'static str| {
        client
            .post("/livechat/customer/chats")
            .header("X-Tenant-ID", tenant)
            .body_json(&json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": "Hours"}))
            .send()
    };
    let sessions = || livechat_tests::count_rows(&db, "livechat_sessions");
    let before = sessions().await;
    for tenant in ["3", "999"] {
        let (code, body) = App::decode(start(tenant).await).await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_tenant")),
            "{tenant}: {body}"
        );
        let resp = client
            .get("/livechat/customer/availability")
            .header("X-Tenant-ID", tenant)
            .send()
            .await;
        let (code, body) = App::decode(resp).await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_tenant")),
            "{tenant}: {body}"
        );
    }
    assert_eq!(sessions().await, before, "nothing stored");
    let (code, body) = App::decode(start("2").await).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(sessions().await, before + 1);

    let (code, health) = App::decode(client.get("/health").send().await).await;
    assert_eq!(code, 200);
    assert_eq!(health["status"], "ok");

    // The OpenAPI document lists every route and its error responses.
    let (code, spec) = App::decode(client.get("/openapi.json").send().await).await;
    assert_eq!(code, 200);
    assert_eq!(spec["servers"][0]["url"], "/livechat");
    for (path, method) in [
        ("/agents/me/status", "put"),
        ("/sessions", "post"),
        ("/sessions", "get"),
        ("/sessions/{id}", "get"),
        ("/sessions/{id}/close", "post"),
        ("/sessions/{id}/messages", "post"),
        ("/sessions/{id}/messages", "get"),
    ] {
        let op = &spec["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing from the spec");
        for status in ["400", "401", "403", "404", "413", "500"] {
            assert!(
                op["responses"][status].is_object(),
                "{method} {path} lacks {status}"
            );
        }
    }
    // Every operation lists the tenant header; the customer routes their
    // credential, optional only where a chat starts by `browser_uuid`.
    let mut operations = 0;
    // (`/ws` takes the header only with header credentials: below.)
    for (path, item) in spec["paths"].as_object().unwrap() {
        if path == "/ws" {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            assert!(
                op["parameters"].as_array().is_some_and(|p| p
                    .iter()
                    .any(|p| p["name"] == "X-Tenant-ID"
                        && p["in"] == "header"
                        && p["required"] == true)),
                "{method} {path} lacks X-Tenant-ID"
            );
            let security = &op["security"];
            if path.starts_with("/customer/") && path != "/customer/availability" {
                assert_eq!(security[0]["CustomerAuth"], json!([]), "{method} {path}");
                assert_eq!(
                    security.as_array().unwrap().len(),
                    if (path.as_str(), method.as_str()) == ("/customer/chats", "post") {
                        2
                    } else {
                        1
                    },
                    "{method} {path}: {security}"
                );
            }
        }
    }
    assert!(operations > 20, "{operations} operations");
    assert_eq!(
        spec["components"]["securitySchemes"]["CustomerAuth"]["name"],
        "Authorization"
    );
    // Schemas carry the wire names, not the Rust types' `Dto` names.
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    for name in ["PresenceStatus", "SessionStatus", "Priority", "ChatMessage"] {
        assert!(schemas.contains_key(name), "{name}: {:?}", schemas.keys());
    }
    assert!(
        !schemas.keys().any(|k| k.contains("Dto")),
        "{:?}",
        schemas.keys()
    );
    // Optional properties may be `null`, as the API writes them; required
    // ones not.
    let session = &schemas["ChatSession"]["properties"];
    for name in [
        "agent_id",
        "closed_at",
        "contact",
        "ticket_id",
        "queue_position",
    ] {
        assert_eq!(session[name]["nullable"], true, "ChatSession.{name}");
    }
    for name in ["id", "status", "created_at"] {
        assert!(
            session[name].get("nullable").is_none(),
            "ChatSession.{name}"
        );
    }
    assert_eq!(
        schemas["ChatStart"]["properties"]["ticket"]["nullable"],
        true
    );
    // Error responses an operation never gives are left out.
    let statuses = |path: &str, method: &str| -> Vec<String> {
        spec["paths"][path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path}"))
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        statuses("/customer/availability", "get"),
        ["200", "400", "413", "500", "503"]
    );
    let list = statuses("/sessions", "get");
    assert!(
        !list.contains(&"409".to_owned()) && list.contains(&"401".to_owned()),
        "{list:?}"
    );
    // A ticket read answers 409 while its opening is in the outbox.
    let ticket = statuses("/tickets/{id}", "get");
    assert!(ticket.contains(&"409".to_owned()), "{ticket:?}");
    let assign = statuses("/sessions/{id}/assign", "post");
    assert!(
        assign.contains(&"409".to_owned()) && assign.contains(&"413".to_owned()),
        "{assign:?}"
    );
    // Only a customer's start and message are rate limited.
    for (path, method, limited) in [
        ("/customer/chats", "post", true),
        ("/customer/chats/{id}/messages", "post", true),
        ("/sessions/{id}/messages", "post", false),
        ("/customer/chats/{id}/messages", "get", false),
    ] {
        assert_eq!(
            statuses(path, method).contains(&"429".to_owned()),
            limited,
            "{method} {path}"
        );
    }
    // The WebSocket route too, with the same error envelope.
    let envelope = &spec["paths"]["/sessions"]["post"]["responses"]["401"]["content"];
    assert!(
        envelope.as_object().is_some_and(|c| !c.is_empty()),
        "{envelope}"
    );
    let ws = &spec["paths"]["/ws"]["get"];
    assert_eq!(ws["operationId"], "open_websocket", "{ws}");
    assert!(ws["responses"]["101"].is_object());
    for status in ["400", "401", "403", "429", "503"] {
        assert_eq!(
            &ws["responses"][status]["content"], envelope,
            "/ws {status}"
        );
    }
    // Its 429 (too many connections) announces `Retry-After` as the
    // rate-limited routes' do.
    let retry_after = |responses: &serde_json::Value| {
        let header = &responses["429"]["headers"]["RETRY-AFTER"];
        (header["schema"].clone(), header["required"].clone())
    };
    assert_eq!(
        retry_after(&ws["responses"]),
        retry_after(&spec["paths"]["/customer/chats"]["post"]["responses"]),
        "{}",
        spec["paths"]["/customer/chats"]["post"]["responses"]["429"]
    );
    assert!(retry_after(&ws["responses"]).0.is_object(), "{ws}");
    assert!(
        ws["parameters"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "X-Tenant-ID")),
        "{ws}"
    );
    let docs = client.get("/docs").send().await;
    docs.assert_status_is_ok();
    let page = docs.0.into_body().into_string().await.unwrap();
    assert!(
        page.contains("open_websocket"),
        "the docs page shows /ws too"
    );

    // Unknown routes and methods answer in the envelope too.
    let (code, body) = App::decode(call(Method::GET, "/livechat/nope", None).await).await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // A 405 names the methods the route answers (RFC 9110 §15.5.6).
    let session = s["data"]["id"].as_str().unwrap();
    for (method, path, allowed) in [
        (
            Method::DELETE,
            "/livechat/sessions".to_owned(),
            "GET, HEAD, POST",
        ),
        (
            Method::PUT,
            format!("/livechat/sessions/{session}/messages"),
            "GET, HEAD, POST",
        ),
        (
            Method::GET,
            format!("/livechat/sessions/{session}/close"),
            "POST",
        ),
        (Method::POST, "/livechat/ws".to_owned(), "GET, HEAD"),
        // The example host's own routes too.
        (Method::DELETE, "/health".to_owned(), "GET, HEAD"),
        (Method::GET, "/auth/login".to_owned(), "POST"),
    ] {
        let resp = call(method.clone(), &path, None).await;
        let mut allow: Vec<String> = resp
            .0
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{method} {path}: no Allow"))
            .split(", ")
            .map(str::to_owned)
            .collect();
        allow.sort();
        assert_eq!(allow.join(", "), allowed, "{method} {path}");
        let (code, body) = App::decode(resp).await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (405, Some("method_not_allowed")),
            "{method} {path}"
        );
    }
}

/// A host runs our migrator on a connection it opened itself and hands the
/// store that connection.
async fn migrations_on_a_host_connection(backend: Backend) {
    use livechat_core::store::{Migrator, SeaOrmStore};
    use livechat_core::{ChatConfig, ChatService, PresenceStatus, TenantId, UserId};
    use sea_orm_migration::MigratorTrait;

    let test_db = TestDb::new(backend).await;
    let db = sea_orm::Database::connect(test_db.url.as_str())
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();
    Migrator::up(&db, None).await.unwrap(); // already applied: no-op
    let chat = ChatService::new(
        SeaOrmStore::new(db.clone()),
        ChatConfig {
            max_message_chars: 5,
            ..ChatConfig::default()
        },
    );
    let (t, a) = (TenantId::new(3).unwrap(), UserId::new(4).unwrap());
    chat.set_agent_status(t, a, PresenceStatus::Online)
        .await
        .unwrap();
    let s = chat.start_session(t, a, None).await.unwrap();
    assert_eq!(
        chat.post_message(t, a, s.id, "12345".into(), None)
            .await
            .unwrap()
            .message
            .seq,
        1
    );
    assert!(matches!(
        chat.post_message(t, a, s.id, "123456".into(), None).await,
        Err(livechat_core::ChatError::MessageTooLong { max: 5 })
    ));
    // The latest migrations (m0004's rebuild of the messages table and
    // the six after it) roll back and apply again over stored rows.
    Migrator::down(&db, Some(7)).await.unwrap();
    Migrator::up(&db, None).await.unwrap();
    chat.set_agent_status(t, a, PresenceStatus::Away)
        .await
        .unwrap();
    assert_eq!(
        chat.post_message(t, a, s.id, "ok".into(), None)
            .await
            .unwrap()
            .message
            .seq,
        2
    );

    // The library's routes on that connection, with visitor tokens of an
    // hour, for the host's tenant 3 alone (its tenant 5 cannot be read).
    let livechat = livechat_poem::Livechat::new(
        chat,
        std::sync::Arc::new(livechat_poem::JwtAuthenticator::hs256(b"host secret")),
        b"visitor secret",
    )
    .visitor_token_ttl(std::time::Duration::from_secs(3600))
    .tenants(std::sync::Arc::new(HostTenants));
    let client =
        poem::test::TestClient::new(poem::Route::new().nest("/livechat", livechat.endpoint()));
    let resp = client
        .post("/livechat/customer/chats")
        .header("X-Tenant-ID", "3")
        .body_json(&json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": "Hours"}))
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(code, 201, "{body}");
    let token = body["data"]["visitor_token"].as_str().unwrap();
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    };
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600,
        "{claims}"
    );
    // A tenant the host does not have gets no chat, and nothing is stored.
    let sessions = || livechat_tests::count_rows(&db, "livechat_sessions");
    let before = sessions().await;
    for (tenant, status, code) in [("4", 400, "invalid_tenant"), ("5", 503, "unavailable")] {
        let resp = client
            .post("/livechat/customer/chats")
            .header("X-Tenant-ID", tenant)
            .body_json(&json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": "Hours"}))
            .send()
            .await;
        let (got, body) = App::decode(resp).await;
        assert_eq!(
            (got.as_u16(), body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        let resp = client
            .get("/livechat/customer/availability")
            .header("X-Tenant-ID", tenant)
            .send()
            .await;
        let (got, body) = App::decode(resp).await;
        assert_eq!(got.as_u16(), status, "{body}");
    }
    assert_eq!(sessions().await, before);

    // A gateway whose pings would come after its connections expired is
    // refused when it is set up.
    let bus: std::sync::Arc<dyn livechat_core::bus::EventBus> =
        std::sync::Arc::new(livechat_core::bus::InProcessBus::new());
    let late_pings = livechat_poem::RealtimeConfig {
        ping_interval: std::time::Duration::from_secs(60),
        connection_ttl: std::time::Duration::from_secs(60),
        ..livechat_poem::RealtimeConfig::default()
    };
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        livechat.clone().realtime(bus, late_pings)
    }));
    assert!(refused.is_err());
}

/// The host's tenants in [`migrations_on_a_host_connection`]: 3 offers
/// chat, 5 cannot be read (its database is down), no other exists.
struct HostTenants;

#[async_trait::async_trait]
impl livechat_poem::TenantDirectory for HostTenants {
    async fn offers_chat(&self, tenant: livechat_core::TenantId) -> Result<bool, String> {
        match tenant.get() {
            5 => Err("the host's database is down".into()),
            n => Ok(n == 3),
        }
    }
}
