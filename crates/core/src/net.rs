//! Which address a request comes from when proxies stand in front of the
//! server: `server.trusted_proxies` names them, and only their word
//! (`X-Forwarded-For`) is taken.

use std::net::IpAddr;
use std::str::FromStr;

/// An address block, `10.0.0.0/8` or `2001:db8::/32`; a plain address is a
/// block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const WHAT: &str = "expected an IP address or a CIDR block (e.g. 10.0.0.0/8, fd00::/8)";
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| WHAT)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or(WHAT)?,
        };
        if prefix == 0 {
            // Every address a proxy: every client could name its own.
            return Err("expected your proxies' addresses, not every address (a /0)");
        }
        // An IPv4-mapped block is the IPv4 block it maps, as peers are
        // compared in their IPv4 form.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                if prefix == 96 {
                    return Err("expected your proxies' addresses, not every IPv4 address");
                }
                return Ok(Self {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client's address: the connection's peer, unless the peer is a
/// trusted proxy; then `X-Forwarded-For` is read from its end (what the
/// nearest proxy saw) back past the trusted proxies, and the first address
/// that is not one is the client. An entry that is not an address stops
/// the walk at the last one known. (The leftmost entries are the client's
/// own words, never trusted unless every hop after them is.)
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = peer;
    if !is_trusted(client) {
        return client;
    }
    for entry in forwarded_for.rev() {
        let Some(ip) = parse_entry(entry.trim()) else {
            return client;
        };
        client = ip;
        if !is_trusted(client) {
            return client;
        }
    }
    client
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_contain_what_they_should() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.200.3.4")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped IPv6");
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let mapped: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains(ip("10.9.8.7")) && !mapped.contains(ip("11.0.0.1")));
        let host_bits: IpNet = "10.1.2.3/8".parse().unwrap();
        assert!(host_bits.contains(ip("10.200.0.1")));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "nope",
            "10.0.0.0/",
            "/8",
            "10.0.0.0/x",
            "0.0.0.0/0",
            "::/0",
            "::ffff:0.0.0.0/96",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_first_untrusted_address_from_the_right() {
        let trusted = nets(&["10.0.0.0/8"]);
        let xff = |s: &'static str| s.split(',');
        // Behind one trusted proxy.
        assert_eq!(
            client_ip(ip("10.0.0.5"), xff("203.0.113.7"), &trusted),
            ip("203.0.113.7")
        );
        // A client that writes its own header cannot choose its address:
        // the entry the proxy appended is the one taken.
        assert_eq!(
            client_ip(ip("10.0.0.5"), xff("1.1.1.1, 203.0.113.7"), &trusted),
            ip("203.0.113.7")
        );
        // Two trusted hops.
        assert_eq!(
            client_ip(ip("10.0.0.5"), xff("203.0.113.7, 10.0.0.9"), &trusted),
            ip("203.0.113.7")
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), xff("203.0.113.7"), &trusted),
            ip("198.51.100.1")
        );
        // Garbage stops the walk at the last known address; ports are read.
        assert_eq!(
            client_ip(ip("10.0.0.5"), xff("203.0.113.7, unknown"), &trusted),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_ip(ip("10.0.0.5"), xff("[2001:db8::1]:443"), &trusted),
            ip("2001:db8::1")
        );
        // No header from a trusted peer: the peer.
        assert_eq!(client_ip(ip("10.0.0.5"), xff(""), &trusted), ip("10.0.0.5"));
        assert_eq!(
            client_ip(ip("10.0.0.5"), std::iter::empty(), &trusted),
            ip("10.0.0.5")
        );
    }
}
