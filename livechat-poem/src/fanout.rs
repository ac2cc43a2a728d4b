//! The node's fan-out (issue #5, fan-out): one task reads the bus, prepares
//! each event once and hands it only to the connections it is for.
//!
//! A message, typing or read signal goes to the connections that follow its
//! session; a session's lifecycle (started, assigned, updated, closed) to
//! the tenant's agents, to the session's followers and to the tenant's
//! customers waiting in the queue (their position may move); an agent's
//! presence to the tenant's agents; a [`BusEvent::Resync`] to every
//! connection; anything else to nobody ([`audience`]). So a node holding
//! thousands of idle connections pays nothing for them per message: before,
//! every connection received every event of the node and discarded what
//! was not for it, and 5,000 idle connections cut room fan-out tenfold
//! (BENCHMARKS.md).
//!
//! Each connection has a bounded queue (`RealtimeConfig::event_queue`,
//! default [`EVENT_QUEUE`] events). The fan-out never waits for a
//! connection: when its queue is full the event is dropped for that
//! connection and the connection is marked lagged; it then re-reads what it
//! follows ([`Membership::take_lagged`]), as it did when a broadcast
//! receiver lagged. Events reach one connection in bus order.
//!
//! A connection starts following a session ([`Membership::follow`]) before
//! it reads the session's stored messages, so a message committed after
//! that read is published after the connection was added and reaches it;
//! one committed before is in the read. Duplicates are dropped by `seq`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use livechat_core::bus::{BusEvent, Ephemeral};
use livechat_core::{
    AgentPresence, ChatMessage, ChatSession, EventKind, PresenceStatus, SessionId, TenantId,
};
use tokio::sync::{OnceCell, broadcast, mpsc};

/// Default of `RealtimeConfig::event_queue`: events a connection's queue
/// holds before the fan-out drops the next one for it and marks it lagged.
pub(crate) const EVENT_QUEUE: usize = 1024;

/// A bus event prepared once per node for all its connections: a
/// message's frame is serialized once, not once per recipient; a session's
/// lifecycle event is decoded once, and the tenant's queue is read at most
/// once for all the waiting customers it reaches.
pub(crate) struct Prepared {
    pub(crate) event: Arc<BusEvent>,
    /// For `message.posted`: the message and its `new_message` frame.
    pub(crate) message: Option<(ChatMessage, String)>,
    /// For a session lifecycle event: the session as changed.
    pub(crate) session: Option<ChatSession>,
    /// For a session lifecycle event: each WAITING session of the tenant
    /// → its queue position, read by the first connection that needs it
    /// after the event was committed, then shared (`ws::Conn::queue`).
    /// Before, every waiting customer's connection read its own place for
    /// every lifecycle event of its tenant: a queue of n waiting customers
    /// cost n reads per move.
    pub(crate) queue: OnceCell<HashMap<SessionId, i64>>,
    /// For a session lifecycle event: the session as stored when the first
    /// connection that relays it reads it (`None`: the read failed), then
    /// shared (`ws::Conn::current_session`). Events committed on different
    /// nodes can arrive out of order (a close made on one node before an
    /// assignment made earlier on another); relaying each event's own copy
    /// left a client with the older state.
    pub(crate) current: OnceCell<Option<ChatSession>>,
    /// For `agent.status_changed`: the agent's presence as stored when
    /// first relayed, for the same reason (`ws::Conn::current_presence`).
    pub(crate) presence: OnceCell<Option<AgentPresence>>,
    /// For a presence announcement: the status it stands for as stored
    /// when first relayed (`ws::Conn::announced_status`). Two nodes'
    /// announcements of one agent (offline from the node the agent left,
    /// back from the one they came back on) reach a third through two
    /// Redis links, in either order; relaying each one's own status left
    /// every console with the agent offline.
    pub(crate) announced: OnceCell<Option<PresenceStatus>>,
}

impl Prepared {
    fn new(event: Arc<BusEvent>) -> Self {
        let (mut message, mut session) = (None, None);
        if let BusEvent::Domain(e) = &*event {
            if e.kind == EventKind::MessagePosted {
                message = e.payload.decode::<ChatMessage>().ok().map(|m| {
                    let text = crate::ws::message_text(&m);
                    (m, text)
                });
            } else if is_lifecycle(e.kind) {
                session = e.payload.decode::<ChatSession>().ok();
            }
        }
        Self {
            event,
            message,
            session,
            queue: OnceCell::new(),
            current: OnceCell::new(),
            presence: OnceCell::new(),
            announced: OnceCell::new(),
        }
    }
}

/// Whether events of `kind` change a session's lifecycle (and may move the
/// queue).
fn is_lifecycle(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::SessionStarted
            | EventKind::SessionAssigned
            | EventKind::SessionUpdated
            | EventKind::SessionClosed
    )
}

/// Who an event is for. Must match what `ws::Conn::handle_bus` and
/// `ws::Conn::handle_domain` act on: a connection left out never sees the
/// event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Audience {
    /// The connections following the session.
    Session(SessionId),
    /// The tenant's agents.
    Agents(TenantId),
    /// A session's lifecycle: the tenant's agents, the session's followers
    /// and the tenant's customers with a session waiting in the queue.
    Lifecycle(TenantId, Option<SessionId>),
    /// Every connection of the node.
    Everyone,
    /// No connection acts on it.
    Nobody,
}

/// Who `event` is for (see the module docs).
pub(crate) fn audience(event: &BusEvent) -> Audience {
    match event {
        BusEvent::Resync => Audience::Everyone,
        BusEvent::Domain(e) => match e.kind {
            EventKind::MessagePosted => e.session_id.map_or(Audience::Nobody, Audience::Session),
            kind if is_lifecycle(kind) => Audience::Lifecycle(e.tenant_id, e.session_id),
            EventKind::AgentStatusChanged => Audience::Agents(e.tenant_id),
            // Tickets, linked visitors: for the outbox's consumers only.
            _ => Audience::Nobody,
        },
        BusEvent::Ephemeral { tenant_id, event } => match event {
            Ephemeral::Typing { session_id, .. } | Ephemeral::Read { session_id, .. } => {
                Audience::Session(*session_id)
            }
            Ephemeral::Presence { .. } => Audience::Agents(*tenant_id),
        },
    }
}

/// One connection's end of the fan-out: its queue and its lag mark.
/// Only the routing tables hold its sender, so the queue closes when the
/// fan-out drops them.
struct Inbox {
    tx: mpsc::Sender<Arc<Prepared>>,
    /// Set when an event was dropped because the queue was full; shared
    /// with the connection's [`Membership`].
    lagged: Arc<AtomicBool>,
}

impl Inbox {
    /// Queues `event` without waiting; a full queue marks the connection
    /// lagged, a closed one (the connection is ending) is ignored.
    fn offer(&self, event: &Arc<Prepared>) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(event.clone()) {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

/// What the fan-out knows of one connection.
struct Member {
    tenant: TenantId,
    agent: bool,
    inbox: Arc<Inbox>,
    /// Sessions followed, each once.
    sessions: Vec<SessionId>,
}

/// One tenant's connections that receive tenant-wide events.
#[derive(Default)]
struct TenantRoutes {
    agents: HashMap<uuid::Uuid, Arc<Inbox>>,
    /// Customers following a session that waits in the queue.
    waiting: HashMap<uuid::Uuid, Arc<Inbox>>,
}

/// The routing tables, behind one lock.
#[derive(Default)]
struct Routes {
    members: HashMap<uuid::Uuid, Member>,
    tenants: HashMap<TenantId, TenantRoutes>,
    sessions: HashMap<SessionId, Vec<(uuid::Uuid, Arc<Inbox>)>>,
}

impl Routes {
    /// The inboxes `audience` names.
    fn collect(&self, audience: Audience, out: &mut Vec<Arc<Inbox>>) {
        match audience {
            Audience::Session(s) => {
                if let Some(list) = self.sessions.get(&s) {
                    out.extend(list.iter().map(|(_, inbox)| inbox.clone()));
                }
            }
            Audience::Agents(t) => {
                if let Some(routes) = self.tenants.get(&t) {
                    out.extend(routes.agents.values().cloned());
                }
            }
            Audience::Lifecycle(t, session) => {
                let routes = self.tenants.get(&t);
                if let Some(routes) = routes {
                    out.extend(routes.agents.values().cloned());
                    out.extend(routes.waiting.values().cloned());
                }
                // The session's other followers, each once.
                let followers = session.and_then(|s| self.sessions.get(&s));
                for (id, inbox) in followers.into_iter().flatten() {
                    let listed = routes
                        .is_some_and(|r| r.agents.contains_key(id) || r.waiting.contains_key(id));
                    if !listed {
                        out.push(inbox.clone());
                    }
                }
            }
            Audience::Everyone => out.extend(self.members.values().map(|m| m.inbox.clone())),
            Audience::Nobody => {}
        }
    }
}

/// The node's fan-out: the routing tables, filled by connections and read
/// by the task that follows the bus ([`FanOut::start`]).
pub(crate) struct FanOut {
    routes: Mutex<Routes>,
    /// Capacity of each connection's queue (at least 1).
    queue: usize,
}

impl FanOut {
    /// A fan-out whose connections' queues hold `queue` events (at least
    /// 1), fed by [`FanOut::dispatch`].
    fn new(queue: usize) -> Arc<Self> {
        Arc::new(Self {
            routes: Mutex::default(),
            queue: queue.max(1),
        })
    }

    /// A fan-out following `bus`: its task runs until the bus closes, then
    /// drops every queue, which ends the connections.
    pub(crate) fn start(bus: broadcast::Receiver<Arc<BusEvent>>, queue: usize) -> Arc<Self> {
        let fanout = Self::new(queue);
        tokio::spawn(run(fanout.clone(), bus));
        fanout
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        // The tables stay consistent between statements: a panic elsewhere
        // while the lock was held leaves nothing half-updated to guard.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds connection `id` of `tenant`; it receives its events through the
    /// returned receiver until the [`Membership`] is dropped.
    pub(crate) fn add(
        self: &Arc<Self>,
        id: uuid::Uuid,
        tenant: TenantId,
        agent: bool,
    ) -> (Membership, mpsc::Receiver<Arc<Prepared>>) {
        let (tx, rx) = mpsc::channel(self.queue);
        let lagged = Arc::new(AtomicBool::new(false));
        let inbox = Arc::new(Inbox {
            tx,
            lagged: lagged.clone(),
        });
        let mut routes = self.routes();
        if agent {
            routes
                .tenants
                .entry(tenant)
                .or_default()
                .agents
                .insert(id, inbox.clone());
        }
        routes.members.insert(
            id,
            Member {
                tenant,
                agent,
                inbox,
                sessions: Vec::new(),
            },
        );
        drop(routes);
        let membership = Membership {
            fanout: self.clone(),
            id,
            lagged,
            waiting: false,
        };
        (membership, rx)
    }

    /// Hands `event` to the connections it is for, preparing it only when
    /// there is one.
    fn dispatch(&self, event: Arc<BusEvent>, scratch: &mut Vec<Arc<Inbox>>) {
        scratch.clear();
        self.routes().collect(audience(&event), scratch);
        if scratch.is_empty() {
            return;
        }
        let prepared = Arc::new(Prepared::new(event));
        for inbox in scratch.drain(..) {
            inbox.offer(&prepared);
        }
    }
}

/// Reads the bus and dispatches each event; a lagging bus receiver becomes
/// a [`BusEvent::Resync`] for everyone.
async fn run(fanout: Arc<FanOut>, mut bus: broadcast::Receiver<Arc<BusEvent>>) {
    let mut scratch = Vec::new();
    loop {
        let event = match bus.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(_)) => Arc::new(BusEvent::Resync),
            Err(broadcast::error::RecvError::Closed) => break,
        };
        fanout.dispatch(event, &mut scratch);
    }
    // Dropping the queues' senders ends every connection's receiver.
    let mut routes = fanout.routes();
    routes.members.clear();
    routes.tenants.clear();
    routes.sessions.clear();
}

/// A connection's place in the fan-out; dropping it removes the connection
/// from every table.
pub(crate) struct Membership {
    fanout: Arc<FanOut>,
    id: uuid::Uuid,
    lagged: Arc<AtomicBool>,
    /// Listed among its tenant's waiting customers.
    waiting: bool,
}

impl Membership {
    /// Starts receiving `session`'s events (idempotent). Call before reading
    /// the session's stored messages (module docs).
    pub(crate) fn follow(&self, session: SessionId) {
        let mut guard = self.fanout.routes();
        let routes = &mut *guard;
        let Some(member) = routes.members.get_mut(&self.id) else {
            return;
        };
        if member.sessions.contains(&session) {
            return;
        }
        member.sessions.push(session);
        routes
            .sessions
            .entry(session)
            .or_default()
            .push((self.id, member.inbox.clone()));
    }

    /// Stops receiving `session`'s events.
    pub(crate) fn unfollow(&self, session: SessionId) {
        let mut guard = self.fanout.routes();
        let routes = &mut *guard;
        let Some(member) = routes.members.get_mut(&self.id) else {
            return;
        };
        let Some(at) = member.sessions.iter().position(|s| *s == session) else {
            return;
        };
        member.sessions.swap_remove(at);
        remove_follower(&mut routes.sessions, session, self.id);
    }

    /// Whether this customer connection follows a session waiting in the
    /// queue: then it receives every session lifecycle event of its tenant,
    /// since any of them may move its position. Agents receive them anyway.
    /// Whether the connection is listed as waiting ([`Self::set_waiting`]).
    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting
    }

    pub(crate) fn set_waiting(&mut self, waiting: bool) {
        if waiting == self.waiting {
            return;
        }
        self.waiting = waiting;
        let mut guard = self.fanout.routes();
        let routes = &mut *guard;
        let Some(member) = routes.members.get(&self.id) else {
            return;
        };
        if member.agent {
            return;
        }
        let tenant = routes.tenants.entry(member.tenant).or_default();
        if waiting {
            tenant.waiting.insert(self.id, member.inbox.clone());
        } else {
            tenant.waiting.remove(&self.id);
            if tenant.agents.is_empty() && tenant.waiting.is_empty() {
                routes.tenants.remove(&member.tenant);
            }
        }
    }

    /// Whether events were dropped for this connection since the last call
    /// (its queue was full); it must then re-read what it follows.
    pub(crate) fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut guard = self.fanout.routes();
        let routes = &mut *guard;
        let Some(member) = routes.members.remove(&self.id) else {
            return;
        };
        for session in member.sessions {
            remove_follower(&mut routes.sessions, session, self.id);
        }
        if let Some(tenant) = routes.tenants.get_mut(&member.tenant) {
            tenant.agents.remove(&self.id);
            tenant.waiting.remove(&self.id);
            if tenant.agents.is_empty() && tenant.waiting.is_empty() {
                routes.tenants.remove(&member.tenant);
            }
        }
    }
}

fn remove_follower(
    sessions: &mut HashMap<SessionId, Vec<(uuid::Uuid, Arc<Inbox>)>>,
    session: SessionId,
    id: uuid::Uuid,
) {
    if let Some(list) = sessions.get_mut(&session) {
        list.retain(|(member, _)| *member != id);
        if list.is_empty() {
            sessions.remove(&session);
        }
    }
}

#[cfg(test)]
mod tests {
    use livechat_core::bus::{Participant, TypingState};
    use livechat_core::{DomainEvent, EventId, PresenceStatus, SenderType, UserId};

    use super::*;

    fn tenant(n: i64) -> TenantId {
        TenantId::new(n).expect("tenant")
    }

    fn domain(t: TenantId, session: SessionId, kind: EventKind) -> Arc<BusEvent> {
        Arc::new(BusEvent::Domain(Arc::new(DomainEvent {
            id: EventId::generate(),
            tenant_id: t,
            session_id: Some(session),
            kind,
            payload: livechat_core::EventPayload::new(&serde_json::json!({})).unwrap(),
            created_at: livechat_core::now(),
        })))
    }

    fn typing(t: TenantId, session: SessionId) -> Arc<BusEvent> {
        Arc::new(BusEvent::Ephemeral {
            tenant_id: t,
            event: Ephemeral::Typing {
                session_id: session,
                by: Participant {
                    sender_type: SenderType::Agent,
                    sender_id: Some(UserId::new(9).expect("user")),
                    customer_id: None,
                },
                state: TypingState::Start,
            },
        })
    }

    fn presence(t: TenantId) -> Arc<BusEvent> {
        Arc::new(BusEvent::Ephemeral {
            tenant_id: t,
            event: Ephemeral::Presence {
                agent_id: UserId::new(9).expect("user"),
                status: PresenceStatus::Online,
            },
        })
    }

    /// Events queued for one connection, drained.
    fn received(rx: &mut mpsc::Receiver<Arc<Prepared>>) -> Vec<Arc<BusEvent>> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|p| p.event.clone())).collect()
    }

    #[test]
    fn each_event_reaches_only_its_audience() {
        let fanout = FanOut::new(EVENT_QUEUE);
        let mut scratch = Vec::new();
        let (t1, t2) = (tenant(1), tenant(2));
        let (s1, s2, s3) = (
            SessionId::generate(),
            SessionId::generate(),
            SessionId::generate(),
        );
        let ids: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::now_v7()).collect();
        let (agent, mut agent_rx) = fanout.add(ids[0], t1, true);
        let (customer, mut customer_rx) = fanout.add(ids[1], t1, false);
        let (mut waiting, mut waiting_rx) = fanout.add(ids[2], t1, false);
        let (_idle, mut idle_rx) = fanout.add(ids[3], t1, false);
        let (_other, mut other_rx) = fanout.add(ids[4], t2, true);
        agent.follow(s1);
        customer.follow(s2);
        waiting.follow(s3);
        waiting.set_waiting(true);

        let message = domain(t1, s1, EventKind::MessagePosted);
        fanout.dispatch(message.clone(), &mut scratch);
        let typed = typing(t1, s2);
        fanout.dispatch(typed.clone(), &mut scratch);
        let started = domain(t1, s2, EventKind::SessionStarted);
        fanout.dispatch(started.clone(), &mut scratch);
        let closed = domain(t1, s1, EventKind::SessionClosed);
        fanout.dispatch(closed.clone(), &mut scratch);
        let assigned = domain(t1, s3, EventKind::SessionAssigned);
        fanout.dispatch(assigned.clone(), &mut scratch);
        let online = presence(t1);
        fanout.dispatch(online.clone(), &mut scratch);
        fanout.dispatch(domain(t1, s1, EventKind::TicketRequested), &mut scratch);

        assert_eq!(
            received(&mut agent_rx),
            [
                message,
                started.clone(),
                closed.clone(),
                assigned.clone(),
                online
            ],
            "every lifecycle event once, though it follows s1"
        );
        assert_eq!(
            received(&mut customer_rx),
            [typed, started.clone()],
            "its own session's lifecycle, no other: it does not wait"
        );
        assert_eq!(
            received(&mut waiting_rx),
            [started, closed, assigned],
            "every lifecycle event once, its own session's too"
        );
        assert!(received(&mut idle_rx).is_empty(), "follows nothing");
        assert!(received(&mut other_rx).is_empty(), "another tenant");

        // No longer waiting: only its own session's lifecycle.
        waiting.set_waiting(false);
        fanout.dispatch(domain(t1, s1, EventKind::SessionUpdated), &mut scratch);
        assert!(received(&mut waiting_rx).is_empty());
        let own = domain(t1, s3, EventKind::SessionClosed);
        fanout.dispatch(own.clone(), &mut scratch);
        assert_eq!(received(&mut waiting_rx), [own]);
        received(&mut agent_rx);
        received(&mut customer_rx);

        // A resync is for everyone.
        let resync = Arc::new(BusEvent::Resync);
        fanout.dispatch(resync.clone(), &mut scratch);
        for rx in [
            &mut agent_rx,
            &mut customer_rx,
            &mut waiting_rx,
            &mut idle_rx,
            &mut other_rx,
        ] {
            assert_eq!(received(rx), std::slice::from_ref(&resync));
        }
    }

    #[test]
    fn unfollowing_and_leaving_remove_every_route() {
        let fanout = FanOut::new(EVENT_QUEUE);
        let mut scratch = Vec::new();
        let t1 = tenant(1);
        let (s1, s2) = (SessionId::generate(), SessionId::generate());
        let (customer, mut rx) = fanout.add(uuid::Uuid::now_v7(), t1, false);
        customer.follow(s1);
        customer.follow(s1);
        customer.follow(s2);
        let message = domain(t1, s1, EventKind::MessagePosted);
        fanout.dispatch(message.clone(), &mut scratch);
        assert_eq!(received(&mut rx), [message], "followed once, queued once");

        customer.unfollow(s1);
        fanout.dispatch(domain(t1, s1, EventKind::MessagePosted), &mut scratch);
        assert!(received(&mut rx).is_empty(), "unfollowed");
        let closed = domain(t1, s2, EventKind::SessionClosed);
        fanout.dispatch(closed.clone(), &mut scratch);
        assert_eq!(received(&mut rx), [closed], "still follows s2");

        customer.unfollow(s2);
        fanout.dispatch(domain(t1, s2, EventKind::SessionClosed), &mut scratch);
        assert!(received(&mut rx).is_empty(), "follows nothing any more");

        let mut customer = customer;
        customer.follow(s2);
        customer.set_waiting(true);
        let (agent, _agent_rx) = fanout.add(uuid::Uuid::now_v7(), t1, true);
        agent.follow(s2);
        drop(customer);
        drop(agent);
        let routes = fanout.routes();
        assert!(routes.members.is_empty());
        assert!(routes.tenants.is_empty());
        assert!(routes.sessions.is_empty());
    }

    #[test]
    fn a_full_queue_drops_and_marks_the_connection_lagged() {
        let fanout = FanOut::new(EVENT_QUEUE);
        let mut scratch = Vec::new();
        let t1 = tenant(1);
        let s1 = SessionId::generate();
        let (agent, mut rx) = fanout.add(uuid::Uuid::now_v7(), t1, true);
        agent.follow(s1);
        for _ in 0..EVENT_QUEUE {
            fanout.dispatch(typing(t1, s1), &mut scratch);
        }
        assert!(!agent.take_lagged(), "the queue holds EVENT_QUEUE events");
        let dropped = typing(t1, s1);
        fanout.dispatch(dropped.clone(), &mut scratch);
        assert!(agent.take_lagged());
        assert!(!agent.take_lagged(), "taken once");
        let queued = received(&mut rx);
        assert_eq!(queued.len(), EVENT_QUEUE);
        assert!(queued.iter().all(|e| !Arc::ptr_eq(e, &dropped)));
    }

    #[tokio::test]
    async fn the_task_follows_the_bus_and_ends_connections_when_it_closes() {
        let bus = livechat_core::bus::InProcessBus::new();
        let fanout = FanOut::start(livechat_core::bus::EventBus::subscribe(&bus), EVENT_QUEUE);
        let (_agent, mut rx) = fanout.add(uuid::Uuid::now_v7(), tenant(1), true);
        livechat_core::bus::EventBus::publish(&bus, BusEvent::Resync);
        let event = rx.recv().await.expect("resync");
        assert_eq!(*event.event, BusEvent::Resync);
        drop(bus);
        assert!(rx.recv().await.is_none(), "the queue closes with the bus");
    }
}
