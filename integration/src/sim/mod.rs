//! The local StatefulSet simulator (design.md §9).
//!
//! Runs what `helm template` renders from chart/ as a StatefulSet of real
//! `tally` processes, each in its own network, UTS and mount namespace, with a
//! cluster DNS server, a Service proxy, probes and a StatefulSet controller.
//! See integration/README.md for what is modelled and what is not.
//!
//! # Layout
//! - [`manifest`]: the rendered chart as typed `k8s-openapi` objects.
//! - [`endpoints`]: Services and which pods are their (ready) endpoints.
//! - [`dns`]: the cluster DNS server (Kubernetes DNS specification), with
//!   CoreDNS's answer cache ([`dns_cache`]) when asked for.
//! - [`image`]: the image the pods run, from the definitions the real
//!   image is built from (`scripts/build-image`, the Dockerfile).
//! - [`pod`]: the kubelet's reading of a pod template, and the container
//!   setup that runs inside the pod's namespaces (`pod-init`, `exec`).
//! - [`net`]: network namespaces, bridge, veths, an in-namespace HTTP client.
//! - [`daemon`]: the simulator daemon (cluster state, reconcile loop,
//!   control socket), with its parts:
//!   - [`statefulset`]: the StatefulSet controller;
//!   - [`kubelet`]: containers, probes, restarts and kills;
//!   - [`proxy`]: the Service proxy;
//!   - [`status`]: `kubectl get`-style status tables.
//! - [`hook`]: `helm test`: the chart's test hook pods and their report.
//! - [`nemesis`]: faults for the chaos suite (partitions, loss, slowness,
//!   DNS outage, kill, pause) and their heal.
//! - [`netpol`]: NetworkPolicy translated into nftables rules per pod.
//! - [`control`]: the control protocol.
//! - [`cleanup`]: teardown by name and the leftover check.
//! - [`Cluster`]: a handle the tests and the `tally-sim` command use.

pub mod cleanup;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod dns_cache;
pub mod endpoints;
pub mod hook;
pub mod image;
pub mod kubelet;
pub mod manifest;
pub mod nemesis;
pub mod net;
pub mod netpol;
pub mod pod;
pub mod proxy;
pub mod statefulset;
pub mod status;
pub mod volume;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use control::{ClusterStatus, Event, PodStatus, Request, Response};
pub use hook::TestReport;
pub use net::HttpResponse;

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Cluster name: namespaces are `tsim-<name>-*`, state in
    /// `/var/lib/tally-sim/<name>`.
    pub name: String,
    /// The `tally-sim` executable.
    pub sim_exe: PathBuf,
    /// The `tally` build the image is assembled around.
    pub tally_bin: PathBuf,
    /// The rendered chart.
    pub manifests: String,
    /// TTL of DNS answers, seconds.
    pub dns_ttl: u32,
    /// CoreDNS `cache N`: answers (positive and negative) are served from
    /// the DNS server's cache up to this many seconds; 0 = no cache (the
    /// default: ordinary tests see membership changes at once).
    pub dns_cache: u32,
    /// Each claim is a tmpfs of this many MiB, so the `volume-full` fault can
    /// fill it without filling the host's disk; 0 = plain directories (the
    /// default).
    pub volume_limit_mb: u32,
    /// First CrashLoopBackOff delay.
    pub restart_backoff: Duration,
    /// Cluster domain.
    pub domain: String,
    /// Detach the daemon (the CLI's `up`); otherwise it dies with the thread
    /// that started it (tests).
    pub detach: bool,
}

impl ClusterOptions {
    /// Defaults: DNS TTL 30 s, back-off 10 s, `cluster.local`.
    pub fn new(
        name: &str,
        sim_exe: impl Into<PathBuf>,
        tally_bin: impl Into<PathBuf>,
        manifests: String,
    ) -> Self {
        ClusterOptions {
            name: name.to_string(),
            sim_exe: sim_exe.into(),
            tally_bin: tally_bin.into(),
            manifests,
            dns_ttl: 30,
            dns_cache: 0,
            volume_limit_mb: 0,
            restart_backoff: Duration::from_secs(10),
            domain: "cluster.local".into(),
            detach: false,
        }
    }
}

/// What a cluster was seen to own, for the leftover check.
#[derive(Clone, Debug, Default)]
pub struct Tracked {
    /// Container and daemon pids seen.
    pub pids: Vec<u32>,
    /// Inodes of its network namespaces seen.
    pub inodes: HashSet<u64>,
}

/// A running simulated cluster.
#[derive(Debug)]
pub struct Cluster {
    /// Cluster name.
    pub name: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// The `tally-sim` executable (for `exec`).
    sim_exe: PathBuf,
    /// The daemon, when this handle started it.
    daemon: Option<Child>,
    /// Set once `down` ran.
    down: bool,
    /// Everything seen, for [`cleanup::leftovers`].
    tracked: Arc<Mutex<Tracked>>,
}

/// Fails unless running as root (namespaces, mounts and uid changes need it).
pub fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the StatefulSet simulator needs root (it creates network namespaces, mounts and runs pods as other \
             users); run it as root, e.g. `sudo scripts/cluster up` or `sudo cargo test -p tally-integration --test e2e`"
        );
    }
    Ok(())
}

impl Cluster {
    /// Starts the daemon and waits until it answers (not until pods are
    /// Ready: see [`Cluster::wait_ready`]).
    pub fn start(opts: &ClusterOptions) -> Result<Cluster> {
        require_root()?;
        control::check_name(&opts.name)?;
        let state_dir = control::state_dir(&opts.name);
        if control::call(&state_dir, &Request::Status, Duration::from_secs(2)).is_ok() {
            bail!("cluster {:?} is already up; run `down` first", opts.name);
        }
        cleanup::force_down(&opts.name, &state_dir, true)?;
        if !opts.tally_bin.is_file() {
            bail!(
                "the tally binary {} does not exist; build it with `cargo build -p tally` or set TALLY_BIN",
                opts.tally_bin.display()
            );
        }
        fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        image::stage(&opts.tally_bin, &state_dir.join(image::IMAGE_DIR))?;
        let manifests = state_dir.join("manifests.yaml");
        fs::write(&manifests, &opts.manifests)?;
        let log = fs::File::create(state_dir.join("daemon.log"))?;
        let mut cmd = Command::new(&opts.sim_exe);
        cmd.arg("--name")
            .arg(&opts.name)
            .arg("daemon")
            .arg("--manifests")
            .arg(&manifests)
            .arg("--dns-ttl")
            .arg(opts.dns_ttl.to_string())
            .arg("--dns-cache")
            .arg(opts.dns_cache.to_string())
            .arg("--volume-limit-mb")
            .arg(opts.volume_limit_mb.to_string())
            .arg("--restart-backoff-ms")
            .arg(opts.restart_backoff.as_millis().to_string())
            .arg("--domain")
            .arg(&opts.domain)
            .env(
                "TALLY_SIM_HOME",
                state_dir.parent().unwrap_or(Path::new("/")),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if opts.detach {
            cmd.arg("--detach");
        } else {
            cmd.arg("--parent-pid").arg(std::process::id().to_string());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", opts.sim_exe.display()))?;
        let tracked = Arc::new(Mutex::new(Tracked {
            pids: vec![child.id()],
            inodes: HashSet::new(),
        }));
        let mut cluster = Cluster {
            name: opts.name.clone(),
            state_dir,
            sim_exe: opts.sim_exe.clone(),
            daemon: Some(child),
            down: false,
            tracked,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if cluster.status().is_ok() {
                break;
            }
            let exited = cluster
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log =
                    fs::read_to_string(cluster.state_dir.join("daemon.log")).unwrap_or_default();
                let _ = cluster.down();
                bail!("the simulator daemon did not come up: {}", log.trim());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if opts.detach {
            // The daemon is its own session leader now; nobody waits for it
            // here, and dropping this handle leaves the cluster running.
            cluster.daemon = None;
            cluster.down = true;
        }
        Ok(cluster)
    }

    /// A handle on a cluster some other process started.
    pub fn attach(name: &str, sim_exe: impl Into<PathBuf>) -> Result<Cluster> {
        control::check_name(name)?;
        Ok(Cluster {
            name: name.to_string(),
            state_dir: control::state_dir(name),
            sim_exe: sim_exe.into(),
            daemon: None,
            down: true, // dropping an attached handle leaves the cluster running
            tracked: Arc::default(),
        })
    }

    /// What this cluster was seen to own (shared, so a test can check it
    /// after the handle was dropped).
    pub fn tracker(&self) -> Arc<Mutex<Tracked>> {
        self.tracked.clone()
    }

    /// Sends a request.
    pub fn request(&self, req: &Request) -> Result<Response> {
        control::call(&self.state_dir, req, Duration::from_secs(30))
    }

    /// Machine-readable state.
    pub fn status(&self) -> Result<ClusterStatus> {
        match self.request(&Request::Status)? {
            Response::Status(s) => {
                if let Ok(mut t) = self.tracked.lock() {
                    for p in s.pods.iter().filter_map(|p| p.pid) {
                        if !t.pids.contains(&p) {
                            t.pids.push(p);
                        }
                    }
                    t.inodes
                        .extend(cleanup::ns_inodes(&cleanup::namespaces(&self.name)));
                }
                Ok(*s)
            }
            other => Err(anyhow!("unexpected answer {other:?}")),
        }
    }

    /// The `get` table.
    pub fn get(&self) -> Result<String> {
        match self.request(&Request::Get)? {
            Response::Text(t) => Ok(t),
            other => Err(anyhow!("unexpected answer {other:?}")),
        }
    }

    /// The event log.
    pub fn events(&self) -> Result<Vec<Event>> {
        match self.request(&Request::Events)? {
            Response::Events(e) => Ok(e),
            other => Err(anyhow!("unexpected answer {other:?}")),
        }
    }

    /// Waits until `check` holds on the status, or fails after `timeout`
    /// with the last status table and `what`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&ClusterStatus) -> bool,
    ) -> Result<ClusterStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status()?;
            if check(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {:?} waiting for {what}:\n{}\nrecent events:\n{}",
                    timeout,
                    status::render_table(&s),
                    self.events()?
                        .iter()
                        .rev()
                        .take(15)
                        .rev()
                        .map(|e| format!("{:8.2}s {} {} {}", e.t, e.object, e.reason, e.message))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the StatefulSet has exactly its replicas, all Ready, at
    /// the update revision, nothing terminating.
    pub fn wait_ready(&self, timeout: Duration) -> Result<ClusterStatus> {
        self.wait_until("all replicas Ready", timeout, |s| {
            s.pods.len() as u32 == s.replicas
                && s.ready_replicas == s.replicas
                && s.pods
                    .iter()
                    .all(|p| p.revision == s.update_revision && p.phase == "Running")
        })
    }

    /// GET through the client Service, from the client namespace.
    pub fn curl(&self, path: &str) -> Result<HttpResponse> {
        let s = self.status()?;
        let addr = s.client_service.ok_or_else(|| {
            anyhow!("the rendered chart has no ClusterIP Service selecting the pods")
        })?;
        net::http_get_in(&s.client_netns, addr.parse()?, path, Duration::from_secs(5))
    }

    /// GET straight to a pod (its IP, port `port`), from the client namespace.
    pub fn pod_get(&self, pod: &str, port: u16, path: &str) -> Result<HttpResponse> {
        let s = self.status()?;
        let p = s
            .pods
            .iter()
            .find(|p| p.name == pod)
            .ok_or_else(|| anyhow!("no pod {pod}"))?;
        net::http_get_in(
            &s.client_netns,
            (p.ip, port).into(),
            path,
            Duration::from_secs(5),
        )
    }

    /// `kubectl exec POD -- argv`.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Result<Output> {
        self.sim(&["exec", pod, "--"], argv)
            .output()
            .with_context(|| format!("running {}", self.sim_exe.display()))
    }

    /// `argv`, a host tool, in the client namespace with the resolv.conf of
    /// a pod of the release's namespace (a debug pod with the host's tools).
    pub fn client_run(&self, argv: &[&str]) -> Result<Output> {
        self.sim(&["client", "--"], argv)
            .output()
            .with_context(|| format!("running {}", self.sim_exe.display()))
    }

    /// Starts `argv` like [`client_run`](Self::client_run) and returns at
    /// once (a server next to the pods, e.g. Prometheus), its output going
    /// to `log`; the caller stops it.
    pub fn client_spawn(&self, argv: &[&str], log: &Path) -> Result<Child> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        self.sim(&["client", "--"], argv)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("running {}", self.sim_exe.display()))
    }

    fn sim(&self, command: &[&str], argv: &[&str]) -> Command {
        let mut cmd = Command::new(&self.sim_exe);
        cmd.env(
            "TALLY_SIM_HOME",
            self.state_dir.parent().unwrap_or(Path::new("/")),
        )
        .args(["--name", &self.name])
        .args(command)
        .args(argv)
        .stdin(Stdio::null());
        cmd
    }

    /// `helm test`: runs the chart's test hook pods and waits until they
    /// finish (at most `timeout`), returning the report.
    pub fn helm_test(&self, timeout: Duration) -> Result<TestReport> {
        self.request(&Request::RunTests)?;
        let deadline = Instant::now() + timeout;
        loop {
            let report = match self.request(&Request::Tests)? {
                Response::Tests(r) => r,
                other => bail!("unexpected answer {other:?}"),
            };
            if report.finished() {
                return Ok(report);
            }
            if Instant::now() > deadline {
                bail!(
                    "the test pods did not finish within {timeout:?}:\n{}",
                    hook::render_report(&report)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, pod: &str) -> Result<()> {
        self.request(&Request::DeletePod { pod: pod.into() })
            .map(drop)
    }

    /// Scales the StatefulSet.
    pub fn scale(&self, replicas: u32) -> Result<()> {
        self.request(&Request::Scale { replicas }).map(drop)
    }

    /// Applies a new rendering (`upgrade`).
    pub fn apply(&self, manifests: &str) -> Result<String> {
        match self.request(&Request::Apply {
            manifests: manifests.into(),
        })? {
            Response::Ok(m) => Ok(m),
            other => Err(anyhow!("unexpected answer {other:?}")),
        }
    }

    /// The current (or previous) container's log.
    pub fn logs(&self, pod: &str, previous: bool) -> Result<String> {
        match self.request(&Request::PodInfo { pod: pod.into() })? {
            Response::PodInfo(info) => {
                let path = if previous {
                    info.previous_log
                        .ok_or_else(|| anyhow!("pod {pod} has no previous container"))?
                } else {
                    info.log
                };
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
            }
            other => Err(anyhow!("unexpected answer {other:?}")),
        }
    }

    /// Tears the cluster down (idempotent; also cleans up after a crashed
    /// daemon).
    pub fn down(&mut self) -> Result<Vec<String>> {
        self.down = true;
        let asked = self.request(&Request::Down).is_ok();
        let deadline = Instant::now() + Duration::from_secs(30);
        if asked {
            loop {
                let gone = match self.daemon.as_mut() {
                    Some(c) => c.try_wait().ok().flatten().is_some(),
                    None => !self.state_dir.exists(),
                };
                if gone || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let report = cleanup::force_down(&self.name, &self.state_dir, true)?;
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(report)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down
            && let Err(e) = self.down()
        {
            eprintln!("tally-sim: teardown of cluster {} failed: {e:#}", self.name);
        }
    }
}
