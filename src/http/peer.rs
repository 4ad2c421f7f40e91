//! The peer port (design.md §2): what siblings call, and the probes.
//!
//! Kept apart from the client port (etcd's 2379/2380) so that client load
//! cannot starve the peer routes or fail liveness, and so that only pods of
//! the release can reach it (NetworkPolicy). A request is admitted in this
//! order, each step before the next costs anything: the token (before a
//! single body byte is read), a slot among [`MAX_PEER_REQUESTS`], then,
//! as body bytes arrive, a share of the body budget ([`PEER_BODY_BUDGET`])
//! for what was actually read: a slow sender holds only what it sent, and
//! one sender (by address) never more than [`MAX_PEER_BODY`] of it, so a
//! few slow bodies cannot keep honest hand-overs out. Whatever does not
//! fit is refused at once (503 with `Retry-After`) rather than queued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::edge::{
    self, Chunks, Response, Route, Sender, body_refused, empty, method_not_allowed, text, with_type,
};
use super::{ApiError, App, healthz, readyz};
use crate::merge::Key;
use crate::peers::delta;
use crate::peers::wire::{Encoding, FORGET_PATH, MAX_PEER_BODY, PEER_PATH};

/// Most peer requests served at once; a pod has one request in flight per
/// sibling (fan-out) plus hand-overs, so this is far above honest use.
pub const MAX_PEER_REQUESTS: usize = 64;
/// Bytes of peer request bodies held in memory at once, all senders
/// together: four largest legal states.
pub const PEER_BODY_BUDGET: usize = 4 * MAX_PEER_BODY;
/// Budget accounting unit (semaphore permits are `u32`).
const BUDGET_UNIT: usize = 1024;

/// The peer port's admission control, shared by all its connections.
pub struct PeerGate {
    /// One permit per peer request in flight.
    requests: Arc<Semaphore>,
    /// One permit per [`BUDGET_UNIT`] of body read and held.
    budget: Arc<Semaphore>,
    /// Units each sender holds now (entries removed at 0).
    held: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Default for PeerGate {
    fn default() -> Self {
        PeerGate {
            requests: Arc::new(Semaphore::new(MAX_PEER_REQUESTS)),
            budget: Arc::new(Semaphore::new(PEER_BODY_BUDGET / BUDGET_UNIT)),
            held: Arc::default(),
        }
    }
}

/// What one body holds of the budget; given back when dropped.
struct BodyShare {
    sender: Option<IpAddr>,
    permit: Option<OwnedSemaphorePermit>,
    units: u32,
    held: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl BodyShare {
    /// Grows the share to cover `bytes` read so far, or says why not.
    fn cover(&mut self, budget: &Arc<Semaphore>, bytes: usize) -> Result<(), ApiError> {
        let units = bytes.div_ceil(BUDGET_UNIT) as u32;
        let more = units.saturating_sub(self.units);
        if more == 0 {
            return Ok(());
        }
        if let Some(sender) = self.sender {
            let mut held = self.held.lock().expect("poisoned");
            let mine = held.entry(sender).or_default();
            if (*mine + more) as usize * BUDGET_UNIT > MAX_PEER_BODY {
                return Err(ApiError::Busy(
                    "this sender's share of the peer body budget is in use",
                ));
            }
            *mine += more;
        }
        let grown = budget.clone().try_acquire_many_owned(more);
        let Ok(grown) = grown else {
            self.release_sender(more);
            return Err(ApiError::Busy("peer body budget in use"));
        };
        match &mut self.permit {
            Some(permit) => permit.merge(grown),
            None => self.permit = Some(grown),
        }
        self.units = units;
        Ok(())
    }

    fn release_sender(&self, units: u32) {
        let Some(sender) = self.sender else { return };
        let mut held = self.held.lock().expect("poisoned");
        if let Some(mine) = held.get_mut(&sender) {
            *mine -= units.min(*mine);
            if *mine == 0 {
                held.remove(&sender);
            }
        }
    }
}

impl Drop for BodyShare {
    fn drop(&mut self) {
        self.release_sender(self.units);
    }
}

impl PeerGate {
    fn request_slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy("too many peer requests at once"))
    }

    /// An empty share of the budget for a body from `sender`.
    fn body_share(&self, sender: Option<IpAddr>) -> BodyShare {
        BodyShare {
            sender,
            permit: None,
            units: 0,
            held: self.held.clone(),
        }
    }
}

/// The peer port's routes.
pub const PEER_ROUTES: &[Route] = &[
    Route {
        path: PEER_PATH,
        allow: "GET,HEAD,PUT",
    },
    Route {
        path: FORGET_PATH,
        allow: "POST",
    },
    Route::get("/healthz"),
    Route::get("/health"),
    Route::get("/readyz"),
];

/// The peer port. On the peer routes the token comes first, then a
/// request slot: an outsider cannot even take a slot, nor learn which
/// methods a route answers.
pub(super) async fn handle(
    app: &Arc<App>,
    route: Option<&Route>,
    request: http::Request<Incoming>,
) -> Response {
    let Some(route) = route else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the peer port serves /peer/state, /healthz and /readyz; clients use the client port\n",
        );
    };
    let peer_route = route.path == PEER_PATH || route.path == FORGET_PATH;
    let _slot = if peer_route {
        match authorize(app, request.headers()).and_then(|()| app.peer_gate.request_slot()) {
            Ok(slot) => Some(slot),
            Err(error) => return refuse(app, error),
        }
    } else {
        None
    };
    let method = request.method().clone();
    if !route.allows(&method) {
        return method_not_allowed(route);
    }
    let takes_body = method == Method::PUT || method == Method::POST;
    if !takes_body && edge::has_body(request.headers()) {
        return body_refused();
    }
    match route.path {
        PEER_PATH if method == Method::PUT => receive_state(app, request).await,
        PEER_PATH => peer_state(app, &request),
        FORGET_PATH => forget(app, request).await,
        "/readyz" => readyz(app),
        _ => healthz(),
    }
}

/// The token check, in constant time.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &app.peer_token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if bool::from(presented.ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        app.metrics.peer_auth_failures.inc();
        Err(ApiError::Unauthorized)
    }
}

fn refuse(app: &App, error: ApiError) -> Response {
    if let ApiError::Busy(_) = error {
        app.metrics.refusal("busy");
    }
    error.response()
}

/// Everything this pod knows; with `?since=<cursor>` only what changed
/// since (always with this pod's own entry), and the cursor for the next
/// fetch in the `tally-cursor` header ([`delta`]).
/// Siblings ask for the [`compact`](crate::peers::compact) form; anyone
/// else (`curl`) gets JSON.
fn peer_state(app: &App, request: &http::Request<Incoming>) -> Response {
    let uri = request.uri();
    let (state, cursor) = match delta::since(uri.query()) {
        Some(since) => {
            let (state, cursor) = app.cluster.peer_delta(since, delta::have(uri.query()));
            (state, HeaderValue::try_from(cursor.to_string()).ok())
        }
        None => (app.cluster.peer_state(), None),
    };
    let encoding = Encoding::accepted(
        request
            .headers()
            .get(header::ACCEPT)
            .map(HeaderValue::as_bytes),
    );
    let body = encoding.encode(&state);
    app.metrics.peer_served.inc();
    app.metrics.peer_bytes_served.inc_by(body.len() as u64);
    let mut response = with_type(StatusCode::OK, encoding.content_type(), Chunks::one(body));
    if let Some(cursor) = cursor {
        response.headers_mut().insert(delta::CURSOR_HEADER, cursor);
    }
    response
}

/// A sibling's state handed over (`PUT`): on its way out, or a retirement
/// spreading. The body is read only within its share of the budget. The
/// `204` says the state is on this pod's volume (`peers.state` synced): a
/// pod that leaves may count on it, so a write that fails or takes past
/// the fan-out deadline answers 503 and the sender tells another sibling.
async fn receive_state(app: &App, request: http::Request<Incoming>) -> Response {
    let received = async {
        let body = read_body(app, request).await?;
        app.cluster
            .receive(&body)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        app.cluster
            .durable()
            .await
            .map_err(|reason| ApiError::Unavailable(format!("not on disk yet: {reason}")))
    };
    match received.await {
        Ok(()) => empty(StatusCode::NO_CONTENT),
        Err(error) => refuse(app, error),
    }
}

/// `tally forget`: retires a counter cluster-wide (body: `{"pod","incarnation"}`).
async fn forget(app: &App, request: http::Request<Incoming>) -> Response {
    let retired = async {
        let body = read_body(app, request).await?;
        let key: Key = serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!("expected {{\"pod\":…,\"incarnation\":…}}: {e}"))
        })?;
        app.cluster
            .forget(key)
            .await
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    };
    match retired.await {
        Ok(retired) => edge::json(&retired),
        Err(error) => refuse(app, error),
    }
}

/// Reads a peer body within its share of the budget.
async fn read_body(app: &App, request: http::Request<Incoming>) -> Result<bytes::Bytes, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| ApiError::BadRequest("Content-Length is not a number".into()))
        })
        .transpose()?;
    if declared.is_some_and(|n| n > MAX_PEER_BODY) {
        app.metrics.refusal("too_large");
        return Err(ApiError::TooLarge(MAX_PEER_BODY));
    }
    let limit = declared.unwrap_or(MAX_PEER_BODY);
    let sender = request.extensions().get::<Sender>().map(|s| s.0);
    let mut share = app.peer_gate.body_share(sender);
    let mut body = request.into_body();
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if read.len() + data.len() > limit {
            app.metrics.refusal("too_large");
            return Err(ApiError::TooLarge(limit));
        }
        // Held before it is kept: what is read never exceeds the share.
        share.cover(&app.peer_gate.budget, read.len() + data.len())?;
        read.extend_from_slice(&data);
    }
    Ok(read.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share holds what was read, one sender never more than one
    /// largest body, and everything held is given back when it ends.
    #[test]
    fn a_body_holds_what_was_read_within_its_senders_share() {
        let gate = PeerGate::default();
        let units = |gate: &PeerGate| gate.budget.available_permits() * BUDGET_UNIT;
        let slow: IpAddr = "10.0.0.66".parse().unwrap();
        // Four slow bodies from one sender hold what they sent: a few bytes.
        let mut slow_bodies: Vec<BodyShare> = (0..4).map(|_| gate.body_share(Some(slow))).collect();
        for share in &mut slow_bodies {
            share.cover(&gate.budget, 10).unwrap();
        }
        assert_eq!(units(&gate), PEER_BODY_BUDGET - 4 * BUDGET_UNIT);
        // That sender cannot take more than one largest body in all.
        let err = slow_bodies[0]
            .cover(&gate.budget, MAX_PEER_BODY)
            .unwrap_err();
        assert!(matches!(err, ApiError::Busy(_)), "{err}");
        // An honest sender's largest hand-over still fits.
        let honest: IpAddr = "10.0.0.7".parse().unwrap();
        let mut hand_over = gate.body_share(Some(honest));
        hand_over.cover(&gate.budget, MAX_PEER_BODY).unwrap();
        drop(hand_over);
        drop(slow_bodies);
        assert_eq!(units(&gate), PEER_BODY_BUDGET, "everything given back");
        assert!(gate.held.lock().unwrap().is_empty());
    }
}
