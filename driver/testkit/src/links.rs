//! Creating links, which only tests do (the product moves, configures and reads interfaces, and
//! never creates one). Each call opens its own netlink socket, so it acts on the namespace of
//! the thread it runs on, as [`knd::os::netlink::Link`] does.

use knd::os::netlink::{Error, Link, Result};
use rtnetlink::{
    Handle, LinkBridge, LinkMacVlan, LinkUnspec, LinkVeth, packet_route::link::MacVlanMode,
};

fn handle() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

fn kernel(operation: String, link: &str) -> impl FnOnce(rtnetlink::Error) -> Error {
    let link = link.to_owned();
    move |source| Error::Kernel {
        operation,
        link,
        source,
    }
}

/// Creates a veth pair `name` ↔ `peer` (both ends down).
pub async fn add_veth(name: &str, peer: &str) -> Result<()> {
    handle()?
        .link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .map_err(kernel(format!("create veth pair with peer {peer}"), name))
}

/// Creates a macvlan `name` in bridge mode on top of `parent`.
pub async fn add_macvlan(link: &Link, name: &str, parent: &str) -> Result<()> {
    let parent_index = link.index(parent).await?;
    handle()?
        .link()
        .add(LinkMacVlan::new(name, parent_index, MacVlanMode::Bridge).build())
        .execute()
        .await
        .map_err(kernel(format!("create macvlan on {parent}"), name))
}

/// Creates a bridge `name` (no STP, no forwarding delay).
pub async fn add_bridge(name: &str) -> Result<()> {
    handle()?
        .link()
        .add(LinkBridge::new(name).forward_delay(0).build())
        .execute()
        .await
        .map_err(kernel("create bridge".into(), name))
}

/// Enslaves the interface `name` to `controller` (e.g. a bridge port).
pub async fn set_controller(link: &Link, name: &str, controller: &str) -> Result<()> {
    let index = link.index(name).await?;
    let controller_index = link.index(controller).await?;
    handle()?
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .controller(controller_index)
                .build(),
        )
        .execute()
        .await
        .map_err(kernel(format!("attach to {controller}"), name))
}
