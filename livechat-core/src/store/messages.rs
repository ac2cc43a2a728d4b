//! [`MessageRepository`] for the SeaORM store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, SqlErr,
};
use tokio::sync::oneshot;

use super::entity::{message, outbox, session};
use super::sessions::find_session;
use super::{SeaOrmStore, convert_all, outbox_row};
use crate::error::ChatError;
use crate::events::{DomainEvent, EventKind, MessagePosted};
use crate::ids::{CustomerId, MessageId, SessionId, TenantId, TicketId};
use crate::model::{ChatMessage, Sender, SenderType, SessionStatus, now};
use crate::repository::{AppendedMessage, MessageRepository};
use crate::validate::{ClientMsgId, MessageBody, PageSize};

/// Most appends committed together in one transaction.
const MAX_BATCH: usize = 128;

/// Appends waiting for the next group commit, shared by all clones of a
/// [`SeaOrmStore`].
///
/// Group commit (issue #5): concurrent `append_message` calls queue here;
/// one task at a time (the "committer", started by the call that finds none
/// running) takes everything queued, stores it in one transaction — one
/// fsync for the whole batch — and answers each caller only after the
/// commit, so a `201` still means the message is on disk. Appends that
/// arrive while a batch commits form the next batch, so the batch size
/// follows the load: a lone sender commits alone, 64 concurrent senders
/// share commits.
#[derive(Debug, Default)]
pub(super) struct AppendQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    pending: Vec<AppendRequest>,
    committing: bool,
}

#[derive(Debug)]
struct AppendRequest {
    tenant: TenantId,
    session: SessionId,
    sender: Sender,
    body: MessageBody,
    key: Option<ClientMsgId>,
    allowed: Vec<SessionStatus>,
    reply: oneshot::Sender<Result<AppendedMessage, ChatError>>,
}

impl AppendQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // The state stays consistent even if a holder panicked (every
        // critical section is a push or a take).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `request`; `true` when the caller must start the committer.
    fn push(&self, request: AppendRequest) -> bool {
        let mut state = self.lock();
        state.pending.push(request);
        !std::mem::replace(&mut state.committing, true)
    }

    /// The next batch, or `None` (and the committer stops) when nothing is
    /// queued.
    fn take(&self) -> Option<Vec<AppendRequest>> {
        let mut state = self.lock();
        if state.pending.is_empty() {
            state.committing = false;
            return None;
        }
        let n = state.pending.len().min(MAX_BATCH);
        Some(state.pending.drain(..n).collect())
    }
}

/// Resets the queue if the committer ends abnormally (panic, runtime shut
/// down): queued callers get an error instead of waiting forever, and the
/// next append starts a new committer.
struct Committer {
    queue: Arc<AppendQueue>,
    finished: bool,
}

impl Drop for Committer {
    fn drop(&mut self) {
        if !self.finished {
            let mut state = self.queue.lock();
            state.pending.clear();
            state.committing = false;
        }
    }
}

/// A message ready to insert, or the outcome of an append that stores nothing.
enum Staged {
    New(Box<NewMessage>),
    Done(Result<AppendedMessage, ChatError>),
}

/// The rows of one new message and its `message.posted` event.
struct NewMessage {
    row: message::ActiveModel,
    message: ChatMessage,
    event: (outbox::ActiveModel, DomainEvent),
}

impl SeaOrmStore {
    async fn find_by_client_msg_id(
        &self,
        tenant: TenantId,
        session: SessionId,
        key: &ClientMsgId,
    ) -> Result<Option<ChatMessage>, ChatError> {
        message::Entity::find()
            .filter(message::Column::TenantId.eq(tenant.get()))
            .filter(message::Column::SessionId.eq(session.as_uuid()))
            .filter(message::Column::ClientMsgId.eq(key.as_str()))
            .one(&self.db)
            .await?
            .map(ChatMessage::try_from)
            .transpose()
    }

    /// Commits queued appends until the queue is empty.
    async fn run_committer(self) {
        let mut guard = Committer {
            queue: self.appends.clone(),
            finished: false,
        };
        while let Some(batch) = self.appends.take() {
            self.commit_batch(batch).await;
        }
        guard.finished = true;
    }

    /// Stores `batch` in one transaction and answers every caller. When a
    /// statement or the commit fails (e.g. a concurrent duplicate
    /// `client_msg_id` hit the unique index), nothing of the batch is
    /// stored, and each append is retried in a transaction of its own, so
    /// one request's failure is not another's.
    async fn commit_batch(&self, mut batch: Vec<AppendRequest>) {
        // Stable: one session's appends keep their arrival (= seq) order,
        // and every batch locks session rows in the same order, so batches
        // of two nodes on PostgreSQL cannot deadlock each other.
        batch.sort_by_key(|r| r.session.as_uuid());
        match self.store_batch(&batch, false).await {
            Ok((outcomes, events)) => {
                self.publish(events);
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = request.reply.send(outcome);
                }
            }
            Err(error) if batch.len() == 1 && !is_conflict(&error) => {
                for request in batch {
                    let _ = request.reply.send(Err(error.clone().into()));
                }
            }
            Err(_) => {
                for request in batch {
                    let outcome = match self.store_batch(std::slice::from_ref(&request), true).await
                    {
                        Ok((mut outcomes, events)) => {
                            self.publish(events);
                            outcomes.pop().unwrap_or(Err(ChatError::NotFound))
                        }
                        Err(error) => Err(error.into()),
                    };
                    let _ = request.reply.send(outcome);
                }
            }
        }
    }

    /// One transaction for `batch`: per append, the next `seq` (locking the
    /// session row), then all messages and all outbox rows in one insert
    /// each. `check_keys` (only for a batch of one) looks up the
    /// `client_msg_id` under the row lock (the slow, exact path); without it
    /// a concurrent duplicate is caught by the unique index, failing the
    /// batch.
    async fn store_batch(
        &self,
        batch: &[AppendRequest],
        check_keys: bool,
    ) -> Result<(Vec<Result<AppendedMessage, ChatError>>, Vec<DomainEvent>), DbErr> {
        let tx = self.begin_write().await?;
        let mut staged = Vec::with_capacity(batch.len());
        let mut keys: HashMap<(SessionId, &str), ChatMessage> = HashMap::new();
        for request in batch {
            let duplicate = request
                .key
                .as_ref()
                .and_then(|k| keys.get(&(request.session, k.as_str())));
            let step = match duplicate {
                Some(original) => Staged::Done(Ok(AppendedMessage {
                    message: original.clone(),
                    created: false,
                })),
                None => stage(&tx, request, check_keys).await?,
            };
            if let (Staged::New(new), Some(key)) = (&step, &request.key) {
                keys.insert((request.session, key.as_str()), new.message.clone());
            }
            staged.push(step);
        }
        let mut rows = Vec::new();
        let mut outbox_rows = Vec::new();
        let mut events = Vec::new();
        let mut outcomes = Vec::with_capacity(staged.len());
        for step in staged {
            outcomes.push(match step {
                Staged::New(new) => {
                    let NewMessage {
                        row,
                        message,
                        event,
                    } = *new;
                    rows.push(row);
                    outbox_rows.push(event.0);
                    events.push(event.1);
                    Ok(AppendedMessage {
                        message,
                        created: true,
                    })
                }
                Staged::Done(outcome) => outcome,
            });
        }
        if rows.is_empty() {
            // Nothing new (refusals and repeats): roll back, which also
            // gives back a `seq` taken before a repeat was found.
            tx.rollback().await?;
        } else {
            message::Entity::insert_many(rows)
                .exec_without_returning(&tx)
                .await?;
            outbox::Entity::insert_many(outbox_rows)
                .exec_without_returning(&tx)
                .await?;
            tx.commit().await?;
        }
        Ok((outcomes, events))
    }
}

/// A unique-index violation: a duplicate `client_msg_id` that raced in.
fn is_conflict(error: &DbErr) -> bool {
    matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Takes the next `seq` of the request's session (or finds why not) and
/// builds its message and outbox rows.
async fn stage(
    tx: &DatabaseTransaction,
    request: &AppendRequest,
    check_key: bool,
) -> Result<Staged, DbErr> {
    let (tenant, session) = (request.tenant, request.session);
    let at = now();
    // Taking the next seq locks the session row: concurrent senders to one
    // session queue here, so seq is gap-free and unique (invariant 4).
    let locked = session::Entity::update_many()
        .col_expr(
            session::Column::LastSeq,
            Expr::col(session::Column::LastSeq).add(1),
        )
        .col_expr(session::Column::UpdatedAt, Expr::value(at))
        .filter(session::Column::Id.eq(session.as_uuid()))
        .filter(session::Column::TenantId.eq(tenant.get()))
        .filter(session::Column::Status.is_in(request.allowed.iter().map(|s| s.as_str())))
        .exec_with_returning(tx)
        .await?;
    let Some(row) = locked.into_iter().next() else {
        let err = match find_session(tx, tenant, session).await? {
            Some(s) if s.status == SessionStatus::Closed.as_str() => ChatError::SessionClosed,
            Some(_) => ChatError::SessionNotOpen,
            None => ChatError::NotFound,
        };
        return Ok(Staged::Done(Err(err)));
    };

    if check_key && let Some(key) = &request.key {
        // Under the row lock: a concurrent retry of the same key either
        // committed before us (found here) or waits behind us. The seq taken
        // above is given back: a batch that stores nothing is rolled back.
        let existing = message::Entity::find()
            .filter(message::Column::TenantId.eq(tenant.get()))
            .filter(message::Column::SessionId.eq(session.as_uuid()))
            .filter(message::Column::ClientMsgId.eq(key.as_str()))
            .one(tx)
            .await?;
        if let Some(existing) = existing {
            return Ok(Staged::Done(ChatMessage::try_from(existing).map(
                |message| AppendedMessage {
                    message,
                    created: false,
                },
            )));
        }
    }

    let (sender_type, sender_id, customer_id) = match request.sender {
        Sender::Agent(agent) => (SenderType::Agent, Some(agent), None),
        Sender::Customer(customer) => {
            let user = match super::customers::host_user_of(tx, tenant, customer).await {
                Ok(user) => user,
                Err(ChatError::Storage(e)) => return Err(e),
                Err(other) => return Ok(Staged::Done(Err(other))),
            };
            (SenderType::Customer, user, Some(customer))
        }
        Sender::System => (SenderType::System, None, None),
    };
    let message = ChatMessage {
        id: MessageId::generate(),
        session_id: session,
        tenant_id: tenant,
        sender_type,
        sender_id,
        customer_id,
        seq: row.last_seq,
        message: request.body.as_str().to_owned(),
        client_msg_id: request.key.as_ref().map(|k| k.as_str().to_owned()),
        created_at: at,
    };
    let customer_connected = match (request.sender, row.customer_id) {
        (Sender::Agent(_), Some(_)) => {
            super::connections::customer_connections(tx, tenant, session).await? > 0
        }
        _ => false,
    };
    let posted = MessagePosted {
        message: message.clone(),
        session_customer_id: row.customer_id.map(CustomerId::from_uuid),
        ticket_id: row.ticket_id.map(TicketId::from_uuid),
        customer_connected,
    };
    let event = match outbox_row(tenant, Some(session), EventKind::MessagePosted, &posted) {
        Ok(event) => event,
        Err(ChatError::Storage(e)) => return Err(e),
        Err(other) => return Ok(Staged::Done(Err(other))),
    };
    let row = message::ActiveModel {
        id: Set(message.id.as_uuid()),
        tenant_id: Set(tenant.get()),
        session_id: Set(session.as_uuid()),
        sender_type: Set(sender_type.as_str().to_owned()),
        sender_id: Set(sender_id.map(crate::UserId::get)),
        customer_id: Set(customer_id.map(|c: CustomerId| c.as_uuid())),
        seq: Set(message.seq),
        body: Set(message.message.clone()),
        client_msg_id: Set(message.client_msg_id.clone()),
        created_at: Set(at),
    };
    Ok(Staged::New(Box::new(NewMessage {
        row,
        message,
        event,
    })))
}

impl MessageRepository for SeaOrmStore {
    async fn append_message(
        &self,
        tenant: TenantId,
        session: SessionId,
        sender: Sender,
        body: &MessageBody,
        client_msg_id: Option<&ClientMsgId>,
        allowed: &[SessionStatus],
    ) -> Result<AppendedMessage, ChatError> {
        // A retry whose original is stored needs no lock (and works after close).
        if let Some(key) = client_msg_id
            && let Some(message) = self.find_by_client_msg_id(tenant, session, key).await?
        {
            return Ok(AppendedMessage {
                message,
                created: false,
            });
        }
        let (reply, answer) = oneshot::channel();
        let start = self.appends.push(AppendRequest {
            tenant,
            session,
            sender,
            body: body.clone(),
            key: client_msg_id.cloned(),
            allowed: allowed.to_vec(),
            reply,
        });
        if start {
            tokio::spawn(self.clone().run_committer());
        }
        answer.await.unwrap_or_else(|_| {
            Err(ChatError::Storage(DbErr::Custom(
                "the message append was abandoned (shutting down)".into(),
            )))
        })
    }

    async fn list_messages(
        &self,
        tenant: TenantId,
        session: SessionId,
        after_seq: i64,
        limit: PageSize,
    ) -> Result<Vec<ChatMessage>, ChatError> {
        if find_session(&self.db, tenant, session).await?.is_none() {
            return Err(ChatError::NotFound);
        }
        let rows = message::Entity::find()
            .filter(message::Column::TenantId.eq(tenant.get()))
            .filter(message::Column::SessionId.eq(session.as_uuid()))
            .filter(message::Column::Seq.gt(after_seq))
            .order_by_asc(message::Column::Seq)
            .limit(limit.get())
            .all(&self.db)
            .await?;
        convert_all(rows)
    }
}
