//! Rate limits of the customer routes over HTTP, the public side of the
//! API: anyone may start a chat with a `browser_uuid`, and every start
//! stores a customer, a session and, with nobody online, a ticket. Without
//! a limit one script filled a tenant's queue and help desk (README "Rate
//! limits"). The WebSocket has its own, per connection
//! ([`crate::RealtimeConfig`]).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use livechat_core::{CustomerId, TenantId};
use poem::Request;
use poem::http::HeaderName;

use crate::error::ApiError;

/// How much one client may do over the customer routes. Over a limit the
/// request answers 429 `rate_limited` with `Retry-After` (whole seconds)
/// and does nothing. Each limit allows bursts of twice its rate; `0` turns
/// it off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// `POST /customer/chats` per minute from one client address in one
    /// tenant (default 10, bursts of 20), every attempt whose body reads
    /// as a start counted, refused ones too (a wrong identity hash tried
    /// again and again; a body that is not a start is refused before,
    /// with 400). The address
    /// is the peer's, or the one a proxy names ([`Self::client_ip_header`]);
    /// IPv6 addresses count by their /64, which one client usually has
    /// whole. A request with no IP address (a Unix socket, poem's test
    /// client) is not limited. One address's starts in all tenants
    /// together are limited too, to [`ANY_TENANT_FACTOR`] times this
    /// rate: `X-Tenant-ID` is the client's to choose, and a script naming
    /// a new tenant at every start otherwise met no limit.
    pub chat_starts_per_minute: u32,
    /// A customer's messages per second (default 10, bursts of 20), over
    /// `POST /customer/chats/{id}/messages` and the `send_message` frames
    /// of all their WebSockets together (each socket also has its own
    /// limit, `RealtimeConfig::send_rate_per_sec`). One client address's
    /// customer messages, all customers together, are limited too, to
    /// [`ANY_CUSTOMER_FACTOR`] times this rate: anyone may become a new
    /// visitor (a new `browser_uuid`) at every start, and a script
    /// gathering visitors otherwise met no limit.
    pub customer_messages_per_sec: u32,
    /// The request header that holds the client's address when the host's
    /// reverse proxy sets it (`X-Real-IP`, or `X-Forwarded-For`, whose last
    /// address is taken: the one the proxy appended, which a client cannot
    /// forge; with a port, `203.0.113.5:41234` or `[2001:db8::1]:443`,
    /// too). `None` (default): the peer address, which behind a proxy is
    /// the proxy's, so every client would share one limit: a host behind
    /// a proxy must name the header. A request without the header, or with
    /// no address in it, counts by its peer address. The address is also
    /// what a session's `client_ip` records.
    pub client_ip_header: Option<HeaderName>,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            chat_starts_per_minute: 10,
            customer_messages_per_sec: 10,
            client_ip_header: None,
        }
    }
}

impl RateLimits {
    /// No limit at all (a host that limits in front of the library, or
    /// load tests).
    #[must_use]
    pub fn unlimited() -> Self {
        Self {
            chat_starts_per_minute: 0,
            customer_messages_per_sec: 0,
            client_ip_header: None,
        }
    }
}

/// One client address's chat starts in all tenants together may be this
/// many times [`RateLimits::chat_starts_per_minute`] (bursts of twice
/// that): enough for a shared address (an office behind one NAT) whose
/// people chat with several of the host's tenants, not for a script that
/// names a new tenant at every start.
pub const ANY_TENANT_FACTOR: u32 = 5;

/// One client address's customer messages, all its customers together,
/// may be this many times [`RateLimits::customer_messages_per_sec`]
/// (bursts of twice that): enough for an office of people behind one NAT
/// chatting at once, not for a script that started one visitor after
/// another and sends as all of them.
pub const ANY_CUSTOMER_FACTOR: u32 = 5;

/// How many keys a limiter holds before those it no longer needs (whose
/// state is back to a full burst) are dropped, at most once per
/// [`SWEEP_EVERY`].
const KEYS_KEPT: usize = 10_000;

/// How often a limiter with more than [`KEYS_KEPT`] keys drops those it
/// no longer needs: a sweep scans every key.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Keys a limiter may hold after a sweep: past it (a flood of distinct
/// addresses or tenant ids) every key is dropped, so memory stays bounded
/// (about 100 bytes a key) at the price of fresh limits for all.
const KEYS_MAX: usize = 200_000;

/// A client address as a limit counts it: IPv4 whole, IPv6 by its /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(ip) => Self::V4(ip.octets()),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.octets()),
                None => {
                    let octets = ip.octets();
                    let mut prefix = [0; 8];
                    prefix.copy_from_slice(&octets[..8]);
                    Self::V6(prefix)
                }
            },
        }
    }
}

/// A keyed limiter (replaced by a fresh one past [`KEYS_MAX`]), its
/// quota, and when it was last swept.
struct Keyed<K: Clone + Eq + std::hash::Hash> {
    limiter: std::sync::RwLock<DefaultKeyedRateLimiter<K>>,
    quota: Quota,
    swept: std::sync::Mutex<std::time::Instant>,
}

/// The limiters of one [`crate::Livechat`], shared by its routes.
pub(crate) struct Limiters {
    starts: Option<Keyed<(TenantId, ClientKey)>>,
    /// One address's starts in every tenant ([`ANY_TENANT_FACTOR`]).
    starts_any_tenant: Option<Keyed<ClientKey>>,
    messages: Option<Keyed<(TenantId, CustomerId)>>,
    /// One address's messages as any customer ([`ANY_CUSTOMER_FACTOR`]).
    messages_any_customer: Option<Keyed<ClientKey>>,
    client_ip_header: Option<HeaderName>,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiters").finish_non_exhaustive()
    }
}

/// `rate` cells per `per`'s period with bursts of twice that, the rule of
/// every limit of the library (these and the WebSocket's).
pub(crate) fn burst_quota(rate: NonZeroU32, per: fn(NonZeroU32) -> Quota) -> Quota {
    per(rate).allow_burst(rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN)))
}

/// A keyed limiter of `rate` per `per`'s period ([`burst_quota`]); `None`
/// for 0.
fn keyed<K: Clone + Eq + std::hash::Hash>(
    rate: u32,
    per: fn(NonZeroU32) -> Quota,
) -> Option<Keyed<K>> {
    let quota = burst_quota(NonZeroU32::new(rate)?, per);
    Some(Keyed {
        limiter: std::sync::RwLock::new(RateLimiter::keyed(quota)),
        quota,
        swept: std::sync::Mutex::new(std::time::Instant::now()),
    })
}

/// A request over a limit: what was refused and how long until the limit
/// lets one through again. Over HTTP a 429 `rate_limited` with
/// `Retry-After` (`From<Refused> for ApiError`); over a WebSocket an
/// `error` frame with `retry_after_ms`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refused {
    /// The error's message.
    pub(crate) what: &'static str,
    /// Until the next request under the same key is allowed.
    pub(crate) wait: Duration,
}

impl Refused {
    /// Refused, saying `what`, until `not_until`.
    fn until(
        what: &'static str,
        not_until: &governor::NotUntil<governor::clock::QuantaInstant>,
    ) -> Self {
        Self {
            what,
            wait: not_until.wait_time_from(DefaultClock::default().now()),
        }
    }
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        ApiError::rate_limited(refused.what, refused.wait)
    }
}

/// Counts one request on `limiter` (a connection's own limit):
/// [`Refused`], saying `what`, when over it.
pub(crate) fn direct(
    limiter: &governor::DefaultDirectRateLimiter,
    what: &'static str,
) -> Result<(), Refused> {
    limiter
        .check()
        .map_err(|not_until| Refused::until(what, &not_until))
}

/// Counts one request under `key`: [`Refused`] when over the limit.
fn check<K: Clone + Eq + std::hash::Hash>(
    keyed: Option<&Keyed<K>>,
    key: &K,
    what: &'static str,
) -> Result<(), Refused> {
    let Some(keyed) = keyed else {
        return Ok(());
    };
    let (outcome, keys) = {
        let limiter = keyed
            .limiter
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (limiter.check_key(key), limiter.len())
    };
    if keys > KEYS_KEPT
        && let Ok(mut swept) = keyed.swept.try_lock()
        && swept.elapsed() >= SWEEP_EVERY
    {
        *swept = std::time::Instant::now();
        let mut limiter = keyed
            .limiter
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        limiter.retain_recent();
        if limiter.len() > KEYS_MAX {
            *limiter = RateLimiter::keyed(keyed.quota);
        }
        limiter.shrink_to_fit();
    }
    outcome.map_err(|not_until| Refused::until(what, &not_until))
}

impl Limiters {
    pub(crate) fn new(limits: &RateLimits) -> Self {
        Self {
            starts: keyed(limits.chat_starts_per_minute, Quota::per_minute),
            starts_any_tenant: keyed(
                limits
                    .chat_starts_per_minute
                    .saturating_mul(ANY_TENANT_FACTOR),
                Quota::per_minute,
            ),
            messages: keyed(limits.customer_messages_per_sec, Quota::per_second),
            messages_any_customer: keyed(
                limits
                    .customer_messages_per_sec
                    .saturating_mul(ANY_CUSTOMER_FACTOR),
                Quota::per_second,
            ),
            client_ip_header: limits.client_ip_header.clone(),
        }
    }

    /// The client's address: from [`RateLimits::client_ip_header`] when
    /// set and present (its last address, with or without a port), else
    /// the peer's.
    pub(crate) fn client_ip(&self, req: &Request) -> Option<IpAddr> {
        let named = self.client_ip_header.as_ref().and_then(|name| {
            let value = req.headers().get_all(name).iter().next_back()?;
            let last = value.to_str().ok()?.rsplit(',').next()?.trim();
            last.parse::<IpAddr>()
                .or_else(|_| last.parse::<std::net::SocketAddr>().map(|a| a.ip()))
                .ok()
        });
        named.or_else(|| req.remote_addr().as_socket_addr().map(|a| a.ip()))
    }

    /// Counts a chat start from `ip` (the client's address,
    /// [`Self::client_ip`]; none: not limited) in `tenant`.
    pub(crate) fn chat_start(&self, tenant: TenantId, ip: Option<IpAddr>) -> Result<(), Refused> {
        let Some(ip) = ip else {
            return Ok(());
        };
        let client = ClientKey::from(ip);
        let refused = "too many chats started from this address";
        // Across tenants first: refused there, the tenant's own allowance
        // is left whole, so the wait announced is the real one (as for
        // messages, below).
        check(self.starts_any_tenant.as_ref(), &client, refused)?;
        check(self.starts.as_ref(), &(tenant, client), refused)
    }

    /// Counts a message of `customer` in `tenant`, sent from `ip` (the
    /// client's address; none: only the customer's limit applies).
    pub(crate) fn customer_message(
        &self,
        tenant: TenantId,
        customer: CustomerId,
        ip: Option<IpAddr>,
    ) -> Result<(), Refused> {
        let refused = "too many messages; slow down";
        // The address first: refused there, the customer's own allowance
        // is left whole (a customer behind a busy shared address).
        if let Some(ip) = ip {
            check(
                self.messages_any_customer.as_ref(),
                &ClientKey::from(ip),
                refused,
            )?;
        }
        check(self.messages.as_ref(), &(tenant, customer), refused)
    }
}

/// Whole seconds to announce in `Retry-After` for `wait` (at least 1).
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(6)), 6);
        assert_eq!(retry_after_secs(Duration::from_millis(6_001)), 7);
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::from(a), ClientKey::from(b));
        assert_ne!(ClientKey::from(a), ClientKey::from(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(ClientKey::from(mapped), ClientKey::from(v4));
    }

    #[test]
    fn the_client_address_is_the_headers_last_with_or_without_a_port() {
        let limits = Limiters::new(&RateLimits {
            client_ip_header: Some(HeaderName::from_static("x-forwarded-for")),
            ..RateLimits::default()
        });
        let of = |value: &str| {
            let req = Request::builder().header("X-Forwarded-For", value).finish();
            limits.client_ip(&req).map(|ip| ip.to_string())
        };
        assert_eq!(of("10.0.0.1, 203.0.113.5").as_deref(), Some("203.0.113.5"));
        assert_eq!(
            of("10.0.0.1, 203.0.113.5:41234").as_deref(),
            Some("203.0.113.5")
        );
        assert_eq!(of("[2001:db8::1]:443").as_deref(), Some("2001:db8::1"));
        assert_eq!(of("2001:db8::1").as_deref(), Some("2001:db8::1"));
        // No address in it: the peer's (none for a request built here).
        assert_eq!(of("unknown"), None);
    }

    #[test]
    fn a_limit_refuses_past_its_burst_per_key_and_zero_is_none() {
        let limits = Limiters::new(&RateLimits {
            chat_starts_per_minute: 2,
            ..RateLimits::default()
        });
        let tenant = TenantId::new(1).unwrap();
        let other = TenantId::new(2).unwrap();
        let key = ClientKey::from("192.0.2.1".parse::<IpAddr>().unwrap());
        for _ in 0..4 {
            check(limits.starts.as_ref(), &(tenant, key), "x").unwrap();
        }
        let refused = check(limits.starts.as_ref(), &(tenant, key), "x").unwrap_err();
        // A burst of four at two a minute: the next one in about 30 s.
        assert!(
            refused.wait > Duration::from_secs(25) && refused.wait <= Duration::from_secs(30),
            "{refused:?}"
        );
        let answer = ApiError::from(refused);
        assert_eq!(answer.detail().code, "rate_limited");
        assert_eq!(answer.detail().message, "x");
        check(limits.starts.as_ref(), &(other, key), "x").expect("another tenant");
        let none = Limiters::new(&RateLimits::unlimited());
        assert!(none.starts_any_tenant.is_none());
        for _ in 0..100 {
            check(none.starts.as_ref(), &(tenant, key), "x").unwrap();
        }
    }

    /// A start refused by the limit across tenants leaves the tenant's own
    /// allowance whole: the client that waits the announced time is let
    /// through, not refused again by a tenant limit its refused attempts
    /// spent.
    #[test]
    fn a_start_refused_across_tenants_spends_nothing_of_the_tenants_limit() {
        // One a minute per tenant (burst 2), five across tenants (burst 10).
        let limits = Limiters::new(&RateLimits {
            chat_starts_per_minute: 1,
            ..RateLimits::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for n in 1..=10 {
            limits
                .chat_start(TenantId::new(n).unwrap(), Some(ip))
                .unwrap();
        }
        let first = TenantId::new(1).unwrap();
        for _ in 0..5 {
            limits.chat_start(first, Some(ip)).unwrap_err();
        }
        let key = ClientKey::from(ip);
        check(limits.starts.as_ref(), &(first, key), "x").expect("tenant 1's second start left");
    }

    /// A connection's own limit refuses past its burst and says how long
    /// until the next cell: at two a second, at most 500 ms.
    #[test]
    fn a_direct_limit_says_when_the_next_frame_passes() {
        let limiter = governor::RateLimiter::direct(burst_quota(
            NonZeroU32::new(2).unwrap(),
            Quota::per_second,
        ));
        let passed = (0..10)
            .take_while(|_| direct(&limiter, "slow down").is_ok())
            .count();
        assert_eq!(passed, 4, "a burst of twice the rate");
        let refused = direct(&limiter, "slow down").unwrap_err();
        assert_eq!(refused.what, "slow down");
        assert!(
            refused.wait > Duration::from_millis(250) && refused.wait <= Duration::from_millis(500),
            "{refused:?}"
        );
    }

    #[test]
    fn one_address_sending_as_customer_after_customer_meets_a_limit_of_all_customers() {
        let limits = Limiters::new(&RateLimits {
            customer_messages_per_sec: 1,
            ..RateLimits::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let tenant = TenantId::new(1).unwrap();
        // Bursts of two a customer, of ten from one address in all.
        for _ in 0..5 {
            let customer = CustomerId::generate();
            for _ in 0..2 {
                limits.customer_message(tenant, customer, Some(ip)).unwrap();
            }
        }
        let fresh = CustomerId::generate();
        let refused = limits
            .customer_message(tenant, fresh, Some(ip))
            .unwrap_err();
        assert_eq!(ApiError::from(refused).detail().code, "rate_limited");
        limits
            .customer_message(tenant, CustomerId::generate(), Some(other))
            .expect("another address");
        limits
            .customer_message(tenant, CustomerId::generate(), None)
            .expect("no address: the customer's limit alone");
    }

    #[test]
    fn one_address_naming_tenant_after_tenant_meets_a_limit_of_all_tenants() {
        let limits = Limiters::new(&RateLimits {
            chat_starts_per_minute: 1,
            ..RateLimits::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let tenant = |n| TenantId::new(n).unwrap();
        // Bursts of two a tenant, of ten in all tenants together.
        for n in 1..=5 {
            for _ in 0..2 {
                limits.chat_start(tenant(n), Some(ip)).unwrap();
            }
        }
        let refused = limits.chat_start(tenant(6), Some(ip)).unwrap_err();
        assert_eq!(ApiError::from(refused).detail().code, "rate_limited");
        limits
            .chat_start(tenant(6), Some(other))
            .expect("another address");
    }
}
