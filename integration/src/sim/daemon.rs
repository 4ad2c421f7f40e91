//! The simulator daemon: owns the cluster state, runs one reconcile pass
//! every 100 ms (kubelet, StatefulSet controller, probes, publication to DNS
//! and the Service proxy) under one lock that is never held across an
//! `.await`, and answers the control socket.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::control::{
    ClaimStatus, ClusterStatus, Event, PodInfo, PodStatus, Request, Response, ServiceStatus,
};
use super::dns::{self, SharedZone, Zone};
use super::endpoints::{PodRec, ServiceRec};
use super::hook::{HookPod, unix_now};
use super::image::Image;
use super::kubelet::{ProbeResult, SimPod, send};
use super::manifest::Manifests;
use super::nemesis::nft_apply;
use super::net;
use super::netpol::{self, Member, Policy, namespace_labels, rules_for};
use super::proxy::{ServiceProxy, proxy_listener};
use super::statefulset::{StsState, services_of, sts_state};
use super::status::render_table;

/// How the daemon was started.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Cluster name (namespace prefix `tsim-<name>-`).
    pub name: String,
    /// State directory (socket, claims, logs, pod files).
    pub state_dir: PathBuf,
    /// The image the pods run (staged around the local build).
    pub image: Image,
    /// This executable (for `pod-init`).
    pub self_exe: PathBuf,
    /// TTL of DNS answers.
    pub dns_ttl: u32,
    /// CoreDNS `cache N`, seconds; 0 = no cache.
    pub dns_cache: u32,
    /// Each claim is a tmpfs of this many MiB (so a `volume-full` fault
    /// fills it, not the host's disk); 0 = plain directories.
    pub volume_limit_mb: u32,
    /// First CrashLoopBackOff delay (the kubelet's is 10 s, doubling to 5 min).
    pub restart_backoff: Duration,
    /// Cluster domain.
    pub domain: String,
}

pub(super) struct Sim {
    pub(super) cfg: DaemonConfig,
    pub(super) start: Instant,
    pub(super) manifests: Manifests,
    pub(super) sts: StsState,
    pub(super) services: Vec<ServiceRec>,
    pub(super) pods: BTreeMap<u32, SimPod>,
    pub(super) claims: BTreeMap<String, (Instant, String, String)>,
    pub(super) events: Vec<Event>,
    pub(super) next_ip: u32,
    pub(super) next_veth: u32,
    pub(super) next_service_ip: u8,
    pub(super) probe_tx: mpsc::UnboundedSender<ProbeResult>,
    pub(super) zone: SharedZone,
    pub(super) proxy: ServiceProxy,
    /// Processes a `pause` fault stopped (SIGCONT at heal).
    pub(super) paused: Vec<u32>,
    /// The `dns-servfail` fault is in place.
    pub(super) dns_servfail: bool,
    /// Filler files of `volume-full` faults (deleted at heal).
    pub(super) fillers: Vec<PathBuf>,
    /// The rendering's NetworkPolicies, checked.
    pub(super) policies: Vec<Policy>,
    /// The nftables script last applied per network namespace.
    pub(super) netpol_applied: BTreeMap<String, String>,
    /// The last error applying a namespace's script, until it applies.
    pub(super) netpol_failed: BTreeMap<String, String>,
    /// `helm test` pods by name (the last run of each).
    pub(super) hooks: BTreeMap<String, HookPod>,
    /// When the release was installed or last upgraded (Unix seconds).
    pub(super) deployed_s: u64,
    /// 1 at install, +1 per upgrade.
    pub(super) revision: u32,
}

/// Checks every NetworkPolicy of a rendering.
pub(super) fn compile_policies(m: &Manifests) -> Result<Vec<Policy>> {
    let ns = m.namespace();
    m.network_policies
        .iter()
        .map(|p| Policy::compile(p, &ns).map_err(anyhow::Error::from))
        .collect()
}

impl Sim {
    pub(super) fn event(&mut self, object: &str, reason: &str, message: impl Into<String>) {
        let e = Event {
            t: self.start.elapsed().as_secs_f64(),
            object: object.to_string(),
            reason: reason.to_string(),
            message: message.into(),
        };
        eprintln!("{:8.3}s {} {} {}", e.t, e.object, e.reason, e.message);
        self.events.push(e);
    }

    pub(super) fn pod_recs(&self) -> Vec<PodRec> {
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

    pub(super) fn publish(&mut self) {
        let pods = self.pod_recs();
        let mut zone = Zone::build(&self.cfg.domain, self.cfg.dns_ttl, &self.services, &pods);
        zone.servfail = self.dns_servfail;
        if let Ok(mut z) = self.zone.write() {
            *z = Arc::new(zone);
        }
        self.proxy.route(&self.services, &pods);
    }

    /// Every pod (name, network namespace, as NetworkPolicies see it).
    fn policy_pods(&self) -> Vec<(String, String, Member)> {
        let ns = &self.sts.namespace;
        let member =
            |labels: &BTreeMap<String, String>, ip, ports: &[(Option<String>, u16)]| Member {
                namespace: ns.clone(),
                namespace_labels: namespace_labels(ns),
                labels: labels.clone(),
                ip,
                ports: ports.to_vec(),
            };
        self.pods
            .values()
            .map(|p| {
                let m = member(&p.plan.labels, p.ip, &p.plan.container_ports);
                (p.name.clone(), p.netns.clone(), m)
            })
            .chain(self.hooks.iter().map(|(name, h)| {
                (
                    name.clone(),
                    h.netns.clone(),
                    member(&h.labels, h.ip, &h.ports),
                )
            }))
            .collect()
    }

    /// Makes every pod's nftables rules what the NetworkPolicies say, as a
    /// CNI plugin does when pods come and go; only changed scripts are
    /// applied. A failure is an event and is retried on the next pass.
    pub(super) fn enforce_policies(&mut self) {
        let pods = self.policy_pods();
        let mut members: Vec<Member> = pods.iter().map(|(_, _, m)| m.clone()).collect();
        // The cluster DNS server, labelled as kubeadm's CoreDNS pods are.
        members.push(Member {
            namespace: "kube-system".into(),
            namespace_labels: namespace_labels("kube-system"),
            labels: BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]),
            ip: net::DNS_IP,
            ports: vec![(Some("dns".into()), 53), (Some("dns-tcp".into()), 53)],
        });
        let alive = |netns: &String| pods.iter().any(|(_, n, _)| n == netns);
        self.netpol_applied.retain(|netns, _| alive(netns));
        self.netpol_failed.retain(|netns, _| alive(netns));
        for (name, netns, me) in pods {
            let script = match rules_for(&self.policies, &me, &members) {
                Some(rules) => netpol::nft_script(&rules, net::GATEWAY),
                // No policy selects it (any more): no table.
                None => format!(
                    "table inet {0} {{}}\ndelete table inet {0}\n",
                    netpol::TABLE
                ),
            };
            if self.netpol_applied.get(&netns) == Some(&script) {
                continue;
            }
            match nft_apply(&netns, &script) {
                Ok(()) => {
                    self.netpol_failed.remove(&netns);
                    self.netpol_applied.insert(netns, script);
                }
                Err(e) => {
                    // One event per new error, not one per pass.
                    let e = format!("{e:#}");
                    if self.netpol_failed.get(&netns) != Some(&e) {
                        self.event(&format!("pod/{name}"), "FailedNetworkPolicy", e.clone());
                        self.netpol_failed.insert(netns, e);
                    }
                }
            }
        }
    }

    pub(super) fn reconcile(&mut self, results: Vec<ProbeResult>) {
        for r in results {
            self.on_probe(r);
        }
        self.kubelet();
        self.statefulset();
        self.run_probes();
        self.publish();
        self.watch_tests();
        self.enforce_policies();
    }

    pub(super) fn status(&self) -> ClusterStatus {
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
            domain: self.cfg.domain.clone(),
            age_s: self.start.elapsed().as_secs_f64(),
        }
    }

    pub(super) fn table(&self) -> String {
        render_table(&self.status())
    }

    pub(super) fn handle(&mut self, req: Request) -> Response {
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
            Request::Fault { fault } => match self.inject(&fault) {
                Ok(msg) => Response::Ok(msg),
                Err(e) => Response::Error(format!("{e:#}")),
            },
            Request::Heal => Response::Ok(self.heal()),
            Request::RunTests => match self.run_tests() {
                Ok(msg) => Response::Ok(msg),
                Err(e) => Response::Error(format!("{e:#}")),
            },
            Request::Tests => Response::Tests(self.test_report()),
            Request::Down => Response::Ok("down".into()),
        }
    }
}

/// Stops every pod (SIGTERM, then SIGKILL after at most `grace`) and removes
/// the namespaces and the state directory.
fn teardown(sim: &Mutex<Sim>, grace: Duration) {
    let mut s = match sim.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    s.kill_tests();
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
    let policies = compile_policies(&manifests)?;
    if !policies.is_empty() && Command::new("nft").arg("--version").output().is_err() {
        bail!(
            "the rendered chart has a NetworkPolicy and the simulator enforces it with nftables, \
             but `nft` cannot be run: install nftables (`apt-get install nftables`; scripts/cluster \
             and the e2e suite install it)"
        );
    }
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
        proxy: ServiceProxy::default(),
        paused: Vec::new(),
        dns_servfail: false,
        fillers: Vec::new(),
        policies,
        netpol_applied: BTreeMap::new(),
        netpol_failed: BTreeMap::new(),
        hooks: BTreeMap::new(),
        deployed_s: unix_now(),
        revision: 1,
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
    let (zone, proxy, sock, name, dns_cache) = {
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
            s.proxy.table(),
            s.cfg.state_dir.join("ctl.sock"),
            s.cfg.name.clone(),
            s.cfg.dns_cache,
        )
    };
    let dns_addr = SocketAddr::from((net::DNS_IP, 53));
    let dns_cache = (dns_cache > 0).then(|| Duration::from_secs(dns_cache.into()));
    let dns_task = tokio::spawn(dns::serve(dns_addr, zone, dns_cache));
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
            s.proxy.take_new_listeners()
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
