//! The HTML page served at `/`: self-contained (inline CSS, SVG and a few
//! lines of JS; no external assets), so it works offline and behind strict
//! egress rules, on a phone and in dark mode.
//!
//! `GET /` is the hot path, so everything that does not change between
//! requests (the markup, the style, the script, the escaped pod name) is
//! rendered once into a [`Template`] at start-up; a request only writes the
//! numbers and the per-pod rows into one pre-sized buffer.
//!
//! The cluster card refreshes itself: the script polls `/visits/total`
//! (which never counts a visit) and redraws the total, the state line and
//! the bars with the same markup the server writes, so a reload is never
//! needed to see the cluster move.

use std::fmt::Write as _;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::peers::wire::TotalView;

/// How often the page's script polls `/visits/total`, in milliseconds.
pub const REFRESH_MS: u32 = 5000;

/// `"1 visit"`, `"2 visits"`, `"0 visits"`.
pub fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The local time as shown, e.g. `2026-11-21 06:01:02 CET (Europe/Paris)`.
pub fn local_time(now: Timestamp, timezone: &(String, TimeZone)) -> String {
    let zoned = now.to_zoned(timezone.1.clone());
    format!(
        "{} ({})",
        zoned.strftime("%Y-%m-%d %H:%M:%S %Z"),
        timezone.0
    )
}

/// The state line of the cluster card: whether every member answered.
pub fn state_line(view: &TotalView) -> String {
    if view.complete {
        return if view.members == 1 {
            "Complete: the only member answered".to_string()
        } else {
            format!("Complete: all {} members answered", view.members)
        };
    }
    if let Some(error) = &view.discovery_error {
        return format!("Partial: member lookup failed ({error}); last known counts shown");
    }
    let missing = view.pods.iter().filter(|p| p.error.is_some()).count() as u64;
    if missing == 0 {
        // The page's own case: it shows the last round, which may miss
        // visits acknowledged since; its script asks /visits/total at once.
        return "Last known counts: asking every member…".to_string();
    }
    format!(
        "Partial: {} of {} did not answer; last known counts shown",
        missing,
        plural(view.members as u64, "member")
    )
}

/// What one request shows.
pub struct Visit<'a> {
    pub incarnation: &'a str,
    /// The number of the visit just counted: this pod's count.
    pub count: u64,
    pub time: &'a str,
    pub cluster: &'a TotalView,
}

/// The page with its fixed parts rendered once.
#[derive(Debug)]
pub struct Template {
    /// Up to the local time.
    head: String,
    /// From the time to this pod's count.
    before_count: &'static str,
    /// From this pod's count to its unit.
    after_count: &'static str,
    /// Between the incarnation and the cluster card's state attribute.
    before_cluster: &'static str,
    /// From the end of the rows to the end of the document.
    tail: String,
}

const STYLE: &str = r#"<style>
:root{color-scheme:light dark;--fg:#1d2430;--muted:#5c6675;--bg:#f7f8fa;--card:#fff;--line:#dde1e7;--bar:#3b6fd8;--old:#9aa3b0;--ok:#1a7f37;--warn:#9a6700;--warnbg:#fff8c5}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ef;--muted:#9aa4b2;--bg:#10141a;--card:#1a2029;--line:#2e3642;--bar:#6e9bf5;--old:#5d6775;--ok:#56d364;--warn:#e3b341;--warnbg:#3a2f0b}}
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:var(--fg);background:var(--bg)}
main{max-width:42rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.5rem 0 .2rem} h2{font-size:1rem;margin:0;color:var(--muted);font-weight:600}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:1rem 1.2rem;margin:1rem 0}
.big{font-size:clamp(2.2rem,11vw,3.2rem);font-weight:700;line-height:1.1;margin:.3rem 0;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.muted{color:var(--muted);font-size:.9rem} a{color:var(--bar)}
.state{font-weight:600;margin:.6rem 0;padding:.35rem .6rem;border-radius:6px}
[data-complete=true] .state{color:var(--ok)} [data-complete=false] .state{color:var(--warn);background:var(--warnbg)}
[data-complete=true] .state::before{content:"\2713  "} [data-complete=false] .state::before{content:"\26A0  "}
.rows{margin-top:.6rem}
.row{display:grid;grid-template-columns:minmax(4.5rem,9rem) 1fr auto;gap:.2rem .6rem;align-items:center;padding:.3rem 0;border-top:1px solid var(--line)}
.pod{font-weight:600;overflow-wrap:anywhere} .n{text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
.bar{width:100%;height:14px;display:block} .bar rect{fill:var(--bar)} .cached .bar rect{fill:var(--old)}
.why{grid-column:1/-1;font-size:.8rem;color:var(--muted)}
</style>"#;

/// Redraws the cluster card from `/visits/total`; the markup matches
/// [`Template::write_rows`] so both look the same.
const SCRIPT: &str = r#"<script>
(function(){
var plural=function(n,w){return n+" "+w+(n===1?"":"s")};
var esc=function(s){return String(s).replace(/[&<>"]/g,function(c){return{"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]})};
var card=document.getElementById("cluster"),refreshes=0;
function state(v){
 if(v.complete)return v.members===1?"Complete: the only member answered":"Complete: all "+v.members+" members answered";
 if(v.discovery_error)return "Partial: member lookup failed ("+v.discovery_error+"); last known counts shown";
 var missing=v.pods.filter(function(p){return p.error}).length;
 if(!missing)return "Last known counts: asking every member\u2026";
 return "Partial: "+missing+" of "+plural(v.members,"member")+" did not answer; last known counts shown";
}
function rows(v){
 var max=Math.max.apply(null,[1].concat(v.pods.map(function(p){return p.count})));
 return v.pods.map(function(p){
  var w=(p.count/max*100).toFixed(1);
  return '<div class="row '+esc(p.source)+'" data-pod="'+esc(p.pod)+'" data-count="'+p.count+'"><span class="pod">'+esc(p.pod)+
   '</span><svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true"><rect width="'+w+'" height="10" rx="1"/></svg><span class="n">'+p.count+
   '</span><span class="why">'+esc(p.source)+(p.error?": "+esc(p.error):"")+'</span></div>';
 }).join("");
}
function refresh(){
 fetch("/visits/total",{headers:{Accept:"application/json"},cache:"no-store"}).then(function(r){
  if(!r.ok)throw new Error("HTTP "+r.status);return r.json();
 }).then(function(v){
  card.setAttribute("data-complete",v.complete?"true":"false");
  document.getElementById("total").textContent=v.total;
  document.getElementById("total-unit").textContent=plural(v.total,"visit").replace(/^\d+ /,"");
  document.getElementById("members").textContent=plural(v.members,"member");
  document.getElementById("state").textContent=state(v);
  document.getElementById("rows").innerHTML=rows(v);
  card.setAttribute("data-refreshes",++refreshes);
  document.getElementById("updated").textContent="Updated "+new Date().toLocaleTimeString()+"; refreshes every "+(REFRESH/1000)+" s";
 }).catch(function(e){
  document.getElementById("updated").textContent="Refresh failed ("+e.message+"); showing the last values";
 });
}
var REFRESH=__REFRESH__;
refresh();setInterval(refresh,REFRESH);
})();
</script>"#;

impl Template {
    /// Renders the fixed parts for the pod `pod`.
    pub fn new(pod: &str) -> Template {
        let pod = escape(pod);
        let head = format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark"><title>Tally · {pod}</title>
{STYLE}</head>
<body><main>
<h1>Tally</h1>
<p class="muted">Served by pod <b id="pod">{pod}</b> at <span id="time">"#
        );
        let tail = format!(
            r#"</div>
<p class="muted" id="updated">Refreshes every {} s</p></section>
<p class="muted">JSON: <a href="/visits/local">/visits/local</a> · <a href="/visits/total">/visits/total</a> · <a href="/metrics">/metrics</a></p>
</main>
{}
</body></html>
"#,
            REFRESH_MS / 1000,
            SCRIPT.replace("__REFRESH__", &REFRESH_MS.to_string())
        );
        Template {
            head,
            before_count: "</span></p>\n<section class=\"card\"><h2>This pod</h2><div class=\"big\" id=\"local\">",
            after_count: "</div>\n<div class=\"muted\"><span id=\"local-unit\">",
            before_cluster: "</span></div></section>\n<section class=\"card\" id=\"cluster\" data-complete=\"",
            tail,
        }
    }

    /// The page for one visit.
    pub fn render(&self, visit: &Visit<'_>) -> String {
        let view = visit.cluster;
        let mut out =
            String::with_capacity(self.head.len() + self.tail.len() + 900 + 450 * view.pods.len());
        out.push_str(&self.head);
        push_escaped(&mut out, visit.time);
        out.push_str(self.before_count);
        let _ = write!(out, "{}", visit.count);
        out.push_str(self.after_count);
        out.push_str(if visit.count == 1 { "visit" } else { "visits" });
        out.push_str(" counted here</span> · volume <code>");
        push_escaped(&mut out, visit.incarnation);
        out.push_str("</code>");
        out.push_str(self.before_cluster);
        out.push_str(if view.complete { "true" } else { "false" });
        out.push_str("\"><h2>Whole cluster</h2>\n<div class=\"big\" id=\"total\">");
        let _ = write!(out, "{}", view.total);
        out.push_str("</div>\n<div class=\"muted\"><span id=\"total-unit\">");
        out.push_str(if view.total == 1 { "visit" } else { "visits" });
        out.push_str("</span> across <span id=\"members\">");
        out.push_str(&plural(view.members as u64, "member"));
        out.push_str("</span></div>\n<p class=\"state\" id=\"state\">");
        push_escaped(&mut out, &state_line(view));
        out.push_str("</p>\n<div class=\"rows\" id=\"rows\">");
        Self::write_rows(&mut out, view);
        out.push_str(&self.tail);
        out
    }

    /// One row per counter: name, an SVG bar scaled to the largest count,
    /// the count, and where the number comes from.
    fn write_rows(out: &mut String, view: &TotalView) {
        let max = view.pods.iter().map(|p| p.count).max().unwrap_or(0).max(1);
        for p in &view.pods {
            let source = p.source.as_str();
            let _ = write!(out, "<div class=\"row {source}\" data-pod=\"");
            push_escaped(out, &p.pod);
            let _ = write!(out, "\" data-count=\"{}\"><span class=\"pod\">", p.count);
            push_escaped(out, &p.pod);
            let _ = write!(
                out,
                "</span><svg class=\"bar\" viewBox=\"0 0 100 10\" preserveAspectRatio=\"none\" aria-hidden=\"true\">\
                 <rect width=\"{:.1}\" height=\"10\" rx=\"1\"/></svg><span class=\"n\">{}</span><span class=\"why\">{source}",
                p.count as f64 / max as f64 * 100.0,
                p.count
            );
            if let Some(error) = &p.error {
                out.push_str(": ");
                push_escaped(out, error);
            }
            out.push_str("</span></div>");
        }
    }
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_escaped(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::wire::{PodView, Source};

    fn row(pod: &str, count: u64, source: Source, error: Option<&str>) -> PodView {
        PodView::test(pod, count, source, error)
    }

    fn view(complete: bool, pods: Vec<PodView>) -> TotalView {
        TotalView::test(complete, pods)
    }

    fn page(pod: &str, count: u64, cluster: &TotalView) -> String {
        Template::new(pod).render(&Visit {
            incarnation: "abc",
            count,
            time: "2026-01-01 09:00:00 JST (Asia/Tokyo)",
            cluster,
        })
    }

    #[test]
    fn time_is_shown_in_the_configured_zone() {
        let tz = (
            "Asia/Tokyo".to_string(),
            TimeZone::get("Asia/Tokyo").unwrap(),
        );
        let now = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(local_time(now, &tz), "2026-01-01 09:00:00 JST (Asia/Tokyo)");
    }

    #[test]
    fn names_and_errors_are_escaped_and_nothing_is_fetched_from_elsewhere() {
        let cluster = view(
            false,
            vec![
                row("tally-0", 3, Source::Own, None),
                row("t<b>", 2, Source::Cached, Some("<script>x</script>")),
            ],
        );
        let html = page("tally-<0>", 3, &cluster);
        assert!(html.contains("<b id=\"pod\">tally-&lt;0&gt;</b>"), "{html}");
        assert!(html.contains("data-pod=\"t&lt;b&gt;\""));
        assert!(html.contains("cached: &lt;script&gt;x&lt;/script&gt;"));
        for external in ["http://", "https://", "src=", "<link"] {
            assert!(!html.contains(external), "{external} in\n{html}");
        }
    }

    #[test]
    fn plurals_follow_the_numbers() {
        assert_eq!(plural(0, "visit"), "0 visits");
        assert_eq!(plural(1, "visit"), "1 visit");
        assert_eq!(plural(2, "member"), "2 members");
        let one = view(true, vec![row("tally-0", 1, Source::Own, None)]);
        let html = page("tally-0", 1, &one);
        assert!(
            html.contains("<span id=\"local-unit\">visit counted here"),
            "{html}"
        );
        assert!(html.contains(
            "<span id=\"total-unit\">visit</span> across <span id=\"members\">1 member</span>"
        ));
        assert!(html.contains("Complete: the only member answered"));
        let two = view(
            true,
            vec![
                row("tally-0", 1, Source::Own, None),
                row("tally-1", 1, Source::Live, None),
            ],
        );
        let html = page("tally-0", 2, &two);
        assert!(html.contains("<span id=\"local-unit\">visits counted here"));
        assert!(html.contains(
            "<span id=\"total-unit\">visits</span> across <span id=\"members\">2 members</span>"
        ));
    }

    #[test]
    fn the_state_says_complete_or_partial_and_why() {
        let complete = view(
            true,
            vec![
                row("tally-0", 5, Source::Own, None),
                row("tally-1", 3, Source::Live, None),
            ],
        );
        let html = page("tally-0", 5, &complete);
        assert!(html.contains("data-complete=\"true\""));
        assert!(html.contains(">Complete: all 2 members answered<"));
        let partial = view(
            false,
            vec![
                row("tally-0", 5, Source::Own, None),
                row("tally-1", 3, Source::Live, None),
                row(
                    "tally-2",
                    4,
                    Source::Cached,
                    Some("connect timeout after 300 ms"),
                ),
            ],
        );
        let html = page("tally-0", 5, &partial);
        assert!(html.contains("data-complete=\"false\""));
        assert!(
            html.contains(">Partial: 1 of 3 members did not answer; last known counts shown<"),
            "{html}"
        );
        // The last round, shown before the script's first refresh.
        let last = view(false, vec![row("tally-0", 5, Source::Own, None)]);
        assert_eq!(state_line(&last), "Last known counts: asking every member…");
        let mut lost = view(false, vec![row("tally-0", 5, Source::Own, None)]);
        lost.discovery_error = Some("SERVFAIL".into());
        assert_eq!(
            state_line(&lost),
            "Partial: member lookup failed (SERVFAIL); last known counts shown"
        );
    }

    #[test]
    fn bars_are_scaled_to_the_largest_count() {
        let cluster = view(
            true,
            vec![
                row("tally-0", 50, Source::Own, None),
                row("tally-1", 200, Source::Live, None),
                row("tally-2", 0, Source::Live, None),
            ],
        );
        let html = page("tally-0", 50, &cluster);
        assert!(html.contains(
            "data-pod=\"tally-0\" data-count=\"50\"><span class=\"pod\">tally-0</span><svg"
        ));
        assert!(html.contains("<rect width=\"25.0\""), "{html}");
        assert!(html.contains("<rect width=\"100.0\""));
        assert!(html.contains("<rect width=\"0.0\""));
        assert!(html.contains("<div class=\"big\" id=\"total\">250</div>"));
        assert!(html.contains("<div class=\"big\" id=\"local\">50</div>"));
        // An empty cluster view still renders (no division by zero).
        let html = page("tally-0", 0, &view(true, vec![]));
        assert!(html.contains("id=\"rows\"></div>"));
    }

    #[test]
    fn the_script_polls_the_total_route_only() {
        let html = page("tally-0", 1, &view(true, vec![]));
        assert!(html.contains("fetch(\"/visits/total\""));
        assert!(html.contains("var REFRESH=5000;"));
        assert_eq!(html.matches("fetch(").count(), 1);
    }
}
