//! Media types and the ranges of an `Accept` header (RFC 9110 §8.3.1,
//! §12.5.1), read once for both ports: `GET /` choosing JSON or the page,
//! the peer route choosing the compact form or JSON, and a hand-over's
//! `Content-Type`.
//!
//! Types compare case-insensitively and exactly (`application/jsonp` is not
//! `application/json`); a range's `q` weighs it, and `q=0` refuses the
//! type; the most specific range that matches a type gives its weight
//! (`application/json;q=0, */*` refuses JSON). Works on bytes without
//! copying: it runs on every `GET /`.

/// Weights in thousandths: `q=1` is 1000, `q=0.5` is 500.
pub type Quality = u16;

/// One range of an `Accept` header, or a `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range<'a> {
    /// `type/subtype`, as sent (compare with [`Range::is`]).
    pub essence: &'a [u8],
    /// The parameters after the essence, `;`-separated, as sent.
    params: &'a [u8],
    pub quality: Quality,
}

impl<'a> Range<'a> {
    /// Parses one range; `None` for one that is not `type/subtype`.
    pub fn parse(text: &'a [u8]) -> Option<Range<'a>> {
        let (essence, params) = match text.iter().position(|&b| b == b';') {
            Some(at) => (&text[..at], &text[at + 1..]),
            None => (text, &b""[..]),
        };
        let essence = essence.trim_ascii();
        let slash = essence.iter().position(|&b| b == b'/')?;
        let token = |part: &[u8]| !part.is_empty() && part.iter().all(|&b| is_token(b));
        if !token(&essence[..slash]) || !token(&essence[slash + 1..]) {
            return None;
        }
        let mut range = Range {
            essence,
            params,
            quality: 1000,
        };
        if let Some(q) = range.param("q") {
            range.quality = parse_quality(q)?;
        }
        Some(range)
    }

    /// Whether this is exactly `media` (`type/subtype`), in any case.
    pub fn is(&self, media: &str) -> bool {
        self.essence.eq_ignore_ascii_case(media.as_bytes())
    }

    /// The value of parameter `name` (case-insensitive name; quotes kept).
    pub fn param(&self, name: &str) -> Option<&'a [u8]> {
        self.params.split(|&b| b == b';').find_map(|param| {
            let param = param.trim_ascii();
            let eq = param.iter().position(|&b| b == b'=')?;
            param[..eq]
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_bytes())
                .then(|| param[eq + 1..].trim_ascii())
        })
    }

    /// How specifically this range matches `media`: 2 exactly, 1 as
    /// `type/*`, 0 as `*/*`; `None` when it does not.
    fn matches(&self, media: &str) -> Option<u8> {
        if self.is(media) {
            return Some(2);
        }
        if self.essence == b"*/*" {
            return Some(0);
        }
        let (kind, _) = media.split_once('/')?;
        let wildcard = self.essence.strip_suffix(b"/*")?;
        wildcard.eq_ignore_ascii_case(kind.as_bytes()).then_some(1)
    }
}

/// The ranges of an `Accept` header (unparseable ones skipped).
pub fn ranges(accept: &[u8]) -> impl Iterator<Item = Range<'_>> {
    accept.split(|&b| b == b',').filter_map(Range::parse)
}

/// What `accept` says of `media`: the weight of the most specific range
/// that matches it, and whether that range names it exactly. `None` when
/// no range matches (then the type is not acceptable).
pub fn quality(accept: &[u8], media: &str) -> Option<(Quality, bool)> {
    ranges(accept)
        .filter_map(|range| range.matches(media).map(|how| (how, range.quality)))
        .max_by_key(|(how, _)| *how)
        .map(|(how, quality)| (quality, how == 2))
}

/// Whether `accept` names `media` exactly with a weight above 0: what a
/// client asking for a form on purpose sends (`*/*` asks for none).
pub fn asks_for(accept: &[u8], media: &str) -> bool {
    matches!(quality(accept, media), Some((q, true)) if q > 0)
}

/// Whether `accept` prefers `wanted` (named exactly, weight above 0) to
/// `default`: strictly heavier, or as heavy with `default` only matched by
/// a wildcard.
pub fn prefers(accept: &[u8], wanted: &str, default: &str) -> bool {
    let Some((q, true)) = quality(accept, wanted) else {
        return false;
    };
    if q == 0 {
        return false;
    }
    match quality(accept, default) {
        None => true,
        Some((other, exact)) => q > other || (q == other && !exact),
    }
}

/// `tchar` of RFC 9110 §5.6.2, plus `*` for wildcards.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `q` as thousandths: `0`, `1`, `0.5`, `0.125`, `1.000`; anything else is
/// not a weight (the range is then ignored).
fn parse_quality(q: &[u8]) -> Option<Quality> {
    let (whole, fraction) = match q.iter().position(|&b| b == b'.') {
        Some(at) => (&q[..at], &q[at + 1..]),
        None => (q, &b""[..]),
    };
    if fraction.len() > 3 || !fraction.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let thousandths = fraction
        .iter()
        .chain(std::iter::repeat(&b'0'))
        .take(3)
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match whole {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = "application/json";
    const HTML: &str = "text/html";

    #[test]
    fn json_is_chosen_only_when_asked_for_on_purpose() {
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        let cases = [
            ("application/json", true),
            ("APPLICATION/JSON", true),
            ("Application/Json ; charset=utf-8", true),
            ("application/json, text/html;q=0.5", true),
            ("application/json, */*", true),
            ("text/html, application/json;q=0.9", false),
            ("application/json;q=0", false),
            ("application/json; q=0.000", false),
            ("application/jsonp", false),
            ("application/json-seq", false),
            ("application/*", false),
            ("*/*", false),
            ("", false),
            (browser, false),
            ("application/json;q=2", false),
            ("application/json;q=abc", false),
            ("json", false),
        ];
        for (accept, json) in cases {
            assert_eq!(prefers(accept.as_bytes(), JSON, HTML), json, "{accept:?}");
        }
    }

    #[test]
    fn the_most_specific_range_gives_the_weight() {
        assert_eq!(
            quality(b"*/*;q=0.1, application/*;q=0.5", JSON),
            Some((500, false))
        );
        assert_eq!(quality(b"application/json;q=0, */*", JSON), Some((0, true)));
        assert_eq!(quality(b"text/plain", JSON), None);
        assert!(!asks_for(
            b"application/x-tally-state;q=0",
            "application/x-tally-state"
        ));
        assert!(asks_for(
            b"application/json, Application/X-Tally-State ; q=0.9",
            "application/x-tally-state"
        ));
    }

    #[test]
    fn weights_and_parameters_parse_as_the_rfc_writes_them() {
        for (q, thousandths) in [
            ("1", 1000),
            ("1.0", 1000),
            ("0.5", 500),
            ("0.125", 125),
            ("0", 0),
        ] {
            assert_eq!(parse_quality(q.as_bytes()), Some(thousandths), "{q}");
        }
        for bad in ["1.5", "0.1234", "-0", ".5", "", "2"] {
            assert_eq!(parse_quality(bad.as_bytes()), None, "{bad}");
        }
        let range = Range::parse(b"application/x-tally-state; V=2 ;q=0.5").unwrap();
        assert_eq!(range.param("v"), Some(&b"2"[..]));
        assert_eq!(range.quality, 500);
        assert!(Range::parse(b"application").is_none());
        assert!(Range::parse(b"a b/c").is_none());
    }
}
