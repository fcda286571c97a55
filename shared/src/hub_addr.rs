//! A hub's advertised address: a socket address (`192.0.2.7:7447`, `[2001:db8::7]:7447`) or a
//! DNS name with a port (`hub.example.org:7447`), as `sync-hub init --advertise` and
//! `sync-hub advertise set` take it, enrollment tickets carry it and the hub's refresh moves
//! it. Parsing only: who resolves a name, and when, is the edge's business.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The most addresses a hub advertises (and a device accepts from a ticket or a refresh).
pub const MAX_HUB_ADDRS: usize = 8;
/// The longest DNS name accepted (RFC 1035's 253 characters of presentation form).
pub const MAX_HOST_LEN: usize = 253;

/// One advertised address of a hub.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HubAddr {
    /// An IP address and port, dialled as it is.
    Socket(SocketAddr),
    /// A DNS name and port, resolved at each dial.
    Name {
        /// The name, lower case, without a trailing dot.
        host: String,
        /// The port.
        port: u16,
    },
}

impl HubAddr {
    /// The socket address, when it is one.
    pub fn socket(&self) -> Option<SocketAddr> {
        match self {
            HubAddr::Socket(a) => Some(*a),
            HubAddr::Name { .. } => None,
        }
    }
}

impl fmt::Display for HubAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HubAddr::Socket(a) => write!(f, "{a}"),
            HubAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for HubAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() > MAX_HOST_LEN + 6 {
            return Err(format!(
                "hub address of {} characters: too long for HOST:PORT",
                s.len()
            ));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(format!("hub address {s:?}: port 0 cannot be dialled"));
            }
            return Ok(HubAddr::Socket(a));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "hub address {s:?}: use IP:PORT or NAME:PORT (e.g. hub.example.org:7447)"
            ));
        };
        let port: u16 = match port.parse() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(format!(
                    "hub address {s:?}: {port:?} is not a port (1-65535)"
                ));
            }
        };
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if !is_dns_name(&host) {
            return Err(format!(
                "hub address {s:?}: {host:?} is neither an IP address nor a DNS name (letters, digits, '-' and '.')"
            ));
        }
        // A name that is all digits and dots is a mistyped IPv4 address, not a name.
        if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!("hub address {s:?}: {host:?} is not an IP address"));
        }
        Ok(HubAddr::Name { host, port })
    }
}

impl TryFrom<String> for HubAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<HubAddr> for String {
    fn from(a: HubAddr) -> String {
        a.to_string()
    }
}

/// Whether `host` is a DNS name of letters, digits and hyphens in dot-separated labels of 1
/// to 63 characters, no label starting or ending with a hyphen.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Parses a list of advertised addresses as a ticket or a hub's refresh carries them: 1 to
/// [`MAX_HUB_ADDRS`] of them, each parseable, duplicates dropped (first kept).
pub fn parse_list<S: AsRef<str>>(list: &[S]) -> Result<Vec<HubAddr>, String> {
    if list.is_empty() {
        return Err("no hub address".into());
    }
    if list.len() > MAX_HUB_ADDRS {
        return Err(format!(
            "{} hub addresses, more than the {MAX_HUB_ADDRS} allowed",
            list.len()
        ));
    }
    let mut out: Vec<HubAddr> = Vec::with_capacity(list.len());
    for s in list {
        let a: HubAddr = s.as_ref().parse()?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_and_names_parse_and_print_back() {
        for s in [
            "127.0.0.1:7447",
            "[::1]:7447",
            "localhost:7447",
            "hub.example.org:1",
        ] {
            let a: HubAddr = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert_eq!(
            "Hub.Example.ORG.:7447".parse::<HubAddr>().unwrap(),
            HubAddr::Name {
                host: "hub.example.org".into(),
                port: 7447
            }
        );
        assert!(
            "127.0.0.1:7447"
                .parse::<HubAddr>()
                .unwrap()
                .socket()
                .is_some()
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        for s in [
            "",
            "localhost",
            "localhost:0",
            "localhost:70000",
            "127.0.0.1:0",
            "1.2.3:7447",
            "-bad.example:7447",
            "a..b:7447",
            "bad_name:7447",
            "hub example:7447",
            ":7447",
            "::1:7447x",
        ] {
            assert!(s.parse::<HubAddr>().is_err(), "{s:?} was accepted");
        }
        let long = format!("{}.example:7447", "a".repeat(300));
        assert!(long.parse::<HubAddr>().is_err());
        let label = format!("{}.example:7447", "a".repeat(64));
        assert!(label.parse::<HubAddr>().is_err());
    }

    #[test]
    fn lists_are_bounded_nonempty_and_deduplicated() {
        assert!(parse_list::<&str>(&[]).is_err());
        let nine: Vec<String> = (1..=9).map(|p| format!("127.0.0.1:{p}")).collect();
        assert!(parse_list(&nine).is_err());
        assert_eq!(
            parse_list(&["localhost:1", "LOCALHOST:1", "127.0.0.1:1"])
                .unwrap()
                .len(),
            2
        );
        assert!(parse_list(&["localhost:1", "nope"]).is_err());
    }

    #[test]
    fn serde_reads_old_socket_address_strings() {
        // A hub's stored config and old tickets hold `SocketAddr`s as JSON strings.
        let old = serde_json::to_string(&vec![SocketAddr::from(([127, 0, 0, 1], 7447))]).unwrap();
        let read: Vec<HubAddr> = serde_json::from_str(&old).unwrap();
        assert_eq!(
            read,
            vec![HubAddr::Socket(SocketAddr::from(([127, 0, 0, 1], 7447)))]
        );
        assert!(serde_json::from_str::<Vec<HubAddr>>("[\"no port\"]").is_err());
    }
}
