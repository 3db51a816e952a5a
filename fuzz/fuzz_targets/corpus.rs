#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringtrain_fuzz::corpus(data);
});
