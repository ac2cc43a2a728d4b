//! Two example-server nodes sharing PostgreSQL and a real redis-server
//! (issue #4, DESIGN.md "Scale").

use std::sync::Arc;
use std::time::Duration;

use livechat_core::bus::EventBus;
use livechat_core::redis_bus::{DEFAULT_CHANNEL, RedisBus};
use livechat_core::{CustomerChatRequest, CustomerIdentity, PresenceStatus, SessionId};
use livechat_tests::node::{Node, WsClient};
use livechat_tests::redis_server::RedisServer;
use livechat_tests::{App, Backend, TestDb};
use serde_json::{Value, json};

use livechat_tests::{t, u};

async fn node(db: &TestDb, redis: &RedisServer) -> (Node, Arc<RedisBus>) {
    let conn = db.connect_migrated().await;
    let mut config = livechat_example_server::Config::new(&db.url, livechat_tests::SECRET);
    config.ping_interval = Duration::from_millis(200);
    config.rate_limits = livechat_poem::RateLimits::unlimited();
    config.chat_tenants = livechat_example_server::ChatTenants::Any;
    let bus = Arc::new(
        RedisBus::connect(&redis.url, DEFAULT_CHANNEL)
            .await
            .expect("redis"),
    );
    let node = Node::start(conn, &config, bus.clone()).await;
    (node, bus)
}

async fn post_http(node: &Node, session: SessionId, text: &str) -> Value {
    let resp = reqwest::Client::new()
        .post(node.url(&format!("/livechat/sessions/{session}/messages")))
        .header("Authorization", format!("Bearer {}", App::agent(7)))
        .header("X-Tenant-ID", "1")
        .header("Content-Type", "application/json")
        .body(json!({"message": text}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

async fn health(node: &Node) -> Value {
    let resp = reqwest::get(node.url("/health")).await.unwrap();
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

/// Reads `new_message` frames until `want` seqs arrived; panics on a gap,
/// a duplicate or a stall.
async fn collect(client: &mut WsClient, seen: &mut Vec<i64>, want: usize) {
    while seen.len() < want {
        let Some(f) = client.next(livechat_tests::node::FRAME_WAIT).await else {
            panic!("stalled at {:?}", seen.last());
        };
        if f["type"] == "new_message" {
            let seq = f["seq"].as_i64().unwrap();
            assert_eq!(
                seq,
                seen.last().map_or(1, |s| s + 1),
                "gap or duplicate after {:?}",
                seen.last()
            );
            seen.push(seq);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_postgres_and_redis() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut redis = RedisServer::start();
    let (a, bus_a) = node(&db, &redis).await;
    let (b, bus_b) = node(&db, &redis).await;
    assert_ne!(bus_a.node_id(), bus_b.node_id());

    a.chat
        .set_agent_status(t(1), u(7), PresenceStatus::Online)
        .await
        .unwrap();
    let customer = a
        .chat
        .resolve_customer(t(1), CustomerIdentity::User(u(950)))
        .await
        .unwrap();
    let session = a
        .chat
        .start_customer_chat(
            t(1),
            customer.id,
            CustomerChatRequest {
                topic: "nodes".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .view
        .session
        .id;
    let customer_auth = format!("Bearer {}", App::token(950, &["USER"], Some(&[1])));

    // A message posted on node A reaches a client on node B.
    let mut on_b = WsClient::connect_with_header(&b.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    on_b.send(json!({"type": "join_session", "session_id": session}))
        .await;
    on_b.expect("joined").await;
    post_http(&a, session, "from A").await;
    let mut seen = Vec::new();
    collect(&mut on_b, &mut seen, 1).await;

    // Connection status is the same from either node.
    let mut agent_on_a =
        WsClient::connect_with_header(&a.ws_url(), &format!("Bearer {}", App::agent(7)), 1)
            .await
            .unwrap();
    agent_on_a
        .send(json!({"type": "join_session", "session_id": session}))
        .await;
    agent_on_a.expect("joined").await;
    for n in [&a, &b] {
        let resp = reqwest::Client::new()
            .get(n.url(&format!("/livechat/sessions/{session}/connections")))
            .header("Authorization", format!("Bearer {}", App::agent(7)))
            .header("X-Tenant-ID", "1")
            .send()
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(
            body["data"],
            json!({"customer_connected": true, "agent_connected": true, "total_customer": 1, "total_agent": 1})
        );
    }

    // A client of node A drops and resumes on node B from its seq.
    let mut on_a = WsClient::connect_with_header(&a.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    on_a.send(json!({"type": "join_session", "session_id": session, "after_seq": 1}))
        .await;
    on_a.expect("joined").await;
    for n in 2..=5 {
        post_http(&b, session, &format!("m{n}")).await;
    }
    let mut seen_a = vec![1];
    collect(&mut on_a, &mut seen_a, 3).await;
    on_a.drop_now();
    for n in 6..=8 {
        post_http(&a, session, &format!("m{n}")).await;
    }
    let mut resumed = WsClient::connect_with_header(&b.ws_url(), &customer_auth, 1)
        .await
        .unwrap();
    resumed
        .send(json!({"type": "join_session", "session_id": session, "after_seq": 3}))
        .await;
    resumed.expect("joined").await;
    collect(&mut resumed, &mut seen_a, 8).await;
    collect(&mut on_b, &mut seen, 8).await;

    // Redis stops mid-run: both nodes keep serving their own clients and
    // report degraded health; messages posted on A meanwhile reach B's
    // client once Redis is back (resync by seq). Nothing is lost.
    redis.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !(bus_a.is_degraded() && bus_b.is_degraded()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the buses never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(&a).await["bus"], "degraded");
    for n in 9..=12 {
        post_http(&a, session, &format!("during outage {n}")).await;
    }
    // Node A's own client still gets them live.
    let mut seen_agent = vec![1];
    collect(&mut agent_on_a, &mut seen_agent, 12).await;
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bus_a.is_degraded() || bus_b.is_degraded() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the buses never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    collect(&mut on_b, &mut seen, 12).await;
    collect(&mut resumed, &mut seen_a, 12).await;
    assert_eq!(health(&b).await["bus"], "ok");
    // And live fan-out works again.
    post_http(&a, session, "after").await;
    collect(&mut on_b, &mut seen, 13).await;
    assert_eq!(seen, (1..=13).collect::<Vec<_>>());
}
