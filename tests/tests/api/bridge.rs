//! The ticket bridge end to end (issue #3): tickets when no agent is
//! online, notifications on agent replies, retries, crash safety and the
//! signed webhook, against the real outbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use livechat_core::store::SeaOrmStore;
use livechat_core::{EventId, Notification, OutboxConsumer, TenantId, TicketId, TicketRequested};
use livechat_tests::{App, Backend, on_both_databases};
use livechat_ticket_bridge::{
    Dispatcher, DispatcherConfig, NotificationSink, SeaOrmSinks, SinkError, TicketSink,
};
use poem::http::Method;
use serde_json::{Value, json};

on_both_databases!(
    ticket_then_notification_on_agent_reply,
    tickets_and_chats_by_department,
    tickets_and_notifications_page_with_a_cursor,
    a_handed_back_chat_whose_ticket_was_closed_gets_a_new_one,
    pruning_the_outbox_deletes_only_old_settled_events,
    a_ticketed_chat_handed_back_leaves_its_ticket_without_an_agent,
    a_chat_left_waiting_by_the_last_agent_becomes_a_ticket,
    agents_close_tickets,
    closes_of_a_ticket_at_once_record_one_close,
    a_ticket_closes_only_after_its_opening_and_once,
    a_visitors_notifications_follow_it_when_it_logs_in,
    failing_sink_retries_to_exactly_one,
    events_behind_a_retried_event_do_not_wait_for_their_lease,
    a_help_desk_that_is_down_holds_up_only_its_own_deliveries,
    crash_between_commit_and_dispatch,
    crash_after_delivery_before_settling,
    a_dispatcher_stopping_releases_its_claims,
    a_lease_meant_as_never_is_served,
    a_chat_ticketed_at_its_start_announces_its_ticket,
    an_event_owed_to_a_renamed_sink_reaches_its_successor,
    webhook_receives_signed_events_with_retries,
    a_sessions_events_are_claimed_in_order_behind_its_earliest,
    a_retried_event_holds_later_ones_only_from_the_receivers_it_is_owed,
    a_claim_whose_lease_ran_out_leaves_the_next_claims_events_alone,
    a_backlog_held_behind_a_sink_hides_no_newer_events,
    held_events_do_not_hide_other_sessions_events,
    undecodable_outbox_events_do_not_stall_dispatch,
    the_claim_scan_reads_only_undispatched_events,
    events_no_sink_acts_on_are_settled_without_a_claim,
    events_outside_the_dispatchers_interest_are_written_settled,
);

/// Retries within milliseconds. The lease is the default's: a pass starts
/// events only within its lease less a sink time limit, and a short lease
/// gave back the events of a pass slowed by a loaded machine.
fn fast() -> DispatcherConfig {
    DispatcherConfig {
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..DispatcherConfig::default()
    }
}

async fn visitor_start(app: &App, topic: &str) -> (String, String) {
    let resp = app
        .client
        .post("/livechat/customer/chats")
        .header("X-Tenant-ID", "1")
        .body_json(
            &json!({"browser_uuid": uuid::Uuid::now_v7(), "topic": topic, "message": "anyone?"}),
        )
        .send()
        .await;
    let (code, body) = App::decode(resp).await;
    assert_eq!(code, 201, "{body}");
    (
        body["data"]["session"]["id"].as_str().unwrap().to_owned(),
        format!(
            "Visitor {}",
            body["data"]["visitor_token"].as_str().unwrap()
        ),
    )
}

/// Agent 7 asks tenant 1 for a chat with agent 4, who is not online: the
/// ticket that keeps the request (`agent_offline`).
async fn agent_offline_ticket(app: &App) -> String {
    let (code, body) = app
        .agent_call(
            Method::POST,
            "/livechat/sessions",
            7,
            1,
            Some(json!({"agent_id": 4})),
        )
        .await;
    assert_eq!(
        (code.as_u16(), body["error"]["code"].as_str()),
        (400, Some("agent_offline")),
        "{body}"
    );
    body["error"]["ticket_id"].as_str().unwrap().to_owned()
}

async fn customer_get(app: &App, path: &str, auth: &str) -> (poem::http::StatusCode, Value) {
    App::decode(
        app.client
            .get(path)
            .header("X-Tenant-ID", "1")
            .header("Authorization", auth)
            .send()
            .await,
    )
    .await
}

/// An online agent's service session with `messages` messages from them.
async fn session_with_messages(
    app: &App,
    tenant: TenantId,
    agent: livechat_core::UserId,
    messages: usize,
) -> livechat_core::SessionId {
    let session = app.open_service_session(tenant, agent).await;
    for n in 0..messages {
        app.chat
            .post_message(tenant, agent, session.id, format!("m{n}"), None)
            .await
            .unwrap();
    }
    session.id
}

async fn drain(dispatcher: &Dispatcher<SeaOrmStore>, db: &sea_orm::DatabaseConnection) {
    livechat_tests::drain_outbox(dispatcher, db).await;
}

/// A chat that queued behind a busy agent gets its ticket when that agent,
/// the tenant's last one online, goes away: once, with its customer's
/// messages so far,
/// and only in that tenant; the chat keeps waiting, and the agent keeps the
/// chat it serves (one who goes `offline` hands theirs back: routing's
/// `an_agent_going_offline_hands_their_chats_back`).
async fn a_chat_left_waiting_by_the_last_agent_becomes_a_ticket(backend: Backend) {
    let app = App::new(backend).await;
    for tenant in [1, 2] {
        app.chat
            .set_agent_capacity(TenantId::new(tenant).unwrap(), 1)
            .await
            .unwrap();
    }
    app.go_online(7, 1).await;
    app.go_online(9, 2).await;
    let status = |agent: i64, status: &'static str| {
        let app = &app;
        async move {
            let (code, body) = app
                .agent_call(
                    Method::PUT,
                    "/livechat/agents/me/status",
                    agent,
                    1,
                    Some(json!({ "status": status })),
                )
                .await;
            assert_eq!(code, 200, "{body}");
        }
    };
    // Agent 8 is away: not online, so agent 7 is the last one online.
    status(8, "away").await;
    let (served, _) = visitor_start(&app, "First").await;
    let (waiting, auth) = visitor_start(&app, "Second").await;
    let elsewhere = {
        let tenant = TenantId::new(2).unwrap();
        let app = &app;
        let start = |user: i64| async move {
            let customer = app
                .chat
                .resolve_customer(
                    tenant,
                    livechat_core::CustomerIdentity::User(livechat_tests::u(user)),
                )
                .await
                .unwrap();
            app.chat
                .start_customer_chat(
                    tenant,
                    customer.id,
                    livechat_core::CustomerChatRequest {
                        topic: "Elsewhere".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
                .view
                .session
        };
        start(300).await;
        start(301).await
    };
    assert_eq!(elsewhere.status, livechat_core::SessionStatus::Waiting);
    let chat = |id: String| {
        let auth = auth.clone();
        let app = &app;
        async move {
            let (code, body) =
                customer_get(app, &format!("/livechat/customer/chats/{id}"), &auth).await;
            assert_eq!(code, 200, "{body}");
            body["data"].clone()
        }
    };
    let before = chat(waiting.clone()).await;
    assert_eq!(before["status"], "WAITING");
    assert!(
        before["ticket_id"].is_null(),
        "an agent is online: {before}"
    );
    // The customer adds to the request while waiting.
    let resp = app
        .client
        .post(format!("/livechat/customer/chats/{waiting}/messages"))
        .header("X-Tenant-ID", "1")
        .header("Authorization", &auth)
        .body_json(&json!({"message": "Order 1234"}))
        .send()
        .await;
    let (code, added) = App::decode(resp).await;
    assert_eq!(code, 201, "{added}");

    status(7, "away").await;
    let after = chat(waiting.clone()).await;
    assert_eq!(after["status"], "WAITING", "it keeps waiting: {after}");
    assert_eq!(after["queue_position"], 1);
    let ticket_id = after["ticket_id"]
        .as_str()
        .expect("a ticket once no agent is online")
        .to_owned();
    let (_, open) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/sessions/{served}"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(open["data"]["status"], "OPEN");
    assert!(open["data"]["ticket_id"].is_null(), "a served chat: {open}");
    let other = app
        .chat
        .get_session(TenantId::new(2).unwrap(), elsewhere.id)
        .await
        .unwrap();
    assert_eq!(other.session.ticket_id, None, "tenant 2 has agent 9 online");

    // The request carries what a ticket system needs, the first message too.
    let page = livechat_core::PageSize::parse(Some(200), app.chat.config()).unwrap();
    let events = livechat_core::OutboxRepository::list_events(
        app.chat.store(),
        TenantId::new(1).unwrap(),
        None,
        page,
    )
    .await
    .unwrap();
    let requested: Vec<TicketRequested> = events
        .iter()
        .filter(|e| e.kind == livechat_core::EventKind::TicketRequested)
        .map(|e| e.payload.decode().unwrap())
        .collect();
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert_eq!(requested[0].ticket_id.to_string(), ticket_id);
    assert_eq!(
        requested[0].session_id.map(|s| s.to_string()),
        Some(waiting.clone())
    );
    assert_eq!(requested[0].topic.as_deref(), Some("Second"));
    assert_eq!(requested[0].first_message.as_deref(), Some("anyone?"));
    assert_eq!(
        requested[0].messages,
        vec!["anyone?".to_owned(), "Order 1234".to_owned()],
        "every customer message so far"
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == livechat_core::EventKind::SessionUpdated
                && e.session_id.map(|s| s.to_string()) == Some(waiting.clone())),
        "followers are told of the ticket"
    );

    // Online and away again, and housekeeping: still one ticket.
    status(7, "online").await;
    status(7, "away").await;
    assert!(
        app.chat
            .ticket_unattended_chats(None)
            .await
            .unwrap()
            .is_empty()
    );
    drain(&app.dispatcher, &app.db).await;
    let (code, tickets) = app
        .agent_call(Method::GET, "/livechat/tickets", 7, 1, None)
        .await;
    assert_eq!(code, 200, "{tickets}");
    let tickets = tickets["data"].as_array().unwrap();
    assert_eq!(tickets.len(), 1, "exactly one ticket: {tickets:?}");
    assert_eq!(tickets[0]["id"], ticket_id.as_str());
    assert_eq!(tickets[0]["session_id"], waiting.as_str());
    assert_eq!(tickets[0]["reason"], "no_agent_online");
    assert_eq!(tickets[0]["subject"], "Second");
    assert_eq!(tickets[0]["status"], "OPEN");
    assert_eq!(chat(waiting).await["ticket_id"], ticket_id.as_str());
}

/// Two tickets of tenant 1: a visitor's waiting chat's, made while nobody
/// was online, and one addressed to agent 4, who is offline, by agent 7
/// (then online). Returns the chat, its ticket, the agent's ticket and
/// the visitor's `Authorization`.
async fn two_tickets(app: &App) -> (String, String, String, String) {
    let (chat, visitor) = visitor_start(app, "Refund").await;
    let (_, s) = customer_get(app, &format!("/livechat/customer/chats/{chat}"), &visitor).await;
    let chat_ticket = s["data"]["ticket_id"].as_str().unwrap().to_owned();
    app.go_online(7, 1).await;
    let agent_ticket = agent_offline_ticket(app).await;
    (chat, chat_ticket, agent_ticket, visitor)
}

/// Twenty closes of one ticket at the same moment record one
/// `ticket.closed` (a webhook got the close under several event ids on
/// PostgreSQL): for a ticket without a session and for a chat's.
async fn closes_of_a_ticket_at_once_record_one_close(backend: Backend) {
    let app = App::new(backend).await;
    let (_, chat_ticket, agent_ticket, _) = two_tickets(&app).await;
    drain(&app.dispatcher, &app.db).await;
    for ticket in [&agent_ticket, &chat_ticket] {
        let path = format!("/livechat/tickets/{ticket}/close");
        let closes = (0..20).map(|_| app.agent_call(Method::POST, &path, 7, 1, None));
        for (code, body) in futures::future::join_all(closes).await {
            assert_eq!(code, 202, "{body}");
        }
    }
    assert_eq!(outbox_rows(&app, "kind = 'ticket.closed'").await, 2);
}

/// An agent closes a ticket addressed to an offline agent, which has no
/// session to close it, and one of a waiting chat: 202, then CLOSED once
/// the dispatcher has run. Closing again changes nothing, the session's
/// own close later leaves the ticket as it is, and other tenants,
/// customers and unknown ids cannot close one.
async fn agents_close_tickets(backend: Backend) {
    let app = App::new(backend).await;
    let (chat, chat_ticket, agent_ticket, visitor) = two_tickets(&app).await;
    let close = |ticket: &str, agent: i64, tenant: i64| {
        let path = format!("/livechat/tickets/{ticket}/close");
        let app = &app;
        async move {
            app.agent_call(Method::POST, &path, agent, tenant, None)
                .await
        }
    };
    let get = |ticket: &str| {
        let path = format!("/livechat/tickets/{ticket}");
        let app = &app;
        async move {
            let (code, body) = app.agent_call(Method::GET, &path, 7, 1, None).await;
            assert_eq!(code, 200, "{body}");
            body["data"].clone()
        }
    };
    // Not written by the dispatcher yet: pending (reading it: not found).
    assert_eq!(close(&agent_ticket, 7, 1).await.0, 409);
    drain(&app.dispatcher, &app.db).await;

    for (ticket, bad) in [
        (agent_ticket.as_str(), (9, 2)),
        (&*uuid::Uuid::now_v7().to_string(), (7, 1)),
        ("not-a-ticket", (7, 1)),
    ] {
        let (code, body) = close(ticket, bad.0, bad.1).await;
        assert_eq!(code, 404, "{ticket} by {bad:?}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (code, body) = App::decode(
        app.client
            .post(format!("/livechat/tickets/{agent_ticket}/close"))
            .header("X-Tenant-ID", "1")
            .header("Authorization", visitor.as_str())
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 401, "a customer: {body}");
    assert_eq!(get(&agent_ticket).await["status"], "OPEN");

    for ticket in [&agent_ticket, &chat_ticket] {
        let (code, body) = close(ticket, 7, 1).await;
        assert_eq!(code, 202, "{body}");
        assert_eq!(body["data"]["id"], ticket.as_str());
        assert_eq!(body["data"]["status"], "OPEN", "as it was");
    }
    drain(&app.dispatcher, &app.db).await;
    let closed = get(&agent_ticket).await;
    assert_eq!(closed["status"], "CLOSED", "{closed}");
    assert!(closed["closed_at"].is_string(), "{closed}");
    let chat_closed = get(&chat_ticket).await;
    assert_eq!(chat_closed["status"], "CLOSED");
    let (_, open) = app
        .agent_call(Method::GET, "/livechat/tickets?status=OPEN", 7, 1, None)
        .await;
    assert_eq!(open["data"], json!([]));
    // The chat itself is untouched: still with agent 7 (who took it from
    // the queue on coming online), still ticketed.
    let (_, s) = customer_get(&app, &format!("/livechat/customer/chats/{chat}"), &visitor).await;
    assert_eq!(s["data"]["status"], "OPEN");
    assert_eq!(s["data"]["ticket_id"], chat_ticket.as_str());

    // Again: 200, nothing new to dispatch.
    let (code, body) = close(&agent_ticket, 7, 1).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["status"], "CLOSED");
    assert_eq!(livechat_tests::pending_events(&app.db).await, 0);
    // The chat's own close later leaves its ticket as it was.
    let (code, _) = App::decode(
        app.client
            .post(format!("/livechat/customer/chats/{chat}/close"))
            .header("X-Tenant-ID", "1")
            .header("Authorization", visitor.as_str())
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 200);
    drain(&app.dispatcher, &app.db).await;
    assert_eq!(get(&chat_ticket).await, chat_closed);
}

/// A ticket without a session (addressed to an offline agent) that the
/// in-app table holds while its opening is still undelivered elsewhere (a
/// webhook failing) cannot be closed yet: nothing would order the close
/// after the opening. Once delivered it closes, and a second close while
/// the first is undispatched writes no second event. Before the dispatcher
/// has run at all the close and a read answer the same 409 (not 404, which
/// read as a wrong id), a session's ticket too, and only in the ticket's
/// tenant.
async fn a_ticket_closes_only_after_its_opening_and_once(backend: Backend) {
    let app = App::new(backend).await;
    let ticket = agent_offline_ticket(&app).await;
    // Nobody online: a visitor's chat gets a ticket at once.
    let (chat, visitor) = visitor_start(&app, "Before the dispatcher").await;
    let (_, s) = customer_get(&app, &format!("/livechat/customer/chats/{chat}"), &visitor).await;
    let chat_ticket = s["data"]["ticket_id"].as_str().unwrap().to_owned();
    for id in [&ticket, &chat_ticket] {
        let path = format!("/livechat/tickets/{id}/close");
        let (code, body) = app.agent_call(Method::POST, &path, 7, 1, None).await;
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["error"]["code"], "ticket_pending", "{body}");
        let (code, body) = app.agent_call(Method::POST, &path, 7, 2, None).await;
        assert_eq!(code, 404, "another tenant's ticket: {body}");
        // Reading it answers the same until the tables have it.
        let (code, body) = app
            .agent_call(Method::GET, &format!("/livechat/tickets/{id}"), 7, 1, None)
            .await;
        assert_eq!(code, 409, "not in the tables yet: {body}");
        assert_eq!(body["error"]["code"], "ticket_pending", "{body}");
        let (code, body) = app
            .agent_call(Method::GET, &format!("/livechat/tickets/{id}"), 7, 2, None)
            .await;
        assert_eq!(code, 404, "another tenant's ticket: {body}");
    }
    assert_eq!(
        livechat_tests::pending_events(&app.db).await,
        2,
        "the two openings: nothing new"
    );
    drain(&app.dispatcher, &app.db).await;
    let path = format!("/livechat/tickets/{chat_ticket}/close");
    let (code, body) = app.agent_call(Method::POST, &path, 7, 1, None).await;
    assert_eq!(code, 202, "a session's ticket once delivered: {body}");
    drain(&app.dispatcher, &app.db).await;
    // Agent 4's ticket again, its opening undelivered.
    let ticket = agent_offline_ticket(&app).await;
    // The in-app sink has it; the event stays undispatched, as while
    // another sink keeps failing.
    let tenant = TenantId::new(1).unwrap();
    let events = livechat_tests::events_of(&app.chat, tenant).await;
    let opening = events
        .iter()
        .find(|e| e.kind == livechat_core::EventKind::TicketRequested)
        .unwrap();
    SeaOrmSinks::new(app.db.clone())
        .open_ticket(&opening.payload.decode().unwrap(), opening.id)
        .await
        .unwrap();
    let path = format!("/livechat/tickets/{ticket}/close");
    let (code, body) = app.agent_call(Method::POST, &path, 7, 1, None).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "ticket_pending");
    assert_eq!(
        livechat_tests::pending_events(&app.db).await,
        1,
        "nothing new"
    );

    drain(&app.dispatcher, &app.db).await;
    for _ in 0..2 {
        let (code, body) = app.agent_call(Method::POST, &path, 7, 1, None).await;
        assert_eq!(code, 202, "{body}");
    }
    assert_eq!(
        livechat_tests::pending_events(&app.db).await,
        1,
        "one close, however often asked while it is undispatched"
    );
    drain(&app.dispatcher, &app.db).await;
    let (_, closed) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/tickets/{ticket}"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(closed["data"]["status"], "CLOSED", "{closed}");
}

/// A chat's department goes with its ticket (the tables, the webhook's
/// `ticket.requested`), and agents list one department's tickets and
/// chats.
async fn tickets_and_chats_by_department(backend: Backend) {
    let app = App::new(backend).await;
    let mut sessions = Vec::new();
    for (topic, department) in [
        ("Refund", Some(" Billing ")),
        ("Quote", Some("Sales")),
        ("Hi", None),
    ] {
        let resp = app
            .client
            .post("/livechat/customer/chats")
            .header("X-Tenant-ID", "1")
            .body_json(&json!({
                "browser_uuid": uuid::Uuid::now_v7(),
                "topic": topic,
                "department": department,
            }))
            .send()
            .await;
        let (code, body) = App::decode(resp).await;
        assert_eq!(code, 201, "{body}");
        sessions.push(body["data"]["session"]["id"].as_str().unwrap().to_owned());
    }
    drain(&app.dispatcher, &app.db).await;
    let list = |path: &str| {
        let path = path.to_owned();
        let app = &app;
        async move {
            let (code, body) = app.agent_call(Method::GET, &path, 7, 1, None).await;
            assert_eq!(code, 200, "{path}: {body}");
            body["data"].as_array().unwrap().clone()
        }
    };
    let all = list("/livechat/tickets").await;
    assert_eq!(all.len(), 3);
    let billing = list("/livechat/tickets?department=Billing").await;
    assert_eq!(billing.len(), 1, "{billing:?}");
    assert_eq!(billing[0]["department"], "Billing", "stored trimmed");
    assert_eq!(billing[0]["session_id"], sessions[0].as_str());
    assert_eq!(billing[0]["subject"], "Refund");
    let sales = list("/livechat/tickets?department=%20Sales&status=OPEN").await;
    assert_eq!(sales.len(), 1, "{sales:?}");
    assert_eq!(sales[0]["session_id"], sessions[1].as_str());
    assert!(
        list("/livechat/tickets?department=Sales&status=CLOSED")
            .await
            .is_empty()
    );
    assert!(
        list("/livechat/tickets?department=Support")
            .await
            .is_empty()
    );
    let hi = all.iter().find(|t| t["subject"] == "Hi").unwrap();
    assert!(hi["department"].is_null(), "{hi}");
    // The chats themselves, by department.
    let chats = list("/livechat/sessions?department=Billing&status=WAITING").await;
    assert_eq!(chats.len(), 1, "{chats:?}");
    assert_eq!(chats[0]["id"], sessions[0].as_str());
    assert_eq!(list("/livechat/sessions?department=Sales").await.len(), 1);

    let long = "x".repeat(101);
    for path in ["/livechat/tickets", "/livechat/sessions"] {
        for bad in [
            "department=",
            "department=%20",
            &format!("department={long}"),
        ] {
            let (code, body) = app
                .agent_call(Method::GET, &format!("{path}?{bad}"), 7, 1, None)
                .await;
            assert_eq!(code, 400, "{path}?{bad}: {body}");
            assert_eq!(body["error"]["code"], "invalid_query", "{path}?{bad}");
        }
    }
}

async fn ticket_then_notification_on_agent_reply(backend: Backend) {
    let app = App::new(backend).await;
    let (session, auth) = visitor_start(&app, "Refund").await;
    let (_, s) = customer_get(&app, &format!("/livechat/customer/chats/{session}"), &auth).await;
    assert_eq!(s["data"]["status"], "WAITING");
    assert_eq!(s["data"]["queue_position"], 1);
    let ticket_id = s["data"]["ticket_id"]
        .as_str()
        .expect("a ticket when no agent is online")
        .to_owned();

    drain(&app.dispatcher, &app.db).await;
    let (code, tickets) = app
        .agent_call(Method::GET, "/livechat/tickets", 7, 1, None)
        .await;
    assert_eq!(code, 200, "{tickets}");
    assert_eq!(
        tickets["data"].as_array().unwrap().len(),
        1,
        "exactly one ticket"
    );
    assert_eq!(tickets["data"][0]["id"], ticket_id.as_str());
    assert_eq!(tickets["data"][0]["session_id"], session.as_str());
    assert_eq!(tickets["data"][0]["subject"], "Refund");
    let (_, open) = app
        .agent_call(Method::GET, "/livechat/tickets?status=OPEN", 7, 1, None)
        .await;
    assert_eq!(open["data"].as_array().unwrap().len(), 1);

    // An agent comes online, gets the chat from the queue, and replies.
    app.go_online(7, 1).await;
    let (code, reply) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            Some(json!({"message": "Sorry for the wait! Your refund is on its way."})),
        )
        .await;
    assert_eq!(code, 201, "{reply}");
    drain(&app.dispatcher, &app.db).await;
    // The ticket follows the chat: its owner is the agent serving it.
    let (_, ticket) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/tickets/{ticket_id}"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(ticket["data"]["agent_id"], 7, "{ticket}");
    let (code, notes) = customer_get(&app, "/livechat/customer/notifications", &auth).await;
    assert_eq!(code, 200, "{notes}");
    let notes = notes["data"].as_array().unwrap().clone();
    assert_eq!(notes.len(), 1, "one notification per agent reply");
    assert_eq!(notes[0]["kind"], "agent_reply");
    assert_eq!(notes[0]["ticket_id"], ticket_id.as_str());
    assert!(notes[0]["body"].as_str().unwrap().contains("refund"));
    assert_eq!(notes[0]["read_at"], Value::Null);
    let note_id = notes[0]["id"].as_str().unwrap();
    let read = app
        .client
        .post(format!("/livechat/customer/notifications/{note_id}/read"))
        .header("X-Tenant-ID", "1")
        .header("Authorization", &auth)
        .send()
        .await;
    let (code, read) = App::decode(read).await;
    assert_eq!(code, 200);
    assert!(read["data"]["read_at"].is_string());
    // Another customer cannot see or read it.
    let (_, other) = visitor_start(&app, "Other").await;
    let (_, theirs) = customer_get(&app, "/livechat/customer/notifications", &other).await;
    assert_eq!(theirs["data"], json!([]));
    let resp = app
        .client
        .post(format!("/livechat/customer/notifications/{note_id}/read"))
        .header("X-Tenant-ID", "1")
        .header("Authorization", &other)
        .send()
        .await;
    assert_eq!(App::decode(resp).await.0, 404);

    // The customer's own messages and the agent's in an unticketed chat
    // notify nobody; closing the session closes the ticket.
    app.agent_call(
        Method::POST,
        &format!("/livechat/sessions/{session}/close"),
        7,
        1,
        None,
    )
    .await;
    drain(&app.dispatcher, &app.db).await;
    let (_, t) = app
        .agent_call(
            Method::GET,
            &format!("/livechat/tickets/{ticket_id}"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(t["data"]["status"], "CLOSED");
    assert!(t["data"]["closed_at"].is_string());
    let (_, notes) = customer_get(&app, "/livechat/customer/notifications", &auth).await;
    assert_eq!(notes["data"].as_array().unwrap().len(), 1);
}

/// `GET /tickets` and `GET /customer/notifications` page with `cursor`
/// (the `next_cursor` of the page before), newest first, with nothing twice
/// or left out; a `cursor` that is malformed, of another list, or another
/// customer's notification is 400 `invalid_query`.
async fn tickets_and_notifications_page_with_a_cursor(backend: Backend) {
    use crate::sessions::page_through;

    let app = App::new(backend).await;
    let mut chats = Vec::new();
    for topic in ["one", "two", "three"] {
        chats.push(visitor_start(&app, topic).await);
    }
    drain(&app.dispatcher, &app.db).await;
    let agent = |url: String| {
        let app = &app;
        async move { app.agent_call(Method::GET, &url, 7, 1, None).await }
    };
    let (_, all) = agent("/livechat/tickets".into()).await;
    let newest_first: Vec<String> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(newest_first.len(), 3);
    let (tickets, pages) = page_through("/livechat/tickets", 2, agent).await;
    assert_eq!(tickets, newest_first);
    assert_eq!(pages, 2, "2 + 1");

    // Ticketed chats: every agent reply is notified.
    app.go_online(7, 1).await;
    for (n, (session, _)) in chats.iter().enumerate() {
        let replies = if n == 0 { 3 } else { 1 };
        for i in 0..replies {
            let (code, body) = app
                .agent_call(
                    Method::POST,
                    &format!("/livechat/sessions/{session}/messages"),
                    7,
                    1,
                    Some(json!({"message": format!("reply {i}")})),
                )
                .await;
            assert_eq!(code, 201, "{body}");
        }
    }
    drain(&app.dispatcher, &app.db).await;
    let (_, first) = &chats[0];
    let customer = |url: String| {
        let app = &app;
        async move { customer_get(app, &url, first).await }
    };
    let (notes, pages) = page_through("/livechat/customer/notifications", 1, customer).await;
    assert_eq!(notes.len(), 3);
    assert_eq!(pages, 4, "1 + 1 + 1, then an empty page");
    let (_, all) = customer("/livechat/customer/notifications".into()).await;
    let ids: Vec<String> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(notes, ids);

    let (_, theirs) = customer_get(&app, "/livechat/customer/notifications", &chats[1].1).await;
    let theirs = theirs["data"][0]["id"].as_str().unwrap().to_owned();
    for (url, bad) in [
        ("/livechat/tickets", "nope"),
        ("/livechat/tickets", chats[0].0.as_str()),
        ("/livechat/customer/notifications", "nope"),
        ("/livechat/customer/notifications", theirs.as_str()),
        ("/livechat/customer/notifications", newest_first[0].as_str()),
    ] {
        let url = format!("{url}?cursor={bad}");
        let (code, body) = if url.contains("customer") {
            customer(url).await
        } else {
            agent(url).await
        };
        assert_eq!(
            (code.as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}: {body}"
        );
    }
}

/// A chat ticketed while nobody was online, then served and its ticket
/// closed by the agent, goes back to the queue when that agent, the last
/// one online, sets `offline`: with nobody to take it, it gets a new ticket
/// (the closed one no longer stands for it), also when the outbox's
/// events, the close among them, were pruned before.
async fn a_handed_back_chat_whose_ticket_was_closed_gets_a_new_one(backend: Backend) {
    let app = App::new(backend).await;
    let (session, auth) = visitor_start(&app, "Refund").await;
    let chat = |id: String| {
        let (app, auth) = (&app, auth.clone());
        async move {
            let (code, body) =
                customer_get(app, &format!("/livechat/customer/chats/{id}"), &auth).await;
            assert_eq!(code, 200, "{body}");
            body["data"].clone()
        }
    };
    let first = chat(session.clone()).await["ticket_id"]
        .as_str()
        .expect("nobody online: a ticket")
        .to_owned();
    drain(&app.dispatcher, &app.db).await;
    app.go_online(7, 1).await;
    assert_eq!(chat(session.clone()).await["status"], "OPEN");
    let (code, body) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/tickets/{first}/close"),
            7,
            1,
            None,
        )
        .await;
    assert_eq!(code, 202, "{body}");
    drain(&app.dispatcher, &app.db).await;
    let pruned = prune_all(&app).await;
    assert!(
        pruned >= 3,
        "the ticket's opening and close and more: {pruned}"
    );

    let (code, body) = app
        .agent_call(
            Method::PUT,
            "/livechat/agents/me/status",
            7,
            1,
            Some(json!({"status": "offline"})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let back = chat(session.clone()).await;
    assert_eq!(back["status"], "WAITING", "{back}");
    let second = back["ticket_id"].as_str().expect("a ticket again");
    assert_ne!(second, first, "a new ticket, not the closed one");
    drain(&app.dispatcher, &app.db).await;
    let (_, open) = app
        .agent_call(Method::GET, "/livechat/tickets?status=OPEN", 7, 1, None)
        .await;
    let open: Vec<&str> = open["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(open, vec![second]);
}

/// A chat ticketed while nobody was online, then served by agent 7, shows
/// agent 7 on its ticket; when agent 7 sets `offline` the chat goes back
/// to the queue with the same ticket, which then has no agent (it showed
/// the agent who had left), and the next agent to take the chat is on it.
async fn a_ticketed_chat_handed_back_leaves_its_ticket_without_an_agent(backend: Backend) {
    let app = App::new(backend).await;
    let (session, auth) = visitor_start(&app, "Refund").await;
    let (code, body) =
        customer_get(&app, &format!("/livechat/customer/chats/{session}"), &auth).await;
    assert_eq!(code, 200, "{body}");
    let ticket = body["data"]["ticket_id"].as_str().unwrap().to_owned();
    let ticket_agent = || {
        let (app, ticket) = (&app, ticket.clone());
        async move {
            drain(&app.dispatcher, &app.db).await;
            let (code, body) = app
                .agent_call(
                    Method::GET,
                    &format!("/livechat/tickets/{ticket}"),
                    8,
                    1,
                    None,
                )
                .await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["data"]["status"], "OPEN", "{body}");
            body["data"]["agent_id"].clone()
        }
    };
    assert_eq!(ticket_agent().await, Value::Null);
    app.go_online(7, 1).await;
    assert_eq!(ticket_agent().await, json!(7));
    let (code, body) = app
        .agent_call(
            Method::PUT,
            "/livechat/agents/me/status",
            7,
            1,
            Some(json!({"status": "offline"})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(ticket_agent().await, Value::Null, "the agent left");
    app.go_online(8, 1).await;
    assert_eq!(ticket_agent().await, json!(8));
}

/// Prunes every settled event of `app`'s outbox (a cut-off a second
/// ahead), returning how many.
async fn prune_all(app: &App) -> u64 {
    let ahead = chrono::Utc::now() + chrono::Duration::seconds(1);
    livechat_core::OutboxRepository::prune_events(app.chat.store(), ahead, 10_000)
        .await
        .unwrap()
}

/// Housekeeping's pruning of the outbox deletes settled events only: past
/// the retention, dispatched ones go (in batches: `limit` at a time,
/// oldest first), an undispatched one stays whatever its age, and what the
/// events told stays readable. `ChatService::prune_outbox` refuses a
/// retention under a day and deletes nothing of the last day.
async fn pruning_the_outbox_deletes_only_old_settled_events(backend: Backend) {
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let (session, auth) = visitor_start(&app, "Refund").await;
    app.go_online(7, 1).await;
    for text in ["one", "two", "three"] {
        let (code, body) = app
            .agent_call(
                Method::POST,
                &format!("/livechat/sessions/{session}/messages"),
                7,
                1,
                Some(json!({"message": text})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
    drain(&app.dispatcher, &app.db).await;
    let (code, body) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            Some(json!({"message": "undispatched"})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let page = livechat_core::PageSize::parse(Some(100), app.chat.config()).unwrap();
    let all = livechat_core::OutboxRepository::list_events(app.chat.store(), tenant, None, page)
        .await
        .unwrap();
    let settled = all.len() - 1;
    assert!(settled >= 5, "{all:?}");

    // Nothing is a day old; a shorter retention is refused.
    let day = std::time::Duration::from_secs(86_400);
    assert_eq!(app.chat.prune_outbox(day).await.unwrap(), 0);
    assert!(matches!(
        app.chat.prune_outbox(day / 2).await,
        Err(livechat_core::ChatError::InvalidInput(_))
    ));

    let ahead = chrono::Utc::now() + chrono::Duration::seconds(1);
    let store = app.chat.store();
    let first = livechat_core::OutboxRepository::prune_events(store, ahead, 2)
        .await
        .unwrap();
    assert_eq!(first, 2, "a batch at most");
    let left = livechat_core::OutboxRepository::list_events(store, tenant, None, page)
        .await
        .unwrap();
    assert_eq!(left[..], all[2..], "the oldest first");
    assert_eq!(prune_all(&app).await, u64::try_from(settled - 2).unwrap());
    let left = livechat_core::OutboxRepository::list_events(store, tenant, None, page)
        .await
        .unwrap();
    assert_eq!(left[..], all[settled..], "the undispatched event stays");

    // What the events told stays: the messages, and the undispatched one
    // is still delivered.
    let (code, body) = customer_get(
        &app,
        &format!("/livechat/customer/chats/{session}/messages"),
        &auth,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let texts: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["anyone?", "one", "two", "three", "undispatched"],
        "{body}"
    );
    drain(&app.dispatcher, &app.db).await;
    assert_eq!(prune_all(&app).await, 1);
}

/// A visitor notified of a reply, then linked to a logged-in user (also
/// with a reply whose notification is delivered after the link), finds
/// every notification through either credential, and can mark them read.
async fn a_visitors_notifications_follow_it_when_it_logs_in(backend: Backend) {
    let app = App::new(backend).await;
    let (session, visitor) = visitor_start(&app, "Refund").await;
    app.go_online(7, 1).await;
    let reply = |text: &'static str| {
        let app = &app;
        let session = session.clone();
        async move {
            let (code, body) = app
                .agent_call(
                    Method::POST,
                    &format!("/livechat/sessions/{session}/messages"),
                    7,
                    1,
                    Some(json!({"message": text})),
                )
                .await;
            assert_eq!(code, 201, "{body}");
        }
    };
    reply("before the link").await;
    drain(&app.dispatcher, &app.db).await;
    let (_, notes) = customer_get(&app, "/livechat/customer/notifications", &visitor).await;
    assert_eq!(notes["data"].as_array().unwrap().len(), 1, "{notes}");
    // A second reply whose notification is not delivered yet.
    reply("during the link").await;

    let user = format!("Bearer {}", App::token(55, &["USER"], Some(&[1])));
    let token = visitor.trim_start_matches("Visitor ");
    let (code, linked) = App::decode(
        app.client
            .post("/livechat/customer/link")
            .header("X-Tenant-ID", "1")
            .header("Authorization", &user)
            .body_json(&json!({"visitor_token": token}))
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 200, "{linked}");
    drain(&app.dispatcher, &app.db).await;

    for auth in [&user, &visitor] {
        let (code, notes) = customer_get(&app, "/livechat/customer/notifications", auth).await;
        assert_eq!(code, 200, "{notes}");
        let bodies: Vec<&str> = notes["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["body"].as_str().unwrap())
            .collect();
        assert_eq!(bodies, ["during the link", "before the link"], "{auth}");
    }
    let (_, notes) = customer_get(&app, "/livechat/customer/notifications", &user).await;
    let note_id = notes["data"][1]["id"].as_str().unwrap();
    let (code, read) = App::decode(
        app.client
            .post(format!("/livechat/customer/notifications/{note_id}/read"))
            .header("X-Tenant-ID", "1")
            .header("Authorization", &user)
            .send()
            .await,
    )
    .await;
    assert_eq!(code, 200, "{read}");
    assert!(read["data"]["read_at"].is_string());
    // Another user still sees none of them.
    let stranger = format!("Bearer {}", App::token(56, &["USER"], Some(&[1])));
    let (_, theirs) = customer_get(&app, "/livechat/customer/notifications", &stranger).await;
    assert_eq!(theirs["data"], json!([]));
}

/// Fails the first `fail` calls of each kind, then forwards to the tables.
struct Flaky {
    /// Its sink name, when not the type's.
    name: Option<&'static str>,
    inner: SeaOrmSinks,
    fail: usize,
    ticket_calls: AtomicUsize,
    notify_calls: AtomicUsize,
}

#[async_trait]
impl TicketSink for Flaky {
    fn name(&self) -> String {
        self.name
            .map_or_else(|| std::any::type_name::<Self>().to_owned(), str::to_owned)
    }
    async fn open_ticket(&self, request: &TicketRequested, key: EventId) -> Result<(), SinkError> {
        if self.ticket_calls.fetch_add(1, Ordering::SeqCst) < self.fail {
            return Err(SinkError::Retryable("help desk down".into()));
        }
        self.inner.open_ticket(request, key).await
    }
    async fn close_ticket(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        key: EventId,
    ) -> Result<(), SinkError> {
        self.inner.close_ticket(tenant, ticket, key).await
    }
}

#[async_trait]
impl NotificationSink for Flaky {
    async fn notify(&self, n: &Notification, key: EventId) -> Result<(), SinkError> {
        if self.notify_calls.fetch_add(1, Ordering::SeqCst) < self.fail {
            return Err(SinkError::Retryable("mailer down".into()));
        }
        self.inner.notify(n, key).await
    }
}

/// An event left owed to a sink that is then renamed (a webhook whose URL
/// changed, a host sink's type moved) goes to the sinks the dispatcher
/// has, instead of being settled as delivered without a call.
async fn an_event_owed_to_a_renamed_sink_reaches_its_successor(backend: Backend) {
    let app = App::new(backend).await;
    let (_, auth) = visitor_start(&app, "Renamed").await;
    let sink = |name, fail| {
        Arc::new(Flaky {
            name: Some(name),
            inner: SeaOrmSinks::new(app.db.clone()),
            fail,
            ticket_calls: AtomicUsize::new(0),
            notify_calls: AtomicUsize::new(0),
        })
    };
    let before = sink("desk v1", usize::MAX);
    let first = Dispatcher::new(SeaOrmStore::new(app.db.clone()), fast())
        .ticket_sink(before.clone())
        .dispatch_once()
        .await
        .unwrap();
    assert_eq!(first.retried, 1, "{first:?}");
    assert_eq!(counts(&app, &auth).await.0, 0);

    let after = sink("desk v2", 0);
    let renamed =
        Dispatcher::new(SeaOrmStore::new(app.db.clone()), fast()).ticket_sink(after.clone());
    for _ in 0..50 {
        if after.ticket_calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        renamed.dispatch_once().await.unwrap();
    }
    assert_eq!(after.ticket_calls.load(Ordering::SeqCst), 1);
    assert_eq!(counts(&app, &auth).await.0, 1, "the ticket opened");
    assert_eq!(livechat_tests::pending_events(&app.db).await, 0);
}

async fn ticketed_reply(app: &App) -> (String, String) {
    let (session, auth) = visitor_start(app, "Flaky").await;
    app.go_online(7, 1).await;
    let (code, _) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            Some(json!({"message": "Here to help"})),
        )
        .await;
    assert_eq!(code, 201);
    (session, auth)
}

async fn counts(app: &App, auth: &str) -> (usize, usize) {
    let (_, tickets) = app
        .agent_call(Method::GET, "/livechat/tickets", 7, 1, None)
        .await;
    let (_, notes) = customer_get(app, "/livechat/customer/notifications", auth).await;
    (
        tickets["data"].as_array().unwrap().len(),
        notes["data"].as_array().unwrap().len(),
    )
}

async fn failing_sink_retries_to_exactly_one(backend: Backend) {
    let app = App::new(backend).await;
    let (_, auth) = ticketed_reply(&app).await;
    let flaky = Arc::new(Flaky {
        name: None,
        inner: SeaOrmSinks::new(app.db.clone()),
        fail: 3,
        ticket_calls: AtomicUsize::new(0),
        notify_calls: AtomicUsize::new(0),
    });
    let dispatcher = Dispatcher::new(SeaOrmStore::new(app.db.clone()), fast())
        .ticket_sink(flaky.clone())
        .notification_sink(flaky.clone());
    drain(&dispatcher, &app.db).await;
    assert_eq!(
        flaky.ticket_calls.load(Ordering::SeqCst),
        4,
        "3 failures, then success"
    );
    assert_eq!(flaky.notify_calls.load(Ordering::SeqCst), 4);
    assert_eq!(counts(&app, &auth).await, (1, 1), "never zero, never two");
}

/// A session's later events claimed in the pass that retries an earlier
/// one are held until its retry (the sink that failed is the one they
/// wait for): they follow it as soon as it is delivered, not when their
/// 30 s lease runs out. Here the ticket's first attempt fails, so the
/// reply's notification waits behind it, then fails once itself.
async fn events_behind_a_retried_event_do_not_wait_for_their_lease(backend: Backend) {
    let app = App::new(backend).await;
    let (_, auth) = ticketed_reply(&app).await;
    let flaky = Arc::new(Flaky {
        name: None,
        inner: SeaOrmSinks::new(app.db.clone()),
        fail: 1,
        ticket_calls: AtomicUsize::new(0),
        notify_calls: AtomicUsize::new(0),
    });
    let config = DispatcherConfig {
        lease: Duration::from_secs(30),
        ..fast()
    };
    let dispatcher = Dispatcher::new(SeaOrmStore::new(app.db.clone()), config)
        .ticket_sink(flaky.clone())
        .notification_sink(flaky.clone());
    let first = dispatcher.dispatch_once().await.unwrap();
    assert_eq!(first.retried, 1, "{first:?}");
    assert_eq!(flaky.notify_calls.load(Ordering::SeqCst), 0, "it waited");
    // Passes after the 10 ms backoff: the ticket, then the notification
    // (failing once, like the ticket), all well within the lease.
    for _ in 0..20 {
        if counts(&app, &auth).await == (1, 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        dispatcher.dispatch_once().await.unwrap();
    }
    assert_eq!(counts(&app, &auth).await, (1, 1));
    assert_eq!(flaky.ticket_calls.load(Ordering::SeqCst), 2);
    assert_eq!(flaky.notify_calls.load(Ordering::SeqCst), 2);
}

/// A help desk that is down until `up` is set (every call answers
/// retryable); records what it accepted, in order.
#[derive(Default)]
struct HelpDesk {
    up: std::sync::atomic::AtomicBool,
    calls: AtomicUsize,
    accepted: std::sync::Mutex<Vec<String>>,
}

impl HelpDesk {
    fn answer(&self, what: String) -> Result<(), SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.up.load(Ordering::SeqCst) {
            return Err(SinkError::Retryable("help desk down".into()));
        }
        self.accepted.lock().unwrap().push(what);
        Ok(())
    }
}

#[async_trait]
impl TicketSink for HelpDesk {
    async fn open_ticket(&self, request: &TicketRequested, _key: EventId) -> Result<(), SinkError> {
        self.answer(format!("open {}", request.ticket_id))
    }
    async fn close_ticket(
        &self,
        _tenant: TenantId,
        ticket: TicketId,
        _key: EventId,
    ) -> Result<(), SinkError> {
        self.answer(format!("close {ticket}"))
    }
}

#[async_trait]
impl NotificationSink for HelpDesk {
    async fn notify(&self, n: &Notification, _key: EventId) -> Result<(), SinkError> {
        self.answer(format!("notify {}", n.id))
    }
}

/// A help desk (or webhook) that is down does not hold up the in-app
/// ticket and notification: each event reaches the tables at once and is
/// then owed to the help desk alone, which gets them in order, once, when
/// it is back.
async fn a_help_desk_that_is_down_holds_up_only_its_own_deliveries(backend: Backend) {
    let app = App::new(backend).await;
    let (session, auth) = ticketed_reply(&app).await;
    let desk = Arc::new(HelpDesk::default());
    let tables = Arc::new(SeaOrmSinks::new(app.db.clone()));
    // Retries a minute apart: nothing below waits for one, until the
    // retry time is moved (the time passing).
    let config = DispatcherConfig {
        backoff_base: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        ..fast()
    };
    let dispatcher = Dispatcher::new(SeaOrmStore::new(app.db.clone()), config)
        .ticket_sink(tables.clone())
        .ticket_sink(desk.clone())
        .notification_sink(tables)
        .notification_sink(desk.clone());
    dispatcher.dispatch_once().await.unwrap();
    assert_eq!(
        desk.calls.load(Ordering::SeqCst),
        1,
        "the request; the reply waits"
    );
    assert_eq!(
        counts(&app, &auth).await,
        (1, 1),
        "in app while the desk is down"
    );
    assert!(desk.accepted.lock().unwrap().is_empty());
    // The ticket request, the chat's assignment (the ticket's owner) and
    // the reply wait for the help desk only.
    assert_eq!(undispatched(&app).await, 3);
    assert_eq!(
        outbox_rows(
            &app,
            "dispatched_at IS NULL AND pending_for LIKE '%HelpDesk%'"
        )
        .await,
        3
    );
    assert_eq!(
        outbox_rows(
            &app,
            "dispatched_at IS NULL AND pending_for LIKE '%livechat tables%'"
        )
        .await,
        0
    );

    // A reply written while they wait reaches the customer too.
    let (code, _) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            Some(json!({"message": "Still here"})),
        )
        .await;
    assert_eq!(code, 201);
    let report = dispatcher.dispatch_once().await.unwrap();
    assert_eq!(report.held, 1, "{report:?}");
    assert_eq!(counts(&app, &auth).await, (1, 2), "the later reply too");
    assert_eq!(desk.calls.load(Ordering::SeqCst), 1);

    // The help desk is back and the retry is due: it gets all three.
    desk.up.store(true, Ordering::SeqCst);
    outbox_due_now(&app).await;
    drain(&dispatcher, &app.db).await;
    let accepted = desk.accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), 3, "{accepted:?}");
    assert!(accepted[0].starts_with("open "), "{accepted:?}");
    assert!(
        accepted[1..].iter().all(|a| a.starts_with("notify ")),
        "{accepted:?}"
    );
    assert_eq!(counts(&app, &auth).await, (1, 2), "nothing twice in app");
}

async fn crash_between_commit_and_dispatch(backend: Backend) {
    let app = App::new(backend).await;
    let (_, auth) = ticketed_reply(&app).await;
    // The process that committed is gone before dispatching: a new process
    // (a new connection and dispatcher) finds the committed events.
    let db = app.test_db.connect_migrated().await;
    let fresh = livechat_example_server::dispatcher(db, &app.config);
    drain(&fresh, &app.db).await;
    assert_eq!(counts(&app, &auth).await, (1, 1));
    drain(&app.dispatcher, &app.db).await;
    assert_eq!(counts(&app, &auth).await, (1, 1), "nothing delivered twice");
}

async fn crash_after_delivery_before_settling(backend: Backend) {
    let app = App::new(backend).await;
    let (_, auth) = ticketed_reply(&app).await;
    // A dispatcher claims the events and delivers them to the sinks, then
    // dies before marking them dispatched.
    let store = SeaOrmStore::new(app.db.clone());
    let sinks = SeaOrmSinks::new(app.db.clone());
    let mut delivered = 0;
    loop {
        let claimed = store
            .claim_pending(100, Duration::from_millis(100))
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        for pending in claimed {
            let e = pending.event;
            if e.kind == livechat_core::EventKind::TicketRequested {
                // Delivered, then the crash: nothing after it is settled or
                // delivered.
                let req: TicketRequested = e.payload.decode().unwrap();
                sinks.open_ticket(&req, e.id).await.unwrap();
                delivered += 1;
                break;
            }
            // Earlier events have no sink to call: settled.
            store.mark_dispatched(&[e.id], None).await.unwrap();
        }
        if delivered > 0 {
            break;
        }
    }
    assert_eq!(delivered, 1);
    assert_eq!(counts(&app, &auth).await.0, 1);
    // After the lease expires, another dispatcher redelivers: still one.
    tokio::time::sleep(Duration::from_millis(150)).await;
    drain(&app.dispatcher, &app.db).await;
    assert_eq!(counts(&app, &auth).await, (1, 1));
}

/// A ticket sink whose every call hangs, telling when the first begins.
struct Hanging(Arc<tokio::sync::Notify>);

#[async_trait]
impl TicketSink for Hanging {
    async fn open_ticket(&self, _: &TicketRequested, _: EventId) -> Result<(), SinkError> {
        self.0.notify_one();
        std::future::pending().await
    }
    async fn close_ticket(&self, _: TenantId, _: TicketId, _: EventId) -> Result<(), SinkError> {
        std::future::pending().await
    }
}

/// A chat started with nobody online is ticketed in its start's
/// transaction, after its `session.started` (which has no ticket yet):
/// a `session.updated` with the ticket follows the `ticket.requested`, so
/// the team's queue view and webhooks learn it, as for a chat ticketed
/// later.
async fn a_chat_ticketed_at_its_start_announces_its_ticket(backend: Backend) {
    use sea_orm::{ConnectionTrait, Statement};

    let app = App::new(backend).await;
    let (session, auth) = visitor_start(&app, "Refund").await;
    let (_, chat) = customer_get(&app, &format!("/livechat/customer/chats/{session}"), &auth).await;
    let ticket = chat["data"]["ticket_id"]
        .as_str()
        .expect("ticketed")
        .to_owned();
    let rows = app
        .db
        .query_all_raw(Statement::from_string(
            app.db.get_database_backend(),
            "SELECT kind, payload FROM livechat_outbox ORDER BY id",
        ))
        .await
        .unwrap();
    let events: Vec<(String, Value)> = rows
        .iter()
        .map(|row| {
            let kind: String = row.try_get("", "kind").unwrap();
            let payload: String = row.try_get("", "payload").unwrap();
            (kind, serde_json::from_str(&payload).unwrap())
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "session.started",
            "message.posted",
            "ticket.requested",
            "session.updated"
        ],
        "{events:?}"
    );
    assert_eq!(events[0].1["ticket_id"], Value::Null);
    assert_eq!(events[3].1["ticket_id"], ticket.as_str(), "{events:?}");
    assert_eq!(events[3].1["id"], session.as_str());
}

/// A lease of `Duration::MAX` ("never hand it out again") delivers as any
/// other: the pass counts with 100 years. Its deadline overflowed and
/// panicked the dispatcher's task.
async fn a_lease_meant_as_never_is_served(backend: Backend) {
    let app = App::new(backend).await;
    let (_, auth) = visitor_start(&app, "Refund").await;
    let config = DispatcherConfig {
        lease: Duration::MAX,
        ..DispatcherConfig::default()
    };
    let tables = Arc::new(SeaOrmSinks::new(app.db.clone()));
    let dispatcher = Dispatcher::new(SeaOrmStore::new(app.db.clone()), config)
        .ticket_sink(tables.clone())
        .notification_sink(tables);
    let report = dispatcher.dispatch_once().await.unwrap();
    assert!(report.delivered >= 1, "{report:?}");
    assert_eq!(counts(&app, &auth).await.0, 1);
}

/// A dispatcher stopped while a sink hangs on an event releases its claim
/// (a graceful restart): the event is handed out again at once, not after
/// its lease (a minute here).
async fn a_dispatcher_stopping_releases_its_claims(backend: Backend) {
    let app = App::new(backend).await;
    let (_, auth) = visitor_start(&app, "Refund").await;
    let entered = Arc::new(tokio::sync::Notify::new());
    let config = DispatcherConfig {
        lease: Duration::from_secs(60),
        ..DispatcherConfig::default()
    };
    let dispatcher = Dispatcher::new(SeaOrmStore::new(app.db.clone()), config)
        .ticket_sink(Arc::new(Hanging(entered.clone())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(dispatcher.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("the sink is called");
    let claimed = "livechat_outbox WHERE claimed_until IS NOT NULL AND dispatched_at IS NULL";
    assert_eq!(livechat_tests::count_rows(&app.db, claimed).await, 1);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("stops")
        .unwrap();
    assert_eq!(livechat_tests::count_rows(&app.db, claimed).await, 0);
    // Another dispatcher delivers it now.
    app.dispatcher.dispatch_once().await.unwrap();
    assert_eq!(counts(&app, &auth).await.0, 1);
}

/// One webhook call: event id, timestamp, signature, body.
type Call = (String, String, String, Vec<u8>);

#[derive(Clone, Default)]
struct Received(Arc<std::sync::Mutex<Vec<Call>>>);

async fn webhook_receives_signed_events_with_retries(backend: Backend) {
    use poem::{EndpointExt, Request, handler, http::StatusCode, web::Data};

    let received = Received::default();
    let failures = Arc::new(AtomicUsize::new(2));
    #[handler]
    async fn hook(
        req: &Request,
        body: poem::Body,
        rec: Data<&Received>,
        fail: Data<&Arc<AtomicUsize>>,
    ) -> StatusCode {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let bytes = body.into_vec().await.unwrap_or_default();
        rec.0.0.lock().unwrap().push((
            header("X-Livechat-Event-Id"),
            header("X-Livechat-Timestamp"),
            header("X-Livechat-Signature"),
            bytes,
        ));
        if fail
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::NO_CONTENT
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let server = poem::Server::new(poem::listener::TcpListener::bind(addr.to_string()));
    let ep = poem::Route::new()
        .at("/hook", poem::post(hook))
        .data(received.clone())
        .data(failures.clone());
    let handle = tokio::spawn(server.run(ep));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let url: livechat_ticket_bridge::Url = format!("http://{addr}/hook").parse().unwrap();
    let app = App::with_config(backend, |c| {
        c.webhook = Some((url.clone(), "hook-secret".into()))
    })
    .await;
    // The customer adds to the request while nobody is online.
    let (session, auth) = visitor_start(&app, "Flaky").await;
    let resp = app
        .client
        .post(format!("/livechat/customer/chats/{session}/messages"))
        .header("X-Tenant-ID", "1")
        .header("Authorization", &auth)
        .body_json(&json!({"message": "Order 1234, if it helps"}))
        .send()
        .await;
    let (code, added) = App::decode(resp).await;
    assert_eq!(code, 201, "{added}");
    // And leaves an address to be answered at (the ticket opened without
    // one).
    let resp = app
        .client
        .put(format!("/livechat/customer/chats/{session}/contact"))
        .header("X-Tenant-ID", "1")
        .header("Authorization", &auth)
        .body_json(&json!({"name": "Ana", "email": "ana@example.com"}))
        .send()
        .await;
    let (code, updated) = App::decode(resp).await;
    assert_eq!(code, 200, "{updated}");
    app.go_online(7, 1).await;
    let (code, reply) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            Some(json!({"message": "Here to help"})),
        )
        .await;
    assert_eq!(code, 201, "{reply}");
    let dispatcher = Dispatcher::new(SeaOrmStore::new(app.db.clone()), fast())
        .ticket_sink(Arc::new(SeaOrmSinks::new(app.db.clone())))
        .ticket_sink(Arc::new(livechat_ticket_bridge::WebhookSink::new(
            url,
            b"hook-secret".to_vec(),
        )));
    drain(&dispatcher, &app.db).await;
    handle.abort();

    let calls = received.0.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        6,
        "two 500s, then accepted; then the customer's addition, their contact and the chat's \
         assignment"
    );
    let ids: std::collections::HashSet<_> = calls[..3].iter().map(|c| c.0.clone()).collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same event id");
    let ticket_id =
        serde_json::from_slice::<Value>(&calls[0].3).unwrap()["data"]["ticket_id"].clone();
    let requested = serde_json::from_slice::<Value>(&calls[0].3).unwrap();
    assert_eq!(requested["data"]["first_message"], "anyone?");
    assert_eq!(requested["data"]["messages"], json!(["anyone?"]));
    assert!(
        requested["data"]
            .as_object()
            .unwrap()
            .contains_key("department"),
        "{requested}"
    );
    let message: Value = serde_json::from_slice(&calls[3].3).unwrap();
    assert_eq!(message["type"], "ticket.message", "{message}");
    assert_eq!(message["data"]["ticket_id"], ticket_id, "{message}");
    assert_eq!(
        message["data"]["message"]["message"],
        "Order 1234, if it helps"
    );
    assert_eq!(message["data"]["message"]["seq"], 2, "{message}");
    assert_eq!(message["data"]["message"]["sender_type"], "customer");
    assert_eq!(message["data"]["message"]["id"], added["data"]["id"]);
    assert_eq!(message["event_id"], calls[3].0, "{message}");
    assert_eq!(requested["data"]["contact"], Value::Null, "{requested}");
    let contact: Value = serde_json::from_slice(&calls[4].3).unwrap();
    assert_eq!(contact["type"], "ticket.contact", "{contact}");
    assert_eq!(contact["data"]["ticket_id"], ticket_id, "{contact}");
    assert_eq!(
        contact["data"]["contact"],
        json!({"name": "Ana", "email": "ana@example.com", "phone": null, "position": null, "company": null})
    );
    let assigned: Value = serde_json::from_slice(&calls[5].3).unwrap();
    assert_eq!(assigned["type"], "ticket.assigned", "{assigned}");
    assert_eq!(assigned["data"]["agent_id"], 7, "{assigned}");
    assert_eq!(assigned["data"]["ticket_id"], ticket_id, "{assigned}");
    let now = chrono::Utc::now().timestamp();
    for (_, ts, sig, body) in &calls[..3] {
        assert!(livechat_ticket_bridge::verify_signature(
            b"hook-secret",
            ts,
            body,
            sig,
            now,
            300
        ));
        assert!(!livechat_ticket_bridge::verify_signature(
            b"wrong", ts, body, sig, now, 300
        ));
        let json: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["type"], "ticket.requested");
    }
    assert_eq!(counts(&app, &auth).await.0, 1);
}

/// Issue #5: a dispatcher claims several events of a session in one pass,
/// in order, but none while an earlier event of that session is claimed
/// by another dispatcher.
async fn a_sessions_events_are_claimed_in_order_behind_its_earliest(backend: Backend) {
    use livechat_core::{EventKind, UserId};
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let mut sessions = Vec::new();
    for agent in [7, 8] {
        let agent = UserId::new(agent).unwrap();
        sessions.push(session_with_messages(&app, tenant, agent, 3).await);
    }
    let store = app.chat.store();
    let lease = Duration::from_secs(30);
    // Another dispatcher holds the oldest two: agent 7's status change and
    // the start of its session.
    let elsewhere = store.claim_pending(2, lease).await.unwrap();
    assert_eq!(
        elsewhere.iter().map(|p| p.event.kind).collect::<Vec<_>>(),
        vec![EventKind::AgentStatusChanged, EventKind::SessionStarted]
    );
    let claimed = store.claim_pending(100, lease).await.unwrap();
    let of = |s| {
        claimed
            .iter()
            .filter(|p| p.event.session_id == Some(s))
            .map(|p| (p.event.kind, p.event.payload.value()["seq"].as_i64()))
            .collect::<Vec<_>>()
    };
    assert!(of(sessions[0]).is_empty(), "held behind its session start");
    assert_eq!(
        of(sessions[1]),
        vec![
            (EventKind::SessionStarted, None),
            (EventKind::MessagePosted, Some(1)),
            (EventKind::MessagePosted, Some(2)),
            (EventKind::MessagePosted, Some(3)),
        ],
        "all of the free session's events, in order"
    );
    // Once the earlier events are settled, the held session's events follow.
    let settled: Vec<EventId> = elsewhere.iter().map(|p| p.event.id).collect();
    store.mark_dispatched(&settled, None).await.unwrap();
    let rest = store.claim_pending(100, lease).await.unwrap();
    let seqs: Vec<Option<i64>> = rest
        .iter()
        .filter(|p| p.event.session_id == Some(sessions[0]))
        .map(|p| p.event.payload.value()["seq"].as_i64())
        .collect();
    assert_eq!(seqs, vec![Some(1), Some(2), Some(3)]);
}

/// An event waiting for a retry owed to some receivers only (the others
/// have it) holds its session's later events from those receivers only:
/// they are claimed with `behind` naming them (all such receivers of the
/// events ahead, until the first is due). Owed to every receiver, it holds
/// them back altogether. A retried event comes back owed to its receivers.
async fn a_retried_event_holds_later_ones_only_from_the_receivers_it_is_owed(backend: Backend) {
    use livechat_core::{EventKind, UserId};
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let session = session_with_messages(&app, tenant, UserId::new(7).unwrap(), 3).await;
    let store = app.chat.store();
    let lease = Duration::from_secs(30);
    let names = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    let of_session = |claimed: Vec<livechat_core::PendingEvent>| {
        claimed
            .into_iter()
            .filter(|p| p.event.session_id == Some(session))
            .collect::<Vec<_>>()
    };
    let claimed = of_session(store.claim_pending(100, lease).await.unwrap());
    let kinds: Vec<EventKind> = claimed.iter().map(|p| p.event.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::SessionStarted,
            EventKind::MessagePosted,
            EventKind::MessagePosted,
            EventKind::MessagePosted
        ]
    );
    let ids: Vec<EventId> = claimed.iter().map(|p| p.event.id).collect();
    let later = livechat_core::now() + chrono::TimeDelta::seconds(60);
    let sooner = livechat_core::now() + chrono::TimeDelta::seconds(30);
    let behind = |p: &livechat_core::PendingEvent| {
        let b = p.behind.clone().expect("behind");
        let mut waiting = b.waiting_for;
        waiting.sort();
        (waiting, b.until > livechat_core::now())
    };

    // The start failed at the desk (the tables have it); the messages are
    // handed out again for every receiver but the desk.
    store
        .retry_later(ids[0], None, later, "desk down", &names(&["desk"]))
        .await
        .unwrap();
    store.release(&ids[1..], None).await.unwrap();
    let claimed = of_session(store.claim_pending(100, lease).await.unwrap());
    assert_eq!(
        claimed.iter().map(|p| p.event.id).collect::<Vec<_>>(),
        ids[1..]
    );
    for p in &claimed {
        assert_eq!(behind(p), (names(&["desk"]), true));
        assert_eq!((p.attempts, &p.pending_for), (0, &None));
    }

    // The first message is held from the mailer too: the rest wait for both.
    store
        .hold(ids[1], None, sooner, &names(&["mailer"]))
        .await
        .unwrap();
    store.release(&ids[2..], None).await.unwrap();
    let claimed = of_session(store.claim_pending(100, lease).await.unwrap());
    assert_eq!(
        claimed.iter().map(|p| p.event.id).collect::<Vec<_>>(),
        ids[2..]
    );
    assert_eq!(behind(&claimed[0]), (names(&["desk", "mailer"]), true));
    assert!(
        claimed[0].behind.as_ref().unwrap().until < later,
        "until the first of them is due"
    );

    // The start retried for every receiver holds the rest back altogether.
    store
        .retry_later(ids[0], None, later, "all down", &[])
        .await
        .unwrap();
    store.release(&ids[2..], None).await.unwrap();
    assert!(of_session(store.claim_pending(100, lease).await.unwrap()).is_empty());

    // Due again, the start comes back owed to the desk, with its attempts;
    // the messages behind the held one wait for the mailer only.
    let past = livechat_core::now() - chrono::TimeDelta::seconds(1);
    store
        .retry_later(ids[0], None, past, "desk down", &names(&["desk"]))
        .await
        .unwrap();
    let claimed = of_session(store.claim_pending(100, lease).await.unwrap());
    let got: Vec<EventId> = claimed.iter().map(|p| p.event.id).collect();
    assert_eq!(got, [ids[0], ids[2], ids[3]]);
    assert_eq!(
        (claimed[0].attempts, claimed[0].pending_for.clone()),
        (3, Some(names(&["desk"])))
    );
    assert_eq!(claimed[0].behind, None);
    assert_eq!(behind(&claimed[1]), (names(&["mailer"]), true));
}

/// Settling or releasing with the token of a claim whose lease ran out,
/// after a later claim took its events over, changes nothing: the later
/// claim's delivery and settlement stand (a dispatcher pass that outlived
/// its lease can no longer settle, fail, put back or release the events
/// another pass delivers). With the later claim's token they settle.
async fn a_claim_whose_lease_ran_out_leaves_the_next_claims_events_alone(backend: Backend) {
    use livechat_core::UserId;
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let session = session_with_messages(&app, tenant, UserId::new(7).unwrap(), 2).await;
    let store = app.chat.store();
    let of_session = |claimed: Vec<livechat_core::PendingEvent>| {
        claimed
            .into_iter()
            .filter(|p| p.event.session_id == Some(session))
            .collect::<Vec<_>>()
    };
    let first = of_session(
        store
            .claim_pending(100, Duration::from_millis(1))
            .await
            .unwrap(),
    );
    let ids: Vec<EventId> = first.iter().map(|p| p.event.id).collect();
    assert_eq!(ids.len(), 3, "the start and two messages");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = of_session(
        store
            .claim_pending(100, Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert_eq!(
        second.iter().map(|p| p.event.id).collect::<Vec<_>>(),
        ids,
        "taken over once the first lease ran out"
    );
    let (stale, current) = (first[0].lease, second[0].lease);
    assert!(stale.is_some() && current.is_some() && stale != current);
    assert!(first.iter().all(|p| p.lease == stale));
    assert!(second.iter().all(|p| p.lease == current));
    let later = livechat_core::now() + chrono::TimeDelta::seconds(60);
    store.mark_dispatched(&ids[..1], stale).await.unwrap();
    store
        .retry_later(ids[1], stale, later, "stale", &[])
        .await
        .unwrap();
    store.hold(ids[2], stale, later, &[]).await.unwrap();
    store.mark_failed(ids[2], stale, "stale").await.unwrap();
    store.release(&ids, stale).await.unwrap();
    let untouched = "session_id IS NOT NULL AND dispatched_at IS NULL \
                     AND claimed_until IS NOT NULL AND attempts = 0 AND last_error IS NULL";
    assert_eq!(
        outbox_rows(&app, untouched).await,
        3,
        "still the second claim's"
    );
    store.mark_dispatched(&ids, current).await.unwrap();
    assert_eq!(
        outbox_rows(
            &app,
            "session_id IS NOT NULL AND dispatched_at IS NOT NULL AND failed_at IS NULL"
        )
        .await,
        3,
        "settled with the second claim's token"
    );
}

/// A backlog of events that wait only for a sink their session's earlier
/// event waits for (a webhook that is down) is not claimed again while
/// that event waits, and does not hide newer events of other sessions
/// from a claim, however long it is: the scan reads on past it.
async fn a_backlog_held_behind_a_sink_hides_no_newer_events(backend: Backend) {
    use livechat_core::UserId;
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let held = session_with_messages(&app, tenant, UserId::new(7).unwrap(), 80).await;
    let store = app.chat.store();
    let lease = Duration::from_secs(30);
    let everything = store.claim_pending(1000, lease).await.unwrap();
    let of = |s| {
        everything
            .iter()
            .filter(|p| p.event.session_id == Some(s))
            .map(|p| p.event.id)
            .collect::<Vec<_>>()
    };
    let backlog = of(held);
    assert_eq!(backlog.len(), 81, "the start and 80 messages");
    let others: Vec<EventId> = everything
        .iter()
        .filter(|p| p.event.session_id != Some(held))
        .map(|p| p.event.id)
        .collect();
    store.mark_dispatched(&others, None).await.unwrap();
    // The start waits a minute for the desk; each message reached the
    // other receivers and is owed to the desk alone, due again now.
    let desk = vec!["desk".to_owned()];
    let later = livechat_core::now() + chrono::TimeDelta::seconds(60);
    store
        .retry_later(backlog[0], None, later, "desk down", &desk)
        .await
        .unwrap();
    let past = livechat_core::now() - chrono::TimeDelta::seconds(1);
    for id in &backlog[1..] {
        store.hold(*id, None, past, &desk).await.unwrap();
    }
    // Newer events of another session, past more than 16 pages of the
    // backlog (a claim of 2 reads pages of 4).
    let fresh = session_with_messages(&app, tenant, UserId::new(8).unwrap(), 1).await;
    // (agent 8's status change, then its session's start).
    let claimed = store.claim_pending(2, lease).await.unwrap();
    let sessions: Vec<_> = claimed.iter().map(|p| p.event.session_id).collect();
    assert_eq!(sessions, [None, Some(fresh)], "{claimed:?}");
    // The backlog is not handed out while the start waits.
    let rest = store.claim_pending(1000, lease).await.unwrap();
    assert!(
        rest.iter().all(|p| p.event.session_id != Some(held)),
        "{} of the backlog handed out",
        rest.len()
    );
}

/// A long run of events held behind their session's earliest (claimed
/// elsewhere) does not hide later events of other sessions from a claim:
/// the scan reads on past them.
async fn held_events_do_not_hide_other_sessions_events(backend: Backend) {
    use livechat_core::{EventKind, UserId};
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    for (agent, messages) in [(7, 5), (8, 1)] {
        session_with_messages(&app, tenant, UserId::new(agent).unwrap(), messages).await;
    }
    let store = app.chat.store();
    let lease = Duration::from_secs(30);
    // Held elsewhere: agent 7's status change and its session's start, so
    // that session's five messages wait.
    store.claim_pending(2, lease).await.unwrap();
    // A claim of 2 scans pages of 4: the first page is all held.
    let claimed = store.claim_pending(2, lease).await.unwrap();
    assert_eq!(
        claimed.iter().map(|p| p.event.kind).collect::<Vec<_>>(),
        vec![EventKind::AgentStatusChanged, EventKind::SessionStarted],
        "agent 8's events, found past the held ones"
    );
    assert_eq!(claimed[0].event.payload.value()["agent_id"], 8);
}

/// Outbox rows this version cannot decode. A kind it does not know (as
/// a newer version writes during a rolling upgrade) is left pending for a
/// dispatcher that knows it, unleased, and its session's later events
/// wait behind it; a damaged row of a known kind is failed with its
/// reason, and its session's later events go on. Either way the claim
/// hands out every other event, where it failed whole and stalled
/// dispatch for good.
async fn undecodable_outbox_events_do_not_stall_dispatch(backend: Backend) {
    use livechat_core::{EventKind, UserId};
    use sea_orm::{ConnectionTrait, Statement};
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let newer = session_with_messages(&app, tenant, UserId::new(7).unwrap(), 2).await;
    let damaged = session_with_messages(&app, tenant, UserId::new(8).unwrap(), 1).await;
    let backend = app.db.get_database_backend();
    let param = |n: usize| match backend {
        sea_orm::DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    };
    for (session, set) in [
        (newer, "kind = 'session.future_kind'"),
        (damaged, "payload = '{not json'"),
    ] {
        app.db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                format!(
                    "UPDATE livechat_outbox SET {set} \
                     WHERE session_id = {} AND kind = 'session.started'",
                    param(1)
                ),
                [session.as_uuid().into()],
            ))
            .await
            .unwrap();
    }
    let store = app.chat.store();
    let claimed = store
        .claim_pending(100, Duration::from_secs(30))
        .await
        .expect("the claim hands out the rest");
    let summary = |claimed: &[livechat_core::PendingEvent]| {
        claimed
            .iter()
            .map(|p| {
                (
                    p.event.kind,
                    p.event.session_id,
                    p.event.payload.value()["seq"].as_i64(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        summary(&claimed),
        vec![
            (EventKind::AgentStatusChanged, None, None),
            (EventKind::AgentStatusChanged, None, None),
            (EventKind::MessagePosted, Some(damaged), Some(1)),
        ]
    );
    let row = |kind: &'static str| {
        let sql = format!(
            "SELECT last_error, failed_at IS NOT NULL AS failed, \
             claimed_until IS NULL AS unleased FROM livechat_outbox \
             WHERE session_id = {} AND kind = '{kind}'",
            param(1)
        );
        let db = app.db.clone();
        async move {
            let row = db
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    sql,
                    [if kind == "session.future_kind" {
                        newer
                    } else {
                        damaged
                    }
                    .as_uuid()
                    .into()],
                ))
                .await
                .unwrap()
                .unwrap();
            (
                row.try_get::<Option<String>>("", "last_error").unwrap(),
                row.try_get::<bool>("", "failed").unwrap(),
                row.try_get::<bool>("", "unleased").unwrap(),
            )
        }
    };
    let (reason, failed, _) = row("session.started").await;
    assert!(failed);
    assert!(reason.unwrap_or_default().contains("cannot be decoded"));
    assert_eq!(
        row("session.future_kind").await,
        (None, false, true),
        "left pending and unleased for a newer dispatcher"
    );
    // The messages behind it were won by the claim too: given back at
    // once, not leased for 30 s while it waits.
    let leased = app
        .db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT COUNT(*) AS n FROM livechat_outbox \
                 WHERE session_id = {} AND claimed_until IS NOT NULL",
                param(1)
            ),
            [newer.as_uuid().into()],
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(leased, 0, "the later events of its session are unleased");
}

/// Issue #5: the dispatcher's claim scan (`WHERE dispatched_at IS NULL
/// ORDER BY id`) goes through the index of undispatched events, so its cost
/// does not grow with the outbox's history of dispatched events.
async fn the_claim_scan_reads_only_undispatched_events(backend: Backend) {
    use sea_orm::{ConnectionTrait, Statement};
    let app = App::new(backend).await;
    let scan = "SELECT id, session_id, available_at, claimed_until FROM livechat_outbox \
                WHERE dispatched_at IS NULL ORDER BY id LIMIT 64";
    let (explain, column) = match backend {
        Backend::Sqlite => ("EXPLAIN QUERY PLAN", "detail"),
        Backend::Postgres => {
            // A history of dispatched events, with statistics, so the
            // planner weighs the real choice.
            app.db
                .execute_unprepared(
                    "INSERT INTO livechat_outbox \
                     (id, tenant_id, kind, payload, created_at, available_at, dispatched_at) \
                     SELECT gen_random_uuid(), 1, 'message.posted', '{}', now(), now(), now() \
                     FROM generate_series(1, 20000)",
                )
                .await
                .unwrap();
            app.db
                .execute_unprepared("ANALYZE livechat_outbox")
                .await
                .unwrap();
            ("EXPLAIN", "QUERY PLAN")
        }
    };
    let plan: Vec<String> = app
        .db
        .query_all_raw(Statement::from_string(
            app.db.get_database_backend(),
            format!("{explain} {scan}"),
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", column).unwrap())
        .collect();
    assert!(
        plan.iter()
            .any(|line| line.contains("livechat_outbox_undispatched")),
        "the claim scan should use the undispatched-events index: {plan:?}"
    );
}

/// Delegates to the store and records what `claim_pending` handed out.
struct RecordingConsumer {
    store: SeaOrmStore,
    claimed: Arc<std::sync::Mutex<Vec<livechat_core::EventKind>>>,
}

impl OutboxConsumer for RecordingConsumer {
    async fn settle_ignored(
        &self,
        limit: u64,
        ignored: &(dyn Fn(&livechat_core::DomainEvent) -> bool + Sync),
    ) -> Result<usize, livechat_core::ChatError> {
        self.store.settle_ignored(limit, ignored).await
    }
    async fn claim_pending(
        &self,
        limit: u64,
        lease: Duration,
    ) -> Result<Vec<livechat_core::PendingEvent>, livechat_core::ChatError> {
        let claimed = self.store.claim_pending(limit, lease).await?;
        self.claimed
            .lock()
            .unwrap()
            .extend(claimed.iter().map(|p| p.event.kind));
        Ok(claimed)
    }
    async fn mark_dispatched(
        &self,
        ids: &[EventId],
        lease: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(), livechat_core::ChatError> {
        self.store.mark_dispatched(ids, lease).await
    }
    async fn retry_later(
        &self,
        id: EventId,
        lease: Option<chrono::DateTime<chrono::Utc>>,
        retry_at: chrono::DateTime<chrono::Utc>,
        error: &str,
        pending_for: &[String],
    ) -> Result<(), livechat_core::ChatError> {
        self.store
            .retry_later(id, lease, retry_at, error, pending_for)
            .await
    }
    async fn hold(
        &self,
        id: EventId,
        lease: Option<chrono::DateTime<chrono::Utc>>,
        until: chrono::DateTime<chrono::Utc>,
        pending_for: &[String],
    ) -> Result<(), livechat_core::ChatError> {
        self.store.hold(id, lease, until, pending_for).await
    }
    async fn mark_failed(
        &self,
        id: EventId,
        lease: Option<chrono::DateTime<chrono::Utc>>,
        error: &str,
    ) -> Result<(), livechat_core::ChatError> {
        self.store.mark_failed(id, lease, error).await
    }
    async fn release(
        &self,
        ids: &[EventId],
        lease: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(), livechat_core::ChatError> {
        self.store.release(ids, lease).await
    }
}

/// Outbox rows matching the SQL condition `filter`.
async fn outbox_rows(app: &App, filter: &str) -> i64 {
    livechat_tests::count_rows(&app.db, &format!("livechat_outbox WHERE {filter}")).await
}

/// Makes every undispatched event due now (as if its retry time had
/// passed).
async fn outbox_due_now(app: &App) {
    use sea_orm::ConnectionTrait;
    app.db
        .execute_unprepared(
            "UPDATE livechat_outbox SET available_at = created_at WHERE dispatched_at IS NULL",
        )
        .await
        .unwrap();
}

async fn undispatched(app: &App) -> i64 {
    outbox_rows(app, "dispatched_at IS NULL").await
}

/// Issue #5: events no sink acts on (status changes, session starts, agents'
/// messages in a service session) are settled without a claim, in one write
/// each pass; a ticket request still goes through the claim. An ignored
/// event claimed elsewhere is left to its claimer.
async fn events_no_sink_acts_on_are_settled_without_a_claim(backend: Backend) {
    use livechat_core::{EventKind, PresenceStatus, UserId};
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let agent = UserId::new(7).unwrap();
    session_with_messages(&app, tenant, agent, 3).await;
    // With no agent online, a visitor's chat becomes a ticket.
    app.chat
        .set_agent_status(tenant, agent, PresenceStatus::Offline)
        .await
        .unwrap();
    visitor_start(&app, "Refund").await;
    let total = undispatched(&app).await;
    assert!(total >= 7, "{total} events");

    // Another dispatcher holds the oldest event (the agent going online).
    let store = app.chat.store().clone();
    let elsewhere = store
        .claim_pending(1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(elsewhere[0].event.kind, EventKind::AgentStatusChanged);

    let sinks = Arc::new(SeaOrmSinks::new(app.db.clone()));
    let claimed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let dispatcher = Dispatcher::new(
        RecordingConsumer {
            store,
            claimed: claimed.clone(),
        },
        fast(),
    )
    .ticket_sink(sinks.clone())
    .notification_sink(sinks);
    let mut delivered = 0;
    for _ in 0..10 {
        let report = dispatcher.dispatch_once().await.unwrap();
        if report.handled() == 0 {
            break;
        }
        delivered += report.delivered;
    }
    let claimed = claimed.lock().unwrap().clone();
    assert_eq!(
        claimed,
        vec![EventKind::TicketRequested],
        "only the event a sink acts on is claimed"
    );
    assert_eq!(
        undispatched(&app).await,
        1,
        "everything settled but the event claimed elsewhere"
    );
    assert_eq!(usize::try_from(total).unwrap() - 1, delivered);
}

/// Issue #5: the example host gives its store the dispatcher's outbox
/// interest, so every event is still in the outbox (invariant 5) but only
/// those a sink acts on are written pending: the ticket request, the
/// ticketed chat's assignment (the ticket's owner), the agent's reply in
/// it and the customer's answer (added to the ticket). The customer's
/// first message, which the ticket opened with, is written settled. The
/// dispatcher claims exactly those and has nothing else to settle.
async fn events_outside_the_dispatchers_interest_are_written_settled(backend: Backend) {
    use livechat_core::EventKind;
    let app = App::new(backend).await;
    let (session, auth) = visitor_start(&app, "Refund").await;
    app.go_online(7, 1).await;
    let (code, reply) = app
        .agent_call(
            Method::POST,
            &format!("/livechat/sessions/{session}/messages"),
            7,
            1,
            Some(json!({"message": "On it."})),
        )
        .await;
    assert_eq!(code, 201, "{reply}");
    // The customer's reply goes through the group commit like the agent's.
    let resp = app
        .client
        .post(format!("/livechat/customer/chats/{session}/messages"))
        .header("X-Tenant-ID", "1")
        .header("Authorization", &auth)
        .body_json(&json!({"message": "Thanks"}))
        .send()
        .await;
    let (code, thanks) = App::decode(resp).await;
    assert_eq!(code, 201, "{thanks}");

    assert_eq!(
        undispatched(&app).await,
        4,
        "the ticket request, the assignment, the agent's reply and the customer's answer"
    );
    let posted = outbox_rows(&app, "kind = 'message.posted'").await;
    assert_eq!(posted, 3, "every message is recorded");
    assert_eq!(
        outbox_rows(
            &app,
            "kind = 'message.posted' AND dispatched_at IS NOT NULL"
        )
        .await,
        1,
        "the first message, before the ticket, is recorded settled"
    );

    let claimed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sinks = Arc::new(SeaOrmSinks::new(app.db.clone()));
    let dispatcher = Dispatcher::new(
        RecordingConsumer {
            store: app.chat.store().clone(),
            claimed: claimed.clone(),
        },
        fast(),
    )
    .ticket_sink(sinks.clone())
    .notification_sink(sinks);
    let report = dispatcher.dispatch_once().await.unwrap();
    assert_eq!(report.delivered, 4, "{report:?}");
    assert_eq!(
        claimed.lock().unwrap().clone(),
        vec![
            EventKind::TicketRequested,
            EventKind::SessionAssigned,
            EventKind::MessagePosted,
            EventKind::MessagePosted
        ]
    );
    assert_eq!(undispatched(&app).await, 0);
    let (_, notes) = customer_get(&app, "/livechat/customer/notifications", &auth).await;
    assert_eq!(notes["data"].as_array().unwrap().len(), 1, "{notes}");
}
