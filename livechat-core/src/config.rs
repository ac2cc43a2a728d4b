//! Tunables of the chat rules, with the defaults of issues #2 and #3.

use std::time::Duration;

/// Limits applied by [`ChatService`](crate::ChatService).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatConfig {
    /// Longest accepted message, in characters (Unicode scalar values).
    /// Default 10,000 (issue #2).
    pub max_message_chars: usize,
    /// Page size when a list request gives no `limit`. Default 50.
    pub default_page_size: u64,
    /// Largest accepted `limit`. Default 200.
    pub max_page_size: u64,
    /// Routing parameters.
    pub routing: RoutingPolicy,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_message_chars: 10_000,
            default_page_size: 50,
            max_page_size: 200,
            routing: RoutingPolicy::default(),
        }
    }
}

/// Parameters of eligibility and routing (DESIGN.md invariant 3, issue #3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// Maximum OPEN sessions per agent when the tenant set none. Default 5.
    pub default_capacity: i64,
    /// How long an agent's last heartbeat (status change, heartbeat call or
    /// live connection) keeps them eligible. `None` (the default) counts the
    /// chosen status alone, for hosts without a real-time connection that
    /// refreshes presence.
    pub presence_ttl: Option<Duration>,
    /// How long an agent may stay gone, without having chosen `offline`,
    /// before their OPEN customer chats are handed back as if they had
    /// (routed to another agent online, or left waiting and ticketed):
    /// counted from their offline announcement, which comes once their
    /// last connection closed and the presence grace passed, or once
    /// their liveness ran out unseen. Housekeeping applies it
    /// ([`ChatService::hand_back_chats_of_absent_agents`](crate::ChatService::hand_back_chats_of_absent_agents)),
    /// so a chat moves up to one housekeeping period later. `None` (the
    /// default) leaves the chats with the agent until they return or
    /// choose `offline`. Needs [`Self::presence_ttl`]: without it liveness
    /// never runs out, and nothing is handed back; and the announcements,
    /// which `livechat-poem`'s WebSocket gateway makes (a host without it
    /// calls `ChatService::announce_expired_presence`).
    pub hand_back_after: Option<Duration>,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            default_capacity: 5,
            presence_ttl: None,
            hand_back_after: None,
        }
    }
}
