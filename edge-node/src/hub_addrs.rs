//! Where the device finds its hub: the hub's advertised addresses (`IP:PORT` or `NAME:PORT`,
//! from the ticket, replaced by the hub's refresh when the hub moves), names resolved at each
//! dial with a timeout, and the last good addresses of each name remembered in the store for
//! when the resolver is down.
//!
//! Store rows (device table): [`K_HUB_ADDRS`], the list the hub last sent (absent: the
//! ticket's), and [`K_HUB_RESOLVED`], each name's last resolution.

use crate::device::Device;
use shared::hub_addr::{self, HubAddr};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The device-store row holding the hub's addresses as its last refresh sent them (JSON list
/// of strings); absent until the hub first moves, when the ticket's apply.
pub const K_HUB_ADDRS: &str = "hub_addrs";
/// The device-store row holding each hub name's last good resolution (JSON map of
/// `NAME:PORT` to socket addresses).
pub const K_HUB_RESOLVED: &str = "hub_resolved";
/// How long one name's resolution may take before its remembered addresses are used.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most addresses remembered (and dialled) per name.
pub const MAX_ADDRS_PER_NAME: usize = 16;

/// Resolves a name to socket addresses (the system's resolver, or a test's).
pub trait Resolver {
    /// The addresses of `host` with `port`.
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send;
}

/// The operating system's resolver (`getaddrinfo`, through tokio's `lookup_host`).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send {
        let host = host.to_owned();
        async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        }
    }
}

/// The hub addresses this device dials: the last list the hub sent, else the ticket's.
pub fn current(device: &Device) -> Vec<String> {
    device
        .store()
        .get(K_HUB_ADDRS)
        .ok()
        .flatten()
        .and_then(|raw| serde_json::from_slice::<Vec<String>>(&raw).ok())
        .filter(|list| hub_addr::parse_list(list).is_ok())
        .unwrap_or_else(|| device.enrollment().hub.addrs.clone())
}

/// The `NAME:PORT` addresses of the region's hubs: the enrolled hub's [`current`] ones and
/// the peer hub's.
fn region_names(device: &Device) -> Vec<String> {
    let mut lists = vec![current(device)];
    lists.extend(device.peer_hub().map(|p| p.contact.addrs.clone()));
    lists
        .iter()
        .flat_map(|l| hub_addr::parse_list(l).unwrap_or_default())
        .filter(|a| a.socket().is_none())
        .map(|a| a.to_string())
        .collect()
}

/// The socket addresses and the names of [`current`].
pub fn split(device: &Device) -> (Vec<SocketAddr>, Vec<HubAddr>) {
    let list = hub_addr::parse_list(&current(device)).unwrap_or_default();
    let sockets = list.iter().filter_map(HubAddr::socket).collect();
    let names = list.into_iter().filter(|a| a.socket().is_none()).collect();
    (sockets, names)
}

/// The row to store for a refresh's hub addresses, when they are acceptable: 1 to
/// [`hub_addr::MAX_HUB_ADDRS`] parseable addresses (normalised). A list that is not is
/// logged and ignored: the device keeps dialling the addresses it has, and is never left with
/// none.
pub fn accepted_row(list: &[String]) -> Option<Vec<u8>> {
    match hub_addr::parse_list(list) {
        Ok(addrs) => {
            let strings: Vec<String> = addrs.iter().map(HubAddr::to_string).collect();
            tracing::info!(addrs = ?strings, "the hub's addresses changed");
            serde_json::to_vec(&strings).ok()
        }
        Err(e) => {
            tracing::warn!("ignoring the hub addresses in its refresh: {e}");
            None
        }
    }
}

fn remembered(device: &Device) -> BTreeMap<String, Vec<SocketAddr>> {
    device
        .store()
        .get(K_HUB_RESOLVED)
        .ok()
        .flatten()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default()
}

fn lock(device: &Mutex<Device>) -> std::sync::MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every address to dial the hub at: `sockets` as they are, and each of `names` resolved
/// now (bounded by [`RESOLVE_TIMEOUT`]); a name that does not resolve is logged and its
/// last good addresses are used. What resolved is remembered; names no longer in `names`
/// are forgotten. The device is locked only to read and write the store, never across a
/// resolution.
pub async fn dial_addrs(
    device: &Arc<Mutex<Device>>,
    sockets: &[SocketAddr],
    names: &[HubAddr],
    resolver: &impl Resolver,
) -> Vec<SocketAddr> {
    fn push(a: SocketAddr, out: &mut Vec<SocketAddr>) {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in sockets {
        push(*a, &mut out);
    }
    if names.is_empty() {
        return out;
    }
    // The names of every hub of the region stay remembered, whichever is dialled now.
    let (mut memory, region) = {
        let dev = lock(device);
        (remembered(&dev), region_names(&dev))
    };
    let before = memory.clone();
    for name in names {
        let HubAddr::Name { host, port } = name else {
            continue;
        };
        let key = name.to_string();
        let why = match tokio::time::timeout(RESOLVE_TIMEOUT, resolver.lookup(host, *port)).await {
            Ok(Ok(found)) if !found.is_empty() => {
                let mut unique = Vec::new();
                for a in found {
                    if unique.len() < MAX_ADDRS_PER_NAME {
                        push(a, &mut unique);
                    }
                }
                for a in &unique {
                    push(*a, &mut out);
                }
                memory.insert(key, unique);
                continue;
            }
            Ok(Ok(_)) => "the resolver answered with no address".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {RESOLVE_TIMEOUT:?}"),
        };
        match memory.get(&key) {
            Some(last) => {
                tracing::warn!(
                    "cannot resolve the hub's name {key}: {why}; dialling its last good addresses {last:?}"
                );
                for a in last {
                    push(*a, &mut out);
                }
            }
            None => tracing::warn!(
                "cannot resolve the hub's name {key}: {why}; no address of it is remembered"
            ),
        }
    }
    memory.retain(|k, _| names.iter().any(|n| n.to_string() == *k) || region.contains(k));
    if memory != before {
        match serde_json::to_vec(&memory) {
            Ok(json) => {
                if let Err(e) = lock(device).store().put(&[(K_HUB_RESOLVED, &json)]) {
                    tracing::warn!("cannot remember the hub's resolved addresses: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot remember the hub's resolved addresses: {e}"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::tests::enrolled;
    use shared::Day;
    use shared::ticket::Refresh;

    const NOON: u64 = 20_200 * 86_400 + 12 * 3600;

    /// A resolver whose answer the test sets: addresses, an error, or no answer at all.
    struct TestResolver(Mutex<Option<std::io::Result<Vec<SocketAddr>>>>);

    impl TestResolver {
        fn answering(addrs: &[SocketAddr]) -> TestResolver {
            TestResolver(Mutex::new(Some(Ok(addrs.to_vec()))))
        }
        fn set(&self, answer: Option<std::io::Result<Vec<SocketAddr>>>) {
            *self.0.lock().unwrap() = answer;
        }
    }

    impl Resolver for TestResolver {
        fn lookup(
            &self,
            host: &str,
            port: u16,
        ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send {
            let answer = match &*self.0.lock().unwrap() {
                _ if (host, port) != ("hub.test", 7447) => {
                    Some(Err(std::io::Error::other("no such name")))
                }
                Some(Ok(a)) => Some(Ok(a.clone())),
                Some(Err(e)) => Some(Err(std::io::Error::new(e.kind(), e.to_string()))),
                None => None,
            };
            async move {
                match answer {
                    Some(a) => a,
                    None => std::future::pending().await,
                }
            }
        }
    }

    fn refresh(addrs: &[&str]) -> Refresh {
        Refresh {
            day_keys: Vec::new(),
            keyring: None,
            roster: None,
            hub_addrs: Some(addrs.iter().map(|s| s.to_string()).collect()),
            revocations: None,
            peer_hub: None,
        }
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_refresh_replaces_the_hub_addresses_only_with_a_valid_list() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dev = enrolled(&tmp, NOON, Day::of(NOON), 35);
        assert_eq!(current(&dev), vec!["127.0.0.1:7447".to_owned()]);
        let have = dev.refresh_have(NOON).unwrap();
        assert_eq!(
            have.hub_addrs,
            Some(shared::ticket::digest(&vec!["127.0.0.1:7447".to_owned()]))
        );

        dev.apply_refresh(&refresh(&["HUB.test:7447", "127.0.0.2:7447"]))
            .unwrap();
        let moved = vec!["hub.test:7447".to_owned(), "127.0.0.2:7447".to_owned()];
        assert_eq!(current(&dev), moved);
        assert_eq!(
            split(&dev),
            (
                vec![sock("127.0.0.2:7447")],
                vec!["hub.test:7447".parse().unwrap()]
            )
        );
        assert_eq!(
            dev.refresh_have(NOON).unwrap().hub_addrs,
            Some(shared::ticket::digest(&moved)),
            "the next hello names the new list, so the hub stops sending it"
        );

        let nine: Vec<String> = (1..=9).map(|p| format!("127.0.0.1:{p}")).collect();
        let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
        for bad in [&[][..], &nine[..], &["127.0.0.1:1", "not an address"][..]] {
            dev.apply_refresh(&refresh(bad)).unwrap();
            assert_eq!(current(&dev), moved, "{bad:?} replaced the hub's addresses");
        }
        // Without hub addresses the refresh leaves them alone.
        dev.apply_refresh(&Refresh {
            hub_addrs: None,
            ..refresh(&[])
        })
        .unwrap();
        assert_eq!(current(&dev), moved);
        drop(dev);
        let dev = Device::open(&tmp.path().join("dev")).unwrap();
        assert_eq!(current(&dev), moved, "and on disk");
    }

    #[tokio::test]
    async fn names_resolve_at_each_dial_and_the_last_good_addresses_serve_a_resolver_that_is_down()
    {
        let tmp = tempfile::tempdir().unwrap();
        let mut dev = enrolled(&tmp, NOON, Day::of(NOON), 35);
        dev.apply_refresh(&refresh(&["hub.test:7447", "127.0.0.9:7447"]))
            .unwrap();
        let (sockets, names) = split(&dev);
        let dev = Arc::new(Mutex::new(dev));
        macro_rules! dial {
            ($r:expr) => {
                dial_addrs(&dev, &sockets, &names, $r)
            };
        }

        let resolver = TestResolver::answering(&[sock("127.0.0.1:7447")]);
        assert_eq!(
            dial!(&resolver).await,
            vec![sock("127.0.0.9:7447"), sock("127.0.0.1:7447")]
        );
        // The hub restarted elsewhere and its name now resolves to another address: the next
        // dial uses the new one only.
        resolver.set(Some(Ok(vec![
            sock("127.0.0.2:7447"),
            sock("127.0.0.2:7447"),
        ])));
        assert_eq!(
            dial!(&resolver).await,
            vec![sock("127.0.0.9:7447"), sock("127.0.0.2:7447")]
        );
        // The resolver is down: the last good addresses are dialled.
        resolver.set(Some(Err(std::io::Error::other("no DNS server"))));
        assert_eq!(
            dial!(&resolver).await,
            vec![sock("127.0.0.9:7447"), sock("127.0.0.2:7447")]
        );
        resolver.set(Some(Ok(Vec::new())));
        assert_eq!(
            dial!(&resolver).await,
            vec![sock("127.0.0.9:7447"), sock("127.0.0.2:7447")]
        );
        // ... and a resolver that never answers is given up on after RESOLVE_TIMEOUT.
        resolver.set(None);
        let started = std::time::Instant::now();
        assert_eq!(
            dial!(&resolver).await,
            vec![sock("127.0.0.9:7447"), sock("127.0.0.2:7447")]
        );
        assert!(started.elapsed() < RESOLVE_TIMEOUT + Duration::from_secs(2));

        // Remembered in the store, across a restart of the device.
        let path = tmp.path().join("dev");
        drop(Arc::try_unwrap(dev).ok().unwrap());
        let dev = Arc::new(Mutex::new(Device::open(&path).unwrap()));
        resolver.set(Some(Err(std::io::Error::other("no DNS server"))));
        assert_eq!(
            dial_addrs(&dev, &sockets, &names, &resolver).await,
            vec![sock("127.0.0.9:7447"), sock("127.0.0.2:7447")]
        );

        // A name the hub no longer lists is forgotten (while a hub of the region lists it,
        // it is kept whichever hub is dialled).
        let other: HubAddr = "other.test:7447".parse().unwrap();
        dial_addrs(&dev, &sockets, std::slice::from_ref(&other), &resolver).await;
        assert_eq!(remembered(&lock(&dev)).len(), 1, "still the hub's name");
        lock(&dev)
            .apply_refresh(&refresh(&["other.test:7447", "127.0.0.9:7447"]))
            .unwrap();
        dial_addrs(&dev, &sockets, &[], &resolver).await;
        assert_eq!(
            remembered(&lock(&dev)).len(),
            1,
            "no names: nothing touched"
        );
        assert_eq!(
            dial_addrs(&dev, &sockets, &[other], &resolver).await,
            vec![sock("127.0.0.9:7447")]
        );
        assert!(remembered(&lock(&dev)).is_empty());
    }

    #[tokio::test]
    async fn a_name_that_never_resolved_gives_no_address() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = Arc::new(Mutex::new(enrolled(&tmp, NOON, Day::of(NOON), 35)));
        let resolver = TestResolver(Mutex::new(Some(Err(std::io::Error::other("down")))));
        let names = vec!["hub.test:7447".parse().unwrap()];
        assert!(dial_addrs(&dev, &[], &names, &resolver).await.is_empty());
    }
}
