//! Tunables of the chat rules, with the defaults of issue #2.

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
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_message_chars: 10_000,
            default_page_size: 50,
            max_page_size: 200,
        }
    }
}
