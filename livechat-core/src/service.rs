//! [`ChatService`]: every business rule of the chat, over a [`ChatStore`].

use crate::config::ChatConfig;
use crate::error::ChatError;
use crate::events::{TicketClosed, TicketReason, TicketRequested};
use crate::ids::{CustomerId, SessionId, TenantId, TicketId, UserId};
use crate::inbox::{Ticket, TicketDirectory, TicketStatus};
use crate::model::{
    AgentPresence, ChatMessage, ChatSession, Contact, Customer, CustomerIdentity, Heartbeat,
    PresenceStatus, Priority, Sender, SessionStatus, SessionView,
};
use crate::repository::{
    AppendedMessage, AssignMode, ChatStore, ConnectionOwner, CustomerChatStarted, NewCustomerChat,
    PendingAppend, SessionConnections, SessionFilter,
};
use crate::store::SeaOrmStore;
use crate::validate::{ClientMsgId, MessageBody, PageSize, Topic, parse_department};

/// Contact details as a client sent them; validated by the service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactInput {
    /// Required.
    pub name: String,
    /// Required, a valid address.
    pub email: String,
    /// Optional.
    pub phone: Option<String>,
    /// Optional.
    pub position: Option<String>,
    /// Optional.
    pub company: Option<String>,
}

impl ContactInput {
    fn parse(self) -> Result<Contact, ChatError> {
        Contact::parse(
            &self.name,
            &self.email,
            self.phone,
            self.position,
            self.company,
        )
    }
}

/// A customer's request to start a chat, as sent (issue #3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerChatRequest {
    /// 1–200 characters.
    pub topic: String,
    /// Default `normal`.
    pub priority: Option<Priority>,
    /// Up to 100 characters.
    pub department: Option<String>,
    /// Contact details.
    pub contact: Option<ContactInput>,
    /// First message (same rules as any message). When the customer
    /// already has a WAITING or OPEN chat, it is added to that chat as
    /// their next message instead (see
    /// [`ChatService::start_customer_chat`]).
    pub message: Option<String>,
    /// Idempotency key of `message` (1–128 visible ASCII, no spaces, as a message's
    /// `client_msg_id`): a retried start with the same key adds nothing.
    pub client_msg_id: Option<String>,
    /// Client IP as seen by the adapter.
    pub client_ip: Option<String>,
    /// Client User-Agent.
    pub user_agent: Option<String>,
}

/// Agents a node's batch of connections handles per transaction (their
/// heartbeats, their liveness after a close, their offline
/// announcements) or per statement (their checks after a close).
const AGENTS_PER_TRANSACTION: usize = 500;

/// `(tenant, id)` of each of `connections`.
fn connection_ids(
    connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
) -> Vec<(TenantId, uuid::Uuid)> {
    connections
        .iter()
        .map(|&(tenant, id, _)| (tenant, id))
        .collect()
}

/// The failure of a batch's `step` over `connections` connections,
/// logged: the batch's other steps still run.
fn logged<T>(step: &str, connections: usize, result: Result<T, ChatError>) -> Result<T, ChatError> {
    result
        .inspect_err(|e| tracing::warn!(error = %e, step, connections, "connections' step failed"))
}

/// The agents owning `connections`, each once, by tenant, in id order.
fn agents_by_tenant(
    connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
) -> std::collections::BTreeMap<TenantId, Vec<UserId>> {
    by_tenant(
        connections
            .iter()
            .filter_map(|&(tenant, _, owner)| match owner {
                ConnectionOwner::Agent(agent) => Some((tenant, agent)),
                ConnectionOwner::Customer(_) => None,
            }),
    )
}

/// The chunks of `agents` (by tenant) that a batch's step handles a
/// transaction or statement each: [`AGENTS_PER_TRANSACTION`] agents of one
/// tenant at a time, in tenant then id order.
fn agent_chunks(
    agents: &std::collections::BTreeMap<TenantId, Vec<UserId>>,
) -> impl Iterator<Item = (TenantId, &[UserId])> {
    agents.iter().flat_map(|(&tenant, agents)| {
        agents
            .chunks(AGENTS_PER_TRANSACTION)
            .map(move |chunk| (tenant, chunk))
    })
}

/// `agents` (as `(tenant, agent)`), each once, by tenant, in id order.
fn by_tenant(
    agents: impl IntoIterator<Item = (TenantId, UserId)>,
) -> std::collections::BTreeMap<TenantId, Vec<UserId>> {
    let mut by_tenant: std::collections::BTreeMap<TenantId, std::collections::BTreeSet<UserId>> =
        std::collections::BTreeMap::new();
    for (tenant, agent) in agents {
        by_tenant.entry(tenant).or_default().insert(agent);
    }
    by_tenant
        .into_iter()
        .map(|(tenant, agents)| (tenant, agents.into_iter().collect()))
        .collect()
}

/// What [`ChatService::register_connections`] and
/// [`ChatService::touch_connections`] did: a node's connections of every
/// tenant are one call, so one step's failure does not hide what the
/// others stored (issue #5).
#[derive(Debug, Default)]
pub struct Renewed {
    /// The presences to announce back to their tenants' agents, one per
    /// agent whose standing offline announcement was cleared (not
    /// `offline`): cleared and committed, so announced whatever failed.
    pub announce: Vec<AgentPresence>,
    /// The connections renewed whose rows were gone and were registered
    /// again ([`ChatService::touch_connections`]): their node joins their
    /// sessions again. Empty after a registration.
    pub restored: Vec<uuid::Uuid>,
    /// The first failure met ([`ChatError::Storage`]), after every step
    /// was tried; each is logged. `None` when everything was stored.
    pub failure: Option<ChatError>,
}

/// What [`ChatService::unregister_connections`] did.
#[derive(Debug, Default)]
pub struct Unregistered {
    /// The agents, as `(tenant, agent)`, whose last connection closed:
    /// their liveness runs out after the grace period, and the caller
    /// announces them gone then unless they came back.
    pub gone: Vec<(TenantId, UserId)>,
    /// The first failure met ([`ChatError::Storage`]), after every step
    /// was tried; each is logged. `None` when everything was stored.
    pub failure: Option<ChatError>,
}

/// What [`ChatService::close_ticket`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TicketClose {
    /// The ticket was OPEN: its close is recorded (`ticket.closed`, by this
    /// call or an earlier one not handled yet), and it reads CLOSED once the
    /// dispatcher has handled it. Holds the ticket as it was.
    Recorded(Ticket),
    /// The ticket was CLOSED already; nothing changed.
    AlreadyClosed(Ticket),
}

/// A page of the tenant's sessions for agents ([`ChatService::list_sessions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionPage {
    /// Newest first, each with its queue place.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Whether a chat started now would be taken, wait, or also become a
/// ticket: the widget's flags ([`ChatService::availability`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentAvailability {
    /// An agent could take a chat now (online, fresh, below capacity).
    pub agents_available: bool,
    /// An agent is online at all (fresh, capacity aside): without one a
    /// chat also becomes a ticket.
    pub agents_online: bool,
}

/// A page of a customer's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    /// Newest first.
    pub sessions: Vec<ChatSession>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// The shortest retention [`ChatService::prune_outbox`] accepts (a day):
/// the purge of a crashed node's connections reads the events of the
/// connection TTL before it, and a consumer's view of recent events
/// (`OutboxRepository::list_events`) should not end at minutes.
pub const MIN_OUTBOX_RETENTION: std::time::Duration = std::time::Duration::from_secs(86_400);

/// How many events [`ChatService::prune_outbox`] deletes in one statement
/// (one short write transaction: other writes wait behind it on SQLite).
pub const OUTBOX_PRUNE_BATCH: u64 = 1_000;

/// The chat rules (issues #2 and #3). Adapters call it and never decide
/// themselves.
///
/// Cheap to clone when the store is (the SeaORM store is a pooled handle).
#[derive(Clone, Debug)]
pub struct ChatService<S = SeaOrmStore> {
    store: S,
    config: ChatConfig,
}

impl<S: ChatStore> ChatService<S> {
    /// A service with the given limits.
    pub fn new(store: S, config: ChatConfig) -> Self {
        Self { store, config }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The limits in force.
    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    fn page(&self, limit: Option<i64>) -> Result<PageSize, ChatError> {
        PageSize::parse(limit, &self.config)
    }

    fn body(&self, text: String) -> Result<MessageBody, ChatError> {
        MessageBody::parse(text, self.config.max_message_chars)
    }

    // ----- agents -------------------------------------------------------

    /// Sets `agent`'s chosen status in `tenant` (`PUT /agents/me/status`);
    /// it also counts as a heartbeat. Going online drains the queue; going
    /// `offline` hands the agent's OPEN customer chats back to the queue,
    /// where another agent online takes them; with nobody online, waiting
    /// chats become tickets (README "Tickets when no agent can take a
    /// chat").
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn set_agent_status(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
    ) -> Result<AgentPresence, ChatError> {
        self.set_agent_presence(tenant, agent, status, None).await
    }

    /// As [`Self::set_agent_status`], also setting the departments whose
    /// chats routing gives the agent when `departments` is given (README
    /// "Departments"): besides chats without a department, only those of
    /// these departments; an empty list, every chat. `None` keeps the
    /// departments set before. Each is trimmed, 1–100 characters, at most
    /// [`crate::MAX_AGENT_DEPARTMENTS`], duplicates dropped; the queue is
    /// drained for the agent's new departments at once.
    ///
    /// # Errors
    /// [`ChatError::InvalidInput`] for a bad department list (nothing is
    /// changed), [`ChatError::Storage`].
    pub async fn set_agent_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
        status: PresenceStatus,
        departments: Option<Vec<String>>,
    ) -> Result<AgentPresence, ChatError> {
        let departments = departments
            .map(crate::validate::parse_agent_departments)
            .transpose()?;
        self.store
            .set_presence(
                tenant,
                agent,
                status,
                departments.as_deref(),
                &self.config.routing,
            )
            .await
    }

    /// Refreshes `agent`'s liveness (DESIGN.md invariant 3) and, in the
    /// same transaction, clears a standing offline announcement of theirs
    /// (their presence had run out: [`Self::announce_expired_presence`]):
    /// [`Heartbeat::returned`] then tells the caller to announce the
    /// agent's chosen status to the tenant's agents, once. A connection's
    /// heartbeats do the same for a node's agents together
    /// ([`Self::touch_connections`]).
    ///
    /// # Errors
    /// [`ChatError::NotFound`] if the agent never set a status in the tenant.
    pub async fn heartbeat(&self, tenant: TenantId, agent: UserId) -> Result<Heartbeat, ChatError> {
        self.store
            .heartbeat(tenant, agent, &self.config.routing)
            .await
    }

    /// Whether an agent could take a chat of `department` (`None`: a chat
    /// without one) right now: the widget's "agents available" flag, from
    /// the same computation routing uses.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn agents_available(
        &self,
        tenant: TenantId,
        department: Option<&str>,
    ) -> Result<bool, ChatError> {
        Ok(!self
            .store
            .eligible_agents(tenant, department, &self.config.routing)
            .await?
            .is_empty())
    }

    /// Whether any agent of the tenant who takes chats of `department`
    /// (`None`: a chat without one, which every agent takes) is online
    /// with fresh liveness, capacity aside: when none is, a chat started
    /// now also becomes a ticket; when one is but none is
    /// [available](Self::agents_available), it waits in the queue for the
    /// busy agents (issue #3).
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn agents_online(
        &self,
        tenant: TenantId,
        department: Option<&str>,
    ) -> Result<bool, ChatError> {
        self.store
            .any_agent_online(tenant, department, &self.config.routing)
            .await
    }

    /// Both of the widget's flags for a chat of `department` (`None`: a
    /// chat without one): an agent available implies one online, so the
    /// second read happens only when none is available.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn availability(
        &self,
        tenant: TenantId,
        department: Option<&str>,
    ) -> Result<AgentAvailability, ChatError> {
        let agents_available = self.agents_available(tenant, department).await?;
        let agents_online = agents_available || self.agents_online(tenant, department).await?;
        Ok(AgentAvailability {
            agents_available,
            agents_online,
        })
    }

    /// Sets the tenant's per-agent capacity (1–100 OPEN sessions); raising
    /// it drains the queue.
    ///
    /// # Errors
    /// [`ChatError::InvalidInput`] outside 1–100.
    pub async fn set_agent_capacity(
        &self,
        tenant: TenantId,
        capacity: i64,
    ) -> Result<i64, ChatError> {
        if !(1..=100).contains(&capacity) {
            return Err(ChatError::InvalidInput(
                "agent_capacity must be between 1 and 100".into(),
            ));
        }
        self.store
            .set_agent_capacity(tenant, capacity, &self.config.routing)
            .await
    }

    /// The tenant's per-agent capacity.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn agent_capacity(&self, tenant: TenantId) -> Result<i64, ChatError> {
        self.store
            .agent_capacity(tenant, &self.config.routing)
            .await
    }

    /// The tenant's agents (`GET /agents`): everyone who set a status in
    /// it, by agent id, each with their presence, whether routing counts
    /// them online, their OPEN sessions and the capacity; only those whose
    /// chosen status is `status` when given. What an agent needs to pick a
    /// colleague for a transfer, and a team's dashboard.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn list_agents(
        &self,
        tenant: TenantId,
        status: Option<PresenceStatus>,
    ) -> Result<Vec<crate::AgentOverview>, ChatError> {
        self.store
            .list_agents(tenant, status, &self.config.routing)
            .await
    }

    /// An agent's presence in the tenant (their chosen status and when it
    /// was set).
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when the agent never set a status in this
    /// tenant.
    pub async fn agent_presence(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<AgentPresence, ChatError> {
        self.store
            .get_presence(tenant, agent)
            .await?
            .ok_or(ChatError::NotFound)
    }

    /// The status the tenant's agents were last told of for `agent`:
    /// `offline` while an offline announcement of theirs stands, else their
    /// chosen status. A node relays an announcement as this reads when the
    /// announcement reaches it: two nodes' announcements of one agent
    /// (gone on one, back on the other) can reach a third in either order.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when the agent never set a status in this
    /// tenant; [`ChatError::Storage`].
    pub async fn announced_status(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<PresenceStatus, ChatError> {
        self.store
            .announced_status(tenant, agent)
            .await?
            .ok_or(ChatError::NotFound)
    }

    /// Starts an agent chat for `agent` (the caller when `None`).
    ///
    /// Rules: the agent's chosen status must be `online` (issue #2) — if not,
    /// the request is kept as a ticket addressed to the agent (issue #3); at
    /// most one OPEN agent-started session per (tenant, agent), enforced by
    /// the database so concurrent starts give exactly one session.
    ///
    /// # Errors
    /// [`ChatError::AgentOffline`] (with the ticket id),
    /// [`ChatError::ActiveSessionExists`].
    pub async fn start_session(
        &self,
        tenant: TenantId,
        caller: UserId,
        agent: Option<UserId>,
    ) -> Result<ChatSession, ChatError> {
        let agent = agent.unwrap_or(caller);
        // The chosen status decides (issue #2; liveness is for routing),
        // read under the tenant's routing lock with the session's insert
        // or the ticket's.
        let offline = TicketRequested {
            ticket_id: TicketId::generate(),
            tenant_id: tenant,
            reason: TicketReason::AgentOffline,
            session_id: None,
            customer_id: None,
            agent_id: Some(agent),
            requested_by: Some(caller),
            topic: None,
            department: None,
            priority: Priority::Normal,
            contact: None,
            first_message: None,
            messages: Vec::new(),
        };
        self.store
            .create_agent_session(tenant, agent, offline)
            .await
    }

    /// One session of the tenant, with its queue position while WAITING.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] (also for other tenants' sessions).
    pub async fn get_session(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> Result<SessionView, ChatError> {
        self.store.session_view(tenant, id).await
    }

    /// The tenant's WAITING sessions in queue order (higher priority
    /// first, then older, then by id); a session's queue position counts
    /// those ahead of it here that its agents would take first
    /// ([`Self::queue_positions`]).
    ///
    /// # Errors
    /// [`ChatError::Storage`].
    pub async fn waiting_queue(&self, tenant: TenantId) -> Result<Vec<SessionId>, ChatError> {
        Ok(self
            .store
            .waiting_queue(tenant)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Each WAITING session of the tenant → its queue position (1 =
    /// next), from one read of the queue; the same places
    /// [`Self::get_session`] gives one by one: a chat with a department
    /// counts the chats ahead of it of its department or without one, a
    /// chat without one every chat ahead (README "Departments"). Issue #5:
    /// the gateway reads it once per queue move and node, not once per
    /// waiting customer.
    ///
    /// # Errors
    /// [`ChatError::Storage`].
    pub async fn queue_positions(
        &self,
        tenant: TenantId,
    ) -> Result<std::collections::HashMap<SessionId, i64>, ChatError> {
        let queue = self.store.waiting_queue(tenant).await?;
        let mut without_department = 0;
        let mut of_department: std::collections::HashMap<String, i64> =
            std::collections::HashMap::new();
        let mut positions = std::collections::HashMap::with_capacity(queue.len());
        for (ahead, (id, department)) in (0..).zip(queue) {
            let position = match department {
                None => {
                    without_department += 1;
                    ahead + 1
                }
                Some(department) => {
                    let same = of_department.entry(department).or_insert(0);
                    *same += 1;
                    without_department + *same
                }
            };
            positions.insert(id, position);
        }
        Ok(positions)
    }

    /// The tenant's sessions that `filter` selects (a status, an agent's
    /// own), newest first, after `cursor` (the previous page's
    /// `next_cursor`: its last session) when given; `limit` defaults to
    /// [`ChatConfig::default_page_size`].
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] for a `limit` outside `1..=max_page_size`,
    /// or a `cursor` that is not a session of the tenant.
    pub async fn list_sessions(
        &self,
        tenant: TenantId,
        filter: SessionFilter,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<SessionPage, ChatError> {
        let limit = self.page(limit)?;
        let before = crate::parse_cursor::<SessionId>(cursor)?;
        let sessions = self
            .store
            .list_sessions(tenant, filter, before, limit)
            .await?;
        let next_cursor = crate::next_cursor(&sessions, limit, |v| v.session.id);
        Ok(SessionPage {
            sessions,
            next_cursor,
        })
    }

    /// Closes a session; closing a CLOSED session returns it unchanged.
    /// The freed agent takes the next waiting session.
    ///
    /// # Errors
    /// [`ChatError::NotFound`].
    pub async fn close_session(
        &self,
        tenant: TenantId,
        caller: UserId,
        id: SessionId,
    ) -> Result<ChatSession, ChatError> {
        self.store
            .close_session(tenant, id, Sender::Agent(caller), &self.config.routing)
            .await
    }

    /// Claims a WAITING session for the caller (`target` `None`), or gives a
    /// WAITING or OPEN session to `target` (transfer). The target must be
    /// online; capacity does not bind a deliberate assignment.
    ///
    /// # Errors
    /// [`ChatError::AlreadyAssigned`] (a concurrent claim won),
    /// [`ChatError::AgentNotOnline`], [`ChatError::SessionClosed`],
    /// [`ChatError::ActiveSessionExists`] (a transfer of an agent-started
    /// session to an agent who already has one OPEN: DESIGN.md invariant
    /// 2), [`ChatError::NotFound`].
    pub async fn assign_session(
        &self,
        tenant: TenantId,
        caller: UserId,
        id: SessionId,
        target: Option<UserId>,
    ) -> Result<ChatSession, ChatError> {
        let (agent, mode) = match target {
            None => (caller, AssignMode::Claim),
            Some(t) => (t, AssignMode::Transfer),
        };
        self.store
            .assign_session(tenant, id, agent, mode, &self.config.routing)
            .await
    }

    /// Posts `text` from an agent to an OPEN session; it gets the next `seq`.
    /// A `client_msg_id` this agent already used in the session returns
    /// the original message with `created: false` (DESIGN.md invariant 6);
    /// one another participant used is refused.
    ///
    /// # Errors
    /// [`ChatError::InvalidMessage`] (blank),
    /// [`ChatError::MessageContainsNul`] (U+0000 in the text),
    /// [`ChatError::MessageTooLong`], [`ChatError::InvalidClientMsgId`],
    /// [`ChatError::ClientMsgIdTaken`] (the key names another sender's
    /// message), [`ChatError::SessionClosed`] (CLOSED),
    /// [`ChatError::SessionNotOpen`] (still WAITING: claim it first),
    /// [`ChatError::NotFound`].
    pub async fn post_message(
        &self,
        tenant: TenantId,
        sender: UserId,
        session: SessionId,
        text: String,
        client_msg_id: Option<String>,
    ) -> Result<AppendedMessage, ChatError> {
        self.submit_message(tenant, sender, session, text, client_msg_id)
            .await
    }

    /// As [`Self::post_message`], but the message takes its place in the
    /// session's order now, before the returned [`PendingAppend`] is
    /// awaited: a connection can submit several messages and await their
    /// outcomes together, and they get `seq`s in submission order (issue #5:
    /// pipelined sends over WebSocket).
    pub fn submit_message(
        &self,
        tenant: TenantId,
        sender: UserId,
        session: SessionId,
        text: String,
        client_msg_id: Option<String>,
    ) -> PendingAppend {
        self.submit(
            tenant,
            session,
            Sender::Agent(sender),
            text,
            client_msg_id,
            &[SessionStatus::Open],
        )
    }

    fn submit(
        &self,
        tenant: TenantId,
        session: SessionId,
        sender: Sender,
        text: String,
        client_msg_id: Option<String>,
        allowed: &'static [SessionStatus],
    ) -> PendingAppend {
        let body = match self.body(text) {
            Ok(body) => body,
            Err(e) => return PendingAppend::ready(Err(e)),
        };
        match client_msg_id.map(ClientMsgId::parse).transpose() {
            Ok(key) => self
                .store
                .append_message(tenant, session, sender, body, key, allowed),
            Err(e) => PendingAppend::ready(Err(e)),
        }
    }

    /// Messages with `seq > after_seq` (default 0), ascending, at most
    /// `limit` (default 50, max 200).
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] (negative `after_seq`, bad `limit`),
    /// [`ChatError::NotFound`].
    pub async fn list_messages(
        &self,
        tenant: TenantId,
        session: SessionId,
        after_seq: Option<i64>,
        limit: Option<i64>,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        let limit = self.page(limit)?;
        let after_seq = crate::validate::after_seq(after_seq)?;
        self.store
            .list_messages(tenant, session, after_seq, limit)
            .await
    }

    // ----- customers ----------------------------------------------------

    /// The customer for `identity`, created on first sight; a linked
    /// visitor resolves to the identified customer.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] for an unknown customer id;
    /// [`ChatError::InvalidInput`] for a visitor with the nil UUID as
    /// browser id (a widget bug sending it would make one visitor of every
    /// browser that has it).
    pub async fn resolve_customer(
        &self,
        tenant: TenantId,
        identity: CustomerIdentity,
    ) -> Result<Customer, ChatError> {
        if matches!(identity, CustomerIdentity::Visitor(browser) if browser.is_nil()) {
            return Err(ChatError::InvalidInput(
                "browser_uuid must not be the nil UUID".into(),
            ));
        }
        self.store.resolve_customer(tenant, identity).await
    }

    /// Starts a customer chat (issue #3): routed to the least-loaded
    /// eligible agent who takes its department (OPEN), else queued
    /// (WAITING, with a position); with no agent online who takes it, it
    /// also becomes a ticket. The first message, if
    /// any, is `seq` 1, stored with `client_msg_id` as its idempotency key.
    ///
    /// A customer with a WAITING or OPEN session gets that session back
    /// (`created: false`, one active chat per customer). The request's
    /// message is then added to that session as the customer's next
    /// message, under the same rules and idempotency as
    /// [`Self::post_customer_message`], and the session is returned as it
    /// stands after it: what the customer typed is never dropped, and a
    /// retried start with the same `client_msg_id` (the first message's
    /// key, or a follow-up's) adds nothing while that chat is WAITING or
    /// OPEN; once it is closed, a start opens a new chat. Without a key,
    /// each start with a message adds one, as each send without a key
    /// does. [`CustomerChatStarted::message`] says what became of the
    /// message. If the returned chat closes (or a link moves it) before
    /// the message reaches it, the start is made once more. A
    /// `client_msg_id` without a message is checked (a malformed one is
    /// refused, as any bad input is) and otherwise ignored.
    ///
    /// # Errors
    /// [`ChatError::InvalidInput`] (topic, department, contact),
    /// [`ChatError::InvalidMessage`], [`ChatError::MessageTooLong`],
    /// [`ChatError::InvalidClientMsgId`], [`ChatError::ClientMsgIdTaken`];
    /// [`ChatError::SessionClosed`] or
    /// [`ChatError::NotFound`] only if the chat changed that way twice in
    /// a row.
    pub async fn start_customer_chat(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        request: CustomerChatRequest,
    ) -> Result<CustomerChatStarted, ChatError> {
        let chat = self.customer_chat(request)?(customer);
        self.start_checked_chat(tenant, chat).await
    }

    /// [`Self::start_customer_chat`] for the customer of `identity`, who is
    /// resolved ([`Self::resolve_customer`]: a visitor or host user is
    /// created on first sight) only once the request is found valid, so
    /// a refused start leaves no customer behind. Returns that customer
    /// with what the start did.
    ///
    /// # Errors
    /// Those of [`Self::start_customer_chat`], then of
    /// [`Self::resolve_customer`].
    pub async fn start_chat_as(
        &self,
        tenant: TenantId,
        identity: CustomerIdentity,
        request: CustomerChatRequest,
    ) -> Result<(Customer, CustomerChatStarted), ChatError> {
        let chat = self.customer_chat(request)?;
        let customer = self.resolve_customer(tenant, identity).await?;
        let started = self.start_checked_chat(tenant, chat(customer.id)).await?;
        Ok((customer, started))
    }

    /// Checks a customer chat request; the chat, given its customer.
    fn customer_chat(
        &self,
        request: CustomerChatRequest,
    ) -> Result<impl FnOnce(CustomerId) -> NewCustomerChat + use<S>, ChatError> {
        let first_message = request.message.map(|m| self.body(m)).transpose()?;
        let first_message_key = request.client_msg_id.map(ClientMsgId::parse).transpose()?;
        let topic = Topic::parse(&request.topic)?;
        let department = parse_department(request.department)?;
        let contact = request.contact.map(ContactInput::parse).transpose()?;
        let priority = request.priority.unwrap_or(Priority::Normal);
        let client_ip = request.client_ip.map(|ip| ip.chars().take(64).collect());
        let user_agent = request.user_agent.map(|ua| ua.chars().take(512).collect());
        Ok(move |customer| NewCustomerChat {
            customer,
            topic,
            priority,
            department,
            contact,
            first_message,
            first_message_key,
            client_ip,
            user_agent,
        })
    }

    /// [`Self::start_customer_chat`] of a checked request.
    async fn start_checked_chat(
        &self,
        tenant: TenantId,
        chat: NewCustomerChat,
    ) -> Result<CustomerChatStarted, ChatError> {
        let customer = chat.customer;
        // A chat returned as active may close (or be moved by a link)
        // before the message reaches it; the start is then made once more,
        // and creates a chat that carries the message.
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            let started = self
                .store
                .start_customer_chat(tenant, chat.clone(), &self.config.routing)
                .await?;
            let (false, Some(body)) = (started.created, chat.first_message.clone()) else {
                return Ok(started);
            };
            let session = started.view.session.id;
            // The chat's customer: the identified one when a link of this
            // visitor landed just before the start.
            let owner = started.view.session.customer_id.unwrap_or(customer);
            let appended = self
                .store
                .append_message(
                    tenant,
                    session,
                    Sender::Customer(owner),
                    body,
                    chat.first_message_key.clone(),
                    &[SessionStatus::Waiting, SessionStatus::Open],
                )
                .await;
            match appended {
                Ok(appended) => {
                    return Ok(CustomerChatStarted {
                        view: self.store.session_view(tenant, session).await?,
                        created: false,
                        message: Some(appended),
                    });
                }
                Err(ChatError::SessionClosed | ChatError::NotFound) if attempts_left > 0 => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The customer ids a customer's notifications may be addressed to:
    /// `customer` itself, then the visitors linked to it in id order. A
    /// reply's notification names the session's customer at the time of
    /// the reply; when that was a visitor who has since logged in (and was
    /// linked), the identified customer's routes still find it
    /// ([`crate::NotificationInbox`]).
    ///
    /// # Errors
    /// [`ChatError::Storage`].
    pub async fn notification_recipients(
        &self,
        tenant: TenantId,
        customer: CustomerId,
    ) -> Result<Vec<CustomerId>, ChatError> {
        let mut ids = vec![customer];
        ids.extend(self.store.linked_visitors(tenant, customer).await?);
        Ok(ids)
    }

    /// The customer's own session: another customer's (or tenant's) is
    /// [`ChatError::NotFound`], never forbidden. A visitor linked to an
    /// identified customer acts as that customer (README "Linking"), also
    /// when the link moved the session after the caller resolved the
    /// visitor: the visitor's id finds the chats it now owns.
    ///
    /// # Errors
    /// [`ChatError::NotFound`].
    pub async fn customer_session(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        id: SessionId,
    ) -> Result<SessionView, ChatError> {
        let view = self.store.session_view(tenant, id).await?;
        let owner = view.session.customer_id;
        if owner == Some(customer)
            || (owner.is_some()
                && self.linked_customer(tenant, customer).await.map(|c| c.id) == owner)
        {
            Ok(view)
        } else {
            Err(ChatError::NotFound)
        }
    }

    /// The identified customer `customer` was linked to, if it is a
    /// visitor who was (README "Linking"): read when a step as `customer`
    /// found its chat gone, since a link moves the visitor's chats to that
    /// customer, and by a connection that goes on as them. `None` when
    /// `customer` is not a linked visitor, or when the read fails (the
    /// caller then goes on as `customer`).
    pub async fn linked_customer(
        &self,
        tenant: TenantId,
        customer: CustomerId,
    ) -> Option<Customer> {
        match self
            .store
            .resolve_customer(tenant, CustomerIdentity::Known(customer))
            .await
        {
            Ok(linked) if linked.id != customer => Some(linked),
            _ => None,
        }
    }

    /// A customer's message to their WAITING or OPEN session (same rules and
    /// idempotency as agents'). A visitor linked to an identified customer
    /// acts as that customer: when a link moved the chat after the caller
    /// resolved the visitor, the message is stored as the identified
    /// customer's ([`Self::customer_session`]).
    ///
    /// # Errors
    /// As [`Self::post_message`]; [`ChatError::NotFound`] also when the
    /// session is not the customer's.
    pub async fn post_customer_message(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        session: SessionId,
        text: String,
        client_msg_id: Option<String>,
    ) -> Result<AppendedMessage, ChatError> {
        let posted = self
            .submit_customer_message(
                tenant,
                customer,
                session,
                text.clone(),
                client_msg_id.clone(),
            )
            .await;
        // A link of this visitor since the caller resolved them moved the
        // chat to the identified customer: the message is theirs (nothing
        // was stored for the refused attempt).
        if matches!(posted, Err(ChatError::NotFound))
            && let Some(linked) = self.linked_customer(tenant, customer).await
        {
            return self
                .submit_customer_message(tenant, linked.id, session, text, client_msg_id)
                .await;
        }
        posted
    }

    /// As [`Self::post_customer_message`], taking its place in the
    /// session's order at once (as [`Self::submit_message`]).
    pub fn submit_customer_message(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        session: SessionId,
        text: String,
        client_msg_id: Option<String>,
    ) -> PendingAppend {
        self.submit(
            tenant,
            session,
            Sender::Customer(customer),
            text,
            client_msg_id,
            &[SessionStatus::Waiting, SessionStatus::Open],
        )
    }

    /// Messages of the customer's session (as [`Self::list_messages`]).
    ///
    /// # Errors
    /// As [`Self::list_messages`].
    pub async fn list_customer_messages(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        session: SessionId,
        after_seq: Option<i64>,
        limit: Option<i64>,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        self.customer_session(tenant, customer, session).await?;
        self.list_messages(tenant, session, after_seq, limit).await
    }

    /// Sets the session's contact details (seed 001: name and e-mail
    /// required and validated), while the session is not CLOSED (a closed
    /// chat is read-only, as its messages are). Returns the session with
    /// its place in the queue while it waits (a customer typically leaves
    /// an address while in the queue), as [`Self::customer_session`]
    /// gives it; if the place cannot be read now, the contact is stored
    /// all the same and the answer has none.
    ///
    /// # Errors
    /// [`ChatError::InvalidInput`], [`ChatError::NotFound`],
    /// [`ChatError::SessionClosed`].
    pub async fn set_contact(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        session: SessionId,
        contact: ContactInput,
    ) -> Result<SessionView, ChatError> {
        let contact = contact.parse()?;
        self.customer_session(tenant, customer, session).await?;
        let session = self.store.update_contact(tenant, session, contact).await?;
        if session.status == SessionStatus::Waiting
            && let Ok(view) = self.customer_session(tenant, customer, session.id).await
        {
            return Ok(view);
        }
        Ok(SessionView {
            session,
            queue_position: None,
        })
    }

    /// The customer ends the chat (idempotent).
    ///
    /// # Errors
    /// [`ChatError::NotFound`].
    pub async fn close_customer_chat(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        session: SessionId,
    ) -> Result<ChatSession, ChatError> {
        let view = self.customer_session(tenant, customer, session).await?;
        // Closed by the chat's customer: a linked visitor acts as them.
        let closer = view.session.customer_id.unwrap_or(customer);
        self.store
            .close_session(
                tenant,
                session,
                Sender::Customer(closer),
                &self.config.routing,
            )
            .await
    }

    /// The customer's sessions, newest first, `cursor`-paged (the cursor is
    /// opaque: the last session id of the previous page).
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] for a bad `limit` or cursor.
    pub async fn customer_history(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        limit: Option<i64>,
        cursor: Option<String>,
    ) -> Result<HistoryPage, ChatError> {
        let limit = self.page(limit)?;
        let before = crate::parse_cursor::<SessionId>(cursor.as_deref())?;
        let sessions = self
            .store
            .customer_sessions(tenant, customer, before, limit)
            .await?;
        let next_cursor = crate::next_cursor(&sessions, limit, |s| s.id);
        Ok(HistoryPage {
            sessions,
            next_cursor,
        })
    }

    /// Links an anonymous visitor to the identified customer of host user
    /// `user` (seed 001): the visitor's sessions move to that customer; if
    /// both have an active session, one is closed: the customer's when it
    /// is WAITING and the visitor's is OPEN (the conversation an agent is
    /// serving stays), else the visitor's. Never done on
    /// an e-mail a client merely asserts: both credentials are required.
    ///
    /// # Errors
    /// [`ChatError::NotFound`], [`ChatError::InvalidCustomer`].
    pub async fn link_visitor(
        &self,
        tenant: TenantId,
        visitor: CustomerId,
        user: UserId,
    ) -> Result<Customer, ChatError> {
        self.store
            .link_visitor(tenant, visitor, user, &self.config.routing)
            .await
    }

    // ----- real-time connections ----------------------------------------

    /// Records a live connection (issue #4); see
    /// [`ConnectionRepository`](crate::ConnectionRepository).
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn register_connection(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        owner: ConnectionOwner,
        node: &str,
        ttl: std::time::Duration,
    ) -> Result<(), ChatError> {
        self.store
            .register_connections(&[(tenant, id, owner)], node, ttl)
            .await
    }

    /// Records many live connections on `node` at once, and is their
    /// first heartbeat: [`Self::register_connection`] and then
    /// [`Self::touch_connections`]' heartbeats of their agents, for the
    /// connections a node opened together (a reconnect storm after a
    /// restart or a deploy, issue #5): the rows a statement per 100, the
    /// agents a transaction per tenant and 500. Returns the presences to
    /// announce back and the first failure, as [`Self::touch_connections`]
    /// does (the agents' heartbeats run if rows could not be inserted).
    pub async fn register_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        node: &str,
        ttl: std::time::Duration,
    ) -> Renewed {
        let stored = self
            .store
            .register_connections(connections, node, ttl)
            .await;
        let failure = logged("registration", connections.len(), stored).err();
        self.heartbeat_owners(connections, failure).await
    }

    /// Keeps a connection open on `node` alive for `ttl` more (registering
    /// it again if its row is gone, as [`Self::touch_connections`] does);
    /// for agents also a presence heartbeat (DESIGN.md invariant 3).
    ///
    /// A row registered again has no joins (they were purged with it), and
    /// this call does not say so: a host with its own gateway renews
    /// through [`Self::touch_connections`] and joins the sessions of each
    /// connection in [`Renewed::restored`] again, as the library's gateway
    /// does.
    ///
    /// Returns the agent's presence when the tenant's agents were told the
    /// agent went offline ([`Self::announce_offline`]) and this connection
    /// is the agent's return: the caller announces the chosen status again
    /// (once; the announcement is cleared here). `None` otherwise, and for
    /// an agent whose chosen status is `offline` (nothing changed for the
    /// others).
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn touch_connection(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        owner: ConnectionOwner,
        node: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<AgentPresence>, ChatError> {
        let Renewed {
            mut announce,
            failure,
            ..
        } = self
            .touch_connections(&[(tenant, id, owner)], node, ttl)
            .await;
        match failure {
            Some(e) => Err(e),
            None => Ok(announce.pop()),
        }
    }

    /// [`Self::touch_connection`] for many connections at once, of any
    /// tenants (a node's renewals taken together, issue #5): the
    /// connections are renewed a statement per 500, and their agents'
    /// heartbeats a transaction per tenant and 500 agents
    /// ([`PresenceRepository::heartbeat_agents`](crate::PresenceRepository::heartbeat_agents))
    /// instead of three transactions per agent's connection. Returns the
    /// presences to announce back, one per returning agent (not `offline`).
    ///
    /// A failure of one step does not stop the others: the agents'
    /// heartbeats run if the connection rows could not be renewed, and
    /// every tenant's if one tenant's failed (a node's renewals of all its
    /// tenants are one call). Each failure is logged, and the first is
    /// returned in [`Renewed::failure`] beside the presences of the steps
    /// that were stored (their announcements are cleared: the caller
    /// announces them whatever failed). Renewals are repeated at the next
    /// ping.
    ///
    /// The connections (open on `node`) whose rows were gone are registered
    /// again and listed in [`Renewed::restored`]: rows purged after they
    /// expired while the node could not reach the database, whose
    /// connections then counted as gone for as long as they stayed open
    /// (their customers notified of every reply, their agents announced
    /// offline at the close of another tab). Their joins were purged too:
    /// the node joins their sessions again.
    pub async fn touch_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        node: &str,
        ttl: std::time::Duration,
    ) -> Renewed {
        let stored = self.store.touch_connections(connections, node, ttl).await;
        let (restored, failure) = match logged("renewal", connections.len(), stored) {
            Ok(restored) => (restored, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        if !restored.is_empty() {
            tracing::info!(
                connections = restored.len(),
                "open connections whose rows were purged are registered again"
            );
        }
        Renewed {
            restored,
            ..self.heartbeat_owners(connections, failure).await
        }
    }

    /// The heartbeats of the agents owning `connections`, a transaction
    /// per tenant and 500 agents, each tried whatever failed before
    /// (`failure`, the connection rows' step); returns the presences to
    /// announce back with the first failure.
    async fn heartbeat_owners(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        mut failure: Option<ChatError>,
    ) -> Renewed {
        let mut back = Vec::new();
        let agents = agents_by_tenant(connections);
        for (tenant, chunk) in agent_chunks(&agents) {
            match self
                .store
                .heartbeat_agents(tenant, chunk, &self.config.routing)
                .await
            {
                Ok(cleared) => back.extend(
                    cleared
                        .into_iter()
                        .filter(|p| p.status != PresenceStatus::Offline),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, tenant = tenant.get(), agents = chunk.len(), "agents' heartbeats failed");
                    failure.get_or_insert(e);
                }
            }
        }
        Renewed {
            announce: back,
            restored: Vec::new(),
            failure,
        }
    }

    /// The ticket `id` of `tenant`, read through `tickets` (tickets live
    /// outside core: [`crate::TicketDirectory`]).
    ///
    /// # Errors
    /// [`ChatError::TicketPending`] for a ticket whose opening is still in
    /// the outbox (`tickets` does not know it yet: it answered 404, which
    /// read as a wrong id, for the moment after a start ticketed a chat);
    /// [`ChatError::NotFound`] when the tenant has no such ticket; what
    /// `tickets` answers otherwise; [`ChatError::Storage`].
    pub async fn get_ticket(
        &self,
        tickets: &dyn TicketDirectory,
        tenant: TenantId,
        id: TicketId,
    ) -> Result<Ticket, ChatError> {
        match tickets.get_ticket(tenant, id).await {
            Err(ChatError::NotFound) => {
                if self.store.ticket_opening_pending(tenant, id).await? {
                    return Err(ChatError::TicketPending);
                }
                // Delivered between the two reads (the dispatcher writes
                // the ticket before it marks its opening dispatched), or
                // no such ticket.
                tickets.get_ticket(tenant, id).await
            }
            found => found,
        }
    }

    /// `agent` closes the ticket `id` of `tenant`, read through `tickets`
    /// (tickets live outside core: [`crate::TicketDirectory`]). An OPEN
    /// ticket gets a `ticket.closed` event (under its session, if it has
    /// one, so that it is consumed in order with the session's events), and
    /// the ticket sinks close it when the dispatcher handles it (the
    /// default tables then show it CLOSED, with the event's time as
    /// `closed_at`): [`TicketClose::Recorded`] with the ticket as it was.
    /// While an earlier close is still undispatched (a sink failing meanwhile)
    /// no second event is written, and the answer is the same. A CLOSED
    /// ticket is left as it is: [`TicketClose::AlreadyClosed`]. Closes of a
    /// tenant's tickets take its routing lock, so of two at the same moment
    /// one records the event and the other finds it. Tickets addressed to an agent (`agent_offline`)
    /// have no session, and nothing else closes them; a session's ticket
    /// also closes with its session, and closing the ticket leaves the
    /// session as it is.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when the tenant has no such ticket;
    /// [`ChatError::TicketPending`] for a ticket whose opening the
    /// dispatcher has not yet delivered to every sink: one `tickets` does
    /// not know yet (its `ticket.requested` is still in the outbox; it was
    /// 404 before, which read as a wrong id), or one without a session
    /// (nothing would order the close after its opening); what `tickets`
    /// answers otherwise; [`ChatError::Storage`].
    pub async fn close_ticket(
        &self,
        tickets: &dyn TicketDirectory,
        tenant: TenantId,
        agent: UserId,
        id: TicketId,
    ) -> Result<TicketClose, ChatError> {
        let ticket = self.get_ticket(tickets, tenant, id).await?;
        if ticket.status == TicketStatus::Closed {
            return Ok(TicketClose::AlreadyClosed(ticket));
        }
        // `false`: an earlier close is still undispatched; nothing new.
        self.store
            .close_ticket(
                tenant,
                ticket.session_id,
                TicketClosed {
                    ticket_id: ticket.id,
                    tenant_id: tenant,
                    closed_by: agent,
                },
            )
            .await?;
        Ok(TicketClose::Recorded(ticket))
    }

    /// Tickets the WAITING chats without a ticket of `tenant` (`None`: of
    /// every tenant) that no agent online takes (none online, or none who
    /// takes their department): chats that queued behind busy agents
    /// before the last of them left. A chat started with no agent online
    /// gets its ticket at once; this gives one to those that began waiting
    /// while agents were online (README "Tickets when no agent can take a
    /// chat"). Each gets `ticket.requested` (reason `no_agent_online`, its
    /// first customer message as `first_message` and up to
    /// [`crate::TICKET_MESSAGES_MAX`] as `messages`) and `session.updated`
    /// with its `ticket_id`, and
    /// keeps waiting in the queue. An agent's status change away from
    /// `online` does this for its tenant in the same transaction; call it
    /// after an agent's liveness runs out (the WebSocket gateway does, once
    /// the presence grace of a last connection has passed) and in
    /// housekeeping, which catches agents whose liveness ran out unseen (a
    /// crashed node, heartbeats that stopped). Returns the chats ticketed.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only: for one tenant, its failure; for
    /// every tenant (`None`), only when each tenant's attempt failed (the
    /// database is down). One tenant's failure (rows damaged outside the
    /// library, say) is logged and the others are ticketed; a later call
    /// tries it again.
    pub async fn ticket_unattended_chats(
        &self,
        tenant: Option<TenantId>,
    ) -> Result<Vec<ChatSession>, ChatError> {
        self.store
            .ticket_unattended(tenant, &self.config.routing)
            .await
    }

    /// Housekeeping for every tenant: returns the agents whose presence ran
    /// out without a live connection (no heartbeat for the routing
    /// policy's `presence_ttl`: an agent who used only the HTTP routes and
    /// stopped sending heartbeats) and whose chosen status is not
    /// `offline`, each recorded as announced so that one node says it once
    /// and their next heartbeat or connection is announced back
    /// ([`Heartbeat::returned`], [`Renewed::announce`]). Without a presence TTL nothing runs out
    /// and nothing is returned.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn announce_expired_presence(&self) -> Result<Vec<(TenantId, UserId)>, ChatError> {
        let Some(ttl) = self.config.routing.presence_ttl else {
            return Ok(Vec::new());
        };
        let stale_before = crate::model::now() - crate::model::span(ttl);
        self.store.announce_expired_presence(stale_before).await
    }

    /// Housekeeping for every tenant (call it periodically, after
    /// [`Self::announce_expired_presence`]): hands back the OPEN customer
    /// chats of agents gone for the routing policy's `hand_back_after`
    /// since their offline announcement, as if they had chosen `offline`:
    /// each chat is routed to another agent online in queue order or, with
    /// nobody online, waits and is ticketed, and the customer's
    /// connections get `session_updated`. An agent who returned (a
    /// heartbeat, a connection) or chose a status since is left alone, and
    /// agent-started sessions stay (README "Agents who are gone"). Returns
    /// the agents whose chats were handed back, as `(tenant, agent)`.
    /// Without `hand_back_after` or `presence_ttl`, nothing.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only, when every agent's hand-back failed
    /// (the database is down). One agent's failure (rows damaged outside
    /// the library, say) is logged and the others, of every tenant, are
    /// handed back; a later call tries it again.
    pub async fn hand_back_chats_of_absent_agents(
        &self,
    ) -> Result<Vec<(TenantId, UserId)>, ChatError> {
        let policy = &self.config.routing;
        let (Some(after), Some(_)) = (policy.hand_back_after, policy.presence_ttl) else {
            return Ok(Vec::new());
        };
        let announced_before = crate::model::now() - crate::model::span(after);
        self.store
            .hand_back_chats_of_absent_agents(announced_before, policy)
            .await
    }

    /// Decides whether to tell `agent`'s tenant that the agent went
    /// offline, `grace` after their last connection closed
    /// ([`Self::unregister_connection`] with the same `grace`): `true` (and
    /// recorded, so it is said once) when the agent has a presence with a
    /// chosen status other than `offline`, still no live connection on any
    /// node, and no sign of life since: their liveness ran out (with a
    /// presence TTL), or nothing was heard from them for `grace` (without
    /// one). So the grace counts from the agent's latest close: an agent
    /// who reconnected and left again is not announced by the first
    /// close's check, and the latest close's check announces them. Their
    /// next connection clears the announcement and is announced
    /// ([`Self::touch_connection`]).
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn announce_offline(
        &self,
        tenant: TenantId,
        agent: UserId,
        grace: std::time::Duration,
    ) -> Result<bool, ChatError> {
        let recorded = self
            .store
            .announce_offline(tenant, &[agent], Some(self.quiet_since(grace)))
            .await?;
        Ok(!recorded.is_empty())
    }

    /// What follows `grace` after the last connections of `agents` (as
    /// `(tenant, agent)`) closed: [`Self::announce_offline`] for each, and
    /// then, their liveness having run out, [`Self::ticket_unattended_chats`]
    /// for each of their tenants (the chats left waiting become tickets if
    /// they were its last agents online). The agents gone from a node's
    /// connections closed together (issue #5) share it: their
    /// announcements are recorded a transaction per tenant and 500 agents
    /// instead of one each, and each tenant's waiting chats are looked at
    /// once. `recorded` is called with each transaction's agents as soon as
    /// it committed (by tenant and id), to announce them then, once. A
    /// transaction that fails is tried again an agent at a time; an agent
    /// whose announcement still fails is logged and left out (not
    /// announced; with a presence TTL the housekeeping's
    /// [`Self::announce_expired_presence`] announces them later), and so is
    /// a tenant whose chats could not be ticketed (the housekeeping's
    /// [`Self::ticket_unattended_chats`] tickets them later).
    pub async fn agents_gone(
        &self,
        agents: &[(TenantId, UserId)],
        grace: std::time::Duration,
        recorded: impl FnMut(TenantId, &[UserId]),
    ) {
        self.record_offline(
            agents.iter().copied(),
            Some(self.quiet_since(grace)),
            recorded,
        )
        .await;
        let tenants: std::collections::BTreeSet<TenantId> =
            agents.iter().map(|&(tenant, _)| tenant).collect();
        for tenant in tenants {
            if let Err(e) = self.ticket_unattended_chats(Some(tenant)).await {
                tracing::warn!(error = %e, tenant = tenant.get(), "could not ticket waiting chats");
            }
        }
    }

    /// The time before which nothing may have been heard from an agent
    /// announced offline `grace` after their last connection closed: their
    /// liveness ran out (with a presence TTL, which their close lowered to
    /// `grace` from then), or `grace` ago (without one).
    fn quiet_since(&self, grace: std::time::Duration) -> chrono::DateTime<chrono::Utc> {
        let quiet_for = self.config.routing.presence_ttl.unwrap_or(grace);
        crate::model::now() - crate::model::span(quiet_for)
    }

    /// Records the offline announcements of `agents` (see
    /// [`crate::PresenceRepository::announce_offline`]) a transaction per
    /// tenant and 500 agents, each passed to `recorded` once committed; a
    /// failed transaction's agents are tried again one by one, and the
    /// failures logged.
    async fn record_offline(
        &self,
        agents: impl IntoIterator<Item = (TenantId, UserId)>,
        stale_before: Option<chrono::DateTime<chrono::Utc>>,
        mut recorded: impl FnMut(TenantId, &[UserId]),
    ) {
        let agents = by_tenant(agents);
        for (tenant, chunk) in agent_chunks(&agents) {
            let e = match self
                .store
                .announce_offline(tenant, chunk, stale_before)
                .await
            {
                Ok(done) => {
                    recorded(tenant, &done);
                    continue;
                }
                Err(e) => e,
            };
            tracing::warn!(error = %e, tenant = tenant.get(), agents = chunk.len(), "agents' offline announcements failed together: trying each");
            for &agent in chunk {
                match self
                    .store
                    .announce_offline(tenant, &[agent], stale_before)
                    .await
                {
                    Ok(done) => recorded(tenant, &done),
                    Err(e) => tracing::warn!(
                        error = %e,
                        tenant = tenant.get(),
                        agent = agent.get(),
                        "agent's offline announcement not recorded"
                    ),
                }
            }
        }
    }

    /// The connection follows a session it may see (call after the
    /// access check of [`Self::get_session`] / [`Self::customer_session`]).
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn follow_session(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        session: SessionId,
    ) -> Result<(), ChatError> {
        self.store.join_session(tenant, id, session).await
    }

    /// The connection stops following a session.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn unfollow_session(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        session: SessionId,
    ) -> Result<(), ChatError> {
        self.store.leave_session(tenant, id, session).await
    }

    /// Removes a closed connection; when it was an agent's last one, their
    /// liveness runs out after `grace` (no flap on a quick reconnect).
    /// `silent_since`: the client had not been heard from since then and
    /// the node closed the connection for it (no heartbeat): a customer's
    /// replies stored since, which the client may never have received,
    /// become notifications (`message.missed`) unless another of their
    /// connections follows the chat
    /// ([`ConnectionRepository::unregister_connection`](crate::ConnectionRepository::unregister_connection)).
    /// Returns whether an agent has no connection left.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn unregister_connection(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        owner: ConnectionOwner,
        grace: std::time::Duration,
        silent_since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<bool, ChatError> {
        let missed = self
            .store
            .unregister_connection(tenant, id, silent_since)
            .await?;
        if missed > 0 {
            tracing::info!(
                replies = missed,
                "replies sent to a connection that went silent are to be notified"
            );
        }
        match owner {
            ConnectionOwner::Agent(agent) => {
                Ok(!self.agents_left(tenant, &[agent], grace).await?.is_empty())
            }
            ConnectionOwner::Customer(_) => Ok(false),
        }
    }

    /// [`Self::unregister_connection`] without `silent_since`, for many
    /// connections at once (a node's clients closing together: a deploy,
    /// a network blip, issue #5): the rows and their joins are removed a
    /// transaction per 500
    /// ([`ConnectionRepository::unregister_connections`](crate::ConnectionRepository::unregister_connections)),
    /// then each agent owning one is checked as one connection's close
    /// checks them. Returns the agents whose last connection closed
    /// (their grace period started; the caller announces them gone after
    /// it), and the first failure, each step tried whatever failed before
    /// (a failure to remove the rows leaves them to expire, and their
    /// agents connected until then).
    pub async fn unregister_connections(
        &self,
        connections: &[(TenantId, uuid::Uuid, ConnectionOwner)],
        grace: std::time::Duration,
    ) -> Unregistered {
        let removed = self
            .store
            .unregister_connections(&connection_ids(connections))
            .await;
        let mut failure = logged("removal", connections.len(), removed).err();
        let mut gone = Vec::new();
        let agents = agents_by_tenant(connections);
        for (tenant, chunk) in agent_chunks(&agents) {
            match self.agents_left(tenant, chunk, grace).await {
                Ok(left) => gone.extend(left.into_iter().map(|agent| (tenant, agent))),
                Err(e) => {
                    tracing::warn!(error = %e, tenant = tenant.get(), agents = chunk.len(), "agents' liveness not expired");
                    failure.get_or_insert(e);
                }
            }
        }
        Unregistered { gone, failure }
    }

    /// After connections of `agents` of `tenant` closed: those with no
    /// live connection left on any node have their liveness run out
    /// `grace` from now (one read and one transaction for all), and are
    /// returned.
    async fn agents_left(
        &self,
        tenant: TenantId,
        agents: &[UserId],
        grace: std::time::Duration,
    ) -> Result<Vec<UserId>, ChatError> {
        let connected: std::collections::HashSet<UserId> = self
            .store
            .connected_agents(tenant, agents)
            .await?
            .into_iter()
            .collect();
        let left: Vec<UserId> = agents
            .iter()
            .copied()
            .filter(|agent| !connected.contains(agent))
            .collect();
        if !left.is_empty() {
            self.store
                .expire_liveness(tenant, &left, grace, &self.config.routing)
                .await?;
        }
        Ok(left)
    }

    /// Housekeeping for every tenant: deletes the outbox's settled events
    /// (dispatched to every consumer, or failed for good) older than
    /// `retention`, [`OUTBOX_PRUNE_BATCH`] events a statement until none
    /// is left, and returns how many it deleted. The outbox otherwise
    /// keeps every event ever written (each message's among them, with its
    /// text), growing without bound. What the events told stays in the
    /// sessions, messages, tickets and notifications; an event not yet
    /// settled (a webhook down for days) stays whatever its age.
    /// [`OutboxRepository::list_events`](crate::OutboxRepository::list_events)
    /// reads back as far as the retention; the purge of a crashed node's
    /// connections needs the events of one connection TTL
    /// ([`Self::purge_expired_connections`]).
    ///
    /// # Errors
    /// [`ChatError::InvalidInput`] for a retention under
    /// [`MIN_OUTBOX_RETENTION`] (a day); [`ChatError::Storage`] when a
    /// statement failed (the batches before it stay deleted).
    pub async fn prune_outbox(&self, retention: std::time::Duration) -> Result<u64, ChatError> {
        if retention < MIN_OUTBOX_RETENTION {
            return Err(ChatError::InvalidInput(
                "the outbox retention is a day at least".into(),
            ));
        }
        let before = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|retention| crate::model::now().checked_sub_signed(retention))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        let mut pruned = 0;
        loop {
            let deleted = self.store.prune_events(before, OUTBOX_PRUNE_BATCH).await?;
            pruned += deleted;
            if deleted < OUTBOX_PRUNE_BATCH {
                return Ok(pruned);
            }
        }
    }

    /// Housekeeping for every tenant: deletes the connection rows whose TTL
    /// ran out (those of crashed nodes; a node renews its own at every
    /// ping) and returns the agents to announce offline: those among them
    /// with a presence, no live connection left, no standing announcement
    /// and (with a presence TTL) nothing heard from them within it, each
    /// recorded as announced ([`Self::announce_offline`]) so that only one
    /// node says it and their next connection is announced back. Without
    /// this, an agent of a crashed node would stay online in the others'
    /// view. A row purged while its connection is still open (its node cut
    /// off from the database for longer than the TTL) is registered again
    /// at its next renewal ([`Self::touch_connections`]).
    ///
    /// `connection_ttl` is the TTL nodes register and renew connections
    /// with (`RealtimeConfig::connection_ttl` of `livechat-poem`): agents'
    /// replies stored since an expired customer connection's last renewal,
    /// in a session no live customer connection follows, get a
    /// `message.missed` event, which the ticket bridge turns into the
    /// notification the customer would have had without that connection
    /// ([`ConnectionRepository::purge_expired_connections`](crate::ConnectionRepository::purge_expired_connections)).
    ///
    /// # Errors
    /// [`ChatError::Storage`] when the rows could not be read or deleted
    /// (then nothing is deleted). An agent whose announcement could not be
    /// recorded is logged and left out (not announced; their presence still
    /// runs out by its TTL), so that every announcement recorded is
    /// returned.
    pub async fn purge_expired_connections(
        &self,
        connection_ttl: std::time::Duration,
    ) -> Result<Vec<(TenantId, UserId)>, ChatError> {
        let purged = self.purge_connection_rows(connection_ttl, false).await?;
        // An agent heard from within the presence TTL (their liveness is
        // renewed apart from their connections: a heartbeat call, a status
        // change) is not announced for their connections' expiry; if they
        // go quiet, housekeeping announces them once their liveness runs
        // out (`Self::announce_expired_presence`).
        let stale_before = self
            .config
            .routing
            .presence_ttl
            .map(|ttl| crate::model::now() - crate::model::span(ttl));
        let mut offline = Vec::new();
        self.record_offline(purged.agents, stale_before, |tenant, agents| {
            offline.extend(agents.iter().map(|&agent| (tenant, agent)));
        })
        .await;
        Ok(offline)
    }

    /// [`Self::purge_expired_connections`] for a node that cannot tell
    /// the agents (it has no gateway, no bus to announce on): deletes the
    /// expired customer rows and writes the `message.missed` events of
    /// their replies, but leaves agents' rows, and their offline
    /// announcement, to a node that can (recorded here, it would be made
    /// by none; deleted here, the other nodes' purges would not find it).
    ///
    /// # Errors
    /// [`ChatError::Storage`] when the rows could not be read or deleted
    /// (then nothing is deleted).
    pub async fn purge_expired_connections_unannounced(
        &self,
        connection_ttl: std::time::Duration,
    ) -> Result<(), ChatError> {
        self.purge_connection_rows(connection_ttl, true)
            .await
            .map(drop)
    }

    async fn purge_connection_rows(
        &self,
        connection_ttl: std::time::Duration,
        customers_only: bool,
    ) -> Result<crate::repository::PurgedConnections, ChatError> {
        let purged = self
            .store
            .purge_expired_connections(connection_ttl, customers_only)
            .await?;
        if purged.missed_replies > 0 {
            tracing::info!(
                replies = purged.missed_replies,
                "replies followed only by expired customer connections are to be notified"
            );
        }
        Ok(purged)
    }

    /// Whether `agent` has a live connection on any node.
    ///
    /// # Errors
    /// [`ChatError::Storage`] only.
    pub async fn agent_connected(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<bool, ChatError> {
        Ok(!self
            .store
            .connected_agents(tenant, &[agent])
            .await?
            .is_empty())
    }

    /// Live connections of a session across all nodes (seed 002).
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when the session is not in this tenant.
    pub async fn session_connections(
        &self,
        tenant: TenantId,
        session: SessionId,
    ) -> Result<SessionConnections, ChatError> {
        self.store.get_session(tenant, session).await?;
        self.store.session_connections(tenant, session).await
    }
}
