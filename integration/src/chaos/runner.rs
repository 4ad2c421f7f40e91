//! The chaos runner: starts the rendered chart on the simulator, keeps
//! clients visiting (through the client Service and straight at pods) and
//! reading `/visits/total` from random pods, mixes seeded faults into rounds
//! (fault, hold, heal, quiet period) and records every operation in
//! `history.jsonl`. It judges nothing: that is the checker's job.

use std::fs::File;
use std::io::{BufWriter, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::history::{self, Op, Outcome};
use super::nemesis::{self, Planned};
use crate::sim::manifest::helm_template;
use crate::sim::{Cluster, ClusterOptions, ClusterStatus, Request, net};

/// How to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fault rounds.
    pub rounds: u32,
    /// Seed of every random choice (faults, targets, client choices).
    pub seed: u64,
    /// Nemeses to mix.
    pub nemeses: Vec<String>,
    /// Output directory (history.jsonl).
    pub out: PathBuf,
    /// Simulator cluster name.
    pub name: String,
    /// The `tally-sim` executable.
    pub sim_exe: PathBuf,
    /// The tally build standing in for the image.
    pub tally_bin: PathBuf,
    /// The chart directory.
    pub chart: PathBuf,
    /// Pods.
    pub replicas: u32,
    /// Client threads visiting.
    pub visitors: u32,
    /// Client threads reading totals.
    pub readers: u32,
    /// CoreDNS `cache N` of the cluster DNS server (0: none).
    pub dns_cache: u32,
    /// How long the runner waits for agreement in a quiet period (the
    /// checker's limit, plus a margin so a slow convergence is seen).
    pub quiet_limit: Duration,
}

/// What the run did (the checker counts the history itself).
#[derive(Clone, Debug)]
pub struct Ran {
    /// Rounds done.
    pub rounds: u32,
    /// Wall time.
    pub elapsed: Duration,
}

/// Values that make probes and shutdown fast enough for many rounds (the
/// same shape as production, shorter periods).
const FAST: &[&str] = &[
    "startupProbe.periodSeconds=1",
    "readinessProbe.periodSeconds=1",
    "readinessProbe.failureThreshold=2",
    "readinessProbe.timeoutSeconds=1",
    "livenessProbe.periodSeconds=1",
    "livenessProbe.failureThreshold=3",
    "livenessProbe.timeoutSeconds=1",
    "config.shutdown_delay_ms=1000",
    "terminationGracePeriodSeconds=5",
    "config.shutdown_grace_s=2",
    "config.dns_max_ttl_s=1",
    "config.refresh_interval_ms=1000",
    // A fixed token: an upgrade re-renders, and a random one would change.
    "auth.token=chaos-peer-token-0123456789abcdef",
];

/// Size of each pod's volume (a tmpfs) in chaos runs: room for tally's
/// files many times over, and little to fill.
const VOLUME_LIMIT_MB: u32 = 16;

fn render(o: &Options, round: u32) -> Result<String> {
    let mut args = vec![
        "--set".to_string(),
        format!("replicaCount={}", o.replicas),
        "--set".to_string(),
        format!("podAnnotations.chaos-revision=r{round}"),
    ];
    for s in FAST {
        args.push("--set".into());
        args.push((*s).into());
    }
    helm_template(&o.chart, "tally", &args)
}

/// The history file and the one clock.
struct Recorder {
    t0: Instant,
    out: Mutex<BufWriter<File>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn record(&self, op: &Op) {
        if let Ok(mut w) = self.out.lock() {
            // A lost line would make the checker wrong; stop loudly instead.
            history::write(&mut *w, op).expect("writing history.jsonl");
        }
    }

    fn flush(&self) {
        if let Ok(mut w) = self.out.lock() {
            w.flush().expect("flushing history.jsonl");
        }
    }
}

/// Where clients send requests.
#[derive(Clone, Debug, Default)]
struct Targets {
    pods: Vec<(String, SocketAddr)>,
    service: Option<SocketAddr>,
}

fn targets_of(s: &ClusterStatus, port: u16) -> Targets {
    Targets {
        pods: s
            .pods
            .iter()
            .filter(|p| p.phase != "Terminating")
            .map(|p| (p.name.clone(), SocketAddr::from((p.ip, port))))
            .collect(),
        service: s.client_service.as_ref().and_then(|a| a.parse().ok()),
    }
}

/// One GET with its outcome: `Fail` only when no connection was made (the
/// request was never sent), `Ok` only on 200.
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> (Outcome, Option<String>) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return (Outcome::Fail, None);
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nUser-Agent: tally-chaos\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (Outcome::Unknown, None);
    }
    let mut raw = Vec::new();
    if s.read_to_end(&mut raw).is_err() {
        return (Outcome::Unknown, None);
    }
    match net::parse_response(&raw) {
        Ok(r) if r.status == 200 => (Outcome::Ok, Some(r.body)),
        _ => (Outcome::Unknown, None),
    }
}

/// One `/visits/total` read, recorded.
fn read_total(rec: &Recorder, pod: Option<String>, addr: SocketAddr) -> Op {
    let start_ns = rec.now();
    let (mut outcome, body) = get(addr, "/visits/total", Duration::from_secs(5));
    let end_ns = rec.now();
    let v: Option<serde_json::Value> = body.and_then(|b| serde_json::from_str(&b).ok());
    let total = v.as_ref().and_then(|v| v["total"].as_u64());
    let complete = v.as_ref().and_then(|v| v["complete"].as_bool());
    let served_by = v.as_ref().and_then(|v| {
        v["pods"]
            .as_array()?
            .iter()
            .find_map(|p| (p["source"] == "self").then(|| p["pod"].as_str().map(str::to_string))?)
    });
    if outcome == Outcome::Ok && (total.is_none() || complete.is_none() || served_by.is_none()) {
        outcome = Outcome::Unknown; // a 200 that is not a total
    }
    let ok = outcome == Outcome::Ok;
    let op = Op::Total {
        pod,
        start_ns,
        end_ns,
        outcome,
        total: total.filter(|_| ok),
        complete: complete.filter(|_| ok),
        served_by: served_by.filter(|_| ok),
    };
    rec.record(&op);
    op
}

/// Shared between the round loop and the client threads.
struct Clients {
    rec: Arc<Recorder>,
    targets: RwLock<Targets>,
    visiting: AtomicBool,
    in_flight: AtomicUsize,
    stop: AtomicBool,
}

impl Clients {
    fn pick(&self, rng: &mut StdRng, via_service: f64) -> Option<(Option<String>, SocketAddr)> {
        let t = self.targets.read().ok()?.clone();
        if rng.random_bool(via_service) {
            return t.service.map(|a| (None, a));
        }
        let (name, addr) = t
            .pods
            .get(rng.random_range(0..t.pods.len().max(1)))?
            .clone();
        Some((Some(name), addr))
    }

    fn visitor(&self, ns: &str, seed: u64) -> Result<()> {
        net::enter(ns)?;
        let mut rng = StdRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::SeqCst) {
            // Pacing, not waiting for a condition: a steady, modest load.
            std::thread::sleep(Duration::from_millis(40));
            if !self.visiting.load(Ordering::SeqCst) {
                continue;
            }
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.visiting.load(Ordering::SeqCst)
                && let Some((pod, addr)) = self.pick(&mut rng, 0.5)
            {
                let start_ns = self.rec.now();
                let (outcome, _) = get(addr, "/", Duration::from_secs(3));
                let end_ns = self.rec.now();
                self.rec.record(&Op::Visit {
                    pod,
                    start_ns,
                    end_ns,
                    outcome,
                });
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn reader(&self, ns: &str, seed: u64) -> Result<()> {
        net::enter(ns)?;
        let mut rng = StdRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(60));
            if let Some((pod, addr)) = self.pick(&mut rng, 0.2) {
                read_total(&self.rec, pod, addr);
            }
        }
        Ok(())
    }

    /// Stops new visits and waits for those in flight (they finish within
    /// their own timeout).
    fn pause_visits(&self) {
        self.visiting.store(false, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Reads every pod once from the client namespace; `Some(total)` when all
/// answered complete with one total.
fn agreement(c: &Clients, ns: &str) -> Option<u64> {
    let pods = c.targets.read().ok()?.pods.clone();
    let ns = ns.to_string();
    let rec = c.rec.clone();
    let ops = std::thread::spawn(move || {
        net::enter(&ns).ok()?;
        Some(
            pods.into_iter()
                .map(|(name, addr)| read_total(&rec, Some(name), addr))
                .collect::<Vec<_>>(),
        )
    })
    .join()
    .ok()??;
    let mut totals = ops.iter().map(|op| match op {
        Op::Total {
            outcome: Outcome::Ok,
            total,
            complete: Some(true),
            ..
        } => *total,
        _ => None,
    });
    let first = totals.next()??;
    totals.all(|t| t == Some(first)).then_some(first)
}

fn port_of(s: &ClusterStatus) -> u16 {
    s.services
        .iter()
        .find(|svc| svc.cluster_ip.is_none())
        .and_then(|svc| svc.ports.first())
        .and_then(|p| p.split('/').next()?.parse().ok())
        .unwrap_or(8080)
}

fn apply(cluster: &Cluster, o: &Options, round: u32, p: &Planned) -> Result<()> {
    if let Some(fault) = &p.fault {
        match cluster.request(&Request::Fault {
            fault: fault.clone(),
        })? {
            crate::sim::Response::Error(e) => bail!("{} failed: {e}", p.kind),
            _ => return Ok(()),
        }
    }
    match p.kind.as_str() {
        "scale" => cluster.scale(p.target[0].parse()?),
        "upgrade" => cluster.apply(&render(o, round + 1)?).map(drop),
        "delete-pod" => cluster.delete_pod(&p.target[0]),
        other => bail!("nemesis {other} has no action"),
    }
}

/// Network, DNS and volume faults end when the heal begins; the others (a
/// process or the StatefulSet changed) end once every pod is Ready again.
fn ends_at_heal(kind: &str) -> bool {
    nemesis::ENDS_AT_HEAL.contains(&kind)
}

/// Runs the whole thing; the history is complete when this returns `Ok`.
pub fn run(o: &Options) -> Result<Ran> {
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let path = o.out.join("history.jsonl");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut opts = ClusterOptions::new(&o.name, &o.sim_exe, &o.tally_bin, render(o, 0)?);
    opts.restart_backoff = Duration::from_millis(200);
    opts.dns_cache = o.dns_cache;
    // Small bounded volumes: `volume-full` fills one in RAM, never the disk.
    opts.volume_limit_mb = VOLUME_LIMIT_MB;
    let mut cluster = Cluster::start(&opts)?;
    let status = cluster.wait_ready(Duration::from_secs(180))?;
    let port = port_of(&status);
    let ns = status.client_netns.clone();
    let clients = Arc::new(Clients {
        rec: Arc::new(Recorder {
            t0: Instant::now(),
            out: Mutex::new(BufWriter::new(file)),
        }),
        targets: RwLock::new(targets_of(&status, port)),
        visiting: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    let seed = o.seed;
    let mut threads: Vec<JoinHandle<Result<()>>> = Vec::new();
    for i in 0..u64::from(o.visitors) {
        let (c, ns) = (clients.clone(), ns.clone());
        threads.push(std::thread::spawn(move || c.visitor(&ns, seed ^ mix(i))));
    }
    for i in 0..u64::from(o.readers) {
        let (c, ns) = (clients.clone(), ns.clone());
        threads.push(std::thread::spawn(move || {
            c.reader(&ns, seed ^ mix(100 + i))
        }));
    }
    // Keep the clients' view of the pods current.
    let watcher = {
        let c = clients.clone();
        let name = o.name.clone();
        let sim = o.sim_exe.clone();
        std::thread::spawn(move || -> Result<()> {
            let cluster = Cluster::attach(&name, sim)?;
            while !c.stop.load(Ordering::SeqCst) {
                if let Ok(s) = cluster.status()
                    && let Ok(mut t) = c.targets.write()
                {
                    *t = targets_of(&s, port);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Ok(())
        })
    };
    let mut rng = StdRng::seed_from_u64(o.seed);
    let rec = clients.rec.clone();
    let started = Instant::now();
    let result = (|| -> Result<u32> {
        for round in 0..o.rounds {
            clients.visiting.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(rng.random_range(1000..2500)));
            let pods: Vec<String> = cluster
                .status()?
                .pods
                .iter()
                .map(|p| p.name.clone())
                .collect();
            let planned = nemesis::plan(&mut rng, &o.nemeses, &pods, o.replicas);
            let mut begun = Vec::new();
            for p in &planned {
                apply(&cluster, o, round, p)
                    .with_context(|| format!("round {round}: {}", p.kind))?;
                begun.push((p, rec.now()));
            }
            eprintln!(
                "round {round}: {}",
                planned
                    .iter()
                    .map(|p| format!("{} {}", p.kind, p.target.join(",")))
                    .collect::<Vec<_>>()
                    .join(" + ")
            );
            std::thread::sleep(Duration::from_millis(rng.random_range(3000..7000)));
            let heal_at = rec.now();
            cluster.request(&Request::Heal)?;
            if planned.iter().any(|p| p.kind == "scale") {
                cluster.scale(o.replicas)?;
            }
            clients.pause_visits();
            for (p, start_ns) in &begun {
                if ends_at_heal(&p.kind) {
                    record_fault(&rec, p, *start_ns, heal_at);
                }
            }
            cluster.wait_ready(Duration::from_secs(240))?;
            let ready_at = rec.now();
            for (p, start_ns) in &begun {
                if !ends_at_heal(&p.kind) {
                    record_fault(&rec, p, *start_ns, ready_at);
                }
            }
            if let Ok(mut t) = clients.targets.write() {
                *t = targets_of(&cluster.status()?, port);
            }
            let quiet = Instant::now();
            while agreement(&clients, &ns).is_none() && quiet.elapsed() < o.quiet_limit {
                std::thread::sleep(Duration::from_millis(300));
            }
            rec.flush();
        }
        Ok(o.rounds)
    })();
    clients.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let _ = watcher.join();
    rec.flush();
    let elapsed = started.elapsed();
    let down = cluster.down();
    let rounds = result?;
    down?;
    Ok(Ran { rounds, elapsed })
}

/// Spreads client thread numbers over the seed space (each client's choices
/// replay with the run's seed).
fn mix(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn record_fault(rec: &Recorder, p: &Planned, start_ns: u64, end_ns: u64) {
    rec.record(&Op::Fault {
        kind: p.kind.clone(),
        target: p.target.clone(),
        start_ns,
        end_ns,
    });
}
