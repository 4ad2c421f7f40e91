//! What an operator sees, next to the simulator: a real Prometheus that
//! finds every pod through the headless Service's SRV records, and the page
//! in a real headless Chromium. Both run in the client namespace with the
//! cluster's DNS (`tally-sim client`), where they reach the pods as a
//! Prometheus or a browser in the cluster would.
//!
//! Needs Debian's `prometheus` and `chromium` (installed through
//! scripts/lib.sh on first use).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tally_integration::harness::workspace_root;
use tally_integration::sim::{Cluster, net};

use super::{json, local_count, total_of, up, visit};

/// Installs Debian packages through scripts/lib.sh (once per package).
fn need_apt(spec: &str) {
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!("source scripts/lib.sh && need_apt {spec}"))
        .current_dir(workspace_root())
        .status()
        .expect("running bash");
    assert!(
        status.success(),
        "installing {spec} through scripts/lib.sh failed"
    );
}

/// Polls `check` every 300 ms until it returns `Some` or `limit` passes.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {limit:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One series of an instant vector: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

/// A Prometheus server in the client namespace; stopped on drop.
struct Prometheus {
    child: Child,
    ns: String,
    addr: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes every member of `_http._tcp.<headless>` each second, with the
    /// chart's alert rules loaded.
    fn start(c: &Cluster, headless: &str) -> Prometheus {
        need_apt("prometheus:prometheus");
        let s = c.status().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rules = workspace_root().join("chart/files/alerts.rules.yaml");
        let srv = format!("_http._tcp.{headless}.{}.svc.{}", s.namespace, s.domain);
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: tally\n    dns_sd_configs:\n      - names: ['{srv}']\n        type: SRV\n        refresh_interval: 1s\n\
             \x20   relabel_configs:\n      - source_labels: [__meta_dns_srv_record_target]\n        regex: '([^.]+)\\..*'\n        target_label: pod\n",
            rules = rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let log = dir.path().join("prometheus.log");
        let child = c
            .client_spawn(
                &[
                    "prometheus",
                    &format!("--config.file={}", config_path.display()),
                    &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                    &format!("--web.listen-address={addr}"),
                ],
                &log,
            )
            .unwrap();
        let p = Prometheus {
            child,
            ns: s.client_netns,
            addr,
            log,
            _dir: dir,
        };
        wait_for("Prometheus to answer", Duration::from_secs(30), || {
            p.api("/-/ready").map(drop)
        });
        p
    }

    fn api(&self, path: &str) -> Result<String, String> {
        let r =
            net::http_get_in(&self.ns, self.addr, path, Duration::from_secs(5)).map_err(|e| {
                format!(
                    "{e:#}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            })?;
        if r.status == 200 {
            Ok(r.body)
        } else {
            Err(format!("HTTP {}: {}", r.status, r.body))
        }
    }

    /// An instant vector query: labels → value.
    fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let body = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        let v = json(&body);
        let results = v["data"]["result"].as_array().ok_or(body.clone())?;
        Ok(results
            .iter()
            .map(|r| {
                let labels = serde_json::from_value(r["metric"].clone()).unwrap_or_default();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect())
    }

    /// `sum(tally_visits_total)` and `tally_visits_total` by pod.
    fn visits(&self) -> Result<(u64, BTreeMap<String, u64>), String> {
        let sum = self.query("sum(tally_visits_total)")?;
        let sum = sum.first().map(|(_, v)| *v as u64).ok_or("no sum yet")?;
        let per_pod = self
            .query("tally_visits_total")?
            .into_iter()
            .map(|(l, v)| (l.get("pod").cloned().unwrap_or_default(), v as u64))
            .collect();
        Ok((sum, per_pod))
    }

    /// Healthy targets, by pod.
    fn up_pods(&self) -> Result<Vec<String>, String> {
        let mut pods: Vec<String> = self
            .query("up == 1")?
            .into_iter()
            .filter_map(|(l, _)| l.get("pod").cloned())
            .collect();
        pods.sort();
        Ok(pods)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each pod's own count, from the API.
fn api_counts(c: &Cluster, pods: &[&str]) -> BTreeMap<String, u64> {
    pods.iter()
        .map(|p| (p.to_string(), local_count(c, p)))
        .collect()
}

/// Waits until Prometheus' per-pod visits equal `want` and returns its sum.
fn prometheus_agrees(p: &Prometheus, want: &BTreeMap<String, u64>) -> u64 {
    wait_for(
        "Prometheus to scrape the current counts",
        Duration::from_secs(30),
        || {
            let (sum, per_pod) = p.visits()?;
            if per_pod == *want {
                Ok(sum)
            } else {
                Err(format!("PromQL {per_pod:?} (sum {sum}), API {want:?}"))
            }
        },
    )
}

#[test]
fn prometheus_finds_every_pod_by_srv_and_sums_what_tally_counts() {
    let c = up("e2e-prometheus", &[]);
    let prom = Prometheus::start(&c, "tally-headless");
    let pods = wait_for("3 targets up", Duration::from_secs(30), || {
        match prom.up_pods() {
            Ok(p) if p.len() == 3 => Ok(p),
            other => Err(format!("{other:?}")),
        }
    });
    println!(
        "Prometheus discovered {} pods via SRV: {}",
        pods.len(),
        pods.join(", ")
    );
    assert_eq!(pods, ["tally-0", "tally-1", "tally-2"]);

    // The chart's alert rules are loaded and evaluated.
    let rules = json(&prom.api("/api/v1/rules").unwrap());
    let loaded: Vec<&str> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["health"] == "ok" || r["health"] == "unknown")
        .filter_map(|r| r["name"].as_str())
        .collect();
    println!("alert rules loaded: {}", loaded.join(", "));
    assert!(loaded.len() >= 6, "{rules}");

    for _ in 0..60 {
        assert!(visit(&c));
    }
    let names = ["tally-0", "tally-1", "tally-2"];
    let counts = api_counts(&c, &names);
    let total = super::wait_total(&c, "tally-0", 60)["total"]
        .as_u64()
        .unwrap();
    let sum = prometheus_agrees(&prom, &counts);
    println!(
        "after 60 visits: PromQL sum(tally_visits_total) = {sum}, /visits/total = {total}; per pod {counts:?}"
    );
    assert_eq!(sum, total);

    // A deleted pod comes back with its volume: its counter continues.
    c.delete_pod("tally-1").unwrap();
    c.wait_ready(Duration::from_secs(60)).unwrap();
    for _ in 0..30 {
        assert!(visit(&c));
    }
    let counts = api_counts(&c, &names);
    let total = super::wait_total(&c, "tally-0", 90)["total"]
        .as_u64()
        .unwrap();
    let sum = prometheus_agrees(&prom, &counts);
    println!(
        "after deleting tally-1 and 30 more visits: PromQL sum = {sum}, /visits/total = {total}; per pod {counts:?}"
    );
    assert_eq!(sum, total);

    // Scale-down: Prometheus forgets tally-2 (its target is gone from the
    // SRV answer, its series go stale); Tally keeps its last count.
    let gone = counts["tally-2"];
    c.scale(2).unwrap();
    wait_for(
        "tally-2 to leave the targets",
        Duration::from_secs(60),
        || match prom.up_pods() {
            Ok(p) if p == ["tally-0", "tally-1"] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let remaining = api_counts(&c, &names[..2]);
    let sum = prometheus_agrees(&prom, &remaining);
    let total = total_of(&c, "tally-0");
    println!(
        "after scaling to 2: PromQL sum = {sum}, /visits/total = {} (complete {}); tally-2's {gone} visits are only in Tally's total",
        total["total"], total["complete"]
    );
    assert_eq!(total["total"].as_u64(), Some(90));
    assert_eq!(sum + gone, 90);
}

/// Headless Chromium in the client namespace, as the facts file says.
fn chromium(c: &Cluster, extra: &[&str], url: &str) -> String {
    need_apt("chromium:chromium");
    let profile = tempfile::tempdir().unwrap();
    let profile_flag = format!("--user-data-dir={}", profile.path().display());
    let mut argv = vec![
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        &profile_flag,
        // Lets the page's first refresh of /visits/total run and finish.
        "--virtual-time-budget=3000",
    ];
    argv.extend_from_slice(extra);
    argv.push(url);
    let out = c.client_run(&argv).unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id="<id>"` (the page's markup is simple:
/// no nested element of the same kind inside those).
fn by_id<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in\n{dom}"));
    let from = start + dom[start..].find('>').unwrap() + 1;
    &dom[from..from + dom[from..].find('<').unwrap()]
}

#[test]
fn the_page_in_chromium_shows_what_the_api_says() {
    let c = up("e2e-page", &[]);
    for _ in 0..30 {
        assert!(visit(&c));
    }
    super::wait_total(&c, "tally-0", 30);
    let ip = super::ip_of(&c, "tally-0");
    let url = format!("http://{ip}:8080/");

    // The screenshots README.md shows (each load counts one visit on tally-0).
    let shots = workspace_root().join("integration/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    for (file, flags) in [
        ("page.png", &["--window-size=900,1000"][..]),
        (
            "page-phone-dark.png",
            &["--window-size=412,900", "--force-dark-mode"][..],
        ),
    ] {
        let path = shots.join(file);
        let _ = std::fs::remove_file(&path);
        let flag = format!("--screenshot={}", path.display());
        let mut all = flags.to_vec();
        all.push(&flag);
        chromium(&c, &all, &url);
        let png = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{file}: {} bytes",
            png.len()
        );
    }

    // The DOM after the page's own refresh, against the API right after.
    let dom = chromium(&c, &["--dump-dom"], &url);
    let api = total_of(&c, "tally-0");
    let local = local_count(&c, "tally-0");
    assert!(
        dom.contains("data-refreshes=\"1\"") || dom.contains("data-refreshes=\"2\""),
        "the page never refreshed itself:\n{dom}"
    );
    assert_eq!(by_id(&dom, "pod"), "tally-0");
    assert_eq!(by_id(&dom, "local"), local.to_string());
    assert_eq!(by_id(&dom, "total"), api["total"].to_string(), "{dom}");
    assert_eq!(by_id(&dom, "members"), "3 members");
    assert_eq!(by_id(&dom, "state"), "Complete: all 3 members answered");
    assert!(dom.contains("data-complete=\"true\""));
    let rows: BTreeMap<String, u64> = api["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap().to_string(),
                p["count"].as_u64().unwrap(),
            )
        })
        .collect();
    for (pod, count) in &rows {
        assert!(
            dom.contains(&format!("data-pod=\"{pod}\" data-count=\"{count}\"")),
            "{pod} should show {count}:\n{dom}"
        );
    }
    assert_eq!(api["total"].as_u64(), Some(33));
    println!(
        "page shows total {} and {rows:?}, as /visits/total does",
        by_id(&dom, "total")
    );

    // Partial: a member that does not answer turns the state around.
    let status = c.status().unwrap();
    let pid = status
        .pods
        .iter()
        .find(|p| p.name == "tally-2")
        .and_then(|p| p.pid)
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let dom = chromium(&c, &["--dump-dom"], &url);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    assert!(dom.contains("data-complete=\"false\""), "{dom}");
    assert!(
        by_id(&dom, "state").starts_with("Partial: 1 of 3 members did not answer"),
        "{}",
        by_id(&dom, "state")
    );
}
