//! The node's uplinks: interfaces that carry a default route, and everything stacked with them.
//! knd never publishes them — moving one into a pod would cut the node off.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use super::{
    exclusion::{Exclusion, ExclusionReason},
    netdev::Netdev,
};
use crate::os::host::{HostRoot, Warnings};

/// `RTF_REJECT`: an unreachable route (the kernel's placeholder IPv6 default on `lo`).
const RTF_REJECT: u32 = 0x0200;

/// Interfaces with a default route in `proc/net/route` (IPv4) and `proc/net/ipv6_route`.
pub fn default_route_interfaces(
    host: &HostRoot,
    warnings: &mut Warnings,
) -> Vec<(String, &'static str)> {
    type Table = (&'static str, fn(&str) -> Vec<String>, &'static str);
    let tables: [Table; 2] = [
        ("/proc/net/route", parse_ipv4_defaults, "IPv4"),
        ("/proc/net/ipv6_route", parse_ipv6_defaults, "IPv6"),
    ];
    let mut found = Vec::new();
    for (path, parse, family) in tables {
        match host.read(path) {
            Ok(Some(table)) => found.extend(parse(&table).into_iter().map(|i| (i, family))),
            Ok(None) => {}
            Err(problem) => warnings.push(problem),
        }
    }
    found
}

/// Interfaces of default routes (destination and mask 0) in `/proc/net/route` text.
pub fn parse_ipv4_defaults(table: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if fields.len() >= 8
            && fields[1] == "00000000"
            && fields[7] == "00000000"
            && !found.iter().any(|f| f == fields[0])
        {
            found.push(fields[0].to_owned());
        }
    }
    found
}

/// Interfaces of default routes (`::/0`, not rejecting) in `/proc/net/ipv6_route` text.
pub fn parse_ipv6_defaults(table: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in table.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // dest plen src splen nexthop metric refcnt use flags iface
        if fields.len() < 10 || fields[1] != "00" || fields[0].bytes().any(|b| b != b'0') {
            continue;
        }
        let flags = u32::from_str_radix(fields[8], 16).unwrap_or(RTF_REJECT);
        if flags & RTF_REJECT != 0 || fields[9] == "lo" {
            continue;
        }
        if !found.iter().any(|f| f == fields[9]) {
            found.push(fields[9].to_owned());
        }
    }
    found
}

/// Addresses per interface from `proc/net/if_inet6` (IPv6 only: procfs lists IPv4 addresses
/// without their interface).
pub fn ipv6_addresses(host: &HostRoot, warnings: &mut Warnings) -> BTreeMap<String, Vec<IpAddr>> {
    match host.read("/proc/net/if_inet6") {
        Ok(Some(table)) => parse_if_inet6(&table),
        Ok(None) => BTreeMap::new(),
        Err(problem) => {
            warnings.push(problem);
            BTreeMap::new()
        }
    }
}

/// `proc/net/if_inet6` text: `address ifindex prefix scope flags name` per line.
pub fn parse_if_inet6(table: &str) -> BTreeMap<String, Vec<IpAddr>> {
    let mut found: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for line in table.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [hex, _, _, _, _, name] = fields.as_slice() else {
            continue;
        };
        if let Ok(bits) = u128::from_str_radix(hex, 16)
            && hex.len() == 32
        {
            found
                .entry((*name).to_owned())
                .or_default()
                .push(IpAddr::V6(Ipv6Addr::from(bits)));
        }
    }
    found
}

/// Every interface that belongs to an uplink: the default-route interfaces and the interfaces
/// holding one of the node's addresses (`holding`), and everything stacked with them in either
/// direction — the devices under them (bond members, a VLAN's or macvlan's parent, bridge
/// ports), the devices over them (a macvlan or VLAN on the uplink, the bridge or bond it is
/// enslaved to) and, through the shared `ovs-system` master, every Open vSwitch port. Records
/// why each is excluded.
pub fn expand<'a>(
    defaults: &[(String, &'static str)],
    holding: &[(String, IpAddr)],
    netdevs: &'a [Netdev],
    excluded: &mut Vec<Exclusion>,
) -> BTreeSet<&'a str> {
    let mut set: BTreeSet<&str> = BTreeSet::new();
    let mut queue: Vec<(&str, String)> = Vec::new();
    let seeds = defaults
        .iter()
        .map(|(name, family)| (name, ExclusionReason::DefaultRoute { family }))
        .chain(
            holding
                .iter()
                .map(|(name, address)| (name, ExclusionReason::NodeAddress { address: *address })),
        );
    for (name, reason) in seeds {
        let Some(netdev) = netdevs.iter().find(|n| &n.name == name) else {
            continue;
        };
        if set.insert(netdev.name.as_str()) {
            excluded.push(Exclusion {
                device: netdev.name.clone(),
                reason,
            });
            queue.push((netdev.name.as_str(), netdev.name.clone()));
        }
    }
    while let Some((name, uplink)) = queue.pop() {
        let Some(current) = netdevs.iter().find(|n| n.name == name) else {
            continue;
        };
        let related = netdevs.iter().filter(|n| {
            current.lowers.contains(&n.name)
                || n.lowers.contains(&current.name)
                || n.master.as_deref() == Some(current.name.as_str())
                || current.master.as_deref() == Some(n.name.as_str())
        });
        for member in related {
            if set.insert(member.name.as_str()) {
                excluded.push(Exclusion {
                    device: member.name.clone(),
                    reason: ExclusionReason::UplinkMember {
                        uplink: uplink.clone(),
                    },
                });
                queue.push((member.name.as_str(), uplink.clone()));
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_default_routes_are_found() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     bond0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_ipv4_defaults(table), ["eth0", "bond0"]);
        assert!(parse_ipv4_defaults("Iface Destination\ngarbage\n").is_empty());
    }

    #[test]
    fn ipv6_default_routes_skip_the_reject_placeholder_on_lo() {
        let table = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n\
                     00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                     fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth1\n";
        assert_eq!(parse_ipv6_defaults(table), ["eth0"]);
    }

    #[test]
    fn if_inet6_lists_addresses_by_interface() {
        let table = "fd000000000000000000000000000005 02 40 00 80     eth0\n\
                     fe80000000000000020000fffe000001 03 40 20 80     ens1\n\
                     garbage\n";
        let found = parse_if_inet6(table);
        assert_eq!(found["eth0"], ["fd00::5".parse::<IpAddr>().unwrap()]);
        assert_eq!(found.len(), 2);
    }

    /// The default route on a bridge or an Open vSwitch bridge over the NIC: the NIC is the
    /// uplink's port, and so is a macvlan stacked on it.
    #[test]
    fn ports_of_a_bridge_or_ovs_bridge_and_devices_stacked_on_them_join_the_uplink() {
        let dev = |name: &str, master: Option<&str>, lowers: &[&str]| Netdev {
            name: name.into(),
            master: master.map(Into::into),
            lowers: lowers.iter().map(|l| (*l).to_owned()).collect(),
            ..Netdev::default()
        };
        let bridged = [
            dev("br0", None, &["eth0"]),
            dev("eth0", Some("br0"), &[]),
            dev("mv0", None, &["eth0"]),
            dev("eth1", None, &[]),
        ];
        let mut excluded = Vec::new();
        let set = expand(&[("br0".into(), "IPv6")], &[], &bridged, &mut excluded);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["br0", "eth0", "mv0"]);
        // Open vSwitch: every port, the bridge's internal port included, has `ovs-system` as
        // master; nothing links the NIC to br-ex directly.
        let ovs = [
            dev("ovs-system", None, &[]),
            dev("br-ex", Some("ovs-system"), &[]),
            dev("eth0", Some("ovs-system"), &[]),
            dev("eth1", None, &[]),
        ];
        let mut excluded = Vec::new();
        let set = expand(&[("br-ex".into(), "IPv4")], &[], &ovs, &mut excluded);
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            ["br-ex", "eth0", "ovs-system"]
        );
        // The node's address on an interface without a default route.
        let mut excluded = Vec::new();
        let address: IpAddr = "10.0.0.5".parse().unwrap();
        let set = expand(&[], &[("eth1".into(), address)], &ovs, &mut excluded);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["eth1"]);
        assert_eq!(excluded[0].reason, ExclusionReason::NodeAddress { address });
    }

    #[test]
    fn bond_members_and_enslaved_vfs_join_the_uplink() {
        let dev = |name: &str, master: Option<&str>, lowers: &[&str]| Netdev {
            name: name.into(),
            master: master.map(Into::into),
            lowers: lowers.iter().map(|l| (*l).to_owned()).collect(),
            ..Netdev::default()
        };
        let netdevs = [
            dev("bond0", None, &["eth0", "eth1"]),
            dev("eth0", Some("bond0"), &[]),
            dev("eth1", Some("bond0"), &[]),
            dev("enP1s1", Some("eth1"), &[]),
            dev("eth2", None, &[]),
        ];
        let mut excluded = Vec::new();
        let set = expand(&[("bond0".into(), "IPv4")], &[], &netdevs, &mut excluded);
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            ["bond0", "enP1s1", "eth0", "eth1"]
        );
        assert_eq!(excluded.len(), 4);
        assert!(excluded.iter().all(|e| e.device != "eth2"));
        assert!(excluded.contains(&Exclusion {
            device: "enP1s1".into(),
            reason: ExclusionReason::UplinkMember {
                uplink: "bond0".into()
            }
        }));
    }
}
