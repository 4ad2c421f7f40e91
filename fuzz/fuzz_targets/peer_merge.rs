//! Peer states built from raw bytes (counts near u64::MAX are easy), then merged and checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tally::fuzz::peer_merge(data));
