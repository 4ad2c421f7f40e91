//! `tally-check`: the chaos checker (design.md §10). Reads only a history
//! file, prints every violation with the operations involved and a summary,
//! and draws the timeline PNG. Exit 0: no violation; 1: violations; 64: bad
//! input.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tally_integration::chaos::{check, history, plot};

#[derive(Parser, Debug)]
#[command(
    name = "tally-check",
    about = "Check a tally chaos history (history.jsonl)"
)]
struct Cli {
    /// The history file.
    history: PathBuf,
    /// Write the timeline here (default: timeline.png next to the history).
    #[arg(long)]
    png: Option<PathBuf>,
    /// Do not draw the timeline.
    #[arg(long)]
    no_plot: bool,
    /// Seconds after a quiet window begins by which every pod must agree.
    #[arg(long, default_value_t = check::Limits::default().converge.as_secs())]
    converge_s: u64,
    /// Seconds a pod may take to notice a cut-off fault (still saying complete).
    #[arg(long, default_value_t = check::Limits::default().detect.as_secs_f64())]
    detect_s: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ops = match File::open(&cli.history)
        .map_err(history::HistoryError::from)
        .and_then(|f| history::read(BufReader::new(f)))
    {
        Ok(ops) => ops,
        Err(e) => {
            eprintln!("tally-check: {}: {e}", cli.history.display());
            return ExitCode::from(64);
        }
    };
    let report = check::check(
        &ops,
        check::Limits {
            converge: Duration::from_secs(cli.converge_s),
            detect: Duration::from_secs_f64(cli.detect_s.max(0.0)),
        },
    );
    for v in &report.violations {
        print!("{v}");
    }
    print!(
        "{}",
        check::render_summary(&report.summary, report.violations.len())
    );
    if !cli.no_plot {
        let png = cli
            .png
            .unwrap_or_else(|| cli.history.with_file_name("timeline.png"));
        match plot::draw(&ops, &png) {
            Ok(()) => println!("timeline: {}", png.display()),
            Err(e) => {
                eprintln!("tally-check: {e:#}");
                return ExitCode::from(64);
            }
        }
    }
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
