//! The cluster DNS server, by the Kubernetes DNS-based service discovery
//! specification (the records CoreDNS's `kubernetes` plugin serves).
//!
//! [`Zone::build`] turns Services and pods into records; [`serve`] answers UDP
//! and TCP queries from the current zone, authoritatively:
//!
//! - `<svc>.<ns>.svc.<domain>` A: the ClusterIP, or for a headless Service one
//!   record per published endpoint (ready ones, all with
//!   `publishNotReadyAddresses`);
//! - `<hostname>.<svc>.<ns>.svc.<domain>` A: for endpoints whose pod has
//!   `hostname` and `subdomain == <svc>` (a StatefulSet pod whose
//!   `serviceName` names this headless Service); other headless endpoints get
//!   a `<a-b-c-d>.<svc>...` name, as CoreDNS does;
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>` SRV per named port: for a
//!   headless Service one per endpoint (target its hostname name), with the
//!   targets' A records in the Additional section; for a ClusterIP Service one
//!   record whose target is the Service name;
//! - `<a-b-c-d>.<ns>.pod.<domain>` A and PTR for pod and Service addresses;
//! - NXDOMAIN (with the SOA, for negative caching) for any other name. The
//!   simulator has no upstream resolver, so names outside the cluster domain
//!   are NXDOMAIN too (not authoritative).
//!
//! With a cache TTL it answers through [`Cache`], as CoreDNS with `cache 30`
//! does: membership changes then reach clients up to that much later.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::dns_cache::Cache;
use super::endpoints::{PodRec, ServiceRec};

/// All records of the cluster zone at one instant.
#[derive(Debug, Default)]
pub struct Zone {
    /// The cluster domain, lower case with a trailing dot (`cluster.local.`).
    domain: String,
    /// TTL of every answer (kubeadm's CoreDNS uses 30 s).
    ttl: u32,
    /// A records by owner name.
    a: HashMap<String, Vec<Ipv4Addr>>,
    /// SRV records by owner name: (priority, weight, port, target).
    srv: HashMap<String, Vec<(u16, u16, u16, String)>>,
    /// PTR records by `d.c.b.a.in-addr.arpa.` name.
    ptr: HashMap<String, Vec<String>>,
    /// Every name that exists (owners and their ancestors inside the zone),
    /// to tell NODATA from NXDOMAIN.
    names: HashSet<String>,
    /// The `dns-servfail` nemesis: every query is answered SERVFAIL, the
    /// cache included (as a CoreDNS that cannot serve at all; errors are
    /// never cached).
    pub(super) servfail: bool,
}

fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

fn reverse_name(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
}

impl Zone {
    /// Builds the zone from Services and pods.
    pub fn build(domain: &str, ttl: u32, services: &[ServiceRec], pods: &[PodRec]) -> Zone {
        let mut z = Zone {
            domain: format!("{}.", domain.trim_end_matches('.').to_ascii_lowercase()),
            ttl,
            ..Zone::default()
        };
        let d = z.domain.clone();
        for svc in services {
            let base = format!("{}.{}.svc.{d}", svc.name, svc.namespace).to_ascii_lowercase();
            z.add_name(&base);
            let eps: Vec<_> = svc
                .endpoints(pods)
                .into_iter()
                .filter(|e| svc.publishes(e))
                .collect();
            match svc.cluster_ip {
                Some(ip) => {
                    z.a.entry(base.clone()).or_default().push(ip);
                    z.ptr
                        .entry(reverse_name(ip))
                        .or_default()
                        .push(base.clone());
                    for p in &svc.ports {
                        if let Some(name) = &p.name {
                            let owner =
                                format!("_{name}._{}.{base}", p.protocol).to_ascii_lowercase();
                            z.add_name(&owner);
                            z.srv
                                .entry(owner)
                                .or_default()
                                .push((0, 100, p.port, base.clone()));
                        }
                    }
                }
                None => {
                    let weight = if eps.is_empty() {
                        0
                    } else {
                        (100 / eps.len()).max(1) as u16
                    };
                    for ep in &eps {
                        let host = ep.hostname.clone().unwrap_or_else(|| dashed(ep.ip));
                        let target = format!("{host}.{base}").to_ascii_lowercase();
                        z.add_name(&target);
                        z.a.entry(base.clone()).or_default().push(ep.ip);
                        z.a.entry(target.clone()).or_default().push(ep.ip);
                        if ep.hostname.is_some() {
                            z.ptr
                                .entry(reverse_name(ep.ip))
                                .or_default()
                                .push(target.clone());
                        }
                        for (p, port) in svc.ports.iter().zip(&ep.target_ports) {
                            let (Some(name), Some(port)) = (&p.name, port) else {
                                continue;
                            };
                            let owner =
                                format!("_{name}._{}.{base}", p.protocol).to_ascii_lowercase();
                            z.add_name(&owner);
                            z.srv.entry(owner).or_default().push((
                                0,
                                weight,
                                *port,
                                target.clone(),
                            ));
                        }
                    }
                }
            }
        }
        for pod in pods {
            if let Some(ip) = pod.ip {
                let name = format!("{}.{}.pod.{d}", dashed(ip), pod.namespace).to_ascii_lowercase();
                z.add_name(&name);
                z.a.entry(name).or_default().push(ip);
            }
        }
        for v in z.a.values_mut() {
            v.sort();
            v.dedup();
        }
        z
    }

    fn add_name(&mut self, name: &str) {
        let mut rest = name;
        loop {
            self.names.insert(rest.to_string());
            if rest == self.domain {
                break;
            }
            match rest.split_once('.') {
                Some((_, tail)) if !tail.is_empty() => rest = tail,
                _ => break,
            }
        }
    }

    /// The A records of a name (for tests and `get`).
    pub fn lookup_a(&self, name: &str) -> Vec<Ipv4Addr> {
        self.a
            .get(&name.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    }

    fn soa(&self) -> Record {
        let domain = Name::from_str(&self.domain).expect("cluster domain is a valid name");
        let ns = Name::from_str(&format!("ns.dns.{}", self.domain)).expect("valid name");
        let mbox = Name::from_str(&format!("hostmaster.{}", self.domain)).expect("valid name");
        let soa = SOA::new(ns, mbox, 1, 7200, 1800, 86400, self.ttl);
        Record::from_rdata(domain, self.ttl, RData::SOA(soa))
    }

    fn a_records(&self, owner: &str, name: &Name) -> Vec<Record> {
        self.a
            .get(owner)
            .into_iter()
            .flatten()
            .map(|ip| Record::from_rdata(name.clone(), self.ttl, RData::A(A(*ip))))
            .collect()
    }

    /// Answers one query message.
    pub fn answer(&self, request: &Message) -> Message {
        let mut resp = Message::response(request.metadata.id, request.metadata.op_code);
        if self.servfail {
            resp.metadata.recursion_desired = request.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.queries.clone_from(&request.queries);
            resp.metadata.response_code = ResponseCode::ServFail;
            return resp;
        }
        resp.metadata.recursion_desired = request.metadata.recursion_desired;
        // CoreDNS answers as a recursive resolver would (RA set); clients such
        // as nslookup warn otherwise.
        resp.metadata.recursion_available = true;
        if request.metadata.op_code != OpCode::Query
            || request.metadata.message_type != MessageType::Query
        {
            resp.metadata.response_code = ResponseCode::NotImp;
            return resp;
        }
        let Some(query) = request.queries.first() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp;
        };
        resp.add_query(query.clone());
        let qname = query.name().clone();
        let owner = qname.to_ascii().to_ascii_lowercase();
        let owner = if owner.ends_with('.') {
            owner
        } else {
            format!("{owner}.")
        };
        let qtype = query.query_type();
        if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
            resp.metadata.response_code = ResponseCode::Refused;
            return resp;
        }
        let in_zone = owner == self.domain || owner.ends_with(&format!(".{}", self.domain));
        if owner.ends_with(".in-addr.arpa.") {
            resp.metadata.authoritative = true;
            match self.ptr.get(&owner) {
                Some(targets) => {
                    if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                        for t in targets {
                            if let Ok(n) = Name::from_str(t) {
                                resp.add_answer(Record::from_rdata(
                                    qname.clone(),
                                    self.ttl,
                                    RData::PTR(PTR(n)),
                                ));
                            }
                        }
                    }
                }
                None => resp.metadata.response_code = ResponseCode::NXDomain,
            }
            return resp;
        }
        if !in_zone {
            resp.metadata.response_code = ResponseCode::NXDomain;
            return resp;
        }
        resp.metadata.authoritative = true;
        if !self.names.contains(&owner) {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(self.soa());
            return resp;
        }
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            resp.add_answers(self.a_records(&owner, &qname));
        }
        if matches!(qtype, RecordType::SRV | RecordType::ANY) {
            for (prio, weight, port, target) in self.srv.get(&owner).into_iter().flatten() {
                let Ok(tname) = Name::from_str(target) else {
                    continue;
                };
                resp.add_answer(Record::from_rdata(
                    qname.clone(),
                    self.ttl,
                    RData::SRV(SRV::new(*prio, *weight, *port, tname.clone())),
                ));
                resp.add_additionals(self.a_records(target, &tname));
            }
        }
        if matches!(qtype, RecordType::SOA) && owner == self.domain {
            resp.add_answer(self.soa());
        }
        if resp.answers.is_empty() {
            resp.add_authority(self.soa());
        }
        resp
    }
}

/// The zone the server answers from; the controller swaps in a new one
/// whenever a Service or a pod's address or readiness changes.
pub type SharedZone = Arc<RwLock<Arc<Zone>>>;

fn respond(zone: &SharedZone, cache: Option<&Cache>, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    let zone = zone.read().ok()?.clone();
    let response = match cache {
        Some(_) if zone.servfail => zone.answer(&request),
        Some(cache) => cache.answer(&request, Instant::now(), || zone.answer(&request)),
        None => zone.answer(&request),
    };
    let limit = request
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload().max(512)));
    let bytes = response.to_vec().ok()?;
    if udp && bytes.len() > limit {
        // Too big for this UDP answer: truncated, so the client retries over TCP.
        return response.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// A DNS server bound to its UDP and TCP sockets: queries sent once
/// [`bind`](DnsServer::bind) returned are answered as soon as it runs.
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    zone: SharedZone,
    /// CoreDNS's `cache`, when the cluster models it.
    cache: Option<Arc<Cache>>,
}

impl DnsServer {
    /// Binds `addr` (UDP and TCP; port 0 picks one free for both).
    /// `cache`: keep answers up to this long, as CoreDNS's `cache` plugin.
    pub async fn bind(
        addr: SocketAddr,
        zone: SharedZone,
        cache: Option<Duration>,
    ) -> Result<DnsServer> {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding DNS UDP socket {addr}"))?;
        let addr = udp.local_addr()?;
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding DNS TCP socket {addr}"))?;
        Ok(DnsServer {
            udp,
            tcp,
            zone,
            cache: cache.map(|ttl| Arc::new(Cache::new(ttl))),
        })
    }

    /// Where it answers.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.udp.local_addr()?)
    }

    /// Answers until the task is dropped.
    pub async fn run(self) -> Result<()> {
        let DnsServer {
            udp,
            tcp,
            zone,
            cache,
        } = self;
        let tcp_zone = zone.clone();
        let tcp_cache = cache.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let zone = tcp_zone.clone();
                let cache = tcp_cache.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok(len) = stream.read_u16().await else {
                            return;
                        };
                        let mut buf = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        let Some(out) = respond(&zone, cache.as_deref(), &buf, false) else {
                            return;
                        };
                        let Ok(out_len) = u16::try_from(out.len()) else {
                            return;
                        };
                        if stream.write_u16(out_len).await.is_err()
                            || stream.write_all(&out).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await?;
            if let Some(out) = respond(&zone, cache.as_deref(), &buf[..n], true) {
                let _ = udp.send_to(&out, peer).await;
            }
        }
    }
}

/// Serves DNS on `addr` (UDP and TCP) until the task is dropped.
pub async fn serve(addr: SocketAddr, zone: SharedZone, cache: Option<Duration>) -> Result<()> {
    DnsServer::bind(addr, zone, cache).await?.run().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::endpoints::ServicePort;
    use hickory_proto::op::Query;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use std::collections::BTreeMap;

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), "tally".to_string())])
    }

    fn pod(ordinal: u8, ready: bool, subdomain: &str) -> PodRec {
        PodRec {
            name: format!("tally-{ordinal}"),
            namespace: "default".into(),
            labels: labels(),
            ip: Some(Ipv4Addr::new(10, 244, 1, 10 + ordinal)),
            ready,
            terminating: false,
            hostname: Some(format!("tally-{ordinal}")),
            subdomain: Some(subdomain.into()),
            container_ports: vec![(Some("http".into()), 8080)],
        }
    }

    fn services() -> Vec<ServiceRec> {
        let port = ServicePort {
            name: Some("http".into()),
            protocol: "tcp".into(),
            port: 8080,
            target: IntOrString::String("http".into()),
        };
        vec![
            ServiceRec {
                name: "tally-headless".into(),
                namespace: "default".into(),
                cluster_ip: None,
                ports: vec![port.clone()],
                selector: Some(labels()),
                publish_not_ready: true,
                type_: "ClusterIP".into(),
            },
            ServiceRec {
                name: "tally".into(),
                namespace: "default".into(),
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 11)),
                ports: vec![ServicePort { port: 80, ..port }],
                selector: Some(labels()),
                publish_not_ready: false,
                type_: "ClusterIP".into(),
            },
        ]
    }

    fn ask(zone: &Zone, name: &str, t: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_str(name).unwrap(), t));
        zone.answer(&q)
    }

    #[test]
    fn table_of_kubernetes_names() {
        let pods = vec![
            pod(0, true, "tally-headless"),
            pod(1, false, "tally-headless"),
        ];
        let z = Zone::build("cluster.local", 30, &services(), &pods);
        let cases: &[(&str, RecordType, ResponseCode, usize)] = &[
            (
                "tally-headless.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                2,
            ),
            (
                "tally-1.tally-headless.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                1,
            ),
            (
                "tally.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                1,
            ),
            (
                "_http._tcp.tally-headless.default.svc.cluster.local.",
                RecordType::SRV,
                ResponseCode::NoError,
                2,
            ),
            (
                "_http._tcp.tally.default.svc.cluster.local.",
                RecordType::SRV,
                ResponseCode::NoError,
                1,
            ),
            (
                "tally-2.tally-headless.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
                0,
            ),
            (
                "tally-1.tally-headless.default.svc.cluster.local.",
                RecordType::AAAA,
                ResponseCode::NoError,
                0,
            ),
            (
                "nothing.default.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
                0,
            ),
            (
                "tally-1.tally-headless.",
                RecordType::A,
                ResponseCode::NXDomain,
                0,
            ),
        ];
        for (name, t, code, n) in cases {
            let r = ask(&z, name, *t);
            assert_eq!(r.metadata.response_code, *code, "{name} {t}");
            assert_eq!(r.answers.len(), *n, "{name} {t}: {:?}", r.answers);
        }
        let srv = ask(
            &z,
            "_http._tcp.tally-headless.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(
            srv.additionals.len(),
            2,
            "SRV targets' A records go in Additional"
        );
    }

    /// The `dns-servfail` nemesis: every answer is SERVFAIL, cached ones
    /// too, and the answers come back (uncached errors) at heal.
    #[test]
    fn a_failing_server_answers_servfail_past_its_cache() {
        let name = "_http._tcp.tally-headless.default.svc.cluster.local.";
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::SRV));
        let packet = q.to_vec().unwrap();
        let build = |servfail| {
            let mut z = Zone::build(
                "cluster.local",
                30,
                &services(),
                &[pod(0, true, "tally-headless")],
            );
            z.servfail = servfail;
            z
        };
        let zone: SharedZone = Arc::new(RwLock::new(Arc::new(build(false))));
        let cache = Cache::new(Duration::from_secs(30));
        let code = |zone: &SharedZone| {
            let bytes = respond(zone, Some(&cache), &packet, true).unwrap();
            let m = Message::from_vec(&bytes).unwrap();
            (m.metadata.response_code, m.answers.len())
        };
        assert_eq!(code(&zone), (ResponseCode::NoError, 1));
        *zone.write().unwrap() = Arc::new(build(true));
        assert_eq!(code(&zone), (ResponseCode::ServFail, 0));
        *zone.write().unwrap() = Arc::new(build(false));
        assert_eq!(code(&zone), (ResponseCode::NoError, 1));
    }

    #[test]
    fn client_service_has_only_ready_pods_and_wrong_subdomain_has_no_hostnames() {
        let pods = vec![pod(0, true, "other"), pod(1, false, "other")];
        let z = Zone::build("cluster.local", 5, &services(), &pods);
        assert_eq!(
            z.lookup_a("tally-0.tally-headless.default.svc.cluster.local.")
                .len(),
            0
        );
        assert_eq!(
            z.lookup_a("10-244-1-10.tally-headless.default.svc.cluster.local.")
                .len(),
            1
        );
        let eps = services()[1].endpoints(&pods);
        assert_eq!(eps.iter().filter(|e| e.ready).count(), 1);
    }
}
