//! The monitoring the chart ships, against the real binary and promtool:
//! every PromQL expression of the Grafana dashboard and of the alert rules
//! parses (`promtool check rules`) and names only metrics a real `tally`
//! exports (its `/metrics`, scraped); the chart's PrometheusRule and
//! dashboard ConfigMap carry exactly those files.
//!
//! A fresh pod (started, probed once, scraped once) already exports a
//! sample of every series they name, labelled counters included at 0
//! (Prometheus' advice on missing metrics: an alert on a series that does
//! not exist yet cannot fire).
//!
//! Needs `promtool` (Debian `prometheus`; scripts/test installs it).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;
use tally_integration::harness::{
    ClusterDns, Http, Tally, TallyOptions, loopback_block, workspace_root,
};
use tally_integration::sim::manifest::helm_template;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn files() -> PathBuf {
    workspace_root().join("chart/files")
}

/// Words of PromQL that are not metric names.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// The metric names an expression selects: identifiers that are not
/// functions or aggregations (followed by `(`), label names (inside `{}` or
/// the lists after `by`/`without`/`on`/...), strings, durations or keywords.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Depth of `{...}` and `[...]`, and whether the next `(...)` lists labels.
    let (mut braces, mut brackets) = (0, 0);
    let mut label_list = false;
    let mut in_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            '(' if label_list => {
                in_label_list = true;
                label_list = false;
            }
            ')' if in_label_list => in_label_list = false,
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i + 1 < chars.len()
                    && (chars[i + 1].is_ascii_alphanumeric()
                        || chars[i + 1] == '_'
                        || chars[i + 1] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..=i].iter().collect();
                let rest: String = chars[i + 1..].iter().collect();
                let rest = rest.trim_start();
                let next = rest.chars().next();
                // `sum by (x) (...)`: an aggregation, whose `(` comes later.
                let aggregation = ["by", "without"].iter().any(|k| {
                    rest.strip_prefix(k)
                        .is_some_and(|r| r.trim_start().starts_with('('))
                });
                let number_before = start > 0 && chars[start - 1].is_ascii_digit();
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str())
                {
                    label_list = true;
                } else if braces == 0
                    && brackets == 0
                    && !in_label_list
                    && !number_before
                    && next != Some('(')
                    && !aggregation
                    && !KEYWORDS.contains(&word.to_lowercase().as_str())
                {
                    names.insert(word);
                }
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// The series names a real exposition makes available: counters as
/// `_total`, histograms as `_bucket`/`_sum`/`_count`, gauges as they are,
/// read from the `# TYPE` lines (a family with no labelled child yet has
/// no sample, but is exported all the same).
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

/// Every expression of the dashboard, with the panel it belongs to.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                expr.to_string(),
            ));
        }
    }
    out
}

/// Every expression of the alert rules file, with its alert.
fn rule_exprs(rules: &serde_yaml::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push((
                rule["alert"].as_str().expect("alert").to_string(),
                rule["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

/// Series the rules use that other exporters provide: Prometheus's own
/// `up` (TallyTargetDown) and kube-state-metrics (TallyMembersBelowReplicas).
const FOREIGN: &[&str] = &[
    "up",
    "kube_statefulset_replicas",
    "kube_statefulset_status_replicas_ready",
];

/// Grafana's variables, replaced by what they expand to (`$1` in a
/// `label_replace` is PromQL's, not Grafana's).
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$namespace", ".*")
        .replace("$release", "tally")
}

/// The names of the samples in an exposition (not the `# TYPE` lines: a
/// family with no child has a type but no series).
fn sampled(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every expression of the shipped dashboard and alert rules.
fn shipped_exprs() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(files().join("dashboard.json")).unwrap())
            .unwrap();
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(files().join("alerts.rules.yaml")).unwrap())
            .unwrap();
    let mut exprs = dashboard_exprs(&dashboard);
    exprs.extend(rule_exprs(&rules));
    exprs
}

/// Runs `promtool check rules` on the expressions as recording rules.
fn promtool_parses(exprs: &[(String, String)]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({"record": format!("dashboard:expr_{i}"), "expr": expand(e)}))
        .collect();
    let file = dir.path().join("exprs.rules.json");
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()])
}

fn promtool(args: &[&str]) -> Result<(), String> {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install Debian's `prometheus` (scripts/test does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// A sibling that answers every request with `body`.
async fn fake_sibling(ip: Ipv4Addr, body: String) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

/// `/metrics` of a real tally pod that served visits and a total, with one
/// sibling that does not answer and one that claims more visits for this
/// pod than it counted, so labelled families (peer errors, refusals) have
/// series too.
async fn scrape() -> String {
    let block = loopback_block(1);
    let ip = |last| Ipv4Addr::new(block[0], block[1], block[2], last);
    let dns = ClusterDns::start(ip(2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = TallyOptions::new(dir.path())
        .listen(SocketAddr::new(ip(10).into(), 0))
        .env("POD_NAME", "tally-0")
        .env("TALLY_PEERS_SERVICE", "tally-headless")
        .env("TALLY_DNS_SERVER", dns.addr)
        .env("TALLY_DNS_MAX_TTL_S", 0);
    let tally = Tally::start(&options).unwrap();
    let http = Http::new();
    let me = http.get(&tally.url("/visits/local")).await.unwrap().json();
    let forged = serde_json::json!({
        "pod": "tally-2", "incarnation": "b2",
        "entries": [
            {"pod": "tally-2", "incarnation": "b2", "count": 1},
            {"pod": "tally-0", "incarnation": me["incarnation"], "count": 1_000_000},
        ]
    });
    let liar = fake_sibling(ip(12), forged.to_string()).await;
    let dead = SocketAddr::new(ip(11).into(), liar.port());
    dns.publish(&[
        ("tally-0", tally.addr),
        ("tally-1", dead),
        ("tally-2", liar),
    ]);
    for path in ["/", "/", "/visits/total", "/nope"] {
        http.get(&tally.url(path)).await.unwrap();
    }
    http.get(&tally.url("/metrics")).await.unwrap().body
}

fn unknown_names(exprs: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    exprs
        .iter()
        .flat_map(|(owner, e)| {
            metric_names(&expand(e))
                .into_iter()
                .filter(|n| !exported.contains(n))
                .map(move |n| format!("{owner}: {n} in {e}"))
        })
        .collect()
}

#[tokio::test]
async fn dashboard_and_alerts_parse_and_name_only_exported_metrics() {
    let exposition = scrape().await;
    let exported = exported(&exposition);
    assert!(
        exported.contains("tally_visits_total") && exported.contains("tally_build_info"),
        "{exposition}"
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(files().join("dashboard.json")).unwrap())
            .unwrap();
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(files().join("alerts.rules.yaml")).unwrap())
            .unwrap();
    let mut exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 15, "{exprs:?}");
    promtool_parses(&exprs)
        .unwrap_or_else(|e| panic!("a dashboard expression does not parse:\n{e}"));
    exprs.extend(rule_exprs(&rules));
    let unknown: Vec<String> = unknown_names(&exprs, &exported)
        .into_iter()
        .filter(|u| !FOREIGN.iter().any(|f| u.contains(&format!(": {f} in "))))
        .collect();
    assert!(
        unknown.is_empty(),
        "expressions name metrics tally does not export:\n{}\n\nexported: {exported:?}",
        unknown.join("\n")
    );
    // And every panel reads something: no expression without a metric.
    for (owner, e) in &exprs {
        assert!(!metric_names(e).is_empty(), "{owner}: no metric in {e}");
    }
}

#[tokio::test]
async fn a_fresh_pod_exports_every_series_the_dashboard_and_alerts_use() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(&TallyOptions::new(dir.path())).unwrap();
    let http = Http::new();
    // What kubelet does before anyone scrapes: one readiness probe.
    let ready = http.get(&tally.peer_url("/readyz")).await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    let first = http.get(&tally.url("/metrics")).await.unwrap().body;
    let samples = sampled(&first);
    let mut missing = Vec::new();
    for (owner, e) in shipped_exprs() {
        for name in metric_names(&expand(&e)) {
            if !FOREIGN.contains(&name.as_str()) && !samples.contains(&name) {
                missing.push(format!("{owner}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "a fresh pod's first /metrics has no sample of:\n{}\n\n{first}",
        missing.join("\n")
    );
    // And docs/operations.md's metrics table names every family.
    let operations = std::fs::read_to_string(workspace_root().join("docs/operations.md")).unwrap();
    let undocumented: Vec<String> = exported(&first)
        .into_iter()
        .filter(|n| !n.ends_with("_sum") && !n.ends_with("_count"))
        .map(|n| n.trim_end_matches("_bucket").to_string())
        .filter(|n| {
            !operations.contains(&format!("`{n}`")) && !operations.contains(&format!("`{n}{{"))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/operations.md's metrics table lacks {undocumented:?}"
    );
    // Labelled counters: a series per known label, at 0 (src/metrics.rs
    // lists the labels; its unit test checks the lists are whole).
    for (family, at_least) in [
        ("tally_peer_errors_total{kind=", 6),
        ("tally_peer_refusals_total{reason=", 10),
    ] {
        let series: Vec<&str> = first.lines().filter(|l| l.starts_with(family)).collect();
        assert!(
            series.len() >= at_least && series.iter().all(|l| l.ends_with("} 0")),
            "{family}: {series:?}"
        );
    }
    println!(
        "a fresh pod's first /metrics: {} series names, every one of the {} the dashboard and alerts use",
        samples.len(),
        shipped_exprs()
            .iter()
            .flat_map(|(_, e)| metric_names(&expand(e)))
            .filter(|n| !FOREIGN.contains(&n.as_str()))
            .collect::<BTreeSet<_>>()
            .len()
    );
}

#[test]
fn sampled_names_only_series_with_a_sample() {
    let names = sampled(
        "# TYPE tally_peer_errors counter\n# TYPE tally_members gauge\ntally_members 3\n# EOF\n",
    );
    assert_eq!(names, BTreeSet::from(["tally_members".to_string()]));
}

#[test]
fn the_checks_catch_a_misspelt_metric_and_a_broken_expression() {
    let exported = exported(
        "# TYPE tally_visits counter\n# TYPE tally_members gauge\n# TYPE tally_fanout_duration_seconds histogram\n",
    );
    let good = [(
        "ok".to_string(),
        "histogram_quantile(0.99, sum by (instance, le) (rate(tally_fanout_duration_seconds_bucket{route=\"/x\"}[$__rate_interval]))) \
         / on (instance) group_left max(tally_members) > bool 1e3 and tally_visits_total offset 5m"
            .to_string(),
    )];
    assert_eq!(unknown_names(&good, &exported), Vec::<String>::new());
    let misspelt = [(
        "bad".to_string(),
        "sum(rate(tally_visit_total[5m]))".to_string(),
    )];
    assert_eq!(
        unknown_names(&misspelt, &exported),
        vec!["bad: tally_visit_total in sum(rate(tally_visit_total[5m]))"]
    );
    let foreign = [("bad".to_string(), "up == 0".to_string())];
    assert_eq!(unknown_names(&foreign, &exported).len(), 1);
    let broken = [(
        "bad".to_string(),
        "sum(rate(tally_visits_total[5m])".to_string(),
    )];
    assert!(promtool_parses(&broken).is_err());
    assert!(promtool_parses(&good).is_ok());
}

#[test]
fn the_chart_ships_exactly_these_rules_and_this_dashboard() {
    let rendered = helm_template(
        &workspace_root().join("chart"),
        "tally",
        &[
            "--set".into(),
            "metrics.prometheusRule.enabled=true".into(),
            "--set".into(),
            "metrics.dashboard.enabled=true".into(),
        ],
    )
    .unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect();
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"].as_str() == Some(k));
    let rule = kind("PrometheusRule").next().expect("a PrometheusRule");
    let file: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(files().join("alerts.rules.yaml")).unwrap())
            .unwrap();
    // The first group is the file; the second knows the replica count.
    assert_eq!(rule["spec"]["groups"][0], file["groups"][0]);
    let groups = rule["spec"]["groups"].as_sequence().unwrap();
    assert_eq!(
        groups.len(),
        file["groups"].as_sequence().unwrap().len() + 1
    );
    let fallback = &groups[groups.len() - 1];
    assert_eq!(fallback["name"].as_str(), Some("tally-replicas-tally"));
    let expr = fallback["rules"][0]["expr"].as_str().unwrap();
    assert!(
        expr.contains("< 3") && expr.contains("unless on (namespace)"),
        "{expr}"
    );
    let dashboard = kind("ConfigMap")
        .find(|d| d["metadata"]["labels"]["grafana_dashboard"].as_str() == Some("1"))
        .expect("a ConfigMap labelled grafana_dashboard: \"1\"");
    let shipped: Value =
        serde_json::from_str(dashboard["data"]["tally.json"].as_str().unwrap()).unwrap();
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(files().join("dashboard.json")).unwrap())
            .unwrap();
    assert_eq!(shipped, file);

    // Off by default.
    let plain = helm_template(&workspace_root().join("chart"), "tally", &[]).unwrap();
    assert!(!plain.contains("kind: PrometheusRule") && !plain.contains("grafana_dashboard"));
}
