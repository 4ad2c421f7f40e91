//! `tally serve`: assembles a running pod from its configuration — store,
//! discovery, cluster view, the client and peer servers — and runs it until
//! SIGTERM/SIGINT, then shuts it down in order (see [`run`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::discovery::{Discovery, DiscoveryError};
use crate::http::edge::{Edge, Port};
use crate::http::peer::PeerGate;
use crate::http::{self, App, server};
use crate::identity::{Identity, IdentityError};
use crate::merge::Entry;
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
    #[error("cannot listen on {addr}: {source} (is another process using the port? set {setting})")]
    Listen {
        addr: SocketAddr,
        setting: &'static str,
        source: std::io::Error,
    },
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
    let discovery = discovery(&config, &identity)?;
    let client = PeerClient::new(token.as_deref(), config.peer_timeout);
    let limits = peers::Limits {
        peer_timeout: config.peer_timeout,
        deadline: config.fanout_deadline,
    };
    // Before counting anything (and before opening the store): a volume
    // restored from a backup holds less than the siblings know of it, and
    // counting on under the same incarnation would hide the next visits
    // behind the old count.
    if let (Some(discovery), Some(stored)) = (&discovery, store::inspect(&config.data_dir)?) {
        let me = Entry {
            pod: identity.pod.clone(),
            incarnation: stored.incarnation.clone(),
            count: stored.count,
            seen_unix: 0,
        };
        if let Some((known, from)) =
            peers::what_siblings_know(discovery, &client, limits, &me).await
        {
            let forked = store::fork(&config.data_dir, &identity.pod)?;
            tracing::warn!(
                old_incarnation = %me.incarnation,
                disk_count = me.count,
                known_count = known,
                known_by = %from,
                new_incarnation = %forked.incarnation,
                "this volume holds fewer visits than the siblings know of it (restored from a backup?): started a new incarnation; the old one keeps the higher count"
            );
        }
    }
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
    let cluster = Cluster::new(
        &config.data_dir,
        &identity.pod,
        store.clone(),
        discovery,
        client,
        limits,
        metrics.clone(),
    )?;
    let (listener, addr) = bind(config.listen, "--listen or TALLY_LISTEN").await?;
    let (peer_listener, peer_addr) =
        bind(config.peer_listen, "--peer-listen or TALLY_PEER_LISTEN").await?;
    let probe_listener = match config.probe_listen {
        Some(addr) => Some(bind(addr, "--probe-listen or TALLY_PROBE_LISTEN").await?),
        None => None,
    };
    // The peer port serves first: siblings answer an announce by fetching.
    let (stop_peers, peers_stopped) = oneshot::channel::<()>();
    let app = Arc::new(App {
        pod: identity.pod.clone(),
        store: store.clone(),
        cluster: cluster.clone(),
        metrics,
        clock: http::page::Clock::new(config.timezone.clone()),
        peer_token: token,
        peer_gate: PeerGate::default(),
        stopping: AtomicBool::new(false),
        joining: AtomicBool::new(true),
        page: http::page::Template::new(&identity.pod),
    });
    let limits = server::Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        grace: config.shutdown_grace,
        keep_alive: true,
    };
    // Probes answer from the start to the end: liveness must hold while
    // the pod joins and while it drains.
    let (stop_probes, probes_stopped) = oneshot::channel::<()>();
    let probe_addr = probe_listener
        .as_ref()
        .map(|(_, addr)| addr.to_string())
        .unwrap_or_default();
    let probes = probe_listener.map(|(listener, _)| {
        tokio::spawn(server::serve(
            listener,
            Edge::new(app.clone(), Port::Probe, config.request_timeout),
            server::Limits {
                max_connections: server::PROBE_MAX_CONNECTIONS,
                keep_alive: false,
                ..limits
            },
            async {
                let _ = probes_stopped.await;
            },
        ))
    });
    let siblings = tokio::spawn(server::serve(
        peer_listener,
        Edge::new(app.clone(), Port::Peer, config.request_timeout),
        limits,
        async {
            let _ = peers_stopped.await;
        },
    ));
    // Before the first visit is served: siblings whose DNS answer is still
    // cached without this pod count it from now on (design.md §5); until
    // one took it, no visit is served (nobody would count it). A shutdown
    // signal meanwhile stops the pod without ever serving clients.
    let mut signal = std::pin::pin!(shutdown::signal_received());
    let early = tokio::select! {
        () = cluster.join(peer_addr) => None,
        signal = &mut signal => Some(signal),
    };
    app.joining.store(false, Ordering::Relaxed);
    let background = cluster.spawn_background(config.refresh_interval);
    tracing::info!(
        %addr,
        %peer_addr,
        probe_addr,
        pod = %identity.pod,
        incarnation = %store.incarnation(),
        count = store.count(),
        durability = config.durability.as_str(),
        peers = identity.member.as_ref().map(|m| m.srv_name()).unwrap_or_default(),
        "listening"
    );
    let (stop_clients, clients_stopped) = oneshot::channel::<()>();
    let clients = early.is_none().then(|| {
        tokio::spawn(server::serve(
            listener,
            Edge::new(app.clone(), Port::Client, config.request_timeout),
            limits,
            async {
                let _ = clients_stopped.await;
            },
        ))
    });

    let signal = match early {
        Some(signal) => signal,
        None => signal.await,
    };
    // 1. Fail readiness and keep serving for the delay (SIGTERM only:
    //    Kubernetes needs a moment to take the pod out of the Service;
    //    Ctrl-C does not).
    app.stopping.store(true, Ordering::Relaxed);
    if signal == "SIGTERM" && clients.is_some() && !config.shutdown_delay.is_zero() {
        tracing::info!(
            signal,
            delay_ms = config.shutdown_delay.as_millis() as u64,
            "shutdown requested: readiness fails, still serving"
        );
        tokio::time::sleep(config.shutdown_delay).await;
    } else {
        tracing::info!(signal, "shutdown requested");
    }
    // 2. Drain the clients and freeze the count: queued visits commit,
    //    later ones get 503.
    let _ = stop_clients.send(());
    let clients_drained = match clients {
        Some(clients) => clients.await.unwrap_or(false),
        None => true,
    };
    store.close().await;
    // 3. Hand the final state to the siblings, while this pod's own peer
    //    port still takes theirs.
    cluster.goodbye().await;
    // 4. Close the peer port and drain it: after this no hand-over can
    //    arrive, so the last one has been received.
    let _ = stop_peers.send(());
    let peers_drained = siblings.await.unwrap_or(false);
    // 5. The final persist, by the only writer left: after the last
    //    hand-over, and after the background persister stopped.
    background.stop().await;
    let persisted = cluster.persist().await;
    let _ = stop_probes.send(());
    if let Some(probes) = probes {
        let _ = probes.await;
    }
    tracing::info!(
        count = store.count(),
        drained = clients_drained && peers_drained,
        persisted,
        "stopped"
    );
    Ok(())
}

/// Binds a listener; the error names the setting to change.
async fn bind(
    addr: SocketAddr,
    setting: &'static str,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let error = |source| StartError::Listen {
        addr,
        setting,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}
