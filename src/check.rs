//! `tally check-cluster URL`: the chart's `helm test` hook, run with the
//! tally image itself (a distroless image has no `wget` or `sh`).
//!
//! It asks the client Service for `/healthz` and `/visits/total` (neither
//! counts a visit) and passes when the total is `complete` with the expected
//! number of members — which proves the Service routes, every pod is in DNS
//! under the headless Service, and every pod reaches every other. It retries
//! until a deadline, since a release that was just installed may still be
//! converging; the last reason is printed when it gives up.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::peers::wire::TotalView;

/// Largest answer read from the Service (a `/visits/total` of thousands of
/// rows fits).
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Limit for one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two attempts.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Why one attempt failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} is not a /visits/total answer: {reason}")]
    Malformed { url: String, reason: String },
    #[error("the total is not complete: {0}")]
    Incomplete(String),
    #[error("{found} member(s) in the cluster view, expected {expected}: {rows}")]
    Members {
        found: usize,
        expected: usize,
        rows: String,
    },
}

/// `URL` must be `http://host[:port]` (a path is ignored).
pub fn base_url(raw: &str) -> Result<String, String> {
    let uri: Uri = raw
        .parse()
        .map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(authority)) => Ok(format!("http://{authority}")),
        _ => Err(format!(
            "{raw:?} is not an http:// URL with a host, e.g. http://tally.default.svc.cluster.local:80"
        )),
    }
}

/// Judges a `/visits/total` answer: complete, and with `expected` members
/// when given. Returns the line to print on success.
pub fn judge(view: &TotalView, expected: Option<usize>) -> Result<String, CheckError> {
    let rows = || {
        view.pods
            .iter()
            .map(|p| match &p.error {
                Some(error) => format!("{} {} ({error})", p.pod, p.source.as_str()),
                None => format!("{} {}", p.pod, p.source.as_str()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(expected) = expected
        && view.members != expected
    {
        return Err(CheckError::Members {
            found: view.members,
            expected,
            rows: rows(),
        });
    }
    if !view.complete {
        let why = view
            .discovery_error
            .clone()
            .or_else(|| view.persist_error.clone())
            .unwrap_or_else(|| format!("not every member answered: {}", rows()));
        return Err(CheckError::Incomplete(why));
    }
    Ok(format!(
        "total {}, {} member{} answered, complete",
        view.total,
        view.members,
        if view.members == 1 { "" } else { "s" }
    ))
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// One GET, bounded in time and size; the body as text.
async fn get(client: &HttpClient, url: &str) -> Result<(StatusCode, String), CheckError> {
    let failed = |reason: String| CheckError::Request {
        url: url.to_string(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|e| failed(format!("{e}")))?;
    let fetch = async {
        let response = client.get(uri).await.map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                message = format!("{message}: {inner}");
                source = inner.source();
            }
            failed(message)
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fetch)
        .await
        .unwrap_or_else(|_| {
            Err(failed(format!(
                "no answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            )))
        })
}

/// One attempt: `/healthz`, then `/visits/total`, judged.
async fn attempt(
    client: &HttpClient,
    base: &str,
    expected: Option<usize>,
) -> Result<Vec<String>, CheckError> {
    let mut lines = Vec::new();
    for (path, want_total) in [("/healthz", false), ("/visits/total", true)] {
        let url = format!("{base}{path}");
        let (status, body) = get(client, &url).await?;
        if status != StatusCode::OK {
            return Err(CheckError::Status {
                url,
                status: status.as_u16(),
                body: body.trim().chars().take(200).collect(),
            });
        }
        if !want_total {
            lines.push(format!("GET {url}: {} {}", status.as_u16(), body.trim()));
            continue;
        }
        let view: TotalView = serde_json::from_str(&body).map_err(|e| CheckError::Malformed {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        lines.push(format!("GET {url}: {}", judge(&view, expected)?));
    }
    Ok(lines)
}

/// Runs the check until it passes or `wait` is over; prints what it saw.
/// Returns whether it passed.
pub async fn run(base: &str, expected: Option<usize>, wait: Duration) -> bool {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let deadline = Instant::now() + wait;
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt(&client, base, expected).await {
            Ok(lines) => {
                for line in lines {
                    println!("{line}");
                }
                println!("PASS");
                return true;
            }
            Err(error) if Instant::now() + RETRY_EVERY >= deadline => {
                println!(
                    "FAIL after {tries} attempt(s) in {} s: {error}",
                    wait.as_secs()
                );
                return false;
            }
            Err(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::wire::{PodView, Source};

    fn row(pod: &str, source: Source, error: Option<&str>) -> PodView {
        PodView::test(pod, 1, source, error)
    }

    fn view(complete: bool, pods: Vec<PodView>) -> TotalView {
        TotalView::test(complete, pods)
    }

    #[test]
    fn a_complete_total_with_the_expected_members_passes() {
        let v = view(
            true,
            vec![
                row("t-0", Source::Own, None),
                row("t-1", Source::Live, None),
            ],
        );
        assert_eq!(
            judge(&v, Some(2)).unwrap(),
            "total 2, 2 members answered, complete"
        );
        assert_eq!(
            judge(&v, None).unwrap(),
            "total 2, 2 members answered, complete"
        );
    }

    #[test]
    fn an_incomplete_total_names_who_did_not_answer() {
        let v = view(
            false,
            vec![
                row("t-0", Source::Own, None),
                row("t-1", Source::Cached, Some("connect timeout after 300 ms")),
            ],
        );
        let error = judge(&v, Some(2)).unwrap_err().to_string();
        assert!(
            error.contains("t-1 cached (connect timeout after 300 ms)"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_member_fails_even_when_complete() {
        let v = view(true, vec![row("t-0", Source::Own, None)]);
        assert_eq!(
            judge(&v, Some(3)),
            Err(CheckError::Members {
                found: 1,
                expected: 3,
                rows: "t-0 self".into()
            })
        );
    }

    #[test]
    fn a_discovery_error_is_the_reason_given() {
        let mut v = view(false, vec![]);
        v.discovery_error = Some("NXDOMAIN for _peer._tcp.x.".into());
        let error = judge(&v, None).unwrap_err().to_string();
        assert!(error.ends_with("NXDOMAIN for _peer._tcp.x."), "{error}");
    }

    #[test]
    fn urls_must_be_http_with_a_host() {
        assert_eq!(
            base_url("http://tally.ns.svc.cluster.local:80/x").unwrap(),
            "http://tally.ns.svc.cluster.local:80"
        );
        assert!(base_url("https://x").is_err());
        assert!(base_url("tally:80").is_err());
        assert!(base_url("not a url").is_err());
    }
}
