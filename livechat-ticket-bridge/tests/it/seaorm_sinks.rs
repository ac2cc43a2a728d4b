//! `SeaOrmSinks` on a real SQLite file: idempotent writes, closing, and
//! tenant-isolated reads.

use livechat_core::store::{self, Migrator};
use livechat_core::{
    ChatConfig, ChatError, CustomerId, EventId, NotificationId, NotificationInbox, PageSize,
    TicketDirectory, TicketFilter, TicketId, TicketStatus,
};
use livechat_ticket_bridge::{BridgeMigrator, NotificationSink, SeaOrmSinks, TicketSink};
use sea_orm_migration::MigratorTrait;
use tempfile::TempDir;

use crate::{agent_reply, agent_request, customer_request, tenant};

/// A fresh database file with core's and the bridge's tables (the two
/// migrators share it, each with its own bookkeeping table).
async fn sinks() -> (TempDir, SeaOrmSinks) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bridge.db").display()
    );
    let db = store::connect(&url).await.unwrap();
    Migrator::up(&db, None).await.unwrap();
    BridgeMigrator::up(&db, None).await.unwrap();
    BridgeMigrator::up(&db, None).await.unwrap();
    (dir, SeaOrmSinks::new(db))
}

fn page(n: i64) -> PageSize {
    PageSize::parse(Some(n), &ChatConfig::default()).unwrap()
}

#[tokio::test]
async fn opening_the_same_ticket_twice_stores_one() {
    let (_dir, sinks) = sinks().await;
    let request = customer_request(tenant(1), "Invoice is wrong");
    let key = EventId::generate();
    sinks.open_ticket(&request, key).await.unwrap();
    sinks.open_ticket(&request, key).await.unwrap();

    let tickets = sinks
        .list_tickets(tenant(1), TicketFilter::default(), None, page(50))
        .await
        .unwrap();
    assert_eq!(tickets.len(), 1);
    let ticket = &tickets[0];
    assert_eq!(ticket.id, request.ticket_id);
    assert_eq!(ticket.subject, "Invoice is wrong");
    assert_eq!(ticket.status, TicketStatus::Open);
    assert_eq!(ticket.priority, request.priority);
    assert_eq!(ticket.reason, request.reason);
    assert_eq!(ticket.session_id, request.session_id);
    assert_eq!(ticket.customer_id, request.customer_id);
    assert_eq!(ticket.department.as_deref(), Some("Billing"));
    assert_eq!(ticket.closed_at, None);
    // Opened when the ticket id was allocated, not when it was delivered.
    let allocated = request
        .ticket_id
        .as_uuid()
        .get_timestamp()
        .unwrap()
        .to_unix();
    assert_eq!(
        ticket.created_at.timestamp(),
        i64::try_from(allocated.0).unwrap()
    );
    assert_eq!(
        sinks
            .get_ticket(tenant(1), request.ticket_id)
            .await
            .unwrap(),
        *ticket
    );
}

#[tokio::test]
async fn agent_offline_ticket_names_the_agent() {
    let (_dir, sinks) = sinks().await;
    let request = agent_request(tenant(1), 42);
    sinks
        .open_ticket(&request, EventId::generate())
        .await
        .unwrap();
    let ticket = sinks
        .get_ticket(tenant(1), request.ticket_id)
        .await
        .unwrap();
    assert_eq!(ticket.subject, "Chat request for agent 42");
    assert_eq!(ticket.agent_id, request.agent_id);
    assert_eq!(ticket.session_id, None);
}

#[tokio::test]
async fn tickets_are_isolated_by_tenant_and_listed_newest_first() {
    let (_dir, sinks) = sinks().await;
    let first = customer_request(tenant(1), "first");
    let second = customer_request(tenant(1), "second");
    let foreign = customer_request(tenant(2), "foreign");
    for r in [&first, &second, &foreign] {
        sinks.open_ticket(r, EventId::generate()).await.unwrap();
    }

    let subjects: Vec<String> = sinks
        .list_tickets(tenant(1), TicketFilter::default(), None, page(50))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.subject)
        .collect();
    assert_eq!(subjects, ["second", "first"]);
    assert_eq!(
        sinks
            .list_tickets(tenant(1), TicketFilter::default(), None, page(1))
            .await
            .unwrap()[0]
            .subject,
        "second"
    );
    assert!(matches!(
        sinks.get_ticket(tenant(1), foreign.ticket_id).await,
        Err(ChatError::NotFound)
    ));
    assert!(matches!(
        sinks.get_ticket(tenant(2), first.ticket_id).await,
        Err(ChatError::NotFound)
    ));
    assert!(matches!(
        sinks.get_ticket(tenant(1), TicketId::generate()).await,
        Err(ChatError::NotFound)
    ));
}

#[tokio::test]
async fn closing_only_touches_the_tenants_open_ticket() {
    let (_dir, sinks) = sinks().await;
    let request = customer_request(tenant(1), "help");
    let other = customer_request(tenant(1), "other");
    sinks
        .open_ticket(&request, EventId::generate())
        .await
        .unwrap();
    sinks
        .open_ticket(&other, EventId::generate())
        .await
        .unwrap();

    // Another tenant cannot close it.
    sinks
        .close_ticket(tenant(2), request.ticket_id, EventId::generate())
        .await
        .unwrap();
    let still = sinks
        .get_ticket(tenant(1), request.ticket_id)
        .await
        .unwrap();
    assert_eq!(still.status, TicketStatus::Open);

    // The close is dated by its event's id (a close committed at
    // 2026-11-30 12:00:00 UTC, delivered late), not by the delivery.
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
        .unwrap()
        .to_utc();
    let key = EventId::from_uuid(uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        at.timestamp().try_into().unwrap(),
        0,
    )));
    sinks
        .close_ticket(tenant(1), request.ticket_id, key)
        .await
        .unwrap();
    let closed = sinks
        .get_ticket(tenant(1), request.ticket_id)
        .await
        .unwrap();
    assert_eq!(closed.status, TicketStatus::Closed);
    let closed_at = closed.closed_at.expect("closed_at is set");
    assert_eq!(closed_at, at);

    // Redelivery keeps the first close time; unknown tickets are ignored.
    sinks
        .close_ticket(tenant(1), request.ticket_id, key)
        .await
        .unwrap();
    sinks
        .close_ticket(tenant(1), TicketId::generate(), EventId::generate())
        .await
        .unwrap();
    let again = sinks
        .get_ticket(tenant(1), request.ticket_id)
        .await
        .unwrap();
    assert_eq!(again.closed_at, Some(closed_at));

    let open = sinks
        .list_tickets(
            tenant(1),
            TicketFilter {
                status: Some(TicketStatus::Open),
                ..TicketFilter::default()
            },
            None,
            page(50),
        )
        .await
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, other.ticket_id);
    let closed_list = sinks
        .list_tickets(
            tenant(1),
            TicketFilter {
                status: Some(TicketStatus::Closed),
                ..TicketFilter::default()
            },
            None,
            page(50),
        )
        .await
        .unwrap();
    assert_eq!(closed_list.len(), 1);
    assert_eq!(closed_list[0].id, request.ticket_id);
}

#[tokio::test]
async fn notifying_twice_stores_one_for_that_customer_only() {
    let (_dir, sinks) = sinks().await;
    let customer = CustomerId::generate();
    let (key, notification) = agent_reply(tenant(1), customer);
    sinks.notify(&notification, key).await.unwrap();
    sinks.notify(&notification, key).await.unwrap();
    let (later_key, later) = agent_reply(tenant(1), customer);
    sinks.notify(&later, later_key).await.unwrap();

    let inbox = sinks
        .list_notifications(tenant(1), &[customer], None, page(50))
        .await
        .unwrap();
    assert_eq!(inbox, vec![later.clone(), notification.clone()]);

    // A list of recipients (a customer and its linked visitors) sees what
    // is addressed to any of them, newest first; none sees nothing.
    let visitor = CustomerId::generate();
    let (visitor_key, to_visitor) = agent_reply(tenant(1), visitor);
    sinks.notify(&to_visitor, visitor_key).await.unwrap();
    let both = sinks
        .list_notifications(tenant(1), &[customer, visitor], None, page(50))
        .await
        .unwrap();
    assert_eq!(
        both,
        vec![to_visitor.clone(), later.clone(), notification.clone()]
    );
    assert!(
        sinks
            .list_notifications(tenant(1), &[], None, page(50))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        sinks
            .mark_read(tenant(1), &[customer, visitor], to_visitor.id)
            .await
            .unwrap()
            .id,
        to_visitor.id
    );

    // Another customer, or the same customer id in another tenant, sees nothing.
    assert!(
        sinks
            .list_notifications(tenant(1), &[CustomerId::generate()], None, page(50))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        sinks
            .list_notifications(tenant(2), &[customer], None, page(50))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn mark_read_is_idempotent_and_scoped_to_the_customer() {
    let (_dir, sinks) = sinks().await;
    let customer = CustomerId::generate();
    let (key, notification) = agent_reply(tenant(1), customer);
    sinks.notify(&notification, key).await.unwrap();

    for (t, c, id) in [
        (tenant(1), CustomerId::generate(), notification.id),
        (tenant(2), customer, notification.id),
        (tenant(1), customer, NotificationId::generate()),
    ] {
        assert!(matches!(
            sinks.mark_read(t, &[c], id).await,
            Err(ChatError::NotFound)
        ));
    }
    let unread = sinks
        .list_notifications(tenant(1), &[customer], None, page(50))
        .await
        .unwrap();
    assert_eq!(
        unread[0].read_at, None,
        "a refused mark_read changes nothing"
    );

    let read = sinks
        .mark_read(tenant(1), &[customer], notification.id)
        .await
        .unwrap();
    let read_at = read.read_at.expect("read_at is set");
    assert_eq!(read.body, notification.body);
    let again = sinks
        .mark_read(tenant(1), &[customer], notification.id)
        .await
        .unwrap();
    assert_eq!(again.read_at, Some(read_at));
}

/// Tickets opened with ids of the same millisecond have the same
/// `created_at`: a cursor among them goes on by id, so paging one at a
/// time still lists each once, newest (highest id) first.
#[tokio::test]
async fn tickets_of_one_millisecond_page_by_id() {
    let (_dir, sinks) = sinks().await;
    let millis = 1_790_000_000_000;
    let mut ids = Vec::new();
    for n in 0..4u8 {
        let id = uuid::Builder::from_unix_timestamp_millis(millis, &[n; 10]).into_uuid();
        let mut request = customer_request(tenant(1), &format!("same ms {n}"));
        request.ticket_id = TicketId::from_uuid(id);
        sinks
            .open_ticket(&request, EventId::generate())
            .await
            .unwrap();
        ids.push(request.ticket_id);
    }
    let all = sinks
        .list_tickets(tenant(1), TicketFilter::default(), None, page(50))
        .await
        .unwrap();
    assert!(all.iter().all(|t| t.created_at == all[0].created_at));
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let one = sinks
            .list_tickets(tenant(1), TicketFilter::default(), cursor, page(1))
            .await
            .unwrap();
        let Some(ticket) = one.first() else { break };
        seen.push(ticket.id);
        cursor = Some(ticket.id);
    }
    ids.reverse();
    assert_eq!(seen, ids);
}

/// A ticket keeps its customer's department, and the list narrows to one
/// department (with a status too), of the tenant asked for only.
#[tokio::test]
async fn tickets_list_by_department() {
    let (_dir, sinks) = sinks().await;
    let billing = customer_request(tenant(1), "Invoice");
    let mut sales = customer_request(tenant(1), "Quote");
    sales.department = Some("Sales".into());
    let none = agent_request(tenant(1), 4);
    let elsewhere = customer_request(tenant(2), "Invoice");
    for request in [&billing, &sales, &none, &elsewhere] {
        sinks
            .open_ticket(request, EventId::generate())
            .await
            .unwrap();
    }
    sinks
        .close_ticket(tenant(1), sales.ticket_id, EventId::generate())
        .await
        .unwrap();
    let list = |department: &str, status: Option<TicketStatus>| {
        let filter = TicketFilter {
            status,
            department: Some(department.to_owned()),
        };
        let sinks = &sinks;
        async move {
            sinks
                .list_tickets(tenant(1), filter, None, page(50))
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list("Billing", None).await, vec![billing.ticket_id]);
    assert_eq!(list("Sales", None).await, vec![sales.ticket_id]);
    assert!(list("Sales", Some(TicketStatus::Open)).await.is_empty());
    assert!(list("billing", None).await.is_empty(), "compared exactly");
    let agent_ticket = sinks.get_ticket(tenant(1), none.ticket_id).await.unwrap();
    assert_eq!(agent_ticket.department, None);
}
