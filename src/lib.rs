//! Tally: a durable, cluster-wide visit counter for Kubernetes StatefulSets.
//!
//! Every pod counts the visits it serves, durably, on its own volume, and
//! finds its siblings through the headless Service's DNS records to answer
//! the exact cluster-wide total. `design.md` is the contract.
//!
//! # Layout
//!
//! - [`config`]: the settings table; flags > env > file > defaults, with
//!   provenance for errors and `check-config`.
//! - [`identity`]: pod name, ordinal, and the DNS names derived from them.
//! - [`store`]: the durable per-pod counter: group commit into two
//!   checksummed slots ([`store::format`]), the disk behind a narrow trait
//!   ([`store::disk`]) so the power-cut model can stand in for it, the sync
//!   policy of each durability mode, the data-directory lock; atomic
//!   checksummed files for `peers.state` in [`store::file`].
//! - [`merge`]: the grow-only cluster counter keyed by (pod, incarnation).
//! - [`discovery`]: members from the headless Service's SRV records.
//! - [`peers`]: the peer client, the coalesced fan-out and the
//!   `/visits/total` view; what a pod knows of the others, persisted.
//! - [`http`]: the handlers of both ports, the page, the edge they share
//!   (route table, 404/405/413, request metrics; on hyper directly) and the
//!   accept loop.
//! - [`media`]: media types and `Accept` ranges, for both ports.
//! - [`metrics`]: Prometheus metrics.
//! - [`shutdown`]: the SIGTERM/SIGINT signal.
//! - [`nslookup`]: the built-in `nslookup` (the image has no dnsutils).
//! - [`serve`]: assembles a running pod; [`cli`]: the command line;
//!   [`check`]: `tally check-cluster`, the chart's `helm test`; [`exit`]:
//!   the exit code of each way a start can fail.
//! - `fuzz` (tests and fuzzing builds only): the properties the fuzzers in
//!   `fuzz/` and the property tests check on every decoder of outside bytes.

pub mod check;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod exit;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod http;
pub mod identity;
pub mod media;
pub mod merge;
pub mod metrics;
pub mod nslookup;
pub mod peers;
pub mod serve;
pub mod shutdown;
pub mod store;
