//! Read models that live outside core: tickets and customer notifications.
//!
//! Core decides *when* a ticket or a notification is due (it writes
//! [`EventKind::TicketRequested`](crate::EventKind),
//! [`EventKind::MessagePosted`](crate::EventKind) and
//! [`EventKind::MessageMissed`](crate::EventKind) events); a consumer of the
//! outbox (the ticket bridge, or the host's own ticket module) materializes
//! them. These traits are how the HTTP layer reads them back for agents
//! (`GET /livechat/tickets`) and customers (`GET /livechat/customer/notifications`)
//! without knowing who stores them. Every method is tenant-scoped
//! (DESIGN.md invariant 1).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ChatError;
use crate::events::TicketReason;
use crate::ids::{CustomerId, NotificationId, SessionId, TenantId, TicketId, UserId};
use crate::model::Priority;
use crate::validate::PageSize;

/// Open until its session closes or an agent closes it (issue #3,
/// `POST /tickets/{id}/close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TicketStatus {
    /// Awaiting an answer.
    Open,
    /// Its session closed, or an agent closed it.
    Closed,
}

impl TicketStatus {
    /// The stored and wire form.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Closed => "CLOSED",
        }
    }

    /// Parses the stored and wire form.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "OPEN" => Some(Self::Open),
            "CLOSED" => Some(Self::Closed),
            _ => None,
        }
    }
}

/// A ticket as agents see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The id allocated when the request was ticketed: no agent online
    /// (who takes its department) at its start or while it waited, or an
    /// agent-started chat named an agent who is not online.
    pub id: TicketId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Why it was opened.
    pub reason: TicketReason,
    /// The session it keeps, for customer chats.
    pub session_id: Option<SessionId>,
    /// The customer, for customer chats.
    pub customer_id: Option<CustomerId>,
    /// The agent it is addressed to, for agent-started chats.
    pub agent_id: Option<UserId>,
    /// The customer's topic (or a generated subject).
    pub subject: String,
    /// The department the customer asked for, if any
    /// ([`TicketRequested::department`](crate::TicketRequested::department)).
    pub department: Option<String>,
    /// Priority carried over from the chat.
    pub priority: Priority,
    /// Open or closed.
    pub status: TicketStatus,
    /// When it was opened (UTC).
    pub created_at: DateTime<Utc>,
    /// When it closed (UTC).
    pub closed_at: Option<DateTime<Utc>>,
}

/// An in-app notification for a customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The id of the agent reply it is about (also the id of its
    /// `message.posted` event; a `message.missed` event has its own id).
    /// Unique: the sinks store or send one notification per id.
    pub id: NotificationId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// The customer it is for.
    pub customer_id: CustomerId,
    /// The session concerned.
    pub session_id: Option<SessionId>,
    /// The ticket concerned.
    pub ticket_id: Option<TicketId>,
    /// `agent_reply`.
    pub kind: String,
    /// Short text, e.g. "An agent replied".
    pub title: String,
    /// The reply (truncated to 500 characters).
    pub body: String,
    /// When it was created (UTC).
    pub created_at: DateTime<Utc>,
    /// When the customer marked it read.
    pub read_at: Option<DateTime<Utc>>,
}

/// Which of a tenant's tickets [`TicketDirectory::list_tickets`] lists
/// (the query of `GET /tickets`). Every field left `None` lists all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TicketFilter {
    /// Only tickets with this status.
    pub status: Option<TicketStatus>,
    /// Only tickets whose customer asked for this department (compared
    /// exactly with [`Ticket::department`]): one team's tickets.
    pub department: Option<String>,
}

/// Tickets for agents' routes.
#[async_trait]
pub trait TicketDirectory: Send + Sync + 'static {
    /// The tenant's tickets that `filter` selects, newest first (by
    /// `created_at`, then id), and only those after `before` in that
    /// order (the cursor: the last ticket of the previous page, which need
    /// not match `filter`).
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] ([`crate::INVALID_CURSOR`]) when `before`
    /// is not a ticket of the tenant.
    async fn list_tickets(
        &self,
        tenant: TenantId,
        filter: TicketFilter,
        before: Option<TicketId>,
        limit: PageSize,
    ) -> Result<Vec<Ticket>, ChatError>;

    /// One ticket.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when it does not exist in this tenant (it may
    /// not be materialized yet right after the request).
    async fn get_ticket(&self, tenant: TenantId, id: TicketId) -> Result<Ticket, ChatError>;
}

/// Customer notifications for customers' routes.
///
/// A customer's notifications are those addressed to any of `customers`:
/// the customer's own id and the ids of the visitors linked to it
/// ([`crate::ChatService::notification_recipients`]). A notification names
/// the session's customer at the time of the reply, and a visitor who logs
/// in afterwards is linked to the identified customer, whose routes must
/// still find it (issue #4: the customer is told when an agent answers).
#[async_trait]
pub trait NotificationInbox: Send + Sync + 'static {
    /// The notifications addressed to any of `customers`, newest first (by
    /// `created_at`, then id; none for an empty slice), and only those
    /// after `before` in that order (the cursor: the last notification of
    /// the previous page).
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] ([`crate::INVALID_CURSOR`]) when `before`
    /// is not one of these notifications.
    async fn list_notifications(
        &self,
        tenant: TenantId,
        customers: &[CustomerId],
        before: Option<NotificationId>,
        limit: PageSize,
    ) -> Result<Vec<Notification>, ChatError>;

    /// Marks one read (idempotent) and returns it.
    ///
    /// # Errors
    /// [`ChatError::NotFound`] when it is not addressed to one of
    /// `customers` in this tenant.
    async fn mark_read(
        &self,
        tenant: TenantId,
        customers: &[CustomerId],
        id: NotificationId,
    ) -> Result<Notification, ChatError>;
}
