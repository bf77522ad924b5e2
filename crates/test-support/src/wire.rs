//! Small helpers shared by the tests' and the bench's own HTTP clients and data builders.

/// Decodes an HTTP/1.1 chunked body (chunk extensions ignored; stops at the last chunk or at
/// a truncation).
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || b.len() < size {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
    out
}

/// Deterministic incompressible bytes (xorshift64), fast enough for hundreds of MiB: layers
/// whose blob is exactly as big as asked.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_and_makes_noise() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"), b"abcde");
        assert_eq!(dechunk(b"5\r\nab"), b"");
        assert_eq!(noise(1000, 7), noise(1000, 7));
        assert_ne!(noise(64, 7), noise(64, 8));
        assert_eq!(noise(13, 1).len(), 13);
    }
}
