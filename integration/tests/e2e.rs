//! End-to-end suite: the chart, rendered by `helm template`, run by the
//! StatefulSet simulator as real `tally` processes (integration/README.md).
//!
//! Needs root (namespaces, mounts), `helm` and Debian's `nslookup` (installed
//! on first use through scripts/lib.sh; it runs in the client namespace, to
//! hold Tally's own `nslookup` against it) and a built `tally` (`cargo build
//! -p tally`, or `TALLY_BIN`). Run: `cargo test -p tally-integration --test e2e`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::{NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use tally_integration::harness::{tally_bin, workspace_root};
use tally_integration::sim::hook::render_report;
use tally_integration::sim::manifest::{Manifests, helm_template};
use tally_integration::sim::nemesis::Fault;
use tally_integration::sim::{
    Cluster, ClusterOptions, Request, TestReport, cleanup, net, require_root,
};

#[path = "e2e/operator.rs"]
mod operator;

const PORT: u16 = 8080;
const PEER_PORT: u16 = 8081;

/// Root, helm, nslookup and the tally binary, checked (and installed) once.
fn prerequisites() -> PathBuf {
    static TALLY: OnceLock<PathBuf> = OnceLock::new();
    TALLY
        .get_or_init(|| {
            require_root().unwrap_or_else(|e| panic!("{e:#}"));
            let status = Command::new("bash")
                .arg("-c")
                .arg("source scripts/lib.sh && need_helm && need_apt dnsutils:nslookup iproute2:ip nftables:nft")
                .current_dir(workspace_root())
                .status()
                .expect("running bash");
            assert!(
                status.success(),
                "installing helm/dnsutils through scripts/lib.sh failed"
            );
            tally_bin()
        })
        .clone()
}

/// Value overrides that make probes and shutdown fast enough for a test.
fn fast(extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        "startupProbe.periodSeconds=1",
        "readinessProbe.periodSeconds=1",
        "readinessProbe.failureThreshold=2",
        "readinessProbe.timeoutSeconds=1",
        "livenessProbe.periodSeconds=1",
        "livenessProbe.failureThreshold=2",
        "livenessProbe.timeoutSeconds=1",
        // tally fails readiness for 2 s before it stops taking visits, as
        // in production; the grace period must cover that plus the drain.
        "config.shutdown_delay_ms=2000",
        "terminationGracePeriodSeconds=6",
        "config.shutdown_grace_s=2",
        "config.dns_max_ttl_s=1",
        "config.refresh_interval_ms=1000",
        // `helm template` cannot look the existing Secret up, so a random
        // token would change on every render (and every upgrade).
        "auth.token=e2e-peer-token-0123456789abcdef",
    ];
    sets.extend_from_slice(extra);
    sets.iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

fn render(extra: &[&str]) -> String {
    helm_template(&workspace_root().join("chart"), "tally", &fast(extra))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn start(name: &str, manifests: String) -> Cluster {
    let mut opts = ClusterOptions::new(
        name,
        env!("CARGO_BIN_EXE_tally-sim"),
        prerequisites(),
        manifests,
    );
    opts.dns_ttl = 1;
    opts.restart_backoff = Duration::from_secs(1);
    Cluster::start(&opts).unwrap_or_else(|e| panic!("{e:#}"))
}

fn up(name: &str, extra: &[&str]) -> Cluster {
    prerequisites();
    let c = start(name, render(extra));
    c.wait_ready(Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e:#}"));
    c
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn local_count(c: &Cluster, pod: &str) -> u64 {
    let r = c
        .pod_get(pod, PORT, "/visits/local")
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(r.status, 200, "{pod} /visits/local: {}", r.body);
    json(&r.body)["count"].as_u64().expect("count")
}

fn total_of(c: &Cluster, pod: &str) -> Value {
    let r = c
        .pod_get(pod, PORT, "/visits/total")
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(r.status, 200, "{pod} /visits/total: {}", r.body);
    json(&r.body)
}

fn visit(c: &Cluster) -> bool {
    matches!(c.curl("/"), Ok(r) if r.status == 200)
}

/// Samples `/visits/total` through the client Service until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, u64, String)>>>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(c: &Cluster) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let status = c.status().expect("status");
        let ns = status.client_netns.clone();
        let addr: std::net::SocketAddr = status
            .client_service
            .expect("client Service")
            .parse()
            .unwrap();
        let (s2, st2) = (samples.clone(), stop.clone());
        let t0 = Instant::now();
        let handle = std::thread::spawn(move || {
            tally_integration::sim::net::enter(&ns).expect("enter client netns");
            while !st2.load(Ordering::Relaxed) {
                if let Ok(r) = tally_integration::sim::net::http_get(
                    addr,
                    "/visits/total",
                    Duration::from_secs(3),
                ) && r.status == 200
                    && let Ok(v) = serde_json::from_str::<Value>(&r.body)
                    && let Some(total) = v["total"].as_u64()
                {
                    // Who answered, and each pod's count and source.
                    let who = v["pods"]
                        .as_array()
                        .map(|ps| {
                            ps.iter()
                                .map(|x| {
                                    format!(
                                        "{}={}({})",
                                        x["pod"].as_str().unwrap_or("?"),
                                        x["count"],
                                        x["source"].as_str().unwrap_or("?")
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    s2.lock()
                        .unwrap()
                        .push((t0.elapsed().as_secs_f64(), total, who));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    /// Waits until `more` further samples were taken (the cluster was
    /// observed that many more times), instead of sleeping.
    fn wait_for(&self, more: usize) {
        let want = self.samples.lock().unwrap().len() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.samples.lock().unwrap().len() < want {
            assert!(
                Instant::now() < deadline,
                "no {more} samples of /visits/total within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and asserts the total never went down; returns the samples.
    fn finish(mut self, what: &str) -> Vec<(f64, u64, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("sampler thread");
        let samples = self.samples.lock().unwrap().clone();
        assert!(
            samples.len() >= 5,
            "{what}: only {} samples of /visits/total",
            samples.len()
        );
        for w in samples.windows(2) {
            assert!(
                w[1].1 >= w[0].1,
                "{what}: the total went down from {} (t={:.2}s, answered by {}) to {} (t={:.2}s, answered by {})",
                w[0].1,
                w[0].0,
                w[0].2,
                w[1].1,
                w[1].0,
                w[1].2
            );
        }
        samples
    }
}

/// Sends visits through the client Service until stopped; counts the
/// acknowledged ones.
struct Visitor {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Visitor {
    fn start(c: &Cluster) -> Visitor {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let status = c.status().expect("status");
        let ns = status.client_netns.clone();
        let addr: std::net::SocketAddr = status
            .client_service
            .expect("client Service")
            .parse()
            .unwrap();
        let (a2, st2) = (acked.clone(), stop.clone());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let e2 = errors.clone();
        let handle = std::thread::spawn(move || {
            tally_integration::sim::net::enter(&ns).expect("enter client netns");
            while !st2.load(Ordering::Relaxed) {
                match tally_integration::sim::net::http_get(addr, "/", Duration::from_secs(3)) {
                    Ok(r) if r.status == 200 => {
                        a2.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        e2.lock()
                            .unwrap()
                            .push(format!("HTTP {}: {}", r.status, r.body.trim()))
                    }
                    Err(e) => e2.lock().unwrap().push(format!("{e:#}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Visitor {
            stop,
            acked,
            errors,
            handle: Some(handle),
        }
    }

    /// Waits until `more` further visits were acknowledged.
    fn wait_for(&self, more: u64) {
        let want = self.acked.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked.load(Ordering::Relaxed) < want {
            assert!(
                Instant::now() < deadline,
                "no {more} visits acknowledged within 60 s: {:?}",
                self.errors.lock().unwrap().last()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("visitor thread");
        let errors = self.errors.lock().unwrap();
        if !errors.is_empty() {
            println!(
                "{} visits were not acknowledged; first ones: {:#?}",
                errors.len(),
                &errors[..errors.len().min(5)]
            );
        }
        self.acked.load(Ordering::Relaxed)
    }
}

/// Waits until `pod` reports a complete total equal to `expected`.
fn wait_total(c: &Cluster, pod: &str, expected: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = total_of(c, pod);
        if v["complete"] == true && v["total"].as_u64() == Some(expected) {
            return v;
        }
        if Instant::now() > deadline {
            // What each claim holds on disk, to tell a lost visit from a stale view.
            let stored: Vec<String> = c
                .status()
                .map(|s| s.claims)
                .unwrap_or_default()
                .iter()
                .map(|claim| {
                    let out = Command::new(prerequisites())
                        .args(["visits", "--data-dir"])
                        .arg(&claim.path)
                        .output();
                    let text = out
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    format!(
                        "{}: {}",
                        claim.name,
                        text.lines()
                            .filter(|l| l.contains("count"))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    )
                })
                .collect();
            panic!(
                "{pod}: /visits/total never became {expected} and complete; last: {v}\nstored on the claims:\n{}",
                stored.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn assert_clean(name: &str, state_dir: &Path, tracked: &tally_integration::sim::Tracked) {
    let left = cleanup::leftovers(name, state_dir, &tracked.pids, &tracked.inodes);
    assert!(
        left.is_empty(),
        "cluster {name} left things behind:\n{}",
        left.join("\n")
    );
    assert!(
        !tracked.pids.is_empty() && !tracked.inodes.is_empty(),
        "nothing was tracked, the check proves nothing"
    );
}

fn ip_of(c: &Cluster, pod: &str) -> String {
    c.status()
        .unwrap()
        .pods
        .iter()
        .find(|p| p.name == pod)
        .expect("pod")
        .ip
        .to_string()
}

/// Where `pod` listens (`port`), as a socket address.
fn addr_of(c: &Cluster, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip_of(c, pod).parse().unwrap(), port)
}

/// Deletes `pod` and waits until its replacement (a new address) and every
/// other pod are Ready.
fn replace_pod(c: &Cluster, pod: &str) {
    let old_ip = ip_of(c, pod);
    c.delete_pod(pod).unwrap();
    c.wait_until(
        &format!("{pod} to be replaced"),
        Duration::from_secs(30),
        |s| {
            s.pods
                .iter()
                .any(|p| p.name == pod && p.ip.to_string() != old_ip)
        },
    )
    .unwrap();
    c.wait_ready(Duration::from_secs(60)).unwrap();
}

/// Runs the chart's `helm test` pod and prints its report.
fn helm_test(c: &Cluster) -> TestReport {
    let report = c
        .helm_test(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!("$ scripts/cluster test\n{}", render_report(&report));
    report
}

/// Waits until `check` holds on tally-0's `/visits/total`.
fn wait_view(c: &Cluster, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = total_of(c, "tally-0");
        if check(&v) {
            return v;
        }
        if Instant::now() > deadline {
            dump(c);
            panic!("tally-0 never showed {what}: {v}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What tally-0 resolves, the pods' nftables rules and last log lines, the
/// status and the last events (printed when a wait fails).
fn dump(c: &Cluster) {
    if let Ok(out) = c.exec("tally-0", &["tally", "peers"]) {
        println!(
            "tally-0 `tally peers`:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for pod in ["tally-0", "tally-1", "tally-2"] {
        let ns = format!("tsim-{}-{pod}", c.name);
        if let Ok(o) = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "list", "ruleset"])
            .output()
        {
            println!("{pod} nftables:\n{}", String::from_utf8_lossy(&o.stdout));
        }
        if let Ok(log) = c.logs(pod, false) {
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            println!("{pod} log (newest first):\n{}", tail.join("\n"));
        }
    }
    if let Ok(t) = c.get() {
        println!("{t}");
    }
    for e in c.events().unwrap_or_default().iter().rev().take(30).rev() {
        println!("{:8.2}s {} {} {}", e.t, e.object, e.reason, e.message);
    }
}

/// The release's NetworkPolicy, rendered, with `edit` applied, as an upgrade.
fn apply_policy(c: &Cluster, edit: impl Fn(&mut NetworkPolicySpec)) {
    let mut m = Manifests::parse(&render(HOOK_WAIT)).unwrap();
    edit(m.network_policies[0].spec.as_mut().expect("a policy spec"));
    let msg = c.apply(&m.to_yaml().unwrap()).unwrap();
    assert!(msg.contains("(unchanged)"), "the pods must not roll: {msg}");
}

fn is_port(p: &NetworkPolicyPort, n: i32) -> bool {
    p.port == Some(IntOrString::Int(n))
}

/// `helm test` passes on the healthy cluster and fails when a member does
/// not answer; the chart's NetworkPolicy lets the release's pods reach each
/// other's peer port and DNS, and nothing else reach the peer port; a
/// policy without the peer rule or DNS breaks the cluster.
fn helm_test_and_network_policy(c: &Cluster) {
    let report = helm_test(c);
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.runs[0].name, "tally-test");

    // From outside the release (the client namespace, and the test pod,
    // whose component label keeps it out of the peer rule): the client
    // port answers, the peer port does not; between pods it does.
    let test_ns = format!("tsim-{}-tally-test", c.name);
    for (from, ns) in [
        ("the client namespace", c.status().unwrap().client_netns),
        ("the test pod", test_ns),
    ] {
        let client = net::http_get_in(
            &ns,
            addr_of(c, "tally-0", PORT),
            "/healthz",
            Duration::from_secs(2),
        );
        assert!(
            client.is_ok_and(|r| r.status == 200),
            "{from} cannot reach the client port"
        );
        let peer = net::http_get_in(
            &ns,
            addr_of(c, "tally-0", PEER_PORT),
            "/peer/state",
            Duration::from_secs(2),
        );
        let peer = peer.map(|r| r.status).map_err(|e| format!("{e:#}"));
        println!("from {from} to tally-0:{PEER_PORT}: {peer:?}");
        assert!(peer.is_err(), "{from} reached the peer port: {peer:?}");
    }
    // A sibling does reach it (the answer, 401 without the token, proves
    // the connection).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let inside = net::http_get_in(
            &format!("tsim-{}-tally-1", c.name),
            addr_of(c, "tally-0", PEER_PORT),
            "/peer/state",
            Duration::from_secs(2),
        )
        .map(|r| r.status)
        .map_err(|e| format!("{e:#}"));
        println!("from tally-1 to tally-0:{PEER_PORT}: {inside:?}");
        if inside.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            dump(c);
            panic!("a sibling cannot reach the peer port: {inside:?}");
        }
    }

    // A member that does not answer fails the test: `scripts/cluster test`
    // (the `tally-sim test` command) prints the report and the pod's log
    // and exits 1.
    c.request(&Request::Fault {
        fault: Fault::Isolate {
            pod: "tally-2".into(),
        },
    })
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally-sim"))
        .env("TALLY_SIM_HOME", c.state_dir.parent().unwrap())
        .args(["--name", &c.name, "test"])
        .output()
        .unwrap();
    c.request(&Request::Heal).unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!(
        "$ scripts/cluster test\n{stdout}{stderr}(exit {:?})",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    for wanted in [
        "TEST SUITE:     tally-test\n",
        "Phase:          Failed\n",
        "POD LOGS: tally-test\n",
        "the total is not complete",
    ] {
        assert!(stdout.contains(wanted), "{wanted:?} missing: {stdout}");
    }
    assert!(stderr.contains("* pod tally-test failed"), "{stderr}");
    wait_total(c, "tally-0", 300);

    // Enforcement shows: a policy without DNS egress breaks lookups in the
    // pods and so the totals; one without the peer ingress rule keeps a pod
    // from fetching its sibling, so totals are incomplete and the test
    // fails. Policies are stateful, so connections opened before a change
    // stay up (as with a CNI's conntrack): tally-2 is replaced to make its
    // peers connect afresh.
    apply_policy(c, |spec| {
        spec.egress
            .as_mut()
            .unwrap()
            .retain(|r| !r.ports.iter().flatten().any(|p| is_port(p, 53)))
    });
    let out = c
        .exec("tally-0", &["nslookup", "tally-1.tally-headless"])
        .unwrap();
    println!(
        "without DNS egress: nslookup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "DNS answered through a policy without DNS egress"
    );
    let v = wait_view(c, "an incomplete total without DNS", |v| {
        v["complete"] == false
    });
    println!("without DNS egress, tally-0: {v}");
    apply_policy(c, |_| {});
    let out = c
        .exec("tally-0", &["nslookup", "tally-1.tally-headless"])
        .unwrap();
    assert!(out.status.success(), "DNS is back with the chart's policy");
    wait_total(c, "tally-0", 300);

    apply_policy(c, |spec| {
        spec.ingress.as_mut().unwrap().retain(|r| {
            !r.ports
                .iter()
                .flatten()
                .any(|p| is_port(p, PEER_PORT.into()))
        })
    });
    replace_pod(c, "tally-2");
    let tally_2 = |v: &Value| {
        v["pods"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["pod"] == "tally-2"))
            .cloned()
            .unwrap_or_default()
    };
    let v = wait_view(c, "tally-2 unreachable without the peer rule", |v| {
        let row = tally_2(v);
        v["complete"] == false
            && row["source"] != "live"
            && row["error"].as_str().unwrap_or("").contains("connect")
    });
    println!("without the peer ingress rule, tally-0: {v}");
    assert_eq!(helm_test(c).runs[0].phase, "Failed");
    apply_policy(c, |_| {});
    wait_view(c, "tally-2 answering again", |v| {
        tally_2(v)["source"] == "live"
    });
    wait_total(c, "tally-0", 300);
}

/// The `helm test` pod's retry window (tests.waitSeconds): short, so a
/// failing run fails fast.
const HOOK_WAIT: &[&str] = &["tests.waitSeconds=3"];

#[test]
fn three_replicas_visits_dns_peers_delete_and_liveness() {
    let t0 = Instant::now();
    let mut c = up("e2e-main", HOOK_WAIT);
    // `get`: 3/3 Ready, three claims, both Services.
    let table = c.get().unwrap();
    println!("{table}");
    assert!(table.contains("statefulset.apps/tally   3/3"), "{table}");
    for p in 0..3 {
        assert!(
            table.contains(&format!("persistentvolumeclaim/data-tally-{p}")),
            "{table}"
        );
    }
    assert!(
        table.contains("service/tally-headless") && table.contains("service/tally "),
        "{table}"
    );
    assert_eq!(table.matches("1/1     Running").count(), 3, "{table}");

    // 300 visits through the client Service, spread over the pods.
    for i in 0..300 {
        assert!(visit(&c), "visit {i} through the client Service failed");
    }
    let counts: BTreeMap<String, u64> = (0..3)
        .map(|p| (format!("tally-{p}"), local_count(&c, &format!("tally-{p}"))))
        .collect();
    println!("per-pod counts after 300 visits: {counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 300, "{counts:?}");
    assert!(
        counts.values().all(|n| *n > 0 && *n < 300),
        "every pod must have served part of the visits: {counts:?}"
    );
    for p in 0..3 {
        let v = wait_total(&c, &format!("tally-{p}"), 300);
        assert_eq!(v["members"], 3, "{v}");
    }

    // The pod runs on the image's file system: no shell, as on a cluster…
    let out = c.exec("tally-0", &["sh"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!(
        "$ scripts/cluster exec tally-0 -- sh\n{err}(exit {:?})",
        out.status.code()
    );
    assert!(!out.status.success(), "a shell ran in the pod: {err}");
    assert!(
        err.contains(r#"exec: "sh": executable file not found in $PATH"#),
        "{err}"
    );
    // …yet the lab's lookup works, because the image ships nslookup.
    let out = c
        .exec("tally-0", &["nslookup", "tally-1.tally-headless"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("$ scripts/cluster exec tally-0 -- nslookup tally-1.tally-headless\n{text}");
    assert!(
        out.status.success(),
        "nslookup failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text,
        format!(
            "Server:\t\t10.96.0.10\nAddress:\t10.96.0.10#53\n\n\
             Name:\ttally-1.tally-headless.default.svc.cluster.local\nAddress: {}\n\n",
            ip_of(&c, "tally-1")
        )
    );

    // `tally peers` lists every member.
    let out = c.exec("tally-0", &["tally", "peers"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "tally peers failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in 0..3 {
        assert!(
            text.contains(&format!(
                "tally-{p}.tally-headless.default.svc.cluster.local"
            )),
            "{text}"
        );
    }

    helm_test_and_network_policy(&c);

    // Delete pod 0: it comes back with its count; the total never drops.
    let before = counts["tally-0"];
    let sampler = Sampler::start(&c);
    sampler.wait_for(5);
    replace_pod(&c, "tally-0");
    sampler.wait_for(5);
    let samples = sampler.finish("while tally-0 was deleted");
    assert!(samples.iter().all(|s| s.1 >= 300), "{samples:?}");
    assert_eq!(
        local_count(&c, "tally-0"),
        before,
        "tally-0 lost visits across deletion"
    );

    // SIGSTOP pod 2: not Ready -> out of the Service; liveness restarts it.
    let pid = c
        .status()
        .unwrap()
        .pods
        .iter()
        .find(|p| p.name == "tally-2")
        .unwrap()
        .pid
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let ip2 = ip_of(&c, "tally-2");
    c.wait_until(
        "tally-2 to become not Ready",
        Duration::from_secs(20),
        |s| {
            s.pods.iter().any(|p| p.name == "tally-2" && !p.ready)
                && s.services
                    .iter()
                    .find(|x| x.name == "tally")
                    .is_some_and(|x| {
                        !x.ready_endpoints
                            .iter()
                            .any(|e| e.starts_with(&format!("{ip2}:")))
                    })
        },
    )
    .unwrap();
    let still_stopped = c
        .status()
        .unwrap()
        .pods
        .iter()
        .find(|p| p.name == "tally-2")
        .unwrap()
        .restarts
        == 0;
    if still_stopped {
        for _ in 0..20 {
            let r = c.curl("/visits/local").unwrap();
            assert_eq!(r.status, 200);
            assert_ne!(
                json(&r.body)["pod"],
                "tally-2",
                "a not-Ready pod answered through the client Service"
            );
        }
    }
    c.wait_until(
        "tally-2 to be restarted by its liveness probe and Ready",
        Duration::from_secs(40),
        |s| {
            s.pods
                .iter()
                .any(|p| p.name == "tally-2" && p.restarts == 1 && p.ready && p.pid != Some(pid))
        },
    )
    .unwrap();
    let events = c.events().unwrap();
    assert!(
        events.iter().any(|e| e.object == "pod/tally-2"
            && e.reason == "Killing"
            && e.message.contains("liveness")),
        "no liveness kill event for tally-2"
    );
    assert!(
        c.get()
            .unwrap()
            .lines()
            .any(|l| l.starts_with("pod/tally-2") && l.split_whitespace().nth(3) == Some("1"))
    );

    // Down leaves nothing behind.
    let tracked = c.tracker().lock().unwrap().clone();
    let state_dir = c.state_dir.clone();
    c.down().unwrap();
    assert_clean("e2e-main", &state_dir, &tracked);
    println!(
        "three_replicas_visits_dns_peers_delete_and_liveness: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn service_name_without_headless_service_is_nxdomain() {
    prerequisites();
    let t0 = Instant::now();
    let mut m = Manifests::parse(&render(&["replicaCount=2"])).unwrap();
    // The old labs' bug: serviceName names no headless Service.
    m.stateful_set_mut().spec.service_name = Some("tally-nowhere".into());
    let c = start("e2e-nxdomain", m.to_yaml().unwrap());
    c.wait_ready(Duration::from_secs(90)).unwrap();
    // The lab's command, verbatim, inside the pod: NXDOMAIN and exit 1 for
    // either name, since no headless Service makes the pods' names.
    for name in ["tally-1.tally-headless", "tally-1.tally-nowhere"] {
        let out = c.exec("tally-0", &["nslookup", name]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "nslookup {name}: {text}");
        assert!(
            text.contains(&format!("** server can't find {name}: NXDOMAIN\n")),
            "{text}"
        );
    }
    println!(
        "service_name_without_headless_service_is_nxdomain: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// Tally's `nslookup` inside a pod and Debian's (dnsutils) in the client
/// namespace, with the same resolv.conf, ask the same cluster DNS: the
/// outputs and exit codes must be identical.
#[test]
fn nslookup_in_the_image_prints_what_debian_nslookup_prints() {
    prerequisites();
    let t0 = Instant::now();
    let c = up("e2e-nslookup", &["replicaCount=2"]);
    // The SRV name the pods themselves look up (the port name is the chart's).
    let peers = c.exec("tally-0", &["tally", "peers"]).unwrap();
    let peers = String::from_utf8_lossy(&peers.stdout);
    let srv = peers
        .lines()
        .find_map(|l| l.strip_prefix("query        SRV "))
        .unwrap_or_else(|| panic!("no SRV query in `tally peers`: {peers}"))
        .trim()
        .trim_end_matches(".default.svc.cluster.local.")
        .to_string();
    let queries: Vec<Vec<&str>> = vec![
        vec!["tally-1.tally-headless.default.svc.cluster.local"],
        vec!["tally-1.tally-headless"],
        vec!["-type=SRV", &srv],
        vec!["tally-1.tally-nowhere"],
        vec!["tally"],
    ];
    for query in &queries {
        let mut argv = vec!["nslookup"];
        argv.extend(query);
        let ours = c.exec("tally-0", &argv).unwrap();
        let debian = c.client_run(&argv).unwrap();
        let (ours_text, debian_text) = (
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&debian.stdout),
        );
        println!(
            "$ {} (Debian, client namespace: exit {:?})\n{debian_text}\
             $ {} (Tally, in tally-0: exit {:?})\n{ours_text}",
            argv.join(" "),
            debian.status.code(),
            argv.join(" "),
            ours.status.code()
        );
        assert!(
            debian_text.starts_with("Server:"),
            "Debian's nslookup did not run: {debian_text}{}",
            String::from_utf8_lossy(&debian.stderr)
        );
        assert_eq!(ours_text, debian_text, "nslookup {query:?}");
        assert_eq!(
            ours.status.code(),
            debian.status.code(),
            "exit code of nslookup {query:?}"
        );
    }
    // The pod's root is the image's tree: tally and its nslookup link, and
    // nothing of the host's (the debug build's libraries aside).
    let pid = c.status().unwrap().pods[0].pid.expect("tally-0 runs");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert_eq!(
        std::fs::read_link(root.join("usr/local/bin/nslookup")).unwrap(),
        Path::new("tally")
    );
    for host_only in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/os-release",
        "root",
    ] {
        assert!(
            std::fs::symlink_metadata(root.join(host_only)).is_err(),
            "/{host_only} is in the pod, but not in the image"
        );
    }
    // Not vacuous: the answers are there.
    let srv_out = c.exec("tally-0", &["nslookup", "-type=SRV", &srv]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&srv_out.stdout)
            .matches("\tservice = ")
            .count(),
        2
    );
    println!(
        "nslookup_in_the_image_prints_what_debian_nslookup_prints: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

fn first(events: &[tally_integration::sim::Event], object: &str, reason: &str) -> f64 {
    events
        .iter()
        .find(|e| e.object == object && e.reason == reason)
        .unwrap_or_else(|| panic!("no {reason} event for {object}"))
        .t
}

#[test]
fn parallel_starts_together_ordered_ready_one_by_one() {
    prerequisites();
    let t0 = Instant::now();
    let par = up("e2e-parallel", &["podManagementPolicy=Parallel"]);
    let ev = par.events().unwrap();
    let last_scheduled = (0..3)
        .map(|p| first(&ev, &format!("pod/tally-{p}"), "Scheduled"))
        .fold(0.0, f64::max);
    let first_ready = (0..3)
        .map(|p| first(&ev, &format!("pod/tally-{p}"), "Ready"))
        .fold(f64::MAX, f64::min);
    assert!(
        last_scheduled < first_ready,
        "Parallel: all pods should start before any is Ready: {ev:?}"
    );
    drop(par);

    let ord = up("e2e-ordered", &["podManagementPolicy=OrderedReady"]);
    let ev = ord.events().unwrap();
    for p in 0..2 {
        let ready = first(&ev, &format!("pod/tally-{p}"), "Ready");
        let next = first(&ev, &format!("pod/tally-{}", p + 1), "Scheduled");
        assert!(
            ready <= next,
            "OrderedReady: tally-{} started ({next:.2}s) before tally-{p} was Ready ({ready:.2}s)",
            p + 1
        );
    }
    // Scale down goes from the highest ordinal, one at a time.
    ord.scale(1).unwrap();
    ord.wait_until("scale to 1", Duration::from_secs(60), |s| {
        s.pods.len() == 1 && s.ready_replicas == 1
    })
    .unwrap();
    let ev = ord.events().unwrap();
    let del2 = first(&ev, "pod/tally-2", "Deleted");
    let kill1 = ev
        .iter()
        .rev()
        .find(|e| e.object == "pod/tally-1" && e.reason == "Killing")
        .unwrap()
        .t;
    assert!(
        del2 <= kill1,
        "OrderedReady scale-down must remove tally-2 before touching tally-1"
    );
    println!(
        "parallel_starts_together_ordered_ready_one_by_one: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn rolling_update_with_partition_canary_then_rest() {
    let t0 = Instant::now();
    let c = up("e2e-rollout", &[]);
    let old_rev = c.status().unwrap().update_revision;
    let visitor = Visitor::start(&c);
    let sampler = Sampler::start(&c);
    visitor.wait_for(20);
    sampler.wait_for(5);

    // Canary: a template change with partition 2 replaces only tally-2.
    let msg = c
        .apply(&render(&[
            "podAnnotations.rollout=canary",
            "updateStrategy.rollingUpdate.partition=2",
        ]))
        .unwrap();
    println!("upgrade: {msg}");
    let s = c
        .wait_until(
            "tally-2 at the new revision",
            Duration::from_secs(60),
            |s| {
                s.pods
                    .iter()
                    .any(|p| p.name == "tally-2" && p.revision == s.update_revision && p.ready)
            },
        )
        .unwrap();
    assert_ne!(s.update_revision, old_rev);
    // The canary holds while the cluster keeps serving: 50 more visits and
    // 30 more samples later, no other pod has been replaced.
    visitor.wait_for(50);
    sampler.wait_for(30);
    let s = c.status().unwrap();
    for p in &s.pods {
        let expected = if p.ordinal == 2 {
            &s.update_revision
        } else {
            &old_rev
        };
        assert_eq!(
            &p.revision, expected,
            "partition 2 must leave {} alone",
            p.name
        );
    }

    // Partition 0: the rest, highest ordinal first.
    c.apply(&render(&[
        "podAnnotations.rollout=canary",
        "updateStrategy.rollingUpdate.partition=0",
    ]))
    .unwrap();
    c.wait_ready(Duration::from_secs(90)).unwrap();
    let ev = c.events().unwrap();
    let replaced: Vec<&str> = ev
        .iter()
        .filter(|e| e.reason == "RollingUpdate")
        .map(|e| e.message.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        replaced,
        ["tally-2", "tally-1", "tally-0"],
        "rolling update order"
    );

    let acked = visitor.finish();
    sampler.wait_for(5);
    let samples = sampler.finish("during the rolling update");
    println!(
        "rollout: {acked} visits acknowledged, {} samples, last total {}",
        samples.len(),
        samples.last().unwrap().1
    );
    wait_total(&c, "tally-0", acked);
    println!(
        "rolling_update_with_partition_canary_then_rest: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn scale_3_5_2_while_visiting_keeps_the_total() {
    let t0 = Instant::now();
    let c = up("e2e-scale", &[]);
    let visitor = Visitor::start(&c);
    let sampler = Sampler::start(&c);
    visitor.wait_for(20);
    sampler.wait_for(5);
    c.scale(5).unwrap();
    c.wait_ready(Duration::from_secs(60)).unwrap();
    // Visits spread over all five pods before two go away.
    visitor.wait_for(50);
    c.scale(2).unwrap();
    c.wait_ready(Duration::from_secs(60)).unwrap();
    visitor.wait_for(20);
    let acked = visitor.finish();
    sampler.wait_for(5);
    let samples = sampler.finish("while scaling 3 -> 5 -> 2");
    println!(
        "scale: {acked} visits acknowledged, {} samples",
        samples.len()
    );
    assert!(
        acked > 50,
        "too few visits acknowledged ({acked}) to mean anything"
    );
    let claims: HashSet<String> = c
        .status()
        .unwrap()
        .claims
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(claims.len(), 5, "claims survive scale-down: {claims:?}");
    for pod in ["tally-0", "tally-1"] {
        let v = wait_total(&c, pod, acked);
        assert_eq!(v["members"], 2, "{v}");
    }
    println!(
        "scale_3_5_2_while_visiting_keeps_the_total: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// A cluster's state directory and what it was seen to own.
type Seen = (PathBuf, Arc<Mutex<tally_integration::sim::Tracked>>);

#[test]
fn a_failed_test_leaves_nothing_behind() {
    prerequisites();
    let manifests = render(&["replicaCount=1"]);
    let tracked: Arc<Mutex<Option<Seen>>> = Arc::default();
    let t2 = tracked.clone();
    let result = std::panic::catch_unwind(move || {
        let c = start("e2e-panic", manifests);
        c.wait_ready(Duration::from_secs(60)).unwrap();
        *t2.lock().unwrap() = Some((c.state_dir.clone(), c.tracker()));
        panic!("deliberate failure with a running cluster");
    });
    assert!(result.is_err());
    let (state_dir, tracker) = tracked.lock().unwrap().take().expect("the cluster came up");
    let seen = tracker.lock().unwrap().clone();
    assert_clean("e2e-panic", &state_dir, &seen);
}
