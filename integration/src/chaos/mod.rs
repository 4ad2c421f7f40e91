//! The chaos suite (design.md §10): a runner that drives the rendered chart on
//! the simulator under random faults and records a history, and a checker
//! that reads only that history (Jepsen's split).
//!
//! # Layout
//! - [`history`]: the history file format (`history.jsonl`, issue 9 item 4).
//! - [`check`]: the pure checker: read bounds, per-pod monotonic totals,
//!   convergence after heal, no `complete` while a member is cut off.
//! - [`plot`]: the timeline PNG (gnuplot).
//! - [`nemesis`]: the faults and their seeded schedule.
//! - [`runner`]: clients, nemeses and the recorder, on a live cluster.

pub mod check;
pub mod history;
pub mod nemesis;
pub mod plot;
pub mod runner;
