//! The agent routes (issues #2 and #3). Each handler extracts, calls
//! [`ChatService`], converts; no rule is decided here.

use std::sync::Arc;

use livechat_core::bus::EventBus;
use livechat_core::{
    ChatService, PageSize, SessionFilter, TenantId, TicketClose, TicketDirectory, TicketFilter,
    UserId, parse_agent_filter, parse_cursor, parse_department_filter,
};
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, SecurityScheme, Tags};

use crate::auth::{
    Authenticator, HeaderFault, Principal, SUPPORT_AGENT, authorization_from_headers,
    single_header, tenant_from_headers,
};
use crate::dto::{
    AgentListEnvelope, MessageEnvelope, MessageListEnvelope, PostMessageRequest, PresenceEnvelope,
    PresenceStatusDto, SessionEnvelope, SessionListEnvelope, SessionStatusDto, SetStatusRequest,
    StartSessionRequest, TicketDto, TicketStatusDto,
};
use crate::error::ApiError;

#[derive(Tags)]
enum ApiTags {
    /// Support agents: presence and chat sessions.
    Agent,
}

/// The caller of an agent route: authenticated, in a tenant they may act in,
/// holding `SUPPORT_AGENT`.
#[derive(Clone, Debug)]
pub struct AgentContext {
    /// The tenant chosen by `X-Tenant-ID`.
    pub tenant: TenantId,
    /// The authenticated user.
    pub principal: Principal,
}

/// Shared by the security checker through request data.
pub(crate) struct AuthState {
    pub(crate) authenticator: Arc<dyn Authenticator>,
}

/// `Authorization: Bearer <token>` plus `X-Tenant-ID: <positive integer>`;
/// the user needs the `SUPPORT_AGENT` role and the tenant in `tenant_ids`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_agent")]
pub(crate) struct AgentAuth(AgentContext);

async fn check_agent(req: &Request, bearer: Bearer) -> poem::Result<AgentContext> {
    // poem-openapi took the token from the header's first copy.
    authorization_from_headers(req.headers()).map_err(ApiError::unauthorized)?;
    let state = req
        .data::<Arc<AuthState>>()
        .ok_or_else(|| ApiError::internal(&"authenticator missing from request data"))?;
    let principal = state
        .authenticator
        .authenticate(&bearer.token)
        .await
        .map_err(|e| match e {
            crate::AuthError::Unavailable(cause) => ApiError::unavailable(&cause),
            _ => ApiError::unauthorized("invalid or expired token"),
        })?;
    let tenant = tenant_from_headers(req.headers())
        .map_err(|msg| ApiError::bad_request("invalid_tenant", msg))?;
    if !principal.has_role(SUPPORT_AGENT) {
        return Err(ApiError::forbidden("the SUPPORT_AGENT role is required").into());
    }
    if !principal.may_act_in(tenant) {
        return Err(ApiError::forbidden("not allowed to act in this tenant").into());
    }
    Ok(AgentContext { tenant, principal })
}

impl AgentAuth {
    fn tenant(&self) -> TenantId {
        self.0.tenant
    }
    fn user(&self) -> UserId {
        self.0.principal.user_id
    }
}

#[derive(ApiResponse)]
enum PresenceResponse {
    /// The stored presence.
    #[oai(status = 200)]
    Ok(Json<PresenceEnvelope>),
}

#[derive(ApiResponse)]
enum AgentListResponse {
    /// The tenant's agents, by agent id.
    #[oai(status = 200)]
    Ok(Json<AgentListEnvelope>),
}

#[derive(ApiResponse)]
pub(crate) enum SessionResponse {
    /// The session.
    #[oai(status = 200)]
    Ok(Json<SessionEnvelope>),
}

#[derive(ApiResponse)]
enum SessionCreatedResponse {
    /// The new session.
    #[oai(status = 201)]
    Created(Json<SessionEnvelope>),
}

#[derive(ApiResponse)]
enum SessionListResponse {
    /// Sessions, newest first.
    #[oai(status = 200)]
    Ok(Json<SessionListEnvelope>),
}

#[derive(ApiResponse)]
pub(crate) enum MessagePostedResponse {
    /// Stored with the next `seq`.
    #[oai(status = 201)]
    Created(Json<MessageEnvelope>),
    /// Idempotent retry: the message stored earlier with this `client_msg_id`.
    #[oai(status = 200)]
    Replayed(Json<MessageEnvelope>),
}

#[derive(ApiResponse)]
pub(crate) enum MessageListResponse {
    /// Messages ascending by `seq`.
    #[oai(status = 200)]
    Ok(Json<MessageListEnvelope>),
}

impl MessagePostedResponse {
    /// 201 for a new message, 200 for an idempotent replay.
    pub(crate) fn from_posted(posted: livechat_core::AppendedMessage) -> Self {
        let envelope = Json(MessageEnvelope {
            data: posted.message.into(),
        });
        if posted.created {
            Self::Created(envelope)
        } else {
            Self::Replayed(envelope)
        }
    }
}

/// An id from the path; a malformed one names nothing: 404 `not_found`.
pub(crate) fn path_id<T: std::str::FromStr>(raw: &str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found())
}

/// Name of the header that carries a send's idempotency key.
pub(crate) const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// The idempotency key of a send: the body's `client_msg_id` or the
/// `Idempotency-Key` header of `req`; both given and different is 400
/// `invalid_body`.
///
/// The header is read from the request itself: poem-openapi's header
/// parameter takes a value that is not visible ASCII (e.g. `café` in
/// Latin-1) for no header at all, and a retry carrying it would be stored
/// twice (DESIGN.md invariant 6). Such a value, or the header given more
/// than once, is 400 `invalid_body`; the key's own rules (length,
/// characters) are the core's, as for `client_msg_id`.
pub(crate) fn pick_idempotency_key(
    body: Option<String>,
    req: &Request,
) -> Result<Option<String>, ApiError> {
    let header = single_header(req.headers(), IDEMPOTENCY_KEY_HEADER)
        .map_err(|fault| {
            ApiError::bad_request(
                "invalid_body",
                match fault {
                    HeaderFault::Repeated => "Idempotency-Key given more than once",
                    HeaderFault::NotVisibleAscii => {
                        "Idempotency-Key must be visible ASCII characters"
                    }
                },
            )
        })?
        .map(str::to_owned);
    match (body, header) {
        (Some(a), Some(b)) if a != b => Err(ApiError::bad_request(
            "invalid_body",
            "client_msg_id and Idempotency-Key differ",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// `POST /sessions/{id}/assign` body.
#[derive(Clone, Debug, Object)]
pub struct AssignRequest {
    /// Transfer to this agent; absent: the caller claims a WAITING session.
    pub agent_id: Option<i64>,
}

/// Routing settings of a tenant.
#[derive(Clone, Debug, Object)]
pub struct RoutingSettings {
    /// Maximum OPEN sessions per agent (1–100; default 5).
    pub agent_capacity: i64,
}

/// `{"data": RoutingSettings}`.
#[derive(Clone, Debug, Object)]
pub struct RoutingSettingsEnvelope {
    /// The settings.
    pub data: RoutingSettings,
}

#[derive(ApiResponse)]
enum RoutingSettingsResponse {
    /// The settings in force.
    #[oai(status = 200)]
    Ok(Json<RoutingSettingsEnvelope>),
}

/// Live connections of a session (all nodes).
#[derive(Clone, Debug, Object)]
pub struct Connections {
    /// Whether any customer connection follows the session.
    pub customer_connected: bool,
    /// Whether any agent connection follows the session.
    pub agent_connected: bool,
    /// Customer connections.
    pub total_customer: u64,
    /// Agent connections.
    pub total_agent: u64,
}

/// `{"data": Connections}`.
#[derive(Clone, Debug, Object)]
pub struct ConnectionsEnvelope {
    /// The counts.
    pub data: Connections,
}

#[derive(ApiResponse)]
enum ConnectionsResponse {
    /// The counts.
    #[oai(status = 200)]
    Ok(Json<ConnectionsEnvelope>),
}

/// `{"data": Ticket}`.
#[derive(Clone, Debug, Object)]
pub struct TicketEnvelope {
    /// The ticket.
    pub data: TicketDto,
}

/// `{"data": [Ticket…], "next_cursor": …}`.
#[derive(Clone, Debug, Object)]
pub struct TicketListEnvelope {
    /// Newest first.
    pub data: Vec<TicketDto>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page
    /// (one shorter than `limit`).
    pub next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum TicketResponse {
    /// The ticket.
    #[oai(status = 200)]
    Ok(Json<TicketEnvelope>),
}

#[derive(ApiResponse)]
enum TicketCloseResponse {
    /// The ticket was closed already; nothing changed.
    #[oai(status = 200)]
    Closed(Json<TicketEnvelope>),
    /// The close is recorded; the ticket, shown as it was, reads CLOSED once
    /// the ticket bridge's dispatcher has handled it.
    #[oai(status = 202)]
    Accepted(Json<TicketEnvelope>),
}

#[derive(ApiResponse)]
enum TicketListResponse {
    /// Tickets, newest first.
    #[oai(status = 200)]
    Ok(Json<TicketListEnvelope>),
}

/// The agent API; mounted by [`crate::Livechat`].
pub(crate) struct AgentApi {
    pub(crate) chat: ChatService,
    pub(crate) tickets: Option<Arc<dyn TicketDirectory>>,
    /// The gateway's bus, to announce an agent back after a heartbeat
    /// (none without the gateway: nobody to tell).
    pub(crate) bus: Option<Arc<dyn EventBus>>,
}

impl AgentApi {
    fn tickets(&self) -> Result<&Arc<dyn TicketDirectory>, ApiError> {
        self.tickets
            .as_ref()
            .ok_or_else(|| ApiError::unavailable(&"no ticket directory is configured"))
    }
}

#[OpenApi(tag = "ApiTags::Agent")]
impl AgentApi {
    /// Set the calling agent's status in the tenant, and optionally the
    /// departments they take chats of. `online` takes chats from the
    /// queue; `offline` hands the agent's open customer chats back to it
    /// (to another agent online, or tickets); `away` and `busy` keep them
    /// and take no new ones.
    #[oai(
        path = "/agents/me/status",
        method = "put",
        operation_id = "set_agent_status"
    )]
    async fn set_status(
        &self,
        auth: AgentAuth,
        body: Json<SetStatusRequest>,
    ) -> Result<PresenceResponse, ApiError> {
        let body = body.0;
        let departments = body
            .departments
            .map(|list| list.into_iter().map(|d| d.0).collect());
        let presence = self
            .chat
            .set_agent_presence(auth.tenant(), auth.user(), body.status.into(), departments)
            .await?;
        Ok(PresenceResponse::Ok(Json(PresenceEnvelope {
            data: presence.into(),
        })))
    }

    /// The tenant's agents: everyone who set a status in it, by agent id,
    /// with their status, departments, whether they are online and
    /// available, and their load (for picking a colleague to transfer a
    /// chat to, or a team's dashboard).
    #[oai(path = "/agents", method = "get", operation_id = "list_agents")]
    async fn list_agents(
        &self,
        auth: AgentAuth,
        /// Only agents with this chosen status.
        status: Query<Option<PresenceStatusDto>>,
    ) -> Result<AgentListResponse, ApiError> {
        let agents = self
            .chat
            .list_agents(auth.tenant(), status.0.map(Into::into))
            .await?;
        Ok(AgentListResponse::Ok(Json(AgentListEnvelope {
            data: agents.into_iter().map(Into::into).collect(),
        })))
    }

    /// The calling agent's presence in the tenant: the chosen status and
    /// when it was set; 404 before any status was set. A read: it renews
    /// nothing (`POST /agents/me/heartbeat` does).
    #[oai(
        path = "/agents/me/status",
        method = "get",
        operation_id = "get_agent_status"
    )]
    async fn get_status(&self, auth: AgentAuth) -> Result<PresenceResponse, ApiError> {
        let presence = self.chat.agent_presence(auth.tenant(), auth.user()).await?;
        Ok(PresenceResponse::Ok(Json(PresenceEnvelope {
            data: presence.into(),
        })))
    }

    /// Start a chat session for an online agent (the caller when `agent_id`
    /// is absent). At most one OPEN session per agent.
    #[oai(path = "/sessions", method = "post", operation_id = "start_session")]
    async fn start_session(
        &self,
        auth: AgentAuth,
        body: Json<StartSessionRequest>,
    ) -> Result<SessionCreatedResponse, ApiError> {
        let agent = body.0.agent_id.map(UserId::new).transpose()?;
        let session = self
            .chat
            .start_session(auth.tenant(), auth.user(), agent)
            .await?;
        Ok(SessionCreatedResponse::Created(Json(SessionEnvelope {
            data: session.into(),
        })))
    }

    /// List the tenant's sessions, newest first.
    #[oai(path = "/sessions", method = "get", operation_id = "list_sessions")]
    async fn list_sessions(
        &self,
        auth: AgentAuth,
        /// Only sessions with this status.
        status: Query<Option<SessionStatusDto>>,
        /// Only sessions of this agent (serving an OPEN chat, having
        /// served a CLOSED one): `me` for the calling agent, or an agent's
        /// user id (a positive integer).
        agent_id: Query<Option<String>>,
        /// Only customer chats started with this department (1–100
        /// characters, compared as a start stores it: trimmed).
        department: Query<Option<String>>,
        /// The `next_cursor` of the previous page: only the items after
        /// it, newest first, are listed.
        cursor: Query<Option<String>>,
        /// 1–200, default 50.
        limit: Query<Option<i64>>,
    ) -> Result<SessionListResponse, ApiError> {
        let filter = SessionFilter {
            status: status.0.map(Into::into),
            agent: parse_agent_filter(agent_id.0.as_deref(), auth.user())?,
            department: parse_department_filter(department.0)?,
        };
        let page = self
            .chat
            .list_sessions(auth.tenant(), filter, cursor.0.as_deref(), limit.0)
            .await?;
        Ok(SessionListResponse::Ok(Json(SessionListEnvelope {
            data: page.sessions.into_iter().map(Into::into).collect(),
            next_cursor: page.next_cursor,
        })))
    }

    /// One session.
    #[oai(path = "/sessions/:id", method = "get", operation_id = "get_session")]
    async fn get_session(
        &self,
        auth: AgentAuth,
        /// Session id (UUID).
        id: Path<String>,
    ) -> Result<SessionResponse, ApiError> {
        let session = self
            .chat
            .get_session(auth.tenant(), path_id(&id.0)?)
            .await?;
        Ok(SessionResponse::Ok(Json(SessionEnvelope {
            data: session.into(),
        })))
    }

    /// Close a session (idempotent).
    #[oai(
        path = "/sessions/:id/close",
        method = "post",
        operation_id = "close_session"
    )]
    async fn close_session(
        &self,
        auth: AgentAuth,
        /// Session id (UUID).
        id: Path<String>,
    ) -> Result<SessionResponse, ApiError> {
        let session = self
            .chat
            .close_session(auth.tenant(), auth.user(), path_id(&id.0)?)
            .await?;
        Ok(SessionResponse::Ok(Json(SessionEnvelope {
            data: session.into(),
        })))
    }

    /// Post a message to an OPEN session; it gets the next `seq`.
    #[oai(
        path = "/sessions/:id/messages",
        method = "post",
        operation_id = "post_message"
    )]
    async fn post_message(
        &self,
        auth: AgentAuth,
        /// Session id (UUID).
        id: Path<String>,
        req: &Request,
        /// Idempotency key, used when the body has no `client_msg_id`
        /// (visible ASCII, once; read from the request itself).
        #[oai(name = "Idempotency-Key")]
        _idempotency_key: Header<Option<String>>,
        body: Json<PostMessageRequest>,
    ) -> Result<MessagePostedResponse, ApiError> {
        let session = path_id(&id.0)?;
        let body = body.0;
        let key = pick_idempotency_key(body.client_msg_id.map(|k| k.0), req)?;
        let posted = self
            .chat
            .post_message(auth.tenant(), auth.user(), session, body.message.0, key)
            .await?;
        Ok(MessagePostedResponse::from_posted(posted))
    }

    /// Messages of a session ascending by `seq`, after `after_seq`.
    #[oai(
        path = "/sessions/:id/messages",
        method = "get",
        operation_id = "list_messages"
    )]
    async fn list_messages(
        &self,
        auth: AgentAuth,
        /// Session id (UUID).
        id: Path<String>,
        /// Only messages with a higher `seq` (default 0).
        after_seq: Query<Option<i64>>,
        /// 1–200, default 50.
        limit: Query<Option<i64>>,
    ) -> Result<MessageListResponse, ApiError> {
        let messages = self
            .chat
            .list_messages(auth.tenant(), path_id(&id.0)?, after_seq.0, limit.0)
            .await?;
        Ok(MessageListResponse::Ok(Json(MessageListEnvelope::new(
            messages,
            after_seq.0,
        ))))
    }

    /// Live connections of a session across all nodes (seed 002).
    #[oai(
        path = "/sessions/:id/connections",
        method = "get",
        operation_id = "session_connections"
    )]
    async fn connections(
        &self,
        auth: AgentAuth,
        /// Session id (UUID).
        id: Path<String>,
    ) -> Result<ConnectionsResponse, ApiError> {
        let c = self
            .chat
            .session_connections(auth.tenant(), path_id(&id.0)?)
            .await?;
        Ok(ConnectionsResponse::Ok(Json(ConnectionsEnvelope {
            data: Connections {
                customer_connected: c.customers > 0,
                agent_connected: c.agents > 0,
                total_customer: c.customers,
                total_agent: c.agents,
            },
        })))
    }

    /// Refresh the calling agent's liveness (keeps them eligible when the
    /// host configures a presence TTL). An agent announced offline because
    /// their presence ran out is announced back to the tenant's agents
    /// (`presence_updated` with the chosen status, once).
    #[oai(
        path = "/agents/me/heartbeat",
        method = "post",
        operation_id = "agent_heartbeat"
    )]
    async fn heartbeat(&self, auth: AgentAuth) -> Result<PresenceResponse, ApiError> {
        let beat = self.chat.heartbeat(auth.tenant(), auth.user()).await?;
        if let Some(bus) = &self.bus
            && beat.returned
        {
            let back = &beat.presence;
            crate::ws::publish_presence(&**bus, back.tenant_id, back.agent_id, back.status);
        }
        Ok(PresenceResponse::Ok(Json(PresenceEnvelope {
            data: beat.presence.into(),
        })))
    }

    /// Claim a WAITING session (no `agent_id`) or transfer a session to an
    /// online agent. When two agents claim at once, exactly one wins; the
    /// other gets 409 `already_assigned`.
    #[oai(
        path = "/sessions/:id/assign",
        method = "post",
        operation_id = "assign_session"
    )]
    async fn assign(
        &self,
        auth: AgentAuth,
        /// Session id (UUID).
        id: Path<String>,
        body: Json<AssignRequest>,
    ) -> Result<SessionResponse, ApiError> {
        let target = body.0.agent_id.map(UserId::new).transpose()?;
        let session = self
            .chat
            .assign_session(auth.tenant(), auth.user(), path_id(&id.0)?, target)
            .await?;
        Ok(SessionResponse::Ok(Json(SessionEnvelope {
            data: session.into(),
        })))
    }

    /// The tenant's routing settings.
    #[oai(
        path = "/settings/routing",
        method = "get",
        operation_id = "get_routing_settings"
    )]
    async fn routing_settings(&self, auth: AgentAuth) -> Result<RoutingSettingsResponse, ApiError> {
        let agent_capacity = self.chat.agent_capacity(auth.tenant()).await?;
        Ok(RoutingSettingsResponse::Ok(Json(RoutingSettingsEnvelope {
            data: RoutingSettings { agent_capacity },
        })))
    }

    /// Set the tenant's per-agent capacity; raising it assigns waiting
    /// sessions at once.
    #[oai(
        path = "/settings/routing",
        method = "put",
        operation_id = "set_routing_settings"
    )]
    async fn set_routing_settings(
        &self,
        auth: AgentAuth,
        body: Json<RoutingSettings>,
    ) -> Result<RoutingSettingsResponse, ApiError> {
        let agent_capacity = self
            .chat
            .set_agent_capacity(auth.tenant(), body.0.agent_capacity)
            .await?;
        Ok(RoutingSettingsResponse::Ok(Json(RoutingSettingsEnvelope {
            data: RoutingSettings { agent_capacity },
        })))
    }

    /// The tenant's tickets, newest first.
    #[oai(path = "/tickets", method = "get", operation_id = "list_tickets")]
    async fn list_tickets(
        &self,
        auth: AgentAuth,
        /// Only tickets with this status.
        status: Query<Option<TicketStatusDto>>,
        /// Only tickets whose customer asked for this department (1–100
        /// characters, compared as a start stores it: trimmed).
        department: Query<Option<String>>,
        /// The `next_cursor` of the previous page: only the items after
        /// it, newest first, are listed.
        cursor: Query<Option<String>>,
        /// 1–200, default 50.
        limit: Query<Option<i64>>,
    ) -> Result<TicketListResponse, ApiError> {
        let limit = PageSize::parse(limit.0, self.chat.config())?;
        let before = parse_cursor(cursor.0.as_deref())?;
        let filter = TicketFilter {
            status: status.0.map(Into::into),
            department: parse_department_filter(department.0)?,
        };
        let tickets = self
            .tickets()?
            .list_tickets(auth.tenant(), filter, before, limit)
            .await?;
        let data: Vec<TicketDto> = tickets.into_iter().map(Into::into).collect();
        let next_cursor = livechat_core::next_cursor(&data, limit, |t| t.id);
        Ok(TicketListResponse::Ok(Json(TicketListEnvelope {
            data,
            next_cursor,
        })))
    }

    /// One ticket. A ticket whose opening the dispatcher has not yet
    /// written (the moment after a start ticketed a chat) answers 409
    /// `ticket_pending`: retry a moment later.
    #[oai(path = "/tickets/:id", method = "get", operation_id = "get_ticket")]
    async fn get_ticket(
        &self,
        auth: AgentAuth,
        /// Ticket id (UUID).
        id: Path<String>,
    ) -> Result<TicketResponse, ApiError> {
        let id = path_id(&id.0)?;
        let ticket = self
            .chat
            .get_ticket(&**self.tickets()?, auth.tenant(), id)
            .await?;
        Ok(TicketResponse::Ok(Json(TicketEnvelope {
            data: ticket.into(),
        })))
    }

    /// Close an OPEN ticket: a ticket addressed to an agent
    /// (`agent_offline`, which has no session to close it), or one of a
    /// session whose request is handled. Answers 202 with the ticket as it
    /// was; the ticket bridge's dispatcher then closes it in every ticket
    /// sink (the default tables, a webhook's `ticket.closed`). A ticket
    /// closed already answers 200 and changes nothing. The session, if
    /// any, stays as it is. A ticket whose opening the dispatcher has not
    /// yet written (or, without a session, not yet delivered to every
    /// sink) answers 409 `ticket_pending`: retry a moment later.
    #[oai(
        path = "/tickets/:id/close",
        method = "post",
        operation_id = "close_ticket"
    )]
    async fn close_ticket(
        &self,
        auth: AgentAuth,
        /// Ticket id (UUID).
        id: Path<String>,
    ) -> Result<TicketCloseResponse, ApiError> {
        let id = path_id(&id.0)?;
        let closed = self
            .chat
            .close_ticket(&**self.tickets()?, auth.tenant(), auth.user(), id)
            .await?;
        Ok(match closed {
            TicketClose::Recorded(ticket) => TicketCloseResponse::Accepted(Json(TicketEnvelope {
                data: ticket.into(),
            })),
            TicketClose::AlreadyClosed(ticket) => {
                TicketCloseResponse::Closed(Json(TicketEnvelope {
                    data: ticket.into(),
                }))
            }
        })
    }
}
