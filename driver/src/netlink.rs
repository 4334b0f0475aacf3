//! Link-level netlink operations (rtnetlink) used to build, move and inspect interfaces.
//!
//! A netlink socket belongs to the namespace of the thread that opened it: open a [`Link`] handle
//! inside the target namespace (see [`crate::netns::Netns::block_on`]).

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    link::{LinkAttribute, LinkInfo, LinkMessage, MacVlanMode},
    route::{RouteAttribute, RouteMessage, RouteType},
};
use rtnetlink::{LinkBridge, LinkMacVlan, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns::Netns;

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

/// The kernel's own traffic statistics for one interface (`IFLA_STATS64`, as in `/proc/net/dev`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
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

    /// The kernel's traffic counters for the interface called `name`.
    pub async fn stats(&self, name: &str) -> Result<LinkStats> {
        let link = self.get(name).await?;
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Stats64(stats) => Some(LinkStats {
                    rx_packets: stats.rx_packets,
                    rx_bytes: stats.rx_bytes,
                    tx_packets: stats.tx_packets,
                    tx_bytes: stats.tx_bytes,
                }),
                _ => None,
            })
            .ok_or_else(|| Error::MissingAttribute {
                link: name.to_owned(),
                attribute: "IFLA_STATS64",
            })
    }

    /// Creates a veth pair `name` ↔ `peer` in this namespace (both ends down).
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<()> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: format!("create veth pair with peer {peer}"),
                link: name.to_owned(),
                source,
            })
    }

    /// Creates a macvlan `name` in bridge mode on top of `parent`.
    pub async fn add_macvlan(&self, name: &str, parent: &str) -> Result<()> {
        let parent_index = self.index(parent).await?;
        self.handle
            .link()
            .add(LinkMacVlan::new(name, parent_index, MacVlanMode::Bridge).build())
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: format!("create macvlan on {parent}"),
                link: name.to_owned(),
                source,
            })
    }

    /// Creates a bridge `name` (no STP, no forwarding delay).
    pub async fn add_bridge(&self, name: &str) -> Result<()> {
        self.handle
            .link()
            .add(LinkBridge::new(name).forward_delay(0).build())
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: "create bridge".into(),
                link: name.to_owned(),
                source,
            })
    }

    /// Enslaves the interface `name` to `controller` (e.g. a bridge port).
    pub async fn set_controller(&self, name: &str, controller: &str) -> Result<()> {
        let index = self.index(name).await?;
        let controller_index = self.index(controller).await?;
        self.set(
            name,
            &format!("attach to {controller}"),
            LinkUnspec::new_with_index(index).controller(controller_index),
        )
        .await
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

    /// Deletes the interface `name` (a veth's peer goes with it).
    pub async fn delete(&self, name: &str) -> Result<()> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|source| Error::Kernel {
                operation: "delete".into(),
                link: name.to_owned(),
                source,
            })
    }

    /// Brings the interface `name` up.
    pub async fn set_up(&self, name: &str) -> Result<()> {
        let index = self.index(name).await?;
        self.set(name, "set up", LinkUnspec::new_with_index(index).up())
            .await
    }

    /// Adds `address/prefix_len` to the interface `name`.
    pub async fn add_address(&self, name: &str, address: IpAddr, prefix_len: u8) -> Result<()> {
        let index = self.index(name).await?;
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

    /// The kind (`veth`, `macvlan`, `bridge`, `bond`, …) of every interface that has one
    /// (`IFLA_LINKINFO`), by name. Hardware interfaces have none.
    pub async fn kinds(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let mut kinds = std::collections::BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        loop {
            let link = match links.try_next().await {
                Ok(Some(link)) => link,
                Ok(None) => return Ok(kinds),
                Err(source) => {
                    return Err(Error::Kernel {
                        operation: "dump links".into(),
                        link: "*".into(),
                        source,
                    });
                }
            };
            let mut name = None;
            let mut kind = None;
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::LinkInfo(infos) => {
                        kind = infos.iter().find_map(|info| match info {
                            LinkInfo::Kind(kind) => Some(kind.to_string()),
                            _ => None,
                        });
                    }
                    _ => {}
                }
            }
            if let (Some(name), Some(kind)) = (name, kind) {
                kinds.insert(name, kind);
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
