//! Validating newtypes: once constructed, valid.

use crate::config::ChatConfig;
use crate::error::ChatError;
use crate::ids::UserId;

/// A message text that is not blank and within the configured length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageBody(String);

impl MessageBody {
    /// Accepts `text` as sent (whitespace kept) when it has a visible
    /// character and at most `max_chars` characters (issue #2); text of
    /// only whitespace and invisible characters is blank.
    ///
    /// # Errors
    /// [`ChatError::InvalidMessage`] for empty or blank text,
    /// [`ChatError::MessageContainsNul`] for text with U+0000 (PostgreSQL
    /// cannot store it: it would fail as a storage error),
    /// [`ChatError::MessageTooLong`] above `max_chars`.
    pub fn parse(text: String, max_chars: usize) -> Result<Self, ChatError> {
        if is_blank(&text) {
            return Err(ChatError::InvalidMessage);
        }
        if text.contains('\0') {
            return Err(ChatError::MessageContainsNul);
        }
        // Counting stops one past the limit: a huge body costs no more than that.
        if text.chars().take(max_chars + 1).count() > max_chars {
            return Err(ChatError::MessageTooLong { max: max_chars });
        }
        Ok(Self(text))
    }

    /// The text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    #[must_use]
    pub fn into_inner(self) -> String {
        self.0
    }
}

/// An idempotency key chosen by the client (`client_msg_id` or the
/// `Idempotency-Key` header): 1–128 visible ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    /// Longest accepted key.
    pub const MAX_LEN: usize = 128;

    /// Accepts 1–128 characters of visible ASCII (no spaces).
    ///
    /// # Errors
    /// [`ChatError::InvalidClientMsgId`] otherwise.
    pub fn parse(key: String) -> Result<Self, ChatError> {
        let ok = !key.is_empty()
            && key.len() <= Self::MAX_LEN
            && key.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(key))
        } else {
            Err(ChatError::InvalidClientMsgId)
        }
    }

    /// The key.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A page size within `1..=max_page_size`; absent means the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSize(u64);

impl PageSize {
    /// The page size for `limit`: `config.default_page_size` when absent,
    /// else `limit` within `1..=config.max_page_size`.
    ///
    /// # Errors
    /// [`ChatError::InvalidPage`] when `limit` is outside `1..=max_page_size`.
    pub fn parse(limit: Option<i64>, config: &ChatConfig) -> Result<Self, ChatError> {
        match limit {
            None => Ok(Self(config.default_page_size)),
            Some(n) if n >= 1 && n.unsigned_abs() <= config.max_page_size => {
                Ok(Self(n.unsigned_abs()))
            }
            Some(_) => Err(ChatError::InvalidPage(format!(
                "limit must be between 1 and {}",
                config.max_page_size
            ))),
        }
    }

    /// The number of rows.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_body_rules() {
        assert!(matches!(
            MessageBody::parse(" \n\t ".into(), 10),
            Err(ChatError::InvalidMessage)
        ));
        assert!(matches!(
            MessageBody::parse(String::new(), 10),
            Err(ChatError::InvalidMessage)
        ));
        assert_eq!(
            MessageBody::parse("  hi ".into(), 10).unwrap().as_str(),
            "  hi "
        );
        assert!(matches!(
            MessageBody::parse("hi\0there".into(), 10),
            Err(ChatError::MessageContainsNul)
        ));
        // Characters, not bytes: ten 3-byte characters fit a limit of 10.
        assert!(MessageBody::parse("é".repeat(10), 10).is_ok());
        assert!(matches!(
            MessageBody::parse("é".repeat(11), 10),
            Err(ChatError::MessageTooLong { max: 10 })
        ));
    }

    #[test]
    fn text_of_only_invisible_characters_is_blank() {
        for blank in [
            "\u{200B}\u{200B}",
            " \u{200D} \u{FEFF}",
            "\u{3164}",
            "\u{00A0}\u{2028}",
            "\u{E0041}\u{FE0F}",
        ] {
            assert!(
                matches!(
                    MessageBody::parse(blank.into(), 10),
                    Err(ChatError::InvalidMessage)
                ),
                "{blank:?}"
            );
            assert!(Topic::parse(blank).is_err(), "{blank:?}");
            assert_eq!(parse_department(Some(blank.into())).unwrap(), None);
        }
        // Visible text keeps its invisible characters: an emoji sequence
        // joined by U+200D, a word after a zero-width space.
        for visible in [
            "\u{1F469}\u{200D}\u{1F4BB}",
            "\u{200B}hi",
            "\u{2764}\u{FE0F}",
        ] {
            assert_eq!(
                MessageBody::parse(visible.into(), 10).unwrap().as_str(),
                visible
            );
        }
    }

    #[test]
    fn page_size_rules() {
        let c = ChatConfig::default();
        assert_eq!(PageSize::parse(None, &c).unwrap().get(), 50);
        assert_eq!(PageSize::parse(Some(200), &c).unwrap().get(), 200);
        assert!(PageSize::parse(Some(201), &c).is_err());
        assert!(PageSize::parse(Some(0), &c).is_err());
        assert!(PageSize::parse(Some(-5), &c).is_err());
    }

    #[test]
    fn client_msg_id_rules() {
        assert!(ClientMsgId::parse("abc-123".into()).is_ok());
        assert!(ClientMsgId::parse(String::new()).is_err());
        assert!(ClientMsgId::parse("has space".into()).is_err());
        assert!(ClientMsgId::parse("x".repeat(129)).is_err());
    }
}

/// Where a read or a replay of a session's messages starts: after
/// `after_seq` (0 when absent: from the first message), never negative
/// (DESIGN.md invariant 4: clients resume with `after_seq`). The one rule
/// for the HTTP routes' `after_seq` and the WebSocket `join_session`'s.
///
/// # Errors
/// [`ChatError::InvalidPage`] when negative.
pub fn after_seq(after_seq: Option<i64>) -> Result<i64, ChatError> {
    match after_seq.unwrap_or(0) {
        seq if seq < 0 => Err(ChatError::InvalidPage(
            "after_seq must not be negative".into(),
        )),
        seq => Ok(seq),
    }
}

/// The [`ChatError::InvalidPage`] message for a list's `cursor` that is
/// malformed or not an item of the list being paged (the tenant's, or the
/// customer's, so another tenant's id reads the same as an unknown one).
pub const INVALID_CURSOR: &str = "cursor is not valid";

/// A list's `cursor` (the `next_cursor` of the previous page: the id of
/// its last item; lists are newest first), parsed: `None` when absent.
///
/// # Errors
/// [`ChatError::InvalidPage`] ([`INVALID_CURSOR`]) when `raw` is not an
/// id.
pub fn parse_cursor<T: std::str::FromStr>(raw: Option<&str>) -> Result<Option<T>, ChatError> {
    raw.map(|raw| {
        raw.parse()
            .map_err(|_| ChatError::InvalidPage(INVALID_CURSOR.into()))
    })
    .transpose()
}

/// A `department` query parameter naming the department a chat would be
/// started with (the customers' availability flag): read as a start reads
/// it ([`parse_department`]: trimmed, blank is none), so that a widget
/// asks with what it would start with.
///
/// # Errors
/// [`ChatError::InvalidPage`] (a bad query, not a bad body) with
/// [`parse_department`]'s message: over 100 characters, or a NUL.
pub fn parse_department_query(raw: Option<String>) -> Result<Option<String>, ChatError> {
    parse_department(raw).map_err(|e| match e {
        ChatError::InvalidInput(message) => ChatError::InvalidPage(message),
        other => other,
    })
}

/// A list's `department` filter (the session and ticket lists), as a
/// start stores a department: trimmed,
/// 1–100 characters; `None` when absent.
///
/// # Errors
/// [`ChatError::InvalidPage`] for a blank one (it would match nothing) or
/// one over 100 characters.
pub fn parse_department_filter(raw: Option<String>) -> Result<Option<String>, ChatError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    match parse_department(Some(raw)) {
        Ok(Some(department)) => Ok(Some(department)),
        _ => Err(ChatError::InvalidPage(
            "department must be 1–100 characters, not blank".into(),
        )),
    }
}

/// A list's `agent_id` filter: `me` (the `caller`) or an agent's user id
/// (a positive integer); `None` when absent.
///
/// # Errors
/// [`ChatError::InvalidPage`] for anything else.
pub fn parse_agent_filter(raw: Option<&str>, caller: UserId) -> Result<Option<UserId>, ChatError> {
    match raw {
        None => Ok(None),
        Some("me") => Ok(Some(caller)),
        Some(id) => id
            .parse::<i64>()
            .ok()
            .and_then(|id| UserId::new(id).ok())
            .map(Some)
            .ok_or_else(|| {
                ChatError::InvalidPage("agent_id must be `me` or a positive integer".into())
            }),
    }
}

/// The `next_cursor` of a newest-first page asked with `limit`: the id of
/// its last item (by `id`) when the page is full, `None` (the last page)
/// otherwise. The one rule of every cursor-paged list.
pub fn next_cursor<T, I: std::fmt::Display>(
    items: &[T],
    limit: PageSize,
    id: impl Fn(&T) -> I,
) -> Option<String> {
    (items.len() as u64 == limit.get())
        .then(|| items.last().map(|item| id(item).to_string()))
        .flatten()
}

/// `value` trimmed, when not blank, without U+0000 (which PostgreSQL's
/// text columns cannot store) and at most `max` characters; otherwise
/// [`ChatError::InvalidInput`] naming `field`.
fn bounded(field: &'static str, value: &str, max: usize) -> Result<String, ChatError> {
    let value = value.trim();
    if is_blank(value) {
        return Err(ChatError::InvalidInput(format!(
            "{field} must not be empty"
        )));
    }
    if value.contains('\0') {
        return Err(ChatError::InvalidInput(format!(
            "{field} must not contain the NUL character (U+0000)"
        )));
    }
    if value.chars().take(max + 1).count() > max {
        return Err(ChatError::InvalidInput(format!(
            "{field} must be at most {max} characters"
        )));
    }
    Ok(value.to_owned())
}

fn optional(
    field: &'static str,
    value: Option<String>,
    max: usize,
) -> Result<Option<String>, ChatError> {
    match value.as_deref() {
        None => Ok(None),
        Some(v) if is_blank(v) => Ok(None),
        Some(v) => bounded(field, v, max).map(Some),
    }
}

/// Whether `text` shows nothing: empty, or made only of whitespace
/// (`char::is_whitespace`) and characters that render as nothing by
/// themselves (Unicode's `Default_Ignorable_Code_Point`: zero-width
/// spaces and joiners, bidirectional marks, variation selectors, the
/// Hangul fillers, tags). Such a message, topic or name is blank, as an
/// empty one: a widget would show an empty bubble.
#[must_use]
pub(crate) fn is_blank(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_whitespace() || is_default_ignorable(c))
}

/// Unicode 16's `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt).
fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// What a customer wants help with: 1–200 characters after trimming (issue #3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topic(String);

impl Topic {
    /// Longest accepted topic, in characters.
    pub const MAX_CHARS: usize = 200;

    /// # Errors
    /// [`ChatError::InvalidInput`] when blank, with U+0000 (PostgreSQL
    /// cannot store it), or over 200 characters.
    pub fn parse(topic: &str) -> Result<Self, ChatError> {
        bounded("topic", topic, Self::MAX_CHARS).map(Self)
    }

    /// The trimmed topic.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A requested department: up to 100 characters; blank means none.
///
/// # Errors
/// [`ChatError::InvalidInput`] when over 100 characters or with U+0000
/// (PostgreSQL cannot store it).
pub fn parse_department(department: Option<String>) -> Result<Option<String>, ChatError> {
    optional("department", department, 100)
}

/// Most departments one agent may serve.
pub const MAX_AGENT_DEPARTMENTS: usize = 20;

/// The departments an agent serves: each 1–100 characters after trimming,
/// at most [`MAX_AGENT_DEPARTMENTS`] once duplicates are dropped (the
/// order is kept), and a list of more than four times that is refused
/// whole. An empty list means every department.
///
/// # Errors
/// [`ChatError::InvalidInput`] for a blank or over-long department, one
/// with U+0000, or more than [`MAX_AGENT_DEPARTMENTS`].
pub fn parse_agent_departments(departments: Vec<String>) -> Result<Vec<String>, ChatError> {
    let too_many =
        || ChatError::InvalidInput(format!("departments: at most {MAX_AGENT_DEPARTMENTS}"));
    // Duplicates aside, a longer list is refused before it is compared.
    if departments.len() > 4 * MAX_AGENT_DEPARTMENTS {
        return Err(too_many());
    }
    let mut parsed: Vec<String> = Vec::with_capacity(MAX_AGENT_DEPARTMENTS);
    for department in departments {
        let department = bounded("department", department.trim(), 100)?;
        if !parsed.contains(&department) {
            if parsed.len() == MAX_AGENT_DEPARTMENTS {
                return Err(too_many());
            }
            parsed.push(department);
        }
    }
    Ok(parsed)
}

impl crate::model::Contact {
    /// Validates contact details (seed 001): `name` 1–200 characters,
    /// `email` a valid address of at most 254 characters, `phone` up to 50,
    /// `position` and `company` up to 200. Values are trimmed; blank
    /// optional values become `None`.
    ///
    /// # Errors
    /// [`ChatError::InvalidInput`] naming the first bad field.
    pub fn parse(
        name: &str,
        email: &str,
        phone: Option<String>,
        position: Option<String>,
        company: Option<String>,
    ) -> Result<Self, ChatError> {
        let name = bounded("name", name, 200)?;
        let email = bounded("email", email, 254)?;
        if !email_address::EmailAddress::is_valid(&email) {
            return Err(ChatError::InvalidInput(
                "email is not a valid address".into(),
            ));
        }
        Ok(Self {
            name,
            email,
            phone: optional("phone", phone, 50)?,
            position: optional("position", position, 200)?,
            company: optional("company", company, 200)?,
        })
    }
}

#[cfg(test)]
mod customer_input_tests {
    use super::*;
    use crate::model::Contact;

    #[test]
    fn topic_and_contact_rules() {
        assert_eq!(Topic::parse("  Billing ").unwrap().as_str(), "Billing");
        assert!(Topic::parse("   ").is_err());
        assert!(Topic::parse(&"x".repeat(201)).is_err());
        assert!(Topic::parse(&"x".repeat(200)).is_ok());
        assert!(Topic::parse("Bil\0ling").is_err());
        assert!(parse_department(Some("Sales\0".into())).is_err());
        // An agent's departments: trimmed, duplicates dropped, bounded.
        let list = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            parse_agent_departments(list(&[" Sales", "Billing", "Sales "])).unwrap(),
            list(&["Sales", "Billing"])
        );
        assert!(parse_agent_departments(list(&["a"; 80])).is_ok());
        assert!(
            parse_agent_departments(list(&["a"; 81])).is_err(),
            "refused unread"
        );
        let twenty: Vec<String> = (0..20).map(|n| format!("d{n}")).collect();
        assert!(parse_agent_departments(twenty.clone()).is_ok());
        let mut twenty_one = twenty;
        twenty_one.push("d20".into());
        assert!(parse_agent_departments(twenty_one).is_err());
        assert!(parse_agent_departments(list(&["Sales", " "])).is_err());
        assert!(Contact::parse("A\0na", "ana@example.com", None, None, None).is_err());
        assert!(Contact::parse("Ana", "ana@example.com", None, Some("C\0O".into()), None).is_err());
        assert!(Contact::parse("Ana", "ana@example.com", None, None, None).is_ok());
        assert!(Contact::parse("Ana", "not-an-email", None, None, None).is_err());
        assert!(Contact::parse("", "ana@example.com", None, None, None).is_err());
        let c = Contact::parse(
            "Ana",
            "ana@example.com",
            Some(" ".into()),
            None,
            Some("ACME".into()),
        )
        .unwrap();
        assert_eq!((c.phone, c.company.as_deref()), (None, Some("ACME")));
    }
}
