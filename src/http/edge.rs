//! What both ports share at the HTTP edge, on hyper directly: the route
//! table, `404`, `405` with `Allow`, `413` for bodies a route does not take,
//! the request time limit, the request metrics, and the response body.
//!
//! Not a framework router: every route is a fixed path, and the layers a
//! framework stacks per request were most of the cost of a request (callgrind,
//! one keep-alive connection, instructions per `GET /healthz`: bare hyper
//! 8,452; with axum's router 12,710; with the four layers tally used,
//! 24,312). Here a request costs one lookup in a short table, one clock
//! read and one histogram observation beyond hyper's own work.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use super::App;
use crate::metrics::RouteLabels;

/// Every response tally sends.
pub type Response = http::Response<Chunks>;

/// A route: a fixed path and the methods it answers.
#[derive(Debug)]
pub struct Route {
    pub path: &'static str,
    /// The methods, as the `Allow` header of a `405` lists them. `GET`
    /// routes answer `HEAD` too (hyper leaves the body out).
    pub allow: &'static str,
}

impl Route {
    /// A route answering `GET` (and so `HEAD`).
    pub const fn get(path: &'static str) -> Route {
        Route {
            path,
            allow: "GET,HEAD",
        }
    }

    pub fn allows(&self, method: &Method) -> bool {
        self.allow.split(',').any(|m| m == method.as_str())
    }
}

/// The address a request came from, a request extension the accept loop
/// sets: the peer port limits each sender's share of its body budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sender(pub std::net::IpAddr);

/// Which port an [`Edge`] serves.
#[derive(Debug, Clone, Copy)]
pub enum Port {
    Client,
    Peer,
    /// Kubelet's probes only ([`super::PROBE_ROUTES`]).
    Probe,
}

impl Port {
    fn routes(self) -> &'static [Route] {
        match self {
            Port::Client => super::CLIENT_ROUTES,
            Port::Peer => super::peer::PEER_ROUTES,
            Port::Probe => super::PROBE_ROUTES,
        }
    }
}

/// One port's request handling, shared by all its connections.
pub struct Edge {
    app: Arc<App>,
    port: Port,
    request_timeout: Duration,
    /// The latency histogram of each route's `200`s, looked up once: the
    /// metric family's lookup (a lock and a hash) on every request cost as
    /// much as the rest of a cheap route.
    ok_durations: Box<[OnceLock<Histogram>]>,
}

impl Edge {
    pub fn new(app: Arc<App>, port: Port, request_timeout: Duration) -> Arc<Edge> {
        Arc::new(Edge {
            app,
            port,
            request_timeout,
            ok_durations: port.routes().iter().map(|_| OnceLock::new()).collect(),
        })
    }

    /// Answers one request.
    pub async fn serve(
        self: Arc<Self>,
        request: http::Request<Incoming>,
    ) -> Result<Response, Infallible> {
        let started = Instant::now();
        let routes = self.port.routes();
        let found = routes.iter().position(|r| r.path == request.uri().path());
        let route = found.map(|i| &routes[i]);
        let response = match self.port {
            Port::Client => super::client(&self.app, route, request, self.request_timeout).await,
            Port::Peer => {
                within(
                    self.request_timeout,
                    super::peer::handle(&self.app, route, request),
                )
                .await
            }
            Port::Probe => super::probe(&self.app, route, request.method()),
        };
        self.observe(found, response.status(), started.elapsed());
        Ok(response)
    }

    /// Records the request's duration by route and status; the route is
    /// one of the port's, or `unmatched`: never a label made from what a
    /// client sent.
    fn observe(&self, found: Option<usize>, status: StatusCode, took: Duration) {
        let family = &self.app.metrics.http_duration;
        let labels = |route: &'static str| RouteLabels {
            route: route.into(),
            status: status.as_u16(),
        };
        let routes = self.port.routes();
        match found {
            Some(i) if status == StatusCode::OK => self.ok_durations[i]
                .get_or_init(|| family.get_or_create(&labels(routes[i].path)).clone())
                .observe(took.as_secs_f64()),
            Some(i) => family
                .get_or_create(&labels(routes[i].path))
                .observe(took.as_secs_f64()),
            None => family
                .get_or_create(&labels("unmatched"))
                .observe(took.as_secs_f64()),
        }
    }
}

/// `handler`'s response, or `408` once `limit` passes (for handlers that
/// wait on something outside this process: a body, the siblings).
pub async fn within(limit: Duration, handler: impl Future<Output = Response>) -> Response {
    tokio::time::timeout(limit, handler)
        .await
        .unwrap_or_else(|_| {
            text(
                StatusCode::REQUEST_TIMEOUT,
                "the request took longer than request_timeout_ms\n",
            )
        })
}

/// Whether the request declares a body.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// `413` for a body the route does not take: reading it would only cost
/// memory.
pub fn body_refused() -> Response {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request bodies are not accepted\n",
    )
}

/// `405` naming the methods `route` answers.
pub fn method_not_allowed(route: &Route) -> Response {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: see the Allow header\n",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(route.allow));
    response
}

/// A response with a body of type `content_type`.
pub fn with_type(status: StatusCode, content_type: &'static str, body: Chunks) -> Response {
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response {
    with_type(status, "text/plain; charset=utf-8", Chunks::one(body))
}

/// A `200` JSON response.
pub fn json(value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("tally's JSON types serialise");
    with_type(StatusCode::OK, "application/json", Chunks::one(body))
}

/// A response with no body.
pub fn empty(status: StatusCode) -> Response {
    let mut response = http::Response::new(Chunks::default());
    *response.status_mut() = status;
    response
}

/// A response body of up to three buffers, handed to the socket as they
/// are (no copy into one): the page's shared head and tail around the
/// request's own part, or one buffer. Its exact length makes the
/// `Content-Length`.
#[derive(Debug, Default)]
pub struct Chunks {
    parts: [Bytes; 3],
    next: usize,
}

impl Chunks {
    pub fn one(body: impl Into<Bytes>) -> Chunks {
        Chunks::three(body.into(), Bytes::new(), Bytes::new())
    }

    pub fn three(first: Bytes, second: Bytes, third: Bytes) -> Chunks {
        Chunks {
            parts: [first, second, third],
            next: 0,
        }
    }

    /// The whole body (tests).
    #[cfg(test)]
    pub(crate) fn text(&self) -> String {
        self.parts
            .iter()
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect()
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        while self.next < self.parts.len() {
            let i = self.next;
            self.next += 1;
            let part = std::mem::take(&mut self.parts[i]);
            if !part.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.parts[self.next..].iter().all(Bytes::is_empty)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.parts[self.next..].iter().map(|p| p.len() as u64).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_routes_answer_head_and_nothing_unlisted() {
        let route = Route {
            path: "/x",
            allow: "GET,HEAD,PUT",
        };
        for method in [Method::GET, Method::HEAD, Method::PUT] {
            assert!(route.allows(&method), "{method}");
        }
        for method in [Method::POST, Method::DELETE, Method::OPTIONS] {
            assert!(!route.allows(&method), "{method}");
        }
        let response = method_not_allowed(&route);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET,HEAD,PUT");
    }

    #[test]
    fn a_body_is_declared_by_a_length_above_zero_or_chunked() {
        let mut headers = HeaderMap::new();
        assert!(!has_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert!(!has_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(has_body(&headers));
        let mut chunked = HeaderMap::new();
        chunked.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(has_body(&chunked));
    }

    #[test]
    fn chunks_are_sent_in_order_with_their_exact_length() {
        let body = Chunks::three(Bytes::from("ab"), Bytes::new(), Bytes::from("cde"));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.text(), "abcde");
        assert!(Chunks::default().is_end_stream());
    }
}
