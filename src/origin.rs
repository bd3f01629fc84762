//! Which browser origins may open a WebSocket.
//!
//! Browsers send `Origin` with every WebSocket handshake and let any page
//! connect anywhere, so a server that accepts every origin (the Go
//! original's `CheckOrigin: return true`) lets any web page act as its
//! visitors. By default only same-origin pages and non-browser clients (no
//! `Origin` header) are accepted; `--allowed-origin` adds exact origins and
//! `*.domain` wildcards.

use std::{fmt, str::FromStr};

/// An allowed origin: `https://app.example.com`, `https://*.example.com`,
/// `http://localhost:3000`, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// Every origin (explicit opt-out of the check).
    Any,
    /// `scheme://host[:port]`, where host may start with `*.` to match any
    /// subdomain (not the domain itself).
    Exact {
        /// The scheme, lower-cased (`https`).
        scheme: String,
        /// Lower-case host name, possibly starting with `*.`.
        host: String,
        /// The port, if the pattern names one; `None` matches only an
        /// origin without a port.
        port: Option<u16>,
    },
}

/// An origin pattern that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid origin {0:?}: expected scheme://host[:port], scheme://*.domain[:port] or *")]
pub struct OriginPatternError(String);

/// Splits `scheme://host[:port]` into lower-cased parts.
fn split_origin(origin: &str) -> Option<(String, String, Option<u16>)> {
    let (scheme, rest) = origin.split_once("://")?;
    if scheme.is_empty() || rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal without a port, e.g. [::1].
        Some((_, tail)) if tail.ends_with(']') => (rest, None),
        Some((host, port)) => (host, Some(port.parse().ok()?)),
        None => (rest, None),
    };
    if host.is_empty() {
        return None;
    }
    Some((scheme.to_ascii_lowercase(), host.to_ascii_lowercase(), port))
}

impl FromStr for OriginPattern {
    type Err = OriginPatternError;

    fn from_str(s: &str) -> Result<OriginPattern, OriginPatternError> {
        if s.trim() == "*" {
            return Ok(OriginPattern::Any);
        }
        let (scheme, host, port) =
            split_origin(s.trim()).ok_or_else(|| OriginPatternError(s.to_owned()))?;
        let wildcard_ok = match host.strip_prefix("*.") {
            Some(domain) => !domain.is_empty() && !domain.contains('*'),
            None => !host.contains('*'),
        };
        if !wildcard_ok {
            return Err(OriginPatternError(s.to_owned()));
        }
        Ok(OriginPattern::Exact { scheme, host, port })
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginPattern::Any => f.write_str("*"),
            OriginPattern::Exact { scheme, host, port } => {
                write!(f, "{scheme}://{host}")?;
                match port {
                    Some(port) => write!(f, ":{port}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl OriginPattern {
    fn matches(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact {
                scheme: s,
                host: h,
                port: p,
            } => {
                let host_ok = match h.strip_prefix("*.") {
                    Some(domain) => host
                        .strip_suffix(domain)
                        .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                    None => h == host,
                };
                s == scheme && host_ok && p == &port
            }
        }
    }
}

/// Why an origin was refused (answered with 403 before the upgrade).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("origin {0} is not allowed")]
    NotAllowed(String),
    #[error("malformed Origin header")]
    Malformed,
}

/// The configured origin allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    allowed: Vec<OriginPattern>,
}

impl OriginPolicy {
    /// A policy accepting same-origin requests, requests without `Origin`,
    /// and `allowed`.
    pub fn new(allowed: Vec<OriginPattern>) -> OriginPolicy {
        OriginPolicy { allowed }
    }

    /// Whether every origin is accepted.
    pub fn allows_any(&self) -> bool {
        self.allowed.contains(&OriginPattern::Any)
    }

    /// Checks a handshake's `Origin` against its `Host` and the allow-list.
    ///
    /// # Errors
    /// [`OriginError`] when a browser origin is neither same-origin nor allowed.
    pub fn check(&self, origin: Option<&[u8]>, host: Option<&[u8]>) -> Result<(), OriginError> {
        let Some(origin) = origin else {
            return Ok(());
        };
        let origin = std::str::from_utf8(origin).map_err(|_| OriginError::Malformed)?;
        // Sandboxed frames and file:// pages send "null"; only `*` admits them.
        if origin == "null" {
            return match self.allows_any() {
                true => Ok(()),
                false => Err(OriginError::NotAllowed(origin.to_owned())),
            };
        }
        let (scheme, origin_host, port) = split_origin(origin).ok_or(OriginError::Malformed)?;
        let same_origin = host
            .and_then(|h| std::str::from_utf8(h).ok())
            .is_some_and(|host| {
                let authority = match port {
                    Some(port) => format!("{origin_host}:{port}"),
                    None => origin_host.clone(),
                };
                host.eq_ignore_ascii_case(&authority)
            });
        if same_origin
            || self
                .allowed
                .iter()
                .any(|p| p.matches(&scheme, &origin_host, port))
        {
            return Ok(());
        }
        Err(OriginError::NotAllowed(origin.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(patterns: &[&str]) -> OriginPolicy {
        OriginPolicy::new(patterns.iter().map(|p| p.parse().unwrap()).collect())
    }

    fn check(policy: &OriginPolicy, origin: &str, host: &str) -> bool {
        policy
            .check(Some(origin.as_bytes()), Some(host.as_bytes()))
            .is_ok()
    }

    #[test]
    fn by_default_only_same_origin_and_non_browser_clients() {
        let default = OriginPolicy::default();
        assert!(default.check(None, Some(b"example.com")).is_ok());
        assert!(check(&default, "http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(check(&default, "https://Example.com", "example.com"));
        assert!(!check(&default, "http://evil.test", "127.0.0.1:8080"));
        assert!(!check(&default, "http://127.0.0.1:8081", "127.0.0.1:8080"));
        assert!(!check(&default, "null", "127.0.0.1:8080"));
        assert_eq!(
            default.check(Some(b"not an origin"), Some(b"x")),
            Err(OriginError::Malformed)
        );
    }

    #[test]
    fn exact_and_wildcard_origins() {
        let allowed = policy(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:3000",
        ]);
        assert!(check(
            &allowed,
            "https://app.example.com",
            "api.example.com"
        ));
        assert!(
            !check(&allowed, "http://app.example.com", "api.example.com"),
            "scheme matters"
        );
        assert!(check(&allowed, "https://a.example.org", "api"));
        assert!(check(&allowed, "https://a.b.example.org", "api"));
        assert!(
            !check(&allowed, "https://example.org", "api"),
            "a wildcard is for subdomains"
        );
        assert!(!check(&allowed, "https://evilexample.org", "api"));
        assert!(check(&allowed, "http://localhost:3000", "api"));
        assert!(
            !check(&allowed, "http://localhost:3001", "api"),
            "port matters"
        );
        assert!(check(&policy(&["*"]), "null", "api"));
    }

    #[test]
    fn patterns_parse_strictly() {
        for bad in [
            "example.com",
            "https://",
            "https://a/b",
            "https://*",
            "https://a.*.com",
            "https://x:99999",
        ] {
            assert!(bad.parse::<OriginPattern>().is_err(), "{bad}");
        }
        assert_eq!(
            "https://*.Example.com:8443"
                .parse::<OriginPattern>()
                .unwrap()
                .to_string(),
            "https://*.example.com:8443"
        );
    }
}
