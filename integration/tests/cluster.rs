//! The cluster total against real `tally` processes on distinct loopback
//! addresses, discovering each other through a real DNS server that
//! publishes a headless Service's SRV and A records as CoreDNS does.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use nix::sys::signal::Signal;
use serde_json::Value;
use tally_integration::harness::{
    ClusterDns, Http, Reply, Tally, TallyOptions, Tmpfs, loopback_block,
};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Generous bound proving "no hang" (deadline 1 s + slack for a loaded CI
/// machine); the latency targets themselves are measured by scripts/bench.
const NO_HANG: Duration = Duration::from_secs(4);

struct Pods {
    dns: ClusterDns,
    block: [u8; 3],
    dirs: Vec<TempDir>,
    pods: Vec<Option<Tally>>,
    extra_env: Vec<(String, String)>,
    http: Http,
}

impl Pods {
    async fn start(test: u8, n: usize, extra_env: &[(&str, &str)]) -> Pods {
        let block = loopback_block(test);
        let dns = ClusterDns::start(Ipv4Addr::new(block[0], block[1], block[2], 2))
            .await
            .unwrap();
        Pods::start_with(dns, block, n, extra_env)
    }

    /// Like [`start`](Self::start), with DNS answers cached like CoreDNS's
    /// `cache` for `ttl`.
    async fn start_caching(test: u8, n: usize, ttl: Duration) -> Pods {
        let block = loopback_block(test);
        let ip = Ipv4Addr::new(block[0], block[1], block[2], 2);
        let dns = ClusterDns::start_caching(ip, ttl).await.unwrap();
        Pods::start_with(dns, block, n, &[])
    }

    fn start_with(dns: ClusterDns, block: [u8; 3], n: usize, extra_env: &[(&str, &str)]) -> Pods {
        let mut pods = Pods {
            dns,
            block,
            dirs: (0..n).map(|_| tempfile::tempdir().unwrap()).collect(),
            pods: Vec::new(),
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            http: Http::new(),
        };
        for i in 0..n {
            let tally = pods.launch(i);
            pods.pods.push(Some(tally));
        }
        pods.publish_all();
        pods
    }

    fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.block[0], self.block[1], self.block[2], 10 + i as u8)
    }

    fn options(&self, i: usize) -> TallyOptions {
        let mut options = TallyOptions::new(self.dirs[i].path())
            .listen(SocketAddr::new(self.ip(i).into(), 0))
            .env("POD_NAME", format!("tally-{i}"))
            .env("TALLY_PEERS_SERVICE", "tally-headless")
            .env("TALLY_DNS_SERVER", self.dns.addr)
            .env("TALLY_DNS_MAX_TTL_S", 0);
        for (k, v) in &self.extra_env {
            options = options.env(k, v);
        }
        options
    }

    fn launch(&self, i: usize) -> Tally {
        Tally::start(&self.options(i)).unwrap()
    }

    fn pod(&self, i: usize) -> &Tally {
        self.pods[i].as_ref().expect("pod is running")
    }

    /// Stops pod `i` with SIGTERM (its hand-over and final commit), waiting
    /// up to 10 s for it to exit.
    fn terminate(&mut self, i: usize) {
        self.pods[i]
            .take()
            .expect("the pod runs")
            .terminate(Duration::from_secs(10))
            .unwrap();
    }

    /// Publishes every pod that was started at least once, at its address.
    fn publish_all(&self) {
        let names: Vec<String> = (0..self.pods.len()).map(|i| format!("tally-{i}")).collect();
        let records: Vec<(&str, SocketAddr)> = self
            .pods
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (names[i].as_str(), p.peer_addr)))
            .collect();
        self.dns.publish(&records);
    }

    async fn visit(&self, i: usize, n: usize) {
        for _ in 0..n {
            let reply = self.get(i, "/").await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        }
    }

    /// GET `path` on pod `i`.
    async fn get(&self, i: usize, path: &str) -> Reply {
        self.http.get(&self.pod(i).url(path)).await.unwrap()
    }

    /// GET `path` on pod `i`'s peer port.
    async fn peer_get(&self, i: usize, path: &str) -> Reply {
        self.http.get(&self.pod(i).peer_url(path)).await.unwrap()
    }

    async fn total(&self, i: usize) -> (Value, Duration) {
        let started = Instant::now();
        let reply = self.get(i, "/visits/total").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        (reply.json(), started.elapsed())
    }
}

fn row<'a>(view: &'a Value, pod: &str) -> Vec<&'a Value> {
    view["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["pod"] == pod)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_pod_reports_the_exact_sum() {
    let pods = Pods::start(1, 3, &[]).await;
    pods.visit(0, 5).await;
    pods.visit(1, 3).await;
    pods.visit(2, 2).await;
    for i in 0..3 {
        let (view, _) = pods.total(i).await;
        assert_eq!(view["total"], 10, "pod {i}: {view}");
        assert_eq!(view["complete"], true, "pod {i}: {view}");
        assert_eq!(view["members"], 3);
        assert_eq!(view["pods"].as_array().unwrap().len(), 3, "{view}");
        for j in 0..3 {
            let want = if i == j { "self" } else { "live" };
            assert_eq!(
                row(&view, &format!("tally-{j}"))[0]["source"],
                want,
                "{view}"
            );
        }
    }
    let text = pods.get(1, "/visits/total?format=text").await;
    assert_eq!(text.body, "10\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_and_hung_pods_keep_their_counts_and_cost_at_most_the_deadline() {
    let mut pods = Pods::start(2, 3, &[]).await;
    pods.visit(0, 4).await;
    pods.visit(1, 6).await;
    pods.visit(2, 7).await;
    assert_eq!(pods.total(0).await.0["total"], 17);

    pods.pods[2].take().unwrap().kill9();
    let (view, took) = pods.total(0).await;
    assert!(took < NO_HANG, "{took:?}");
    assert_eq!(view["total"], 17, "{view}");
    assert_eq!(view["complete"], false);
    let gone = row(&view, "tally-2")[0];
    assert_eq!(
        (gone["source"].as_str(), gone["count"].as_u64()),
        (Some("cached"), Some(7))
    );
    assert!(
        gone["error"].as_str().unwrap().contains("connection"),
        "{gone}"
    );

    pods.pod(1).pause();
    let (view, took) = pods.total(0).await;
    pods.pod(1).signal(Signal::SIGCONT);
    assert!(took < NO_HANG, "hung peer held the answer for {took:?}");
    assert_eq!(view["total"], 17, "{view}");
    let hung = row(&view, "tally-1")[0];
    assert_eq!(hung["source"], "cached");
    assert!(hung["error"].as_str().unwrap().contains("ms"), "{hung}");
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_down_and_a_replaced_volume_never_lower_the_total() {
    let mut pods = Pods::start(3, 3, &[]).await;
    pods.visit(0, 2).await;
    pods.visit(1, 3).await;
    pods.visit(2, 5).await;
    assert_eq!(pods.total(0).await.0["total"], 10);

    // Scale 3 → 2: tally-2 stops and its records go.
    pods.terminate(2);
    pods.publish_all();
    let (view, _) = pods.total(0).await;
    assert_eq!(view["total"], 10, "{view}");
    assert_eq!(view["members"], 2);
    assert_eq!(
        view["complete"], true,
        "both current members answered: {view}"
    );
    assert_eq!(row(&view, "tally-2")[0]["source"], "cached");

    // tally-1 comes back on a new, empty volume: a new incarnation.
    let old = pods.total(1).await.0;
    let old_incarnation = row(&old, "tally-1")[0]["incarnation"].clone();
    pods.terminate(1);
    pods.dirs[1] = tempfile::tempdir().unwrap();
    pods.pods[1] = Some(pods.launch(1));
    pods.publish_all();
    pods.visit(1, 4).await;
    let (view, _) = pods.total(0).await;
    assert_eq!(view["total"], 14, "old visits stay, new ones add: {view}");
    let rows = row(&view, "tally-1");
    assert_eq!(rows.len(), 2, "{view}");
    let old_row = rows
        .iter()
        .find(|r| r["incarnation"] == old_incarnation)
        .unwrap();
    assert_eq!(
        (old_row["count"].as_u64(), old_row["source"].as_str()),
        (Some(3), Some("cached"))
    );
    // The new pod learns its predecessor's count too.
    assert_eq!(pods.total(1).await.0["total"], 14);
}

#[tokio::test(flavor = "multi_thread")]
async fn knowledge_travels_through_a_sibling() {
    let mut pods = Pods::start(4, 3, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    pods.visit(2, 9).await;
    pods.visit(1, 1).await;
    // B (tally-1) fetches C (tally-2); then C goes away for good.
    assert_eq!(pods.total(1).await.0["total"], 10);
    pods.pods[2].take().unwrap().kill9();
    // A (tally-0) has never talked to C, and C no longer answers.
    let (view, _) = pods.total(0).await;
    assert_eq!(view["total"], 10, "{view}");
    let c = row(&view, "tally-2")[0];
    assert_eq!(
        (c["count"].as_u64(), c["source"].as_str()),
        (Some(9), Some("cached"))
    );
    assert_eq!(view["complete"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_total_survives_a_full_restart() {
    let mut pods = Pods::start(5, 3, &[]).await;
    pods.visit(0, 1).await;
    pods.visit(1, 2).await;
    pods.visit(2, 3).await;
    assert_eq!(pods.total(0).await.0["total"], 6);
    let peer_addr = pods.pod(0).peer_addr;
    for slot in &mut pods.pods {
        slot.take()
            .unwrap()
            .terminate(Duration::from_secs(10))
            .unwrap();
    }
    // Only tally-0 is back, at the address DNS lists for it (a pod that
    // reaches no sibling serves once DNS lists it there); its siblings are
    // still down (their records stay).
    pods.pods[0] = Some(Tally::start(&pods.options(0).peer_listen(peer_addr)).unwrap());
    let (view, _) = pods.total(0).await;
    assert_eq!(
        view["total"], 6,
        "first answer after a full restart: {view}"
    );
    assert_eq!(view["complete"], false);
    pods.pods[1] = Some(pods.launch(1));
    pods.pods[2] = Some(pods.launch(2));
    pods.publish_all();
    let (view, _) = pods.total(0).await;
    assert_eq!(
        (view["total"].as_u64(), view["complete"].as_bool()),
        (Some(6), Some(true)),
        "{view}"
    );
}

/// design.md §6: what a pod answered survives `kill -9` and a restart,
/// full volume or not. tally-0's volume is full while it learns tally-1's
/// count, and tally-1 leaves; space comes back; tally-0 is killed with -9
/// and restarts. Its total used to go down (17 → 5): `peers.state` was
/// written only on the next change, a failed write was never retried, and
/// the hand-over was answered 204 before it was on disk.
#[tokio::test(flavor = "multi_thread")]
async fn a_total_never_goes_down_after_a_full_volume_and_kill_9() {
    let volume = Tmpfs::mount("512k");
    let mut pods = Pods::start(19, 2, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    pods.terminate(0);
    let mut on_volume = pods.options(0);
    on_volume.data_dir = volume.path().join("data");
    pods.pods[0] = Some(Tally::start(&on_volume).unwrap());
    pods.publish_all();
    pods.visit(0, 5).await;
    let filler = volume.fill();
    pods.visit(1, 12).await;
    let (view, _) = pods.total(0).await;
    assert_eq!(view["total"], 17, "{view}");
    // Every member answered, but what it counted is not on tally-0's disk.
    assert_eq!(view["complete"], false, "{view}");
    assert!(
        view["persist_error"]
            .as_str()
            .is_some_and(|e| e.contains("peers.state")),
        "{view}"
    );
    let ready = pods.get(0, "/readyz").await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );
    pods.terminate(1);
    pods.publish_all();
    std::fs::remove_file(filler).unwrap();
    // The store and the peer view recover on their own: no change, no
    // visit needed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = pods.get(0, "/readyz").await;
        if ready.status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready again: {}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pods.pods[0].take().unwrap().kill9();
    pods.pods[0] = Some(Tally::start(&on_volume).unwrap());
    pods.publish_all();
    let (view, _) = pods.total(0).await;
    assert_eq!(view["total"], 17, "after kill -9 and a restart: {view}");
    assert_eq!(row(&view, "tally-1")[0]["count"], 12, "{view}");
}

/// How a fake peer misbehaves.
#[derive(Clone, Copy)]
enum Behaviour {
    Garbage,
    Huge,
    Negative,
    /// Answers `count`, then `count - 10` from the second request on.
    Regressing(u64),
    SlowDrip,
    /// A valid answer after 200 ms; counts requests.
    Slow(u64),
}

/// A fake sibling `pod` on `ip`; returns its address and request counter.
async fn fake_peer(
    ip: Ipv4Addr,
    pod: &'static str,
    behaviour: Behaviour,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    head.clear();
                    let nth = seen.fetch_add(1, Ordering::SeqCst);
                    let state = |count: i64| {
                        format!(
                            r#"{{"pod":"{pod}","incarnation":"f00d","entries":[{{"pod":"{pod}","incarnation":"f00d","count":{count}}}]}}"#
                        )
                    };
                    let body = match behaviour {
                        Behaviour::Garbage => "{\"pod\": [not json".to_string(),
                        Behaviour::Negative => state(-5),
                        Behaviour::Regressing(count) => state(if nth == 0 {
                            count as i64
                        } else {
                            count as i64 - 10
                        }),
                        Behaviour::Slow(count) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            state(count as i64)
                        }
                        Behaviour::Huge => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 104857600\r\n\r\n")
                                .await;
                            let chunk = vec![b' '; 64 * 1024];
                            for _ in 0..1600 {
                                if stream.write_all(&chunk).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                        Behaviour::SlowDrip => {
                            let body = state(1);
                            let _ = stream
                                .write_all(
                                    format!(
                                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await;
                            for byte in body.bytes() {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                if stream.write_all(&[byte]).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, requests)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_peers_are_refused_and_reported_and_change_nothing() {
    let pods = Pods::start(6, 1, &[]).await;
    pods.visit(0, 3).await;
    let base = pods.block;
    let ip = |n| Ipv4Addr::new(base[0], base[1], base[2], n);
    let fakes = [
        ("tally-1", Behaviour::Garbage, "not a peer state"),
        ("tally-2", Behaviour::Huge, "larger than"),
        ("tally-3", Behaviour::Negative, "not a peer state"),
        ("tally-4", Behaviour::Regressing(50), "below the 50 known"),
        ("tally-5", Behaviour::SlowDrip, "no answer within"),
    ];
    let mut records = vec![("tally-0", pods.pod(0).peer_addr)];
    for (i, (name, behaviour, _)) in fakes.iter().enumerate() {
        let (addr, _) = fake_peer(ip(100 + i as u8), name, *behaviour).await;
        records.push((name, addr));
    }
    pods.dns.publish(&records);
    // First round: only the regressing peer's first answer (50) is valid.
    let (view, took) = pods.total(0).await;
    assert!(took < NO_HANG, "{took:?}");
    assert_eq!(view["total"], 53, "{view}");
    // Second round: it now claims 40 for the same incarnation: not merged
    // (the total keeps 50), reported, and the view is not complete.
    let (view, took) = pods.total(0).await;
    assert!(took < NO_HANG, "{took:?}");
    assert_eq!(view["total"], 53, "{view}");
    assert_eq!(view["complete"], false);
    for (name, _, why) in fakes {
        let rows = row(&view, name);
        if name == "tally-4" {
            assert_eq!(rows[0]["count"], 50, "{view}");
        }
        assert_eq!(rows.len(), 1, "{name}: {view}");
        let error = rows[0]["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{name}: {error}");
    }
    let metrics = pods.get(0, "/metrics").await.body;
    for kind in ["refused", "too_large", "timeout"] {
        assert!(
            metrics.contains(&format!("tally_peer_errors_total{{kind=\"{kind}\"}}")),
            "{kind}: {metrics}"
        );
    }
}

/// A pod outside `Pods`, looking up `service` through `dns`.
fn lone_pod(
    dir: &std::path::Path,
    ip: Ipv4Addr,
    pod: &str,
    service: &str,
    dns: SocketAddr,
) -> TallyOptions {
    TallyOptions::new(dir)
        .listen(SocketAddr::new(ip.into(), 0))
        .env("POD_NAME", pod)
        .env("TALLY_PEERS_SERVICE", service)
        .env("TALLY_DNS_SERVER", dns)
}

#[tokio::test(flavor = "multi_thread")]
async fn nxdomain_names_the_query_and_a_silent_dns_keeps_the_members() {
    let mut pods = Pods::start(7, 3, &[]).await;
    pods.visit(1, 2).await;
    assert_eq!(pods.total(0).await.0["complete"], true);

    pods.dns.silence();
    let (view, took) = pods.total(0).await;
    assert!(took < NO_HANG, "{took:?}");
    assert_eq!(view["members"], 3, "{view}");
    assert_eq!(view["total"], 2);
    let error = view["discovery_error"].as_str().unwrap();
    assert!(
        error.contains("_peer._tcp.tally-headless.default.svc.cluster.local.")
            && error.contains("3 last known"),
        "{error}"
    );

    // A pod told to look up a Service that does not exist.
    let dns = ClusterDns::start(Ipv4Addr::new(
        pods.block[0],
        pods.block[1],
        pods.block[2],
        3,
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lost = lone_pod(dir.path(), pods.ip(9), "web-0", "web", dns.addr);
    let tally = Tally::start(&lost).unwrap();
    let view = pods
        .http
        .get(&tally.url("/visits/total"))
        .await
        .unwrap()
        .json();
    let error = view["discovery_error"].as_str().unwrap();
    assert!(
        error.contains("_peer._tcp.web.default.svc.cluster.local.") && error.contains("NXDOMAIN"),
        "{error}"
    );
    assert_eq!(
        (view["members"].as_u64(), view["complete"].as_bool()),
        (Some(0), Some(false))
    );

    let out = lost.clone().arg("peers").run();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("_peer._tcp.web.default.svc.cluster.local.") && stderr.contains("NXDOMAIN"),
        "{stderr}"
    );

    // A pod whose DNS never answers from its start on: it waits a bounded
    // time for a sibling to hear it, then serves (a fresh-clone run once had
    // a test pod's DNS time out for 20 s and the pod never served).
    let silent = std::net::UdpSocket::bind((pods.ip(11), 0)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unheard = lone_pod(
        dir.path(),
        pods.ip(12),
        "tally-5",
        "tally-headless",
        silent.local_addr().unwrap(),
    );
    let tally = Tally::start(&unheard).unwrap();
    let visit = pods.http.get(&tally.url("/")).await.unwrap();
    assert_eq!(visit.status, StatusCode::OK);
    let view = pods
        .http
        .get(&tally.url("/visits/total"))
        .await
        .unwrap()
        .json();
    assert_eq!(view["complete"], false, "{view}");
    assert!(view["discovery_error"].as_str().is_some(), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_totals_share_a_handful_of_fetches() {
    // The fake sibling answers after 200 ms. The time limits are generous:
    // with the default 300 ms per peer, a loaded machine (1,000 connections
    // on 2 cores) pushed a 200 ms answer past the limit and the total was 0;
    // this test is about coalescing, not about time limits.
    let pods = Pods::start(
        8,
        1,
        &[
            ("TALLY_REFRESH_INTERVAL_MS", "0"),
            ("TALLY_PEER_TIMEOUT_MS", "10000"),
            ("TALLY_FANOUT_DEADLINE_MS", "10000"),
        ],
    )
    .await;
    let b = pods.block;
    let (addr, fetches) = fake_peer(
        Ipv4Addr::new(b[0], b[1], b[2], 100),
        "tally-1",
        Behaviour::Slow(5),
    )
    .await;
    pods.dns
        .publish(&[("tally-0", pods.pod(0).peer_addr), ("tally-1", addr)]);
    let url = pods.pod(0).url("/visits/total");
    let started = Instant::now();
    let requests: Vec<_> = (0..1000)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { Http::new().get(&url).await.unwrap().json()["total"].as_u64() },
            )
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap(), Some(5));
    }
    let took = started.elapsed();
    let n = fetches.load(Ordering::SeqCst);
    // One round at a time, each at least 200 ms (the fake's delay), and a
    // request joins only a round that starts after it arrived: a handful
    // of rounds back to back, not one per request.
    let most = took.as_millis() / 200 + 1;
    assert!(
        n >= 1 && n as u128 <= most,
        "{n} fetches for 1000 requests in {took:?}"
    );
    let metrics = pods.get(0, "/metrics").await.body;
    assert!(
        !metrics.contains("tally_total_requests_coalesced_total 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_never_calls_itself() {
    // Alone in DNS, with background refresh on: any hit on its peer route
    // would be a call to itself.
    let pods = Pods::start(9, 1, &[("TALLY_REFRESH_INTERVAL_MS", "50")]).await;
    pods.visit(0, 2).await;
    for _ in 0..5 {
        let (view, _) = pods.total(0).await;
        assert_eq!(
            (view["members"].as_u64(), view["complete"].as_bool()),
            (Some(1), Some(true)),
            "{view}"
        );
    }
    // Let the background refresh run rounds of its own (ten more).
    let rounds = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("tally_fanout_duration_seconds_count "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = rounds(&pods.get(0, "/metrics").await.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let metrics = pods.get(0, "/metrics").await.body;
        if rounds(&metrics) >= before + 10 {
            break metrics;
        }
        assert!(Instant::now() < deadline, "no background rounds: {metrics}");
    };
    assert!(
        !metrics.contains("route=\"/peer/state\""),
        "tally-0 fetched itself:\n{metrics}"
    );
    assert!(metrics.contains("tally_peer_fetches_total 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tally_peers_shows_what_the_pod_resolves() {
    let pods = Pods::start(11, 2, &[]).await;
    pods.visit(1, 4).await;
    let out = pods.options(0).arg("peers").run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "SRV _peer._tcp.tally-headless.default.svc.cluster.local.",
        "2 member(s)",
        "tally-1.tally-headless.default.svc.cluster.local.",
        "(this pod)",
        &pods.pod(1).peer_addr.to_string(),
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
    let tally1 = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("tally-1 "))
        .unwrap();
    assert!(tally1.split_whitespace().nth(2) == Some("4"), "{tally1}");

    // A member that does not answer makes it fail, like a probe would.
    pods.pod(1).signal(Signal::SIGSTOP);
    let out = pods.options(0).arg("peers").run();
    pods.pod(1).signal(Signal::SIGCONT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("1 member(s) did not answer"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_peer_route_answers_only_changes_since_a_cursor() {
    let pods = Pods::start(8, 3, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    pods.visit(1, 2).await;
    pods.visit(2, 3).await;
    assert_eq!(pods.total(0).await.0["total"], 5);
    let counts = |reply: &Reply| -> Vec<(String, u64)> {
        let state = reply.json();
        state["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["pod"].as_str().unwrap().to_string(),
                    e["count"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    // Without `since`: the full state, as a human with curl always saw it.
    let plain = pods.peer_get(0, "/peer/state").await;
    assert_eq!(counts(&plain).len(), 3, "{}", plain.body);
    assert!(!plain.headers.contains_key("tally-cursor"));
    // curl's `Accept: */*` reads JSON; siblings name the compact form.
    let url = pods.pod(0).peer_url("/peer/state");
    for (accept, want) in [
        ("*/*", "application/json"),
        ("application/x-tally-state", "application/x-tally-state"),
    ] {
        let reply = pods
            .http
            .request(Method::GET, &url, &[("accept", accept)])
            .await
            .unwrap();
        assert_eq!(reply.headers["content-type"], want, "Accept: {accept}");
    }
    // `since` empty or unknown: the full state and a cursor.
    for since in ["", "0-0", "junk"] {
        let full = pods
            .peer_get(0, &format!("/peer/state?since={since}"))
            .await;
        assert_eq!(counts(&full).len(), 3, "since={since}: {}", full.body);
        assert!(full.headers.contains_key("tally-cursor"), "since={since}");
    }
    let cursor = |reply: &Reply| reply.headers["tally-cursor"].to_str().unwrap().to_string();
    let c0 = cursor(&pods.peer_get(0, "/peer/state?since=").await);
    // Nothing changed since: only the sender's own entry.
    let quiet = pods.peer_get(0, &format!("/peer/state?since={c0}")).await;
    assert_eq!(
        counts(&quiet),
        [("tally-0".to_string(), 0)],
        "{}",
        quiet.body
    );
    // tally-2 grows and tally-0 learns it: the delta holds exactly that.
    pods.visit(2, 1).await;
    assert_eq!(pods.total(0).await.0["total"], 6);
    let delta = pods.peer_get(0, &format!("/peer/state?since={c0}")).await;
    let mut got = counts(&delta);
    got.sort();
    assert_eq!(
        got,
        [("tally-0".to_string(), 0), ("tally-2".to_string(), 4)],
        "{}",
        delta.body
    );
    // Repeated totals ride on deltas and stay exact and complete.
    pods.visit(1, 1).await;
    for i in 0..3 {
        let (view, _) = pods.total(i).await;
        assert_eq!(
            (view["total"].as_u64(), view["complete"].as_bool()),
            (Some(7), Some(true)),
            "{view}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_peer_token_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let token = token.display().to_string();
    let pods = Pods::start(10, 2, &[("TALLY_PEER_TOKEN_FILE", &token)]).await;
    pods.visit(1, 3).await;
    let (view, _) = pods.total(0).await;
    assert_eq!(
        (view["total"].as_u64(), view["complete"].as_bool()),
        (Some(3), Some(true)),
        "{view}"
    );
    let anonymous = pods
        .http
        .get(&pods.pod(1).peer_url("/peer/state"))
        .await
        .unwrap();
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let metrics = pods.get(1, "/metrics").await.body;
    assert!(
        metrics.contains("tally_peer_auth_failures_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_hands_its_final_count_over_on_sigterm() {
    let mut pods = Pods::start(12, 2, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    // Nobody ever fetches tally-1 after these visits...
    pods.visit(1, 5).await;
    pods.terminate(1);
    // ...and it is gone from DNS: tally-0 knows its count only because
    // tally-1 handed it over on the way out.
    pods.publish_all();
    let (view, _) = pods.total(0).await;
    assert_eq!(view["total"], 5, "{view}");
    assert_eq!(view["members"], 1);
    assert_eq!(row(&view, "tally-1")[0]["source"], "cached");

    // A handed-over state gets the same rules as a fetched one: a lower own
    // count (a restored volume) is not refused, and the higher count stays.
    let incarnation = row(&view, "tally-1")[0]["incarnation"]
        .as_str()
        .unwrap()
        .to_string();
    let lower = format!(
        r#"{{"pod":"tally-1","incarnation":"{incarnation}","entries":[{{"pod":"tally-1","incarnation":"{incarnation}","count":2}}]}}"#
    );
    let reply = put(pods.pod(0).peer_addr, &lower).await;
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
    assert_eq!(pods.total(0).await.0["total"], 5);
}

async fn put(addr: SocketAddr, body: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "PUT /peer/state HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    reply
}

/// design.md §4: a `complete: true` total includes every visit any member
/// acknowledged before the request arrived, and never more than the visits
/// sent before it answered (Jepsen's counter bounds). Visitors and readers
/// run at once against random pods, so reads keep arriving while rounds
/// are in flight: a read that rode a round started before it arrived could
/// miss a visit acknowledged in between (it did, before the read barrier).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn complete_totals_hold_every_visit_acknowledged_before_the_read() {
    use rand::Rng;
    const PODS: usize = 3;
    const VISITS: u64 = 600;
    let pods = Arc::new(Pods::start(13, PODS, &[]).await);
    let urls: Arc<Vec<String>> = Arc::new((0..PODS).map(|i| pods.pod(i).url("")).collect());
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let visitors: Vec<_> = (0..4)
        .map(|_| {
            let (urls, sent, acked) = (urls.clone(), sent.clone(), acked.clone());
            tokio::spawn(async move {
                let http = Http::new();
                while sent.fetch_add(1, Ordering::SeqCst) < VISITS {
                    let pod = rand::rng().random_range(0..PODS);
                    let reply = http.get(&format!("{}/", urls[pod])).await.unwrap();
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (urls, sent, acked) = (urls.clone(), sent.clone(), acked.clone());
            tokio::spawn(async move {
                let http = Http::new();
                let (mut complete, mut violations) = (0, Vec::new());
                while acked.load(Ordering::SeqCst) < VISITS {
                    let pod = rand::rng().random_range(0..PODS);
                    let before = acked.load(Ordering::SeqCst);
                    let view = http
                        .get(&format!("{}/visits/total", urls[pod]))
                        .await
                        .unwrap()
                        .json();
                    let most = sent.load(Ordering::SeqCst).min(VISITS);
                    let total = view["total"].as_u64().unwrap();
                    assert!(total <= most, "tally-{pod} counted {total} of {most} sent");
                    if view["complete"] == true {
                        complete += 1;
                        if total < before {
                            violations.push(format!(
                                "tally-{pod}: complete total {total} < {before} acknowledged before the read"
                            ));
                        }
                    }
                }
                (complete, violations)
            })
        })
        .collect();
    for visitor in visitors {
        visitor.await.unwrap();
    }
    let (mut complete, mut violations) = (0, Vec::new());
    for reader in readers {
        let (c, v) = reader.await.unwrap();
        complete += c;
        violations.extend(v);
    }
    eprintln!(
        "{complete} complete reads, {} below the acknowledged visits",
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} of {complete} complete reads missed acknowledged visits:\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(complete > 0, "no read was complete");
    assert_eq!(pods.total(0).await.0["total"], VISITS);
}

/// design.md §5: CoreDNS caches answers for 30 s (kubeadm's `cache 30`),
/// so for up to 30 s the siblings' SRV answers lack a new pod. The new pod
/// announces itself, and its siblings count it at once: here it must be in
/// a complete total within 2 s of being ready. 2 s is far below the 30 s
/// the cached answer still has to live (it was fetched just before), so only
/// the announce can explain it; `tally peers` shows DNS still answering
/// without the new pod when the total already counts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_pod_is_counted_at_once_while_dns_still_serves_a_cached_answer() {
    let mut pods = Pods::start_caching(14, 2, Duration::from_secs(30)).await;
    pods.visit(0, 2).await;
    pods.visit(1, 3).await;
    // This round puts the two-member answer into the DNS cache.
    let (view, _) = pods.total(0).await;
    assert_eq!(
        (view["total"].as_u64(), view["members"].as_u64()),
        (Some(5), Some(2))
    );

    pods.dirs.push(tempfile::tempdir().unwrap());
    pods.pods.push(Some(pods.launch(2)));
    pods.publish_all();
    let ready = Instant::now();
    pods.visit(2, 4).await;
    let deadline = ready + Duration::from_secs(2);
    let counted = loop {
        let (view, _) = pods.total(0).await;
        if view["complete"] == true && view["total"] == 9 {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "tally-2 not counted by tally-0 within 2 s of being ready: {view}"
        );
    };
    assert_eq!(counted["members"], 3, "{counted}");
    assert_eq!(row(&counted, "tally-2")[0]["source"], "live");
    let out = pods.options(0).arg("peers").run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 member(s)") && !stdout.contains("tally-2."),
        "DNS no longer serves the cached answer, so this proves nothing: {stdout}"
    );
    assert_eq!(pods.total(1).await.0["total"], 9);
}

/// An announce can be older than DNS: the e2e suite replaced tally-2 while
/// a network policy dropped its new announce, and tally-0 kept asking the
/// old pod's announced address for the announce's minute, so totals stayed
/// incomplete though DNS listed the new address and it answered. A member
/// that fails at its announced address is asked where DNS lists it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_announce_does_not_hide_a_member_dns_lists_elsewhere() {
    let pods = Pods::start(18, 2, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    pods.visit(1, 4).await;
    let local = pods.get(1, "/visits/local").await.json();
    let incarnation = local["incarnation"].as_str().unwrap();
    // tally-1 "announces" itself at an address where nothing listens.
    let gone = SocketAddr::new(pods.ip(9).into(), pods.pod(1).peer_addr.port());
    let stale = format!(
        r#"{{"pod":"tally-1","incarnation":"{incarnation}","entries":[{{"pod":"tally-1","incarnation":"{incarnation}","count":4}}],"announce":"{gone}"}}"#
    );
    let reply = put(pods.pod(0).peer_addr, &stale).await;
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
    pods.visit(1, 1).await;
    let (view, _) = pods.total(0).await;
    assert_eq!(
        (view["total"].as_u64(), view["complete"].as_bool()),
        (Some(5), Some(true)),
        "{view}"
    );
    assert_eq!(row(&view, "tally-1")[0]["source"], "live", "{view}");
}

/// design.md §5: when the SRV targets are not pod hostnames (the
/// StatefulSet's `serviceName` is not the peers Service, so CoreDNS names
/// endpoints `a-b-c-d.<svc>`), members are known by the pod name they answer
/// with, a pod recognises itself by address (it never calls itself), and
/// `tally peers` names the mismatch.
#[tokio::test(flavor = "multi_thread")]
async fn srv_targets_that_are_addresses_are_members_by_the_name_they_answer_with() {
    let pods = Pods::start(15, 2, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    pods.dns.publish_by_address(&[
        ("tally-0", pods.pod(0).peer_addr),
        ("tally-1", pods.pod(1).peer_addr),
    ]);
    pods.visit(0, 2).await;
    pods.visit(1, 5).await;
    for i in 0..2 {
        let (view, _) = pods.total(i).await;
        assert_eq!(
            (
                view["total"].as_u64(),
                view["complete"].as_bool(),
                view["members"].as_u64()
            ),
            (Some(7), Some(true), Some(2)),
            "pod {i}: {view}"
        );
        let other = format!("tally-{}", 1 - i);
        assert_eq!(row(&view, &other)[0]["source"], "live", "{view}");
        assert_eq!(view["pods"].as_array().unwrap().len(), 2, "{view}");
    }
    let metrics = pods.get(0, "/metrics").await.body;
    assert!(
        metrics.contains("tally_peer_fetches_total 1\n"),
        "tally-0 fetched more than its one sibling (itself?): {metrics}"
    );
    let out = pods.options(0).arg("peers").run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dashed = pods.ip(1).to_string().replace('.', "-");
    assert!(
        stdout.contains("answers as tally-1")
            && stdout.contains(&format!("{dashed}.tally-headless."))
            && stdout.contains("serviceName"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn attacks_change_no_total_and_forget_retires_everywhere() {
    let pods = Pods::start(16, 2, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    pods.visit(0, 4).await;
    pods.visit(1, 7).await;
    assert_eq!(pods.total(0).await.0["total"], 11);
    let inc1 = row(&pods.total(0).await.0, "tally-1")[0]["incarnation"]
        .as_str()
        .unwrap()
        .to_string();
    let state = |pod: &str, entries: &str| {
        format!(
            r#"{{"pod":"{pod}","incarnation":"evil","entries":[{{"pod":"{pod}","incarnation":"evil","count":1}}{entries}]}}"#
        )
    };
    // Overflow: refused whole, naming the sender; nothing changes.
    let overflow = state(
        "tally-9",
        r#",{"pod":"tally-8","incarnation":"x","count":18446744073709551610}"#,
    );
    let reply = put(pods.pod(0).peer_addr, &overflow).await;
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("tally-9/evil"),
        "{reply}"
    );
    // A forged second-hand entry above what tally-1 reports itself.
    let forged = state(
        "tally-9",
        &format!(r#",{{"pod":"tally-1","incarnation":"{inc1}","count":1000000}}"#),
    );
    let reply = put(pods.pod(0).peer_addr, &forged).await;
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
    for i in 0..2 {
        let (view, _) = pods.total(i).await;
        assert_eq!(
            view["total"],
            11 + 1,
            "pod {i}: only the invented key's 1: {view}"
        );
        assert_eq!(row(&view, "tally-1")[0]["count"], 7, "{view}");
        let invented = row(&view, "tally-9")[0];
        assert_eq!(invented["unconfirmed"], true, "{view}");
    }
    // The honest pod's own state is still accepted.
    pods.visit(1, 1).await;
    let (view, _) = pods.total(0).await;
    assert_eq!(row(&view, "tally-1")[0]["source"], "live", "{view}");
    assert_eq!(view["total"], 13, "{view}");
    let metrics = pods.get(0, "/metrics").await.body;
    assert!(
        metrics.contains("tally_peer_refusals_total{reason=\"overflow\"} 1"),
        "{metrics}"
    );
    // tally forget, through tally-1: gone on every pod, and it does not come
    // back through a relay (tally-0 still relays nothing of it; a new PUT
    // relaying it is ignored).
    let out = pods
        .options(1)
        .peer_listen(pods.pod(1).peer_addr)
        .arg("forget")
        .arg("tally-9/evil")
        .run();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = put(pods.pod(1).peer_addr, &forged).await;
    for i in 0..2 {
        let (view, _) = pods.total(i).await;
        assert_eq!(view["total"], 12, "pod {i}: {view}");
        assert!(row(&view, "tally-9").is_empty(), "{view}");
        assert_eq!(view["retired"][0]["pod"], "tally-9", "{view}");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_restored_from_a_backup_forks_and_the_total_stays_exact() {
    let mut pods = Pods::start(17, 2, &[("TALLY_REFRESH_INTERVAL_MS", "0")]).await;
    pods.visit(0, 3).await;
    let stop = |pods: &mut Pods| {
        pods.terminate(0);
    };
    // The backup: a copy of tally-0's volume at 3 visits.
    stop(&mut pods);
    let backup = tempfile::tempdir().unwrap();
    copy_dir(pods.dirs[0].path(), backup.path());
    pods.pods[0] = Some(pods.launch(0));
    pods.publish_all();
    pods.visit(0, 4).await;
    assert_eq!(pods.total(1).await.0["total"], 7);
    // Restore the backup and restart: tally-1 knows 7 for an incarnation
    // whose disk now says 3.
    stop(&mut pods);
    copy_dir(backup.path(), pods.dirs[0].path());
    pods.pods[0] = Some(pods.launch(0));
    pods.publish_all();
    assert!(
        pods.pod(0)
            .logs()
            .iter()
            .any(|l| l.contains("started a new incarnation")),
        "{:?}",
        pods.pod(0).logs()
    );
    pods.visit(0, 2).await;
    for i in 0..2 {
        let (view, _) = pods.total(i).await;
        assert_eq!(view["total"], 3 + 4 + 2, "pod {i}: {view}");
        assert_eq!(
            row(&view, "tally-0").len(),
            2,
            "old and new incarnation: {view}"
        );
    }
}

/// The other side of DNS caching: a pod scaled away still appears in the
/// cached SRV answer for up to 30 s. It handed its final state over on its
/// way out, so its siblings know its last count exactly and answer
/// `complete` at once instead of waiting for the cache to expire.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_left_does_not_keep_totals_incomplete_while_dns_still_lists_it() {
    let mut pods = Pods::start_caching(16, 3, Duration::from_secs(30)).await;
    pods.visit(0, 1).await;
    pods.visit(1, 2).await;
    pods.visit(2, 4).await;
    // This round puts the three-member answer into the DNS cache.
    let (view, _) = pods.total(0).await;
    assert_eq!(
        (view["total"].as_u64(), view["members"].as_u64()),
        (Some(7), Some(3))
    );
    pods.terminate(2);
    pods.publish_all();
    for i in 0..2 {
        let (view, _) = pods.total(i).await;
        assert_eq!(
            view["members"], 3,
            "DNS still serves the cached answer: {view}"
        );
        assert_eq!(
            (view["total"].as_u64(), view["complete"].as_bool()),
            (Some(7), Some(true)),
            "pod {i}: {view}"
        );
    }
}
