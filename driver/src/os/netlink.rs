//! Link-level netlink operations (rtnetlink) used to build, move and inspect interfaces.
//!
//! A netlink socket belongs to the namespace of the thread that opened it: open a [`Link`] handle
//! inside the target namespace (see [`crate::os::netns::Netns::block_on`]).

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    address::{
        AddressAttribute, AddressFlags, AddressMessage, AddressProtocol, AddressScope, CacheInfo,
    },
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteProtocol,
        RouteScope, RouteType,
    },
};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::{
    model::link::{
        Address, DeviceIdentity, LINK_ERRORS, LinkPeer, LinkReading, LinkSettings, LinkStats,
        Neighbor, OffloadSizes, Route,
    },
    os::netns::Netns,
};

/// Errors from netlink operations. Each names the operation and the interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    /// No interface has this name in the namespace.
    #[error("interface {0} does not exist")]
    NoSuchLink(String),
    /// The kernel refused an operation.
    #[error("{operation} on interface {link} failed")]
    Kernel {
        /// What was attempted (e.g. "set up", "add address 10.0.0.1/24").
        operation: String,
        /// The interface, by name or index.
        link: String,
        /// What the kernel said.
        #[source]
        source: rtnetlink::Error,
    },
    /// The request cannot be expressed (e.g. a malformed MAC address).
    #[error("interface {link}: {reason}")]
    InvalidRequest {
        /// The interface.
        link: String,
        /// What was wrong.
        reason: String,
    },
    /// The kernel's reply lacked an attribute every link carries.
    #[error("the kernel's reply for interface {link} has no {attribute}")]
    MissingAttribute {
        /// The interface.
        link: String,
        /// The attribute looked for.
        attribute: &'static str,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl DeviceIdentity {
    /// The identity `link` reports.
    pub fn of(link: &LinkMessage) -> Self {
        let mut identity = Self::default();
        let (mut bus, mut device) = (None, None);
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::PermAddress(bytes) if bytes.iter().any(|b| *b != 0) => {
                    identity.permanent_mac = Some(format_mac(bytes));
                }
                LinkAttribute::ParentDevBusName(name) => bus = Some(name.clone()),
                LinkAttribute::ParentDevName(name) => device = Some(name.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    identity.kind = infos.iter().find_map(|info| match info {
                        LinkInfo::Kind(kind) => Some(kind.to_string()),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        identity.parent = device.map(|d| format!("{}/{d}", bus.unwrap_or_default()));
        identity
    }

    /// Whether the identity names one device on the node (a permanent MAC or a parent device);
    /// a virtual interface's kind alone does not.
    pub fn is_hardware(&self) -> bool {
        self.permanent_mac.is_some() || self.parent.is_some()
    }
}

impl LinkPeer {
    /// The peer `link` reports, if any (hardware has none).
    pub fn of(link: &LinkMessage) -> Option<Self> {
        let mut peer = None;
        let mut netnsid = None;
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Link(index) => peer = Some(*index),
                LinkAttribute::LinkNetNsId(id) => netnsid = Some(*id),
                _ => {}
            }
        }
        peer.map(|index| Self { netnsid, index })
    }
}

/// The interface of `entries` with hardware identity `identity` (never one that merely has
/// the same current MAC address: that is anyone's to set).
pub fn with_identity<'a>(
    entries: &'a [LinkEntry],
    identity: &DeviceIdentity,
) -> Option<&'a LinkEntry> {
    if !identity.is_hardware() {
        return None;
    }
    entries.iter().find(|entry| entry.identity == *identity)
}

/// The interface of `entries` that is the device recorded with `identity` and `peer` (seen
/// from the same namespace): by hardware identity, or for a veth by its peer, which no other
/// veth can have. Never by name or MAC; a macvlan's parent is shared, so a macvlan is not
/// found.
pub fn recorded<'a>(
    entries: &'a [LinkEntry],
    identity: &DeviceIdentity,
    peer: Option<LinkPeer>,
) -> Option<&'a LinkEntry> {
    if identity.is_hardware() {
        return with_identity(entries, identity);
    }
    let peer = peer?;
    if identity.kind.as_deref() != Some("veth") {
        return None;
    }
    entries
        .iter()
        .find(|entry| entry.identity == *identity && entry.peer == Some(peer))
}

/// The name `link` reports.
pub fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// One interface as a link dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEntry {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND`, for virtual devices.
    pub kind: Option<String>,
    /// Its current MAC address, if it has one.
    pub mac: Option<String>,
    /// What identifies it whatever its name or MAC.
    pub identity: DeviceIdentity,
    /// What it is linked to (a veth's peer, a macvlan's parent).
    pub peer: Option<LinkPeer>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<Vec<u8>> {
    let bytes: Option<Vec<u8>> = text
        .split(':')
        .map(|part| {
            u8::from_str_radix(part, 16)
                .ok()
                .filter(|_| part.len() == 2)
        })
        .collect();
    bytes.filter(|b| b.len() == 6)
}

fn route_address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// The kernel's traffic counters in `link` (the interface called `name`, for messages).
pub fn stats_of(link: &LinkMessage, name: &str) -> Result<LinkStats> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Stats64(stats) => Some(LinkStats {
                rx_packets: stats.rx_packets,
                rx_bytes: stats.rx_bytes,
                tx_packets: stats.tx_packets,
                tx_bytes: stats.tx_bytes,
                tx_dropped: stats.tx_dropped,
            }),
            _ => None,
        })
        .ok_or_else(|| Error::MissingAttribute {
            link: name.to_owned(),
            attribute: "IFLA_STATS64",
        })
}

/// Notifications from [`Link::subscribe`].
#[derive(Debug)]
pub struct Events {
    messages: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl Events {
    /// Waits for the next notification; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<()> {
        use futures::StreamExt as _;
        self.messages.next().await.map(|_| ())
    }
}

/// The interface an operation acts on: by name (looked up first, one more round trip), or at an
/// index already known — what knd uses for a device it placed itself: no lookup, and no name
/// that someone else in the namespace could have taken in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iface<'a> {
    /// The interface called this.
    Named(&'a str),
    /// The interface at `index`; `name` is only for messages.
    At {
        /// Its index in the connection's namespace.
        index: u32,
        /// Its name, for messages.
        name: &'a str,
    },
}

impl<'a> Iface<'a> {
    /// The name, for messages.
    pub fn name(&self) -> &'a str {
        match self {
            Self::Named(name) | Self::At { name, .. } => name,
        }
    }
}

impl<'a> From<&'a str> for Iface<'a> {
    fn from(name: &'a str) -> Self {
        Self::Named(name)
    }
}

impl<'a> From<&'a String> for Iface<'a> {
    fn from(name: &'a String) -> Self {
        Self::Named(name)
    }
}

/// A netlink connection in the namespace of the thread that created it.
#[derive(Clone, Debug)]
pub struct Link {
    handle: rtnetlink::Handle,
}

impl Link {
    /// Opens a connection in the calling thread's namespace; must be called inside a tokio runtime
    /// (the connection's driver task is spawned on it).
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Opens a connection in `netns` that the caller's runtime drives: a netlink socket belongs
    /// to the namespace it was created in, whichever thread uses it, so only the socket's
    /// creation runs on a thread inside `netns` (none when the caller is already there). Not
    /// for `/proc/sys/net`, which resolves against the reading thread's namespace.
    pub async fn connect_in(netns: &Netns) -> Result<Self> {
        use std::os::fd::{FromRawFd as _, IntoRawFd as _};
        if netns.is_current() {
            return Self::connect();
        }
        let socket = netns
            .run_async(|| rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE))
            .await
            .map_err(|e| Error::Connect(std::io::Error::other(e)))?
            .map_err(Error::Connect)?;
        socket.set_non_blocking(true).map_err(Error::Connect)?;
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is an open netlink socket that nothing else owns (`into_raw_fd` gave up
        // ownership) and it is non-blocking, so `from_raw_fd` cannot fail on that account.
        let socket = unsafe { rtnetlink::sys::TokioSocket::from_raw_fd(fd) };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Opens a connection in the calling thread's namespace that also receives the kernel's
    /// link and route notifications (`RTNLGRP_LINK`, `RTNLGRP_IPV4_ROUTE`,
    /// `RTNLGRP_IPV6_ROUTE`): interfaces added, removed, renamed, changed or moved to another
    /// namespace, and default routes coming and going.
    pub fn subscribe() -> Result<(Self, Events)> {
        use rtnetlink::{
            constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK},
            sys::{AsyncSocket as _, SocketAddr},
        };
        let (mut connection, handle, messages) =
            rtnetlink::new_connection().map_err(Error::Connect)?;
        // Join the groups through the bind address (measured here: NETLINK_ADD_MEMBERSHIP on
        // the not yet bound socket delivered nothing).
        let groups = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))
            .map_err(Error::Connect)?;
        tokio::spawn(connection);
        Ok((Self { handle }, Events { messages }))
    }

    /// The interface called `name`.
    pub async fn get(&self, name: &str) -> Result<LinkMessage> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(Error::NoSuchLink(name.to_owned())),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(Error::NoSuchLink(name.to_owned()))
            }
            Err(source) => Err(Error::Kernel {
                operation: "get".into(),
                link: name.to_owned(),
                source,
            }),
        }
    }

    /// The index of the interface called `name`.
    pub async fn index(&self, name: &str) -> Result<u32> {
        Ok(self.get(name).await?.header.index)
    }

    /// The index of `iface` (looked up by name, or known already) and its name, for messages.
    async fn target<'a>(&self, iface: impl Into<Iface<'a>>) -> Result<(u32, &'a str)> {
        match iface.into() {
            Iface::Named(name) => Ok((self.index(name).await?, name)),
            Iface::At { index, name } => Ok((index, name)),
        }
    }

    /// The kernel's traffic counters for the interface called `name`.
    pub async fn stats(&self, name: &str) -> Result<LinkStats> {
        stats_of(&self.get(name).await?, name)
    }

    /// The interface's operational state, carrier changes and error counters, as the health
    /// monitor reads them (the same values sysfs shows for an interface on the node).
    pub async fn health(&self, name: &str) -> Result<LinkReading> {
        use netlink_packet_route::link::State;
        let link = self.get(name).await?;
        let mut reading = LinkReading {
            interface: name.to_owned(),
            operstate: "unknown".to_owned(),
            ..LinkReading::default()
        };
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::OperState(state) => {
                    match state {
                        State::NotPresent => "notpresent",
                        State::Down => "down",
                        State::LowerLayerDown => "lowerlayerdown",
                        State::Testing => "testing",
                        State::Dormant => "dormant",
                        State::Up => "up",
                        _ => "unknown",
                    }
                    .clone_into(&mut reading.operstate);
                }
                LinkAttribute::CarrierChanges(changes) => {
                    reading.carrier_changes = Some(u64::from(*changes));
                }
                LinkAttribute::Stats64(stats) => {
                    let values = [
                        stats.rx_errors,
                        stats.tx_errors,
                        stats.rx_crc_errors,
                        stats.rx_frame_errors,
                        stats.rx_fifo_errors,
                        stats.rx_missed_errors,
                        stats.rx_length_errors,
                        stats.rx_over_errors,
                        stats.tx_aborted_errors,
                        stats.tx_carrier_errors,
                        stats.tx_fifo_errors,
                        stats.tx_heartbeat_errors,
                        stats.tx_window_errors,
                    ];
                    reading.errors = LINK_ERRORS
                        .iter()
                        .zip(values)
                        .map(|(name, value)| ((*name).to_owned(), value))
                        .collect();
                }
                _ => {}
            }
        }
        Ok(reading)
    }

    /// Moves the interface `name` into the namespace `target`.
    pub async fn move_to(&self, name: &str, target: &Netns) -> Result<()> {
        let index = self.index(name).await?;
        self.set(
            name,
            &format!("move to {target}"),
            LinkUnspec::new_with_index(index).setns_by_fd(target.as_fd().as_raw_fd()),
        )
        .await
    }

    /// Creates a macvlan child `name` of the interface with index `parent` (in this handle's
    /// namespace) directly inside `target`, down: the child never exists in this namespace, so
    /// nothing here can see or take it on the way.
    pub async fn add_macvlan_in(
        &self,
        parent: u32,
        name: &str,
        mode: crate::model::config::MacvlanMode,
        target: &Netns,
    ) -> Result<()> {
        use crate::model::config::MacvlanMode;
        let mode = match mode {
            MacvlanMode::Bridge => rtnetlink::packet_route::link::MacVlanMode::Bridge,
            MacvlanMode::Private => rtnetlink::packet_route::link::MacVlanMode::Private,
            MacvlanMode::Vepa => rtnetlink::packet_route::link::MacVlanMode::Vepa,
        };
        let message = rtnetlink::LinkMacVlan::new(name, parent, mode)
            .setns_by_fd(target.as_fd().as_raw_fd())
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: format!("create as a macvlan child in {target}"),
                link: name.to_owned(),
                source,
            })
    }

    /// Deletes the interface with `index`.
    pub async fn delete_index(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: "delete".into(),
                link: format!("#{index}"),
                source,
            })
    }

    /// Deletes the interface `name` (a veth's peer goes with it).
    pub async fn delete(&self, name: &str) -> Result<()> {
        let index = self.index(name).await?;
        self.delete_index(index).await.map_err(|e| match e {
            Error::Kernel {
                operation, source, ..
            } => Error::Kernel {
                operation,
                link: name.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Brings the interface `name` up.
    pub async fn set_up(&self, iface: impl Into<Iface<'_>>) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        self.set(name, "set up", LinkUnspec::new_with_index(index).up())
            .await
    }

    /// Adds `address/prefix_len` to the interface `name`.
    pub async fn add_address(
        &self,
        iface: impl Into<Iface<'_>>,
        address: IpAddr,
        prefix_len: u8,
    ) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        self.handle
            .address()
            .add(index, address, prefix_len)
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: format!("add address {address}/{prefix_len}"),
                link: name.to_owned(),
                source,
            })
    }

    /// The interface's index, name, MTU, MAC, up flag and identity.
    pub async fn settings(&self, name: &str) -> Result<LinkSettings> {
        Ok(settings_of(&self.get(name).await?, name))
    }

    /// The interface with index `index` (which no one in the namespace can give another
    /// device while it exists), as a link message.
    pub async fn get_index(&self, index: u32) -> Result<LinkMessage> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(Error::NoSuchLink(format!("#{index}"))),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(Error::NoSuchLink(format!("#{index}")))
            }
            Err(source) => Err(Error::Kernel {
                operation: "get".into(),
                link: format!("#{index}"),
                source,
            }),
        }
    }

    /// The settings of the interface with index `index`, under its current name.
    pub async fn settings_at(&self, index: u32) -> Result<LinkSettings> {
        let link = self.get_index(index).await?;
        let name = name_of(&link).unwrap_or_default().to_owned();
        Ok(settings_of(&link, &name))
    }

    /// The addresses on the interface `name` (with their prefix lengths).
    pub async fn addresses(&self, name: &str) -> Result<Vec<IpNet>> {
        Ok(self
            .address_records(name)
            .await?
            .into_iter()
            .map(|a| a.net)
            .collect())
    }

    /// The addresses on the interface `name` with their broadcast, label, scope, flags,
    /// lifetimes, prefix-route metric and protocol; IPv6 link-local ones (the kernel's own,
    /// made again on every link) left out.
    pub async fn address_records(&self, iface: impl Into<Iface<'_>>) -> Result<Vec<Address>> {
        let (index, name) = self.target(iface).await?;
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let now = unix_now();
        let mut addresses: Vec<Address> = Vec::new();
        loop {
            match dump.try_next().await {
                Ok(Some(message)) => {
                    if let Some(address) = address_of(&message, now)
                        && !addresses.iter().any(|a| a.net == address.net)
                    {
                        addresses.push(address);
                    }
                }
                Ok(None) => return Ok(addresses),
                Err(source) => {
                    return Err(Error::Kernel {
                        operation: "list addresses".into(),
                        link: name.to_owned(),
                        source,
                    });
                }
            }
        }
    }

    /// Adds `address` to the interface `name` exactly as recorded: broadcast (none unless
    /// recorded), label, scope, the flags one may set, what is left of its lifetimes, the
    /// prefix route's metric and the protocol. An address whose valid lifetime ran out while it
    /// was away is not added (the kernel would have removed it).
    pub async fn add_address_record(
        &self,
        iface: impl Into<Iface<'_>>,
        address: &Address,
    ) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        let net = address.net;
        let now = unix_now();
        let left = |until: Option<u64>| {
            until.map_or(u32::MAX, |t| {
                u32::try_from(t.saturating_sub(now)).unwrap_or(u32::MAX - 1)
            })
        };
        let valid = left(address.valid_until);
        if valid == 0 {
            return Ok(());
        }
        let mut request = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len());
        let message = request.message_mut();
        message
            .attributes
            .retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        message.header.scope = AddressScope::from(address.scope);
        if let Some(broadcast) = address.broadcast {
            message
                .attributes
                .push(AddressAttribute::Broadcast(broadcast));
        }
        if let Some(label) = &address.label {
            message
                .attributes
                .push(AddressAttribute::Label(label.clone()));
        }
        let settable = address.flags & SETTABLE_ADDRESS_FLAGS;
        if settable != 0 {
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::from_bits_retain(
                    settable,
                )));
        }
        if valid != u32::MAX || address.preferred_until.is_some() {
            let mut lifetimes = CacheInfo::default();
            lifetimes.ifa_preferred = left(address.preferred_until).min(valid);
            lifetimes.ifa_valid = valid;
            message
                .attributes
                .push(AddressAttribute::CacheInfo(lifetimes));
        }
        if let Some(priority) = address.route_priority {
            message
                .attributes
                .push(AddressAttribute::RoutePriority(priority));
        }
        if let Some(protocol) = address.protocol {
            message
                .attributes
                .push(AddressAttribute::Protocol(AddressProtocol::from(protocol)));
        }
        request.execute().await.map_err(|source| Error::Kernel {
            operation: format!("add address {net}"),
            link: name.to_owned(),
            source,
        })
    }

    /// Routes out of the interface `name` in every table except `local`, leaving out those the
    /// kernel adds by itself for addresses (protocol `kernel`) and IPv6 multicast/link-local
    /// routes: what a restore has to put back.
    pub async fn routes(&self, iface: impl Into<Iface<'_>>) -> Result<Vec<Route>> {
        let (index, name) = self.target(iface).await?;
        let mut routes = Vec::new();
        for query in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut dump = self.handle.route().get(query).execute();
            loop {
                let message = match dump.try_next().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(source) => {
                        return Err(Error::Kernel {
                            operation: "list routes".into(),
                            link: name.to_owned(),
                            source,
                        });
                    }
                };
                if let Some(route) = own_route(&message, index) {
                    routes.push(route);
                }
            }
        }
        Ok(routes)
    }

    /// Moves the interface `name` into `target` under the name `new_name`, in one request (a
    /// pod usually has an `eth0` already, so moving first and renaming after could collide).
    pub async fn move_renamed(
        &self,
        iface: impl Into<Iface<'_>>,
        target: &Netns,
        new_name: &str,
    ) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        self.set(
            name,
            &format!("move to {target} as {new_name}"),
            LinkUnspec::new_with_index(index)
                .setns_by_fd(target.as_fd().as_raw_fd())
                .name(new_name.to_owned()),
        )
        .await
    }

    /// The name of the interface whose identity is `identity`, if any; only hardware
    /// identities are looked for (a virtual interface's kind names no single device).
    pub async fn name_with_identity(&self, identity: &DeviceIdentity) -> Result<Option<String>> {
        if !identity.is_hardware() {
            return Ok(None);
        }
        Ok(with_identity(&self.links().await?, identity).map(|entry| entry.name.clone()))
    }

    /// The name of the interface recorded with `identity` and `peer` (see [`recorded`]).
    pub async fn name_of_recorded(
        &self,
        identity: &DeviceIdentity,
        peer: Option<LinkPeer>,
    ) -> Result<Option<String>> {
        Ok(recorded(&self.links().await?, identity, peer).map(|entry| entry.name.clone()))
    }

    /// Takes the interface with index `index` down and moves it into `target` as `new_name`,
    /// addressed by index throughout (a name inside a pod is the tenant's to change).
    pub async fn move_index_renamed(
        &self,
        index: u32,
        target: &Netns,
        new_name: &str,
    ) -> Result<()> {
        let label = format!("#{index}");
        self.set(&label, "set down", LinkUnspec::new_with_index(index).down())
            .await?;
        self.set(
            &label,
            &format!("move to {target} as {new_name}"),
            LinkUnspec::new_with_index(index)
                .setns_by_fd(target.as_fd().as_raw_fd())
                .name(new_name.to_owned()),
        )
        .await
    }

    /// Renames the interface `name` to `new_name`.
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<()> {
        let index = self.index(name).await?;
        self.set(
            name,
            &format!("rename to {new_name}"),
            LinkUnspec::new_with_index(index).name(new_name.to_owned()),
        )
        .await
    }

    /// Sets the GSO/GRO limits of the interface `name` that `sizes` names (others unchanged),
    /// in one request.
    pub async fn set_offload_sizes(
        &self,
        iface: impl Into<Iface<'_>>,
        sizes: OffloadSizes,
    ) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        let mut message = LinkUnspec::new_with_index(index);
        let wanted = [
            sizes.gso_max_size.map(LinkAttribute::GsoMaxSize),
            sizes.gro_max_size.map(LinkAttribute::GroMaxSize),
            sizes.gso_ipv4_max_size.map(LinkAttribute::GsoIpv4MaxSize),
            sizes.gro_ipv4_max_size.map(LinkAttribute::GroIpv4MaxSize),
        ];
        for attribute in wanted.into_iter().flatten() {
            message = message.append_extra_attribute(attribute);
        }
        self.set(name, &format!("set GSO/GRO sizes {sizes:?}"), message)
            .await
    }

    /// Sets the MTU of the interface `name`.
    pub async fn set_mtu(&self, iface: impl Into<Iface<'_>>, mtu: u32) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        self.set(
            name,
            &format!("set MTU {mtu}"),
            LinkUnspec::new_with_index(index).mtu(mtu),
        )
        .await
    }

    /// Sets IPv4 per-interface settings of `name` (what `/proc/sys/net/ipv4/conf/<name>/`
    /// shows) over netlink: `IFLA_AF_SPEC` → `AF_INET` → `IFLA_INET_CONF`, one attribute per
    /// `(IPV4_DEVCONF_* id, value)` ([`ipv4_devconf_id`]). Needs no writable `/proc/sys`, which
    /// a container does not have.
    pub async fn set_ipv4_conf(
        &self,
        iface: impl Into<Iface<'_>>,
        settings: &[(u16, u32)],
    ) -> Result<()> {
        use netlink_packet_core::{DefaultNla, Emitable as _, NLA_F_NESTED};
        use netlink_packet_route::link::{AfSpecInet, AfSpecUnspec};
        const IFLA_INET_CONF: u16 = 1;
        let (index, name) = self.target(iface).await?;
        let entries: Vec<DefaultNla> = settings
            .iter()
            .map(|(id, value)| DefaultNla::new(*id, value.to_ne_bytes().to_vec()))
            .collect();
        let mut nested = vec![0; entries.as_slice().buffer_len()];
        entries.as_slice().emit(&mut nested);
        let conf = AfSpecInet::Other(DefaultNla::new(IFLA_INET_CONF | NLA_F_NESTED, nested));
        self.set(
            name,
            "set IPv4 interface settings",
            LinkUnspec::new_with_index(index).append_extra_attribute(LinkAttribute::AfSpecUnspec(
                vec![AfSpecUnspec::Inet(vec![conf])],
            )),
        )
        .await
    }

    /// Sets the MAC address of the interface `name`.
    pub async fn set_mac(&self, iface: impl Into<Iface<'_>>, mac: &str) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        let bytes = parse_mac(mac).ok_or_else(|| Error::InvalidRequest {
            link: name.to_owned(),
            reason: format!("{mac} is not a MAC address"),
        })?;
        self.set(
            name,
            &format!("set MAC {mac}"),
            LinkUnspec::new_with_index(index).address(bytes),
        )
        .await
    }

    /// Takes the interface `name` down.
    pub async fn set_down(&self, iface: impl Into<Iface<'_>>) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        self.set(name, "set down", LinkUnspec::new_with_index(index).down())
            .await
    }

    /// Adds `route` out of the interface `name`.
    pub async fn add_route(&self, iface: impl Into<Iface<'_>>, route: &Route) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        let failed = |reason: String| Error::InvalidRequest {
            link: name.to_owned(),
            reason: format!("route to {}: {reason}", route.destination),
        };
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.destination.addr(), route.destination.prefix_len())
            .map_err(|e| failed(e.to_string()))?
            .output_interface(index)
            .table_id(route.table);
        if let Some(gateway) = route.gateway {
            builder = builder
                .gateway(gateway)
                .map_err(|e| failed(e.to_string()))?;
        }
        if let Some(source) = route.source {
            builder = builder
                .pref_source(source)
                .map_err(|e| failed(e.to_string()))?;
        }
        if let Some(metric) = route.metric {
            builder = builder.priority(metric);
        }
        let mut message = builder
            .protocol(RouteProtocol::from(route.protocol))
            .scope(RouteScope::from(route.scope))
            .build();
        message.header.flags = RouteFlags::from_bits_retain(route.flags & SETTABLE_ROUTE_FLAGS);
        let mut metrics: Vec<RouteMetric> = route
            .metrics
            .iter()
            .map(|(kind, value)| metric_from(*kind, *value))
            .collect();
        if let Some(algorithm) = &route.congestion_control {
            metrics.push(RouteMetric::CcAlgo(algorithm.clone()));
        }
        if !metrics.is_empty() {
            message.attributes.push(RouteAttribute::Metrics(metrics));
        }
        self.handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: format!("add route to {}", route.destination),
                link: name.to_owned(),
                source,
            })
    }

    /// Adds a policy routing rule: traffic from `source` and/or to `destination` (at least one,
    /// of one address family) looks up `table`.
    pub async fn add_rule(
        &self,
        priority: Option<u32>,
        source: Option<IpNet>,
        destination: Option<IpNet>,
        table: u32,
    ) -> Result<()> {
        use netlink_packet_route::rule::RuleAction;
        let what = format!(
            "add rule{}{} lookup {table}",
            source.map(|s| format!(" from {s}")).unwrap_or_default(),
            destination.map(|d| format!(" to {d}")).unwrap_or_default()
        );
        let invalid = |reason: &str| Error::InvalidRequest {
            link: "*".into(),
            reason: format!("{what}: {reason}"),
        };
        let base = self
            .handle
            .rule()
            .add()
            .table_id(table)
            .action(RuleAction::ToTable);
        let base = match priority {
            Some(priority) => base.priority(priority),
            None => base,
        };
        let outcome = match (source, destination) {
            (None, None) => return Err(invalid("needs a source or a destination")),
            (Some(IpNet::V4(_)) | None, Some(IpNet::V4(_)) | None) => {
                let mut request = base.v4();
                if let Some(IpNet::V4(net)) = source {
                    request = request.source_prefix(net.addr(), net.prefix_len());
                }
                if let Some(IpNet::V4(net)) = destination {
                    request = request.destination_prefix(net.addr(), net.prefix_len());
                }
                request.execute().await
            }
            (Some(IpNet::V6(_)) | None, Some(IpNet::V6(_)) | None) => {
                let mut request = base.v6();
                if let Some(IpNet::V6(net)) = source {
                    request = request.source_prefix(net.addr(), net.prefix_len());
                }
                if let Some(IpNet::V6(net)) = destination {
                    request = request.destination_prefix(net.addr(), net.prefix_len());
                }
                request.execute().await
            }
            _ => return Err(invalid("source and destination are of different families")),
        };
        outcome.map_err(|source| Error::Kernel {
            operation: what,
            link: "*".into(),
            source,
        })
    }

    /// Adds a permanent neighbor entry `ip` → `mac` on the interface `name`.
    pub async fn add_neighbor(
        &self,
        iface: impl Into<Iface<'_>>,
        ip: IpAddr,
        mac: &str,
    ) -> Result<()> {
        let (index, name) = self.target(iface).await?;
        let bytes = parse_mac(mac).ok_or_else(|| Error::InvalidRequest {
            link: name.to_owned(),
            reason: format!("{mac} is not a MAC address"),
        })?;
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&bytes)
            .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: format!("add neighbor {ip} at {mac}"),
                link: name.to_owned(),
                source,
            })
    }

    /// The permanent neighbor entries (static ARP/NDP) on the interface `name`, as
    /// `(address, MAC)`: the kernel drops them when the interface leaves the namespace.
    pub async fn permanent_neighbors(&self, iface: impl Into<Iface<'_>>) -> Result<Vec<Neighbor>> {
        use netlink_packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourState,
        };
        let (index, name) = self.target(iface).await?;
        let mut dump = self.handle.neighbours().get().execute();
        let mut found = Vec::new();
        loop {
            let message = match dump.try_next().await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(found),
                Err(source) => {
                    return Err(Error::Kernel {
                        operation: "list neighbors".into(),
                        link: name.to_owned(),
                        source,
                    });
                }
            };
            if message.header.ifindex != index || message.header.state != NeighbourState::Permanent
            {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for attribute in &message.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = Some(IpAddr::V4(*v4));
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = Some(IpAddr::V6(*v6));
                    }
                    NeighbourAttribute::LinkLayerAddress(bytes) if !bytes.is_empty() => {
                        mac = Some(format_mac(bytes));
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                found.push(Neighbor { ip, mac });
            }
        }
    }

    /// The kind of every interface that has one, by name (see [`Link::links`]).
    pub async fn kinds(&self) -> Result<std::collections::BTreeMap<String, String>> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter_map(|l| Some((l.name, l.kind?)))
            .collect())
    }

    /// Interfaces that carry a default route in the main table, with the address family
    /// (`IPv4`/`IPv6`), multipath next hops included.
    pub async fn default_route_interfaces(&self) -> Result<Vec<(String, &'static str)>> {
        let mut indexes: Vec<(u32, &'static str)> = Vec::new();
        let dumps = [
            (
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                "IPv4",
            ),
            (
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
                "IPv6",
            ),
        ];
        for (query, family) in dumps {
            let mut routes = self.handle.route().get(query).execute();
            loop {
                let route = match routes.try_next().await {
                    Ok(Some(route)) => route,
                    Ok(None) => break,
                    Err(source) => {
                        return Err(Error::Kernel {
                            operation: format!("dump {family} routes"),
                            link: "*".into(),
                            source,
                        });
                    }
                };
                for index in default_route_oifs(&route) {
                    if !indexes.contains(&(index, family)) {
                        indexes.push((index, family));
                    }
                }
            }
        }
        let mut named = Vec::new();
        for (index, family) in indexes {
            let mut links = self.handle.link().get().match_index(index).execute();
            if let Ok(Some(link)) = links.try_next().await
                && let Some(name) = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                })
            {
                named.push((name, family));
            }
        }
        Ok(named)
    }

    /// Every interface of the namespace: name, index and kind (`veth`, `macvlan`, `bridge`,
    /// `bond`, …, from `IFLA_LINKINFO`; hardware interfaces have none).
    pub async fn links(&self) -> Result<Vec<LinkEntry>> {
        let mut entries = Vec::new();
        let mut links = self.handle.link().get().execute();
        loop {
            let link = match links.try_next().await {
                Ok(Some(link)) => link,
                Ok(None) => return Ok(entries),
                Err(source) => {
                    return Err(Error::Kernel {
                        operation: "dump links".into(),
                        link: "*".into(),
                        source,
                    });
                }
            };
            let identity = DeviceIdentity::of(&link);
            let mac = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(bytes) if !bytes.is_empty() => Some(format_mac(bytes)),
                _ => None,
            });
            if let Some(name) = name_of(&link) {
                entries.push(LinkEntry {
                    index: link.header.index,
                    name: name.to_owned(),
                    kind: identity.kind.clone(),
                    mac,
                    identity,
                    peer: LinkPeer::of(&link),
                });
            }
        }
    }

    /// Every address of the namespace (link-local ones included), by interface index.
    pub async fn all_addresses(&self) -> Result<std::collections::BTreeSet<(u32, IpAddr)>> {
        let mut dump = self.handle.address().get().execute();
        let mut found = std::collections::BTreeSet::new();
        loop {
            match dump.try_next().await {
                Ok(Some(message)) => {
                    for attribute in &message.attributes {
                        if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) =
                            attribute
                        {
                            found.insert((message.header.index, *ip));
                        }
                    }
                }
                Ok(None) => return Ok(found),
                Err(source) => {
                    return Err(Error::Kernel {
                        operation: "list addresses".into(),
                        link: "*".into(),
                        source,
                    });
                }
            }
        }
    }

    async fn set(
        &self,
        name: &str,
        operation: &str,
        message: rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> Result<()> {
        self.handle
            .link()
            .set(message.build())
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: operation.to_owned(),
                link: name.to_owned(),
                source,
            })
    }
}

/// The kernel's `IPV4_DEVCONF_*` id of the per-interface setting named `setting` in
/// `/proc/sys/net/ipv4/conf/<interface>/` (`include/uapi/linux/ip.h`); `None` for names it does
/// not have and for `mc_forwarding`, which only the kernel sets.
pub fn ipv4_devconf_id(setting: &str) -> Option<u16> {
    const NAMES: [&str; 33] = [
        "forwarding",
        "mc_forwarding",
        "proxy_arp",
        "accept_redirects",
        "secure_redirects",
        "send_redirects",
        "shared_media",
        "rp_filter",
        "accept_source_route",
        "bootp_relay",
        "log_martians",
        "tag",
        "arp_filter",
        "medium_id",
        "disable_xfrm",
        "disable_policy",
        "force_igmp_version",
        "arp_announce",
        "arp_ignore",
        "promote_secondaries",
        "arp_accept",
        "arp_notify",
        "accept_local",
        "src_valid_mark",
        "proxy_arp_pvlan",
        "route_localnet",
        "igmpv2_unsolicited_report_interval",
        "igmpv3_unsolicited_report_interval",
        "ignore_routes_with_linkdown",
        "drop_unicast_in_l2_multicast",
        "drop_gratuitous_arp",
        "bc_forwarding",
        "arp_evict_nocarrier",
    ];
    if setting == "mc_forwarding" {
        return None;
    }
    NAMES
        .iter()
        .position(|name| *name == setting)
        .and_then(|i| u16::try_from(i + 1).ok())
}

/// The settings `link` reports, under `name`.
fn settings_of(link: &LinkMessage, name: &str) -> LinkSettings {
    let mut settings = LinkSettings {
        index: link.header.index,
        name: name.to_owned(),
        mtu: 0,
        mac: None,
        up: link.header.flags.contains(LinkFlags::Up),
        offload_sizes: OffloadSizes::default(),
        identity: Some(DeviceIdentity::of(link)),
        peer: LinkPeer::of(link),
    };
    let sizes = &mut settings.offload_sizes;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::Mtu(mtu) => settings.mtu = *mtu,
            LinkAttribute::GsoMaxSize(size) => sizes.gso_max_size = Some(*size),
            LinkAttribute::GroMaxSize(size) => sizes.gro_max_size = Some(*size),
            LinkAttribute::GsoIpv4MaxSize(size) => sizes.gso_ipv4_max_size = Some(*size),
            LinkAttribute::GroIpv4MaxSize(size) => sizes.gro_ipv4_max_size = Some(*size),
            LinkAttribute::Address(mac) if !mac.is_empty() => {
                settings.mac = Some(format_mac(mac));
            }
            _ => {}
        }
    }
    settings
}

/// `message` as a [`Route`] if it goes out of `index` and is one a restore must re-add.
fn own_route(message: &RouteMessage, index: u32) -> Option<Route> {
    let header = &message.header;
    if header.protocol == RouteProtocol::Kernel
        || header.kind != RouteType::Unicast
        || header.table == 255
    {
        return None;
    }
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let mut table = u32::from(header.table);
    let mut metric = None;
    let mut metrics = std::collections::BTreeMap::new();
    let mut congestion_control = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => destination = route_address(a),
            RouteAttribute::Gateway(a) => gateway = route_address(a),
            RouteAttribute::PrefSource(a) => source = route_address(a),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::Metrics(list) => {
                for each in list {
                    match metric_value(each) {
                        Some(MetricValue::Number(kind, value)) => {
                            metrics.insert(kind, value);
                        }
                        Some(MetricValue::Algorithm(name)) => congestion_control = Some(name),
                        None => {}
                    }
                }
            }
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let unspecified = match header.address_family {
        netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let destination = IpNet::new(
        destination.unwrap_or(unspecified),
        header.destination_prefix_length,
    )
    .ok()?;
    // The kernel adds IPv6 link-local and multicast routes itself, with protocol `kernel` or
    // `boot` in some versions: never restore those.
    if let IpNet::V6(net) = destination
        && (net.addr().segments()[0] & 0xffc0 == 0xfe80 || net.addr().is_multicast())
    {
        return None;
    }
    Some(Route {
        destination,
        gateway,
        source,
        table,
        scope: u8::from(header.scope),
        protocol: u8::from(header.protocol),
        flags: header.flags.bits() & SETTABLE_ROUTE_FLAGS,
        metric: metric.filter(|m| *m != 0 && !(destination.addr().is_ipv6() && *m == 1024)),
        metrics,
        congestion_control,
    })
}

/// Route next-hop flags one may set (`RTNH_F_ONLINK`); the others are the kernel's state.
const SETTABLE_ROUTE_FLAGS: u32 = 4;

/// Address flags one may set: nodad, optimistic, homeaddress, mngtmpaddr, noprefixroute,
/// mcautojoin, stable-privacy; the others (permanent, tentative, deprecated, …) are state.
const SETTABLE_ADDRESS_FLAGS: u32 = 0x02 | 0x04 | 0x10 | 0x100 | 0x200 | 0x400 | 0x800;

/// One route metric as recorded.
enum MetricValue {
    Number(u16, u32),
    Algorithm(String),
}

/// A route metric by its `RTAX_*` number, or the congestion control algorithm.
fn metric_value(metric: &RouteMetric) -> Option<MetricValue> {
    use netlink_packet_core::Nla as _;
    let number = match metric {
        RouteMetric::CcAlgo(name) => return Some(MetricValue::Algorithm(name.clone())),
        RouteMetric::Lock(v)
        | RouteMetric::Mtu(v)
        | RouteMetric::Window(v)
        | RouteMetric::Rtt(v)
        | RouteMetric::RttVar(v)
        | RouteMetric::SsThresh(v)
        | RouteMetric::Cwnd(v)
        | RouteMetric::Advmss(v)
        | RouteMetric::Reordering(v)
        | RouteMetric::Hoplimit(v)
        | RouteMetric::InitCwnd(v)
        | RouteMetric::Features(v)
        | RouteMetric::RtoMin(v)
        | RouteMetric::InitRwnd(v)
        | RouteMetric::QuickAck(v)
        | RouteMetric::FastopenNoCookie(v) => *v,
        _ => return None,
    };
    Some(MetricValue::Number(metric.kind(), number))
}

/// The route metric `RTAX_*` number `kind` with `value`.
fn metric_from(kind: u16, value: u32) -> RouteMetric {
    match kind {
        1 => RouteMetric::Lock(value),
        2 => RouteMetric::Mtu(value),
        3 => RouteMetric::Window(value),
        4 => RouteMetric::Rtt(value),
        5 => RouteMetric::RttVar(value),
        6 => RouteMetric::SsThresh(value),
        7 => RouteMetric::Cwnd(value),
        8 => RouteMetric::Advmss(value),
        9 => RouteMetric::Reordering(value),
        10 => RouteMetric::Hoplimit(value),
        11 => RouteMetric::InitCwnd(value),
        12 => RouteMetric::Features(value),
        13 => RouteMetric::RtoMin(value),
        14 => RouteMetric::InitRwnd(value),
        15 => RouteMetric::QuickAck(value),
        17 => RouteMetric::FastopenNoCookie(value),
        _ => RouteMetric::Other(netlink_packet_core::DefaultNla::new(
            kind,
            value.to_ne_bytes().to_vec(),
        )),
    }
}

/// `message` as an [`Address`], unless it is an IPv6 link-local one; `now` in seconds since
/// the epoch turns the kernel's remaining lifetimes into moments.
fn address_of(message: &AddressMessage, now: u64) -> Option<Address> {
    let mut local = None;
    let mut address = None;
    let mut broadcast = None;
    let mut label = None;
    let mut flags = u32::from(message.header.flags.bits());
    let mut lifetimes = None;
    let mut route_priority = None;
    let mut protocol = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Broadcast(ip) => broadcast = Some(*ip),
            AddressAttribute::Label(text) => label = Some(text.clone()),
            AddressAttribute::Flags(bits) => flags = bits.bits(),
            AddressAttribute::CacheInfo(info) => {
                lifetimes = Some((info.ifa_valid, info.ifa_preferred));
            }
            AddressAttribute::RoutePriority(p) => route_priority = Some(*p),
            AddressAttribute::Protocol(p) => protocol = Some(u8::from(*p)),
            _ => {}
        }
    }
    // IFA_ADDRESS is the local address except on point-to-point links, where IFA_LOCAL is.
    let ip = local.or(address)?;
    if matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
        return None;
    }
    let until = |left: u32| (left != u32::MAX).then(|| now + u64::from(left));
    let (valid, preferred) = lifetimes.unwrap_or((u32::MAX, u32::MAX));
    Some(Address {
        net: IpNet::new(ip, message.header.prefix_len).ok()?,
        broadcast,
        // The kernel reports the interface's name as the label of an unlabelled IPv4 address:
        // only a label of its own (`eth0:1`) is one.
        label: label.filter(|l| l.contains(':')),
        scope: u8::from(message.header.scope),
        flags,
        valid_until: until(valid),
        preferred_until: until(preferred),
        route_priority,
        protocol,
    })
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The output interfaces of a route if it is a unicast default route of the main table.
fn default_route_oifs(route: &RouteMessage) -> Vec<u32> {
    const MAIN_TABLE: u32 = 254;
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or_else(|| u32::from(route.header.table));
    if route.header.destination_prefix_length != 0
        || route.header.kind != RouteType::Unicast
        || table != MAIN_TABLE
    {
        return Vec::new();
    }
    route
        .attributes
        .iter()
        .flat_map(|a| match a {
            RouteAttribute::Oif(index) => vec![*index],
            RouteAttribute::MultiPath(hops) => hops.iter().map(|h| h.interface_index).collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};

    use super::{DeviceIdentity, LinkEntry, LinkPeer, recorded, with_identity};

    fn message(attributes: Vec<LinkAttribute>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = 7;
        link.attributes = attributes;
        link
    }

    #[test]
    fn identity_is_what_the_kernel_reports_not_what_a_tenant_sets() {
        let nic = message(vec![
            LinkAttribute::IfName("net1".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 0x43]),
            LinkAttribute::PermAddress(vec![0xb8, 0x3f, 0xd2, 0, 0, 1]),
            LinkAttribute::ParentDevBusName("pci".into()),
            LinkAttribute::ParentDevName("0000:3b:00.1".into()),
        ]);
        let identity = DeviceIdentity::of(&nic);
        assert_eq!(identity.permanent_mac.as_deref(), Some("b8:3f:d2:00:00:01"));
        assert_eq!(identity.parent.as_deref(), Some("pci/0000:3b:00.1"));
        assert_eq!(identity.kind, None);
        assert!(identity.is_hardware());
        assert_eq!(LinkPeer::of(&nic), None);
        // A veth: its kind only, an all-zero permanent address is none; its peer elsewhere.
        let veth = message(vec![
            LinkAttribute::PermAddress(vec![0; 6]),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
            LinkAttribute::Link(12),
            LinkAttribute::LinkNetNsId(3),
        ]);
        let virtual_identity = DeviceIdentity::of(&veth);
        assert_eq!(virtual_identity.kind.as_deref(), Some("veth"));
        assert!(!virtual_identity.is_hardware());
        assert_eq!(
            LinkPeer::of(&veth),
            Some(LinkPeer {
                netnsid: Some(3),
                index: 12
            })
        );
    }

    #[test]
    fn a_returned_nic_is_found_by_identity_never_by_its_current_mac() {
        let hardware = |permanent: &str, parent: &str| DeviceIdentity {
            kind: None,
            permanent_mac: Some(permanent.into()),
            parent: Some(parent.into()),
        };
        let entry = |index: u32, name: &str, mac: &str, identity: DeviceIdentity| LinkEntry {
            index,
            name: name.into(),
            kind: identity.kind.clone(),
            mac: Some(mac.into()),
            identity,
            peer: None,
        };
        let claimed = hardware("b8:3f:d2:00:00:01", "pci/0000:3b:00.1");
        let entries = [
            // The uplink, whose current MAC a claim set as the pod's MAC.
            entry(
                2,
                "eth0",
                "02:00:00:00:00:43",
                hardware("b8:3f:d2:00:00:09", "pci/0000:01:00.0"),
            ),
            // The claimed NIC back from a dead pod, renamed by the kernel, with the pod's MAC.
            entry(9, "dev9", "02:00:00:00:00:43", claimed.clone()),
        ];
        assert_eq!(
            with_identity(&entries, &claimed).map(|e| e.name.as_str()),
            Some("dev9")
        );
        // A virtual interface's kind names no single device: never searched for.
        let veth = DeviceIdentity {
            kind: Some("veth".into()),
            ..DeviceIdentity::default()
        };
        let virtual_entries = [entry(3, "enp1", "02:00:00:00:00:43", veth.clone())];
        assert_eq!(with_identity(&virtual_entries, &veth), None);
        // A veth is found by its peer, which is one device; a macvlan's parent is shared.
        let peer = |index| LinkPeer {
            netnsid: Some(1),
            index,
        };
        let mut veths = [
            entry(3, "dev3", "02:00:00:00:00:43", veth.clone()),
            entry(4, "other", "02:00:00:00:00:43", veth.clone()),
        ];
        veths[0].peer = Some(peer(7));
        veths[1].peer = Some(peer(8));
        let found = |veths: &[LinkEntry], identity: &DeviceIdentity, at| {
            recorded(veths, identity, Some(peer(at))).map(|e| e.name.clone())
        };
        assert_eq!(found(&veths, &veth, 7).as_deref(), Some("dev3"));
        assert_eq!(found(&veths, &veth, 9), None);
        assert_eq!(recorded(&veths, &veth, None), None);
        let macvlan = DeviceIdentity {
            kind: Some("macvlan".into()),
            ..DeviceIdentity::default()
        };
        veths[0].identity = macvlan.clone();
        assert_eq!(found(&veths, &macvlan, 7), None);
        assert_eq!(recorded(&entries, &claimed, None).map(|e| e.index), Some(9));
    }
}
