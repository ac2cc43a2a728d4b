//! Resume under random drops (proptest): an agent posts messages in
//! bursts while a customer's WebSocket reads, drops and reconnects at
//! random points, joining again from the last `seq` it holds (or from
//! earlier, as a client that lost some of its copy). Within each join the
//! client receives `seq` after+1, after+2, … with no gap and no repeat,
//! live messages following the catch-up without a seam, and in the end
//! it holds every message (DESIGN.md invariant 4: a client resumes with
//! `after_seq` and never misses or duplicates a message).

use std::time::Duration;

use livechat_core::SessionId;
use livechat_tests::node::{Node, WsClient};
use livechat_tests::{App, Backend, check_property, t, test_runtime, u};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

#[derive(Clone, Debug)]
enum Action {
    /// The agent posts this many messages, beside what the client does.
    Send(u8),
    /// The client reads what arrives within this many milliseconds.
    Read(u8),
    /// The connection drops without a close handshake.
    Drop,
    /// The client connects (if dropped) and joins from the last `seq` it
    /// holds minus `back`.
    Rejoin { back: u8 },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (1u8..20).prop_map(Action::Send),
        3 => (0u8..40).prop_map(Action::Read),
        1 => Just(Action::Drop),
        2 => prop_oneof![3 => Just(0u8), 1 => 1u8..5].prop_map(|back| Action::Rejoin { back }),
    ]
}

/// The customer's side: its connection, and the `seq`s it holds.
struct Client {
    url: String,
    auth: String,
    session: SessionId,
    conn: Option<WsClient>,
    /// The `seq` the next `new_message` of the current join must have.
    next: i64,
    /// The highest `seq` held (every one up to it, in order).
    held: i64,
}

impl Client {
    /// Connects if dropped and joins from `held - back`.
    async fn rejoin(&mut self, back: u8) -> Result<(), TestCaseError> {
        if let Some(conn) = self.conn.take() {
            conn.drop_now();
        }
        let mut conn = WsClient::connect_with_header(&self.url, &self.auth, 1)
            .await
            .map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
        conn.expect("ready").await;
        let after = (self.held - i64::from(back)).max(0);
        conn.send(json!({"type": "join_session", "session_id": self.session, "after_seq": after}))
            .await;
        // Nothing of the session comes before `joined`.
        loop {
            let frame = conn
                .next(Duration::from_secs(10))
                .await
                .ok_or_else(|| TestCaseError::fail("no joined"))?;
            prop_assert_ne!(&frame["type"], "new_message", "before joined: {}", frame);
            if frame["type"] == "joined" {
                break;
            }
        }
        self.next = after + 1;
        self.conn = Some(conn);
        Ok(())
    }

    /// Takes one frame: a `new_message` must be the next `seq`.
    fn take(&mut self, frame: &Value) -> Result<(), TestCaseError> {
        if frame["type"] != "new_message" {
            return Ok(());
        }
        let seq = frame["seq"].as_i64().unwrap_or(-1);
        prop_assert_eq!(
            seq,
            self.next,
            "a gap or a repeat within one join (held {})",
            self.held
        );
        self.next += 1;
        self.held = self.held.max(seq);
        Ok(())
    }

    /// Reads what arrives within `wait`.
    async fn read(&mut self, wait: Duration) -> Result<(), TestCaseError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut frames = Vec::new();
        while let Some(left) = deadline.checked_duration_since(tokio::time::Instant::now()) {
            match conn.next(left).await {
                Some(frame) => frames.push(frame),
                None => break,
            }
        }
        for frame in &frames {
            self.take(frame)?;
        }
        Ok(())
    }
}

async fn run_case(
    node: &Node,
    session: SessionId,
    auth: &str,
    actions: Vec<Action>,
) -> Result<(), TestCaseError> {
    let start = node
        .chat
        .get_session(t(1), session)
        .await
        .map_err(|e| TestCaseError::fail(format!("{e:?}")))?
        .session
        .last_seq;
    let mut client = Client {
        url: node.ws_url(),
        auth: auth.to_owned(),
        session,
        conn: None,
        next: 0,
        held: start,
    };
    client.rejoin(0).await?;
    let mut sent = 0;
    let mut senders = Vec::new();
    for action in actions {
        match action {
            Action::Send(n) => {
                sent += i64::from(n);
                let chat = node.chat.clone();
                senders.push(tokio::spawn(async move {
                    for i in 0..n {
                        chat.post_message(t(1), u(7), session, format!("burst {i}"), None)
                            .await
                            .expect("agent message stored");
                    }
                }));
            }
            Action::Read(ms) => client.read(Duration::from_millis(u64::from(ms))).await?,
            Action::Drop => {
                if let Some(conn) = client.conn.take() {
                    conn.drop_now();
                }
            }
            Action::Rejoin { back } => client.rejoin(back).await?,
        }
    }
    for sender in senders {
        sender
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    if client.conn.is_none() {
        client.rejoin(0).await?;
    }
    // Every message reaches the client, live or on the next join.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while client.held < start + sent && tokio::time::Instant::now() < deadline {
        client.read(Duration::from_millis(200)).await?;
    }
    prop_assert_eq!(client.held, start + sent, "messages missing at the end");
    if let Some(conn) = client.conn.take() {
        conn.drop_now();
    }
    Ok(())
}

livechat_tests::property_on_both_databases!(
    a_client_resuming_at_random_points_gets_every_message_once => resume(24, 16),
);

fn resume(backend: Backend, cases: u32) {
    let runtime = test_runtime(2);
    let (_app, node, session) = runtime.block_on(Node::with_served_chat(backend, "Resume"));
    check_property(
        cases,
        proptest::collection::vec(action(), 1..24),
        |actions| {
            // A token of each case's own (they expire after ten minutes).
            let auth = format!("Bearer {}", App::token(900, &["USER"], Some(&[1])));
            runtime.block_on(run_case(&node, session, &auth, actions))
        },
    );
}
