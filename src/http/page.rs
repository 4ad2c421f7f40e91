//! The HTML page served at `/`: self-contained (inline CSS, SVG and a few
//! lines of JS; no external assets), so it works offline and behind strict
//! egress rules, on a phone and in dark mode.
//!
//! `GET /` is the hot path, so what does not change between requests is
//! prepared once: the markup, style and script around the numbers (the
//! escaped pod name in them) into shared buffers of a [`Template`] at
//! start-up, sent as they are; the cluster card's markup once per
//! [`Snapshot`] (a round or a change of what is known), with holes for the
//! numbers that move with this pod's count; the local time once a second
//! ([`Clock`]). A request writes only the numbers into a small buffer.
//!
//! The cluster card refreshes itself: the script polls `/visits/total`
//! (which never counts a visit) and redraws the total, the state line and
//! the bars with the same markup the server writes, so a reload is never
//! needed to see the cluster move.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::edge::Chunks;
use crate::peers::view::Snapshot;
use crate::peers::wire::{PodView, Source, TotalView};

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

/// The local time as the page shows it, formatted at most once a second.
#[derive(Debug)]
pub struct Clock {
    /// The zone's IANA name and the zone.
    zone: (String, TimeZone),
    /// The second last formatted, and how it reads.
    last: Mutex<(i64, Arc<str>)>,
}

impl Clock {
    pub fn new(zone: (String, TimeZone)) -> Clock {
        Clock {
            zone,
            last: Mutex::new((i64::MIN, Arc::from(""))),
        }
    }

    /// The zone's IANA name.
    pub fn zone_name(&self) -> &str {
        &self.zone.0
    }

    /// Now, as [`local_time`] writes it.
    pub fn now(&self) -> Arc<str> {
        self.at(Timestamp::now())
    }

    fn at(&self, now: Timestamp) -> Arc<str> {
        let second = now.as_second();
        let mut last = self.last.lock().expect("poisoned");
        if last.0 != second {
            *last = (second, local_time(now, &self.zone).into());
        }
        last.1.clone()
    }
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
    pub cluster: &'a Arc<Snapshot>,
}

/// The page with its fixed parts rendered once.
#[derive(Debug)]
pub struct Template {
    /// Up to the local time.
    head: Bytes,
    /// From the end of the rows to the end of the document.
    tail: Bytes,
    /// The cluster card of the last snapshot shown.
    card: Mutex<Option<(Arc<Snapshot>, Arc<Card>)>>,
}

/// From the time to this pod's count.
const BEFORE_COUNT: &str =
    "</span></p>\n<section class=\"card\"><h2>This pod</h2><div class=\"big\" id=\"local\">";
/// From this pod's count to its unit.
const AFTER_COUNT: &str = "</div>\n<div class=\"muted\"><span id=\"local-unit\">";
/// From the count's unit to the incarnation.
const BEFORE_INCARNATION: &str = " counted here</span> · volume <code>";
/// From the incarnation to the cluster card's state attribute.
const BEFORE_CLUSTER: &str =
    "</code></span></div></section>\n<section class=\"card\" id=\"cluster\" data-complete=\"";
/// From the cluster total to its unit.
const AFTER_TOTAL: &str = "</div>\n<div class=\"muted\"><span id=\"total-unit\">";

/// The cluster card of one [`Snapshot`], with holes for the numbers that
/// move with this pod's count: the total, and in the rows this pod's count
/// and every bar's width (scaled to the largest count).
#[derive(Debug)]
struct Card {
    /// From the state attribute to the total.
    open: String,
    /// From the total's unit to the first row.
    members: String,
    rows: Vec<Row>,
    /// About what a request writes, to size its buffer once.
    size: usize,
}

/// One row: `parts[0]` count `parts[1]` width `parts[2]` count `parts[3]`.
#[derive(Debug)]
struct Row {
    /// This pod's running counter: its count is the visit's.
    own: bool,
    count: u64,
    parts: [String; 4],
}

impl Card {
    fn new(view: &TotalView) -> Card {
        let mut open = String::from(if view.complete { "true" } else { "false" });
        open.push_str("\"><h2>Whole cluster</h2>\n<div class=\"big\" id=\"total\">");
        let mut members = String::from("</span> across <span id=\"members\">");
        members.push_str(&plural(view.members as u64, "member"));
        members.push_str("</span></div>\n<p class=\"state\" id=\"state\">");
        push_escaped(&mut members, &state_line(view));
        members.push_str("</p>\n<div class=\"rows\" id=\"rows\">");
        let rows = view
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| Row::new(p, i == 0 && p.source == Source::Own))
            .collect();
        let rows: Vec<Row> = rows;
        let size = 600
            + open.len()
            + members.len()
            + rows
                .iter()
                .map(|r| r.parts.iter().map(String::len).sum::<usize>() + 60)
                .sum::<usize>();
        Card {
            open,
            members,
            rows,
            size,
        }
    }
}

impl Row {
    /// A name, an SVG bar scaled to the largest count, the count, and where
    /// the number comes from.
    fn new(p: &PodView, own: bool) -> Row {
        let source = p.source.as_str();
        let mut head = format!("<div class=\"row {source}\" data-pod=\"");
        push_escaped(&mut head, &p.pod);
        head.push_str("\" data-count=\"");
        let mut name = String::from("\"><span class=\"pod\">");
        push_escaped(&mut name, &p.pod);
        name.push_str(
            "</span><svg class=\"bar\" viewBox=\"0 0 100 10\" preserveAspectRatio=\"none\" \
             aria-hidden=\"true\"><rect width=\"",
        );
        let bar = "\" height=\"10\" rx=\"1\"/></svg><span class=\"n\">".to_string();
        let mut why = format!("</span><span class=\"why\">{source}");
        if let Some(error) = &p.error {
            why.push_str(": ");
            push_escaped(&mut why, error);
        }
        why.push_str("</span></div>");
        Row {
            own,
            count: p.count,
            parts: [head, name, bar, why],
        }
    }
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
            head: Bytes::from(head),
            tail: Bytes::from(tail),
            card: Mutex::new(None),
        }
    }

    /// The page for one visit: the fixed head, the numbers, the fixed tail.
    pub fn render(&self, visit: &Visit<'_>) -> Chunks {
        let card = self.card(visit.cluster);
        let count = visit.count;
        let total = visit.cluster.total_with(count);
        let mut out = String::with_capacity(card.size);
        push_escaped(&mut out, visit.time);
        out.push_str(BEFORE_COUNT);
        push_u64(&mut out, count);
        out.push_str(AFTER_COUNT);
        out.push_str(if count == 1 { "visit" } else { "visits" });
        out.push_str(BEFORE_INCARNATION);
        push_escaped(&mut out, visit.incarnation);
        out.push_str(BEFORE_CLUSTER);
        out.push_str(&card.open);
        push_u64(&mut out, total);
        out.push_str(AFTER_TOTAL);
        out.push_str(if total == 1 { "visit" } else { "visits" });
        out.push_str(&card.members);
        let counts = || {
            card.rows
                .iter()
                .map(|r| if r.own { count } else { r.count })
        };
        let max = counts().max().unwrap_or(0).max(1);
        for (row, n) in card.rows.iter().zip(counts()) {
            out.push_str(&row.parts[0]);
            push_u64(&mut out, n);
            out.push_str(&row.parts[1]);
            push_percent(&mut out, n, max);
            out.push_str(&row.parts[2]);
            push_u64(&mut out, n);
            out.push_str(&row.parts[3]);
        }
        Chunks::three(self.head.clone(), Bytes::from(out), self.tail.clone())
    }

    /// The card of `snapshot`, built the first time it is shown.
    fn card(&self, snapshot: &Arc<Snapshot>) -> Arc<Card> {
        let mut cached = self.card.lock().expect("poisoned");
        match &*cached {
            Some((shown, card)) if Arc::ptr_eq(shown, snapshot) => card.clone(),
            _ => {
                let card = Arc::new(Card::new(&snapshot.view));
                *cached = Some((snapshot.clone(), card.clone()));
                card
            }
        }
    }
}

/// Writes `n` as a percentage of `max` (≥ 1) with one decimal, rounded
/// half up as the script's `toFixed(1)` does; integer arithmetic, since
/// float formatting cost more than the rest of the page.
fn push_percent(out: &mut String, n: u64, max: u64) {
    let tenths = (u128::from(n) * 2000 + u128::from(max)) / (2 * u128::from(max));
    push_u64(out, (tenths / 10) as u64);
    out.push('.');
    out.push(char::from(b'0' + (tenths % 10) as u8));
}

/// Writes `n` in decimal (without the formatting machinery: it runs
/// several times per visit).
pub(crate) fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
}

/// Appends `s` with `&`, `<`, `>` and `"` escaped; copies the runs
/// between them whole (most strings have none).
fn push_escaped(out: &mut String, s: &str) {
    // What this page escapes (times, hex ids, pod names) rarely holds an
    // entity: one pass without early exit (which the compiler vectorises)
    // decides, at a fraction of the cost of the loop below.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & !matches!(b, b'&' | b'<' | b'>' | b'"')
    });
    if plain {
        out.push_str(s);
        return;
    }
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        let entity = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            _ => continue,
        };
        out.push_str(&s[from..i]);
        out.push_str(entity);
        from = i + 1;
    }
    out.push_str(&s[from..]);
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
    use hyper::body::Body as _;

    #[test]
    fn bar_widths_are_percentages_with_one_decimal_rounded_half_up() {
        let percent = |n, max| {
            let mut out = String::new();
            push_percent(&mut out, n, max);
            out
        };
        assert_eq!(percent(0, 1), "0.0");
        assert_eq!(percent(1, 4), "25.0");
        assert_eq!(percent(1, 3), "33.3");
        assert_eq!(percent(2, 3), "66.7");
        // A tie goes up, as `toFixed(1)` does.
        assert_eq!(percent(1, 16), "6.3");
        assert_eq!(percent(u64::MAX, u64::MAX), "100.0");
        assert_eq!(percent(u64::MAX / 2, u64::MAX), "50.0");
        // Away from ties, the same digits as float formatting.
        for max in 1..200u64 {
            for n in 0..=max {
                let exact = n as f64 / max as f64 * 1000.0;
                if (exact - exact.floor() - 0.5).abs() > 1e-6 {
                    assert_eq!(percent(n, max), format!("{:.1}", exact / 10.0), "{n}/{max}");
                }
            }
        }
    }

    #[test]
    fn escaping_leaves_plain_text_alone_and_replaces_entities() {
        assert_eq!(escape("2026-01-01 09:00:00 JST"), "2026-01-01 09:00:00 JST");
        assert_eq!(escape("a<b>&\"c\""), "a&lt;b&gt;&amp;&quot;c&quot;");
    }

    fn row(pod: &str, count: u64, source: Source, error: Option<&str>) -> PodView {
        PodView::test(pod, count, source, error)
    }

    fn view(complete: bool, pods: Vec<PodView>) -> TotalView {
        TotalView::test(complete, pods)
    }

    /// The page `pod` shows for its visit number `count`, with `cluster`
    /// as the snapshot (its first row this pod's, at `count`).
    fn page(pod: &str, count: u64, cluster: &TotalView) -> String {
        let own = cluster.pods.first().map_or(0, |p| p.count);
        let snapshot = Arc::new(Snapshot::new(cluster.clone(), own, 0));
        Template::new(pod)
            .render(&Visit {
                incarnation: "abc",
                count,
                time: "2026-01-01 09:00:00 JST (Asia/Tokyo)",
                cluster: &snapshot,
            })
            .text()
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

    /// One card per snapshot, and this pod's count patched into it on every
    /// visit: its row, the bars (it may become the largest) and the total.
    #[test]
    fn a_snapshot_card_is_patched_with_each_visits_count() {
        let cluster = view(
            false,
            vec![
                row("tally-0", 10, Source::Own, None),
                row("tally-1", 20, Source::Live, None),
            ],
        );
        let template = Template::new("tally-0");
        let snapshot = Arc::new(Snapshot::new(cluster, 10, 0));
        let render = |count| {
            template
                .render(&Visit {
                    incarnation: "abc",
                    count,
                    time: "t",
                    cluster: &snapshot,
                })
                .text()
        };
        let html = render(10);
        assert!(html.contains("data-pod=\"tally-0\" data-count=\"10\""));
        assert!(html.contains("<rect width=\"50.0\""), "{html}");
        assert!(html.contains("id=\"total\">30</div>"));
        let html = render(40);
        assert!(html.contains("data-pod=\"tally-0\" data-count=\"40\""));
        assert!(html.contains("<span class=\"n\">40</span>"));
        assert!(html.contains("<rect width=\"100.0\""), "{html}");
        assert!(html.contains("<rect width=\"50.0\""), "tally-1 is now half");
        assert!(html.contains("id=\"total\">60</div>"));
        assert!(html.contains("id=\"local\">40</div>"));
        let first = template.card(&snapshot);
        assert!(Arc::ptr_eq(&first, &template.card(&snapshot)), "built once");
        let next = Arc::new(Snapshot::new(view(true, vec![]), 0, 0));
        assert!(
            !Arc::ptr_eq(&first, &template.card(&next)),
            "rebuilt for a new one"
        );
    }

    #[test]
    fn the_body_is_the_whole_page_with_its_exact_length() {
        let snapshot = Arc::new(Snapshot::new(view(true, vec![]), 0, 0));
        let body = Template::new("tally-0").render(&Visit {
            incarnation: "abc",
            count: 7,
            time: "t",
            cluster: &snapshot,
        });
        let text = body.text();
        assert!(text.starts_with("<!doctype html>") && text.ends_with("</html>\n"));
        assert_eq!(body.size_hint().exact(), Some(text.len() as u64));
        let collected = futures::executor::block_on(http_body_util::BodyExt::collect(body))
            .unwrap()
            .to_bytes();
        assert_eq!(collected, text.as_bytes());
    }

    #[test]
    fn the_clock_formats_each_second_once() {
        let clock = Clock::new(("UTC".to_string(), TimeZone::UTC));
        let t0: Timestamp = "2026-01-01T00:00:00.1Z".parse().unwrap();
        let first = clock.at(t0);
        assert_eq!(&*first, "2026-01-01 00:00:00 UTC (UTC)");
        let same = clock.at("2026-01-01T00:00:00.9Z".parse().unwrap());
        assert!(Arc::ptr_eq(&first, &same));
        assert_eq!(
            &*clock.at("2026-01-01T00:00:01Z".parse().unwrap()),
            "2026-01-01 00:00:01 UTC (UTC)"
        );
    }

    #[test]
    fn escaping_copies_runs_and_replaces_each_special_character() {
        assert_eq!(escape(""), "");
        assert_eq!(escape("plain-0"), "plain-0");
        assert_eq!(
            escape("<a href=\"x\">&é</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;é&lt;/a&gt;"
        );
        let mut n = String::new();
        for v in [0, 7, 10, 1234567890, u64::MAX] {
            n.clear();
            push_u64(&mut n, v);
            assert_eq!(n, v.to_string());
        }
    }

    #[test]
    fn the_script_polls_the_total_route_only() {
        let html = page("tally-0", 1, &view(true, vec![]));
        assert!(html.contains("fetch(\"/visits/total\""));
        assert!(html.contains("var REFRESH=5000;"));
        assert_eq!(html.matches("fetch(").count(), 1);
    }
}
