//! The HTML page served at `/`: self-contained (no external assets), so it
//! works offline and behind strict egress rules.

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::peers::wire::TotalView;

/// What the page shows.
pub struct Page<'a> {
    pub pod: &'a str,
    pub incarnation: &'a str,
    /// The number of the visit just counted: this pod's count.
    pub count: u64,
    pub now: Timestamp,
    pub timezone: &'a (String, TimeZone),
    pub cluster: &'a TotalView,
}

impl Page<'_> {
    /// The local time as shown, e.g. `2026-11-21 06:01:02 CET (Europe/Paris)`.
    pub fn local_time(&self) -> String {
        let zoned = self.now.to_zoned(self.timezone.1.clone());
        format!(
            "{} ({})",
            zoned.strftime("%Y-%m-%d %H:%M:%S %Z"),
            self.timezone.0
        )
    }

    pub fn render(&self) -> String {
        let rows: String = self
            .cluster
            .pods
            .iter()
            .map(|p| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td class=n>{}</td><td>{}</td></tr>",
                    escape(&p.pod),
                    escape(&p.incarnation.chars().take(8).collect::<String>()),
                    p.count,
                    p.source.as_str(),
                )
            })
            .collect();
        let state = if self.cluster.complete {
            "every member answered"
        } else {
            // Also the page's own case: it shows the last round, which may
            // miss visits acknowledged since it started.
            "last known counts: /visits/total asks every member"
        };
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tally · {pod}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#1d2430;background:#f7f8fa}}
h1{{font-size:1.4rem;margin-bottom:.2rem}} .big{{font-size:3rem;font-weight:700;margin:.3rem 0}}
.card{{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:1rem 1.2rem;margin:1rem 0}}
table{{border-collapse:collapse;width:100%}} td,th{{text-align:left;padding:.25rem .4rem;border-bottom:1px solid #eef0f3}}
.n{{text-align:right;font-variant-numeric:tabular-nums}} .muted{{color:#5c6675;font-size:.9rem}}
</style></head>
<body>
<h1>Tally</h1>
<p class="muted">Served by pod <b>{pod}</b> at {time}</p>
<div class="card"><div class="muted">Visits counted by this pod</div><div class="big">{count}</div>
<div class="muted">volume incarnation {incarnation}</div></div>
<div class="card"><div class="muted">Cluster-wide total ({members} members, {state})</div><div class="big">{total}</div>
<table><tr><th>pod</th><th>volume</th><th class=n>visits</th><th>source</th></tr>{rows}</table></div>
<p class="muted">JSON: <a href="/visits/local">/visits/local</a> · <a href="/visits/total">/visits/total</a> · <a href="/metrics">/metrics</a></p>
</body></html>
"#,
            pod = escape(self.pod),
            time = escape(&self.local_time()),
            count = self.count,
            incarnation = escape(self.incarnation),
            members = self.cluster.members,
            total = self.cluster.total,
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_is_shown_in_the_configured_zone() {
        let tz = (
            "Asia/Tokyo".to_string(),
            TimeZone::get("Asia/Tokyo").unwrap(),
        );
        let view = TotalView {
            total: 7,
            complete: true,
            members: 1,
            pods: vec![],
            retired: vec![],
            discovery_error: None,
        };
        let page = Page {
            pod: "tally-<0>",
            incarnation: "abc",
            count: 7,
            now: "2026-01-01T00:00:00Z".parse().unwrap(),
            timezone: &tz,
            cluster: &view,
        };
        assert_eq!(page.local_time(), "2026-01-01 09:00:00 JST (Asia/Tokyo)");
        let html = page.render();
        assert!(
            html.contains("tally-&lt;0&gt;")
                && !html.contains("http://")
                && !html.contains("https://")
        );
    }
}
