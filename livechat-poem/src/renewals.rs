//! A node's registrations, renewals and removals of its WebSocket
//! connections, stored together (issue #5).
//!
//! Every ping tick renews a connection's registration and, for an agent,
//! their liveness (`RealtimeConfig::ping_interval`; not a customer's while
//! the bus cannot reach the other nodes, so that replies it cannot receive
//! are notified). Renewed one by one,
//! that was three transactions per agent's connection and one per
//! customer's, each a commit: a node holding 18,000 idle agent
//! connections spent 8% of its core and 1.6 MB/s of disk writes on them,
//! their ticks falling together after a burst of connects (a restart, a
//! deploy). Renewals are therefore queued per node and stored by one task
//! at a time, as appends are (group commit): the task takes every renewal
//! queued, stores them with `ChatService::touch_connections` (one
//! statement per 500 connections, one transaction per tenant and 500
//! agents), answers them, and takes what queued meanwhile, until none is
//! left. A lone renewal waits for nothing: the task starts at once. New
//! connections' registrations go the same way (`register`): clients
//! reconnecting together after a restart or a deploy were an insert, an
//! update and an agent's heartbeat each, and a node took ~600 µs of CPU
//! per connection to open them. So do the removals of connections closed
//! with a close frame (`unregister`: two commits each, ~200 µs of CPU per
//! connection when clients leave together); a connection that went
//! silent or broke is removed on its own, with the make-up of its missed
//! replies.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use livechat_core::{ConnectionOwner, Renewed, TenantId};
use tokio::sync::oneshot;

use crate::ws::{Gateway, publish_presence, spawn_presence_check};

/// The renewals queued on one node and whether a task is storing them.
#[derive(Default)]
pub(crate) struct Renewals {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queued: Vec<Queued>,
    /// A task is storing renewals; it takes the queued ones next.
    running: bool,
}

/// What is queued for a connection ([`queue`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A new connection's registration: its row on this node and its
    /// agent's first heartbeat. The connections a node opens together
    /// (clients reconnecting after a restart or a deploy) are inserted a
    /// statement per 100. A failure is logged (after the failed
    /// statement's rows were tried one by one); a connection whose row
    /// could not be inserted is served without one, counting as not
    /// connected until its first renewal registers it (`Renew`).
    Register,
    /// A ping's renewal of the row and of its agent's liveness. A failure
    /// is logged; the next ping renews again (the registration lives for
    /// `connection_ttl`, three pings by default). A row found gone (purged
    /// after it expired while the database could not be reached, or never
    /// inserted) is inserted again, and the connection told so
    /// ([`Renewal::Restored`]): it joins its sessions again.
    Renew,
    /// A closed connection's removal with its joins (closed with a close
    /// frame: a silent client's, which makes up missed replies, is removed
    /// on its own). The connections a node closes together (a deploy, a
    /// network blip) are removed a transaction per 500; agents whose last
    /// connection it was get their presence check after the grace period,
    /// as one connection's removal gives them. A failure is logged; the
    /// rows then expire with their TTL.
    Unregister,
}

/// What a renewal did, as its connection is told: a receiver whose
/// sender was dropped (a registration's or a removal's always, a renewal's
/// when the task stopped) reads as `Failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// The row was renewed.
    Stored,
    /// The row was gone and is registered again: the connection's joins
    /// went with it, and are to be stored again.
    Restored,
    /// Something of the node's renewals failed (this connection's row
    /// may or may not have been renewed, or registered again): the
    /// connection stores its joins again once a renewal succeeds, as its
    /// row may have been purged and registered again meanwhile.
    Failed,
}

/// One connection's registration, renewal or removal; its sender is
/// dropped once stored (or failed), or told what a renewal did.
struct Queued {
    tenant: TenantId,
    id: uuid::Uuid,
    owner: ConnectionOwner,
    kind: Kind,
    done: oneshot::Sender<Renewal>,
}

impl Renewals {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queues `kind` for connection `id` of `owner` on `gateway`'s node and
/// starts the task that stores what is queued if none runs. The receiver
/// ends once it is stored, or failed: with what a renewal did
/// ([`Renewal`]), or with an error (nothing sent: a registration or a
/// removal, or a renewal whose task stopped).
pub(crate) fn queue(
    gateway: &Arc<Gateway>,
    tenant: TenantId,
    id: uuid::Uuid,
    owner: ConnectionOwner,
    kind: Kind,
) -> oneshot::Receiver<Renewal> {
    let (done, stored) = oneshot::channel();
    let start = {
        let mut state = gateway.renewals.state();
        state.queued.push(Queued {
            tenant,
            id,
            owner,
            kind,
            done,
        });
        !std::mem::replace(&mut state.running, true)
    };
    if start {
        // The guard is made before the task is spawned: a task dropped
        // unpolled (the runtime stopping) still lets another start.
        let running = Running {
            gateway: gateway.clone(),
            armed: true,
        };
        tokio::spawn(store_renewals(running));
    }
    stored
}

/// The running task's hold on its node's renewals. However the task ends
/// without finding the queue empty (a panic, the runtime stopping, dropped
/// before its first poll), the guard lets another task start and answers
/// what is still queued, unstored: renewals are queued again at their
/// connections' next ping, which starts a task; a registration or a
/// removal is not (its connection goes on without its row, or its row
/// expires with its TTL). None is left waiting for a task that is gone
/// (a connection waits for its renewal and its removal).
struct Running {
    gateway: Arc<Gateway>,
    /// Cleared when the task ends by finding nothing queued, under the
    /// same lock as the queue was found empty.
    armed: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.armed {
            let queued = {
                let mut state = self.gateway.renewals.state();
                state.running = false;
                std::mem::take(&mut state.queued)
            };
            drop(queued);
        }
    }
}

/// Stores the queued renewals, batch after batch, until none is queued;
/// announces agents whose return it recorded.
async fn store_renewals(mut running: Running) {
    let gateway = running.gateway.clone();
    loop {
        let batch = {
            let mut state = gateway.renewals.state();
            if state.queued.is_empty() {
                state.running = false;
                running.armed = false;
                return;
            }
            std::mem::take(&mut state.queued)
        };
        // Registrations first, answered as soon as stored: a new
        // connection's `ready` frame does not wait for the renewals. Then
        // renewals, then removals: an agent's connection opened in the
        // batch counts when one they closed is removed.
        let (new, rest): (Vec<Queued>, Vec<Queued>) = batch
            .into_iter()
            .partition(|queued| queued.kind == Kind::Register);
        let (renewed, closed): (Vec<Queued>, Vec<Queued>) = rest
            .into_iter()
            .partition(|queued| queued.kind == Kind::Renew);
        let config = &gateway.config;
        let of = |queued: &[Queued]| -> Vec<(TenantId, uuid::Uuid, ConnectionOwner)> {
            queued
                .iter()
                .map(|queued| (queued.tenant, queued.id, queued.owner))
                .collect()
        };
        if !new.is_empty() {
            let stored = gateway
                .chat
                .register_connections(&of(&new), &config.node_id, config.connection_ttl)
                .await;
            announce(&gateway, stored);
        }
        drop(new);
        if !renewed.is_empty() {
            let mut stored = gateway
                .chat
                .touch_connections(&of(&renewed), &config.node_id, config.connection_ttl)
                .await;
            let restored: std::collections::HashSet<uuid::Uuid> =
                std::mem::take(&mut stored.restored).into_iter().collect();
            let outcome = if stored.failure.is_some() {
                Renewal::Failed
            } else {
                Renewal::Stored
            };
            announce(&gateway, stored);
            for queued in renewed {
                let renewal = if restored.contains(&queued.id) {
                    Renewal::Restored
                } else {
                    outcome
                };
                let _ = queued.done.send(renewal);
            }
        }
        if !closed.is_empty() {
            let removed = gateway
                .chat
                .unregister_connections(&of(&closed), config.presence_grace)
                .await;
            if !removed.gone.is_empty() {
                spawn_presence_check(gateway.clone(), removed.gone);
            }
        }
        drop(closed);
    }
}

/// Announces the agents whose return `stored` recorded (their standing
/// offline announcements are cleared and committed, whatever else
/// failed); the failures are logged by the service.
fn announce(gateway: &Gateway, stored: Renewed) {
    for presence in stored.announce {
        publish_presence(
            &*gateway.bus,
            presence.tenant_id,
            presence.agent_id,
            presence.status,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use livechat_core::store::{Migrator, SeaOrmStore};
    use livechat_core::{ChatConfig, ChatService, ConnectionOwner, CustomerId, TenantId};
    use sea_orm_migration::MigratorTrait;
    use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

    use super::{Kind, Renewal, queue};
    use crate::ws::{Gateway, RealtimeConfig};

    /// A gateway on a fresh SQLite file, with the database to check (and
    /// its directory, removed when dropped).
    async fn gateway() -> (Arc<Gateway>, DatabaseConnection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("renewals.db");
        let db = livechat_core::store::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        Migrator::up(&db, None).await.unwrap();
        let gateway = Gateway {
            chat: ChatService::new(SeaOrmStore::new(db.clone()), ChatConfig::default()),
            bus: Arc::new(livechat_core::bus::InProcessBus::new()),
            authenticator: Arc::new(crate::JwtAuthenticator::hs256(b"renewals")),
            visitor_tokens: crate::VisitorTokens::new(b"renewals"),
            config: RealtimeConfig::default(),
            shutdown: tokio::sync::watch::channel(false).1,
            sockets: tokio_util::task::TaskTracker::new(),
            fanout: std::sync::OnceLock::new(),
            limits: Arc::new(crate::limits::Limiters::new(&crate::RateLimits::default())),
            renewals: super::Renewals::default(),
            slots: crate::slots::ConnectionSlots::new(0),
        };
        (Arc::new(gateway), db, dir)
    }

    /// `answer`'s end: the entry was stored or failed (the sender dropped,
    /// nothing sent). Panics after 10 s: no task took the entry.
    async fn answered(answer: tokio::sync::oneshot::Receiver<Renewal>) {
        tokio::time::timeout(std::time::Duration::from_secs(10), answer)
            .await
            .expect("no task took the entry")
            .unwrap_err();
    }

    fn tenant() -> TenantId {
        TenantId::new(1).unwrap()
    }

    async fn rows(db: &DatabaseConnection) -> i64 {
        db.query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT count(*) AS n FROM livechat_connections",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "n")
        .unwrap()
    }

    fn running(gateway: &Gateway) -> bool {
        gateway.renewals.state().running
    }

    /// What is queued while a task runs is stored by it, in the batch's
    /// order (registrations, renewals, removals), and every queued entry
    /// is answered; with nothing left the task ends, and the next entry
    /// starts another.
    #[tokio::test]
    async fn one_task_stores_what_is_queued_and_the_next_entry_starts_another() {
        let (gateway, db, _dir) = gateway().await;
        let connections: Vec<(uuid::Uuid, ConnectionOwner)> = (0..250)
            .map(|_| {
                (
                    uuid::Uuid::now_v7(),
                    ConnectionOwner::Customer(CustomerId::generate()),
                )
            })
            .collect();
        // Queued without a yield: the task started by the first has not
        // run yet, and takes them all. The first connection's removal is
        // queued before its registration and still applies after it.
        let (gone, gone_owner) = connections[0];
        let mut answers = vec![queue(
            &gateway,
            tenant(),
            gone,
            gone_owner,
            Kind::Unregister,
        )];
        answers.extend(
            connections
                .iter()
                .map(|&(id, owner)| queue(&gateway, tenant(), id, owner, Kind::Register)),
        );
        assert!(running(&gateway));
        for answer in answers {
            answered(answer).await;
        }
        assert_eq!(rows(&db).await, 249);
        tokio::task::yield_now().await;
        assert!(!running(&gateway), "the task ended with the queue empty");
        // A removal alone starts a task of its own.
        let (id, owner) = connections[1];
        answered(queue(&gateway, tenant(), id, owner, Kind::Unregister)).await;
        assert_eq!(rows(&db).await, 248);
    }

    /// A renewal that finds its connection's row gone (purged while the
    /// node could not reach the database) registers it again and tells the
    /// connection so, which then joins its sessions again; a renewal of a
    /// row that is there says nothing.
    #[tokio::test]
    async fn a_renewal_registers_a_purged_connection_again_and_says_so() {
        let (gateway, db, _dir) = gateway().await;
        let (id, owner) = (
            uuid::Uuid::now_v7(),
            ConnectionOwner::Customer(CustomerId::generate()),
        );
        let renewed = queue(&gateway, tenant(), id, owner, Kind::Renew);
        assert_eq!(renewed.await, Ok(Renewal::Restored), "registered again");
        assert_eq!(rows(&db).await, 1);
        let renewed = queue(&gateway, tenant(), id, owner, Kind::Renew);
        assert_eq!(renewed.await, Ok(Renewal::Stored));
        assert_eq!(rows(&db).await, 1);
        // The database gone: the renewal says it failed.
        db.clone().close().await.unwrap();
        let renewed = queue(&gateway, tenant(), id, owner, Kind::Renew);
        assert_eq!(renewed.await, Ok(Renewal::Failed));
    }

    /// A task dropped before it ran (its runtime stopping) answers what
    /// was queued, unstored, and lets the next entry start a task.
    #[test]
    fn a_task_dropped_unpolled_answers_its_queue_and_lets_another_start() {
        let node = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (gateway, db, _dir) = node.block_on(gateway());
        let owner = ConnectionOwner::Customer(CustomerId::generate());
        let stopping = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Spawned on `stopping`, which never runs it.
        let lost = {
            let _context = stopping.enter();
            queue(
                &gateway,
                tenant(),
                uuid::Uuid::now_v7(),
                owner,
                Kind::Register,
            )
        };
        assert!(running(&gateway));
        drop(stopping);
        assert!(!running(&gateway), "the guard let go");
        node.block_on(async {
            answered(lost).await;
            assert_eq!(rows(&db).await, 0, "not stored");
            let again = queue(
                &gateway,
                tenant(),
                uuid::Uuid::now_v7(),
                owner,
                Kind::Register,
            );
            answered(again).await;
            assert_eq!(rows(&db).await, 1, "a new task stored it");
        });
    }
}
