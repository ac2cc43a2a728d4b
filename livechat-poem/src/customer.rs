//! The customer routes (issue #3): starting a chat, messages, contact,
//! close, history, notifications and linking. Handlers extract, call
//! [`ChatService`], convert.

use std::sync::Arc;

use livechat_core::{
    ChatError, ChatService, ContactInput, CustomerChatRequest, CustomerId, CustomerIdentity,
    NotificationInbox, PageSize, TenantId, UserId, parse_cursor,
};
use poem::Request;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use uuid::Uuid;

use crate::api::{MessageListResponse, MessagePostedResponse, SessionResponse, path_id};
use crate::auth::{Authenticator, authorization_from_headers, tenant_from_headers};
use crate::dto::{
    MessageDto, MessageListEnvelope, NotificationDto, PostMessageRequest, PriorityDto, SessionDto,
    SessionEnvelope, StrictString,
};
use crate::error::ApiError;
use crate::visitor::{IdentitySecrets, VisitorTokens};

#[derive(Tags)]
enum CustomerTags {
    /// Customers: identified tenant users and anonymous visitors.
    Customer,
}

/// What the customer routes need besides the service.
pub(crate) struct CustomerState {
    pub(crate) authenticator: Arc<dyn Authenticator>,
    pub(crate) visitor_tokens: VisitorTokens,
    pub(crate) identity_secrets: IdentitySecrets,
    pub(crate) notifications: Option<Arc<dyn NotificationInbox>>,
    pub(crate) limits: Arc<crate::limits::Limiters>,
    pub(crate) tenants: Option<Arc<dyn crate::TenantDirectory>>,
}

/// An authenticated customer in a tenant.
struct CustomerCtx {
    tenant: TenantId,
    customer: CustomerId,
}

fn tenant_of(req: &Request) -> Result<TenantId, ApiError> {
    tenant_from_headers(req.headers()).map_err(|msg| ApiError::bad_request("invalid_tenant", msg))
}

/// Why a credential's customer could not be resolved, for the customer
/// routes and the WebSocket handshake alike: 401 when the credential
/// names a customer that no longer exists, else the error's own answer
/// (503 when the database cannot answer).
pub(crate) fn unresolved_customer(error: ChatError) -> ApiError {
    match error {
        ChatError::NotFound => ApiError::unauthorized("unknown customer"),
        other => other.into(),
    }
}

enum Credential<'a> {
    Bearer(&'a str),
    Visitor(&'a str),
}

fn credential(req: &Request) -> Result<Option<Credential<'_>>, ApiError> {
    let Some(value) = authorization_from_headers(req.headers()).map_err(ApiError::unauthorized)?
    else {
        return Ok(None);
    };
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthorized("malformed Authorization header"))?;
    let token = token.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Some(Credential::Bearer(token)))
    } else if scheme.eq_ignore_ascii_case("visitor") {
        Ok(Some(Credential::Visitor(token)))
    } else {
        Err(ApiError::unauthorized(
            "use `Bearer <token>` or `Visitor <token>`",
        ))
    }
}

/// Host user id for a host Bearer token valid in `tenant` (any role).
async fn host_user(
    state: &CustomerState,
    token: &str,
    tenant: TenantId,
) -> Result<UserId, ApiError> {
    let principal = state
        .authenticator
        .authenticate(token)
        .await
        .map_err(|e| match e {
            crate::AuthError::Unavailable(cause) => ApiError::unavailable(&cause),
            _ => ApiError::unauthorized("invalid or expired token"),
        })?;
    if !principal.may_act_in(tenant) {
        return Err(ApiError::forbidden("not allowed to act in this tenant"));
    }
    Ok(principal.user_id)
}

/// The visitor token's customer, which must belong to `tenant`.
fn visitor(state: &CustomerState, token: &str, tenant: TenantId) -> Result<CustomerId, ApiError> {
    let (token_tenant, customer) = state
        .visitor_tokens
        .verify(token)
        .ok_or_else(|| ApiError::unauthorized("invalid or expired visitor token"))?;
    if token_tenant != tenant {
        return Err(ApiError::forbidden(
            "the visitor token belongs to another tenant",
        ));
    }
    Ok(customer)
}

/// The customer routes.
pub(crate) struct CustomerApi {
    pub(crate) chat: ChatService,
    pub(crate) state: Arc<CustomerState>,
}

impl CustomerApi {
    /// Resolves the caller of a customer route (credential required).
    async fn customer(&self, req: &Request) -> Result<CustomerCtx, ApiError> {
        let tenant = tenant_of(req)?;
        let identity = match credential(req)? {
            None => {
                return Err(ApiError::unauthorized(
                    "a Bearer or Visitor token is required",
                ));
            }
            Some(Credential::Bearer(token)) => {
                CustomerIdentity::User(host_user(&self.state, token, tenant).await?)
            }
            Some(Credential::Visitor(token)) => {
                CustomerIdentity::Known(visitor(&self.state, token, tenant)?)
            }
        };
        let customer = self
            .chat
            .resolve_customer(tenant, identity)
            .await
            .map_err(unresolved_customer)?;
        Ok(CustomerCtx {
            tenant,
            customer: customer.id,
        })
    }

    /// The host's inbox and the ids the customer's notifications may be
    /// addressed to (`ChatService::notification_recipients`).
    async fn inbox_of(
        &self,
        ctx: &CustomerCtx,
    ) -> Result<(&Arc<dyn NotificationInbox>, Vec<CustomerId>), ApiError> {
        let inbox = self
            .state
            .notifications
            .as_ref()
            .ok_or_else(|| ApiError::unavailable(&"no notification inbox is configured"))?;
        let recipients = self
            .chat
            .notification_recipients(ctx.tenant, ctx.customer)
            .await?;
        Ok((inbox, recipients))
    }
}

/// Contact details as sent.
#[derive(Clone, Debug, Object)]
pub struct ContactRequest {
    /// Required, 1–200 characters.
    pub name: StrictString,
    /// Required, a valid e-mail address.
    pub email: StrictString,
    /// Optional, up to 50 characters.
    pub phone: Option<StrictString>,
    /// Optional, up to 200 characters.
    pub position: Option<StrictString>,
    /// Optional, up to 200 characters.
    pub company: Option<StrictString>,
}

impl From<ContactRequest> for ContactInput {
    fn from(c: ContactRequest) -> Self {
        Self {
            name: c.name.0,
            email: c.email.0,
            phone: c.phone.map(|v| v.0),
            position: c.position.map(|v| v.0),
            company: c.company.map(|v| v.0),
        }
    }
}

/// `POST /customer/chats` body.
#[derive(Clone, Debug, Object)]
pub struct StartChatRequest {
    /// For anonymous visitors: a UUID the browser generated and keeps.
    pub browser_uuid: Option<Uuid>,
    /// Host user id asserted by an identity hash (with `identity_hash`).
    pub user_id: Option<i64>,
    /// `hex(HMAC-SHA256(tenant secret, user_id))`, signed by the host.
    pub identity_hash: Option<StrictString>,
    /// What the customer needs help with: 1–200 characters.
    pub topic: StrictString,
    /// `low`, `normal` (default), `high`, `urgent`.
    pub priority: Option<PriorityDto>,
    /// Requested department, up to 100 characters.
    pub department: Option<StrictString>,
    /// Contact details.
    pub contact: Option<ContactRequest>,
    /// First message (1–10,000 characters). If the customer already has a
    /// WAITING or OPEN chat, that chat is returned (200) and the message is
    /// added to it as their next one.
    pub message: Option<StrictString>,
    /// Idempotency key of `message` (1–128 visible ASCII, no spaces): a retried
    /// start with the same key adds no message. The `Idempotency-Key`
    /// header is an alternative.
    pub client_msg_id: Option<StrictString>,
}

/// A ticket reference.
#[derive(Clone, Debug, Object)]
pub struct TicketRef {
    /// The ticket id (also the session's `ticket_id`).
    pub id: Uuid,
}

/// The result of a start.
#[derive(Clone, Debug, Object)]
pub struct ChatStart {
    /// The session (new, or the customer's active one).
    pub session: SessionDto,
    /// The customer.
    pub customer_id: Uuid,
    /// Send as `Authorization: Visitor <token>` afterwards (anonymous and
    /// identity-hash starts).
    #[oai(skip_serializing_if_is_none)]
    pub visitor_token: Option<String>,
    /// Place in the queue while WAITING.
    #[oai(skip_serializing_if_is_none)]
    pub queue_position: Option<i64>,
    /// The ticket, when no agent was online.
    #[oai(skip_serializing_if_is_none)]
    pub ticket: Option<TicketRef>,
    /// The start's `message` as stored: `seq` 1 of a new chat, or the next
    /// message of the customer's existing one; when its `client_msg_id`
    /// was already used in that chat, the original message (and
    /// `start_message_duplicate` is `true`). Absent without a `message`.
    #[oai(skip_serializing_if_is_none)]
    pub start_message: Option<MessageDto>,
    /// With `start_message`: `true` when nothing new was stored (a repeat
    /// of its key), as a WebSocket `ack`'s `duplicate`.
    #[oai(skip_serializing_if_is_none)]
    pub start_message_duplicate: Option<bool>,
}

/// `{"data": ChatStart}`.
#[derive(Clone, Debug, Object)]
pub struct ChatStartEnvelope {
    /// The start result.
    pub data: ChatStart,
}

#[derive(ApiResponse)]
enum ChatStartResponse {
    /// A new session.
    #[oai(status = 201)]
    Created(Json<ChatStartEnvelope>),
    /// The customer's existing WAITING or OPEN session.
    #[oai(status = 200)]
    Existing(Json<ChatStartEnvelope>),
}

/// `{"data": [ChatSession…], "next_cursor"}`.
#[derive(Clone, Debug, Object)]
pub struct HistoryEnvelope {
    /// Newest first.
    pub data: Vec<SessionDto>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page
    /// (one shorter than `limit`).
    pub next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum HistoryResponse {
    /// The page.
    #[oai(status = 200)]
    Ok(Json<HistoryEnvelope>),
}

/// `{"data": [Notification…], "next_cursor": …}`.
#[derive(Clone, Debug, Object)]
pub struct NotificationListEnvelope {
    /// Newest first.
    pub data: Vec<NotificationDto>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page
    /// (one shorter than `limit`).
    pub next_cursor: Option<String>,
}

/// `{"data": Notification}`.
#[derive(Clone, Debug, Object)]
pub struct NotificationEnvelope {
    /// The notification.
    pub data: NotificationDto,
}

#[derive(ApiResponse)]
enum NotificationListResponse {
    /// Newest first.
    #[oai(status = 200)]
    Ok(Json<NotificationListEnvelope>),
}

#[derive(ApiResponse)]
enum NotificationResponse {
    /// Marked read.
    #[oai(status = 200)]
    Ok(Json<NotificationEnvelope>),
}

/// `POST /customer/link` body.
#[derive(Clone, Debug, Object)]
pub struct LinkRequest {
    /// The visitor token issued at the anonymous start.
    pub visitor_token: StrictString,
}

/// The identified customer after linking.
#[derive(Clone, Debug, Object)]
pub struct Linked {
    /// The identified customer (the visitor's sessions are now theirs).
    pub customer_id: Uuid,
    /// The visitor that was linked.
    pub visitor_id: Uuid,
}

/// `{"data": Linked}`.
#[derive(Clone, Debug, Object)]
pub struct LinkedEnvelope {
    /// The result.
    pub data: Linked,
}

#[derive(ApiResponse)]
enum LinkResponse {
    /// Linked (or already linked).
    #[oai(status = 200)]
    Ok(Json<LinkedEnvelope>),
}

/// `{"data": {"agents_available", "agents_online"}}`.
#[derive(Clone, Debug, Object)]
pub struct Availability {
    /// Whether an agent could take a chat now (online, fresh, below capacity).
    pub agents_available: bool,
    /// Whether an agent is online at all (fresh, capacity aside). With
    /// `agents_available` false, a chat started now waits in the queue for
    /// the busy agents; with this false too, it also becomes a ticket and
    /// the customer is notified of the reply ("leave a message").
    pub agents_online: bool,
}

/// `{"data": Availability}`.
#[derive(Clone, Debug, Object)]
pub struct AvailabilityEnvelope {
    /// The flag.
    pub data: Availability,
}

#[derive(ApiResponse)]
enum AvailabilityResponse {
    /// The flag.
    #[oai(status = 200)]
    Ok(Json<AvailabilityEnvelope>),
}

#[OpenApi(prefix_path = "/customer", tag = "CustomerTags::Customer")]
impl CustomerApi {
    /// Whether an agent could take a chat now (the widget's flag), and
    /// whether one is online at all (busy agents: the chat will wait), for
    /// a chat of the given department or, without one, for any chat.
    #[oai(
        path = "/availability",
        method = "get",
        operation_id = "customer_availability"
    )]
    async fn availability(
        &self,
        req: &Request,
        /// The department the chat would be started with (up to 100
        /// characters, trimmed): only agents who take its chats count.
        /// Blank, as in a start: a chat without a department.
        department: Query<Option<String>>,
    ) -> Result<AvailabilityResponse, ApiError> {
        let tenant = tenant_of(req)?;
        crate::tenants::check_tenant(self.state.tenants.as_ref(), tenant).await?;
        let department = livechat_core::parse_department_query(department.0)?;
        let flags = self
            .chat
            .availability(tenant, department.as_deref())
            .await?;
        Ok(AvailabilityResponse::Ok(Json(AvailabilityEnvelope {
            data: Availability {
                agents_available: flags.agents_available,
                agents_online: flags.agents_online,
            },
        })))
    }

    /// Start a chat. Credentials: a host Bearer token (identified user),
    /// `Authorization: Visitor <token>`, `user_id` + `identity_hash`, or
    /// none with a `browser_uuid` (anonymous; a visitor token is issued).
    /// A customer with a WAITING or OPEN session gets it back with 200,
    /// and the body's `message`, if any, is added to it as their next
    /// message (idempotent with `client_msg_id` or `Idempotency-Key`).
    #[oai(path = "/chats", method = "post", operation_id = "customer_start_chat")]
    async fn start(
        &self,
        req: &Request,
        /// Idempotency key of the body's `message`, used when the body has
        /// no `client_msg_id` (visible ASCII, once).
        #[oai(name = "Idempotency-Key")]
        _idempotency_key: Header<Option<String>>,
        body: Json<StartChatRequest>,
    ) -> Result<ChatStartResponse, ApiError> {
        let tenant = tenant_of(req)?;
        let client_ip = self.state.limits.client_ip(req);
        self.state.limits.chat_start(tenant, client_ip)?;
        crate::tenants::check_tenant(self.state.tenants.as_ref(), tenant).await?;
        let body = body.0;
        let (identity, issue_token) = match (credential(req)?, body.user_id, &body.identity_hash) {
            // Two ways to identify: which one counts must not be a guess
            // (a widget adding a logged-in user's hash to the visitor
            // token it kept got 200 as the visitor, and believed the
            // user identified).
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "give either a credential or user_id + identity_hash, not both",
                ));
            }
            (Some(Credential::Bearer(token)), _, _) => (
                CustomerIdentity::User(host_user(&self.state, token, tenant).await?),
                false,
            ),
            (Some(Credential::Visitor(token)), _, _) => (
                CustomerIdentity::Known(visitor(&self.state, token, tenant)?),
                false,
            ),
            (None, Some(user), Some(hash)) => {
                let user = UserId::new(user)?;
                if !self.state.identity_secrets.verify(tenant, user, &hash.0) {
                    // A tenant without a secret takes no hash at all (a
                    // widget set up for another tenant, or a host that
                    // forgot it).
                    let why = if self.state.identity_secrets.accepts(tenant) {
                        "identity_hash does not match user_id"
                    } else {
                        "this tenant accepts no identity hashes"
                    };
                    return Err(ApiError::unauthorized(why));
                }
                (CustomerIdentity::User(user), true)
            }
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "user_id and identity_hash go together",
                ));
            }
            (None, None, None) => match body.browser_uuid {
                Some(browser) => (CustomerIdentity::Visitor(browser), true),
                None => {
                    return Err(ApiError::unauthorized(
                        "send a Bearer or Visitor token, an identity hash, or a browser_uuid",
                    ));
                }
            },
        };
        let client_msg_id = crate::api::pick_idempotency_key(body.client_msg_id.map(|k| k.0), req)?;
        let request = CustomerChatRequest {
            client_msg_id,
            topic: body.topic.0,
            priority: body.priority.map(Into::into),
            department: body.department.map(|d| d.0),
            contact: body.contact.map(Into::into),
            message: body.message.map(|m| m.0),
            client_ip: client_ip.map(|ip| ip.to_string()),
            // Bytes past ASCII (UTF-8, or Latin-1 from old clients) are
            // kept as far as they decode, not dropped with the whole value.
            user_agent: req
                .headers()
                .get(poem::http::header::USER_AGENT)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        };
        // The customer is created only for a valid request.
        let (customer, started) = self.chat.start_chat_as(tenant, identity, request).await?;
        let visitor_token = if issue_token {
            Some(
                self.state
                    .visitor_tokens
                    .issue(tenant, customer.id)
                    .map_err(|e| ApiError::internal(&e))?,
            )
        } else {
            None
        };
        let (start_message, start_message_duplicate) = match started.message {
            Some(m) => (Some(m.message.into()), Some(!m.created)),
            None => (None, None),
        };
        let view = started.view;
        let ticket = view
            .session
            .ticket_id
            .map(|t| TicketRef { id: t.as_uuid() });
        // The chat's customer: the identified one when a link of this
        // visitor landed just before the start (the visitor token issued
        // above acts as that customer too).
        let customer_id = view.session.customer_id.unwrap_or(customer.id);
        let data = ChatStart {
            queue_position: view.queue_position,
            customer_id: customer_id.as_uuid(),
            visitor_token,
            ticket,
            session: view.into(),
            start_message,
            start_message_duplicate,
        };
        let envelope = Json(ChatStartEnvelope { data });
        Ok(if started.created {
            ChatStartResponse::Created(envelope)
        } else {
            ChatStartResponse::Existing(envelope)
        })
    }

    /// The customer's session, with its queue position while WAITING.
    #[oai(
        path = "/chats/:id",
        method = "get",
        operation_id = "customer_get_chat"
    )]
    async fn get(&self, req: &Request, id: Path<String>) -> Result<SessionResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let view = self
            .chat
            .customer_session(ctx.tenant, ctx.customer, path_id(&id.0)?)
            .await?;
        Ok(SessionResponse::Ok(Json(SessionEnvelope {
            data: view.into(),
        })))
    }

    /// Post a message (WAITING or OPEN session); same rules as agents'.
    #[oai(
        path = "/chats/:id/messages",
        method = "post",
        operation_id = "customer_post_message"
    )]
    async fn post_message(
        &self,
        req: &Request,
        id: Path<String>,
        /// Idempotency key, used when the body has no `client_msg_id`
        /// (visible ASCII, once; read from the request itself).
        #[oai(name = "Idempotency-Key")]
        _idempotency_key: Header<Option<String>>,
        body: Json<PostMessageRequest>,
    ) -> Result<MessagePostedResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let client_ip = self.state.limits.client_ip(req);
        self.state
            .limits
            .customer_message(ctx.tenant, ctx.customer, client_ip)?;
        let session = path_id(&id.0)?;
        let key = crate::api::pick_idempotency_key(body.0.client_msg_id.map(|k| k.0), req)?;
        let posted = self
            .chat
            .post_customer_message(ctx.tenant, ctx.customer, session, body.0.message.0, key)
            .await?;
        Ok(MessagePostedResponse::from_posted(posted))
    }

    /// Messages of the customer's session, ascending by `seq`.
    #[oai(
        path = "/chats/:id/messages",
        method = "get",
        operation_id = "customer_list_messages"
    )]
    async fn list_messages(
        &self,
        req: &Request,
        id: Path<String>,
        /// Only messages with a higher `seq` (default 0).
        after_seq: Query<Option<i64>>,
        /// 1–200, default 50.
        limit: Query<Option<i64>>,
    ) -> Result<MessageListResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let messages = self
            .chat
            .list_customer_messages(
                ctx.tenant,
                ctx.customer,
                path_id(&id.0)?,
                after_seq.0,
                limit.0,
            )
            .await?;
        Ok(MessageListResponse::Ok(Json(MessageListEnvelope::new(
            messages,
            after_seq.0,
        ))))
    }

    /// Set the session's contact details (name and e-mail required).
    #[oai(
        path = "/chats/:id/contact",
        method = "put",
        operation_id = "customer_set_contact"
    )]
    async fn set_contact(
        &self,
        req: &Request,
        id: Path<String>,
        body: Json<ContactRequest>,
    ) -> Result<SessionResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let view = self
            .chat
            .set_contact(ctx.tenant, ctx.customer, path_id(&id.0)?, body.0.into())
            .await?;
        Ok(SessionResponse::Ok(Json(SessionEnvelope {
            data: view.into(),
        })))
    }

    /// End the chat (idempotent).
    #[oai(
        path = "/chats/:id/close",
        method = "post",
        operation_id = "customer_close_chat"
    )]
    async fn close(&self, req: &Request, id: Path<String>) -> Result<SessionResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let session = self
            .chat
            .close_customer_chat(ctx.tenant, ctx.customer, path_id(&id.0)?)
            .await?;
        Ok(SessionResponse::Ok(Json(SessionEnvelope {
            data: session.into(),
        })))
    }

    /// The customer's sessions, newest first, cursor-paged.
    #[oai(path = "/history", method = "get", operation_id = "customer_history")]
    async fn history(
        &self,
        req: &Request,
        /// 1–200, default 50.
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<HistoryResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let page = self
            .chat
            .customer_history(ctx.tenant, ctx.customer, limit.0, cursor.0)
            .await?;
        Ok(HistoryResponse::Ok(Json(HistoryEnvelope {
            data: page.sessions.into_iter().map(Into::into).collect(),
            next_cursor: page.next_cursor,
        })))
    }

    /// The customer's in-app notifications, newest first, including those
    /// addressed to visitors since linked to this customer.
    #[oai(
        path = "/notifications",
        method = "get",
        operation_id = "customer_notifications"
    )]
    async fn notifications(
        &self,
        req: &Request,
        /// The `next_cursor` of the previous page: only the items after
        /// it, newest first, are listed.
        cursor: Query<Option<String>>,
        /// 1–200, default 50.
        limit: Query<Option<i64>>,
    ) -> Result<NotificationListResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let limit = PageSize::parse(limit.0, self.chat.config())?;
        let before = parse_cursor(cursor.0.as_deref())?;
        let (inbox, recipients) = self.inbox_of(&ctx).await?;
        let list = inbox
            .list_notifications(ctx.tenant, &recipients, before, limit)
            .await?;
        let data: Vec<NotificationDto> = list.into_iter().map(Into::into).collect();
        let next_cursor = livechat_core::next_cursor(&data, limit, |n| n.id);
        Ok(NotificationListResponse::Ok(Json(
            NotificationListEnvelope { data, next_cursor },
        )))
    }

    /// Mark a notification read (idempotent).
    #[oai(
        path = "/notifications/:id/read",
        method = "post",
        operation_id = "customer_read_notification"
    )]
    async fn read_notification(
        &self,
        req: &Request,
        id: Path<String>,
    ) -> Result<NotificationResponse, ApiError> {
        let ctx = self.customer(req).await?;
        let id = path_id(&id.0)?;
        let (inbox, recipients) = self.inbox_of(&ctx).await?;
        let n = inbox.mark_read(ctx.tenant, &recipients, id).await?;
        Ok(NotificationResponse::Ok(Json(NotificationEnvelope {
            data: n.into(),
        })))
    }

    /// Link an anonymous visitor to the logged-in user (seed 001): send the
    /// host's `Authorization: Bearer <token>` and the visitor token in the
    /// body. The visitor's sessions move to the identified customer.
    #[oai(path = "/link", method = "post", operation_id = "customer_link")]
    async fn link(&self, req: &Request, body: Json<LinkRequest>) -> Result<LinkResponse, ApiError> {
        let tenant = tenant_of(req)?;
        let Some(Credential::Bearer(token)) = credential(req)? else {
            return Err(ApiError::unauthorized(
                "linking needs the host's Bearer token",
            ));
        };
        let user = host_user(&self.state, token, tenant).await?;
        let visitor_id = visitor(&self.state, &body.0.visitor_token.0, tenant)?;
        let customer = self.chat.link_visitor(tenant, visitor_id, user).await?;
        Ok(LinkResponse::Ok(Json(LinkedEnvelope {
            data: Linked {
                customer_id: customer.id.as_uuid(),
                visitor_id: visitor_id.as_uuid(),
            },
        })))
    }
}
