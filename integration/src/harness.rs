//! Start and drive the real `tally` binary in tests.
//!
//! [`Tally::start`] runs the binary on its own data directory and address
//! (port 0), reads the bound address from its JSON log, and kills the child
//! in `Drop`. [`Http`] is a small pooled HTTP client. [`ClusterDns`] serves a
//! headless Service's records the way CoreDNS does (through the simulator's
//! DNS server), so pods discover each other as in Kubernetes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::sim::dns::{self, SharedZone, Zone};
use crate::sim::endpoints::{PodRec, ServicePort, ServiceRec};

/// The workspace root (chart/, scripts/, .tools/ live there).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ sits inside the workspace")
        .to_path_buf()
}

/// The `tally` binary under test: `$TALLY_BIN`, else `target/debug/tally`
/// next to this test executable (build it first: `cargo build -p tally`).
pub fn tally_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TALLY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug/tally
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("tally");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build -p tally` first, or set TALLY_BIN",
        bin.display()
    );
    bin
}

/// A running `tally serve`.
pub struct Tally {
    child: Child,
    /// Address of its client port.
    pub addr: SocketAddr,
    /// Address of its peer port (peer routes, probes).
    pub peer_addr: SocketAddr,
    /// Address of its probe port, when `TALLY_PROBE_LISTEN` set one.
    pub probe_addr: Option<SocketAddr>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Log lines (JSON) read so far from stdout.
    logs: Arc<Mutex<Vec<String>>>,
}

/// How to start a [`Tally`].
#[derive(Clone, Debug)]
pub struct TallyOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Peer port; by default port 0 on the client port's address.
    pub peer_listen: Option<SocketAddr>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl TallyOptions {
    pub fn new(data_dir: &Path) -> TallyOptions {
        TallyOptions {
            data_dir: data_dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            peer_listen: None,
            env: vec![("POD_NAME".into(), "tally-0".into())],
            args: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    pub fn peer_listen(mut self, addr: SocketAddr) -> Self {
        self.peer_listen = Some(addr);
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(tally_bin());
        cmd.env_clear()
            .env("TALLY_LOG_FORMAT", "json")
            .env("TALLY_LOG_LEVEL", "info")
            .env("TALLY_DATA_DIR", &self.data_dir)
            .env("TALLY_LISTEN", self.listen.to_string())
            .env(
                "TALLY_PEER_LISTEN",
                self.peer_listen
                    .unwrap_or(SocketAddr::new(self.listen.ip(), 0))
                    .to_string(),
            )
            // Tests stop pods often; the readiness delay is for Kubernetes.
            .env("TALLY_SHUTDOWN_DELAY_MS", "0")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs to completion (for start-up failures and subcommands).
    pub fn run(&self) -> std::process::Output {
        self.command().output().expect("spawn tally")
    }
}

impl Tally {
    /// Starts and waits until it listens (or fails with its output).
    pub fn start(options: &TallyOptions) -> Result<Tally> {
        let mut child = options
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn tally")?;
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"listening\"") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let errors = Arc::new(Mutex::new(String::new()));
        let err_sink = errors.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_sink.lock().unwrap().push_str(&line);
                err_sink.lock().unwrap().push('\n');
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                // All it wrote to stderr (the reader ends at EOF).
                let _ = stderr_reader.join();
                bail!(
                    "tally did not start (exit {status:?}): stderr: {} stdout: {:?}",
                    errors.lock().unwrap(),
                    logs.lock().unwrap()
                );
            }
        };
        let event: serde_json::Value = serde_json::from_str(&line)?;
        let addr = event["addr"]
            .as_str()
            .context("listening line has addr")?
            .parse()?;
        let peer_addr = event["peer_addr"]
            .as_str()
            .context("listening line has peer_addr")?
            .parse()?;
        let probe_addr = event["probe_addr"]
            .as_str()
            .filter(|a| !a.is_empty())
            .map(str::parse)
            .transpose()?;
        Ok(Tally {
            child,
            addr,
            peer_addr,
            probe_addr,
            data_dir: options.data_dir.clone(),
            logs,
        })
    }

    /// URL on the client port.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// URL on the peer port.
    pub fn peer_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.peer_addr)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(self.pid(), signal);
    }

    /// SIGSTOP, and waits until every thread has stopped: `kill` returns
    /// before a busy thread on another core is stopped, and such a thread
    /// could still answer a request sent right after.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        let deadline = Instant::now() + Duration::from_secs(10);
        let stopped = || {
            std::fs::read_dir(&tasks)
                .into_iter()
                .flatten()
                .flatten()
                .all(|task| {
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            let (_, rest) = stat.rsplit_once(") ")?;
                            rest.chars().next()
                        })
                        .is_none_or(|state| state == 'T' || state == 't')
                })
        };
        while !stopped() {
            assert!(
                Instant::now() < deadline,
                "{tasks}: threads still running after SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then wait up to `limit` for the exit.
    pub fn terminate(mut self, limit: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.wait(limit)
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("tally did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A pooled keep-alive HTTP/1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(&self, url: &str) -> Result<Reply> {
        self.request(Method::GET, url, &[]).await
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let mut request = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = self.client.request(request.body(Empty::new())?).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// A loopback address block of 256 addresses no other test uses: tests run
/// in parallel, and each runs its pods and DNS server on its own addresses.
pub fn loopback_block(test: u8) -> [u8; 3] {
    let pid = std::process::id();
    [127, (pid % 200) as u8 + 20, test]
}

/// Cluster DNS for tests: a headless Service `tally-headless` in namespace
/// `default` under `cluster.local`, whose records list the pods published.
pub struct ClusterDns {
    pub addr: SocketAddr,
    zone: SharedZone,
    /// TTL of the published records (seconds).
    ttl: u32,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Stand-in socket that swallows queries once silenced.
    silent: Option<std::net::UdpSocket>,
}

impl ClusterDns {
    /// Serves on `ip` (a free port is picked) with an empty zone.
    pub async fn start(ip: Ipv4Addr) -> Result<ClusterDns> {
        ClusterDns::start_on(ip, 0).await
    }

    /// Serves on `ip:port` with an empty zone.
    pub async fn start_on(ip: Ipv4Addr, port: u16) -> Result<ClusterDns> {
        ClusterDns::serve(SocketAddr::new(ip.into(), port), None).await
    }

    /// Serves on `ip` like CoreDNS with `cache N` in front (kubeadm's
    /// Corefile: records with TTL 30 and `cache 30`): answers, positive and
    /// negative, are served from the cache for up to `ttl`.
    pub async fn start_caching(ip: Ipv4Addr, ttl: Duration) -> Result<ClusterDns> {
        ClusterDns::serve(SocketAddr::new(ip.into(), 0), Some(ttl)).await
    }

    async fn serve(addr: SocketAddr, cache: Option<Duration>) -> Result<ClusterDns> {
        let zone: SharedZone = Arc::new(RwLock::new(Arc::new(Zone::default())));
        // Bound before this returns: a query sent from now on is answered
        // (a pod started right after must not find the port closed).
        let server = dns::DnsServer::bind(addr, zone.clone(), cache).await?;
        let addr = server.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = server.run().await {
                eprintln!("test DNS server stopped: {e:#}");
            }
        });
        Ok(ClusterDns {
            addr,
            zone,
            ttl: cache.map_or(1, |ttl| ttl.as_secs().try_into().unwrap_or(u32::MAX)),
            task: Some(task),
            silent: None,
        })
    }

    /// Publishes exactly these pods (name → peer address) as ready
    /// endpoints: the SRV records `_peer._tcp` carry the peer port.
    pub fn publish(&self, pods: &[(&str, SocketAddr)]) {
        self.publish_as(pods, true);
    }

    /// Publishes the pods as endpoints without a hostname, as CoreDNS does
    /// when the StatefulSet's `serviceName` is another Service: SRV targets
    /// are then `a-b-c-d.tally-headless...`, not pod names.
    pub fn publish_by_address(&self, pods: &[(&str, SocketAddr)]) {
        self.publish_as(pods, false);
    }

    fn publish_as(&self, pods: &[(&str, SocketAddr)], hostnames: bool) {
        let labels = BTreeMap::from([("app".to_string(), "tally".to_string())]);
        let service = ServiceRec {
            name: "tally-headless".into(),
            namespace: "default".into(),
            cluster_ip: None,
            ports: vec![ServicePort {
                name: Some("peer".into()),
                protocol: "tcp".into(),
                port: 8081,
                target: IntOrString::String("peer".into()),
            }],
            selector: Some(labels.clone()),
            publish_not_ready: true,
            type_: "ClusterIP".into(),
        };
        let records: Vec<PodRec> = pods
            .iter()
            .map(|(name, addr)| PodRec {
                name: name.to_string(),
                namespace: "default".into(),
                labels: labels.clone(),
                ip: match addr.ip() {
                    std::net::IpAddr::V4(ip) => Some(ip),
                    std::net::IpAddr::V6(_) => None,
                },
                ready: true,
                terminating: false,
                hostname: hostnames.then(|| name.to_string()),
                subdomain: Some("tally-headless".into()),
                container_ports: vec![(Some("peer".into()), addr.port())],
            })
            .collect();
        let zone = Zone::build("cluster.local", self.ttl, &[service], &records);
        *self.zone.write().unwrap() = Arc::new(zone);
    }

    /// Stops answering: queries time out from now on.
    pub fn silence(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Rebinding can race the aborted task's socket for a moment.
        for _ in 0..100 {
            if let Ok(socket) = std::net::UdpSocket::bind(self.addr) {
                self.silent = Some(socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("could not take over the DNS port {}", self.addr);
    }
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A small tmpfs mounted for one test and unmounted in `Drop`: a volume
/// to fill, or to remount read-only (needs root).
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test mounts a tmpfs to fill or freeze a volume: run it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ],
            dir.path(),
        );
        Tmpfs(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `remount,ro` or `remount,rw`.
    pub fn remount(&self, mode: &str) {
        mount(&["-o", &format!("remount,{mode}")], self.path());
    }

    /// Fills the volume to its last byte with one file; returns its path
    /// (remove it to free the space).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        while file.write_all(&chunk[..1]).is_ok() {}
        filler
    }
}

fn mount(args: &[&str], target: &Path) {
    let status = Command::new("mount")
        .args(args)
        .arg(target)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "mount {args:?} {} failed",
        target.display()
    );
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}
