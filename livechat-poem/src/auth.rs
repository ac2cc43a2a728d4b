//! Request authentication: the host's [`Authenticator`], the shipped
//! [`JwtAuthenticator`], and the `X-Tenant-ID` header.
//!
//! Rules (issue #2): every route needs `Authorization: Bearer <token>`
//! (401 `unauthorized` when missing, malformed, badly signed or expired),
//! `X-Tenant-ID: <positive integer>` (400 `invalid_tenant`), the role
//! `SUPPORT_AGENT` and the tenant among the token's `tenant_ids`
//! (403 `forbidden`).

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use livechat_core::{TenantId, UserId};
use serde::Deserialize;

/// The role a user needs for the agent routes.
pub const SUPPORT_AGENT: &str = "SUPPORT_AGENT";

/// The header that selects the tenant of a request.
pub const TENANT_HEADER: &str = "X-Tenant-ID";

/// Who is calling, as the host's [`Authenticator`] vouches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The host's user id.
    pub user_id: UserId,
    /// Role names, e.g. `SUPPORT_AGENT`.
    pub roles: Vec<String>,
    /// Tenants the user may act in; `None` means every tenant.
    pub tenant_ids: Option<Vec<TenantId>>,
}

impl Principal {
    /// Whether the user holds `role` (exact, case-sensitive match).
    #[must_use]
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the user may act in `tenant`.
    #[must_use]
    pub fn may_act_in(&self, tenant: TenantId) -> bool {
        self.tenant_ids
            .as_ref()
            .is_none_or(|ids| ids.contains(&tenant))
    }
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Missing, malformed, badly signed or expired credentials (401).
    #[error("invalid credentials: {0}")]
    InvalidToken(String),
    /// The identity provider could not be asked (503).
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
}

/// Turns a bearer token into a [`Principal`]. Implemented by the host (or use
/// [`JwtAuthenticator`]); stored as `Arc<dyn Authenticator>`.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Checks `token` (the part after `Bearer `).
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`] to answer 401, [`AuthError::Unavailable`]
    /// to answer 503.
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError>;
}

/// HS256 JWTs signed with a shared secret.
///
/// Claims: `sub` (user id: a JSON number or a numeric string), `roles`
/// (array of strings; absent means none), `tenant_ids` (array of positive
/// integers; absent means every tenant), `exp` (required; seconds since the
/// epoch, 60 s leeway for clock skew). Other algorithms and `alg: none` are
/// refused.
#[derive(Clone)]
pub struct JwtAuthenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator").finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Verifies HS256 tokens with `secret`.
    #[must_use]
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: serde_json::Value,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    tenant_ids: Option<Vec<i64>>,
}

fn parse_sub(sub: &serde_json::Value) -> Option<UserId> {
    match sub {
        serde_json::Value::Number(n) => n.as_i64().and_then(|v| UserId::new(v).ok()),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let claims = data.claims;
        let user_id = parse_sub(&claims.sub)
            .ok_or_else(|| AuthError::InvalidToken("sub is not a positive integer".into()))?;
        let tenant_ids = claims
            .tenant_ids
            .map(|ids| {
                ids.into_iter()
                    .map(TenantId::new)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(|_| AuthError::InvalidToken("tenant_ids must be positive integers".into()))?;
        Ok(Principal {
            user_id,
            roles: claims.roles,
            tenant_ids,
        })
    }
}

/// Parses the `X-Tenant-ID` value: a positive decimal integer.
///
/// # Errors
/// A message for the 400 `invalid_tenant` answer.
pub fn parse_tenant_header(value: Option<&str>) -> Result<TenantId, &'static str> {
    let value = value.ok_or("X-Tenant-ID header is required")?;
    value
        .trim()
        .parse()
        .map_err(|_| "X-Tenant-ID must be a positive integer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn token(alg: Algorithm, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    }

    fn exp() -> i64 {
        chrono::Utc::now().timestamp() + 600
    }

    #[tokio::test]
    async fn accepts_numeric_and_string_sub() {
        let auth = JwtAuthenticator::hs256(b"s3cret");
        for sub in [serde_json::json!(7), serde_json::json!("7")] {
            let t = token(
                Algorithm::HS256,
                serde_json::json!({"sub": sub, "roles": ["SUPPORT_AGENT"], "tenant_ids": [1, 2], "exp": exp()}),
            );
            let p = auth.authenticate(&t).await.unwrap();
            assert_eq!(p.user_id.get(), 7);
            assert!(p.has_role(SUPPORT_AGENT));
            assert!(p.may_act_in(TenantId::new(2).unwrap()));
            assert!(!p.may_act_in(TenantId::new(3).unwrap()));
        }
    }

    #[tokio::test]
    async fn rejects_bad_tokens() {
        let auth = JwtAuthenticator::hs256(b"s3cret");
        let expired = token(
            Algorithm::HS256,
            serde_json::json!({"sub": 7, "exp": chrono::Utc::now().timestamp() - 3600}),
        );
        let no_exp = token(Algorithm::HS256, serde_json::json!({"sub": 7}));
        let hs512 = token(
            Algorithm::HS512,
            serde_json::json!({"sub": 7, "exp": exp()}),
        );
        let bad_sub = token(
            Algorithm::HS256,
            serde_json::json!({"sub": "abc", "exp": exp()}),
        );
        let zero_sub = token(
            Algorithm::HS256,
            serde_json::json!({"sub": 0, "exp": exp()}),
        );
        let wrong_key = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": 7, "exp": exp()}),
            &EncodingKey::from_secret(b"other"),
        )
        .unwrap();
        // alg: none, unsigned.
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(r#"{{"sub":7,"exp":{}}}"#, exp()).as_bytes())
        );
        for t in [
            expired,
            no_exp,
            hs512,
            bad_sub,
            zero_sub,
            wrong_key,
            none,
            "garbage".into(),
        ] {
            assert!(
                matches!(auth.authenticate(&t).await, Err(AuthError::InvalidToken(_))),
                "{t} must be rejected"
            );
        }
    }

    #[test]
    fn tenant_header_rules() {
        assert_eq!(parse_tenant_header(Some("12")).unwrap().get(), 12);
        for bad in [
            None,
            Some(""),
            Some("0"),
            Some("-1"),
            Some("x"),
            Some("1.5"),
        ] {
            assert!(parse_tenant_header(bad).is_err());
        }
    }
}
