//! Services and their endpoints, as the endpoints controller computes them.
//!
//! Both the cluster DNS server and the Service proxy read this: a pod is an
//! endpoint of a Service when the Service's selector matches its labels and it
//! has an address; it counts as *ready* when its readiness probe passes and it
//! is not terminating. Headless Services with `publishNotReadyAddresses`
//! publish not-ready (and terminating) pods too.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// One port of a Service.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// `ports[].name`: SRV records exist only for named ports.
    pub name: Option<String>,
    /// `tcp` or `udp` (lower case, as in SRV names).
    pub protocol: String,
    /// The Service's own port (what clients of a ClusterIP connect to).
    pub port: u16,
    /// `targetPort`: a number, or a container port name resolved per pod.
    pub target: IntOrString,
}

/// What the simulator needs of a rendered Service.
#[derive(Clone, Debug)]
pub struct ServiceRec {
    /// metadata.name.
    pub name: String,
    /// metadata.namespace.
    pub namespace: String,
    /// The assigned ClusterIP; `None` for a headless Service.
    pub cluster_ip: Option<Ipv4Addr>,
    /// spec.ports.
    pub ports: Vec<ServicePort>,
    /// spec.selector; `None` means the Service manages no endpoints.
    pub selector: Option<BTreeMap<String, String>>,
    /// spec.publishNotReadyAddresses.
    pub publish_not_ready: bool,
    /// spec.type, for `get`.
    pub type_: String,
}

/// What the simulator knows of a pod at one instant.
#[derive(Clone, Debug)]
pub struct PodRec {
    /// metadata.name (also the hostname of a StatefulSet pod).
    pub name: String,
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.labels.
    pub labels: BTreeMap<String, String>,
    /// The pod IP, once its sandbox (network namespace) exists.
    pub ip: Option<Ipv4Addr>,
    /// Readiness (probe passed, container running).
    pub ready: bool,
    /// Being deleted.
    pub terminating: bool,
    /// spec.hostname (the pod name for StatefulSet pods).
    pub hostname: Option<String>,
    /// spec.subdomain (the StatefulSet's serviceName).
    pub subdomain: Option<String>,
    /// Container ports: (name, number).
    pub container_ports: Vec<(Option<String>, u16)>,
}

/// One address of a Service.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The pod's IP.
    pub ip: Ipv4Addr,
    /// The pod's name.
    pub pod: String,
    /// Ready and not terminating.
    pub ready: bool,
    /// Set only when the pod's subdomain names this Service (the endpoints
    /// controller's rule): this is what makes `<hostname>.<service>` resolve.
    pub hostname: Option<String>,
    /// For each Service port (same index as `ServiceRec::ports`), the pod port
    /// it maps to, or `None` when a named targetPort is absent on this pod.
    pub target_ports: Vec<Option<u16>>,
}

impl ServiceRec {
    /// Whether the Service is headless (`clusterIP: None`).
    pub fn headless(&self) -> bool {
        self.cluster_ip.is_none()
    }

    /// Whether the selector matches these labels.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        match &self.selector {
            Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
            _ => false,
        }
    }

    /// The endpoints of this Service: every selected pod with an address,
    /// ready or not (callers filter with [`Endpoint::ready`] or
    /// [`ServiceRec::publishes`]).
    pub fn endpoints(&self, pods: &[PodRec]) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for pod in pods {
            let Some(ip) = pod.ip else { continue };
            if pod.namespace != self.namespace || !self.selects(&pod.labels) {
                continue;
            }
            let hostname = match (&pod.hostname, &pod.subdomain) {
                (Some(h), Some(s)) if *s == self.name => Some(h.clone()),
                _ => None,
            };
            let target_ports = self
                .ports
                .iter()
                .map(|p| match &p.target {
                    IntOrString::Int(n) => u16::try_from(*n).ok(),
                    IntOrString::String(name) => pod
                        .container_ports
                        .iter()
                        .find(|(n, _)| n.as_deref() == Some(name.as_str()))
                        .map(|(_, port)| *port),
                })
                .collect();
            out.push(Endpoint {
                ip,
                pod: pod.name.clone(),
                ready: pod.ready && !pod.terminating,
                hostname,
                target_ports,
            });
        }
        out.sort_by_key(|e| e.ip);
        out
    }

    /// Whether DNS publishes this endpoint.
    pub fn publishes(&self, endpoint: &Endpoint) -> bool {
        endpoint.ready || self.publish_not_ready
    }
}
