#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringtrain_fuzz::series(data);
});
