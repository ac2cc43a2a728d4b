//! [`SessionRepository`] for the SeaORM store.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, SqlErr,
};
use serde::Serialize;

use super::entity::{message, outbox, session};
use super::routing::{
    agent_is_online, any_agent_online, assign, covered_departments, departments, drain_queue,
    lock_tenant, online_agents, queue_position,
};
use super::{
    EachTenant, Recorded, SeaOrmStore, abort, convert_all, host_id, outbox_tenant_unindexed,
    record_event, record_message_event,
};
use crate::config::RoutingPolicy;
use crate::error::ChatError;
use crate::events::{EventKind, MessagePosted, TicketClosed, TicketReason, TicketRequested};
use crate::ids::{CustomerId, MessageId, SessionId, TenantId, TicketId, UserId};
use crate::model::{
    ChatMessage, ChatSession, Contact, Priority, Sender, SenderType, SessionOrigin, SessionStatus,
    SessionView, now,
};
use crate::repository::{
    AppendedMessage, AssignMode, CustomerChatStarted, NewCustomerChat, SessionFilter,
    SessionRepository,
};
use crate::validate::PageSize;

/// The wire form of a [`Sender`] in event payloads.
#[derive(Serialize)]
struct SenderRef {
    #[serde(rename = "type")]
    kind: SenderType,
    agent_id: Option<UserId>,
    customer_id: Option<CustomerId>,
}

impl From<Sender> for SenderRef {
    fn from(s: Sender) -> Self {
        match s {
            Sender::Agent(a) => Self {
                kind: SenderType::Agent,
                agent_id: Some(a),
                customer_id: None,
            },
            Sender::Customer(c) => Self {
                kind: SenderType::Customer,
                agent_id: None,
                customer_id: Some(c),
            },
            Sender::System => Self {
                kind: SenderType::System,
                agent_id: None,
                customer_id: None,
            },
        }
    }
}

/// The `session.updated` of a contact change: the session plus
/// `contact_updated: true`, which tells the ticket bridge to pass the new
/// contact to a ticketed session's ticket sinks.
#[derive(Serialize)]
struct ContactUpdated<'a> {
    #[serde(flatten)]
    session: &'a ChatSession,
    contact_updated: bool,
}

#[derive(Serialize)]
struct Closed<'a> {
    #[serde(flatten)]
    session: &'a ChatSession,
    closed_by: SenderRef,
}

pub(super) async fn find_session(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    id: SessionId,
) -> Result<Option<session::Model>, DbErr> {
    session::Entity::find_by_id(id.as_uuid())
        .filter(session::Column::TenantId.eq(tenant.get()))
        .one(conn)
        .await
}

pub(super) async fn active_session_of(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    customer: CustomerId,
) -> Result<Option<session::Model>, DbErr> {
    session::Entity::find()
        .filter(session::Column::TenantId.eq(tenant.get()))
        .filter(session::Column::CustomerId.eq(customer.as_uuid()))
        .filter(session::Column::Status.is_in([
            SessionStatus::Waiting.as_str(),
            SessionStatus::Open.as_str(),
        ]))
        .one(conn)
        .await
}

async fn view(conn: &impl ConnectionTrait, row: session::Model) -> Result<SessionView, ChatError> {
    let queue_position = queue_position(conn, &row).await?;
    Ok(SessionView {
        session: row.try_into()?,
        queue_position,
    })
}

/// Opens the ticket of the WAITING session `row` when it has none (issue
/// #3: exactly one ticket per session that found no eligible agent): sets
/// its `ticket_id` (and `updated_at` to `updated_at`) and records
/// `ticket.requested` ([`TicketReason::NoAgentOnline`]) with the session's
/// customer, topic, department, priority and contact and its customer
/// `messages` so far (the first is `first_message`). Returns the
/// updated row, or `None` when the session already has a ticket or is no
/// longer WAITING (nothing is written then).
async fn open_session_ticket(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    row: &session::Model,
    messages: Vec<String>,
    updated_at: chrono::DateTime<chrono::Utc>,
) -> Result<Option<session::Model>, ChatError> {
    let ticket_id = TicketId::generate();
    let updated = session::Entity::update_many()
        .col_expr(session::Column::TicketId, Expr::value(ticket_id.as_uuid()))
        .col_expr(session::Column::UpdatedAt, Expr::value(updated_at))
        .filter(session::Column::Id.eq(row.id))
        .filter(session::Column::Status.eq(SessionStatus::Waiting.as_str()))
        .filter(session::Column::TicketId.is_null())
        .exec_with_returning(tx)
        .await?;
    let Some(updated) = updated.into_iter().next() else {
        return Ok(None);
    };
    let session = ChatSession::try_from(updated.clone())?;
    let request = TicketRequested {
        ticket_id,
        tenant_id: session.tenant_id,
        reason: TicketReason::NoAgentOnline,
        session_id: Some(session.id),
        customer_id: session.customer_id,
        agent_id: None,
        requested_by: None,
        topic: session.topic,
        department: session.department,
        priority: session.priority,
        contact: session.contact,
        first_message: messages.first().cloned(),
        messages,
    };
    record_event(
        tx,
        ev,
        request.tenant_id,
        Some(session.id),
        EventKind::TicketRequested,
        &request,
    )
    .await?;
    Ok(Some(updated))
}

/// `tenant`'s WAITING sessions without a ticket that no agent online
/// takes (`limit` of them at most), highest priority then oldest first:
/// the queue's order. With nobody online that is every such session;
/// with an agent online who takes every department, none; with only
/// department agents online, those of other departments (a chat without
/// a department every agent takes; README "Departments").
async fn unattended_waiting(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    policy: &RoutingPolicy,
    limit: Option<u64>,
) -> Result<Vec<session::Model>, DbErr> {
    let online = online_agents(conn, tenant, policy).await?;
    let mut query = session::Entity::find()
        .filter(session::Column::TenantId.eq(tenant.get()))
        .filter(session::Column::Status.eq(SessionStatus::Waiting.as_str()))
        .filter(session::Column::TicketId.is_null());
    if !online.is_empty() {
        let Some(covered) = covered_departments(online.iter().map(departments)) else {
            return Ok(Vec::new());
        };
        query = query
            .filter(session::Column::Department.is_not_null())
            .filter(session::Column::Department.is_not_in(covered));
    }
    query
        .order_by_desc(session::Column::PriorityRank)
        .order_by_asc(session::Column::CreatedAt)
        .order_by_asc(session::Column::Id)
        .limit(limit)
        .all(conn)
        .await
}

/// Whether `tenant` has a WAITING session without a ticket that no agent
/// online takes: what [`ticket_unattended`] acts on.
async fn awaits_tickets(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    policy: &RoutingPolicy,
) -> Result<bool, DbErr> {
    Ok(!unattended_waiting(conn, tenant, policy, Some(1))
        .await?
        .is_empty())
}

/// Tickets `tenant`'s WAITING sessions that have no ticket when no agent
/// online (capacity aside) takes them ([`unattended_waiting`]): chats
/// that waited behind busy agents when the last of them (of their
/// department) went offline, away, or ran out of liveness, so that no
/// request waits unseen while nobody can take it (README "Tickets when
/// no agent can take a chat"). Each gets its ticket
/// as a chat started with no agent online does ([`open_session_ticket`]:
/// `ticket.requested` with the session's first customer message as
/// `first_message`), and a `session.updated` with its `ticket_id`, which
/// its followers receive. The sessions keep waiting and are routed as
/// before. Returns the ticketed sessions in the queue's order; none when
/// the agents online take them all. Call it under the tenant's routing lock
/// ([`lock_tenant`]), so that no agent comes online in between.
pub(super) async fn ticket_unattended(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    tenant: TenantId,
    policy: &RoutingPolicy,
) -> Result<Vec<ChatSession>, ChatError> {
    let waiting = unattended_waiting(tx, tenant, policy, None).await?;
    let at = now();
    let mut ticketed = Vec::with_capacity(waiting.len());
    for row in waiting {
        // The session's row first, as an append takes it: a customer
        // message being written now is either read below (committed
        // before) or written after the ticket, carrying its id.
        session::Entity::find_by_id(row.id)
            .lock_exclusive()
            .one(tx)
            .await?;
        let messages = unanswered_messages(tx, row.id).await?;
        let Some(updated) = open_session_ticket(tx, ev, &row, messages, at).await? else {
            continue;
        };
        ticketed.push(record_session_event(tx, ev, EventKind::SessionUpdated, updated).await?);
    }
    Ok(ticketed)
}

/// What a ticket of waiting session `session` carries: its customer's
/// messages since the last agent message, oldest first, at most
/// [`crate::TICKET_MESSAGES_MAX`]: all of them from the first for a chat
/// no agent has answered, the request left unanswered for a chat handed
/// back to the queue (its agent gone). When the customer wrote nothing
/// since, the latest ones. A chat ticketed again used to carry its first
/// messages, a conversation its first ticket already held, and without
/// the question left open when the chat held more than their number.
async fn unanswered_messages(
    tx: &impl ConnectionTrait,
    session: uuid::Uuid,
) -> Result<Vec<String>, DbErr> {
    let answered: Option<i64> = message::Entity::find()
        .select_only()
        .column_as(message::Column::Seq.max(), "seq")
        .filter(message::Column::SessionId.eq(session))
        .filter(message::Column::SenderType.eq(SenderType::Agent.as_str()))
        .into_tuple::<Option<i64>>()
        .one(tx)
        .await?
        .flatten();
    let customer = || {
        message::Entity::find()
            .select_only()
            .column(message::Column::Body)
            .filter(message::Column::SessionId.eq(session))
            .filter(message::Column::SenderType.eq(SenderType::Customer.as_str()))
            .limit(crate::events::TICKET_MESSAGES_MAX)
    };
    let since = customer()
        .filter(message::Column::Seq.gt(answered.unwrap_or(0)))
        .order_by_asc(message::Column::Seq)
        .into_tuple::<String>()
        .all(tx)
        .await?;
    if !since.is_empty() || answered.is_none() {
        return Ok(since);
    }
    let mut latest = customer()
        .order_by_desc(message::Column::Seq)
        .into_tuple::<String>()
        .all(tx)
        .await?;
    latest.reverse();
    Ok(latest)
}

impl SeaOrmStore {
    /// [`crate::SessionRepository::ticket_unattended`] for one tenant.
    async fn ticket_unattended_of(
        &self,
        tenant: TenantId,
        policy: &RoutingPolicy,
    ) -> Result<Vec<ChatSession>, ChatError> {
        // Read first without the routing lock, which is a write: most
        // calls find nothing to ticket.
        if !awaits_tickets(&self.db, tenant, policy).await? {
            return Ok(Vec::new());
        }
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        lock_tenant(&tx, tenant, policy).await?;
        let sessions = ticket_unattended(&tx, &mut ev, tenant, policy).await?;
        self.commit(tx, ev).await?;
        Ok(sessions)
    }
}

/// Whose events [`pending_ticket_events`] reads.
#[derive(Clone, Copy, Debug)]
enum EventsOf {
    /// The events of one session (`None`: the events without a session).
    Session(Option<SessionId>),
    /// Every event of the tenant, with or without a session.
    Tenant,
}

/// The kinds of `ticket`'s events among `kinds` (`ticket.requested`,
/// `ticket.closed`) that the dispatcher has not settled yet, among the
/// events of `of` in `tenant`.
async fn pending_ticket_events(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    of: EventsOf,
    ticket: TicketId,
    kinds: &[EventKind],
) -> Result<Vec<EventKind>, ChatError> {
    #[derive(serde::Deserialize)]
    struct Of {
        ticket_id: Option<TicketId>,
    }
    let rows: Vec<(String, String)> = pending_events_query(tenant, of, kinds)
        .into_tuple()
        .all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, payload)| {
            serde_json::from_str::<Of>(payload).is_ok_and(|of| of.ticket_id == Some(ticket))
        })
        .filter_map(|(kind, _)| EventKind::parse(&kind))
        .collect())
}

/// The read of [`pending_ticket_events`]: kind and payload of the
/// undispatched events of `kinds` of `of` in `tenant`, through the index
/// of undispatched events (a few, however long the tenant's history).
fn pending_events_query(
    tenant: TenantId,
    of: EventsOf,
    kinds: &[EventKind],
) -> sea_orm::Select<outbox::Entity> {
    let session = match of {
        EventsOf::Session(Some(id)) => Some(outbox::Column::SessionId.eq(id.as_uuid())),
        EventsOf::Session(None) => Some(outbox::Column::SessionId.is_null()),
        EventsOf::Tenant => None,
    };
    outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Kind)
        .column(outbox::Column::Payload)
        .filter(outbox_tenant_unindexed(tenant))
        .apply_if(session, QueryFilter::filter)
        .filter(outbox::Column::DispatchedAt.is_null())
        .filter(outbox::Column::Kind.is_in(kinds.iter().map(|k| k.as_str())))
}

/// Writes the event `kind` (`session.updated`: its contact, its customer
/// after a link, its ticket; `session.assigned`: its agent) for `row`, a
/// session as a change inside `tx` left it, and returns the session.
pub(super) async fn record_session_event(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    kind: EventKind,
    row: session::Model,
) -> Result<ChatSession, ChatError> {
    let session = ChatSession::try_from(row)?;
    record_event(tx, ev, session.tenant_id, Some(session.id), kind, &session).await?;
    Ok(session)
}

/// Closes `row` inside `tx` and writes `session.closed`; `None` if it was
/// already closed.
pub(super) async fn close_row(
    tx: &impl ConnectionTrait,
    ev: &mut Recorded,
    tenant: TenantId,
    id: SessionId,
    closed_by: Sender,
) -> Result<Option<ChatSession>, ChatError> {
    // The session's row first, then the time: an append holding the row
    // (PostgreSQL; SQLite's write lock is taken at `BEGIN`) commits its
    // messages, their times taken before, ahead of the close, whose time
    // then follows theirs. Taken before the wait, `closed_at` could
    // precede the last messages' `created_at`.
    session::Entity::find_by_id(id.as_uuid())
        .filter(session::Column::TenantId.eq(tenant.get()))
        .lock_exclusive()
        .one(tx)
        .await?;
    let at = now();
    let closed = session::Entity::update_many()
        .col_expr(
            session::Column::Status,
            Expr::value(SessionStatus::Closed.as_str()),
        )
        .col_expr(session::Column::ClosedAt, Expr::value(at))
        .col_expr(session::Column::UpdatedAt, Expr::value(at))
        .filter(session::Column::Id.eq(id.as_uuid()))
        .filter(session::Column::TenantId.eq(tenant.get()))
        .filter(session::Column::Status.ne(SessionStatus::Closed.as_str()))
        .exec_with_returning(tx)
        .await?;
    let Some(row) = closed.into_iter().next() else {
        return Ok(None);
    };
    let session = ChatSession::try_from(row)?;
    let payload = Closed {
        session: &session,
        closed_by: closed_by.into(),
    };
    record_event(tx, ev, tenant, Some(id), EventKind::SessionClosed, &payload).await?;
    Ok(Some(session))
}

impl SeaOrmStore {
    async fn open_session_of(
        &self,
        tenant: TenantId,
        agent: UserId,
    ) -> Result<Option<SessionId>, DbErr> {
        Ok(session::Entity::find()
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::AgentId.eq(agent.get()))
            .filter(session::Column::Origin.eq(SessionOrigin::Agent.as_str()))
            .filter(session::Column::Status.eq(SessionStatus::Open.as_str()))
            .one(&self.db)
            .await?
            .map(|m| SessionId::from_uuid(m.id)))
    }
}

/// A new session row of `tenant` (a fresh id, no agent, customer or
/// contact, normal priority, `last_seq` 0, made now), not yet inserted.
pub(super) fn new_row(
    tenant: TenantId,
    origin: SessionOrigin,
    status: SessionStatus,
) -> session::ActiveModel {
    let at = now();
    session::ActiveModel {
        id: Set(SessionId::generate().as_uuid()),
        tenant_id: Set(tenant.get()),
        agent_id: Set(None),
        customer_id: Set(None),
        origin: Set(origin.as_str().to_owned()),
        status: Set(status.as_str().to_owned()),
        topic: Set(None),
        priority_rank: Set(Priority::Normal.rank()),
        department: Set(None),
        ticket_id: Set(None),
        contact: Set(None),
        client_ip: Set(None),
        user_agent: Set(None),
        last_seq: Set(0),
        created_at: Set(at),
        updated_at: Set(at),
        assigned_at: Set(None),
        closed_at: Set(None),
        ticket_closed_at: Set(None),
    }
}

fn contact_json(contact: &Contact) -> Result<String, ChatError> {
    serde_json::to_string(contact).map_err(|e| ChatError::Storage(DbErr::Custom(e.to_string())))
}

impl SessionRepository for SeaOrmStore {
    async fn create_agent_session(
        &self,
        tenant: TenantId,
        agent: UserId,
        mut offline: TicketRequested,
    ) -> Result<ChatSession, ChatError> {
        let mut row = new_row(tenant, SessionOrigin::Agent, SessionStatus::Open);
        row.agent_id = Set(Some(agent.get()));
        row.assigned_at = Set(Some(now()));
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        // The agent's load changes: routing decisions of the tenant wait.
        // A status change takes the same lock, so the status read here
        // stands until the commit.
        lock_tenant(&tx, tenant, &RoutingPolicy::default()).await?;
        let status = super::entity::presence::Entity::find_by_id((tenant.get(), agent.get()))
            .one(&tx)
            .await?
            .map(|p| p.status);
        if status.as_deref() != Some(crate::model::PresenceStatus::Online.as_str()) {
            offline.ticket_id = TicketId::generate();
            offline.tenant_id = tenant;
            record_event(
                &tx,
                &mut ev,
                tenant,
                None,
                EventKind::TicketRequested,
                &offline,
            )
            .await?;
            self.commit(tx, ev).await?;
            return Err(ChatError::AgentOffline {
                agent,
                ticket_id: offline.ticket_id,
            });
        }
        let inserted = match session::Entity::insert(row).exec_with_returning(&tx).await {
            Ok(model) => model,
            Err(err) => {
                tx.rollback().await?;
                return Err(match err.sql_err() {
                    Some(SqlErr::UniqueConstraintViolation(_)) => {
                        ChatError::ActiveSessionExists(self.open_session_of(tenant, agent).await?)
                    }
                    _ => err.into(),
                });
            }
        };
        let created = ChatSession::try_from(inserted)?;
        record_event(
            &tx,
            &mut ev,
            tenant,
            Some(created.id),
            EventKind::SessionStarted,
            &created,
        )
        .await?;
        self.commit(tx, ev).await?;
        Ok(created)
    }

    async fn waiting_queue(
        &self,
        tenant: TenantId,
    ) -> Result<Vec<(SessionId, Option<String>)>, ChatError> {
        let rows: Vec<(uuid::Uuid, Option<String>)> = session::Entity::find()
            .select_only()
            .column(session::Column::Id)
            .column(session::Column::Department)
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::Status.eq(SessionStatus::Waiting.as_str()))
            // The order `queue_position` counts in.
            .order_by_desc(session::Column::PriorityRank)
            .order_by_asc(session::Column::CreatedAt)
            .order_by_asc(session::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, department)| (SessionId::from_uuid(id), department))
            .collect())
    }

    async fn ticket_unattended(
        &self,
        tenant: Option<TenantId>,
        policy: &RoutingPolicy,
    ) -> Result<Vec<ChatSession>, ChatError> {
        let Some(tenant) = tenant else {
            let ids: Vec<i64> = session::Entity::find()
                .select_only()
                .column(session::Column::TenantId)
                .distinct()
                .filter(session::Column::Status.eq(SessionStatus::Waiting.as_str()))
                .filter(session::Column::TicketId.is_null())
                .order_by_asc(session::Column::TenantId)
                .into_tuple()
                .all(&self.db)
                .await?;
            // Each tenant on its own: one whose rows cannot be read or
            // written (damaged outside the library) is logged and skipped,
            // and the tenants after it are ticketed all the same.
            let mut each = EachTenant::new("ticketing unattended chats");
            for id in ids {
                let outcome = match host_id(id) {
                    Ok(tenant) => self.ticket_unattended_of(tenant, policy).await,
                    Err(e) => Err(e),
                };
                each.record(id, outcome);
            }
            return each.finish();
        };
        self.ticket_unattended_of(tenant, policy).await
    }

    async fn close_ticket(
        &self,
        tenant: TenantId,
        session: Option<SessionId>,
        closed: TicketClosed,
    ) -> Result<bool, ChatError> {
        let tx = self.begin_write().await?;
        // Closes of one tenant's tickets wait for each other, so that of
        // two at once on PostgreSQL the second sees the first's event
        // (SQLite's write transactions are serialized anyway).
        lock_tenant(&tx, tenant, &RoutingPolicy::default()).await?;
        let pending = pending_ticket_events(
            &tx,
            tenant,
            EventsOf::Session(session),
            closed.ticket_id,
            &[EventKind::TicketRequested, EventKind::TicketClosed],
        )
        .await?;
        if pending.contains(&EventKind::TicketClosed) {
            // Closed already, once the dispatcher gets to it: one event.
            tx.rollback().await?;
            return Ok(false);
        }
        if session.is_none() && pending.contains(&EventKind::TicketRequested) {
            // Only a session orders its events: a close of a ticket without
            // one could reach a sink before the ticket's opening.
            return abort(tx, ChatError::TicketPending).await;
        }
        if let Some(session) = session {
            // Its chat, handed back to the queue later, gets a new ticket
            // (`presence_repo`'s hand-back), if this is still its ticket.
            session::Entity::update_many()
                .col_expr(session::Column::TicketClosedAt, Expr::value(now()))
                .filter(session::Column::Id.eq(session.as_uuid()))
                .filter(session::Column::TenantId.eq(tenant.get()))
                .filter(session::Column::TicketId.eq(closed.ticket_id.as_uuid()))
                .exec(&tx)
                .await?;
        }
        let mut ev = self.recorder();
        record_event(
            &tx,
            &mut ev,
            tenant,
            session,
            EventKind::TicketClosed,
            &closed,
        )
        .await?;
        self.commit(tx, ev).await?;
        Ok(true)
    }

    async fn ticket_opening_pending(
        &self,
        tenant: TenantId,
        ticket: TicketId,
    ) -> Result<bool, ChatError> {
        let pending = pending_ticket_events(
            &self.db,
            tenant,
            EventsOf::Tenant,
            ticket,
            &[EventKind::TicketRequested],
        )
        .await?;
        Ok(!pending.is_empty())
    }

    async fn request_ticket(
        &self,
        tenant: TenantId,
        mut request: TicketRequested,
    ) -> Result<TicketId, ChatError> {
        request.ticket_id = TicketId::generate();
        request.tenant_id = tenant;
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        record_event(
            &tx,
            &mut ev,
            tenant,
            request.session_id,
            EventKind::TicketRequested,
            &request,
        )
        .await?;
        self.commit(tx, ev).await?;
        Ok(request.ticket_id)
    }

    async fn start_customer_chat(
        &self,
        tenant: TenantId,
        mut chat: NewCustomerChat,
        policy: &RoutingPolicy,
    ) -> Result<CustomerChatStarted, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        // A visitor resolved just before a link of theirs committed: the
        // chat is the identified customer's, as the visitor's token now
        // resolves (README "Linking"), not one left under the visitor's
        // own id, where neither would find it.
        chat.customer = super::customers::current_customer(&tx, tenant, chat.customer).await?;
        // One active session per customer: starts of a tenant are serialized
        // by the routing lock, and the partial unique index backs it up.
        if let Some(mut existing) = active_session_of(&tx, tenant, chat.customer).await? {
            // A customer back at a chat still waiting while nobody is
            // online: the waiting chats without a ticket (theirs too) get
            // one now, as at a new start, not at the next housekeeping.
            if existing.status == SessionStatus::Waiting.as_str()
                && !ticket_unattended(&tx, &mut ev, tenant, policy)
                    .await?
                    .is_empty()
            {
                let id = SessionId::from_uuid(existing.id);
                existing = find_session(&tx, tenant, id)
                    .await?
                    .ok_or(ChatError::NotFound)?;
            }
            let view = view(&tx, existing).await?;
            self.commit(tx, ev).await?;
            return Ok(CustomerChatStarted {
                view,
                created: false,
                message: None,
            });
        }

        let mut row = new_row(tenant, SessionOrigin::Customer, SessionStatus::Waiting);
        row.customer_id = Set(Some(chat.customer.as_uuid()));
        row.topic = Set(Some(chat.topic.as_str().to_owned()));
        row.priority_rank = Set(chat.priority.rank());
        row.department = Set(chat.department.clone());
        row.contact = Set(chat.contact.as_ref().map(contact_json).transpose()?);
        row.client_ip = Set(chat.client_ip.clone());
        row.user_agent = Set(chat.user_agent.clone());
        if chat.first_message.is_some() {
            row.last_seq = Set(1);
        }
        let inserted = match session::Entity::insert(row).exec_with_returning(&tx).await {
            Ok(model) => model,
            Err(err) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                tx.rollback().await?;
                let existing = active_session_of(&self.db, tenant, chat.customer)
                    .await?
                    .ok_or(ChatError::Storage(err))?;
                return Ok(CustomerChatStarted {
                    view: view(&self.db, existing).await?,
                    created: false,
                    message: None,
                });
            }
            Err(err) => return abort(tx, err.into()).await,
        };
        let session = ChatSession::try_from(inserted.clone())?;
        record_event(
            &tx,
            &mut ev,
            tenant,
            Some(session.id),
            EventKind::SessionStarted,
            &session,
        )
        .await?;

        let mut first_message = None;
        if let Some(body) = &chat.first_message {
            let sender_id = super::customers::host_user_of(&tx, tenant, chat.customer).await?;
            let stored = message::Entity::insert(message::ActiveModel {
                id: Set(MessageId::generate().as_uuid()),
                tenant_id: Set(tenant.get()),
                session_id: Set(session.id.as_uuid()),
                sender_type: Set(SenderType::Customer.as_str().to_owned()),
                sender_id: Set(sender_id.map(UserId::get)),
                customer_id: Set(Some(chat.customer.as_uuid())),
                seq: Set(1),
                body: Set(body.as_str().to_owned()),
                client_msg_id: Set(chat
                    .first_message_key
                    .as_ref()
                    .map(|k| k.as_str().to_owned())),
                created_at: Set(session.created_at),
            })
            .exec_with_returning(&tx)
            .await?;
            let posted = MessagePosted {
                message: ChatMessage::try_from(stored)?,
                session_customer_id: Some(chat.customer),
                ticket_id: None,
                customer_connected: false,
            };
            record_message_event(&tx, &mut ev, &posted).await?;
            first_message = Some(AppendedMessage {
                message: posted.message,
                created: true,
            });
        }

        drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        let mut current = super::sessions::find_session(&tx, tenant, session.id)
            .await?
            .ok_or(ChatError::NotFound)?;
        if current.status == SessionStatus::Waiting.as_str()
            && !any_agent_online(&tx, tenant, policy, current.department.as_deref()).await?
        {
            // No agent online takes its department (or none is online at
            // all): the chat waits and becomes a ticket.
            let updated_at = current.updated_at;
            let messages = chat.first_message.map(|m| m.into_inner());
            if let Some(ticketed) = open_session_ticket(
                &tx,
                &mut ev,
                &current,
                messages.into_iter().collect(),
                updated_at,
            )
            .await?
            {
                // `session.started` went out without the ticket: its
                // followers (the team's queue view, a webhook) learn it
                // from this, as for a chat ticketed later.
                record_session_event(&tx, &mut ev, EventKind::SessionUpdated, ticketed.clone())
                    .await?;
                current = ticketed;
            }
        }
        // Chats that began waiting while an agent who could take them was
        // online, and whose last such agent's liveness has since run out
        // unseen, would wait for housekeeping: this start, under the
        // tenant's lock, tickets them now.
        ticket_unattended(&tx, &mut ev, tenant, policy).await?;
        let view = view(&tx, current).await?;
        self.commit(tx, ev).await?;
        Ok(CustomerChatStarted {
            view,
            created: true,
            message: first_message,
        })
    }

    async fn get_session(&self, tenant: TenantId, id: SessionId) -> Result<ChatSession, ChatError> {
        find_session(&self.db, tenant, id)
            .await?
            .ok_or(ChatError::NotFound)?
            .try_into()
    }

    async fn session_view(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> Result<SessionView, ChatError> {
        let row = find_session(&self.db, tenant, id)
            .await?
            .ok_or(ChatError::NotFound)?;
        view(&self.db, row).await
    }

    async fn list_sessions(
        &self,
        tenant: TenantId,
        filter: SessionFilter,
        before: Option<SessionId>,
        limit: PageSize,
    ) -> Result<Vec<SessionView>, ChatError> {
        let mut query = session::Entity::find().filter(session::Column::TenantId.eq(tenant.get()));
        if let Some(status) = filter.status {
            query = query.filter(session::Column::Status.eq(status.as_str()));
        }
        if let Some(agent) = filter.agent {
            query = query.filter(session::Column::AgentId.eq(agent.get()));
        }
        if let Some(department) = filter.department {
            query = query.filter(session::Column::Department.eq(department));
        }
        if let Some(before) = before {
            let cursor = find_session(&self.db, tenant, before)
                .await?
                .ok_or_else(|| ChatError::InvalidPage(crate::INVALID_CURSOR.into()))?;
            query = query.filter(crate::store::older_than(
                session::Column::CreatedAt,
                session::Column::Id,
                cursor.created_at,
                before.as_uuid(),
            ));
        }
        let rows = query
            .order_by_desc(session::Column::CreatedAt)
            .order_by_desc(session::Column::Id)
            .limit(limit.get())
            .all(&self.db)
            .await?;
        let mut views = Vec::with_capacity(rows.len());
        for row in rows {
            views.push(view(&self.db, row).await?);
        }
        Ok(views)
    }

    async fn customer_sessions(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        before: Option<SessionId>,
        limit: PageSize,
    ) -> Result<Vec<ChatSession>, ChatError> {
        let mut query = session::Entity::find()
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::CustomerId.eq(customer.as_uuid()));
        if let Some(before) = before {
            // A cursor is one of the customer's own sessions, as for the
            // other lists' cursors.
            let own = query
                .clone()
                .filter(session::Column::Id.eq(before.as_uuid()))
                .one(&self.db)
                .await?;
            if own.is_none() {
                return Err(ChatError::InvalidPage(crate::INVALID_CURSOR.into()));
            }
            query = query.filter(session::Column::Id.lt(before.as_uuid()));
        }
        let rows = query
            .order_by_desc(session::Column::Id)
            .limit(limit.get())
            .all(&self.db)
            .await?;
        convert_all(rows)
    }

    async fn close_session(
        &self,
        tenant: TenantId,
        id: SessionId,
        closed_by: Sender,
        policy: &RoutingPolicy,
    ) -> Result<ChatSession, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        let Some(closed) = close_row(&tx, &mut ev, tenant, id, closed_by).await? else {
            // Already closed (idempotent) or absent in this tenant.
            tx.rollback().await?;
            return self.get_session(tenant, id).await;
        };
        if closed.agent_id.is_some() {
            drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        }
        self.commit(tx, ev).await?;
        Ok(closed)
    }

    async fn assign_session(
        &self,
        tenant: TenantId,
        id: SessionId,
        agent: UserId,
        mode: AssignMode,
        policy: &RoutingPolicy,
    ) -> Result<ChatSession, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let capacity = lock_tenant(&tx, tenant, policy).await?;
        let Some(row) = find_session(&tx, tenant, id).await? else {
            return abort(tx, ChatError::NotFound).await;
        };
        let current = ChatSession::try_from(row.clone())?;
        match current.status {
            SessionStatus::Closed => return abort(tx, ChatError::SessionClosed).await,
            SessionStatus::Open if current.agent_id == Some(agent) => {
                tx.rollback().await?;
                return Ok(current);
            }
            SessionStatus::Open if mode == AssignMode::Claim => {
                return abort(tx, ChatError::AlreadyAssigned).await;
            }
            _ => {}
        }
        if !agent_is_online(&tx, tenant, agent, policy).await? {
            return abort(tx, ChatError::AgentNotOnline(agent)).await;
        }
        let assigned = match assign(&tx, &mut ev, tenant, &row, agent).await {
            Ok(s) => s,
            Err(e) => return abort(tx, e).await,
        };
        if current.status == SessionStatus::Open {
            // A transfer freed the previous agent.
            drain_queue(&tx, &mut ev, tenant, policy, capacity).await?;
        }
        self.commit(tx, ev).await?;
        Ok(assigned)
    }

    async fn update_contact(
        &self,
        tenant: TenantId,
        id: SessionId,
        contact: Contact,
    ) -> Result<ChatSession, ChatError> {
        let tx = self.begin_write().await?;
        let mut ev = self.recorder();
        let updated = session::Entity::update_many()
            .col_expr(
                session::Column::Contact,
                Expr::value(contact_json(&contact)?),
            )
            .col_expr(session::Column::UpdatedAt, Expr::value(now()))
            .filter(session::Column::Id.eq(id.as_uuid()))
            .filter(session::Column::TenantId.eq(tenant.get()))
            .filter(session::Column::Status.ne(SessionStatus::Closed.as_str()))
            .exec_with_returning(&tx)
            .await?;
        let Some(row) = updated.into_iter().next() else {
            // Not updated: no such session, or a closed one (read-only).
            let error = match find_session(&tx, tenant, id).await? {
                Some(_) => ChatError::SessionClosed,
                None => ChatError::NotFound,
            };
            return abort(tx, error).await;
        };
        let session = ChatSession::try_from(row)?;
        let payload = ContactUpdated {
            session: &session,
            contact_updated: true,
        };
        record_event(
            &tx,
            &mut ev,
            tenant,
            Some(id),
            EventKind::SessionUpdated,
            &payload,
        )
        .await?;
        self.commit(tx, ev).await?;
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{DbBackend, QueryTrait, Statement};

    use super::{EventsOf, pending_events_query};
    use crate::error::ChatError;
    use crate::events::EventKind;
    use crate::ids::{SessionId, TenantId};
    use crate::store::EachTenant;

    /// A housekeeping step run for each tenant keeps what the others did
    /// past a failure, and fails only when every attempt failed (the
    /// database down), with the first error.
    #[test]
    fn each_tenant_fails_only_when_every_attempt_failed() {
        let gone = || ChatError::Storage(sea_orm::DbErr::Custom("down".into()));
        let mut mixed = EachTenant::new("test");
        mixed.record(1, Err::<Vec<i32>, _>(gone()));
        mixed.record(2, Ok(vec![20, 21]));
        mixed.record(3, Ok(vec![]));
        assert_eq!(mixed.finish().unwrap(), vec![20, 21]);

        let mut none = EachTenant::new("test");
        none.record(1, Err::<Vec<i32>, _>(gone()));
        none.record(
            2,
            Err::<Vec<i32>, _>(ChatError::Storage(sea_orm::DbErr::Custom("again".into()))),
        );
        assert!(matches!(
            none.finish(),
            Err(ChatError::Storage(sea_orm::DbErr::Custom(m))) if m == "down"
        ));

        let nothing: EachTenant<i32> = EachTenant::new("test");
        assert_eq!(nothing.finish().unwrap(), Vec::<i32>::new());
    }

    /// The outbox reads of a ticket's close (and of a ticket's lookup
    /// while its opening is undelivered), for a test of their plans.
    fn ticket_reads(backend: DbBackend) -> Vec<(&'static str, Statement)> {
        let tenant = TenantId::new(1).unwrap();
        let session = SessionId::from_uuid(uuid::Uuid::now_v7());
        let kinds = [EventKind::TicketRequested, EventKind::TicketClosed];
        let pending = |of| pending_events_query(tenant, of, &kinds).build(backend);
        vec![
            ("pending_session", pending(EventsOf::Session(Some(session)))),
            ("pending_sessionless", pending(EventsOf::Session(None))),
            ("pending_tenant", pending(EventsOf::Tenant)),
        ]
    }

    /// Issue #5: the reads of a ticket's close go through the partial
    /// index of undispatched events, not the tenant index, which holds
    /// every event of the tenant's history (SQLite took it for its
    /// equality, and read the whole history inside a write transaction).
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn the_ticket_reads_skip_the_tenants_history_on_sqlite() {
        use sea_orm_migration::MigratorTrait;
        let db = crate::store::connect("sqlite::memory:").await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        for (name, statement) in ticket_reads(DbBackend::Sqlite) {
            let plan = crate::store::test_sqlite::sqlite_plan(&db, statement).await;
            let text = plan.join("\n");
            assert!(
                text.contains("livechat_outbox_undispatched"),
                "{name}: {text}"
            );
            assert!(
                !text.contains("livechat_outbox_tenant_id"),
                "{name}: {text}"
            );
        }
    }

    /// Issue #5: the same on PostgreSQL under the generic plan a prepared
    /// statement comes to, with statistics of a tenant history of 20,000
    /// dispatched events.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn the_ticket_reads_skip_the_tenants_history_on_postgres() {
        use sea_orm::{ConnectionTrait, TransactionTrait};

        use crate::store::test_postgres::{generic_plan, migrated_postgres};
        let db = migrated_postgres().await;
        for sql in [
            "INSERT INTO livechat_outbox \
             (id, tenant_id, session_id, kind, payload, created_at, available_at, dispatched_at) \
             SELECT gen_random_uuid(), 1, gen_random_uuid(), 'message.posted', '{}', \
             now(), now(), now() FROM generate_series(1, 20000) g",
            "INSERT INTO livechat_outbox \
             (id, tenant_id, session_id, kind, payload, created_at, available_at) \
             SELECT gen_random_uuid(), 1, gen_random_uuid(), 'message.posted', '{}', now(), now() \
             FROM generate_series(1, 5) g",
            "ANALYZE livechat_outbox",
        ] {
            db.execute_unprepared(sql).await.unwrap();
        }
        for (name, statement) in ticket_reads(DbBackend::Postgres) {
            let tx = db.begin().await.unwrap();
            let plan = generic_plan(&tx, name, statement).await;
            let text = plan.join("\n");
            assert!(
                text.contains("livechat_outbox_undispatched"),
                "{name}: {text}"
            );
            assert!(!text.contains("Seq Scan"), "{name}: {text}");
            assert!(
                !text.contains("livechat_outbox_tenant_id"),
                "{name}: {text}"
            );
            tx.rollback().await.unwrap();
        }
    }
}
