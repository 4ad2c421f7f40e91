//! The store's checksummed files: decode, round-trip, damage refused.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tally::fuzz::store_file(data));
