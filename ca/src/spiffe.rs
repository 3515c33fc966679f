//! SPIFFE IDs and trust domains, parsed and printed exactly as the SPIFFE-ID standard says.
//!
//! A [`SpiffeId`] is only ever built by parsing, so holding one proves it is well formed. This
//! module knows nothing of certificates; `svid` puts these IDs into them.

use std::fmt;
use std::str::FromStr;

/// The `controllerName` of Signet's GatewayClass: Gateways of a class naming it are Signet's,
/// and their identities are `SpiffeId::gateway`.
pub const GATEWAY_CONTROLLER: &str = "signet.dev/gateway-controller";

/// The longest SPIFFE ID the standard allows, in bytes.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// The longest trust domain name the standard allows, in bytes.
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was refused. Each variant names the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {len} bytes; the limit is {MAX_SPIFFE_ID_BYTES}")]
    TooLong { len: usize },
    #[error("SPIFFE ID must start with `spiffe://` (lowercase scheme)")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes; the limit is {MAX_TRUST_DOMAIN_BYTES}")]
    TrustDomainTooLong { len: usize },
    #[error("trust domain must not contain a port (`:`)")]
    Port,
    #[error("trust domain must not contain userinfo (`@`)")]
    UserInfo,
    #[error("trust domain must be lowercase; found {found:?} (write it in lowercase)")]
    UppercaseTrustDomain { found: char },
    #[error("trust domain may contain only a-z, 0-9, `.`, `-` and `_`; found {found:?}")]
    BadTrustDomainChar { found: char },
    #[error("SPIFFE ID must not contain a query (`?`)")]
    Query,
    #[error("SPIFFE ID must not contain a fragment (`#`)")]
    Fragment,
    #[error("SPIFFE ID must not contain percent-encoding (`%`)")]
    PercentEncoding,
    #[error("path segment {index} is empty (no `//` and no trailing `/`)")]
    EmptySegment { index: usize },
    #[error("path segment {index} is `{segment}`; `.` and `..` are not allowed")]
    DotSegment { index: usize, segment: String },
    #[error(
        "path segment {index} may contain only A-Z, a-z, 0-9, `.`, `-` and `_`; found {found:?}"
    )]
    BadPathChar { index: usize, found: char },
    #[error("SPIFFE ID must not end with `/`")]
    TrailingSlash,
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`cluster.local`) or `spiffe://cluster.local`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>` (used in SPIFFE bundles).
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain><path>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID as printed; `path_start` splits it. Shared: a clone (one per connection,
    /// per flow record, per registry entry) is a reference count, not a copy.
    id: std::sync::Arc<str>,
    path_start: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_BYTES {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        // Query, fragment and percent-encoding are refused wherever they appear, so the more
        // specific message wins over "bad character".
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoding);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            id: std::sync::Arc::from(s),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Builds an ID from a trust domain and path segments, checking each segment.
    pub fn from_segments<S: AsRef<str>>(
        td: &TrustDomain,
        segments: &[S],
    ) -> Result<Self, SpiffeIdError> {
        let mut id = td.id_string();
        for (index, s) in segments.iter().enumerate() {
            // Checked one by one so a `/` inside a value cannot create extra segments.
            check_segment(index, s.as_ref())?;
            id.push('/');
            id.push_str(s.as_ref());
        }
        Self::parse(&id)
    }

    /// The Istio/ztunnel form of a workload identity: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["ns", namespace, "sa", service_account])
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// A Signet Gateway's identity: `spiffe://<td>/ns/<ns>/gateway/<name>`.
    pub fn gateway(td: &TrustDomain, namespace: &str, name: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["ns", namespace, "gateway", name])
    }

    /// `(namespace, name)` when the path is exactly `/ns/<ns>/gateway/<name>`: the form of a
    /// Signet Gateway's identity (a member of the caller's trust domain or not: check that too).
    pub fn namespace_and_gateway(&self) -> Option<(&str, &str)> {
        let mut it = self.segments();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("gateway"), Some(name), None) => Some((ns, name)),
            _ => None,
        }
    }

    /// `(namespace, service account)` when the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut it = self.segments();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The whole ID as a shared string: a reference count, not a copy.
    pub fn shared(&self) -> std::sync::Arc<str> {
        self.id.clone()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("`{s}`: {e}")))
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("`{s}`: {e}")))
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' => return Err(SpiffeIdError::Port),
            '@' => return Err(SpiffeIdError::UserInfo),
            '%' => return Err(SpiffeIdError::PercentEncoding),
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            'A'..='Z' => return Err(SpiffeIdError::UppercaseTrustDomain { found: c }),
            _ => return Err(SpiffeIdError::BadTrustDomainChar { found: c }),
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path == "/" || path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    for (index, segment) in path.split('/').skip(1).enumerate() {
        check_segment(index, segment)?;
    }
    Ok(())
}

fn check_segment(index: usize, segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment { index });
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment {
            index,
            segment: segment.to_owned(),
        });
    }
    match segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(found) => Err(SpiffeIdError::BadPathChar { index, found }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> SpiffeIdError {
        SpiffeId::parse(s).expect_err(s)
    }

    #[test]
    fn parses_and_prints_istio_form() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/payments/sa/api").expect("valid");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/payments/sa/api");
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/payments/sa/api");
        assert_eq!(
            id.namespace_and_service_account(),
            Some(("payments", "api"))
        );
        assert_eq!(
            id.segments().collect::<Vec<_>>(),
            ["ns", "payments", "sa", "api"]
        );
        let td = TrustDomain::parse("cluster.local").expect("valid");
        assert!(id.is_member_of(&td));
        assert_eq!(
            SpiffeId::workload(&td, "payments", "api").expect("valid"),
            id
        );
    }

    #[test]
    fn a_gateway_identity_has_exactly_its_form() {
        let td = TrustDomain::parse("cluster.local").expect("valid");
        let gw = SpiffeId::gateway(&td, "edge", "public.example").expect("valid");
        assert_eq!(
            gw.as_str(),
            "spiffe://cluster.local/ns/edge/gateway/public.example"
        );
        assert_eq!(gw.namespace_and_gateway(), Some(("edge", "public.example")));
        assert_eq!(gw.namespace_and_service_account(), None);
        for other in [
            "spiffe://cluster.local/ns/edge/sa/public",
            "spiffe://cluster.local/ns/edge/gateway/public/x",
            "spiffe://cluster.local/ns/edge/gateway",
        ] {
            let id = SpiffeId::parse(other).expect("valid");
            assert_eq!(id.namespace_and_gateway(), None, "{other}");
        }
        // A `/` in a name cannot make extra segments.
        SpiffeId::gateway(&td, "edge", "a/b").expect_err("a slash");
    }

    #[test]
    fn trust_domain_alone_is_an_id() {
        let id = SpiffeId::parse("spiffe://example.org").expect("valid");
        assert_eq!(id.path(), "");
        assert_eq!(id.namespace_and_service_account(), None);
    }

    #[test]
    fn allowed_characters() {
        SpiffeId::parse("spiffe://a-b_c.9/A-Z_a.z-0/9").expect("every allowed character");
        TrustDomain::parse("td-1_x.y").expect("valid trust domain");
        assert_eq!(
            TrustDomain::parse("spiffe://td")
                .expect("scheme form")
                .as_str(),
            "td"
        );
    }

    #[test]
    fn scheme_must_be_spiffe_lowercase() {
        assert_eq!(err("https://cluster.local/a"), SpiffeIdError::WrongScheme);
        assert_eq!(err("SPIFFE://cluster.local/a"), SpiffeIdError::WrongScheme);
        assert_eq!(err("spiffe:/cluster.local/a"), SpiffeIdError::WrongScheme);
        assert_eq!(err(""), SpiffeIdError::Empty);
    }

    #[test]
    fn trust_domain_rules() {
        assert_eq!(err("spiffe://"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(err("spiffe:///ns/a"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(
            err("spiffe://Cluster.local/a"),
            SpiffeIdError::UppercaseTrustDomain { found: 'C' }
        );
        assert_eq!(err("spiffe://td:8080/a"), SpiffeIdError::Port);
        assert_eq!(err("spiffe://user@td/a"), SpiffeIdError::UserInfo);
        assert_eq!(err("spiffe://t%41d/a"), SpiffeIdError::PercentEncoding);
        assert_eq!(
            err("spiffe://t*d/a"),
            SpiffeIdError::BadTrustDomainChar { found: '*' }
        );
        assert_eq!(
            err("spiffe://tä/a"),
            SpiffeIdError::BadTrustDomainChar { found: 'ä' }
        );
        let long = "a".repeat(MAX_TRUST_DOMAIN_BYTES + 1);
        assert_eq!(
            TrustDomain::parse(&long),
            Err(SpiffeIdError::TrustDomainTooLong {
                len: MAX_TRUST_DOMAIN_BYTES + 1
            })
        );
        TrustDomain::parse(&"a".repeat(MAX_TRUST_DOMAIN_BYTES)).expect("255 bytes is allowed");
    }

    #[test]
    fn query_fragment_and_percent_encoding_are_refused() {
        assert_eq!(err("spiffe://td/a?x=1"), SpiffeIdError::Query);
        assert_eq!(err("spiffe://td/a#frag"), SpiffeIdError::Fragment);
        assert_eq!(err("spiffe://td/a%20b"), SpiffeIdError::PercentEncoding);
        assert_eq!(err("spiffe://td?x"), SpiffeIdError::Query);
    }

    #[test]
    fn path_segment_rules() {
        assert_eq!(
            err("spiffe://td/a//b"),
            SpiffeIdError::EmptySegment { index: 1 }
        );
        assert_eq!(err("spiffe://td/a/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://td/"), SpiffeIdError::TrailingSlash);
        assert_eq!(
            err("spiffe://td/a/./b"),
            SpiffeIdError::DotSegment {
                index: 1,
                segment: ".".into()
            }
        );
        assert_eq!(
            err("spiffe://td/../b"),
            SpiffeIdError::DotSegment {
                index: 0,
                segment: "..".into()
            }
        );
        assert_eq!(
            err("spiffe://td/a b"),
            SpiffeIdError::BadPathChar {
                index: 0,
                found: ' '
            }
        );
        assert_eq!(
            err("spiffe://td/a/b*"),
            SpiffeIdError::BadPathChar {
                index: 1,
                found: '*'
            }
        );
        assert_eq!(
            err("spiffe://td/é"),
            SpiffeIdError::BadPathChar {
                index: 0,
                found: 'é'
            }
        );
        // `...` is an ordinary segment: only `.` and `..` are special.
        SpiffeId::parse("spiffe://td/.../.a").expect("dots inside names are fine");
    }

    #[test]
    fn length_limit_is_2048_bytes() {
        let base = "spiffe://td/";
        let ok = format!("{base}{}", "a".repeat(MAX_SPIFFE_ID_BYTES - base.len()));
        assert_eq!(
            SpiffeId::parse(&ok)
                .expect("2048 bytes is allowed")
                .as_str()
                .len(),
            2048
        );
        let long = format!("{ok}b");
        assert_eq!(err(&long), SpiffeIdError::TooLong { len: 2049 });
    }

    #[test]
    fn serde_round_trip_and_errors_name_the_input() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/x\"").expect("valid");
        assert_eq!(
            serde_json::to_string(&id).expect("serialize"),
            "\"spiffe://td/x\""
        );
        let e = serde_json::from_str::<SpiffeId>("\"spiffe://td/x/\"").expect_err("trailing slash");
        assert!(e.to_string().contains("spiffe://td/x/"), "{e}");
    }

    #[test]
    fn segments_are_checked_when_building() {
        let td = TrustDomain::parse("cluster.local").expect("valid");
        assert_eq!(
            SpiffeId::workload(&td, "a/b", "c"),
            Err(SpiffeIdError::BadPathChar {
                index: 1,
                found: '/'
            })
        );
        assert_eq!(
            SpiffeId::workload(&td, "", "c"),
            Err(SpiffeIdError::EmptySegment { index: 1 })
        );
        assert_eq!(
            SpiffeId::workload(&td, "ns", ".."),
            Err(SpiffeIdError::DotSegment {
                index: 3,
                segment: "..".into()
            })
        );
    }
}
