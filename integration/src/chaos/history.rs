//! The history file: one JSON object per line, every time from one monotonic
//! clock (nanoseconds since the run started).
//!
//! ```text
//! {"op":"visit","pod":null,"start_ns":1,"end_ns":2,"outcome":"ok"}
//! {"op":"total","pod":"tally-1","start_ns":3,"end_ns":4,"outcome":"ok","total":1,"complete":true,"served_by":"tally-1"}
//! {"op":"fault","kind":"isolate","target":["tally-2"],"start_ns":5,"end_ns":9}
//! ```
//!
//! `pod` is `null` when the operation went through the client Service.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How an operation ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Answered 200: a visit was counted, a total was read.
    Ok,
    /// Certainly had no effect (the connection was never made).
    Fail,
    /// May or may not have taken effect (timeout, reset, error status).
    Unknown,
}

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// `GET /`.
    Visit {
        /// The pod asked directly, or `None` through the client Service.
        pod: Option<String>,
        /// Invocation.
        start_ns: u64,
        /// Completion.
        end_ns: u64,
        /// Outcome.
        outcome: Outcome,
    },
    /// `GET /visits/total`.
    Total {
        /// The pod asked directly, or `None` through the client Service.
        pod: Option<String>,
        /// Invocation.
        start_ns: u64,
        /// Completion.
        end_ns: u64,
        /// Outcome.
        outcome: Outcome,
        /// The total answered (`None` unless `ok`).
        #[serde(default)]
        total: Option<u64>,
        /// Its `complete` flag.
        #[serde(default)]
        complete: Option<bool>,
        /// The pod that answered (its `pods[]` row with `source: self`).
        #[serde(default)]
        served_by: Option<String>,
    },
    /// A fault, from the moment it was in place to the moment its heal began.
    Fault {
        /// Nemesis name (`isolate`, `partition`, `loss`, ...).
        kind: String,
        /// The pods it hit.
        target: Vec<String>,
        /// In place from.
        start_ns: u64,
        /// Heal began.
        end_ns: u64,
    },
}

impl Op {
    /// Invocation (or fault start).
    pub fn start_ns(&self) -> u64 {
        match self {
            Op::Visit { start_ns, .. }
            | Op::Total { start_ns, .. }
            | Op::Fault { start_ns, .. } => *start_ns,
        }
    }

    /// Completion (or fault end).
    pub fn end_ns(&self) -> u64 {
        match self {
            Op::Visit { end_ns, .. } | Op::Total { end_ns, .. } | Op::Fault { end_ns, .. } => {
                *end_ns
            }
        }
    }
}

/// A history line that cannot be read.
#[derive(Debug, Error)]
pub enum HistoryError {
    /// Reading failed.
    #[error("reading the history: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not one of the three operations.
    #[error(
        "history line {line}: {source} (expected op visit, total or fault as in design.md §10)"
    )]
    Parse {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: serde_json::Error,
    },
}

/// Reads a whole history (blank lines are skipped).
pub fn read(r: impl BufRead) -> Result<Vec<Op>, HistoryError> {
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let op = serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
            line: i + 1,
            source,
        })?;
        out.push(op);
    }
    Ok(out)
}

/// Writes one operation as one line.
pub fn write(w: &mut impl Write, op: &Op) -> std::io::Result<()> {
    let mut line = serde_json::to_string(op).map_err(std::io::Error::other)?;
    line.push('\n');
    w.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_in_the_documented_shape() {
        let text = r#"{"op":"visit","pod":null,"start_ns":1,"end_ns":2,"outcome":"ok"}
{"op":"total","pod":"tally-1","start_ns":3,"end_ns":4,"outcome":"ok","total":1,"complete":true,"served_by":"tally-1"}

{"op":"fault","kind":"isolate","target":["tally-2"],"start_ns":5,"end_ns":9}
"#;
        let ops = read(text.as_bytes()).unwrap();
        assert_eq!(ops.len(), 3);
        let mut out = Vec::new();
        for op in &ops {
            write(&mut out, op).unwrap();
        }
        assert_eq!(String::from_utf8(out).unwrap(), text.replace("\n\n", "\n"));
        assert_eq!((ops[2].start_ns(), ops[2].end_ns()), (5, 9));
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = read("{\"op\":\"visit\"}\n{\"op\":\"jump\"}\n".as_bytes()).unwrap_err();
        assert!(e.to_string().starts_with("history line 1:"), "{e}");
    }
}
