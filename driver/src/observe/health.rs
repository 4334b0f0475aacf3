//! Device health for kubelet's DRA health stream, from what the kernel says about each device:
//! its link state, how often its carrier changed, its error counters, and the state and error
//! counters of its RDMA ports.
//!
//! A device is unhealthy while its link (or every RDMA port of an RDMA-only device) is down,
//! while its carrier flaps (at least [`Policy::flaps`] carrier changes within
//! [`Policy::window`]), or while an error counter rises (by at least [`Policy::errors`] within the
//! window); each with a reason naming what was seen. It is healthy again once none of that holds
//! over a whole window.
//!
//! Readings come from sysfs under the host root for devices on the node, and from netlink inside
//! the pod's network namespace for devices attached to a pod (the node's sysfs no longer shows
//! them).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    discover::inventory::Nic,
    model::{
        link::{LINK_ERRORS, LinkReading},
        ports::{Cause, DeviceHealth, Taint},
    },
    os::{host::HostRoot, netlink::Link, netns::Netns},
};

/// RDMA port error counters watched for a rise (`ports/N/counters`).
pub const PORT_ERRORS: [&str; 7] = [
    "symbol_error",
    "link_error_recovery",
    "link_downed",
    "port_rcv_errors",
    "port_rcv_remote_physical_errors",
    "local_link_integrity_errors",
    "excessive_buffer_overrun_errors",
];

/// What an RDMA port looked like at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortReading {
    /// `mlx5_0/1`.
    pub name: String,
    /// `state`, e.g. `4: ACTIVE`.
    pub state: Option<String>,
    /// Error counters ([`PORT_ERRORS`]) the device reported.
    pub errors: BTreeMap<String, u64>,
}

/// One device at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    /// The device (its name in the pool).
    pub device: String,
    /// Its interface, when it has one and it could be read.
    pub link: Option<LinkReading>,
    /// Its RDMA ports.
    pub ports: Vec<PortReading>,
}

/// When a device counts as unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How far back flaps and error rises are looked for; also how long a device must be quiet
    /// to be healthy again.
    pub window: Duration,
    /// Carrier changes within the window that make a flapping link (4 = down and up twice).
    pub flaps: u64,
    /// Rise of one error counter within the window that makes a device unhealthy.
    pub errors: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            window: Duration::from_mins(1),
            flaps: 4,
            errors: 10,
        }
    }
}

/// A device's health and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Healthy or not.
    pub healthy: bool,
    /// Why it is unhealthy (empty when healthy).
    pub reason: String,
    /// The kind of trouble (`None` when healthy).
    pub cause: Option<Cause>,
}

/// A device's counters as read over the window, oldest first.
type Seen = VecDeque<(Instant, BTreeMap<String, u64>)>;

/// Remembers each device's counters over the window and judges new readings.
#[derive(Debug, Default)]
pub struct Tracker {
    policy: Policy,
    history: HashMap<String, Seen>,
}

impl Tracker {
    /// A tracker judging by `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            history: HashMap::new(),
        }
    }

    /// Forgets devices not in `present` (gone from the node).
    pub fn retain(&mut self, present: &[&str]) {
        self.history
            .retain(|device, _| present.contains(&device.as_str()));
    }

    /// Judges `reading`, taken at `now`, against what was seen of the device in the window.
    pub fn assess(&mut self, now: Instant, reading: &Reading) -> Verdict {
        let counters = counters_of(reading);
        let window = self.policy.window;
        let history = self.history.entry(reading.device.clone()).or_default();
        // A counter that went down means the device was reset or re-created: start over.
        if history.back().is_some_and(|(_, last)| {
            counters
                .iter()
                .any(|(name, value)| last.get(name).is_some_and(|old| old > value))
        }) {
            history.clear();
        }
        history.push_back((now, counters.clone()));
        // Keep the newest reading at least a window old as the baseline.
        while history.len() > 1 && now.duration_since(history[1].0) >= window {
            history.pop_front();
        }
        // Each counter against its oldest value in the window (a counter may appear late).
        let rises: Vec<(&String, u64)> = counters
            .iter()
            .filter_map(|(name, value)| {
                let oldest = history.iter().find_map(|(_, seen)| seen.get(name))?;
                let rise = value.saturating_sub(*oldest);
                (rise > 0).then_some((name, rise))
            })
            .collect();
        let found = self.reason(reading, &rises);
        Verdict {
            healthy: found.is_none(),
            cause: found.as_ref().map(|(cause, _)| *cause),
            reason: found.map(|(_, reason)| reason).unwrap_or_default(),
        }
    }

    fn reason(&self, reading: &Reading, rises: &[(&String, u64)]) -> Option<(Cause, String)> {
        let seconds = self.policy.window.as_secs();
        if let Some(link) = &reading.link
            && !link_up(&link.operstate)
        {
            return Some((
                Cause::LinkDown,
                format!("link {} is {} (operstate)", link.interface, link.operstate),
            ));
        }
        if reading.link.is_none()
            && !reading.ports.is_empty()
            && !reading
                .ports
                .iter()
                .any(|p| port_active(p.state.as_deref()))
        {
            let states: Vec<String> = reading
                .ports
                .iter()
                .map(|p| format!("{} {}", p.name, p.state.as_deref().unwrap_or("unknown")))
                .collect();
            return Some((
                Cause::LinkDown,
                format!("no RDMA port is active ({})", states.join(", ")),
            ));
        }
        if let Some(&(_, flaps)) = rises.iter().find(|(name, _)| *name == CARRIER)
            && flaps >= self.policy.flaps
        {
            let interface = reading.link.as_ref().map_or("", |l| l.interface.as_str());
            return Some((
                Cause::Flapping,
                format!(
                    "carrier of {interface} is flapping: {flaps} carrier changes in the last \
                     {seconds} s"
                ),
            ));
        }
        let errors: Vec<String> = rises
            .iter()
            .filter(|(name, rise)| *name != CARRIER && *rise >= self.policy.errors)
            .map(|(name, rise)| format!("{name} +{rise}"))
            .collect();
        (!errors.is_empty()).then(|| {
            (
                Cause::Errors,
                format!(
                    "error counters rising in the last {seconds} s: {}",
                    errors.join(", ")
                ),
            )
        })
    }
}

/// Which devices carry knd's unhealthy taint in the ResourceSlice. A device is tainted the
/// first time it is judged unhealthy and keeps the taint, with the cause and time of that
/// moment, while it stays unhealthy; the taint goes only after the device has been judged
/// healthy without a break for `quiet`. So a flapping link gets one taint for its whole burst
/// (two slice writes), however often its verdict flips.
#[derive(Debug)]
pub struct Taints {
    quiet: Duration,
    /// Per tainted device: the taint, and since when it has been healthy (if it is).
    current: BTreeMap<String, (Taint, Option<Instant>)>,
}

impl Taints {
    /// Taints that are removed after `quiet` of health.
    pub fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            current: BTreeMap::new(),
        }
    }

    /// Takes one health round, judged at `now` (`unix_seconds` on the wall clock). True when
    /// the set of taints changed. Devices missing from `health` (gone from the node) lose
    /// their taint.
    pub fn update(&mut self, now: Instant, unix_seconds: i64, health: &[DeviceHealth]) -> bool {
        let mut changed = false;
        let before = self.current.len();
        self.current
            .retain(|device, _| health.iter().any(|h| &h.device == device));
        changed |= self.current.len() != before;
        for device in health {
            match (self.current.get_mut(&device.device), device.cause) {
                (None, Some(cause)) => {
                    let taint = Taint {
                        cause,
                        since_unix_seconds: unix_seconds,
                    };
                    self.current.insert(device.device.clone(), (taint, None));
                    changed = true;
                }
                (Some((_, healthy_since)), Some(_)) => *healthy_since = None,
                (Some((_, healthy_since)), None) => {
                    let since = *healthy_since.get_or_insert(now);
                    if now.duration_since(since) >= self.quiet {
                        self.current.remove(&device.device);
                        changed = true;
                    }
                }
                (None, None) => {}
            }
        }
        changed
    }

    /// The current taints by device name.
    pub fn current(&self) -> BTreeMap<String, Taint> {
        self.current
            .iter()
            .map(|(device, (taint, _))| (device.clone(), *taint))
            .collect()
    }
}

const CARRIER: &str = "carrier_changes";

fn counters_of(reading: &Reading) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    if let Some(link) = &reading.link {
        if let Some(changes) = link.carrier_changes {
            counters.insert(CARRIER.to_owned(), changes);
        }
        for (name, value) in &link.errors {
            counters.insert(format!("{}:{name}", link.interface), *value);
        }
    }
    for port in &reading.ports {
        for (name, value) in &port.errors {
            counters.insert(format!("{}:{name}", port.name), *value);
        }
    }
    counters
}

/// `up`, or `unknown` (what drivers without carrier reporting, and some virtual devices, say).
fn link_up(operstate: &str) -> bool {
    matches!(operstate, "up" | "unknown")
}

fn port_active(state: Option<&str>) -> bool {
    state.is_some_and(|s| s.ends_with("ACTIVE"))
}

fn number(host: &HostRoot, path: &str) -> Option<u64> {
    host.read(path)
        .ok()
        .flatten()
        .and_then(|text| text.trim().parse().ok())
}

/// Reads `nic` on the node, from sysfs under `host`: its interface (if it has one there) and
/// its RDMA ports.
pub fn read_on_node(host: &HostRoot, device: &str, nic: &Nic) -> Reading {
    let link = nic.netdev.as_ref().and_then(|netdev| {
        let base = format!("/sys/class/net/{}", netdev.name);
        let operstate = host.read(&format!("{base}/operstate")).ok().flatten()?;
        Some(LinkReading {
            interface: netdev.name.clone(),
            operstate: operstate.trim().to_owned(),
            carrier_changes: number(host, &format!("{base}/carrier_changes")),
            errors: LINK_ERRORS
                .iter()
                .filter_map(|name| {
                    Some((
                        (*name).to_owned(),
                        number(host, &format!("{base}/statistics/{name}"))?,
                    ))
                })
                .collect(),
        })
    });
    Reading {
        device: device.to_owned(),
        link,
        ports: rdma_ports(host, nic),
    }
}

/// The RDMA ports of `nic`, from sysfs under `host` (they stay on the node's sysfs when the
/// interface moves into a pod).
pub fn rdma_ports(host: &HostRoot, nic: &Nic) -> Vec<PortReading> {
    nic.rdma
        .iter()
        .flat_map(|rdma| {
            rdma.ports.iter().map(move |port| {
                let base = format!("/sys/class/infiniband/{}/ports/{}", rdma.name, port.number);
                PortReading {
                    name: format!("{}/{}", rdma.name, port.number),
                    state: host
                        .read(&format!("{base}/state"))
                        .ok()
                        .flatten()
                        .map(|s| s.trim().to_owned()),
                    errors: PORT_ERRORS
                        .iter()
                        .filter_map(|name| {
                            Some((
                                (*name).to_owned(),
                                number(host, &format!("{base}/counters/{name}"))?,
                            ))
                        })
                        .collect(),
                }
            })
        })
        .collect()
}

/// Reads interface `interface` inside the network namespace at `netns` (a device attached to a
/// pod), over netlink.
pub async fn read_in_pod(netns: &Path, interface: &str) -> Result<LinkReading, String> {
    let namespace = Netns::open(netns).map_err(|e| e.to_string())?;
    let link = Link::connect_in(&namespace)
        .await
        .map_err(|e| e.to_string())?;
    link.health(interface).await.map_err(|e| e.to_string())
}

/// Where a device attached to a pod is: the pod's network namespace and its name there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPod {
    /// The pod's network namespace.
    pub netns: std::path::PathBuf,
    /// The interface's name in the pod.
    pub interface: String,
}

/// The devices attached to pods now, by device name, from the pod records in `store`.
pub fn attached(store: &crate::os::state::StateStore) -> BTreeMap<String, InPod> {
    let records = match store.pods.all() {
        Ok(records) => records,
        Err(error) => {
            tracing::warn!(error = %crate::model::error_chain(&error), "cannot read the pod records");
            return BTreeMap::new();
        }
    };
    records
        .into_iter()
        .filter(|(_, record)| !record.detached)
        .flat_map(|(_, record)| {
            let netns = record.netns.clone();
            // A share leaves its NIC on the node (read there); the pod has only a child of it.
            record.attachments.into_iter().filter_map(move |a| {
                if a.share.is_some() {
                    return None;
                }
                let pod = a.pod?;
                Some((
                    a.device,
                    InPod {
                        netns: netns.clone(),
                        interface: pod.name,
                    },
                ))
            })
        })
        .collect()
}

/// Reads every device of `inventory` (through `attached` for those in pods: devices that left
/// the node's sysfs with their interface are still read) and judges each with `tracker`.
/// Devices are sorted by name.
pub async fn assess(
    tracker: &mut Tracker,
    host: &HostRoot,
    inventory: &crate::discover::inventory::Inventory,
    attached: &BTreeMap<String, InPod>,
    pool: &str,
) -> Vec<DeviceHealth> {
    let mut readings: BTreeMap<String, Reading> = BTreeMap::new();
    for nic in &inventory.nics {
        let device = crate::publish::resources::device_name(nic);
        let mut reading = read_on_node(host, &device, nic);
        if attached.contains_key(&device) {
            reading.link = None; // read in the pod below
        }
        readings.insert(device, reading);
    }
    for (device, in_pod) in attached {
        let reading = readings.entry(device.clone()).or_insert_with(|| Reading {
            device: device.clone(),
            ..Reading::default()
        });
        match read_in_pod(&in_pod.netns, &in_pod.interface).await {
            Ok(link) => reading.link = Some(link),
            Err(error) => {
                // The pod is going away, or its namespace is: its stop hook gives the device
                // back. Judged on the rest meanwhile.
                tracing::debug!(%device, %error, "cannot read an attached device");
            }
        }
    }
    let now = Instant::now();
    let names: Vec<&str> = readings.keys().map(String::as_str).collect();
    tracker.retain(&names);
    readings
        .values()
        .map(|reading| {
            let verdict = tracker.assess(now, reading);
            DeviceHealth {
                pool: pool.to_owned(),
                device: reading.device.clone(),
                healthy: verdict.healthy,
                reason: verdict.reason,
                cause: verdict.cause,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(operstate: &str, carrier_changes: u64, crc: u64) -> Reading {
        Reading {
            device: "nic0".to_owned(),
            link: Some(LinkReading {
                interface: "eth0".to_owned(),
                operstate: operstate.to_owned(),
                carrier_changes: Some(carrier_changes),
                errors: [("rx_crc_errors".to_owned(), crc)].into(),
            }),
            ports: Vec::new(),
        }
    }

    fn tracker() -> Tracker {
        Tracker::new(Policy {
            window: Duration::from_mins(1),
            flaps: 4,
            errors: 10,
        })
    }

    #[test]
    fn a_link_that_is_down_is_unhealthy_until_it_is_up() {
        let (mut t, start) = (tracker(), Instant::now());
        assert!(t.assess(start, &link("up", 1, 0)).healthy);
        let down = t.assess(start + Duration::from_secs(1), &link("down", 2, 0));
        assert!(!down.healthy);
        assert_eq!(down.reason, "link eth0 is down (operstate)");
        let lower = t.assess(
            start + Duration::from_secs(2),
            &link("lowerlayerdown", 2, 0),
        );
        assert_eq!(lower.reason, "link eth0 is lowerlayerdown (operstate)");
        // "unknown" is what interfaces without carrier reporting say: not a fault.
        assert!(
            t.assess(start + Duration::from_secs(3), &link("unknown", 3, 0))
                .healthy
        );
    }

    #[test]
    fn a_flapping_carrier_is_unhealthy_until_a_quiet_window_passes() {
        let (mut t, start) = (tracker(), Instant::now());
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(t.assess(at(0), &link("up", 1, 0)).healthy);
        assert!(
            t.assess(at(10), &link("up", 3, 0)).healthy,
            "one down/up cycle is not a flap"
        );
        let flapping = t.assess(at(20), &link("up", 5, 0));
        assert!(!flapping.healthy);
        assert_eq!(
            flapping.reason,
            "carrier of eth0 is flapping: 4 carrier changes in the last 60 s"
        );
        // Still within a window of the flaps.
        assert!(!t.assess(at(60), &link("up", 5, 0)).healthy);
        // A whole window without a change: healthy again.
        assert!(t.assess(at(81), &link("up", 5, 0)).healthy);
        assert!(t.assess(at(140), &link("up", 5, 0)).healthy);
    }

    #[test]
    fn rising_error_counters_make_a_device_unhealthy_naming_them() {
        let (mut t, start) = (tracker(), Instant::now());
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(t.assess(at(0), &link("up", 1, 100)).healthy);
        assert!(
            t.assess(at(5), &link("up", 1, 105)).healthy,
            "below the threshold"
        );
        let rising = t.assess(at(10), &link("up", 1, 137));
        assert!(!rising.healthy);
        assert_eq!(
            rising.reason,
            "error counters rising in the last 60 s: eth0:rx_crc_errors +37"
        );
        // Errors stop: healthy once the rise has left the window.
        assert!(!t.assess(at(40), &link("up", 1, 137)).healthy);
        assert!(t.assess(at(75), &link("up", 1, 137)).healthy);
    }

    #[test]
    fn counters_that_go_down_start_over_instead_of_looking_like_a_rise() {
        let (mut t, start) = (tracker(), Instant::now());
        assert!(t.assess(start, &link("up", 9, 500)).healthy);
        // The device was reset: every counter restarted from zero.
        assert!(
            t.assess(start + Duration::from_secs(1), &link("up", 1, 2))
                .healthy
        );
        assert!(
            t.assess(start + Duration::from_secs(2), &link("up", 2, 3))
                .healthy
        );
    }

    #[test]
    fn an_rdma_only_device_needs_an_active_port() {
        let (mut t, start) = (tracker(), Instant::now());
        let port = |state: &str, symbol_errors: u64| Reading {
            device: "mlx5-0".to_owned(),
            link: None,
            ports: vec![PortReading {
                name: "mlx5_0/1".to_owned(),
                state: Some(state.to_owned()),
                errors: [("symbol_error".to_owned(), symbol_errors)].into(),
            }],
        };
        assert!(t.assess(start, &port("4: ACTIVE", 0)).healthy);
        let down = t.assess(start + Duration::from_secs(1), &port("1: DOWN", 0));
        assert_eq!(down.reason, "no RDMA port is active (mlx5_0/1 1: DOWN)");
        let errors = t.assess(start + Duration::from_secs(2), &port("4: ACTIVE", 12));
        assert_eq!(
            errors.reason,
            "error counters rising in the last 60 s: mlx5_0/1:symbol_error +12"
        );
    }

    #[test]
    fn devices_that_left_are_forgotten() {
        let mut t = tracker();
        let start = Instant::now();
        t.assess(start, &link("up", 1, 0));
        t.retain(&["nic1"]);
        // Starts from this reading: no rise against the forgotten one.
        assert!(t.assess(start, &link("up", 50, 0)).healthy);
    }

    fn round(device: &str, cause: Option<Cause>) -> Vec<DeviceHealth> {
        vec![DeviceHealth {
            pool: "node-1".to_owned(),
            device: device.to_owned(),
            healthy: cause.is_none(),
            reason: String::new(),
            cause,
        }]
    }

    #[test]
    fn verdicts_name_their_cause() {
        let (mut t, start) = (tracker(), Instant::now());
        assert_eq!(t.assess(start, &link("up", 1, 0)).cause, None);
        let second = |s| start + Duration::from_secs(s);
        assert_eq!(
            t.assess(second(1), &link("down", 2, 0)).cause,
            Some(Cause::LinkDown)
        );
        assert_eq!(
            t.assess(second(2), &link("up", 5, 0)).cause,
            Some(Cause::Flapping)
        );
        let mut t = tracker();
        t.assess(start, &link("up", 1, 0));
        assert_eq!(
            t.assess(second(1), &link("up", 1, 20)).cause,
            Some(Cause::Errors)
        );
    }

    #[test]
    fn a_taint_stays_through_a_burst_of_flaps_and_goes_after_a_quiet_window() {
        let mut taints = Taints::new(Duration::from_mins(1));
        let start = Instant::now();
        let at = |s: i64| start + Duration::from_secs(s.unsigned_abs());
        assert!(!taints.update(at(0), 1000, &round("nic0", None)));
        assert!(taints.current().is_empty());
        // Down: tainted at once, with the cause and the moment.
        assert!(taints.update(at(1), 1001, &round("nic0", Some(Cause::LinkDown))));
        let first = taints.current()["nic0"];
        assert_eq!(first.cause, Cause::LinkDown);
        assert_eq!(first.since_unix_seconds, 1001);
        // The verdict flips every second for a minute: the taint never changes.
        for s in 2..=62 {
            let cause = (s % 2 == 0).then_some(Cause::Flapping);
            assert!(!taints.update(at(s), 1000 + s, &round("nic0", cause)));
            assert_eq!(taints.current()["nic0"], first);
        }
        // Healthy from 63 on: still tainted 59 s later, gone at 60 s.
        assert!(!taints.update(at(63), 1063, &round("nic0", None)));
        assert!(!taints.update(at(122), 1122, &round("nic0", None)));
        assert!(taints.update(at(123), 1123, &round("nic0", None)));
        assert!(taints.current().is_empty());
        // A device that leaves the node takes its taint with it.
        assert!(taints.update(at(130), 1130, &round("nic0", Some(Cause::Errors))));
        assert!(taints.update(at(131), 1131, &round("nic1", None)));
        assert!(taints.current().is_empty());
    }
}
