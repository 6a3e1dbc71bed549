//! Segment scanning and the recovery decision table over arbitrary segment bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidewal::fuzzing::recovery_scan(data));
