//! Faults the chaos runner (and a person, through `tally-sim nemesis`) can
//! inject into a running cluster, and their heal. Everything stays inside the
//! simulator's own namespaces: nftables rules and `tc` qdiscs in the pods'
//! network namespaces, signals to the pods' containers.
//!
//! - `partition`: pods in different groups drop each other's packets (one
//!   group of one pod is "isolate"); the client, the kubelet's probes and DNS
//!   still reach every pod.
//! - `loss`: a pod drops a share of its incoming packets at random
//!   (`numgen random`, the nftables form of iptables' `statistic`).
//! - `slow`: a pod's egress goes through a small `tbf` bucket (`netem` is
//!   not in this kernel), so its answers queue.
//! - `dns-down`: pods' packets to the cluster DNS server are dropped.
//! - `dns-servfail`: the cluster DNS server answers every query SERVFAIL
//!   (its cache included), as a CoreDNS whose backend fails.
//! - `volume-full`: a pod's claims are filled to the last byte with a filler
//!   file (bounded claims only, [`super::volume`]); heal deletes it.
//! - `kill` (SIGKILL) and `pause` (SIGSTOP, SIGCONT at heal) hit the
//!   container's process.

use std::process::Command;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::daemon::Sim;
use super::kubelet::{SimPod, send};
use super::net;

/// nftables table the nemeses own in a pod's namespace (deleting it heals).
const TABLE: &str = "tsim_nemesis";

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// One pod cannot talk to any other pod.
    Isolate {
        /// Pod name.
        pod: String,
    },
    /// Pods in different groups cannot talk to each other.
    Partition {
        /// Pod names per side; pods in no group are not touched.
        groups: Vec<Vec<String>>,
    },
    /// A pod drops `percent` % of incoming packets.
    Loss {
        /// Pod name.
        pod: String,
        /// 1-99.
        percent: u8,
    },
    /// A pod's egress is throttled.
    Slow {
        /// Pod name.
        pod: String,
    },
    /// Pods cannot reach the cluster DNS server.
    DnsDown {
        /// Pod names.
        pods: Vec<String>,
    },
    /// The cluster DNS server answers SERVFAIL to every query.
    DnsServfail,
    /// A pod's volumes are full.
    VolumeFull {
        /// Pod name.
        pod: String,
    },
    /// SIGKILL to the pod's container (the kubelet restarts it).
    Kill {
        /// Pod name.
        pod: String,
    },
    /// SIGSTOP to the pod's container until the heal.
    Pause {
        /// Pod name.
        pod: String,
    },
}

impl Fault {
    /// Reads `tally-sim nemesis KIND PODS..` (for `partition`, each argument
    /// is one comma-separated group).
    pub fn parse(kind: &str, pods: &[String], percent: u8) -> Result<Fault> {
        let one = || match pods {
            [pod] => Ok(pod.clone()),
            _ => Err(anyhow!(
                "nemesis {kind} takes exactly one pod, got {pods:?}"
            )),
        };
        Ok(match kind {
            "isolate" => Fault::Isolate { pod: one()? },
            "partition" => {
                if pods.len() < 2 {
                    bail!(
                        "nemesis partition takes two or more groups, e.g. `partition tally-0,tally-1 tally-2`"
                    );
                }
                Fault::Partition {
                    groups: pods
                        .iter()
                        .map(|g| g.split(',').map(str::to_string).collect())
                        .collect(),
                }
            }
            "loss" => Fault::Loss {
                pod: one()?,
                percent,
            },
            "slow" => Fault::Slow { pod: one()? },
            "dns-down" => Fault::DnsDown {
                pods: pods.to_vec(),
            },
            "dns-servfail" if pods.is_empty() => Fault::DnsServfail,
            "dns-servfail" => {
                bail!("nemesis dns-servfail takes no pods: the cluster DNS server fails for all")
            }
            "volume-full" => Fault::VolumeFull { pod: one()? },
            "kill" => Fault::Kill { pod: one()? },
            "pause" => Fault::Pause { pod: one()? },
            other => bail!(
                "unknown nemesis {other:?}: use isolate, partition, loss, slow, dns-down, dns-servfail, volume-full, kill or pause"
            ),
        })
    }

    /// The pods this fault names.
    pub fn pods(&self) -> Vec<String> {
        match self {
            Fault::Partition { groups } => groups.iter().flatten().cloned().collect(),
            Fault::DnsDown { pods } => pods.clone(),
            Fault::DnsServfail => Vec::new(),
            Fault::Isolate { pod }
            | Fault::VolumeFull { pod }
            | Fault::Loss { pod, .. }
            | Fault::Slow { pod }
            | Fault::Kill { pod }
            | Fault::Pause { pod } => {
                vec![pod.clone()]
            }
        }
    }
}

/// Runs `argv` inside network namespace `ns`.
fn in_ns(ns: &str, argv: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .with_context(|| format!("running {argv:?} in {ns} (is nftables/iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{} in {ns}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Adds nftables rules (one per line of `rules`, `drop` statements) to the
/// nemesis table of namespace `ns`, creating the table on first use.
fn nft_rules(ns: &str, input: &[String], output: &[String]) -> Result<()> {
    let mut script = format!(
        "table inet {TABLE} {{\n chain input {{ type filter hook input priority -10; }}\n \
         chain output {{ type filter hook output priority -10; }}\n}}\n"
    );
    for r in input {
        script.push_str(&format!("add rule inet {TABLE} input {r}\n"));
    }
    for r in output {
        script.push_str(&format!("add rule inet {TABLE} output {r}\n"));
    }
    nft_apply(ns, &script)
}

/// Applies an nftables script (`nft -f`, one transaction) in namespace `ns`.
pub(super) fn nft_apply(ns: &str, script: &str) -> Result<()> {
    let path = std::env::temp_dir().join(format!("tsim-nft-{}-{ns}", std::process::id()));
    std::fs::write(&path, script)?;
    let r = in_ns(ns, &["nft", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    r
}

/// Drops every packet between this namespace and `peers`.
fn cut(ns: &str, peers: &[std::net::Ipv4Addr]) -> Result<()> {
    let set: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
    if set.is_empty() {
        return Ok(());
    }
    let set = set.join(", ");
    nft_rules(
        ns,
        &[format!("ip saddr {{ {set} }} drop")],
        &[format!("ip daddr {{ {set} }} drop")],
    )
}

/// Drops `percent` % of incoming packets.
fn loss(ns: &str, percent: u8) -> Result<()> {
    nft_rules(
        ns,
        &[format!("numgen random mod 100 < {percent} drop")],
        &[],
    )
}

/// Drops packets to the cluster DNS server.
fn dns_down(ns: &str) -> Result<()> {
    nft_rules(ns, &[], &[format!("ip daddr {} drop", net::DNS_IP)])
}

/// Throttles the namespace's egress: 256 kbit/s through a 2 KB bucket, up to
/// 1 s of queue.
fn slow(ns: &str) -> Result<()> {
    in_ns(
        ns,
        &[
            "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "256kbit", "burst",
            "2kb", "latency", "1s",
        ],
    )
}

/// Removes every network fault from a namespace (an absent table or qdisc
/// is what a healthy pod has, so their errors are not errors).
pub fn heal_ns(ns: &str) {
    let _ = in_ns(ns, &["nft", "delete", "table", "inet", TABLE]);
    let _ = in_ns(ns, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
}

impl Sim {
    fn pod_named(&self, name: &str) -> Result<&SimPod> {
        self.pods
            .values()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("pod {name:?} not found (see `get`)"))
    }

    fn container_pid(&self, name: &str) -> Result<u32> {
        let p = self.pod_named(name)?;
        p.container
            .as_ref()
            .map(|c| c.pid)
            .ok_or_else(|| anyhow!("pod {name} has no running container"))
    }

    /// The claim directories of pod `name` (by its ordinal).
    fn claim_dirs_of(&self, name: &str) -> Result<Vec<PathBuf>> {
        let ordinal = self.pod_named(name)?.ordinal;
        Ok(self
            .sts
            .claims
            .iter()
            .map(|(claim, _, _)| self.claim_dir(claim, ordinal).1)
            .collect())
    }

    /// Puts `fault` in place; [`Sim::heal`] removes it.
    pub(super) fn inject(&mut self, fault: &Fault) -> Result<String> {
        match fault {
            Fault::Isolate { pod } => {
                let others: Vec<String> = self
                    .pods
                    .values()
                    .map(|p| p.name.clone())
                    .filter(|n| n != pod)
                    .collect();
                return self.inject(&Fault::Partition {
                    groups: vec![vec![pod.clone()], others],
                });
            }
            Fault::Partition { groups } => {
                for (i, group) in groups.iter().enumerate() {
                    let others: Vec<Ipv4Addr> = groups
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .flat_map(|(_, g)| g.iter())
                        .map(|n| self.pod_named(n).map(|p| p.ip))
                        .collect::<Result<_>>()?;
                    for name in group {
                        cut(&self.pod_named(name)?.netns, &others)?;
                    }
                }
            }
            Fault::Loss { pod, percent } => {
                if !(1..=99).contains(percent) {
                    bail!("loss percent {percent} must be 1-99");
                }
                loss(&self.pod_named(pod)?.netns, *percent)?;
            }
            Fault::Slow { pod } => slow(&self.pod_named(pod)?.netns)?,
            Fault::DnsDown { pods } => {
                for pod in pods {
                    dns_down(&self.pod_named(pod)?.netns)?;
                }
            }
            Fault::DnsServfail => {
                self.dns_servfail = true;
                self.publish();
            }
            Fault::VolumeFull { pod } => {
                for dir in self.claim_dirs_of(pod)? {
                    let filler = super::volume::fill(&dir)?;
                    self.fillers.push(filler);
                }
            }
            Fault::Kill { pod } => send(self.container_pid(pod)?, Signal::SIGKILL),
            Fault::Pause { pod } => {
                let pid = self.container_pid(pod)?;
                send(pid, Signal::SIGSTOP);
                self.paused.push(pid);
            }
        }
        let msg = serde_json::to_string(fault)?;
        self.event("nemesis", "Fault", msg.clone());
        Ok(msg)
    }

    /// Removes every fault: network rules and qdiscs in every pod, SIGCONT
    /// to every paused process, the volumes' fillers, DNS answering again.
    pub(super) fn heal(&mut self) -> String {
        for p in self.pods.values() {
            heal_ns(&p.netns);
        }
        for pid in std::mem::take(&mut self.paused) {
            send(pid, Signal::SIGCONT);
        }
        for filler in std::mem::take(&mut self.fillers) {
            let _ = std::fs::remove_file(filler);
        }
        if std::mem::take(&mut self.dns_servfail) {
            self.publish();
        }
        self.event("nemesis", "Healed", "every fault removed");
        "healed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_line_faults() {
        assert_eq!(
            Fault::parse("partition", &args(&["tally-0,tally-1", "tally-2"]), 0).unwrap(),
            Fault::Partition {
                groups: vec![args(&["tally-0", "tally-1"]), args(&["tally-2"])]
            }
        );
        assert_eq!(
            Fault::parse("loss", &args(&["tally-1"]), 20).unwrap(),
            Fault::Loss {
                pod: "tally-1".into(),
                percent: 20
            }
        );
        let e = Fault::parse("kill", &args(&[]), 0).unwrap_err();
        assert!(e.to_string().contains("exactly one pod"), "{e}");
        let e = Fault::parse("flood", &args(&["tally-0"]), 0).unwrap_err();
        assert!(e.to_string().contains("unknown nemesis \"flood\""), "{e}");
        assert_eq!(
            Fault::parse("dns-down", &args(&["a", "b"]), 0)
                .unwrap()
                .pods(),
            args(&["a", "b"])
        );
        assert_eq!(
            Fault::parse("dns-servfail", &[], 0).unwrap(),
            Fault::DnsServfail
        );
        assert!(Fault::parse("dns-servfail", &args(&["a"]), 0).is_err());
        assert_eq!(
            Fault::parse("volume-full", &args(&["tally-1"]), 0).unwrap(),
            Fault::VolumeFull {
                pod: "tally-1".into()
            }
        );
    }
}
