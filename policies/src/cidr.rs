//! CIDR prefixes, for `cidr:` peers (world addresses named by prefix, like Cilium's
//! `toCIDRSet`): parsing with precise errors, containment, and the numeric identities the
//! compiler gives them.
//!
//! An address belongs to the longest prefix that contains it, among every prefix some policy
//! names (its `cidr` and its `except`s alike) and the cluster's own addresses, which are longer
//! still: pods and nodes are never `cidr:` peers. The datapath gets this for free from its
//! longest-prefix-match ipcache, one entry per prefix; the reference evaluator checks the
//! address against the rule directly, and the property test holds the two to the same answer.

use std::fmt;
use std::net::IpAddr;

/// Numbers of CIDR identities start here (Cilium's local scope), far above allocated ones.
pub const CIDR_IDENTITY_BASE: u32 = 1 << 24;

/// A network prefix: the address with its host bits zero, and the prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `203.0.113.0/24`, `2001:db8::/32`; an address alone is its /32 or /128.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not a CIDR: `{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length `{p}` is not 0-{max}"))?,
        };
        let net = Self::new(addr, prefix);
        if net.addr != addr {
            return Err(format!("`{s}` has host bits set; the network is {net}"));
        }
        Ok(net)
    }

    /// The prefix of `addr` of length `prefix` (host bits cleared).
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(v4) => {
                let p = prefix.min(32);
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let p = prefix.min(128);
                let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        Self {
            addr,
            prefix: prefix.min(max),
        }
    }

    /// One address as a prefix.
    pub fn host(addr: IpAddr) -> Self {
        Self::new(addr, if addr.is_ipv4() { 32 } else { 128 })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether every address of `self` is in `other`.
    pub fn within(&self, other: &Cidr) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.prefix >= other.prefix
            && Self::new(self.addr, other.prefix).addr == other.addr
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::host(ip).within(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The prefix an address belongs to: the longest of `prefixes` containing it.
pub fn longest_match<'a>(
    prefixes: impl IntoIterator<Item = &'a Cidr>,
    ip: IpAddr,
) -> Option<&'a Cidr> {
    prefixes
        .into_iter()
        .filter(|c| c.contains(ip))
        .max_by_key(|c| c.prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_with_reasons() {
        let c = Cidr::parse("203.0.113.0/24").expect("cidr");
        assert_eq!(c.to_string(), "203.0.113.0/24");
        assert_eq!(Cidr::parse("2001:db8::/32").expect("v6").prefix(), 32);
        assert_eq!(Cidr::parse("198.51.100.7").expect("host").prefix(), 32);
        let e = Cidr::parse("203.0.113.9/24").expect_err("host bits");
        assert!(e.contains("the network is 203.0.113.0/24"), "{e}");
        assert!(
            Cidr::parse("203.0.113.0/33")
                .expect_err("len")
                .contains("0-32")
        );
        assert!(
            Cidr::parse("example.com/8")
                .expect_err("addr")
                .contains("not an IP")
        );
    }

    #[test]
    fn containment_and_longest_match() {
        let wide = Cidr::parse("203.0.113.0/24").expect("cidr");
        let narrow = Cidr::parse("203.0.113.128/25").expect("cidr");
        let v6 = Cidr::parse("::/0").expect("cidr");
        assert!(narrow.within(&wide) && !wide.within(&narrow));
        assert!(!wide.within(&v6), "families never contain each other");
        let ip: IpAddr = "203.0.113.200".parse().expect("ip");
        assert_eq!(longest_match([&wide, &narrow], ip), Some(&narrow));
        let low: IpAddr = "203.0.113.5".parse().expect("ip");
        assert_eq!(longest_match([&wide, &narrow], low), Some(&wide));
        assert_eq!(longest_match([&narrow], low), None);
    }
}
