//! The timeline plot: each pod's answered total over time (points, one
//! colour per pod), the acknowledged and the sent visits as lines, fault
//! windows shaded and labelled. Drawn by gnuplot (Debian `gnuplot-nox`,
//! which scripts/chaos installs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::check::Visits;
use super::history::Op;

/// The gnuplot data blocks and script for a history (pure).
pub fn script(ops: &[Op], png: &Path) -> String {
    let s = |ns: u64| ns as f64 / 1e9;
    let mut pods: BTreeMap<&str, String> = BTreeMap::new();
    let visits = Visits::of(ops);
    let mut faults = Vec::new();
    for op in ops {
        match op {
            Op::Visit { .. } => {}
            Op::Total {
                end_ns,
                total: Some(t),
                served_by: Some(by),
                ..
            } => {
                let _ = writeln!(pods.entry(by).or_default(), "{:.3} {t}", s(*end_ns));
            }
            Op::Total { .. } => {}
            Op::Fault {
                kind,
                start_ns,
                end_ns,
                ..
            } => faults.push((kind.as_str(), *start_ns, *end_ns)),
        }
    }
    let mut out = String::new();
    let steps = |name: &str, times: &[u64], out: &mut String| {
        let _ = writeln!(out, "${name} << EOD\n0 0");
        for (i, t) in times.iter().enumerate() {
            let _ = writeln!(out, "{:.3} {}", s(*t), i + 1);
        }
        let _ = writeln!(out, "EOD");
    };
    steps("acked", &visits.acked_ends, &mut out);
    steps("sent", &visits.sent_starts, &mut out);
    for (i, data) in pods.values().enumerate() {
        let _ = writeln!(out, "$pod{i} << EOD\n{data}EOD");
    }
    let _ = writeln!(
        out,
        "set terminal pngcairo size 1000,500 font 'sans,9'\nset output '{}'\n\
         set xlabel 'seconds since start'\nset ylabel 'visits'\nset key bottom right\nset grid",
        png.display()
    );
    let colour = |kind: &str| match kind {
        "isolate" | "partition" => "#e41a1c",
        "loss" | "slow" => "#ff7f00",
        "dns-down" => "#984ea3",
        "kill" | "pause" => "#377eb8",
        _ => "#4daf4a",
    };
    for (i, (kind, a, b)) in faults.iter().enumerate() {
        let _ = writeln!(
            out,
            "set object {} rect from {:.3}, graph 0 to {:.3}, graph 1 fc rgb '{}' fs transparent solid 0.15 noborder behind",
            i + 1,
            s(*a),
            s(*b),
            colour(kind)
        );
        let _ = writeln!(
            out,
            "set label {} '{kind}' at {:.3}, graph {:.2} font ',7' textcolor rgb '{}'",
            i + 1,
            s(*a),
            0.97 - 0.04 * (i % 4) as f64,
            colour(kind)
        );
    }
    let mut plots = vec![
        "$sent using 1:2 with steps lw 1 lc rgb '#999999' title 'visits sent'".to_string(),
        "$acked using 1:2 with steps lw 2 lc rgb 'black' title 'visits acknowledged'".to_string(),
    ];
    for (i, pod) in pods.keys().enumerate() {
        plots.push(format!(
            "$pod{i} using 1:2 with points pt 7 ps 0.4 title 'total read from {pod}'"
        ));
    }
    let _ = writeln!(out, "plot {}", plots.join(", \\\n  "));
    out
}

/// Writes `png` for a history with gnuplot.
pub fn draw(ops: &[Op], png: &Path) -> Result<()> {
    let gp = png.with_extension("gp");
    std::fs::write(&gp, script(ops, png)).with_context(|| format!("writing {}", gp.display()))?;
    let out = Command::new("gnuplot").arg(&gp).output().context(
        "running gnuplot for the timeline; install it (`apt-get install gnuplot-nox`, scripts/chaos does)",
    )?;
    if !out.status.success() {
        bail!(
            "gnuplot {}: {}",
            gp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::Outcome;

    #[test]
    fn the_script_has_one_series_per_pod_and_a_shaded_window_per_fault() {
        let ops = vec![
            Op::Visit {
                pod: None,
                start_ns: 0,
                end_ns: 500_000_000,
                outcome: Outcome::Ok,
            },
            Op::Total {
                pod: None,
                start_ns: 1_000_000_000,
                end_ns: 2_000_000_000,
                outcome: Outcome::Ok,
                total: Some(1),
                complete: Some(true),
                served_by: Some("tally-1".into()),
            },
            Op::Fault {
                kind: "isolate".into(),
                target: vec!["tally-0".into()],
                start_ns: 3_000_000_000,
                end_ns: 4_000_000_000,
            },
        ];
        let s = script(&ops, Path::new("/x/t.png"));
        assert!(s.contains("$acked << EOD\n0 0\n0.500 1\nEOD"), "{s}");
        assert!(s.contains("$pod0 << EOD\n2.000 1\nEOD"), "{s}");
        assert!(
            s.contains("rect from 3.000, graph 0 to 4.000, graph 1"),
            "{s}"
        );
        assert!(s.contains("title 'total read from tally-1'"), "{s}");
        assert!(s.contains("set output '/x/t.png'"), "{s}");
    }
}
