//! The agent routes (issue #2). Each handler extracts, calls
//! [`ChatService`], converts; no rule is decided here.

use std::sync::Arc;

use livechat_core::{ChatService, SessionId, TenantId, UserId};
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, SecurityScheme, Tags};

use crate::auth::{Authenticator, Principal, SUPPORT_AGENT, TENANT_HEADER, parse_tenant_header};
use crate::dto::{
    MessageEnvelope, MessageListEnvelope, PostMessageRequest, PresenceEnvelope, SessionEnvelope,
    SessionListEnvelope, SessionStatusDto, SetStatusRequest, StartSessionRequest,
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
    let tenant_header = req
        .headers()
        .get(TENANT_HEADER)
        .map(|v| v.to_str().unwrap_or(""));
    let tenant = parse_tenant_header(tenant_header)
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
enum SessionResponse {
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
enum MessagePostedResponse {
    /// Stored with the next `seq`.
    #[oai(status = 201)]
    Created(Json<MessageEnvelope>),
    /// Idempotent retry: the message stored earlier with this `client_msg_id`.
    #[oai(status = 200)]
    Replayed(Json<MessageEnvelope>),
}

#[derive(ApiResponse)]
enum MessageListResponse {
    /// Messages ascending by `seq`.
    #[oai(status = 200)]
    Ok(Json<MessageListEnvelope>),
}

fn session_id(raw: &str) -> Result<SessionId, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found())
}

/// The agent API; mounted by [`crate::Livechat`].
pub(crate) struct AgentApi {
    pub(crate) chat: ChatService,
}

#[OpenApi(tag = "ApiTags::Agent")]
impl AgentApi {
    /// Set the calling agent's status in the tenant.
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
        let presence = self
            .chat
            .set_agent_status(auth.tenant(), auth.user(), body.0.status.into())
            .await?;
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
        /// 1–200, default 50.
        limit: Query<Option<i64>>,
    ) -> Result<SessionListResponse, ApiError> {
        let sessions = self
            .chat
            .list_sessions(auth.tenant(), status.0.map(Into::into), limit.0)
            .await?;
        Ok(SessionListResponse::Ok(Json(SessionListEnvelope {
            data: sessions.into_iter().map(Into::into).collect(),
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
            .get_session(auth.tenant(), session_id(&id.0)?)
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
            .close_session(auth.tenant(), auth.user(), session_id(&id.0)?)
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
        /// Idempotency key, used when the body has no `client_msg_id`.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        body: Json<PostMessageRequest>,
    ) -> Result<MessagePostedResponse, ApiError> {
        let session = session_id(&id.0)?;
        let body = body.0;
        let key = match (body.client_msg_id.map(|k| k.0), idempotency_key.0) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "client_msg_id and Idempotency-Key differ",
                ));
            }
            (a, b) => a.or(b),
        };
        let posted = self
            .chat
            .post_message(auth.tenant(), auth.user(), session, body.message.0, key)
            .await?;
        let envelope = Json(MessageEnvelope {
            data: posted.message.into(),
        });
        Ok(if posted.created {
            MessagePostedResponse::Created(envelope)
        } else {
            MessagePostedResponse::Replayed(envelope)
        })
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
            .list_messages(auth.tenant(), session_id(&id.0)?, after_seq.0, limit.0)
            .await?;
        let next_after_seq = messages.last().map_or(after_seq.0.unwrap_or(0), |m| m.seq);
        Ok(MessageListResponse::Ok(Json(MessageListEnvelope {
            data: messages.into_iter().map(Into::into).collect(),
            next_after_seq,
        })))
    }
}
