//! The RESP2 request parser over arbitrary client bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidewal::fuzzing::resp_parse(data));
