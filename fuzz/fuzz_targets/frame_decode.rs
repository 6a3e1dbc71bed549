//! Replication frames (and their payloads) over arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidewal::fuzzing::frame_decode(data));
