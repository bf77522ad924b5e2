//! `Range: bytes=…` parsing (RFC 9110 §14), single ranges only.

use crate::backend::ByteRange;

/// What a `Range` header asks of a blob of known size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Send the whole blob with 200: no range, a multi-range, another unit or a header we do
    /// not understand (RFC 9110 lets a server ignore those).
    Full,
    /// Send 206 with exactly this range.
    Partial(ByteRange),
    /// Send 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Interprets one `Range` header value against a blob of `size` bytes. Pure and total.
///
/// Multi-range requests get the whole blob: stargz-snapshotter tries multi-range first and
/// copes with a 200 (containerd/stargz-snapshotter#350), which spares us multipart bodies.
/// A zero-length blob is always served whole: no 206 can describe an empty range, and a 416
/// would fail clients that always start with `bytes=0-` (containerd/containerd#12476).
pub fn parse_range(header: &str, size: u64) -> RangeOutcome {
    let Some(set) = strip_unit(header.trim()) else {
        return RangeOutcome::Full;
    };
    // Empty list elements are legal in HTTP lists ("bytes=0-1,"), so skip them.
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return RangeOutcome::Full;
    };
    if size == 0 {
        return RangeOutcome::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeOutcome::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let last_byte = size - 1;
    match (first.is_empty(), last.is_empty()) {
        // bytes=-n: the final n bytes.
        (true, false) => match number(last) {
            None => RangeOutcome::Full,
            Some(0) => RangeOutcome::Unsatisfiable,
            Some(n) => RangeOutcome::Partial(ByteRange { start: size.saturating_sub(n), end_inclusive: last_byte }),
        },
        // bytes=a-
        (false, true) => match number(first) {
            None => RangeOutcome::Full,
            Some(a) if a > last_byte => RangeOutcome::Unsatisfiable,
            Some(a) => RangeOutcome::Partial(ByteRange { start: a, end_inclusive: last_byte }),
        },
        // bytes=a-b
        (false, false) => match (number(first), number(last)) {
            (Some(a), Some(b)) if b >= a => {
                if a > last_byte {
                    RangeOutcome::Unsatisfiable
                } else {
                    RangeOutcome::Partial(ByteRange { start: a, end_inclusive: b.min(last_byte) })
                }
            }
            // last < first makes the range-spec invalid, so the header is ignored.
            _ => RangeOutcome::Full,
        },
        (true, true) => RangeOutcome::Full,
    }
}

/// The range set after `bytes=`; the unit is case-insensitive.
fn strip_unit(header: &str) -> Option<&str> {
    let (unit, rest) = header.split_once('=')?;
    unit.trim().eq_ignore_ascii_case("bytes").then_some(rest)
}

/// A non-empty run of ASCII digits. Values beyond u64 saturate: such an offset is past any
/// blob, and such a length covers all of it.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(start: u64, end_inclusive: u64) -> RangeOutcome {
        RangeOutcome::Partial(ByteRange { start, end_inclusive })
    }

    #[test]
    fn golden_table() {
        use RangeOutcome::{Full, Unsatisfiable};
        let cases: &[(&str, u64, RangeOutcome)] = &[
            ("bytes=0-9", 100, partial(0, 9)),
            ("bytes=10-19", 100, partial(10, 19)),
            ("bytes=90-200", 100, partial(90, 99)),
            ("bytes=99-99", 100, partial(99, 99)),
            ("bytes=100-200", 100, Unsatisfiable),
            ("bytes=10-", 100, partial(10, 99)),
            ("bytes=99-", 100, partial(99, 99)),
            ("bytes=100-", 100, Unsatisfiable),
            // containerd 2.1 parallel fetch (containerd/containerd#12476)
            ("bytes=0-", 100, partial(0, 99)),
            ("bytes=-10", 100, partial(90, 99)),
            ("bytes=-100", 100, partial(0, 99)),
            ("bytes=-1000", 100, partial(0, 99)),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-0", 1, partial(0, 0)),
            ("bytes=1-", 1, Unsatisfiable),
            ("BYTES=1-2", 100, partial(1, 2)),
            (" bytes = 1 - 2 ", 100, partial(1, 2)),
            ("bytes=1-2,", 100, partial(1, 2)),
            ("bytes=0-1,5-6", 100, Full),
            ("bytes=0-1, 200-300", 100, Full),
            ("bytes=5-1", 100, Full),
            ("bytes=-", 100, Full),
            ("bytes=", 100, Full),
            ("bytes=a-b", 100, Full),
            ("bytes=+1-2", 100, Full),
            ("bytes=1-2-3", 100, Full),
            ("bytes=0x1-2", 100, Full),
            ("items=0-1", 100, Full),
            ("0-1", 100, Full),
            ("", 100, Full),
            ("bytes=0-", 0, Full),
            ("bytes=-1", 0, Full),
            ("bytes=5-", 0, Full),
            ("bytes=99999999999999999999999-", 100, Unsatisfiable),
            ("bytes=0-99999999999999999999999", 100, partial(0, 99)),
            ("bytes=-99999999999999999999999", 100, partial(0, 99)),
            ("bytes=18446744073709551615-", u64::MAX, Unsatisfiable),
            ("bytes=18446744073709551614-", u64::MAX, partial(u64::MAX - 1, u64::MAX - 1)),
        ];
        for (header, size, want) in cases {
            assert_eq!(parse_range(header, *size), *want, "{header:?} of {size}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_stays_within_size(header in ".{0,40}", size in 0u64..1_000_000) {
            if let RangeOutcome::Partial(r) = parse_range(&header, size) {
                proptest::prop_assert!(r.end_inclusive >= r.start);
                proptest::prop_assert!(r.end_inclusive < size);
            }
        }

        #[test]
        fn well_formed_ranges_stay_within_size(
            a in proptest::option::of(0u64..2_000),
            b in proptest::option::of(0u64..2_000),
            size in 0u64..1_500,
        ) {
            let header = format!(
                "bytes={}-{}",
                a.map(|v| v.to_string()).unwrap_or_default(),
                b.map(|v| v.to_string()).unwrap_or_default()
            );
            match parse_range(&header, size) {
                RangeOutcome::Partial(r) => {
                    proptest::prop_assert!(r.start <= r.end_inclusive && r.end_inclusive < size);
                    if let Some(a) = a {
                        proptest::prop_assert_eq!(r.start, a);
                    }
                }
                RangeOutcome::Unsatisfiable => proptest::prop_assert!(size > 0),
                RangeOutcome::Full => {}
            }
        }
    }
}
