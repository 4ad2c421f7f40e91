//! `tally serve`: assembles a running pod from its configuration — store,
//! discovery, cluster view, HTTP server — and runs it until SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;

use crate::config::Config;
use crate::discovery::{Discovery, DiscoveryError};
use crate::http::{self, App, server};
use crate::identity::{Identity, IdentityError};
use crate::metrics::Metrics;
use crate::peers::client::PeerClient;
use crate::peers::{self, Cluster, PeersError};
use crate::shutdown;
use crate::store::{self, Store, StoreError};

/// Why the pod could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Peers(#[from] PeersError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(
        "cannot read the peer token file {path}: {source} (mount the Secret there, or unset TALLY_PEER_TOKEN_FILE)"
    )]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the peer token file {0} is empty: put the shared token in it")]
    EmptyToken(String),
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? set --listen or TALLY_LISTEN)"
    )]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl StartError {
    /// Identity problems are configuration mistakes (exit 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartError::Identity(_) | StartError::TokenFile { .. } | StartError::EmptyToken(_)
        )
    }
}

/// Reads the peer token file, if one is configured.
pub fn read_token(config: &Config) -> Result<Option<String>, StartError> {
    let Some(path) = &config.peer_token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| StartError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(StartError::EmptyToken(path.display().to_string()));
    }
    Ok(Some(token.to_string()))
}

/// Builds the DNS membership for a StatefulSet member, `None` standalone.
pub fn discovery(config: &Config, identity: &Identity) -> Result<Option<Discovery>, StartError> {
    identity
        .member
        .clone()
        .map(|member| {
            Discovery::new(
                member,
                config.dns_server,
                config.dns_max_ttl,
                config.peer_timeout,
            )
        })
        .transpose()
        .map_err(StartError::from)
}

/// Runs the pod until a shutdown signal; then drains and flushes.
pub async fn run(config: Config) -> Result<(), StartError> {
    let identity = Identity::from_config(&config)?;
    let token = read_token(&config)?;
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(
        &config.data_dir,
        &identity.pod,
        store::Options {
            durability: config.durability,
            sync_interval: config.sync_interval,
            commit_timeout: config.commit_timeout,
        },
        metrics.clone(),
    )?;
    let discovery = discovery(&config, &identity)?;
    let cluster = Cluster::new(
        &config.data_dir,
        &identity.pod,
        store.clone(),
        discovery,
        PeerClient::new(token.as_deref(), config.peer_timeout),
        peers::Limits {
            peer_timeout: config.peer_timeout,
            deadline: config.fanout_deadline,
        },
        metrics.clone(),
    )?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    // Before the first visit is served: siblings whose DNS answer is still
    // cached without this pod count it from now on (design.md §5).
    cluster.announce(addr).await;
    let background = cluster.spawn_background(config.refresh_interval);
    let app = Arc::new(App {
        pod: identity.pod.clone(),
        store: store.clone(),
        cluster: cluster.clone(),
        metrics,
        timezone: config.timezone.clone(),
        peer_token: token,
        stopping: AtomicBool::new(false),
    });
    tracing::info!(
        %addr,
        pod = %identity.pod,
        incarnation = %store.incarnation(),
        count = store.count(),
        durability = config.durability.as_str(),
        peers = identity.member.as_ref().map(|m| m.srv_name()).unwrap_or_default(),
        "listening"
    );
    let limits = server::Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        grace: config.shutdown_grace,
    };
    // The shutdown sequence, before the listener closes: fail readiness and
    // keep serving for the delay (SIGTERM only: Kubernetes needs a moment to
    // take the pod out of the Service; Ctrl-C does not), then freeze the
    // count (queued visits commit, later ones get 503), persist, and hand
    // the final state to the siblings while the peer route still answers.
    let stopping = async {
        let signal = shutdown::signal_received().await;
        app.stopping.store(true, Ordering::Relaxed);
        if signal == "SIGTERM" && !config.shutdown_delay.is_zero() {
            tracing::info!(
                signal,
                delay_ms = config.shutdown_delay.as_millis() as u64,
                "shutdown requested: readiness fails, still serving"
            );
            tokio::time::sleep(config.shutdown_delay).await;
        } else {
            tracing::info!(signal, "shutdown requested");
        }
        store.close().await;
        cluster.persist().await;
        cluster.goodbye().await;
    };
    let drained = server::serve(
        listener,
        http::router(app.clone(), config.request_timeout),
        limits,
        stopping,
    )
    .await;
    drop(background);
    tracing::info!(count = store.count(), drained, "stopped");
    Ok(())
}
