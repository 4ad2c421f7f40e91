//! The standalone service against the real binary and real files: exact
//! counting under concurrency, restarts, crashes at random moments, damaged
//! state files, read-only and full volumes, the HTTP edge, configuration and
//! graceful shutdown.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use rand::Rng;
use tally_integration::harness::{Http, Tally, TallyOptions, Tmpfs};

const STATE: &str = "visits.state";

async fn local_count(http: &Http, tally: &Tally) -> u64 {
    let reply = http.get(&tally.url("/visits/local")).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.json()["count"].as_u64().unwrap()
}

/// `clients` tasks each sending GET / until `stop`; returns (sent, 2xx).
fn hammer(
    addr: std::net::SocketAddr,
    clients: usize,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let sent = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let tasks = (0..clients)
        .map(|_| {
            let (sent, ok) = (sent.clone(), ok.clone());
            tokio::spawn(async move {
                let http = Http::new();
                loop {
                    sent.fetch_add(1, Ordering::SeqCst);
                    match http.get(&format!("http://{addr}/")).await {
                        Ok(reply) if reply.status.is_success() => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        // Refused or reset: the server is gone, and every
                        // answer this client got is counted.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    (sent, ok, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_visits_from_64_clients_are_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(&TallyOptions::new(dir.path())).unwrap();
    let url = tally.url("/");
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let url = url.clone();
            let n = 10_000 / 64 + usize::from(i < 10_000 % 64);
            tokio::spawn(async move {
                let http = Http::new();
                for _ in 0..n {
                    let reply = http.get(&url).await.unwrap();
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let http = Http::new();
    assert_eq!(local_count(&http, &tally).await, 10_000);
    let metrics = http.get(&tally.url("/metrics")).await.unwrap().body;
    assert!(metrics.contains("tally_visits_total 10000"), "{metrics}");
    // Group commit: fewer commits than visits.
    let commits: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tally_store_commit_batch_size_count"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(commits < 10_000.0, "{commits} commits for 10000 visits");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_count_and_incarnation_and_a_new_directory_is_a_new_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let options = TallyOptions::new(dir.path());
    let tally = Tally::start(&options).unwrap();
    for _ in 0..7 {
        http.get(&tally.url("/")).await.unwrap();
    }
    let before = http.get(&tally.url("/visits/local")).await.unwrap().json();
    assert!(tally.terminate(Duration::from_secs(10)).unwrap().success());

    let tally = Tally::start(&options).unwrap();
    let after = http.get(&tally.url("/visits/local")).await.unwrap().json();
    assert_eq!(after, before, "same directory: same count and incarnation");
    assert_eq!(after["count"], 7);

    let other = tempfile::tempdir().unwrap();
    let fresh = Tally::start(&TallyOptions::new(other.path())).unwrap();
    let new = http.get(&fresh.url("/visits/local")).await.unwrap().json();
    assert_eq!(new["count"], 0);
    assert_ne!(new["incarnation"], before["incarnation"]);

    let shown = TallyOptions::new(dir.path()).arg("visits").run();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(text.contains("count           7"), "{text}");
    assert!(
        text.contains(before["incarnation"].as_str().unwrap()),
        "{text}"
    );
}

/// design.md §6: one process per data directory; the second one names the
/// holder and exits, the first keeps counting.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_the_same_volume_refuses_to_start_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let options = TallyOptions::new(dir.path());
    let first = Tally::start(&options).unwrap();
    http.get(&first.url("/")).await.unwrap();
    let second = TallyOptions::new(dir.path()).env("POD_NAME", "tally-1");
    // `start`, not `run`: a second process that wrongly starts is killed.
    let stderr = match Tally::start(&second) {
        Ok(_) => panic!("a second process started on the same data directory"),
        Err(e) => e.to_string(),
    };
    assert!(
        stderr.contains("in use by another tally process"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {} (pod tally-0)", first.pid())),
        "{stderr}"
    );
    assert_eq!(local_count(&http, &first).await, 1);
    assert_eq!(
        http.get(&first.url("/")).await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_loses_no_acknowledged_visit() {
    let dir = tempfile::tempdir().unwrap();
    let options = TallyOptions::new(dir.path());
    let http = Http::new();
    let (mut sent_total, mut ok_total) = (0, 0);
    let mut rng = rand::rng();
    for round in 0..20 {
        let tally = Tally::start(&options).unwrap();
        let (sent, ok, tasks) = hammer(tally.addr, 16);
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..250))).await;
        tally.kill9();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        sent_total += sent.load(Ordering::SeqCst);
        ok_total += ok.load(Ordering::SeqCst);
        let tally = Tally::start(&options).unwrap();
        let count = local_count(&http, &tally).await;
        assert!(
            ok_total <= count && count <= sent_total,
            "round {round}: count {count} outside [{ok_total} acknowledged, {sent_total} sent]"
        );
        tally.kill9();
    }
    assert!(ok_total > 100, "the load was real: {ok_total} acknowledged");
}

/// Ruins a state file's bytes in place.
type Damage = fn(&mut Vec<u8>);

#[tokio::test(flavor = "multi_thread")]
async fn damaged_state_file_stops_startup_and_is_left_untouched() {
    let http = Http::new();
    let damages: &[(&str, Damage)] = &[
        ("truncated", |b| b.truncate(b.len() - 4)),
        // One damaged slot is a torn write, survivable by design (the
        // other slot holds the previous commit); both damaged is not.
        ("flipped byte in both slots", |b| {
            b[40] ^= 0x01;
            b[4096 + 40] ^= 0x01;
        }),
        ("garbage", |b| *b = b"count=12\n".to_vec()),
        ("empty", |b| b.clear()),
    ];
    for (name, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let options = TallyOptions::new(dir.path());
        let tally = Tally::start(&options).unwrap();
        for _ in 0..3 {
            http.get(&tally.url("/")).await.unwrap();
        }
        tally.terminate(Duration::from_secs(10)).unwrap();
        let path = dir.path().join(STATE);
        let mut bytes = std::fs::read(&path).unwrap();
        damage(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();

        let out = options.run();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: started anyway");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{name}: {stderr}"
        );
        assert!(stderr.contains("corrupt"), "{name}: {stderr}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{name}: file was changed"
        );
    }
}

async fn until_ready(http: &Http, tally: &Tally) -> Duration {
    let started = Instant::now();
    loop {
        let reply = http.get(&tally.url("/readyz")).await.unwrap();
        if reply.status == StatusCode::OK {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never ready again: {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_volume_answers_503_then_recovers_without_loss() {
    let volume = Tmpfs::mount("1m");
    let http = Http::new();
    let tally = Tally::start(&TallyOptions::new(volume.path())).unwrap();
    for _ in 0..5 {
        assert_eq!(
            http.get(&tally.url("/")).await.unwrap().status,
            StatusCode::OK
        );
    }
    volume.remount("ro");
    let reply = http.get(&tally.url("/")).await.unwrap();
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    let ready = http.get(&tally.url("/readyz")).await.unwrap();
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.body.contains("Read-only"), "{}", ready.body);
    assert_eq!(local_count(&http, &tally).await, 5);

    volume.remount("rw");
    until_ready(&http, &tally).await;
    assert_eq!(
        http.get(&tally.url("/")).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(local_count(&http, &tally).await, 6);
    assert!(
        tally
            .logs()
            .iter()
            .any(|l| l.contains("store write failed"))
    );
}

/// A full volume (design.md §6): `GET /` answers 503 with `Retry-After` and
/// says why and what to do, readiness fails, the error is logged and the
/// gauge set, no acknowledged visit is lost; freeing space brings it back
/// on its own. The volume is a real tmpfs filled to its last byte.
#[tokio::test(flavor = "multi_thread")]
async fn full_volume_answers_503_until_space_is_freed_and_loses_nothing() {
    let volume = Tmpfs::mount("256k");
    let http = Http::new();
    let options = TallyOptions::new(&volume.path().join("data"));
    let tally = Tally::start(&options).unwrap();
    for _ in 0..3 {
        let reply = http.get(&tally.url("/")).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    // Fill the volume to the last byte.
    let filler = volume.fill();
    assert!(
        std::fs::write(volume.path().join("more"), b"x").is_err(),
        "not full"
    );
    // Readiness fails before any visit finds out (the store looks every
    // second while idle).
    let started = Instant::now();
    loop {
        let ready = http.get(&tally.url("/readyz")).await.unwrap();
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(ready.body.contains("is full"), "{}", ready.body);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still ready on a full volume: {}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for _ in 0..3 {
        let reply = http.get(&tally.url("/")).await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.body
        );
        assert_eq!(reply.headers["retry-after"], "1");
        assert!(
            reply.body.contains("is full") && reply.body.contains("free space"),
            "names the cause and the remedy: {}",
            reply.body
        );
    }
    let ready = http.get(&tally.url("/readyz")).await.unwrap();
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.body.contains("is full"), "{}", ready.body);
    let metrics = http.get(&tally.url("/metrics")).await.unwrap().body;
    assert!(metrics.contains("tally_store_volume_full 1"), "{metrics}");
    assert_eq!(local_count(&http, &tally).await, 3);
    assert!(
        tally
            .logs()
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("data volume full")),
        "{:#?}",
        tally.logs()
    );

    std::fs::remove_file(&filler).unwrap();
    until_ready(&http, &tally).await;
    let reply = http.get(&tally.url("/")).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(local_count(&http, &tally).await, 4);
    let metrics = http.get(&tally.url("/metrics")).await.unwrap().body;
    assert!(metrics.contains("tally_store_volume_full 0"), "{metrics}");
    tally.terminate(Duration::from_secs(10)).unwrap();
    let tally = Tally::start(&options).unwrap();
    assert_eq!(local_count(&http, &tally).await, 4, "survives a restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_get_root_counts_and_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(&TallyOptions::new(dir.path())).unwrap();
    let http = Http::new();
    for path in [
        "/healthz",
        "/health",
        "/readyz",
        "/favicon.ico",
        "/metrics",
        "/visits/local",
        "/visits",
        "/visits/total",
        "/visits/local?format=text",
    ] {
        let reply = http.get(&tally.url(path)).await.unwrap();
        assert!(reply.status.is_success(), "{path}: {}", reply.status);
    }
    // The peer port serves the peer route and the probes, and nothing else.
    for path in ["/peer/state", "/healthz", "/health", "/readyz"] {
        let reply = http.get(&tally.peer_url(path)).await.unwrap();
        assert!(
            reply.status.is_success(),
            "peer port {path}: {}",
            reply.status
        );
    }
    for path in ["/", "/visits/total", "/metrics"] {
        let reply = http.get(&tally.peer_url(path)).await.unwrap();
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "peer port {path}");
    }
    // And the client port no longer serves the peer route.
    let peer_on_client = http.get(&tally.url("/peer/state")).await.unwrap();
    assert_eq!(peer_on_client.status, StatusCode::NOT_FOUND);
    let head = http
        .request(Method::HEAD, &tally.url("/"), &[])
        .await
        .unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        local_count(&http, &tally).await,
        0,
        "nothing but GET / counts"
    );

    let missing = http.get(&tally.url("/nope")).await.unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(!missing.body.is_empty());
    let post = http
        .request(Method::POST, &tally.url("/visits/local"), &[])
        .await
        .unwrap();
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(post.headers["allow"].to_str().unwrap().contains("GET"));
    assert!(!post.body.is_empty());
    let bad_format = http
        .get(&tally.url("/visits/total?format=xml"))
        .await
        .unwrap();
    assert_eq!(bad_format.status, StatusCode::BAD_REQUEST);
    assert!(
        bad_format.body.contains("format=text"),
        "{}",
        bad_format.body
    );

    let page = http.get(&tally.url("/")).await.unwrap();
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.body.contains("tally-0") && page.body.contains("UTC"));
    let json = http
        .request(
            Method::GET,
            &tally.url("/"),
            &[("accept", "application/json")],
        )
        .await
        .unwrap()
        .json();
    assert_eq!(json["count"], 2);
    assert_eq!(
        http.get(&tally.url("/visits?format=text"))
            .await
            .unwrap()
            .body,
        "2\n"
    );
    let total = http.get(&tally.url("/visits/total")).await.unwrap().json();
    assert_eq!(total["total"], 2);
    assert_eq!(total["complete"], true);
    assert_eq!(total["pods"][0]["source"], "self");
    assert_eq!(total["members"], 1);
}

fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_edge_refuses_bodies_huge_headers_and_slow_clients() {
    let dir = tempfile::tempdir().unwrap();
    let tally =
        Tally::start(&TallyOptions::new(dir.path()).env("TALLY_HEADER_READ_TIMEOUT_MS", 300))
            .unwrap();
    let addr = tally.addr;
    let body = tokio::task::spawn_blocking(move || {
        raw(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
    });
    assert!(body.await.unwrap().starts_with("HTTP/1.1 413"));
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let big = tokio::task::spawn_blocking(move || raw(addr, huge.as_bytes()));
    assert!(big.await.unwrap().starts_with("HTTP/1.1 431"));
    // Slowloris: half a request head, then nothing. The server must hang up.
    let slow = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let reply = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n");
        (reply, started.elapsed())
    });
    let (reply, took) = slow.await.unwrap();
    assert!(took < Duration::from_secs(5), "held for {took:?}: {reply}");
    let http = Http::new();
    assert_eq!(
        local_count(&http, &tally).await,
        0,
        "refused requests are not visits"
    );
}

fn check_config(env: &[(&str, &str)], args: &[&str], file: Option<&str>) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = TallyOptions::new(dir.path()).arg("check-config");
    if let Some(text) = file {
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        options = options.env("TALLY_CONFIG", path.display());
    }
    for (k, v) in env {
        options = options.env(k, v);
    }
    for a in args {
        options = options.arg(a);
    }
    let out = options.run();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

#[test]
fn config_precedence_is_flag_env_file_default_and_bad_input_exits_64() {
    let file = r#"{"listen":"127.0.0.1:3","timezone":"Europe/Paris","peer_timeout_ms":50}"#;
    let env = [
        ("TALLY_LISTEN", "127.0.0.1:2"),
        ("TALLY_TIMEZONE", "Asia/Tokyo"),
    ];
    let (code, out, err) = check_config(&env, &["--listen", "127.0.0.1:1"], Some(file));
    assert_eq!(code, 0, "{err}");
    assert!(
        line(&out, "listen").contains("127.0.0.1:1")
            && line(&out, "listen").contains("flag --listen")
    );
    assert!(
        line(&out, "timezone").contains("Asia/Tokyo")
            && line(&out, "timezone").contains("TALLY_TIMEZONE")
    );
    assert!(
        line(&out, "peer_timeout_ms").contains("50")
            && line(&out, "peer_timeout_ms").contains("config file")
    );
    assert!(
        line(&out, "durability").contains("group-commit")
            && line(&out, "durability").contains("default")
    );

    let (code, _, err) = check_config(&[], &[], Some(r#"{"timezon":"UTC"}"#));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("`timezon`") && err.contains("config.json"),
        "{err}"
    );

    let (code, _, err) = check_config(&[("TALLY_FANOUT_DEADLINE_MS", "-5")], &[], None);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("`fanout_deadline_ms`") && err.contains("TALLY_FANOUT_DEADLINE_MS"),
        "{err}"
    );

    let (code, _, err) = check_config(&[], &["--durability", "sometimes"], None);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("`durability`") && err.contains("--durability"),
        "{err}"
    );

    let (code, _, err) = check_config(
        &[("POD_NAME", "web"), ("TALLY_PEERS_SERVICE", "web-headless")],
        &[],
        None,
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("\"web\"") && err.contains("-<ordinal>"),
        "{err}"
    );

    // serve refuses the same way, before binding anything.
    let dir = tempfile::tempdir().unwrap();
    let out = TallyOptions::new(dir.path())
        .env("TALLY_TIMEZONE", "Nowhere/Land")
        .run();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`timezone`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_load_finishes_in_flight_requests_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let options = TallyOptions::new(dir.path());
    let tally = Tally::start(&options).unwrap();
    let (sent, ok, tasks) = hammer(tally.addr, 32);
    // Under load: 200 visits acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok.load(Ordering::SeqCst) < 200 {
        assert!(Instant::now() < deadline, "no load: {ok:?} acknowledged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = tokio::task::spawn_blocking(move || tally.terminate(Duration::from_secs(15)))
        .await
        .unwrap()
        .unwrap();
    // Each client stops at its first refusal, having counted every answer.
    for t in tasks {
        t.await.unwrap();
    }
    assert!(status.success(), "exit status {status:?}");
    let acknowledged = ok.load(Ordering::SeqCst);
    assert!(acknowledged > 0 && sent.load(Ordering::SeqCst) >= acknowledged);
    let tally = Tally::start(&options).unwrap();
    assert_eq!(local_count(&Http::new(), &tally).await, acknowledged);
}

/// Resident memory of a process, from /proc (a memory bound, not a timing).
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_peer_puts_hold_no_memory_and_visits_go_on() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(&TallyOptions::new(dir.path())).unwrap();
    let http = Http::new();
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut stream = tokio::net::TcpStream::connect(tally.peer_addr)
            .await
            .unwrap();
        let head = format!(
            "PUT /peer/state HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"pod\":",
            1024 * 1024
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b' '; 64 * 1024]).await.unwrap();
        stalled.push(stream);
    }
    // Visits keep being served while the PUTs stall.
    for n in 1..=20 {
        let reply = http.get(&tally.url("/")).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            http.get(&tally.url("/visits/local?format=text"))
                .await
                .unwrap()
                .body,
            format!("{n}\n")
        );
    }
    let rss = rss_kib(tally.pid().as_raw());
    assert!(rss < 20 * 1024, "RSS {rss} KiB with 100 stalled peer PUTs");
    eprintln!("RSS with 100 stalled peer PUTs: {rss} KiB");
    // The body budget refused the stalled PUTs beyond it (waits for the
    // server to have read their heads).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http.get(&tally.url("/metrics")).await.unwrap().body;
        if metrics.contains("tally_peer_refusals_total{reason=\"busy\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "no busy refusal: {metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stalled);
}

/// A PUT of `body` on the peer port; the status line and body.
fn put_state(addr: std::net::SocketAddr, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "PUT /peer/state HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

#[tokio::test(flavor = "multi_thread")]
async fn a_state_at_the_entry_limit_with_the_longest_names_is_accepted() {
    // 4,830 entries: the limit tally derives from its 1 MiB body limit.
    const LIMIT: usize = 4830;
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(&TallyOptions::new(dir.path())).unwrap();
    let state = |n: usize| {
        let entries: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                serde_json::json!({
                    "pod": format!("p{i:0>62}"),
                    "incarnation": format!("{i:x>64}"),
                    "count": 1,
                    "seen_unix": u64::MAX,
                })
            })
            .collect();
        serde_json::json!({
            "pod": entries[0]["pod"],
            "incarnation": entries[0]["incarnation"],
            "entries": entries,
        })
        .to_string()
    };
    let full = state(LIMIT);
    assert!(
        full.len() > 900_000,
        "near the 1 MiB limit: {} bytes",
        full.len()
    );
    let reply = put_state(tally.peer_addr, &full);
    assert!(
        reply.starts_with("HTTP/1.1 204"),
        "{}",
        &reply[..reply.len().min(300)]
    );
    let http = Http::new();
    let total = http.get(&tally.url("/visits/total")).await.unwrap().json();
    assert_eq!(total["total"], LIMIT as u64);
    let metrics = http.get(&tally.url("/metrics")).await.unwrap().body;
    assert!(
        metrics.contains(&format!("tally_cluster_entries {LIMIT}")),
        "{metrics}"
    );
    // One more is refused, and says why.
    let reply = put_state(tally.peer_addr, &state(LIMIT + 1));
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("more than the 4830 allowed"),
        "{}",
        &reply[..reply.len().min(300)]
    );
}
