//! The skip-n label: how many leading layers of an added image are left out.

use std::collections::BTreeMap;

use crate::error::{Error, Result, clip};
use crate::types::SKIP_N_LABEL;

/// The number of leading layers an added image drops, from its config labels: the
/// [`SKIP_N_LABEL`] value, 0 when the label is absent.
///
/// The value is read as the reference facade reads it (Go's `strconv.ParseUint(v, 10, 16)`): an
/// unsigned 16-bit decimal, ASCII digits only (no sign, no spaces), at most 65535; anything
/// else is [`Error::InvalidSkipN`], which fails the composition. A value at or above the
/// image's layer count means "no layers".
pub fn skip_n(labels: &BTreeMap<String, String>) -> Result<usize> {
    let Some(value) = labels.get(SKIP_N_LABEL) else {
        return Ok(0);
    };
    let invalid = || Error::InvalidSkipN { value: clip(value) };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    value.parse::<u16>().map(usize::from).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: Option<&str>) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("other".to_string(), "x".to_string());
        if let Some(v) = v {
            m.insert(SKIP_N_LABEL.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn skip_n_is_zero_when_absent() {
        assert_eq!(skip_n(&labels(None)), Ok(0));
        assert_eq!(skip_n(&BTreeMap::new()), Ok(0));
    }

    #[test]
    fn skip_n_reads_unsigned_16_bit_decimals() {
        assert_eq!(skip_n(&labels(Some("0"))), Ok(0));
        assert_eq!(skip_n(&labels(Some("1"))), Ok(1));
        assert_eq!(skip_n(&labels(Some("12"))), Ok(12));
        assert_eq!(skip_n(&labels(Some("007"))), Ok(7));
        assert_eq!(skip_n(&labels(Some("65535"))), Ok(65535));
        assert_eq!(skip_n(&labels(Some("0000065535"))), Ok(65535));
    }

    #[test]
    fn skip_n_rejects_everything_else() {
        for bad in
            ["abc", "-1", "", " 1", "1 ", "1.5", "+", "+3", "+-1", "0x10", "١", "65536", "99999999999999999999999"]
        {
            let err = skip_n(&labels(Some(bad))).unwrap_err();
            assert_eq!(err, Error::InvalidSkipN { value: bad.to_string() }, "{bad:?}");
            let text = err.to_string();
            assert!(text.contains(SKIP_N_LABEL) && text.contains(&format!("{bad:?}")), "{text}");
            assert!(!err.is_retryable());
        }
    }
}
