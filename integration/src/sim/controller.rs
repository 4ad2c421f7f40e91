//! The simulator daemon: the StatefulSet controller, the kubelet's probes and
//! restarts, the endpoints that feed DNS and the Service proxy, and the
//! control socket.
//!
//! One reconcile pass runs every 100 ms over the whole state (a handful of
//! pods), under one lock that is never held across an `.await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;

use super::control::{
    ClaimStatus, ClusterStatus, Event, PodInfo, PodStatus, Request, Response, ServiceStatus,
};
use super::dns::{self, SharedZone, Zone};
use super::endpoints::{PodRec, ServicePort, ServiceRec};
use super::manifest::Manifests;
use super::net;
use super::pod::{self, PodFacts, PodPlan, ProbeAction, ProbeSpec};

/// How the daemon was started.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Cluster name (namespace prefix `tsim-<name>-`).
    pub name: String,
    /// State directory (socket, claims, logs, pod files).
    pub state_dir: PathBuf,
    /// The local build standing in for the image.
    pub tally_bin: PathBuf,
    /// This executable (for `pod-init`).
    pub self_exe: PathBuf,
    /// TTL of DNS answers.
    pub dns_ttl: u32,
    /// First CrashLoopBackOff delay (the kubelet's is 10 s, doubling to 5 min).
    pub restart_backoff: Duration,
    /// Cluster domain.
    pub domain: String,
}

#[derive(Debug, Default)]
struct ProbeState {
    /// When the next probe is due; `None` while not running.
    next_due: Option<Instant>,
    /// A probe is in flight.
    in_flight: bool,
    /// Consecutive successes.
    successes: u32,
    /// Consecutive failures.
    failures: u32,
}

#[derive(Debug)]
struct Container {
    /// The `pod-init` process, which became the container's command.
    child: Child,
    /// Its pid.
    pid: u32,
    /// Serial number of this container in the pod (probe results carry it).
    serial: u64,
    /// When it started.
    started_at: Instant,
    /// SIGTERM was sent; SIGKILL at this instant.
    kill_at: Option<Instant>,
    /// Why it is being killed (for the restart event).
    kill_reason: Option<String>,
}

#[derive(Debug)]
struct SimPod {
    name: String,
    ordinal: u32,
    revision: String,
    ip: Ipv4Addr,
    netns: String,
    created: Instant,
    plan: PodPlan,
    container: Option<Container>,
    serial: u64,
    restarts: u32,
    started: bool,
    ready: bool,
    next_start: Option<Instant>,
    terminating: Option<Instant>,
    startup: ProbeState,
    liveness: ProbeState,
    readiness: ProbeState,
    logs: Vec<PathBuf>,
    waiting_reason: Option<String>,
}

#[derive(Debug)]
struct StsState {
    name: String,
    namespace: String,
    replicas: u32,
    parallel: bool,
    on_delete: bool,
    partition: u32,
    service_name: String,
    claims: Vec<(String, String, String)>,
    revisions: HashMap<String, PodTemplateSpec>,
    current_rev: String,
    update_rev: String,
}

#[derive(Debug)]
struct ProbeResult {
    ordinal: u32,
    serial: u64,
    kind: ProbeKind,
    ok: bool,
    detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

/// Service proxy routing: `clusterIP:port` -> ready endpoints.
type ProxyTable = Arc<RwLock<HashMap<SocketAddr, Vec<SocketAddr>>>>;

struct Sim {
    cfg: DaemonConfig,
    start: Instant,
    manifests: Manifests,
    sts: StsState,
    services: Vec<ServiceRec>,
    pods: BTreeMap<u32, SimPod>,
    claims: BTreeMap<String, (Instant, String, String)>,
    events: Vec<Event>,
    next_ip: u32,
    next_veth: u32,
    next_service_ip: u8,
    probe_tx: mpsc::UnboundedSender<ProbeResult>,
    zone: SharedZone,
    proxy: ProxyTable,
    listeners: HashSet<SocketAddr>,
    new_listeners: Vec<SocketAddr>,
}

fn revision_of(sts: &str, t: &PodTemplateSpec) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(t).unwrap_or_default().hash(&mut h);
    format!("{sts}-{:08x}", h.finish() as u32)
}

fn sts_state(m: &Manifests) -> Result<StsState> {
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

fn services_of(m: &Manifests, old: &[ServiceRec], next_ip: &mut u8) -> Result<Vec<ServiceRec>> {
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

fn send(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

fn fmt_age(secs: f64) -> String {
    let s = secs as u64;
    if s < 120 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    }
}

impl Sim {
    fn event(&mut self, object: &str, reason: &str, message: impl Into<String>) {
        let e = Event {
            t: self.start.elapsed().as_secs_f64(),
            object: object.to_string(),
            reason: reason.to_string(),
            message: message.into(),
        };
        eprintln!("{:8.3}s {} {} {}", e.t, e.object, e.reason, e.message);
        self.events.push(e);
    }

    fn pod_recs(&self) -> Vec<PodRec> {
        self.pods
            .values()
            .map(|p| PodRec {
                name: p.name.clone(),
                namespace: self.sts.namespace.clone(),
                labels: p.plan.labels.clone(),
                ip: Some(p.ip),
                ready: p.ready,
                terminating: p.terminating.is_some(),
                hostname: Some(p.name.clone()),
                subdomain: Some(self.sts.service_name.clone()),
                container_ports: p.plan.container_ports.clone(),
            })
            .collect()
    }

    fn publish(&mut self) {
        let pods = self.pod_recs();
        let zone = Zone::build(&self.cfg.domain, self.cfg.dns_ttl, &self.services, &pods);
        if let Ok(mut z) = self.zone.write() {
            *z = Arc::new(zone);
        }
        let mut table = HashMap::new();
        for svc in &self.services {
            let Some(cip) = svc.cluster_ip else { continue };
            let eps = svc.endpoints(&pods);
            for (i, p) in svc.ports.iter().enumerate() {
                let addr = SocketAddr::from((cip, p.port));
                let ready: Vec<SocketAddr> = eps
                    .iter()
                    .filter(|e| e.ready)
                    .filter_map(|e| e.target_ports[i].map(|tp| SocketAddr::from((e.ip, tp))))
                    .collect();
                table.insert(addr, ready);
                if self.listeners.insert(addr) {
                    self.new_listeners.push(addr);
                }
            }
        }
        if let Ok(mut t) = self.proxy.write() {
            *t = table;
        }
    }

    fn alloc_ip(&mut self) -> Ipv4Addr {
        loop {
            let n = self.next_ip;
            self.next_ip = self.next_ip.wrapping_add(1) % (254 * 250);
            let ip = Ipv4Addr::new(10, 244, 1 + (n / 250) as u8, 2 + (n % 250) as u8);
            if !self.pods.values().any(|p| p.ip == ip) {
                return ip;
            }
        }
    }

    fn claim_dir(&self, claim: &str, ordinal: u32) -> (String, PathBuf) {
        let name = format!("{claim}-{}-{ordinal}", self.sts.name);
        let dir = self.cfg.state_dir.join("pvc").join(&name);
        (name, dir)
    }

    /// Creates pod `ordinal` from `revision`: its sandbox, then its container.
    fn create_pod(&mut self, ordinal: u32, revision: String) -> Result<()> {
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
        let ip = self.alloc_ip();
        let netns = net::pod_ns(&self.cfg.name, &name);
        let pod_dir = self.cfg.state_dir.join("pods").join(&name);
        let _ = fs::remove_dir_all(&pod_dir);
        fs::create_dir_all(&pod_dir)?;
        let plan = pod::plan(&PodFacts {
            manifests: &self.manifests,
            template: &template,
            pod_name: &name,
            namespace: &self.sts.namespace,
            subdomain: &self.sts.service_name,
            domain: &self.cfg.domain,
            pod_ip: ip,
            dns_ip: net::DNS_IP,
            netns: net::ns_path(&netns),
            pod_dir,
            claims,
            tally_bin: self.cfg.tally_bin.clone(),
        })?;
        net::delete_ns(&netns)?;
        let veth = format!("veth{}", self.next_veth);
        self.next_veth += 1;
        net::attach(&self.cfg.name, &netns, &veth, ip)?;
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

    fn start_container(&mut self, ordinal: u32) -> Result<()> {
        let self_exe = self.cfg.self_exe.clone();
        let state_dir = self.cfg.state_dir.clone();
        let Some(p) = self.pods.get_mut(&ordinal) else {
            return Ok(());
        };
        let pod_dir = state_dir.join("pods").join(&p.name);
        let spec_path = pod_dir.join("launch.json");
        fs::write(&spec_path, serde_json::to_vec_pretty(&p.plan.launch)?)?;
        let log_dir = state_dir.join("logs").join(&p.name);
        fs::create_dir_all(&log_dir)?;
        let log_path = log_dir.join(format!("{}.log", p.logs.len()));
        let log = fs::File::create(&log_path)?;
        let child = Command::new(&self_exe)
            .arg("pod-init")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self_exe.display()))?;
        p.serial += 1;
        let now = Instant::now();
        let pid = child.id();
        p.container = Some(Container {
            child,
            pid,
            serial: p.serial,
            started_at: now,
            kill_at: None,
            kill_reason: None,
        });
        p.logs.push(log_path);
        p.next_start = None;
        p.waiting_reason = None;
        p.ready = false;
        p.started = p.plan.probes.startup.is_none();
        let due = |s: &Option<ProbeSpec>| s.as_ref().map(|s| now + s.initial_delay);
        p.startup = ProbeState {
            next_due: due(&p.plan.probes.startup),
            ..Default::default()
        };
        p.liveness = ProbeState {
            next_due: due(&p.plan.probes.liveness),
            ..Default::default()
        };
        p.readiness = ProbeState {
            next_due: due(&p.plan.probes.readiness),
            ..Default::default()
        };
        if p.started && p.plan.probes.readiness.is_none() {
            p.ready = true;
        }
        let (name, restarts) = (p.name.clone(), p.restarts);
        self.event(
            &format!("pod/{name}"),
            "Started",
            format!("container started (pid {pid}, restarts {restarts})"),
        );
        Ok(())
    }

    /// Starts the kill of a container: SIGTERM now, SIGKILL after the grace period.
    fn kill_container(&mut self, ordinal: u32, reason: &str) {
        let Some(p) = self.pods.get_mut(&ordinal) else {
            return;
        };
        let grace = p.plan.grace;
        let name = p.name.clone();
        if let Some(c) = p.container.as_mut()
            && c.kill_at.is_none()
        {
            send(c.pid, Signal::SIGTERM);
            c.kill_at = Some(Instant::now() + grace);
            c.kill_reason = Some(reason.to_string());
        }
        p.ready = false;
        self.event(
            &format!("pod/{name}"),
            "Killing",
            format!("{reason}; SIGTERM, SIGKILL after {}s", grace.as_secs()),
        );
    }

    fn delete_pod(&mut self, ordinal: u32, why: &str) {
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

    fn on_probe(&mut self, r: ProbeResult) {
        let Some(p) = self.pods.get_mut(&r.ordinal) else {
            return;
        };
        let Some(c) = p.container.as_ref() else {
            return;
        };
        if c.serial != r.serial || c.kill_at.is_some() {
            return;
        }
        let spec = match r.kind {
            ProbeKind::Startup => p.plan.probes.startup.clone(),
            ProbeKind::Liveness => p.plan.probes.liveness.clone(),
            ProbeKind::Readiness => p.plan.probes.readiness.clone(),
        };
        let Some(spec) = spec else { return };
        let state = match r.kind {
            ProbeKind::Startup => &mut p.startup,
            ProbeKind::Liveness => &mut p.liveness,
            ProbeKind::Readiness => &mut p.readiness,
        };
        state.in_flight = false;
        if r.ok {
            state.successes += 1;
            state.failures = 0;
        } else {
            state.failures += 1;
            state.successes = 0;
        }
        let (succ, fail) = (state.successes, state.failures);
        let name = p.name.clone();
        let obj = format!("pod/{name}");
        match r.kind {
            ProbeKind::Startup => {
                if r.ok && !p.started {
                    p.started = true;
                    p.startup.next_due = None;
                    if p.plan.probes.readiness.is_none() {
                        p.ready = true;
                    }
                    self.event(&obj, "Started", "startup probe succeeded");
                } else if fail >= spec.failure_threshold {
                    let why = format!("startup probe failed {fail} times: {}", r.detail);
                    self.kill_container(r.ordinal, &why);
                }
            }
            ProbeKind::Liveness => {
                if !r.ok {
                    self.event(
                        &obj,
                        "Unhealthy",
                        format!(
                            "liveness probe failed ({fail}/{}): {}",
                            spec.failure_threshold, r.detail
                        ),
                    );
                }
                if fail >= spec.failure_threshold {
                    self.kill_container(
                        r.ordinal,
                        "liveness probe failed; the container will be restarted",
                    );
                }
            }
            ProbeKind::Readiness => {
                if r.ok && !p.ready && succ >= spec.success_threshold {
                    p.ready = true;
                    self.event(&obj, "Ready", "readiness probe succeeded");
                } else if !r.ok && p.ready && fail >= spec.failure_threshold {
                    p.ready = false;
                    self.event(
                        &obj,
                        "NotReady",
                        format!("readiness probe failed: {}", r.detail),
                    );
                }
            }
        }
    }

    fn run_probes(&mut self) {
        let now = Instant::now();
        for p in self.pods.values_mut() {
            let Some(c) = p.container.as_ref() else {
                continue;
            };
            if c.kill_at.is_some() {
                continue;
            }
            let kinds: [(ProbeKind, Option<ProbeSpec>, bool); 3] = [
                (
                    ProbeKind::Startup,
                    p.plan.probes.startup.clone(),
                    !p.started,
                ),
                (
                    ProbeKind::Liveness,
                    p.plan.probes.liveness.clone(),
                    p.started,
                ),
                (
                    ProbeKind::Readiness,
                    p.plan.probes.readiness.clone(),
                    p.started,
                ),
            ];
            for (kind, spec, active) in kinds {
                let Some(spec) = spec else { continue };
                if !active {
                    continue;
                }
                let state = match kind {
                    ProbeKind::Startup => &mut p.startup,
                    ProbeKind::Liveness => &mut p.liveness,
                    ProbeKind::Readiness => &mut p.readiness,
                };
                let due = *state.next_due.get_or_insert(now);
                if state.in_flight || due > now {
                    continue;
                }
                state.in_flight = true;
                state.next_due = Some(now + spec.period);
                let tx = self.probe_tx.clone();
                let (ip, ordinal, serial) = (p.ip, p.ordinal, c.serial);
                tokio::spawn(async move {
                    let (ok, detail) = probe_once(ip, &spec).await;
                    let _ = tx.send(ProbeResult {
                        ordinal,
                        serial,
                        kind,
                        ok,
                        detail,
                    });
                });
            }
        }
    }

    /// The kubelet part: notice exits, restart, SIGKILL after grace,
    /// finish deletions.
    fn kubelet(&mut self) {
        let now = Instant::now();
        let ordinals: Vec<u32> = self.pods.keys().copied().collect();
        for ord in ordinals {
            let mut exited = None;
            if let Some(p) = self.pods.get_mut(&ord)
                && let Some(c) = p.container.as_mut()
            {
                match c.child.try_wait() {
                    Ok(Some(status)) => {
                        exited = Some((status, c.kill_reason.clone(), c.started_at))
                    }
                    Ok(None) => {
                        if c.kill_at.is_some_and(|t| t <= now) {
                            send(c.pid, Signal::SIGKILL);
                            c.kill_at = Some(now + Duration::from_secs(3600));
                        }
                    }
                    Err(_) => {}
                }
            }
            if let Some((status, reason, started_at)) = exited {
                let backoff_base = self.cfg.restart_backoff;
                let p = self.pods.get_mut(&ord).expect("pod exists");
                p.container = None;
                p.ready = false;
                p.started = false;
                let name = p.name.clone();
                let terminating = p.terminating.is_some();
                if !terminating {
                    // restartPolicy: Always, with the kubelet's back-off.
                    if started_at.elapsed() > Duration::from_secs(600) {
                        p.restarts = 0;
                    }
                    let delay = if p.restarts == 0 {
                        Duration::ZERO
                    } else {
                        (backoff_base * 2u32.saturating_pow(p.restarts - 1))
                            .min(Duration::from_secs(300))
                    };
                    p.restarts += 1;
                    p.next_start = Some(now + delay);
                    p.waiting_reason = Some(if delay.is_zero() {
                        "ContainerCreating".into()
                    } else {
                        "CrashLoopBackOff".into()
                    });
                }
                let why = reason.unwrap_or_else(|| "the container exited by itself".into());
                self.event(
                    &format!("pod/{name}"),
                    "Exited",
                    format!("{status} ({why})"),
                );
            }
            let p = self.pods.get_mut(&ord).expect("pod exists");
            if p.terminating.is_some() && p.container.is_none() {
                let p = self.pods.remove(&ord).expect("pod exists");
                if let Err(e) = net::delete_ns(&p.netns) {
                    eprintln!("warning: {e:#}");
                }
                let _ = fs::remove_dir_all(self.cfg.state_dir.join("pods").join(&p.name));
                self.event(&format!("pod/{}", p.name), "Deleted", "pod removed");
                continue;
            }
            if p.container.is_none()
                && p.terminating.is_none()
                && p.next_start.is_some_and(|t| t <= now)
                && let Err(e) = self.start_container(ord)
            {
                let name = self.pods[&ord].name.clone();
                self.event(&format!("pod/{name}"), "Failed", format!("{e:#}"));
                if let Some(p) = self.pods.get_mut(&ord) {
                    p.next_start = Some(now + Duration::from_secs(5));
                    p.waiting_reason = Some("CreateContainerError".into());
                }
            }
        }
    }

    fn healthy(&self, ord: u32) -> bool {
        self.pods
            .get(&ord)
            .is_some_and(|p| p.ready && p.terminating.is_none() && p.container.is_some())
    }

    /// The StatefulSet controller part.
    fn statefulset(&mut self) {
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

    fn reconcile(&mut self, results: Vec<ProbeResult>) {
        for r in results {
            self.on_probe(r);
        }
        self.kubelet();
        self.statefulset();
        self.run_probes();
        self.publish();
    }

    fn apply(&mut self, yaml: &str) -> Result<String> {
        let m = Manifests::parse(yaml)?;
        let new = sts_state(&m)?;
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

    fn client_service(&self) -> Option<SocketAddr> {
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

    fn status(&self) -> ClusterStatus {
        let pods = self.pod_recs();
        let pods_status = self
            .pods
            .values()
            .map(|p| PodStatus {
                name: p.name.clone(),
                ordinal: p.ordinal,
                ip: p.ip,
                ready: p.ready,
                phase: if p.terminating.is_some() {
                    "Terminating".into()
                } else if let Some(w) = &p.waiting_reason {
                    w.clone()
                } else {
                    "Running".into()
                },
                restarts: p.restarts,
                revision: p.revision.clone(),
                pid: p.container.as_ref().map(|c| c.pid),
                age_s: p.created.elapsed().as_secs_f64(),
            })
            .collect();
        let services = self
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                type_: s.type_.clone(),
                cluster_ip: s.cluster_ip,
                ports: s
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol.to_ascii_uppercase()))
                    .collect(),
                ready_endpoints: s
                    .endpoints(&pods)
                    .iter()
                    .filter(|e| e.ready)
                    .filter_map(|e| {
                        e.target_ports
                            .first()
                            .copied()
                            .flatten()
                            .map(|p| format!("{}:{p}", e.ip))
                    })
                    .collect(),
            })
            .collect();
        let claims = self
            .claims
            .iter()
            .map(|(name, (created, capacity, modes))| ClaimStatus {
                name: name.clone(),
                path: self.cfg.state_dir.join("pvc").join(name),
                capacity: capacity.clone(),
                access_modes: modes.clone(),
                age_s: created.elapsed().as_secs_f64(),
            })
            .collect();
        ClusterStatus {
            name: self.cfg.name.clone(),
            namespace: self.sts.namespace.clone(),
            statefulset: self.sts.name.clone(),
            service_name: self.sts.service_name.clone(),
            replicas: self.sts.replicas,
            ready_replicas: (0..self.sts.replicas).filter(|o| self.healthy(*o)).count() as u32,
            pod_management_policy: if self.sts.parallel {
                "Parallel".into()
            } else {
                "OrderedReady".into()
            },
            current_revision: self.sts.current_rev.clone(),
            update_revision: self.sts.update_rev.clone(),
            pods: pods_status,
            services,
            claims,
            client_service: self.client_service().map(|a| a.to_string()),
            client_netns: net::client_ns(&self.cfg.name),
            age_s: self.start.elapsed().as_secs_f64(),
        }
    }

    fn table(&self) -> String {
        render_table(&self.status())
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Get => Response::Text(self.table()),
            Request::Events => Response::Events(self.events.clone()),
            Request::PodInfo { pod } => match self.pods.values().find(|p| p.name == pod) {
                None => Response::Error(format!("pod {pod:?} not found (see `get`)")),
                Some(p) => match &p.container {
                    None => Response::Error(format!(
                        "pod {pod} has no running container (it is {:?})",
                        p.waiting_reason
                    )),
                    Some(c) => Response::PodInfo(PodInfo {
                        pid: c.pid,
                        uid: p.plan.launch.uid,
                        gid: p.plan.launch.gid,
                        groups: p.plan.launch.groups.clone(),
                        env: p.plan.launch.env.clone(),
                        log: p.logs.last().cloned().unwrap_or_default(),
                        previous_log: p.logs.len().checked_sub(2).map(|i| p.logs[i].clone()),
                    }),
                },
            },
            Request::DeletePod { pod } => match self
                .pods
                .values()
                .find(|p| p.name == pod)
                .map(|p| p.ordinal)
            {
                None => Response::Error(format!("pod {pod:?} not found (see `get`)")),
                Some(ord) => {
                    self.delete_pod(ord, "deleted by the user");
                    Response::Ok(format!("pod \"{pod}\" deleted"))
                }
            },
            Request::Scale { replicas } => {
                self.sts.replicas = replicas;
                let sts = self.sts.name.clone();
                self.event(
                    &format!("statefulset/{sts}"),
                    "Scaled",
                    format!("replicas {replicas}"),
                );
                Response::Ok(format!("statefulset.apps/{sts} scaled"))
            }
            Request::Apply { manifests } => match self.apply(&manifests) {
                Ok(msg) => Response::Ok(msg),
                Err(e) => Response::Error(format!("{e:#}")),
            },
            Request::Down => Response::Ok("down".into()),
        }
    }
}

/// Formats the status like `kubectl get po,sts,svc,pvc`.
pub fn render_table(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let mut rows = vec![vec![
        "NAME".to_string(),
        "READY".into(),
        "STATUS".into(),
        "RESTARTS".into(),
        "AGE".into(),
        "IP".into(),
    ]];
    for p in &s.pods {
        rows.push(vec![
            format!("pod/{}", p.name),
            format!("{}/1", u8::from(p.ready)),
            p.phase.clone(),
            p.restarts.to_string(),
            fmt_age(p.age_s),
            p.ip.to_string(),
        ]);
    }
    out.push_str(&columns(&rows));
    out.push('\n');
    out.push_str(&columns(&[
        vec!["NAME".into(), "READY".into(), "AGE".into()],
        vec![
            format!("statefulset.apps/{}", s.statefulset),
            format!("{}/{}", s.ready_replicas, s.replicas),
            fmt_age(s.age_s),
        ],
    ]));
    out.push('\n');
    let mut rows = vec![vec![
        "NAME".to_string(),
        "TYPE".into(),
        "CLUSTER-IP".into(),
        "EXTERNAL-IP".into(),
        "PORT(S)".into(),
        "AGE".into(),
    ]];
    for svc in &s.services {
        rows.push(vec![
            format!("service/{}", svc.name),
            svc.type_.clone(),
            svc.cluster_ip
                .map_or_else(|| "None".into(), |ip| ip.to_string()),
            "<none>".into(),
            svc.ports.join(","),
            fmt_age(s.age_s),
        ]);
    }
    out.push_str(&columns(&rows));
    out.push('\n');
    let mut rows = vec![vec![
        "NAME".to_string(),
        "STATUS".into(),
        "VOLUME".into(),
        "CAPACITY".into(),
        "ACCESS MODES".into(),
        "AGE".into(),
    ]];
    for c in &s.claims {
        rows.push(vec![
            format!("persistentvolumeclaim/{}", c.name),
            "Bound".into(),
            c.path.display().to_string(),
            c.capacity.clone(),
            c.access_modes.clone(),
            fmt_age(c.age_s),
        ]);
    }
    out.push_str(&columns(&rows));
    out
}

fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

async fn probe_once(ip: Ipv4Addr, spec: &ProbeSpec) -> (bool, String) {
    let attempt = async {
        match &spec.action {
            ProbeAction::Tcp { port } => {
                TcpStream::connect((ip, *port))
                    .await
                    .map_err(|e| format!("dial tcp {ip}:{port}: {e}"))?;
                Ok::<String, String>("connected".into())
            }
            ProbeAction::Http { port, path } => {
                let mut s = TcpStream::connect((ip, *port))
                    .await
                    .map_err(|e| format!("Get http://{ip}:{port}{path}: {e}"))?;
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.34\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
                let head = String::from_utf8_lossy(&buf);
                let code: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or("no HTTP status")?;
                if (200..400).contains(&code) {
                    Ok(format!("HTTP {code}"))
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            }
        }
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(Ok(d)) => (true, d),
        Ok(Err(e)) => (false, e),
        Err(_) => (
            false,
            format!(
                "timeout after {}s (context deadline exceeded)",
                spec.timeout.as_secs()
            ),
        ),
    }
}

/// A small xorshift generator: the proxy picks endpoints at random, as
/// kube-proxy's iptables mode does (`statistic --mode random`).
fn next_random(state: &AtomicUsize) -> usize {
    let mut x = state.load(Ordering::Relaxed) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.store(x, Ordering::Relaxed);
    x
}

async fn proxy_listener(addr: SocketAddr, table: ProxyTable) {
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

/// Stops every pod (SIGTERM, then SIGKILL after at most `grace`) and removes
/// the namespaces and the state directory.
fn teardown(sim: &Mutex<Sim>, grace: Duration) {
    let mut s = match sim.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    for p in s.pods.values_mut() {
        if let Some(c) = &p.container {
            send(c.pid, Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let mut alive = 0;
        for p in s.pods.values_mut() {
            if let Some(c) = p.container.as_mut()
                && matches!(c.child.try_wait(), Ok(None))
            {
                alive += 1;
                if Instant::now() >= deadline {
                    send(c.pid, Signal::SIGKILL);
                }
            }
        }
        if alive == 0 {
            break;
        }
        if Instant::now() >= deadline + Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let name = s.cfg.name.clone();
    let dir = s.cfg.state_dir.clone();
    drop(s);
    if let Err(e) = super::cleanup::force_down(&name, &dir, false) {
        eprintln!("warning: teardown: {e:#}");
    }
}

/// Runs the daemon for `yaml` until `down` or SIGTERM/SIGINT. Call it from a
/// fresh single-threaded process: it moves the process into the cluster's
/// network namespace before any thread exists.
pub fn run_daemon(cfg: DaemonConfig, yaml: &str) -> Result<()> {
    let manifests = Manifests::parse(yaml)?;
    let sts = sts_state(&manifests)?;
    let mut next_service_ip = 11u8;
    let services = services_of(&manifests, &[], &mut next_service_ip)?;
    fs::create_dir_all(&cfg.state_dir)?;
    fs::write(
        cfg.state_dir.join("daemon.pid"),
        std::process::id().to_string(),
    )?;
    net::create_cluster_network(&cfg.name).inspect_err(|_| {
        let _ = super::cleanup::force_down(&cfg.name, &cfg.state_dir, false);
    })?;
    for s in &services {
        if let Some(ip) = s.cluster_ip {
            net::add_service_ip(&cfg.name, ip)?;
        }
    }
    net::enter(&net::cluster_ns(&cfg.name))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (probe_tx, probe_rx) = mpsc::unbounded_channel();
    let sim = Sim {
        cfg: cfg.clone(),
        start: Instant::now(),
        manifests,
        sts,
        services,
        pods: BTreeMap::new(),
        claims: BTreeMap::new(),
        events: Vec::new(),
        next_ip: 0,
        next_veth: 0,
        next_service_ip,
        probe_tx,
        zone: Arc::new(RwLock::new(Arc::new(Zone::default()))),
        proxy: Arc::new(RwLock::new(HashMap::new())),
        listeners: HashSet::new(),
        new_listeners: Vec::new(),
    };
    let sim = Arc::new(Mutex::new(sim));
    let result = rt.block_on(daemon_main(sim.clone(), probe_rx));
    teardown(&sim, Duration::from_secs(5));
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn daemon_main(
    sim: Arc<Mutex<Sim>>,
    mut probe_rx: mpsc::UnboundedReceiver<ProbeResult>,
) -> Result<()> {
    let (zone, proxy, sock, name) = {
        let mut s = sim.lock().map_err(|_| anyhow!("state lock poisoned"))?;
        s.publish();
        let sts = s.sts.name.clone();
        let msg = format!(
            "{} replicas, {}, serviceName {:?}",
            s.sts.replicas,
            if s.sts.parallel {
                "Parallel"
            } else {
                "OrderedReady"
            },
            s.sts.service_name
        );
        s.event(&format!("statefulset/{sts}"), "Created", msg);
        (
            s.zone.clone(),
            s.proxy.clone(),
            s.cfg.state_dir.join("ctl.sock"),
            s.cfg.name.clone(),
        )
    };
    let dns_addr = SocketAddr::from((net::DNS_IP, 53));
    let dns_task = tokio::spawn(dns::serve(dns_addr, zone));
    let _ = fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let (down_tx, mut down_rx) = mpsc::unbounded_channel::<()>();
    let ctl_sim = sim.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sim = ctl_sim.clone();
            let down_tx = down_tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let response = match serde_json::from_str::<Request>(&line) {
                    Err(e) => Response::Error(format!("bad request: {e}")),
                    Ok(Request::Down) => {
                        let _ = down_tx.send(());
                        Response::Ok("tearing down".into())
                    }
                    Ok(req) => match sim.lock() {
                        Ok(mut s) => s.handle(req),
                        Err(_) => Response::Error("state lock poisoned".into()),
                    },
                };
                let mut out = serde_json::to_string(&response).unwrap_or_default();
                out.push('\n');
                let _ = w.write_all(out.as_bytes()).await;
            });
        }
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    eprintln!("tally-sim {name}: up; control socket {}", sock.display());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sigterm.recv() => { eprintln!("SIGTERM: tearing down"); break; }
            _ = sigint.recv() => { eprintln!("SIGINT: tearing down"); break; }
            _ = down_rx.recv() => { eprintln!("down requested: tearing down"); break; }
        }
        if dns_task.is_finished() {
            bail!("the DNS server stopped");
        }
        let mut results = Vec::new();
        while let Ok(r) = probe_rx.try_recv() {
            results.push(r);
        }
        let new_listeners = {
            let mut s = sim.lock().map_err(|_| anyhow!("state lock poisoned"))?;
            s.reconcile(results);
            std::mem::take(&mut s.new_listeners)
        };
        for addr in new_listeners {
            tokio::spawn(proxy_listener(addr, proxy.clone()));
        }
    }
    Ok(())
}

/// Path of a cluster's control socket.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ctl.sock")
}
