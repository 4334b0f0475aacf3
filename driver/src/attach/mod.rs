//! Moving a claimed interface into a pod's network namespace, configuring it there, and giving
//! it back to the host exactly as it was.
//!
//! Netlink work runs on a dedicated thread that entered the namespace concerned (a netlink
//! socket belongs to the namespace of the thread that opened it); the async runtime's threads
//! never change namespace. Every step's error names the interface and the step, and a failed
//! attachment undoes what it did before reporting.

pub mod nccl;

use std::{collections::BTreeMap, future::Future, net::IpAddr};

use ipnet::IpNet;

use crate::{
    model::{
        config::{InterfaceConfig, NetworkConfig, SysctlFamily, SysctlKey},
        link::{
            self, Address, DeviceIdentity, LinkPeer, LinkSettings, LinkStats, OffloadSizes, Route,
        },
        records::{HostSide, PodPlace, PodSide},
    },
    os::{
        ethtool::{self, Ethtool},
        netlink::{self, Iface, Link, LinkEntry},
        netns::Netns,
    },
};

impl PodPlace {
    fn of(link: &netlink_packet_route::link::LinkMessage) -> Self {
        Self {
            index: link.header.index,
            peer: LinkPeer::of(link),
        }
    }
}

/// Where an attachment's time went: in the kernel's request that put the interface in the pod
/// (the move, or the share's creation), apart from knd's own steps around it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    /// Time in the kernel's move (or creation) request.
    pub kernel: std::time::Duration,
}

/// A failed step: which interface, which step, what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("interface {interface}: {step}: {reason}")]
pub struct StepError {
    /// The interface (host name).
    pub interface: String,
    /// The step (e.g. `set MTU 9000`, `add route to 10.1.0.0/16`).
    pub step: String,
    /// What went wrong.
    pub reason: String,
    /// The device found where the claimed one was expected is another one (a tenant's
    /// interface under the claimed name, or a host interface with its MAC): nothing was
    /// touched.
    pub not_ours: bool,
}

impl StepError {
    /// `step` on `interface` failed because of `reason`.
    pub fn new(interface: &str, step: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            interface: interface.to_owned(),
            step: step.into(),
            reason: reason.to_string(),
            not_ours: false,
        }
    }

    fn not_ours(interface: &str, step: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            not_ours: true,
            ..Self::new(interface, step, reason)
        }
    }
}

/// Whether `link` is the device recorded as `expected` (records from before identities were
/// kept trust the name they were found by).
fn is_recorded(
    expected: Option<&DeviceIdentity>,
    link: &netlink_packet_route::link::LinkMessage,
) -> bool {
    expected.is_none_or(|e| *e == DeviceIdentity::of(link))
}

/// The interface on the host that already uses MAC address `wanted`, other than the claimed
/// device `own` (by index): a pod given it could answer for the host, and a NIC coming back
/// with it must never be confused with that interface.
pub fn mac_in_use<'a>(wanted: &str, links: &'a [LinkEntry], own: u32) -> Option<&'a LinkEntry> {
    let wanted = netlink::parse_mac(wanted)?;
    links.iter().find(|entry| {
        entry.index != own
            && entry
                .mac
                .as_deref()
                .and_then(netlink::parse_mac)
                .is_some_and(|mac| mac == wanted)
    })
}

/// A pod's network namespace with a netlink connection opened inside it: opened once per pod
/// start (a thread has to enter the namespace for it), while the host sides are being read.
#[derive(Debug)]
pub struct Pod<'a> {
    /// The namespace.
    pub netns: &'a Netns,
    /// The connection, made inside it.
    pub link: Link,
}

impl<'a> Pod<'a> {
    /// Opens a netlink connection inside `netns`.
    pub async fn open(netns: &'a Netns) -> Result<Self, netlink::Error> {
        Ok(Self {
            netns,
            link: Link::connect_in(netns).await?,
        })
    }
}

/// Runs `work` with a netlink connection inside `netns`, on a thread of its own.
async fn in_netns<R, F, Fut>(netns: &Netns, interface: &str, work: F) -> Result<R, StepError>
where
    F: FnOnce(Link) -> Fut,
    Fut: Future<Output = Result<R, StepError>>,
{
    work(connect(netns, interface).await?).await
}

/// A netlink connection inside `netns` (its socket made there; driven by the caller's runtime).
async fn connect(netns: &Netns, interface: &str) -> Result<Link, StepError> {
    Link::connect_in(netns).await.map_err(|e| {
        StepError::new(
            interface,
            format!("open netlink in {netns}"),
            crate::model::error_chain(&e),
        )
    })
}

fn step(interface: &str, what: &str) -> impl FnOnce(netlink::Error) -> StepError + use<> {
    let interface = interface.to_owned();
    let what = what.to_owned();
    move |e| StepError::new(&interface, what, crate::model::error_chain(&e))
}

/// Records the host side of `interface` (in `host`'s namespace).
pub async fn record(host: &Netns, interface: &str) -> Result<HostSide, StepError> {
    let name = interface.to_owned();
    in_netns(host, interface, move |link| async move {
        let settings = link
            .settings(&name)
            .await
            .map_err(step(&name, "read settings"))?;
        // The rest of the interface found: by its index.
        let at = Iface::At {
            index: settings.index,
            name: &name,
        };
        // One after the other: a netlink socket runs one dump at a time (EBUSY otherwise).
        let addresses = link
            .address_records(at)
            .await
            .map_err(step(&name, "read addresses"))?;
        let routes = link.routes(at).await.map_err(step(&name, "read routes"))?;
        let neighbors = link
            .permanent_neighbors(at)
            .await
            .map_err(step(&name, "read neighbors"))?;
        Ok(HostSide {
            link: settings,
            addresses,
            routes,
            neighbors,
            features: BTreeMap::new(),
        })
    })
    .await
}

/// The NIC behind a share, as recorded: only what identifies it (a share never changes the
/// NIC, so nothing of it needs restoring — no addresses, routes or neighbors are read).
pub async fn record_parent(host: &Netns, interface: &str) -> Result<HostSide, StepError> {
    let name = interface.to_owned();
    in_netns(host, interface, move |link| async move {
        let settings = link
            .settings(&name)
            .await
            .map_err(step(&name, "read settings"))?;
        Ok(HostSide {
            link: settings,
            addresses: Vec::new(),
            routes: Vec::new(),
            neighbors: Vec::new(),
            features: BTreeMap::new(),
        })
    })
    .await
}

/// The features `config` changes, by name.
fn wanted_features(config: &NetworkConfig) -> Option<&BTreeMap<String, bool>> {
    config
        .ethtool
        .as_ref()
        .and_then(|e| e.features.as_ref())
        .filter(|f| !f.is_empty())
}

/// Runs ethtool work on a thread inside `netns` (the family's socket must be made there).
async fn with_ethtool<R: Send + 'static>(
    netns: &Netns,
    interface: &str,
    work: impl AsyncFnOnce(&mut Ethtool) -> Result<R, ethtool::Error> + Send + 'static,
) -> Result<R, StepError> {
    let name = interface.to_owned();
    let outcome = netns
        .block_on_async(move || async move {
            let mut ethtool = Ethtool::connect(&name)?;
            work(&mut ethtool).await
        })
        .await
        .map_err(|e| StepError::new(interface, format!("enter {netns}"), e))?;
    outcome.map_err(|e| StepError::new(interface, "ethtool", e))
}

/// [`record`], plus the host's state of every feature `config` will change in the pod (device
/// features follow the device across namespaces, so they must be put back).
pub async fn record_for(
    host: &Netns,
    interface: &str,
    config: &NetworkConfig,
) -> Result<HostSide, StepError> {
    let mut side = record(host, interface).await?;
    if let Some(wanted) = wanted_features(config) {
        let (name, names): (String, Vec<String>) =
            (interface.to_owned(), wanted.keys().cloned().collect());
        let features = with_ethtool(host, interface, async move |ethtool| {
            ethtool.features(&name).await
        })
        .await?;
        side.features = names
            .into_iter()
            .filter_map(|n| features.changeable.get(&n).map(|on| (n, *on)))
            .collect();
    }
    Ok(side)
}

/// Moves the interface recorded in `host_side` from `host` into `pod` as `pod_name` and applies
/// `config` there. On failure everything done is undone before the error is returned.
pub async fn attach(
    host: &Netns,
    pod: &Netns,
    host_side: &HostSide,
    pod_name: &str,
    config: &NetworkConfig,
) -> Result<PodSide, StepError> {
    let mut spent = Spent::default();
    let pod = Pod {
        netns: pod,
        link: connect(pod, &host_side.link.name).await?,
    };
    attach_measured(
        host,
        &pod,
        host_side,
        (pod_name, &mut spent),
        config,
        |_, _| async {},
    )
    .await
}

/// [`attach`], calling `arrived` with the interface's name and the kernel's counters of it the
/// moment it is in the pod — down, nothing configured, no frame carried there yet — so that
/// measuring can start before its first frame; adds the kernel's move time to `spent`.
pub async fn attach_measured<Arrival>(
    host: &Netns,
    Pod {
        netns: pod,
        link: pod_link,
    }: &Pod<'_>,
    host_side: &HostSide,
    (pod_name, spent): (&str, &mut Spent),
    config: &NetworkConfig,
    arrived: impl FnOnce(String, LinkStats) -> Arrival,
) -> Result<PodSide, StepError>
where
    Arrival: Future<Output = ()> + Send,
{
    let interface = host_side.link.name.clone();
    refuse_unsupported(&interface, config)?;
    if let Some(mac) = config
        .interface
        .as_ref()
        .and_then(|i| i.hardware_addr.clone())
    {
        let own = host_side.link.index;
        let fail = step(&interface, "list the host's interfaces");
        let links = in_netns(host, &interface, |link| async move {
            link.links().await.map_err(fail)
        })
        .await?;
        if let Some(user) = mac_in_use(&mac, &links, own) {
            return Err(StepError::new(
                &interface,
                format!("set MAC {mac}"),
                format!("interface {} on the host already uses it", user.name),
            ));
        }
    }
    let target = pod
        .try_clone()
        .map_err(|e| StepError::new(&interface, "open the pod's namespace", e))?;
    // The kernel moves first and renames after: a name already used in the pod would leave
    // the interface in the pod under its host name. Check first.
    name_free(pod_link, &interface, pod_name, "move into the pod").await?;
    let (name, new_name) = (interface.clone(), pod_name.to_owned());
    let kernel = std::time::Instant::now();
    let moved = in_netns(host, &interface, move |link| async move {
        link.move_renamed(&name, &target, &new_name)
            .await
            .map_err(step(&name, &format!("move into the pod as {new_name}")))
    })
    .await;
    spent.kernel += kernel.elapsed();
    if let Err(error) = moved {
        // Moved but not renamed (the pod raced us to the name): bring it back.
        if let Err(undo) = detach(host, Some(pod), &interface, host_side, None).await {
            tracing::error!(%undo, "undoing a failed move failed too");
        }
        return Err(error);
    }
    // No container of the pod runs yet (the runtime waits for this hook): the name is still
    // the one just given, and from here on the index is what identifies the interface.
    let place = arrive(pod_link, pod_name, arrived).await;
    let applied = configure_in_pod(pod, pod_link, (&interface, pod_name, place), config).await;
    match applied {
        Ok(mut side) => {
            side.place = place;
            Ok(side)
        }
        Err(error) => {
            if let Err(undo) = detach(host, Some(pod), pod_name, host_side, place).await {
                tracing::error!(%undo, "undoing a failed attachment failed too");
            }
            Err(error)
        }
    }
}

/// Refuses a configuration with a field knd does not apply, naming it.
fn refuse_unsupported(interface: &str, config: &NetworkConfig) -> Result<(), StepError> {
    match config.unsupported() {
        Some((field, why)) => Err(StepError::new(
            interface,
            "check the configuration",
            format!("{field}: {why}"),
        )),
        None => Ok(()),
    }
}

/// Fails `what` (as `pod_name`) when the pod already has an interface called `pod_name`.
async fn name_free(
    pod_link: &Link,
    interface: &str,
    pod_name: &str,
    what: &str,
) -> Result<(), StepError> {
    match pod_link.get(pod_name).await {
        Err(netlink::Error::NoSuchLink(_)) => Ok(()),
        Ok(_) => Err(StepError::new(
            interface,
            format!("{what} as {pod_name}"),
            format!("the pod already has an interface called {pod_name}"),
        )),
        Err(e) => Err(step(pod_name, "list the pod's interfaces")(e)),
    }
}

/// Finds `pod_name`, just arrived in the pod (down, nothing configured), and calls `arrived`
/// with its counters: measuring starts before its first frame. Returns where it is (`None` if
/// it cannot be read: it is then configured by name and not measured from its start).
async fn arrive<Arrival>(
    pod_link: &Link,
    pod_name: &str,
    arrived: impl FnOnce(String, LinkStats) -> Arrival,
) -> Option<PodPlace>
where
    Arrival: Future<Output = ()> + Send,
{
    let found = pod_link.get(pod_name).await;
    let counters = match &found {
        Ok(link) => netlink::stats_of(link, pod_name).map_err(|e| crate::model::error_chain(&e)),
        Err(error) => Err(crate::model::error_chain(error)),
    };
    match counters {
        Ok(counters) => arrived(pod_name.to_owned(), counters).await,
        Err(error) => tracing::warn!(
            %error,
            interface = pod_name,
            "cannot read the counters of an arriving interface: it is not measured from its start"
        ),
    }
    found.ok().map(|l| PodPlace::of(&l))
}

/// Makes a share of the NIC recorded in `parent`: a macvlan child (`mode`) created directly in
/// `pod` as `pod_name` (never in the host's namespace: no move, and the NIC itself stays where
/// it is, untouched), then configured as `config` says. `arrived` is called as for
/// [`attach_measured`], and the kernel's creation time added to `spent`. On failure the child is
/// deleted before the error is returned.
pub async fn attach_share<Arrival>(
    host: &Netns,
    Pod {
        netns: pod,
        link: pod_link,
    }: &Pod<'_>,
    parent: &HostSide,
    (pod_name, mode, spent): (&str, crate::model::config::MacvlanMode, &mut Spent),
    config: &NetworkConfig,
    arrived: impl FnOnce(String, LinkStats) -> Arrival,
) -> Result<PodSide, StepError>
where
    Arrival: Future<Output = ()> + Send,
{
    let interface = parent.link.name.clone();
    refuse_unsupported(&interface, config)?;
    if let Some(mtu) = config.interface.as_ref().and_then(|i| i.mtu)
        && mtu > parent.link.mtu
    {
        return Err(StepError::new(
            &interface,
            format!("set MTU {mtu}"),
            format!(
                "a share's MTU cannot exceed its NIC's ({})",
                parent.link.mtu
            ),
        ));
    }
    name_free(pod_link, &interface, pod_name, "create a share in the pod").await?;
    let target = pod
        .try_clone()
        .map_err(|e| StepError::new(&interface, "open the pod's namespace", e))?;
    let (parent_index, name) = (parent.link.index, pod_name.to_owned());
    let kernel = std::time::Instant::now();
    in_netns(host, &interface, move |link| async move {
        link.add_macvlan_in(parent_index, &name, mode, &target)
            .await
            .map_err(step(&name, "create the share"))
    })
    .await?;
    spent.kernel += kernel.elapsed();
    let place = arrive(pod_link, pod_name, arrived).await;
    match configure_in_pod(pod, pod_link, (&interface, pod_name, place), config).await {
        Ok(mut side) => {
            side.place = place;
            Ok(side)
        }
        Err(error) => {
            if let Err(undo) = detach_share(Some(pod), pod_name, parent, place).await {
                tracing::error!(%undo, "undoing a failed share failed too");
            }
            Err(error)
        }
    }
}

/// Deletes a share made by [`attach_share`] of the NIC recorded in `parent`: the interface
/// at the recorded index in the pod (or, when a crash left no index recorded, the one under
/// the intended name), if it still is a child of that NIC — one the pod made itself is left
/// alone, and the error says so. Gone already (the pod's namespace went, taking it along) is
/// fine.
pub async fn detach_share(
    pod: Option<&Netns>,
    pod_name: &str,
    parent: &HostSide,
    place: Option<PodPlace>,
) -> Result<(), StepError> {
    let (parent_name, parent_index) = (parent.link.name.as_str(), parent.link.index);
    let Some(pod) = pod else {
        return Ok(()); // the namespace is gone, and its macvlan children with it
    };
    let (name, label) = (pod_name.to_owned(), parent_name.to_owned());
    in_netns(pod, parent_name, move |link| async move {
        let fail = |what: &str| step(&label, what);
        let found = match place {
            Some(place) => link.get_index(place.index).await,
            None => link.get(&name).await,
        };
        let found = match found {
            Ok(found) => found,
            Err(netlink::Error::NoSuchLink(_)) => return Ok(()),
            Err(e) => return Err(fail("find the share in the pod")(e)),
        };
        let peer = PodPlace::of(&found).peer;
        let ours = match place {
            Some(place) => peer == place.peer,
            // A child of the NIC, seen from the pod: linked to its index in another namespace.
            None => peer.is_some_and(|p| p.index == parent_index && p.netnsid.is_some()),
        };
        if !ours {
            return Err(StepError::not_ours(
                &label,
                "find the share in the pod",
                format!(
                    "interface {} in the pod is not the claimed share; it was left in place",
                    found_label(&found)
                ),
            ));
        }
        link.delete_index(found.header.index)
            .await
            .map_err(fail("delete the share"))
    })
    .await
}

async fn configure_in_pod(
    pod: &Netns,
    link: &Link,
    (interface, pod_name, place): (&str, &str, Option<PodPlace>),
    config: &NetworkConfig,
) -> Result<PodSide, StepError> {
    let host_name = interface.to_owned();
    let name = pod_name.to_owned();
    // Where it arrived, by index (no lookup before each step); by name if that was not read.
    let at = place.map_or(Iface::Named(pod_name), |p| Iface::At {
        index: p.index,
        name: pod_name,
    });
    let fail = |what: &str| step(&host_name, what);
    let settings = config.interface.clone().unwrap_or_default();
    if let Some(mtu) = settings.mtu {
        link.set_mtu(at, mtu)
            .await
            .map_err(fail(&format!("set MTU {mtu}")))?;
    }
    let sizes = OffloadSizes {
        gso_max_size: settings.gso_max_size,
        gro_max_size: settings.gro_max_size,
        gso_ipv4_max_size: settings.gso_ipv4_max_size,
        gro_ipv4_max_size: settings.gro_ipv4_max_size,
    };
    if sizes != OffloadSizes::default() {
        link.set_offload_sizes(at, sizes)
            .await
            .map_err(fail("set GSO/GRO sizes"))?;
    }
    if let Some(features) = wanted_features(config).cloned() {
        let name = name.clone();
        with_ethtool(pod, &host_name, async move |ethtool| {
            ethtool.set_features(&name, &features).await
        })
        .await?;
    }
    if let Some(mac) = &settings.hardware_addr {
        link.set_mac(at, mac)
            .await
            .map_err(fail(&format!("set MAC {mac}")))?;
    }
    let mut addresses = Vec::new();
    for text in settings.addresses.iter().flatten() {
        let net: IpNet = text
            .parse()
            .map_err(|e| StepError::new(&host_name, format!("add address {text}"), e))?;
        link.add_address(at, net.addr(), net.prefix_len())
            .await
            .map_err(fail(&format!("add address {net}")))?;
        addresses.push(net);
    }
    link.set_up(at).await.map_err(fail("set up"))?;
    for route in config.routes.iter().flatten() {
        let what = format!("add route to {}", route.destination);
        let parsed = pod_route(route).map_err(|e| StepError::new(&host_name, &what, e))?;
        link.add_route(at, &parsed).await.map_err(fail(&what))?;
    }
    for rule in config.rules.iter().flatten() {
        let parse = |text: &Option<String>| {
            text.as_deref()
                .map(|t| t.parse::<IpNet>().map_err(|e| format!("{t}: {e}")))
                .transpose()
        };
        let what = "add rule";
        let source = parse(&rule.source).map_err(|e| StepError::new(&host_name, what, e))?;
        let destination =
            parse(&rule.destination).map_err(|e| StepError::new(&host_name, what, e))?;
        link.add_rule(
            rule.priority,
            source,
            destination,
            rule.table.unwrap_or(254),
        )
        .await
        .map_err(fail(what))?;
    }
    for neighbor in config.neighbors.iter().flatten() {
        let what = format!("add neighbor {}", neighbor.destination);
        let ip: IpAddr = neighbor
            .destination
            .parse()
            .map_err(|e| StepError::new(&host_name, &what, e))?;
        link.add_neighbor(at, ip, &neighbor.hardware_addr)
            .await
            .map_err(fail(&what))?;
    }
    apply_sysctls(pod, &host_name, &name, config).await?;
    let settings = match at {
        Iface::At { index, .. } => link.settings_at(index).await,
        Iface::Named(name) => link.settings(name).await,
    };
    let mac = settings.map_err(fail("read settings"))?.mac;
    Ok(PodSide {
        name,
        addresses,
        mac,
        place: None,
    })
}

/// Writes the claim's per-interface sysctls inside the pod, refusing any key that names
/// another interface than the claim's own (`name`, its name in the pod).
async fn apply_sysctls(
    pod: &Netns,
    host_name: &str,
    name: &str,
    config: &NetworkConfig,
) -> Result<(), StepError> {
    let mut sysctls = config.sysctls.clone().unwrap_or_default();
    // `interface.arpIgnore` and `arpAnnounce` are per-interface sysctls of the pod's name.
    for (field, setting, value) in config
        .interface
        .iter()
        .flat_map(InterfaceConfig::sysctl_fields)
    {
        let key = SysctlKey::ipv4(name, setting)
            .map_err(|e| StepError::new(host_name, format!("set interface.{field}"), e))?;
        sysctls.insert(key, value.to_string());
    }
    if !sysctls.is_empty() {
        // Only the claim's own interface: a key naming another (the pod's eth0) would set it
        // around kubelet's sysctl policy.
        if let Some(key) = sysctls.keys().find(|k| k.interface() != name) {
            return Err(StepError::new(
                host_name,
                format!("set sysctl {key}"),
                format!(
                    "it names interface `{}`, but this claim's interface in the pod is `{name}`",
                    key.interface()
                ),
            ));
        }
        // /proc/sys/net resolves against the writing thread's namespace: a thread in the pod.
        // Where /proc/sys is read-only (knd in its container), IPv4 settings go over netlink.
        let read_only = pod
            .run_async(move || {
                let mut read_only = Vec::new();
                for (key, value) in sysctls {
                    match write_sysctl(&key, &value) {
                        Ok(()) => {}
                        Err(e)
                            if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem
                                && key.family() == SysctlFamily::Ipv4 =>
                        {
                            read_only.push((key, value));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                            return Err(format!(
                                "set {key}={value}: {e}; /proc/sys is read-only where knd runs \
                                 (its container) and IPv6 interface settings have no netlink \
                                 equivalent: they cannot be set under the shipped DaemonSet \
                                 (docs/security.md)"
                            ));
                        }
                        Err(e) => return Err(format!("set {key}={value}: {e}")),
                    }
                }
                Ok(read_only)
            })
            .await
            .map_err(|e| StepError::new(host_name, "enter the pod for sysctls", e))?
            .map_err(|e| StepError::new(host_name, "set sysctls", e))?;
        if !read_only.is_empty() {
            set_ipv4_over_netlink(pod, host_name, name, &read_only).await?;
        }
    }
    Ok(())
}

/// Sets IPv4 per-interface sysctls of `name` in `pod` over netlink (`IFLA_INET_CONF`).
async fn set_ipv4_over_netlink(
    pod: &Netns,
    host_name: &str,
    name: &str,
    sysctls: &[(SysctlKey, String)],
) -> Result<(), StepError> {
    let mut settings = Vec::new();
    for (key, value) in sysctls {
        let fail = |why: String| StepError::new(host_name, format!("set sysctl {key}"), why);
        let id = netlink::ipv4_devconf_id(key.setting())
            .ok_or_else(|| fail(format!("`{}` is no IPv4 interface setting", key.setting())))?;
        let number: i32 = value
            .trim()
            .parse()
            .map_err(|e| fail(format!("value `{value}`: {e}")))?;
        settings.push((id, u32::from_ne_bytes(number.to_ne_bytes())));
    }
    let link = connect(pod, host_name).await?;
    link.set_ipv4_conf(name, &settings)
        .await
        .map_err(step(host_name, "set IPv4 interface settings over netlink"))
}

fn pod_route(route: &crate::model::config::RouteConfig) -> Result<Route, String> {
    let destination: IpNet = route
        .destination
        .parse()
        .map_err(|e| format!("destination: {e}"))?;
    let parse_ip = |text: &Option<String>, field: &str| {
        text.as_deref()
            .map(|t| t.parse::<IpAddr>().map_err(|e| format!("{field}: {e}")))
            .transpose()
    };
    let scope = match route.scope.as_deref() {
        None | Some("universe") => link::SCOPE_UNIVERSE,
        Some("site") => link::SCOPE_SITE,
        Some("link") => link::SCOPE_LINK,
        Some("host") => link::SCOPE_HOST,
        Some(other) => return Err(format!("scope: `{other}` is not a scope")),
    };
    Ok(Route {
        gateway: parse_ip(&route.gateway, "gateway")?,
        source: parse_ip(&route.source, "source")?,
        scope,
        ..Route::new(destination, route.table.unwrap_or(254))
    })
}

/// Writes one per-interface sysctl through this thread's namespace's view of `/proc/sys/net`.
///
/// The file is opened below `/proc/sys/net/<family>/conf/<interface>/` with `openat2` refusing
/// to leave that directory or to follow any symlink, so no key can reach another file, whatever
/// the parser let through.
pub fn write_sysctl(key: &SysctlKey, value: &str) -> std::io::Result<()> {
    use std::io::Write as _;

    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

    let directory = format!(
        "/proc/sys/net/{}/conf/{}",
        key.family().dir(),
        key.interface()
    );
    let how = |flags: OFlag| {
        OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
    };
    let conf = std::fs::File::open(format!("/proc/sys/net/{}/conf", key.family().dir()))?;
    // The errno's kind is kept: a read-only /proc/sys is told apart from a missing setting.
    let failed = |e: nix::errno::Errno, what: String| {
        std::io::Error::new(std::io::Error::from(e).kind(), format!("{what}: {e}"))
    };
    let interface = openat2(
        &conf,
        key.interface(),
        how(OFlag::O_RDONLY | OFlag::O_DIRECTORY),
    )
    .map_err(|e| failed(e, directory.clone()))?;
    let file = openat2(&interface, key.setting(), how(OFlag::O_WRONLY))
        .map_err(|e| failed(e, format!("{directory}/{}", key.setting())))?;
    std::fs::File::from(file).write_all(value.as_bytes())
}

/// Gives the interface back: moves it out of `pod` (when the namespace still exists) into
/// `host` under its recorded name and restores the recorded settings, addresses and routes.
/// Idempotent: an interface already back on the host is only restored.
///
/// In the pod the interface is found at `place` (recorded at attach), never by a name the pod
/// can give another interface; only an attachment interrupted before its place was recorded
/// (when no container of the pod had run) is found by `pod_name`. What is found must have the
/// recorded identity and peer: a device that does not is left where it is and the error says
/// so ([`StepError::not_ours`]).
///
/// When the pod's namespace died with the interface inside, the kernel handed a physical NIC
/// back to the host under whatever name was free: it is found by its permanent MAC address or
/// parent device, never by a MAC address the claim could set.
pub async fn detach(
    host: &Netns,
    pod: Option<&Netns>,
    pod_name: &str,
    host_side: &HostSide,
    place: Option<PodPlace>,
) -> Result<(), StepError> {
    let interface = host_side.link.name.clone();
    if let Some(pod) = pod {
        let target = host
            .try_clone()
            .map_err(|e| StepError::new(&interface, "open the host namespace", e))?;
        let (name, host_name) = (pod_name.to_owned(), interface.clone());
        let expected = host_side.link.identity.clone();
        in_netns(pod, &interface, move |link| async move {
            let fail = |what: &str| step(&host_name, what);
            let found = match place {
                Some(place) => link.get_index(place.index).await,
                None => link.get(&name).await,
            };
            let found = match found {
                Ok(found) => Some(found),
                Err(netlink::Error::NoSuchLink(_)) => None,
                Err(e) => return Err(fail("find it in the pod")(e)),
            };
            let found = match (found, &expected) {
                (Some(found), _) => Some(found),
                // Moved away and back under another index: hardware is still findable.
                (None, Some(identity)) => match link
                    .name_with_identity(identity)
                    .await
                    .map_err(fail("find it in the pod"))?
                {
                    Some(name) => Some(link.get(&name).await.map_err(fail("find it in the pod"))?),
                    None => None,
                },
                (None, None) => None,
            };
            let Some(found) = found else {
                return Ok(()); // not in the pod: already back, or only the host can find it
            };
            let same_peer = place.is_none_or(|p| PodPlace::of(&found).peer == p.peer);
            if !is_recorded(expected.as_ref(), &found) || !same_peer {
                return Err(StepError::not_ours(
                    &host_name,
                    "find it in the pod",
                    format!(
                        "interface {} in the pod is not the claimed device; it was left in place",
                        found_label(&found)
                    ),
                ));
            }
            link.move_index_renamed(found.header.index, &target, &host_name)
                .await
                .map_err(fail("move back to the host"))
        })
        .await?;
    }
    restore(host, host_side).await
}

/// The recorded interface's current settings on the host, after renaming it back if the kernel
/// gave it another name; an interface under its name that is another device is left alone.
async fn find_on_host(link: &Link, recorded: &LinkSettings) -> Result<LinkSettings, StepError> {
    let name = recorded.name.clone();
    let fail = |what: &str| step(&name, what);
    let expected = recorded.identity.as_ref();
    let by_name = match link.get(&name).await {
        Ok(found) => Some(found),
        Err(netlink::Error::NoSuchLink(_)) => None,
        Err(e) => return Err(fail("read settings")(e)),
    };
    match by_name {
        Some(found) if is_recorded(expected, &found) => {
            link.settings(&name).await.map_err(fail("read settings"))
        }
        other => {
            let found = match expected {
                Some(identity) => link
                    .name_of_recorded(identity, recorded.peer)
                    .await
                    .map_err(fail("find it on the host"))?,
                None => None,
            };
            let Some(found) = found else {
                return Err(StepError::new(
                    &name,
                    "find it on the host",
                    "no interface has its name and identity (a virtual interface is \
                     destroyed with its pod's namespace)",
                ));
            };
            if let Some(other) = other {
                return Err(StepError::not_ours(
                    &name,
                    format!("rename {found} back"),
                    format!(
                        "interface {} on the host is another device; nothing was changed",
                        found_label(&other)
                    ),
                ));
            }
            link.rename(&found, &name)
                .await
                .map_err(fail(&format!("rename {found} back")))?;
            link.settings(&name).await.map_err(fail("read settings"))
        }
    }
}

/// `name (#index)` of a link message.
fn found_label(link: &netlink_packet_route::link::LinkMessage) -> String {
    let name = netlink::name_of(link).unwrap_or("?");
    format!("{name} (#{})", link.header.index)
}

/// Puts the recorded host state back on the interface: found by its recorded name if the
/// device there has the recorded identity, or else by that identity (the kernel renames a NIC
/// it hands back from a dead namespace if its name is taken; interface indexes are per
/// namespace and may change).
async fn restore(host: &Netns, host_side: &HostSide) -> Result<(), StepError> {
    let side = host_side.clone();
    let interface = side.link.name.clone();
    in_netns(host, &interface, move |link| async move {
        let name = side.link.name.clone();
        let fail = |what: &str| step(&name, what);
        let current = find_on_host(&link, &side.link).await?;
        if current.mtu != side.link.mtu {
            link.set_mtu(&name, side.link.mtu)
                .await
                .map_err(fail(&format!("restore MTU {}", side.link.mtu)))?;
        }
        if let Some(mac) = &side.link.mac
            && current.mac.as_ref() != Some(mac)
        {
            link.set_mac(&name, mac)
                .await
                .map_err(fail(&format!("restore MAC {mac}")))?;
        }
        let host_sizes = side.link.offload_sizes;
        if current.offload_sizes != host_sizes {
            // Only what the host had recorded; a kernel that reports none keeps its own.
            link.set_offload_sizes(&name, host_sizes)
                .await
                .map_err(fail("restore GSO/GRO sizes"))?;
        }
        // Up before the addresses: the kernel keeps the prefix route of an IPv6 address with a
        // lifetime only if the address arrives on a running interface.
        if side.link.up && !current.up {
            link.set_up(&name).await.map_err(fail("set up"))?;
        }
        let present = link
            .addresses(&name)
            .await
            .map_err(fail("read addresses"))?;
        // In the order the kernel lists them again: IPv4 in the order added (the first of a
        // subnet is its primary), IPv6 newest first.
        let (v4, v6): (Vec<&Address>, Vec<&Address>) =
            side.addresses.iter().partition(|a| a.net.addr().is_ipv4());
        let ordered = v4.into_iter().chain(v6.into_iter().rev());
        for address in ordered.filter(|a| !present.contains(&a.net)) {
            link.add_address_record(&name, address)
                .await
                .map_err(fail(&format!("restore address {}", address.net)))?;
        }
        let routes = link.routes(&name).await.map_err(fail("read routes"))?;
        for route in side.routes.iter().filter(|r| !routes.contains(r)) {
            link.add_route(&name, route)
                .await
                .map_err(fail(&format!("restore route to {}", route.destination)))?;
        }
        let neighbors = link
            .permanent_neighbors(&name)
            .await
            .map_err(fail("read neighbors"))?;
        for neighbor in side.neighbors.iter().filter(|n| !neighbors.contains(n)) {
            link.add_neighbor(&name, neighbor.ip, &neighbor.mac)
                .await
                .map_err(fail(&format!("restore neighbor {}", neighbor.ip)))?;
        }
        Ok(())
    })
    .await?;
    if !host_side.features.is_empty() {
        let (name, features) = (host_side.link.name.clone(), host_side.features.clone());
        with_ethtool(host, &host_side.link.name, async move |ethtool| {
            ethtool.set_features(&name, &features).await
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mac_in_use;
    use crate::{model::link::DeviceIdentity, os::netlink::LinkEntry};

    #[test]
    fn a_claim_cannot_take_a_mac_a_host_interface_uses() {
        let entry = |index: u32, name: &str, mac: Option<&str>| LinkEntry {
            index,
            name: name.into(),
            kind: None,
            mac: mac.map(Into::into),
            identity: DeviceIdentity::default(),
            peer: None,
        };
        let host = [
            entry(1, "lo", Some("00:00:00:00:00:00")),
            entry(2, "eth0", Some("b8:3f:d2:00:00:09")),
            entry(5, "enp1", Some("b8:3f:d2:00:00:01")),
            entry(6, "wg0", None),
        ];
        // The uplink's MAC, in any case: refused, naming the interface.
        assert_eq!(
            mac_in_use("B8:3F:D2:00:00:09", &host, 5).map(|e| e.name.as_str()),
            Some("eth0")
        );
        // The claimed NIC's own MAC, or one nobody uses: allowed.
        assert_eq!(mac_in_use("b8:3f:d2:00:00:01", &host, 5), None);
        assert_eq!(mac_in_use("02:00:00:00:00:42", &host, 5), None);
    }
}
