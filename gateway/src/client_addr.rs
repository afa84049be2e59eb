//! The address of the client behind a request, for per-client limits.
//!
//! Behind nginx or an ingress the TCP peer is the proxy: counting failed
//! handshakes per peer would let 20 failures from anyone lock out everyone.
//! The proxy appends the address it received the request from to
//! `X-Forwarded-For`; that header is believed only when the peer is one of
//! `TRUSTED_PROXIES`, and only as far as the chain of trusted proxies goes:
//! walking from the right, trusted hops are skipped and the first untrusted
//! entry is the client. Everything left of it was written by the client
//! itself and is ignored, so a client cannot choose the address it is
//! counted against. With no trusted proxy configured the peer is the client.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The configured `TRUSTED_PROXIES`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self { nets }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: `peer` itself unless it is a trusted proxy, in
    /// which case the `X-Forwarded-For` chain is walked from the right.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // Several header lines form one list, in order (RFC 9110 §5.3).
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        // The nearest hop we know to be real: where we fall back to when the
        // chain ends in something unusable (only a misconfigured proxy
        // forwards an entry that is not an address).
        let mut nearest = peer;
        for entry in entries.iter().rev() {
            let Some(ip) = parse_entry(entry) else {
                return nearest;
            };
            if !self.trusts(ip) {
                return ip;
            }
            nearest = ip;
        }
        // Every hop is a trusted proxy: the leftmost one is the origin.
        nearest
    }
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `::1` or `[::1]:80`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = entry.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .and_then(|e| e.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|s| s.parse().expect("net")).collect())
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_ip(ip("10.0.0.5"), &xff(&["1.2.3.4"])),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn an_untrusted_peer_cannot_forge_its_address() {
        let p = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            p.client_ip(ip("203.0.113.9"), &xff(&["1.2.3.4"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn behind_a_trusted_proxy_the_rightmost_untrusted_entry_is_the_client() {
        let p = proxies(&["10.0.0.0/8", "127.0.0.1/32"]);
        // The client wrote "6.6.6.6" itself; nginx appended its real address.
        let h = xff(&["6.6.6.6, 198.51.100.7, 10.1.2.3"]);
        assert_eq!(p.client_ip(ip("127.0.0.1"), &h), ip("198.51.100.7"));
        // Several header lines are one list.
        let h = xff(&["6.6.6.6", "198.51.100.7", "10.1.2.3"]);
        assert_eq!(p.client_ip(ip("10.9.9.9"), &h), ip("198.51.100.7"));
    }

    #[test]
    fn a_trusted_peer_without_the_header_is_the_client() {
        let p = proxies(&["127.0.0.1/32"]);
        assert_eq!(
            p.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn only_trusted_hops_yield_the_leftmost() {
        let p = proxies(&["10.0.0.0/8"]);
        let h = xff(&["10.0.0.1, 10.0.0.2"]);
        assert_eq!(p.client_ip(ip("10.0.0.3"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn ports_brackets_and_mapped_addresses() {
        let p = proxies(&["127.0.0.1/32", "::1/128"]);
        assert_eq!(
            p.client_ip(ip("::ffff:127.0.0.1"), &xff(&["198.51.100.7:4711"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            p.client_ip(ip("::1"), &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            p.client_ip(ip("::1"), &xff(&["[2001:db8::2]"])),
            ip("2001:db8::2")
        );
        assert_eq!(
            p.client_ip(ip("127.0.0.1"), &xff(&["::ffff:198.51.100.8"])),
            ip("198.51.100.8")
        );
    }

    #[test]
    fn garbage_stops_the_walk_at_the_nearest_real_hop() {
        let p = proxies(&["127.0.0.1/32", "10.0.0.0/8"]);
        assert_eq!(
            p.client_ip(ip("127.0.0.1"), &xff(&["nonsense, 10.0.0.4"])),
            ip("10.0.0.4")
        );
        assert_eq!(
            p.client_ip(ip("127.0.0.1"), &xff(&["unknown"])),
            ip("127.0.0.1")
        );
        // Empty entries are skipped, not garbage.
        assert_eq!(
            p.client_ip(ip("127.0.0.1"), &xff(&["198.51.100.7,, "])),
            ip("198.51.100.7")
        );
    }
}

/// Property tests of the `X-Forwarded-For` walk: whatever a client writes
/// in the header it never panics, never makes the node count it against an
/// address it chose (everything left of the nearest untrusted hop is
/// ignored), and every spelling of an address a proxy may forward reads
/// back as that address.
#[cfg(test)]
mod props {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
            any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
            // IPv4-mapped IPv6, as a dual-stack listener reports IPv4 peers.
            any::<u32>().prop_map(|v| IpAddr::V6(Ipv4Addr::from(v).to_ipv6_mapped())),
            // Small spaces, so trusted and untrusted addresses meet often.
            (0..4u8).prop_map(|d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d))),
            (0..4u8).prop_map(|d| IpAddr::V4(Ipv4Addr::new(203, 0, 113, d))),
        ]
    }

    /// An address inside `10.0.0.0/8`, `::1/128` or `2001:db8::/32`.
    fn trusted_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 3]>().prop_map(|[a, b, c]| IpAddr::V4(Ipv4Addr::new(10, a, b, c))),
            any::<[u8; 3]>()
                .prop_map(|[a, b, c]| IpAddr::V6(Ipv4Addr::new(10, a, b, c).to_ipv6_mapped())),
            Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            any::<u64>().prop_map(|v| {
                IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | u128::from(v)))
            }),
        ]
    }

    /// `TRUSTED_PROXIES`: a few networks around the small spaces above.
    fn arb_proxies() -> impl Strategy<Value = TrustedProxies> {
        let net = prop_oneof![
            Just("10.0.0.0/8"),
            Just("10.0.0.1/32"),
            Just("127.0.0.1/32"),
            Just("::1/128"),
            Just("0.0.0.0/0"),
            Just("203.0.113.0/30"),
            Just("2001:db8::/32"),
        ];
        prop::collection::vec(net, 0..4).prop_map(|nets| {
            TrustedProxies::new(nets.iter().map(|n| n.parse().expect("net")).collect())
        })
    }

    /// How a proxy may write `ip` in `X-Forwarded-For`.
    fn spell(ip: IpAddr, port: u16, form: u8) -> String {
        match (ip, form % 3) {
            (IpAddr::V4(v4), 1) => format!("{v4}:{port}"),
            (IpAddr::V6(v6), 1) => format!("[{v6}]:{port}"),
            (IpAddr::V6(v6), 2) => format!("[{v6}]"),
            (ip, _) => ip.to_string(),
        }
    }

    fn headers(lines: &[Vec<u8>]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            if let Ok(v) = HeaderValue::from_bytes(l) {
                h.append("x-forwarded-for", v);
            }
        }
        h
    }

    proptest! {
        #![proptest_config(crate::testing::prop_config(512))]

        /// Arbitrary header bytes: no panic, and the answer is the peer or
        /// an address that is literally in the header.
        #[test]
        fn never_panics_and_answers_a_known_address(
            proxies in arb_proxies(),
            peer in arb_ip(),
            lines in prop::collection::vec(
                prop::collection::vec(any::<u8>(), 0..64), 0..4),
            spelled in prop::collection::vec((arb_ip(), any::<u16>(), any::<u8>()), 0..4),
        ) {
            let mut lines = lines;
            let listed: Vec<IpAddr> = spelled.iter().map(|(ip, _, _)| ip.to_canonical()).collect();
            lines.push(
                spelled
                    .iter()
                    .map(|(ip, port, form)| spell(*ip, *port, *form))
                    .collect::<Vec<_>>()
                    .join(", ")
                    .into_bytes(),
            );
            let h = headers(&lines);
            let got = proxies.client_ip(peer, &h);
            let in_header = h
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|e| parse_entry(e.trim()))
                .any(|ip| ip == got);
            prop_assert!(got == peer.to_canonical() || in_header || listed.contains(&got));
            // An untrusted peer is the client, whatever it wrote.
            if !proxies.trusts(peer) {
                prop_assert_eq!(got, peer.to_canonical());
            }
        }

        /// A client cannot choose the address it is counted against: with a
        /// chain `<anything the client wrote>, <its real address>, <trusted
        /// hops>` behind a trusted peer, the answer is its real address.
        #[test]
        fn what_the_client_wrote_is_ignored(
            forged in prop::collection::vec("[ -~]{0,20}", 0..4),
            client in arb_ip(),
            hops in prop::collection::vec(trusted_ip(), 0..4),
            peer in trusted_ip(),
            port in any::<u16>(),
            form in any::<u8>(),
        ) {
            let proxies = TrustedProxies::new(
                ["10.0.0.0/8", "::1/128", "2001:db8::/32"]
                    .iter()
                    .map(|n| n.parse().expect("net"))
                    .collect(),
            );
            prop_assume!(!proxies.trusts(client));
            let mut chain: Vec<String> = forged
                .iter()
                .map(|f| f.replace(',', " "))
                .collect();
            chain.push(spell(client, port, form));
            chain.extend(hops.iter().map(|h| h.to_string()));
            let h = headers(&[chain.join(",").into_bytes()]);
            prop_assert_eq!(proxies.client_ip(peer, &h), client.to_canonical());
        }

        /// Every spelling of an address reads back as that address.
        #[test]
        fn entries_round_trip(ip in arb_ip(), port in any::<u16>(), form in any::<u8>()) {
            let s = spell(ip, port, form);
            prop_assert_eq!(parse_entry(&s), Some(ip.to_canonical()), "{}", s);
        }

        /// Without `TRUSTED_PROXIES` the header is never read.
        #[test]
        fn without_trusted_proxies_the_header_is_ignored(
            peer in arb_ip(),
            line in prop::collection::vec(any::<u8>(), 0..128),
        ) {
            let none = TrustedProxies::default();
            prop_assert_eq!(none.client_ip(peer, &headers(&[line])), peer.to_canonical());
        }
    }
}
