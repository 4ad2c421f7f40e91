//! A sibling's peer state: decode, merge checks, merge invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tally::fuzz::peer_state(data));
