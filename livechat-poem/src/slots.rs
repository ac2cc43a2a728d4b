//! How many WebSocket connections one agent or one customer holds on this
//! node, against [`crate::RealtimeConfig::max_connections_per_user`].
//!
//! Each connection costs the node memory, a registration row renewed at
//! every ping, and a place in the fan-out of its tenant's events. Without
//! a cap one credential, a visitor token anyone can get by starting a
//! chat, could open sockets until the node ran out of descriptors or
//! memory. The cap is per node and in memory, as the rate limits are
//! (README "Rate limits"): a deployment of N nodes lets one user hold up
//! to N times it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use livechat_core::{ConnectionOwner, TenantId};

/// Whose connections are counted together: one agent or one customer of
/// one tenant (the same host user is a different agent in each tenant).
type Holder = (TenantId, ConnectionOwner);

/// The node's count of live connections per [`Holder`].
#[derive(Debug)]
pub(crate) struct ConnectionSlots {
    /// Most connections one holder may have at once; `0`: no cap.
    max: usize,
    /// Holders with at least one connection (no entry at zero).
    held: Mutex<HashMap<Holder, usize>>,
}

impl ConnectionSlots {
    /// Slots of at most `max` connections per holder (`0`: no cap).
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The cap (`0`: none).
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Holder, usize>> {
        // A count is consistent after any panic: it is changed in one step.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for one more connection of `owner` in `tenant`, held until
    /// the [`Slot`] is dropped; `None` when they already hold the cap.
    pub(crate) fn take(self: &Arc<Self>, tenant: TenantId, owner: ConnectionOwner) -> Option<Slot> {
        if self.max == 0 {
            return Some(Slot { taken: None });
        }
        let mut held = self.held();
        let count = held.entry((tenant, owner)).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            taken: Some((Arc::clone(self), (tenant, owner))),
        })
    }

    /// The connections `owner` holds in `tenant` (tests).
    #[cfg(test)]
    fn count(&self, tenant: TenantId, owner: ConnectionOwner) -> usize {
        self.held().get(&(tenant, owner)).copied().unwrap_or(0)
    }
}

/// One connection's place in its holder's count; given back when dropped
/// (the connection has ended, or its upgrade never happened).
#[derive(Debug)]
pub(crate) struct Slot {
    /// `None` when there is no cap.
    taken: Option<(Arc<ConnectionSlots>, Holder)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some((slots, holder)) = self.taken.take() else {
            return;
        };
        let mut held = slots.held();
        if let Some(count) = held.get_mut(&holder) {
            *count -= 1;
            if *count == 0 {
                held.remove(&holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livechat_core::{CustomerId, UserId};

    fn agent(n: i64) -> ConnectionOwner {
        ConnectionOwner::Agent(UserId::new(n).unwrap())
    }

    fn tenant(n: i64) -> TenantId {
        TenantId::new(n).unwrap()
    }

    #[test]
    fn a_holder_gets_at_most_the_cap_and_a_dropped_slot_frees_one() {
        let slots = ConnectionSlots::new(2);
        let first = slots.take(tenant(1), agent(7)).expect("first");
        let _second = slots.take(tenant(1), agent(7)).expect("second");
        assert!(slots.take(tenant(1), agent(7)).is_none(), "third refused");
        drop(first);
        assert_eq!(slots.count(tenant(1), agent(7)), 1);
        assert!(slots.take(tenant(1), agent(7)).is_some(), "a freed slot");
    }

    #[test]
    fn holders_are_counted_apart_by_tenant_and_kind() {
        let slots = ConnectionSlots::new(1);
        let customer = ConnectionOwner::Customer(CustomerId::generate());
        let held = [
            slots
                .take(tenant(1), agent(7))
                .expect("agent 7 in tenant 1"),
            slots
                .take(tenant(2), agent(7))
                .expect("agent 7 in tenant 2"),
            slots.take(tenant(1), agent(8)).expect("agent 8"),
            slots.take(tenant(1), customer).expect("a customer"),
        ];
        assert!(slots.take(tenant(1), agent(7)).is_none());
        assert!(slots.take(tenant(1), customer).is_none());
        drop(held);
        assert!(slots.held().is_empty(), "no entry left at zero");
    }

    #[test]
    fn no_cap_counts_nothing() {
        let slots = ConnectionSlots::new(0);
        let held: Vec<_> = (0..100)
            .map(|_| slots.take(tenant(1), agent(7)).expect("no cap"))
            .collect();
        assert_eq!(slots.count(tenant(1), agent(7)), 0);
        drop(held);
    }
}
