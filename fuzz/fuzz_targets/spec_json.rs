//! Spec files (`fixedSpecFN`) and single specs in protobuf-JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = facade_spec::FixedSpecProvider::parse(s);
    if let Ok(v) = serde_json_value(s) {
        if let Ok(spec) = facade_spec::ImageSpec::from_json_value("ws", v) {
            let _ = spec.fingerprint();
        }
    }
});

fn serde_json_value(s: &str) -> Result<serde_json::Value, ()> {
    serde_json::from_str(s).map_err(|_| ())
}
