//! Presence and session routes: every row of the issue #2 table.

use livechat_tests::{App, Backend, on_both_databases};
use poem::http::Method;
use serde_json::{Value, json};

on_both_databases!(
    status_route_accepts_the_four_statuses,
    status_route_rejects_bad_bodies,
    agents_list_their_team,
    start_requires_an_online_agent,
    start_for_caller_or_named_agent,
    one_open_session_per_agent,
    start_rejects_bad_agent_ids,
    list_sessions_newest_first_with_filters,
    sessions_page_with_a_cursor,
    sessions_of_one_agent,
    get_session_and_not_found,
    close_is_idempotent,
);

fn assert_rfc3339(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    let t = chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(t.offset().local_minus_utc(), 0, "{s} is not UTC");
}

async fn status_route_accepts_the_four_statuses(backend: Backend) {
    let app = App::new(backend).await;
    let read = |tenant: i64| {
        let app = &app;
        async move {
            app.agent_call(Method::GET, "/livechat/agents/me/status", 7, tenant, None)
                .await
        }
    };
    let (code, body) = read(1).await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "no status set yet: {body}"
    );
    for status in ["online", "away", "busy", "offline"] {
        let (code, body) = app
            .agent_call(
                Method::PUT,
                "/livechat/agents/me/status",
                7,
                1,
                Some(json!({"status": status})),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["data"]["agent_id"], 7);
        assert_eq!(body["data"]["status"], status);
        assert_rfc3339(&body["data"]["updated_at"]);
        let (code, read_back) = read(1).await;
        assert_eq!(code, 200, "{read_back}");
        assert_eq!(read_back, body, "GET answers what PUT stored");
    }
    // Another tenant's presence is its own.
    assert_eq!(read(2).await.0, 404);
}

async fn status_route_rejects_bad_bodies(backend: Backend) {
    let app = App::new(backend).await;
    app.go_online(7, 1).await;
    for bad in [
        json!({"status": "sleeping"}),
        json!({}),
        json!({"status": 1}),
        json!([]),
    ] {
        let (code, body) = app
            .agent_call(
                Method::PUT,
                "/livechat/agents/me/status",
                7,
                1,
                Some(bad.clone()),
            )
            .await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_body", "{bad}");
        // The message names the wire type, as the OpenAPI document does,
        // not the Rust one.
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.contains("Dto"), "{bad}: {message}");
    }
    let (_, body) = app
        .agent_call(
            Method::PUT,
            "/livechat/agents/me/status",
            7,
            1,
            Some(json!({"status": "sleeping"})),
        )
        .await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("PresenceStatus"), "{message}");
    // Malformed JSON.
    let resp = app
        .client
        .put("/livechat/agents/me/status")
        .header("Authorization", format!("Bearer {}", App::agent(7)))
        .header("X-Tenant-ID", "1")
        .content_type("application/json")
        .body("{\"status\": ")
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "invalid_body");
    // Nothing stored was lost: the agent is still online and can start a chat.
    let (code, _) = app
        .agent_call(Method::POST, "/livechat/sessions", 7, 1, Some(json!({})))
        .await;
    assert_eq!(code, 201);
}

/// `GET /agents`: the tenant's agents with their status, departments,
/// whether they are online and available, and their load; of the
/// caller's tenant only.
async fn agents_list_their_team(backend: Backend) {
    let app = App::new(backend).await;
    let put = |agent: i64, tenant: i64, body: Value| {
        let app = &app;
        async move {
            let (code, body) = app
                .agent_call(
                    Method::PUT,
                    "/livechat/agents/me/status",
                    agent,
                    tenant,
                    Some(body),
                )
                .await;
            assert_eq!(code, 200, "{body}");
        }
    };
    put(8, 1, json!({"status": "away"})).await;
    put(
        7,
        1,
        json!({"status": "online", "departments": ["Billing"]}),
    )
    .await;
    put(9, 2, json!({"status": "online"})).await;
    let own = app.open_session(7, 1).await;
    let list = |query: &'static str, tenant: i64| {
        let app = &app;
        async move {
            let (code, body) = app
                .agent_call(
                    Method::GET,
                    &format!("/livechat/agents{query}"),
                    7,
                    tenant,
                    None,
                )
                .await;
            assert_eq!(code, 200, "{body}");
            body["data"].as_array().unwrap().clone()
        }
    };
    let team = list("", 1).await;
    let ids: Vec<i64> = team
        .iter()
        .map(|a| a["agent_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![7, 8]);
    assert_eq!(team[0]["status"], "online");
    assert_eq!(team[0]["departments"], json!(["Billing"]));
    assert_eq!(team[0]["online"], true);
    assert_eq!(team[0]["available"], true);
    assert_eq!(team[0]["open_sessions"], 1, "its own session: {own}");
    assert_eq!(team[0]["capacity"], 5);
    assert_rfc3339(&team[0]["updated_at"]);
    assert_eq!(team[1]["status"], "away");
    assert_eq!(team[1]["online"], false);
    assert_eq!(team[1]["available"], false);
    assert_eq!(team[1]["open_sessions"], 0);

    let away = list("?status=away", 1).await;
    assert_eq!(away.len(), 1);
    assert_eq!(away[0]["agent_id"], 8);
    let other = list("", 2).await;
    assert_eq!(other.len(), 1, "{other:?}");
    assert_eq!(other[0]["agent_id"], 9);

    // At capacity: online, not available.
    app.chat
        .set_agent_capacity(livechat_tests::t(1), 1)
        .await
        .unwrap();
    let team = list("?status=online", 1).await;
    assert_eq!(
        (
            team[0]["online"].as_bool(),
            team[0]["available"].as_bool(),
            team[0]["capacity"].as_i64()
        ),
        (Some(true), Some(false), Some(1))
    );

    // A presence row damaged outside the library hides only itself.
    {
        use sea_orm::ConnectionTrait;
        app.db
            .execute_unprepared(
                "UPDATE livechat_agent_presence SET departments = 'not json' WHERE agent_id = 8",
            )
            .await
            .unwrap();
    }
    let team = list("", 1).await;
    assert_eq!(team.len(), 1, "{team:?}");
    assert_eq!(team[0]["agent_id"], 7);

    for bad in [
        "?status=ONLINE",
        "?status=gone",
        "?status=online&status=away",
    ] {
        app.assert_invalid_query(&format!("/livechat/agents{bad}"), 7, 1)
            .await;
    }
}

async fn start_requires_an_online_agent(backend: Backend) {
    let app = App::new(backend).await;
    // Never set a status.
    let (code, body) = app
        .agent_call(Method::POST, "/livechat/sessions", 7, 1, Some(json!({})))
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["code"], "agent_offline");
    // Any status other than online is refused too.
    for status in ["away", "busy", "offline"] {
        app.agent_call(
            Method::PUT,
            "/livechat/agents/me/status",
            7,
            1,
            Some(json!({"status": status})),
        )
        .await;
        let (code, body) = app
            .agent_call(Method::POST, "/livechat/sessions", 7, 1, Some(json!({})))
            .await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("agent_offline"))
        );
    }
    let (_, list) = app
        .agent_call(Method::GET, "/livechat/sessions", 7, 1, None)
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
}

async fn start_for_caller_or_named_agent(backend: Backend) {
    let app = App::new(backend).await;
    app.go_online(7, 1).await;
    let (code, body) = app
        .agent_call(Method::POST, "/livechat/sessions", 7, 1, Some(json!({})))
        .await;
    assert_eq!(code, 201, "{body}");
    let s = &body["data"];
    assert_eq!(s["tenant_id"], 1);
    assert_eq!(s["agent_id"], 7);
    assert_eq!(s["status"], "OPEN");
    assert_eq!(s["closed_at"], Value::Null);
    assert_rfc3339(&s["created_at"]);
    assert_rfc3339(&s["updated_at"]);
    let id = uuid::Uuid::parse_str(s["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7, "session ids are UUIDv7");

    // Agent 7 starts a session for agent 8, who is online.
    app.go_online(8, 1).await;
    let (code, body) = app
        .agent_call(
            Method::POST,
            "/livechat/sessions",
            7,
            1,
            Some(json!({"agent_id": 8})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["data"]["agent_id"], 8);
    // Agent 9 is offline.
    let (code, body) = app
        .agent_call(
            Method::POST,
            "/livechat/sessions",
            7,
            1,
            Some(json!({"agent_id": 9})),
        )
        .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("agent_offline"))
    );
}

async fn one_open_session_per_agent(backend: Backend) {
    let app = App::new(backend).await;
    let first = app.open_session(7, 1).await;
    let (code, body) = app
        .agent_call(Method::POST, "/livechat/sessions", 7, 1, Some(json!({})))
        .await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "active_session_exists");
    assert!(body["error"]["message"].as_str().unwrap().contains(&first));
    // After closing, a new one may start.
    let (code, _) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{first}/close"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(code, 200);
    let (code, body) = app
        .agent_call(Method::POST, "/livechat/sessions", 7, 1, Some(json!({})))
        .await;
    assert_eq!(code, 201, "{body}");
    assert_ne!(body["data"]["id"], first.as_str());
}

async fn start_rejects_bad_agent_ids(backend: Backend) {
    let app = App::new(backend).await;
    app.go_online(7, 1).await;
    for bad in [
        json!({"agent_id": 0}),
        json!({"agent_id": -4}),
        json!({"agent_id": "x"}),
        json!({"agent_id": 1.5}),
    ] {
        let (code, body) = app
            .agent_call(Method::POST, "/livechat/sessions", 7, 1, Some(bad.clone()))
            .await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_body", "{bad}");
    }
    // No body at all.
    let resp = app
        .client
        .post("/livechat/sessions")
        .header("Authorization", format!("Bearer {}", App::agent(7)))
        .header("X-Tenant-ID", "1")
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
}

async fn list_sessions_newest_first_with_filters(backend: Backend) {
    let app = App::new(backend).await;
    let mut ids = Vec::new();
    for agent in 1..=4 {
        ids.push(app.open_session(agent, 1).await);
    }
    app.agent_call(
        Method::POST,
        &format!("/livechat/sessions/{}/close", ids[1]),
        1,
        1,
        None,
    )
    .await;

    let (code, body) = app
        .agent_call(Method::GET, "/livechat/sessions", 1, 1, None)
        .await;
    assert_eq!(code, 200);
    let got: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(got, newest_first);

    let (_, open) = app
        .agent_call(Method::GET, "/livechat/sessions?status=OPEN", 1, 1, None)
        .await;
    let open: Vec<&str> = open["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        open,
        vec![ids[3].as_str(), ids[2].as_str(), ids[0].as_str()]
    );

    let (_, closed) = app
        .agent_call(Method::GET, "/livechat/sessions?status=CLOSED", 1, 1, None)
        .await;
    assert_eq!(closed["data"].as_array().unwrap().len(), 1);
    assert_eq!(closed["data"][0]["id"], ids[1].as_str());

    let (_, two) = app
        .agent_call(Method::GET, "/livechat/sessions?limit=2", 1, 1, None)
        .await;
    let two: Vec<&str> = two["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(two, vec![ids[3].as_str(), ids[2].as_str()]);

    for bad in [
        "status=open",
        "status=WAITING_X",
        "limit=0",
        "limit=201",
        "limit=abc",
        "limit=-1",
        "status=OPEN&status=bogus",
        "status=OPEN&status=OPEN",
    ] {
        app.assert_invalid_query(&format!("/livechat/sessions?{bad}"), 1, 1)
            .await;
    }
    let (code, _) = app
        .agent_call(Method::GET, "/livechat/sessions?limit=200", 1, 1, None)
        .await;
    assert_eq!(code, 200);
}

/// `agent_id` narrows the list to one agent's sessions (an agent's "mine"
/// view): `me` for the caller, or an id; with `status` and the cursor as
/// for the whole list; of the caller's tenant only.
async fn sessions_of_one_agent(backend: Backend) {
    let app = App::new(backend).await;
    let mine = app.open_session(1, 1).await;
    let served = app.open_session(2, 1).await;
    let (code, _) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{served}/close"),
            2,
            1,
            None,
        )
        .await;
    assert_eq!(code, 200);
    let serving = app.open_session(2, 1).await;
    let other_tenant = app.open_session(1, 2).await;
    let _someone_else = app.open_session(3, 1).await;
    // A customer chat routed to one of the three online agents.
    let resp = app
        .client
        .post("/livechat/customer/chats")
        .header("X-Tenant-ID", "1")
        .body_json(&json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": "Help"}))
        .send()
        .await;
    let (code, chat) = App::decode(resp).await;
    assert_eq!(code, 201, "{chat}");
    let chat_id = chat["data"]["session"]["id"].as_str().unwrap().to_owned();
    let chat_agent = chat["data"]["session"]["agent_id"].as_i64().unwrap();

    let ids = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"))
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let list = |query: &str, agent: i64, tenant: i64| {
        let path = format!("/livechat/sessions?{query}");
        let app = &app;
        async move {
            let (code, body) = app
                .agent_call(Method::GET, &path, agent, tenant, None)
                .await;
            assert_eq!(code, 200, "{path}: {body}");
            body
        }
    };
    let with_chat = |agent: i64, mut expected: Vec<String>| {
        if agent == chat_agent {
            expected.insert(0, chat_id.clone());
        }
        expected
    };
    assert_eq!(
        ids(&list("agent_id=me", 1, 1).await),
        with_chat(1, vec![mine.clone()])
    );
    assert_eq!(
        ids(&list("agent_id=2", 1, 1).await),
        with_chat(2, vec![serving.clone(), served.clone()]),
        "another agent's, by id"
    );
    assert_eq!(
        ids(&list("agent_id=2&status=CLOSED", 3, 1).await),
        vec![served.clone()]
    );
    assert_eq!(
        ids(&list(&format!("agent_id={chat_agent}&status=OPEN"), 3, 1).await)[0],
        chat_id,
        "the customer chat is its agent's"
    );
    assert!(ids(&list("agent_id=9", 1, 1).await).is_empty());
    assert_eq!(
        ids(&list("agent_id=me", 1, 2).await),
        vec![other_tenant],
        "the caller's tenant only"
    );
    // Paged like the whole list.
    let (paged, _) = page_through("/livechat/sessions?agent_id=2", 1, |url| {
        let app = &app;
        async move { app.agent_call(Method::GET, &url, 1, 1, None).await }
    })
    .await;
    assert_eq!(paged, with_chat(2, vec![serving, served]));

    for bad in [
        "agent_id=0",
        "agent_id=-2",
        "agent_id=abc",
        "agent_id=ME",
        "agent_id=",
        "agent_id=1.5",
        "agent_id=me&agent_id=1",
    ] {
        app.assert_invalid_query(&format!("/livechat/sessions?{bad}"), 1, 1)
            .await;
    }
}

async fn get_session_and_not_found(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    let (code, body) = app
        .agent_call(Method::GET, &format!("/livechat/sessions/{id}"), 7, 1, None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(body["data"]["id"], id.as_str());
    assert_eq!(body["data"]["status"], "OPEN");

    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/livechat/sessions/{unknown}"),
        "/livechat/sessions/not-a-uuid".to_owned(),
        "/livechat/sessions/123".to_owned(),
        // Escapes that do not decode to UTF-8: refused by the host's route
        // before the library sees them, in the envelope all the same.
        "/livechat/sessions/%ff".to_owned(),
        "/livechat/sessions/%C3%28/messages".to_owned(),
        "/livechat/%80".to_owned(),
        "/health/%ff".to_owned(),
    ] {
        let (code, body) = app.agent_call(Method::GET, &path, 7, 1, None).await;
        assert_eq!(code, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    // The host's refusal is not cached either, as the library's answers.
    for path in ["/livechat/sessions/%ff", "/livechat/sessions/123"] {
        let resp = app.client.get(path).header("X-Tenant-ID", "1").send().await;
        assert_eq!(
            resp.0
                .headers()
                .get("cache-control")
                .and_then(|v| v.to_str().ok()),
            Some("no-store"),
            "{path}"
        );
    }
}

async fn close_is_idempotent(backend: Backend) {
    let app = App::new(backend).await;
    let id = app.open_session(7, 1).await;
    let path = format!("/livechat/sessions/{id}/close");
    let (code, first) = app.agent_call(Method::POST, &path, 7, 1, None).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["data"]["status"], "CLOSED");
    assert_rfc3339(&first["data"]["closed_at"]);
    let (code, second) = app.agent_call(Method::POST, &path, 7, 1, None).await;
    assert_eq!(code, 200);
    assert_eq!(second, first, "closing again changes nothing");

    let (code, body) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{}/close", uuid::Uuid::now_v7()),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (code, _) = app
        .agent_call(Method::POST, "/livechat/sessions/garbage/close", 7, 1, None)
        .await;
    assert_eq!(code, 404);
}

/// Every page of `path` with `limit` (a list route taking `cursor`) for
/// `call`, following `next_cursor` to the end: the ids in order, and the
/// number of pages read. A full page's `next_cursor` is its last id, a
/// shorter page's (the last) is `null`.
pub(crate) async fn page_through<F, Fut>(path: &str, limit: usize, call: F) -> (Vec<String>, usize)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (poem::http::StatusCode, Value)>,
{
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for pages in 1.. {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let (code, body) = call(url).await;
        assert_eq!(code, 200, "{body}");
        let page: Vec<String> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["id"].as_str().unwrap().to_owned())
            .collect();
        let full = page.len() == limit;
        assert_eq!(
            body["next_cursor"].as_str(),
            page.last().map(String::as_str).filter(|_| full),
            "{body}"
        );
        ids.extend(page);
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, pages),
        }
    }
    unreachable!()
}

/// `GET /sessions` pages with `cursor` (the `next_cursor` of the page before):
/// newest first, no session twice or left out, also under a status filter
/// and from a cursor the filter leaves out; a `cursor` that is malformed,
/// unknown or another tenant's session is 400 `invalid_query`.
async fn sessions_page_with_a_cursor(backend: Backend) {
    let app = App::new(backend).await;
    let mut ids = Vec::new();
    for agent in 1..=5 {
        ids.push(app.open_session(agent, 1).await);
    }
    let other_tenants = app.open_session(1, 2).await;
    let call = |url: String| {
        let app = &app;
        async move { app.agent_call(Method::GET, &url, 1, 1, None).await }
    };
    let (seen, pages) = page_through("/livechat/sessions", 2, call).await;
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 3, "2 + 2 + 1");
    let (seen, pages) = page_through("/livechat/sessions", 5, call).await;
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 2, "a full page, then an empty one");

    app.agent_call(
        Method::POST,
        &format!("/livechat/sessions/{}/close", ids[1]),
        2,
        1,
        None,
    )
    .await;
    let page = |before: &str| {
        let url = format!("/livechat/sessions?status=OPEN&cursor={before}");
        async move {
            let (code, body) = call(url).await;
            assert_eq!(code, 200, "{body}");
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(&ids[3]).await, vec![ids[2].clone(), ids[0].clone()]);
    assert_eq!(page(&ids[1]).await, vec![ids[0].clone()], "a CLOSED cursor");

    for bad in [
        "nope".to_owned(),
        uuid::Uuid::now_v7().to_string(),
        other_tenants,
    ] {
        let (code, body) = call(format!("/livechat/sessions?cursor={bad}")).await;
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}: {body}"
        );
    }
}
