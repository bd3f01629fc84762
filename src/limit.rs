//! Connection limits per client address.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Counts open sessions per client IP address and refuses past a maximum,
/// so one host cannot take every connection slot. IPv6 clients count per
/// /64 network: one host is usually given a whole /64 to pick from.
#[derive(Debug, Clone)]
pub struct AddressLimit {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open session of an address; dropping it frees the slot.
#[derive(Debug)]
pub struct AddressPermit {
    limit: AddressLimit,
    ip: IpAddr,
}

impl AddressLimit {
    /// At most `max` sessions per address.
    pub fn new(max: usize) -> AddressLimit {
        AddressLimit {
            max,
            open: Arc::default(),
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `ip`, unless it already has the maximum.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<AddressPermit> {
        let ip = group(ip);
        let mut open = self.open();
        let count = open.get(&ip).copied().unwrap_or(0);
        if count >= self.max {
            return None;
        }
        open.insert(ip, count + 1);
        Some(AddressPermit {
            limit: self.clone(),
            ip,
        })
    }

    /// Sessions open from `ip`.
    #[cfg(test)]
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.open().get(&group(ip)).copied().unwrap_or(0)
    }

    /// Addresses with at least one open session.
    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.open().len()
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64.
fn group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

impl Drop for AddressPermit {
    fn drop(&mut self) {
        let mut open = self.limit.open();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_per_address_and_freed_on_drop() {
        let limit = AddressLimit::new(2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let first = limit.try_acquire(a).unwrap();
        let _second = limit.try_acquire(a).unwrap();
        assert!(limit.try_acquire(a).is_none());
        assert!(
            limit.try_acquire(b).is_some(),
            "another address has its own slots"
        );
        drop(first);
        assert_eq!(limit.open_from(a), 1);
        let _third = limit.try_acquire(a).unwrap();
        drop(_third);
        drop(_second);
        assert_eq!(
            limit.addresses(),
            0,
            "no entry is left for an address with nothing open"
        );
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let limit = AddressLimit::new(1);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _first = limit.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        assert!(limit.try_acquire(ip("2001:db8:1:2:ffff::9")).is_none());
        assert!(limit.try_acquire(ip("2001:db8:1:3::1")).is_some());
        let _v4 = limit.try_acquire(ip("::ffff:192.0.2.1")).unwrap();
        assert!(
            limit.try_acquire(ip("192.0.2.1")).is_none(),
            "mapped IPv4 is IPv4"
        );
        assert!(limit.try_acquire(ip("192.0.2.2")).is_some());
    }
}
