//! Customer credentials issued or checked by the library (issue #3):
//! visitor tokens and host-signed identity hashes.

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use livechat_core::{CustomerId, TenantId, UserId};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// How long a visitor token is valid by default: 30 days.
pub const VISITOR_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// The latest `exp` a visitor token is given (9999-12-31T23:59:59Z, in
/// seconds since the epoch): a lifetime reaching past it
/// ([`VisitorTokens::with_ttl`] with `Duration::MAX`) means "never expires".
const LAST_EXPIRY: i64 = 253_402_300_799;

const TOKEN_TYPE: &str = "livechat_visitor";

/// Issues and checks `Authorization: Visitor <token>` credentials: HS256
/// JWTs signed with the library's own secret, bound to a tenant and a
/// customer, expiring after [`VISITOR_TOKEN_TTL`].
#[derive(Clone)]
pub struct VisitorTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for VisitorTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisitorTokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct VisitorClaims {
    /// The customer id.
    sub: String,
    /// The tenant.
    tid: i64,
    /// Always `livechat_visitor`, so no other token signed with the same
    /// secret can pass as one.
    typ: String,
    iat: i64,
    exp: i64,
}

impl VisitorTokens {
    /// Tokens signed with `secret` (keep it apart from the host's JWT
    /// secret; all nodes must share it).
    ///
    /// # Panics
    /// When `secret` is empty: anyone could sign a visitor token for any
    /// tenant and customer (a configuration mistake, refused at start as
    /// [`IdentitySecrets`] refuses an empty secret).
    #[must_use]
    pub fn new(secret: &[u8]) -> Self {
        assert!(
            !secret.is_empty(),
            "the visitor token secret is empty: anyone could sign visitor tokens"
        );
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Tokens issued here have no `nbf`; one that has it is held to it,
        // as host tokens are (`JwtAuthenticator`).
        validation.validate_nbf = true;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl: VISITOR_TOKEN_TTL,
        }
    }

    /// Sets the lifetime of new tokens; one reaching past year 9999 (as
    /// `Duration::MAX` does) makes tokens that never expire.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// A token for `customer` of `tenant`.
    ///
    /// # Errors
    /// Only if signing fails.
    pub fn issue(
        &self,
        tenant: TenantId,
        customer: CustomerId,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = chrono::Utc::now().timestamp();
        let claims = VisitorClaims {
            sub: customer.to_string(),
            tid: tenant.get(),
            typ: TOKEN_TYPE.to_owned(),
            iat: now,
            // A lifetime past the calendar means "never": the expiry is
            // capped at the last second of year 9999, which every reader of
            // the token can represent.
            exp: i64::try_from(self.ttl.as_secs())
                .ok()
                .and_then(|ttl| now.checked_add(ttl))
                .map_or(LAST_EXPIRY, |exp| exp.min(LAST_EXPIRY)),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// The tenant and customer a valid token names; `None` when malformed,
    /// badly signed, expired, before its `nbf` (if it has one; 60 s
    /// leeway) or not a visitor token.
    #[must_use]
    pub fn verify(&self, token: &str) -> Option<(TenantId, CustomerId)> {
        self.verify_until(token)
            .map(|(tenant, customer, _)| (tenant, customer))
    }

    /// As [`Self::verify`], with when the token stops being accepted (its
    /// `exp` plus the 60 s leeway): a WebSocket opened with it is closed
    /// then.
    #[must_use]
    pub fn verify_until(
        &self,
        token: &str,
    ) -> Option<(TenantId, CustomerId, chrono::DateTime<chrono::Utc>)> {
        let data =
            jsonwebtoken::decode::<VisitorClaims>(token, &self.decoding, &self.validation).ok()?;
        let claims = data.claims;
        if claims.typ != TOKEN_TYPE {
            return None;
        }
        // An expiry past what a timestamp can hold (a token of an older
        // version, whose lifetime was not capped) never comes.
        let until = claims
            .exp
            .checked_add(i64::try_from(self.validation.leeway).unwrap_or(i64::MAX))
            .and_then(|at| chrono::DateTime::from_timestamp(at, 0))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        Some((
            TenantId::new(claims.tid).ok()?,
            claims.sub.parse().ok()?,
            until,
        ))
    }
}

/// Per-tenant secrets for identity hashes: a host whose widget runs on a
/// tenant's own site signs the user id (`hex(HMAC-SHA256(secret, user_id))`)
/// so the widget can assert who is logged in (issue #3).
#[derive(Clone, Default)]
pub struct IdentitySecrets {
    secrets: HashMap<TenantId, Vec<u8>>,
}

impl std::fmt::Debug for IdentitySecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySecrets")
            .field("tenants", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl IdentitySecrets {
    /// No tenant accepts identity hashes.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `tenant`'s secret. An empty secret is no secret: anyone could
    /// compute its hashes, so such a tenant accepts none.
    #[must_use]
    pub fn with(mut self, tenant: TenantId, secret: impl Into<Vec<u8>>) -> Self {
        self.secrets.insert(tenant, secret.into());
        self
    }

    /// Parses `tenant:secret` pairs separated by commas (e.g. the
    /// `LIVECHAT_IDENTITY_SECRETS` variable of the example host).
    ///
    /// # Errors
    /// A message naming the malformed pair: no `:`, a tenant that is not a
    /// positive id, or an empty secret (`1:`, often an unset variable in a
    /// template, would let anyone assert any user of the tenant).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut out = Self::new();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tenant, secret) = pair
                .split_once(':')
                .ok_or_else(|| format!("`{pair}` is not tenant:secret"))?;
            let tenant: TenantId = tenant
                .trim()
                .parse()
                .map_err(|_| format!("`{tenant}` is not a tenant id"))?;
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(format!("`{pair}` has an empty secret"));
            }
            out = out.with(tenant, secret.as_bytes().to_vec());
        }
        Ok(out)
    }

    /// The hash a host computes for `user` in `tenant` (lowercase hex), if
    /// the tenant has a (non-empty) secret.
    #[must_use]
    pub fn sign(&self, tenant: TenantId, user: UserId) -> Option<String> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret(tenant)?).ok()?;
        mac.update(user.to_string().as_bytes());
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    /// Whether `hash` (hex) is `user`'s identity hash in `tenant`, compared
    /// in constant time. `false` when the tenant has no (non-empty) secret.
    #[must_use]
    pub fn verify(&self, tenant: TenantId, user: UserId, hash: &str) -> bool {
        let (Some(secret), Ok(given)) = (self.secret(tenant), hex::decode(hash.trim())) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
            return false;
        };
        mac.update(user.to_string().as_bytes());
        mac.verify_slice(&given).is_ok()
    }

    /// Whether `tenant` has a (non-empty) secret: without one no hash
    /// passes there.
    pub(crate) fn accepts(&self, tenant: TenantId) -> bool {
        self.secret(tenant).is_some()
    }

    /// `tenant`'s secret, unless it has none or an empty one.
    fn secret(&self, tenant: TenantId) -> Option<&[u8]> {
        self.secrets
            .get(&tenant)
            .map(Vec::as_slice)
            .filter(|secret| !secret.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "the visitor token secret is empty")]
    fn an_empty_visitor_secret_is_refused() {
        let _ = VisitorTokens::new(b"");
    }

    #[test]
    fn visitor_tokens_round_trip_and_reject_tampering() {
        let tokens = VisitorTokens::new(b"visitor-secret");
        let (t, c) = (TenantId::new(3).unwrap(), CustomerId::generate());
        let token = tokens.issue(t, c).unwrap();
        assert_eq!(tokens.verify(&token), Some((t, c)));
        assert_eq!(VisitorTokens::new(b"other").verify(&token), None);
        assert_eq!(tokens.verify(&format!("{token}x")), None);
        let expired = tokens.clone().with_ttl(Duration::ZERO);
        let old = expired.issue(t, c).unwrap();
        // Expiry is checked with jsonwebtoken's default 60 s leeway.
        let mut strict = tokens.clone();
        strict.validation.leeway = 0;
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(strict.verify(&old), None);
    }

    #[test]
    fn a_visitor_token_is_refused_before_its_nbf() {
        let tokens = VisitorTokens::new(b"visitor-secret");
        let customer = CustomerId::generate();
        let now = chrono::Utc::now().timestamp();
        let signed = |nbf: i64| {
            let claims = serde_json::json!({
                "sub": customer.to_string(), "tid": 3, "typ": TOKEN_TYPE,
                "iat": now, "exp": now + 3600, "nbf": nbf,
            });
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &tokens.encoding).unwrap()
        };
        assert_eq!(tokens.verify(&signed(now + 3600)), None, "an hour early");
        assert_eq!(
            tokens.verify(&signed(now)),
            Some((TenantId::new(3).unwrap(), customer))
        );
    }

    #[test]
    fn a_lifetime_past_the_calendar_makes_tokens_that_never_expire() {
        let (t, c) = (TenantId::new(3).unwrap(), CustomerId::generate());
        let end = chrono::DateTime::from_timestamp(LAST_EXPIRY + 60, 0).unwrap();
        for ttl in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 4),
            Duration::from_secs(i64::MAX.unsigned_abs()),
        ] {
            let tokens = VisitorTokens::new(b"visitor-secret").with_ttl(ttl);
            let token = tokens.issue(t, c).unwrap();
            assert_eq!(tokens.verify_until(&token), Some((t, c, end)), "{ttl:?}");
        }
        // A token whose `exp` no timestamp holds (signed before the cap).
        let tokens = VisitorTokens::new(b"visitor-secret");
        let claims = serde_json::json!({
            "sub": c.to_string(), "tid": 3, "typ": TOKEN_TYPE, "iat": 0, "exp": i64::MAX,
        });
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &tokens.encoding)
            .unwrap();
        assert_eq!(
            tokens.verify_until(&token),
            Some((t, c, chrono::DateTime::<chrono::Utc>::MAX_UTC))
        );
    }

    #[test]
    fn identity_hash_verifies_in_constant_time() {
        let secrets = IdentitySecrets::parse("1:alpha, 2:beta").unwrap();
        let (t1, u) = (TenantId::new(1).unwrap(), UserId::new(42).unwrap());
        let hash = secrets.sign(t1, u).unwrap();
        assert!(secrets.verify(t1, u, &hash));
        assert!(!secrets.verify(TenantId::new(2).unwrap(), u, &hash));
        assert!(!secrets.verify(t1, UserId::new(43).unwrap(), &hash));
        assert!(!secrets.verify(TenantId::new(9).unwrap(), u, &hash));
        assert!(!secrets.verify(t1, u, "zz"));
        assert!(IdentitySecrets::parse("nope").is_err());
    }

    /// Anyone can compute an HMAC with an empty key: an empty secret is
    /// refused when parsed, and one set through the API accepts no hash.
    #[test]
    fn an_empty_identity_secret_accepts_no_hash() {
        let err = IdentitySecrets::parse("1:alpha,2:").unwrap_err();
        assert!(err.contains("`2:` has an empty secret"), "{err}");
        assert!(IdentitySecrets::parse("2: ").is_err());
        let (t2, u) = (TenantId::new(2).unwrap(), UserId::new(1001).unwrap());
        let empty = IdentitySecrets::new().with(t2, "");
        assert_eq!(empty.sign(t2, u), None);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"").unwrap();
        mac.update(b"1001");
        let forged = hex::encode(mac.finalize().into_bytes());
        assert!(!empty.verify(t2, u, &forged));
    }
}
