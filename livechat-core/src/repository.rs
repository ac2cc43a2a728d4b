//! Tenant-scoped repository traits (DESIGN.md invariant 1).
//!
//! The [`TenantId`] is the first parameter of every method and every query is
//! filtered by it: a row of another tenant is [`ChatError::NotFound`], never
//! visible. Methods that change state also write their
//! [`DomainEvent`](crate::DomainEvent)s in the same transaction (invariant 5).
//! Methods that route take the [`RoutingPolicy`] from the service: routing
//! rules are parameters, the store makes them atomic.
//!
//! [`SeaOrmStore`](crate::store::SeaOrmStore) implements all of them for
//! SQLite and PostgreSQL.

use std::future::Future;

use crate::config::RoutingPolicy;
use crate::error::ChatError;
use crate::events::{DomainEvent, TicketClosed, TicketRequested};
use crate::ids::{CustomerId, EventId, SessionId, TenantId, TicketId, UserId};
use crate::model::{
    AgentPresence, ChatMessage, ChatSession, Contact, Customer, CustomerIdentity, Heartbeat,
    PresenceStatus, Priority, Sender, SessionStatus, SessionView,
};
use crate::validate::{ClientMsgId, MessageBody, PageSize, Topic};

/// Which of a tenant's sessions [`SessionRepository::list_sessions`]
/// lists: the query of `GET /sessions` (an agent's "all", "waiting" and
/// "mine" views). Every field left `None` lists all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Only sessions with this status.
    pub status: Option<SessionStatus>,
    /// Only sessions of this agent: the one serving an OPEN chat, who
    /// served a CLOSED one, or to whom an agent-started chat is addressed.
    /// A chat handed back to the queue (WAITING) has no agent.
    pub agent: Option<UserId>,
    /// Only customer chats started with this department (as stored:
    /// trimmed; compared exactly).
    pub department: Option<String>,
}

/// A customer chat to start (issue #3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCustomerChat {
    /// The customer starting it.
    pub customer: CustomerId,
    /// What they need help with.
    pub topic: Topic,
    /// Queue priority.
    pub priority: Priority,
    /// Requested department.
    pub department: Option<String>,
    /// Contact details given at start.
    pub contact: Option<Contact>,
    /// First message, stored as seq 1.
    pub first_message: Option<MessageBody>,
    /// Idempotency key of the first message (its `client_msg_id`).
    pub first_message_key: Option<ClientMsgId>,
    /// Client IP.
    pub client_ip: Option<String>,
    /// Client User-Agent.
    pub user_agent: Option<String>,
}

/// The result of a customer start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerChatStarted {
    /// The session (new, or the customer's active one) with its queue place.
    pub view: SessionView,
    /// `false` when the customer already had a WAITING or OPEN session,
    /// which is returned instead (one active session per customer).
    pub created: bool,
    /// What became of the start's message: stored (`created: true`), as
    /// `seq` 1 of a new chat or as the next message of the returned one,
    /// or, when its `client_msg_id` was already used in that chat, the
    /// original message (`created: false`, nothing stored). `None` when
    /// the start carried no message.
    pub message: Option<AppendedMessage>,
}

/// How an assignment treats a session that is no longer WAITING.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssignMode {
    /// Take a WAITING session; [`ChatError::AlreadyAssigned`] when another
    /// agent has it. Exactly one of concurrent claims wins.
    Claim,
    /// Give a WAITING or OPEN session to the named agent.
    Transfer,
}

/// An agent who can take a chat now, with their load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EligibleAgent {
    /// The agent.
    pub agent_id: UserId,
    /// OPEN sessions they serve.
    pub open_sessions: i64,
    /// Their maximum.
    pub capacity: i64,
}

/// One agent of a tenant as their colleagues see them (`GET /agents`):
/// their presence, whether routing counts them online, and their load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentOverview {
    /// Chosen status, departments and when the status was set.
    pub presence: AgentPresence,
    /// Chosen status `online` and liveness fresh (within the presence TTL,
    /// when one is set): what claims and transfers ask of their target.
    pub online: bool,
    /// OPEN sessions they serve (customer chats and their own).
    pub open_sessions: i64,
    /// The tenant's per-agent capacity.
    pub capacity: i64,
}

impl AgentOverview {
    /// Routing could give them a chat now: online and below capacity
    /// (DESIGN.md invariant 3), their departments aside.
    #[must_use]
    pub const fn available(&self) -> bool {
        self.online && self.open_sessions < self.capacity
    }
}

/// Sessions of one tenant.
pub trait SessionRepository: Send + Sync {
    /// Stores a new OPEN agent-started session for `agent` and its
    /// `session.started` event, if the agent's chosen status is `online`
    /// (issue #2), read under the tenant's routing lock: a status change
    /// committed after a check made before could otherwise leave an
    /// offline agent with a new chat. Otherwise stores `offline` (its
    /// `ticket_id` and `tenant_id` set here) as a `ticket.requested` event
    /// instead (issue #3).
    ///
    /// # Errors
    /// [`ChatError::AgentOffline`] with the ticket's id when the agent is
    /// not online (the ticket is stored);
    /// [`ChatError::ActiveSessionExists`] when the agent already has an OPEN
    /// agent-started session in this tenant (a partial unique index, so
    /// concurrent calls yield exactly one session).
    fn create_agent_session(
        &self,
        tenant: TenantId,
        agent: UserId,
        offline: TicketRequested,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;

    /// Tickets the WAITING sessions without a ticket of `tenant` (`None`:
    /// of every tenant that has any) while no agent online takes them
    /// (none online, or none who takes their department), each in its
    /// tenant's routing transaction: `ticket.requested` and
    /// `session.updated` for each. Returns the sessions ticketed. With
    /// `None`, a tenant whose transaction fails is logged and skipped, and
    /// the call fails only when every tenant's did.
    fn ticket_unattended(
        &self,
        tenant: Option<TenantId>,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<Vec<ChatSession>, ChatError>> + Send;

    /// Writes a `ticket.closed` event (under `session`, the ticket's session
    /// if it has one, so that it is consumed in order with the session's
    /// events); the ticket sinks close the ticket when they handle it.
    /// Returns `false`, writing nothing, when a `ticket.closed` of the
    /// ticket is still undispatched (the ticket is closing already).
    ///
    /// # Errors
    /// [`ChatError::TicketPending`] for a ticket without a session whose
    /// `ticket.requested` is still undispatched: without a session nothing
    /// orders the two events, and a sink could be asked to close the ticket
    /// before it opens it.
    fn close_ticket(
        &self,
        tenant: TenantId,
        session: Option<SessionId>,
        closed: TicketClosed,
    ) -> impl Future<Output = Result<bool, ChatError>> + Send;

    /// Whether the `ticket.requested` event that opens `ticket` in `tenant`
    /// is still undispatched: the ticket exists, but not every ticket sink
    /// has been given it yet (so a [`crate::TicketDirectory`] may not know
    /// it). Reads only the outbox's undispatched events.
    fn ticket_opening_pending(
        &self,
        tenant: TenantId,
        ticket: TicketId,
    ) -> impl Future<Output = Result<bool, ChatError>> + Send;

    /// Writes a `ticket.requested` event for a request no agent could take
    /// and returns the allocated ticket id (`request.ticket_id` is ignored).
    fn request_ticket(
        &self,
        tenant: TenantId,
        request: TicketRequested,
    ) -> impl Future<Output = Result<TicketId, ChatError>> + Send;

    /// Starts a customer chat and routes it in one transaction: OPEN with the
    /// least-loaded eligible agent, else WAITING; WAITING while no agent
    /// online takes it (none online, or none who takes its department) also
    /// gets a ticket. Returns the customer's active session instead when
    /// one exists. A visitor linked to an identified customer (a link that
    /// committed after the caller resolved the visitor) starts as that
    /// customer.
    fn start_customer_chat(
        &self,
        tenant: TenantId,
        chat: NewCustomerChat,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<CustomerChatStarted, ChatError>> + Send;

    /// One session.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when it does not exist in this tenant.
    fn get_session(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;

    /// One session with its queue position.
    ///
    /// # Errors
    /// [`ChatError::NotFound`].
    fn session_view(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> impl Future<Output = Result<SessionView, ChatError>> + Send;

    /// The tenant's WAITING sessions in queue order: higher priority
    /// first, then older, then by id (the order
    /// [`SessionView::queue_position`] counts in), each with its
    /// department.
    fn waiting_queue(
        &self,
        tenant: TenantId,
    ) -> impl Future<Output = Result<Vec<(SessionId, Option<String>)>, ChatError>> + Send;

    /// Sessions of the tenant that `filter` selects, newest first (by
    /// `created_at`, then id), and only those after `before` in that order
    /// (the cursor: the last session of the previous page, which need not
    /// match `filter`).
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] when `before` is not a session of the
    /// tenant.
    fn list_sessions(
        &self,
        tenant: TenantId,
        filter: SessionFilter,
        before: Option<SessionId>,
        limit: PageSize,
    ) -> impl Future<Output = Result<Vec<SessionView>, ChatError>> + Send;

    /// The customer's sessions, newest first, older than `before` (the
    /// cursor) when given.
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] ([`crate::INVALID_CURSOR`]) when `before`
    /// is not one of the customer's sessions.
    fn customer_sessions(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        before: Option<SessionId>,
        limit: PageSize,
    ) -> impl Future<Output = Result<Vec<ChatSession>, ChatError>> + Send;

    /// Moves the session to CLOSED, writes `session.closed` and drains the
    /// queue (the freed agent takes the next waiting session). A CLOSED
    /// session is returned unchanged with no new event (idempotent).
    ///
    /// # Errors
    /// [`ChatError::NotFound`].
    fn close_session(
        &self,
        tenant: TenantId,
        id: SessionId,
        closed_by: Sender,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;

    /// Assigns the session to `agent` (claim or transfer), writing
    /// `session.assigned`; a transfer frees capacity and drains the queue.
    ///
    /// # Errors
    /// [`ChatError::NotFound`], [`ChatError::SessionClosed`],
    /// [`ChatError::AlreadyAssigned`] (claim lost),
    /// [`ChatError::AgentNotOnline`], [`ChatError::ActiveSessionExists`]
    /// (a transfer of an agent-started session to an agent who already has
    /// one OPEN).
    fn assign_session(
        &self,
        tenant: TenantId,
        id: SessionId,
        agent: UserId,
        mode: AssignMode,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;

    /// Replaces the session's contact details (`session.updated`). A
    /// CLOSED session is read-only: its contact stays as it was.
    ///
    /// # Errors
    /// [`ChatError::NotFound`], [`ChatError::SessionClosed`].
    fn update_contact(
        &self,
        tenant: TenantId,
        id: SessionId,
        contact: Contact,
    ) -> impl Future<Output = Result<ChatSession, ChatError>> + Send;
}

/// The result of appending a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendedMessage {
    /// The stored message (the original one on an idempotent retry).
    pub message: ChatMessage,
    /// `false` when `client_msg_id` matched an earlier message and nothing
    /// new was stored.
    pub created: bool,
}

/// A message append handed to the store, resolving to its outcome once it
/// is committed (or refused).
///
/// The append's place in its session's order is fixed when the
/// [`PendingAppend`] is created, not when it is awaited: appends submitted
/// one after the other from one task get increasing `seq`s even if their
/// outcomes are awaited together (a WebSocket connection pipelines its
/// sends this way). Dropping it does not cancel the append.
#[must_use = "the outcome of an append is known only by awaiting it"]
#[derive(Debug)]
pub struct PendingAppend(Pending);

#[derive(Debug)]
enum Pending {
    Queued(tokio::sync::oneshot::Receiver<Result<AppendedMessage, ChatError>>),
    Ready(Option<Result<AppendedMessage, ChatError>>),
}

impl PendingAppend {
    /// An append whose outcome is already known (e.g. refused by validation).
    pub fn ready(outcome: Result<AppendedMessage, ChatError>) -> Self {
        Self(Pending::Ready(Some(outcome)))
    }

    /// An append queued for a store task that answers on `reply`; a dropped
    /// sender resolves to [`ChatError::Storage`].
    pub fn queued(
        reply: tokio::sync::oneshot::Receiver<Result<AppendedMessage, ChatError>>,
    ) -> Self {
        Self(Pending::Queued(reply))
    }
}

impl Future for PendingAppend {
    type Output = Result<AppendedMessage, ChatError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            Pending::Ready(outcome) => {
                std::task::Poll::Ready(outcome.take().unwrap_or_else(|| {
                    Err(ChatError::Storage(sea_orm::DbErr::Custom(
                        "append polled after completion".into(),
                    )))
                }))
            }
            Pending::Queued(reply) => std::pin::Pin::new(reply).poll(cx).map(|answer| {
                // Its committer is gone (the runtime shutting down, or a
                // panic): the outcome is unknown, as when the database is
                // unreachable (503, and a retry with its key is safe).
                answer.unwrap_or_else(|_| {
                    Err(ChatError::Storage(sea_orm::DbErr::ConnectionAcquire(
                        sea_orm::error::ConnAcquireErr::ConnectionClosed,
                    )))
                })
            }),
        }
    }
}

/// Messages of one tenant's sessions.
pub trait MessageRepository: Send + Sync {
    /// Queues `body` as the next message of a session whose status is one
    /// of `allowed`, with the next `seq` assigned in the transaction that
    /// stores it (DESIGN.md invariant 4), and its `message.posted` event.
    /// With a `client_msg_id` already used in this session, stores nothing
    /// and resolves to the original (invariant 6), whatever the session's
    /// status. A [`Sender::Customer`] must be the session's customer.
    ///
    /// Submission order is `seq` order within a session (see
    /// [`PendingAppend`]).
    ///
    /// # Errors
    /// [`ChatError::NotFound`] (no such session in the tenant, or not the
    /// customer's), [`ChatError::SessionClosed`] (CLOSED, not allowed),
    /// [`ChatError::SessionNotOpen`] (another status not allowed, e.g.
    /// WAITING for an agent), [`ChatError::ClientMsgIdTaken`] (the key
    /// names another sender's message).
    fn append_message(
        &self,
        tenant: TenantId,
        session: SessionId,
        sender: Sender,
        body: MessageBody,
        client_msg_id: Option<ClientMsgId>,
        allowed: &'static [SessionStatus],
    ) -> PendingAppend;

    /// Messages with `seq > after_seq`, ascending by `seq`, at most `limit`.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when the session does not exist in this tenant.
    fn list_messages(
        &self,
        tenant: TenantId,
        session: SessionId,
        after_seq: i64,
        limit: PageSize,
    ) -> impl Future<Output = Result<Vec<ChatMessage>, ChatError>> + Send;
}

/// Agents' presence and capacity per tenant.
pub trait PresenceRepository: Send + Sync {
    /// Sets the agent's chosen status (upsert, also a heartbeat) and, when
    /// `departments` is given, the departments they serve (empty: every
    /// one; `None` keeps those set before, none for a new agent), writes
    /// `agent.status_changed`, and drains the queue when it is `online`.
    /// Any other status tickets the waiting chats no agent online serves
    /// any more; `offline` first hands the agent's OPEN customer chats back
    /// to the queue (to another agent online, or to tickets).
    fn set_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
        departments: Option<&[String]>,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<AgentPresence, ChatError>> + Send;

    /// Refreshes the agent's liveness and clears a standing offline
    /// announcement of theirs (they are back: [`Heartbeat::returned`]), in
    /// one transaction under the tenant's routing lock, then the agent's
    /// row; drains the queue if the agent is `online`. `NotFound` if they
    /// never set a status in the tenant.
    fn heartbeat(
        &self,
        tenant: TenantId,
        agent: UserId,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<Heartbeat, ChatError>> + Send;

    /// Makes the liveness of `agents` of `tenant` run out `grace` from now
    /// (unless it runs out sooner): their last connection closed, and a
    /// reconnect within `grace` (a heartbeat) keeps them eligible without a
    /// flap. Without a presence TTL, liveness is not checked for
    /// eligibility, and the agents' last sign of life is set to now, which
    /// [`Self::announce_offline`] compares with `grace`. An agent who has
    /// a live connection on any node when their row is locked (one that
    /// reconnected since the caller looked) is left as is. One transaction
    /// for all of them (a node's connections closed together, issue #5):
    /// the tenant's routing lock, then their rows in id order.
    fn expire_liveness(
        &self,
        tenant: TenantId,
        agents: &[UserId],
        grace: std::time::Duration,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Records that the tenant's agents are told each of `agents` went
    /// offline, if the agent has a presence with a chosen status other
    /// than `offline` (which was announced when chosen), no live connection
    /// on any node, no heartbeat after `stale_before` when that is given,
    /// and no such announcement standing already. Returns the agents for
    /// whom it was recorded, in id order: only they are announced, so each
    /// is said once.
    ///
    /// `stale_before` is what makes the grace after an agent's last
    /// connection count from the *latest* close: an agent who reconnected
    /// and left again within the grace is not announced by the first
    /// close's check ([`Self::expire_liveness`] moved their liveness).
    ///
    /// One transaction for all of them (the agents of a node's
    /// connections closed together, issue #5): the tenant's routing lock,
    /// then the agents' rows in id order, as every change of several
    /// agents' rows takes them; the connections are checked by a later
    /// statement, so one registered while this waited for a row is seen.
    fn announce_offline(
        &self,
        tenant: TenantId,
        agents: &[UserId],
        stale_before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> impl Future<Output = Result<Vec<UserId>, ChatError>> + Send;

    /// Records the offline announcement of every agent, of every tenant,
    /// whose presence ran out: a chosen status other than `offline`, no
    /// heartbeat since `stale_before`, no live connection on any node, and
    /// no announcement standing. Returns those agents as `(tenant, agent)`,
    /// each once across nodes: an agent who used only the HTTP routes and
    /// stopped sending heartbeats is announced offline like one whose last
    /// connection closed. Housekeeping, cross-tenant by nature, never
    /// reachable from a request.
    fn announce_expired_presence(
        &self,
        stale_before: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<Vec<(TenantId, UserId)>, ChatError>> + Send;

    /// Hands back the OPEN customer chats of every agent, of every tenant,
    /// who is still gone since an offline announcement made at or before
    /// `announced_before`: a chosen status other than `offline`, liveness
    /// run out by `policy.presence_ttl`, no live connection on any node. As
    /// when an agent chooses `offline`, each chat goes back to the queue
    /// with a `session.assigned` event without an agent (`agent_id` null,
    /// status WAITING), is routed to another agent online in queue order,
    /// and, while no agent online takes it, waits and is ticketed; each
    /// agent's chats in one transaction under the tenant's routing lock,
    /// where the absence is checked again. Agent-started sessions stay.
    /// Returns the agents whose chats were handed back, as `(tenant,
    /// agent)`. Without a presence TTL nothing is handed back. An agent
    /// whose transaction fails is logged and skipped; the call fails only
    /// when every agent's did. Housekeeping, cross-tenant by nature, never
    /// reachable from a request.
    fn hand_back_chats_of_absent_agents(
        &self,
        announced_before: chrono::DateTime<chrono::Utc>,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<Vec<(TenantId, UserId)>, ChatError>> + Send;

    /// [`Self::heartbeat`] for several agents of `tenant` at once, in one
    /// transaction: refreshes their liveness, clears their standing
    /// offline announcements, and drains the queue once when one of them
    /// is `online` (issue #5: a node renews its agents' connections
    /// together). Returns the presences whose announcement was cleared
    /// (whatever their chosen status); agents who never set a
    /// status in the tenant are skipped, and a row that cannot be read
    /// (written outside the library) is renewed but not returned. The
    /// tenant's routing lock is taken first, then the agents' rows (in id
    /// order), as every change of several agents' rows holds the routing
    /// lock before them.
    fn heartbeat_agents(
        &self,
        tenant: TenantId,
        agents: &[UserId],
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<Vec<AgentPresence>, ChatError>> + Send;

    /// Every agent who set a status in the tenant, by agent id, with
    /// whether they count as online (status and freshness, as routing
    /// reads them), their OPEN sessions and the tenant's capacity; `status`
    /// keeps only those whose chosen status it is.
    fn list_agents(
        &self,
        tenant: TenantId,
        status: Option<PresenceStatus>,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<Vec<AgentOverview>, ChatError>> + Send;

    /// The agent's presence, `None` if they never set one in this tenant.
    fn get_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> impl Future<Output = Result<Option<AgentPresence>, ChatError>> + Send;

    /// The status the tenant's agents were last told of for `agent`:
    /// `offline` while an offline announcement of theirs stands (their
    /// connections gone, [`Self::announce_offline`]), else their chosen
    /// status; `None` if they never set one in this tenant.
    fn announced_status(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> impl Future<Output = Result<Option<PresenceStatus>, ChatError>> + Send;

    /// DESIGN.md invariant 3, the one computation: agents whose chosen status
    /// is online, whose liveness is fresh, who are below capacity and who
    /// take chats of `department` (`None`: a chat without one, which every
    /// agent takes), in routing order (least loaded, then idle longest).
    fn eligible_agents(
        &self,
        tenant: TenantId,
        department: Option<&str>,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<Vec<EligibleAgent>, ChatError>> + Send;

    /// Whether any agent of the tenant who takes chats of `department` is
    /// online with fresh liveness, capacity aside: the difference between
    /// a chat that waits in the queue and one that also becomes a ticket
    /// (issue #3).
    fn any_agent_online(
        &self,
        tenant: TenantId,
        department: Option<&str>,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<bool, ChatError>> + Send;

    /// Sets the tenant's per-agent capacity (maximum OPEN sessions per
    /// agent) and drains the queue.
    fn set_agent_capacity(
        &self,
        tenant: TenantId,
        capacity: i64,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<i64, ChatError>> + Send;

    /// The tenant's per-agent capacity (the policy default when unset).
    fn agent_capacity(
        &self,
        tenant: TenantId,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<i64, ChatError>> + Send;
}

/// Customers of one tenant.
pub trait CustomerRepository: Send + Sync {
    /// Finds the customer for `identity`, creating it on first sight (race
    /// safe), and follows a visitor's link to the identified customer.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] for an unknown [`CustomerIdentity::Known`] id.
    fn resolve_customer(
        &self,
        tenant: TenantId,
        identity: CustomerIdentity,
    ) -> impl Future<Output = Result<Customer, ChatError>> + Send;

    /// The visitors linked to `customer` (an identified customer), in id
    /// order; empty for a customer no visitor was linked to.
    fn linked_visitors(
        &self,
        tenant: TenantId,
        customer: CustomerId,
    ) -> impl Future<Output = Result<Vec<CustomerId>, ChatError>> + Send;

    /// Links visitor `visitor` to the identified customer of host user
    /// `user` (seed 001): the visitor's sessions move there; if both have an
    /// active session, one is closed: the customer's when it is WAITING and
    /// the visitor's is OPEN (an agent is serving it), else the visitor's.
    /// Idempotent.
    fn link_visitor(
        &self,
        tenant: TenantId,
        visitor: CustomerId,
        user: UserId,
        policy: &RoutingPolicy,
    ) -> impl Future<Output = Result<Customer, ChatError>> + Send;
}

/// Who holds a real-time connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionOwner {
    /// A support agent.
    Agent(UserId),
    /// A customer.
    Customer(CustomerId),
}

/// What [`ConnectionRepository::purge_expired_connections`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgedConnections {
    /// Connection rows deleted.
    pub connections: u64,
    /// The agents whose connections were among them, once each, as
    /// `(tenant, agent)` in ascending order.
    pub agents: Vec<(TenantId, UserId)>,
    /// `message.missed` events written: agents' replies stored while an
    /// expired customer connection still counted as following their
    /// session, which nothing else now follows
    /// ([`EventKind::MessageMissed`](crate::EventKind::MessageMissed)).
    pub missed_replies: u64,
}

/// Live connections following one session, across all nodes (seed 002).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionConnections {
    /// Customer connections.
    pub customers: u64,
    /// Agent connections.
    pub agents: u64,
}

/// Live WebSocket connections of every node, in storage so that any node
/// can answer for all (issue #4). Rows expire unless touched, so a crashed
/// node's connections stop counting after their TTL.
pub trait ConnectionRepository: Send + Sync {
    /// Records each connection of `connections` (as `(tenant, id,
    /// owner)`) on `node`, live for `ttl`: a node registers the
    /// connections opened together (a reconnect storm after a restart or
    /// a deploy) a statement per 100 instead of a commit each (issue #5).
    /// A statement that fails is tried again a row at a time, and the
    /// others are tried whatever failed; the first failure is returned.
    fn register_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        node: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Extends the life of each connection of `connections` (as
    /// `(tenant, id, owner)`, open on `node`) by `ttl` from now (their
    /// heartbeat): a node renews its connections together, one statement
    /// per 500 connections instead of a commit each (issue #5: a node
    /// holding 18,000 idle connections spent 8% of its core and 1.6 MB/s
    /// of disk writes on their renewals).
    ///
    /// A connection without its row (purged after it expired while its
    /// node could not reach the database, or whose registration failed) is
    /// registered again, and its id returned: the joins purged with the row
    /// are not, and its node joins its sessions again. A node renews only
    /// connections that are open (it waits for a connection's renewal
    /// before removing it), so none is brought back after its removal.
    fn touch_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        node: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Vec<uuid::Uuid>, ChatError>> + Send;

    /// The connection follows `session` (idempotent).
    fn join_session(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        session: SessionId,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// The connection stops following `session`.
    fn leave_session(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        session: SessionId,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Removes the connection and its joins. With `silent_since`, the
    /// connection's client had gone silent since then and its node closed
    /// it: in the same transaction, each agent reply stored since in a
    /// session it followed, not notified because a customer connection
    /// followed the session, gets a `message.missed` event (its client may
    /// never have received it), unless another live customer connection
    /// follows the session; as
    /// [`Self::purge_expired_connections`] writes them for a crashed
    /// node's connections. Returns the `message.missed` events written.
    fn unregister_connection(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        silent_since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> impl Future<Output = Result<u64, ChatError>> + Send;

    /// Removes each connection of `connections` (as `(tenant, id)`) and
    /// its joins: [`Self::unregister_connection`] without `silent_since`
    /// for the connections a node closed together (a deploy, a network
    /// blip: clients closing at once), a transaction per 500 instead of
    /// two commits each (issue #5). Connections gone already are skipped.
    fn unregister_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid)],
    ) -> impl Future<Output = Result<(), ChatError>> + Send;

    /// Live connections following `session`, by role.
    fn session_connections(
        &self,
        tenant: TenantId,
        session: SessionId,
    ) -> impl Future<Output = Result<SessionConnections, ChatError>> + Send;

    /// The agents among `agents` of `tenant` with a live connection on
    /// any node (one read for a node's connections closed together,
    /// issue #5).
    fn connected_agents(
        &self,
        tenant: TenantId,
        agents: &[UserId],
    ) -> impl Future<Output = Result<Vec<UserId>, ChatError>> + Send;

    /// Deletes expired connections of every tenant (housekeeping: those of
    /// crashed nodes). Cross-tenant by nature, never reachable from a
    /// request.
    ///
    /// Connections are deleted (with their joins) in transactions of up
    /// to 100, each deleting only rows still expired, so a connection
    /// renewed since it was read stays. In the same transaction, for each
    /// session that an expired customer connection had joined and that no
    /// live customer connection follows any more, a `message.missed` event
    /// is written for every agent reply that was not notified when stored
    /// (its `message.posted` said a customer connection followed the
    /// session and no ticket) and was stored from that connection's last
    /// renewal (its expiry minus `connection_ttl`, the TTL its node renewed
    /// it by) until 10 s after its expiry (an append checks the connections
    /// before it takes its time): a reply the crashed node may never have
    /// delivered. Two nodes purging at once write them once: only the purge
    /// that deletes a connection reads it. These events are for the
    /// outbox's consumers and are not published on the bus.
    ///
    /// `customers_only`: agents' rows are left (a node that cannot
    /// announce agents offline leaves them, and their announcement, to one
    /// that can: `ChatService::purge_expired_connections_unannounced`).
    fn purge_expired_connections(
        &self,
        connection_ttl: std::time::Duration,
        customers_only: bool,
    ) -> impl Future<Output = Result<PurgedConnections, ChatError>> + Send;
}

/// Read access to the tenant's committed events, and their pruning.
pub trait OutboxRepository: Send + Sync {
    /// Events of the tenant after `after` (exclusive; `None`: from the
    /// start), oldest first, at most `limit`.
    ///
    /// Ids are taken when the events are written, before their commit. On
    /// PostgreSQL, where transactions commit side by side, an event whose
    /// transaction commits after a later event was read can therefore
    /// appear behind a cursor already past it: paging with `after` is not
    /// a gap-free feed there (on SQLite writes commit one at a time, in id
    /// order). How far behind such an event can land is bounded only by
    /// the longest write transaction (each lock wait is at most 5 s, but a
    /// transaction may wait for several) and the nodes' clock skew. A
    /// consumer that must see every event claims them instead
    /// ([`OutboxConsumer`](crate::OutboxConsumer), as the ticket bridge's
    /// dispatcher does).
    fn list_events(
        &self,
        tenant: TenantId,
        after: Option<EventId>,
        limit: PageSize,
    ) -> impl Future<Output = Result<Vec<DomainEvent>, ChatError>> + Send;

    /// Deletes at most `limit` settled events (dispatched to every
    /// consumer, or failed for good) written before `before`, oldest
    /// first, in one statement, and returns how many it deleted. An event
    /// not yet settled stays whatever its age. What a pruned event told
    /// stays in the tables it was about (sessions, messages; tickets and
    /// notifications in the ticket bridge's sinks); [`Self::list_events`]
    /// no longer returns it, and the purge of a crashed node's
    /// connections reads the `message.posted` events of the connection
    /// TTL before it (`message.missed`), so `before` is to be older than
    /// that ([`ChatService::prune_outbox`](crate::ChatService::prune_outbox)
    /// keeps a day at least).
    fn prune_events(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        limit: u64,
    ) -> impl Future<Output = Result<u64, ChatError>> + Send;
}

/// Everything [`ChatService`](crate::ChatService) needs from storage.
pub trait ChatStore:
    SessionRepository
    + MessageRepository
    + PresenceRepository
    + CustomerRepository
    + ConnectionRepository
    + OutboxRepository
{
}

impl<T> ChatStore for T where
    T: SessionRepository
        + MessageRepository
        + PresenceRepository
        + CustomerRepository
        + ConnectionRepository
        + OutboxRepository
{
}
