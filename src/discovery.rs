//! Finding the siblings through the headless Service's DNS records (no
//! Kubernetes API, no RBAC).
//!
//! Members are the targets of `_<port>._tcp.<headless>.<ns>.svc.<domain>.`;
//! their addresses come from the answer's Additional section (CoreDNS puts
//! them there) or, failing that, from an A/AAAA lookup of each target.
//! NXDOMAIN means "no members right now"; a timeout or SERVFAIL keeps the
//! last known list, and both are reported with the name looked up.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, Record};

use crate::identity::{Member, pod_of_target};

/// Where the resolver configuration comes from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Errors building the resolver.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "cannot read the DNS configuration {RESOLV_CONF}: {0} (set TALLY_DNS_SERVER to bypass it)"
    )]
    ResolvConf(NetError),
    #[error("cannot build the DNS resolver: {0}")]
    Build(NetError),
}

/// One sibling (or this pod) found in DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Pod name: the first label of the SRV target.
    pub pod: String,
    /// The SRV target, fully qualified.
    pub target: String,
    /// Address and port to reach it on.
    pub addr: SocketAddr,
    /// Where DNS listed it when an announce put `addr` over DNS's address:
    /// tried when `addr` fails, since an announce can be older than DNS's
    /// answer (the pod replaced since, its new announce lost).
    pub also: Option<SocketAddr>,
}

/// The result of one membership lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Members, sorted by pod name; the last known ones when `error` says
    /// the lookup failed.
    pub peers: Vec<Peer>,
    /// Why the list is empty or stale, naming the name looked up.
    pub error: Option<String>,
    /// The lookup failed (a timeout, SERVFAIL): `peers` are the last known
    /// members, if any. NXDOMAIN is an answer ("no members"), not a failure.
    pub failed: bool,
}

/// The resolver's settings, for `tally peers` to show.
#[derive(Debug, Clone)]
pub struct ResolverInfo {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub ndots: usize,
}

/// DNS-based membership of one StatefulSet.
pub struct Discovery {
    resolver: TokioResolver,
    member: Member,
    info: ResolverInfo,
    /// Last successful answer, kept through DNS outages, and the last
    /// failure, so each new failure (and the recovery) is logged once and
    /// not on every fan-out.
    last: Mutex<(Vec<Peer>, Option<String>)>,
    /// When DNS last answered (members or NXDOMAIN), for [`recent`](Self::recent).
    answered: Mutex<Option<Instant>>,
}

impl Discovery {
    /// A resolver from `/etc/resolv.conf` (search list, ndots), or from
    /// `server` when given (tests). Caching is capped at `max_ttl` so stale
    /// membership cannot outlive one refresh.
    pub fn new(
        member: Member,
        server: Option<SocketAddr>,
        max_ttl: Duration,
        timeout: Duration,
    ) -> Result<Discovery, DiscoveryError> {
        let (config, mut opts) = match server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut ns.connections {
                    connection.port = addr.port();
                }
                (
                    ResolverConfig::from_name_servers(vec![ns]),
                    ResolverOpts::default(),
                )
            }
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(DiscoveryError::ResolvConf)?,
        };
        opts.positive_max_ttl = Some(max_ttl);
        opts.negative_max_ttl = Some(max_ttl);
        opts.timeout = timeout;
        opts.attempts = 1;
        let info = ResolverInfo {
            nameservers: config
                .name_servers()
                .iter()
                .flat_map(|ns| {
                    ns.connections
                        .first()
                        .map(|c| SocketAddr::new(ns.ip, c.port))
                })
                .collect(),
            search: config.search().iter().map(|n| n.to_string()).collect(),
            ndots: opts.ndots,
        };
        let resolver = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(DiscoveryError::Build)?;
        Ok(Discovery {
            resolver,
            member,
            info,
            last: Mutex::new((Vec::new(), None)),
            answered: Mutex::new(None),
        })
    }

    pub fn info(&self) -> &ResolverInfo {
        &self.info
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    /// Looks the members up now (through the capped cache).
    pub async fn members(&self) -> Members {
        let name = self.member.srv_name();
        let result = self.lookup(&name).await;
        let mut last = self.last.lock().expect("poisoned");
        let failed = matches!(result, Err(Failure::Transient(_)));
        if !failed {
            *self.answered.lock().expect("poisoned") = Some(Instant::now());
        }
        let error = match result {
            Ok(peers) => {
                last.0 = peers;
                None
            }
            Err(Failure::NoMembers(why)) => {
                last.0.clear();
                Some(why)
            }
            Err(Failure::Transient(why)) => Some(format!(
                "{why}; keeping the {} last known members",
                last.0.len()
            )),
        };
        if error != last.1 {
            match &error {
                Some(error) => tracing::warn!(%error, "membership lookup"),
                None => {
                    tracing::info!(name = %name, members = last.0.len(), "membership lookup answers again")
                }
            }
            last.1 = error.clone();
        }
        Members {
            peers: last.0.clone(),
            error,
            failed,
        }
    }

    /// The members of DNS's last answer if it came at most `max_age` ago,
    /// without asking again: for work that may run on a slightly older
    /// list (the background gossip; news of new members travels in peer
    /// states anyway), so that hundreds of pods do not each ask the one
    /// cluster DNS server for a full SRV answer every few seconds.
    pub fn recent(&self, max_age: Duration) -> Option<Vec<Peer>> {
        let answered = (*self.answered.lock().expect("poisoned"))?;
        (answered.elapsed() <= max_age).then(|| self.last.lock().expect("poisoned").0.clone())
    }

    /// SRV lookup of `name` and its targets' addresses.
    pub async fn lookup(&self, name: &str) -> Result<Vec<Peer>, Failure> {
        let answer = self
            .resolver
            .srv_lookup(name)
            .await
            .map_err(|e| classify(name, "SRV", &e))?;
        let mut peers = Vec::new();
        for record in answer.answers() {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            let target = srv.target.to_string();
            let ip = match address_in(answer.additionals(), &srv.target.to_string()) {
                Some(ip) => ip,
                None => self
                    .resolver
                    .lookup_ip(srv.target.clone())
                    .await
                    .map_err(|e| classify(&target, "A", &e))?
                    .iter()
                    .next()
                    .ok_or_else(|| Failure::Transient(format!("{target} has no address")))?,
            };
            peers.push(Peer {
                pod: pod_of_target(&target).to_string(),
                target,
                addr: SocketAddr::new(ip, srv.port),
                also: None,
            });
        }
        peers.sort_by(|a, b| a.pod.cmp(&b.pod));
        peers.dedup_by(|a, b| a.pod == b.pod);
        Ok(peers)
    }
}

/// Why a lookup gave no fresh answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The name does not exist or has no records: there are no members.
    NoMembers(String),
    /// Timeout, SERVFAIL, refused…: the old list may still be right.
    Transient(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoMembers(s) | Failure::Transient(s) => f.write_str(s),
        }
    }
}

fn classify(name: &str, kind: &str, error: &NetError) -> Failure {
    if error.is_nx_domain() {
        Failure::NoMembers(format!(
            "{kind} lookup of {name} returned NXDOMAIN: no members right now \
             (a fresh StatefulSet, or its serviceName names no headless Service with a port named like TALLY_PEERS_PORT_NAME)"
        ))
    } else if error.is_no_records_found() {
        Failure::NoMembers(format!(
            "{kind} lookup of {name} returned no records: no members right now"
        ))
    } else {
        Failure::Transient(format!("{kind} lookup of {name} failed: {error}"))
    }
}

/// The first A/AAAA address for `name` among `records`.
fn address_in(records: &[Record], name: &str) -> Option<IpAddr> {
    records
        .iter()
        .filter(|r| r.name.to_string().eq_ignore_ascii_case(name))
        .find_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
}
