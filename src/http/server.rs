//! The accept loop and the protections at the HTTP edge: a cap on concurrent
//! connections, a header-read timeout against slowloris, a header size limit,
//! and graceful shutdown (stop accepting, let in-flight requests finish
//! within the grace period).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::edge::{Edge, Sender};

/// Largest request head (request line + headers) accepted; hyper answers
/// 431 past it.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Edge limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections served at once; further ones wait in the backlog.
    pub max_connections: usize,
    /// Time a client gets to send its request head.
    pub header_read_timeout: Duration,
    /// Time in-flight requests get after shutdown starts.
    pub grace: Duration,
    /// Whether a connection may carry more than one request: the probe
    /// port's do not (kubelet dials per probe), so none lingers in a slot.
    pub keep_alive: bool,
}

/// Connections the probe port serves at once: a probe of each kind with
/// room to spare; its own limit, so floods elsewhere cannot take them.
pub const PROBE_MAX_CONNECTIONS: usize = 32;

/// Serves `edge` on `listener` until `shutdown` completes, then drains.
/// Returns whether every connection finished within the grace period.
pub async fn serve(
    listener: TcpListener,
    edge: Arc<Edge>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(limits.keep_alive);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let edge = edge.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                // Who sent it: the peer port limits each sender's share.
                request.extensions_mut().insert(Sender(peer.ip()));
                edge.clone().serve(request)
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        grace_s = limits.grace.as_secs_f64(),
        "shutting down: no new connections, draining in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep(limits.grace) => {
            tracing::warn!("grace period over; closing the remaining connections");
            false
        }
    }
}
