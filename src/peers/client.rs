//! The HTTP client siblings use to fetch each other's state: pooled
//! keep-alive connections, a time limit covering connect, headers and body
//! (a slow drip cannot hold a fan-out), a body size limit, strict parsing.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::delta::{CURSOR_HEADER, HAVE_PARAM, SINCE_PARAM};
use super::wire::{
    self, ACCEPT_STATE, Encoding, FORGET_PATH, MAX_PEER_BODY, PEER_PATH, PeerState, StateError,
};

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no answer within {0} ms")]
    Timeout(u128),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("answered HTTP {0}")]
    Status(StatusCode),
    #[error("answer larger than {MAX_PEER_BODY} bytes")]
    TooLarge,
    #[error("refused: {0}")]
    Refused(#[from] StateError),
    #[error("refused: {0}")]
    Invalid(String),
}

impl FetchError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Timeout(_) => "timeout",
            FetchError::Connect(_) => "connect",
            FetchError::Status(_) => "status",
            FetchError::TooLarge => "too_large",
            FetchError::Refused(_) => "refused",
            FetchError::Invalid(_) => "invalid",
        }
    }
}

/// Fetches `/peer/state` from siblings.
#[derive(Clone)]
pub struct PeerClient {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `Authorization: Bearer …` value when a peer token is configured.
    authorization: Option<String>,
}

impl PeerClient {
    pub fn new(token: Option<&str>, connect_timeout: Duration) -> PeerClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        PeerClient {
            client,
            authorization: token.map(|t| format!("Bearer {t}")),
        }
    }

    /// One fetch of the full state (plain `GET /peer/state`), bounded by
    /// `limit` from start to the last body byte.
    pub async fn fetch(&self, addr: SocketAddr, limit: Duration) -> Result<PeerState, FetchError> {
        self.fetch_path(addr, limit, PEER_PATH.to_string())
            .await
            .map(|(state, _cursor)| state)
    }

    /// One fetch of what changed since `since`, the cursor of the sibling's
    /// last answer this pod merged (empty: none, send everything), for a
    /// pod whose own state has the digest `have` (see
    /// [`delta`](super::delta)). Returns the state and the cursor for the
    /// next fetch (none from a sibling that does not speak deltas).
    pub async fn fetch_since(
        &self,
        addr: SocketAddr,
        limit: Duration,
        since: &str,
        have: u64,
    ) -> Result<(PeerState, Option<String>), FetchError> {
        // Cursors are `<hex>-<digits>`: nothing to escape in a query string.
        let path = format!("{PEER_PATH}?{SINCE_PARAM}={since}&{HAVE_PARAM}={have:x}");
        self.fetch_path(addr, limit, path).await
    }

    async fn fetch_path(
        &self,
        addr: SocketAddr,
        limit: Duration,
        path: String,
    ) -> Result<(PeerState, Option<String>), FetchError> {
        tokio::time::timeout(limit, self.fetch_unbounded(addr, &path))
            .await
            .unwrap_or(Err(FetchError::Timeout(limit.as_millis())))
    }

    /// Hands this pod's final state to a sibling (`PUT`), so its last
    /// visits are known even if nobody fetched them before it went away.
    pub async fn push(
        &self,
        addr: SocketAddr,
        state: Bytes,
        limit: Duration,
    ) -> Result<(), FetchError> {
        let send = async {
            let response = self.send(http::Method::PUT, addr, PEER_PATH, state).await?;
            match response.status() {
                StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
                status => Err(FetchError::Status(status)),
            }
        };
        tokio::time::timeout(limit, send)
            .await
            .unwrap_or(Err(FetchError::Timeout(limit.as_millis())))
    }

    async fn send(
        &self,
        method: http::Method,
        addr: SocketAddr,
        path: &str,
        body: Bytes,
    ) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(header::ACCEPT, ACCEPT_STATE);
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(value) = &self.authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| FetchError::Connect(e.to_string()))?;
        self.client.request(request).await.map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                message = format!("{message}: {inner}");
                source = inner.source();
            }
            FetchError::Connect(message)
        })
    }

    async fn fetch_unbounded(
        &self,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(PeerState, Option<String>), FetchError> {
        let response = self
            .send(http::Method::GET, addr, path, Bytes::new())
            .await?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(response.status()));
        }
        let cursor = response
            .headers()
            .get(CURSOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let encoding = Encoding::of_content_type(
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .map(http::HeaderValue::as_bytes),
        );
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_PEER_BODY as u64) {
            return Err(FetchError::TooLarge);
        }
        let body = Limited::new(response.into_body(), MAX_PEER_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge
                } else {
                    FetchError::Connect(format!("reading the answer: {e}"))
                }
            })?
            .to_bytes();
        Ok((wire::decode_state(encoding, &body)?, cursor))
    }

    /// `tally forget`: asks the pod at `addr` to retire `counter`; returns
    /// the pod's answer.
    pub async fn forget(
        &self,
        addr: SocketAddr,
        counter: &crate::merge::Key,
        limit: Duration,
    ) -> Result<String, FetchError> {
        let ask = async {
            let response = self
                .send(
                    http::Method::POST,
                    addr,
                    FORGET_PATH,
                    Bytes::from(serde_json::to_vec(counter).expect("serialises")),
                )
                .await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await
                .map_err(|e| FetchError::Connect(format!("reading the answer: {e}")))?
                .to_bytes();
            let text = String::from_utf8_lossy(&body).trim().to_string();
            if status.is_success() {
                Ok(text)
            } else {
                Err(FetchError::Invalid(format!("HTTP {status}: {text}")))
            }
        };
        tokio::time::timeout(limit, ask)
            .await
            .unwrap_or(Err(FetchError::Timeout(limit.as_millis())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Entry;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A sibling on a real socket that records the request head and answers
    /// `state` in `encoding`, as a newer (compact) or older (JSON) pod does.
    async fn sibling(
        state: PeerState,
        encoding: Encoding,
    ) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                stream.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let body = encoding.encode(&state);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
                encoding.content_type(),
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
            stream.write_all(&body).await.unwrap();
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn fetches_ask_for_the_compact_form_and_read_either() {
        let state = PeerState {
            pod: "tally-1".into(),
            incarnation: "9f0c3a6b1d2e4f5a8b7c6d5e4f3a2b1c".into(),
            entries: vec![
                Entry::test("tally-1", "9f0c3a6b1d2e4f5a8b7c6d5e4f3a2b1c", 41),
                Entry::test("tally-2", "b2", 7),
            ],
            retired: vec![],
            announce: None,
            news: vec![],
        };
        let client = PeerClient::new(None, Duration::from_secs(5));
        for encoding in [Encoding::Compact, Encoding::Json] {
            let (addr, head) = sibling(state.clone(), encoding).await;
            let got = client.fetch(addr, Duration::from_secs(5)).await.unwrap();
            assert_eq!(got, state, "answered in {encoding:?}");
            let head = head.await.unwrap();
            assert!(
                head.contains("accept: application/x-tally-state, application/json;q=0.5"),
                "{head}"
            );
        }
    }
}
