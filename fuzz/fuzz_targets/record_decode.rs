//! The record decoder over arbitrary bytes and expectations.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidewal::fuzzing::record_decode(data));
