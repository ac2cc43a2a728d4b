//! 401 / 400 / 403 on every agent route.

use livechat_tests::{App, Backend, SECRET, on_both_databases};
use poem::http::Method;
use serde_json::json;

on_both_databases!(credentials_and_tenant_rules_on_every_route);

/// Every agent route with a body that would otherwise succeed or 404.
fn routes(session: &str) -> Vec<(Method, String, Option<serde_json::Value>)> {
    vec![
        (
            Method::PUT,
            "/livechat/agents/me/status".into(),
            Some(json!({"status": "online"})),
        ),
        (Method::POST, "/livechat/sessions".into(), Some(json!({}))),
        (Method::GET, "/livechat/sessions".into(), None),
        (Method::GET, format!("/livechat/sessions/{session}"), None),
        (
            Method::POST,
            format!("/livechat/sessions/{session}/close"),
            None,
        ),
        (
            Method::POST,
            format!("/livechat/sessions/{session}/messages"),
            Some(json!({"message": "hi"})),
        ),
        (
            Method::GET,
            format!("/livechat/sessions/{session}/messages"),
            None,
        ),
    ]
}

fn sign(alg: jsonwebtoken::Algorithm, secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn credentials_and_tenant_rules_on_every_route(backend: Backend) {
    let app = App::new(backend).await;
    let session = app.open_session(7, 1).await;
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64| json!({"sub": 7, "roles": ["SUPPORT_AGENT"], "exp": exp});
    let alg_none = {
        use base64_url as b;
        format!(
            "{}.{}.",
            b(br#"{"alg":"none","typ":"JWT"}"#),
            b(claims(now + 600).to_string().as_bytes())
        )
    };
    let bad_tokens = [
        "not-a-jwt".to_owned(),
        sign(
            jsonwebtoken::Algorithm::HS256,
            "wrong-secret",
            &claims(now + 600),
        ),
        sign(jsonwebtoken::Algorithm::HS256, SECRET, &claims(now - 3600)),
        sign(jsonwebtoken::Algorithm::HS384, SECRET, &claims(now + 600)),
        sign(
            jsonwebtoken::Algorithm::HS256,
            SECRET,
            &json!({"sub": 7, "roles": ["SUPPORT_AGENT"]}),
        ),
        alg_none,
        // A critical header extension nobody here understands.
        jsonwebtoken::encode(
            &jsonwebtoken::Header {
                crit: Some(vec!["exp".into()]),
                ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
            },
            &claims(now + 600),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap(),
        // Not valid yet (`nbf` beyond the 60 s leeway), or `nbf` not a time.
        sign(
            jsonwebtoken::Algorithm::HS256,
            SECRET,
            &json!({"sub": 7, "roles": ["SUPPORT_AGENT"], "exp": now + 7200, "nbf": now + 3600}),
        ),
        sign(
            jsonwebtoken::Algorithm::HS256,
            SECRET,
            &json!({"sub": 7, "roles": ["SUPPORT_AGENT"], "exp": now + 600, "nbf": "soon"}),
        ),
    ];
    let customer = App::token(7, &["USER"], None);
    let tenant_two_only = App::token(7, &["SUPPORT_AGENT"], Some(&[2]));

    for (method, path, body) in routes(&session) {
        // No Authorization header, or another scheme.
        let (code, resp) = app
            .call(method.clone(), &path, None, Some("1"), body.clone())
            .await;
        assert_eq!(
            (code.as_u16(), resp["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path}"
        );
        let raw = app
            .client
            .request(method.clone(), &path)
            .header("Authorization", "Basic YWdlbnQ6cGFzcw==")
            .header("X-Tenant-ID", "1")
            .send()
            .await;
        // Refusals, as answers, are never cached (README "Routes").
        assert_eq!(
            raw.0.headers().get("cache-control").map(|v| v.as_bytes()),
            Some(&b"no-store"[..]),
            "{method} {path} basic"
        );
        let (code, resp) = App::decode(raw).await;
        assert_eq!(
            (code.as_u16(), resp["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path} basic"
        );
        // Nor are the reads' answers (this loop changes nothing with them).
        if method == Method::GET {
            let read = app
                .client
                .request(method.clone(), &path)
                .header("Authorization", format!("Bearer {}", App::agent(7)))
                .header("X-Tenant-ID", "1")
                .send()
                .await;
            assert_eq!(read.0.status(), 200, "{method} {path}");
            assert_eq!(
                read.0.headers().get("cache-control").map(|v| v.as_bytes()),
                Some(&b"no-store"[..]),
                "{method} {path}"
            );
        }
        for token in &bad_tokens {
            let (code, resp) = app
                .call(method.clone(), &path, Some(token), Some("1"), body.clone())
                .await;
            assert_eq!(
                (code.as_u16(), resp["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} {token}"
            );
        }
        // X-Tenant-ID missing or not a positive integer.
        let agent = App::agent(7);
        for tenant in [
            None,
            Some("0"),
            Some("-1"),
            Some("abc"),
            Some("1.5"),
            Some(""),
        ] {
            let (code, resp) = app
                .call(method.clone(), &path, Some(&agent), tenant, body.clone())
                .await;
            assert_eq!(
                (code.as_u16(), resp["error"]["code"].as_str()),
                (400, Some("invalid_tenant")),
                "{method} {path} {tenant:?}"
            );
        }
        // X-Tenant-ID given twice, even with the same value.
        for second in ["1", "2"] {
            let mut twice = app
                .client
                .request(method.clone(), &path)
                .header("Authorization", format!("Bearer {agent}"))
                .header("X-Tenant-ID", "1")
                .header("X-Tenant-ID", second);
            if let Some(body) = body.clone() {
                twice = twice.body_json(&body);
            }
            let (code, resp) = App::decode(twice.send().await).await;
            assert_eq!(
                (code.as_u16(), resp["error"]["code"].as_str()),
                (400, Some("invalid_tenant")),
                "{method} {path} twice ({second})"
            );
        }
        // Authorization given twice, even with the same valid token.
        for second in [agent.clone(), customer.clone()] {
            let mut twice = app
                .client
                .request(method.clone(), &path)
                .header("Authorization", format!("Bearer {agent}"))
                .header("Authorization", format!("Bearer {second}"))
                .header("X-Tenant-ID", "1");
            if let Some(body) = body.clone() {
                twice = twice.body_json(&body);
            }
            let (code, resp) = App::decode(twice.send().await).await;
            assert_eq!(
                (code.as_u16(), resp["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} Authorization twice"
            );
        }
        // Authenticated but not allowed.
        for token in [&customer, &tenant_two_only] {
            let (code, resp) = app
                .call(method.clone(), &path, Some(token), Some("1"), body.clone())
                .await;
            assert_eq!(
                (code.as_u16(), resp["error"]["code"].as_str()),
                (403, Some("forbidden")),
                "{method} {path}"
            );
        }
    }
    // None of the refused requests changed anything: one session, no messages.
    let (_, list) = app
        .agent_call(Method::GET, "/livechat/sessions", 7, 1, None)
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["status"], "OPEN");
    let (_, msgs) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(msgs["data"].as_array().unwrap().len(), 0);
    // Claims that pass or not: a past `nbf`, or one within the leeway, is
    // accepted; `tenant_ids: null` allows every tenant, as an absent list
    // does, and `[]` none.
    for (claim, value, expected) in [
        ("nbf", json!(now - 10), 200),
        ("nbf", json!(now + 30), 200),
        ("tenant_ids", json!(null), 200),
        ("tenant_ids", json!([]), 403),
    ] {
        let mut claims = json!({"sub": 7, "roles": ["SUPPORT_AGENT"], "exp": now + 600});
        claims[claim] = value.clone();
        let token = sign(jsonwebtoken::Algorithm::HS256, SECRET, &claims);
        let (code, _) = app
            .call(
                Method::GET,
                "/livechat/sessions",
                Some(&token),
                Some("1"),
                None,
            )
            .await;
        assert_eq!(code, expected, "{claim}: {value} (now {now})");
    }
    // A string `sub` is accepted as well as a number.
    let string_sub = sign(
        jsonwebtoken::Algorithm::HS256,
        SECRET,
        &json!({"sub": "7", "roles": ["SUPPORT_AGENT"], "tenant_ids": [1], "exp": now + 600}),
    );
    let (code, _) = app
        .call(
            Method::GET,
            "/livechat/sessions",
            Some(&string_sub),
            Some("1"),
            None,
        )
        .await;
    assert_eq!(code, 200);
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
