//! The config file: parse and validate; errors name the key.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tally::fuzz::config_file(data));
