//! Request paths as rules see them. A rule on `/policies` must hold for every spelling a server
//! would resolve to a path under it, so a request target is normalised before any matching, and
//! the normalised target is what the workload receives: percent-encoded unreserved characters
//! are decoded (`%2e` is `.`), other escapes get uppercase hex, runs of `/` are merged, and dot
//! segments are removed (RFC 3986 section 5.2.4), so `/policies/../README.md` and
//! `/policies/%2e%2e/README.md` are `/README.md`. What servers disagree about is refused unless a
//! policy opts out: an encoded `/` or `\` (one segment to the proxy, two to many servers), a raw
//! `\`, and non-ASCII. Malformed escapes, encoded control characters and targets that are not
//! absolute paths are always refused. The query is kept as it came.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a policy does with the spellings servers disagree about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum Spelling {
    /// Refused with 400 (the default).
    #[default]
    Reject,
    /// Passed on as it came (still percent-encoded), and matched in that form.
    Keep,
}

/// `spec.pathNormalization` of an IdentityPolicy: the opt-outs from refusing ambiguous paths.
/// Where several policies' `http` rules apply to one port, each opt-out holds only if all of
/// them take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathNormalization {
    /// `%2F` and `%5C` (and a raw `\`) in the path.
    #[serde(default)]
    pub escaped_slashes: Spelling,
    /// Bytes above 0x7F, raw or percent-encoded.
    #[serde(default)]
    pub non_ascii: Spelling,
}

impl PathNormalization {
    /// What holds where both apply: an opt-out only if both take it.
    pub fn and(self, other: Self) -> Self {
        let both = |a: Spelling, b: Spelling| {
            if a == Spelling::Keep && b == Spelling::Keep {
                Spelling::Keep
            } else {
                Spelling::Reject
            }
        };
        Self {
            escaped_slashes: both(self.escaped_slashes, other.escaped_slashes),
            non_ascii: both(self.non_ascii, other.non_ascii),
        }
    }

    /// Every opt-out taken: the identity of `and`.
    pub const KEEP_ALL: Self = Self {
        escaped_slashes: Spelling::Keep,
        non_ascii: Spelling::Keep,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not an absolute path")]
    NotAbsolute,
    #[error("malformed percent-encoding at byte {0}")]
    BadEscape(usize),
    #[error("an encoded control character (%{0:02X})")]
    Control(u8),
    #[error(
        "an encoded `/` or `\\` (%{0:02X}) or a raw `\\`: servers split such paths differently"
    )]
    EscapedSlash(u8),
    #[error("a non-ASCII byte in the path")]
    NonAscii,
    #[error("a control character or space in the path")]
    RawControl,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The normalised form of a request target (`/path?query`), or why it is refused.
pub fn normalize(target: &str, opts: PathNormalization) -> Result<String, PathError> {
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], Some(&target[i..])),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Decode what is safe to decode; keep (uppercased) what is not.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape(i));
            };
            let c = h << 4 | l;
            if c < 0x20 || c == 0x7f {
                return Err(PathError::Control(c));
            }
            if matches!(c, b'/' | b'\\') && opts.escaped_slashes == Spelling::Reject {
                return Err(PathError::EscapedSlash(c));
            }
            if c >= 0x80 && opts.non_ascii == Spelling::Reject {
                return Err(PathError::NonAscii);
            }
            if unreserved(c) {
                decoded.push(c as char);
            } else {
                decoded.push_str(&format!("%{c:02X}"));
            }
            i += 3;
            continue;
        }
        if b >= 0x80 {
            if opts.non_ascii == Spelling::Reject {
                return Err(PathError::NonAscii);
            }
            decoded.push_str(&format!("%{b:02X}"));
        } else if b <= 0x20 || b == 0x7f {
            return Err(PathError::RawControl);
        } else if b == b'\\' {
            if opts.escaped_slashes == Spelling::Reject {
                return Err(PathError::EscapedSlash(b));
            }
            decoded.push_str("%5C");
        } else {
            decoded.push(b as char);
        }
        i += 1;
    }
    // Merged slashes, then dot segments: `/a//../b` is `/b` (the empty segment is gone first).
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing = n == last,
            "." => trailing = n == last,
            ".." => {
                out.pop();
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len() + query.map_or(0, str::len));
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if out.is_empty() || trailing {
        normal.push('/');
    }
    if let Some(q) = query {
        normal.push_str(q);
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(p: &str) -> Result<String, PathError> {
        normalize(p, PathNormalization::default())
    }

    #[test]
    fn every_spelling_of_a_path_outside_the_prefix_is_that_path() {
        for attack in [
            "/policies/../README.md",
            "/policies/%2e%2e/README.md",
            "/policies/%2E%2E/README.md",
            "/policies/.%2e/README.md",
            "/policies/./../README.md",
            "//policies/../../README.md",
            "/policies//..//README.md",
            "/%70olicies/../README.md",
            "/policies/sub/../../README.md",
        ] {
            assert_eq!(strict(attack).as_deref(), Ok("/README.md"), "{attack}");
        }
    }

    #[test]
    fn ordinary_paths_keep_their_shape() {
        for (path, normal) in [
            ("/", "/"),
            ("/policies", "/policies"),
            ("/policies/", "/policies/"),
            ("/policies/.", "/policies/"),
            ("/policies/a/..", "/policies/"),
            ("/..", "/"),
            ("/a%20b", "/a%20b"),
            ("/a%7eb", "/a~b"),
            ("/a%3fb?x=%2F&y=..", "/a%3Fb?x=%2F&y=.."),
            ("/v1/charges?limit=10", "/v1/charges?limit=10"),
            ("/a//b///c", "/a/b/c"),
        ] {
            assert_eq!(strict(path).as_deref(), Ok(normal), "{path}");
        }
    }

    #[test]
    fn ambiguous_spellings_are_refused_unless_a_policy_opts_out() {
        for (path, err) in [
            ("/policies%2f..%2fREADME.md", PathError::EscapedSlash(b'/')),
            ("/policies%5C..%5CREADME.md", PathError::EscapedSlash(b'\\')),
            ("/policies\\..\\README.md", PathError::EscapedSlash(b'\\')),
            ("/caf%C3%A9", PathError::NonAscii),
            ("/café", PathError::NonAscii),
        ] {
            assert_eq!(strict(path), Err(err), "{path}");
        }
        let keep = PathNormalization::KEEP_ALL;
        assert_eq!(
            normalize("/policies%2f..%2fREADME.md", keep).as_deref(),
            Ok("/policies%2F..%2FREADME.md"),
            "kept encoded: one segment, still under /policies"
        );
        assert_eq!(normalize("/café", keep).as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(normalize("/a\\b", keep).as_deref(), Ok("/a%5Cb"));
        // One policy's opt-out does not hold where another's rules apply too.
        assert_eq!(
            keep.and(PathNormalization::default()),
            PathNormalization::default()
        );
    }

    #[test]
    fn malformed_targets_are_always_refused() {
        let keep = PathNormalization::KEEP_ALL;
        for (path, err) in [
            ("policies", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("http://x/a", PathError::NotAbsolute),
            ("/a%2", PathError::BadEscape(2)),
            ("/a%zz", PathError::BadEscape(2)),
            ("/a%00b", PathError::Control(0)),
            ("/a%0d%0aX: y", PathError::Control(0x0d)),
            ("/a b", PathError::RawControl),
        ] {
            assert_eq!(normalize(path, keep), Err(err), "{path}");
        }
    }
}
