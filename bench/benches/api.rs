//! knd's use of the Kubernetes API as the cluster grows: the in-process fake API server holds a
//! simulated cluster of 10, 100 and 1,000 GPU nodes (each with knd's slice of 8 NICs and a GPU
//! driver's slice of 8 GPUs), and knd on one node prepares claims with a GPU of that node (the
//! alignment check looks the GPU up) and sits idle. Counted at the server: requests and response
//! bytes per prepared claim (the claim read, the status write and Event behind it; the GPU is
//! looked up among this node's slices, which a watch keeps), per idle minute (the pool's
//! once-a-minute re-check; nothing else reads the API when idle) and for starting the watch.
//! Paired in the same run with the lookup knd did before (every slice of the GPU driver in the
//! cluster). Goal, judged here: per-claim, idle and watch-start traffic constant in cluster size
//! (at 1,000 nodes within 5 % of 10 nodes).

use std::sync::Arc;

use k8s_openapi::api::resource::v1::ResourceSlice;
use knd::{
    discover::inventory,
    dra::{
        alignment::{Alignment, Policy},
        prepare::Preparer,
    },
    k8s::{ApiClaims, Publisher},
    model::ports::ClaimRef,
    observe::metrics::Telemetry,
    os::state::StateStore,
    publish::resources,
};
use knd_bench::doc::{Document, Table};
use knd_testkit::{
    apiserver::FakeApi,
    claims::{CONFIG_HEAD, allocated_claim, node_devices},
    machines,
};
use tokio_util::sync::CancellationToken;

const CLAIMS: usize = 20;
const NODE: &str = "node-1";
const GPU_DRIVER: &str = "gpu.nvidia.com";

/// Traffic counted at the server.
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    requests: usize,
    bytes: usize,
}

impl Traffic {
    fn of(fake: &FakeApi, from: usize) -> (Self, usize) {
        let requests = fake.requests();
        let traffic = Self {
            requests: requests.len() - from,
            bytes: requests[from..].iter().map(|r| r.response_bytes).sum(),
        };
        (traffic, requests.len())
    }

    #[expect(clippy::cast_precision_loss, reason = "per-claim averages")]
    fn per(self, count: usize) -> (f64, f64) {
        (
            self.requests as f64 / count as f64,
            self.bytes as f64 / count as f64,
        )
    }
}

/// The GPU driver's slice of `node`: 8 GPUs at gpu_8x8's addresses.
fn gpu_slice(node: &str) -> anyhow::Result<ResourceSlice> {
    let devices: Vec<serde_json::Value> = (0..8_u32)
        .map(|i| {
            serde_json::json!({
                "name": format!("gpu-{i}"),
                "attributes": {
                    "resource.kubernetes.io/pciBusID": {"string": format!("0000:{:02x}:00.0", 0x13 + 0x20 * i)},
                    "productName": {"string": "NVIDIA H100 80GB HBM3"}
                }
            })
        })
        .collect();
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": format!("{node}-gpu")},
        "spec": {"driver": GPU_DRIVER, "nodeName": node,
                 "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                 "devices": devices}
    }))?)
}

/// A fake API server holding `nodes` GPU nodes (ours among them).
async fn cluster(nodes: usize) -> anyhow::Result<FakeApi> {
    let fake = FakeApi::start().await?;
    fake.add_node(NODE);
    let inventory = inventory::discover(&machines::gpu_8x8().host());
    let mut slices = Vec::new();
    for i in 1..=nodes {
        let node = format!("node-{i}");
        slices.push(gpu_slice(&node)?);
        if node != NODE {
            slices.extend(resources::slices(&inventory, "knd.dev", &node, 1, None));
        }
    }
    fake.create_slices(&slices)?;
    Ok(fake)
}

/// Prepares `CLAIMS` claims on node-1 with knd looking GPUs up node-scoped (`on_node`: among
/// this node's slices, which a watch keeps) or cluster-wide (as before); the traffic per claim,
/// status writes and Events included, and the traffic of starting the watch (its list and the
/// watch's first response).
async fn per_claim(fake: &FakeApi, node_scoped: bool) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let shutdown = CancellationToken::new();
    let mut claims = ApiClaims::new(fake.client().await?, "knd.dev", shutdown.clone());
    let (_, before_watch) = Traffic::of(fake, 0);
    if node_scoped {
        claims = claims.on_node(NODE);
        claims.node_slices_listed().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fake.requests()[before_watch..]
            .iter()
            .any(|r| r.path.contains("watch=true"))
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the watch never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    let (watch_start, _) = Traffic::of(fake, before_watch);
    let dir = tempfile::tempdir()?;
    let store = Arc::new(StateStore::open(dir.path())?);
    let node = node_devices(NODE, &machines::gpu_8x8());
    let telemetry = Telemetry::new(None, 10);
    let preparer =
        Preparer::new("knd.dev", node.clone(), store, claims.clone()).with_alignment(Alignment {
            policy: Policy::Warn,
            inventory: node.inventory.clone(),
            distances: telemetry.gpu_nic_distance.clone(),
        });
    let parameters = format!(r#"{{{CONFIG_HEAD},"interface":{{"name":"net1"}}}}"#);
    let tag = if node_scoped { "n" } else { "c" };
    for i in 0..CLAIMS {
        let (name, uid) = (format!("{tag}{i}"), format!("uid-{tag}{i}"));
        fake.put_claim(allocated_claim(&name, &uid, &parameters));
    }
    let (_, start) = Traffic::of(fake, 0);
    for i in 0..CLAIMS {
        let reference = ClaimRef {
            namespace: "ml".into(),
            uid: format!("uid-{tag}{i}"),
            name: format!("{tag}{i}"),
        };
        let answers = preparer.prepare(&[reference]).await?;
        let devices = answers
            .values()
            .next()
            .and_then(|a| a.as_ref().ok())
            .ok_or_else(|| anyhow::anyhow!("claim {i} was refused: {answers:?}"))?;
        anyhow::ensure!(
            devices[0]
                .topology
                .as_ref()
                .is_some_and(|f| !f.gpu.is_empty()),
            "the GPU was not found: {devices:?}"
        );
    }
    claims.flushed().await;
    let (traffic, _) = Traffic::of(fake, start);
    shutdown.cancel();
    claims.drained().await;
    Ok((traffic.per(CLAIMS), watch_start.per(1)))
}

/// One idle minute: the publisher's re-check of the pool (its first publication not counted).
async fn idle_minute(fake: &FakeApi) -> anyhow::Result<(f64, f64)> {
    let inventory = inventory::discover(&machines::gpu_8x8().host());
    let mut publisher = Publisher::new(fake.client().await?, "knd.dev", NODE);
    publisher.publish(&inventory).await?;
    let (_, start) = Traffic::of(fake, 0);
    let again = publisher.publish(&inventory).await?;
    anyhow::ensure!(
        again.created + again.updated + again.deleted == 0,
        "{again:?}"
    );
    let (traffic, _) = Traffic::of(fake, start);
    Ok(traffic.per(1))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut table = Table::new(
        "API traffic by cluster size (counted at the API server)",
        &[
            "nodes",
            "requests / claim",
            "KiB / claim",
            "KiB / claim, cluster-wide lookup (before)",
            "requests / idle minute",
            "KiB / idle minute",
            "starting the watch: requests",
            "starting the watch: KiB",
        ],
    );
    let mut rows = Vec::new();
    for nodes in [10_usize, 100, 1_000] {
        let fake = cluster(nodes).await?;
        let (scoped, watch) = per_claim(&fake, true).await?;
        let (wide, _) = per_claim(&fake, false).await?;
        let idle = idle_minute(&fake).await?;
        table.row(vec![
            nodes.to_string(),
            format!("{:.1}", scoped.0),
            format!("{:.1}", scoped.1 / 1024.0),
            format!("{:.1}", wide.1 / 1024.0),
            format!("{:.0}", idle.0),
            format!("{:.1}", idle.1 / 1024.0),
            format!("{:.0}", watch.0),
            format!("{:.1}", watch.1 / 1024.0),
        ]);
        rows.push((nodes, scoped, wide, idle, watch));
    }
    let (small, large) = (&rows[0], &rows[rows.len() - 1]);
    let constant = |a: (f64, f64), b: (f64, f64)| (b.0 - a.0).abs() < 1e-9 && b.1 <= a.1 * 1.05;
    let met =
        constant(small.1, large.1) && constant(small.3, large.3) && constant(small.4, large.4);
    knd_bench::print_table(&table);
    let verdict = format!(
        "Goal (per-claim, idle and watch-start traffic at {} nodes within 5 % of {} nodes, same \
         request count): {}. The cluster-wide lookup grew {:.0}× in bytes per claim over the same range.",
        large.0,
        small.0,
        if met { "met" } else { "NOT met" },
        large.2.1 / small.2.1
    );
    println!("{verdict}");
    let mut document = Document::new("api", "Kubernetes API use by cluster size");
    document.notes.push(
        "Method: the in-process API server (tests' fake, which validates like the real one) \
         holds the simulated cluster; each node has knd's slice of 8 NICs and a GPU driver's \
         slice of 8 GPUs. knd on node-1 prepares 20 claims one by one, each with a GPU of \
         node-1 (alignment policy warn: the GPU's pciBusID is looked up), and its status write \
         and Event are waited for. The GPU is looked up among node-1's ResourceSlices, which a \
         watch keeps (started before the count: its list and first events are shown apart). \
         Requests and JSON response bytes (a watch's streamed events included) are counted at \
         the server. An idle minute is the pool's once-a-minute re-check; the watch adds only \
         changes to node-1's slices and its renewal (kube's watcher: every 290 s)."
            .to_owned(),
    );
    document.notes.push(verdict);
    document.tables.push(table);
    document.data = serde_json::json!(
        rows.iter()
            .map(|(nodes, scoped, wide, idle, watch)| serde_json::json!({
                "nodes": nodes,
                "requests_per_claim": scoped.0, "bytes_per_claim": scoped.1,
                "cluster_wide_bytes_per_claim": wide.1,
                "requests_per_idle_minute": idle.0, "bytes_per_idle_minute": idle.1,
                "watch_start_requests": watch.0, "watch_start_bytes": watch.1,
            }))
            .collect::<Vec<_>>()
    );
    document.write(&knd_bench::results_dir())?;
    anyhow::ensure!(met, "API traffic grows with the cluster");
    Ok(())
}
