//! The one error type of `livechat-core`.
//!
//! Variants name what went wrong in chat terms; adapters (`livechat-poem`)
//! map each to a status code and a stable snake_case code in one place.

/// Everything a [`ChatService`](crate::ChatService) or a repository can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// The row does not exist in this tenant. Rows of other tenants and
    /// malformed ids are reported the same way (DESIGN.md invariant 1: no
    /// existence oracle).
    #[error("not found")]
    NotFound,
    /// A host-owned id was zero, negative or not a number.
    #[error("{0}")]
    InvalidId(&'static str),
    /// The agent's chosen status is not `online`, so no session may be
    /// started for them (issue #2). The request was kept as a ticket
    /// addressed to the agent (issue #3); its id is carried.
    #[error("agent {agent} is not online")]
    AgentOffline {
        /// The agent asked for.
        agent: crate::UserId,
        /// The ticket that keeps the request.
        ticket_id: crate::TicketId,
    },
    /// A claim found the session already assigned (or no longer waiting).
    #[error("session is already assigned")]
    AlreadyAssigned,
    /// The target agent of an assignment is not online: their chosen
    /// status is not `online`, or (with a presence TTL) no heartbeat,
    /// WebSocket ping or status change came within the TTL.
    #[error(
        "agent {0} is not online (their status is not online, or their presence ran out: send a heartbeat)"
    )]
    AgentNotOnline(crate::UserId),
    /// A field of a request is invalid (topic, contact, department,
    /// capacity…); the message names it.
    #[error("{0}")]
    InvalidInput(String),
    /// A visitor link or customer credential does not fit (e.g. the visitor
    /// belongs to another tenant).
    #[error("{0}")]
    InvalidCustomer(&'static str),
    /// The agent already has an OPEN agent-started session in this tenant
    /// (DESIGN.md invariant 2). Carries the existing session's id when it
    /// was still open right after the refusal.
    #[error("agent already has an open session")]
    ActiveSessionExists(Option<crate::SessionId>),
    /// The session is CLOSED: no messages, no assignment.
    #[error("session is closed")]
    SessionClosed,
    /// The session is still WAITING for an agent: agents claim it before
    /// writing (customers may write while waiting).
    #[error("session is waiting for an agent; claim it first")]
    SessionNotOpen,
    /// The message body is empty or only whitespace.
    #[error("message must not be empty")]
    InvalidMessage,
    /// The message body contains the NUL character (U+0000), which
    /// PostgreSQL's text columns cannot store; refused on every database
    /// alike.
    #[error("message must not contain the NUL character (U+0000)")]
    MessageContainsNul,
    /// The message body has more characters (Unicode scalar values) than
    /// allowed ([`ChatConfig::max_message_chars`](crate::ChatConfig)).
    #[error("message is longer than {max} characters")]
    MessageTooLong {
        /// The configured maximum, in characters.
        max: usize,
    },
    /// A client idempotency key is empty, too long (over 128) or not
    /// visible ASCII (no spaces).
    #[error("client_msg_id must be 1-128 visible ASCII characters (no spaces)")]
    InvalidClientMsgId,
    /// A client idempotency key (`client_msg_id`) already names another
    /// sender's message in this session: keys are the session's, and a
    /// key one participant used does not make another's message vanish
    /// as its "retry". Send with a key of your own.
    #[error("client_msg_id is already used in this session by another sender")]
    ClientMsgIdTaken,
    /// A list's query parameter is out of range: paging (`limit` outside
    /// `1..=max`, negative `after_seq`, a bad `cursor`) or a filter (a
    /// blank `department`, an `agent_id` that is not one).
    #[error("{0}")]
    InvalidPage(String),
    /// A ticket cannot be read or closed yet: its opening
    /// (`ticket.requested`) is still being delivered to the ticket sinks
    /// (the dispatcher has not run yet, or one sink is failing, e.g. a
    /// webhook that is down), and either the ticket directory does not
    /// know it yet or, for a close of a ticket without a session, nothing
    /// would order the close after it.
    #[error(
        "the ticket's opening is still being delivered to the ticket sinks; try again in a moment"
    )]
    TicketPending,
    /// The database failed or is unreachable. The cause is for logs only.
    #[error("storage error: {0}")]
    Storage(#[from] sea_orm::DbErr),
}

impl ChatError {
    /// Whether the failure is transient and worth a retry; adapters answer
    /// "unavailable" (HTTP 503) instead of an internal error:
    ///
    /// - the database is unreachable or out of connections, or a
    ///   connection broke while in use: an I/O error, PostgreSQL SQLSTATE
    ///   class 08 (connection exception) or 57 (operator intervention,
    ///   e.g. `admin_shutdown` 57P01 when the server restarts or the
    ///   connection is terminated). The pool closes such a connection when
    ///   it is given back, so the retry gets another;
    /// - it refused the statement for contention with other transactions:
    ///   PostgreSQL `deadlock_detected` (40P01), `serialization_failure`
    ///   (40001) or `lock_not_available` (55P03, a lock wait past
    ///   `lock_timeout`), SQLite `SQLITE_BUSY` or `SQLITE_LOCKED` (the
    ///   write lock not taken within the busy timeout). Nothing of the
    ///   refused transaction was stored.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        use sea_orm::{DbErr, RuntimeErr};
        match self {
            Self::Storage(DbErr::Conn(_) | DbErr::ConnectionAcquire(_)) => true,
            Self::Storage(
                DbErr::Query(RuntimeErr::SqlxError(error))
                | DbErr::Exec(RuntimeErr::SqlxError(error)),
            ) => {
                use sea_orm::sqlx::Error;
                matches!(
                    **error,
                    Error::Io(_) | Error::PoolTimedOut | Error::PoolClosed | Error::WorkerCrashed
                ) || error
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| is_contention(&code) || is_connection_lost(&code))
            }
            _ => false,
        }
    }
}

/// The SQLSTATE (PostgreSQL) or extended result code in decimal (SQLite)
/// with which the database refused a statement; `None` for any other
/// failure (no connection, I/O, a decoding error).
pub(crate) fn sql_state(error: &sea_orm::DbErr) -> Option<String> {
    use sea_orm::{DbErr, RuntimeErr};
    let (DbErr::Query(RuntimeErr::SqlxError(error)) | DbErr::Exec(RuntimeErr::SqlxError(error))) =
        error
    else {
        return None;
    };
    Some(error.as_database_error()?.code()?.into_owned())
}

/// Whether a PostgreSQL SQLSTATE says the connection or the server went
/// away: class 08 (connection exception) or 57 (operator intervention:
/// shutdown, restart, terminated backend, cancelled statement).
pub(crate) fn is_connection_lost(code: &str) -> bool {
    code.len() == 5 && (code.starts_with("08") || code.starts_with("57"))
}

/// Whether a database error code means contention with other
/// transactions: a PostgreSQL SQLSTATE (five characters), or SQLite's
/// extended result code in decimal (at most four digits).
fn is_contention(code: &str) -> bool {
    match code {
        "40P01" | "40001" | "55P03" => true,
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes
        // (e.g. 517 SQLITE_BUSY_SNAPSHOT) in the upper bits.
        _ if code.len() < 5 => code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{is_connection_lost, is_contention};

    #[test]
    fn contention_codes() {
        for code in ["40P01", "40001", "55P03", "5", "6", "517", "262"] {
            assert!(is_contention(code), "{code}");
        }
        // Unique violation (PostgreSQL, SQLite 2067), insufficient
        // privilege (42501, which read as a number would be SQLITE_BUSY),
        // constraint (19), I/O error (10), full disk (13), syntax error.
        for code in ["23505", "42501", "2067", "19", "10", "13", "42601", ""] {
            assert!(!is_contention(code), "{code}");
        }
    }

    #[test]
    fn connection_lost_codes() {
        for code in [
            "57P01", "57P02", "57P03", "57014", "08006", "08003", "08000",
        ] {
            assert!(is_connection_lost(code), "{code}");
        }
        // Contention, constraint, syntax; SQLite's numeric codes.
        for code in ["40P01", "23505", "42601", "5", "517", "2067", "0857", ""] {
            assert!(!is_connection_lost(code), "{code}");
        }
    }
}
