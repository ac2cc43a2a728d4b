//! Message routes: validation, seq, paging, idempotency, body limits.

use livechat_tests::{App, Backend, on_both_databases};
use poem::http::Method;
use serde_json::{Value, json};

on_both_databases!(
    post_and_read_back,
    message_validation,
    closed_session_refuses_messages,
    paging_by_after_seq_and_limit,
    idempotent_retries_store_one_message,
    oversized_and_malformed_bodies,
);

fn seqs(body: &Value) -> Vec<i64> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect()
}

async fn post(app: &App, id: &str, body: Value) -> (poem::http::StatusCode, Value) {
    app.agent_call(
        Method::POST,
        &format!("/livechat/sessions/{id}/messages"),
        7,
        1,
        Some(body),
    )
    .await
}

async fn post_and_read_back(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    let (code, body) = post(&app, &id, json!({"message": "Halo"})).await;
    assert_eq!(code, 201, "{body}");
    let m = &body["data"];
    assert_eq!(m["session_id"], id.as_str());
    assert_eq!(m["sender_id"], 7);
    assert_eq!(m["seq"], 1);
    assert_eq!(m["message"], "Halo");
    assert!(chrono::DateTime::parse_from_rfc3339(m["created_at"].as_str().unwrap()).is_ok());
    assert_eq!(
        uuid::Uuid::parse_str(m["id"].as_str().unwrap())
            .unwrap()
            .get_version_num(),
        7
    );

    // Another agent of the tenant may reply; whitespace is kept as sent.
    let (code, body) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{id}/messages"),
            8,
            1,
            Some(json!({"message": "  Hai, ada yang bisa dibantu?\n"})),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(body["data"]["seq"], 2);
    assert_eq!(body["data"]["sender_id"], 8);

    let (code, list) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{id}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(seqs(&list), vec![1, 2]);
    assert_eq!(list["data"][0], *m);
    assert_eq!(
        list["data"][1]["message"],
        "  Hai, ada yang bisa dibantu?\n"
    );
    assert_eq!(list["next_after_seq"], 2);

    // The session's updated_at moves with each message.
    let (_, s) = app
        .agent_call(Method::GET, &format!("/livechat/sessions/{id}"), 7, 1, None)
        .await;
    assert_eq!(s["data"]["updated_at"], list["data"][1]["created_at"]);
}

async fn message_validation(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    let cases = [
        (json!({"message": ""}), "invalid_message"),
        (json!({"message": "   \n\t "}), "invalid_message"),
        // PostgreSQL's text cannot hold U+0000: refused on both databases.
        (json!({"message": "hi\u{0}there"}), "invalid_message"),
        (json!({"message": "x".repeat(10_001)}), "message_too_long"),
        (json!({"message": "é".repeat(10_001)}), "message_too_long"),
        (json!({}), "invalid_body"),
        (json!({"message": 5}), "invalid_body"),
        (json!({"message": null}), "invalid_body"),
        (
            json!({"message": "ok", "client_msg_id": ""}),
            "invalid_body",
        ),
        (
            json!({"message": "ok", "client_msg_id": "x".repeat(129)}),
            "invalid_body",
        ),
    ];
    for (bad, code_name) in cases {
        let (code, body) = post(&app, &id, bad.clone()).await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(
            body["error"]["code"],
            code_name,
            "{}",
            bad.to_string().chars().take(80).collect::<String>()
        );
    }
    // Exactly the limit is fine, counted in characters, not bytes.
    let (code, body) = post(&app, &id, json!({"message": "é".repeat(10_000)})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["data"]["seq"], 1, "refused messages consumed no seq");
    let (_, list) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{id}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(seqs(&list), vec![1]);
}

async fn closed_session_refuses_messages(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    post(&app, &id, json!({"message": "before"})).await;
    app.agent_call(
        Method::POST,
        &format!("/livechat/sessions/{id}/close"),
        7,
        1,
        None,
    )
    .await;
    let (code, body) = post(&app, &id, json!({"message": "after"})).await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("session_closed"))
    );
    let (code, list) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{id}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(code, 200, "a closed session stays readable");
    assert_eq!(seqs(&list), vec![1]);

    for path in [
        format!("/livechat/sessions/{}/messages", uuid::Uuid::now_v7()),
        "/livechat/sessions/zzz/messages".into(),
    ] {
        let (code, body) = app
            .agent_call(Method::POST, &path, 7, 1, Some(json!({"message": "hi"})))
            .await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
        let (code, _) = app.agent_call(Method::GET, &path, 7, 1, None).await;
        assert_eq!(code, 404);
    }
}

async fn paging_by_after_seq_and_limit(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    for n in 1..=205 {
        app.chat
            .post_message(
                livechat_core::TenantId::new(1).unwrap(),
                livechat_core::UserId::new(7).unwrap(),
                id.parse().unwrap(),
                format!("m{n}"),
                None,
            )
            .await
            .unwrap();
    }
    let path = format!("/livechat/sessions/{id}/messages");
    let (_, page) = app.agent_call(Method::GET, &path, 7, 1, None).await;
    assert_eq!(
        seqs(&page),
        (1..=50).collect::<Vec<_>>(),
        "default page is 50"
    );
    let (_, page) = app
        .agent_call(
            Method::GET,
            &format!("{path}?after_seq=50&limit=200"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(seqs(&page), (51..=205).collect::<Vec<_>>());
    let (_, page) = app
        .agent_call(Method::GET, &format!("{path}?limit=200"), 7, 1, None)
        .await;
    assert_eq!(seqs(&page).len(), 200, "max page is 200");
    let (_, page) = app
        .agent_call(
            Method::GET,
            &format!("{path}?after_seq=203&limit=10"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(seqs(&page), vec![204, 205]);
    assert_eq!(page["next_after_seq"], 205);
    let (_, page) = app
        .agent_call(Method::GET, &format!("{path}?after_seq=205"), 7, 1, None)
        .await;
    assert_eq!(seqs(&page), Vec::<i64>::new());
    assert_eq!(page["next_after_seq"], 205);
    // Walking with next_after_seq visits every message once, in order.
    let (mut after, mut seen) = (0, Vec::new());
    loop {
        let (_, page) = app
            .agent_call(
                Method::GET,
                &format!("{path}?after_seq={after}&limit=37"),
                7,
                1,
                None,
            )
            .await;
        let got = seqs(&page);
        if got.is_empty() {
            break;
        }
        seen.extend(got);
        after = page["next_after_seq"].as_i64().unwrap();
    }
    assert_eq!(seen, (1..=205).collect::<Vec<_>>());
    // The latest ten, from the session's `last_seq`.
    let (_, session) = app
        .agent_call(Method::GET, &format!("/livechat/sessions/{id}"), 7, 1, None)
        .await;
    let last_seq = session["data"]["last_seq"].as_i64().unwrap();
    assert_eq!(last_seq, 205);
    let (_, page) = app
        .agent_call(
            Method::GET,
            &format!("{path}?after_seq={}&limit=10", last_seq - 10),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(seqs(&page), (196..=205).collect::<Vec<_>>());
    // Percent-encoded names and values that decode to UTF-8 are read.
    let (code, page) = app
        .agent_call(
            Method::GET,
            &format!("{path}?after_%73eq=%31&limit=%32&x=%C3%A9"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(seqs(&page), vec![2, 3]);

    for bad in [
        "limit=0",
        "limit=201",
        "after_seq=-1",
        "after_seq=x",
        "limit=1.5",
        // A parameter given twice, whichever copy is valid, also once
        // percent-encoded.
        "limit=5&limit=0",
        "limit=0&limit=5",
        "limit=5&limit=5",
        "after_seq=1&li%6Dit=2&limit=3",
        // Names or values that do not percent-decode to UTF-8 (they were
        // read with U+FFFD in place of each bad byte).
        "limit=%ff",
        "x%C3=1&limit=2",
        "limit=2&x=%C3%28",
    ] {
        app.assert_invalid_query(&format!("{path}?{bad}"), 7, 1)
            .await;
    }
    // More than 32 parameters, all different.
    let many: Vec<String> = (0..33).map(|n| format!("p{n}=1")).collect();
    app.assert_invalid_query(&format!("{path}?{}", many.join("&")), 7, 1)
        .await;
    let (code, body) = app
        .agent_call(
            Method::GET,
            &format!("{path}?{}", many[..32].join("&")),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(code, 200, "32 are taken: {body}");
}

async fn idempotent_retries_store_one_message(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    let (code, first) = post(
        &app,
        &id,
        json!({"message": "once", "client_msg_id": "c-1"}),
    )
    .await;
    assert_eq!(code, 201, "{first}");
    let (code, again) = post(
        &app,
        &id,
        json!({"message": "once", "client_msg_id": "c-1"}),
    )
    .await;
    assert_eq!(code, 200, "a replay answers 200 with the original");
    assert_eq!(again, first);

    // The Idempotency-Key header works the same.
    let send = |key: &'static str| {
        app.client
            .post(format!("/livechat/sessions/{id}/messages"))
            .header("Authorization", format!("Bearer {}", App::agent(7)))
            .header("X-Tenant-ID", "1")
            .header("Idempotency-Key", key)
            .body_json(&json!({"message": "via header"}))
            .send()
    };
    let (code, h1) = App::decode(send("h-1").await).await;
    assert_eq!(code, 201);
    let (code, h2) = App::decode(send("h-1").await).await;
    assert_eq!(code, 200);
    assert_eq!(h1, h2);
    assert_eq!(h1["data"]["seq"], 2);

    // Body and header disagreeing is refused.
    let resp = app
        .client
        .post(format!("/livechat/sessions/{id}/messages"))
        .header("Authorization", format!("Bearer {}", App::agent(7)))
        .header("X-Tenant-ID", "1")
        .header("Idempotency-Key", "a")
        .body_json(&json!({"message": "x", "client_msg_id": "b"}))
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );

    // A key that is not visible ASCII, or the header twice, is refused,
    // not taken for no key: a retry would otherwise be stored twice.
    let latin1 = poem::http::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    for keys in [
        vec![latin1],
        vec![
            poem::http::HeaderValue::from_static("k-1"),
            poem::http::HeaderValue::from_static("k-2"),
        ],
    ] {
        let mut request = app
            .client
            .post(format!("/livechat/sessions/{id}/messages"))
            .header("Authorization", format!("Bearer {}", App::agent(7)))
            .header("X-Tenant-ID", "1");
        for key in keys {
            request = request.header("Idempotency-Key", key);
        }
        let resp = request
            .body_json(&json!({"message": "must not be stored"}))
            .send()
            .await;
        let (code, body) = App::decode(resp).await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_body")),
            "{body}"
        );
    }
    // Same key in another session is a different message.
    let other = app.open_session(8, 1).await;
    let (code, body) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{other}/messages"),
            8,
            1,
            Some(json!({"message": "once", "client_msg_id": "c-1"})),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(body["data"]["seq"], 1);

    let (_, list) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{id}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(seqs(&list), vec![1, 2]);
}

async fn oversized_and_malformed_bodies(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    let path = format!("/livechat/sessions/{id}/messages");
    let big = format!("{{\"message\": \"{}\"}}", "a".repeat(64 * 1024));
    let resp = app
        .client
        .post(&path)
        .header("Authorization", format!("Bearer {}", App::agent(7)))
        .header("X-Tenant-ID", "1")
        .content_type("application/json")
        .body(big)
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(code, 413);
    assert_eq!(body["error"]["code"], "payload_too_large");

    for (ctype, raw) in [
        ("application/json", "{\"message\": "),
        ("application/json", "not json"),
        ("text/plain", "hello"),
    ] {
        let resp = app
            .client
            .post(&path)
            .header("Authorization", format!("Bearer {}", App::agent(7)))
            .header("X-Tenant-ID", "1")
            .content_type(ctype)
            .body(raw)
            .send()
            .await;
        let (code, body) = App::decode(resp).await;
        assert_eq!(code, 400, "{raw}: {body}");
        assert_eq!(body["error"]["code"], "invalid_body");
    }
    // Nothing was stored by any of the refused requests.
    let (_, list) = app.agent_call(Method::GET, &path, 7, 1, None).await;
    assert_eq!(seqs(&list), Vec::<i64>::new());
}

/// A send refused because another transaction held its session's row past
/// the batch's `lock_timeout` (PostgreSQL 55P03) is contention, not a
/// fault: 503 `unavailable` (retry later) in the envelope, nothing stored,
/// and the retry is stored with the next `seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_refused_for_contention_is_unavailable() {
    let app = App::new(Backend::Postgres).await;
    let id = app.open_session(7, 1).await;
    let blocker = livechat_tests::hold_session_row(&app.db, &id).await;
    let (code, body) = post(&app, &id, json!({"message": "held"})).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    blocker.commit().await.unwrap();

    let (code, body) = post(&app, &id, json!({"message": "again"})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["data"]["seq"], 1, "{body}");
    let (code, body) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{id}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(seqs(&body), [1]);
}
