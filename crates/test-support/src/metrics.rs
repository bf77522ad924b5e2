//! Reading Prometheus text exposition (what `/metrics` answers) in tests.

/// One sample: metric name, labels in the order written, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// `(label, value)` pairs, unescaped.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// Every sample of `text`; comment lines and lines that do not parse are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(parse_line).collect()
}

/// Sum of the samples of `name` whose labels include every `key="value"` of `labels` (all of
/// them when `labels` is empty); 0 when there is none.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(text, name, labels).iter().map(|s| s.value).sum()
}

/// Like [`value`], but `None` when no sample matches (a series that is missing, not zero).
pub fn find(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let m = matching(text, name, labels);
    (!m.is_empty()).then(|| m.iter().map(|s| s.value).sum())
}

/// [`find`] with the series written as Prometheus does: `name` or `name{k="v",...}`.
pub fn series(text: &str, series: &str) -> Option<f64> {
    let want = parse_line(&format!("{series} 0"))?;
    let labels: Vec<(&str, &str)> = want.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    find(text, &want.name, &labels)
}

fn matching(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
    samples(text)
        .into_iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v)))
        .collect()
}

/// Parses `name{k="v",...} value [timestamp]`.
fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let (labels, rest) = if let Some(body) = rest.strip_prefix('{') { parse_labels(body)? } else { (Vec::new(), rest) };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name: name.to_string(), labels, value })
}

/// The label set after `{`, up to and including `}`; returns the pairs and what follows.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x_total X.\n# TYPE x_total counter\n\
        x_total{outcome=\"ok\",store=\"ipfs\"} 3\n\
        x_total{outcome=\"error\",store=\"ipfs\"} 1\n\
        x_total{outcome=\"ok\",store=\"local\"} 2\n\
        y 4.5\n\
        z{path=\"a,b=\\\"c\\\"\"} 7 1700000000\n";

    #[test]
    fn sums_by_label_subset_and_tells_missing_from_zero() {
        assert_eq!(value(TEXT, "x_total", &[]), 6.0);
        assert_eq!(value(TEXT, "x_total", &[("outcome", "ok")]), 5.0);
        assert_eq!(value(TEXT, "x_total", &[("outcome", "ok"), ("store", "ipfs")]), 3.0);
        assert_eq!(value(TEXT, "y", &[]), 4.5);
        assert_eq!(value(TEXT, "x", &[]), 0.0);
        assert_eq!(find(TEXT, "x", &[]), None);
        assert_eq!(find(TEXT, "x_total", &[("store", "local")]), Some(2.0));
        assert_eq!(find(TEXT, "z", &[("path", "a,b=\"c\"")]), Some(7.0));
        assert_eq!(series(TEXT, r#"x_total{outcome="error",store="ipfs"}"#), Some(1.0));
        assert_eq!(series(TEXT, "y"), Some(4.5));
        assert_eq!(series(TEXT, r#"x_total{store="nowhere"}"#), None);
    }
}
