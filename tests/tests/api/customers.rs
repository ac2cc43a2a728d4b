//! Customer routes (issue #3): credentials, start, messages, contact,
//! close, history, linking, identity hashes, validation and isolation.

use livechat_tests::{App, Backend, on_both_databases};
use poem::http::Method;
use serde_json::{Value, json};

on_both_databases!(
    anonymous_visitor_chats_with_an_agent,
    second_start_returns_the_active_session,
    identified_user_with_host_token,
    identity_hash_asserts_a_user,
    start_validation,
    contact_history_and_close,
    a_waiting_customer_s_contact_answer_has_its_place,
    linking_moves_visitor_sessions,
    linking_keeps_the_chat_an_agent_serves,
    a_start_that_resolved_the_visitor_before_a_link_is_the_users,
    steps_that_resolved_the_visitor_before_a_link_act_as_the_user,
    customers_are_isolated,
    a_key_is_its_senders_own,
    a_user_agent_past_ascii_is_kept,
);

/// Sends a customer request with `Authorization: <auth>` (e.g. `Visitor x`).
async fn customer(
    app: &App,
    method: Method,
    path: &str,
    auth: Option<&str>,
    tenant: &str,
    body: Option<Value>,
) -> (poem::http::StatusCode, Value) {
    let mut req = app
        .client
        .request(method, path)
        .header("X-Tenant-ID", tenant);
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    if let Some(body) = body {
        req = req.body_json(&body);
    }
    App::decode(req.send().await).await
}

/// An anonymous start; returns (session id, "Visitor <token>").
async fn visitor_start(app: &App, tenant: &str, topic: &str) -> (String, String, Value) {
    let (code, body) = customer(
        app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        tenant,
        Some(json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": topic})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let id = body["data"]["session"]["id"].as_str().unwrap().to_owned();
    let token = format!(
        "Visitor {}",
        body["data"]["visitor_token"].as_str().unwrap()
    );
    (id, token, body)
}

async fn anonymous_visitor_chats_with_an_agent(backend: Backend) {
    let app = App::new(backend).await;
    app.go_online(7, 1).await;
    let (code, avail) = customer(
        &app,
        Method::GET,
        "/livechat/customer/availability",
        None,
        "1",
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        avail["data"],
        json!({"agents_available": true, "agents_online": true})
    );

    let browser = uuid::Uuid::now_v7();
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "1",
        Some(json!({
            "browser_uuid": browser,
            "topic": "Cannot log in",
            "priority": "high",
            "department": "Support",
            "contact": {"name": "Ana", "email": "ana@example.com"},
            "message": "Hello, I need help"
        })),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let data = &body["data"];
    let session = &data["session"];
    assert_eq!(session["status"], "OPEN", "routed to the online agent");
    assert_eq!(session["agent_id"], 7);
    assert_eq!(session["topic"], "Cannot log in");
    assert_eq!(session["priority"], "high");
    assert_eq!(session["department"], "Support");
    assert_eq!(session["contact"]["email"], "ana@example.com");
    assert_eq!(session["customer_id"], data["customer_id"]);
    assert!(data.get("ticket").is_none());
    let id = session["id"].as_str().unwrap();
    let auth = format!("Visitor {}", data["visitor_token"].as_str().unwrap());

    // The first message is seq 1 from the customer.
    let path = format!("/livechat/customer/chats/{id}/messages");
    let (code, msgs) = customer(&app, Method::GET, &path, Some(&auth), "1", None).await;
    assert_eq!(code, 200, "{msgs}");
    assert_eq!(msgs["data"][0]["seq"], 1);
    assert_eq!(msgs["data"][0]["sender_type"], "customer");
    assert_eq!(msgs["data"][0]["sender_id"], Value::Null);
    assert_eq!(msgs["data"][0]["customer_id"], data["customer_id"]);

    // The agent answers over the agent route, the customer replies.
    let (code, reply) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{id}/messages"),
            7,
            1,
            Some(json!({"message": "Hi Ana"})),
        )
        .await;
    assert_eq!(code, 201, "{reply}");
    assert_eq!(reply["data"]["sender_type"], "agent");
    let (code, mine) = customer(
        &app,
        Method::POST,
        &path,
        Some(&auth),
        "1",
        Some(json!({"message": "Thanks", "client_msg_id": "w-1"})),
    )
    .await;
    assert_eq!(code, 201, "{mine}");
    assert_eq!(mine["data"]["seq"], 3);
    let (code, again) = customer(
        &app,
        Method::POST,
        &path,
        Some(&auth),
        "1",
        Some(json!({"message": "Thanks", "client_msg_id": "w-1"})),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(again, mine);
    let (_, msgs) = customer(
        &app,
        Method::GET,
        &format!("{path}?after_seq=1"),
        Some(&auth),
        "1",
        None,
    )
    .await;
    let seqs: Vec<i64> = msgs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![2, 3]);

    let (code, got) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{id}"),
        Some(&auth),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(got["data"]["status"], "OPEN");
    assert_eq!(got["data"]["queue_position"], Value::Null);

    // No credential at all on a customer route is 401.
    let (code, body) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{id}"),
        None,
        "1",
        None,
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, _) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{id}"),
        Some("Visitor forged"),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 401);
}

async fn second_start_returns_the_active_session(backend: Backend) {
    let app = App::new(backend).await;
    let (id, auth, _) = visitor_start(&app, "1", "First").await;
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&auth),
        "1",
        Some(json!({"topic": "Second"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["session"]["id"], id.as_str());
    assert_eq!(body["data"]["session"]["topic"], "First");
    assert!(body["data"].get("visitor_token").is_none());

    // A repeated start's message is added to the active chat, once per
    // idempotency key (body or header); without a key, once per start.
    let texts = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["sender_type"], "customer", "{m}");
                m["message"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let messages = format!("/livechat/customer/chats/{id}/messages");
    for (start, expected, seq, duplicate) in [
        (
            json!({"topic": "Again", "message": "B"}),
            vec!["B"],
            1,
            false,
        ),
        (
            json!({"topic": "Again", "message": "C", "client_msg_id": "c-1"}),
            vec!["B", "C"],
            2,
            false,
        ),
        (
            json!({"topic": "Again", "message": "C", "client_msg_id": "c-1"}),
            vec!["B", "C"],
            2,
            true,
        ),
        // A key already used answers the original, whatever the text.
        (
            json!({"topic": "Again", "message": "other", "client_msg_id": "c-1"}),
            vec!["B", "C"],
            2,
            true,
        ),
    ] {
        let (code, body) = customer(
            &app,
            Method::POST,
            "/livechat/customer/chats",
            Some(&auth),
            "1",
            Some(start),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["data"]["session"]["id"], id.as_str());
        assert_eq!(body["data"]["start_message"]["seq"], seq, "{body}");
        assert_eq!(body["data"]["start_message"]["session_id"], id.as_str());
        assert_eq!(body["data"]["start_message_duplicate"], duplicate, "{body}");
        let (code, list) = customer(&app, Method::GET, &messages, Some(&auth), "1", None).await;
        assert_eq!(code, 200, "{list}");
        assert_eq!(texts(&list), expected);
    }
    let repeat = |key: poem::http::HeaderValue| {
        app.client
            .post("/livechat/customer/chats")
            .header("X-Tenant-ID", "1")
            .header("Authorization", &auth)
            .header("Idempotency-Key", key)
            .body_json(&json!({"topic": "Again", "message": "D"}))
            .send()
    };
    let (code, body) = App::decode(repeat("d-1".try_into().unwrap()).await).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = App::decode(repeat("d-1".try_into().unwrap()).await).await;
    assert_eq!(code, 200, "{body}");
    // A key poem-openapi would skip as no header is refused, not ignored.
    let latin1 = poem::http::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let (code, body) = App::decode(repeat(latin1).await).await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{body}"
    );
    // Body and header keys that differ are refused.
    let (code, body) = App::decode(
        app.client
            .post("/livechat/customer/chats")
            .header("X-Tenant-ID", "1")
            .header("Authorization", &auth)
            .header("Idempotency-Key", "x-1")
            .body_json(&json!({"topic": "Again", "message": "E", "client_msg_id": "x-2"}))
            .send()
            .await,
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{body}"
    );
    // A start without a message adds none, and says nothing of one.
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&auth),
        "1",
        Some(json!({"topic": "Again", "client_msg_id": "y-1"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body["data"].get("start_message").is_none(), "{body}");
    let (_, list) = customer(&app, Method::GET, &messages, Some(&auth), "1", None).await;
    assert_eq!(texts(&list), ["B", "C", "D"]);

    // A start whose answer was lost, retried with its key: one chat, one
    // first message.
    let browser = uuid::Uuid::now_v7();
    let first =
        json!({"browser_uuid": browser, "topic": "Retry", "message": "A", "client_msg_id": "k"});
    let (code, created) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "1",
        Some(first.clone()),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["data"]["start_message"]["seq"], 1);
    assert_eq!(created["data"]["start_message"]["client_msg_id"], "k");
    assert_eq!(created["data"]["start_message_duplicate"], false);
    let (code, retried) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "1",
        Some(first),
    )
    .await;
    assert_eq!(code, 200, "{retried}");
    assert_eq!(
        retried["data"]["session"]["id"],
        created["data"]["session"]["id"]
    );
    assert_eq!(
        retried["data"]["start_message"],
        created["data"]["start_message"]
    );
    assert_eq!(retried["data"]["start_message_duplicate"], true);
    let retry_auth = format!(
        "Visitor {}",
        created["data"]["visitor_token"].as_str().unwrap()
    );
    let (_, list) = customer(
        &app,
        Method::GET,
        &format!(
            "/livechat/customer/chats/{}/messages",
            created["data"]["session"]["id"].as_str().unwrap()
        ),
        Some(&retry_auth),
        "1",
        None,
    )
    .await;
    assert_eq!(texts(&list), ["A"]);

    // Many concurrent starts by one customer: one session, and every
    // start's message in it.
    let token = App::token(55, &["USER"], Some(&[1]));
    let starts: Vec<_> = (0..10)
        .map(|n| {
            let req = app
                .client
                .post("/livechat/customer/chats")
                .header("X-Tenant-ID", "1")
                .header("Authorization", format!("Bearer {token}"))
                .body_json(&json!({"topic": format!("race {n}"), "message": format!("m{n}")}));
            async move { App::decode(req.send().await).await }
        })
        .collect();
    let results = futures::future::join_all(starts).await;
    let ids: std::collections::HashSet<String> = results
        .iter()
        .map(|(c, b)| {
            b["data"]["session"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{c}: {b}"))
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one active session per customer");
    assert_eq!(results.iter().filter(|(c, _)| *c == 201).count(), 1);
    let raced = ids.into_iter().next().unwrap();
    let (code, list) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{raced}/messages"),
        Some(&format!("Bearer {token}")),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 200, "{list}");
    let mut stored = texts(&list);
    stored.sort();
    let mut sent: Vec<String> = (0..10).map(|n| format!("m{n}")).collect();
    sent.sort();
    assert_eq!(stored, sent, "no start's message is dropped");

    // After closing, a new start creates a new session.
    app.client
        .post(format!("/livechat/customer/chats/{id}/close"))
        .header("X-Tenant-ID", "1")
        .header("Authorization", &auth)
        .send()
        .await
        .assert_status_is_ok();
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&auth),
        "1",
        Some(json!({"topic": "Third"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert_ne!(body["data"]["session"]["id"], id.as_str());
}

async fn identified_user_with_host_token(backend: Backend) {
    let app = App::new(backend).await;
    let token = format!("Bearer {}", App::token(42, &["USER"], Some(&[1])));
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&token),
        "1",
        Some(json!({"topic": "Invoice", "message": "Where is my invoice?"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert!(
        body["data"].get("visitor_token").is_none(),
        "identified users use their own token"
    );
    let id = body["data"]["session"]["id"].as_str().unwrap().to_owned();
    let (_, msgs) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{id}/messages"),
        Some(&token),
        "1",
        None,
    )
    .await;
    assert_eq!(
        msgs["data"][0]["sender_id"], 42,
        "identified customers carry their host user id"
    );
    // So do the messages they append later.
    let (code, sent) = customer(
        &app,
        Method::POST,
        &format!("/livechat/customer/chats/{id}/messages"),
        Some(&token),
        "1",
        Some(json!({"message": "Any news?"})),
    )
    .await;
    assert_eq!(code, 201, "{sent}");
    assert_eq!(
        (&sent["data"]["seq"], &sent["data"]["sender_id"]),
        (&json!(2), &json!(42)),
        "an appended customer message carries the host user id"
    );
    // The token's tenants bind: tenant 2 is forbidden.
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&token),
        "2",
        Some(json!({"topic": "x"})),
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    // Bad tenant header.
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&token),
        "abc",
        Some(json!({"topic": "x"})),
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_tenant"))
    );
    // The tenant header twice.
    let (code, body) = App::decode(
        app.client
            .post("/livechat/customer/chats")
            .header("X-Tenant-ID", "1")
            .header("X-Tenant-ID", "1")
            .header("Authorization", &token)
            .body_json(&json!({"topic": "x"}))
            .send()
            .await,
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_tenant")),
        "{body}"
    );
    // The credential twice, even the same one.
    let (code, body) = App::decode(
        app.client
            .post("/livechat/customer/chats")
            .header("X-Tenant-ID", "1")
            .header("Authorization", &token)
            .header("Authorization", &token)
            .body_json(&json!({"topic": "x"}))
            .send()
            .await,
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("once")),
        "{body}"
    );
}

async fn identity_hash_asserts_a_user(backend: Backend) {
    let secrets = livechat_poem::IdentitySecrets::parse("1:tenant-one-secret").unwrap();
    let hash = secrets
        .sign(
            livechat_core::TenantId::new(1).unwrap(),
            livechat_core::UserId::new(77).unwrap(),
        )
        .unwrap();
    let app = App::with_config(backend, |c| c.identity_secrets = secrets.clone()).await;
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "1",
        Some(json!({"user_id": 77, "identity_hash": hash, "topic": "Hash"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let auth = format!(
        "Visitor {}",
        body["data"]["visitor_token"].as_str().unwrap()
    );
    let id = body["data"]["session"]["id"].as_str().unwrap();
    // The same user via the host token is the same customer.
    let bearer = format!("Bearer {}", App::token(77, &["USER"], None));
    let (code, got) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{id}"),
        Some(&bearer),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 200, "{got}");
    let (code, _) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{id}"),
        Some(&auth),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 200);

    for bad in [
        json!({"user_id": 78, "identity_hash": hash, "topic": "x"}),
        json!({"user_id": 77, "identity_hash": "00".repeat(32), "topic": "x"}),
        json!({"user_id": 77, "identity_hash": "not hex", "topic": "x"}),
    ] {
        let (code, body) = customer(
            &app,
            Method::POST,
            "/livechat/customer/chats",
            None,
            "1",
            Some(bad.clone()),
        )
        .await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{bad}"
        );
    }
    // Tenant 2 has no secret: no hash passes there, and the answer says so.
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "2",
        Some(json!({"user_id": 77, "identity_hash": hash, "topic": "x"})),
    )
    .await;
    assert_eq!(code, 401);
    assert_eq!(
        body["error"]["message"], "this tenant accepts no identity hashes",
        "{body}"
    );
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "1",
        Some(json!({"user_id": 77, "topic": "x"})),
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    // A credential and identity fields together: refused, whichever would
    // have counted (the visitor's token answered 200 as the visitor, the
    // hash unread, even a wrong one).
    for (credential, fields) in [
        (
            &auth,
            json!({"user_id": 77, "identity_hash": hash, "topic": "x"}),
        ),
        (
            &auth,
            json!({"user_id": 78, "identity_hash": "00".repeat(32), "topic": "x"}),
        ),
        (&auth, json!({"user_id": 78, "topic": "x"})),
        (&bearer, json!({"identity_hash": hash, "topic": "x"})),
    ] {
        let (code, body) = customer(
            &app,
            Method::POST,
            "/livechat/customer/chats",
            Some(credential),
            "1",
            Some(fields.clone()),
        )
        .await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_body")),
            "{fields}: {body}"
        );
    }
}

/// Rows of `livechat_customers`.
async fn customer_rows(app: &App) -> i64 {
    livechat_tests::count_rows(&app.db, "livechat_customers").await
}

async fn start_validation(backend: Backend) {
    let app = App::new(backend).await;
    let b = uuid::Uuid::now_v7();
    let cases = [
        json!({"browser_uuid": "not-a-uuid", "topic": "x"}),
        // The nil UUID: every browser a widget bug gave it would be one.
        json!({"browser_uuid": uuid::Uuid::nil(), "topic": "x"}),
        json!({"browser_uuid": b}),
        json!({"browser_uuid": b, "topic": ""}),
        json!({"browser_uuid": b, "topic": "   "}),
        json!({"browser_uuid": b, "topic": "t".repeat(201)}),
        json!({"browser_uuid": b, "topic": 5}),
        json!({"browser_uuid": b, "topic": "x", "priority": "asap"}),
        json!({"browser_uuid": b, "topic": "x", "department": "d".repeat(101)}),
        json!({"browser_uuid": b, "topic": "x", "contact": {"name": "Ana", "email": "nope"}}),
        json!({"browser_uuid": b, "topic": "x", "contact": {"name": "", "email": "a@b.co"}}),
        json!({"browser_uuid": b, "topic": "x", "contact": {"email": "a@b.co"}}),
        json!({"browser_uuid": b, "topic": "x", "message": "  "}),
        json!({"browser_uuid": b, "topic": "x", "message": "m".repeat(10_001)}),
        // U+0000, which PostgreSQL's text cannot hold, in any text field.
        json!({"browser_uuid": b, "topic": "Bil\u{0}ling"}),
        json!({"browser_uuid": b, "topic": "x", "department": "Sales\u{0}"}),
        json!({"browser_uuid": b, "topic": "x", "message": "hi\u{0}"}),
        json!({"browser_uuid": b, "topic": "x", "contact": {"name": "A\u{0}na", "email": "a@b.co"}}),
    ];
    for bad in cases {
        let (code, body) = customer(
            &app,
            Method::POST,
            "/livechat/customer/chats",
            None,
            "1",
            Some(bad.clone()),
        )
        .await;
        assert_eq!(
            code,
            400,
            "{}: {body}",
            bad.to_string().chars().take(90).collect::<String>()
        );
        assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string());
    }
    // No credential and no browser_uuid.
    let (code, _) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "1",
        Some(json!({"topic": "x"})),
    )
    .await;
    assert_eq!(code, 401);
    // A host user refused the same way (a Bearer token, and an identity
    // hash's user) is not created either.
    let user = format!("Bearer {}", App::token(77, &["USER"], Some(&[1])));
    let (code, _) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&user),
        "1",
        Some(json!({"topic": ""})),
    )
    .await;
    assert_eq!(code, 400);
    // Nothing was stored by the refused starts: no session, no customer.
    let (_, list) = app
        .agent_call(Method::GET, "/livechat/sessions", 7, 1, None)
        .await;
    assert_eq!(list["data"], json!([]));
    assert_eq!(customer_rows(&app).await, 0);
    // A topic of exactly 200 characters is fine.
    let (code, _) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        None,
        "1",
        Some(json!({"browser_uuid": b, "topic": "t".repeat(200)})),
    )
    .await;
    assert_eq!(code, 201);
}

/// A customer waiting in the queue who leaves contact details (the usual
/// moment: nobody online) gets the session with its place, as the chat's
/// start and `GET /customer/chats/{id}` give it; it used to be `null`.
async fn a_waiting_customer_s_contact_answer_has_its_place(backend: Backend) {
    let app = App::new(backend).await;
    let (_first, _, _) = visitor_start(&app, "1", "One").await;
    let (second, auth, started) = visitor_start(&app, "1", "Two").await;
    assert_eq!(started["data"]["session"]["status"], "WAITING");
    assert_eq!(started["data"]["session"]["queue_position"], 2);
    let (code, body) = customer(
        &app,
        Method::PUT,
        &format!("/livechat/customer/chats/{second}/contact"),
        Some(&auth),
        "1",
        Some(json!({"name": "Dua", "email": "dua@example.co.id"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["contact"]["name"], "Dua");
    assert_eq!(body["data"]["queue_position"], 2, "{body}");
}

async fn contact_history_and_close(backend: Backend) {
    let app = App::new(backend).await;
    app.go_online(7, 1).await;
    let (first, auth, _) = visitor_start(&app, "1", "One").await;
    let contact_path = format!("/livechat/customer/chats/{first}/contact");
    let (code, body) = customer(&app, Method::PUT, &contact_path, Some(&auth), "1", Some(json!({"name": " Budi ", "email": "budi@example.co.id", "phone": "+62 812", "company": "ACME"}))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["contact"]["name"], "Budi");
    assert_eq!(body["data"]["contact"]["company"], "ACME");
    for bad in [
        json!({"name": "Budi"}),
        json!({"name": "Budi", "email": "x@"}),
        json!({"name": "", "email": "b@e.co"}),
    ] {
        let (code, body) = customer(
            &app,
            Method::PUT,
            &contact_path,
            Some(&auth),
            "1",
            Some(bad),
        )
        .await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_body"))
        );
    }
    // The agent sees the contact.
    let (_, s) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{first}"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(s["data"]["contact"]["email"], "budi@example.co.id");

    let close = format!("/livechat/customer/chats/{first}/close");
    let (code, closed) = customer(&app, Method::POST, &close, Some(&auth), "1", None).await;
    assert_eq!(code, 200);
    assert_eq!(closed["data"]["status"], "CLOSED");
    let (code, again) = customer(&app, Method::POST, &close, Some(&auth), "1", None).await;
    assert_eq!(code, 200);
    assert_eq!(again, closed);
    let (code, body) = customer(
        &app,
        Method::POST,
        &format!("/livechat/customer/chats/{first}/messages"),
        Some(&auth),
        "1",
        Some(json!({"message": "late"})),
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("session_closed"))
    );
    // A closed chat's contact is read-only too, and stays as it was.
    let (code, body) = customer(
        &app,
        Method::PUT,
        &contact_path,
        Some(&auth),
        "1",
        Some(json!({"name": "Other", "email": "other@example.com"})),
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("session_closed")),
        "{body}"
    );
    let (_, s) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{first}"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(s["data"]["contact"]["email"], "budi@example.co.id");
    assert_eq!(s["data"]["updated_at"], closed["data"]["updated_at"]);

    // Three more sessions, then page the history two at a time.
    let mut ids = vec![first.clone()];
    for n in 0..3 {
        let (code, body) = customer(
            &app,
            Method::POST,
            "/livechat/customer/chats",
            Some(&auth),
            "1",
            Some(json!({"topic": format!("T{n}")})),
        )
        .await;
        assert_eq!(code, 201, "{body}");
        let id = body["data"]["session"]["id"].as_str().unwrap().to_owned();
        customer(
            &app,
            Method::POST,
            &format!("/livechat/customer/chats/{id}/close"),
            Some(&auth),
            "1",
            None,
        )
        .await;
        ids.push(id);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/livechat/customer/history?limit=2&cursor={c}"),
            None => "/livechat/customer/history?limit=2".to_owned(),
        };
        let (code, page) = customer(&app, Method::GET, &path, Some(&auth), "1", None).await;
        assert_eq!(code, 200, "{page}");
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");
    // A cursor is one of the customer's own sessions.
    let (someone_elses, _, _) = visitor_start(&app, "1", "Someone else").await;
    for bad in [
        "garbage".to_owned(),
        uuid::Uuid::now_v7().to_string(),
        someone_elses,
    ] {
        let (code, body) = customer(
            &app,
            Method::GET,
            &format!("/livechat/customer/history?cursor={bad}"),
            Some(&auth),
            "1",
            None,
        )
        .await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}: {body}"
        );
    }
}

async fn linking_moves_visitor_sessions(backend: Backend) {
    let app = App::new(backend).await;
    let (visitor_session, visitor_auth, start) = visitor_start(&app, "1", "Before login").await;
    let visitor_token = start["data"]["visitor_token"].as_str().unwrap().to_owned();
    let user = App::token(300, &["USER"], Some(&[1]));
    let bearer = format!("Bearer {user}");

    // Linking needs the host token; an asserted e-mail is not enough.
    let (code, _) = customer(
        &app,
        Method::POST,
        "/livechat/customer/link",
        Some(&visitor_auth),
        "1",
        Some(json!({"visitor_token": visitor_token})),
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = customer(
        &app,
        Method::POST,
        "/livechat/customer/link",
        Some(&bearer),
        "1",
        Some(json!({"visitor_token": "forged"})),
    )
    .await;
    assert_eq!(code, 401);

    let (code, linked) = customer(
        &app,
        Method::POST,
        "/livechat/customer/link",
        Some(&bearer),
        "1",
        Some(json!({"visitor_token": visitor_token})),
    )
    .await;
    assert_eq!(code, 200, "{linked}");
    let identified = linked["data"]["customer_id"].as_str().unwrap().to_owned();
    assert_ne!(identified, start["data"]["customer_id"].as_str().unwrap());
    // Idempotent.
    let (code, again) = customer(
        &app,
        Method::POST,
        "/livechat/customer/link",
        Some(&bearer),
        "1",
        Some(json!({"visitor_token": visitor_token})),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(again, linked);

    // The logged-in user now owns the visitor's session and history.
    let (code, s) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{visitor_session}"),
        Some(&bearer),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 200, "{s}");
    assert_eq!(s["data"]["customer_id"], identified.as_str());
    let (_, history) = customer(
        &app,
        Method::GET,
        "/livechat/customer/history",
        Some(&bearer),
        "1",
        None,
    )
    .await;
    assert_eq!(history["data"].as_array().unwrap().len(), 1);
    // The old visitor token acts as the identified customer.
    let (code, _) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{visitor_session}"),
        Some(&visitor_auth),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 200);
    // Starting again finds the same active session (one per customer).
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&bearer),
        "1",
        Some(json!({"topic": "After login"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["session"]["id"], visitor_session.as_str());

    // A second visitor with an active session linked to the same user: the
    // user keeps one active session, the visitor's is closed, both are in history.
    let (second, _, start2) = visitor_start(&app, "1", "Other tab").await;
    let token2 = start2["data"]["visitor_token"].as_str().unwrap();
    let (code, _) = customer(
        &app,
        Method::POST,
        "/livechat/customer/link",
        Some(&bearer),
        "1",
        Some(json!({"visitor_token": token2})),
    )
    .await;
    assert_eq!(code, 200);
    let (_, s2) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{second}"),
        Some(&bearer),
        "1",
        None,
    )
    .await;
    assert_eq!(s2["data"]["status"], "CLOSED");
    let (_, s1) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{visitor_session}"),
        Some(&bearer),
        "1",
        None,
    )
    .await;
    assert_ne!(s1["data"]["status"], "CLOSED");
    let (_, history) = customer(
        &app,
        Method::GET,
        "/livechat/customer/history",
        Some(&bearer),
        "1",
        None,
    )
    .await;
    assert_eq!(history["data"].as_array().unwrap().len(), 2);
}

async fn customers_are_isolated(backend: Backend) {
    let app = App::new(backend).await;
    let (s1, auth1, _) = visitor_start(&app, "1", "Tenant one").await;
    let (s2, auth2, _) = visitor_start(&app, "2", "Tenant two").await;
    let (other, _, _) = visitor_start(&app, "1", "Another visitor").await;

    // A visitor token of tenant 1 gets 404 on a tenant 2 session and on
    // another customer's session, on every route.
    for (session, auth) in [(&s2, &auth1), (&other, &auth1), (&s1, &auth2)] {
        let tenant = if auth == &auth1 { "1" } else { "2" };
        for (method, path, body) in [
            (
                Method::GET,
                format!("/livechat/customer/chats/{session}"),
                None,
            ),
            (
                Method::GET,
                format!("/livechat/customer/chats/{session}/messages"),
                None,
            ),
            (
                Method::POST,
                format!("/livechat/customer/chats/{session}/messages"),
                Some(json!({"message": "peek"})),
            ),
            (
                Method::PUT,
                format!("/livechat/customer/chats/{session}/contact"),
                Some(json!({"name": "X", "email": "x@y.co"})),
            ),
            (
                Method::POST,
                format!("/livechat/customer/chats/{session}/close"),
                None,
            ),
        ] {
            let (code, resp) =
                customer(&app, method.clone(), &path, Some(auth), tenant, body).await;
            assert_eq!(
                (code.as_u16(), resp["error"]["code"].as_str()),
                (404, Some("not_found")),
                "{method} {path}"
            );
        }
    }
    // A visitor token used with another tenant's header is refused.
    let (code, body) = customer(
        &app,
        Method::GET,
        &format!("/livechat/customer/chats/{s2}"),
        Some(&auth1),
        "2",
        None,
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    // Malformed ids are 404.
    let (code, _) = customer(
        &app,
        Method::GET,
        "/livechat/customer/chats/not-a-uuid",
        Some(&auth1),
        "1",
        None,
    )
    .await;
    assert_eq!(code, 404);
    // Nothing changed: the other customer's session is still waiting, with no messages.
    let (_, s) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{other}"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(s["data"]["status"], "WAITING");
    let (_, msgs) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{other}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(msgs["data"], json!([]));
}

/// An idempotency key names one sender's message: another participant of
/// the session sending with the same key gets 409 `client_msg_id_taken`
/// (their text is not swallowed as a "retry" of someone else's message),
/// in both directions and through a customer's start; the key's owner
/// still gets the original back.
async fn a_key_is_its_senders_own(backend: Backend) {
    let app = App::new(backend).await;
    app.go_online(7, 1).await;
    let (session, visitor, _) = visitor_start(&app, "1", "Keys").await;
    let agent_send = |key: &'static str, text: &'static str| {
        let (app, session) = (&app, &session);
        async move {
            app.agent_call(
                Method::POST,
                &format!("/livechat/sessions/{session}/messages"),
                7,
                1,
                Some(json!({"message": text, "client_msg_id": key})),
            )
            .await
        }
    };
    let customer_send = |key: &'static str, text: &'static str| {
        let (app, session, visitor) = (&app, &session, &visitor);
        async move {
            customer(
                app,
                Method::POST,
                &format!("/livechat/customer/chats/{session}/messages"),
                Some(visitor),
                "1",
                Some(json!({"message": text, "client_msg_id": key})),
            )
            .await
        }
    };
    let (code, original) = agent_send("shared-1", "agent says hi").await;
    assert_eq!(code, 201, "{original}");
    let (code, body) = customer_send("shared-1", "customer text").await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (409, Some("client_msg_id_taken")),
        "{body}"
    );
    // Through a start, which adds its message to the active chat.
    let (code, body) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&visitor),
        "1",
        Some(json!({"topic": "Keys", "message": "again", "client_msg_id": "shared-1"})),
    )
    .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (409, Some("client_msg_id_taken")),
        "{body}"
    );
    // The other way round.
    let (code, mine) = customer_send("mine-1", "customer text").await;
    assert_eq!(code, 201, "{mine}");
    let (code, body) = agent_send("mine-1", "agent text").await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (409, Some("client_msg_id_taken")),
        "{body}"
    );
    // Each owner's retry still answers 200 with its original.
    let (code, again) = agent_send("shared-1", "agent says hi").await;
    assert_eq!((code.as_u16(), &again), (200, &original));
    let (code, again) = customer_send("mine-1", "customer text").await;
    assert_eq!((code.as_u16(), &again), (200, &mine));
    // Stored: the two originals only.
    let (_, list) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            None,
        )
        .await;
    let texts: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["agent says hi", "customer text"]);
}

/// A `User-Agent` with bytes past ASCII (UTF-8, or Latin-1 from an old
/// client) is recorded as far as it decodes, cut to 512 characters; it
/// was dropped whole.
async fn a_user_agent_past_ascii_is_kept(backend: Backend) {
    use sea_orm::{ConnectionTrait, Statement};
    let app = App::new(backend).await;
    let mut agent = "Navigateur é ".as_bytes().to_vec();
    agent.push(0xE9); // Latin-1 é: not UTF-8
    agent.extend(std::iter::repeat_n(b'x', 600));
    let value = poem::http::HeaderValue::from_bytes(&agent).unwrap();
    let resp = app
        .client
        .post("/livechat/customer/chats")
        .header("X-Tenant-ID", "1")
        .header("User-Agent", value)
        .body_json(&json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": "ua"}))
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(code, 201, "{body}");
    let row = app
        .db
        .query_one_raw(Statement::from_string(
            app.db.get_database_backend(),
            "SELECT user_agent FROM livechat_sessions",
        ))
        .await
        .unwrap()
        .unwrap();
    let stored: Option<String> = row.try_get("", "user_agent").unwrap();
    let stored = stored.expect("recorded");
    assert!(stored.starts_with("Navigateur é \u{FFFD}xxx"), "{stored}");
    assert_eq!(stored.chars().count(), 512);
}

/// A new anonymous visitor of tenant 1, through the service.
async fn new_visitor(app: &App) -> livechat_core::Customer {
    app.chat
        .resolve_customer(
            livechat_tests::t(1),
            livechat_core::CustomerIdentity::Visitor(uuid::Uuid::now_v7()),
        )
        .await
        .unwrap()
}

/// `customer`'s start in tenant 1 with only a topic, through the service.
async fn start_with_topic(
    app: &App,
    customer: livechat_core::CustomerId,
    topic: &str,
) -> livechat_core::CustomerChatStarted {
    app.chat
        .start_customer_chat(
            livechat_tests::t(1),
            customer,
            livechat_core::CustomerChatRequest {
                topic: topic.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

/// A start that resolved a visitor just before a link of theirs committed
/// (the visitor's id is then stale) opens the chat for the identified
/// customer, with its message: not a chat under the linked visitor's own
/// id, which neither the visitor's token (now the user's) nor the user
/// would find. The model test's concurrent cases found the race.
async fn a_start_that_resolved_the_visitor_before_a_link_is_the_users(backend: Backend) {
    use livechat_core::CustomerChatRequest;
    use livechat_tests::{t, u};

    let app = App::new(backend).await;
    let visitor = new_visitor(&app).await;
    let user = app
        .chat
        .link_visitor(t(1), visitor.id, u(400))
        .await
        .unwrap();
    assert_ne!(user.id, visitor.id);
    let started = app
        .chat
        .start_customer_chat(
            t(1),
            visitor.id,
            CustomerChatRequest {
                topic: "Late start".into(),
                message: Some("Hello".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(started.created);
    assert_eq!(started.view.session.customer_id, Some(user.id));
    let message = started.message.expect("the message is stored").message;
    assert_eq!((message.seq, message.customer_id), (1, Some(user.id)));
    // The user's own start finds that chat.
    let again = start_with_topic(&app, user.id, "Again").await;
    assert!(!again.created);
    assert_eq!(again.view.session.id, started.view.session.id);
}

/// A message, contact details, a read or a close by a caller that
/// resolved a visitor just before a link of theirs moved the chat (the
/// visitor's id is then stale) act on the chat as the identified customer
/// instead of answering 404; another customer still gets 404. The model
/// test's concurrent cases allowed these 404s before.
async fn steps_that_resolved_the_visitor_before_a_link_act_as_the_user(backend: Backend) {
    use livechat_core::{ChatError, ContactInput};
    use livechat_tests::{t, u};

    let app = App::new(backend).await;
    let visitor = new_visitor(&app).await;
    let started = start_with_topic(&app, visitor.id, "Before the login").await;
    let session = started.view.session.id;
    let user = app
        .chat
        .link_visitor(t(1), visitor.id, u(401))
        .await
        .unwrap();
    assert_ne!(user.id, visitor.id);
    let posted = app
        .chat
        .post_customer_message(t(1), visitor.id, session, "Hello".into(), Some("k1".into()))
        .await
        .expect("the chat moved to the user: the message is theirs");
    assert_eq!(
        (posted.message.seq, posted.message.customer_id),
        (1, Some(user.id))
    );
    // The same key again is the same message, as the user's own send is.
    let again = app
        .chat
        .post_customer_message(t(1), user.id, session, "Hello".into(), Some("k1".into()))
        .await
        .unwrap();
    assert_eq!(again.message.id, posted.message.id);
    let view = app
        .chat
        .customer_session(t(1), visitor.id, session)
        .await
        .unwrap();
    assert_eq!(view.session.customer_id, Some(user.id));
    let listed = app
        .chat
        .list_customer_messages(t(1), visitor.id, session, None, None)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    app.chat
        .set_contact(
            t(1),
            visitor.id,
            session,
            ContactInput {
                name: "Ada".into(),
                email: "ada@example.com".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Another customer of the tenant still finds nothing there.
    let stranger = new_visitor(&app).await;
    assert!(matches!(
        app.chat
            .post_customer_message(t(1), stranger.id, session, "Hi".into(), None)
            .await,
        Err(ChatError::NotFound)
    ));
    assert!(matches!(
        app.chat
            .close_customer_chat(t(1), stranger.id, session)
            .await,
        Err(ChatError::NotFound)
    ));
    let closed = app
        .chat
        .close_customer_chat(t(1), visitor.id, session)
        .await
        .unwrap();
    assert_eq!(closed.status, livechat_core::SessionStatus::Closed);
    // Closed by the chat's customer, the user.
    let events = livechat_tests::events_of(&app.chat, t(1)).await;
    let closing = events
        .iter()
        .find(|e| e.kind == livechat_core::EventKind::SessionClosed)
        .expect("the close's event");
    let payload: Value = serde_json::from_str(closing.payload.json()).unwrap();
    assert_eq!(
        payload["closed_by"]["customer_id"],
        json!(user.id),
        "{payload}"
    );
}

/// When both the visitor and the user it logs in as have an active chat,
/// the one an agent is serving stays: the user's chat still WAITING
/// closes (by the system), the visitor's OPEN chat moves to the user and
/// the agent goes on replying in it.
async fn linking_keeps_the_chat_an_agent_serves(backend: Backend) {
    let app = App::new(backend).await;
    app.chat
        .set_agent_capacity(livechat_tests::t(1), 1)
        .await
        .unwrap();
    app.go_online(7, 1).await;
    let (served, _, start) = visitor_start(&app, "1", "Live conversation").await;
    assert_eq!(start["data"]["session"]["status"], "OPEN", "{start}");
    let visitor_token = start["data"]["visitor_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {}", App::token(400, &["USER"], Some(&[1])));
    let (code, stale) = customer(
        &app,
        Method::POST,
        "/livechat/customer/chats",
        Some(&bearer),
        "1",
        Some(json!({"topic": "Old question"})),
    )
    .await;
    assert_eq!(code, 201, "{stale}");
    assert_eq!(
        stale["data"]["session"]["status"], "WAITING",
        "agent 7 is full"
    );
    let stale = stale["data"]["session"]["id"].as_str().unwrap().to_owned();

    let (code, linked) = customer(
        &app,
        Method::POST,
        "/livechat/customer/link",
        Some(&bearer),
        "1",
        Some(json!({"visitor_token": visitor_token})),
    )
    .await;
    assert_eq!(code, 200, "{linked}");
    let chat = |id: String| {
        let (app, bearer) = (&app, bearer.clone());
        async move {
            let (code, body) = customer(
                app,
                Method::GET,
                &format!("/livechat/customer/chats/{id}"),
                Some(&bearer),
                "1",
                None,
            )
            .await;
            assert_eq!(code, 200, "{body}");
            body["data"].clone()
        }
    };
    let kept = chat(served.clone()).await;
    assert_eq!(kept["status"], "OPEN");
    assert_eq!(kept["customer_id"], linked["data"]["customer_id"]);
    assert_eq!(chat(stale).await["status"], "CLOSED");
    let (code, reply) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{served}/messages"),
            7,
            1,
            Some(json!({"message": "still here"})),
        )
        .await;
    assert_eq!(code, 201, "{reply}");
}

/// The customer routes' rate limits (README "Rate limits"), over a real
/// socket so that requests have a peer address.
mod rate_limits {
    use std::sync::Arc;

    use livechat_core::bus::InProcessBus;
    use livechat_tests::node::{Node, WsClient};
    use sea_orm::{ConnectionTrait, Statement};

    use super::*;

    on_both_databases!(starts_and_messages_over_the_limits_answer_429_and_store_nothing);

    async fn starts_and_messages_over_the_limits_answer_429_and_store_nothing(backend: Backend) {
        let app = App::new(backend).await;
        let mut config = app.config.clone();
        // One a minute and one a second: bursts of two.
        config.rate_limits = livechat_poem::RateLimits {
            chat_starts_per_minute: 1,
            customer_messages_per_sec: 1,
            client_ip_header: Some(poem::http::HeaderName::from_static("x-forwarded-for")),
        };
        let node = Node::start(app.db.clone(), &config, Arc::new(InProcessBus::new())).await;
        let http = reqwest::Client::new();
        let start = |tenant: &'static str, forwarded: Option<&str>| {
            let mut req = http
                .post(node.url("/livechat/customer/chats"))
                .header("X-Tenant-ID", tenant)
                .header("Content-Type", "application/json")
                .body(json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": "Hello"}).to_string());
            if let Some(forwarded) = forwarded {
                req = req.header("X-Forwarded-For", forwarded);
            }
            async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
                (status, retry_after, body)
            }
        };
        let sessions = || async {
            let rows = app
                .db
                .query_all_raw(Statement::from_string(
                    app.db.get_database_backend(),
                    "SELECT client_ip FROM livechat_sessions ORDER BY created_at",
                ))
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.try_get::<Option<String>>("", "client_ip").unwrap())
                .collect::<Vec<_>>()
        };

        // The peer's address (no header): two, then refused.
        let (code, _, first) = start("1", None).await;
        assert_eq!(code, 201, "{first}");
        assert_eq!(start("1", None).await.0, 201);
        let (code, retry_after, body) = start("1", None).await;
        assert_eq!(code, 429, "{body}");
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        assert!(
            retry_after.is_some_and(|s| (1..=60).contains(&s)),
            "Retry-After in whole seconds: {retry_after:?}"
        );
        assert_eq!(
            sessions().await.len(),
            2,
            "the refused start stored nothing"
        );
        // Another tenant counts apart.
        assert_eq!(start("2", None).await.0, 201);
        // Behind a proxy: the last address of X-Forwarded-For, the one the
        // proxy appended; what a client put before it does not count.
        assert_eq!(start("1", Some("10.0.0.1, 203.0.113.9")).await.0, 201);
        assert_eq!(start("1", Some("10.0.0.2, 203.0.113.9")).await.0, 201);
        assert_eq!(start("1", Some("10.0.0.3,203.0.113.9")).await.0, 429);
        assert_eq!(start("1", Some("203.0.113.10")).await.0, 201);
        let ips = sessions().await;
        assert_eq!(
            ips,
            [
                "127.0.0.1",
                "127.0.0.1",
                "127.0.0.1",
                "203.0.113.9",
                "203.0.113.9",
                "203.0.113.10"
            ]
            .map(|ip| Some(ip.to_owned())),
            "each session records the client's address"
        );

        // A customer's messages: two, then refused; another customer's pass.
        let send = |token: String, session: String| {
            let req = http
                .post(node.url(&format!("/livechat/customer/chats/{session}/messages")))
                .header("X-Tenant-ID", "1")
                .header("Authorization", format!("Visitor {token}"))
                .header("Content-Type", "application/json")
                .body(json!({"message": "hi"}).to_string());
            async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
                (status, body)
            }
        };
        let (token, session) = livechat_tests::visitor_chat(&first);
        for _ in 0..2 {
            let (code, body) = send(token.clone(), session.clone()).await;
            assert_eq!(code, 201, "{body}");
        }
        let (code, body) = send(token.clone(), session.clone()).await;
        assert_eq!(code, 429, "{body}");
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        // The limit is the customer's, over HTTP and their sockets alike.
        let mut socket =
            WsClient::connect_with_header(&node.ws_url(), &format!("Visitor {token}"), 1)
                .await
                .unwrap();
        socket
            .send(json!({"type": "join_session", "session_id": session}))
            .await;
        socket.expect("joined").await;
        socket
            .send(json!({"type": "send_message", "session_id": session, "client_msg_id": "ws-1", "message": "hi"}))
            .await;
        let refused = socket.expect("error").await;
        assert_eq!(
            (refused["code"].as_str(), refused["ref"].as_str()),
            (Some("rate_limited"), Some("ws-1")),
            "{refused}"
        );
        // When the customer's limit (one a second) lets the next through.
        let wait = refused["retry_after_ms"].as_u64().expect("a wait hint");
        assert!((1..=1000).contains(&wait), "{refused}");
        let (_, _, other) = start("1", Some("203.0.113.11")).await;
        let (code, body) = send(
            other["data"]["visitor_token"].as_str().unwrap().to_owned(),
            other["data"]["session"]["id"].as_str().unwrap().to_owned(),
        )
        .await;
        assert_eq!(code, 201, "another customer: {body}");
        let (_, history) = customer(
            &app,
            Method::GET,
            &format!("/livechat/customer/chats/{session}/messages"),
            Some(&format!("Visitor {token}")),
            "1",
            None,
        )
        .await;
        assert_eq!(
            history["data"].as_array().map(Vec::len),
            Some(2),
            "the refused message was not stored: {history}"
        );

        // One address sending as visitor after visitor: a burst of ten
        // messages in all (five times a customer's two), refilled at five
        // a second, however many customers; over a WebSocket from it too.
        // Twenty-four sends, each customer within its own burst, meet a
        // refusal unless they take over 2.8 s.
        let mut visitors = Vec::new();
        for n in 0..12 {
            let forwarded = format!("198.51.100.{n}");
            let (code, _, started) = start("1", Some(&forwarded)).await;
            assert_eq!(code, 201, "{started}");
            visitors.push((
                started["data"]["visitor_token"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                started["data"]["session"]["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ));
        }
        let send_from = |token: &str, session: &str| {
            let req = http
                .post(node.url(&format!("/livechat/customer/chats/{session}/messages")))
                .header("X-Tenant-ID", "1")
                .header("Authorization", format!("Visitor {token}"))
                .header("X-Forwarded-For", "198.51.100.200")
                .header("Content-Type", "application/json")
                .body(json!({"message": "hi"}).to_string());
            async move { req.send().await.unwrap().status().as_u16() }
        };
        let mut answers = Vec::new();
        for (token, session) in &visitors {
            for _ in 0..2 {
                answers.push(send_from(token, session).await);
            }
        }
        assert!(
            answers.iter().all(|code| [201, 429].contains(code)),
            "{answers:?}"
        );
        assert!(
            answers[..10].iter().all(|code| *code == 201),
            "the burst: {answers:?}"
        );
        assert!(answers.contains(&429), "no refusal: {answers:?}");
        // Sockets count by the address they connected from (here the
        // peer's): ten new visitors, each within their own burst of two,
        // send twenty messages at once; the address's burst of ten, with
        // what refills while they are handled, is exceeded.
        let mut sockets = Vec::new();
        for n in 20..30 {
            let forwarded = format!("198.51.100.{n}");
            let (code, _, started) = start("1", Some(&forwarded)).await;
            assert_eq!(code, 201, "{started}");
            let (token, session) = livechat_tests::visitor_chat(&started);
            let mut socket =
                WsClient::connect_with_header(&node.ws_url(), &format!("Visitor {token}"), 1)
                    .await
                    .unwrap();
            socket
                .send(json!({"type": "join_session", "session_id": session}))
                .await;
            socket.expect("joined").await;
            sockets.push((socket, session));
        }
        for (socket, session) in &mut sockets {
            for key in ["a", "b"] {
                socket
                    .send(json!({"type": "send_message", "session_id": session, "client_msg_id": key, "message": "hi"}))
                    .await;
            }
        }
        let mut refused = 0;
        for (socket, _) in &mut sockets {
            for _ in 0..2 {
                loop {
                    let frame = socket
                        .next(std::time::Duration::from_secs(5))
                        .await
                        .expect("an answer");
                    if frame["type"] == "ack" {
                        break;
                    }
                    if frame["type"] == "error" {
                        assert_eq!(frame["code"], "rate_limited", "{frame}");
                        refused += 1;
                        break;
                    }
                }
            }
        }
        assert!(refused >= 1, "twenty sent from one address: none refused");
    }
}
