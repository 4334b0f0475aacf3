//! In-kernel telemetry: loads knd's eBPF programs, attaches them to interfaces in any network
//! namespace, and reads their per-CPU counters back.

use std::{collections::HashMap, fmt};

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use knd_common::{TrafficCounters, direction, names};

use crate::netns::{self, Netns};

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
    /// Entering the namespace failed.
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Identifies one watched interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttachmentId(u64);

impl fmt::Display for AttachmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
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

impl TrafficProbes {
    /// No interface watched yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads an instance of the programs and attaches it, ingress and egress, to `interface`
    /// inside `netns`. Counting starts at zero now. Other TC programs on the interface keep
    /// running (ours return "next").
    pub fn attach(&mut self, netns: &Netns, interface: &str) -> Result<AttachmentId> {
        if PROBES_OBJECT.is_empty() {
            return Err(Error::NotBuilt);
        }
        let namespace = netns.to_string();
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .load(PROBES_OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        let attachments = &self.attachments;
        // One thread in the namespace for everything that must happen there: identify the
        // interface, refuse a second attachment, load and attach both programs.
        let (netns_cookie, ifindex) = netns.run(|| -> Result<(u64, u32)> {
            let netns_cookie =
                netns::socket_netns_cookie().map_err(|source| netns::Error::Cookie {
                    namespace: namespace.clone(),
                    source,
                })?;
            let ifindex = nix::net::if_::if_nametoindex(interface).map_err(|_errno| {
                Error::NoSuchInterface {
                    interface: interface.to_owned(),
                    namespace: namespace.clone(),
                }
            })?;
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
                (names::TRAFFIC_INGRESS_PROG, TcAttachType::Ingress),
                (names::TRAFFIC_EGRESS_PROG, TcAttachType::Egress),
            ] {
                let classifier = classifier(&mut ebpf, program)?;
                classifier.load().map_err(|source| Error::Program {
                    program,
                    source: Box::new(source),
                })?;
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
            },
        );
        Ok(id)
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
        let attachment = self
            .attachments
            .get(&id)
            .ok_or(Error::UnknownAttachment(id))?;
        let map = attachment
            .ebpf
            .map(names::IFACE_TRAFFIC_MAP)
            .ok_or(Error::Missing {
                kind: "map",
                name: names::IFACE_TRAFFIC_MAP,
            })?;
        let map_error = |operation| {
            move |source| Error::Map {
                operation,
                map: names::IFACE_TRAFFIC_MAP,
                source: Box::new(source),
            }
        };
        let map: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(map).map_err(map_error("open"))?;
        let read = |direction: u32| -> Result<TrafficCounters> {
            let per_cpu = map.get(&direction, 0).map_err(map_error("lookup"))?;
            Ok(per_cpu
                .iter()
                .fold(TrafficCounters::default(), |sum, cpu| sum.add(*cpu)))
        };
        Ok(InterfaceTraffic {
            rx: read(direction::INGRESS)?,
            tx: read(direction::EGRESS)?,
        })
    }

    /// The interface and namespace an attachment watches, for display.
    pub fn describe(&self, id: AttachmentId) -> Option<(&str, &str)> {
        self.attachments
            .get(&id)
            .map(|a| (a.interface.as_str(), a.namespace.as_str()))
    }
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
