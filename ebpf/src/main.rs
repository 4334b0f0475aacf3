//! knd's kernel-side programs: TCX classifiers that count every claimed interface's traffic.
//!
//! The programs only observe: they return `TC_ACT_UNSPEC` ("next" under TCX) so that any other
//! program on the interface, and the kernel's own processing, carry on unchanged.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use knd_common::{IFACE_TRAFFIC_ENTRIES, TrafficCounters, direction};

/// This interface's counters, indexed by direction. The driver loads one instance of this object
/// per watched interface, so the map needs no key naming the interface.
#[map(name = "IFACE_TRAFFIC")]
static IFACE_TRAFFIC: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(IFACE_TRAFFIC_ENTRIES, 0);

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

#[inline]
fn count(ctx: &TcContext, direction: u32) {
    if let Some(counters) = IFACE_TRAFFIC.get_ptr_mut(direction) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array entry; nothing else writes it
        // while this program runs on this CPU (programs do not migrate mid-run).
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += u64::from(ctx.len());
        }
    }
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
