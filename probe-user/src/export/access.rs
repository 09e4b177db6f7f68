//! Who may read what on the daemon's port: the check in front of `/metrics` and `/explain`
//! (`/healthz` and `/readyz` reveal nothing and stay open). Two kinds of credentials, either
//! of which lets a request through when configured:
//!
//! - **Basic auth** (`basic_auth_users` of the web config file): bcrypt, as Prometheus'
//!   exporter-toolkit checks it. A bcrypt check costs tens of milliseconds of CPU by design,
//!   so checks run on the blocking pool one at a time (a request waits [`CHECK_WAIT`] at most
//!   for its turn, then 503), and an unknown user costs the same as a wrong password.
//! - **Kubernetes bearer tokens** (`--kube-rbac`), as kube-rbac-proxy checks them: a
//!   TokenReview authenticates the token, then a SubjectAccessReview asks whether its user may
//!   `get` the path (a non-resource URL: RBAC's `nonResourceURLs: ["/metrics"]`). A failed or
//!   slow call to the API ([`REVIEW_TIMEOUT`]) lets nothing through (503) and is not kept.
//!
//! Verdicts are kept by a keyed SHA-256 of the credentials and path (never the secret itself,
//! the key random per start): allowed for [`ALLOWED_TTL`], refused for [`DENIED_TTL`], at most
//! [`MAX_VERDICTS`] of each kind, so a scrape every few seconds checks nothing and repeating a
//! wrong one costs nothing. A check not in the cache takes a token of its peer address'
//! bucket first ([`PEER_BURST`], one more every [`PEER_REFILL`]; 429 without one), so a pod
//! sending a new wrong password or token with every request spends neither a core nor the
//! API's time, only its own tokens; at most [`MAX_REVIEWS`] reviews are in flight. All of
//! this runs inside a connection's slot and deadlines (`serve`).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Semaphore;

use crate::export::bucket::Bucket;

/// How long an allowed credential is taken without asking again (kube-rbac-proxy's and the
/// API server's webhook cache: 2 minutes).
pub const ALLOWED_TTL: Duration = Duration::from_secs(120);
/// How long a refused credential is refused without asking again.
pub const DENIED_TTL: Duration = Duration::from_secs(30);
/// Verdicts kept of each kind (basic, tokens): past it the one expiring first goes.
pub const MAX_VERDICTS: usize = 4096;
/// Checks not in the cache a peer may start at once...
pub const PEER_BURST: f64 = 5.0;
/// ... and then one more this often.
pub const PEER_REFILL: Duration = Duration::from_secs(2);
/// Peers whose buckets are followed; past it the full ones are forgotten.
const MAX_PEERS: usize = 4096;
/// Token reviews in flight at once.
pub const MAX_REVIEWS: usize = 4;
/// How long one TokenReview and SubjectAccessReview may take together.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for its turn to check a password or a token.
pub const CHECK_WAIT: Duration = Duration::from_secs(5);

/// The endpoints behind the check: what the SubjectAccessReview asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarded {
    Metrics,
    Explain,
}

impl Guarded {
    /// The non-resource URL RBAC grants `get` on.
    pub fn path(self) -> &'static str {
        match self {
            Guarded::Metrics => "/metrics",
            Guarded::Explain => "/explain",
        }
    }
}

/// What the check says of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No credentials, or none that are right: 401.
    Unauthenticated,
    /// A known user without the right to this path: 403.
    Forbidden,
    /// Its peer checked too many new credentials lately: 429.
    Throttled,
    /// The check could not be made now (the API failed, or too many checks wait): 503.
    Unavailable,
}

/// The credentials a request carries in its `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    Basic { user: String, password: String },
    Bearer(String),
}

impl Credentials {
    fn parse(header: &[u8]) -> Option<Credentials> {
        let header = std::str::from_utf8(header).ok()?;
        let (scheme, rest) = header.trim().split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
            Some(Credentials::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            })
        } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            Some(Credentials::Bearer(rest.to_owned()))
        } else {
            None
        }
    }
}

/// The check of the port: what is configured, the verdicts kept, the peers' buckets.
pub struct Access {
    basic: Option<Basic>,
    kube: Option<Reviewer>,
    peers: Mutex<HashMap<IpAddr, Bucket>>,
    /// Keys the cache's hashes, so that they say nothing of the credentials outside this run.
    key: ring::hmac::Key,
}

impl Access {
    /// The port's check: `users` from the web config file (user: bcrypt hash), `kube` with
    /// `--kube-rbac`. With neither, every request is let through.
    pub fn new(users: BTreeMap<String, String>, kube: Option<Client>) -> anyhow::Result<Access> {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("no randomness for the credentials' cache key"))?;
        Ok(Access {
            basic: (!users.is_empty()).then(|| Basic {
                users,
                verdicts: Mutex::default(),
                turn: Arc::new(Semaphore::new(1)),
            }),
            kube: kube.map(|client| Reviewer {
                client,
                verdicts: Mutex::default(),
                in_flight: Semaphore::new(MAX_REVIEWS),
                failing: AtomicBool::new(false),
            }),
            peers: Mutex::default(),
            key,
        })
    }

    /// Nothing asked for: every request goes through.
    pub fn open() -> anyhow::Result<Access> {
        Self::new(BTreeMap::new(), None)
    }

    /// Whether requests need credentials.
    pub fn required(&self) -> bool {
        self.basic.is_some() || self.kube.is_some()
    }

    /// What a reader needs, for the start's log line and a 401's.
    pub fn describe(&self) -> String {
        let mut kinds = Vec::new();
        if let Some(b) = &self.basic {
            kinds.push(format!("basic auth (one of {} users)", b.users.len()));
        }
        if self.kube.is_some() {
            kinds.push("a Kubernetes bearer token whose user may get the path".to_owned());
        }
        kinds.join(" or ")
    }

    /// The `WWW-Authenticate` challenges of a 401: one per kind of credential taken.
    pub fn challenges(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.basic.is_some() {
            c.push("Basic realm=\"faultline\", charset=\"UTF-8\"");
        }
        if self.kube.is_some() {
            c.push("Bearer realm=\"faultline\"");
        }
        c
    }

    /// The verdict on a request for `what` from `peer` with this `Authorization` header.
    pub async fn check(
        &self,
        peer: IpAddr,
        what: Guarded,
        authorization: Option<&[u8]>,
    ) -> Verdict {
        if !self.required() {
            return Verdict::Allowed;
        }
        match authorization.and_then(Credentials::parse) {
            Some(Credentials::Basic { user, password }) => match &self.basic {
                Some(basic) => {
                    let key = self.hash(&["basic", &user, &password]);
                    basic
                        .check(key, user, password, || self.peer_may_check(peer))
                        .await
                }
                None => Verdict::Unauthenticated,
            },
            Some(Credentials::Bearer(token)) => match &self.kube {
                Some(kube) => {
                    let key = self.hash(&["bearer", what.path(), &token]);
                    kube.check(key, what, token, || self.peer_may_check(peer))
                        .await
                }
                None => Verdict::Unauthenticated,
            },
            None => Verdict::Unauthenticated,
        }
    }

    fn hash(&self, parts: &[&str]) -> Digest {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(&(p.len() as u64).to_le_bytes());
            ctx.update(p.as_bytes());
        }
        let tag = ctx.sign();
        let mut out = [0; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Takes a token of `peer`'s bucket: whether it may start a check that is not cached.
    fn peer_may_check(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        let per_second = 1.0 / PEER_REFILL.as_secs_f64();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, b| {
                b.refill(PEER_BURST, per_second, now);
                b.tokens < PEER_BURST
            });
        }
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            // Every one of them busy: none of them is favoured over the newcomer.
            peers.clear();
        }
        peers
            .entry(peer)
            .or_insert_with(|| Bucket::full(PEER_BURST, now))
            .take(PEER_BURST, per_second, now)
    }
}

type Digest = [u8; 32];

/// Verdicts by credential hash, each until it expires; bounded.
#[derive(Default)]
struct Verdicts {
    map: HashMap<Digest, (Verdict, Instant)>,
}

impl Verdicts {
    fn get(&self, key: &Digest, now: Instant) -> Option<Verdict> {
        self.map
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(v, _)| *v)
    }

    /// Keeps `verdict` (allowed or refused: nothing else is worth keeping).
    fn put(&mut self, key: Digest, verdict: Verdict, now: Instant) {
        let ttl = match verdict {
            Verdict::Allowed => ALLOWED_TTL,
            Verdict::Unauthenticated | Verdict::Forbidden => DENIED_TTL,
            Verdict::Throttled | Verdict::Unavailable => return,
        };
        if self.map.len() >= MAX_VERDICTS && !self.map.contains_key(&key) {
            self.map.retain(|_, (_, expires)| *expires > now);
            if self.map.len() >= MAX_VERDICTS
                && let Some(first) = self
                    .map
                    .iter()
                    .min_by_key(|(_, (_, e))| *e)
                    .map(|(k, _)| *k)
            {
                self.map.remove(&first);
            }
        }
        self.map.insert(key, (verdict, now + ttl));
    }
}

fn lock(v: &Mutex<Verdicts>) -> std::sync::MutexGuard<'_, Verdicts> {
    // Every change under the lock is one insert or removal: a poisoned lock is consistent.
    v.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `basic_auth_users`.
struct Basic {
    users: BTreeMap<String, String>,
    verdicts: Mutex<Verdicts>,
    /// One bcrypt check at a time.
    turn: Arc<Semaphore>,
}

impl Basic {
    async fn check(
        &self,
        key: Digest,
        user: String,
        password: String,
        may_check: impl FnOnce() -> bool,
    ) -> Verdict {
        if let Some(v) = lock(&self.verdicts).get(&key, Instant::now()) {
            return v;
        }
        if !may_check() {
            return Verdict::Throttled;
        }
        let Ok(Ok(turn)) =
            tokio::time::timeout(CHECK_WAIT, self.turn.clone().acquire_owned()).await
        else {
            return Verdict::Unavailable;
        };
        // Checked while this one waited.
        if let Some(v) = lock(&self.verdicts).get(&key, Instant::now()) {
            return v;
        }
        // An unknown user is checked against a known user's hash: the same cost, so the time
        // of the answer does not tell which users exist.
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => match self.users.values().next() {
                Some(h) => (h.clone(), false),
                None => return Verdict::Unauthenticated,
            },
        };
        // The turn goes with the work: a client that hangs up does not start a second check
        // beside it.
        let checked = tokio::task::spawn_blocking(move || {
            let ok = bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false);
            drop(turn);
            ok
        })
        .await;
        let verdict = match checked {
            Ok(true) if known => Verdict::Allowed,
            Ok(_) => Verdict::Unauthenticated,
            Err(_) => return Verdict::Unavailable,
        };
        lock(&self.verdicts).put(key, verdict, Instant::now());
        verdict
    }
}

/// `--kube-rbac`: TokenReview, then SubjectAccessReview.
struct Reviewer {
    client: Client,
    verdicts: Mutex<Verdicts>,
    in_flight: Semaphore,
    /// Said once when the API fails, once when it answers again.
    failing: AtomicBool,
}

impl Reviewer {
    async fn check(
        &self,
        key: Digest,
        what: Guarded,
        token: String,
        may_check: impl FnOnce() -> bool,
    ) -> Verdict {
        if let Some(v) = lock(&self.verdicts).get(&key, Instant::now()) {
            return v;
        }
        if !may_check() {
            return Verdict::Throttled;
        }
        let Ok(Ok(_turn)) = tokio::time::timeout(CHECK_WAIT, self.in_flight.acquire()).await else {
            return Verdict::Unavailable;
        };
        if let Some(v) = lock(&self.verdicts).get(&key, Instant::now()) {
            return v;
        }
        let verdict = match tokio::time::timeout(REVIEW_TIMEOUT, self.review(what, token)).await {
            Ok(Ok(v)) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("reviewing bearer tokens: the Kubernetes API answers again");
                }
                v
            }
            Ok(Err(e)) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "reviewing bearer tokens: {e}; /metrics and /explain answer 503 until the Kubernetes API answers"
                    );
                }
                return Verdict::Unavailable;
            }
            Err(_) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "reviewing bearer tokens: the Kubernetes API did not answer within {}; /metrics and /explain answer 503 until it does",
                        humantime::format_duration(REVIEW_TIMEOUT)
                    );
                }
                return Verdict::Unavailable;
            }
        };
        lock(&self.verdicts).put(key, verdict, Instant::now());
        verdict
    }

    async fn review(&self, what: Guarded, token: String) -> Result<Verdict, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token,
                audiences: None,
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(what.path().to_owned()),
                    verb: Some("get".to_owned()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answered = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await?;
        Ok(if answered.status.is_some_and(|s| s.allowed) {
            Verdict::Allowed
        } else {
            Verdict::Forbidden
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
        .into_bytes()
    }

    #[test]
    fn credentials_are_basic_or_bearer() {
        assert_eq!(
            Credentials::parse(&basic("prom", "a:b")),
            Some(Credentials::Basic {
                user: "prom".into(),
                password: "a:b".into()
            })
        );
        assert_eq!(
            Credentials::parse(b"bearer  abc.def "),
            Some(Credentials::Bearer("abc.def".into()))
        );
        for bad in [
            &b"Bearer "[..],
            b"Basic !!!",
            b"Digest x",
            b"abc",
            b"Basic \xff",
        ] {
            assert_eq!(Credentials::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn basic_auth_checks_once_and_keeps_the_verdict() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let hash = bcrypt::hash("secret", 4).unwrap();
        let access = Access::new([("prom".to_owned(), hash)].into(), None).unwrap();
        assert!(access.required());
        assert_eq!(
            access.challenges(),
            ["Basic realm=\"faultline\", charset=\"UTF-8\""]
        );
        let check = |h: Option<Vec<u8>>| {
            let access = &access;
            async move { access.check(ip, Guarded::Metrics, h.as_deref()).await }
        };
        assert_eq!(check(None).await, Verdict::Unauthenticated);
        assert_eq!(
            check(Some(b"Bearer x".to_vec())).await,
            Verdict::Unauthenticated
        );
        assert_eq!(check(Some(basic("prom", "secret"))).await, Verdict::Allowed);
        assert_eq!(
            check(Some(basic("nobody", "secret"))).await,
            Verdict::Unauthenticated
        );
        // Repeats are answered from the cache: they take no token of the peer's bucket.
        for _ in 0..20 {
            assert_eq!(check(Some(basic("prom", "secret"))).await, Verdict::Allowed);
            assert_eq!(
                check(Some(basic("prom", "wrong"))).await,
                Verdict::Unauthenticated
            );
        }
        // New wrong passwords, one after another: the peer's few, then 429s, no bcrypt.
        let mut verdicts = Vec::new();
        for i in 0..10 {
            verdicts.push(check(Some(basic("prom", &format!("guess{i}")))).await);
        }
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| **v == Verdict::Unauthenticated)
                .count(),
            2, // PEER_BURST (5) less the three checks above
            "{verdicts:?}"
        );
        assert!(verdicts[2..].iter().all(|v| *v == Verdict::Throttled));
        // Another peer is not held up by that one.
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert_eq!(
            access
                .check(other, Guarded::Explain, Some(&basic("prom", "secret")))
                .await,
            Verdict::Allowed
        );
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_only_verdicts() {
        let now = Instant::now();
        let mut v = Verdicts::default();
        for i in 0..(MAX_VERDICTS + 10) {
            let mut key = [0; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            v.put(key, Verdict::Forbidden, now);
        }
        assert_eq!(v.map.len(), MAX_VERDICTS);
        v.put([9; 32], Verdict::Unavailable, now);
        v.put([8; 32], Verdict::Throttled, now);
        assert_eq!(v.get(&[9; 32], now), None);
        assert_eq!(v.get(&[8; 32], now), None);
        let mut key = [0; 32];
        key[..8].copy_from_slice(&((MAX_VERDICTS + 9) as u64).to_le_bytes());
        assert_eq!(v.get(&key, now), Some(Verdict::Forbidden));
        assert_eq!(v.get(&key, now + DENIED_TTL), None, "expired");
    }

    #[tokio::test]
    async fn an_open_port_lets_everything_through() {
        let access = Access::open().unwrap();
        assert!(!access.required());
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(
            access.check(ip, Guarded::Explain, None).await,
            Verdict::Allowed
        );
    }
}
