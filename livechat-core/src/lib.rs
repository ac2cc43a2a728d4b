//! # livechat-core
//!
//! The chat rules of the livechat module, with no HTTP or framework types:
//! ids and entities, tenant-scoped repository traits, [`ChatService`] (every
//! business rule), domain events written to a transactional outbox, and the
//! SeaORM store with its migrations for SQLite and PostgreSQL.
//!
//! ```no_run
//! use livechat_core::{ChatConfig, ChatService, PresenceStatus, TenantId, UserId};
//! use livechat_core::store::{self, Migrator, SeaOrmStore};
//! use sea_orm_migration::MigratorTrait;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let db = store::connect("sqlite://livechat.db?mode=rwc").await?;
//! Migrator::up(&db, None).await?;
//! let chat = ChatService::new(SeaOrmStore::new(db), ChatConfig::default());
//!
//! let (tenant, agent) = (TenantId::new(1)?, UserId::new(7)?);
//! chat.set_agent_status(tenant, agent, PresenceStatus::Online).await?;
//! let session = chat.start_session(tenant, agent, None).await?;
//! let sent = chat.post_message(tenant, agent, session.id, "Halo".into(), None).await?;
//! assert_eq!(sent.message.seq, 1);
//! # Ok(()) }
//! ```
//!
//! The rules come from the project's design brief, `DESIGN.md` (not in
//! this repository: its invariants 1–6, which the docs cite by number, are
//! restated in ARCHITECTURE.md, "Architecture invariants"), and issue #2.

pub mod bus;
mod config;
mod error;
mod events;
mod ids;
mod inbox;
mod model;
mod outbox;
#[cfg(feature = "redis")]
pub mod redis_bus;
mod repository;
mod service;
pub mod store;
mod validate;

pub use config::{ChatConfig, RoutingPolicy};
pub use error::ChatError;
pub use events::{
    DomainEvent, EventKind, EventPayload, MessagePosted, MessagePostedHead, TICKET_MESSAGES_MAX,
    TicketClosed, TicketReason, TicketRequested,
};
pub use ids::{
    CustomerId, EventId, MessageId, NotificationId, SessionId, TenantId, TicketId, UserId,
};
pub use inbox::{
    Notification, NotificationInbox, Ticket, TicketDirectory, TicketFilter, TicketStatus,
};
pub use model::{
    AgentPresence, ChatMessage, ChatSession, Contact, Customer, CustomerIdentity, Heartbeat,
    PresenceStatus, Priority, Sender, SenderType, SessionOrigin, SessionStatus, SessionView, now,
};
pub use outbox::{Behind, OutboxConsumer, OutboxInterest, PendingEvent};
pub use repository::{
    AgentOverview, AppendedMessage, AssignMode, ChatStore, ConnectionOwner, ConnectionRepository,
    CustomerChatStarted, CustomerRepository, EligibleAgent, MessageRepository, NewCustomerChat,
    OutboxRepository, PendingAppend, PresenceRepository, PurgedConnections, SessionConnections,
    SessionFilter, SessionRepository,
};
pub use service::{
    AgentAvailability, ChatService, ContactInput, CustomerChatRequest, HistoryPage,
    MIN_OUTBOX_RETENTION, OUTBOX_PRUNE_BATCH, Renewed, SessionPage, TicketClose, Unregistered,
};
pub use validate::{
    ClientMsgId, INVALID_CURSOR, MAX_AGENT_DEPARTMENTS, MessageBody, PageSize, Topic, after_seq,
    next_cursor, parse_agent_departments, parse_agent_filter, parse_cursor, parse_department,
    parse_department_filter, parse_department_query,
};
