//! `WWW-Authenticate` parsing (RFC 9110 §11.6.1): several challenges per header, parameters
//! with quoted strings that may hold commas, `=` and escaped quotes. Upstream text is
//! untrusted: the parser never panics and keeps whatever it can make sense of.

/// One authentication challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lowercased (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters in order; names lowercased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Cap on what one header can make us allocate; real challenges have a handful of params.
const MAX_PARAMS: usize = 64;

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }

    /// A quoted string; the cursor is on the opening quote. An unterminated string runs to the
    /// end of the header.
    fn quoted(&mut self) -> String {
        self.pos += 1;
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.pos += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A parameter value: quoted string, or token (token68-style trailing `=` included).
    fn value(&mut self) -> String {
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.pos;
        while self.peek().is_some_and(|b| is_tchar(b) || b == b'/' || b == b'=' || b == b':') {
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }
}

/// Parses one or more `WWW-Authenticate` header values into challenges.
pub fn parse(header: &str) -> Vec<Challenge> {
    let mut cur = Cursor { s: header.as_bytes(), pos: 0 };
    let mut out: Vec<Challenge> = Vec::new();
    let mut current: Option<Challenge> = None;
    loop {
        while matches!(cur.peek(), Some(b' ' | b'\t' | b',')) {
            cur.pos += 1;
        }
        if cur.peek().is_none() {
            break;
        }
        let name = cur.token();
        if name.is_empty() {
            // Not a token: skip the byte and resynchronize on the next one.
            cur.pos += 1;
            continue;
        }
        cur.skip_ws();
        if cur.peek() == Some(b'=') {
            cur.pos += 1;
            cur.skip_ws();
            let value = cur.value();
            if let Some(c) = current.as_mut()
                && c.params.len() < MAX_PARAMS
            {
                c.params.push((name.to_ascii_lowercase(), value));
            }
            continue;
        }
        if let Some(c) = current.take() {
            out.push(c);
        }
        if out.len() >= MAX_PARAMS {
            break;
        }
        current = Some(Challenge { scheme: name.to_ascii_lowercase(), params: Vec::new() });
    }
    if let Some(c) = current {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        }
    }

    #[test]
    fn parses_distribution_bearer() {
        let got = parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
        );
        assert_eq!(
            got,
            vec![ch(
                "bearer",
                &[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/ubuntu:pull"),
                ]
            )]
        );
        assert_eq!(got[0].param("REALM"), Some("https://auth.docker.io/token"));
    }

    #[test]
    fn keeps_commas_and_escapes_inside_quotes() {
        let got = parse(
            r#"Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull,push",error="insufficient_scope", note="say \"hi\", ok""#,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].param("scope"), Some("repository:a/b:pull,push"));
        assert_eq!(got[0].param("error"), Some("insufficient_scope"));
        assert_eq!(got[0].param("note"), Some(r#"say "hi", ok"#));
    }

    #[test]
    fn parses_several_challenges_and_unquoted_values() {
        let got = parse(r#"Basic realm="Registry Realm", Bearer realm=https://x/t , service = s, Negotiate abc=="#);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], ch("basic", &[("realm", "Registry Realm")]));
        assert_eq!(got[1], ch("bearer", &[("realm", "https://x/t"), ("service", "s")]));
        assert_eq!(got[2].scheme, "negotiate");
        assert_eq!(parse("Basic"), vec![ch("basic", &[])]);
        assert_eq!(parse("bAsIc ReAlM=x"), vec![ch("basic", &[("realm", "x")])]);
    }

    #[test]
    fn survives_garbage() {
        for g in [
            "",
            ",,,",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            "Bearer =x",
            "realm=\"x\"",
            "\\\\\"",
            "Bearer realm=\"a\\",
            "é ü =\"",
            "Bearer ,,, realm",
        ] {
            let _ = parse(g);
        }
        assert_eq!(parse("Bearer realm=\"unterminated").first().and_then(|c| c.param("realm")), Some("unterminated"));
        assert!(parse("realm=\"x\"").is_empty());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn never_panics_on_header_like_text(s in r#"(Bearer|Basic|,| |=|"|\\|realm|scope|[a-z:/.]){0,60}"#) {
            for c in parse(&s) {
                proptest::prop_assert!(!c.scheme.is_empty());
            }
        }

        #[test]
        fn round_trips_quoted_values(v in "[ -~]{0,40}") {
            let quoted = v.replace('\\', "\\\\").replace('"', "\\\"");
            let got = parse(&format!("Bearer realm=\"{quoted}\",service=\"s\""));
            proptest::prop_assert_eq!(got.len(), 1);
            proptest::prop_assert_eq!(got[0].param("realm"), Some(v.as_str()));
            proptest::prop_assert_eq!(got[0].param("service"), Some("s"));
        }
    }
}
