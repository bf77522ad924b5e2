//! WWW-Authenticate challenges from upstream registries.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    for c in facade_upstream::challenge::parse(&s) {
        let _ = c.param("realm");
    }
});
