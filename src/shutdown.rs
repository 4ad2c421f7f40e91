//! The shutdown signal: SIGTERM (Kubernetes stopping the pod) or SIGINT
//! (Ctrl-C), whichever comes first.

use tokio::signal::unix::{SignalKind, signal};

/// Completes on the first SIGTERM or SIGINT; returns its name for the log.
pub async fn signal_received() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("cannot install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("cannot install a SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
