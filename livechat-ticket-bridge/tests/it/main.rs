//! Integration tests of the bridge's default sinks: one binary, one module
//! per sink, a fresh SQLite file or a real local HTTP server per test.

mod seaorm_sinks;
mod webhook;

use livechat_core::{
    CustomerId, EventId, Notification, NotificationId, Priority, SessionId, TenantId, TicketId,
    TicketReason, TicketRequested, UserId,
};

pub(crate) fn tenant(id: i64) -> TenantId {
    TenantId::new(id).unwrap()
}

/// A customer's request that found no agent online.
pub(crate) fn customer_request(tenant_id: TenantId, topic: &str) -> TicketRequested {
    TicketRequested {
        ticket_id: TicketId::generate(),
        tenant_id,
        reason: TicketReason::NoAgentOnline,
        session_id: Some(SessionId::generate()),
        customer_id: Some(CustomerId::generate()),
        agent_id: None,
        requested_by: None,
        topic: Some(topic.to_owned()),
        department: Some("Billing".into()),
        priority: Priority::High,
        contact: None,
        first_message: Some("Hello?".into()),
        messages: vec!["Hello?".into()],
    }
}

/// An agent-started chat for an agent who is offline.
pub(crate) fn agent_request(tenant_id: TenantId, agent: i64) -> TicketRequested {
    TicketRequested {
        ticket_id: TicketId::generate(),
        tenant_id,
        reason: TicketReason::AgentOffline,
        session_id: None,
        customer_id: None,
        agent_id: Some(UserId::new(agent).unwrap()),
        requested_by: Some(UserId::new(1).unwrap()),
        topic: None,
        department: None,
        priority: Priority::Normal,
        contact: None,
        first_message: None,
        messages: Vec::new(),
    }
}

/// What the dispatcher builds for an agent's reply (event id = notification id).
pub(crate) fn agent_reply(tenant_id: TenantId, customer_id: CustomerId) -> (EventId, Notification) {
    let key = EventId::generate();
    let notification = Notification {
        id: NotificationId::from_uuid(key.as_uuid()),
        tenant_id,
        customer_id,
        session_id: Some(SessionId::generate()),
        ticket_id: Some(TicketId::generate()),
        kind: "agent_reply".into(),
        title: "An agent replied".into(),
        body: "We are on it.".into(),
        created_at: livechat_core::now(),
        read_at: None,
    };
    (key, notification)
}
