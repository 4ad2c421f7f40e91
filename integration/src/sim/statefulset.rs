//! The StatefulSet controller: reads the StatefulSet and Services from the
//! rendered manifests, creates pods in ordinal order, scales down from the
//! highest ordinal, rolls updates one pod at a time, and refuses changes to
//! immutable fields as the API server does.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::PodTemplateSpec;

use super::daemon::{Sim, compile_policies};
use super::endpoints::{ServicePort, ServiceRec};
use super::hook::unix_now;
use super::kubelet::{ProbeState, SimPod};
use super::manifest::Manifests;
use super::net;

#[derive(Debug)]
pub(super) struct StsState {
    pub(super) name: String,
    pub(super) namespace: String,
    pub(super) replicas: u32,
    pub(super) parallel: bool,
    pub(super) on_delete: bool,
    pub(super) partition: u32,
    pub(super) service_name: String,
    pub(super) claims: Vec<(String, String, String)>,
    pub(super) revisions: HashMap<String, PodTemplateSpec>,
    pub(super) current_rev: String,
    pub(super) update_rev: String,
}

pub(super) fn revision_of(sts: &str, t: &PodTemplateSpec) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(t).unwrap_or_default().hash(&mut h);
    format!("{sts}-{:08x}", h.finish() as u32)
}

pub(super) fn sts_state(m: &Manifests) -> Result<StsState> {
    let sts = m.stateful_set();
    let name = sts
        .metadata
        .name
        .clone()
        .ok_or_else(|| anyhow!("the StatefulSet has no name"))?;
    let spec = &sts.spec;
    let policy = spec
        .pod_management_policy
        .clone()
        .unwrap_or_else(|| "OrderedReady".into());
    let parallel = match policy.as_str() {
        "Parallel" => true,
        "OrderedReady" => false,
        other => bail!("StatefulSet {name}: unknown podManagementPolicy {other:?}"),
    };
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let on_delete = match strategy.type_.as_deref().unwrap_or("RollingUpdate") {
        "RollingUpdate" => false,
        "OnDelete" => true,
        other => bail!("StatefulSet {name}: unknown updateStrategy.type {other:?}"),
    };
    let partition = strategy
        .rolling_update
        .and_then(|r| r.partition)
        .unwrap_or(0)
        .max(0) as u32;
    if spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0) != 0 {
        bail!("StatefulSet {name}: spec.ordinals.start is not modelled");
    }
    let claims = spec
        .volume_claim_templates
        .iter()
        .flatten()
        .map(|c| {
            let cname = c.metadata.name.clone().unwrap_or_default();
            let cs = c.spec.clone().unwrap_or_default();
            let capacity = cs
                .resources
                .and_then(|r| r.requests)
                .and_then(|r| r.get("storage").map(|q| q.0.clone()))
                .unwrap_or_default();
            let modes = cs
                .access_modes
                .unwrap_or_default()
                .iter()
                .map(|m| match m.as_str() {
                    "ReadWriteOnce" => "RWO".to_string(),
                    "ReadWriteOncePod" => "RWOP".to_string(),
                    "ReadOnlyMany" => "ROX".to_string(),
                    "ReadWriteMany" => "RWX".to_string(),
                    o => o.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",");
            (cname, capacity, modes)
        })
        .collect();
    let template = spec.template.clone();
    let rev = revision_of(&name, &template);
    Ok(StsState {
        namespace: m.namespace(),
        replicas: spec.replicas.unwrap_or(1).max(0) as u32,
        parallel,
        on_delete,
        partition,
        service_name: spec.service_name.clone().unwrap_or_default(),
        claims,
        revisions: HashMap::from([(rev.clone(), template)]),
        current_rev: rev.clone(),
        update_rev: rev,
        name,
    })
}

pub(super) fn services_of(
    m: &Manifests,
    old: &[ServiceRec],
    next_ip: &mut u8,
) -> Result<Vec<ServiceRec>> {
    let ns = m.namespace();
    let mut out = Vec::new();
    for s in &m.services {
        let name = s.metadata.name.clone().unwrap_or_default();
        let spec = s.spec.clone().unwrap_or_default();
        let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        if type_ == "ExternalName" {
            continue;
        }
        let cluster_ip = match spec.cluster_ip.as_deref() {
            Some("None") => None,
            Some(ip) if !ip.is_empty() => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .with_context(|| format!("Service {name}: clusterIP {ip:?}"))?;
                if ip.octets()[..2] != [10, 96] {
                    bail!(
                        "Service {name}: clusterIP {ip} is outside the simulated service range 10.96.0.0/16"
                    );
                }
                Some(ip)
            }
            _ => match old
                .iter()
                .find(|o| o.name == name)
                .and_then(|o| o.cluster_ip)
            {
                Some(ip) => Some(ip),
                None => {
                    let ip = Ipv4Addr::new(10, 96, 0, *next_ip);
                    *next_ip = next_ip
                        .checked_add(1)
                        .ok_or_else(|| anyhow!("out of Service addresses"))?;
                    Some(ip)
                }
            },
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| ServicePort {
                name: p.name.clone(),
                protocol: p
                    .protocol
                    .clone()
                    .unwrap_or_else(|| "TCP".into())
                    .to_ascii_lowercase(),
                port: p.port as u16,
                target: p.target_port.clone().unwrap_or(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p.port),
                ),
            })
            .collect();
        out.push(ServiceRec {
            name,
            namespace: s.metadata.namespace.clone().unwrap_or_else(|| ns.clone()),
            cluster_ip,
            ports,
            selector: spec.selector.clone(),
            publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
            type_,
        });
    }
    Ok(out)
}

impl Sim {
    pub(super) fn alloc_ip(&mut self) -> Ipv4Addr {
        loop {
            let n = self.next_ip;
            self.next_ip = self.next_ip.wrapping_add(1) % (254 * 250);
            let ip = Ipv4Addr::new(10, 244, 1 + (n / 250) as u8, 2 + (n % 250) as u8);
            let taken =
                self.pods.values().any(|p| p.ip == ip) || self.hooks.values().any(|h| h.ip == ip);
            if !taken {
                return ip;
            }
        }
    }

    pub(super) fn claim_dir(&self, claim: &str, ordinal: u32) -> (String, PathBuf) {
        let name = format!("{claim}-{}-{ordinal}", self.sts.name);
        let dir = self.cfg.state_dir.join("pvc").join(&name);
        (name, dir)
    }

    /// Creates pod `ordinal` from `revision`: its sandbox, then its container.
    pub(super) fn create_pod(&mut self, ordinal: u32, revision: String) -> Result<()> {
        let name = format!("{}-{ordinal}", self.sts.name);
        let template = self
            .sts
            .revisions
            .get(&revision)
            .cloned()
            .ok_or_else(|| anyhow!("revision {revision} is unknown"))?;
        let mut claims = BTreeMap::new();
        for (claim, capacity, modes) in self.sts.claims.clone() {
            let (cname, dir) = self.claim_dir(&claim, ordinal);
            if !dir.exists() {
                fs::create_dir_all(&dir)
                    .with_context(|| format!("creating claim directory {}", dir.display()))?;
                if self.cfg.volume_limit_mb > 0 {
                    super::volume::bound(&dir, self.cfg.volume_limit_mb)?;
                }
                self.claims
                    .insert(cname.clone(), (Instant::now(), capacity, modes));
                self.event(
                    &format!("persistentvolumeclaim/{cname}"),
                    "Bound",
                    format!("volume {}", dir.display()),
                );
            }
            claims.insert(claim, dir);
        }
        let subdomain = self.sts.service_name.clone();
        let (ip, netns, plan) = self.sandbox(&name, &template, &subdomain, claims)?;
        self.event(
            &format!("pod/{name}"),
            "Scheduled",
            format!("ip {ip}, revision {revision}"),
        );
        self.pods.insert(
            ordinal,
            SimPod {
                name,
                ordinal,
                revision,
                ip,
                netns,
                created: Instant::now(),
                plan,
                container: None,
                serial: 0,
                restarts: 0,
                started: false,
                ready: false,
                next_start: Some(Instant::now()),
                terminating: None,
                startup: ProbeState::default(),
                liveness: ProbeState::default(),
                readiness: ProbeState::default(),
                logs: Vec::new(),
                waiting_reason: Some("ContainerCreating".into()),
            },
        );
        Ok(())
    }

    pub(super) fn delete_pod(&mut self, ordinal: u32, why: &str) {
        let Some(p) = self.pods.get_mut(&ordinal) else {
            return;
        };
        if p.terminating.is_some() {
            return;
        }
        p.terminating = Some(Instant::now());
        p.next_start = None;
        self.kill_container(ordinal, why);
    }

    pub(super) fn healthy(&self, ord: u32) -> bool {
        self.pods
            .get(&ord)
            .is_some_and(|p| p.ready && p.terminating.is_none() && p.container.is_some())
    }

    /// The StatefulSet controller part.
    pub(super) fn statefulset(&mut self) {
        let replicas = self.sts.replicas;
        let monotonic = !self.sts.parallel;
        if monotonic && self.pods.values().any(|p| p.terminating.is_some()) {
            return;
        }
        // Create missing pods (and, when monotonic, stop at the first unhealthy one).
        for ord in 0..replicas {
            match self.pods.get(&ord) {
                None => {
                    let rev = if !self.sts.on_delete && ord < self.sts.partition {
                        self.sts.current_rev.clone()
                    } else {
                        self.sts.update_rev.clone()
                    };
                    if let Err(e) = self.create_pod(ord, rev) {
                        let sts = self.sts.name.clone();
                        self.event(
                            &format!("statefulset/{sts}"),
                            "FailedCreate",
                            format!("pod {sts}-{ord}: {e:#}"),
                        );
                        return;
                    }
                    if monotonic {
                        return;
                    }
                }
                Some(p) => {
                    if monotonic && (p.terminating.is_some() || !self.healthy(ord)) {
                        return;
                    }
                }
            }
        }
        // Scale down: highest ordinal first.
        let condemned: Vec<u32> = self
            .pods
            .keys()
            .copied()
            .filter(|o| *o >= replicas)
            .rev()
            .collect();
        if !condemned.is_empty() {
            for ord in condemned {
                if self.pods[&ord].terminating.is_some() {
                    continue;
                }
                if monotonic && !(0..replicas).all(|o| self.healthy(o)) {
                    return;
                }
                self.delete_pod(ord, "scaled down");
                if monotonic {
                    return;
                }
            }
            return;
        }
        // Rolling update: one pod at a time, highest ordinal first, only
        // when every pod is Ready.
        let all_ready = (0..replicas).all(|o| self.healthy(o));
        if !self.sts.on_delete && all_ready {
            let target = (self.sts.partition..replicas)
                .rev()
                .find(|o| self.pods[o].revision != self.sts.update_rev);
            if let Some(ord) = target {
                let name = self.pods[&ord].name.clone();
                let rev = self.sts.update_rev.clone();
                self.event(
                    &format!("statefulset/{}", self.sts.name),
                    "RollingUpdate",
                    format!("replacing {name} with revision {rev}"),
                );
                self.delete_pod(ord, "rolling update");
                return;
            }
        }
        if (0..replicas).all(|o| {
            self.pods
                .get(&o)
                .is_some_and(|p| p.revision == self.sts.update_rev)
        }) && self.sts.current_rev != self.sts.update_rev
        {
            self.sts.current_rev = self.sts.update_rev.clone();
            let sts = self.sts.name.clone();
            let rev = self.sts.current_rev.clone();
            self.event(
                &format!("statefulset/{sts}"),
                "UpdateComplete",
                format!("all pods at revision {rev}"),
            );
        }
    }

    pub(super) fn apply(&mut self, yaml: &str) -> Result<String> {
        let m = Manifests::parse(yaml)?;
        let new = sts_state(&m)?;
        let policies = compile_policies(&m)?;
        let old = &self.sts;
        if new.name != old.name {
            bail!(
                "the new rendering has StatefulSet {:?}, the cluster runs {:?}",
                new.name,
                old.name
            );
        }
        let immutable = |field: &str| {
            anyhow!(
                "StatefulSet.apps {:?} is invalid: spec: Forbidden: updates to statefulset spec for fields other than \
                 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and \
                 'minReadySeconds' are forbidden (changed: {field})",
                new.name
            )
        };
        if new.parallel != old.parallel {
            return Err(immutable("podManagementPolicy"));
        }
        if new.service_name != old.service_name {
            return Err(immutable("serviceName"));
        }
        if new
            .claims
            .iter()
            .map(|c| &c.0)
            .ne(old.claims.iter().map(|c| &c.0))
        {
            return Err(immutable("volumeClaimTemplates"));
        }
        let template = new
            .revisions
            .get(&new.update_rev)
            .cloned()
            .expect("the new template");
        let services = services_of(&m, &self.services, &mut self.next_service_ip)?;
        for s in &services {
            if let Some(ip) = s.cluster_ip
                && !self.services.iter().any(|o| o.cluster_ip == Some(ip))
            {
                net::add_service_ip(&self.cfg.name, ip)?;
            }
        }
        let mut warnings = String::new();
        for sec in &m.secrets {
            let name = sec.metadata.name.clone().unwrap_or_default();
            if self
                .manifests
                .secret(&name)
                .is_some_and(|old| old.data != sec.data || old.string_data != sec.string_data)
            {
                warnings.push_str(&format!(
                    "; warning: Secret {name} changed. `helm template` cannot `lookup` the existing Secret, so a value \
                     the chart generates at random changes on every render; pass it explicitly (e.g. --set auth.token=...) \
                     to keep it"
                ));
            }
        }
        self.services = services;
        self.manifests = m;
        self.policies = policies;
        // The new policies hold once the upgrade returns.
        self.enforce_policies();
        self.revision += 1;
        self.deployed_s = unix_now();
        self.sts.replicas = new.replicas;
        self.sts.on_delete = new.on_delete;
        self.sts.partition = new.partition;
        self.sts.revisions.insert(new.update_rev.clone(), template);
        let changed = self.sts.update_rev != new.update_rev;
        self.sts.update_rev = new.update_rev.clone();
        let msg = format!(
            "replicas {}, partition {}, update revision {}{}{warnings}",
            new.replicas,
            new.partition,
            new.update_rev,
            if changed { " (new)" } else { " (unchanged)" }
        );
        let sts = self.sts.name.clone();
        self.event(&format!("statefulset/{sts}"), "Updated", msg.clone());
        Ok(msg)
    }

    pub(super) fn client_service(&self) -> Option<SocketAddr> {
        let labels = self
            .sts
            .revisions
            .get(&self.sts.update_rev)?
            .metadata
            .as_ref()?
            .labels
            .clone()?;
        self.services
            .iter()
            .find(|s| !s.headless() && s.selects(&labels))
            .and_then(|s| Some(SocketAddr::from((s.cluster_ip?, s.ports.first()?.port))))
    }
}
