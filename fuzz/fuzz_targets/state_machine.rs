//! Arbitrary bytes as a sequence of events applied to a referral with `referral::apply`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yeongye_fuzz::state_machine(data));
