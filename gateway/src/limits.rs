//! Rate limits: the token bucket behind the per-connection request and typing limits, and the
//! per-tenant limit on how fast joins may create rooms.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    /// Whether the bucket is full (it would behave exactly like a new one).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// How many buckets the tenant map holds before full ones are forgotten.
const TENANTS_KEPT: usize = 4096;

/// A budget per tenant, across every shard (room creations a minute, analytics events a
/// second). What it limits is rare next to messages, so one mutex over a map is cheap here,
/// and it is never held across a wait.
pub struct TenantBudgets {
    rate: f64,
    burst: u32,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl TenantBudgets {
    /// `per_minute` a minute, all of them at once at most.
    pub fn per_minute(per_minute: u32) -> Self {
        Self::new(f64::from(per_minute) / 60.0, per_minute)
    }

    /// `rate` a second, `burst` at once at most.
    pub fn new(rate: f64, burst: u32) -> Self {
        TenantBudgets {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one from the tenant's budget; `false` when it is spent.
    pub fn allow(&self, tenant: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= TENANTS_KEPT && !buckets.contains_key(tenant) {
            // A full bucket is the same as a missing one: forgetting it loses nothing.
            buckets.retain(|_, bucket| !bucket.is_full(now));
        }
        buckets
            .entry(tenant.to_owned())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst))
            .take(now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_bucket_refills_over_time() {
        let mut b = TokenBucket::new(10.0, 2);
        let t0 = Instant::now();
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(150)));
    }

    #[test]
    fn each_tenant_has_its_own_creation_budget() {
        let limits = TenantBudgets::per_minute(2);
        assert!(limits.allow("acme"));
        assert!(limits.allow("acme"));
        assert!(
            !limits.allow("acme"),
            "the third creation in a minute is refused"
        );
        assert!(limits.allow("globex"), "another tenant is not affected");
    }
}
