//! Arbitrary bytes on an inbound subject, through the broker's `ingest::read`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yeongye_fuzz::envelope(data));
