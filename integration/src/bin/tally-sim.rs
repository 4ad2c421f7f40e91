//! `tally-sim`: run the chart as a local StatefulSet (see integration/README.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use tally_integration::sim::control::{self, Request, Response};
use tally_integration::sim::daemon::{self, DaemonConfig};
use tally_integration::sim::manifest::helm_template;
use tally_integration::sim::{Cluster, ClusterOptions, hook, image, nemesis, net, pod};

#[derive(Parser, Debug)]
#[command(
    name = "tally-sim",
    about = "Run the tally chart as a local StatefulSet of real processes in network namespaces"
)]
struct Cli {
    /// Cluster name (namespaces tsim-<name>-*, state in /var/lib/tally-sim/<name>).
    #[arg(long, env = "TALLY_SIM_NAME", default_value = "tally", global = true)]
    name: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Render the chart with `helm template` and start the cluster; waits until every pod is Ready.
    Up {
        /// Chart directory.
        #[arg(long, env = "TALLY_SIM_CHART", default_value = "chart")]
        chart: PathBuf,
        /// Helm release name.
        #[arg(long, default_value = "tally")]
        release: String,
        /// Use this rendered YAML instead of running helm.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// TTL of the cluster DNS answers, seconds (kubeadm's CoreDNS: 30).
        #[arg(long, default_value_t = 30)]
        dns_ttl: u32,
        /// Cache DNS answers (positive and negative) this many seconds, as
        /// CoreDNS's `cache 30` in kubeadm clusters; 0: no cache.
        #[arg(long, default_value_t = 0)]
        dns_cache: u32,
        /// Make each claim a tmpfs of this many MiB, so `nemesis volume-full`
        /// can fill it without filling the host's disk; 0: plain directories.
        #[arg(long, default_value_t = 0)]
        volume_limit_mb: u32,
        /// First CrashLoopBackOff delay, seconds (the kubelet's: 10).
        #[arg(long, default_value_t = 10.0)]
        restart_backoff: f64,
        /// Cluster domain.
        #[arg(long, default_value = "cluster.local")]
        domain: String,
        /// How long to wait for the pods, seconds.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
        /// Return once the daemon runs, without waiting for the pods.
        #[arg(long)]
        no_wait: bool,
        /// Stay in the foreground, print events, tear down on Ctrl-C.
        #[arg(long)]
        foreground: bool,
        /// Arguments for `helm template` (`--set k=v`, `-f values.yaml`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        helm_args: Vec<String>,
    },
    /// Re-render with new helm arguments and apply (like `helm upgrade`).
    Upgrade {
        /// Use this rendered YAML instead of running helm.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Wait until the rollout is complete (every pod Ready at the new revision).
        #[arg(long)]
        wait: bool,
        /// Arguments for `helm template`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        helm_args: Vec<String>,
    },
    /// Pods, StatefulSet, Services and claims (like `kubectl get po,sts,svc,pvc`).
    Get,
    /// The state as JSON.
    Status,
    /// The event log (like `kubectl get events`).
    Events,
    /// Run a command inside a pod's container (its namespaces, user and environment).
    Exec {
        /// Pod name.
        pod: String,
        /// The command, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Run a host command in the client namespace, with the resolv.conf of a
    /// pod in the release's namespace (a debug pod with this machine's tools).
    Client {
        /// The command, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// GET a path through the client Service (or straight to one pod) and print the body.
    Curl {
        /// Ask this pod directly instead of the Service.
        #[arg(long)]
        pod: Option<String>,
        /// Path, e.g. `/visits/total`.
        path: String,
    },
    /// Delete a pod; the StatefulSet recreates it with the same name and claim.
    DeletePod {
        /// Pod name.
        pod: String,
    },
    /// Set the number of replicas.
    Scale {
        /// Replicas.
        replicas: u32,
        /// Wait until the StatefulSet has settled.
        #[arg(long)]
        wait: bool,
    },
    /// Print a pod's container log.
    Logs {
        /// The previous container's log.
        #[arg(short, long)]
        previous: bool,
        /// Pod name.
        pod: String,
    },
    /// Inject a fault (the chaos nemeses): isolate POD | partition POD,POD POD,.. | loss POD [--percent N] |
    /// slow POD | dns-down POD.. | dns-servfail | volume-full POD | kill POD | pause POD. `heal` removes
    /// every fault.
    Nemesis {
        /// isolate, partition, loss, slow, dns-down, dns-servfail, volume-full, kill or pause.
        kind: String,
        /// Pods (for partition: one comma-separated group per argument).
        pods: Vec<String>,
        /// Share of packets `loss` drops.
        #[arg(long, default_value_t = 30)]
        percent: u8,
    },
    /// Remove every fault `nemesis` put in place.
    Heal,
    /// Run the chart's `helm.sh/hook: test` pods and report like `helm test`;
    /// exits 1 when one fails (its log is printed).
    Test {
        /// How long to wait for the test pods, seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the test pods' logs also when they pass.
        #[arg(long)]
        logs: bool,
    },
    /// Tear everything down (also after a crashed daemon).
    Down,
    /// (internal) The daemon that owns a cluster.
    #[command(hide = true)]
    Daemon {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, default_value_t = 30)]
        dns_ttl: u32,
        #[arg(long, default_value_t = 0)]
        dns_cache: u32,
        #[arg(long, default_value_t = 0)]
        volume_limit_mb: u32,
        #[arg(long, default_value_t = 10_000)]
        restart_backoff_ms: u64,
        #[arg(long, default_value = "cluster.local")]
        domain: String,
        #[arg(long)]
        detach: bool,
        #[arg(long)]
        parent_pid: Option<i32>,
    },
    /// (internal) Become a pod's container.
    #[command(hide = true)]
    PodInit { spec: PathBuf },
}

/// What `up` remembers for `upgrade`.
#[derive(Serialize, Deserialize)]
struct Saved {
    chart: PathBuf,
    release: String,
}

fn self_exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding the tally-sim executable")
}

fn tally_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TALLY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = self_exe()?;
    Ok(exe
        .parent()
        .map(|d| d.join("tally"))
        .unwrap_or_else(|| PathBuf::from("tally")))
}

/// The command after an optional `--`; `usage` when there is none.
fn after_dashes(command: Vec<String>, usage: &str) -> Result<Vec<String>> {
    let command: Vec<String> = match command.first().map(String::as_str) {
        Some("--") => command[1..].to_vec(),
        _ => command,
    };
    if command.is_empty() {
        bail!("a command is needed: {usage}");
    }
    Ok(command)
}

fn render(
    manifests: &Option<PathBuf>,
    chart: &Path,
    release: &str,
    args: &[String],
) -> Result<String> {
    match manifests {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        }
        None => {
            if !chart.join("Chart.yaml").exists() {
                bail!("{} has no Chart.yaml; pass --chart DIR", chart.display());
            }
            helm_template(chart, release, args)
        }
    }
}

fn text(resp: Response) -> String {
    match resp {
        Response::Ok(s) | Response::Text(s) | Response::Error(s) => s,
        other => format!("{other:?}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let name = cli.name.clone();
    let dir = control::state_dir(&name);
    let attach = || Cluster::attach(&name, self_exe().unwrap_or_default());
    match cli.command {
        Cmd::PodInit { spec } => {
            let spec: pod::LaunchSpec = serde_json::from_slice(&std::fs::read(&spec)?)?;
            match pod::pod_init(&spec) {
                Ok(never) => match never {},
                Err(e) => {
                    Err(e.context(format!("starting the container of pod {}", spec.hostname)))
                }
            }
        }
        Cmd::Daemon {
            manifests,
            dns_ttl,
            dns_cache,
            volume_limit_mb,
            restart_backoff_ms,
            domain,
            detach,
            parent_pid,
        } => {
            if detach {
                let _ = nix::unistd::setsid();
            }
            if let Some(ppid) = parent_pid {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
                if nix::unistd::getppid().as_raw() != ppid {
                    bail!("the process that started the daemon is gone");
                }
            }
            let yaml = std::fs::read_to_string(&manifests)?;
            daemon::run_daemon(
                DaemonConfig {
                    name,
                    image: image::load(&dir.join(image::IMAGE_DIR))?,
                    state_dir: dir,
                    self_exe: self_exe()?,
                    dns_ttl,
                    dns_cache,
                    volume_limit_mb,
                    restart_backoff: Duration::from_millis(restart_backoff_ms),
                    domain,
                },
                &yaml,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Up {
            chart,
            release,
            manifests,
            dns_ttl,
            dns_cache,
            volume_limit_mb,
            restart_backoff,
            domain,
            timeout,
            no_wait,
            foreground,
            helm_args,
        } => {
            let yaml = render(&manifests, &chart, &release, &helm_args)?;
            let mut opts = ClusterOptions::new(&name, self_exe()?, tally_bin()?, yaml);
            opts.dns_ttl = dns_ttl;
            opts.dns_cache = dns_cache;
            opts.volume_limit_mb = volume_limit_mb;
            opts.restart_backoff = Duration::from_secs_f64(restart_backoff);
            opts.domain = domain;
            opts.detach = true;
            let mut cluster = Cluster::start(&opts)?;
            let saved = Saved {
                chart: std::fs::canonicalize(&chart).unwrap_or(chart),
                release,
            };
            std::fs::write(dir.join("cluster.json"), serde_json::to_vec(&saved)?)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let interrupted = |d: Duration| {
                rt.block_on(async {
                    tokio::time::timeout(d, tokio::signal::ctrl_c())
                        .await
                        .is_ok()
                })
            };
            if !no_wait {
                let deadline = Instant::now() + Duration::from_secs(timeout);
                loop {
                    let s = cluster.status()?;
                    if s.pods.len() as u32 == s.replicas && s.ready_replicas == s.replicas {
                        break;
                    }
                    if Instant::now() > deadline {
                        eprintln!("{}", cluster.get()?);
                        eprintln!(
                            "the cluster stays up for inspection (`logs POD`, `events`); `down` removes it"
                        );
                        bail!("not every pod became Ready within {timeout}s");
                    }
                    if interrupted(Duration::from_millis(200)) {
                        eprintln!("interrupted: tearing down");
                        cluster.down()?;
                        return Ok(ExitCode::from(130));
                    }
                }
            }
            print!("{}", cluster.get()?);
            if foreground {
                eprintln!("running in the foreground; Ctrl-C tears the cluster down");
                let mut seen = 0;
                loop {
                    let events = cluster.events()?;
                    for e in &events[seen.min(events.len())..] {
                        println!("{:8.2}s {} {} {}", e.t, e.object, e.reason, e.message);
                    }
                    seen = events.len();
                    if interrupted(Duration::from_millis(500)) {
                        eprintln!("interrupted: tearing down");
                        for line in cluster.down()? {
                            eprintln!("  {line}");
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Upgrade {
            manifests,
            wait,
            helm_args,
        } => {
            let saved: Saved = serde_json::from_slice(
                &std::fs::read(dir.join("cluster.json")).with_context(|| {
                    format!(
                        "cluster {name} is not up (no {}/cluster.json)",
                        dir.display()
                    )
                })?,
            )?;
            let yaml = render(&manifests, &saved.chart, &saved.release, &helm_args)?;
            let cluster = attach()?;
            println!("{}", cluster.apply(&yaml)?);
            if wait {
                cluster.wait_ready(Duration::from_secs(600))?;
                print!("{}", cluster.get()?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get => {
            print!("{}", attach()?.get()?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => {
            println!("{}", serde_json::to_string_pretty(&attach()?.status()?)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Events => {
            for e in attach()?.events()? {
                println!("{:8.2}s {} {} {}", e.t, e.object, e.reason, e.message);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Client { command } => {
            let command = after_dashes(command, "client -- CMD [ARGS...]")?;
            let s = attach()?.status()?;
            let resolv = dir.join("client-resolv.conf");
            std::fs::write(
                &resolv,
                pod::resolv_conf(&s.namespace, &s.domain, net::DNS_IP),
            )?;
            match pod::run_as_client(&net::ns_path(&s.client_netns), &resolv, &command) {
                Ok(never) => match never {},
                Err(e) => Err(e.context("running in the client namespace")),
            }
        }
        Cmd::Exec { pod, command } => {
            let command = after_dashes(command, "exec POD -- CMD [ARGS...]")?;
            let info = match control::call(
                &dir,
                &Request::PodInfo { pod: pod.clone() },
                Duration::from_secs(10),
            )? {
                Response::PodInfo(i) => i,
                other => bail!("unexpected answer {other:?}"),
            };
            match pod::exec_in(
                info.pid,
                info.uid,
                info.gid,
                &info.groups,
                &info.env,
                &command,
            ) {
                Ok(never) => match never {},
                Err(e) => Err(e.context(format!("exec in pod {pod}"))),
            }
        }
        Cmd::Curl { pod, path } => {
            let s = attach()?.status()?;
            let addr = match pod {
                Some(p) => {
                    let ps = s
                        .pods
                        .iter()
                        .find(|x| x.name == p)
                        .ok_or_else(|| anyhow!("no pod {p}"))?;
                    let port = s
                        .services
                        .iter()
                        .find(|svc| svc.cluster_ip.is_none())
                        .and_then(|svc| svc.ports.first())
                        .and_then(|p| p.split('/').next()?.parse().ok())
                        .unwrap_or(8080);
                    std::net::SocketAddr::from((ps.ip, port))
                }
                None => s
                    .client_service
                    .ok_or_else(|| {
                        anyhow!("the chart has no ClusterIP Service selecting the pods")
                    })?
                    .parse()?,
            };
            let path = if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            };
            let r = net::http_get_in(&s.client_netns, addr, &path, Duration::from_secs(10))?;
            print!("{}", r.body);
            if !r.body.ends_with('\n') {
                println!();
            }
            Ok(if r.status < 400 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(22)
            })
        }
        Cmd::DeletePod { pod } => {
            println!("{}", text(attach()?.request(&Request::DeletePod { pod })?));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Scale { replicas, wait } => {
            let cluster = attach()?;
            println!("{}", text(cluster.request(&Request::Scale { replicas })?));
            if wait {
                cluster.wait_until("the scale to settle", Duration::from_secs(600), |s| {
                    s.pods.len() as u32 == s.replicas && s.ready_replicas == s.replicas
                })?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Logs { previous, pod } => {
            print!("{}", attach()?.logs(&pod, previous)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nemesis {
            kind,
            pods,
            percent,
        } => {
            let fault = nemesis::Fault::parse(&kind, &pods, percent)?;
            println!("{}", text(attach()?.request(&Request::Fault { fault })?));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Test { timeout, logs } => {
            let report = attach()?.helm_test(Duration::from_secs(timeout))?;
            print!("{}", hook::render_report(&report));
            let passed = report.passed();
            for run in &report.runs {
                if logs || run.phase != "Succeeded" {
                    let log = std::fs::read_to_string(&run.log)
                        .with_context(|| format!("reading {}", run.log.display()))?;
                    println!("\nPOD LOGS: {}\n{}", run.name, log.trim_end());
                }
            }
            if !passed {
                let failed: Vec<String> = report
                    .runs
                    .iter()
                    .filter(|r| r.phase != "Succeeded")
                    .map(|r| {
                        format!(
                            "\t* pod {} failed ({})",
                            r.name,
                            r.exit.as_deref().unwrap_or("?")
                        )
                    })
                    .collect();
                eprintln!(
                    "Error: {} error(s) occurred:\n{}",
                    failed.len(),
                    failed.join("\n")
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Heal => {
            println!("{}", text(attach()?.request(&Request::Heal)?));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down => {
            let mut cluster = attach()?;
            let report = cluster.down()?;
            if report.is_empty() {
                println!("cluster {name} is down: pods stopped, namespaces and state removed");
            }
            for line in report {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
