//! Which tenants offer live chat, as the host knows them: the host keeps
//! its own tenants, and `X-Tenant-ID` is the client's to choose, so
//! without this an anonymous start may name any tenant id and store a
//! customer, a session and a ticket that no agent ever sees.

use std::sync::Arc;

use async_trait::async_trait;
use livechat_core::TenantId;

use crate::error::ApiError;

/// The host's answer to whether a tenant offers live chat to its
/// customers ([`crate::Livechat::tenants`]): asked by a customer's chat
/// start and by the availability flag, before anything is stored. A
/// tenant that does not (unknown, or chat turned off for it) gets 400
/// `invalid_tenant`.
#[async_trait]
pub trait TenantDirectory: Send + Sync + 'static {
    /// Whether `tenant` exists and offers live chat.
    ///
    /// # Errors
    /// A message (logged) when the host cannot tell now (its database is
    /// down): the request answers 503 `unavailable`.
    async fn offers_chat(&self, tenant: TenantId) -> Result<bool, String>;
}

/// Refuses a customer request naming a tenant that `tenants` says offers
/// no chat; every tenant passes without a directory.
pub(crate) async fn check_tenant(
    tenants: Option<&Arc<dyn TenantDirectory>>,
    tenant: TenantId,
) -> Result<(), ApiError> {
    let Some(tenants) = tenants else {
        return Ok(());
    };
    match tenants.offers_chat(tenant).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::bad_request(
            "invalid_tenant",
            "X-Tenant-ID names no tenant that offers live chat",
        )),
        Err(cause) => Err(ApiError::unavailable(&cause)),
    }
}
