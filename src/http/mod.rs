//! The HTTP API (design.md §2): the router, its handlers and middleware.
//!
//! Only `GET /` counts. `HEAD /`, probes, `/favicon.ico`, `/metrics` and
//! peer traffic never do. Unknown paths get 404, wrong methods 405 with
//! `Allow`, both with a short body; requests with a body get 413.

pub mod page;
pub mod peer;
pub mod server;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tower_http::timeout::TimeoutLayer;

use crate::metrics::{Metrics, RouteLabels};
use crate::peers::Cluster;
use crate::store::{Store, StoreError};

/// What every handler needs.
pub struct App {
    /// This pod's name.
    pub pod: String,
    pub store: Store,
    pub cluster: Cluster,
    pub metrics: Arc<Metrics>,
    /// The time on the page, in its zone.
    pub clock: page::Clock,
    /// Token the peer routes require, if any.
    pub peer_token: Option<String>,
    /// Admission control of the peer port.
    pub peer_gate: peer::PeerGate,
    /// Set on SIGTERM: readiness fails so the pod leaves the Service.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Set at start until a sibling took this pod's announce: it serves no
    /// visit yet, and readiness says why.
    pub joining: std::sync::atomic::AtomicBool,
    /// The page's fixed parts, rendered once.
    pub page: page::Template,
}

/// The client port's routes: everything but the peer routes (those are on
/// the peer port, [`peer::router`]).
pub fn router(app: Arc<App>, request_timeout: Duration) -> Router {
    let routes = Router::new()
        .route("/", get(visit).head(head_root))
        .route("/visits/local", get(local))
        .route("/visits", get(local))
        .route("/visits/total", get(total))
        .route("/healthz", get(healthz))
        .route("/health", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try / or /visits/total\n") });
    edge(routes, ROUTE_LABELS, true, app, request_timeout)
}

/// What both ports wrap their routes in: the request metrics (labelled with
/// `labels`, the port's routes), the request time limit, `405` with
/// `Allow`, and (`no_bodies`) `413` for any request with a body. Wrapped
/// around the whole router, so once per request: a layer added with
/// `Router::layer` wraps every route in its own boxed service, and each
/// request cloned (allocated) one per layer.
fn edge(
    routes: Router<Arc<App>>,
    labels: &'static [&'static str],
    no_bodies: bool,
    app: Arc<App>,
    request_timeout: Duration,
) -> Router {
    let stack = tower::ServiceBuilder::new()
        .layer(middleware::from_fn_with_state(
            (app.clone(), labels),
            observe,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(middleware::from_fn(explain_405))
        .option_layer(no_bodies.then(|| middleware::from_fn(refuse_bodies)))
        .service(routes.with_state(app));
    Router::new().fallback_service(stack)
}

/// A client error or an unavailable store, as a response.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("missing or wrong peer token")]
    Unauthorized,
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("busy: {0}; retry later")]
    Busy(&'static str),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Not logged here: client mistakes are not errors of ours, and the
        // store already logged why it is unavailable.
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy(_) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    format!("{self}\n"),
                )
                    .into_response();
            }
        };
        let mut response = (status, format!("{self}\n")).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // The visit was not counted: safe to retry, after a moment.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

#[derive(Debug, Deserialize)]
struct FormatParam {
    format: Option<String>,
}

/// `?format=text` → bare number; absent or `json` → JSON.
fn wants_text(param: &FormatParam) -> Result<bool, ApiError> {
    match param.format.as_deref() {
        None | Some("json") => Ok(false),
        Some("text") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "unknown format {other:?}: use format=text or format=json"
        ))),
    }
}

fn number_or_json(text: bool, n: u64, json: serde_json::Value) -> Response {
    if text {
        (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{n}\n"),
        )
            .into_response()
    } else {
        axum::Json(json).into_response()
    }
}

/// `GET /` as JSON.
#[derive(Serialize)]
struct VisitJson<'a> {
    pod: &'a str,
    incarnation: &'a str,
    count: u64,
    time: &'a str,
    timezone: &'a str,
    cluster: ClusterJson,
}

#[derive(Serialize)]
struct ClusterJson {
    total: u64,
    complete: bool,
    members: usize,
}

/// Takes the request itself, not a `HeaderMap`: that extractor clones every
/// header, on the path every counted visit takes. The cluster part comes
/// from the last snapshot with this visit's count patched in, never from a
/// view built per visit.
async fn visit(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    let headers = request.headers();
    let count = app.store.visit().await?;
    let cluster = app.cluster.snapshot();
    let total = cluster.total_with(count);
    app.metrics.total.set(total as i64);
    let time = app.clock.now();
    let json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    Ok(if json {
        axum::Json(VisitJson {
            pod: &app.pod,
            incarnation: app.store.incarnation(),
            count,
            time: &time,
            timezone: app.clock.zone_name(),
            cluster: ClusterJson {
                total,
                complete: cluster.view.complete,
                members: cluster.view.members,
            },
        })
        .into_response()
    } else {
        let html = app.page.render(&page::Visit {
            incarnation: app.store.incarnation(),
            count,
            time: &time,
            cluster: &cluster,
        });
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            Body::new(html),
        )
            .into_response()
    })
}

/// `HEAD /` answers like `GET /` would, without counting.
async fn head_root() -> impl IntoResponse {
    [(header::CONTENT_TYPE, "text/html; charset=utf-8")]
}

async fn local(
    State(app): State<Arc<App>>,
    Query(format): Query<FormatParam>,
) -> Result<Response, ApiError> {
    let count = app.store.count();
    Ok(number_or_json(
        wants_text(&format)?,
        count,
        serde_json::json!({"pod": app.pod, "incarnation": app.store.incarnation(), "count": count}),
    ))
}

async fn total(
    State(app): State<Arc<App>>,
    Query(format): Query<FormatParam>,
) -> Result<Response, ApiError> {
    let text = wants_text(&format)?;
    let view = app.cluster.total().await;
    Ok(number_or_json(
        text,
        view.total,
        serde_json::to_value(&view).expect("view serialises"),
    ))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
            .into_response();
    }
    if app.joining.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no sibling has taken this pod's announce yet (DNS failing, or its addresses stale); visits wait until one does, see the log\n",
        )
            .into_response();
    }
    match app.store.health() {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.store.update_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

/// Refuses request bodies: no route takes one, and reading them would only
/// cost memory.
async fn refuse_bodies(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request bodies are not accepted\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Gives axum's bare 405 (which already carries `Allow`) a short body.
async fn explain_405(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(
        parts,
        Body::from("method not allowed: see the Allow header\n"),
    )
}

/// The client port's routes: the labels of its request metrics.
const ROUTE_LABELS: &[&str] = &[
    "/",
    "/visits/local",
    "/visits",
    "/visits/total",
    "/healthz",
    "/health",
    "/readyz",
    "/metrics",
    "/favicon.ico",
];

/// The route `path` is, among a port's `labels` (every route is a fixed
/// path), or `unmatched`: never a label made from what a client sent.
fn route_label(labels: &'static [&'static str], path: &str) -> Cow<'static, str> {
    Cow::Borrowed(
        labels
            .iter()
            .find(|&&label| label == path)
            .copied()
            .unwrap_or("unmatched"),
    )
}

/// Records the request duration by route and status.
async fn observe(
    State((app, labels)): State<(Arc<App>, &'static [&'static str])>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(labels, request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    app.metrics
        .http_duration
        .get_or_create(&RouteLabels {
            route,
            status: response.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_the_ports_routes_never_what_a_client_sent() {
        assert_eq!(route_label(ROUTE_LABELS, "/"), "/");
        assert_eq!(route_label(ROUTE_LABELS, "/visits/total"), "/visits/total");
        for path in ["/nope", "/peer/state", "", "/visits/"] {
            assert_eq!(route_label(ROUTE_LABELS, path), "unmatched", "{path}");
        }
    }

    #[test]
    fn a_visit_not_recorded_is_503_with_retry_after() {
        for error in [
            StoreError::Stalled("no commit within 2000 ms (hung disk?)".into()),
            StoreError::Unavailable("cannot write visits.state: disk full".into()),
        ] {
            let response = ApiError::from(error).into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        }
        let response = ApiError::BadRequest("x".into()).into_response();
        assert!(!response.headers().contains_key(header::RETRY_AFTER));
    }
}
