//! The properties checked on every decoder that reads bytes from outside:
//! a sibling's peer state, the store's files and the config file.
//!
//! Each check takes arbitrary bytes and panics when a property fails; a
//! decoder refusing the bytes is fine, a panic or a broken invariant is not.
//! The cargo-fuzz targets in `fuzz/` call these functions, and the property
//! tests below call them with generated inputs on every `cargo test`, so the
//! properties are written once. Compiled only for tests and fuzzing builds
//! (cargo-fuzz sets `--cfg fuzzing`); the service never contains it.
//!
//! [`seeds`] makes the committed seed corpus (`fuzz/seeds/<target>/`) with
//! the real encoders and [`dictionary`] the tokens libFuzzer splices in
//! (`fuzz/dicts/<target>.dict`); a test keeps the files equal to them.

use std::path::Path;

use crate::config::{Config, ConfigError, ConfigFile, Source};
use crate::merge::{Counter, Entry};
use crate::peers::persist::{StoredEntry, StoredPeers};
use crate::peers::wire::{self, Encoding, PeerState};
use crate::store::StoredState;
use crate::store::file;
use crate::store::format::{self, Decoded, SlotWriter};

/// The pod that receives the fuzzed peer states, and its own count.
fn receiver() -> Entry {
    Entry {
        pod: "tally-0".into(),
        incarnation: "fuzz".into(),
        count: 1000,
        seen_unix: 0,
    }
}

/// When the receiver absorbs a state (fixed, so absorbing twice is the same).
const NOW: u64 = 1_700_000_000;

/// Decodes one or two peer states (a NUL byte, which JSON never contains,
/// separates them) with the one decoder ([`wire::decode_state`]: parse and
/// context-free checks), merges them ([`Counter::absorb`]) and asserts what
/// the cluster total relies on: a refused state changes nothing; an
/// accepted one only raises counts (or retires them), never takes a value
/// for the receiver's own counter, and keeps the total summable; absorbing
/// it again changes nothing (idempotent); two states absorbed in either
/// order give one result (commutative); a state decodes to the same thing
/// after a re-encode.
pub fn peer_state(data: &[u8]) {
    let states: Vec<PeerState> = data
        .splitn(2, |&b| b == 0)
        .filter_map(|part| wire::decode_state(Encoding::Json, part).ok())
        .collect();
    for state in &states {
        let again = serde_json::to_vec(state).expect("a decoded state encodes");
        assert_eq!(
            wire::decode_state(Encoding::Json, &again).ok().as_ref(),
            Some(state),
            "re-encoded state decodes differently"
        );
    }
    let me = receiver();
    let start = Counter::default();
    let after_each: Vec<Option<Counter>> = states
        .iter()
        .map(|s| absorb_checked(&start, s, &me))
        .collect();
    if let [a, b] = &states[..] {
        let ab = after_each[0]
            .as_ref()
            .and_then(|c| absorb_checked(c, b, &me));
        let ba = after_each[1]
            .as_ref()
            .and_then(|c| absorb_checked(c, a, &me));
        if let (Some(ab), Some(ba)) = (ab, ba) {
            assert_eq!(ab, ba, "absorbing two states depends on their order");
        }
    }
}

/// A sibling's peer state in the compact form siblings fetch
/// ([`compact`](crate::peers::compact)): any bytes decode or are refused
/// without a panic or an allocation they did not pay for; a decoded state
/// re-encodes, in either encoding, to bytes that decode to the same state
/// (the two forms carry the same thing); and merging it holds what
/// [`peer_state`] checks of one state.
pub fn peer_state_compact(data: &[u8]) {
    let Ok(state) = wire::decode_state(Encoding::Compact, data) else {
        return;
    };
    for encoding in [Encoding::Compact, Encoding::Json] {
        assert_eq!(
            wire::decode_state(encoding, &encoding.encode(&state)).as_ref(),
            Ok(&state),
            "re-encoded as {encoding:?}, the state decodes differently"
        );
    }
    absorb_checked(&Counter::default(), &state, &receiver());
}

/// Structure-aware peer states for [`peer_state`]: the bytes pick two
/// senders, their entries' keys from a few pods and incarnations (the
/// receiver's own among them) and raw little-endian `u64` counts, so a
/// count near `u64::MAX` is one mutation away (as JSON digits it takes
/// twenty right ones). The real encoder writes the states.
pub fn peer_merge(data: &[u8]) {
    const PODS: [&str; 4] = ["tally-0", "tally-1", "tally-2", "tally-3"];
    const INCARNATIONS: [&str; 2] = ["fuzz", "a1"];
    let key = |b: u8| {
        (
            PODS[usize::from(b % 4)],
            INCARNATIONS[usize::from(b / 4 % 2)],
        )
    };
    let mut bytes = data.iter().copied();
    let mut encoded = Vec::new();
    while encoded.len() < 2
        && let Some(head) = bytes.next()
    {
        let (pod, incarnation) = key(head);
        let entries = (0..head / 8 % 6)
            .map_while(|_| {
                let (pod, incarnation) = key(bytes.next()?);
                let mut count = [0; 8];
                count
                    .iter_mut()
                    .for_each(|b| *b = bytes.next().unwrap_or(0));
                Some(Entry {
                    pod: pod.into(),
                    incarnation: incarnation.into(),
                    count: u64::from_le_bytes(count),
                    seen_unix: NOW,
                })
            })
            .collect();
        let state = PeerState {
            pod: pod.into(),
            incarnation: incarnation.into(),
            entries,
            retired: Vec::new(),
            announce: None,
            news: Vec::new(),
        };
        encoded.push(serde_json::to_vec(&state).expect("encodes"));
    }
    peer_state(&encoded.join(&0));
}

/// Absorbs `state` into a copy of `before`, asserts the single-state
/// properties, and returns the result when the state was accepted.
fn absorb_checked(before: &Counter, state: &PeerState, me: &Entry) -> Option<Counter> {
    let answered = std::collections::BTreeMap::new();
    let absorb = |counter: &mut Counter| counter.absorb(state, &me.key(), me.count, &answered, NOW);
    let mut after = before.clone();
    if absorb(&mut after).is_err() {
        assert_eq!(&after, before, "a refused state changed the counter");
        return None;
    }
    assert!(after.total_checked().is_some(), "the total overflowed");
    for old in before.entries() {
        if after.is_retired(&old.key()) {
            continue;
        }
        let now = after.get(&old.key()).expect("an entry disappeared");
        assert!(now.count >= old.count, "{old:?} went down to {now:?}");
    }
    for e in &state.entries {
        if e.key() == me.key() {
            assert_eq!(
                after.get(&e.key()),
                before.get(&e.key()),
                "a relay changed the receiver's own counter"
            );
            continue;
        }
        if after.is_retired(&e.key()) {
            continue;
        }
        let known = after.get(&e.key()).expect("an accepted entry is missing");
        assert!(known.count >= e.count, "{e:?} merged as {known:?}");
    }
    let mut twice = after.clone();
    let again = absorb(&mut twice).expect("a state accepted once is accepted again");
    assert!(
        !again.changed && twice == after,
        "absorbing the same state twice changed the counter"
    );
    Some(after)
}

/// The store's files: `visits.state` in every format tally wrote, through
/// the store's one decoder ([`format::decode`]), and the checksummed framing
/// `peers.state` uses ([`file::decode`]) with its body. Any bytes decode or
/// are refused without a panic; a decoded state re-encodes (v1 with the
/// framing, v2 with the store's [`SlotWriter`]) to a file that decodes to
/// the same state; any body round-trips the framing; a cut-short or
/// bit-flipped framed file is refused (a flip may only turn a header's hex
/// digit to the other case).
pub fn store_file(data: &[u8]) {
    match format::decode(data) {
        Ok(Decoded::V1(state)) => {
            let again = file::encode(&serde_json::to_vec(&state).expect("encodes"));
            assert_eq!(format::decode(&again), Ok(Decoded::V1(state)));
        }
        Ok(Decoded::V2 { state, seq, .. }) => {
            // `image` writes commits seq - 1 and seq, so it needs seq >= 1.
            let seq = seq.max(1);
            let mut writer = SlotWriter::new(&state).expect("a decoded state fits a slot again");
            let image = writer.image(seq, state.count);
            let expected = Decoded::V2 {
                state,
                seq,
                other_invalid: None,
            };
            assert_eq!(format::decode(&image), Ok(expected));
        }
        Err(_) => {}
    }
    if let Ok(body) = file::decode(data) {
        assert_eq!(file::decode(&file::encode(&body)), Ok(body.clone()));
        if let Ok(peers) = serde_json::from_slice::<StoredPeers>(&body) {
            let again = file::encode(&serde_json::to_vec(&peers).expect("encodes"));
            let back = file::decode(&again).expect("a fresh encoding decodes");
            let back: StoredPeers = serde_json::from_slice(&back).expect("decodes");
            assert_eq!(back.entries, peers.entries);
        }
    }
    let encoded = file::encode(data);
    assert_eq!(file::decode(&encoded).as_deref(), Ok(data));
    // One cut and one flipped bit, at places the input picks.
    let pick = crc32fast::hash(data) as usize;
    let cut = pick % encoded.len();
    assert!(
        file::decode(&encoded[..cut]).is_err(),
        "a file cut to {cut} bytes was accepted"
    );
    let mut flipped = encoded.clone();
    flipped[cut] ^= 1 << (pick / encoded.len() % 8);
    if let Ok(body) = file::decode(&flipped) {
        assert_eq!(
            body, data,
            "a flipped bit at {cut} changed the body unnoticed"
        );
    }
}

/// The config file parser and the validation of what it read: any bytes
/// parse or are refused without a panic, and every error names the file,
/// plus the key when one is at fault. With the pod name from the
/// environment (as the chart sets it) and everything else from the file or
/// the defaults, a refused value is always the file's, and is named so.
pub fn config_file(data: &[u8]) {
    let path = Path::new("fuzz-config.json");
    let file = match ConfigFile::parse(path, data) {
        Ok(file) => file,
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains("fuzz-config.json"), "{message}");
            match error {
                ConfigError::UnknownKey { key, .. }
                | ConfigError::DuplicateKey { key, .. }
                | ConfigError::FileValue { key, .. } => {
                    assert!(message.contains(&format!("`{key}`")), "{message}")
                }
                ConfigError::WrongType { key, .. } => {
                    assert!(message.contains(&format!("`{key}`")), "{message}")
                }
                ConfigError::FileSyntax { .. } | ConfigError::FileNotUtf8 { .. } => {}
                other => panic!("parsing bytes cannot fail with {other:?}"),
            }
            return;
        }
    };
    let from_env = !file.values.contains_key("pod_name");
    let env = move |key: &str| (from_env && key == "POD_NAME").then(|| "tally-0".to_string());
    match Config::resolve(&[], &env, Some(&file)) {
        Ok(config) => {
            for (key, value, source) in &config.provenance {
                if let Some(given) = file.values.get(*key) {
                    assert_eq!((given, source), (value, &Source::File(path.into())));
                }
            }
        }
        Err(ConfigError::Invalid {
            key,
            value,
            origin,
            reason,
        }) => {
            assert_eq!(
                origin,
                Source::File(path.into()),
                "{key}={value:?}: {reason}"
            );
            assert_eq!(file.values.get(key), Some(&value));
        }
        Err(other) => panic!("validation cannot fail with {other:?}"),
    }
}

/// The committed seed corpus: `(target, file name, bytes)`. Valid examples
/// come from the real encoders, plus the edge cases each decoder must
/// refuse or survive.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let entry = |pod: &str, incarnation: &str, count| Entry {
        pod: pod.into(),
        incarnation: incarnation.into(),
        count,
        seen_unix: NOW,
    };
    let state = |pod: &str, incarnation: &str, entries: Vec<Entry>| {
        serde_json::to_vec(&PeerState {
            pod: pod.into(),
            incarnation: incarnation.into(),
            entries,
            retired: Vec::new(),
            announce: None,
            news: Vec::new(),
        })
        .expect("encodes")
    };
    let json = |s: &str| s.as_bytes().to_vec();
    let two = |a: Vec<u8>, b: Vec<u8>| [a, vec![0], b].concat();
    let honest = state(
        "tally-1",
        "a1",
        vec![entry("tally-1", "a1", 40), entry("tally-2", "b2", 7)],
    );
    let other = state(
        "tally-2",
        "b2",
        vec![entry("tally-2", "b2", 9), entry("tally-0", "fuzz", 3)],
    );
    let mut out = vec![
        ("peer_state", "honest".into(), honest.clone()),
        (
            "peer_state",
            "two-siblings".into(),
            two(honest.clone(), other),
        ),
        (
            "peer_state",
            "regression".into(),
            two(
                honest,
                state("tally-1", "a1", vec![entry("tally-1", "a1", 39)]),
            ),
        ),
        (
            "peer_state",
            "forged-self".into(),
            state(
                "tally-3",
                "c3",
                vec![entry("tally-3", "c3", 1), entry("tally-0", "fuzz", 1001)],
            ),
        ),
        (
            "peer_state",
            "bad-name".into(),
            state(
                "tally-1",
                "a1",
                vec![entry("tally-1", "a1", 1), entry("<b>", "x", 1)],
            ),
        ),
        ("peer_state", "not-json".into(), json("{\"pod\":")),
    ];
    let compact = |json: &[u8]| {
        let state = wire::decode_state(Encoding::Json, json).expect("a valid seed");
        Encoding::Compact.encode(&state)
    };
    let honest_compact = compact(&out[0].2);
    let forged_compact = compact(&out[3].2);
    out.extend([
        (
            "peer_state_compact",
            "honest".into(),
            honest_compact.clone(),
        ),
        ("peer_state_compact", "forged-self".into(), forged_compact),
        (
            "peer_state_compact",
            "truncated".into(),
            honest_compact[..honest_compact.len() - 3].to_vec(),
        ),
    ]);
    // peer_merge: per state a head byte (sender = key byte, entries =
    // head / 8 % 6), then per entry a key byte and eight count bytes.
    let merge_seed = |states: &[(u8, &[(u8, u64)])]| -> Vec<u8> {
        let mut bytes = Vec::new();
        for (sender, entries) in states {
            bytes.push(sender + 8 * entries.len() as u8);
            for (key, count) in *entries {
                bytes.push(*key);
                bytes.extend_from_slice(&count.to_le_bytes());
            }
        }
        bytes
    };
    // Key bytes: pod = b % 4, incarnation = b / 4 % 2 ("fuzz", "a1").
    let (t1_a1, t2_fuzz, t0_fuzz) = (5, 2, 0);
    out.extend([
        (
            "peer_merge",
            "two-siblings".into(),
            merge_seed(&[
                (t1_a1, &[(t1_a1, 40), (t2_fuzz, 7)]),
                (t2_fuzz, &[(t2_fuzz, 9), (t0_fuzz, 3)]),
            ]),
        ),
        (
            "peer_merge",
            "near-max".into(),
            merge_seed(&[(t1_a1, &[(t1_a1, u64::MAX - 1), (t2_fuzz, 5)])]),
        ),
    ]);
    let stored = StoredState {
        incarnation: "9f0c3a".into(),
        count: 42,
        pod: "tally-0".into(),
        created_unix: NOW,
    };
    let v1_body = serde_json::to_vec(&stored).expect("encodes");
    let v1 = file::encode(&v1_body);
    let v2 = SlotWriter::new(&stored)
        .expect("fits a slot")
        .image(7, stored.count);
    let mut torn = v2.clone();
    torn[format::offset(7) as usize + 30] ^= 0x40;
    let stored_entry = |pod: &str, incarnation: &str, count| StoredEntry {
        pod: pod.into(),
        incarnation: incarnation.into(),
        count,
        seen_unix: NOW,
        first_hand: None,
    };
    let peers = serde_json::to_vec(&StoredPeers {
        entries: vec![
            stored_entry("tally-1", "a1", 40),
            stored_entry("tally-2", "b2", 7),
        ],
        retired: Vec::new(),
    })
    .expect("encodes");
    out.extend([
        ("store_file", "visits-v2".into(), v2),
        ("store_file", "visits-v2-torn".into(), torn),
        ("store_file", "visits-v1".into(), v1.clone()),
        ("store_file", "peers".into(), file::encode(&peers)),
        ("store_file", "empty-body".into(), file::encode(b"")),
        (
            "store_file",
            "truncated".into(),
            v1[..v1.len() - 1].to_vec(),
        ),
        ("store_file", "no-header".into(), v1_body),
    ]);
    out.extend([
        (
            "config_file",
            "chart".into(),
            json(r#"{"timezone":"Europe/Paris","peer_timeout_ms":300,"durability":"group-commit","log_format":"json"}"#),
        ),
        ("config_file", "unknown-key".into(), json(r#"{"listne":"x"}"#)),
        ("config_file", "bad-value".into(), json(r#"{"max_connections":0}"#)),
        ("config_file", "nested".into(), json(r#"{"listen":[1]}"#)),
        ("config_file", "duplicate-key".into(), json(r#"{"timezone":"UTC","timezone":"UTC"}"#)),
        ("config_file", "string-for-number".into(), json(r#"{"max_connections":"10"}"#)),
        ("config_file", "log-filter".into(), json(r#"{"log_level":"tally[span{x=1}]=debug"}"#)),
    ]);
    out
}

/// Tokens of each target's format, for libFuzzer's `-dict`: JSON keys and
/// values it would take long to guess byte by byte.
pub fn dictionary(target: &str) -> String {
    let quoted =
        |words: &[&str]| -> Vec<String> { words.iter().map(|w| format!("\\\"{w}\\\"")).collect() };
    let mut tokens = match target {
        "peer_state" => quoted(&["pod", "incarnation", "entries", "count", "seen_unix"]),
        "peer_state_compact" => Vec::new(),
        "store_file" => quoted(&["incarnation", "count", "pod", "created_unix", "entries"]),
        "config_file" => quoted(
            &crate::config::SETTINGS
                .iter()
                .map(|s| s.key)
                .collect::<Vec<_>>(),
        ),
        other => panic!("no dictionary for {other}"),
    };
    let plain: &[&str] = match target {
        "peer_state" => &["tally-0", "fuzz", "18446744073709551615", "\\x00"],
        "peer_state_compact" => &["TALLY\\x01", "tally-0", "fuzz", "\\xff\\xff\\xff\\xff"],
        "store_file" => &["TALLYVS2", "tally-state v1 ", "crc32=", "len=", "\\x0A"],
        _ => &[
            "group-commit",
            "periodic",
            "UTC",
            "Europe/Paris",
            "json",
            "info",
            "0.0.0.0:8080",
        ],
    };
    tokens.extend(plain.iter().map(|t| t.to_string()));
    tokens.iter().map(|t| format!("\"{t}\"\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Names mostly from a small set, so generated states share keys and
    /// exercise the merge, sometimes anything at all.
    fn name(known: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(known).prop_map(str::to_string),
            1 => ".{0,8}",
        ]
    }

    /// Counts near zero, near each other and near `u64::MAX`.
    fn count() -> impl Strategy<Value = u64> {
        prop_oneof![
            0..2000u64,
            any::<u64>(),
            (0..8u64).prop_map(|d| u64::MAX - d)
        ]
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            name(&["tally-0", "tally-1", "tally-2"]),
            name(&["fuzz", "a1", "b2"]),
            count(),
            any::<u64>(),
        )
            .prop_map(|(pod, incarnation, count, seen_unix)| Entry {
                pod,
                incarnation,
                count,
                seen_unix,
            })
    }

    /// A peer state as JSON, mostly one whose sender lists itself, with
    /// sometimes a tombstone (for one of its entries or another key).
    fn state_json() -> impl Strategy<Value = Vec<u8>> {
        (
            entry(),
            proptest::collection::vec(entry(), 0..5),
            any::<bool>(),
            proptest::option::of(entry()),
        )
            .prop_map(|(own, mut entries, lists_itself, tombstone)| {
                if lists_itself {
                    entries.push(own.clone());
                }
                let retired = tombstone
                    .map(|t| {
                        let target = entries
                            .first()
                            .cloned()
                            .filter(|_| t.count % 2 == 0)
                            .unwrap_or(t);
                        wire::Retired {
                            pod: target.pod,
                            incarnation: target.incarnation,
                            count: target.count,
                        }
                    })
                    .into_iter()
                    .collect();
                serde_json::to_vec(&PeerState {
                    pod: own.pod,
                    incarnation: own.incarnation,
                    entries,
                    retired,
                    announce: None,
                    news: Vec::new(),
                })
                .expect("encodes")
            })
    }

    /// A config file: known keys (and a wrong one) with values of every type.
    fn config_json() -> impl Strategy<Value = Vec<u8>> {
        let keys: Vec<&'static str> = crate::config::SETTINGS
            .iter()
            .map(|s| s.key)
            .chain(["listne"])
            .collect();
        let value = prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
            "[ -~]{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::json!(["x"])),
        ];
        proptest::collection::btree_map(proptest::sample::select(keys), value, 0..4).prop_map(
            |map| {
                let object: serde_json::Map<_, _> =
                    map.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                serde_json::to_vec(&object).expect("encodes")
            },
        )
    }

    proptest! {
        #[test]
        fn peer_states_merge_safely(a in state_json(), b in state_json(), pair in any::<bool>()) {
            peer_state(&if pair { [a, vec![0], b].concat() } else { a });
        }

        #[test]
        fn peer_merges_of_any_counts_hold(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            peer_merge(&bytes);
        }

        #[test]
        fn compact_peer_states_merge_safely(a in state_json()) {
            if let Ok(state) = wire::decode_state(Encoding::Json, &a) {
                peer_state_compact(&Encoding::Compact.encode(&state));
            }
        }

        #[test]
        fn compact_peer_state_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            peer_state_compact(&bytes);
            let mut good = Encoding::Compact.encode(&wire::decode_state(
                Encoding::Json,
                &seeds()[0].2,
            ).expect("a valid seed"));
            peer_state_compact(&good[..cut.index(good.len())]);
            let at = flip.0.index(good.len());
            good[at] ^= flip.1;
            peer_state_compact(&good);
        }

        #[test]
        fn peer_state_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            peer_state(&bytes);
        }

        #[test]
        fn store_files_round_trip_and_refuse_damage(
            body in proptest::collection::vec(any::<u8>(), 0..200),
            incarnation in "[0-9a-f]{0,32}",
            count in any::<u64>(),
            seq in 1..u64::MAX,
            flip in any::<(usize, u8)>(),
        ) {
            store_file(&body);
            let state = StoredState { incarnation, count, pod: "tally-0".into(), created_unix: NOW };
            store_file(&file::encode(&serde_json::to_vec(&state).expect("encodes")));
            let mut image = SlotWriter::new(&state).expect("fits").image(seq, count);
            store_file(&image);
            let at = flip.0 % image.len();
            image[at] ^= flip.1;
            store_file(&image);
        }

        #[test]
        fn config_files_name_what_is_wrong(text in config_json()) {
            config_file(&text);
        }

        #[test]
        fn config_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            config_file(&bytes);
        }
    }

    /// The committed corpus and dictionaries are what [`seeds`] and
    /// [`dictionary`] make, file for file; `TALLY_WRITE_SEEDS=1` rewrites
    /// them after a format change. Every seed also passes its check.
    #[test]
    fn seed_corpus_is_current_and_passes() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut want: Vec<(std::path::PathBuf, Vec<u8>)> = Vec::new();
        for (target, name, bytes) in seeds() {
            match target {
                "peer_state" => peer_state(&bytes),
                "peer_state_compact" => peer_state_compact(&bytes),
                "peer_merge" => peer_merge(&bytes),
                "store_file" => store_file(&bytes),
                "config_file" => config_file(&bytes),
                other => panic!("no check for {other}"),
            }
            want.push((fuzz.join("seeds").join(target).join(name), bytes));
        }
        for target in [
            "peer_state",
            "peer_state_compact",
            "store_file",
            "config_file",
        ] {
            let dict = fuzz.join("dicts").join(format!("{target}.dict"));
            want.push((dict, dictionary(target).into_bytes()));
        }
        if std::env::var_os("TALLY_WRITE_SEEDS").is_some() {
            for dir in ["seeds", "dicts"] {
                let _ = std::fs::remove_dir_all(fuzz.join(dir));
            }
            for (path, bytes) in &want {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, bytes).unwrap();
            }
        }
        let stale = "run TALLY_WRITE_SEEDS=1 cargo test -p tally --lib seed_corpus";
        let mut committed = Vec::new();
        for dir in ["seeds", "dicts"] {
            let mut stack = vec![fuzz.join(dir)];
            while let Some(dir) = stack.pop() {
                for item in std::fs::read_dir(&dir).unwrap() {
                    let path = item.unwrap().path();
                    if path.is_dir() {
                        stack.push(path);
                    } else {
                        committed.push(path);
                    }
                }
            }
        }
        committed.sort();
        want.sort();
        let names: Vec<_> = want.iter().map(|(path, _)| path.clone()).collect();
        assert_eq!(committed, names, "{stale}");
        for (path, bytes) in want {
            let on_disk = std::fs::read(&path).unwrap();
            assert!(on_disk == bytes, "{} is stale: {stale}", path.display());
        }
    }
}
