//! The kubelet: starts each pod's container (through `pod-init`), runs its
//! startup, liveness and readiness probes, restarts it with back-off, kills it
//! with SIGTERM then SIGKILL after the grace period, and finishes deletions.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::daemon::Sim;
use super::net;
use k8s_openapi::api::core::v1::PodTemplateSpec;

use super::pod::{self, LaunchSpec, PodFacts, PodPlan, ProbeAction, ProbeSpec};

#[derive(Debug, Default)]
pub(super) struct ProbeState {
    /// When the next probe is due; `None` while not running.
    pub(super) next_due: Option<Instant>,
    /// A probe is in flight.
    pub(super) in_flight: bool,
    /// Consecutive successes.
    pub(super) successes: u32,
    /// Consecutive failures.
    pub(super) failures: u32,
}

#[derive(Debug)]
pub(super) struct Container {
    /// The `pod-init` process, which became the container's command.
    pub(super) child: Child,
    /// Its pid.
    pub(super) pid: u32,
    /// Serial number of this container in the pod (probe results carry it).
    pub(super) serial: u64,
    /// When it started.
    pub(super) started_at: Instant,
    /// SIGTERM was sent; SIGKILL at this instant.
    pub(super) kill_at: Option<Instant>,
    /// Why it is being killed (for the restart event).
    pub(super) kill_reason: Option<String>,
}

#[derive(Debug)]
pub(super) struct SimPod {
    pub(super) name: String,
    pub(super) ordinal: u32,
    pub(super) revision: String,
    pub(super) ip: Ipv4Addr,
    pub(super) netns: String,
    pub(super) created: Instant,
    pub(super) plan: PodPlan,
    pub(super) container: Option<Container>,
    pub(super) serial: u64,
    pub(super) restarts: u32,
    pub(super) started: bool,
    pub(super) ready: bool,
    pub(super) next_start: Option<Instant>,
    pub(super) terminating: Option<Instant>,
    pub(super) startup: ProbeState,
    pub(super) liveness: ProbeState,
    pub(super) readiness: ProbeState,
    pub(super) logs: Vec<PathBuf>,
    pub(super) waiting_reason: Option<String>,
}

#[derive(Debug)]
pub(super) struct ProbeResult {
    pub(super) ordinal: u32,
    pub(super) serial: u64,
    pub(super) kind: ProbeKind,
    pub(super) ok: bool,
    pub(super) detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

pub(super) fn send(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

impl Sim {
    /// A pod's sandbox, as the kubelet and the CNI plugin make it: an
    /// address, a network namespace joined to the bridge, and the kubelet's
    /// reading of the pod spec (its files written to the pod's directory).
    pub(super) fn sandbox(
        &mut self,
        name: &str,
        template: &PodTemplateSpec,
        subdomain: &str,
        claims: BTreeMap<String, PathBuf>,
    ) -> Result<(Ipv4Addr, String, PodPlan)> {
        let ip = self.alloc_ip();
        let netns = net::pod_ns(&self.cfg.name, name);
        let pod_dir = self.cfg.state_dir.join("pods").join(name);
        let _ = fs::remove_dir_all(&pod_dir);
        fs::create_dir_all(&pod_dir)?;
        let plan = pod::plan(&PodFacts {
            manifests: &self.manifests,
            template,
            pod_name: name,
            namespace: &self.sts.namespace,
            subdomain,
            domain: &self.cfg.domain,
            pod_ip: ip,
            dns_ip: net::DNS_IP,
            netns: net::ns_path(&netns),
            pod_dir,
            claims,
            image: &self.cfg.image,
        })?;
        net::delete_ns(&netns)?;
        let veth = format!("veth{}", self.next_veth);
        self.next_veth += 1;
        net::attach(&self.cfg.name, &netns, &veth, ip)?;
        Ok((ip, netns, plan))
    }

    /// Starts the container of pod `name` (`pod-init` with its launch spec),
    /// its output going to log number `log_index` of the pod.
    pub(super) fn launch(
        &self,
        name: &str,
        launch: &LaunchSpec,
        log_index: usize,
    ) -> Result<(Child, PathBuf)> {
        let self_exe = &self.cfg.self_exe;
        let spec_path = self
            .cfg
            .state_dir
            .join("pods")
            .join(name)
            .join("launch.json");
        fs::write(&spec_path, serde_json::to_vec_pretty(launch)?)?;
        let log_dir = self.cfg.state_dir.join("logs").join(name);
        fs::create_dir_all(&log_dir)?;
        let log_path = log_dir.join(format!("{log_index}.log"));
        let log = fs::File::create(&log_path)?;
        let child = Command::new(self_exe)
            .arg("pod-init")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self_exe.display()))?;
        Ok((child, log_path))
    }

    pub(super) fn start_container(&mut self, ordinal: u32) -> Result<()> {
        let Some(p) = self.pods.get(&ordinal) else {
            return Ok(());
        };
        let (child, log_path) = self.launch(&p.name, &p.plan.launch, p.logs.len())?;
        let p = self.pods.get_mut(&ordinal).expect("pod exists");
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
    pub(super) fn kill_container(&mut self, ordinal: u32, reason: &str) {
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

    pub(super) fn on_probe(&mut self, r: ProbeResult) {
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

    pub(super) fn run_probes(&mut self) {
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
    pub(super) fn kubelet(&mut self) {
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
}

pub(super) async fn probe_once(ip: Ipv4Addr, spec: &ProbeSpec) -> (bool, String) {
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
