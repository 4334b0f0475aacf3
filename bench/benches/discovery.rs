//! Discovery: a full scan (PCI, interfaces, RDMA, uplinks, topology, attributes) of the largest
//! fixture — 8 GPUs, 8 NICs with 8 VFs each (the 64 VFs published) — and of the live host. Goal: under 20 ms for the fixture.

use std::time::Duration;

use knd::{
    discover::inventory::{self, discover},
    publish::resources,
};
use knd_bench::{measure, report};
use knd_testkit::machines;

fn main() -> anyhow::Result<()> {
    let tree = machines::gpu_8x8_with_vfs(8);
    let host = tree.host();
    let fixture = measure(
        "scan + slices, 8 GPU / 8 NIC / 64 VF fixture",
        20,
        300,
        Some(Duration::from_millis(20)),
        || {
            let inventory = inventory::scan(&host, None);
            assert_eq!(
                inventory.nics.len(),
                64,
                "the VFs (PFs with VFs are not handed out)"
            );
            let slices = resources::slices(&inventory, resources::DRIVER_NAME, "bench", 1, None);
            std::hint::black_box(slices);
        },
    )?;
    let live_root = knd::os::host::HostRoot::new("/");
    let live = measure("scan, this host (netlink + /sys)", 5, 100, None, || {
        std::hint::black_box(discover(&live_root));
    })?;
    report("discovery", "Discovery", &[fixture, live])?;
    Ok(())
}
