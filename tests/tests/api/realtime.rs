//! The WebSocket gateway (issue #4) against a real node on loopback.

use std::sync::Arc;
use std::time::Duration;

use livechat_core::bus::InProcessBus;
use livechat_core::{ChatSession, PresenceStatus, SessionId, SessionStatus, SessionView};
use livechat_tests::node::{Node, WsClient};
use livechat_tests::{App, Backend, on_both_databases};
use serde_json::{Value, json};

on_both_databases!(
    agent_and_customer_talk_live,
    resume_after_a_drop_in_a_thousand_message_stream,
    idempotent_send_and_typing_relay,
    a_read_receipt_names_only_messages_received,
    a_catch_up_reads_within_the_hosts_page_size,
    a_failed_catch_up_is_tried_again_at_the_next_ping,
    joined_says_the_status_and_a_closed_chat_refuses_typing,
    a_connected_customer_follows_their_chat_handed_back,
    bad_input_gets_error_frames,
    authentication_and_isolation,
    handshakes_that_cannot_be_served,
    presence_grace_and_expiry,
    an_agent_who_chose_offline_is_announced_neither_gone_nor_back,
    a_reconnect_within_the_grace_restarts_it,
    an_agent_of_a_crashed_node_is_announced_offline,
    an_agent_whose_presence_ran_out_is_announced_offline,
    a_status_set_tells_the_team_the_departments_taken,
    a_chat_left_waiting_when_the_last_agent_disconnects_becomes_a_ticket,
    housekeeping_tickets_a_chat_whose_last_agent_ran_out,
    a_start_with_nobody_online_tickets_the_chats_waiting_before_it,
    a_customer_back_at_a_waiting_chat_with_nobody_online_gets_its_ticket,
    a_retried_send_publishes_its_unpublished_original,
    slow_consumer_is_closed_with_1013,
    a_slow_consumer_of_long_messages_is_closed_by_bytes,
    connection_status_and_offline_notifications,
    a_reply_only_a_crashed_customer_connection_followed_is_notified,
    a_reply_sent_to_a_customer_gone_silent_is_notified,
    a_reply_sent_before_a_customers_socket_broke_is_notified,
    a_reply_read_before_a_customers_socket_ended_unclosed_is_notified,
    an_agent_started_chat_reaches_the_teams_queue_view,
    a_reply_two_dead_connections_followed_is_notified_once,
    an_agent_gone_silent_stops_counting_within_the_ttl,
    a_listening_agent_stays_online_between_pings,
    shutdown_closes_with_1001,
    pipelined_sends_keep_their_order,
    a_burst_larger_than_the_queue_reaches_a_reading_client,
    a_waiting_customer_sees_its_place_move,
    a_visitor_socket_goes_on_as_the_linked_customer,
    a_late_event_from_another_node_relays_the_state_as_stored,
    a_slow_reader_is_kept_while_it_reads,
    a_socket_ends_with_its_credential,
    a_user_holds_at_most_the_connection_cap,
    open_connections_purged_after_an_outage_are_registered_again,
    a_resync_sends_each_joined_session_as_stored,
    presence_announcements_are_relayed_as_stored,
    a_connection_follows_at_most_its_cap_of_sessions,
    a_customer_cut_off_from_the_other_nodes_is_notified,
    a_worker_purges_without_taking_the_announcements,
    a_reply_to_a_customer_whose_node_is_cut_off_is_notified_at_its_close,
    a_reply_stored_by_a_cut_off_node_is_notified,
);
on_both_databases!(
    current_thread: a_long_burst_of_bus_events_is_relayed_whole,
    an_overflowing_event_queue_loses_no_message,
);

use livechat_tests::{t, u};

/// Bus events are handled in bursts of up to 32 (issue #5); the event after
/// a full burst is relayed too. On a current-thread runtime the events are
/// published while the connection's task cannot run, so it finds them all
/// queued and the bursts are full.
async fn a_long_burst_of_bus_events_is_relayed_whole(backend: Backend) {
    use livechat_core::SenderType;
    use livechat_core::bus::{BusEvent, Ephemeral, EventBus, Participant, TypingState};

    let bus = Arc::new(InProcessBus::new());
    let (_app, node) = node_on(backend, bus.clone(), |_| {}).await;
    let (session, _) = open_chat(&node, 912).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    join(&mut agent, session, None).await;
    let by = Participant {
        sender_type: SenderType::Customer,
        sender_id: None,
        customer_id: None,
    };
    let state = |n: usize| {
        if n.is_multiple_of(2) {
            TypingState::Start
        } else {
            TypingState::Stop
        }
    };
    // Typing signals are relayed, not stored: one dropped is lost for good.
    for n in 0..100 {
        bus.publish(BusEvent::Ephemeral {
            tenant_id: t(1),
            event: Ephemeral::Typing {
                session_id: session,
                by,
                state: state(n),
            },
        });
    }
    for n in 0..100 {
        let frame = agent.expect("typing").await;
        assert_eq!(
            frame["state"],
            json!(state(n)),
            "typing signal {n} of 100 relayed in order"
        );
    }
}

/// Events committed on two nodes can reach a third in either order (each
/// node publishes its own after its commit): an assignment made on one
/// node can arrive after a close made later on another. Each lifecycle
/// and status event is relayed with the session or presence as stored
/// when it arrives, so the last frame shows what is (it showed the late
/// event's copy: the client kept an OPEN chat that was CLOSED, an agent
/// `away` who was `online`).
async fn a_late_event_from_another_node_relays_the_state_as_stored(backend: Backend) {
    use livechat_core::bus::{BusEvent, EventBus};
    use livechat_core::{DomainEvent, EventId, EventKind, EventPayload};

    let bus = Arc::new(InProcessBus::new());
    let (_app, node) = node_on(backend, bus.clone(), |_| {}).await;
    let (session, auth) = open_chat(&node, 940).await;
    let (mut agent, mut customer) = join_both(&node, session, &auth).await;
    let mut colleague = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    colleague.expect("ready").await;
    let late = |kind: EventKind, payload: EventPayload| {
        BusEvent::Domain(Arc::new(DomainEvent {
            id: EventId::generate(),
            tenant_id: t(1),
            session_id: (kind != EventKind::AgentStatusChanged).then_some(session),
            kind,
            payload,
            created_at: chrono::Utc::now(),
        }))
    };

    // The assignment's copy of the chat, then the close.
    let open = node.chat.get_session(t(1), session).await.unwrap().session;
    assert_eq!(open.status, SessionStatus::Open);
    node.chat.close_session(t(1), u(7), session).await.unwrap();
    let closed = customer.expect("session_updated").await;
    assert_eq!(closed["session"]["status"], "CLOSED", "{closed}");
    bus.publish(late(
        EventKind::SessionAssigned,
        EventPayload::new(&open).unwrap(),
    ));
    let relayed = customer.expect("session_updated").await;
    assert_eq!(
        relayed["session"]["status"], "CLOSED",
        "as stored: {relayed}"
    );
    let queue = loop {
        let frame = agent.expect("queue_updated").await;
        if frame["status"] != "CLOSED" || frame["session_id"] != json!(session) {
            continue;
        }
        break agent.expect("queue_updated").await;
    };
    assert_eq!(queue["status"], "CLOSED", "as stored: {queue}");

    // Agent 7 away, then online; the late `away` shows `online`.
    let away = node
        .chat
        .set_agent_status(t(1), u(7), PresenceStatus::Away)
        .await
        .unwrap();
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    // Each change is relayed as stored when it arrives: the `away` one
    // may already show `online`.
    while colleague.expect("presence_updated").await["status"] != "online" {}
    bus.publish(late(
        EventKind::AgentStatusChanged,
        EventPayload::new(&away).unwrap(),
    ));
    let relayed = colleague.expect("presence_updated").await;
    assert_eq!(
        (relayed["agent_id"].as_i64(), relayed["status"].as_str()),
        (Some(7), Some("online")),
        "as stored: {relayed}"
    );
}

/// A client on a slow link reads a backlog for longer than the
/// connection TTL (4 s here). Its pongs used to wait behind the backlog,
/// since pings were queued after it, and it was closed for "no heartbeat"
/// while reading. Pings now go ahead of the frames not yet written, and a
/// socket that takes frames while others wait counts as a client that is
/// there. Its receive buffer is made small before it connects, so part of
/// the backlog stays in the server's queue.
async fn a_slow_reader_is_kept_while_it_reads(backend: Backend) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    // The backlog is made within one ping interval, so that a ping queued
    // after it waits for all of it; the queue takes all of it (9 MB).
    let (_app, node) = node_on(backend, Arc::new(InProcessBus::new()), |r| {
        r.ping_interval = Duration::from_secs(1);
        r.connection_ttl = Duration::from_secs(4);
        r.outbound_queue_bytes = 16 * 1024 * 1024;
    })
    .await;
    let (session, _) = open_chat(&node, 941).await;
    let mut ws = joined_with_a_small_buffer(&node, 7, session).await;
    // 9 MB: more than the kernel's buffers hold, so that frames wait in
    // the server's queue, which the socket takes from as the client reads.
    const SENT: i64 = 1000;
    let sends: Vec<_> = (0..SENT)
        .map(|n| {
            let chat = node.chat.clone();
            tokio::spawn(async move {
                chat.post_message(t(1), u(7), session, format!("{n:09000}"), None)
                    .await
                    .unwrap();
            })
        })
        .collect();
    // About 150 frames a second: 6–7 s for the backlog, past the TTL; the
    // tail the kernel holds (4 MB at most) is read within it.
    let mut last_seq = 0;
    while last_seq < SENT {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s");
        match frame {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "new_message" {
                    assert_eq!(frame["seq"], last_seq + 1, "in order");
                    last_seq += 1;
                    tokio::time::sleep(Duration::from_millis(6)).await;
                }
            }
            Some(Ok(
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Binary(_),
            )) => {}
            other => panic!("closed after {last_seq} of {SENT} messages: {other:?}"),
        }
    }
    for send in sends {
        send.await.unwrap();
    }
    // Still open: the server answers (a close for "no heartbeat" would
    // have come after the backlog).
    ws.send(Message::text(json!({"type": "ping"}).to_string()))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer within 10 s")
        {
            Some(Ok(Message::Text(text))) if text.contains("\"pong\"") => break,
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("the connection did not stay open: {other:?}"),
        }
    }
}

/// A WebSocket does not outlive the credential it was opened with: when
/// the token expires (its `exp` plus the 60 s leeway) the server sends
/// `error` `unauthorized` and closes with 1008. It used to go on serving,
/// joining and storing messages as the agent, for as long as it stayed
/// open. A token with a later `exp` keeps its socket.
async fn a_socket_ends_with_its_credential(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (session, _) = open_chat(&node, 942).await;
    let now = chrono::Utc::now().timestamp();
    // Accepted for about two more seconds.
    let token = |exp: i64| {
        livechat_example_server::issue_token(
            livechat_tests::SECRET,
            &livechat_example_server::Claims {
                sub: 7,
                roles: vec!["SUPPORT_AGENT".into()],
                tenant_ids: None,
                iat: now - 120,
                exp,
            },
        )
        .unwrap()
    };
    let mut expiring =
        WsClient::connect_with_header(&node.ws_url(), &format!("Bearer {}", token(now - 58)), 1)
            .await
            .unwrap();
    let mut lasting =
        WsClient::connect_with_header(&node.ws_url(), &format!("Bearer {}", token(now + 600)), 1)
            .await
            .unwrap();
    join(&mut expiring, session, None).await;
    join(&mut lasting, session, None).await;
    let refusal = expiring.expect("error").await;
    assert_eq!(refusal["code"], "unauthorized", "{refusal}");
    assert_eq!(
        expiring.close_code(Duration::from_secs(10)).await,
        Some(1008)
    );
    lasting.send(json!({"type": "ping"})).await;
    lasting.expect("pong").await;
}

/// Issue #5: the node's fan-out queues at most `event_queue` events per
/// connection and drops the rest for it, marking it lagged; the connection
/// then re-reads the sessions it follows, so no message is lost. On a
/// current-thread runtime the 40 events of one commit are dispatched while
/// the connection's task cannot run, so 36 of them are dropped for it.
async fn an_overflowing_event_queue_loses_no_message(backend: Backend) {
    let (_node, mut agent) =
        forty_sent_together_reach_a_joined_agent(backend, 913, |r| r.event_queue = 4).await;
    // Told that frames were dropped, so that its lists are read again.
    agent.expect("resync").await;
}

/// Issue #5: the fan-out sends a session's lifecycle events to the
/// tenant's waiting customers, whose place in the queue may move, though
/// they follow another session. The queue is read once per event and node
/// for all of them; each sees its own place, and a later move is read
/// again.
async fn a_waiting_customer_sees_its_place_move(backend: Backend) {
    let app = App::new(backend).await;
    let mut config = app.config.clone();
    config.agent_capacity = 1;
    let bus = Arc::new(InProcessBus::new());
    let node = Node::start_with(app.db.clone(), &config, bus, config.realtime()).await;
    let users = [930, 931, 932, 933, 934];
    let mut views = Vec::new();
    for user in users {
        views.push(start_chat(&node, user).await);
    }
    assert_eq!(views[0].session.status, SessionStatus::Open, "capacity 1");
    let mut waiting = Vec::new();
    for (place, (user, view)) in (1..).zip(users.iter().zip(&views).skip(1)) {
        assert_eq!(view.queue_position, Some(place));
        let auth = format!("Bearer {}", App::token(*user, &["USER"], Some(&[1])));
        let mut customer = WsClient::connect_with_header(&node.ws_url(), &auth, 1)
            .await
            .unwrap();
        let joined = join(&mut customer, view.session.id, None).await;
        assert_eq!(joined["queue_position"], place);
        waiting.push(customer);
    }

    // The last customer writes while waiting: the frames that move its
    // place show the session with that message (they showed it as joined).
    let last = waiting.last_mut().unwrap();
    last.send(
        json!({"type": "send_message", "session_id": views[4].session.id,
        "client_msg_id": "still-there", "message": "still there?"}),
    )
    .await;
    let written = last.expect("new_message").await;
    let written_seq = written["seq"].as_i64().unwrap();
    assert!(written_seq > views[4].session.last_seq);

    // Closing the open chat assigns the head of the queue: an event of
    // another session moves every customer behind it up.
    for (round, closed) in [views[0].session.id, views[1].session.id]
        .into_iter()
        .enumerate()
    {
        node.chat.close_session(t(1), u(7), closed).await.unwrap();
        let assigned = &mut waiting[round];
        let updated = assigned.expect("session_updated").await;
        assert_eq!(updated["session"]["id"], json!(views[round + 1].session.id));
        assert_eq!(updated["session"]["status"], "OPEN", "{updated}");
        assert_eq!(updated["session"]["queue_position"], Value::Null);
        for (place, (customer, view)) in
            (1..).zip(waiting.iter_mut().zip(&views[1..]).skip(round + 1))
        {
            let updated = customer.expect("session_updated").await;
            assert_eq!(updated["session"]["id"], json!(view.session.id));
            assert_eq!(updated["session"]["status"], "WAITING", "{updated}");
            assert_eq!(updated["session"]["queue_position"], place, "{updated}");
            if view.session.id == views[4].session.id {
                assert_eq!(updated["session"]["last_seq"], written_seq, "{updated}");
                let time =
                    |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
                assert_eq!(
                    time(&updated["session"]["updated_at"]),
                    time(&written["created_at"]),
                    "{updated}"
                );
            }
        }
    }
}

/// Agent `agent`'s WebSocket in tenant 1 over a socket with a 4 KiB
/// receive buffer (the kernel then holds little of what the server
/// sends), joined to `session`.
async fn joined_with_a_small_buffer(
    node: &Node,
    agent: i64,
    session: SessionId,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(node.addr).await.unwrap();
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", agent_auth(agent).parse().unwrap());
    req.headers_mut()
        .insert("X-Tenant-ID", "1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws.send(Message::text(
        json!({"type": "join_session", "session_id": session}).to_string(),
    ))
    .await
    .unwrap();
    while let Some(Ok(frame)) = ws.next().await {
        if let Message::Text(text) = frame
            && text.contains("\"joined\"")
        {
            break;
        }
    }
    ws
}

/// A node with short timers over a fresh database.
async fn node(
    backend: Backend,
    adjust: impl FnOnce(&mut livechat_poem::RealtimeConfig),
) -> (App, Node) {
    node_on(backend, Arc::new(InProcessBus::new()), adjust).await
}

/// As [`node`], over `bus`.
async fn node_on(
    backend: Backend,
    bus: Arc<dyn livechat_core::bus::EventBus>,
    adjust: impl FnOnce(&mut livechat_poem::RealtimeConfig),
) -> (App, Node) {
    let app = App::new(backend).await;
    let mut config = app.config.clone();
    config.ping_interval = Duration::from_millis(200);
    config.presence_ttl = Duration::from_secs(2);
    config.presence_grace = Duration::from_millis(500);
    let mut realtime = config.realtime();
    adjust(&mut realtime);
    let node = Node::start_with(app.db.clone(), &config, bus, realtime).await;
    (app, node)
}

/// Customer `user` (an identified host user) starts a chat while agent 7
/// is online.
async fn start_chat(node: &Node, user: i64) -> SessionView {
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    start_chat_as(node, user).await
}

/// Customer `user` (an identified host user) starts a chat in tenant 1.
async fn start_chat_as(node: &Node, user: i64) -> SessionView {
    livechat_tests::start_user_chat(&node.chat, 1, user, "live").await
}

/// A customer (identified host user `user`) with a session served by agent 7.
async fn open_chat(node: &Node, user: i64) -> (SessionId, String) {
    let view = start_chat(node, user).await;
    assert_eq!(view.session.agent_id, Some(u(7)));
    (
        view.session.id,
        format!("Bearer {}", App::token(user, &["USER"], Some(&[1]))),
    )
}

/// The status line and body of a raw HTTP `request` sent to `node`.
async fn raw_http(node: &Node, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    // The server closes an HTTP/1.0 exchange (and `Connection: close`).
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Handshakes the gateway cannot serve get the envelope with a 4xx, or
/// 503 when the database cannot answer, never a 500 or a refusal that
/// blames the credential; a refusal in the first frame's answer names no
/// internals.
async fn handshakes_that_cannot_be_served(backend: Backend) {
    let (app, node) = node(backend, |r| r.auth_timeout = Duration::from_secs(5)).await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    // HTTP/1.0 cannot be upgraded (hyper only upgrades HTTP/1.1).
    let answer = raw_http(
        &node,
        format!("GET /livechat/ws HTTP/1.0\r\nHost: x\r\n{upgrade}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    assert!(answer.contains(r#""code":"bad_request""#), "{answer}");
    // An `Authorization` header that is not ASCII is refused, not ignored.
    let mut request = b"GET /livechat/ws HTTP/1.1\r\nHost: x\r\nX-Tenant-ID: 1\r\n\
         Authorization: Bearer "
        .to_vec();
    request.extend_from_slice(b"\xff\xfe\r\n");
    request.extend_from_slice(
        upgrade
            .replace("Connection: Upgrade", "Connection: Upgrade, close")
            .as_bytes(),
    );
    request.extend_from_slice(b"\r\n");
    let answer = raw_http(&node, &request).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains(r#""code":"unauthorized""#), "{answer}");
    // The tenant header twice is refused before the upgrade.
    let twice = format!(
        "GET /livechat/ws HTTP/1.1\r\nHost: x\r\nX-Tenant-ID: 1\r\nX-Tenant-ID: 1\r\n\
         Authorization: {}\r\n{}\r\n",
        agent_auth(7),
        upgrade.replace("Connection: Upgrade", "Connection: Upgrade, close")
    );
    let answer = raw_http(&node, twice.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"invalid_tenant""#), "{answer}");
    // So is the credential twice.
    let twice = format!(
        "GET /livechat/ws HTTP/1.1\r\nHost: x\r\nX-Tenant-ID: 1\r\n\
         Authorization: {auth}\r\nAuthorization: {auth}\r\n{}\r\n",
        upgrade.replace("Connection: Upgrade", "Connection: Upgrade, close"),
        auth = agent_auth(7),
    );
    let answer = raw_http(&node, twice.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains(r#""code":"unauthorized""#), "{answer}");

    // A visitor's token, then the database goes away.
    let started = node.start_visitor_chat("x").await;
    let visitor = format!(
        "Visitor {}",
        started["data"]["visitor_token"].as_str().unwrap()
    );
    let (_, customer) = open_chat(&node, 905).await;
    app.db.clone().close().await.unwrap();
    // The visitor keeps its token: 503, not 401.
    match WsClient::connect_with_header(&node.ws_url(), &visitor, 1).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("upgraded without a database"),
    }
    // In the first frame: `unavailable`, and no database error text.
    let mut first = WsClient::connect_bare(&node.ws_url()).await;
    let token = customer.trim_start_matches("Bearer ");
    first
        .send(json!({"type": "auth", "token": token, "tenant_id": 1}))
        .await;
    let refused = first.expect("error").await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.len() <= 123, "{message}");
    for internal in ["storage", "sqlx", "pool", "SQL"] {
        assert!(!message.contains(internal), "{message}");
    }
    // 1013 (try again later), not the 1008 of a refused credential.
    assert_eq!(first.close_code(Duration::from_secs(3)).await, Some(1013));
}

fn agent_auth(agent: i64) -> String {
    format!("Bearer {}", App::agent(agent))
}

async fn join(c: &mut WsClient, session: SessionId, after: Option<i64>) -> Value {
    let mut frame = json!({"type": "join_session", "session_id": session});
    if let Some(a) = after {
        frame["after_seq"] = json!(a);
    }
    c.send(frame).await;
    c.expect("joined").await
}

/// Agent 7 and the customer of `customer_auth`, both connected and joined
/// to `session` (agent first).
async fn join_both(node: &Node, session: SessionId, customer_auth: &str) -> (WsClient, WsClient) {
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    let mut customer = WsClient::connect_with_header(&node.ws_url(), customer_auth, 1)
        .await
        .unwrap();
    join(&mut agent, session, None).await;
    join(&mut customer, session, None).await;
    (agent, customer)
}

async fn agent_and_customer_talk_live(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 900).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    let ready = agent.expect("ready").await;
    assert_eq!(ready["role"], "agent");
    // The browser way: credentials in the first frame.
    let token = customer_auth.trim_start_matches("Bearer ");
    let mut customer = WsClient::connect_with_frame(&node.ws_url(), token, 1).await;
    join(&mut agent, session, None).await;
    let joined = join(&mut customer, session, None).await;
    assert_eq!(joined["last_seq"], 0);

    agent.send(json!({"type": "send_message", "session_id": session, "client_msg_id": "a-1", "message": "Hello!"})).await;
    let ack = agent.expect("ack").await;
    assert_eq!(
        (ack["client_msg_id"].as_str(), ack["seq"].as_i64()),
        (Some("a-1"), Some(1))
    );
    let got = customer.expect("new_message").await;
    assert_eq!(got["message"], "Hello!");
    assert_eq!(got["seq"], 1);
    assert_eq!(got["sender_type"], "agent");
    assert_eq!(got["client_msg_id"], "a-1");
    assert_eq!(
        ack,
        json!({"type": "ack", "client_msg_id": "a-1", "session_id": session, "id": got["id"], "seq": 1, "duplicate": false}),
        "the ack names the stored message whole"
    );

    // The sender's own connection gets the message too (other devices).
    assert_eq!(agent.expect("new_message").await["seq"], 1);
    customer.send(json!({"type": "send_message", "session_id": session, "client_msg_id": "c-1", "message": "Hi"})).await;
    assert_eq!(customer.expect("ack").await["seq"], 2);
    let got = agent.expect("new_message").await;
    assert_eq!(
        (got["seq"].as_i64(), got["sender_type"].as_str()),
        (Some(2), Some("customer"))
    );

    // A message sent over HTTP reaches both sockets.
    let resp = reqwest::Client::new()
        .post(node.url(&format!("/livechat/sessions/{session}/messages")))
        .header("Authorization", agent_auth(8))
        .header("X-Tenant-ID", "1")
        .header("Content-Type", "application/json")
        .body(json!({"message": "via HTTP"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    for c in [&mut agent, &mut customer] {
        let mut m = c.expect("new_message").await;
        while m["seq"].as_i64() < Some(3) {
            m = c.expect("new_message").await;
        }
        assert_eq!(
            (m["seq"].as_i64(), m["message"].as_str()),
            (Some(3), Some("via HTTP"))
        );
    }
    // Ping/pong at the protocol level.
    customer.send(json!({"type": "ping"})).await;
    customer.expect("pong").await;
    // Closing over HTTP tells joined clients.
    node.chat.close_session(t(1), u(7), session).await.unwrap();
    let updated = customer.expect("session_updated").await;
    assert_eq!(updated["session"]["status"], "CLOSED");
}

async fn resume_after_a_drop_in_a_thousand_message_stream(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (session, _) = open_chat(&node, 901).await;
    let mut client = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    join(&mut client, session, Some(0)).await;
    let chat = node.chat.clone();
    let writer = tokio::spawn(async move {
        for n in 1..=1000 {
            chat.post_message(t(1), u(7), session, format!("m{n}"), None)
                .await
                .unwrap();
        }
    });
    // Read part of the stream, then drop the connection mid-stream.
    let mut seen = Vec::new();
    while seen.len() < 300 {
        let f = client.expect("new_message").await;
        seen.push(f["seq"].as_i64().unwrap());
    }
    client.drop_now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let last = *seen.last().unwrap();
    let mut again = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    join(&mut again, session, Some(last)).await;
    while seen.len() < 1000 {
        let Some(f) = again.next(livechat_tests::node::FRAME_WAIT).await else {
            panic!(
                "stalled after {} messages (last {:?}); writer finished: {}",
                seen.len(),
                seen.last(),
                writer.is_finished()
            );
        };
        if f["type"] == "new_message" {
            seen.push(f["seq"].as_i64().unwrap());
        }
    }
    writer.await.unwrap();
    assert_eq!(
        seen,
        (1..=1000).collect::<Vec<_>>(),
        "gap-free, no duplicates across the switch"
    );
    let after: Vec<Value> = again
        .drain(Duration::from_millis(300))
        .await
        .into_iter()
        .filter(|f| f["type"] == "new_message")
        .collect();
    assert!(after.is_empty(), "nothing after the end: {after:?}");
    // A join past the last message starts at the last one: nothing is
    // replayed, and the next messages still arrive.
    let mut ahead = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    let joined = join(&mut ahead, session, Some(5000)).await;
    assert_eq!(joined["last_seq"], 1000, "{joined}");
    node.chat
        .post_message(t(1), u(7), session, "after the join".into(), None)
        .await
        .unwrap();
    let next = ahead.expect("new_message").await;
    assert_eq!(
        (next["seq"].as_i64(), next["message"].as_str()),
        (Some(1001), Some("after the join"))
    );
}

/// DESIGN.md invariant 5 (fan-out at least once): a send stored by a
/// node whose publish never happened (it stopped between its commit and
/// its publish; here a service without a bus) reaches the session's
/// followers when the sender retries it with the same `client_msg_id`: the
/// retry finds the original and publishes its event again. A follower that
/// has it skips it by `seq`.
async fn a_retried_send_publishes_its_unpublished_original(backend: Backend) {
    let (app, node) = node(backend, |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 903).await;
    let (mut agent, mut customer) = join_both(&node, session, &customer_auth).await;
    let original = app
        .chat
        .post_message(t(1), u(7), session, "lost".into(), Some("a-1".into()))
        .await
        .unwrap();
    assert!(original.created);
    // A message's event has the message's id: what the retry publishes.
    let events = livechat_tests::events_of(&app.chat, t(1)).await;
    let posted = events
        .iter()
        .find(|e| e.kind == livechat_core::EventKind::MessagePosted)
        .unwrap();
    assert_eq!(posted.id.to_string(), original.message.id.to_string());
    let seen = customer.drain(Duration::from_millis(300)).await;
    assert!(
        seen.iter().all(|f| f["type"] != "new_message"),
        "never published: {seen:?}"
    );
    for _ in 0..2 {
        agent.send(json!({"type": "send_message", "session_id": session, "client_msg_id": "a-1", "message": "lost"})).await;
        assert_eq!(agent.expect("ack").await["seq"], 1, "the original's seq");
    }
    let got = customer.expect("new_message").await;
    assert_eq!(
        (
            got["seq"].as_i64(),
            got["message"].as_str(),
            got["id"].as_str()
        ),
        (
            Some(1),
            Some("lost"),
            Some(original.message.id.to_string().as_str())
        )
    );
    let seen = customer.drain(Duration::from_millis(300)).await;
    assert!(
        seen.iter().all(|f| f["type"] != "new_message"),
        "delivered once: {seen:?}"
    );
}

/// `joined` says the session's status, so a client rejoining a chat that
/// closed meanwhile knows at once; `typing` in a closed chat (closed before
/// the join or while joined) is refused with `session_closed` and relayed
/// to nobody, while `read` still is.
async fn joined_says_the_status_and_a_closed_chat_refuses_typing(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 930).await;
    let mut customer = WsClient::connect_with_header(&node.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    assert_eq!(join(&mut customer, session, None).await["status"], "OPEN");
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    join(&mut agent, session, None).await;
    let typing = json!({"type": "typing", "session_id": session, "state": "start"});
    customer.send(typing.clone()).await;
    agent.expect("typing").await;

    node.chat.close_session(t(1), u(7), session).await.unwrap();
    customer.expect("session_updated").await;
    customer.send(typing.clone()).await;
    let refused = customer.expect("error").await;
    assert_eq!(refused["code"], "session_closed", "{refused}");
    customer
        .send(json!({"type": "read", "session_id": session, "seq": 0}))
        .await;
    agent.expect("read").await;

    // A client that rejoins learns the chat closed from `joined` itself.
    let mut again = WsClient::connect_with_header(&node.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    assert_eq!(join(&mut again, session, None).await["status"], "CLOSED");
    again.send(typing).await;
    assert_eq!(again.expect("error").await["code"], "session_closed");
    let seen = agent.drain(Duration::from_millis(300)).await;
    assert!(
        seen.iter().all(|f| f["type"] != "typing"),
        "no typing relayed from a closed chat: {seen:?}"
    );
}

/// A connected customer whose agent sets `offline` sees the chat go on to
/// the other agent online, as `session_updated` frames; the agents see the
/// queue change. The hand-back and the new assignment are one commit, so
/// the frames of both events show the chat as that commit left it (they
/// carry the session as stored when relayed).
async fn a_connected_customer_follows_their_chat_handed_back(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 932).await;
    let mut customer = WsClient::connect_with_header(&node.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    join(&mut customer, session, None).await;
    node.chat
        .set_agent_status(t(1), u(8), PresenceStatus::Online)
        .await
        .unwrap();
    let mut watcher = watcher(&node).await;
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Offline)
        .await
        .unwrap();
    for _ in 0..2 {
        let taken = customer.expect("session_updated").await;
        assert_eq!(
            (
                taken["session"]["status"].as_str(),
                taken["session"]["agent_id"].as_i64()
            ),
            (Some("OPEN"), Some(8)),
            "{taken}"
        );
    }
    let queue = watcher.expect("queue_updated").await;
    assert_eq!(
        queue["session_id"].as_str(),
        Some(session.to_string().as_str())
    );
}

async fn idempotent_send_and_typing_relay(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 902).await;
    let (mut agent, mut customer) = join_both(&node, session, &customer_auth).await;

    for _ in 0..2 {
        customer.send(json!({"type": "send_message", "session_id": session, "client_msg_id": "same", "message": "once"})).await;
        let ack = customer.expect("ack").await;
        assert_eq!(ack["seq"], 1, "the retry acks with the original seq");
    }
    let frames = agent.drain(Duration::from_millis(400)).await;
    let messages: Vec<_> = frames
        .iter()
        .filter(|f| f["type"] == "new_message")
        .collect();
    assert_eq!(messages.len(), 1, "stored and delivered once");
    assert_eq!(
        node.chat
            .list_messages(t(1), session, None, None)
            .await
            .unwrap()
            .len(),
        1
    );

    customer
        .send(json!({"type": "typing", "session_id": session, "state": "start"}))
        .await;
    let typing = agent.expect("typing").await;
    assert_eq!(
        (typing["state"].as_str(), typing["sender_type"].as_str()),
        (Some("start"), Some("customer"))
    );
    agent
        .send(json!({"type": "read", "session_id": session, "seq": 1}))
        .await;
    let read = customer.expect("read").await;
    assert_eq!(
        (read["seq"].as_i64(), read["sender_type"].as_str()),
        (Some(1), Some("agent"))
    );
    // The sender does not get its own typing back.
    let own = customer.drain(Duration::from_millis(300)).await;
    assert!(own.iter().all(|f| f["type"] != "typing"), "{own:?}");
}

/// A `read` names a message its connection has received (or knew of at
/// the join, up to its `after_seq`): a receipt past it, or a negative
/// one, is refused with `invalid_frame` and relayed to nobody, so the
/// other side never sees messages read before they are sent.
async fn a_read_receipt_names_only_messages_received(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 904).await;
    let (mut agent, mut customer) = join_both(&node, session, &customer_auth).await;
    let refused = |e: &Value, past: &str| {
        assert_eq!(
            (e["code"].as_str(), e["ref"].as_str()),
            (Some("invalid_frame"), Some(session.to_string().as_str())),
            "{e}"
        );
        assert!(e["message"].as_str().unwrap().contains(past), "{e}");
    };

    // Nothing sent yet: only 0 may be read.
    for (seq, why) in [(-1, "negative"), (1, "past the last message")] {
        customer
            .send(json!({"type": "read", "session_id": session, "seq": seq}))
            .await;
        refused(&customer.expect("error").await, why);
    }
    let relayed = agent.drain(Duration::from_millis(300)).await;
    assert!(relayed.iter().all(|f| f["type"] != "read"), "{relayed:?}");

    agent
        .send(json!({"type": "send_message", "session_id": session, "client_msg_id": "r1", "message": "hello"}))
        .await;
    assert_eq!(customer.expect("new_message").await["seq"], 1);
    customer
        .send(json!({"type": "read", "session_id": session, "seq": 2}))
        .await;
    refused(&customer.expect("error").await, "(1)");
    customer
        .send(json!({"type": "read", "session_id": session, "seq": 1}))
        .await;
    assert_eq!(agent.expect("read").await["seq"], 1);

    // A join with `after_seq` past the end knows the messages up to the
    // last one, not up to its `after_seq`.
    let mut late = WsClient::connect_with_header(&node.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    join(&mut late, session, Some(50)).await;
    late.send(json!({"type": "read", "session_id": session, "seq": 50}))
        .await;
    refused(&late.expect("error").await, "(1)");
    late.send(json!({"type": "read", "session_id": session, "seq": 1}))
        .await;
    assert_eq!(agent.expect("read").await["seq"], 1);
}

/// A host whose `max_page_size` is below the catch-up's page (200) still
/// gets every replay: the catch-up reads pages the host allows. It asked
/// for 200 at a time, and every join, gap fill and resync failed.
async fn a_catch_up_reads_within_the_hosts_page_size(backend: Backend) {
    let app = App::new(backend).await;
    let bus = Arc::new(InProcessBus::new());
    let rules = livechat_core::ChatConfig {
        max_page_size: 5,
        ..Default::default()
    };
    let chat = livechat_core::ChatService::new(
        livechat_core::store::SeaOrmStore::new(app.db.clone()).with_bus(bus.clone()),
        rules,
    );
    let node = Node::start_library(chat.clone(), bus, app.config.realtime()).await;
    chat.set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    let session = livechat_tests::start_user_chat(&chat, 1, 905, "Pages")
        .await
        .session
        .id;
    for n in 1..=12 {
        chat.post_message(t(1), u(7), session, format!("reply {n}"), None)
            .await
            .unwrap();
    }
    let auth = format!("Bearer {}", App::token(905, &["USER"], Some(&[1])));
    let mut customer = WsClient::connect_with_header(&node.ws_url(), &auth, 1)
        .await
        .unwrap();
    join(&mut customer, session, Some(0)).await;
    for seq in 1..=12 {
        let m = customer.expect("new_message").await;
        assert_eq!(m["seq"], seq, "{m}");
    }
}

/// A gap's catch-up that fails (the messages table cannot be read) is
/// tried again at the next ping: the messages arrive once it can be read,
/// not at the session's next message, which may never come.
async fn a_failed_catch_up_is_tried_again_at_the_next_ping(backend: Backend) {
    use livechat_core::bus::{BusEvent, EventBus};
    use livechat_core::{DomainEvent, EventId, EventKind, EventPayload, MessagePosted};
    use sea_orm::ConnectionTrait;

    let bus = Arc::new(InProcessBus::new());
    let (app, node) = node_on(backend, bus.clone(), |_| {}).await;
    let (session, auth) = open_chat(&node, 941).await;
    let mut customer = WsClient::connect_with_header(&node.ws_url(), &auth, 1)
        .await
        .unwrap();
    join(&mut customer, session, None).await;
    // Two replies stored without their events (`app.chat` has no bus).
    for text in ["one", "two"] {
        app.chat
            .post_message(t(1), u(7), session, text.into(), None)
            .await
            .unwrap();
    }
    let second = app
        .chat
        .list_messages(t(1), session, Some(1), None)
        .await
        .unwrap()
        .remove(0);
    let rename = |from: &str, to: &str| {
        let sql = format!("ALTER TABLE {from} RENAME TO {to}");
        let db = app.db.clone();
        async move { db.execute_unprepared(&sql).await.unwrap() }
    };
    rename("livechat_messages", "livechat_messages_away").await;
    // The second one's event: a gap after 0, whose catch-up fails.
    let customer_id = node
        .chat
        .get_session(t(1), session)
        .await
        .unwrap()
        .session
        .customer_id;
    let posted = MessagePosted {
        message: second.clone(),
        session_customer_id: customer_id,
        ticket_id: None,
        customer_connected: true,
    };
    bus.publish(BusEvent::Domain(Arc::new(DomainEvent {
        id: EventId::from_uuid(second.id.as_uuid()),
        tenant_id: t(1),
        session_id: Some(session),
        kind: EventKind::MessagePosted,
        payload: EventPayload::new(&posted).unwrap(),
        created_at: second.created_at,
    })));
    // Handled at once, and retried at the pings (200 ms) while it fails.
    tokio::time::sleep(Duration::from_millis(700)).await;
    rename("livechat_messages_away", "livechat_messages").await;
    for seq in 1..=2 {
        let m = customer.expect("new_message").await;
        assert_eq!(m["seq"], seq, "{m}");
    }

    // A resync whose reads fail says so (`resync`), and the messages
    // follow at the pings once they can be read.
    app.chat
        .post_message(t(1), u(7), session, "three".into(), None)
        .await
        .unwrap();
    rename("livechat_messages", "livechat_messages_away").await;
    bus.publish(BusEvent::Resync);
    customer.expect("resync").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    rename("livechat_messages_away", "livechat_messages").await;
    let m = customer.expect("new_message").await;
    assert_eq!(m["seq"], 3, "{m}");
}

async fn bad_input_gets_error_frames(backend: Backend) {
    let (_app, node) = node(backend, |r| {
        r.send_rate_per_sec = 2;
        r.signal_rate_per_sec = 2;
    })
    .await;
    let (session, _) = open_chat(&node, 903).await;
    let mut c = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    c.expect("ready").await;
    let cases = [
        ("{not json", "invalid_json"),
        ("[1,2]", "invalid_frame"),
        (r#"{"type": 5}"#, "invalid_frame"),
        (r#"{"type": "fly"}"#, "unknown_type"),
        (r#"{"type": "join_session"}"#, "invalid_frame"),
        (
            r#"{"type": "send_message", "session_id": "x"}"#,
            "invalid_frame",
        ),
        (
            r#"{"type": "typing", "session_id": "x", "state": "maybe"}"#,
            "invalid_frame",
        ),
    ];
    for (text, code) in cases {
        c.send_text(text).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], code, "{text}");
        c.send(json!({"type": "ping"})).await;
        c.expect("pong").await;
    }
    let big = json!({"type": "send_message", "session_id": session, "client_msg_id": "big", "message": "x".repeat(70 * 1024)});
    c.send(big).await;
    assert_eq!(c.expect("error").await["code"], "frame_too_large");
    // Business errors carry the client's reference.
    c.send(json!({"type": "send_message", "session_id": session, "client_msg_id": "blank", "message": "   "})).await;
    let e = c.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("invalid_message"), Some("blank"))
    );
    c.send(json!({"type": "join_session", "session_id": "not-a-uuid"}))
        .await;
    assert_eq!(c.expect("error").await["code"], "not_found");
    // A negative `after_seq` is refused, as over HTTP; nothing is joined.
    c.send(json!({"type": "join_session", "session_id": session, "after_seq": -5}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("invalid_frame"), Some(session.to_string().as_str())),
        "{e}"
    );
    c.send(json!({"type": "typing", "session_id": session, "state": "start"}))
        .await;
    assert_eq!(
        c.expect("error").await["code"],
        "not_found",
        "typing needs a join"
    );
    // Rate limit on send_message (2/s, burst 4).
    for n in 0..8 {
        c.send(json!({"type": "send_message", "session_id": session, "client_msg_id": format!("r{n}"), "message": "spam"})).await;
    }
    let frames = c.drain(Duration::from_millis(500)).await;
    let refused: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "error" && f["code"] == "rate_limited")
        .collect();
    assert!(!refused.is_empty(), "{frames:?}");
    // Each says when the limit lets the next through: within a cell of
    // the two a second.
    for f in &refused {
        let wait = f["retry_after_ms"].as_u64().expect("a wait hint");
        assert!((1..=500).contains(&wait), "{f}");
        assert_eq!(f["message"], "too many messages; slow down", "{f}");
    }
    assert!(frames.iter().any(|f| f["type"] == "ack"));
    // Rate limit on join_session, typing and read (2/s, burst 4).
    for _ in 0..8 {
        c.send(json!({"type": "typing", "session_id": session, "state": "start"}))
            .await;
    }
    let frames = c.drain(Duration::from_millis(300)).await;
    let limited: Vec<&Value> = frames
        .iter()
        .filter(|f| f["code"] == "rate_limited" && f["ref"] == json!(session))
        .collect();
    assert!(limited.len() >= 3, "{frames:?}");
    assert!(
        limited
            .iter()
            .all(|f| (1..=500).contains(&f["retry_after_ms"].as_u64().unwrap_or(0))),
        "{limited:?}"
    );
    // A client that keeps sending garbage is closed with 1008.
    for _ in 0..12 {
        c.send_text("garbage").await;
    }
    assert_eq!(c.close_code(Duration::from_secs(5)).await, Some(1008));
    // A frame over the WebSocket layer's own limit (16 × 64 KiB) ends the
    // connection with 1009, not as a normal close.
    let mut huge = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    huge.expect("ready").await;
    huge.send_text(&"x".repeat(16 * 64 * 1024 + 1)).await;
    assert_eq!(huge.close_code(Duration::from_secs(5)).await, Some(1009));
    // So does such a frame before `auth` (it used to be refused as a
    // credential: `unauthorized`, 1008).
    // The server may reset the socket while the client still writes the
    // frame, and the close frame then be lost with it; what must never come
    // is a refusal of the credential (an `error` frame, close 1008).
    let mut first = WsClient::connect_bare(&node.ws_url()).await;
    let _ = first.try_send_text(&"x".repeat(16 * 64 * 1024 + 1)).await;
    match first.next_incoming(Duration::from_secs(5)).await {
        livechat_tests::node::Incoming::Closed(code) => {
            assert!(matches!(code, Some(1009) | None), "{code:?}");
        }
        other => panic!("{other:?}"),
    }
}

async fn authentication_and_isolation(backend: Backend) {
    let (_app, node) = node(backend, |r| r.auth_timeout = Duration::from_millis(300)).await;
    let (session, _) = open_chat(&node, 904).await;
    // Bad header credentials fail the handshake.
    assert!(
        WsClient::connect_with_header(&node.ws_url(), "Bearer nope", 1)
            .await
            .is_err()
    );
    assert!(
        WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 0)
            .await
            .is_err()
    );
    // No auth frame in time → 1008.
    let mut silent = WsClient::connect_bare(&node.ws_url()).await;
    assert_eq!(silent.close_code(Duration::from_secs(3)).await, Some(1008));
    // A bad auth frame → error then 1008.
    let mut bad = WsClient::connect_bare(&node.ws_url()).await;
    bad.send(json!({"type": "auth", "token": "forged", "tenant_id": 1}))
        .await;
    assert_eq!(bad.expect("error").await["code"], "unauthorized");
    assert_eq!(bad.close_code(Duration::from_secs(3)).await, Some(1008));
    // A malformed auth frame is told what is wrong with it, then closed.
    let mut malformed = WsClient::connect_bare(&node.ws_url()).await;
    malformed
        .send(json!({"type": "auth", "token": "x", "tenant_id": "1".repeat(200)}))
        .await;
    assert_eq!(malformed.expect("error").await["code"], "invalid_frame");
    assert_eq!(
        malformed.close_code(Duration::from_secs(3)).await,
        Some(1008)
    );
    // A binary first frame gets what a later one would, then 1008.
    let mut binary = WsClient::connect_bare(&node.ws_url()).await;
    binary.send_binary(b"{\"type\": \"auth\"}").await;
    assert_eq!(binary.expect("error").await["code"], "invalid_frame");
    assert_eq!(binary.close_code(Duration::from_secs(3)).await, Some(1008));
    // An agent of tenant 2 cannot join a tenant 1 session (not_found).
    let mut other = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 2)
        .await
        .unwrap();
    other.expect("ready").await;
    other
        .send(json!({"type": "join_session", "session_id": session}))
        .await;
    assert_eq!(other.expect("error").await["code"], "not_found");
    other.send(json!({"type": "send_message", "session_id": session, "client_msg_id": "x", "message": "leak"})).await;
    assert_eq!(other.expect("error").await["code"], "not_found");
    // Another customer cannot join it either.
    let stranger = format!("Bearer {}", App::token(905, &["USER"], Some(&[1])));
    let mut s = WsClient::connect_with_header(&node.ws_url(), &stranger, 1)
        .await
        .unwrap();
    s.expect("ready").await;
    s.send(json!({"type": "join_session", "session_id": session}))
        .await;
    assert_eq!(s.expect("error").await["code"], "not_found");
    // A token limited to tenant 2 is refused for tenant 1.
    let limited = format!("Bearer {}", App::token(7, &["SUPPORT_AGENT"], Some(&[2])));
    assert!(
        WsClient::connect_with_header(&node.ws_url(), &limited, 1)
            .await
            .is_err()
    );
    assert!(
        node.chat
            .list_messages(t(1), session, None, None)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Agent 7 with `status` set, connected, and agent 8 connected (and
/// ready) to watch the presence broadcasts: `(watcher, agent)`.
async fn watched_agent(node: &Node, status: PresenceStatus) -> (WsClient, WsClient) {
    node.chat
        .set_agent_status(t(1), u(7), status)
        .await
        .unwrap();
    let watcher = watcher(node).await;
    let agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    (watcher, agent)
}

/// Agent 8, connected and ready, watching the presence broadcasts.
async fn watcher(node: &Node) -> WsClient {
    let mut watcher = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    watcher.expect("ready").await;
    watcher
}

/// Agent 7 online (by HTTP, without a connection), and agent 8's
/// connection watching the team's presence.
async fn agent_7_online_watched(node: &Node) -> WsClient {
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    watcher(node).await
}

/// Waits for the next `presence_updated` and checks it says `agent` is
/// `status`.
async fn expect_presence(watcher: &mut WsClient, agent: i64, status: &str) {
    let presence = watcher.expect("presence_updated").await;
    assert_eq!(
        (presence["agent_id"].as_i64(), presence["status"].as_str()),
        (Some(agent), Some(status)),
        "{presence}"
    );
}

/// Agents announced offline by a housekeeping step, by tenant then agent.
fn in_order(
    mut offline: Vec<(livechat_core::TenantId, livechat_core::UserId)>,
) -> Vec<(livechat_core::TenantId, livechat_core::UserId)> {
    offline.sort_by_key(|(tenant, agent)| (tenant.get(), agent.get()));
    offline
}

/// No `presence_updated` among `frames`.
fn no_presence(frames: &[Value]) -> bool {
    frames.iter().all(|f| f["type"] != "presence_updated")
}

async fn presence_grace_and_expiry(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (mut watcher, mut agent) = watched_agent(&node, PresenceStatus::Online).await;
    // Heartbeats keep the agent eligible past the 2 s TTL (clients keep
    // reading, which answers the server's pings).
    let wait = Duration::from_millis(2500);
    tokio::join!(watcher.drain(wait), agent.drain(wait));
    assert!(
        node.chat.agents_available(t(1), None).await.unwrap(),
        "pings keep presence fresh"
    );
    // Drop and reconnect within the grace period: no flap.
    agent.drop_now();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    let wait = Duration::from_millis(700);
    let (seen, _) = tokio::join!(watcher.drain(wait), agent.drain(wait));
    assert!(
        node.chat.agents_available(t(1), None).await.unwrap(),
        "a quick reconnect does not flap"
    );
    assert!(no_presence(&seen), "no flap: {seen:?}");
    // Drop for good: after the grace period the agent is not eligible and
    // the other agents hear about it.
    agent.drop_now();
    expect_presence(&mut watcher, 7, "offline").await;
    assert!(!node.chat.agents_available(t(1), None).await.unwrap());
    // A customer who starts now waits, with a ticket (no agent online).
    let started = livechat_tests::start_user_chat(&node.chat, 1, 906, "late").await;
    assert!(started.session.ticket_id.is_some());
    // Reconnecting makes the agent eligible again and drains the queue, and
    // the other agents hear that the agent is back, with the chosen status.
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    expect_presence(&mut watcher, 7, "online").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = node
        .chat
        .get_session(t(1), started.session.id)
        .await
        .unwrap();
    assert_eq!(now.session.agent_id, Some(u(7)));
    // Said once: the pings that follow, and a second connection, announce
    // nothing more.
    let mut second = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    let wait = Duration::from_millis(2500);
    let (seen, _, _) = tokio::join!(watcher.drain(wait), agent.drain(wait), second.drain(wait));
    assert!(no_presence(&seen), "announced once: {seen:?}");
}

/// An agent whose only connection was on a node that crashed (a row that
/// is never renewed) is announced offline by the housekeeping purge, once,
/// and announced back when connecting again.
async fn an_agent_of_a_crashed_node_is_announced_offline(backend: Backend) {
    use livechat_core::ConnectionOwner;

    let (_app, node) = node(backend, |_| {}).await;
    let mut watcher = agent_7_online_watched(&node).await;
    // Agent 9 of another tenant, on the same crashed node.
    node.chat
        .set_agent_status(t(2), u(9), PresenceStatus::Online)
        .await
        .unwrap();
    for (tenant, agent) in [(t(1), u(7)), (t(2), u(9))] {
        node.chat
            .register_connection(
                tenant,
                uuid::Uuid::now_v7(),
                ConnectionOwner::Agent(agent),
                "crashed-node",
                Duration::from_secs(2),
            )
            .await
            .unwrap();
    }
    let purge = || async { in_order(node.livechat.purge_expired_connections().await.unwrap()) };
    // Not expired yet: nothing to announce.
    assert!(purge().await.is_empty());
    // The watcher keeps reading (answering pings) while the rows expire;
    // expiry alone announces nothing.
    let seen = watcher.drain(Duration::from_millis(2300)).await;
    assert!(no_presence(&seen), "{seen:?}");
    assert_eq!(purge().await, vec![(t(1), u(7)), (t(2), u(9))]);
    expect_presence(&mut watcher, 7, "offline").await;
    // Said once, and tenant 2's agent is not announced to tenant 1.
    assert!(purge().await.is_empty());
    let seen = watcher.drain(Duration::from_millis(400)).await;
    assert!(no_presence(&seen), "{seen:?}");
    // The agent comes back on a live node.
    let _agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    expect_presence(&mut watcher, 7, "online").await;
}

/// A status set over HTTP reaches the tenant's agent connections with the
/// departments the agent takes (README "Frames"): set with the status,
/// kept when a later status leaves them out, `[]` for every chat.
async fn a_status_set_tells_the_team_the_departments_taken(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let mut watcher = watcher(&node).await;
    let set = |status: &'static str, departments: Option<Value>| {
        let url = node.url("/livechat/agents/me/status");
        async move {
            let mut body = json!({ "status": status });
            if let Some(departments) = departments {
                body["departments"] = departments;
            }
            let resp = reqwest::Client::new()
                .put(url)
                .header("Authorization", agent_auth(7))
                .header("X-Tenant-ID", "1")
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    let mut announced = async |status: &str| {
        let frame = watcher.expect("presence_updated").await;
        assert_eq!(
            (frame["agent_id"].as_i64(), frame["status"].as_str()),
            (Some(7), Some(status)),
            "{frame}"
        );
        frame["departments"].clone()
    };
    set("online", Some(json!(["Billing", " Refunds "]))).await;
    assert_eq!(announced("online").await, json!(["Billing", "Refunds"]));
    set("away", None).await;
    assert_eq!(announced("away").await, json!(["Billing", "Refunds"]));
    set("online", Some(json!([]))).await;
    assert_eq!(announced("online").await, json!([]));
}

/// An agent who uses only the HTTP routes and stops sending heartbeats is
/// announced offline by the housekeeping once their presence runs out (the
/// 2 s TTL here), once, to their own tenant; their next heartbeat
/// announces them back, once. Agents with a live connection or who chose
/// `offline` are not announced.
async fn an_agent_whose_presence_ran_out_is_announced_offline(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    for (tenant, agent, status) in [
        (t(1), u(7), PresenceStatus::Online),
        (t(1), u(10), PresenceStatus::Offline),
        (t(2), u(9), PresenceStatus::Away),
    ] {
        node.chat
            .set_agent_status(tenant, agent, status)
            .await
            .unwrap();
    }
    let mut watcher = watcher(&node).await;
    node.chat
        .set_agent_status(t(1), u(8), PresenceStatus::Online)
        .await
        .unwrap();
    expect_presence(&mut watcher, 8, "online").await;
    let expire = || async { in_order(node.livechat.announce_expired_presence().await.unwrap()) };
    let heartbeat = || async {
        let resp = reqwest::Client::new()
            .post(node.url("/livechat/agents/me/heartbeat"))
            .header("Authorization", agent_auth(7))
            .header("X-Tenant-ID", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    };
    assert!(expire().await.is_empty(), "fresh");
    // The watcher keeps reading (answering pings, which keep its own
    // presence fresh) while the others' presence runs out.
    let seen = watcher.drain(Duration::from_millis(2300)).await;
    assert!(
        no_presence(&seen),
        "running out alone announces nothing: {seen:?}"
    );
    assert_eq!(expire().await, vec![(t(1), u(7)), (t(2), u(9))]);
    expect_presence(&mut watcher, 7, "offline").await;
    // Said once, and tenant 2's agent is not announced to tenant 1.
    assert!(expire().await.is_empty());
    let seen = watcher.drain(Duration::from_millis(400)).await;
    assert!(no_presence(&seen), "{seen:?}");
    heartbeat().await;
    expect_presence(&mut watcher, 7, "online").await;
    heartbeat().await;
    let seen = watcher.drain(Duration::from_millis(400)).await;
    assert!(no_presence(&seen), "announced back once: {seen:?}");
}

/// With a capacity of 1, a chat served by agent 7 (online, the tenant's
/// only agent) and one waiting behind it, without a ticket.
async fn waiting_behind_agent_7(node: &Node) -> (ChatSession, ChatSession) {
    node.chat.set_agent_capacity(t(1), 1).await.unwrap();
    let served = start_chat(node, 300).await.session;
    assert_eq!(served.status, SessionStatus::Open);
    let waiting = start_chat_as(node, 301).await.session;
    assert_eq!(waiting.status, SessionStatus::Waiting);
    assert_eq!(waiting.ticket_id, None, "agent 7 is online");
    (served, waiting)
}

/// A chat that queued behind agent 7, busy and the tenant's last agent
/// online, becomes a ticket once 7's last WebSocket has closed and the
/// presence grace has passed; the tenant's agents see the queue change.
async fn a_chat_left_waiting_when_the_last_agent_disconnects_becomes_a_ticket(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (served, waiting) = waiting_behind_agent_7(&node).await;
    let mut watcher = watcher(&node).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    agent.expect("ready").await;
    agent.drop_now();
    expect_presence(&mut watcher, 7, "offline").await;
    let queue = watcher.expect("queue_updated").await;
    assert_eq!(
        (queue["session_id"].as_str(), queue["status"].as_str()),
        (Some(waiting.id.to_string().as_str()), Some("WAITING")),
        "{queue}"
    );
    let ticketed = node.chat.get_session(t(1), waiting.id).await.unwrap();
    assert_eq!(ticketed.session.status, SessionStatus::Waiting);
    assert!(ticketed.session.ticket_id.is_some(), "{ticketed:?}");
    let open = node.chat.get_session(t(1), served.id).await.unwrap();
    assert_eq!(open.session.ticket_id, None, "a served chat");
    assert!(nothing_left_to_ticket(&node).await, "ticketed once");
}

/// Whether housekeeping finds no chat left to ticket.
async fn nothing_left_to_ticket(node: &Node) -> bool {
    node.livechat
        .ticket_unattended_chats()
        .await
        .unwrap()
        .is_empty()
}

/// An agent who used only the HTTP routes stops sending heartbeats: once
/// their presence has run out, housekeeping tickets the chat left waiting
/// behind them, once.
async fn housekeeping_tickets_a_chat_whose_last_agent_ran_out(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (_, waiting) = waiting_behind_agent_7(&node).await;
    let sweep = || async {
        node.livechat
            .ticket_unattended_chats()
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.ticket_id.is_some()))
            .collect::<Vec<_>>()
    };
    assert!(sweep().await.is_empty(), "agent 7 is fresh");
    // The node's presence TTL is 2 s.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(sweep().await, vec![(waiting.id, true)]);
    assert!(sweep().await.is_empty(), "ticketed once");
    let ticketed = node.chat.get_session(t(1), waiting.id).await.unwrap();
    assert_eq!(ticketed.session.status, SessionStatus::Waiting);
    assert!(ticketed.session.ticket_id.is_some());
}

/// A chat that began waiting while an agent was online, whose liveness then
/// ran out unseen, is ticketed by the next customer start, which finds
/// nobody online and tickets itself too, without waiting for housekeeping.
async fn a_start_with_nobody_online_tickets_the_chats_waiting_before_it(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (_, waiting) = waiting_behind_agent_7(&node).await;
    assert_eq!(waiting.ticket_id, None, "agent 7 is fresh");
    // The node's presence TTL is 2 s.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let later = start_chat_as(&node, 931).await;
    assert!(later.session.ticket_id.is_some(), "{later:?}");
    let earlier = node.chat.get_session(t(1), waiting.id).await.unwrap();
    assert_eq!(earlier.session.status, SessionStatus::Waiting);
    assert!(earlier.session.ticket_id.is_some(), "{earlier:?}");
    assert_eq!(earlier.queue_position, Some(1));
    assert!(
        nothing_left_to_ticket(&node).await,
        "nothing left for housekeeping"
    );
}

/// A customer who starts again while their chat still waits gets that chat
/// back (200); when nobody is online any more it gets its ticket in that
/// start, as a new chat would, not at the next housekeeping.
async fn a_customer_back_at_a_waiting_chat_with_nobody_online_gets_its_ticket(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (_, waiting) = waiting_behind_agent_7(&node).await;
    let again = start_chat_as(&node, 301).await;
    assert_eq!(again.session.id, waiting.id);
    assert_eq!(again.session.ticket_id, None, "agent 7 is still fresh");
    // The node's presence TTL is 2 s.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let back = start_chat_as(&node, 301).await;
    assert_eq!(back.session.id, waiting.id);
    assert_eq!(back.session.status, SessionStatus::Waiting);
    assert!(back.session.ticket_id.is_some(), "{back:?}");
    assert!(
        nothing_left_to_ticket(&node).await,
        "nothing left for housekeeping"
    );
}

/// The grace after an agent's last connection counts from the latest
/// close: an agent who came back within the grace and left again is not
/// announced offline when the first close's grace ends, only once the
/// second's has (the first close's check used to announce them, with
/// the agent still eligible).
async fn a_reconnect_within_the_grace_restarts_it(backend: Backend) {
    let (_app, node) = node(backend, |r| {
        r.presence_grace = Duration::from_millis(1500);
    })
    .await;
    let (mut watcher, mut agent) = watched_agent(&node, PresenceStatus::Online).await;
    agent.expect("ready").await;
    agent.drop_now();
    let first_close = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    agent.expect("ready").await;
    agent.drop_now();
    // The first close's grace ends at 1.5 s, the second's at 2.2 s at the
    // earliest.
    let early = tokio::time::timeout_at(
        first_close + Duration::from_millis(2100),
        watcher.expect("presence_updated"),
    )
    .await;
    assert!(early.is_err(), "announced within the grace: {early:?}");
    assert!(
        node.chat.agents_available(t(1), None).await.unwrap(),
        "eligible within the grace"
    );
    expect_presence(&mut watcher, 7, "offline").await;
    assert!(!node.chat.agents_available(t(1), None).await.unwrap());
}

/// An agent whose chosen status is `offline` is announced neither when the
/// last connection goes (that status was announced when chosen) nor when
/// connecting again: nothing changed for the other agents.
async fn an_agent_who_chose_offline_is_announced_neither_gone_nor_back(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    let (mut watcher, mut agent) = watched_agent(&node, PresenceStatus::Offline).await;
    agent.expect("ready").await;
    agent.drop_now();
    // Past the 500 ms grace.
    let seen = watcher.drain(Duration::from_millis(1200)).await;
    assert!(no_presence(&seen), "{seen:?}");
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    let wait = Duration::from_millis(800);
    let (seen, _) = tokio::join!(watcher.drain(wait), agent.drain(wait));
    assert!(no_presence(&seen), "{seen:?}");
    // Its choice is announced as ever.
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    expect_presence(&mut watcher, 7, "online").await;
}

async fn slow_consumer_is_closed_with_1013(backend: Backend) {
    let (_app, node) = node(backend, |r| {
        r.outbound_queue = 4;
        r.connection_ttl = Duration::from_secs(60);
    })
    .await;
    let (session, _) = open_chat(&node, 907).await;
    let mut slow = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    join(&mut slow, session, None).await;
    // Large messages fill the socket buffers; the client reads nothing.
    // Enough to overflow any loopback buffer: ~15 MB.
    let body = "y".repeat(9_500);
    let total = 1_600;
    for _ in 0..total {
        node.chat
            .post_message(t(1), u(7), session, body.clone(), None)
            .await
            .unwrap();
    }
    assert_eq!(slow.close_code(Duration::from_secs(20)).await, Some(1013));
    // It resumes with after_seq and gets everything.
    let mut again = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    join(&mut again, session, Some(0)).await;
    let mut n = 0;
    while n < total {
        let f = again.expect("new_message").await;
        n += 1;
        assert_eq!(f["seq"], n);
    }
}

/// The outbound queue is limited in bytes too: a client that reads
/// nothing while 800 messages of 9.5 KB (7.6 MB) reach it is closed with
/// 1013 once the kernel's buffers and 64 KiB of queue are full, though
/// 800 frames are within the 1,024 the queue takes (counted in frames
/// alone, it held them all).
async fn a_slow_consumer_of_long_messages_is_closed_by_bytes(backend: Backend) {
    use tokio_tungstenite::tungstenite::Message;
    let (_app, node) = node(backend, |r| {
        r.outbound_queue_bytes = 64 * 1024;
        r.connection_ttl = Duration::from_secs(60);
    })
    .await;
    let (session, _) = open_chat(&node, 908).await;
    let mut ws = joined_with_a_small_buffer(&node, 8, session).await;
    let body = "y".repeat(9_500);
    for _ in 0..800 {
        node.chat
            .post_message(t(1), u(7), session, body.clone(), None)
            .await
            .unwrap();
    }
    // Now read: the frames the kernel held, then the close.
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        use futures::StreamExt;
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Close(close)) => return close.map(|c| u16::from(c.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the stream ends");
    assert_eq!(closed, Some(1013));
}

async fn connection_status_and_offline_notifications(backend: Backend) {
    let (app, node) = node(backend, |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 908).await;
    let status = || async {
        let resp = reqwest::Client::new()
            .get(node.url(&format!("/livechat/sessions/{session}/connections")))
            .header("Authorization", agent_auth(7))
            .header("X-Tenant-ID", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).unwrap()["data"].clone()
    };
    assert_eq!(
        status().await,
        json!({"customer_connected": false, "agent_connected": false, "total_customer": 0, "total_agent": 0})
    );
    // The customer is away: an agent reply becomes a notification.
    node.chat
        .post_message(t(1), u(7), session, "are you there?".into(), None)
        .await
        .unwrap();
    let mut customer = WsClient::connect_with_header(&node.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    join(&mut customer, session, None).await;
    let mut agent_a = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    join(&mut agent_a, session, None).await;
    let mut agent_b = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    join(&mut agent_b, session, None).await;
    assert_eq!(
        status().await,
        json!({"customer_connected": true, "agent_connected": true, "total_customer": 1, "total_agent": 2})
    );
    // Connected: a reply is delivered live, not notified.
    node.chat
        .post_message(t(1), u(7), session, "welcome back".into(), None)
        .await
        .unwrap();
    customer.expect("new_message").await;
    app.drain_outbox().await;
    let sinks = livechat_ticket_bridge::SeaOrmSinks::new(app.db.clone());
    let customer_id = node
        .chat
        .get_session(t(1), session)
        .await
        .unwrap()
        .session
        .customer_id
        .unwrap();
    let notes = livechat_core::NotificationInbox::list_notifications(
        &sinks,
        t(1),
        &[customer_id],
        None,
        livechat_core::PageSize::parse(Some(50), node.chat.config()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(notes.len(), 1, "only the reply sent while away: {notes:?}");
    assert_eq!(notes[0].body, "are you there?");
    // Leaving counts down.
    customer
        .send(json!({"type": "leave_session", "session_id": session}))
        .await;
    customer.expect("left").await;
    drop(agent_b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status().await,
        json!({"customer_connected": false, "agent_connected": true, "total_customer": 0, "total_agent": 1})
    );
}

/// Agent 7 replies `text` in `session`; the `customer_connected` its
/// `message.posted` event was stored with.
async fn replied_connected(
    chat: &livechat_core::ChatService,
    session: SessionId,
    text: &'static str,
) -> Value {
    chat.post_message(t(1), u(7), session, text.into(), None)
        .await
        .unwrap();
    let payload = last_posted(chat).await;
    assert_eq!(payload["message"], text, "{payload}");
    payload["customer_connected"].clone()
}

/// The payload of tenant 1's latest `message.posted` event.
async fn last_posted(chat: &livechat_core::ChatService) -> Value {
    livechat_tests::events_of(chat, t(1))
        .await
        .into_iter()
        .rfind(|e| e.kind == livechat_core::EventKind::MessagePosted)
        .unwrap()
        .payload
        .decode()
        .unwrap()
}

/// Customer `user`'s chat with agent 7, and the customer's socket joined
/// to it.
async fn joined_customer(node: &Node, user: i64) -> (SessionId, WsClient) {
    let (session, customer_auth) = open_chat(node, user).await;
    let mut customer = WsClient::connect_with_header(&node.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    join(&mut customer, session, None).await;
    (session, customer)
}

/// The connections following `session` once its customer connections
/// are `customers`, or after 6 s; `customer` keeps reading (answering
/// pings) meanwhile.
async fn customers_until(
    node: &Node,
    session: SessionId,
    customer: &mut WsClient,
    customers: u64,
) -> livechat_core::SessionConnections {
    let mut now = node.chat.session_connections(t(1), session).await.unwrap();
    for _ in 0..60 {
        if now.customers == customers {
            break;
        }
        customer.drain(Duration::from_millis(100)).await;
        now = node.chat.session_connections(t(1), session).await.unwrap();
    }
    now
}

/// A node over a [`CuttableBus`], and that bus.
async fn cuttable_node(backend: Backend) -> (App, Node, Arc<CuttableBus>) {
    let bus = Arc::new(CuttableBus {
        local: InProcessBus::new(),
        cut: false.into(),
    });
    let (app, node) = node_on(backend, bus.clone(), |_| {}).await;
    (app, node, bus)
}

/// An in-process bus whose link to other nodes can be cut, as a Redis
/// outage cuts [`livechat_core::redis_bus::RedisBus`]'s: it still
/// delivers on this node and reports itself degraded.
struct CuttableBus {
    local: InProcessBus,
    cut: std::sync::atomic::AtomicBool,
}

impl livechat_core::bus::EventBus for CuttableBus {
    fn publish(&self, event: livechat_core::bus::BusEvent) {
        self.local.publish(event);
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<livechat_core::bus::BusEvent>> {
        self.local.subscribe()
    }
    fn is_degraded(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A customer connected to a node whose bus cannot reach the other nodes
/// (Redis down, the database still up) receives none of their agents'
/// replies. Their connection used to be renewed all the same, so the
/// replies counted as seen and no notification was made: the customer
/// got neither. Such a connection is no longer renewed: once its row runs
/// out, replies count it as gone (notified); after the outage it is
/// renewed, its joins stored again, and replies count it again.
async fn a_customer_cut_off_from_the_other_nodes_is_notified(backend: Backend) {
    use std::sync::atomic::Ordering;
    let (app, node, bus) = cuttable_node(backend).await;
    let (session, mut customer) = joined_customer(&node, 3201).await;
    let connected = |customers: u64| livechat_core::SessionConnections {
        customers,
        agents: 0,
    };
    let reply = |text| replied_connected(&node.chat, session, text);
    assert_eq!(reply("before").await, true);
    bus.cut.store(true, Ordering::Relaxed);
    // Its row runs out (2 s TTL).
    assert_eq!(
        customers_until(&node, session, &mut customer, 0).await,
        connected(0),
        "not renewed while cut off"
    );
    assert_eq!(reply("during").await, false, "notified");
    bus.cut.store(false, Ordering::Relaxed);
    assert_eq!(
        customers_until(&node, session, &mut customer, 1).await,
        connected(1),
        "renewed after the outage"
    );
    assert_eq!(reply("after").await, true);
    drop(app);
}

/// A connection follows at most `max_joins_per_connection` sessions: one
/// more join is refused with `too_many_joins` and joins nothing (the
/// session's messages do not reach it); a join again of a followed
/// session is not counted, and a leave makes room.
async fn a_connection_follows_at_most_its_cap_of_sessions(backend: Backend) {
    let (_app, node) = node(backend, |r| r.max_joins_per_connection = 2).await;
    let mut sessions = Vec::new();
    for user in [3101, 3102, 3103] {
        sessions.push(open_chat(&node, user).await);
    }
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    agent.expect("ready").await;
    join(&mut agent, sessions[0].0, None).await;
    join(&mut agent, sessions[1].0, None).await;
    join(&mut agent, sessions[0].0, None).await;
    agent
        .send(json!({"type": "join_session", "session_id": sessions[2].0}))
        .await;
    let refused = agent.expect("error").await;
    assert_eq!(refused["code"], "too_many_joins", "{refused}");
    assert_eq!(refused["ref"], sessions[2].0.to_string(), "{refused}");
    // A session that is not the caller's is not found, cap or not.
    agent
        .send(json!({"type": "join_session", "session_id": uuid::Uuid::now_v7()}))
        .await;
    assert_eq!(agent.expect("error").await["code"], "not_found");
    // Not followed: the third customer's message does not reach it.
    let mut third = WsClient::connect_with_header(&node.ws_url(), &sessions[2].1, 1)
        .await
        .unwrap();
    join(&mut third, sessions[2].0, None).await;
    third
        .send(json!({"type": "send_message", "session_id": sessions[2].0, "client_msg_id": "c-1", "message": "hello?"}))
        .await;
    third.expect("ack").await;
    let frames = agent.drain(Duration::from_millis(300)).await;
    assert!(
        !frames.iter().any(|f| f["type"] == "new_message"),
        "{frames:?}"
    );
    // A leave makes room.
    agent
        .send(json!({"type": "leave_session", "session_id": sessions[1].0}))
        .await;
    agent.expect("left").await;
    let joined = join(&mut agent, sessions[2].0, Some(0)).await;
    assert_eq!(joined["session_id"], sessions[2].0.to_string());
}

/// A reply stored by a healthy node while the customer's node is cut off
/// from it counts the customer as connected (their row is still fresh)
/// and never reaches them. When they close the tab during the outage, the
/// reply is made up as a silent client's would be: closed with a close
/// frame, their connection used to be removed without one, and the reply
/// was neither seen nor notified.
async fn a_reply_to_a_customer_whose_node_is_cut_off_is_notified_at_its_close(backend: Backend) {
    use std::sync::atomic::Ordering;
    let (app, node, bus) = cuttable_node(backend).await;
    let (session, customer) = joined_customer(&node, 3301).await;
    bus.cut.store(true, Ordering::Relaxed);
    // Another node, whose own bus is fine, stores the agent's reply.
    let other = livechat_core::ChatService::new(
        livechat_core::store::SeaOrmStore::new(app.db.clone()),
        node.chat.config().clone(),
    );
    other
        .post_message(t(1), u(7), session, "still there?".into(), None)
        .await
        .unwrap();
    assert_eq!(missed(&app).await, 0, "the connection counted");
    customer.close().await;
    until_missed(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(missed(&app).await, 1);
}

/// A reply stored by a node cut off from the others counts no customer as
/// connected (the customer may be on another node, which the reply's
/// event cannot reach): it is notified.
async fn a_reply_stored_by_a_cut_off_node_is_notified(backend: Backend) {
    use std::sync::atomic::Ordering;
    let (_app, node, bus) = cuttable_node(backend).await;
    let (session, mut customer) = joined_customer(&node, 3302).await;
    let posted = |text| replied_connected(&node.chat, session, text);
    assert_eq!(posted("before").await, true);
    bus.cut.store(true, Ordering::Relaxed);
    assert_eq!(posted("during").await, false);
    // This node's own customer still gets it live.
    assert_eq!(customer.expect("new_message").await["message"], "before");
    assert_eq!(customer.expect("new_message").await["message"], "during");
}

/// A housekeeping node without the gateway (a worker) deletes a crashed
/// node's expired customer rows (making up their replies) but leaves the
/// agents' rows, and their offline announcement, to a node with the
/// gateway, having no bus to make it on. The worker used to record the
/// announcement and publish nothing, so no node ever made it.
async fn a_worker_purges_without_taking_the_announcements(backend: Backend) {
    use livechat_core::{ConnectionOwner, CustomerId};
    use sea_orm::ConnectionTrait;
    let (app, node) = node(backend, |_| {}).await;
    let mut watcher = agent_7_online_watched(&node).await;
    for owner in [
        ConnectionOwner::Agent(u(7)),
        ConnectionOwner::Customer(CustomerId::generate()),
    ] {
        node.chat
            .register_connection(
                t(1),
                uuid::Uuid::now_v7(),
                owner,
                "crashed-node",
                Duration::from_secs(1),
            )
            .await
            .unwrap();
    }
    let worker = livechat_poem::Livechat::new(
        node.chat.clone(),
        Arc::new(livechat_poem::JwtAuthenticator::hs256(b"worker secret")),
        b"worker visitor secret",
    );
    let crashed_rows = |role: &'static str| {
        let db = app.db.clone();
        async move {
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    format!(
                        "SELECT count(*) AS n FROM livechat_connections \
                         WHERE node_id = 'crashed-node' AND role = '{role}'"
                    ),
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap()
        }
    };
    // The watcher keeps answering pings while the rows run out.
    let seen = watcher.drain(Duration::from_millis(2500)).await;
    assert!(no_presence(&seen), "{seen:?}");
    assert!(worker.purge_expired_connections().await.unwrap().is_empty());
    assert_eq!(crashed_rows("customer").await, 0, "the worker purged it");
    assert_eq!(
        crashed_rows("agent").await,
        1,
        "left to a node with the gateway"
    );
    let seen = watcher.drain(Duration::from_millis(300)).await;
    assert!(no_presence(&seen), "{seen:?}");
    assert_eq!(
        node.livechat.purge_expired_connections().await.unwrap(),
        vec![(t(1), u(7))]
    );
    expect_presence(&mut watcher, 7, "offline").await;
}

/// A presence announcement is relayed as the agent's presence reads when
/// it arrives, not as it was sent: an agent's departure announced by the
/// node they left and their return announced by the node they came back
/// on travel two Redis links and can reach a third node in either order,
/// and relaying each as carried left every console showing a connected
/// agent offline.
async fn presence_announcements_are_relayed_as_stored(backend: Backend) {
    use livechat_core::bus::{BusEvent, Ephemeral, EventBus};
    use sea_orm::ConnectionTrait;
    let bus = Arc::new(InProcessBus::new());
    let (app, node) = node_on(backend, bus.clone(), |_| {}).await;
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    let mut watcher = watcher(&node).await;
    let announce = |status| {
        bus.publish(BusEvent::Ephemeral {
            tenant_id: t(1),
            event: Ephemeral::Presence {
                agent_id: u(7),
                status,
            },
        });
    };
    // The departure arrives after the return: the agent is back.
    announce(PresenceStatus::Offline);
    expect_presence(&mut watcher, 7, "online").await;
    // Announced offline since: a return announcement arriving late (the
    // agent left again meanwhile) says offline.
    app.db
        .execute_unprepared(
            "UPDATE livechat_agent_presence \
             SET offline_announced_at = '2000-01-01T00:00:00+00:00' WHERE agent_id = 7",
        )
        .await
        .unwrap();
    announce(PresenceStatus::Online);
    expect_presence(&mut watcher, 7, "offline").await;
}

/// A resync (the node's events were dropped: a full queue, a Redis
/// outage, another node's request) sends `session_updated` for every
/// joined session as stored, before its `resync` frame: a dropped transfer
/// leaves the status and queue place as they were, and used to go
/// unreported (only a changed place or closure was sent).
async fn a_resync_sends_each_joined_session_as_stored(backend: Backend) {
    use livechat_core::bus::{BusEvent, EventBus};
    let bus = Arc::new(InProcessBus::new());
    let (app, node) = node_on(backend, bus.clone(), |_| {}).await;
    let (session, customer_auth) = open_chat(&node, 3400).await;
    let (_agent, mut customer) = join_both(&node, session, &customer_auth).await;
    customer.drain(Duration::from_millis(300)).await;
    // A transfer to agent 8 whose events this node never relayed: made
    // through a service without its bus.
    node.chat
        .set_agent_status(t(1), u(8), PresenceStatus::Online)
        .await
        .unwrap();
    customer.drain(Duration::from_millis(300)).await;
    let unlinked = livechat_core::ChatService::new(
        livechat_core::store::SeaOrmStore::new(app.db.clone()),
        app.chat.config().clone(),
    );
    unlinked
        .assign_session(t(1), u(7), session, Some(u(8)))
        .await
        .unwrap();
    assert!(
        customer.drain(Duration::from_millis(300)).await.is_empty(),
        "nothing relayed"
    );
    bus.publish(BusEvent::Resync);
    let updated = customer.expect("session_updated").await;
    assert_eq!(updated["session"]["agent_id"], 8, "{updated}");
    customer.expect("resync").await;
}

/// Connection rows of a live node purged by housekeeping (they expired
/// while the node could not reach the database for longer than their
/// TTL) are registered again at the connections' next renewal, with their
/// joins: a connection used to count as gone for as long as it stayed
/// open (its customer notified of every reply, its agent counted as not
/// connected). Agents heard from within the presence TTL are not
/// announced offline for their rows' expiry.
async fn open_connections_purged_after_an_outage_are_registered_again(backend: Backend) {
    use sea_orm::ConnectionTrait;
    let (app, node) = node(backend, |r| r.ping_interval = Duration::from_secs(1)).await;
    let (session, customer_auth) = open_chat(&node, 960).await;
    let mut watcher = watcher(&node).await;
    let (mut agent, mut customer) = join_both(&node, session, &customer_auth).await;
    let connected =
        |customers: u64, agents: u64| livechat_core::SessionConnections { customers, agents };
    assert_eq!(
        node.chat.session_connections(t(1), session).await.unwrap(),
        connected(1, 1)
    );
    // The rows run out as in an outage; housekeeping (here, or on another
    // node) purges them with their joins.
    app.db
        .execute_unprepared(
            "UPDATE livechat_connections SET expires_at = '2000-01-01T00:00:00+00:00'",
        )
        .await
        .unwrap();
    let offline = node.livechat.purge_expired_connections().await.unwrap();
    assert!(
        offline.is_empty(),
        "fresh agents are not announced: {offline:?}"
    );
    // The next renewals (clients answering the pings) bring them back.
    let mut now = connected(0, 0);
    for _ in 0..50 {
        agent.drain(Duration::from_millis(50)).await;
        customer.drain(Duration::from_millis(50)).await;
        now = node.chat.session_connections(t(1), session).await.unwrap();
        if now == connected(1, 1) {
            break;
        }
    }
    assert_eq!(now, connected(1, 1), "registered and joined again");
    // A reply now counts the customer as connected: delivered live.
    agent
        .send(json!({"type": "send_message", "session_id": session, "client_msg_id": "r-1", "message": "Still here"}))
        .await;
    assert_eq!(
        customer.expect("new_message").await["message"],
        "Still here"
    );
    let payload = last_posted(&app.chat).await;
    assert_eq!(payload["customer_connected"], true, "{payload}");
    let frames = watcher.drain(Duration::from_millis(300)).await;
    assert!(
        !frames
            .iter()
            .any(|f| f["type"] == "presence_updated" && f["status"] == "offline"),
        "{frames:?}"
    );
}

/// A customer whose node crashed (its connection row is neither renewed
/// nor removed) still counts as following the chat until the row's TTL runs
/// out, so a reply stored meanwhile was not notified when stored. The
/// housekeeping purge writes `message.missed` for the agent replies stored
/// since that connection's last renewal, and the bridge notifies them, once,
/// under the message's id. A reply before the renewal (delivered while the
/// node still renewed), the customer's own message, a chat that a live
/// customer connection still follows, and a reply stored after the expiry
/// (notified when stored, though within the window's slack) get no such
/// event.
async fn a_reply_only_a_crashed_customer_connection_followed_is_notified(backend: Backend) {
    use livechat_core::{ConnectionOwner, CustomerId, NotificationInbox, PageSize};

    let (app, node) = node(backend, |_| {}).await;
    let ttl = Duration::from_secs(4);
    let (session, _) = open_chat(&node, 920).await;
    let (followed, followed_auth) = open_chat(&node, 921).await;
    let mut crashed = Vec::new();
    for s in [session, followed] {
        let customer = customer_of(&node, s).await;
        let id = uuid::Uuid::now_v7();
        node.chat
            .register_connection(
                t(1),
                id,
                ConnectionOwner::Customer(customer),
                "crashed-node",
                ttl,
            )
            .await
            .unwrap();
        node.chat.follow_session(t(1), id, s).await.unwrap();
        crashed.push((id, customer));
    }
    // The second customer also follows their chat from a live node.
    let mut live = WsClient::connect_with_header(&node.ws_url(), &followed_auth, 1)
        .await
        .unwrap();
    join(&mut live, followed, None).await;
    let reply = |s: SessionId, text: &str| {
        let chat = node.chat.clone();
        let text = text.to_owned();
        async move {
            chat.post_message(t(1), u(7), s, text, None)
                .await
                .unwrap()
                .message
        }
    };
    reply(session, "before the renewal").await;
    live.drain(Duration::from_millis(700)).await;
    // The crashed node's last renewal.
    for &(id, customer) in &crashed {
        node.chat
            .touch_connection(
                t(1),
                id,
                ConnectionOwner::Customer(customer),
                "crashed-node",
                ttl,
            )
            .await
            .unwrap();
    }
    let first = reply(session, "after the renewal 1").await;
    node.chat
        .post_customer_message(
            t(1),
            crashed[0].1,
            session,
            "from the customer".into(),
            None,
        )
        .await
        .unwrap();
    let second = reply(session, "after the renewal 2").await;
    reply(followed, "seen live").await;
    live.expect("new_message").await;
    // Not expired yet.
    node.chat.purge_expired_connections(ttl).await.unwrap();
    assert_eq!(missed(&app).await, 0);
    // The live connection keeps answering its node's pings meanwhile.
    live.drain(ttl + Duration::from_millis(300)).await;
    let after = reply(session, "after the expiry").await;
    node.chat.purge_expired_connections(ttl).await.unwrap();
    assert_eq!(missed(&app).await, 2);
    // The connections are gone: a second purge writes nothing.
    node.chat.purge_expired_connections(ttl).await.unwrap();
    assert_eq!(missed(&app).await, 2);

    app.drain_outbox().await;
    let sinks = livechat_ticket_bridge::SeaOrmSinks::new(app.db.clone());
    let notes = |customer: CustomerId| {
        let sinks = sinks.clone();
        let page = PageSize::parse(Some(50), node.chat.config()).unwrap();
        async move {
            let mut notes = sinks
                .list_notifications(t(1), &[customer], None, page)
                .await
                .unwrap();
            notes.sort_by_key(|n| n.created_at);
            notes
                .into_iter()
                .map(|n| (n.id.as_uuid(), n.body))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        notes(crashed[0].1).await,
        vec![
            (first.id.as_uuid(), first.message),
            (second.id.as_uuid(), second.message),
            (after.id.as_uuid(), after.message),
        ]
    );
    assert_eq!(notes(crashed[1].1).await, vec![]);
}

/// A customer whose client stops answering (a laptop lid closed, a
/// frozen tab) is closed for no heartbeat after the TTL; an agent's reply
/// stored meanwhile, which counted the connection and so was not notified,
/// becomes a notification then (`message.missed`), once.
async fn a_reply_sent_to_a_customer_gone_silent_is_notified(backend: Backend) {
    use livechat_core::NotificationInbox;

    let (app, node) = node(backend, |_| {}).await;
    // From here on the client reads nothing, so answers no ping.
    let (session, customer, reply) = replied_to_a_joined_customer(&node, 930, "still there?").await;
    assert_eq!(missed(&app).await, 0, "the connection counted");
    until_missed(&app).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(missed(&app).await, 1);
    app.drain_outbox().await;
    let customer_id = customer_of(&node, session).await;
    let page = livechat_core::PageSize::parse(Some(50), node.chat.config()).unwrap();
    let notes = livechat_ticket_bridge::SeaOrmSinks::new(app.db.clone())
        .list_notifications(t(1), &[customer_id], None, page)
        .await
        .unwrap();
    let notes: Vec<_> = notes
        .into_iter()
        .map(|n| (n.id.as_uuid(), n.body))
        .collect();
    assert_eq!(notes, vec![(reply.id.as_uuid(), reply.message)]);
    drop(customer);
}

/// Customer `user`'s chat with agent 7, the customer's socket joined to
/// it, and the agent's reply `text` stored after the join.
async fn replied_to_a_joined_customer(
    node: &Node,
    user: i64,
    text: &str,
) -> (SessionId, WsClient, livechat_core::ChatMessage) {
    let (session, customer_auth) = open_chat(node, user).await;
    let mut customer = WsClient::connect_with_header(&node.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    join(&mut customer, session, None).await;
    let reply = node
        .chat
        .post_message(t(1), u(7), session, text.into(), None)
        .await
        .unwrap()
        .message;
    (session, customer, reply)
}

/// `message.missed` events in the outbox.
async fn missed(app: &App) -> i64 {
    livechat_tests::count_rows(&app.db, "livechat_outbox WHERE kind = 'message.missed'").await
}

/// Waits (10 s at most) for a first `message.missed` event.
async fn until_missed(app: &App) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while missed(app).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no make-up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A customer's socket that ends without a close frame (a frozen tab's
/// process killed, a mobile browser discarding it) makes up at once, as a
/// close for silence does: the reply stored since the client was last
/// heard, which it may never have read, becomes a notification. (It was
/// made up only when the node closed a silent client, one TTL later; a
/// socket the client's system closed first left the reply unnotified.)
async fn a_reply_sent_before_a_customers_socket_broke_is_notified(backend: Backend) {
    a_reply_before_a_customers_socket_ended_is_notified(backend, 931, false).await;
}

/// As [`a_reply_sent_before_a_customers_socket_broke_is_notified`], the
/// client having read the reply before its TCP connection ended, cleanly,
/// without a close frame (the server sees no reset, but tungstenite's
/// "reset without closing handshake", which counted as a protocol error
/// and made up nothing): the reply is notified, a notification too many
/// rather than one too few (README "Offline notifications").
async fn a_reply_read_before_a_customers_socket_ended_unclosed_is_notified(backend: Backend) {
    a_reply_before_a_customers_socket_ended_is_notified(backend, 932, true).await;
}

/// A reply to customer `user`, then the customer's socket dropped without
/// a close frame (`read`: after the client read the reply).
async fn a_reply_before_a_customers_socket_ended_is_notified(
    backend: Backend,
    user: i64,
    read: bool,
) {
    let (app, node) = node(backend, |r| r.connection_ttl = Duration::from_secs(60)).await;
    // The client reads nothing from here on (frozen).
    let (_, mut customer, reply) =
        replied_to_a_joined_customer(&node, user, "are you there?").await;
    assert_eq!(missed(&app).await, 0, "the connection counted");
    if read {
        customer.expect("new_message").await;
    }
    customer.drop_now();
    until_missed(&app).await;
    assert_eq!(missed(&app).await, 1);
    let row = livechat_tests::count_rows(
        &app.db,
        &format!(
            "livechat_outbox WHERE kind = 'message.missed' AND payload LIKE '%{}%'",
            reply.id
        ),
    )
    .await;
    assert_eq!(row, 1, "the reply's");
}

/// An agent-started chat opens OPEN with its agent: the tenant's agent
/// connections get `queue_updated` for it, as for any start (only its
/// assignment or close sent one; the agent it was opened for learnt of it
/// by polling).
async fn an_agent_started_chat_reaches_the_teams_queue_view(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    node.chat
        .set_agent_status(t(1), u(9), PresenceStatus::Online)
        .await
        .unwrap();
    let mut watcher = watcher(&node).await;
    let started = node
        .chat
        .start_session(t(1), u(7), Some(u(9)))
        .await
        .unwrap();
    let frame = watcher.expect("queue_updated").await;
    assert_eq!(
        (frame["session_id"].as_str(), frame["status"].as_str()),
        (Some(started.id.to_string().as_str()), Some("OPEN")),
        "{frame}"
    );
}

/// A reply that two of a customer's connections followed, both dead and
/// removed one after the other (one closed for silence, the other purged
/// later as expired), becomes one notification: the second removal finds
/// the first one's `message.missed` (a webhook got two).
async fn a_reply_two_dead_connections_followed_is_notified_once(backend: Backend) {
    use livechat_core::ConnectionOwner;

    let (app, node) = node(backend, |_| {}).await;
    let (session, _) = open_chat(&node, 931).await;
    let customer = customer_of(&node, session).await;
    let owner = ConnectionOwner::Customer(customer);
    let (lasting, short) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    for (id, ttl) in [(lasting, 60), (short, 1)] {
        node.chat
            .register_connection(t(1), id, owner, "other-node", Duration::from_secs(ttl))
            .await
            .unwrap();
        node.chat.follow_session(t(1), id, session).await.unwrap();
    }
    let silent_since = chrono::Utc::now();
    node.chat
        .post_message(t(1), u(7), session, "one reply".into(), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The short one has expired: the lasting one was the last live one.
    node.chat
        .unregister_connection(t(1), lasting, owner, Duration::ZERO, Some(silent_since))
        .await
        .unwrap();
    assert_eq!(missed(&app).await, 1);
    node.chat
        .purge_expired_connections(Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(missed(&app).await, 1, "the purge finds it written");
}

/// An agent whose client stops answering stops counting as online within
/// the presence TTL (plus two ping intervals) of the last time it was
/// heard: the node renews a connection, and its agent's liveness, only for
/// a client heard within the last two ping intervals (it renewed on its own pings, and routing gave chats to
/// a frozen agent until the close for no heartbeat and a TTL after it).
async fn an_agent_gone_silent_stops_counting_within_the_ttl(backend: Backend) {
    // The connection is closed for silence after 4 s; the presence TTL is
    // 2 s.
    let (_app, node) = node(backend, |realtime| {
        realtime.connection_ttl = Duration::from_secs(4);
    })
    .await;
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    agent.expect("ready").await;
    // Silent from here on.
    let online = || async {
        node.chat
            .availability(t(1), None)
            .await
            .unwrap()
            .agents_online
    };
    assert!(online().await);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(!online().await, "eligible past the TTL");
    drop(agent);
}

/// An agent whose client only listens (answers pings, sends nothing)
/// stays online throughout, with a ping interval of 0.6 s and a TTL of
/// 1 s: the first tick renews (no ping has gone out before it), and a pong
/// arriving just after a tick still counts at the next one.
async fn a_listening_agent_stays_online_between_pings(backend: Backend) {
    let (_app, node) = node(backend, |realtime| {
        realtime.ping_interval = Duration::from_millis(600);
        realtime.connection_ttl = Duration::from_secs(1);
        // Within what the TTL leaves after a ping (`RealtimeConfig::check`).
        realtime.presence_grace = Duration::from_millis(300);
    })
    .await;
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    agent.expect("ready").await;
    let listening = tokio::spawn(async move {
        agent.drain(Duration::from_millis(3500)).await;
        agent
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let connected = node.chat.agent_connected(t(1), u(7)).await.unwrap();
        assert!(connected, "the listening agent's connection expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(listening.await.unwrap());
}

/// The customer of session `s`.
async fn customer_of(node: &Node, s: SessionId) -> livechat_core::CustomerId {
    node.chat
        .get_session(t(1), s)
        .await
        .unwrap()
        .session
        .customer_id
        .unwrap()
}

async fn shutdown_closes_with_1001(backend: Backend) {
    let (app, node) = node(backend, |_| {}).await;
    // Agent 7, the tenant's only agent, takes one chat; the next waits.
    node.chat.set_agent_capacity(t(1), 1).await.unwrap();
    start_chat(&node, 3200).await;
    let waiting = start_chat_as(&node, 3201).await;
    assert_eq!(waiting.session.status, SessionStatus::Waiting);
    assert!(waiting.session.ticket_id.is_none());
    let mut a = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    a.expect("ready").await;
    let rows = || livechat_tests::count_rows(&app.db, "livechat_connections");
    assert_eq!(rows().await, 1);
    node.livechat.shutdown();
    assert_eq!(a.close_code(Duration::from_secs(5)).await, Some(1001));
    drop(a);
    // Once `closed` resolves the socket has removed its row, so a host
    // may close the database then; and the agent's presence check has run
    // after the grace (it died with the process): nobody is online, so
    // the chat left waiting has its ticket.
    tokio::time::timeout(Duration::from_secs(10), node.livechat.closed())
        .await
        .expect("the sockets end");
    assert_eq!(rows().await, 0, "the connection's row is gone");
    let after = node
        .chat
        .get_session(t(1), waiting.session.id)
        .await
        .unwrap();
    assert!(after.session.ticket_id.is_some(), "{after:?}");
}

/// A node shutting down answers the sends its connections already
/// submitted before it closes them with 1001: the message is stored
/// whatever happens, and a client told so need not resend it (it used to
/// get the 1001 alone, its send being committed meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_answers_the_sends_in_flight_before_its_1001() {
    use livechat_tests::node::Incoming;
    let (app, node) = node(Backend::Postgres, |_| {}).await;
    let (session, _) = open_chat(&node, 3300).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    join(&mut agent, session, None).await;
    // The session's row is held: the send waits for it.
    let holder = livechat_tests::hold_session_row(&app.db, session).await;
    agent
        .send(json!({"type": "send_message", "session_id": session, "client_msg_id": "s-1", "message": "in flight"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.livechat.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.commit().await.unwrap();
    let mut acked = false;
    loop {
        match agent.next_incoming(Duration::from_secs(10)).await {
            Incoming::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "ack" && frame["client_msg_id"] == "s-1" {
                    acked = true;
                }
            }
            Incoming::Closed(code) => {
                assert_eq!(code, Some(1001));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(acked, "the send was answered before the close");
}

mod cors {
    use super::*;

    on_both_databases!(origins_are_checked_for_http_and_websocket);

    async fn origins_are_checked_for_http_and_websocket(backend: Backend) {
        let app = App::new(backend).await;
        let mut config = app.config.clone();
        config.cors_origins = vec!["https://shop.example".into()];
        config.cors_credentials = true;
        let node = Node::start(app.db.clone(), &config, Arc::new(InProcessBus::new())).await;

        // WebSocket: a listed origin may connect, another may not; clients
        // without an Origin header (non-browser) may.
        let connect = |origin: &'static str| {
            let url = node.ws_url();
            async move {
                use tokio_tungstenite::tungstenite::client::IntoClientRequest;
                let mut req = url.into_client_request().unwrap();
                req.headers_mut().insert("Origin", origin.parse().unwrap());
                req.headers_mut()
                    .insert("Authorization", agent_auth(7).parse().unwrap());
                req.headers_mut()
                    .insert("X-Tenant-ID", "1".parse().unwrap());
                tokio_tungstenite::connect_async(req).await.map(|_| ())
            }
        };
        assert!(connect("https://shop.example").await.is_ok());
        assert!(connect("HTTPS://Shop.Example").await.is_ok(), "any case");
        assert!(
            connect("https://shop.example:443").await.is_ok(),
            "the default port"
        );
        assert!(connect("https://evil.example").await.is_err());
        assert!(
            WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
                .await
                .is_ok()
        );

        // HTTP: CORS answers the listed origin only, with credentials.
        let preflight = |origin: &'static str| {
            reqwest::Client::new()
                .request(reqwest::Method::OPTIONS, node.url("/livechat/sessions"))
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "GET")
                .header(
                    "Access-Control-Request-Headers",
                    "authorization,x-tenant-id",
                )
                .send()
        };
        let ok = preflight("https://shop.example").await.unwrap();
        assert_eq!(
            ok.headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok()),
            Some("https://shop.example")
        );
        // A preflight's answer depends on the origin and on what it asked.
        assert_eq!(
            ok.headers().get("vary").and_then(|v| v.to_str().ok()),
            Some("Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        );
        assert_eq!(
            ok.headers()
                .get("access-control-allow-credentials")
                .and_then(|v| v.to_str().ok()),
            Some("true")
        );
        // The answer depends on the origin: caches must keep it apart.
        let simple = reqwest::Client::new()
            .get(node.url("/livechat/customer/availability"))
            .header("Origin", "https://SHOP.example:443")
            .header("X-Tenant-ID", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(simple.status(), 200, "any case, the default port");
        assert_eq!(
            simple.headers().get("vary").and_then(|v| v.to_str().ok()),
            Some("Origin")
        );
        // Page script may read a 429's `Retry-After`.
        assert_eq!(
            simple
                .headers()
                .get("access-control-expose-headers")
                .and_then(|v| v.to_str().ok())
                .map(str::to_ascii_lowercase),
            Some("retry-after".to_owned())
        );
        // So does one without `Origin`, which gets no CORS headers.
        let plain = reqwest::Client::new()
            .get(node.url("/livechat/customer/availability"))
            .header("X-Tenant-ID", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(plain.status(), 200);
        assert!(plain.headers().get("access-control-allow-origin").is_none());
        assert_eq!(
            plain.headers().get("vary").and_then(|v| v.to_str().ok()),
            Some("Origin")
        );
        let denied = preflight("https://evil.example").await.unwrap();
        assert!(
            denied
                .headers()
                .get("access-control-allow-origin")
                .is_none()
        );
        // The refusal is in the JSON envelope, like every 4xx.
        assert_eq!(denied.status(), 403);
        let body: serde_json::Value = serde_json::from_str(&denied.text().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
}

/// A connection whose registration cannot be renewed (the database is
/// slow or down; here its row is held) keeps serving its client: the
/// renewal runs beside the connection's loop, which goes on reading and
/// answering. (It used to wait for the renewal, leaving the client's
/// pings unanswered and its pongs unread, and then closed it for a
/// silence that was the server's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_keeps_serving_while_its_renewal_waits() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let (app, node) = node(Backend::Postgres, |_| {}).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(7), 1)
        .await
        .unwrap();
    let ready = agent.expect("ready").await;
    let id = ready["connection_id"].as_str().unwrap().to_owned();
    let holder = app.db.begin().await.unwrap();
    holder
        .execute_unprepared(&format!(
            "SELECT id FROM livechat_connections WHERE id = '{id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    // Pings every 200 ms: a renewal is now waiting for the row.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..3 {
        agent.send(json!({"type": "no_such_frame"})).await;
        let answer = agent.next(Duration::from_secs(2)).await;
        assert_eq!(
            answer.as_ref().map(|f| &f["code"]),
            Some(&json!("unknown_type")),
            "answered while the renewal waits: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    holder.commit().await.unwrap();
}

/// A connection's renewal of its registration takes a pooled connection
/// (on SQLite the node's only one). It ran as a future of the
/// connection's loop, polled only between the loop's steps: while the loop
/// relayed a burst of lifecycle events, each waiting up to 1 s for its
/// read of the session, a renewal that had started held that connection
/// unpolled, every read timed out, and every other request of the node
/// waited for the connection until its own limit (5 s: 503). Here agent
/// 7's twelve chats are handed back and taken again, five times, while
/// agent 8's socket renews every 20 ms; the node's reads in the meantime
/// must all be answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_beside_a_burst_of_relayed_events_holds_up_no_request() {
    let (_app, node) = node(Backend::Sqlite, |r| {
        r.ping_interval = Duration::from_millis(20);
    })
    .await;
    node.chat.set_agent_capacity(t(1), 20).await.unwrap();
    start_chat(&node, 3100).await;
    for user in 3101..3112 {
        start_chat_as(&node, user).await;
    }
    let mut watcher = watcher(&node).await;
    // Read all along, so that its pongs keep it heard and renewed.
    let reading = tokio::spawn(async move {
        let mut frames = 0_usize;
        while watcher.next(Duration::from_secs(30)).await.is_some() {
            frames += 1;
        }
        frames
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for status in [PresenceStatus::Offline, PresenceStatus::Online].repeat(5) {
        node.chat
            .set_agent_status(t(1), u(7), status)
            .await
            .unwrap();
        for _ in 0..5 {
            let read =
                tokio::time::timeout(Duration::from_secs(30), node.chat.availability(t(1), None))
                    .await
                    .expect("answered");
            assert!(read.is_ok(), "after {status:?}: {read:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    reading.abort();
}

/// Issue #5: a connection's sends are submitted without waiting for the
/// previous commit. Sent back to back, they are stored in the order sent
/// (gap-free seq), answered in that order (a repeat and a refusal in the
/// middle included), and delivered to the other side in seq order.
async fn pipelined_sends_keep_their_order(backend: Backend) {
    let (_app, node) = node(backend, |c| c.send_rate_per_sec = 10_000).await;
    let (session, customer_auth) = open_chat(&node, 903).await;
    let (mut agent, mut customer) = join_both(&node, session, &customer_auth).await;

    let mut expected = Vec::new();
    for i in 0..40 {
        customer
            .send(json!({"type": "send_message", "session_id": session, "client_msg_id": format!("p{i}"), "message": format!("m{i}")}))
            .await;
        expected.push((format!("p{i}"), Some(i + 1), false));
        if i == 5 {
            customer
                .send(json!({"type": "send_message", "session_id": session, "client_msg_id": "p3", "message": "again"}))
                .await;
            expected.push(("p3".into(), Some(4), true));
            customer
                .send(json!({"type": "send_message", "session_id": uuid::Uuid::now_v7(), "client_msg_id": "lost", "message": "x"}))
                .await;
            expected.push(("lost".into(), None, false));
        }
    }
    let mut answers = Vec::new();
    while answers.len() < expected.len() {
        let f = customer
            .next(Duration::from_secs(10))
            .await
            .expect("every send is answered");
        match f["type"].as_str() {
            Some("ack") => answers.push((
                f["client_msg_id"].as_str().unwrap().to_owned(),
                f["seq"].as_i64(),
                f["duplicate"].as_bool().unwrap(),
            )),
            Some("error") => {
                assert_eq!(f["code"], "not_found", "{f}");
                answers.push((
                    f["ref"].as_str().unwrap_or_default().to_owned(),
                    None,
                    false,
                ));
            }
            _ => {}
        }
    }
    assert_eq!(answers, expected, "answers in submission order");

    let mut delivered = Vec::new();
    while delivered.len() < 40 {
        let f = agent.expect("new_message").await;
        delivered.push((
            f["seq"].as_i64().unwrap(),
            f["message"].as_str().unwrap().to_owned(),
        ));
    }
    let want: Vec<(i64, String)> = (0..40).map(|i| (i + 1, format!("m{i}"))).collect();
    assert_eq!(delivered, want, "delivered in seq order, each once");
}

/// Issue #5: a connection handles a burst of bus events in one go. The
/// outbound queue counts frames its socket has not taken, so a burst larger
/// than the queue reaches a client that reads instead of closing it as a
/// slow consumer (1013).
async fn a_burst_larger_than_the_queue_reaches_a_reading_client(backend: Backend) {
    let _ = forty_sent_together_reach_a_joined_agent(backend, 911, |r| r.outbound_queue = 4).await;
}

/// Agent 8 joins the chat of customer `user` on a node tuned by `adjust`;
/// 40 messages submitted together (committed together: their events are
/// published back to back) must all reach it, once each, in `seq` order.
async fn forty_sent_together_reach_a_joined_agent(
    backend: Backend,
    user: i64,
    adjust: impl FnOnce(&mut livechat_poem::RealtimeConfig),
) -> ((App, Node), WsClient) {
    let (app, node) = node(backend, adjust).await;
    let (session, _) = open_chat(&node, user).await;
    let mut agent = WsClient::connect_with_header(&node.ws_url(), &agent_auth(8), 1)
        .await
        .unwrap();
    join(&mut agent, session, None).await;
    let pending: Vec<_> = (0..40)
        .map(|n| {
            node.chat
                .submit_message(t(1), u(7), session, format!("burst {n}"), None)
        })
        .collect();
    for append in pending {
        append.await.unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 40 {
        let Some(frame) = agent.next(Duration::from_secs(5)).await else {
            panic!("only {} of 40 messages arrived", seqs.len());
        };
        if frame["type"] == "new_message" {
            seqs.push(frame["seq"].as_i64().unwrap());
        }
    }
    assert_eq!(seqs, (1..=40).collect::<Vec<i64>>());
    ((app, node), agent)
}

/// README "Linking": the visitor token keeps working as the identified
/// customer, on a WebSocket opened before the link too. Its sends were
/// refused with `not_found` (the chat had moved to the identified
/// customer), and so was a join; a socket not joined to the chat has its
/// first send refused, and its retry goes through.
async fn a_visitor_socket_goes_on_as_the_linked_customer(backend: Backend) {
    let (_app, node) = node(backend, |_| {}).await;
    node.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let started = node.start_visitor_chat("x").await;
    let (token, session) = livechat_tests::visitor_chat(&started);
    let visitor = format!("Visitor {token}");
    // One socket joined to the chat, one not yet.
    let mut joined = WsClient::connect_with_header(&node.ws_url(), &visitor, 1)
        .await
        .unwrap();
    joined
        .send(json!({"type": "join_session", "session_id": session}))
        .await;
    joined.expect("joined").await;
    let mut other = WsClient::connect_with_header(&node.ws_url(), &visitor, 1)
        .await
        .unwrap();

    // The host links the visitor to its logged-in user.
    let resp = http
        .post(node.url("/livechat/customer/link"))
        .header("X-Tenant-ID", "1")
        .header(
            "Authorization",
            format!("Bearer {}", App::token(950, &["USER"], Some(&[1]))),
        )
        .header("Content-Type", "application/json")
        .body(json!({"visitor_token": token}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let linked: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let customer = linked["data"]["customer_id"].as_str().unwrap().to_owned();

    // The joined socket learns the chat's new customer, and goes on as it.
    let updated = joined.expect("session_updated").await;
    assert_eq!(updated["session"]["customer_id"], customer.as_str());
    joined
        .send(json!({"type": "send_message", "session_id": session, "client_msg_id": "after-link", "message": "still here"}))
        .await;
    let ack = joined.expect("ack").await;
    assert_eq!(ack["client_msg_id"], "after-link", "{ack}");
    let posted = joined.expect("new_message").await;
    assert_eq!(posted["customer_id"], customer.as_str(), "{posted}");
    // The other socket, not joined, still sends as the visitor: refused,
    // the chat is the identified customer's now; its retry is theirs.
    let send = json!({"type": "send_message", "session_id": session, "client_msg_id": "unjoined", "message": "me again"});
    other.send(send.clone()).await;
    let refused = other.expect("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("not_found"), Some("unjoined")),
        "{refused}"
    );
    other.send(send).await;
    let ack = other.expect("ack").await;
    assert_eq!(ack["client_msg_id"], "unjoined", "{ack}");
    // And it can join the chat.
    other
        .send(json!({"type": "join_session", "session_id": session}))
        .await;
    let answer = loop {
        let frame = other.next(livechat_tests::node::FRAME_WAIT).await.unwrap();
        if frame["type"] != "ready" {
            break frame;
        }
    };
    assert_eq!(answer["type"], "joined", "{answer}");
}

/// One agent or customer holds at most `max_connections_per_user` sockets
/// in a tenant on a node: one more is refused (429 `too_many_connections`
/// with `Retry-After` at a header upgrade; an `error` frame with
/// `retry_after_ms` and 1008 after an `auth` frame), other users and
/// tenants are counted apart, and a socket that ends frees its place.
async fn a_user_holds_at_most_the_connection_cap(backend: Backend) {
    let (_app, node) = node(backend, |c| {
        c.max_connections_per_user = 2;
        c.connection_ttl = Duration::from_secs(3);
        c.ping_interval = Duration::from_millis(500);
    })
    .await;
    let url = node.ws_url();
    let first = WsClient::connect_with_frame(&url, &App::agent(7), 1).await;
    let mut second = WsClient::connect_with_header(&url, &agent_auth(7), 1)
        .await
        .unwrap();
    second.expect("ready").await;
    // Whether a socket with `auth` (an agent's or a customer's
    // `Authorization`) is refused at the upgrade.
    let refused_upgrade =
        async |auth: &str| match WsClient::connect_with_header(&url, auth, 1).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429);
                // The connection TTL plus the ping interval, in whole seconds.
                assert_eq!(response.headers()["retry-after"], "4");
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
                true
            }
            Err(other) => panic!("{other}"),
            Ok(_) => false,
        };
    assert!(
        refused_upgrade(&agent_auth(7)).await,
        "a third socket upgraded"
    );
    let mut third = WsClient::connect_bare(&url).await;
    third
        .send(json!({"type": "auth", "token": App::agent(7), "tenant_id": 1}))
        .await;
    let refusal = third.expect("error").await;
    assert_eq!(refusal["code"], "too_many_connections", "{refusal}");
    assert_eq!(refusal["retry_after_ms"], 3_500, "{refusal}");
    assert_eq!(third.close_code(Duration::from_secs(5)).await, Some(1008));
    // Others are not held back by agent 7's count.
    let _colleague = WsClient::connect_with_frame(&url, &App::agent(8), 1).await;
    let _elsewhere = WsClient::connect_with_frame(&url, &App::agent(7), 2).await;
    let (_, customer) = open_chat(&node, 943).await;
    let mut customers = Vec::new();
    for _ in 0..2 {
        let mut c = WsClient::connect_with_header(&url, &customer, 1)
            .await
            .unwrap();
        c.expect("ready").await;
        customers.push(c);
    }
    assert!(
        refused_upgrade(&customer).await,
        "a customer's third socket upgraded"
    );
    // A socket that ends gives its place back once the node has seen it:
    // one authenticated by its first frame, then one by its headers.
    let freed = async |auth: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while refused_upgrade(auth).await {
            assert!(
                std::time::Instant::now() < deadline,
                "the place stayed taken"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    first.drop_now();
    freed(&agent_auth(7)).await;
    customers.pop().unwrap().drop_now();
    freed(&customer).await;
}
