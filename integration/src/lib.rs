//! Test support for Tally: everything here runs the real `tally` binary.
//!
//! # Layout
//! - [`chaos`]: the chaos runner, its history format and the checker
//!   (design.md §10).
//! - [`harness`]: start a real `tally` process on its own data directory and
//!   address, talk HTTP to it, stop it (SIGTERM, SIGKILL, SIGSTOP) and always
//!   clean up in `Drop`.
//! - [`sim`]: the local StatefulSet simulator (design.md §9).

pub mod chaos;
pub mod harness;
pub mod sim;
