//! Request authentication: the host's [`Authenticator`], the shipped
//! [`JwtAuthenticator`], and the `X-Tenant-ID` header.
//!
//! Rules (issue #2): every route needs `Authorization: Bearer <token>`
//! (401 `unauthorized` when missing, malformed, badly signed or expired),
//! `X-Tenant-ID: <positive integer>`, exactly once (400 `invalid_tenant`), the role
//! `SUPPORT_AGENT` and the tenant among the token's `tenant_ids`
//! (403 `forbidden`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use livechat_core::{TenantId, UserId};
use serde::Deserialize;

/// The role a user needs for the agent routes.
pub const SUPPORT_AGENT: &str = "SUPPORT_AGENT";

/// The header that selects the tenant of a request.
pub const TENANT_HEADER: &str = "X-Tenant-ID";

/// Who is calling, as the host's [`Authenticator`] vouches. Made with
/// [`Principal::new`] (fields may be added: it is `non_exhaustive`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Principal {
    /// The host's user id.
    pub user_id: UserId,
    /// Role names, e.g. `SUPPORT_AGENT`.
    pub roles: Vec<String>,
    /// Tenants the user may act in; `None` means every tenant.
    pub tenant_ids: Option<Vec<TenantId>>,
    /// When the credential stops being accepted (for a JWT, its `exp` plus
    /// the leeway); `None`: not known to expire. A WebSocket opened with it
    /// is closed then (1008), so that a connection does not outlive its
    /// credential (README "Errors and close codes").
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Principal {
    /// `user_id` with `roles`, allowed in `tenant_ids` (`None`: every
    /// tenant), whose credential does not expire (see
    /// [`Self::expiring_at`]).
    #[must_use]
    pub fn new(user_id: UserId, roles: Vec<String>, tenant_ids: Option<Vec<TenantId>>) -> Self {
        Self {
            user_id,
            roles,
            tenant_ids,
            expires_at: None,
        }
    }

    /// The same principal, its credential accepted until `at`.
    #[must_use]
    pub fn expiring_at(mut self, at: chrono::DateTime<chrono::Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }

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
/// integers; absent or `null` means every tenant, `[]` none), `exp`
/// (required; seconds since the epoch, 60 s leeway for clock skew), `nbf`
/// (optional; seconds since the epoch: a token is refused before it, with
/// the same leeway). Both may have a fraction (RFC 7519 NumericDate),
/// which is rounded. Other algorithms
/// and `alg: none` are refused, and so is a token whose header has `crit`
/// (RFC 7515 §4.1.11: no extension is understood here). `aud` (RFC 7519
/// §4.1.3): a token that has one is refused unless
/// [`JwtAuthenticator::audience`] names it (an identity provider that
/// always writes `aud` needs that setting); `iss` is not checked.
///
/// Verified tokens are remembered (at most [`VERIFIED_TOKENS`] of them,
/// shared by clones) until they expire: a client sends the same token with
/// every request, and verifying it again (base64, two JSON parses, HMAC)
/// was about a twentieth of the server's CPU per posted message (issue #5
/// profile). Only a token byte-for-byte equal to one verified with this
/// key is answered from memory, and only while its `exp` (plus the leeway)
/// has not passed; refused tokens are never remembered.
#[derive(Clone)]
pub struct JwtAuthenticator {
    key: DecodingKey,
    validation: Validation,
    verified: Arc<Mutex<HashMap<Box<str>, VerifiedToken>>>,
}

/// How many verified tokens a [`JwtAuthenticator`] remembers. When full,
/// expired ones are dropped, and if none had expired, all are forgotten
/// (each is then verified again on its next use).
pub const VERIFIED_TOKENS: usize = 4096;

/// A remembered verified token: who it names and until when (seconds
/// since the epoch, `exp` plus the leeway) it is accepted.
#[derive(Clone, Debug)]
struct VerifiedToken {
    principal: Principal,
    valid_until: u64,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator").finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Verifies HS256 tokens with `secret`.
    ///
    /// # Panics
    /// When `secret` is empty: anyone could sign a token for any user (a
    /// configuration mistake, refused at start).
    #[must_use]
    pub fn hs256(secret: &[u8]) -> Self {
        assert!(
            !secret.is_empty(),
            "the JWT secret is empty: anyone could sign host tokens"
        );
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
            verified: Arc::default(),
        }
    }

    /// Accepts only tokens whose `aud` (one value or an array) names one of
    /// `audiences`, and refuses tokens without `aud` (RFC 7519 §4.1.3: the
    /// library is then one of the token's named recipients). Without this
    /// setting a token with `aud` is refused, since the library cannot
    /// tell it was meant for it. The authenticator gets its own memory of
    /// verified tokens (a clone made before keeps the old rule and its
    /// memory).
    ///
    /// # Panics
    /// When `audiences` is empty (every token would be refused: a
    /// configuration mistake, refused at start).
    #[must_use]
    pub fn audience<T: ToString>(mut self, audiences: &[T]) -> Self {
        assert!(
            !audiences.is_empty(),
            "no JWT audience given: every token would be refused"
        );
        self.validation.set_audience(audiences);
        self.validation.set_required_spec_claims(&["exp", "aud"]);
        self.verified = Arc::default();
        self
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, VerifiedToken>> {
        // A panic while holding the lock cannot leave a half-written entry.
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The principal of `token` if it was verified before and is still
    /// valid at `now` (seconds since the epoch); an expired entry is dropped.
    fn remembered(&self, token: &str, now: u64) -> Option<Principal> {
        let mut verified = self.verified();
        match verified.get(token) {
            Some(v) if now <= v.valid_until => Some(v.principal.clone()),
            Some(_) => {
                verified.remove(token);
                None
            }
            None => None,
        }
    }

    /// Remembers a verified `token` until `exp` plus the leeway.
    fn remember(&self, token: &str, principal: &Principal, exp: u64, now: u64) {
        let valid_until = exp.saturating_add(self.validation.leeway);
        let mut verified = self.verified();
        if verified.len() >= VERIFIED_TOKENS {
            verified.retain(|_, v| now <= v.valid_until);
            if verified.len() >= VERIFIED_TOKENS {
                verified.clear();
            }
        }
        verified.insert(
            token.into(),
            VerifiedToken {
                principal: principal.clone(),
                valid_until,
            },
        );
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: serde_json::Value,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    tenant_ids: Option<Vec<i64>>,
    /// Checked by `jsonwebtoken`; read here (rounded, as `jsonwebtoken`
    /// reads it) to know when the token ends: how long to remember it,
    /// and when a WebSocket opened with it is closed.
    #[serde(default)]
    exp: Option<serde_json::Value>,
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
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(principal) = self.remembered(token, now) {
            return Ok(principal);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        // RFC 7515 §4.1.11: a token is invalid when its `crit` names an
        // extension the recipient does not understand, and this one
        // understands none (`jsonwebtoken` reads the list but leaves it).
        if data.header.crit.is_some() {
            return Err(AuthError::InvalidToken(
                "crit header parameters are not supported".into(),
            ));
        }
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
        // As jsonwebtoken reads it (RFC 7519 NumericDate may have a
        // fraction, which it rounds): read as whole numbers only, a
        // fractional `exp` left the token without an end, and a WebSocket
        // opened with it open for good.
        let exp = claims.exp.as_ref().and_then(|exp| {
            exp.as_u64().or_else(|| {
                exp.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f.round() as u64)
            })
        });
        let principal = Principal {
            user_id,
            roles: claims.roles,
            tenant_ids,
            expires_at: exp
                .and_then(|exp| i64::try_from(exp.saturating_add(self.validation.leeway)).ok())
                .and_then(|at| chrono::DateTime::from_timestamp(at, 0)),
        };
        if let Some(exp) = exp {
            self.remember(token, &principal, exp, now);
        }
        Ok(principal)
    }
}

/// Why [`single_header`] refused a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderFault {
    /// The header was given more than once.
    Repeated,
    /// Its value is not visible ASCII (which poem-openapi's header
    /// parameters would take for no header at all).
    NotVisibleAscii,
}

/// The value of header `name` in `headers`: `None` when absent, refused
/// when given more than once (which copy a proxy or a reader takes must not
/// decide what a request means) or when not visible ASCII.
pub(crate) fn single_header<'h>(
    headers: &'h poem::http::HeaderMap,
    name: &str,
) -> Result<Option<&'h str>, HeaderFault> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(HeaderFault::Repeated),
        (Some(value), None) => value
            .to_str()
            .map(Some)
            .map_err(|_| HeaderFault::NotVisibleAscii),
    }
}

/// The `Authorization` header of `headers`: `None` when absent. Given
/// more than once it is refused even when the copies agree, by the rule
/// of `X-Tenant-ID` ([`tenant_from_headers`]): whose credential a request
/// carries must not depend on which copy a proxy or a reader takes.
///
/// # Errors
/// A message for the 401 `unauthorized` answer: the header repeated, or
/// its value not visible ASCII.
pub(crate) fn authorization_from_headers(
    headers: &poem::http::HeaderMap,
) -> Result<Option<&str>, &'static str> {
    single_header(headers, poem::http::header::AUTHORIZATION.as_str()).map_err(
        |fault| match fault {
            HeaderFault::Repeated => "Authorization must be given once",
            HeaderFault::NotVisibleAscii => "the Authorization header is not visible ASCII",
        },
    )
}

/// The tenant named by the `X-Tenant-ID` header of `headers`: exactly one
/// such header, whose value [`parse_tenant_header`] accepts. The header
/// given twice is refused even when both values agree: which tenant a
/// request acts in must not depend on which copy a proxy or a reader
/// takes.
///
/// # Errors
/// A message for the 400 `invalid_tenant` answer.
pub fn tenant_from_headers(headers: &poem::http::HeaderMap) -> Result<TenantId, &'static str> {
    match single_header(headers, TENANT_HEADER) {
        Ok(value) => parse_tenant_header(value),
        Err(HeaderFault::Repeated) => Err("X-Tenant-ID must be given once"),
        Err(HeaderFault::NotVisibleAscii) => parse_tenant_header(Some("")),
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

    #[test]
    #[should_panic(expected = "the JWT secret is empty")]
    fn an_empty_jwt_secret_is_refused() {
        let _ = JwtAuthenticator::hs256(b"");
    }

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

    /// A token with `aud` is refused unless the authenticator names that
    /// audience; one that names audiences refuses tokens for others and
    /// tokens without `aud`.
    #[tokio::test]
    async fn an_audience_must_be_named_to_be_accepted() {
        let claims = |aud: Option<serde_json::Value>| {
            let mut c = serde_json::json!({"sub": 7, "roles": ["SUPPORT_AGENT"], "exp": exp()});
            if let Some(aud) = aud {
                c["aud"] = aud;
            }
            token(Algorithm::HS256, c)
        };
        let ours = claims(Some(serde_json::json!("livechat")));
        let listed = claims(Some(serde_json::json!(["crm", "livechat"])));
        let theirs = claims(Some(serde_json::json!("billing")));
        let none = claims(None);

        let plain = JwtAuthenticator::hs256(b"s3cret");
        assert!(plain.authenticate(&none).await.is_ok());
        for t in [&ours, &listed, &theirs] {
            assert!(
                matches!(plain.authenticate(t).await, Err(AuthError::InvalidToken(_))),
                "no audience named: a token meant for someone is refused"
            );
        }

        let named = JwtAuthenticator::hs256(b"s3cret").audience(&["livechat"]);
        assert_eq!(named.authenticate(&ours).await.unwrap().user_id.get(), 7);
        assert!(named.authenticate(&listed).await.is_ok());
        for t in [&theirs, &none] {
            assert!(matches!(
                named.authenticate(t).await,
                Err(AuthError::InvalidToken(_))
            ));
        }
        // A clone made before keeps its rule and its memory: the token it
        // verified is not answered from memory by the one that names an
        // audience.
        let before = JwtAuthenticator::hs256(b"s3cret");
        assert!(before.authenticate(&none).await.is_ok());
        let after = before.clone().audience(&["livechat"]);
        assert!(after.authenticate(&none).await.is_err());
    }

    #[test]
    #[should_panic(expected = "no JWT audience given")]
    fn an_empty_audience_list_is_refused() {
        let _ = JwtAuthenticator::hs256(b"s3cret").audience::<&str>(&[]);
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

    fn principal(user: i64) -> Principal {
        Principal {
            user_id: UserId::new(user).unwrap(),
            roles: vec![SUPPORT_AGENT.to_owned()],
            tenant_ids: None,
            expires_at: None,
        }
    }

    /// A fractional `exp` (RFC 7519 NumericDate; PyJWT writes
    /// `time.time() + ttl`) is accepted, rounded as `jsonwebtoken` reads
    /// it, and gives the principal its end: read as a whole number only,
    /// it left none, and a WebSocket opened with the token stayed open
    /// past it for good.
    #[tokio::test]
    async fn a_fractional_exp_ends_the_principal() {
        let auth = JwtAuthenticator::hs256(b"s3cret");
        let exp = exp();
        let t = token(
            Algorithm::HS256,
            serde_json::json!({"sub": 7, "roles": ["SUPPORT_AGENT"], "exp": exp as f64 + 0.6}),
        );
        let principal = auth.authenticate(&t).await.unwrap();
        let until = exp + 1 + i64::try_from(auth.validation.leeway).unwrap();
        assert_eq!(
            principal.expires_at,
            chrono::DateTime::from_timestamp(until, 0)
        );
    }

    #[tokio::test]
    async fn a_verified_token_is_remembered_until_it_expires() {
        let auth = JwtAuthenticator::hs256(b"s3cret");
        let exp = exp();
        let t = token(
            Algorithm::HS256,
            serde_json::json!({"sub": 7, "roles": ["SUPPORT_AGENT"], "exp": exp}),
        );
        let first = auth.authenticate(&t).await.unwrap();
        // Clones share what was verified.
        let clone = auth.clone();
        assert_eq!(clone.verified().len(), 1);
        let until = exp.cast_unsigned() + auth.validation.leeway;
        assert_eq!(clone.remembered(&t, until), Some(first.clone()));
        assert_eq!(clone.authenticate(&t).await.unwrap(), first);
        // Past exp plus the leeway the entry is dropped.
        assert_eq!(clone.remembered(&t, until + 1), None);
        assert!(auth.verified().is_empty());
    }

    #[tokio::test]
    async fn authenticate_answers_from_what_it_remembers_and_only_while_valid() {
        let auth = JwtAuthenticator::hs256(b"s3cret");
        let now = jsonwebtoken::get_current_timestamp();
        // Not a JWT at all: only the remembered entry can make it pass.
        auth.remember("remembered", &principal(9), now + 60, now);
        assert_eq!(auth.authenticate("remembered").await.unwrap(), principal(9));
        let leeway = auth.validation.leeway;
        auth.remember("stale", &principal(9), now - leeway - 2, now);
        assert!(matches!(
            auth.authenticate("stale").await,
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[tokio::test]
    async fn refused_tokens_are_not_remembered() {
        let auth = JwtAuthenticator::hs256(b"s3cret");
        let wrong_key = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": 7, "exp": exp()}),
            &EncodingKey::from_secret(b"other"),
        )
        .unwrap();
        let bad_sub = token(
            Algorithm::HS256,
            serde_json::json!({"sub": "abc", "exp": exp()}),
        );
        for t in [wrong_key, bad_sub] {
            assert!(auth.authenticate(&t).await.is_err());
            assert!(auth.authenticate(&t).await.is_err(), "refused twice");
        }
        assert!(auth.verified().is_empty());
    }

    #[test]
    fn a_full_memory_drops_expired_tokens_first_then_everything() {
        let auth = JwtAuthenticator::hs256(b"s3cret");
        let now = 1_000_000;
        for i in 0..VERIFIED_TOKENS {
            // Every other entry has expired by `now`.
            let exp = if i % 2 == 0 { now - 100 } else { now + 100 };
            auth.remember(&format!("t{i}"), &principal(1), exp, now - 200);
        }
        auth.remember("new", &principal(2), now + 100, now);
        assert_eq!(auth.verified().len(), VERIFIED_TOKENS / 2 + 1);
        assert_eq!(auth.remembered("t1", now), Some(principal(1)));
        assert_eq!(auth.remembered("t0", now), None);
        for i in 0..VERIFIED_TOKENS {
            auth.remember(&format!("u{i}"), &principal(1), now + 100, now);
        }
        // Full of valid entries: forgotten, then the new one kept.
        assert!(auth.verified().len() <= VERIFIED_TOKENS);
        auth.remember("last", &principal(3), now + 100, now);
        assert_eq!(auth.remembered("last", now), Some(principal(3)));
        assert!(auth.verified().len() < VERIFIED_TOKENS);
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
