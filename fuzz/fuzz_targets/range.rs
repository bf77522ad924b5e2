//! Range headers: a partial range always lies inside the blob.
#![no_main]
use facade_server::{RangeOutcome, parse_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8])) >> (data[0] % 64);
    let Ok(h) = std::str::from_utf8(&data[8..]) else { return };
    if let RangeOutcome::Partial(r) = parse_range(h, size) {
        assert!(r.start <= r.end_inclusive && r.end_inclusive < size);
    }
});
