//! What every layer says about a proxied flow, so none of them borrows it from another: which
//! side of the mesh reports it. The proxy decides and counts with it, the admin port labels
//! series with it; neither imports the other for it.

/// Which side of the proxy reports: the source's node (`outbound`) or the destination's
/// (`inbound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    Outbound,
    Inbound,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Outbound => "outbound",
            Reporter::Inbound => "inbound",
        }
    }
}
