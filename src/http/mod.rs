//! The HTTP API (design.md §2): the client port's routes and handlers; the
//! peer port's are in [`peer`], what both share in [`edge`].
//!
//! Only `GET /` counts. `HEAD /`, probes, `/favicon.ico`, `/metrics` and
//! peer traffic never do. Unknown paths get 404, wrong methods 405 with
//! `Allow`, both with a short body; requests with a body get 413.

pub mod edge;
pub mod page;
pub mod peer;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::media;
use crate::metrics::Metrics;
use crate::peers::Cluster;
use crate::store::{Store, StoreError};
use edge::{
    Chunks, Response, Route, body_refused, empty, json, method_not_allowed, text, with_type, within,
};

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
/// the peer port, [`peer::PEER_ROUTES`]).
pub const CLIENT_ROUTES: &[Route] = &[
    Route::get("/"),
    Route::get("/visits/local"),
    Route::get("/visits"),
    Route::get("/visits/total"),
    Route::get("/healthz"),
    Route::get("/health"),
    Route::get("/readyz"),
    Route::get("/metrics"),
    Route::get("/favicon.ico"),
];

/// The probe port's routes (`probe_listen`): what kubelet asks, nothing
/// else, on a listener of its own so that no flood of the client or peer
/// port can make a probe fail and restart a healthy pod.
pub const PROBE_ROUTES: &[Route] = &[
    Route::get("/healthz"),
    Route::get("/health"),
    Route::get("/readyz"),
];

/// The probe port: no route takes a body or waits on anything.
fn probe(app: &App, route: Option<&Route>, method: &Method) -> Response {
    let Some(route) = route else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the probe port serves /healthz and /readyz only\n",
        );
    };
    if !route.allows(method) {
        return method_not_allowed(route);
    }
    match route.path {
        "/readyz" => readyz(app),
        _ => healthz(),
    }
}

/// The client port: no route takes a body, so one is refused before
/// anything else. `GET /` needs no time limit of its own: the store gives
/// up after `commit_timeout_ms`, which the configuration keeps below
/// `request_timeout_ms`; `/visits/total` waits on siblings and gets one.
async fn client(
    app: &Arc<App>,
    route: Option<&Route>,
    request: http::Request<Incoming>,
    request_timeout: Duration,
) -> Response {
    if edge::has_body(request.headers()) {
        return body_refused();
    }
    let Some(route) = route else {
        return text(StatusCode::NOT_FOUND, "not found: try / or /visits/total\n");
    };
    let method = request.method();
    if !route.allows(method) {
        return method_not_allowed(route);
    }
    let query = request.uri().query();
    let answer = match route.path {
        "/" if method == Method::HEAD => Ok(head_root()),
        "/" => visit(app, &request).await,
        "/visits/local" | "/visits" => local(app, query),
        "/visits/total" => match wants_text(query) {
            Ok(as_text) => Ok(within(request_timeout, total(app, as_text)).await),
            Err(error) => Err(error),
        },
        "/healthz" | "/health" => Ok(healthz()),
        "/readyz" => Ok(readyz(app)),
        "/metrics" => Ok(metrics(app)),
        "/favicon.ico" => Ok(empty(StatusCode::NO_CONTENT)),
        other => Err(ApiError::BadRequest(format!("{other} has no handler"))),
    };
    answer.unwrap_or_else(ApiError::response)
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

impl ApiError {
    fn response(self) -> Response {
        // Not logged here: client mistakes are not errors of ours, and the
        // store already logged why it is unavailable.
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) | ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        let mut response = text(status, format!("{self}\n"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Nothing was counted or taken: safe to retry, after a moment.
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

/// `?format=text` → bare number; absent or `format=json` → JSON. Other
/// parameters are ignored.
fn wants_text(query: Option<&str>) -> Result<bool, ApiError> {
    let mut format = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key == "format" && format.replace(value).is_some() {
            return Err(ApiError::BadRequest(
                "format is given twice: give it once, format=text or format=json".into(),
            ));
        }
    }
    match format.as_deref() {
        None | Some("json") => Ok(false),
        Some("text") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "unknown format {other:?}: use format=text or format=json"
        ))),
    }
}

fn number_or_json(as_text: bool, n: u64, value: &impl Serialize) -> Response {
    if as_text {
        let mut line = itoa(n);
        line.push('\n');
        text(StatusCode::OK, line)
    } else {
        json(value)
    }
}

/// `n` in decimal, without the formatting machinery (the hot paths).
fn itoa(n: u64) -> String {
    let mut out = String::with_capacity(21);
    page::push_u64(&mut out, n);
    out
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

/// `GET /visits/local` as JSON.
#[derive(Serialize)]
struct LocalJson<'a> {
    pod: &'a str,
    incarnation: &'a str,
    count: u64,
}

/// Counts a visit. The cluster part comes from the last snapshot with this
/// visit's count patched in, never from a view built per visit.
async fn visit(app: &App, request: &http::Request<Incoming>) -> Result<Response, ApiError> {
    let count = app.store.visit().await?;
    let cluster = app.cluster.snapshot();
    let total = cluster.total_with(count);
    app.metrics.total.set(total as i64);
    let time = app.clock.now();
    let as_json = request
        .headers()
        .get(header::ACCEPT)
        .is_some_and(|v| media::prefers(v.as_bytes(), "application/json", "text/html"));
    Ok(if as_json {
        json(&VisitJson {
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
    } else {
        let html = app.page.render(&page::Visit {
            incarnation: app.store.incarnation(),
            count,
            time: &time,
            cluster: &cluster,
        });
        with_type(StatusCode::OK, HTML, html)
    })
}

const HTML: &str = "text/html; charset=utf-8";

/// `HEAD /` answers like `GET /` would, without counting.
fn head_root() -> Response {
    with_type(StatusCode::OK, HTML, Chunks::default())
}

fn local(app: &App, query: Option<&str>) -> Result<Response, ApiError> {
    let as_text = wants_text(query)?;
    let count = app.store.count();
    Ok(number_or_json(
        as_text,
        count,
        &LocalJson {
            pod: &app.pod,
            incarnation: app.store.incarnation(),
            count,
        },
    ))
}

async fn total(app: &App, as_text: bool) -> Response {
    let view = app.cluster.total().await;
    number_or_json(as_text, view.total, &view)
}

fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

fn readyz(app: &App) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    if app.stopping.load(Relaxed) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        );
    }
    if app.joining.load(Relaxed) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no sibling has taken this pod's announce yet (DNS failing, or its addresses stale); visits wait until one does, see the log\n",
        );
    }
    match app.store.health().and_then(|()| app.cluster.health()) {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(reason) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

fn metrics(app: &App) -> Response {
    app.store.update_gauges();
    with_type(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        Chunks::one(app.metrics.encode()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visit_not_recorded_is_503_with_retry_after() {
        for error in [
            StoreError::Stalled("no commit within 2000 ms (hung disk?)".into()),
            StoreError::Unavailable("cannot write visits.state: disk full".into()),
        ] {
            let response = ApiError::from(error).response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        }
        let response = ApiError::BadRequest("x".into()).response();
        assert!(!response.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn the_format_parameter_is_text_json_or_absent() {
        assert!(!wants_text(None).unwrap());
        assert!(!wants_text(Some("format=json")).unwrap());
        assert!(wants_text(Some("format=text")).unwrap());
        assert!(wants_text(Some("x=1&format=te%78t")).unwrap());
        assert!(!wants_text(Some("formats=text&")).unwrap());
        for bad in ["format=xml", "format=", "format=text&format=json"] {
            let Err(ApiError::BadRequest(why)) = wants_text(Some(bad)) else {
                panic!("{bad} accepted");
            };
            assert!(why.contains("format=text or format=json"), "{why}");
        }
    }
}
