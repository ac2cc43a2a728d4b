//! The traits a host implements to receive tickets and notifications.

use async_trait::async_trait;
use livechat_core::{
    ChatMessage, Contact, EventId, Notification, TenantId, TicketId, TicketRequested, UserId,
};

/// Why a sink could not take an event. The variant decides what the
/// [`Dispatcher`](crate::Dispatcher) does next (issue #3: retried on
/// timeouts and 5xx, never on 4xx).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// A transient failure (timeout, connection refused, 5xx, 429, database
    /// error): the event is delivered again after an exponential backoff.
    #[error("retryable: {0}")]
    Retryable(String),
    /// The sink will never accept this event (e.g. a 4xx answer): the event
    /// is settled as failed with this message and not retried.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// Where tickets go: the host's own ticket system, [`SeaOrmSinks`](crate::SeaOrmSinks)
/// or [`WebhookSink`](crate::WebhookSink).
///
/// Delivery is at least once: the same call may come again (after a crash
/// or a lease expiry, before the event was settled) with the same `key`,
/// the id of the outbox event. Implementations must be idempotent on it, so
/// that every event ends as exactly one ticket (issue #3, crash safety).
#[async_trait]
pub trait TicketSink: Send + Sync + 'static {
    /// The sink's name, stored with an event that is retried for some
    /// sinks only: a retry calls the sinks that have not accepted it, and
    /// the session's later events wait for those sinks only, going on to
    /// the others at once (a failing webhook does not hold up the in-app
    /// tickets and notifications). Unique among a dispatcher's sinks of one
    /// kind ([`Dispatcher::ticket_sink`](crate::Dispatcher::ticket_sink)
    /// panics on a second one); a type that is both kinds of sink gives
    /// both the same name, so that its own events stay in order whatever
    /// their kind. Keep it stable across restarts and releases: an event
    /// waiting for a retry is owed to the names it failed on (if none of
    /// them is among the dispatcher's sinks any more, it goes to all of
    /// them, logged, and a sink that took it before gets it again under
    /// the same key). Default: the type's name ([`std::any::type_name`]),
    /// which moves with the type and may change between compilers.
    fn name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }

    /// Opens the ticket `request.ticket_id` for a request ticketed with no
    /// agent online (who takes its department), at its start or while it
    /// waited, or an agent-started chat that named an agent who is not
    /// online (event `ticket.requested`).
    ///
    /// # Errors
    /// [`SinkError::Retryable`] to be called again later,
    /// [`SinkError::Permanent`] to give up on this event.
    async fn open_ticket(&self, request: &TicketRequested, key: EventId) -> Result<(), SinkError>;

    /// Closes `ticket` of `tenant` because its session closed (event
    /// `session.closed`) or an agent closed it (event `ticket.closed`).
    /// Closing a closed or unknown ticket is not an error.
    ///
    /// # Errors
    /// As for [`TicketSink::open_ticket`].
    async fn close_ticket(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        key: EventId,
    ) -> Result<(), SinkError>;

    /// The session of `ticket` got an agent: `agent` now serves it, by
    /// routing, a claim or a transfer (event `session.assigned` of a
    /// ticketed session), so a help desk can show who owns the ticket.
    /// Called in the session's order, after the ticket's opening. Default:
    /// nothing, for a ticket system that does not track owners.
    ///
    /// # Errors
    /// As for [`TicketSink::open_ticket`].
    async fn assign_ticket(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        agent: UserId,
        key: EventId,
    ) -> Result<(), SinkError> {
        let _ = (tenant, ticket, agent, key);
        Ok(())
    }

    /// The session of `ticket` went back to the queue without an agent:
    /// the agent serving it went offline, or was gone too long (event
    /// `session.assigned` of a ticketed session with no agent), so the
    /// ticket has no owner until the next [`TicketSink::assign_ticket`].
    /// Called in the session's order. Default: nothing, as for
    /// [`TicketSink::assign_ticket`].
    ///
    /// # Errors
    /// As for [`TicketSink::open_ticket`].
    async fn unassign_ticket(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        key: EventId,
    ) -> Result<(), SinkError> {
        let _ = (tenant, ticket, key);
        Ok(())
    }

    /// The customer wrote `message` in the chat of `ticket` after the
    /// ticket opened (event `message.posted` by the customer of a ticketed
    /// session), so that a help desk holds the whole request and not only
    /// its first message: a customer who adds an order number while
    /// nobody is online is not lost to it (README "Tickets when no agent
    /// can take a chat"). `message` is the stored message, with its `seq`,
    /// text and time. The messages the ticket opened with came as
    /// [`TicketRequested::first_message`] and [`TicketRequested::messages`]
    /// and are not sent again. Sent too when an agent had closed the ticket
    /// while the chat went on (a help desk may reopen it). Called in the
    /// session's order, after the ticket's opening. Agents' replies are not
    /// sent here: they reach the notification sinks. Default: nothing, for
    /// a ticket system that reads the chat's history itself (the tables of
    /// [`SeaOrmSinks`](crate::SeaOrmSinks) keep the session's id).
    ///
    /// # Errors
    /// As for [`TicketSink::open_ticket`].
    async fn ticket_message(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        message: &ChatMessage,
        key: EventId,
    ) -> Result<(), SinkError> {
        let _ = (tenant, ticket, message, key);
        Ok(())
    }

    /// The customer gave new contact details (`contact`, the whole of
    /// them) in the chat of `ticket` after the ticket opened (event
    /// `session.updated` of a contact change, `PUT
    /// /customer/chats/{id}/contact`, in a ticketed session): an
    /// anonymous visitor who leaves an e-mail address once nobody answered
    /// can then be reached by the help desk. The contact given before the
    /// ticket opened came as [`TicketRequested::contact`]. Sent too when an
    /// agent had closed the ticket while the chat went on, as
    /// [`TicketSink::ticket_message`] is. Called in the session's order,
    /// after the ticket's opening. Default: nothing, for a ticket system
    /// that reads the session itself (the tables of
    /// [`SeaOrmSinks`](crate::SeaOrmSinks) keep the session's id, and the
    /// session its contact).
    ///
    /// # Errors
    /// As for [`TicketSink::open_ticket`].
    async fn ticket_contact(
        &self,
        tenant: TenantId,
        ticket: TicketId,
        contact: &Contact,
        key: EventId,
    ) -> Result<(), SinkError> {
        let _ = (tenant, ticket, contact, key);
        Ok(())
    }
}

/// Where customer notifications go: an agent replied in a ticketed
/// session, or to a customer no live connection followed (`message.posted`,
/// or `message.missed` when a customer connection that counted died: its
/// node crashed, or its client went silent).
///
/// At least once, like [`TicketSink`]: `key` is the outbox event id. The
/// notification's [`Notification::id`] is the reply's message id, which
/// for `message.posted` is also the event id, and for `message.missed`
/// is not: a reply notified through both events has one notification id
/// and two keys. Implementations must store or send one notification per
/// [`Notification::id`] (the default tables insert by it).
#[async_trait]
pub trait NotificationSink: Send + Sync + 'static {
    /// The sink's name, stored with an event that is retried for some
    /// sinks only: a retry calls the sinks that have not accepted it, and
    /// the session's later events wait for those sinks only, going on to
    /// the others at once (a failing webhook does not hold up the in-app
    /// tickets and notifications). Unique among a dispatcher's sinks of one
    /// kind ([`Dispatcher::notification_sink`](crate::Dispatcher::notification_sink)
    /// panics on a second one); a type that is both kinds of sink gives
    /// both the same name, so that its own events stay in order whatever
    /// their kind. Keep it stable across restarts and releases: an event
    /// waiting for a retry is owed to the names it failed on (if none of
    /// them is among the dispatcher's sinks any more, it goes to all of
    /// them, logged, and a sink that took it before gets it again under
    /// the same key). Default: the type's name ([`std::any::type_name`]),
    /// which moves with the type and may change between compilers.
    fn name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }

    /// Delivers `notification` to its customer.
    ///
    /// # Errors
    /// [`SinkError::Retryable`] to be called again later,
    /// [`SinkError::Permanent`] to give up on this event.
    async fn notify(&self, notification: &Notification, key: EventId) -> Result<(), SinkError>;
}
