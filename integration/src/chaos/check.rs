//! The checker: reads a history and nothing else (no access to the cluster),
//! and reports every violation of the promises of design.md §4 with the
//! operations involved. Pure; unit-tested on hand-written histories.
//!
//! Jepsen's counter bounds, for a grow-only counter where visits may be
//! `unknown` (sent, outcome not seen):
//! - **upper**: a total is at most the visits *sent* (`ok` or `unknown`)
//!   before the read completed;
//! - **lower**: a `complete: true` total is at least the visits *acknowledged*
//!   (`ok`) before the read began;
//! - **monotonic**: reads served by one pod never go down, across that pod's
//!   restarts (reads that overlap in time are not ordered);
//! - **convergence**: in a quiet window (no fault, no visit in flight), every
//!   pod answers `complete: true` with the same total, between the
//!   acknowledged and the sent visits, within [`Limits::converge`] of the
//!   window's start;
//! - **cut off**: no `complete: true` for a read that ran entirely inside a
//!   fault that cuts a member off or stops DNS, once the pods had
//!   [`Limits::detect`] to notice (a pod cannot know of a cut before a peer
//!   call or a DNS lookup fails).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::history::{Op, Outcome};

/// Fault kinds during which no read may say `complete: true`.
pub const CUT_OFF_KINDS: &[&str] = &["isolate", "partition", "dns-down", "dns-servfail"];

/// What the checker allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long after a quiet window starts every pod must agree.
    pub converge: Duration,
    /// How long after a cut-off fault begins a pod may still say `complete`.
    pub detect: Duration,
}

impl Default for Limits {
    /// 45 s: a killed pod restarts, turns Ready and is resolved again within
    /// that, even with DNS answers cached for 30 s. 2 s to notice a cut: one
    /// refresh (1 s in chaos runs) plus a DNS answer's longest life (1 s).
    fn default() -> Self {
        Limits {
            converge: Duration::from_secs(45),
            detect: Duration::from_secs(2),
        }
    }
}

/// Which promise was broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// A total above the visits sent before the read completed.
    AboveSent,
    /// A complete total below the visits acknowledged before the read began.
    BelowAcked,
    /// A pod's total went down.
    Decreased,
    /// Pods did not agree on the total in time after a heal.
    NotConverged,
    /// `complete: true` while a member was cut off or DNS failed.
    CompleteWhileCutOff,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::AboveSent => "total above visits sent",
            Rule::BelowAcked => "complete total below visits acknowledged",
            Rule::Decreased => "total decreased",
            Rule::NotConverged => "no convergence after heal",
            Rule::CompleteWhileCutOff => "complete while a member was cut off",
        })
    }
}

/// One broken promise and the operations that show it.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The promise.
    pub rule: Rule,
    /// What was seen, with the numbers.
    pub message: String,
    /// The operations involved (as in the history).
    pub ops: Vec<Op>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "VIOLATION {}: {}", self.rule, self.message)?;
        for op in &self.ops {
            writeln!(f, "    {}", serde_json::to_string(op).unwrap_or_default())?;
        }
        Ok(())
    }
}

/// Counts for the summary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// All operations (visits, reads, faults).
    pub operations: usize,
    /// Visits: ok, fail, unknown.
    pub visits: [usize; 3],
    /// Reads: ok, fail, unknown.
    pub reads: [usize; 3],
    /// Reads that said `complete: true`.
    pub complete_reads: usize,
    /// Faults per kind.
    pub faults: BTreeMap<String, usize>,
    /// Quiet windows judged for convergence.
    pub quiet_windows: usize,
    /// Slowest convergence seen after a heal.
    pub slowest_convergence: Duration,
}

/// The checker's verdict.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Counts.
    pub summary: Summary,
    /// Every violation, in rule then time order.
    pub violations: Vec<Violation>,
}

fn slot(o: Outcome) -> usize {
    match o {
        Outcome::Ok => 0,
        Outcome::Fail => 1,
        Outcome::Unknown => 2,
    }
}

/// A successful read.
#[derive(Clone, Debug)]
struct Read<'a> {
    op: &'a Op,
    start: u64,
    end: u64,
    total: u64,
    complete: bool,
    served_by: &'a str,
}

/// Visit counts as functions of time (the checker's bounds and the plot's
/// lines both come from here).
pub(super) struct Visits {
    /// Invocation times of visits that may have been counted (ok, unknown),
    /// sorted.
    pub(super) sent_starts: Vec<u64>,
    /// Completion times of acknowledged visits, sorted.
    pub(super) acked_ends: Vec<u64>,
}

impl Visits {
    pub(super) fn of(ops: &[Op]) -> Visits {
        let mut visits = Visits {
            sent_starts: Vec::new(),
            acked_ends: Vec::new(),
        };
        for op in ops {
            if let Op::Visit {
                start_ns,
                end_ns,
                outcome,
                ..
            } = op
            {
                if *outcome != Outcome::Fail {
                    visits.sent_starts.push(*start_ns);
                }
                if *outcome == Outcome::Ok {
                    visits.acked_ends.push(*end_ns);
                }
            }
        }
        visits.sent_starts.sort_unstable();
        visits.acked_ends.sort_unstable();
        visits
    }

    /// Visits invoked strictly before `t` and not certainly failed.
    fn sent_before(&self, t: u64) -> u64 {
        self.sent_starts.partition_point(|s| *s < t) as u64
    }

    /// Visits acknowledged strictly before `t`.
    fn acked_before(&self, t: u64) -> u64 {
        self.acked_ends.partition_point(|e| *e < t) as u64
    }
}

/// Checks a whole history.
pub fn check(ops: &[Op], limits: Limits) -> Report {
    let mut summary = Summary {
        operations: ops.len(),
        ..Summary::default()
    };
    let visits = Visits::of(ops);
    let mut reads = Vec::new();
    let mut failed_reads = Vec::new();
    let mut faults = Vec::new();
    for op in ops {
        match op {
            Op::Visit { outcome, .. } => summary.visits[slot(*outcome)] += 1,
            Op::Total {
                start_ns,
                end_ns,
                outcome,
                total,
                complete,
                served_by,
                ..
            } => {
                summary.reads[slot(*outcome)] += 1;
                match (outcome, total) {
                    (Outcome::Ok, Some(total)) => {
                        let complete = complete.unwrap_or(false);
                        summary.complete_reads += usize::from(complete);
                        reads.push(Read {
                            op,
                            start: *start_ns,
                            end: *end_ns,
                            total: *total,
                            complete,
                            served_by: served_by.as_deref().unwrap_or("?"),
                        });
                    }
                    _ => failed_reads.push(op),
                }
            }
            Op::Fault { kind, .. } => {
                *summary.faults.entry(kind.clone()).or_default() += 1;
                faults.push(op);
            }
        }
    }
    reads.sort_by_key(|r| (r.start, r.end));
    let mut violations = Vec::new();
    bounds(&reads, &visits, &mut violations);
    monotonic(&reads, &mut violations);
    cut_off(&reads, &faults, limits, &mut violations);
    convergence(
        ops,
        &reads,
        &failed_reads,
        &visits,
        limits,
        &mut summary,
        &mut violations,
    );
    violations.sort_by_key(|v| (v.rule, v.ops.first().map(Op::start_ns)));
    Report {
        summary,
        violations,
    }
}

fn bounds(reads: &[Read], visits: &Visits, out: &mut Vec<Violation>) {
    for r in reads {
        let sent = visits.sent_before(r.end);
        if r.total > sent {
            out.push(Violation {
                rule: Rule::AboveSent,
                message: format!(
                    "{} answered {} but only {sent} visits were sent before the read completed",
                    r.served_by, r.total
                ),
                ops: vec![r.op.clone()],
            });
        }
        let acked = visits.acked_before(r.start);
        if r.complete && r.total < acked {
            out.push(Violation {
                rule: Rule::BelowAcked,
                message: format!(
                    "{} answered {} complete, but {acked} visits were acknowledged before the read began ({} missing)",
                    r.served_by,
                    r.total,
                    acked - r.total
                ),
                ops: vec![r.op.clone()],
            });
        }
    }
}

fn monotonic(reads: &[Read], out: &mut Vec<Violation>) {
    let mut by_pod: HashMap<&str, Vec<&Read>> = HashMap::new();
    for r in reads {
        by_pod.entry(r.served_by).or_default().push(r);
    }
    for rs in by_pod.values() {
        // Sweep by start; `done` holds reads completed before the current
        // one began, and `best` the highest of them.
        let mut by_end: Vec<&Read> = rs.clone();
        by_end.sort_by_key(|r| r.end);
        let mut j = 0;
        let mut best: Option<&Read> = None;
        for r in rs {
            while j < by_end.len() && by_end[j].end < r.start {
                if best.is_none_or(|b| by_end[j].total > b.total) {
                    best = Some(by_end[j]);
                }
                j += 1;
            }
            if let Some(b) = best
                && r.total < b.total
            {
                out.push(Violation {
                    rule: Rule::Decreased,
                    message: format!(
                        "{} answered {} after it had answered {} ({} lower)",
                        r.served_by,
                        r.total,
                        b.total,
                        b.total - r.total
                    ),
                    ops: vec![b.op.clone(), r.op.clone()],
                });
            }
        }
    }
}

fn cut_off(reads: &[Read], faults: &[&Op], limits: Limits, out: &mut Vec<Violation>) {
    let grace = limits.detect.as_nanos() as u64;
    for f in faults {
        let Op::Fault { kind, .. } = f else { continue };
        if !CUT_OFF_KINDS.contains(&kind.as_str()) {
            continue;
        }
        for r in reads {
            if r.complete && r.start >= f.start_ns() + grace && r.end <= f.end_ns() {
                out.push(Violation {
                    rule: Rule::CompleteWhileCutOff,
                    message: format!(
                        "{} answered {} complete {:.1} s into fault {kind}",
                        r.served_by,
                        r.total,
                        (r.start - f.start_ns()) as f64 / 1e9
                    ),
                    ops: vec![(*f).clone(), r.op.clone()],
                });
            }
        }
    }
}

/// Quiet windows: the gaps between busy intervals (a visit in flight or a
/// fault in place), as `(start, end)`; the last one ends at the history's end.
fn quiet_windows(ops: &[Op]) -> Vec<(u64, u64)> {
    let mut busy: Vec<(u64, u64)> = ops
        .iter()
        .filter(|o| matches!(o, Op::Visit { .. } | Op::Fault { .. }))
        .map(|o| (o.start_ns(), o.end_ns()))
        .collect();
    busy.sort_unstable();
    let last = ops.iter().map(Op::end_ns).max().unwrap_or(0);
    let mut out = Vec::new();
    let mut reach = 0;
    for (s, e) in busy {
        if s > reach && reach > 0 {
            out.push((reach, s));
        }
        reach = reach.max(e);
    }
    if reach > 0 && last > reach {
        out.push((reach, last));
    }
    out
}

fn convergence(
    ops: &[Op],
    reads: &[Read],
    failed: &[&Op],
    visits: &Visits,
    limits: Limits,
    summary: &mut Summary,
    out: &mut Vec<Violation>,
) {
    let within = limits.converge.as_nanos() as u64;
    for (a, b) in quiet_windows(ops) {
        let inside: Vec<&Read> = reads
            .iter()
            .filter(|r| r.start >= a && r.end <= b)
            .collect();
        let Some(last) = inside.iter().max_by_key(|r| r.end) else {
            continue;
        };
        let (acked, sent) = (visits.acked_before(a), visits.sent_before(a));
        let agreed = last.total;
        let good = |r: &Read| r.complete && r.total == agreed && (acked..=sent).contains(&agreed);
        // Converged from the end of the last bad read (a failed read counts
        // as bad: every pod must answer).
        let last_bad = inside
            .iter()
            .filter(|r| !good(r))
            .map(|r| r.end)
            .chain(
                failed
                    .iter()
                    .filter(|f| f.start_ns() >= a && f.end_ns() <= b)
                    .map(|f| f.end_ns()),
            )
            .max();
        let converged = inside
            .iter()
            .any(|r| good(r) && last_bad.is_none_or(|t| r.start > t));
        let long = b - a >= within;
        if !converged {
            if long {
                summary.quiet_windows += 1;
                let mut involved: Vec<Op> =
                    inside.iter().rev().take(6).map(|r| r.op.clone()).collect();
                involved.reverse();
                out.push(Violation {
                    rule: Rule::NotConverged,
                    message: format!(
                        "quiet for {:.1} s from t={:.3} s, but pods never agreed on one complete total between \
                         {acked} acknowledged and {sent} sent visits (last reads below)",
                        (b - a) as f64 / 1e9,
                        a as f64 / 1e9
                    ),
                    ops: involved,
                });
            }
            continue;
        }
        summary.quiet_windows += 1;
        let took = last_bad.map_or(0, |t| t.saturating_sub(a));
        summary.slowest_convergence = summary.slowest_convergence.max(Duration::from_nanos(took));
        if took > within {
            out.push(Violation {
                rule: Rule::NotConverged,
                message: format!(
                    "pods agreed on {agreed} only {:.1} s after the quiet window began at t={:.3} s (limit {} s)",
                    took as f64 / 1e9,
                    a as f64 / 1e9,
                    limits.converge.as_secs()
                ),
                ops: vec![last.op.clone()],
            });
        }
    }
}

/// The summary as the runner and the checker print it.
pub fn render_summary(s: &Summary, violations: usize) -> String {
    let faults: Vec<String> = s.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!(
        "operations: {}\nvisits: {} (ok {}, fail {}, unknown {})\nreads: {} (ok {}, fail {}, unknown {}; complete {})\n\
         faults: {} ({})\nquiet windows judged: {}, slowest convergence {:.1} s\nviolations: {violations}\n",
        s.operations,
        s.visits.iter().sum::<usize>(),
        s.visits[0],
        s.visits[1],
        s.visits[2],
        s.reads.iter().sum::<usize>(),
        s.reads[0],
        s.reads[1],
        s.reads[2],
        s.complete_reads,
        s.faults.values().sum::<usize>(),
        faults.join(", "),
        s.quiet_windows,
        s.slowest_convergence.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn visit(start: u64, end: u64, outcome: Outcome) -> Op {
        Op::Visit {
            pod: None,
            start_ns: start,
            end_ns: end,
            outcome,
        }
    }

    fn total(pod: &str, start: u64, end: u64, total: u64, complete: bool) -> Op {
        Op::Total {
            pod: Some(pod.into()),
            start_ns: start,
            end_ns: end,
            outcome: Outcome::Ok,
            total: Some(total),
            complete: Some(complete),
            served_by: Some(pod.into()),
        }
    }

    fn fault(kind: &str, start: u64, end: u64) -> Op {
        Op::Fault {
            kind: kind.into(),
            target: vec!["tally-2".into()],
            start_ns: start,
            end_ns: end,
        }
    }

    fn rules(ops: &[Op]) -> Vec<Rule> {
        check(ops, Limits::default())
            .violations
            .iter()
            .map(|v| v.rule)
            .collect()
    }

    #[test]
    fn a_clean_history_passes_and_is_counted() {
        let ops = vec![
            visit(1, 2, Outcome::Ok),
            visit(3, 4, Outcome::Unknown),
            visit(3, 4, Outcome::Fail),
            total("tally-0", 5, 6, 1, true),
            total("tally-1", 5, 7, 2, false),
            fault("kill", 8, 9),
        ];
        let r = check(&ops, Limits::default());
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.summary.visits, [1, 1, 1]);
        assert_eq!(r.summary.reads, [2, 0, 0]);
        assert_eq!(r.summary.complete_reads, 1);
        assert_eq!(r.summary.faults["kill"], 1);
    }

    #[test]
    fn a_total_above_the_visits_sent_is_caught() {
        // The only visit was sent after the read completed; a failed one never counts.
        let ops = vec![
            visit(0, 1, Outcome::Fail),
            total("tally-0", 1, 5, 1, false),
            visit(6, 7, Outcome::Ok),
        ];
        assert_eq!(rules(&ops), [Rule::AboveSent]);
    }

    #[test]
    fn a_stale_complete_total_is_caught_and_an_incomplete_one_is_not() {
        let ops = vec![
            visit(0, 10, Outcome::Ok),
            visit(0, 10, Outcome::Ok),
            // Began after both were acknowledged: must see 2.
            total("tally-0", 11, 12, 1, true),
            // Incomplete: allowed to miss them.
            total("tally-1", 11, 12, 1, false),
            // Overlaps the acknowledgement: 1 is fine.
            total("tally-2", 9, 12, 1, true),
        ];
        let r = check(&ops, Limits::default());
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert_eq!(r.violations[0].rule, Rule::BelowAcked);
        assert!(
            r.violations[0].message.contains("1 missing"),
            "{}",
            r.violations[0]
        );
    }

    #[test]
    fn a_pod_going_down_is_caught_but_overlapping_reads_are_not_ordered() {
        let mut ops: Vec<Op> = (0..5).map(|i| visit(i, i + 1, Outcome::Ok)).collect();
        ops.push(total("tally-0", 10, 20, 5, false));
        ops.push(total("tally-0", 15, 25, 3, false)); // overlaps: no order
        ops.push(total("tally-1", 21, 22, 1, false)); // another pod
        assert!(rules(&ops).is_empty());
        ops.push(total("tally-0", 26, 27, 4, false));
        let r = check(&ops, Limits::default());
        assert_eq!(r.violations.len(), 1);
        assert_eq!(r.violations[0].rule, Rule::Decreased);
        assert_eq!(r.violations[0].ops.len(), 2, "both reads are shown");
    }

    #[test]
    fn complete_inside_a_cut_off_fault_is_caught_only_inside() {
        let ops = vec![
            visit(0, 1, Outcome::Ok),
            fault("isolate", 10 * S, 20 * S),
            total("tally-0", 5 * S, 11 * S, 1, true), // began before the fault
            total("tally-1", 11 * S, 11 * S + 1, 1, true), // too soon to notice
            total("tally-0", 12 * S, 13 * S, 1, true),
            total("tally-1", 12 * S, 13 * S, 1, false),
            fault("kill", 30 * S, 40 * S),
            total("tally-0", 33 * S, 34 * S, 1, true), // a kill cuts nobody off for good
            fault("volume-full", 50 * S, 60 * S),
            total("tally-0", 53 * S, 54 * S, 1, true), // nobody is cut off
        ];
        assert_eq!(rules(&ops), [Rule::CompleteWhileCutOff]);
        // DNS answering SERVFAIL is DNS failing, like DNS unreachable.
        for kind in ["dns-down", "dns-servfail"] {
            let ops = vec![
                visit(0, 1, Outcome::Ok),
                fault(kind, 10 * S, 20 * S),
                total("tally-0", 12 * S, 13 * S, 1, true),
            ];
            assert_eq!(rules(&ops), [Rule::CompleteWhileCutOff], "{kind}");
        }
    }

    #[test]
    fn a_quiet_window_must_converge_in_time_between_acked_and_sent() {
        let mut ops = vec![
            visit(0, S, Outcome::Ok),
            visit(0, S, Outcome::Unknown),
            fault("pause", S, 2 * S),
            total("tally-0", 3 * S, 3 * S + 1, 1, false),
            total("tally-1", 4 * S, 4 * S + 1, 2, true),
            total("tally-0", 5 * S, 5 * S + 1, 2, true),
        ];
        let r = check(&ops, Limits::default());
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.summary.quiet_windows, 1);
        assert_eq!(r.summary.slowest_convergence, Duration::from_nanos(S + 1));
        // A pod that still disagrees at the end of a long window.
        ops.push(total("tally-2", 60 * S, 60 * S + 1, 1, false));
        assert_eq!(rules(&ops), [Rule::NotConverged]);
        ops.pop();
        // Agreement reached, but only after the limit.
        ops.push(total("tally-2", 50 * S, 50 * S + 1, 1, false));
        ops.push(total("tally-2", 51 * S, 51 * S + 1, 2, true));
        let r = check(&ops, Limits::default());
        assert_eq!(r.violations.len(), 1);
        assert!(
            r.violations[0].message.contains("only 48.0 s"),
            "{}",
            r.violations[0]
        );
    }

    #[test]
    fn agreement_outside_the_visit_bounds_is_not_convergence() {
        let ops = vec![
            visit(0, S, Outcome::Ok),
            total("tally-0", 2 * S, 2 * S + 1, 0, false),
            total("tally-0", 60 * S, 60 * S + 1, 0, false),
        ];
        // Both incomplete and below the acknowledged visit.
        assert_eq!(rules(&ops), [Rule::NotConverged]);
    }

    #[test]
    fn quiet_windows_are_the_gaps_between_visits_and_faults() {
        let ops = vec![
            visit(0, 10, Outcome::Ok),
            fault("kill", 5, 20),
            visit(30, 40, Outcome::Ok),
            total("tally-0", 41, 50, 1, true),
        ];
        assert_eq!(quiet_windows(&ops), vec![(20, 30), (40, 50)]);
    }
}
