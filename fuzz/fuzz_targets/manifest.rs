#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    snapblk_fuzz::manifest(data);
});
