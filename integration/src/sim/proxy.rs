//! The Service proxy: a TCP listener per `clusterIP:port` that forwards each
//! connection to a ready endpoint picked at random, as kube-proxy does.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::endpoints::{PodRec, ServiceRec};

/// Service proxy routing: `clusterIP:port` -> ready endpoints.
pub(super) type ProxyTable = Arc<RwLock<HashMap<SocketAddr, Vec<SocketAddr>>>>;

/// The proxy's routing state: the table its listeners read, and which
/// `clusterIP:port` addresses already have a listener.
#[derive(Debug, Default)]
pub(super) struct ServiceProxy {
    table: ProxyTable,
    listeners: HashSet<SocketAddr>,
    new_listeners: Vec<SocketAddr>,
}

impl ServiceProxy {
    /// Routes every Service port to its ready endpoints now; addresses seen
    /// for the first time wait in [`ServiceProxy::take_new_listeners`].
    pub(super) fn route(&mut self, services: &[ServiceRec], pods: &[PodRec]) {
        let table = routes(services, pods);
        for addr in table.keys() {
            if self.listeners.insert(*addr) {
                self.new_listeners.push(*addr);
            }
        }
        if let Ok(mut t) = self.table.write() {
            *t = table;
        }
    }

    /// The addresses that need a listener since the last call.
    pub(super) fn take_new_listeners(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.new_listeners)
    }

    /// The table the listeners read.
    pub(super) fn table(&self) -> ProxyTable {
        self.table.clone()
    }
}

/// `clusterIP:port` -> the ready endpoints' `ip:targetPort`, for every
/// Service with a cluster IP (headless Services have no proxy).
fn routes(services: &[ServiceRec], pods: &[PodRec]) -> HashMap<SocketAddr, Vec<SocketAddr>> {
    let mut table = HashMap::new();
    for svc in services {
        let Some(cip) = svc.cluster_ip else { continue };
        let eps = svc.endpoints(pods);
        for (i, p) in svc.ports.iter().enumerate() {
            let ready: Vec<SocketAddr> = eps
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| e.target_ports[i].map(|tp| SocketAddr::from((e.ip, tp))))
                .collect();
            table.insert(SocketAddr::from((cip, p.port)), ready);
        }
    }
    table
}

/// A small xorshift generator: the proxy picks endpoints at random, as
/// kube-proxy's iptables mode does (`statistic --mode random`).
pub(super) fn next_random(state: &AtomicUsize) -> usize {
    let mut x = state.load(Ordering::Relaxed) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.store(x, Ordering::Relaxed);
    x
}

pub(super) async fn proxy_listener(addr: SocketAddr, table: ProxyTable) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("warning: Service proxy cannot listen on {addr}: {e}");
            return;
        }
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as usize);
    let rng = Arc::new(AtomicUsize::new(seed));
    while let Ok((mut inbound, _)) = listener.accept().await {
        let table = table.clone();
        let rng = rng.clone();
        tokio::spawn(async move {
            let eps = table
                .read()
                .map(|t| t.get(&addr).cloned().unwrap_or_default())
                .unwrap_or_default();
            if eps.is_empty() {
                return; // no ready endpoint: the connection is closed, like kube-proxy's reject.
            }
            let start = next_random(&rng) % eps.len();
            for i in 0..eps.len() {
                let ep = eps[(start + i) % eps.len()];
                if let Ok(Ok(mut outbound)) =
                    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(ep)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;
    use crate::sim::endpoints::ServicePort;

    fn service(cluster_ip: Option<Ipv4Addr>) -> ServiceRec {
        ServiceRec {
            name: "tally".into(),
            namespace: "default".into(),
            cluster_ip,
            ports: vec![ServicePort {
                name: Some("http".into()),
                protocol: "tcp".into(),
                port: 80,
                target: IntOrString::String("http".into()),
            }],
            selector: Some(BTreeMap::from([("app".into(), "tally".into())])),
            publish_not_ready: false,
            type_: "ClusterIP".into(),
        }
    }

    fn pod(n: u8, ready: bool) -> PodRec {
        PodRec {
            name: format!("tally-{n}"),
            namespace: "default".into(),
            labels: BTreeMap::from([("app".into(), "tally".into())]),
            ip: Some(Ipv4Addr::new(10, 244, 1, n)),
            ready,
            terminating: false,
            hostname: None,
            subdomain: None,
            container_ports: vec![(Some("http".into()), 8080)],
        }
    }

    #[test]
    fn a_cluster_ip_routes_to_ready_endpoints_by_target_port_name() {
        let cip = Ipv4Addr::new(10, 96, 0, 11);
        let t = routes(&[service(Some(cip))], &[pod(2, true), pod(3, false)]);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[&SocketAddr::from((cip, 80))],
            vec![SocketAddr::from(([10, 244, 1, 2], 8080))]
        );
    }

    #[test]
    fn headless_services_are_not_proxied_and_listeners_are_announced_once() {
        assert!(routes(&[service(None)], &[pod(2, true)]).is_empty());
        let mut p = ServiceProxy::default();
        let svc = [service(Some(Ipv4Addr::new(10, 96, 0, 11)))];
        p.route(&svc, &[pod(2, true)]);
        assert_eq!(p.take_new_listeners().len(), 1);
        p.route(&svc, &[]);
        assert!(p.take_new_listeners().is_empty());
        let table = p.table();
        let t = table.read().unwrap();
        assert_eq!(t.values().next().map(Vec::len), Some(0));
    }
}
