//! Which peers the relay may talk to. Closed by default: an open relay that reaches loopback,
//! private networks or a cloud metadata service (169.254.169.254) hands the network behind it to
//! anyone with credentials. The operator's `allowed_peers` win over every deny rule (tests allow
//! loopback); `denied_peers` add to the built-in list.
//!
//! IPv6 addresses that carry an IPv4 address a tunnel delivers to are judged by it too: a 6to4
//! peer (2002::/16) whose embedded IPv4 address is denied, or a Teredo peer (2001::/32) whose
//! server or (de-obfuscated) client IPv4 address is denied, is denied; other 6to4 and Teredo
//! peers are not (the prefixes are not denied outright: 6to4 and Teredo hosts can be real peers).
//! `allowed_peers` lift this only when they contain the IPv6 address itself.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// Ranges no relay should reach (coturn's recommended deny list, plus IPv6 forms of IPv4 addresses
/// that would smuggle a denied IPv4 peer past an IPv4-only check).
pub const DEFAULT_DENIED: &[&str] = &[
    // IPv4
    "0.0.0.0/8",       // "this network"
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // carrier-grade NAT
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, incl. cloud metadata 169.254.169.254
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation (TEST-NET-1)
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation (TEST-NET-2)
    "203.0.113.0/24",  // documentation (TEST-NET-3)
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, incl. broadcast 255.255.255.255
    // IPv6
    "::/128",         // unspecified
    "::1/128",        // loopback
    "::/96",          // IPv4-compatible (deprecated)
    "::ffff:0:0/96",  // IPv4-mapped
    "64:ff9b::/96",   // NAT64 well-known prefix
    "64:ff9b:1::/48", // NAT64 local use
    "2001:db8::/32",  // documentation
    "fc00::/7",       // unique local
    "fe80::/10",      // link-local
    "ff00::/8",       // multicast
];

#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed: Vec<IpNet>,
    denied: Vec<IpNet>,
}

impl PeerPolicy {
    /// The built-in deny list plus `denied`, with `allowed` taking precedence over both.
    pub fn new(allowed: Vec<IpNet>, denied: Vec<IpNet>) -> Self {
        let mut all_denied: Vec<IpNet> =
            DEFAULT_DENIED.iter().map(|net| net.parse().expect("built-in ranges parse")).collect();
        all_denied.extend(denied);
        Self { allowed, denied: all_denied }
    }

    /// Whether the relay may exchange data with `peer`.
    pub fn permits(&self, peer: IpAddr) -> bool {
        let denied = |address: &IpAddr| self.denied.iter().any(|net| net.contains(address));
        self.allowed.iter().any(|net| net.contains(&peer))
            || !(denied(&peer) || tunnelled_ipv4(peer).iter().flatten().any(|v4| denied(&IpAddr::V4(*v4))))
    }
}

/// The IPv4 addresses a 6to4 (RFC 3056: 2002:AABB:CCDD::/48 carries A.B.C.D) or Teredo (RFC 4380:
/// 2001:0:SSSS:SSSS:flags:port:CCCC:CCCC, server S, client C bit-inverted) address leads to.
fn tunnelled_ipv4(peer: IpAddr) -> [Option<Ipv4Addr>; 2] {
    let IpAddr::V6(v6) = peer else { return [None, None] };
    let bits = v6.to_bits();
    // The u32 at bit offset `from_top` (counting from the most significant bit).
    let word = |from_top: u32| {
        Ipv4Addr::from_bits(u32::try_from((bits >> (96 - from_top)) & 0xFFFF_FFFF).unwrap_or(0))
    };
    match v6.segments() {
        [0x2002, ..] => [Some(word(16)), None],
        [0x2001, 0x0000, ..] => [Some(word(32)), Some(Ipv4Addr::from_bits(!word(96).to_bits()))],
        _ => [None, None],
    }
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn closed_by_default() {
        let policy = PeerPolicy::default();
        for denied in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(!policy.permits(ip(denied)), "{denied} must be denied");
        }
        for public in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700:4700::1111"] {
            assert!(policy.permits(ip(public)), "{public} must be allowed");
        }
    }

    #[test]
    fn allowed_ranges_win_and_denied_ranges_add() {
        let policy =
            PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec!["8.8.8.0/24".parse().unwrap()]);
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(
            !policy.permits(ip("::ffff:127.0.0.1")),
            "the IPv4-mapped form is not the allowed IPv4 range"
        );
        assert!(!policy.permits(ip("::1")));
        assert!(!policy.permits(ip("8.8.8.8")));
        assert!(policy.permits(ip("8.8.4.4")));
    }

    #[test]
    fn six_to_four_and_teredo_peers_are_judged_by_the_ipv4_address_they_lead_to() {
        let policy = PeerPolicy::default();
        // 6to4 of 127.0.0.1, 10.0.0.1, 169.254.169.254; Teredo with server 127.0.0.1 or with client
        // 10.0.0.1 (stored inverted: f5ff:fffe) or 169.254.169.254 (5601:5601).
        for denied in [
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:a9fe:a9fe::1",
            "2001:0:7f00:1::1",
            "2001:0:808:808:0:0:f5ff:fffe",
            "2001:0:808:808:8000:ffff:5601:5601",
        ] {
            assert!(!policy.permits(ip(denied)), "{denied} must be denied");
        }
        // 6to4 of 8.8.8.8; Teredo with server 8.8.8.8 and client 1.1.1.1 (fefe:fefe).
        for public in ["2002:808:808::1", "2001:0:808:808:0:0:fefe:fefe"] {
            assert!(policy.permits(ip(public)), "{public} must be allowed");
        }
        // An operator can still allow them, by their IPv6 addresses.
        let allowed = PeerPolicy::new(vec!["2002::/16".parse().unwrap()], vec![]);
        assert!(allowed.permits(ip("2002:7f00:1::1")));
    }
}
