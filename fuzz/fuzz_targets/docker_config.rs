//! docker config.json credential files (`dockerAuth`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(a) = facade_upstream::DockerAuth::parse(s) {
        let _ = a.lookup("docker.io");
        let _ = a.lookup("127.0.0.1:5000");
    }
});
