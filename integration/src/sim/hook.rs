//! `helm test`: the chart's test hook pods, run on demand.
//!
//! `helm test` creates the release's Pods annotated `helm.sh/hook: test`
//! (deleting the previous run's first, as `before-hook-creation` asks),
//! waits until they finish and reports each one's phase. [`Sim::run_tests`]
//! does the same with the rendered hook pods, which `up` never installs:
//! each becomes a pod like the StatefulSet's (its own network namespace on
//! the bridge, under the NetworkPolicies that select it, the kubelet's
//! `resolv.conf` and `hosts`, the image's file tree, its command, args, env
//! and security context from the manifest), run once (`restartPolicy:
//! Never`). [`render_report`] prints what `helm test` prints.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde::{Deserialize, Serialize};

use super::daemon::Sim;
use super::kubelet::send;
use super::net;

/// One run of one test pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestRun {
    /// The pod's name.
    pub name: String,
    /// `Running`, `Succeeded` or `Failed`.
    pub phase: String,
    /// When its container started (Unix seconds).
    pub started_s: u64,
    /// When it exited.
    pub completed_s: Option<u64>,
    /// How it exited (`exit status: 1`).
    pub exit: Option<String>,
    /// Its container's log.
    pub log: PathBuf,
}

/// What `helm test` reports: the release, then each test pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestReport {
    /// Release name.
    pub release: String,
    /// Its namespace.
    pub namespace: String,
    /// When it was installed or last upgraded (Unix seconds).
    pub deployed_s: u64,
    /// 1 at install, +1 per upgrade.
    pub revision: u32,
    /// The last run of each test pod.
    pub runs: Vec<TestRun>,
}

impl TestReport {
    /// Every test pod has finished.
    pub fn finished(&self) -> bool {
        self.runs.iter().all(|r| r.completed_s.is_some())
    }

    /// Every test pod succeeded (false when there is none).
    pub fn passed(&self) -> bool {
        !self.runs.is_empty() && self.runs.iter().all(|r| r.phase == "Succeeded")
    }
}

/// A test pod the simulator runs.
#[derive(Debug)]
pub(super) struct HookPod {
    pub(super) ip: Ipv4Addr,
    pub(super) netns: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) ports: Vec<(Option<String>, u16)>,
    pub(super) child: Option<Child>,
    pub(super) run: TestRun,
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Go's `time.ANSIC` layout (`Mon Jan _2 15:04:05 2006`), in UTC, which is
/// what helm prints its times with.
pub fn ansic(unix_s: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{} {} {day:>2} {:02}:{:02}:{:02} {year}",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The report `helm test` prints.
pub fn render_report(r: &TestReport) -> String {
    let mut out = format!(
        "NAME: {}\nLAST DEPLOYED: {}\nNAMESPACE: {}\nSTATUS: deployed\nREVISION: {}\n",
        r.release,
        ansic(r.deployed_s),
        r.namespace,
        r.revision
    );
    for run in &r.runs {
        out.push_str(&format!(
            "TEST SUITE:     {}\nLast Started:   {}\nLast Completed: {}\nPhase:          {}\n",
            run.name,
            ansic(run.started_s),
            run.completed_s.map(ansic).unwrap_or_default(),
            run.phase
        ));
    }
    out
}

impl Sim {
    /// Starts every test pod of the rendering, replacing an earlier run.
    pub(super) fn run_tests(&mut self) -> Result<String> {
        if self.manifests.test_pods.is_empty() {
            bail!("the rendered chart has no Pod annotated `helm.sh/hook: test`: nothing to run");
        }
        if let Some(h) = self.hooks.values().find(|h| h.child.is_some()) {
            bail!(
                "test pod {} is still running; wait for it to finish",
                h.run.name
            );
        }
        for (_, old) in std::mem::take(&mut self.hooks) {
            net::delete_ns(&old.netns)?;
        }
        let mut started = Vec::new();
        for pod in self.manifests.test_pods.clone() {
            let name = pod
                .metadata
                .name
                .clone()
                .ok_or_else(|| anyhow!("a test pod has no name"))?;
            let restart = pod
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.clone())
                .unwrap_or_else(|| "Always".into());
            if restart != "Never" {
                bail!(
                    "test pod {name}: restartPolicy {restart:?} is not modelled (a `helm test` pod \
                     runs once: use restartPolicy: Never)"
                );
            }
            let template = PodTemplateSpec {
                metadata: Some(pod.metadata.clone()),
                spec: pod.spec.clone(),
            };
            let (ip, netns, plan) = self.sandbox(&name, &template, "", BTreeMap::new())?;
            self.event(
                &format!("pod/{name}"),
                "Scheduled",
                format!("ip {ip}, helm test hook"),
            );
            self.hooks.insert(
                name.clone(),
                HookPod {
                    ip,
                    netns,
                    labels: plan.labels.clone(),
                    ports: plan.container_ports.clone(),
                    child: None,
                    run: TestRun {
                        name: name.clone(),
                        phase: "Pending".into(),
                        started_s: unix_now(),
                        completed_s: None,
                        exit: None,
                        log: PathBuf::new(),
                    },
                },
            );
            // The CNI plugin puts the pod's policy in place before its
            // container starts.
            self.enforce_policies();
            let (child, log) = self.launch(&name, &plan.launch, 0)?;
            let pid = child.id();
            let hook = self.hooks.get_mut(&name).expect("just inserted");
            hook.child = Some(child);
            hook.run.phase = "Running".into();
            hook.run.started_s = unix_now();
            hook.run.log = log;
            self.event(
                &format!("pod/{name}"),
                "Started",
                format!("container started (pid {pid})"),
            );
            started.push(name);
        }
        Ok(format!("started {}", started.join(", ")))
    }

    /// Notices test pods that finished.
    pub(super) fn watch_tests(&mut self) {
        let mut done = Vec::new();
        for (name, h) in &mut self.hooks {
            let Some(child) = h.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                h.child = None;
                h.run.completed_s = Some(unix_now());
                h.run.exit = Some(status.to_string());
                h.run.phase = if status.success() {
                    "Succeeded"
                } else {
                    "Failed"
                }
                .into();
                done.push((name.clone(), h.run.phase.clone(), status.to_string()));
            }
        }
        for (name, phase, status) in done {
            self.event(&format!("pod/{name}"), &phase, status);
        }
    }

    /// Stops running test pods (at teardown).
    pub(super) fn kill_tests(&mut self) {
        for h in self.hooks.values_mut() {
            if let Some(mut c) = h.child.take() {
                send(c.id(), nix::sys::signal::Signal::SIGKILL);
                let _ = c.wait();
            }
        }
    }

    /// The `helm test` report of the last run.
    pub(super) fn test_report(&self) -> TestReport {
        let sts = &self.manifests.stateful_set().metadata;
        TestReport {
            release: sts
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/instance").cloned())
                .unwrap_or_else(|| self.sts.name.clone()),
            namespace: self.sts.namespace.clone(),
            deployed_s: self.deployed_s,
            revision: self.revision,
            runs: self.hooks.values().map(|h| h.run.clone()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_helm_prints_them() {
        assert_eq!(ansic(0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(ansic(1_795_849_568), "Sat Nov 28 07:06:08 2026");
        assert_eq!(ansic(951_782_400), "Tue Feb 29 00:00:00 2000");
    }

    #[test]
    fn the_report_reads_like_helm_test() {
        let run = |phase: &str| TestRun {
            name: "tally-test".into(),
            phase: phase.into(),
            started_s: 1_795_849_568,
            completed_s: Some(1_795_849_570),
            exit: Some("exit status: 0".into()),
            log: PathBuf::from("/x"),
        };
        let mut r = TestReport {
            release: "tally".into(),
            namespace: "default".into(),
            deployed_s: 1_795_849_500,
            revision: 1,
            runs: vec![run("Succeeded")],
        };
        assert_eq!(
            render_report(&r),
            "NAME: tally\nLAST DEPLOYED: Sat Nov 28 07:05:00 2026\nNAMESPACE: default\n\
             STATUS: deployed\nREVISION: 1\nTEST SUITE:     tally-test\n\
             Last Started:   Sat Nov 28 07:06:08 2026\nLast Completed: Sat Nov 28 07:06:10 2026\n\
             Phase:          Succeeded\n"
        );
        assert!(r.finished() && r.passed());
        r.runs = vec![run("Failed")];
        assert!(r.finished() && !r.passed());
        r.runs[0].completed_s = None;
        assert!(!r.finished());
        r.runs.clear();
        assert!(!r.passed(), "no test pod is no pass");
    }
}
