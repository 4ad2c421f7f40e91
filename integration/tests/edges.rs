//! A pod's own edges against the real binary and real file systems
//! (design.md §2, §6): a data directory that lost its counter, a dangling
//! link, readiness on an unwritable volume, probes through a flood of idle
//! connections, slow bodies against honest hand-overs, and `Accept`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tally_integration::harness::{Http, Tally, TallyOptions, Tmpfs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STATE: &str = "visits.state";

async fn visit(http: &Http, tally: &Tally, n: usize) {
    for _ in 0..n {
        let reply = http.get(&tally.url("/")).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
}

/// Polls `probe` until it returns `Some`, within `limit`.
async fn wait_for<T>(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pod whose `visits.state` is gone, beside its `peers.state` and the
/// lock line naming the incarnation it served, refuses to start (it used to
/// log "initialised a new data directory" and count from 0), names the
/// file and the remedy, and writes nothing; `tally new-incarnation` is the
/// explicit way on.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_counter_is_refused_never_started_again_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let options = TallyOptions::new(dir.path());
    let tally = Tally::start(&options).unwrap();
    visit(&http, &tally, 3).await;
    let first = http.get(&tally.url("/visits/local")).await.unwrap().json();
    tally.terminate(Duration::from_secs(10)).unwrap();
    std::fs::remove_file(dir.path().join(STATE)).unwrap();

    // A release that starts on it anyway fails here, not by hanging.
    let refused = match Tally::start(&options) {
        Ok(_) => panic!("started on a directory that lost its counter"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        refused.contains("visits.state is missing") && refused.contains("tally new-incarnation"),
        "{refused}"
    );
    assert!(!dir.path().join(STATE).exists(), "nothing was written");

    let forked = options.clone().arg("new-incarnation").run();
    assert!(
        forked.status.success(),
        "{}",
        String::from_utf8_lossy(&forked.stderr)
    );
    let tally = Tally::start(&options).unwrap();
    let local = http.get(&tally.url("/visits/local")).await.unwrap().json();
    assert_eq!(local["count"], 0);
    assert_ne!(
        local["incarnation"], first["incarnation"],
        "a new incarnation"
    );
    // Refused once the counter is there.
    let again = options.clone().arg("new-incarnation").run();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a counter"));
}

/// A `visits.state` that links to nothing is refused and left as it is
/// (it used to be replaced by a regular file at count 0).
#[tokio::test(flavor = "multi_thread")]
async fn a_dangling_counter_link_is_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join(STATE);
    std::os::unix::fs::symlink("/nonexistent/volume/visits.state", &link).unwrap();
    let refused = match Tally::start(&TallyOptions::new(dir.path())) {
        Ok(_) => panic!("started on a dangling visits.state"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        refused.contains("symbolic link") && refused.contains("/nonexistent/volume"),
        "{refused}"
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// Readiness fails when the volume is remounted read-only, before any
/// visit finds out (it said ready until the first visit failed), and
/// comes back when it is writable again, with nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_on_an_unwritable_volume_before_any_visit() {
    let volume = Tmpfs::mount("1m");
    let http = Http::new();
    let tally = Tally::start(&TallyOptions::new(volume.path())).unwrap();
    visit(&http, &tally, 4).await;
    volume.remount("ro");
    let reason = wait_for(Duration::from_secs(5), "readiness fails", async || {
        let reply = http.get(&tally.url("/readyz")).await.unwrap();
        (reply.status == StatusCode::SERVICE_UNAVAILABLE).then_some(reply.body)
    })
    .await;
    assert!(
        reason.contains("Read-only") && reason.contains(STATE),
        "{reason}"
    );
    volume.remount("rw");
    wait_for(Duration::from_secs(10), "ready again", async || {
        let reply = http.get(&tally.url("/readyz")).await.unwrap();
        (reply.status == StatusCode::OK).then_some(())
    })
    .await;
    visit(&http, &tally, 1).await;
    let local = http.get(&tally.url("/visits/local")).await.unwrap().json();
    assert_eq!(local["count"], 5);
}

/// Keeps `n` idle connections open to `addr` until `stop`, opening a new
/// one whenever one is cut: the flood of the issue.
fn flood(addr: SocketAddr, n: usize, stop: tokio::sync::watch::Receiver<bool>) {
    for _ in 0..n {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            while !*stop.borrow() {
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut buf = [0u8; 64];
                tokio::select! {
                    _ = stream.read(&mut buf) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }
}

/// A kubelet probe: a new connection, `GET`, `Connection: close`, within
/// one second.
async fn probe(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.34\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&reply)
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| "no status".to_string())
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .map_err(|_| "timed out after 1 s".to_string())?
}

/// 2,000 idle connections to the peer port and 2,000 to the client port,
/// re-opened as they are cut, leave the probe port answering: 9 of 9
/// one-second probes (on the peer port, 2 to 6 of 9 failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_are_answered_through_a_flood_of_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(
        &TallyOptions::new(dir.path())
            .env("TALLY_PROBE_LISTEN", "127.0.0.1:0")
            .env("TALLY_MAX_CONNECTIONS", 1024),
    )
    .unwrap();
    let probe_addr = tally.probe_addr.expect("the probe port listens");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    flood(tally.peer_addr, 2000, stopped.clone());
    flood(tally.addr, 2000, stopped);
    // The flood is there: the peer port's slots are taken.
    wait_for(
        Duration::from_secs(10),
        "the peer port is flooded",
        async || {
            probe(tally.peer_addr, "/healthz")
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let mut answered = Vec::new();
    for i in 0..9 {
        let path = if i % 3 == 2 { "/readyz" } else { "/healthz" };
        answered.push(probe(probe_addr, path).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(true);
    assert!(
        answered.iter().all(|a| *a == Ok(200)),
        "probes answered: {answered:?}"
    );
}

/// A slow chunked `PUT` that sent a few bytes and stalls.
async fn slow_sender(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"PUT /peer/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\n\
              Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
        )
        .await
        .unwrap();
    stream
}

/// Four slow chunked senders holding the token no longer keep an honest
/// hand-over out (each reserved the largest body, and the four the whole
/// budget, until their time limit).
#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_do_not_keep_honest_hand_overs_out() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "sekrit").unwrap();
    let tally = Tally::start(
        &TallyOptions::new(&dir.path().join("data"))
            .env("TALLY_PEER_TOKEN_FILE", token.display())
            .env("TALLY_REQUEST_TIMEOUT_MS", 30_000),
    )
    .unwrap();
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(slow_sender(tally.peer_addr).await);
    }
    // Give the four time to be read up to their stall.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let incarnation = "0123456789abcdef0123456789abcdef";
    let body = format!(
        r#"{{"pod":"tally-1","incarnation":"{incarnation}","entries":[{{"pod":"tally-1","incarnation":"{incarnation}","count":7}}]}}"#
    );
    let mut stream = TcpStream::connect(tally.peer_addr).await.unwrap();
    let request = format!(
        "PUT /peer/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
    drop(slow);
}

/// `GET /` answers JSON only when `application/json` is asked for on
/// purpose: not `application/jsonp`, not `;q=0`, and in any case.
#[tokio::test(flavor = "multi_thread")]
async fn accept_is_read_as_media_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(&TallyOptions::new(dir.path())).unwrap();
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let cases = [
        ("application/json", "application/json"),
        ("APPLICATION/JSON", "application/json"),
        ("application/json;q=0", "text/html"),
        ("application/jsonp", "text/html"),
        ("*/*", "text/html"),
        (browser, "text/html"),
    ];
    for (accept, want) in cases {
        let mut stream = TcpStream::connect(tally.addr).await.unwrap();
        let request =
            format!("GET / HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        let head = reply.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-type: {want}")),
            "Accept: {accept}: {head}"
        );
    }
}
