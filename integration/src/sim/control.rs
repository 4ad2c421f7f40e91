//! The control protocol between `tally-sim` commands and the daemon that owns
//! a simulated cluster: one JSON request line, one JSON response, over the
//! unix socket `<state dir>/ctl.sock`.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// Where the simulator keeps its state unless `TALLY_SIM_HOME` says otherwise.
pub const DEFAULT_HOME: &str = "/var/lib/tally-sim";

/// The state directory of cluster `name`.
pub fn state_dir(name: &str) -> PathBuf {
    let home = std::env::var_os("TALLY_SIM_HOME")
        .map_or_else(|| PathBuf::from(DEFAULT_HOME), PathBuf::from);
    home.join(name)
}

/// Checks a cluster name: it becomes part of namespace names.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("cluster name {name:?} must be 1-24 characters of a-z, 0-9 and -");
    }
    Ok(())
}

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Machine-readable state.
    Status,
    /// The `kubectl get po,sts,svc,pvc`-like table.
    Get,
    /// What `exec` needs to enter a pod's container.
    PodInfo {
        /// Pod name.
        pod: String,
    },
    /// Delete a pod (the controller recreates it).
    DeletePod {
        /// Pod name.
        pod: String,
    },
    /// Set the StatefulSet's replicas.
    Scale {
        /// New replica count.
        replicas: u32,
    },
    /// Apply a new rendering of the chart (`upgrade`).
    Apply {
        /// The YAML stream.
        manifests: String,
    },
    /// The event log.
    Events,
    /// Put a fault in place (the chaos nemeses).
    Fault {
        /// What.
        fault: super::nemesis::Fault,
    },
    /// Remove every fault.
    Heal,
    /// `helm test`: start the test hook pods.
    RunTests,
    /// The report of the last test run.
    Tests,
    /// Tear everything down and exit.
    Down,
}

/// A pod as `get` and the tests see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodStatus {
    /// Pod name.
    pub name: String,
    /// Ordinal.
    pub ordinal: u32,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Ready (in the client Service).
    pub ready: bool,
    /// `Running`, `ContainerCreating`, `Terminating`, `CrashLoopBackOff`, ...
    pub phase: String,
    /// Container restarts.
    pub restarts: u32,
    /// The revision its template came from.
    pub revision: String,
    /// The container's main process, when running.
    pub pid: Option<u32>,
    /// Seconds since the pod was created.
    pub age_s: f64,
}

/// A Service as `get` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// spec.type.
    pub type_: String,
    /// ClusterIP, `None` when headless.
    pub cluster_ip: Option<Ipv4Addr>,
    /// `port/proto` list.
    pub ports: Vec<String>,
    /// Ready endpoints (`ip:port` of the first port).
    pub ready_endpoints: Vec<String>,
}

/// A claim (PersistentVolumeClaim) and its data directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClaimStatus {
    /// `<claim>-<statefulset>-<ordinal>`.
    pub name: String,
    /// The directory standing in for the volume.
    pub path: PathBuf,
    /// Requested storage.
    pub capacity: String,
    /// Access modes.
    pub access_modes: String,
    /// Seconds since created.
    pub age_s: f64,
}

/// The cluster's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Cluster name.
    pub name: String,
    /// Namespace of the release.
    pub namespace: String,
    /// Cluster domain (`cluster.local`).
    pub domain: String,
    /// StatefulSet name.
    pub statefulset: String,
    /// Its serviceName.
    pub service_name: String,
    /// Desired replicas.
    pub replicas: u32,
    /// Ready pods.
    pub ready_replicas: u32,
    /// `OrderedReady` or `Parallel`.
    pub pod_management_policy: String,
    /// The revision pods below the partition keep.
    pub current_revision: String,
    /// The revision of the newest template.
    pub update_revision: String,
    /// Pods by ordinal.
    pub pods: Vec<PodStatus>,
    /// Services.
    pub services: Vec<ServiceStatus>,
    /// Claims.
    pub claims: Vec<ClaimStatus>,
    /// The client Service's `ip:port`, if there is one.
    pub client_service: Option<String>,
    /// The network namespace a client stands in.
    pub client_netns: String,
    /// Seconds since `up`.
    pub age_s: f64,
}

/// What `exec` needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodInfo {
    /// Main process of the container.
    pub pid: u32,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Log file of the current container.
    pub log: PathBuf,
    /// Log file of the previous container, if any.
    pub previous_log: Option<PathBuf>,
}

/// One event, like `kubectl get events`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since `up`.
    pub t: f64,
    /// The object (`pod/tally-0`, `statefulset/tally`).
    pub object: String,
    /// Short reason (`Created`, `Ready`, `Killing`, ...).
    pub reason: String,
    /// Details.
    pub message: String,
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok(String),
    /// Refused or failed, with the reason.
    Error(String),
    /// Text for humans.
    Text(String),
    /// State.
    Status(Box<ClusterStatus>),
    /// Pod details.
    PodInfo(PodInfo),
    /// Events.
    Events(Vec<Event>),
    /// The `helm test` report.
    Tests(super::hook::TestReport),
}

/// Sends one request to the daemon of the cluster in `dir`.
pub fn call(dir: &Path, request: &Request, timeout: Duration) -> Result<Response> {
    let sock = dir.join("ctl.sock");
    let mut stream = UnixStream::connect(&sock).with_context(|| {
        format!(
            "no simulator is answering at {} (is the cluster up? `scripts/cluster up`; \
             `scripts/cluster down` cleans up after a crashed one)",
            sock.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("reading the simulator's answer")?;
    if answer.is_empty() {
        return Err(anyhow!(
            "the simulator closed the connection without answering"
        ));
    }
    let response: Response =
        serde_json::from_str(&answer).context("decoding the simulator's answer")?;
    if let Response::Error(e) = &response {
        bail!("{e}");
    }
    Ok(response)
}
