//! Types shared by the kernel-side programs (`ebpf/`) and the driver: map keys and values.
//!
//! Every type is `#[repr(C)]`, made of fixed-width fields laid out without implicit padding, so
//! the kernel and user space agree on its bytes. No `bool`: the verifier and the C ABI disagree on
//! its width guarantees.
#![no_std]

/// Direction of traffic as seen by the interface a program is attached to.
pub mod direction {
    /// Frames the interface received (TCX ingress).
    pub const INGRESS: u32 = 0;
    /// Frames the interface sent (TCX egress).
    pub const EGRESS: u32 = 1;
}

/// Names of the maps and programs in the eBPF object, shared so a rename cannot drift.
pub mod names {
    /// Per-CPU array of [`super::TrafficCounters`], indexed by [`super::direction`].
    pub const IFACE_TRAFFIC_MAP: &str = "IFACE_TRAFFIC";
    /// TCX ingress classifier that counts received traffic.
    pub const TRAFFIC_INGRESS_PROG: &str = "knd_traffic_ingress";
    /// TCX egress classifier that counts sent traffic.
    pub const TRAFFIC_EGRESS_PROG: &str = "knd_traffic_egress";
}

/// Entries in [`names::IFACE_TRAFFIC_MAP`]: one per [`direction`].
pub const IFACE_TRAFFIC_ENTRIES: u32 = 2;

/// Packets and bytes counted for one direction of one interface on one CPU.
///
/// Each watched interface gets its own instance of the programs and of their maps, so no key has
/// to tell interfaces apart. (`bpf_get_netns_cookie` cannot: for a packet without a socket, such
/// as every received frame, TC programs get the initial namespace's cookie.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Frames seen (a GSO/GRO super-frame counts once, as in the kernel's interface statistics).
    pub packets: u64,
    /// Bytes seen, link-layer header included, as in the kernel's interface statistics.
    pub bytes: u64,
}

impl TrafficCounters {
    /// Adds another set of counters (e.g. another CPU's) to this one.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// Compile-time proof that the layout has no implicit padding: the size equals the sum of the
// fields.
const _: () = assert!(size_of::<TrafficCounters>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `TrafficCounters` is `#[repr(C)]`, `Copy`, made only of integers, and has no
    // padding (the size assertion above), so every bit pattern is valid and all its bytes are
    // initialised.
    unsafe impl aya::Pod for super::TrafficCounters {}
}
