//! `tally-chaos`: the chaos runner (design.md §10). Runs the rendered chart on
//! the simulator under seeded random faults and writes `DIR/history.jsonl`;
//! `tally-check` judges it. Usually started by `scripts/chaos`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tally_integration::chaos::{nemesis, runner};
use tally_integration::harness::{tally_bin, workspace_root};
use tally_integration::sim::require_root;

#[derive(Parser, Debug)]
#[command(
    name = "tally-chaos",
    about = "Run tally on the simulator under random faults and record a history"
)]
struct Cli {
    /// Fault rounds (each: load, fault, hold, heal, quiet period).
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Seed of every random choice; the same seed replays the same schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Nemeses to mix (comma-separated).
    #[arg(long, default_value_t = nemesis::ALL.join(","))]
    nemesis: String,
    /// Output directory (history.jsonl goes there).
    #[arg(long, default_value = "chaos-out")]
    out: PathBuf,
    /// Simulator cluster name (namespaces tsim-<name>-*).
    #[arg(long, env = "TALLY_SIM_NAME")]
    name: Option<String>,
    /// Pods.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Client threads visiting (GET /), half through the client Service.
    #[arg(long, default_value_t = 4)]
    visitors: u32,
    /// Client threads reading /visits/total from random pods.
    #[arg(long, default_value_t = 2)]
    readers: u32,
    /// The cluster DNS server caches answers like CoreDNS `cache N` (kubeadm's
    /// Corefile: 30); 0 turns the cache off.
    #[arg(long, default_value_t = 30)]
    dns_cache: u32,
    /// Seconds the runner waits for the pods to agree after each heal.
    #[arg(long, default_value_t = 50)]
    quiet_limit: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nemeses = match nemesis::parse_list(&cli.nemesis) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tally-chaos: {e}");
            return ExitCode::from(64);
        }
    };
    if cli.replicas < 2 {
        eprintln!(
            "tally-chaos: --replicas {} must be at least 2 (faults need siblings)",
            cli.replicas
        );
        return ExitCode::from(64);
    }
    if let Err(e) = require_root() {
        eprintln!("tally-chaos: {e:#}");
        return ExitCode::from(77);
    }
    let opts = runner::Options {
        rounds: cli.rounds,
        seed: cli.seed,
        nemeses,
        out: cli.out.clone(),
        name: cli
            .name
            .unwrap_or_else(|| format!("chaos-{}", std::process::id())),
        sim_exe: std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("tally-sim")))
            .unwrap_or_else(|| PathBuf::from("tally-sim")),
        tally_bin: tally_bin(),
        chart: workspace_root().join("chart"),
        replicas: cli.replicas,
        visitors: cli.visitors,
        readers: cli.readers,
        dns_cache: cli.dns_cache,
        quiet_limit: Duration::from_secs(cli.quiet_limit),
    };
    match runner::run(&opts) {
        Ok(ran) => {
            println!(
                "rounds: {} in {:.0} s ({:.1} s per round), seed {}, history {}",
                ran.rounds,
                ran.elapsed.as_secs_f64(),
                ran.elapsed.as_secs_f64() / f64::from(ran.rounds.max(1)),
                cli.seed,
                cli.out.join("history.jsonl").display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tally-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}
