//! Start and drive the real tally binary in tests.
