//! Tenant isolation on every route (DESIGN.md invariant 1): another
//! tenant's session is 404, never visible, never changed.

use livechat_tests::{App, Backend, on_both_databases};
use poem::http::Method;
use serde_json::json;

on_both_databases!(other_tenants_rows_are_not_found, presence_is_per_tenant);

async fn other_tenants_rows_are_not_found(backend: Backend) {
    let app = App::new(backend).await;
    let s1 = app.open_session(7, 1).await;
    app.agent_call(
        Method::POST,
        &format!("/livechat/sessions/{s1}/messages"),
        7,
        1,
        Some(json!({"message": "tenant one only"})),
    )
    .await;

    // Agent 8 may act in both tenants, and looks from tenant 2.
    for (method, path, body) in [
        (Method::GET, format!("/livechat/sessions/{s1}"), None),
        (Method::POST, format!("/livechat/sessions/{s1}/close"), None),
        (
            Method::POST,
            format!("/livechat/sessions/{s1}/messages"),
            Some(json!({"message": "leak?"})),
        ),
        (
            Method::GET,
            format!("/livechat/sessions/{s1}/messages"),
            None,
        ),
    ] {
        let (code, resp) = app.agent_call(method.clone(), &path, 8, 2, body).await;
        assert_eq!(
            (code.as_u16(), resp["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}"
        );
    }
    let (_, list) = app
        .agent_call(Method::GET, "/livechat/sessions", 8, 2, None)
        .await;
    assert_eq!(list["data"], json!([]));

    // Tenant 1 sees its session untouched.
    let (_, s) = app
        .agent_call(Method::GET, &format!("/livechat/sessions/{s1}"), 7, 1, None)
        .await;
    assert_eq!(s["data"]["status"], "OPEN");
    let (_, msgs) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{s1}/messages"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(msgs["data"].as_array().unwrap().len(), 1);

    // The same agent can hold one open session per tenant.
    let s2 = app.open_session(7, 2).await;
    assert_ne!(s1, s2);
}

async fn presence_is_per_tenant(backend: Backend) {
    let app = App::new(backend).await;
    app.go_online(7, 1).await;
    let (code, body) = app
        .agent_call(Method::POST, "/livechat/sessions", 7, 2, Some(json!({})))
        .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("agent_offline"))
    );
}
