//! knd's kernel-side programs: TCX classifiers that count every claimed interface's traffic by
//! class, frame size and RoCEv2 opcode class, and a sock_ops program that records the TCP
//! round-trip times and retransmissions of the pods' namespaces.
//!
//! The classifiers only observe: they return `TC_ACT_UNSPEC` ("next" under TCX) so that any
//! other program on the interface, and the kernel's own processing, carry on unchanged. Nothing
//! goes to user space per packet: everything lands in per-CPU maps the driver reads.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd: the BPF target's core atomics have no read-modify-write"
)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::bpf_ktime_get_ns,
    helpers::generated::{bpf_get_netns_cookie, bpf_setsockopt},
    macros::{classifier, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{SockOpsContext, TcContext},
};
use knd_common::{
    DirectionStats, IFACE_STATS_ENTRIES, NETNS_RTT_ENTRIES, PACING_ENTRIES, PacingKey, Policer,
    ROCEV2_PORT, RTT_BUCKETS, RttStats, SIZE_BUCKETS, TrafficCounters, class, direction,
    rtt_bucket, size_bucket,
};

/// This interface's statistics by direction. The driver loads one instance of the classifiers
/// per watched interface, so no key names the interface; one entry holds everything a frame
/// updates, so a frame costs one lookup.
#[map(name = "IFACE_STATS")]
static IFACE_STATS: PerCpuArray<DirectionStats> =
    PerCpuArray::with_max_entries(IFACE_STATS_ENTRIES, 0);

/// RTT statistics by network-namespace cookie; the driver inserts the namespaces to measure.
#[map(name = "NETNS_RTT")]
static NETNS_RTT: PerCpuHashMap<u64, RttStats> =
    PerCpuHashMap::with_max_entries(NETNS_RTT_ENTRIES, 0);

/// TCX ingress of an interface of its own (an exclusive NIC): counts frames it received. It
/// never reads the policer — on the data path every cache line a frame touches costs.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry point receives its context by value"
)]
fn knd_traffic_ingress(ctx: TcContext) -> i32 {
    count(&ctx, direction::INGRESS);
    TC_ACT_UNSPEC
}

/// TCX egress of an interface of its own: counts frames it sent.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry point receives its context by value"
)]
fn knd_traffic_egress(ctx: TcContext) -> i32 {
    count(&ctx, direction::EGRESS);
    TC_ACT_UNSPEC
}

/// TCX ingress of a bandwidth share: counts frames the interface received, then, when the
/// share polices what it receives, drops what exceeds it (counted as received, as the kernel
/// counts it).
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry point receives its context by value"
)]
fn knd_share_ingress(ctx: TcContext) -> i32 {
    count(&ctx, direction::INGRESS);
    police(&ctx, direction::INGRESS)
}

/// TCX egress of a bandwidth share: first drops what exceeds the share (it never leaves, so
/// neither knd nor the kernel counts it as sent), then counts frames the interface sent.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry point receives its context by value"
)]
fn knd_share_egress(ctx: TcContext) -> i32 {
    if police(&ctx, direction::EGRESS) == TC_ACT_SHOT {
        return TC_ACT_SHOT;
    }
    count(&ctx, direction::EGRESS);
    TC_ACT_UNSPEC
}

/// Pacing rates (bytes per second) of the shares' TCP connections, by namespace and local
/// address; the driver inserts a share's addresses when it attaches the share.
#[map(name = "PACING")]
static PACING: HashMap<PacingKey, u64> = HashMap::with_max_entries(PACING_ENTRIES, 0);

/// This interface's bandwidth share by direction (a claim's share of a NIC; a rate of 0, the
/// default, polices nothing): a share's counting programs police too, so a share costs no
/// program link of its own. The driver writes the rate and burst, the programs the arrival time.
#[map(name = "POLICER")]
static POLICER: Array<Policer> = Array::with_max_entries(IFACE_STATS_ENTRIES, 0);

/// Frames and bytes the policer dropped, by direction.
#[map(name = "POLICED")]
static POLICED: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(IFACE_STATS_ENTRIES, 0);

/// The policer (see [`Policer`]): the verdict on the theoretical arrival time as read, which
/// moves on by an atomic add — the only read-modify-write the BPF target offers at its
/// baseline instruction set. Two CPUs passing frames at the same moment both add their cost, so
/// under load (the arrival time ahead of now) every byte is accounted exactly; only an idle
/// bucket's restart (a plain store of now) can lose one concurrent frame's cost.
#[inline]
fn police(ctx: &TcContext, direction: u32) -> i32 {
    let Some(policer) = POLICER.get_ptr_mut(direction) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: the pointer is to the map's value, valid for the program's run. The driver writes
    // the settings once, when it enforces the share; a frame racing that write may see a mix of
    // old and new fields, which decides only that frame.
    let settings = unsafe { *policer };
    if settings.rate == 0 {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let len = u64::from(ctx.len());
    let tat = settings.tat_ns;
    let cost = settings.cost_ns(len);
    if settings.admit(tat, now, cost).is_none() {
        if let Some(dropped) = POLICED.get_ptr_mut(direction) {
            // SAFETY: this CPU's slot of a per-CPU array entry; nothing else writes it meanwhile.
            unsafe {
                (*dropped).packets += 1;
                (*dropped).bytes += len;
            }
        }
        return TC_ACT_SHOT;
    }
    // SAFETY: a field address within the map value (valid, see above); nothing is read here.
    let tat_ptr = unsafe { &raw mut (*policer).tat_ns };
    // SAFETY: `tat_ptr` points into the map value (above); volatile so the idle restart's store
    // is not merged with the add, which is atomic across CPUs.
    unsafe {
        if tat < now {
            core::ptr::write_volatile(tat_ptr, now);
        }
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            tat_ptr, cost,
        );
    }
    TC_ACT_UNSPEC
}

/// Does nothing: the baseline against which the cost of the counting programs is measured (the
/// kernel's run-time statistics charge their own timing to every program).
#[classifier]
fn knd_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Inlined into each program: a call to a BPF subprogram costs a frame of its own per packet.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "every instruction runs once per frame; a BPF-to-BPF call is not free"
)]
fn count(ctx: &TcContext, direction: u32) {
    let Some(stats) = IFACE_STATS.get_ptr_mut(direction) else {
        return;
    };
    let len = ctx.len();
    let (class, opcode_class) = classify(ctx);
    // The compiler knows the bucket is in range and drops the check; the verifier does not
    // follow its reasoning through the bit counting, so the check is forced.
    let bucket = size_bucket(len) as usize;
    // SAFETY: reads a local; volatile only so the compiler keeps the range check below.
    let bucket = unsafe { core::ptr::read_volatile(&raw const bucket) };
    // SAFETY: the pointer is this CPU's slot of a per-CPU array entry; nothing else writes it
    // while this program runs on this CPU (programs do not migrate mid-run). Indexes are
    // checked (the class is one of four constants, the opcode class a 3-bit value).
    unsafe {
        if let Some(counters) = (*stats).classes.get_mut(class as usize) {
            counters.packets += 1;
            counters.bytes += u64::from(len);
        }
        if let Some(opcode_class) = opcode_class
            && let Some(counters) = (*stats).roce.get_mut(opcode_class as usize)
        {
            counters.packets += 1;
            counters.bytes += u64::from(len);
        }
        if bucket < SIZE_BUCKETS as usize {
            (*stats).sizes[bucket] += 1;
        }
    }
}

/// A byte of the frame at `offset`, if the linear data reaches that far.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "packet bounds proven in one function: the verifier follows them without BPF calls"
)]
fn byte(ctx: &TcContext, offset: usize) -> Option<u8> {
    let start = ctx.data();
    if start + offset + 1 > ctx.data_end() {
        return None;
    }
    // SAFETY: the byte lies within [data, data_end), checked just above.
    Some(unsafe { *((start + offset) as *const u8) })
}

#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "packet bounds proven in one function: the verifier follows them without BPF calls"
)]
fn be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    Some(u16::from(byte(ctx, offset)?) << 8 | u16::from(byte(ctx, offset + 1)?))
}

/// The frame's class and, for RoCEv2, its BTH opcode class. Reads only the linear headers
/// (the stack always builds them linear); frames too short to tell are `OTHER`.
#[inline(always)]
fn classify(ctx: &TcContext) -> (u32, Option<u32>) {
    const ETH_HLEN: usize = 14;
    let Some(mut ethertype) = be16(ctx, 12) else {
        return (class::OTHER, None);
    };
    let mut l3 = ETH_HLEN;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        let Some(inner) = be16(ctx, l3 + 2) else {
            return (class::OTHER, None);
        };
        ethertype = inner;
        l3 += 4;
    }
    let (protocol, l4) = match ethertype {
        0x0800 => {
            let (Some(version_ihl), Some(protocol)) = (byte(ctx, l3), byte(ctx, l3 + 9)) else {
                return (class::OTHER, None);
            };
            (protocol, l3 + usize::from(version_ihl & 0x0f) * 4)
        }
        0x86dd => {
            let Some(next) = byte(ctx, l3 + 6) else {
                return (class::OTHER, None);
            };
            (next, l3 + 40)
        }
        _ => return (class::OTHER, None),
    };
    match protocol {
        6 => (class::TCP, None),
        17 => {
            if be16(ctx, l4 + 2) == Some(ROCEV2_PORT) {
                // The BTH follows the 8-byte UDP header; its first byte is the opcode.
                (class::ROCE, byte(ctx, l4 + 8).map(|op| u32::from(op >> 5)))
            } else {
                (class::UDP, None)
            }
        }
        _ => (class::OTHER, None),
    }
}

/// sock_ops on a cgroup v2 directory: for sockets in a namespace the driver measures, asks the
/// kernel for RTT and retransmission callbacks once the connection is established, then
/// records each smoothed-RTT sample and each retransmission.
#[sock_ops]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[sock_ops] entry point receives its context by value"
)]
fn knd_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // Every TCP socket of the node calls in, for every callback it has: the others leave at
    // once, before any helper or lookup.
    if !matches!(
        op,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
            | BPF_SOCK_OPS_RTT_CB
            | BPF_SOCK_OPS_RETRANS_CB
    ) {
        return 1;
    }
    // SAFETY: the helper only reads the context the kernel passed in.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if matches!(
        op,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    ) {
        pace(&ctx, cookie);
    }
    let Some(stats) = NETNS_RTT.get_ptr_mut(cookie) else {
        return 1;
    };
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG;
            let _ignored = ctx.set_cb_flags(flags.cast_signed());
        }
        BPF_SOCK_OPS_RTT_CB => {
            // SAFETY: `ops` is the kernel's context for this call; srtt_us is readable in every
            // sock_ops callback and holds the smoothed RTT in 1/8 µs.
            let srtt_us = unsafe { (*ctx.ops).srtt_us } >> 3;
            // The compiler knows the bucket is in range and drops the check; the verifier does
            // not follow its reasoning through the bit counting, so the check is forced.
            let bucket = rtt_bucket(srtt_us);
            // SAFETY: reads a local; volatile only so the compiler keeps the range check below.
            let bucket = unsafe { core::ptr::read_volatile(&raw const bucket) };
            // SAFETY: this CPU's own slot of a per-CPU hash entry (see `add`).
            unsafe {
                if bucket < RTT_BUCKETS {
                    (*stats).buckets[bucket] += 1;
                }
                (*stats).samples += 1;
                (*stats).sum_us += u64::from(srtt_us);
            }
        }
        BPF_SOCK_OPS_RETRANS_CB => {
            // The second argument is the number of segments retransmitted.
            // SAFETY: as above.
            unsafe { (*stats).retransmits += u64::from(ctx.arg(1)) };
        }
        _ => {}
    }
    1
}

/// A connection from a share's address gets the share's rate as its most pacing rate
/// (`SO_MAX_PACING_RATE`): the kernel's TCP paces it (internal pacing, no `fq` needed), so a
/// well-behaved flow stays within the share without meeting the policer's drops.
#[inline]
fn pace(ctx: &SockOpsContext, cookie: u64) {
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const SOL_SOCKET: i32 = 1;
    const SO_MAX_PACING_RATE: i32 = 47;
    let mut key = PacingKey {
        netns_cookie: cookie,
        addr: [0; 16],
    };
    match ctx.family() {
        AF_INET => {
            key.addr[10] = 0xff;
            key.addr[11] = 0xff;
            let v4 = ctx.local_ip4().to_ne_bytes();
            key.addr[12] = v4[0];
            key.addr[13] = v4[1];
            key.addr[14] = v4[2];
            key.addr[15] = v4[3];
        }
        AF_INET6 => {
            let v6 = ctx.local_ip6();
            let mut i = 0;
            while i < 4 {
                let word = v6[i].to_ne_bytes();
                key.addr[i * 4] = word[0];
                key.addr[i * 4 + 1] = word[1];
                key.addr[i * 4 + 2] = word[2];
                key.addr[i * 4 + 3] = word[3];
                i += 1;
            }
        }
        _ => return,
    }
    // SAFETY: a lookup in a hash map this program owns; the value is copied out at once.
    let Some(rate) = (unsafe { PACING.get(key) }).copied() else {
        return;
    };
    // The BPF setsockopt takes an int here (the kernel refuses other sizes), so rates are
    // capped just below 2^32 bytes per second (34 Gbit/s; all ones would mean unlimited).
    let mut rate: u32 = u32::try_from(rate).map_or(u32::MAX - 1, |r| r.min(u32::MAX - 1));
    // SAFETY: `ops` is the kernel's context for this call; the option value is a local of
    // the size given.
    let _ignored = unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_MAX_PACING_RATE,
            (&raw mut rate).cast(),
            4,
        )
    };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier proves the programs cannot reach a panic; this only satisfies `no_std`.
    loop {}
}

/// The kernel only offers GPL-only helpers (e.g. perf output for aya-log) to GPL-compatible
/// programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
