//! knd's kernel-side programs: TCX classifiers that count every claimed interface's traffic by
//! class, frame size and RoCEv2 opcode class, and a sock_ops program that records the TCP
//! round-trip times and retransmissions of the pods' namespaces.
//!
//! The classifiers only observe: they return `TC_ACT_UNSPEC` ("next" under TCX) so that any
//! other program on the interface, and the kernel's own processing, carry on unchanged. Nothing
//! goes to user space per packet: everything lands in per-CPU maps the driver reads.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, TC_ACT_UNSPEC,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::{classifier, map, sock_ops},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{SockOpsContext, TcContext},
};
use knd_common::{
    DirectionStats, IFACE_STATS_ENTRIES, NETNS_RTT_ENTRIES, ROCEV2_PORT, RTT_BUCKETS, RttStats,
    SIZE_BUCKETS, class, direction, rtt_bucket, size_bucket,
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

/// TCX ingress: counts frames the interface received.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry point receives its context by value"
)]
fn knd_traffic_ingress(ctx: TcContext) -> i32 {
    count(&ctx, direction::INGRESS);
    TC_ACT_UNSPEC
}

/// TCX egress: counts frames the interface sent.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry point receives its context by value"
)]
fn knd_traffic_egress(ctx: TcContext) -> i32 {
    count(&ctx, direction::EGRESS);
    TC_ACT_UNSPEC
}

/// Does nothing: the baseline against which the cost of the counting programs is measured (the
/// kernel's run-time statistics charge their own timing to every program).
#[classifier]
fn knd_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline]
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
    // SAFETY: the helper only reads the context the kernel passed in.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(stats) = NETNS_RTT.get_ptr_mut(cookie) else {
        return 1;
    };
    match ctx.op() {
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
