//! The two concurrency rules of issue #2 and the outbox (invariants 2, 4, 5).

use std::collections::{HashMap, HashSet};

use livechat_core::{
    ChatError, EventKind, OutboxRepository, PageSize, PresenceStatus, SessionFilter, SessionStatus,
    TenantId, UserId,
};
use livechat_tests::{App, Backend, on_both_databases};

on_both_databases!(
    twenty_concurrent_starts_yield_one_session,
    fifty_concurrent_sends_get_seq_1_to_50,
    concurrent_retries_of_one_key_store_one_message,
    every_change_writes_one_outbox_event,
    concurrent_sends_across_sessions_keep_each_sessions_order,
);

fn ids(tenant: i64, agent: i64) -> (TenantId, UserId) {
    (TenantId::new(tenant).unwrap(), UserId::new(agent).unwrap())
}

/// A second node over `app`'s database: a store of its own (its own
/// append queue and committer).
fn second_node(app: &App) -> livechat_core::ChatService {
    livechat_core::ChatService::new(
        livechat_core::store::SeaOrmStore::new(app.db.clone()),
        livechat_core::ChatConfig::default(),
    )
}

/// The messages stored in `session` (up to 200), in `seq` order.
async fn stored(
    app: &App,
    tenant: TenantId,
    session: livechat_core::SessionId,
) -> Vec<livechat_core::ChatMessage> {
    app.chat
        .list_messages(tenant, session, None, Some(200))
        .await
        .unwrap()
}

async fn twenty_concurrent_starts_yield_one_session(backend: Backend) {
    let app = App::new(backend).await;
    let (tenant, agent) = ids(1, 7);
    app.chat
        .set_agent_status(tenant, agent, PresenceStatus::Online)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let chat = app.chat.clone();
            tokio::spawn(async move { chat.start_session(tenant, agent, None).await })
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    let mut winners = Vec::new();
    for r in results {
        match r.unwrap() {
            Ok(session) => winners.push(session),
            Err(ChatError::ActiveSessionExists(_)) => {}
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one start wins");
    let open = app.sessions_with_status(tenant, SessionStatus::Open).await;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].session.id, winners[0].id);
    let all = app
        .chat
        .list_sessions(tenant, SessionFilter::default(), None, Some(200))
        .await
        .unwrap()
        .sessions;
    assert_eq!(all.len(), 1, "losers left no rows");
}

async fn fifty_concurrent_sends_get_seq_1_to_50(backend: Backend) {
    let app = App::new(backend).await;
    let (tenant, agent) = ids(1, 7);
    let session = app.open_service_session(tenant, agent).await;
    let tasks: Vec<_> = (0..50)
        .map(|n| {
            let chat = app.chat.clone();
            tokio::spawn(async move {
                chat.post_message(tenant, agent, session.id, format!("message {n}"), None)
                    .await
            })
        })
        .collect();
    let mut seqs: Vec<i64> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap().message.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "no gap, no duplicate");
    let stored = stored(&app, tenant, session.id).await;
    let stored_seqs: Vec<i64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(
        stored_seqs,
        (1..=50).collect::<Vec<_>>(),
        "read back ascending"
    );
    let texts: HashSet<&str> = stored.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts.len(), 50, "every message stored once");
}

async fn concurrent_retries_of_one_key_store_one_message(backend: Backend) {
    let app = App::new(backend).await;
    let (tenant, agent) = ids(1, 7);
    let session = app.open_service_session(tenant, agent).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let chat = app.chat.clone();
            tokio::spawn(async move {
                chat.post_message(
                    tenant,
                    agent,
                    session.id,
                    "retry".into(),
                    Some("k-1".into()),
                )
                .await
            })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    assert!(
        results
            .iter()
            .all(|r| r.message.id == results[0].message.id && r.message.seq == 1)
    );
    let stored = stored(&app, tenant, session.id).await;
    assert_eq!(stored.len(), 1);
}

async fn every_change_writes_one_outbox_event(backend: Backend) {
    let app = App::new(backend).await;
    let (tenant, agent) = ids(1, 7);
    let session = app.open_service_session(tenant, agent).await;
    let m = app
        .chat
        .post_message(tenant, agent, session.id, "hi".into(), Some("k".into()))
        .await
        .unwrap();
    // Refused or repeated requests write nothing.
    app.chat
        .post_message(tenant, agent, session.id, "hi".into(), Some("k".into()))
        .await
        .unwrap();
    assert!(
        app.chat
            .post_message(tenant, agent, session.id, " ".into(), None)
            .await
            .is_err()
    );
    assert!(app.chat.start_session(tenant, agent, None).await.is_err());
    app.chat
        .close_session(tenant, agent, session.id)
        .await
        .unwrap();
    app.chat
        .close_session(tenant, agent, session.id)
        .await
        .unwrap();
    assert!(
        app.chat
            .post_message(tenant, agent, session.id, "late".into(), None)
            .await
            .is_err()
    );

    let events = livechat_tests::events_of(&app.chat, tenant).await;
    let page = PageSize::parse(Some(200), app.chat.config()).unwrap();
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::AgentStatusChanged,
            EventKind::SessionStarted,
            EventKind::MessagePosted,
            EventKind::SessionClosed,
        ]
    );
    assert_eq!(events[1].session_id, Some(session.id));
    assert_eq!(events[2].payload.value()["seq"], 1);
    assert_eq!(events[2].payload.value()["id"], m.message.id.to_string());
    assert_eq!(events[3].payload.value()["status"], "CLOSED");
    assert_eq!(events[3].payload.value()["closed_by"]["type"], "agent");
    assert_eq!(events[3].payload.value()["closed_by"]["agent_id"], 7);
    // Paging after an event id, and other tenants see none of them.
    let rest = app
        .chat
        .store()
        .list_events(tenant, Some(events[1].id), page)
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    let other = app
        .chat
        .store()
        .list_events(TenantId::new(2).unwrap(), None, page)
        .await
        .unwrap();
    assert!(other.is_empty());
}

/// Group commit (issue #5): many concurrent appends over several sessions,
/// with duplicate keys racing each other and a closed session in the mix,
/// are committed together without mixing up outcomes: every session gets
/// a gap-free `seq`, every key one message, the closed session's sends are
/// refused, and the outbox holds one `message.posted` per stored message in
/// each session's `seq` order.
async fn concurrent_sends_across_sessions_keep_each_sessions_order(backend: Backend) {
    let app = App::new(backend).await;
    let tenant = TenantId::new(1).unwrap();
    let mut sessions = Vec::new();
    for agent in 7..=11 {
        let agent = UserId::new(agent).unwrap();
        let session = app.open_service_session(tenant, agent).await;
        sessions.push((agent, session.id));
    }
    let (closed_agent, closed) = sessions.pop().unwrap();
    app.chat
        .close_session(tenant, closed_agent, closed)
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for n in 0..25 {
        for (agent, session) in &sessions {
            // Each key is sent twice at once; only one may be stored.
            for _ in 0..2 {
                let (chat, agent, session) = (app.chat.clone(), *agent, *session);
                tasks.push(tokio::spawn(async move {
                    let key = format!("{session}-{n}");
                    let sent = chat
                        .post_message(tenant, agent, session, format!("m{n}"), Some(key.clone()))
                        .await;
                    (session, key, sent)
                }));
            }
        }
        let chat = app.chat.clone();
        tasks.push(tokio::spawn(async move {
            let sent = chat
                .post_message(tenant, closed_agent, closed, "late".into(), None)
                .await;
            (closed, String::new(), sent)
        }));
    }
    let mut by_key: HashMap<String, Vec<livechat_core::AppendedMessage>> = HashMap::new();
    for task in futures::future::join_all(tasks).await {
        let (session, key, sent) = task.unwrap();
        if session == closed {
            assert!(matches!(sent, Err(ChatError::SessionClosed)), "{sent:?}");
        } else {
            by_key.entry(key).or_default().push(sent.unwrap());
        }
    }
    assert_eq!(by_key.len(), 100);
    for (key, answers) in &by_key {
        assert_eq!(answers.len(), 2);
        assert_eq!(
            answers.iter().filter(|a| a.created).count(),
            1,
            "one of the two sends of {key} stored it"
        );
        assert_eq!(answers[0].message.id, answers[1].message.id, "{key}");
    }
    for (_, session) in &sessions {
        let stored = stored(&app, tenant, *session).await;
        let seqs: Vec<i64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>(), "gap-free per session");
    }
    let page = PageSize::parse(Some(200), app.chat.config()).unwrap();
    let mut posted: HashMap<String, Vec<i64>> = HashMap::new();
    let mut after = None;
    loop {
        let events = app
            .chat
            .store()
            .list_events(tenant, after, page)
            .await
            .unwrap();
        let Some(last) = events.last() else { break };
        after = Some(last.id);
        for e in events.iter().filter(|e| e.kind == EventKind::MessagePosted) {
            posted
                .entry(e.payload.value()["session_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(e.payload.value()["seq"].as_i64().unwrap());
        }
    }
    assert_eq!(posted.len(), 4, "no event for the closed session");
    for seqs in posted.values() {
        assert_eq!(
            seqs,
            &(1..=25).collect::<Vec<_>>(),
            "one event per message, in seq order"
        );
    }
}

/// Issue #5: on SQLite, commits checkpoint only past a 40 MiB WAL; the
/// pool's checkpointer copies the WAL back into the database file beside
/// the writer. About 1.3 MB of messages is below that threshold (and below
/// SQLite's default of 1,000 pages, 4 MB), so only the checkpointer can
/// bring them into the database file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_is_checkpointed_beside_the_writer() {
    let app = App::new(Backend::Sqlite).await;
    let (tenant, agent) = ids(1, 7);
    let session = app.open_service_session(tenant, agent).await;
    let body = "c".repeat(4_000);
    for _ in 0..320 {
        app.chat
            .post_message(tenant, agent, session.id, body.clone(), None)
            .await
            .unwrap();
    }
    let path = app
        .test_db
        .url
        .trim_start_matches("sqlite://")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let size = || std::fs::metadata(&path).map_or(0, |m| m.len());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while size() < 1_000_000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        size() >= 1_000_000,
        "the database file holds {} bytes: the WAL was not checkpointed",
        size()
    );
}

/// Issue #5: a batch first locks its sessions without waiting; when
/// another transaction holds one, the batch is stored again waiting for it
/// (at most `lock_timeout`), so the append is delayed, not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_waits_for_a_session_row_another_transaction_holds() {
    let app = App::new(Backend::Postgres).await;
    let (tenant, agent) = ids(1, 7);
    let session = app.open_service_session(tenant, agent).await;
    let blocker = livechat_tests::hold_session_row(&app.db, session.id).await;
    let chat = app.chat.clone();
    let post = tokio::spawn(async move {
        chat.post_message(tenant, agent, session.id, "held".into(), None)
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!post.is_finished(), "the append waits for the row");
    blocker.commit().await.unwrap();
    let appended = post.await.unwrap().expect("stored once the row is free");
    assert_eq!(appended.message.seq, 1);
    let stored = stored(&app, tenant, session.id).await;
    assert_eq!(stored.len(), 1);
}

/// The PostgreSQL backend of transaction `tx`.
async fn pid(tx: &sea_orm::DatabaseTransaction) -> i32 {
    use sea_orm::{ConnectionTrait, Statement};
    tx.query_one_raw(Statement::from_string(
        tx.get_database_backend(),
        "SELECT pg_backend_pid() AS pid",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<i32>("", "pid")
    .unwrap()
}

/// Waits until a statement of another backend waits for `holder`.
async fn blocked_by(db: &sea_orm::DatabaseConnection, holder: i32) {
    use sea_orm::{ConnectionTrait, Statement};
    for _ in 0..500 {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!(
                    "SELECT count(*) AS n FROM pg_stat_activity \
                     WHERE {holder} = ANY(pg_blocking_pids(pid))"
                ),
            ))
            .await
            .unwrap()
            .unwrap();
        if row.try_get::<i64>("", "n").unwrap() > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no statement waited for backend {holder}");
}

/// Issue #3: a customer's second start returns the active chat and adds
/// its message there; when that chat closes after the start found it and
/// before the message reached it, the start is made once more and opens a
/// new chat carrying the message (`ChatService::start_customer_chat`):
/// what the customer typed is not dropped, and the closed chat gets
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_whose_chat_closes_before_its_message_opens_a_new_chat() {
    use livechat_core::{CustomerChatRequest, CustomerIdentity};
    use sea_orm::ConnectionTrait;
    let app = App::new(Backend::Postgres).await;
    let (tenant, user) = ids(1, 60);
    let customer = app
        .chat
        .resolve_customer(tenant, CustomerIdentity::User(user))
        .await
        .unwrap();
    let request = |message: Option<&str>| CustomerChatRequest {
        topic: "Billing".into(),
        message: message.map(Into::into),
        client_msg_id: message.map(|_| "k-1".into()),
        ..Default::default()
    };
    let first = app
        .chat
        .start_customer_chat(tenant, customer.id, request(None))
        .await
        .unwrap();
    assert!(first.created);
    let old = first.view.session.id;

    // The chat's row is held, so the second start finds the chat and then
    // waits to add its message; the chat closes meanwhile.
    let holder = livechat_tests::hold_session_row(&app.db, old).await;
    let chat = app.chat.clone();
    let start = tokio::spawn(async move {
        chat.start_customer_chat(tenant, customer.id, request(Some("Still there?")))
            .await
    });
    blocked_by(&app.db, pid(&holder).await).await;
    holder
        .execute_unprepared(&format!(
            "UPDATE livechat_sessions SET status = '{}', closed_at = now() WHERE id = '{old}'",
            SessionStatus::Closed.as_str()
        ))
        .await
        .unwrap();
    holder.commit().await.unwrap();

    let started = start
        .await
        .unwrap()
        .expect("the start is made again on the closed chat");
    assert!(started.created, "a new chat");
    let new = started.view.session.id;
    assert_ne!(new, old);
    let message = started.message.expect("the message is the new chat's");
    assert!(message.created);
    assert_eq!((message.message.session_id, message.message.seq), (new, 1));
    let texts = |session| {
        let chat = app.chat.clone();
        async move {
            chat.list_messages(tenant, session, None, None)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.message)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(texts(new).await, ["Still there?"]);
    assert!(texts(old).await.is_empty(), "the closed chat gets nothing");
}

/// Issue #5: a batch that finds a session row held waits for it holding no
/// other session row. A routing transaction holds its tenant's lock and
/// assigns waiting sessions in queue order, not id order: had the batch
/// locked `a` and waited for `b`, a routing transaction holding `b` and
/// wanting `a` would deadlock against it, and PostgreSQL would abort one of
/// the two (here the routing one, whose deadlock check comes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_waiting_for_a_held_session_holds_no_other() {
    use sea_orm::{ConnectionTrait, DatabaseTransaction, TransactionTrait};
    async fn lock(tx: &DatabaseTransaction, session: livechat_core::SessionId) {
        livechat_tests::lock_session_row(tx, session)
            .await
            .expect("no deadlock: the waiting batch holds no other session row");
    }
    let app = App::new(Backend::Postgres).await;
    let tenant = TenantId::new(1).unwrap();
    let agents = [7, 8, 9].map(|n| UserId::new(n).unwrap());
    // UUIDv7: `a` sorts before `b`.
    let a = app.open_service_session(tenant, agents[0]).await.id;
    let b = app.open_service_session(tenant, agents[1]).await.id;
    let z = app.open_service_session(tenant, agents[2]).await.id;
    let post = |agent: UserId, session| {
        let chat = app.chat.clone();
        tokio::spawn(async move {
            chat.post_message(tenant, agent, session, "hello".into(), None)
                .await
        })
    };

    // The committer waits for `z` while the appends to `a` and `b` queue,
    // so that they form one batch.
    let holder = app.db.begin().await.unwrap();
    lock(&holder, z).await;
    let to_z = post(agents[2], z);
    blocked_by(&app.db, pid(&holder).await).await;
    let routing = app.db.begin().await.unwrap();
    routing
        .execute_unprepared("SET LOCAL deadlock_timeout = '10ms'")
        .await
        .unwrap();
    lock(&routing, b).await;
    let to_a = post(agents[0], a);
    let to_b = post(agents[1], b);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    holder.commit().await.unwrap();
    assert_eq!(to_z.await.unwrap().unwrap().message.seq, 1);

    // The batch of `a` and `b` found `b` held and waits for it.
    blocked_by(&app.db, pid(&routing).await).await;
    lock(&routing, a).await;
    routing.commit().await.unwrap();
    assert_eq!(to_a.await.unwrap().unwrap().message.seq, 1);
    assert_eq!(to_b.await.unwrap().unwrap().message.seq, 1);
}

/// A session row held past `lock_timeout` fails that session's appends of
/// the waiting batch together, at once: each used to be retried alone,
/// waiting for the same row another 5 s, while every append of the node
/// queued behind the one committer. Here the row is freed after the first
/// failure, so appends retried one by one would have been stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_held_past_the_lock_timeout_fails_its_appends_together() {
    let app = App::new(Backend::Postgres).await;
    let tenant = TenantId::new(1).unwrap();
    let agents = [7, 8, 9].map(|n| UserId::new(n).unwrap());
    let held = app.open_service_session(tenant, agents[0]).await.id;
    let free = app.open_service_session(tenant, agents[1]).await.id;
    let z = app.open_service_session(tenant, agents[2]).await.id;
    let post = |agent: UserId, session, text: &str| {
        let chat = app.chat.clone();
        let text = text.to_owned();
        tokio::spawn(async move { chat.post_message(tenant, agent, session, text, None).await })
    };

    // The committer waits for `z` while the other appends queue, so that
    // they form one batch.
    let holder = livechat_tests::hold_session_row(&app.db, z).await;
    let to_z = post(agents[2], z, "z");
    blocked_by(&app.db, pid(&holder).await).await;
    let keeper = livechat_tests::hold_session_row(&app.db, held).await;
    let to_held: Vec<_> = (1..=3)
        .map(|n| post(agents[0], held, &format!("held {n}")))
        .collect();
    let to_free = post(agents[1], free, "free");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    holder.commit().await.unwrap();
    assert_eq!(to_z.await.unwrap().unwrap().message.seq, 1);

    let mut to_held = to_held.into_iter();
    let first = to_held.next().unwrap().await.unwrap();
    assert!(
        first.as_ref().is_err_and(ChatError::is_unavailable),
        "{first:?}"
    );
    keeper.rollback().await.unwrap();
    for rest in to_held {
        let refused = rest.await.unwrap();
        assert!(
            refused.as_ref().is_err_and(ChatError::is_unavailable),
            "refused with the first, not waited for again: {refused:?}"
        );
    }
    assert_eq!(to_free.await.unwrap().unwrap().message.seq, 1);
    assert!(stored(&app, tenant, held).await.is_empty());
}

/// `agent` online in `tenant`, then a transaction holding the tenant's
/// routing row (as a routing change does), returned open.
async fn online_with_routing_held(
    app: &App,
    tenant: TenantId,
    agent: UserId,
) -> sea_orm::DatabaseTransaction {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    app.chat
        .set_agent_status(tenant, agent, PresenceStatus::Online)
        .await
        .unwrap();
    let holder = app.db.begin().await.unwrap();
    holder
        .execute_unprepared(&format!(
            "SELECT 1 FROM livechat_routing WHERE tenant_id = {} FOR UPDATE",
            tenant.get()
        ))
        .await
        .unwrap();
    holder
}

/// A routing transaction waits at most `lock_timeout` (5 s) for its
/// tenant's routing row: a transaction holding it for long (a node gone
/// mid-transaction, kept by the server until TCP keepalive gives up; a
/// console's open transaction) fails that tenant's requests with 503
/// instead of holding each one's pooled connection for as long, which
/// took the pool, and with it every other tenant, after 16 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_routing_lock_held_for_long_fails_its_waiters_as_unavailable() {
    let app = App::new(Backend::Postgres).await;
    let (t1, agent) = ids(1, 7);
    let (t2, other) = ids(2, 8);
    let holder = online_with_routing_held(&app, t1, agent).await;
    let waiting = {
        let chat = app.chat.clone();
        tokio::spawn(async move { chat.set_agent_status(t1, agent, PresenceStatus::Away).await })
    };
    blocked_by(&app.db, pid(&holder).await).await;
    // Another tenant is served meanwhile.
    app.chat
        .set_agent_status(t2, other, PresenceStatus::Online)
        .await
        .expect("tenant 2 is not held up");
    let refused = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("the wait is bounded")
        .unwrap()
        .expect_err("the held lock fails the change");
    assert!(refused.is_unavailable(), "{refused:?}");
    holder.rollback().await.unwrap();
    // Nothing of the refused change was stored, and the tenant works again.
    let presence = app.chat.agent_presence(t1, agent).await.unwrap();
    assert_eq!(presence.status, PresenceStatus::Online);
    app.chat
        .set_agent_status(t1, agent, PresenceStatus::Away)
        .await
        .unwrap();
}

/// Issue #2: an agent chat starts only for an agent whose chosen status is
/// `online`, read under the tenant's routing lock: a status change
/// committed while the start waited for that lock (read before it, the
/// status let a start through for an agent who had just gone offline)
/// makes the start the agent's offline ticket (issue #3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_chat_started_as_the_agent_goes_offline_becomes_a_ticket() {
    use sea_orm::ConnectionTrait;
    let app = App::new(Backend::Postgres).await;
    let (tenant, agent) = ids(1, 7);
    let holder = online_with_routing_held(&app, tenant, agent).await;
    let start = {
        let chat = app.chat.clone();
        tokio::spawn(async move { chat.start_session(tenant, agent, None).await })
    };
    blocked_by(&app.db, pid(&holder).await).await;
    holder
        .execute_unprepared(
            "UPDATE livechat_agent_presence SET status = 'offline' \
             WHERE tenant_id = 1 AND agent_id = 7",
        )
        .await
        .unwrap();
    holder.commit().await.unwrap();
    match start.await.unwrap() {
        Err(ChatError::AgentOffline {
            agent: offline,
            ticket_id,
        }) => {
            assert_eq!(offline, agent);
            let events = livechat_tests::events_of(&app.chat, tenant).await;
            let ticketed = events
                .iter()
                .find(|e| e.kind == EventKind::TicketRequested)
                .expect("the ticket is stored");
            let payload: serde_json::Value = ticketed.payload.decode().unwrap();
            assert_eq!(payload["ticket_id"], ticket_id.to_string(), "{payload}");
            assert_eq!(payload["reason"], "agent_offline", "{payload}");
        }
        other => panic!("an offline agent got {other:?}"),
    }
    let all = app
        .chat
        .list_sessions(tenant, SessionFilter::default(), None, Some(200))
        .await
        .unwrap()
        .sessions;
    assert!(all.is_empty(), "{all:?}");
}

/// A send retried on a second node while the first is still waiting for
/// its session row (a client's retry through a load balancer): both wait,
/// under row locks, for a transaction that holds the row, and the one
/// locked second must find the key the first stored meanwhile, though its
/// statement began before that commit: a replay of the same message, not
/// a unique violation answered as a storage error. The concurrent model
/// found it with 300 cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_on_another_node_waiting_for_the_same_row_is_a_replay() {
    let app = App::new(Backend::Postgres).await;
    let (tenant, agent) = ids(1, 7);
    let session = app.open_service_session(tenant, agent).await.id;
    let other = second_node(&app);
    let holder = livechat_tests::hold_session_row(&app.db, session).await;
    let send = |chat: livechat_core::ChatService| {
        tokio::spawn(async move {
            chat.post_message(tenant, agent, session, "once".into(), Some("k".into()))
                .await
        })
    };
    let first = send(app.chat.clone());
    let retry = send(other);
    // Both nodes' locked reads wait for the holder.
    for _ in 0..500 {
        if waiting_for_locks(&app.db).await >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(waiting_for_locks(&app.db).await, 2);
    holder.commit().await.unwrap();
    let first = first.await.unwrap().expect("the first send is stored");
    let retry = retry.await.unwrap().expect("the retry is answered");
    assert_eq!(first.message.id, retry.message.id, "one message");
    assert!(first.created != retry.created, "one stored, one replayed");
    let stored = stored(&app, tenant, session).await;
    assert_eq!(stored.len(), 1);
}

/// How many statements of this database wait for a lock (behind the
/// holder, or behind another waiter for the same row).
async fn waiting_for_locks(db: &sea_orm::DatabaseConnection) -> i64 {
    use sea_orm::{ConnectionTrait, Statement};
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND datname = current_database()",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<i64>("", "n")
    .unwrap()
}

/// Issue #5: each node stores a batch without holding its sessions
/// between statements, and its one write checks them; two nodes sending
/// to the same sessions at once therefore collide, and the loser stores
/// its batch again under row locks. Every send is stored once, each
/// session's `seq` runs 1..=n without a gap, and every caller gets its
/// message, whichever node took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_sending_to_the_same_sessions_store_every_message_once() {
    let app = App::new(Backend::Postgres).await;
    let (tenant, agent) = ids(1, 7);
    let sessions = [
        app.open_service_session(tenant, agent).await.id,
        app.open_service_session(tenant, UserId::new(8).unwrap())
            .await
            .id,
    ];
    let other = second_node(&app);
    let agents = [agent, UserId::new(8).unwrap()];
    let mut seqs: HashMap<livechat_core::SessionId, Vec<i64>> = HashMap::new();
    // In rounds of one send per node and session, so that most batches
    // hold one append and collide with the other node's.
    for round in 0..50 {
        let tasks: Vec<_> = (0..4)
            .map(|n| {
                let chat = if n % 2 == 0 {
                    app.chat.clone()
                } else {
                    other.clone()
                };
                let (session, agent) = (sessions[n / 2], agents[n / 2]);
                tokio::spawn(async move {
                    let sent = chat
                        .post_message(tenant, agent, session, format!("message {round}.{n}"), None)
                        .await;
                    (session, sent)
                })
            })
            .collect();
        for task in futures::future::join_all(tasks).await {
            let (session, sent) = task.unwrap();
            seqs.entry(session)
                .or_default()
                .push(sent.expect("every send is stored").message.seq);
        }
    }
    for session in sessions {
        let mut answered = seqs.remove(&session).unwrap();
        answered.sort_unstable();
        assert_eq!(
            answered,
            (1..=100).collect::<Vec<_>>(),
            "no gap, no duplicate"
        );
        let stored = stored(&app, tenant, session).await;
        assert_eq!(
            stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=100).collect::<Vec<_>>()
        );
        let texts: HashSet<&str> = stored.iter().map(|m| m.message.as_str()).collect();
        assert_eq!(texts.len(), 100, "every message stored once");
    }
}

/// The pool pings a connection when handing it out only after it sat idle
/// for `POOL_PING_AFTER_IDLE` (issue #5: one round trip less per
/// transaction under load). Connections PostgreSQL dropped while they sat
/// in the pool less than that (a restart, a failover, an administrator)
/// fail the requests that use them with 503 and nothing stored; sqlx
/// closes each when it is given back, and the node serves again without a
/// restart.
#[tokio::test]
async fn connections_postgres_dropped_are_replaced_without_a_restart() {
    let (app, id, dropped) = eight_sent_then_connections_dropped().await;
    let send = |n: usize| post_as_agent_7(&app, &id, n);

    let mut refused = 0;
    let mut stored = 8;
    for n in 0..40 {
        let (code, body) = send(100 + n).await;
        match code.as_u16() {
            201 => {
                stored += 1;
                assert_eq!(body["data"]["seq"], stored, "{body}");
                if stored == 8 + 5 {
                    break;
                }
            }
            503 => {
                assert_eq!(stored, 8, "only before the first success: {body}");
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(stored, 8 + 5, "the node serves again");
    assert!(
        refused <= dropped,
        "{refused} refusals for {dropped} connections"
    );
}

/// `POST`s message `m{n}` to session `id` over HTTP as agent 7 of tenant
/// 1: the status and the body.
async fn post_as_agent_7(
    app: &App,
    id: &str,
    n: usize,
) -> (poem::http::StatusCode, serde_json::Value) {
    app.agent_call(
        poem::http::Method::POST,
        &format!("/livechat/sessions/{id}/messages"),
        7,
        1,
        Some(serde_json::json!({"message": format!("m{n}")})),
    )
    .await
}

/// A PostgreSQL app whose agent 7 sent messages 1–8 to a session, eight at
/// once so that the pool holds several connections, after which every
/// backend of its database was terminated (as a restart or failover
/// would): the app, the session and how many backends there were.
async fn eight_sent_then_connections_dropped() -> (App, String, u64) {
    use sea_orm::ConnectionTrait;
    let app = App::new(Backend::Postgres).await;
    let id = app.open_session(7, 1).await;
    let warm: Vec<_> = (0..8).map(|n| post_as_agent_7(&app, &id, n)).collect();
    for (code, body) in futures::future::join_all(warm).await {
        assert_eq!(code, 201, "{body}");
    }
    let database = app.test_db.url.rsplit('/').next().unwrap().to_owned();
    let admin = sea_orm::Database::connect(livechat_tests::postgres_admin_url())
        .await
        .unwrap();
    let dropped = admin
        .execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        ))
        .await
        .unwrap()
        .rows_affected();
    assert!(dropped > 0, "the app had connections open");
    (app, id, dropped)
}

/// Connections that sat in the pool longer than `POOL_PING_AFTER_IDLE`
/// are pinged when handed out: after PostgreSQL dropped them (a restart
/// or failover, which takes longer than that), the dead ones are replaced
/// and no request fails.
#[tokio::test]
async fn after_a_database_restart_no_request_fails() {
    let (app, id, _) = eight_sent_then_connections_dropped().await;
    let send = |n: usize| post_as_agent_7(&app, &id, n);
    // The restart's downtime: longer than the pool's idle threshold.
    tokio::time::sleep(livechat_core::store::POOL_PING_AFTER_IDLE * 2).await;
    for n in 0..8 {
        let (code, body) = send(100 + n).await;
        assert_eq!(code, 201, "{body}");
        assert_eq!(body["data"]["seq"], 9 + n, "{body}");
    }
}

/// The same `client_msg_id` sent at once through two nodes, three times
/// each (a client retrying through a load balancer), for 100 keys each by
/// the agent, by the customer, and by both (the agent's and the
/// customer's sends alternating): one message per key; every other send
/// of its sender answered with it, the other participant's refused with
/// `ClientMsgIdTaken`; never a storage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_sent_at_once_through_two_nodes_is_stored_once() {
    use livechat_core::{CustomerChatRequest, CustomerIdentity};
    let app = App::new(Backend::Postgres).await;
    let (tenant, agent) = ids(1, 7);
    app.go_online(7, 1).await;
    let customer = app
        .chat
        .resolve_customer(tenant, CustomerIdentity::User(UserId::new(60).unwrap()))
        .await
        .unwrap()
        .id;
    let started = app
        .chat
        .start_customer_chat(
            tenant,
            customer,
            CustomerChatRequest {
                topic: "Billing".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let session = started.view.session.id;
    assert_eq!(started.view.session.agent_id, Some(agent));
    let other = second_node(&app);
    for (mode, senders) in [("agent", [true; 6]), ("customer", [false; 6])]
        .into_iter()
        .chain(std::iter::once((
            "both",
            [true, false, true, false, true, false],
        )))
    {
        for round in 0..100 {
            let key = format!("{mode}-{round}");
            let tasks: Vec<_> = senders
                .iter()
                .enumerate()
                .map(|(n, &by_agent)| {
                    let chat = if n % 2 == 0 {
                        app.chat.clone()
                    } else {
                        other.clone()
                    };
                    let key = key.clone();
                    tokio::spawn(async move {
                        let sent = if by_agent {
                            chat.post_message(tenant, agent, session, "once".into(), Some(key))
                                .await
                        } else {
                            chat.post_customer_message(
                                tenant,
                                customer,
                                session,
                                "once".into(),
                                Some(key),
                            )
                            .await
                        };
                        (by_agent, sent)
                    })
                })
                .collect();
            let mut created = Vec::new();
            let mut ids = HashSet::new();
            let mut outcomes = Vec::new();
            for task in futures::future::join_all(tasks).await {
                let (by_agent, sent) = task.unwrap();
                match sent {
                    Ok(sent) => {
                        if sent.created {
                            created.push(by_agent);
                        }
                        ids.insert(sent.message.id);
                        outcomes.push((by_agent, true));
                    }
                    Err(ChatError::ClientMsgIdTaken) => outcomes.push((by_agent, false)),
                    Err(e) => panic!("{mode} round {round}: {e:?}"),
                }
            }
            assert_eq!((created.len(), ids.len()), (1, 1), "{mode} round {round}");
            // The creator's sends are answered with the message, the
            // other participant's refused.
            for (by_agent, ok) in outcomes {
                assert_eq!(ok, by_agent == created[0], "{mode} round {round}");
            }
        }
    }
    let session = app.chat.get_session(tenant, session).await.unwrap().session;
    assert_eq!(session.last_seq, 300, "one message per key");
}

/// As [`one_key_sent_at_once_through_two_nodes_is_stored_once`], over HTTP
/// to two example hosts with pools of their own, a visitor's sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_posted_at_once_to_two_hosts_is_stored_once() {
    use std::sync::Arc;

    use livechat_core::bus::InProcessBus;
    use livechat_tests::node::Node;
    use serde_json::json;
    let app = App::new(Backend::Postgres).await;
    app.go_online(7, 1).await;
    let nodes = [
        Node::start(
            app.test_db.connect_migrated().await,
            &app.config,
            Arc::new(InProcessBus::new()),
        )
        .await,
        Node::start(
            app.test_db.connect_migrated().await,
            &app.config,
            Arc::new(InProcessBus::new()),
        )
        .await,
    ];
    let http = reqwest::Client::new();
    let started = nodes[0].start_visitor_chat("Hi").await;
    assert_eq!(started["data"]["session"]["status"], "OPEN", "{started}");
    let session = started["data"]["session"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = started["data"]["visitor_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut failures = Vec::new();
    for round in 0..100 {
        let sends: Vec<_> = (0..6)
            .map(|n| {
                http.post(nodes[n % 2].url(&format!("/livechat/customer/chats/{session}/messages")))
                    .header("X-Tenant-ID", "1")
                    .header("Authorization", format!("Visitor {token}"))
                    .header("Content-Type", "application/json")
                    .body(
                        json!({"message": "x", "client_msg_id": format!("dup-{round}")})
                            .to_string(),
                    )
                    .send()
            })
            .collect();
        for resp in futures::future::join_all(sends).await {
            let resp = resp.unwrap();
            let status = resp.status().as_u16();
            if status != 200 && status != 201 {
                failures.push((round, status, resp.text().await.unwrap()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
