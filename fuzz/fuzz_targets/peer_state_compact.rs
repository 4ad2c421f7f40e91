//! A sibling's peer state in the compact form: decode, re-encode, merge checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tally::fuzz::peer_state_compact(data));
