//! Tearing a cluster down by name, also after its daemon crashed, and
//! checking that nothing is left.
//!
//! Everything a cluster creates on the host is named `tsim-<name>-*` (network
//! namespaces; veths and the bridge live inside them) or lives under its state
//! directory. Pod mounts exist only in the pods' private mount namespaces and
//! vanish with their processes.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::net;

/// The network namespaces of cluster `name` that exist now; never those of
/// another cluster whose name starts with `name-` (cluster `a`'s prefix
/// `tsim-a-` also matches cluster `a-b`'s `tsim-a-b-cluster`).
pub fn namespaces(name: &str) -> Vec<String> {
    let prefix = net::prefix(name);
    let all: Vec<String> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let mut out: Vec<String> = all
        .iter()
        .filter(|n| n.starts_with(&prefix) && !of_longer_cluster(name, n, &all))
        .cloned()
        .collect();
    out.sort();
    out
}

/// Whether namespace `ns` (which starts with `name`'s prefix) belongs to a
/// cluster named `name-…`: one whose cluster namespace is in `all` or whose
/// state directory exists.
fn of_longer_cluster(name: &str, ns: &str, all: &[String]) -> bool {
    let rest = &ns[net::prefix(name).len()..];
    rest.match_indices('-').any(|(i, _)| {
        let other = format!("{name}-{}", &rest[..i]);
        all.contains(&net::cluster_ns(&other)) || super::control::state_dir(&other).exists()
    })
}

/// Inode numbers of the given network namespaces.
pub fn ns_inodes(names: &[String]) -> HashSet<u64> {
    names
        .iter()
        .filter_map(|n| fs::metadata(net::ns_path(n)).ok())
        .map(|m| m.ino())
        .collect()
}

/// Processes whose network namespace is one of `inodes` (except this one).
pub fn processes_in(inodes: &HashSet<u64>) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| inodes.contains(&m.ino()))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie has no namespaces left to hold; count only live processes.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Removes everything of cluster `name`: kills its daemon (when
/// `kill_daemon`), every process in its namespaces, deletes the namespaces
/// and the state directory. Idempotent.
pub fn force_down(name: &str, state_dir: &Path, kill_daemon: bool) -> Result<Vec<String>> {
    let mut report = Vec::new();
    if kill_daemon
        && let Ok(pid) = fs::read_to_string(state_dir.join("daemon.pid"))
        && let Ok(pid) = pid.trim().parse::<u32>()
    {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("tally-sim") && pid != std::process::id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            report.push(format!("killed daemon {pid}"));
        }
    }
    let nss = namespaces(name);
    let inodes = ns_inodes(&nss);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<u32> = processes_in(&inodes)
            .into_iter()
            .filter(|p| alive(*p))
            .collect();
        let pids: Vec<u32> = if kill_daemon {
            pids
        } else {
            // Called from the daemon itself: it lives in the cluster namespace.
            let me = std::process::id();
            pids.into_iter().filter(|p| *p != me).collect()
        };
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        report.push(format!(
            "killed {} process(es) in the cluster's namespaces",
            pids.len()
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    for ns in &nss {
        net::delete_ns(ns)?;
        report.push(format!("deleted network namespace {ns}"));
    }
    // Bounded claims are tmpfs mounts: unmounted first, or removing the
    // state directory would stop at them.
    report.extend(super::volume::unbound_all(&state_dir.join("pvc")));
    if state_dir.exists() {
        fs::remove_dir_all(state_dir)
            .or_else(|e| if state_dir.exists() { Err(e) } else { Ok(()) })?;
        report.push(format!("removed {}", state_dir.display()));
    }
    Ok(report)
}

/// What a cluster left behind: namespaces, live processes among `pids` or in
/// the namespaces `inodes` (captured while it ran), mounts mentioning its
/// state directory or namespaces, the state directory.
pub fn leftovers(name: &str, state_dir: &Path, pids: &[u32], inodes: &HashSet<u64>) -> Vec<String> {
    let mut out = Vec::new();
    for ns in namespaces(name) {
        out.push(format!("network namespace {ns}"));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        out.push(format!("process {pid}"));
    }
    for pid in processes_in(inodes).into_iter().filter(|p| alive(*p)) {
        out.push(format!(
            "process {pid} in one of the cluster's network namespaces"
        ));
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let sd = state_dir.display().to_string();
    let prefix = format!("/run/netns/{}", net::prefix(name));
    for line in mountinfo.lines() {
        if line.contains(&sd) || line.contains(&prefix) {
            out.push(format!("mount: {line}"));
        }
    }
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output();
    if let Ok(o) = links {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if line.contains(&net::prefix(name)) {
                out.push(format!("host link: {line}"));
            }
        }
    }
    if state_dir.exists() {
        out.push(format!("state directory {sd}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cleaning up cluster `t9x` once deleted the namespaces (and killed
    /// the daemon) of a running cluster `t9x-long`.
    #[test]
    fn a_cluster_never_claims_the_namespaces_of_a_longer_named_one() {
        let all: Vec<String> = [
            "tsim-t9x-cluster",
            "tsim-t9x-tally-0",
            "tsim-t9x-long-cluster",
            "tsim-t9x-long-client",
            "tsim-t9x-long-tally-0",
        ]
        .map(String::from)
        .to_vec();
        let mine: Vec<&String> = all
            .iter()
            .filter(|n| !of_longer_cluster("t9x", n, &all))
            .collect();
        assert_eq!(mine, ["tsim-t9x-cluster", "tsim-t9x-tally-0"]);
        assert!(!of_longer_cluster(
            "t9x-long",
            "tsim-t9x-long-tally-0",
            &all
        ));
    }
}
