//! Request IDs: `req_` + 16 random alphanumeric characters; also the name of a request's folder
//! in the file store, so parsing one is strict.

use std::fmt;

use rand::distr::{Alphanumeric, SampleString};

const PREFIX: &str = "req_";
const RANDOM_LEN: usize = 16;

/// A request's ID. Only [`RequestId::generate`] and [`RequestId::parse`] make one, so its text is
/// always `req_` followed by 12 to 64 characters of `[A-Za-z0-9_-]`: safe as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    pub fn generate() -> Self {
        Self(format!(
            "{PREFIX}{}",
            Alphanumeric.sample_string(&mut rand::rng(), RANDOM_LEN)
        ))
    }

    /// Accept an ID from outside (a URL path) only in the exact shape IDs are made in.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(PREFIX)?;
        let ok = (12..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Self(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 4 + 16);
        assert_eq!(RequestId::parse(a.as_str()), Some(a));
    }

    #[test]
    fn parse_rejects_anything_else() {
        for bad in [
            "",
            "req_",
            "req_short",
            "abc_0123456789abcdef",
            "req_../../etc/passwd",
            "req_0123456789ab/x",
            "req_0123456789ab.",
            "req_0123456789ab\0",
            "req_0123456789abcdé",
            "..",
        ] {
            assert_eq!(RequestId::parse(bad), None, "{bad:?}");
        }
        assert!(RequestId::parse("req_0123456789ab").is_some());
        assert!(RequestId::parse("req_abc-DEF_0123456").is_some());
    }
}
