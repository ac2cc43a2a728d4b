//! # livechat-ticket-bridge
//!
//! Turns the committed domain events of livechat-core's outbox into tickets
//! and customer notifications (issue #3, DESIGN.md invariant 5). Core does
//! not know this crate exists: it writes `ticket.requested`,
//! `ticket.closed`, `session.assigned`, `session.updated`,
//! `session.closed`, `message.posted` and `message.missed` events in the
//! same transaction as each change, and the [`Dispatcher`] reads them back
//! through [`OutboxConsumer`](livechat_core::OutboxConsumer) and calls the
//! sinks:
//!
//! - [`TicketSink::open_ticket`] when a request found no eligible agent,
//!   [`TicketSink::assign_ticket`] when a ticketed chat gets an agent,
//!   [`TicketSink::unassign_ticket`] when a ticketed chat is handed back
//!   to the queue (its agent went offline or was gone too long),
//!   [`TicketSink::ticket_message`] when the customer writes in a
//!   ticketed chat, [`TicketSink::ticket_contact`] when the customer
//!   gives new contact details in a ticketed chat (`session.updated`),
//!   [`TicketSink::close_ticket`] when a ticketed session closes or an
//!   agent closes a ticket;
//! - [`NotificationSink::notify`] when an agent replies in a ticketed
//!   session or to a customer with no live connection following the
//!   session, and for a reply that only a dead customer connection
//!   followed (`message.missed`: its node crashed, or its node closed it
//!   because its client went silent).
//!
//! Delivery is at least once, in order per session and sink, retried with
//! exponential backoff on [`SinkError::Retryable`] (for the sinks that
//! failed only: the others go on with the session's later events). Every call carries the
//! event id as its idempotency key, so a sink that honours it ends with
//! exactly one ticket or notification per event, even across crashes.
//!
//! Sinks shipped with the crate: [`SeaOrmSinks`] (tables `livechat_tickets`
//! and `livechat_notifications`, created by [`BridgeMigrator`]; it also
//! serves the agents' ticket list and the customers' notifications as
//! livechat-core's [`TicketDirectory`](livechat_core::TicketDirectory) and
//! [`NotificationInbox`](livechat_core::NotificationInbox)) and
//! [`WebhookSink`] (signed JSON POSTs; receivers check them with
//! [`verify_signature`]).
//!
//! A host with its own ticket system implements the traits and wires them
//! next to (or instead of) the default sinks:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use livechat_core::store::{self, Migrator, SeaOrmStore};
//! use livechat_core::{EventId, Notification, TenantId, TicketId, TicketRequested};
//! use livechat_ticket_bridge::{
//!     BridgeMigrator, Dispatcher, DispatcherConfig, NotificationSink, SeaOrmSinks, SinkError,
//!     TicketSink,
//! };
//! use sea_orm_migration::MigratorTrait;
//!
//! /// The host's help desk; it stores the event id to ignore redeliveries.
//! struct HelpDesk;
//!
//! #[async_trait]
//! impl TicketSink for HelpDesk {
//!     async fn open_ticket(&self, request: &TicketRequested, key: EventId) -> Result<(), SinkError> {
//!         println!("open {} for tenant {} (key {key})", request.ticket_id, request.tenant_id);
//!         Ok(()) // or Err(SinkError::Retryable(..)) when the help desk is down
//!     }
//!
//!     async fn close_ticket(&self, tenant: TenantId, ticket: TicketId, key: EventId) -> Result<(), SinkError> {
//!         println!("close {ticket} of tenant {tenant} (key {key})");
//!         Ok(())
//!     }
//! }
//!
//! #[async_trait]
//! impl NotificationSink for HelpDesk {
//!     async fn notify(&self, n: &Notification, key: EventId) -> Result<(), SinkError> {
//!         println!("e-mail customer {}: {} (key {key})", n.customer_id, n.title);
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let db = store::connect("sqlite://livechat.db?mode=rwc").await?;
//! Migrator::up(&db, None).await?;
//! BridgeMigrator::up(&db, None).await?;
//!
//! let tables = Arc::new(SeaOrmSinks::new(db.clone()));
//! let help_desk = Arc::new(HelpDesk);
//! let dispatcher = Dispatcher::new(SeaOrmStore::new(db), DispatcherConfig::default())
//!     .ticket_sink(tables.clone())
//!     .ticket_sink(help_desk.clone())
//!     .notification_sink(tables)
//!     .notification_sink(help_desk);
//!
//! // Runs until Ctrl-C; usually spawned next to the HTTP server.
//! dispatcher
//!     .run(async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await;
//! # Ok(()) }
//! ```

mod dispatcher;
mod sink;
mod store;
mod webhook;

pub use dispatcher::{
    DispatchReport, Dispatcher, DispatcherConfig, MAX_LEASE, NOTIFICATION_BODY_MAX_CHARS,
    RELEASE_WAIT, SESSIONS_AT_ONCE,
};
pub use sink::{NotificationSink, SinkError, TicketSink};
pub use store::{BridgeMigrator, SeaOrmSinks};
pub use webhook::{
    DEFAULT_TIMEOUT, EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Url, WebhookSink,
    verify_signature,
};
