//! NetworkPolicy, as a CNI plugin enforces it, translated into nftables.
//!
//! [`Policy::compile`] reads a rendered `NetworkPolicy` and refuses, loudly,
//! anything it cannot enforce exactly (an unknown selector operator or
//! protocol, an IPv6 block, a named port in an egress rule that does not
//! name its pods). [`rules_for`] evaluates the compiled policies for one pod
//! against every pod the simulator knows (the release's pods, the `helm test`
//! pod and the cluster DNS server, each with its namespace's labels), as the
//! NetworkPolicy specification says: a pod selected by a policy of type
//! Ingress (Egress) accepts (sends) only what one of the rules of the
//! selecting policies allows, rules add up, a rule without `from`/`to`
//! allows every peer and one without `ports` every port, and replies to an
//! allowed connection pass (policies are stateful). [`nft_script`] prints
//! the result as one atomic nftables script for the pod's network namespace.
//!
//! Two choices follow what CNIs do rather than the API text: traffic from the
//! node (the kubelet's probes) always reaches the pods, as Calico and Cilium
//! allow; and, since the simulator's Service proxy runs on the node and
//! connects from the node's address, a client that comes in through a
//! ClusterIP Service is seen as the node (a policy on who may use the client
//! port is therefore enforced for direct connections to pod addresses only).
//! Pure: nothing here touches a socket or a namespace; the daemon applies
//! the scripts.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The nftables table the policies own in a pod's namespace (the nemeses
/// have their own, so healing a fault never removes a policy).
pub const TABLE: &str = "tsim_netpol";

/// Why a rendered NetworkPolicy cannot be enforced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetpolError {
    /// Something the translator does not model; ignoring it would make the
    /// simulator more permissive (or stricter) than a cluster.
    #[error(
        "NetworkPolicy {policy}: {what} is not modelled by the simulator, which enforces policies \
         instead of ignoring what it cannot translate; change the chart's networkPolicy values or \
         teach integration/src/sim/netpol.rs"
    )]
    Unsupported {
        /// The policy's name.
        policy: String,
        /// What, where.
        what: String,
    },
}

/// A pod (or the DNS server) as policies see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its namespace.
    pub namespace: String,
    /// Its namespace's labels (`kubernetes.io/metadata.name` at least).
    pub namespace_labels: BTreeMap<String, String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its container ports (name, number), for named ports.
    pub ports: Vec<(Option<String>, u16)>,
}

/// The labels every namespace carries (Kubernetes 1.22+ sets this one).
pub fn namespace_labels(namespace: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        namespace.to_string(),
    )])
}

/// A transport protocol of a policy port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Proto {
    fn nft(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector; an empty one selects everything.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Selector(Vec<Requirement>);

impl Selector {
    fn compile(s: &LabelSelector, policy: &str, at: &str) -> Result<Selector, NetpolError> {
        let mut reqs: Vec<Requirement> = s
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        for e in s.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            reqs.push(match e.operator.as_str() {
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return Err(NetpolError::Unsupported {
                        policy: policy.into(),
                        what: format!("{at}: matchExpressions operator {other:?}"),
                    });
                }
            });
        }
        Ok(Selector(reqs))
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// An IPv4 network with exceptions (`ipBlock`), or one address (`/32`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Net {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// `except`: networks inside it that are not allowed.
    pub except: Vec<(Ipv4Addr, u8)>,
}

fn cidr(text: &str, policy: &str, at: &str) -> Result<(Ipv4Addr, u8), NetpolError> {
    let bad = || NetpolError::Unsupported {
        policy: policy.into(),
        what: format!("{at}: ipBlock {text:?} (only IPv4 CIDRs are modelled)"),
    };
    let (a, p) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    Ok((addr, prefix))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    /// Pods matching `pods` in the namespaces matching `namespaces` (the
    /// policy's own namespace when `None`).
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    Block(Net),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PortRef {
    All,
    Number(u16, u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PortSel {
    proto: Proto,
    port: PortRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    peers: Option<Vec<Peer>>,
    ports: Option<Vec<PortSel>>,
}

/// One NetworkPolicy, checked and ready to evaluate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    name: String,
    namespace: String,
    selector: Selector,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

fn peers(
    list: &Option<Vec<NetworkPolicyPeer>>,
    policy: &str,
    at: &str,
) -> Result<Option<Vec<Peer>>, NetpolError> {
    let Some(list) = list.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(b), None, None) => {
                let (addr, prefix) = cidr(&b.cidr, policy, &at)?;
                let except = b
                    .except
                    .iter()
                    .flatten()
                    .map(|e| cidr(e, policy, &at))
                    .collect::<Result<_, _>>()?;
                out.push(Peer::Block(Net {
                    addr,
                    prefix,
                    except,
                }));
            }
            (None, ns, pods) if ns.is_some() || pods.is_some() => out.push(Peer::Pods {
                namespaces: ns
                    .as_ref()
                    .map(|s| Selector::compile(s, policy, &format!("{at}.namespaceSelector")))
                    .transpose()?,
                pods: match pods {
                    Some(s) => Selector::compile(s, policy, &format!("{at}.podSelector"))?,
                    None => Selector(vec![]),
                },
            }),
            _ => {
                return Err(NetpolError::Unsupported {
                    policy: policy.into(),
                    what: format!(
                        "{at}: a peer must have exactly one of ipBlock or podSelector/namespaceSelector"
                    ),
                });
            }
        }
    }
    Ok(Some(out))
}

fn ports(
    list: &Option<Vec<NetworkPolicyPort>>,
    policy: &str,
    at: &str,
) -> Result<Option<Vec<PortSel>>, NetpolError> {
    let Some(list) = list.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let unsupported = |what: String| NetpolError::Unsupported {
            policy: policy.into(),
            what: format!("{at}: {what}"),
        };
        let proto = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            "SCTP" => Proto::Sctp,
            other => return Err(unsupported(format!("protocol {other:?}"))),
        };
        let number = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
        let port = match (&p.port, p.end_port) {
            (None, None) => PortRef::All,
            (Some(IntOrString::Int(n)), end) => {
                let from = number(*n).ok_or_else(|| unsupported(format!("port {n}")))?;
                let to = match end {
                    None => from,
                    Some(e) => number(e)
                        .filter(|e| *e >= from)
                        .ok_or_else(|| unsupported(format!("endPort {e} below port {from}")))?,
                };
                PortRef::Number(from, to)
            }
            (Some(IntOrString::String(name)), None) => match name.parse::<i32>() {
                Ok(n) => {
                    let n = number(n).ok_or_else(|| unsupported(format!("port {name:?}")))?;
                    PortRef::Number(n, n)
                }
                Err(_) => PortRef::Name(name.clone()),
            },
            (port, Some(_)) => {
                return Err(unsupported(format!(
                    "endPort with port {port:?} (it needs a numeric port)"
                )));
            }
        };
        out.push(PortSel { proto, port });
    }
    Ok(Some(out))
}

impl Policy {
    /// Checks a rendered NetworkPolicy; `default_namespace` is the release's
    /// (what `helm template` without `--namespace` leaves empty).
    pub fn compile(p: &NetworkPolicy, default_namespace: &str) -> Result<Policy, NetpolError> {
        let name = p.metadata.name.clone().unwrap_or_default();
        let namespace = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_string());
        let spec = p.spec.clone().unwrap_or_default();
        let selector = match &spec.pod_selector {
            Some(s) => Selector::compile(s, &name, "spec.podSelector")?,
            None => Selector(vec![]),
        };
        let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let types = spec.policy_types.clone().unwrap_or_else(|| {
            let mut t = vec!["Ingress".to_string()];
            if has_egress {
                t.push("Egress".into());
            }
            t
        });
        for t in &types {
            if t != "Ingress" && t != "Egress" {
                return Err(NetpolError::Unsupported {
                    policy: name,
                    what: format!("spec.policyTypes entry {t:?}"),
                });
            }
        }
        let ingress = if types.iter().any(|t| t == "Ingress") {
            let mut rules = Vec::new();
            for (i, r) in spec.ingress.iter().flatten().enumerate() {
                let at = format!("spec.ingress[{i}]");
                rules.push(Rule {
                    peers: peers(&r.from, &name, &format!("{at}.from"))?,
                    ports: ports(&r.ports, &name, &format!("{at}.ports"))?,
                });
            }
            Some(rules)
        } else {
            None
        };
        let egress = if types.iter().any(|t| t == "Egress") {
            let mut rules = Vec::new();
            for (i, r) in spec.egress.iter().flatten().enumerate() {
                let at = format!("spec.egress[{i}]");
                let rule = Rule {
                    peers: peers(&r.to, &name, &format!("{at}.to"))?,
                    ports: ports(&r.ports, &name, &format!("{at}.ports"))?,
                };
                // A named egress port is the destination pod's port of that
                // name: it can be resolved only against pods the rule names.
                let named = rule
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| matches!(p.port, PortRef::Name(_)));
                let only_pods = rule
                    .peers
                    .as_ref()
                    .is_some_and(|ps| ps.iter().all(|p| matches!(p, Peer::Pods { .. })));
                if named && !only_pods {
                    return Err(NetpolError::Unsupported {
                        policy: name,
                        what: format!(
                            "{at}: a named port in an egress rule whose `to` is not only pod selectors"
                        ),
                    });
                }
                rules.push(rule);
            }
            Some(rules)
        } else {
            None
        };
        Ok(Policy {
            name,
            namespace,
            selector,
            ingress,
            egress,
        })
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn selects(&self, pod: &Member) -> bool {
        pod.namespace == self.namespace && self.selector.matches(&pod.labels)
    }
}

/// A port range on one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ports {
    /// Protocol.
    pub proto: Proto,
    /// First port.
    pub from: u16,
    /// Last port (inclusive).
    pub to: u16,
}

/// One allowance: from (to) these networks, on these ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    /// `None`: every address.
    pub peers: Option<Vec<Net>>,
    /// `None`: every port of every protocol.
    pub ports: Option<Vec<Ports>>,
}

/// What one pod may receive and send; `None` in a direction no policy
/// isolates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Ingress allowances (an empty list denies every new connection).
    pub ingress: Option<Vec<Allow>>,
    /// Egress allowances.
    pub egress: Option<Vec<Allow>>,
}

fn matching<'a>(peer: &Peer, policy: &Policy, members: &'a [Member]) -> Vec<&'a Member> {
    match peer {
        Peer::Block(_) => vec![],
        Peer::Pods { namespaces, pods } => members
            .iter()
            .filter(|m| match namespaces {
                None => m.namespace == policy.namespace,
                Some(ns) => ns.matches(&m.namespace_labels),
            })
            .filter(|m| pods.matches(&m.labels))
            .collect(),
    }
}

fn resolve(sel: &PortSel, ports_of: &[(Option<String>, u16)]) -> Option<Ports> {
    let (from, to) = match &sel.port {
        PortRef::All => (1, u16::MAX),
        PortRef::Number(a, b) => (*a, *b),
        // A name no container port carries matches nothing, as in Kubernetes.
        PortRef::Name(n) => {
            let p = ports_of
                .iter()
                .find(|(name, _)| name.as_deref() == Some(n))?
                .1;
            (p, p)
        }
    };
    Some(Ports {
        proto: sel.proto,
        from,
        to,
    })
}

fn host(ip: Ipv4Addr) -> Net {
    Net {
        addr: ip,
        prefix: 32,
        except: vec![],
    }
}

/// The rules of `pod` under `policies`, given every member of the cluster
/// (pods and DNS); `None` when no policy selects it.
pub fn rules_for(policies: &[Policy], pod: &Member, members: &[Member]) -> Option<Rules> {
    let selecting: Vec<&Policy> = policies.iter().filter(|p| p.selects(pod)).collect();
    if selecting.is_empty() {
        return None;
    }
    let mut out = Rules::default();
    for policy in selecting {
        if let Some(rules) = &policy.ingress {
            let allows = out.ingress.get_or_insert_with(Vec::new);
            for r in rules {
                let ports = r.ports.as_ref().map(|ps| {
                    ps.iter()
                        .filter_map(|p| resolve(p, &pod.ports))
                        .collect::<Vec<_>>()
                });
                let peers = r.peers.as_ref().map(|ps| net_list(ps, policy, members));
                allows.push(Allow { peers, ports });
            }
        }
        if let Some(rules) = &policy.egress {
            let allows = out.egress.get_or_insert_with(Vec::new);
            for r in rules {
                let named = r
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| matches!(p.port, PortRef::Name(_)));
                if named {
                    // Resolved per destination pod (compile made sure the
                    // rule names only pods).
                    for peer in r.peers.iter().flatten() {
                        for m in matching(peer, policy, members) {
                            let ports = r.ports.iter().flatten();
                            allows.push(Allow {
                                peers: Some(vec![host(m.ip)]),
                                ports: Some(ports.filter_map(|p| resolve(p, &m.ports)).collect()),
                            });
                        }
                    }
                } else {
                    allows.push(Allow {
                        peers: r.peers.as_ref().map(|ps| net_list(ps, policy, members)),
                        ports: r
                            .ports
                            .as_ref()
                            .map(|ps| ps.iter().filter_map(|p| resolve(p, &[])).collect()),
                    });
                }
            }
        }
    }
    Some(out)
}

fn net_list(peers: &[Peer], policy: &Policy, members: &[Member]) -> Vec<Net> {
    let mut nets: Vec<Net> = Vec::new();
    for peer in peers {
        match peer {
            Peer::Block(n) => nets.push(n.clone()),
            Peer::Pods { .. } => {
                nets.extend(matching(peer, policy, members).iter().map(|m| host(m.ip)))
            }
        }
    }
    nets.sort();
    nets.dedup();
    nets
}

fn allow_lines(allows: &[Allow], dir: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for a in allows {
        let mut nets: Vec<String> = Vec::new();
        match &a.peers {
            None => nets.push(String::new()),
            Some(ps) => {
                let hosts: Vec<String> = ps
                    .iter()
                    .filter(|n| n.prefix == 32)
                    .map(|n| n.addr.to_string())
                    .collect();
                if !hosts.is_empty() {
                    nets.push(format!("ip {dir} {{ {} }} ", hosts.join(", ")));
                }
                for n in ps.iter().filter(|n| n.prefix < 32) {
                    let mut m = format!("ip {dir} {}/{} ", n.addr, n.prefix);
                    if !n.except.is_empty() {
                        let ex: Vec<String> =
                            n.except.iter().map(|(a, p)| format!("{a}/{p}")).collect();
                        m.push_str(&format!("ip {dir} != {{ {} }} ", ex.join(", ")));
                    }
                    nets.push(m);
                }
            }
        }
        let ports: Vec<String> = match &a.ports {
            None => vec![String::new()],
            Some(ps) => ps
                .iter()
                .map(|p| {
                    let range = if p.from == p.to {
                        p.from.to_string()
                    } else {
                        format!("{}-{}", p.from, p.to)
                    };
                    format!("{} dport {range} ", p.proto.nft())
                })
                .collect(),
        };
        for n in &nets {
            for p in &ports {
                lines.push(format!("{n}{p}accept"));
            }
        }
    }
    lines
}

/// The nftables script that makes `rules` hold in a pod's namespace,
/// replacing whatever an earlier script put there (atomically: `nft -f`
/// applies a file as one transaction). `node` is the node's address on the
/// pod network (the kubelet's probes come from it).
pub fn nft_script(rules: &Rules, node: Ipv4Addr) -> String {
    let mut s =
        format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    let mut chain =
        |name: &str, hook: &str, allows: &Option<Vec<Allow>>, dir: &str, iface: &str| {
            let Some(allows) = allows else { return };
            s.push_str(&format!(
                " chain {name} {{\n  type filter hook {hook} priority 0; policy accept;\n  \
             {iface} \"lo\" accept\n  ct state established,related accept\n"
            ));
            if hook == "input" {
                s.push_str(&format!("  ip saddr {node} accept\n"));
            }
            for line in allow_lines(allows, dir) {
                s.push_str(&format!("  {line}\n"));
            }
            s.push_str("  drop\n }\n");
        };
    chain("ingress", "input", &rules.ingress, "saddr", "iif");
    chain("egress", "output", &rules.egress, "daddr", "oif");
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `helm template tally chart` renders today (networkpolicy.yaml
    /// with the default values), trimmed of labels.
    const RENDERED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: tally
  namespace: "default"
spec:
  podSelector:
    matchLabels:
      app.kubernetes.io/name: tally
      app.kubernetes.io/instance: tally
      app.kubernetes.io/component: server
  policyTypes:
    - Ingress
    - Egress
  ingress:
    - ports:
        - port: 8081
          protocol: TCP
      from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/name: tally
              app.kubernetes.io/instance: tally
              app.kubernetes.io/component: server
    - ports:
        - port: 8080
          protocol: TCP
  egress:
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
    - ports:
        - port: 8081
          protocol: TCP
      to:
        - podSelector:
            matchLabels:
              app.kubernetes.io/name: tally
              app.kubernetes.io/instance: tally
              app.kubernetes.io/component: server
"#;

    fn policy(yaml: &str) -> Result<Policy, NetpolError> {
        let np: NetworkPolicy = serde_yaml::from_str(yaml).expect("a NetworkPolicy");
        Policy::compile(&np, "default")
    }

    fn member(ip: u8, component: &str) -> Member {
        Member {
            namespace: "default".into(),
            namespace_labels: namespace_labels("default"),
            labels: BTreeMap::from([
                ("app.kubernetes.io/name".into(), "tally".into()),
                ("app.kubernetes.io/instance".into(), "tally".into()),
                ("app.kubernetes.io/component".into(), component.into()),
            ]),
            ip: Ipv4Addr::new(10, 244, 1, ip),
            ports: vec![(Some("http".into()), 8080), (Some("peer".into()), 8081)],
        }
    }

    fn tcp(p: u16) -> Ports {
        Ports {
            proto: Proto::Tcp,
            from: p,
            to: p,
        }
    }

    #[test]
    fn the_charts_policy_admits_peers_from_the_release_and_clients_from_anywhere() {
        let p = policy(RENDERED).unwrap();
        let members = vec![member(2, "server"), member(3, "server"), member(9, "test")];
        let rules = rules_for(std::slice::from_ref(&p), &members[0], &members).unwrap();
        let ingress = rules.ingress.as_ref().unwrap();
        assert_eq!(
            ingress[0],
            Allow {
                peers: Some(vec![host(members[0].ip), host(members[1].ip)]),
                ports: Some(vec![tcp(8081)]),
            },
            "the test pod (component: test) is not a peer"
        );
        assert_eq!(
            ingress[1],
            Allow {
                peers: None,
                ports: Some(vec![tcp(8080)])
            }
        );
        let egress = rules.egress.as_ref().unwrap();
        assert_eq!(egress[0].peers, None);
        assert_eq!(
            egress[0].ports,
            Some(vec![
                Ports {
                    proto: Proto::Udp,
                    from: 53,
                    to: 53
                },
                tcp(53)
            ])
        );
        // The test pod is selected by nothing: no rules, no table.
        assert_eq!(rules_for(&[p], &members[2], &members), None);

        let script = nft_script(&rules, Ipv4Addr::new(10, 244, 0, 1));
        for line in [
            "chain ingress {",
            "ip saddr 10.244.0.1 accept",
            "ip saddr { 10.244.1.2, 10.244.1.3 } tcp dport 8081 accept",
            "  tcp dport 8080 accept",
            "chain egress {",
            "  udp dport 53 accept",
            "  tcp dport 53 accept",
            "ip daddr { 10.244.1.2, 10.244.1.3 } tcp dport 8081 accept",
            "ct state established,related accept",
        ] {
            assert!(script.contains(line), "{line:?} missing:\n{script}");
        }
        assert_eq!(script.matches("  drop\n").count(), 2, "{script}");
        assert!(script.starts_with("table inet tsim_netpol {}\ndelete table inet tsim_netpol\n"));
    }

    #[test]
    fn a_policy_without_dns_or_peers_allows_neither() {
        // The chart's rules minus DNS and the peer rules: the pod's egress
        // is denied except replies, and no peer reaches its peer port.
        let yaml = RENDERED.split("  egress:").next().unwrap().replace(
            "        - port: 8081\n          protocol: TCP\n      from:",
            "        - port: 9999\n          protocol: TCP\n      from:",
        );
        let p = policy(&format!("{yaml}  egress: []\n")).unwrap();
        let members = vec![member(2, "server"), member(3, "server")];
        let rules = rules_for(&[p], &members[0], &members).unwrap();
        assert_eq!(rules.egress, Some(vec![]));
        let script = nft_script(&rules, Ipv4Addr::new(10, 244, 0, 1));
        assert!(!script.contains("dport 53"), "{script}");
        assert!(!script.contains("dport 8081"), "{script}");
        assert!(script.contains("chain egress"), "{script}");
    }

    #[test]
    fn named_ports_selectors_and_blocks_follow_the_specification() {
        let p = policy(
            r#"
metadata: {name: np}
spec:
  podSelector:
    matchExpressions:
      - {key: app.kubernetes.io/component, operator: In, values: [server]}
  ingress:
    - ports: [{port: peer}, {port: metrics}]
      from:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
          podSelector:
            matchExpressions:
              - {key: app.kubernetes.io/component, operator: NotIn, values: [server]}
    - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16]}}]
      ports: [{port: 9000, endPort: 9010, protocol: UDP}]
  egress:
    - to: [{podSelector: {}}]
      ports: [{port: http}]
"#,
        )
        .unwrap();
        let members = vec![member(2, "server"), member(3, "server"), member(9, "test")];
        let rules = rules_for(std::slice::from_ref(&p), &members[0], &members).unwrap();
        let ingress = rules.ingress.unwrap();
        // `metrics` names no container port: it matches nothing.
        assert_eq!(
            ingress[0],
            Allow {
                peers: Some(vec![host(members[2].ip)]),
                ports: Some(vec![tcp(8081)])
            }
        );
        assert_eq!(
            ingress[1].peers,
            Some(vec![Net {
                addr: Ipv4Addr::new(10, 0, 0, 0),
                prefix: 8,
                except: vec![(Ipv4Addr::new(10, 244, 0, 0), 16)]
            }])
        );
        assert_eq!(
            ingress[1].ports,
            Some(vec![Ports {
                proto: Proto::Udp,
                from: 9000,
                to: 9010
            }])
        );
        // Egress to every pod's `http` port, resolved per destination.
        let egress = rules.egress.unwrap();
        assert_eq!(egress.len(), 3);
        assert!(
            egress
                .iter()
                .all(|a| a.ports == Some(vec![tcp(8080)]) && a.peers.as_ref().unwrap().len() == 1)
        );
        let script = nft_script(
            &Rules {
                ingress: Some(ingress),
                egress: None,
            },
            Ipv4Addr::new(10, 244, 0, 1),
        );
        assert!(
            script.contains(
                "ip saddr 10.0.0.0/8 ip saddr != { 10.244.0.0/16 } udp dport 9000-9010 accept"
            ),
            "{script}"
        );
        assert!(!script.contains("chain egress"), "{script}");
        // Not selected (other namespace): no rules.
        let mut other = members[0].clone();
        other.namespace = "elsewhere".into();
        assert_eq!(rules_for(&[p], &other, &members), None);
    }

    #[test]
    fn what_cannot_be_enforced_is_refused_by_name() {
        let cases = [
            (
                "spec: {podSelector: {matchExpressions: [{key: a, operator: Gt, values: ['1']}]}}",
                "matchExpressions operator \"Gt\"",
            ),
            (
                "spec: {ingress: [{from: [{ipBlock: {cidr: 'fd00::/8'}}]}]}",
                "spec.ingress[0].from[0]: ipBlock \"fd00::/8\"",
            ),
            (
                "spec: {ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
                "spec.ingress[0].ports[0]: protocol \"ICMP\"",
            ),
            (
                "spec: {egress: [{ports: [{port: dns}]}]}",
                "spec.egress[0]: a named port in an egress rule",
            ),
            (
                "spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
                "exactly one of ipBlock",
            ),
            (
                "spec: {ingress: [{ports: [{port: 90, endPort: 80}]}]}",
                "endPort 80 below port 90",
            ),
        ];
        for (spec, wanted) in cases {
            let e = policy(&format!("metadata: {{name: bad}}\n{spec}\n")).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(wanted) && text.contains("NetworkPolicy bad"),
                "{spec}: {text}"
            );
        }
    }

    #[test]
    fn policy_types_default_as_the_api_server_fills_them() {
        let only_ingress = policy("metadata: {name: a}\nspec: {podSelector: {}}\n").unwrap();
        let m = vec![member(2, "server")];
        let r = rules_for(&[only_ingress], &m[0], &m).unwrap();
        assert_eq!(r.ingress, Some(vec![]), "deny all ingress");
        assert_eq!(r.egress, None, "egress untouched");
        let with_egress = policy("metadata: {name: b}\nspec: {egress: [{}]}\n").unwrap();
        let r = rules_for(&[with_egress], &m[0], &m).unwrap();
        assert_eq!(
            r.egress,
            Some(vec![Allow {
                peers: None,
                ports: None
            }])
        );
        assert!(nft_script(&r, Ipv4Addr::new(10, 244, 0, 1)).contains("  accept\n"));
    }
}
