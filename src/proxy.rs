//! The real client address behind a reverse proxy or load balancer.
//!
//! Behind nginx every TCP peer is nginx. Only peers in `--trusted-proxy`
//! may say who the client is: with `Forwarded` (RFC 7239),
//! `X-Forwarded-For` or `X-Real-IP` headers, or with the PROXY protocol
//! (v1 text or v2 binary, `--proxy-protocol`) that layer-4 load balancers
//! put before the first byte. Anything any other peer sends is ignored, so
//! a client cannot pick the address its limits are counted under.
//!
//! In a chain of hops (`X-Forwarded-For: client, proxy1, proxy2`) the
//! client is the right-most hop that is not a trusted proxy: hops to its
//! left were written by the client itself and prove nothing.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt};

/// An IP network such as `10.0.0.0/8` or `fd00::/8`; a bare address is a
/// network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A `--trusted-proxy` entry that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network {0:?}: expected an address or ADDRESS/PREFIX, e.g. 10.0.0.0/8")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr {
            network: mask(addr, prefix),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

/// `ip` with all but its first `prefix` bits cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & kept))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & kept))
        }
    }
}

/// The peers allowed to say who the client is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<Cidr>,
}

impl TrustedProxies {
    /// Trusts peers in `networks` (none: no one, the default).
    pub fn new(networks: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies { networks }
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The client's address for a request that came from `peer` with
    /// `headers`: `peer` itself unless it is a trusted proxy; otherwise the
    /// right-most untrusted hop of `Forwarded`, else of `X-Forwarded-For`,
    /// else `X-Real-IP`. Ports are kept where the header gives one (only
    /// `Forwarded` can), 0 otherwise.
    pub fn client_addr(&self, peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
        if !self.trusts(peer.ip()) {
            return peer;
        }
        let values = |name: &str| -> Vec<String> {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|hop| hop.trim().to_owned())
                .collect()
        };
        let forwarded: Vec<String> = values("forwarded")
            .iter()
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (name, value) = pair.trim().split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| value.trim().trim_matches('"').to_owned())
                })
            })
            .collect();
        let hops = match (forwarded, values("x-forwarded-for"), values("x-real-ip")) {
            (forwarded, _, _) if !forwarded.is_empty() => forwarded,
            (_, forwarded_for, _) if !forwarded_for.is_empty() => forwarded_for,
            (_, _, real_ip) => real_ip,
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            // An unknown or obfuscated hop ends what can be known: the
            // client is the nearest address that was.
            let Some(addr) = parse_hop(hop) else {
                break;
            };
            client = addr;
            if !self.trusts(addr.ip()) {
                break;
            }
        }
        SocketAddr::new(client.ip().to_canonical(), client.port())
    }
}

/// One hop of a forwarding header: `192.0.2.1`, `192.0.2.1:80`,
/// `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<SocketAddr> {
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr);
    }
    let ip = hop.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    ip.unwrap_or(hop)
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, 0))
}

/// Why a PROXY protocol header was refused; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("expected a PROXY protocol header from a trusted proxy")]
    Missing,
    #[error("malformed PROXY protocol header")]
    Malformed,
}

/// Longest PROXY v1 line, CRLF included (the spec's own limit).
const V1_MAX: usize = 107;
/// The PROXY v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v2 address block accepted (addresses plus TLVs); TLVs are skipped.
const V2_MAX_LEN: usize = 1024;

/// Reads a PROXY protocol header (v1 or v2) from the start of `io` and
/// returns the client address it names, or `peer` for `UNKNOWN` / `LOCAL`
/// (a health check by the load balancer itself). Reads exactly the header,
/// never into the HTTP request after it.
///
/// # Errors
/// When the stream does not start with a well-formed header.
pub async fn read_proxy_header<S>(
    io: &mut S,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyHeaderError>
where
    S: AsyncRead + Unpin,
{
    let mut start = [0u8; 5];
    io.read_exact(&mut start).await?;
    if &start == b"PROXY" {
        let mut line = start.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyHeaderError::Malformed);
            }
            line.push(io.read_u8().await?);
        }
        return parse_v1(&line, peer).ok_or(ProxyHeaderError::Malformed);
    }
    if start != V2_SIGNATURE[..5] {
        return Err(ProxyHeaderError::Missing);
    }
    let mut header = [0u8; 11];
    io.read_exact(&mut header).await?;
    if header[..7] != V2_SIGNATURE[5..] || header[7] >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed);
    }
    let (command, family) = (header[7] & 0x0f, header[8]);
    let len = usize::from(u16::from_be_bytes([header[9], header[10]]));
    if len > V2_MAX_LEN {
        return Err(ProxyHeaderError::Malformed);
    }
    let mut block = vec![0u8; len];
    io.read_exact(&mut block).await?;
    match command {
        0 => Ok(peer), // LOCAL
        1 => parse_v2_addresses(family, &block, peer).ok_or(ProxyHeaderError::Malformed),
        _ => Err(ProxyHeaderError::Malformed),
    }
}

/// `PROXY TCP4 SRC DST SPORT DPORT\r\n`, or `PROXY UNKNOWN…\r\n`.
fn parse_v1(line: &[u8], peer: SocketAddr) -> Option<SocketAddr> {
    let line = std::str::from_utf8(line).ok()?.strip_suffix("\r\n")?;
    let mut fields = line.split(' ');
    let (_proxy, protocol) = (fields.next()?, fields.next()?);
    if protocol == "UNKNOWN" {
        return Some(peer);
    }
    let (source, destination) = (fields.next()?, fields.next()?);
    let (source_port, destination_port) = (fields.next()?, fields.next()?);
    if fields.next().is_some() {
        return None;
    }
    let ip = |field: &str| -> Option<IpAddr> {
        match protocol {
            "TCP4" => field.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            "TCP6" => field.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            _ => None,
        }
    };
    // The destination is not used, but a header is well-formed or refused.
    ip(destination)?;
    destination_port.parse::<u16>().ok()?;
    let source = ip(source)?.to_canonical();
    Some(SocketAddr::new(source, source_port.parse().ok()?))
}

/// The source address of a v2 PROXY command; other families (UNIX
/// sockets, unspecified) leave the peer's.
fn parse_v2_addresses(family: u8, block: &[u8], peer: SocketAddr) -> Option<SocketAddr> {
    let port = |at: usize| Some(u16::from_be_bytes([*block.get(at)?, *block.get(at + 1)?]));
    match family >> 4 {
        1 => {
            let ip: [u8; 4] = block.get(..4)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::from(ip), port(8)?))
        }
        2 => {
            let ip: [u8; 16] = block.get(..16)?.try_into().ok()?;
            let ip = IpAddr::V6(Ipv6Addr::from(ip)).to_canonical();
            Some(SocketAddr::new(ip, port(32)?))
        }
        _ => Some(peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(networks.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn networks_parse_and_contain() {
        let net: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "nginx",
            "10.0.0.0/x",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_trusted_peers_may_name_the_client_and_the_rightmost_untrusted_hop_wins() {
        let proxies = trusted(&["127.0.0.0/8", "10.0.0.0/8"]);
        let nginx: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        let spoof = headers(&[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(proxies.client_addr(stranger, &spoof), stranger);
        let ip = |h: &HeaderMap| proxies.client_addr(nginx, h).ip().to_string();
        assert_eq!(ip(&spoof), "203.0.113.7");
        // The client wrote the left-most hops itself.
        let chain = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.7, 10.0.0.2")]);
        assert_eq!(ip(&chain), "203.0.113.7");
        let split = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.8"),
        ]);
        assert_eq!(ip(&split), "203.0.113.8");
        // Forwarded wins over X-Forwarded-For, and keeps a port.
        let forwarded = headers(&[
            (
                "forwarded",
                "for=192.0.2.60;proto=http, For=\"[2001:db8::1]:4711\"",
            ),
            ("x-forwarded-for", "203.0.113.7"),
        ]);
        assert_eq!(
            proxies.client_addr(nginx, &forwarded),
            "[2001:db8::1]:4711".parse().unwrap()
        );
        assert_eq!(ip(&headers(&[("x-real-ip", "203.0.113.9")])), "203.0.113.9");
        // Nothing usable: the proxy itself, or the nearest known hop.
        assert_eq!(ip(&headers(&[])), "127.0.0.1");
        let unknown = headers(&[("forwarded", "for=unknown, for=10.0.0.3")]);
        assert_eq!(ip(&unknown), "10.0.0.3");
        let garbage = headers(&[("x-forwarded-for", "not an address")]);
        assert_eq!(ip(&garbage), "127.0.0.1");
        // All hops trusted: the left-most.
        assert_eq!(
            ip(&headers(&[("x-forwarded-for", "10.0.0.9, 10.0.0.2")])),
            "10.0.0.9"
        );
        assert_eq!(TrustedProxies::default().client_addr(nginx, &spoof), nginx);
    }

    async fn read(bytes: &[u8]) -> Result<SocketAddr, ProxyHeaderError> {
        let peer = "10.0.0.1:999".parse().unwrap();
        let mut io = bytes;
        let addr = read_proxy_header(&mut io, peer).await?;
        assert_eq!(io, b"GET", "exactly the header was read");
        Ok(addr)
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend([0x20 | command, family]);
        out.extend((block.len() as u16).to_be_bytes());
        out.extend(block);
        out.extend(b"GET");
        out
    }

    #[tokio::test]
    async fn proxy_protocol_v1_and_v2() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.2 51000 80\r\nGET";
        assert_eq!(read(v1).await.unwrap(), addr("203.0.113.7:51000"));
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 80\r\nGET";
        assert_eq!(read(v1).await.unwrap(), addr("[2001:db8::7]:51000"));
        assert_eq!(
            read(b"PROXY UNKNOWN\r\nGET").await.unwrap(),
            addr("10.0.0.1:999")
        );

        let mut v4 = vec![203, 0, 113, 7, 10, 0, 0, 2];
        v4.extend(51000u16.to_be_bytes());
        v4.extend(80u16.to_be_bytes());
        v4.extend([0x04, 0, 1, 0]); // a TLV, skipped
        assert_eq!(
            read(&v2(1, 0x11, &v4)).await.unwrap(),
            addr("203.0.113.7:51000")
        );
        let mut v6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        v6.extend([0; 16]);
        v6.extend(4711u16.to_be_bytes());
        v6.extend(80u16.to_be_bytes());
        assert_eq!(
            read(&v2(1, 0x21, &v6)).await.unwrap(),
            addr("[2001:db8::7]:4711")
        );
        assert_eq!(read(&v2(0, 0x00, &[])).await.unwrap(), addr("10.0.0.1:999"));

        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.2 51000\r\nGET",
            b"PROXY TCP4 2001:db8::1 10.0.0.2 1 2\r\nGET",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\nGET",
            &[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(30),
            b"PROXY TCP4 1.2.3.4",
        ] {
            assert!(
                read(bad).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(read(&v2(1, 0x11, &[1, 2, 3])).await.is_err(), "short block");
        assert!(read(&v2(7, 0x11, &v4)).await.is_err(), "unknown command");
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        assert!(read(&huge).await.is_err(), "block over the bound");
    }
}
