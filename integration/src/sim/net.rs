//! Network namespaces, the bridge and veth pairs, and an HTTP client that
//! runs inside a namespace.
//!
//! Layout of one simulated cluster named `N` (nothing is added to the host's
//! network namespace):
//!
//! - `tsim-N-cluster`: bridge `br0` with the gateway `10.244.0.1/16`, the
//!   Service addresses (`10.96.0.0/16`, on `lo`); the simulator daemon, its
//!   DNS server (`10.96.0.10`) and its Service proxy live here;
//! - `tsim-N-<pod>`: one per pod, `eth0` (a veth joined to `br0`) with an
//!   address from `10.244.1.0`–`10.244.255.255`, default route via the gateway;
//! - `tsim-N-client`: `eth0` `10.244.0.2`, where `curl` and the tests stand.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

/// The gateway on the cluster bridge.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The client namespace's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The cluster DNS Service's address (kubeadm's is the 10th of the range too).
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Prefix length of the pod network.
pub const POD_PREFIX: u8 = 16;

/// The prefix of everything one cluster creates on the host.
pub fn prefix(cluster: &str) -> String {
    format!("tsim-{cluster}-")
}

/// The cluster namespace's name.
pub fn cluster_ns(cluster: &str) -> String {
    format!("{}cluster", prefix(cluster))
}

/// The client namespace's name.
pub fn client_ns(cluster: &str) -> String {
    format!("{}client", prefix(cluster))
}

/// A pod's namespace name.
pub fn pod_ns(cluster: &str, pod: &str) -> String {
    format!("{}{pod}", prefix(cluster))
}

/// `/run/netns/<name>`.
pub fn ns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `ip <args>` and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| anyhow!("could not run `ip` ({e}); install iproute2"))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates the cluster and client namespaces with the bridge.
pub fn create_cluster_network(cluster: &str) -> Result<()> {
    let cns = cluster_ns(cluster);
    ip(&["netns", "add", &cns])?;
    ip(&["-n", &cns, "link", "set", "lo", "up"])?;
    ip(&["-n", &cns, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &cns,
        "addr",
        "add",
        &format!("{GATEWAY}/{POD_PREFIX}"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", &cns, "link", "set", "br0", "up"])?;
    ip(&[
        "-n",
        &cns,
        "addr",
        "add",
        &format!("{DNS_IP}/32"),
        "dev",
        "lo",
    ])?;
    attach(cluster, &client_ns(cluster), "vclient", CLIENT_IP)?;
    Ok(())
}

/// Creates namespace `ns` and joins it to the bridge with `addr`; `veth` is
/// the host-side name inside the cluster namespace (at most 15 bytes).
pub fn attach(cluster: &str, ns: &str, veth: &str, addr: Ipv4Addr) -> Result<()> {
    let cns = cluster_ns(cluster);
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &cns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", &cns, "link", "set", veth, "master", "br0", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/{POD_PREFIX}"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &GATEWAY.to_string(),
    ])?;
    Ok(())
}

/// Adds a Service address to the cluster namespace.
pub fn add_service_ip(cluster: &str, addr: Ipv4Addr) -> Result<()> {
    ip(&[
        "-n",
        &cluster_ns(cluster),
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "lo",
    ])
}

/// Deletes a namespace (its veth goes with it); missing is fine.
pub fn delete_ns(ns: &str) -> Result<()> {
    if !ns_path(ns).exists() {
        return Ok(());
    }
    ip(&["netns", "del", ns])
}

/// Moves the calling thread into a network namespace: everything it opens
/// afterwards (sockets) lives there. Use on a dedicated thread.
pub fn enter(ns: &str) -> Result<()> {
    let f = std::fs::File::open(ns_path(ns))
        .with_context(|| format!("network namespace {ns} does not exist"))?;
    setns(&f, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("joining network namespace {ns}"))?;
    Ok(())
}

/// An HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: String,
}

/// One blocking HTTP/1.1 GET with `Connection: close` (a new connection per
/// request, so a Service spreads requests over its endpoints).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nUser-Agent: tally-sim\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer of {addr}{path}"))?;
    parse_response(&raw).with_context(|| format!("answer of GET {addr}{path}"))
}

/// Parses a whole HTTP/1.1 answer (status line, headers, plain or chunked body).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header in {} bytes", raw.len()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {:?}", head.lines().next()))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// [`http_get`] from inside network namespace `ns` (on a short-lived thread,
/// so the caller's thread stays where it is).
pub fn http_get_in(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let ns = ns.to_string();
    let path = path.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        http_get(addr, &path, timeout)
    })
    .join()
    .map_err(|_| anyhow!("the HTTP client thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hi"));
        let r = parse_response(
            b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
    }
}
