//! Identifiers: host-owned positive integers (tenant, user) and UUIDv7 ids
//! owned by the library (session, message, event).
//!
//! Every id type validates on construction (DESIGN.md "HTTP conventions":
//! host-owned ids are positive integers; sessions, messages and events are
//! UUIDv7), so a value that exists is a valid id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ChatError;

macro_rules! host_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "i64", into = "i64")]
        pub struct $name(i64);

        impl $name {
            /// Accepts a positive integer (`1..=i64::MAX`).
            ///
            /// # Errors
            /// [`ChatError::InvalidId`] for zero or a negative number.
            pub fn new(value: i64) -> Result<Self, ChatError> {
                if value > 0 {
                    Ok(Self(value))
                } else {
                    Err(ChatError::InvalidId(concat!($what, " must be a positive integer")))
                }
            }

            /// The raw integer, as the host knows it.
            #[must_use]
            pub const fn get(self) -> i64 {
                self.0
            }
        }

        impl TryFrom<i64> for $name {
            type Error = ChatError;
            fn try_from(value: i64) -> Result<Self, ChatError> {
                Self::new(value)
            }
        }

        impl From<$name> for i64 {
            fn from(id: $name) -> i64 {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = ChatError;
            /// Parses a decimal positive integer with no sign, spaces or fraction.
            fn from_str(s: &str) -> Result<Self, ChatError> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ChatError::InvalidId(concat!($what, " must be a positive integer")));
                }
                let value: i64 = s
                    .parse()
                    .map_err(|_| ChatError::InvalidId(concat!($what, " is out of range")))?;
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

host_id!(
    /// A tenant of the host (`X-Tenant-ID`); every stored row belongs to exactly one.
    TenantId,
    "tenant id"
);
host_id!(
    /// A user of the host: an agent (role `SUPPORT_AGENT`) or a customer.
    UserId,
    "user id"
);

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered UUIDv7.
            #[must_use]
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID (as read from storage).
            #[must_use]
            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            /// The UUID inside.
            #[must_use]
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl FromStr for $name {
            type Err = ChatError;
            /// Parses the hyphenated (or simple) UUID text form.
            ///
            /// A malformed id can name nothing, so it is [`ChatError::NotFound`]
            /// (DESIGN.md: malformed ids answer 404).
            fn from_str(s: &str) -> Result<Self, ChatError> {
                Uuid::parse_str(s).map(Self).map_err(|_| ChatError::NotFound)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A chat session (UUIDv7).
    SessionId
);
uuid_id!(
    /// A chat message (UUIDv7).
    MessageId
);
uuid_id!(
    /// A domain event in the outbox (UUIDv7); consumers use it as idempotency key.
    EventId
);
uuid_id!(
    /// A customer of a tenant: an identified host user or an anonymous
    /// visitor (UUIDv7).
    CustomerId
);
uuid_id!(
    /// A ticket, allocated in the transaction that found no eligible agent
    /// and materialized by the ticket sink under the same id (UUIDv7).
    TicketId
);
uuid_id!(
    /// A customer notification (UUIDv7): the id of the agent reply it is
    /// about (equal to its `message.posted` event's id, not a
    /// `message.missed` event's), so one reply gives one notification
    /// whichever event delivers it, and delivery is idempotent. A
    /// `message.posted` event stored before event ids equalled message
    /// ids gives its own id instead, so such a reply, also made up by a
    /// `message.missed`, can give two.
    NotificationId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_accept_only_positive_integers() {
        assert_eq!(TenantId::new(1).unwrap().get(), 1);
        assert!(TenantId::new(0).is_err());
        assert!(TenantId::new(-3).is_err());
        assert_eq!("42".parse::<UserId>().unwrap().get(), 42);
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            " 1",
            "1.0",
            "abc",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<TenantId>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn malformed_uuid_is_not_found() {
        assert!(matches!(
            "nope".parse::<SessionId>(),
            Err(ChatError::NotFound)
        ));
        let id = SessionId::generate();
        assert_eq!(id.to_string().parse::<SessionId>().unwrap(), id);
    }
}
