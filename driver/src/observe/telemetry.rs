//! In-kernel telemetry: loads knd's eBPF programs, attaches the traffic classifiers to
//! interfaces in any network namespace and the sock_ops program to a cgroup v2 directory, and
//! reads their per-CPU maps back.

use std::{collections::HashMap, fmt, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        CgroupAttachMode, LinkOrder, SchedClassifier, SockOps, TcAttachType, tc::TcAttachOptions,
    },
};
use knd_common::{DirectionStats, PacingKey, Policer, RttStats, TrafficCounters, direction, names};

use crate::os::netns::{self, Netns};

/// The compiled kernel-side programs (`ebpf/`), built by `build.rs` and embedded here.
static PROBES_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/knd-probes"));

/// The embedded eBPF object file (ELF, with `.BTF` and `.BTF.ext`).
pub fn probes_object() -> &'static [u8] {
    PROBES_OBJECT
}

/// Errors from loading, attaching and reading the programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary was built with `AYA_BUILD_SKIP=1` (for type-checking), without the programs.
    #[error("this knd binary was built without its eBPF programs (AYA_BUILD_SKIP was set)")]
    NotBuilt,
    /// The object could not be parsed or a program/map could not be created in the kernel.
    #[error("cannot load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// The object lacks a program or map the driver expects (a build mismatch).
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The verifier or the kernel refused a program.
    #[error("the kernel refused program {program}")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What the kernel said (the verifier log is in the source chain).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation failed.
    #[error("{operation} in map {map} failed")]
    Map {
        /// What was attempted.
        operation: &'static str,
        /// The map's name.
        map: &'static str,
        /// What the kernel said.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Attaching to the interface failed.
    #[error("cannot attach {program} to {interface} in {namespace}")]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The interface.
        interface: String,
        /// The namespace it lives in.
        namespace: String,
        /// What the kernel said.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// The interface does not exist in the namespace.
    #[error("no interface {interface} in {namespace}")]
    NoSuchInterface {
        /// The interface.
        interface: String,
        /// The namespace searched.
        namespace: String,
    },
    /// The interface is already watched.
    #[error("interface {interface} in {namespace} is already watched")]
    AlreadyAttached {
        /// The interface.
        interface: String,
        /// Its namespace.
        namespace: String,
    },
    /// No attachment has this id.
    #[error("no attachment {0}")]
    UnknownAttachment(AttachmentId),
    /// A bandwidth share asked of an attachment whose programs only count.
    #[error("the programs on {interface} only count: a share needs its policing programs")]
    NotPolicing {
        /// The interface.
        interface: String,
    },
    /// Entering the namespace failed.
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which pair of counting programs an interface gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classifiers {
    /// Counting only: an interface of the pod's own (an exclusive NIC). Its frames never read
    /// the policer.
    Counting,
    /// Counting and policing: a bandwidth share, held to its rate by
    /// [`TrafficProbes::police`].
    Policing,
}

impl Classifiers {
    /// The programs, ingress and egress.
    pub const fn programs(self) -> [&'static str; 2] {
        match self {
            Self::Counting => [names::TRAFFIC_INGRESS_PROG, names::TRAFFIC_EGRESS_PROG],
            Self::Policing => [names::SHARE_INGRESS_PROG, names::SHARE_EGRESS_PROG],
        }
    }
}

/// Identifies one watched interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttachmentId(u64);

impl fmt::Display for AttachmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// An interface's traffic in detail, both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficDetail {
    /// What the interface received (summed over CPUs).
    pub rx: DirectionStats,
    /// What the interface sent.
    pub tx: DirectionStats,
    /// Received frames the policer dropped (a bandwidth share's ingress; zero unless policed).
    pub policed_rx: TrafficCounters,
    /// Frames to send the policer dropped (they never left: not in `tx`).
    pub policed_tx: TrafficCounters,
}

/// A bandwidth share to enforce on an interface: a policer per direction (`None`: not policed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareLimits {
    /// On what the interface receives.
    pub ingress: Option<Policer>,
    /// On what the interface sends.
    pub egress: Option<Policer>,
}

/// Traffic counted on one interface since it was attached, summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceTraffic {
    /// Frames and bytes the interface received.
    pub rx: TrafficCounters,
    /// Frames and bytes the interface sent.
    pub tx: TrafficCounters,
}

/// One watched interface: its own instance of the programs and maps. Dropping it detaches the
/// programs (their TCX links close) and frees the maps.
struct Attachment {
    interface: String,
    namespace: String,
    netns_cookie: u64,
    ifindex: u32,
    ebpf: Ebpf,
    programs: Vec<&'static str>,
}

/// One program's run-time statistics from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// The program's name.
    pub program: &'static str,
    /// Total time spent running it.
    pub run_time: std::time::Duration,
    /// Times it ran.
    pub runs: u64,
}

/// Turns on the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`) for as long as
/// the returned descriptor lives; they cost every program some nanoseconds per run.
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|source| Error::Program {
        program: "(statistics)",
        source: Box::new(aya::programs::ProgramError::SyscallError(source)),
    })
}

/// Every interface the traffic programs are attached to.
///
/// Each attachment loads its own instance of the object: the kernel gives TC programs no
/// reliable way to tell which namespace a received frame's device belongs to, and a private
/// per-CPU array is also the cheapest possible lookup on the data path.
#[derive(Default)]
pub struct TrafficProbes {
    attachments: HashMap<AttachmentId, Attachment>,
    next_id: u64,
}

impl fmt::Debug for TrafficProbes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrafficProbes")
            .field("attachments", &self.attachments.len())
            .finish_non_exhaustive()
    }
}

/// An instance of the counting programs, loaded and verified by the kernel but attached
/// nowhere: what [`TrafficProbes::attach_loaded`] only has to link, so the tens of
/// milliseconds of loading stay off a pod's start.
pub struct Loaded(Ebpf);

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded").finish_non_exhaustive()
    }
}

impl Loaded {
    /// Loads the object and both pairs of counting programs (the verifier runs here), so that
    /// the instance can go to an interface of its own or to a share.
    pub fn new() -> Result<Self> {
        let mut ebpf = load_object()?;
        for program in Classifiers::Counting
            .programs()
            .into_iter()
            .chain(Classifiers::Policing.programs())
        {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| Error::Program {
                    program,
                    source: Box::new(source),
                })?;
        }
        Ok(Self(ebpf))
    }
}

/// A fresh instance of the object (maps created, programs not loaded yet).
fn load_object() -> Result<Ebpf> {
    if PROBES_OBJECT.is_empty() {
        return Err(Error::NotBuilt);
    }
    raise_memlock_limit();
    // The RTT and pacing maps belong to the node-wide sock_ops instance: one entry is enough
    // here.
    EbpfLoader::new()
        .map_max_entries(names::NETNS_RTT_MAP, 1)
        .map_max_entries(names::PACING_MAP, 1)
        .load(PROBES_OBJECT)
        .map_err(|e| Error::Load(Box::new(e)))
}

impl TrafficProbes {
    /// No interface watched yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads an instance of the counting programs and attaches it, ingress and egress, to
    /// `interface` inside `netns`. Counting starts at zero now. Other TC programs on the
    /// interface keep running (ours return "next").
    pub fn attach(&mut self, netns: &Netns, interface: &str) -> Result<AttachmentId> {
        self.attach_loaded(Loaded::new()?, netns, interface, Classifiers::Counting)
    }

    /// [`Self::attach`] with the programs that police as well (a bandwidth share's).
    pub fn attach_policing(&mut self, netns: &Netns, interface: &str) -> Result<AttachmentId> {
        self.attach_loaded(Loaded::new()?, netns, interface, Classifiers::Policing)
    }

    /// [`Self::attach`] with an instance loaded beforehand: only the links are made here.
    pub fn attach_loaded(
        &mut self,
        loaded: Loaded,
        netns: &Netns,
        interface: &str,
        classifiers: Classifiers,
    ) -> Result<AttachmentId> {
        let [ingress, egress] = classifiers.programs();
        self.attach_programs(loaded.0, netns, interface, [Some(ingress), Some(egress)])
    }

    /// Attaches the do-nothing program, ingress and egress, the way [`Self::attach`] attaches
    /// the counting ones: the baseline for measuring what counting costs per packet (see
    /// [`Self::program_stats`]). Its counters stay at zero.
    pub fn attach_baseline(&mut self, netns: &Netns, interface: &str) -> Result<AttachmentId> {
        self.attach_programs(
            load_object()?,
            netns,
            interface,
            [Some(names::NOOP_PROG), Some(names::NOOP_PROG)],
        )
    }

    /// The do-nothing program in one direction only (ingress if `ingress`), so that the hook's
    /// own cost can be told apart by direction: frames of one direction may be rarer, colder
    /// in cache, than those of the other.
    pub fn attach_baseline_one(
        &mut self,
        netns: &Netns,
        interface: &str,
        ingress: bool,
    ) -> Result<AttachmentId> {
        let program = Some(names::NOOP_PROG);
        let directions = if ingress {
            [program, None]
        } else {
            [None, program]
        };
        self.attach_programs(load_object()?, netns, interface, directions)
    }

    /// The kernel's information on each of an attachment's programs, by name.
    fn program_infos(
        &self,
        id: AttachmentId,
    ) -> Result<Vec<(&'static str, aya::programs::ProgramInfo)>> {
        let attachment = self
            .attachments
            .get(&id)
            .ok_or(Error::UnknownAttachment(id))?;
        attachment
            .programs
            .iter()
            .map(|&name| {
                let program = attachment.ebpf.program(name).ok_or(Error::Missing {
                    kind: "program",
                    name,
                })?;
                let info = program.info().map_err(|source| Error::Program {
                    program: name,
                    source: Box::new(source),
                })?;
                Ok((name, info))
            })
            .collect()
    }

    /// The kernel's run-time statistics of an attachment's programs (ingress, egress): total
    /// run time and runs. They only count while statistics are enabled ([`enable_run_stats`]).
    pub fn program_stats(&self, id: AttachmentId) -> Result<Vec<ProgramStats>> {
        Ok(self
            .program_infos(id)?
            .into_iter()
            .map(|(program, info)| ProgramStats {
                program,
                run_time: info.run_time(),
                runs: info.run_count(),
            })
            .collect())
    }

    /// The maps each of an attachment's programs uses, by name, as the kernel reports them
    /// (what a frame can touch).
    pub fn program_maps(&self, id: AttachmentId) -> Result<Vec<(&'static str, Vec<String>)>> {
        self.program_infos(id)?
            .into_iter()
            .map(|(program, info)| {
                let ids = info
                    .map_ids()
                    .map_err(|source| Error::Program {
                        program,
                        source: Box::new(source),
                    })?
                    .unwrap_or_default();
                let maps = ids
                    .into_iter()
                    .map(|id| {
                        aya::maps::MapInfo::from_id(id)
                            .map(|info| info.name_as_str().unwrap_or_default().to_owned())
                            .map_err(|source| Error::Map {
                                operation: "read the information of",
                                map: "(one used by a program)",
                                source: Box::new(source),
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((program, maps))
            })
            .collect()
    }

    fn attach_programs(
        &mut self,
        mut ebpf: Ebpf,
        netns: &Netns,
        interface: &str,
        [ingress, egress]: [Option<&'static str>; 2],
    ) -> Result<AttachmentId> {
        let namespace = netns.to_string();
        let attachments = &self.attachments;
        // One thread in the namespace for everything that must happen there: identify the
        // interface, refuse a second attachment, load and attach both programs.
        let (netns_cookie, ifindex) = netns.run(|| -> Result<(u64, u32)> {
            let (netns_cookie, ifindex) = place_here(&namespace, interface)?;
            if attachments
                .values()
                .any(|a| a.netns_cookie == netns_cookie && a.ifindex == ifindex)
            {
                return Err(Error::AlreadyAttached {
                    interface: interface.to_owned(),
                    namespace: namespace.clone(),
                });
            }
            for (program, attach_type) in [
                (ingress, TcAttachType::Ingress),
                (egress, TcAttachType::Egress),
            ]
            .into_iter()
            .filter_map(|(program, attach_type)| Some((program?, attach_type)))
            {
                let classifier = classifier(&mut ebpf, program)?;
                // The same program both ways (the baseline) is loaded once.
                if classifier.fd().is_err() {
                    classifier.load().map_err(|source| Error::Program {
                        program,
                        source: Box::new(source),
                    })?;
                }
                // On error, dropping `ebpf` detaches whatever was attached already.
                classifier
                    .attach_with_options(
                        interface,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|source| Error::Attach {
                        program,
                        interface: interface.to_owned(),
                        namespace: namespace.clone(),
                        source: Box::new(source),
                    })?;
            }
            Ok((netns_cookie, ifindex))
        })??;

        self.next_id += 1;
        let id = AttachmentId(self.next_id);
        self.attachments.insert(
            id,
            Attachment {
                interface: interface.to_owned(),
                namespace,
                netns_cookie,
                ifindex,
                ebpf,
                programs: match (ingress, egress) {
                    (Some(a), Some(b)) if a == b => vec![a],
                    _ => ingress.into_iter().chain(egress).collect(),
                },
            },
        );
        Ok(id)
    }

    /// Enforces `limits` on the attachment's interface, whose programs must be
    /// [`Classifiers::Policing`] (an error otherwise): they police as they count, egress before
    /// counting (what they drop never left, and is in neither knd's nor the kernel's transmit
    /// counters), ingress after it (received frames count as the kernel counts them, then the
    /// excess is dropped); only their map is written, no program is linked. Drops are counted in [`TrafficDetail::policed_rx`]/[`TrafficDetail::policed_tx`].
    pub fn police(&mut self, id: AttachmentId, limits: ShareLimits) -> Result<()> {
        let attachment = self
            .attachments
            .get_mut(&id)
            .ok_or(Error::UnknownAttachment(id))?;
        if !attachment.programs.contains(&names::SHARE_EGRESS_PROG) {
            return Err(Error::NotPolicing {
                interface: attachment.interface.clone(),
            });
        }
        let name = names::POLICER_MAP;
        let map = attachment
            .ebpf
            .map_mut(name)
            .ok_or(Error::Missing { kind: "map", name })?;
        let mut policers: Array<&mut MapData, Policer> =
            Array::try_from(map).map_err(map_error("open", name))?;
        for (index, policer) in [
            (direction::INGRESS, limits.ingress),
            (direction::EGRESS, limits.egress),
        ] {
            policers
                .set(index, policer.unwrap_or_default(), 0)
                .map_err(map_error("set", name))?;
        }
        Ok(())
    }

    /// Sets the attachment's counters back to zero: counting starts again from now. Exact only
    /// while the interface carries no frame (down, as it arrives in a pod).
    pub fn reset(&mut self, id: AttachmentId) -> Result<()> {
        let name = names::IFACE_STATS_MAP;
        let attachment = self
            .attachments
            .get_mut(&id)
            .ok_or(Error::UnknownAttachment(id))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Map {
            operation: "count CPUs",
            map: name,
            source: Box::new(aya::maps::MapError::IoError(e)),
        })?;
        let map = attachment
            .ebpf
            .map_mut(name)
            .ok_or(Error::Missing { kind: "map", name })?;
        let mut stats: PerCpuArray<&mut MapData, DirectionStats> =
            PerCpuArray::try_from(map).map_err(map_error("open", name))?;
        for index in [direction::INGRESS, direction::EGRESS] {
            let zero = PerCpuValues::try_from(vec![DirectionStats::default(); cpus])
                .map_err(|e| map_error("prepare", name)(aya::maps::MapError::IoError(e)))?;
            stats
                .set(index, zero, 0)
                .map_err(map_error("reset", name))?;
        }
        Ok(())
    }

    /// Records that the attachment's interface is now `interface` in `netns` (TCX links follow
    /// a device into another namespace): a later attachment on the interface that took its
    /// old index is not mistaken for a second one on it.
    pub fn moved(&mut self, id: AttachmentId, netns: &Netns, interface: &str) -> Result<()> {
        let namespace = netns.to_string();
        let (netns_cookie, ifindex) = netns.run(|| place_here(&namespace, interface))??;
        let attachment = self
            .attachments
            .get_mut(&id)
            .ok_or(Error::UnknownAttachment(id))?;
        attachment.netns_cookie = netns_cookie;
        attachment.ifindex = ifindex;
        interface.clone_into(&mut attachment.interface);
        attachment.namespace = namespace;
        Ok(())
    }

    /// Detaches the programs from the interface and frees its counters.
    pub fn detach(&mut self, id: AttachmentId) -> Result<()> {
        self.attachments
            .remove(&id)
            .map(drop)
            .ok_or(Error::UnknownAttachment(id))
    }

    /// Traffic counted on the attachment so far, summed over CPUs.
    pub fn traffic(&self, id: AttachmentId) -> Result<InterfaceTraffic> {
        let detail = self.detail(id)?;
        Ok(InterfaceTraffic {
            rx: detail.rx.total(),
            tx: detail.tx.total(),
        })
    }

    /// Traffic counted on the attachment so far by class, frame size and RoCEv2 opcode class.
    pub fn detail(&self, id: AttachmentId) -> Result<TrafficDetail> {
        let attachment = self
            .attachments
            .get(&id)
            .ok_or(Error::UnknownAttachment(id))?;
        let stats = read_array::<DirectionStats>(&attachment.ebpf, names::IFACE_STATS_MAP)?;
        let policed = read_array::<TrafficCounters>(&attachment.ebpf, names::POLICED_MAP)?;
        Ok(TrafficDetail::of(&stats, &policed))
    }

    /// A reader of the attachment's counters with a map handle of its own: it reads without
    /// these probes (and their owner's lock), and keeps working, frozen, after a detach.
    pub fn reader(&self, id: AttachmentId) -> Result<TrafficReader> {
        let attachment = self
            .attachments
            .get(&id)
            .ok_or(Error::UnknownAttachment(id))?;
        let open = |name: &'static str| -> Result<MapData> { own_handle(&attachment.ebpf, name) };
        let (stats, policed) = (names::IFACE_STATS_MAP, names::POLICED_MAP);
        Ok(TrafficReader {
            stats: PerCpuArray::try_from(Map::PerCpuArray(open(stats)?))
                .map_err(map_error("open", stats))?,
            policed: PerCpuArray::try_from(Map::PerCpuArray(open(policed)?))
                .map_err(map_error("open", policed))?,
        })
    }
}

/// The calling thread's namespace cookie and the index of `interface` there (`namespace` names
/// it in errors).
fn place_here(namespace: &str, interface: &str) -> Result<(u64, u32)> {
    let netns_cookie = netns::socket_netns_cookie().map_err(|source| netns::Error::Cookie {
        namespace: namespace.to_owned(),
        source,
    })?;
    let ifindex =
        nix::net::if_::if_nametoindex(interface).map_err(|_errno| Error::NoSuchInterface {
            interface: interface.to_owned(),
            namespace: namespace.to_owned(),
        })?;
    Ok((netns_cookie, ifindex))
}

/// Reads one attachment's counters (see [`TrafficProbes::reader`]).
pub struct TrafficReader {
    stats: PerCpuArray<MapData, DirectionStats>,
    policed: PerCpuArray<MapData, TrafficCounters>,
}

impl fmt::Debug for TrafficReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrafficReader").finish_non_exhaustive()
    }
}

impl TrafficReader {
    /// Traffic counted so far by class, frame size and RoCEv2 opcode class.
    pub fn detail(&self) -> Result<TrafficDetail> {
        Ok(TrafficDetail::of(
            &sum_array(&self.stats, names::IFACE_STATS_MAP)?,
            &sum_array(&self.policed, names::POLICED_MAP)?,
        ))
    }
}

impl TrafficDetail {
    fn of(stats: &[DirectionStats], policed: &[TrafficCounters]) -> Self {
        let of = |d: u32| stats.get(d as usize).copied().unwrap_or_default();
        let dropped = |d: u32| policed.get(d as usize).copied().unwrap_or_default();
        Self {
            rx: of(direction::INGRESS),
            tx: of(direction::EGRESS),
            policed_rx: dropped(direction::INGRESS),
            policed_tx: dropped(direction::EGRESS),
        }
    }
}

/// A handle of its own (a duplicated file descriptor) on the map `name` of `ebpf`.
fn own_handle(ebpf: &Ebpf, name: &'static str) -> Result<MapData> {
    let map = ebpf.map(name).ok_or(Error::Missing { kind: "map", name })?;
    let (Map::PerCpuArray(data) | Map::PerCpuHashMap(data)) = map else {
        return Err(Error::Missing {
            kind: "per-CPU map",
            name,
        });
    };
    let fd = std::os::fd::AsFd::as_fd(data.fd())
        .try_clone_to_owned()
        .map_err(|e| map_error("duplicate", name)(aya::maps::MapError::IoError(e)))?;
    MapData::from_fd(fd).map_err(map_error("reopen", name))
}

impl TrafficProbes {
    /// The interface and namespace an attachment watches, for display.
    pub fn describe(&self, id: AttachmentId) -> Option<(&str, &str)> {
        self.attachments
            .get(&id)
            .map(|a| (a.interface.as_str(), a.namespace.as_str()))
    }
}

/// Values that sum over CPUs.
trait PerCpuSum: aya::Pod + Default {
    fn plus(self, other: &Self) -> Self;
}

impl PerCpuSum for DirectionStats {
    fn plus(self, other: &Self) -> Self {
        self.merged(other)
    }
}

impl PerCpuSum for TrafficCounters {
    fn plus(self, other: &Self) -> Self {
        self.add(*other)
    }
}

impl PerCpuSum for RttStats {
    fn plus(self, other: &Self) -> Self {
        self.merged(other)
    }
}

fn map_error(operation: &'static str, map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map {
        operation,
        map,
        source: Box::new(source),
    }
}

/// Every entry of a per-CPU array, each summed over CPUs.
fn read_array<T: PerCpuSum>(ebpf: &Ebpf, name: &'static str) -> Result<Vec<T>> {
    let map = ebpf.map(name).ok_or(Error::Missing { kind: "map", name })?;
    let map: PerCpuArray<_, T> = PerCpuArray::try_from(map).map_err(map_error("open", name))?;
    sum_array(&map, name)
}

/// Every entry of a per-CPU array, summed over CPUs.
fn sum_array<T: PerCpuSum, M: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<M, T>,
    name: &'static str,
) -> Result<Vec<T>> {
    (0..map.len())
        .map(|index| {
            let per_cpu = map.get(&index, 0).map_err(map_error("lookup", name))?;
            Ok(per_cpu.iter().fold(T::default(), PerCpuSum::plus))
        })
        .collect()
}

/// The pacing map's key for `addr` in the namespace with `cookie` (IPv4 as IPv4-mapped IPv6).
fn pacing_key(cookie: u64, addr: std::net::IpAddr) -> PacingKey {
    let v6 = match addr {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    PacingKey {
        netns_cookie: cookie,
        addr: v6.octets(),
    }
}

/// The node-wide sock_ops program: attached once to a cgroup v2 directory (the root sees every
/// TCP socket of the node), it measures only the network namespaces put in with
/// [`SocketProbes::watch`] — a pod's sockets are told apart by their namespace's cookie, which
/// works whether or not the pod has a cgroup v2 directory of its own.
pub struct SocketProbes {
    ebpf: Ebpf,
    cgroup: String,
}

impl fmt::Debug for SocketProbes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketProbes")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl SocketProbes {
    /// Loads the sock_ops program and attaches it to the cgroup v2 directory `cgroup`
    /// (alongside any other sock_ops programs there). Detached when dropped.
    pub fn attach(cgroup: &Path) -> Result<Self> {
        if PROBES_OBJECT.is_empty() {
            return Err(Error::NotBuilt);
        }
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .load(PROBES_OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        let program = names::SOCKOPS_PROG;
        let sock_ops: &mut SockOps = ebpf
            .program_mut(program)
            .ok_or(Error::Missing {
                kind: "program",
                name: program,
            })?
            .try_into()
            .map_err(|source| Error::Program {
                program,
                source: Box::new(source),
            })?;
        sock_ops.load().map_err(|source| Error::Program {
            program,
            source: Box::new(source),
        })?;
        let directory = std::fs::File::open(cgroup).map_err(|e| Error::Attach {
            program,
            interface: String::new(),
            namespace: cgroup.display().to_string(),
            source: Box::new(aya::programs::ProgramError::IOError(e)),
        })?;
        // Through a BPF link (what aya uses where the kernel has them) the kernel takes no mode
        // flags and always lets other programs on the cgroup keep running.
        sock_ops
            .attach(directory, CgroupAttachMode::Single)
            .map_err(|source| Error::Attach {
                program,
                interface: String::new(),
                namespace: cgroup.display().to_string(),
                source: Box::new(source),
            })?;
        Ok(Self {
            ebpf,
            cgroup: cgroup.display().to_string(),
        })
    }

    fn map(&mut self) -> Result<PerCpuHashMap<&mut MapData, u64, RttStats>> {
        let name = names::NETNS_RTT_MAP;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::Missing { kind: "map", name })?;
        PerCpuHashMap::try_from(map).map_err(map_error("open", name))
    }

    /// Starts measuring the sockets of the namespace with `cookie` (from zero). Connections
    /// established from now on are measured.
    pub fn watch(&mut self, cookie: u64) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Map {
            operation: "count CPUs",
            map: names::NETNS_RTT_MAP,
            source: Box::new(aya::maps::MapError::IoError(e)),
        })?;
        let zero = PerCpuValues::try_from(vec![RttStats::default(); cpus]).map_err(|e| {
            map_error("prepare", names::NETNS_RTT_MAP)(aya::maps::MapError::IoError(e))
        })?;
        self.map()?
            .insert(cookie, zero, 0)
            .map_err(map_error("insert", names::NETNS_RTT_MAP))
    }

    fn pacing(&mut self) -> Result<aya::maps::HashMap<&mut MapData, PacingKey, u64>> {
        let name = names::PACING_MAP;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::Missing { kind: "map", name })?;
        aya::maps::HashMap::try_from(map).map_err(map_error("open", name))
    }

    /// Paces the TCP connections of the namespace with `cookie` whose local address is `addr`
    /// (a share's address) at no more than `rate` bytes per second: connections established
    /// from now on get it as their `SO_MAX_PACING_RATE`.
    pub fn pace(&mut self, cookie: u64, addr: std::net::IpAddr, rate: u64) -> Result<()> {
        self.pacing()?
            .insert(pacing_key(cookie, addr), rate, 0)
            .map_err(map_error("insert", names::PACING_MAP))
    }

    /// Stops pacing what [`Self::pace`] paced (connections already paced keep their rate).
    pub fn unpace(&mut self, cookie: u64, addr: std::net::IpAddr) -> Result<()> {
        match self.pacing()?.remove(&pacing_key(cookie, addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error("remove", names::PACING_MAP)(e)),
        }
    }

    /// Stops measuring the namespace with `cookie` and forgets its statistics.
    pub fn unwatch(&mut self, cookie: u64) -> Result<()> {
        match self.map()?.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error("remove", names::NETNS_RTT_MAP)(e)),
        }
    }

    /// The namespace's RTT statistics so far, summed over CPUs; `None` if it is not watched.
    pub fn rtt(&mut self, cookie: u64) -> Result<Option<RttStats>> {
        rtt_of(&self.map()?, cookie)
    }

    /// A reader of the RTT map with a handle of its own (reads without these probes).
    pub fn reader(&self) -> Result<RttReader> {
        let name = names::NETNS_RTT_MAP;
        let map = own_handle(&self.ebpf, name)?;
        Ok(RttReader(
            PerCpuHashMap::try_from(Map::PerCpuHashMap(map)).map_err(map_error("open", name))?,
        ))
    }
}

/// Reads the pods' RTT statistics (see [`SocketProbes::reader`]).
pub struct RttReader(PerCpuHashMap<MapData, u64, RttStats>);

impl fmt::Debug for RttReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RttReader").finish_non_exhaustive()
    }
}

impl RttReader {
    /// The namespace's RTT statistics so far, summed over CPUs; `None` if it is not watched.
    pub fn rtt(&self, cookie: u64) -> Result<Option<RttStats>> {
        rtt_of(&self.0, cookie)
    }
}

fn rtt_of<M: std::borrow::Borrow<MapData>>(
    map: &PerCpuHashMap<M, u64, RttStats>,
    cookie: u64,
) -> Result<Option<RttStats>> {
    match map.get(&cookie, 0) {
        Ok(per_cpu) => Ok(Some(
            per_cpu.iter().fold(RttStats::default(), PerCpuSum::plus),
        )),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_error("lookup", names::NETNS_RTT_MAP)(e)),
    }
}

/// The cgroup v2 directory to attach sock_ops to: the root of the host's cgroup v2 hierarchy,
/// wherever it is mounted where knd runs — found in `/proc/self/mountinfo` (a `cgroup2` mount
/// of the hierarchy's root: `/sys/fs/cgroup` on a pure cgroup v2 node, `/sys/fs/cgroup/unified`
/// on a hybrid one, also below a host path mounted into knd's container), else the two usual
/// places. Whatever is chosen is checked by [`check_cgroup_root`] before use.
pub fn default_cgroup_root() -> Option<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup2_roots(&mountinfo)
        .into_iter()
        .chain(["/sys/fs/cgroup/unified", "/sys/fs/cgroup"].map(std::path::PathBuf::from))
        .find(|path| check_cgroup_root(path).is_ok())
}

/// The mount points of `cgroup2` mounts of a hierarchy's root (mount root `/`), in
/// `/proc/self/mountinfo` text, shortest path first.
pub fn cgroup2_roots(mountinfo: &str) -> Vec<std::path::PathBuf> {
    let mut roots: Vec<std::path::PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, filesystem) = line.split_once(" - ")?;
            let fields: Vec<&str> = mount.split(' ').collect();
            let fs_type = filesystem.split(' ').next()?;
            let point = fields.get(4)?;
            (fs_type == "cgroup2" && fields.get(3) == Some(&"/"))
                .then(|| std::path::PathBuf::from(point.replace("\\040", " ")))
        })
        .collect();
    roots.sort_by_key(|p| p.components().count());
    roots.dedup();
    roots
}

/// Whether `path` is the root of a cgroup v2 hierarchy, where sock_ops sees every socket of
/// the node: a `cgroup2` filesystem, and its root cgroup (which alone has no `cgroup.events`).
/// A tmpfs (`/sys/fs/cgroup` of a hybrid node) or a pod's own cgroup would attach nowhere
/// useful; the error says which.
pub fn check_cgroup_root(path: &Path) -> std::result::Result<(), String> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let stat = nix::sys::statfs::statfs(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if stat.filesystem_type().0 != CGROUP2_SUPER_MAGIC {
        return Err(format!(
            "{} is not a cgroup v2 mount (filesystem magic {:#x})",
            path.display(),
            stat.filesystem_type().0
        ));
    }
    if path.join("cgroup.events").exists() {
        return Err(format!(
            "{} is a child cgroup, not the root of the hierarchy: sock_ops there sees only its \
             own sockets",
            path.display()
        ));
    }
    Ok(())
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let program = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(|source| Error::Program {
        program: name,
        source: Box::new(source),
    })
}

/// Kernels before 5.11 charge BPF memory to `RLIMIT_MEMLOCK`; newer ones use memcg. Raising the
/// limit needs `CAP_SYS_RESOURCE`, which some nodes (and this project's CI) lack; that only
/// matters on old kernels, so a failure is a warning.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct passed by reference.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (harmless on kernels with memcg-based BPF accounting)"
        );
    }
}

/// One RDMA port's counters, from sysfs (`ports/<n>/counters`, `ports/<n>/hw_counters`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RdmaPortCounters {
    /// Port number.
    pub port: u32,
    /// Bytes sent (`port_xmit_data` × 4: the counter is in 4-byte words).
    pub tx_bytes: u64,
    /// Bytes received (`port_rcv_data` × 4).
    pub rx_bytes: u64,
    /// Packets sent (`port_xmit_packets`).
    pub tx_packets: u64,
    /// Packets received (`port_rcv_packets`).
    pub rx_packets: u64,
    /// Every hardware counter the driver exposes (`np_cnp_sent`, `rp_cnp_handled`,
    /// `out_of_sequence`, `local_ack_timeout_err`, …), by name.
    pub hw: std::collections::BTreeMap<String, u64>,
}

/// The counters of every port of RDMA device `device` (e.g. `mlx5_0`) under `host`. A counter
/// that is missing or unreadable is left out (and a port without any is still listed).
pub fn rdma_counters(host: &crate::os::host::HostRoot, device: &str) -> Vec<RdmaPortCounters> {
    let base = format!("/sys/class/infiniband/{device}/ports");
    let number = |path: &str| -> Option<u64> {
        host.read(path)
            .ok()
            .flatten()
            .and_then(|text| text.trim().parse().ok())
    };
    let mut ports: Vec<RdmaPortCounters> = host
        .list(&base)
        .into_iter()
        .filter_map(|name| name.parse::<u32>().ok())
        .map(|port| {
            let counter = |name: &str| number(&format!("{base}/{port}/counters/{name}"));
            let hw_dir = format!("{base}/{port}/hw_counters");
            let hw = host
                .list(&hw_dir)
                .into_iter()
                .filter_map(|name| Some((name.clone(), number(&format!("{hw_dir}/{name}"))?)))
                .collect();
            RdmaPortCounters {
                port,
                tx_bytes: counter("port_xmit_data").unwrap_or(0).saturating_mul(4),
                rx_bytes: counter("port_rcv_data").unwrap_or(0).saturating_mul(4),
                tx_packets: counter("port_xmit_packets").unwrap_or(0),
                rx_packets: counter("port_rcv_packets").unwrap_or(0),
                hw,
            }
        })
        .collect();
    ports.sort_by_key(|p| p.port);
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hybrid node (v1 controllers on a tmpfs, v2 at `unified`) seen from knd's container:
    /// only the `cgroup2` mount of a hierarchy's root counts, not a pod's own cgroup mounted
    /// from a cgroup namespace, not the tmpfs.
    #[test]
    fn the_cgroup2_root_is_found_in_the_mount_table() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
40 25 0:27 /kubepods/pod1/abc /run/own\\040cgroup ro - cgroup2 cgroup2 rw
41 25 0:27 / /host/sys/fs/cgroup/unified ro - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_roots(mountinfo),
            [
                std::path::PathBuf::from("/sys/fs/cgroup/unified"),
                std::path::PathBuf::from("/host/sys/fs/cgroup/unified"),
            ]
        );
    }

    #[test]
    fn a_directory_that_is_no_cgroup2_root_is_refused_naming_why() {
        let dir = tempfile::tempdir().unwrap();
        let refused = check_cgroup_root(dir.path()).unwrap_err();
        assert!(refused.contains("is not a cgroup v2 mount"), "{refused}");
        let missing = check_cgroup_root(Path::new("/no/such/dir")).unwrap_err();
        assert!(missing.contains("/no/such/dir"), "{missing}");
    }
}
