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

/// Traffic classes, by what the frame carries.
pub mod class {
    /// TCP over IPv4 or IPv6.
    pub const TCP: u32 = 0;
    /// UDP other than RoCEv2.
    pub const UDP: u32 = 1;
    /// RoCEv2: UDP to port 4791, an InfiniBand BTH inside.
    pub const ROCE: u32 = 2;
    /// Everything else (ARP, ICMP, other protocols, frames too short to tell).
    pub const OTHER: u32 = 3;
    /// How many classes there are.
    pub const COUNT: u32 = 4;
    /// Their names, by index (metric label values).
    pub const NAMES: [&str; COUNT as usize] = ["tcp", "udp", "roce", "other"];
}

/// The UDP destination port of RoCEv2.
pub const ROCEV2_PORT: u16 = 4791;

/// RoCEv2 packets by BTH opcode class (`opcode >> 5`, IBA 9.2): reliable connection,
/// unreliable connection, reliable datagram, unreliable datagram, congestion notification
/// (CNP, opcode 0x81), extended reliable connection; 6 and 7 are reserved.
pub mod roce {
    /// Opcode classes (`opcode >> 5`).
    pub const CLASSES: u32 = 8;
    /// Their names, by index (metric label values).
    pub const NAMES: [&str; CLASSES as usize] = [
        "rc",
        "uc",
        "rd",
        "ud",
        "cnp",
        "xrc",
        "reserved6",
        "reserved7",
    ];
}

/// Frame-size histogram: bucket `i` counts frames of at most `64 << i` bytes (the last bucket
/// also takes everything larger): 64 B up to 512 KiB (BIG TCP super-frames).
pub const SIZE_BUCKETS: u32 = 14;
/// Smallest bucket bound, as a power of two (64 B).
pub const SIZE_MIN_SHIFT: u32 = 6;

/// Names of the maps and programs in the eBPF object, shared so a rename cannot drift.
pub mod names {
    /// Per-CPU array of [`super::DirectionStats`], indexed by [`super::direction`]: everything
    /// one frame updates is in one entry, so a frame costs one map lookup.
    pub const IFACE_STATS_MAP: &str = "IFACE_STATS";
    /// Per-CPU hash of [`super::RttStats`] by network-namespace cookie: only namespaces the
    /// driver put in are measured.
    pub const NETNS_RTT_MAP: &str = "NETNS_RTT";
    /// TCX ingress classifier that counts received traffic.
    pub const TRAFFIC_INGRESS_PROG: &str = "knd_traffic_ingress";
    /// TCX egress classifier that counts sent traffic.
    pub const TRAFFIC_EGRESS_PROG: &str = "knd_traffic_egress";
    /// [`TRAFFIC_INGRESS_PROG`] that also polices (a bandwidth share's, see [`POLICER_MAP`]).
    pub const SHARE_INGRESS_PROG: &str = "knd_share_ingress";
    /// [`TRAFFIC_EGRESS_PROG`] that also polices.
    pub const SHARE_EGRESS_PROG: &str = "knd_share_egress";
    /// TCX classifier that does nothing (the baseline for measuring the others' cost).
    pub const NOOP_PROG: &str = "knd_noop";
    /// sock_ops program (on a cgroup v2 directory) that records TCP RTT and retransmits.
    pub const SOCKOPS_PROG: &str = "knd_sockops";
    /// Array of [`super::Policer`], indexed by [`super::direction`]: a claim's bandwidth share.
    pub const POLICER_MAP: &str = "POLICER";
    /// Per-CPU array of [`super::TrafficCounters`], indexed by [`super::direction`]: frames the
    /// policer dropped.
    pub const POLICED_MAP: &str = "POLICED";
    /// Hash of pacing rates (bytes per second) by [`super::PacingKey`]: the TCP connections of
    /// a bandwidth share, paced by the kernel's TCP stack.
    pub const PACING_MAP: &str = "PACING";
}

/// Connections to pace: those of one network namespace (its cookie) with one local address
/// (a share's address; IPv4 as IPv4-mapped IPv6, bytes in network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PacingKey {
    /// `bpf_get_netns_cookie` of the connection's namespace.
    pub netns_cookie: u64,
    /// The connection's local address.
    pub addr: [u8; 16],
}

const _: () = assert!(size_of::<PacingKey>() == 24);

/// Shares whose connections the sock_ops program paces.
pub const PACING_ENTRIES: u32 = 1024;

/// One direction's policer: a claim's share of a NIC, enforced on its own interface as a
/// token bucket in its virtual-scheduling form (GCRA): `tat_ns` is the time at which the bucket
/// would be full again; a frame of `len` bytes passes when `tat_ns` is at most `tolerance_ns`
/// ahead of now, and moves it `len / rate` later. A `rate` of 0 polices nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policer {
    /// Bytes per second (the share's bits per second / 8).
    pub rate: u64,
    /// The bucket's size in bytes (what `tolerance_ns` amounts to at `rate`).
    pub burst: u64,
    /// How far ahead of now the theoretical arrival time may run: `burst / rate` seconds.
    pub tolerance_ns: u64,
    /// The theoretical arrival time (`bpf_ktime_get_ns` clock), advanced by an atomic add.
    pub tat_ns: u64,
}

const _: () = assert!(size_of::<Policer>() == 32);

impl Policer {
    /// A policer of `rate` bytes per second with a bucket of `burst` bytes.
    #[must_use]
    pub const fn new(rate: u64, burst: u64) -> Self {
        let tolerance_ns = match burst.saturating_mul(1_000_000_000).checked_div(rate) {
            Some(ns) => ns,
            None => 0,
        };
        Self {
            rate,
            burst,
            tolerance_ns,
            tat_ns: 0,
        }
    }

    /// The verdict for a frame that takes `cost` nanoseconds at the rate ([`Self::cost_ns`]),
    /// at `now` with the theoretical arrival time at `tat`: `None` to drop it, else the time it
    /// moves the arrival time on to.
    #[must_use]
    pub const fn admit(&self, tat: u64, now: u64, cost: u64) -> Option<u64> {
        let start = if tat > now { tat } else { now };
        if start - now > self.tolerance_ns {
            return None;
        }
        Some(start + cost)
    }

    /// How long `len` bytes take at the rate.
    #[must_use]
    pub const fn cost_ns(&self, len: u64) -> u64 {
        match len.saturating_mul(1_000_000_000).checked_div(self.rate) {
            Some(ns) => ns,
            None => 0,
        }
    }
}

/// The burst a share of `rate` bytes per second gets: 4 ms of its rate (a TCP sender's window
/// at the round-trip times of a node's fabric, so that a flow at the rate is not cut below it),
/// and at least eight 64 KiB GSO super-frames (one TSO frame must always fit).
#[must_use]
pub const fn policer_burst(rate: u64) -> u64 {
    let window = rate / 250;
    let floor = 8 * 65_536;
    if window > floor { window } else { floor }
}

/// Entries in [`names::IFACE_STATS_MAP`]: one per [`direction`].
pub const IFACE_STATS_ENTRIES: u32 = 2;
/// Namespaces [`names::NETNS_RTT_MAP`] can hold (pods with claims on one node).
pub const NETNS_RTT_ENTRIES: u32 = 1024;

/// One direction of one interface on one CPU: frames and bytes by class, RoCEv2 by BTH opcode
/// class, frames by size bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectionStats {
    /// By [`class`].
    pub classes: [TrafficCounters; class::COUNT as usize],
    /// RoCEv2 by opcode class ([`roce`]).
    pub roce: [TrafficCounters; roce::CLASSES as usize],
    /// Frames by size bucket ([`size_bucket`]).
    pub sizes: [u64; SIZE_BUCKETS as usize],
}

impl Default for DirectionStats {
    fn default() -> Self {
        Self {
            classes: [TrafficCounters::default(); class::COUNT as usize],
            roce: [TrafficCounters::default(); roce::CLASSES as usize],
            sizes: [0; SIZE_BUCKETS as usize],
        }
    }
}

impl DirectionStats {
    /// Every class together.
    #[must_use]
    pub fn total(&self) -> TrafficCounters {
        let mut sum = TrafficCounters::default();
        for class in &self.classes {
            sum = sum.add(*class);
        }
        sum
    }

    /// Adds another set (e.g. another CPU's) to this one.
    #[must_use]
    pub fn merged(mut self, other: &Self) -> Self {
        for (mine, theirs) in self.classes.iter_mut().zip(other.classes.iter()) {
            *mine = mine.add(*theirs);
        }
        for (mine, theirs) in self.roce.iter_mut().zip(other.roce.iter()) {
            *mine = mine.add(*theirs);
        }
        for (mine, theirs) in self.sizes.iter_mut().zip(other.sizes.iter()) {
            *mine = mine.wrapping_add(*theirs);
        }
        self
    }
}

const _: () = assert!(
    size_of::<DirectionStats>()
        == 16 * (class::COUNT as usize + roce::CLASSES as usize) + 8 * SIZE_BUCKETS as usize
);

/// RTT histogram: bucket `i` counts samples of a smoothed RTT of at most `2^i` microseconds
/// (the last bucket also takes everything slower): 1 µs up to about 8 s.
pub const RTT_BUCKETS: usize = 24;

/// TCP round-trip times and retransmissions of one network namespace on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RttStats {
    /// Samples per bucket (see [`RTT_BUCKETS`]).
    pub buckets: [u64; RTT_BUCKETS],
    /// Samples taken (one per RTT measurement the kernel makes).
    pub samples: u64,
    /// Sum of the sampled smoothed RTTs, microseconds.
    pub sum_us: u64,
    /// Segments retransmitted.
    pub retransmits: u64,
}

impl Default for RttStats {
    fn default() -> Self {
        Self {
            buckets: [0; RTT_BUCKETS],
            samples: 0,
            sum_us: 0,
            retransmits: 0,
        }
    }
}

impl RttStats {
    /// Adds another set (e.g. another CPU's) to this one.
    #[must_use]
    pub fn merged(mut self, other: &Self) -> Self {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine = mine.wrapping_add(*theirs);
        }
        self.samples = self.samples.wrapping_add(other.samples);
        self.sum_us = self.sum_us.wrapping_add(other.sum_us);
        self.retransmits = self.retransmits.wrapping_add(other.retransmits);
        self
    }
}

const _: () = assert!(size_of::<RttStats>() == 8 * (RTT_BUCKETS + 3));

/// The bucket of a `len`-byte frame in the size histogram.
#[inline]
#[must_use]
pub const fn size_bucket(len: u32) -> u32 {
    // The first bucket whose bound (64 B << bucket) holds the frame: ceil(log2(len)) from 64 B
    // up. Found by comparing, small frames first — the BPF target has no count-leading-zeros
    // instruction, and its expansion costs some 50 instructions per frame.
    let mut bucket = 0;
    while bucket < SIZE_BUCKETS - 1 && len > 1 << (SIZE_MIN_SHIFT + bucket) {
        bucket += 1;
    }
    bucket
}

/// The bucket of a smoothed RTT of `us` microseconds in the RTT histogram.
#[inline]
#[must_use]
pub const fn rtt_bucket(us: u32) -> usize {
    // The first bucket whose bound (2^bucket µs) holds the sample: ceil(log2(us)). Found by
    // comparing, as for frame sizes ([`size_bucket`]): it runs on every RTT sample.
    let mut bucket = 0;
    while bucket < RTT_BUCKETS - 1 && us as u64 > 1 << bucket {
        bucket += 1;
    }
    bucket
}

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
    // SAFETY: as above: `#[repr(C)]`, `Copy`, only `u64`s, no padding (size assertion).
    unsafe impl aya::Pod for super::RttStats {}
    // SAFETY: as above: `#[repr(C)]`, `Copy`, only `u64`s, no padding (size assertion).
    unsafe impl aya::Pod for super::DirectionStats {}
    // SAFETY: as above: `#[repr(C)]`, `Copy`, only 64-bit integers, no padding (size assertion).
    unsafe impl aya::Pod for super::Policer {}
    // SAFETY: as above: `#[repr(C)]`, `Copy`, a `u64` and bytes, no padding (size assertion).
    unsafe impl aya::Pod for super::PacingKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_with_open_ends() {
        assert_eq!(size_bucket(0), 0);
        assert_eq!(size_bucket(60), 0);
        assert_eq!(size_bucket(64), 0);
        assert_eq!(size_bucket(65), 1);
        assert_eq!(size_bucket(1514), 5, "1514 B is at most 2048 = 64 << 5");
        assert_eq!(size_bucket(65_536), 10);
        assert_eq!(size_bucket(u32::MAX), SIZE_BUCKETS - 1);
        // The bit-counting definition, at every length up to past the last bound and at the
        // edges beyond.
        let by_bits = |len: u32| {
            let bits = if len <= 1 {
                0
            } else {
                32 - (len - 1).leading_zeros()
            };
            bits.saturating_sub(SIZE_MIN_SHIFT).min(SIZE_BUCKETS - 1)
        };
        let rtt_by_bits = |us: u32| {
            let bits = if us <= 1 {
                0
            } else {
                32 - (us - 1).leading_zeros()
            };
            (bits as usize).min(RTT_BUCKETS - 1)
        };
        for len in (0..=(1 << 21)).chain([u32::MAX - 1, u32::MAX, 1 << 31, (1 << 31) + 1]) {
            assert_eq!(size_bucket(len), by_bits(len), "{len}");
            assert_eq!(rtt_bucket(len), rtt_by_bits(len), "{len} µs");
        }
        for us in [(1 << 22) + 1, 1 << 23, (1 << 23) + 1, 1 << 24] {
            assert_eq!(rtt_bucket(us), rtt_by_bits(us), "{us} µs");
        }
        assert_eq!(rtt_bucket(0), 0);
        assert_eq!(rtt_bucket(1), 0);
        assert_eq!(rtt_bucket(2), 1);
        assert_eq!(rtt_bucket(30), 5, "30 µs is at most 32 = 2^5");
        assert_eq!(rtt_bucket(u32::MAX), RTT_BUCKETS - 1);
    }

    #[test]
    fn the_policer_passes_its_rate_and_its_burst_and_no_more() {
        // 1 Gbit/s = 125 MB/s with a 250 kB bucket (2 ms).
        let policer = Policer::new(125_000_000, 250_000);
        assert_eq!(policer.tolerance_ns, 2_000_000);
        assert_eq!(policer.cost_ns(125_000), 1_000_000, "125 kB take 1 ms");
        // From idle, a burst of 250 kB passes at once, then frames are dropped until time
        // catches up with the arrival time.
        let (mut tat, mut passed) = (0, 0);
        let now = 10_000_000_000;
        while let Some(next) = policer.admit(tat, now, policer.cost_ns(10_000)) {
            tat = next;
            passed += 10_000;
        }
        assert_eq!(passed, 260_000, "the bucket plus the frame that fills it");
        // With the bucket empty, offering 1.5 GB/s for a second passes a second's worth at the
        // rate, less what the last burst frame overdrew (10 kB at most).
        let mut passed = 0u64;
        for step in 0..1_000_000u64 {
            let t = now + step * 1_000;
            if let Some(next) = policer.admit(tat, t, policer.cost_ns(1_500)) {
                tat = next;
                passed += 1_500;
            }
        }
        assert!(
            (125_000_000 - 10_000..=125_000_000).contains(&passed),
            "{passed}"
        );
        let free = Policer::new(0, 1);
        assert_eq!(free.cost_ns(1_000_000), 0);
        assert_eq!(
            free.admit(0, 5, free.cost_ns(1_000_000)),
            Some(5),
            "rate 0 polices nothing"
        );
        assert_eq!(
            policer_burst(125_000_000),
            524_288,
            "floor: eight 64 KiB frames"
        );
        assert_eq!(
            policer_burst(625_000_000),
            2_500_000,
            "5 Gbit/s: 4 ms of it"
        );
    }
}
