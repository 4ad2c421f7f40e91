//! The built-in `nslookup` against the real cluster DNS server (the
//! simulator's, on a loopback address; no root needed): started by the name
//! `nslookup` as the image's link does, a pod's address, an SRV answer too
//! big for UDP (truncated, then TCP), NXDOMAIN with exit code 1. The e2e
//! suite holds its output against Debian's `nslookup` inside the simulator.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};

use tally_integration::harness::{ClusterDns, loopback_block, tally_bin};

/// `nslookup ARGS -port=PORT ... SERVER`, run through a link named
/// `nslookup` to the tally binary (the image's `/usr/local/bin/nslookup`).
fn nslookup(link: &PathBuf, dns: &ClusterDns, args: &[&str]) -> Output {
    Command::new(link)
        .args(args)
        .arg(dns.addr.ip().to_string())
        .arg(format!("-port={}", dns.addr.port()))
        .output()
        .expect("running nslookup")
}

fn link_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("nslookup");
    std::os::unix::fs::symlink(tally_bin(), &link).unwrap();
    (dir, link)
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_a_srv_over_tcp_and_nxdomain_from_the_cluster_dns() {
    let block = loopback_block(1);
    let dns = ClusterDns::start(Ipv4Addr::new(block[0], block[1], block[2], 2))
        .await
        .unwrap();
    // 60 members: the SRV answer with its Additional records is too big
    // for a 512-byte UDP answer, so it comes back truncated.
    let names: Vec<String> = (0..60).map(|i| format!("tally-{i}")).collect();
    let pods: Vec<(&str, SocketAddr)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], 10 + i as u8);
            (n.as_str(), SocketAddr::from((ip, 8080)))
        })
        .collect();
    dns.publish(&pods);
    let (_dir, link) = link_dir();
    let server = dns.addr.ip();
    let port = dns.addr.port();

    let out = nslookup(
        &link,
        &dns,
        &["tally-1.tally-headless.default.svc.cluster.local"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "Server:\t\t{server}\nAddress:\t{server}#{port}\n\n\
             Name:\ttally-1.tally-headless.default.svc.cluster.local\nAddress: {}\n\n",
            pods[1].1.ip()
        )
    );

    let out = nslookup(
        &link,
        &dns,
        &[
            "-type=SRV",
            "_peer._tcp.tally-headless.default.svc.cluster.local.",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for name in &names {
        assert!(
            text.contains(&format!(
                " 8080 {name}.tally-headless.default.svc.cluster.local.\n"
            )),
            "{name} missing from the SRV answer:\n{text}"
        );
    }
    assert_eq!(text.matches("\tservice = ").count(), 60, "{text}");

    let out = nslookup(
        &link,
        &dns,
        &["tally-1.tally-nowhere.default.svc.cluster.local"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with(
            "** server can't find tally-1.tally-nowhere.default.svc.cluster.local: NXDOMAIN\n\n"
        ),
        "{out:?}"
    );
}

#[test]
fn tally_nslookup_is_the_same_tool_and_bad_usage_exits_64() {
    let out = Command::new(tally_bin())
        .args(["nslookup", "-type=MX", "tally"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("query type \"MX\" is not supported: use A, AAAA, SRV or PTR"),
        "{err}"
    );
    let (_dir, link) = link_dir();
    let out = Command::new(&link).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no name to look up"),
        "{out:?}"
    );
}
