//! Model-based tests: random sequences of chat operations through
//! `ChatService` on a real database (proptest), checked after every step
//! against a model of what was stored and against DESIGN.md's invariants:
//! tenant isolation (1), one active session (2), eligibility in routing and
//! the ticket fallback (3, README "Departments", "Tickets when no agent can
//! take a chat"), ordered gap-free messages (4), an outbox event for every
//! message (5) and idempotent sends (6).
//!
//! Two tenants share agent ids, customer browser ids and keys, so a leak
//! between them shows. A failing case is shrunk to a short sequence and
//! printed with the step that broke a rule.

use std::collections::HashMap;

use livechat_core::{
    AppendedMessage, AssignMode, ChatError, ChatMessage, ChatService, CustomerChatRequest,
    CustomerId, CustomerIdentity, PresenceStatus, Priority, SenderType, SessionFilter, SessionId,
    SessionOrigin, SessionStatus, SessionView, store::SeaOrmStore,
};
use livechat_tests::{App, Backend, check_property, t, test_runtime, u};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use sea_orm::{ConnectionTrait, Statement};

const TENANTS: usize = 2;
const AGENTS: i64 = 3;
/// Anonymous visitors, then identified host users: the customers of
/// each tenant, by slot.
const VISITORS: usize = 4;
const USERS: usize = 2;
const CUSTOMERS: usize = VISITORS + USERS;
const DEPARTMENTS: [&str; 2] = ["Sales", "Billing"];

/// One step a test sequence takes. Indices pick among the tenant's
/// sessions (modulo their count), customers and departments.
#[derive(Clone, Debug)]
enum Op {
    Status {
        tenant: usize,
        agent: i64,
        status: PresenceStatus,
        departments: Option<Vec<usize>>,
    },
    Capacity {
        tenant: usize,
        capacity: i64,
    },
    CustomerStart {
        tenant: usize,
        customer: usize,
        department: Option<usize>,
        priority: Priority,
        message: bool,
        key: Option<u8>,
    },
    CustomerSend {
        tenant: usize,
        customer: usize,
        key: Option<u8>,
    },
    CustomerClose {
        tenant: usize,
        customer: usize,
    },
    AgentStart {
        tenant: usize,
        agent: i64,
    },
    AgentSend {
        tenant: usize,
        agent: i64,
        session: usize,
        key: Option<u8>,
    },
    Assign {
        tenant: usize,
        agent: i64,
        session: usize,
        mode: AssignMode,
    },
    AgentClose {
        tenant: usize,
        agent: i64,
        session: usize,
    },
    /// A visitor logs in as a host user (README "Linking").
    Link {
        tenant: usize,
        visitor: usize,
        user: usize,
    },
    /// A customer leaves contact details on their latest chat.
    Contact {
        tenant: usize,
        customer: usize,
    },
    /// An agent closes one of the tenant's tickets.
    CloseTicket {
        tenant: usize,
        agent: i64,
        ticket: usize,
    },
    /// The ticket bridge's dispatcher handles what the outbox holds.
    Dispatch,
}

fn op() -> impl Strategy<Value = Op> {
    // Most steps in the first tenant, so its chats queue and move; the
    // second keeps its own, which must never show in the first.
    let tenant = prop_oneof![3 => Just(0usize), 1 => Just(1usize)];
    let agent = 1..=AGENTS;
    let key = proptest::option::of(0u8..3);
    let status = prop_oneof![
        4 => Just(PresenceStatus::Online),
        1 => Just(PresenceStatus::Away),
        1 => Just(PresenceStatus::Busy),
        2 => Just(PresenceStatus::Offline),
    ];
    let departments = proptest::option::of(proptest::collection::vec(0..DEPARTMENTS.len(), 0..=2));
    let priority = prop_oneof![
        Just(Priority::Low),
        Just(Priority::Normal),
        Just(Priority::High),
        Just(Priority::Urgent),
    ];
    let mode = prop_oneof![Just(AssignMode::Claim), Just(AssignMode::Transfer)];
    prop_oneof![
        3 => (tenant.clone(), agent.clone(), status, departments).prop_map(
            |(tenant, agent, status, departments)| Op::Status { tenant, agent, status, departments }
        ),
        1 => (tenant.clone(), 1i64..=3).prop_map(|(tenant, capacity)| Op::Capacity { tenant, capacity }),
        4 => (
            tenant.clone(),
            0..CUSTOMERS,
            proptest::option::of(0..DEPARTMENTS.len()),
            priority,
            any::<bool>(),
            key.clone(),
        )
            .prop_map(|(tenant, customer, department, priority, message, key)| {
                Op::CustomerStart { tenant, customer, department, priority, message, key }
            }),
        3 => (tenant.clone(), 0..CUSTOMERS, key.clone())
            .prop_map(|(tenant, customer, key)| Op::CustomerSend { tenant, customer, key }),
        1 => (tenant.clone(), 0..CUSTOMERS)
            .prop_map(|(tenant, customer)| Op::CustomerClose { tenant, customer }),
        1 => (tenant.clone(), agent.clone()).prop_map(|(tenant, agent)| Op::AgentStart { tenant, agent }),
        3 => (tenant.clone(), agent.clone(), any::<usize>(), key)
            .prop_map(|(tenant, agent, session, key)| Op::AgentSend { tenant, agent, session, key }),
        2 => (tenant.clone(), agent.clone(), any::<usize>(), mode)
            .prop_map(|(tenant, agent, session, mode)| Op::Assign { tenant, agent, session, mode }),
        1 => (tenant.clone(), agent, any::<usize>())
            .prop_map(|(tenant, agent, session)| Op::AgentClose { tenant, agent, session }),
        1 => (tenant.clone(), 0..VISITORS, 0..USERS)
            .prop_map(|(tenant, visitor, user)| Op::Link { tenant, visitor, user }),
        1 => (tenant.clone(), 0..CUSTOMERS)
            .prop_map(|(tenant, customer)| Op::Contact { tenant, customer }),
        1 => (tenant, 1..=AGENTS, any::<usize>())
            .prop_map(|(tenant, agent, ticket)| Op::CloseTicket { tenant, agent, ticket }),
        1 => Just(Op::Dispatch),
    ]
}

/// Who sent a message, as the idempotency rule compares senders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Agent(i64),
    Customer(CustomerId),
}

/// A message the model expects stored.
#[derive(Clone, Debug)]
struct Expected {
    id: livechat_core::MessageId,
    seq: i64,
    text: String,
    key: Option<String>,
    who: Who,
}

/// What the model knows of one tenant.
#[derive(Debug, Default)]
struct TenantModel {
    /// Each agent's chosen status and departments, as last set.
    status: HashMap<i64, PresenceStatus>,
    departments: HashMap<i64, Vec<String>>,
    /// The per-agent capacity as last set (`None`: the default).
    capacity: Option<i64>,
    /// Each slot's customer as first resolved: a visitor's own id stays
    /// theirs after a link, and resolves to the user's.
    customers: Vec<CustomerId>,
    /// Every session of the tenant, in creation order.
    sessions: Vec<SessionId>,
    /// Each session's messages, in `seq` order.
    messages: HashMap<SessionId, Vec<Expected>>,
    /// The tickets of agent starts refused as the agent was not online:
    /// the ticket and the agent it is addressed to.
    addressed: Vec<(livechat_core::TicketId, i64)>,
    /// Tickets whose close an agent had recorded.
    closed_tickets: Vec<livechat_core::TicketId>,
}

struct Run {
    app: App,
    /// The dispatcher the model's `Dispatch` steps and its end run: the
    /// app's (the tables) unless a case brings its own sinks.
    dispatcher: Option<livechat_ticket_bridge::Dispatcher<SeaOrmStore>>,
    /// A second node on the same PostgreSQL database (its own pool and
    /// append queue), for the concurrent cases; `None` on SQLite, which
    /// one process serves.
    second: Option<ChatService<SeaOrmStore>>,
    tenants: Vec<TenantModel>,
    /// Message texts are unique, so a misplaced message is named.
    counter: u64,
}

/// The error's variant, for comparing outcomes.
fn kind(e: &ChatError) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn fail(step: usize, op: &Op, what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("after step {step} ({op:?}): {what}"))
}

impl Run {
    fn chat(&self) -> &ChatService<SeaOrmStore> {
        &self.app.chat
    }

    fn dispatcher(&self) -> &livechat_ticket_bridge::Dispatcher<SeaOrmStore> {
        self.dispatcher.as_ref().unwrap_or(&self.app.dispatcher)
    }

    /// Runs the dispatcher until the outbox is empty.
    async fn drain(&self) {
        livechat_tests::drain_outbox(self.dispatcher(), &self.app.db).await;
    }

    fn key(k: Option<u8>) -> Option<String> {
        k.map(|k| format!("key-{k}"))
    }

    fn text(&mut self) -> String {
        self.counter += 1;
        format!("message {}", self.counter)
    }

    /// A session of the tenant: mostly one still WAITING or OPEN, where
    /// the rules have the most to decide, sometimes any.
    async fn pick(&self, tenant: usize, index: usize) -> Option<SessionId> {
        let sessions = &self.tenants[tenant].sessions;
        if sessions.is_empty() {
            return None;
        }
        let mut active: Vec<SessionId> = self
            .sessions(tenant)
            .await
            .iter()
            .filter(|v| v.session.is_active())
            .map(|v| v.session.id)
            .collect();
        active.sort();
        if !index.is_multiple_of(4) && !active.is_empty() {
            Some(active[(index / 4) % active.len()])
        } else {
            Some(sessions[index % sessions.len()])
        }
    }

    async fn session(&self, tenant: usize, id: SessionId) -> SessionView {
        self.chat()
            .get_session(tid(tenant), id)
            .await
            .expect("a session of the model reads back")
    }

    /// What the model expects of a send with `key` by `who` before its
    /// status is considered: the original (a retry) or a refusal (another
    /// participant's key), `None` when the key is new or absent.
    fn keyed(
        &self,
        tenant: usize,
        session: SessionId,
        key: Option<&String>,
        who: Who,
    ) -> Option<Result<livechat_core::MessageId, String>> {
        let key = key?;
        let log = self.tenants[tenant].messages.get(&session)?;
        let original = log.iter().find(|m| m.key.as_ref() == Some(key))?;
        // A customer's retry finds any customer message of the session
        // (a visitor's message stays the customer's after a link).
        let same = match (original.who, who) {
            (Who::Customer(_), Who::Customer(_)) => true,
            (a, b) => a == b,
        };
        Some(if same {
            Ok(original.id)
        } else {
            Err("ClientMsgIdTaken".to_owned())
        })
    }

    /// Checks a send's outcome against the model and records a stored
    /// message. `open_only`: an agent's send (WAITING is refused).
    #[allow(clippy::too_many_arguments)]
    fn settle_send(
        &mut self,
        tenant: usize,
        session: SessionId,
        status: SessionStatus,
        open_only: bool,
        who: Who,
        text: String,
        key: Option<String>,
        got: Result<AppendedMessage, ChatError>,
    ) -> Result<(), String> {
        let expected = match self.keyed(tenant, session, key.as_ref(), who) {
            Some(Ok(original)) => Ok(Some(original)),
            Some(Err(e)) => Err(e),
            None => match status {
                SessionStatus::Closed => Err("SessionClosed".to_owned()),
                SessionStatus::Waiting if open_only => Err("SessionNotOpen".to_owned()),
                _ => Ok(None),
            },
        };
        match (expected, got) {
            (Ok(Some(original)), Ok(appended)) => {
                if appended.created || appended.message.id != original {
                    return Err(format!(
                        "a retry with its key stored anew or returned another message: {appended:?}"
                    ));
                }
            }
            (Ok(None), Ok(appended)) => {
                let log = self.tenants[tenant].messages.entry(session).or_default();
                let want_seq = i64::try_from(log.len()).unwrap() + 1;
                if !appended.created
                    || appended.message.seq != want_seq
                    || appended.message.message != text
                {
                    return Err(format!(
                        "expected a new message with seq {want_seq}, got {appended:?}"
                    ));
                }
                log.push(Expected {
                    id: appended.message.id,
                    seq: appended.message.seq,
                    text,
                    key,
                    who,
                });
            }
            (Err(want), Err(e)) if kind(&e) == want => {}
            (want, got) => return Err(format!("expected {want:?}, got {got:?}")),
        }
        Ok(())
    }

    async fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Status {
                tenant,
                agent,
                status,
                ref departments,
            } => {
                let departments = departments
                    .as_ref()
                    .map(|ds| ds.iter().map(|&d| DEPARTMENTS[d].to_owned()).collect());
                let presence = self
                    .chat()
                    .set_agent_presence(tid(tenant), u(agent), status, departments.clone())
                    .await
                    .map_err(|e| format!("status refused: {e:?}"))?;
                let model = &mut self.tenants[tenant];
                model.status.insert(agent, status);
                if let Some(mut ds) = departments {
                    ds.dedup();
                    model.departments.insert(agent, ds);
                }
                let want = model.departments.get(&agent).cloned().unwrap_or_default();
                let mut got = presence.departments.clone();
                let mut want_sorted = want;
                got.sort();
                want_sorted.sort();
                want_sorted.dedup();
                if presence.status != status || got != want_sorted {
                    return Err(format!("presence reads back as {presence:?}"));
                }
            }
            Op::Capacity { tenant, capacity } => {
                let got = self
                    .chat()
                    .set_agent_capacity(tid(tenant), capacity)
                    .await
                    .map_err(|e| format!("capacity refused: {e:?}"))?;
                if got != capacity {
                    return Err(format!("capacity reads back as {got}"));
                }
                self.tenants[tenant].capacity = Some(capacity);
            }
            Op::CustomerStart {
                tenant,
                customer,
                department,
                priority,
                message,
                key,
            } => {
                self.customer_start(tenant, customer, department, priority, message, key)
                    .await?
            }
            Op::CustomerSend {
                tenant,
                customer,
                key,
            } => {
                let customer = self.current(tenant, customer).await?;
                let Some(session) = self.latest_of(tenant, customer).await else {
                    return Ok(());
                };
                let status = self.session(tenant, session).await.session.status;
                let text = self.text();
                let key = Self::key(key);
                let got = self
                    .chat()
                    .post_customer_message(
                        tid(tenant),
                        customer,
                        session,
                        text.clone(),
                        key.clone(),
                    )
                    .await;
                self.settle_send(
                    tenant,
                    session,
                    status,
                    false,
                    Who::Customer(customer),
                    text,
                    key,
                    got,
                )?;
            }
            Op::CustomerClose { tenant, customer } => {
                let customer = self.current(tenant, customer).await?;
                let Some(session) = self.latest_of(tenant, customer).await else {
                    return Ok(());
                };
                let closed = self
                    .chat()
                    .close_customer_chat(tid(tenant), customer, session)
                    .await
                    .map_err(|e| format!("customer close refused: {e:?}"))?;
                if closed.status != SessionStatus::Closed {
                    return Err(format!("closed chat reads {closed:?}"));
                }
            }
            Op::AgentStart { tenant, agent } => {
                let online =
                    self.tenants[tenant].status.get(&agent) == Some(&PresenceStatus::Online);
                let has_open = self.has_open_agent_session(tenant, agent).await;
                let got = self.chat().start_session(tid(tenant), u(agent), None).await;
                match got {
                    Ok(session) if online && !has_open => {
                        if session.status != SessionStatus::Open
                            || session.agent_id != Some(u(agent))
                            || session.origin != SessionOrigin::Agent
                        {
                            return Err(format!("agent start gave {session:?}"));
                        }
                        self.tenants[tenant].sessions.push(session.id);
                    }
                    Err(ChatError::AgentOffline { ticket_id, .. }) if !online => {
                        self.tenants[tenant].addressed.push((ticket_id, agent));
                    }
                    Err(ChatError::ActiveSessionExists(_)) if online && has_open => {}
                    other => {
                        return Err(format!(
                            "agent start (online {online}, open already {has_open}): {other:?}"
                        ));
                    }
                }
            }
            Op::AgentSend {
                tenant,
                agent,
                session,
                key,
            } => {
                let Some(session) = self.pick(tenant, session).await else {
                    return Ok(());
                };
                let status = self.session(tenant, session).await.session.status;
                let text = self.text();
                let key = Self::key(key);
                let got = self
                    .chat()
                    .post_message(tid(tenant), u(agent), session, text.clone(), key.clone())
                    .await;
                self.settle_send(
                    tenant,
                    session,
                    status,
                    true,
                    Who::Agent(agent),
                    text,
                    key,
                    got,
                )?;
            }
            Op::Assign {
                tenant,
                agent,
                session,
                mode,
            } => self.assign(tenant, agent, session, mode).await?,
            Op::Link {
                tenant,
                visitor,
                user,
            } => self.link(tenant, visitor, user).await?,
            Op::Contact { tenant, customer } => {
                let customer = self.current(tenant, customer).await?;
                let Some(session) = self.latest_of(tenant, customer).await else {
                    return Ok(());
                };
                let status = self.session(tenant, session).await.session.status;
                let got = self
                    .chat()
                    .set_contact(tid(tenant), customer, session, Self::contact(customer))
                    .await;
                match got {
                    Ok(s)
                        if status != SessionStatus::Closed
                            && s.session.contact.as_ref().map(|c| c.name.clone())
                                == Some(format!("Customer {customer}")) => {}
                    Err(ChatError::SessionClosed) if status == SessionStatus::Closed => {}
                    other => return Err(format!("contact on a {status:?} chat: {other:?}")),
                }
            }
            Op::CloseTicket {
                tenant,
                agent,
                ticket,
            } => {
                if let Some(id) = self
                    .close_ticket(self.chat(), tenant, agent, ticket)
                    .await?
                {
                    self.tenants[tenant].closed_tickets.push(id);
                }
            }
            Op::Dispatch => self.drain().await,
            Op::AgentClose {
                tenant,
                agent,
                session,
            } => {
                let Some(session) = self.pick(tenant, session).await else {
                    return Ok(());
                };
                let closed = self
                    .chat()
                    .close_session(tid(tenant), u(agent), session)
                    .await
                    .map_err(|e| format!("close refused: {e:?}"))?;
                if closed.status != SessionStatus::Closed || closed.closed_at.is_none() {
                    return Err(format!("closed session reads {closed:?}"));
                }
            }
        }
        Ok(())
    }

    async fn customer_start(
        &mut self,
        tenant: usize,
        customer: usize,
        department: Option<usize>,
        priority: Priority,
        message: bool,
        key: Option<u8>,
    ) -> Result<(), String> {
        let customer = self.current(tenant, customer).await?;
        let active = self.active_of(tenant, customer).await;
        let text = message.then(|| self.text());
        let key = Self::key(key);
        let request = CustomerChatRequest {
            topic: "Order".into(),
            priority: Some(priority),
            department: department.map(|d| DEPARTMENTS[d].to_owned()),
            message: text.clone(),
            client_msg_id: key.clone(),
            ..Default::default()
        };
        let got = self
            .chat()
            .start_customer_chat(tid(tenant), customer, request)
            .await;
        match active {
            Some(active) => {
                // One active chat per customer: that chat comes back, and
                // the message joins it under the send rules.
                let outcome = match got {
                    Ok(started) => {
                        if started.created || started.view.session.id != active.id {
                            return Err(format!(
                                "a second active chat for one customer: {started:?}"
                            ));
                        }
                        started.message.ok_or(None)
                    }
                    Err(e) => Err(Some(e)),
                };
                if let Some(text) = text {
                    let got = match outcome {
                        Ok(appended) => Ok(appended),
                        Err(Some(e)) => Err(e),
                        Err(None) => return Err("the start's message was dropped".into()),
                    };
                    self.settle_send(
                        tenant,
                        active.id,
                        active.status,
                        false,
                        Who::Customer(customer),
                        text,
                        key,
                        got,
                    )?;
                } else if let Err(Some(e)) = outcome {
                    return Err(format!("a start without a message: {e:?}"));
                }
            }
            None => {
                let started = got.map_err(|e| format!("start refused: {e:?}"))?;
                let session = started.view.session.clone();
                if !started.created
                    || session.customer_id != Some(customer)
                    || session.origin != SessionOrigin::Customer
                    || session.department.as_deref() != department.map(|d| DEPARTMENTS[d])
                {
                    return Err(format!("a new chat reads {started:?}"));
                }
                let model = &mut self.tenants[tenant];
                model.sessions.push(session.id);
                if let Some(text) = text {
                    let appended = started.message.ok_or("the start's message was dropped")?;
                    self.settle_send(
                        tenant,
                        session.id,
                        SessionStatus::Waiting,
                        false,
                        Who::Customer(customer),
                        text,
                        key,
                        Ok(appended),
                    )?;
                }
                // Routed only to an agent who could take it at the start.
                if let Some(agent) = session.agent_id {
                    let agent = agent.get();
                    let load = self.load(tenant).await;
                    let model = &self.tenants[tenant];
                    if !self.serves(tenant, agent, session.department.as_deref())
                        || model.status.get(&agent) != Some(&PresenceStatus::Online)
                        || load.get(&agent).copied().unwrap_or(0) > self.capacity(tenant)
                    {
                        return Err(format!(
                            "routed to agent {agent}, who could not take it: {session:?}, load {load:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    async fn assign(
        &mut self,
        tenant: usize,
        agent: i64,
        session: usize,
        mode: AssignMode,
    ) -> Result<(), String> {
        let Some(session) = self.pick(tenant, session).await else {
            return Ok(());
        };
        let before = self.session(tenant, session).await.session;
        let online = self.tenants[tenant].status.get(&agent) == Some(&PresenceStatus::Online);
        let taken = before.origin == SessionOrigin::Agent
            && before.agent_id != Some(u(agent))
            && self.has_open_agent_session(tenant, agent).await;
        let got = match mode {
            AssignMode::Claim => {
                self.chat()
                    .assign_session(tid(tenant), u(agent), session, None)
                    .await
            }
            AssignMode::Transfer => {
                // A colleague hands the chat over.
                let caller = u(agent % AGENTS + 1);
                self.chat()
                    .assign_session(tid(tenant), caller, session, Some(u(agent)))
                    .await
            }
        };
        let want = match before.status {
            SessionStatus::Closed => Err("SessionClosed"),
            SessionStatus::Open if before.agent_id == Some(u(agent)) => Ok(()),
            SessionStatus::Open if mode == AssignMode::Claim => Err("AlreadyAssigned"),
            _ if !online => Err("AgentNotOnline"),
            _ if taken => Err("ActiveSessionExists"),
            _ => Ok(()),
        };
        match (want, got) {
            (Ok(()), Ok(s)) if s.status == SessionStatus::Open && s.agent_id == Some(u(agent)) => {
                Ok(())
            }
            (Err(want), Err(e)) if kind(&e) == want => Ok(()),
            (want, got) => Err(format!(
                "assign of {before:?}: expected {want:?}, got {got:?}"
            )),
        }
    }

    /// The customer slot `slot` acts as now: a linked visitor is the
    /// user's customer.
    async fn current(&self, tenant: usize, slot: usize) -> Result<CustomerId, String> {
        let id = self.tenants[tenant].customers[slot];
        self.chat()
            .resolve_customer(tid(tenant), CustomerIdentity::Known(id))
            .await
            .map(|c| c.id)
            .map_err(|e| format!("customer {id} does not resolve: {e:?}"))
    }

    /// The customer's newest session (UUIDv7 ids sort by time).
    async fn latest_of(&self, tenant: usize, customer: CustomerId) -> Option<SessionId> {
        self.sessions(tenant)
            .await
            .iter()
            .filter(|v| v.session.customer_id == Some(customer))
            .map(|v| v.session.id)
            .max()
    }

    /// The customer's WAITING or OPEN chat.
    async fn active_of(
        &self,
        tenant: usize,
        customer: CustomerId,
    ) -> Option<livechat_core::ChatSession> {
        self.sessions(tenant)
            .await
            .into_iter()
            .map(|v| v.session)
            .find(|s| s.customer_id == Some(customer) && s.is_active())
    }

    /// The tenant's tickets the model knows of: those of its chats, then
    /// those of refused agent starts.
    async fn tickets(&self, tenant: usize) -> Vec<livechat_core::TicketId> {
        let mut tickets: Vec<livechat_core::TicketId> = self
            .sessions(tenant)
            .await
            .iter()
            .filter_map(|v| v.session.ticket_id)
            .collect();
        tickets.sort();
        tickets.extend(self.tenants[tenant].addressed.iter().map(|(t, _)| *t));
        tickets
    }

    fn sinks(&self) -> livechat_ticket_bridge::SeaOrmSinks {
        livechat_ticket_bridge::SeaOrmSinks::new(self.app.db.clone())
    }

    /// Records an agent's close of ticket slot `ticket` on `chat`; the
    /// ticket, when the close was recorded.
    async fn close_ticket(
        &self,
        chat: &ChatService<SeaOrmStore>,
        tenant: usize,
        agent: i64,
        ticket: usize,
    ) -> Result<Option<livechat_core::TicketId>, String> {
        use livechat_core::{TicketClose, TicketDirectory, TicketStatus};

        let tickets = self.tickets(tenant).await;
        if tickets.is_empty() {
            return Ok(None);
        }
        let id = tickets[ticket % tickets.len()];
        let sinks = self.sinks();
        let before = sinks.get_ticket(tid(tenant), id).await;
        let session = match before.as_ref().ok().and_then(|t| t.session_id) {
            Some(s) => Some(self.session(tenant, s).await.session),
            None => None,
        };
        let got = chat.close_ticket(&sinks, tid(tenant), u(agent), id).await;
        // A close leaves the ticket's chat as it is.
        if let Some(session) = session
            && session != self.session(tenant, session.id).await.session
        {
            return Err(format!("closing ticket {id} changed its chat {session:?}"));
        }
        match (before, got) {
            // Not written by the dispatcher yet: the ticket exists, its
            // opening is still in the outbox.
            (Err(ChatError::NotFound), Err(ChatError::TicketPending)) => Ok(None),
            (Ok(t), Ok(TicketClose::AlreadyClosed(_))) if t.status == TicketStatus::Closed => {
                Ok(None)
            }
            (Ok(_), Ok(TicketClose::Recorded(t))) if t.id == id => Ok(Some(id)),
            (before, got) => Err(format!("closing ticket {id} (before: {before:?}): {got:?}")),
        }
    }

    fn contact(customer: CustomerId) -> livechat_core::ContactInput {
        livechat_core::ContactInput {
            name: format!("Customer {customer}"),
            email: "ana@example.com".into(),
            ..Default::default()
        }
    }

    async fn link(&mut self, tenant: usize, visitor: usize, user: usize) -> Result<(), String> {
        let visitor_id = self.tenants[tenant].customers[visitor];
        let user_id = self.tenants[tenant].customers[VISITORS + user];
        let before = self.current(tenant, visitor).await?;
        let visitors = self.active_of(tenant, before).await;
        let theirs = self.active_of(tenant, user_id).await;
        let got = self
            .chat()
            .link_visitor(tid(tenant), visitor_id, user_host_id(user))
            .await;
        match got {
            Ok(customer)
                if customer.id == user_id && (before == visitor_id || before == user_id) => {}
            Err(ChatError::InvalidCustomer(_)) if before != visitor_id && before != user_id => {
                return Ok(());
            }
            other => {
                return Err(format!(
                    "link of a visitor now {before} to {user_id}: {other:?}"
                ));
            }
        }
        if self.current(tenant, visitor).await? != user_id {
            return Err("the linked visitor does not resolve to the user".into());
        }
        // The sessions moved; if both had an active chat, the one an
        // agent serves stays (the visitor's OPEN one over the user's
        // WAITING one), else the visitor's ends.
        if let (Some(visitors), Some(theirs)) = (visitors, theirs)
            && visitors.id != theirs.id
        {
            let stays =
                if visitors.status == SessionStatus::Open && theirs.status != SessionStatus::Open {
                    visitors.id
                } else {
                    theirs.id
                };
            let active = self.active_of(tenant, user_id).await.map(|s| s.id);
            if active != Some(stays) {
                return Err(format!(
                    "after the link the user's active chat is {active:?}, not {stays}"
                ));
            }
        }
        Ok(())
    }

    fn capacity(&self, tenant: usize) -> i64 {
        self.tenants[tenant]
            .capacity
            .unwrap_or(self.chat().config().routing.default_capacity)
    }

    fn serves(&self, tenant: usize, agent: i64, department: Option<&str>) -> bool {
        let Some(department) = department else {
            return true;
        };
        self.tenants[tenant]
            .departments
            .get(&agent)
            .is_none_or(|ds| ds.is_empty() || ds.iter().any(|d| d == department))
    }

    async fn sessions(&self, tenant: usize) -> Vec<SessionView> {
        self.chat()
            .list_sessions(tid(tenant), SessionFilter::default(), None, Some(200))
            .await
            .expect("sessions list")
            .sessions
    }

    /// Each agent's OPEN sessions (of either origin).
    async fn load(&self, tenant: usize) -> HashMap<i64, i64> {
        let mut load = HashMap::new();
        for view in self.sessions(tenant).await {
            if let (SessionStatus::Open, Some(agent)) = (view.session.status, view.session.agent_id)
            {
                *load.entry(agent.get()).or_default() += 1;
            }
        }
        load
    }

    async fn has_open_agent_session(&self, tenant: usize, agent: i64) -> bool {
        self.sessions(tenant).await.iter().any(|v| {
            v.session.origin == SessionOrigin::Agent
                && v.session.status == SessionStatus::Open
                && v.session.agent_id == Some(u(agent))
        })
    }

    /// Every rule that holds between steps.
    async fn check(&self) -> Result<(), String> {
        for tenant in 0..TENANTS {
            let views = self.sessions(tenant).await;
            let model = &self.tenants[tenant];
            // Isolation: a tenant lists exactly its own sessions, and the
            // other tenant cannot read them.
            let mut listed: Vec<SessionId> = views.iter().map(|v| v.session.id).collect();
            let mut known = model.sessions.clone();
            listed.sort();
            known.sort();
            if listed != known {
                return Err(format!(
                    "tenant {} lists {listed:?}, the model has {known:?}",
                    tid(tenant).get()
                ));
            }
            for view in &views {
                let id = view.session.id;
                if view.session.tenant_id != tid(tenant) {
                    return Err(format!("a session of another tenant listed: {view:?}"));
                }
                match self.chat().get_session(tid(1 - tenant), id).await {
                    Err(ChatError::NotFound) => {}
                    other => {
                        return Err(format!(
                            "session {id} read from the other tenant: {other:?}"
                        ));
                    }
                }
                self.check_messages(tenant, &view.session).await?;
            }
            // A linked visitor's chats are the user's: none is left active
            // under the visitor's own id, where neither the visitor's token
            // (now the user's) nor the user would find it.
            for slot in 0..VISITORS {
                let own = model.customers[slot];
                if self.current(tenant, slot).await? != own
                    && let Some(orphan) = views
                        .iter()
                        .find(|v| v.session.customer_id == Some(own) && v.session.is_active())
                {
                    return Err(format!(
                        "an active chat left with a linked visitor: {:?}",
                        orphan.session
                    ));
                }
            }
            self.check_routing(tenant, &views).await?;
            self.check_outbox(tenant).await?;
        }
        Ok(())
    }

    /// Invariants 4 and 6: the stored messages are the model's, `seq`
    /// 1, 2, 3… in order, and `last_seq` is the last of them.
    async fn check_messages(
        &self,
        tenant: usize,
        session: &livechat_core::ChatSession,
    ) -> Result<(), String> {
        let stored: Vec<ChatMessage> = self
            .chat()
            .list_messages(tid(tenant), session.id, Some(0), Some(200))
            .await
            .map_err(|e| format!("messages of {}: {e:?}", session.id))?;
        let want = self.tenants[tenant]
            .messages
            .get(&session.id)
            .map_or(&[][..], Vec::as_slice);
        let matches = stored.len() == want.len()
            && stored.iter().zip(want).enumerate().all(|(i, (got, want))| {
                got.seq == i64::try_from(i).unwrap() + 1
                    && got.id == want.id
                    && got.message == want.text
                    && got.client_msg_id == want.key
                    && match want.who {
                        Who::Agent(a) => {
                            got.sender_type == SenderType::Agent && got.sender_id == Some(u(a))
                        }
                        Who::Customer(c) => {
                            got.sender_type == SenderType::Customer && got.customer_id == Some(c)
                        }
                    }
            });
        if !matches || session.last_seq != i64::try_from(want.len()).unwrap() {
            return Err(format!(
                "session {} (last_seq {}) stores {:?}, the model {:?}",
                session.id,
                session.last_seq,
                stored
                    .iter()
                    .map(|m| (m.seq, &m.message))
                    .collect::<Vec<_>>(),
                want.iter().map(|m| &m.text).collect::<Vec<_>>(),
            ));
        }
        Ok(())
    }

    /// Once the ticket bridge's dispatcher has handled every event
    /// (DESIGN.md invariant 5; issue #4): each ticketed chat's ticket
    /// exists, of that chat and its department, CLOSED with it and OPEN
    /// while it is not; each refused agent start's ticket exists,
    /// addressed to that agent; a tenant lists only its own tickets; and
    /// every agent reply in a customer chat (no customer connection
    /// follows any here) is exactly one notification, under the
    /// message's id.
    async fn check_delivery(&self) -> Result<(), String> {
        use livechat_core::{NotificationInbox, PageSize, TicketDirectory, TicketStatus};

        self.drain().await;
        let sinks = livechat_ticket_bridge::SeaOrmSinks::new(self.app.db.clone());
        let page = PageSize::parse(Some(200), self.chat().config()).map_err(|e| e.to_string())?;
        for tenant in 0..TENANTS {
            let model = &self.tenants[tenant];
            let views = self.sessions(tenant).await;
            let tickets = sinks
                .list_tickets(
                    tid(tenant),
                    livechat_core::TicketFilter::default(),
                    None,
                    page,
                )
                .await
                .map_err(|e| format!("tickets: {e:?}"))?;
            // Every ticket the model knows: each chat's current one, those
            // of refused agent starts, and those agents closed (a chat
            // handed back after its ticket closed gets a new one).
            let mut want_tickets: Vec<livechat_core::TicketId> = Vec::new();
            for v in &views {
                let s = &v.session;
                let Some(ticket_id) = s.ticket_id else {
                    continue;
                };
                want_tickets.push(ticket_id);
                let ticket = sinks
                    .get_ticket(tid(tenant), ticket_id)
                    .await
                    .map_err(|e| format!("ticket of {s:?}: {e:?}"))?;
                let status = if s.status == SessionStatus::Closed
                    || model.closed_tickets.contains(&ticket_id)
                {
                    TicketStatus::Closed
                } else {
                    TicketStatus::Open
                };
                // An open ticket shows the agent serving its chat, none
                // while the chat waits (handed back included).
                if ticket.session_id != Some(s.id)
                    || ticket.department != s.department
                    || ticket.status != status
                    || (status == TicketStatus::Open && ticket.agent_id != s.agent_id)
                {
                    return Err(format!("chat {s:?} has ticket {ticket:?}"));
                }
            }
            for &(ticket_id, agent) in &model.addressed {
                want_tickets.push(ticket_id);
                let ticket = sinks
                    .get_ticket(tid(tenant), ticket_id)
                    .await
                    .map_err(|e| format!("addressed ticket {ticket_id}: {e:?}"))?;
                let status = if model.closed_tickets.contains(&ticket_id) {
                    TicketStatus::Closed
                } else {
                    TicketStatus::Open
                };
                if ticket.agent_id != Some(u(agent))
                    || ticket.session_id.is_some()
                    || ticket.status != status
                {
                    return Err(format!("agent {agent}'s ticket reads {ticket:?}"));
                }
            }
            want_tickets.extend(model.closed_tickets.iter().copied());
            want_tickets.sort();
            want_tickets.dedup();
            let mut listed: Vec<livechat_core::TicketId> = tickets.iter().map(|t| t.id).collect();
            listed.sort();
            if listed != want_tickets || tickets.iter().any(|t| t.tenant_id != tid(tenant)) {
                return Err(format!(
                    "tenant {} lists tickets {listed:?}, the model knows {want_tickets:?}",
                    tid(tenant).get()
                ));
            }
            for ticket in tickets
                .iter()
                .filter(|t| model.closed_tickets.contains(&t.id))
            {
                if ticket.status != TicketStatus::Closed {
                    return Err(format!("a ticket an agent closed reads {ticket:?}"));
                }
            }
            let notified = sinks
                .list_notifications(tid(tenant), &model.customers, None, page)
                .await
                .map_err(|e| format!("notifications: {e:?}"))?;
            let mut got: Vec<uuid::Uuid> = notified.iter().map(|n| n.id.as_uuid()).collect();
            let mut want: Vec<uuid::Uuid> = views
                .iter()
                .filter(|v| v.session.origin == SessionOrigin::Customer)
                .flat_map(|v| model.messages.get(&v.session.id).into_iter().flatten())
                .filter(|m| matches!(m.who, Who::Agent(_)))
                .map(|m| m.id.as_uuid())
                .collect();
            got.sort();
            want.sort();
            if got != want {
                return Err(format!(
                    "notifications {got:?} for the agent replies {want:?}"
                ));
            }
        }
        Ok(())
    }

    /// Invariants 2 and 3, and the ticket fallback.
    async fn check_routing(&self, tenant: usize, views: &[SessionView]) -> Result<(), String> {
        let model = &self.tenants[tenant];
        let capacity = self.capacity(tenant);
        let mut active_by_customer: HashMap<CustomerId, usize> = HashMap::new();
        let mut open_by_agent: HashMap<i64, usize> = HashMap::new();
        let mut load: HashMap<i64, i64> = HashMap::new();
        for v in views {
            let s = &v.session;
            if let (Some(c), true) = (s.customer_id, s.is_active()) {
                *active_by_customer.entry(c).or_default() += 1;
            }
            if let (SessionStatus::Open, Some(a)) = (s.status, s.agent_id) {
                *load.entry(a.get()).or_default() += 1;
                if s.origin == SessionOrigin::Agent {
                    *open_by_agent.entry(a.get()).or_default() += 1;
                }
            }
        }
        if let Some((c, n)) = active_by_customer.iter().find(|(_, n)| **n > 1) {
            return Err(format!("customer {c} has {n} active chats"));
        }
        if let Some((a, n)) = open_by_agent.iter().find(|(_, n)| **n > 1) {
            return Err(format!("agent {a} has {n} OPEN agent-started sessions"));
        }
        let online = |agent: i64| model.status.get(&agent) == Some(&PresenceStatus::Online);
        let mut waiting = Vec::new();
        for v in views {
            let s = &v.session;
            if s.origin != SessionOrigin::Customer {
                continue;
            }
            match s.status {
                SessionStatus::Open => {
                    let agent = s.agent_id.map(|a| a.get());
                    if agent.is_none_or(|a| model.status.get(&a) == Some(&PresenceStatus::Offline))
                    {
                        return Err(format!("an OPEN chat without an agent on duty: {s:?}"));
                    }
                }
                SessionStatus::Waiting => {
                    waiting.push(s.id);
                    let department = s.department.as_deref();
                    if s.agent_id.is_some() {
                        return Err(format!("a WAITING chat with an agent: {s:?}"));
                    }
                    // Work-conserving: a chat waits only while no agent
                    // online below capacity takes its department.
                    if let Some(agent) = (1..=AGENTS).find(|&a| {
                        online(a)
                            && load.get(&a).copied().unwrap_or(0) < capacity
                            && self.serves(tenant, a, department)
                    }) {
                        return Err(format!(
                            "chat waits while agent {agent} could take it: {s:?}, load {load:?}"
                        ));
                    }
                    // Nobody online takes it: it is also a ticket.
                    if s.ticket_id.is_none()
                        && !(1..=AGENTS).any(|a| online(a) && self.serves(tenant, a, department))
                    {
                        return Err(format!(
                            "a chat nobody online takes waits without a ticket: {s:?}"
                        ));
                    }
                }
                SessionStatus::Closed => {}
            }
        }
        // Queue places: one read of the queue agrees with each chat's own.
        let positions = self
            .chat()
            .queue_positions(tid(tenant))
            .await
            .map_err(|e| format!("queue positions: {e:?}"))?;
        if positions.len() != waiting.len() {
            return Err(format!(
                "{} queue places for {} waiting chats",
                positions.len(),
                waiting.len()
            ));
        }
        for v in views
            .iter()
            .filter(|v| v.session.status == SessionStatus::Waiting)
        {
            let own = self.session(tenant, v.session.id).await.queue_position;
            let place = positions.get(&v.session.id).copied();
            if own.is_none() || own != place || own < Some(1) {
                return Err(format!(
                    "chat {} is at {own:?} alone and at {place:?} in the queue",
                    v.session.id
                ));
            }
        }
        Ok(())
    }

    /// Invariant 5: every stored message has its `message.posted` event.
    async fn check_outbox(&self, tenant: usize) -> Result<(), String> {
        let db = &self.app.db;
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!(
                    "SELECT COUNT(*) AS n FROM livechat_outbox \
                     WHERE kind = 'message.posted' AND tenant_id = {}",
                    tid(tenant).get()
                ),
            ))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no count")?;
        let events: i64 = row.try_get("", "n").map_err(|e| e.to_string())?;
        let messages: usize = self.tenants[tenant].messages.values().map(Vec::len).sum();
        if usize::try_from(events).ok() != Some(messages) {
            return Err(format!(
                "{events} message.posted events for {messages} messages"
            ));
        }
        Ok(())
    }
}

/// The tenant slot `op` acts in.
fn op_tenant(op: &Op) -> usize {
    match *op {
        Op::Status { tenant, .. }
        | Op::Capacity { tenant, .. }
        | Op::CustomerStart { tenant, .. }
        | Op::CustomerSend { tenant, .. }
        | Op::CustomerClose { tenant, .. }
        | Op::AgentStart { tenant, .. }
        | Op::AgentSend { tenant, .. }
        | Op::Assign { tenant, .. }
        | Op::AgentClose { tenant, .. }
        | Op::Link { tenant, .. }
        | Op::Contact { tenant, .. }
        | Op::CloseTicket { tenant, .. } => tenant,
        Op::Dispatch => 0,
    }
}

/// The host user id of user slot `user`.
fn user_host_id(user: usize) -> livechat_core::UserId {
    u(900 + i64::try_from(user).unwrap())
}

fn tid(tenant: usize) -> livechat_core::TenantId {
    t(i64::try_from(tenant).unwrap() + 1)
}

/// What one step of a concurrent group did, for the model to take in
/// once the group has ended.
enum Done {
    Nothing,
    Status {
        tenant: usize,
        agent: i64,
        status: PresenceStatus,
        departments: Option<Vec<String>>,
    },
    Capacity {
        tenant: usize,
        capacity: i64,
    },
    Started {
        tenant: usize,
        session: SessionId,
    },
    Addressed {
        tenant: usize,
        agent: i64,
        ticket: livechat_core::TicketId,
    },
    TicketClosed {
        tenant: usize,
        ticket: livechat_core::TicketId,
    },
    Sent {
        tenant: usize,
        session: SessionId,
        who: Who,
        text: String,
        key: Option<String>,
        appended: Box<AppendedMessage>,
    },
}

/// `got`'s error when it is one of `allowed` (the outcomes a step may
/// have while others run beside it), else what went wrong.
fn allowed<T: std::fmt::Debug>(
    got: Result<T, ChatError>,
    allowed: &[&str],
) -> Result<Option<T>, String> {
    match got {
        Ok(value) => Ok(Some(value)),
        Err(e) if allowed.contains(&kind(&e).as_str()) => Ok(None),
        Err(e) => Err(format!("refused with {e:?}")),
    }
}

impl Run {
    /// Runs `op` on `chat` (a node) beside others: its outcome may be any the rules allow
    /// for some order of the group's steps, so it is only classified
    /// here, and what it stored is checked once the group has ended.
    async fn perform(
        &self,
        chat: &ChatService<SeaOrmStore>,
        op: &Op,
        text: String,
        linking: bool,
    ) -> Result<Done, String> {
        let done = match *op {
            Op::Status {
                tenant,
                agent,
                status,
                ref departments,
            } => {
                let departments: Option<Vec<String>> = departments
                    .as_ref()
                    .map(|ds| ds.iter().map(|&d| DEPARTMENTS[d].to_owned()).collect());
                chat.set_agent_presence(tid(tenant), u(agent), status, departments.clone())
                    .await
                    .map_err(|e| format!("status refused: {e:?}"))?;
                Done::Status {
                    tenant,
                    agent,
                    status,
                    departments,
                }
            }
            Op::Capacity { tenant, capacity } => {
                chat.set_agent_capacity(tid(tenant), capacity)
                    .await
                    .map_err(|e| format!("capacity refused: {e:?}"))?;
                Done::Capacity { tenant, capacity }
            }
            Op::CustomerStart {
                tenant,
                customer,
                department,
                priority,
                message,
                key,
            } => {
                let customer = self.current(tenant, customer).await?;
                let key = Self::key(key);
                let request = CustomerChatRequest {
                    topic: "Order".into(),
                    priority: Some(priority),
                    department: department.map(|d| DEPARTMENTS[d].to_owned()),
                    message: message.then(|| text.clone()),
                    client_msg_id: key.clone(),
                    ..Default::default()
                };
                let got = chat
                    .start_customer_chat(tid(tenant), customer, request)
                    .await;
                let Some(started) = allowed(got, &["ClientMsgIdTaken", "SessionClosed"])? else {
                    return Ok(Done::Nothing);
                };
                let session = started.view.session.id;
                match started.message {
                    Some(appended) => {
                        // The message is the customer's, or, when a link of
                        // this visitor landed first, the user's. (The view
                        // is read after the message: a link landing in
                        // between moves the chat, not the message.) A
                        // replay of its key is the message as first stored,
                        // maybe by a visitor since linked to this customer.
                        let sender = appended.message.customer_id.unwrap_or(customer);
                        let linked_sender = !appended.created
                            && self
                                .chat()
                                .resolve_customer(tid(tenant), CustomerIdentity::Known(sender))
                                .await
                                .is_ok_and(|now| now.id == customer);
                        if sender != customer && !linking && !linked_sender {
                            return Err(format!(
                                "a start stored another customer's message: {appended:?}"
                            ));
                        }
                        Done::Sent {
                            tenant,
                            session,
                            who: Who::Customer(sender),
                            text,
                            key,
                            appended: Box::new(appended),
                        }
                    }
                    None if message => return Err("the start's message was dropped".into()),
                    None => Done::Started { tenant, session },
                }
            }
            Op::CustomerSend {
                tenant,
                customer,
                key,
            } => {
                let customer = self.current(tenant, customer).await?;
                let Some(session) = self.latest_of(tenant, customer).await else {
                    return Ok(Done::Nothing);
                };
                let key = Self::key(key);
                let got = chat
                    .post_customer_message(
                        tid(tenant),
                        customer,
                        session,
                        text.clone(),
                        key.clone(),
                    )
                    .await;
                // A link of this visitor landing after `current` moved the
                // chat: the message is the identified customer's then.
                match allowed(got, &["SessionClosed", "ClientMsgIdTaken"])? {
                    Some(appended) => Done::Sent {
                        tenant,
                        session,
                        who: Who::Customer(appended.message.customer_id.unwrap_or(customer)),
                        text,
                        key,
                        appended: Box::new(appended),
                    },
                    None => Done::Nothing,
                }
            }
            Op::CustomerClose { tenant, customer } => {
                let customer = self.current(tenant, customer).await?;
                if let Some(session) = self.latest_of(tenant, customer).await {
                    let got = chat
                        .close_customer_chat(tid(tenant), customer, session)
                        .await;
                    allowed(got, &[])?;
                }
                Done::Nothing
            }
            Op::AgentStart { tenant, agent } => {
                match chat.start_session(tid(tenant), u(agent), None).await {
                    Err(ChatError::AgentOffline { ticket_id, .. }) => Done::Addressed {
                        tenant,
                        agent,
                        ticket: ticket_id,
                    },
                    got => match allowed(got, &["ActiveSessionExists"])? {
                        Some(session) => Done::Started {
                            tenant,
                            session: session.id,
                        },
                        None => Done::Nothing,
                    },
                }
            }
            Op::AgentSend {
                tenant,
                agent,
                session,
                key,
            } => {
                let Some(session) = self.pick(tenant, session).await else {
                    return Ok(Done::Nothing);
                };
                let key = Self::key(key);
                let got = chat
                    .post_message(tid(tenant), u(agent), session, text.clone(), key.clone())
                    .await;
                match allowed(
                    got,
                    &["SessionClosed", "SessionNotOpen", "ClientMsgIdTaken"],
                )? {
                    Some(appended) => Done::Sent {
                        tenant,
                        session,
                        who: Who::Agent(agent),
                        text,
                        key,
                        appended: Box::new(appended),
                    },
                    None => Done::Nothing,
                }
            }
            Op::Assign {
                tenant,
                agent,
                session,
                mode,
            } => {
                let Some(session) = self.pick(tenant, session).await else {
                    return Ok(Done::Nothing);
                };
                let target = (mode == AssignMode::Transfer).then(|| u(agent));
                let caller = match mode {
                    AssignMode::Claim => u(agent),
                    AssignMode::Transfer => u(agent % AGENTS + 1),
                };
                let got = chat
                    .assign_session(tid(tenant), caller, session, target)
                    .await;
                let assigned = allowed(
                    got,
                    &[
                        "SessionClosed",
                        "AlreadyAssigned",
                        "AgentNotOnline",
                        "ActiveSessionExists",
                    ],
                )?;
                if let Some(s) = assigned
                    && (s.status != SessionStatus::Open || s.agent_id != Some(u(agent)))
                {
                    return Err(format!("an assignment to agent {agent} reads {s:?}"));
                }
                Done::Nothing
            }
            Op::Link {
                tenant,
                visitor,
                user,
            } => {
                let visitor = self.tenants[tenant].customers[visitor];
                let got = chat
                    .link_visitor(tid(tenant), visitor, user_host_id(user))
                    .await;
                allowed(got, &["InvalidCustomer"])?;
                Done::Nothing
            }
            Op::Contact { tenant, customer } => {
                let customer = self.current(tenant, customer).await?;
                if let Some(session) = self.latest_of(tenant, customer).await {
                    let got = chat
                        .set_contact(tid(tenant), customer, session, Self::contact(customer))
                        .await;
                    allowed(got, &["SessionClosed"])?;
                }
                Done::Nothing
            }
            Op::CloseTicket {
                tenant,
                agent,
                ticket,
            } => {
                use livechat_core::TicketClose;

                let tickets = self.tickets(tenant).await;
                if tickets.is_empty() {
                    return Ok(Done::Nothing);
                }
                let id = tickets[ticket % tickets.len()];
                let got = chat
                    .close_ticket(&self.sinks(), tid(tenant), u(agent), id)
                    .await;
                // Every ticket id here exists: one not yet in the tables has
                // its opening still in the outbox.
                match allowed(got, &["TicketPending"])? {
                    Some(TicketClose::Recorded(_)) => Done::TicketClosed { tenant, ticket: id },
                    Some(TicketClose::AlreadyClosed(_)) | None => Done::Nothing,
                }
            }
            Op::Dispatch => {
                self.dispatcher()
                    .dispatch_once()
                    .await
                    .map_err(|e| format!("dispatch: {e:?}"))?;
                Done::Nothing
            }
            Op::AgentClose {
                tenant,
                agent,
                session,
            } => {
                if let Some(session) = self.pick(tenant, session).await {
                    chat.close_session(tid(tenant), u(agent), session)
                        .await
                        .map_err(|e| format!("close refused: {e:?}"))?;
                }
                Done::Nothing
            }
        };
        Ok(done)
    }

    /// Takes in what a concurrent group did: its statuses, new sessions
    /// and messages (each session's log in `seq` order). A send that
    /// returned an earlier message must name one stored with its key.
    fn take_in(&mut self, done: Vec<Done>) -> Result<(), String> {
        let mut repeats = Vec::new();
        for d in done {
            match d {
                Done::Nothing => {}
                Done::Status {
                    tenant,
                    agent,
                    status,
                    departments,
                } => {
                    let model = &mut self.tenants[tenant];
                    model.status.insert(agent, status);
                    if let Some(ds) = departments {
                        model.departments.insert(agent, ds);
                    }
                }
                Done::Capacity { tenant, capacity } => {
                    self.tenants[tenant].capacity = Some(capacity);
                }
                Done::Started { tenant, session } => self.started(tenant, session),
                Done::Addressed {
                    tenant,
                    agent,
                    ticket,
                } => self.tenants[tenant].addressed.push((ticket, agent)),
                Done::TicketClosed { tenant, ticket } => {
                    self.tenants[tenant].closed_tickets.push(ticket);
                }
                Done::Sent {
                    tenant,
                    session,
                    who,
                    text,
                    key,
                    appended,
                } => {
                    if let Who::Customer(_) = who {
                        self.started(tenant, session);
                    }
                    if appended.created {
                        if appended.message.session_id != session
                            || appended.message.message != text
                        {
                            return Err(format!("a send stored {appended:?}"));
                        }
                        self.tenants[tenant]
                            .messages
                            .entry(session)
                            .or_default()
                            .push(Expected {
                                id: appended.message.id,
                                seq: appended.message.seq,
                                text,
                                key,
                                who,
                            });
                    } else {
                        repeats.push((tenant, session, key, *appended));
                    }
                }
            }
        }
        for model in &mut self.tenants {
            for log in model.messages.values_mut() {
                log.sort_by_key(|m| m.seq);
            }
        }
        for (tenant, session, key, appended) in repeats {
            let known = self.tenants[tenant]
                .messages
                .get(&session)
                .is_some_and(|log| {
                    log.iter()
                        .any(|m| m.id == appended.message.id && key.is_some() && m.key == key)
                });
            if !known {
                return Err(format!(
                    "a send with key {key:?} returned a message stored under none: {appended:?}"
                ));
            }
        }
        Ok(())
    }

    /// Records a session a step started or was answered with.
    fn started(&mut self, tenant: usize, session: SessionId) {
        let model = &mut self.tenants[tenant];
        if !model.sessions.contains(&session) {
            model.sessions.push(session);
        }
    }
}

/// A fresh database with the model's starting point: two tenants, each
/// with one chat per agent and its customers known.
async fn start_run(backend: Backend) -> Result<Run, TestCaseError> {
    let app = App::new(backend).await;
    let mut tenants = Vec::new();
    for tenant in 0..TENANTS {
        // One chat per agent to begin with, so that chats queue.
        app.chat
            .set_agent_capacity(tid(tenant), 1)
            .await
            .map_err(|e| TestCaseError::fail(format!("capacity: {e:?}")))?;
        let mut model = TenantModel {
            capacity: Some(1),
            ..TenantModel::default()
        };
        for c in 0..CUSTOMERS {
            // The same browser and user ids in both tenants: distinct
            // customers.
            let identity = if c < VISITORS {
                CustomerIdentity::Visitor(uuid::Uuid::from_u128(0xb0 + c as u128))
            } else {
                CustomerIdentity::User(user_host_id(c - VISITORS))
            };
            let customer = app
                .chat
                .resolve_customer(tid(tenant), identity)
                .await
                .map_err(|e| TestCaseError::fail(format!("customer: {e:?}")))?;
            model.customers.push(customer.id);
        }
        tenants.push(model);
    }
    let second = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let db = livechat_core::store::connect(&app.test_db.url)
                .await
                .map_err(|e| TestCaseError::fail(format!("second node: {e}")))?;
            Some(ChatService::new(
                SeaOrmStore::new(db),
                app.chat.config().clone(),
            ))
        }
    };
    Ok(Run {
        app,
        dispatcher: None,
        second,
        tenants,
        counter: 0,
    })
}

/// How a [`Recording`] sink answers a call.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Take,
    /// Down for now: the event is retried for this sink.
    Retry,
    /// Refused for good: the event is given up for this sink only.
    Refuse,
}

/// A ticket and notification sink that records each delivery it took,
/// in order, with the event's session: the tables behind it (`inner`),
/// or nothing, answering the calls as `answers` says, in turn.
struct Recording {
    name: &'static str,
    inner: Option<livechat_ticket_bridge::SeaOrmSinks>,
    answers: Vec<Answer>,
    calls: std::sync::atomic::AtomicUsize,
    delivered: std::sync::Mutex<Vec<(Option<SessionId>, livechat_core::EventId)>>,
    /// The events it refused for good.
    refused: std::sync::Mutex<Vec<livechat_core::EventId>>,
    /// Each ticket's session, from its opening (called before any close
    /// or assignment of it, whether or not that opening was taken).
    ticket_sessions: std::sync::Mutex<HashMap<livechat_core::TicketId, SessionId>>,
}

type SinkResult = Result<(), livechat_ticket_bridge::SinkError>;

impl Recording {
    fn new(
        name: &'static str,
        inner: Option<livechat_ticket_bridge::SeaOrmSinks>,
        answers: Vec<Answer>,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            name,
            inner,
            answers,
            calls: std::sync::atomic::AtomicUsize::new(0),
            delivered: std::sync::Mutex::default(),
            refused: std::sync::Mutex::default(),
            ticket_sessions: std::sync::Mutex::default(),
        })
    }

    /// Answers this call as the pattern says; when it takes the event,
    /// runs `forward` on the tables (when there are some) and records the
    /// delivery.
    async fn answer<'a, F: std::future::Future<Output = SinkResult>>(
        &'a self,
        session: Option<SessionId>,
        key: livechat_core::EventId,
        forward: impl FnOnce(&'a livechat_ticket_bridge::SeaOrmSinks) -> F,
    ) -> SinkResult {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let answer = self
            .answers
            .get(call % self.answers.len().max(1))
            .copied()
            .unwrap_or(Answer::Take);
        match answer {
            Answer::Take => {}
            Answer::Retry => {
                return Err(livechat_ticket_bridge::SinkError::Retryable(
                    "down for now".into(),
                ));
            }
            Answer::Refuse => {
                self.refused.lock().expect("refusals").push(key);
                return Err(livechat_ticket_bridge::SinkError::Permanent(
                    "refused".into(),
                ));
            }
        }
        if let Some(inner) = &self.inner {
            forward(inner).await?;
        }
        self.delivered
            .lock()
            .expect("deliveries")
            .push((session, key));
        Ok(())
    }

    fn session_of(&self, ticket: livechat_core::TicketId) -> Option<SessionId> {
        self.ticket_sessions
            .lock()
            .expect("tickets")
            .get(&ticket)
            .copied()
    }

    /// Each event's first delivery, in the order they were taken.
    fn first_deliveries(&self) -> Vec<(Option<SessionId>, livechat_core::EventId)> {
        let mut seen = std::collections::HashSet::new();
        self.delivered
            .lock()
            .expect("deliveries")
            .iter()
            .filter(|(_, key)| seen.insert(*key))
            .copied()
            .collect()
    }
}

#[async_trait::async_trait]
impl livechat_ticket_bridge::TicketSink for Recording {
    fn name(&self) -> String {
        self.name.to_owned()
    }

    async fn open_ticket(
        &self,
        request: &livechat_core::TicketRequested,
        key: livechat_core::EventId,
    ) -> SinkResult {
        if let Some(session) = request.session_id {
            self.ticket_sessions
                .lock()
                .expect("tickets")
                .insert(request.ticket_id, session);
        }
        self.answer(request.session_id, key, |inner| {
            inner.open_ticket(request, key)
        })
        .await
    }

    async fn close_ticket(
        &self,
        tenant: livechat_core::TenantId,
        ticket: livechat_core::TicketId,
        key: livechat_core::EventId,
    ) -> SinkResult {
        self.answer(self.session_of(ticket), key, |inner| {
            inner.close_ticket(tenant, ticket, key)
        })
        .await
    }

    async fn assign_ticket(
        &self,
        tenant: livechat_core::TenantId,
        ticket: livechat_core::TicketId,
        agent: livechat_core::UserId,
        key: livechat_core::EventId,
    ) -> SinkResult {
        self.answer(self.session_of(ticket), key, |inner| {
            inner.assign_ticket(tenant, ticket, agent, key)
        })
        .await
    }

    async fn unassign_ticket(
        &self,
        tenant: livechat_core::TenantId,
        ticket: livechat_core::TicketId,
        key: livechat_core::EventId,
    ) -> SinkResult {
        self.answer(self.session_of(ticket), key, |inner| {
            inner.unassign_ticket(tenant, ticket, key)
        })
        .await
    }

    async fn ticket_message(
        &self,
        tenant: livechat_core::TenantId,
        ticket: livechat_core::TicketId,
        message: &ChatMessage,
        key: livechat_core::EventId,
    ) -> SinkResult {
        self.answer(Some(message.session_id), key, |inner| {
            inner.ticket_message(tenant, ticket, message, key)
        })
        .await
    }
}

#[async_trait::async_trait]
impl livechat_ticket_bridge::NotificationSink for Recording {
    fn name(&self) -> String {
        self.name.to_owned()
    }

    async fn notify(
        &self,
        n: &livechat_core::Notification,
        key: livechat_core::EventId,
    ) -> SinkResult {
        self.answer(n.session_id, key, |inner| inner.notify(n, key))
            .await
    }
}

/// One case with a second sink that answers as `answers` says, in turn:
/// the ops one by one as in [`run_case`], the dispatcher (both sinks)
/// running at the model's `Dispatch` steps and at the end. Then the
/// tables hold what [`Run::check_delivery`] expects, the failing sink
/// took every event the tables took but those it refused for good
/// (retried for it alone, given up for it alone), and each sink took a
/// session's events in the order they were written (an event waits for
/// the earlier ones of its session that the sink has not taken yet).
async fn run_failing_sink_case(
    backend: Backend,
    ops: Vec<Op>,
    mut answers: Vec<Answer>,
) -> Result<(), TestCaseError> {
    let mut run = start_run(backend).await?;
    // Every pattern takes a call now and then.
    answers.push(Answer::Take);
    let tables = Recording::new(
        "tables",
        Some(livechat_ticket_bridge::SeaOrmSinks::new(run.app.db.clone())),
        Vec::new(),
    );
    let failing = Recording::new("failing", None, answers);
    run.dispatcher = Some(
        livechat_ticket_bridge::Dispatcher::new(
            SeaOrmStore::new(run.app.db.clone()),
            livechat_ticket_bridge::DispatcherConfig {
                backoff_base: std::time::Duration::from_millis(5),
                backoff_max: std::time::Duration::from_millis(20),
                ..livechat_ticket_bridge::DispatcherConfig::default()
            },
        )
        .ticket_sink(tables.clone())
        .notification_sink(tables.clone())
        .ticket_sink(failing.clone())
        .notification_sink(failing.clone()),
    );
    for (step, op) in ops.iter().enumerate() {
        run.apply(op).await.map_err(|e| fail(step, op, e))?;
        run.check().await.map_err(|e| fail(step, op, e))?;
    }
    let end = |e: String| TestCaseError::fail(format!("after {} steps: {e}", ops.len()));
    run.check_delivery().await.map_err(end)?;
    let taken = |sink: &Recording| {
        let mut keys: Vec<livechat_core::EventId> =
            sink.first_deliveries().iter().map(|(_, k)| *k).collect();
        keys.sort();
        keys
    };
    let mut owed = taken(&failing);
    owed.extend(failing.refused.lock().expect("refusals").iter().copied());
    owed.sort();
    owed.dedup();
    prop_assert_eq!(
        owed,
        taken(&tables),
        "the failing sink did not take (or refuse) what the tables took"
    );
    for sink in [&tables, &failing] {
        let mut last: HashMap<SessionId, livechat_core::EventId> = HashMap::new();
        for (session, key) in sink.first_deliveries() {
            let Some(session) = session else {
                continue;
            };
            if let Some(before) = last.insert(session, key) {
                prop_assert!(
                    before < key,
                    "{} took event {} of session {} after the later {}",
                    sink.name,
                    key,
                    session,
                    before
                );
            }
        }
    }
    Ok(())
}

/// One case: a fresh database, the ops one by one, every rule checked
/// after each.
async fn run_case(backend: Backend, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut run = start_run(backend).await?;
    for (step, op) in ops.iter().enumerate() {
        run.apply(op).await.map_err(|e| fail(step, op, e))?;
        run.check().await.map_err(|e| fail(step, op, e))?;
    }
    run.check_delivery()
        .await
        .map_err(|e| TestCaseError::fail(format!("after {} steps: {e}", ops.len())))
}

/// One case of concurrent groups: each group's ops run at once (on
/// PostgreSQL on two nodes), and every rule is checked once the group has
/// ended. Two status changes of
/// one agent in a group would leave the model not knowing which came
/// last, so a group keeps only the first.
async fn run_concurrent_case(backend: Backend, groups: Vec<Vec<Op>>) -> Result<(), TestCaseError> {
    let mut run = start_run(backend).await?;
    for (step, group) in groups.iter().enumerate() {
        let mut statuses = Vec::new();
        let mut ops = Vec::new();
        for op in group {
            // Which of two settings of one thing landed last is unknown.
            let setting = match *op {
                Op::Status { tenant, agent, .. } => Some((tenant, agent)),
                Op::Capacity { tenant, .. } => Some((tenant, 0)),
                _ => None,
            };
            if let Some(setting) = setting {
                if statuses.contains(&setting) {
                    continue;
                }
                statuses.push(setting);
            }
            let text = run.text();
            ops.push((op, text));
        }
        let failed =
            |e: String| TestCaseError::fail(format!("after group {step} ({group:?}): {e}"));
        let shared = &run;
        let linking = |tenant: usize| {
            group
                .iter()
                .any(|op| matches!(*op, Op::Link { tenant: t, .. } if t == tenant))
        };
        // On PostgreSQL every other step runs on the second node.
        let done = futures::future::join_all(ops.into_iter().enumerate().map(
            |(i, (op, text))| async move {
                let node = match &shared.second {
                    Some(second) if i % 2 == 1 => second,
                    _ => shared.chat(),
                };
                shared
                    .perform(node, op, text, linking(op_tenant(op)))
                    .await
                    .map_err(|e| format!("{op:?}: {e}"))
            },
        ))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
        run.take_in(done).map_err(failed)?;
        run.check().await.map_err(failed)?;
    }
    run.check_delivery()
        .await
        .map_err(|e| TestCaseError::fail(format!("after {} groups: {e}", groups.len())))
}

livechat_tests::property_on_both_databases!(
    random_chat_operations_keep_every_rule => run_model(24, 8),
    concurrent_chat_operations_keep_every_rule => run_concurrent_model(16, 16),
    a_failing_sink_gets_every_event_in_order => run_failing_sink_model(16, 8),
);

fn run_model(backend: Backend, cases: u32) {
    let runtime = test_runtime(2);
    check_property(cases, proptest::collection::vec(op(), 1..80), |ops| {
        runtime.block_on(run_case(backend, ops))
    });
}

fn run_failing_sink_model(backend: Backend, cases: u32) {
    let runtime = test_runtime(2);
    let strategy = (
        proptest::collection::vec(op(), 1..60),
        proptest::collection::vec(
            prop_oneof![
                6 => Just(Answer::Take),
                4 => Just(Answer::Retry),
                1 => Just(Answer::Refuse),
            ],
            0..6,
        ),
    );
    check_property(cases, strategy, |(ops, answers)| {
        runtime.block_on(run_failing_sink_case(backend, ops, answers))
    });
}

fn run_concurrent_model(backend: Backend, cases: u32) {
    let runtime = test_runtime(4);
    let strategy = proptest::collection::vec(proptest::collection::vec(op(), 1..8), 1..16);
    check_property(cases, strategy, |groups| {
        runtime.block_on(run_concurrent_case(backend, groups))
    });
}

/// A case the concurrent property found (with 120 cases): a visitor's
/// start with a message and key, a link of that visitor, then the same
/// start again as the user. The replay is the visitor's first message,
/// which the user, the same person now, may be answered with.
#[test]
fn a_start_replayed_after_a_link_answers_the_visitors_message() {
    let start = Op::CustomerStart {
        tenant: 0,
        customer: 3,
        department: None,
        priority: Priority::Low,
        message: true,
        key: Some(0),
    };
    let groups = vec![
        vec![start.clone()],
        vec![Op::Link {
            tenant: 0,
            visitor: 3,
            user: 0,
        }],
        vec![start],
    ];
    for backend in [Backend::Sqlite, Backend::Postgres] {
        test_runtime(4)
            .block_on(run_concurrent_case(backend, groups.clone()))
            .unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    }
}
