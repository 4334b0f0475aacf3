//! Why a device is not published: the uplink, virtual and CNI-made interfaces, devices bound to
//! userspace drivers, PFs whose VFs are published, and what the operator's selector left out.

use std::net::IpAddr;

/// A device knd will not publish, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    /// Interface name or PCI address.
    pub device: String,
    /// Why.
    pub reason: ExclusionReason,
}

/// Why a device is not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExclusionReason {
    /// It carries a default route: moving it would cut the node off.
    DefaultRoute {
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// It holds one of the Node's addresses (`status.addresses`).
    NodeAddress {
        /// The address.
        address: IpAddr,
    },
    /// It is stacked under or over an uplink (bond member, bridge port, VLAN or macvlan
    /// parent, Open vSwitch port, VF of a synthetic NIC, ...).
    UplinkMember {
        /// The uplink it belongs to.
        uplink: String,
    },
    /// The loopback interface.
    Loopback,
    /// A bridge.
    Bridge,
    /// An interface a CNI plugin or container runtime made on the host.
    CniInterface,
    /// A bond (its members are what could be allocated).
    Bond,
    /// Bound to a user-space driver: there is no kernel interface to move.
    UserspaceDriver {
        /// The driver.
        driver: String,
    },
    /// A physical function with virtual functions enabled: its MTU, features and link govern
    /// the VFs, which other pods get, so it is not handed out while they exist.
    SriovPhysicalFunction {
        /// VFs enabled (`sriov_numvfs`).
        vfs: u32,
    },
    /// The `--filter` expression rejected it.
    Filter {
        /// The expression.
        expression: String,
    },
    /// The `--filter` expression could not be evaluated for it (e.g. it lacks an attribute the
    /// expression reads).
    FilterFailed {
        /// What went wrong.
        message: String,
    },
}

impl std::fmt::Display for ExclusionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DefaultRoute { family } => write!(f, "carries the default {family} route"),
            Self::NodeAddress { address } => write!(f, "holds the node's address {address}"),
            Self::UplinkMember { uplink } => write!(f, "part of the uplink {uplink}"),
            Self::Loopback => f.write_str("loopback"),
            Self::Bridge => f.write_str("bridge"),
            Self::CniInterface => f.write_str("made by a CNI plugin or container runtime"),
            Self::Bond => f.write_str("bond (its members are considered instead)"),
            Self::UserspaceDriver { driver } => write!(f, "bound to user-space driver {driver}"),
            Self::SriovPhysicalFunction { vfs } => {
                write!(
                    f,
                    "physical function with {vfs} VFs enabled (they are published)"
                )
            }
            Self::Filter { expression } => write!(f, "rejected by --filter `{expression}`"),
            Self::FilterFailed { message } => write!(f, "--filter failed: {message}"),
        }
    }
}
