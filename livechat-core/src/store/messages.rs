//! [`MessageRepository`] for the SeaORM store.

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::entity::{message, session};
use super::sessions::find_session;
use super::{SeaOrmStore, abort, convert_all, record_event};
use crate::error::ChatError;
use crate::events::{EventKind, MessagePosted};
use crate::ids::{CustomerId, MessageId, SessionId, TenantId, TicketId};
use crate::model::{ChatMessage, Sender, SenderType, SessionStatus, now};
use crate::repository::{AppendedMessage, MessageRepository};
use crate::validate::{ClientMsgId, MessageBody, PageSize};

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

        let at = now();
        let tx = self.begin_write().await?;
        let mut ev = Vec::new();
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
            .filter(session::Column::Status.is_in(allowed.iter().map(|s| s.as_str())))
            .exec_with_returning(&tx)
            .await?;
        let Some(row) = locked.into_iter().next() else {
            let err = match find_session(&tx, tenant, session).await? {
                Some(s) if s.status == SessionStatus::Closed.as_str() => ChatError::SessionClosed,
                Some(_) => ChatError::SessionNotOpen,
                None => ChatError::NotFound,
            };
            return abort(tx, err).await;
        };

        if let Some(key) = client_msg_id {
            // Under the row lock: a concurrent retry of the same key either
            // committed before us (found here) or waits behind us.
            let existing = message::Entity::find()
                .filter(message::Column::TenantId.eq(tenant.get()))
                .filter(message::Column::SessionId.eq(session.as_uuid()))
                .filter(message::Column::ClientMsgId.eq(key.as_str()))
                .one(&tx)
                .await?;
            if let Some(existing) = existing {
                tx.rollback().await?;
                return Ok(AppendedMessage {
                    message: existing.try_into()?,
                    created: false,
                });
            }
        }

        let (sender_type, sender_id, customer_id) = match sender {
            Sender::Agent(agent) => (SenderType::Agent, Some(agent), None),
            Sender::Customer(customer) => (
                SenderType::Customer,
                super::customers::host_user_of(&tx, tenant, customer).await?,
                Some(customer),
            ),
            Sender::System => (SenderType::System, None, None),
        };
        let stored = message::Entity::insert(message::ActiveModel {
            id: Set(MessageId::generate().as_uuid()),
            tenant_id: Set(tenant.get()),
            session_id: Set(session.as_uuid()),
            sender_type: Set(sender_type.as_str().to_owned()),
            sender_id: Set(sender_id.map(crate::UserId::get)),
            customer_id: Set(customer_id.map(|c: CustomerId| c.as_uuid())),
            seq: Set(row.last_seq),
            body: Set(body.as_str().to_owned()),
            client_msg_id: Set(client_msg_id.map(|k| k.as_str().to_owned())),
            created_at: Set(at),
        })
        .exec_with_returning(&tx)
        .await?;
        let message = ChatMessage::try_from(stored)?;
        let customer_connected = match (sender, row.customer_id) {
            (Sender::Agent(_), Some(_)) => {
                super::connections::customer_connections(&tx, tenant, session).await? > 0
            }
            _ => false,
        };
        let posted = MessagePosted {
            message: message.clone(),
            session_customer_id: row.customer_id.map(CustomerId::from_uuid),
            ticket_id: row.ticket_id.map(TicketId::from_uuid),
            customer_connected,
        };
        record_event(
            &tx,
            &mut ev,
            tenant,
            Some(session),
            EventKind::MessagePosted,
            &posted,
        )
        .await?;
        tx.commit().await?;
        self.publish(ev);
        Ok(AppendedMessage {
            message,
            created: true,
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
