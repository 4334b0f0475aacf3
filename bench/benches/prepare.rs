//! NodePrepareResources through the plugin's real unix socket, with 1, 10 and 100 claims per
//! call, each claim new (no idempotent shortcut): config parsing, validation, layering and the
//! fsynced state record included. Latency is per call — kubelet waits for the whole call — and
//! the state directory is on the disk filesystem of the build's target directory (fsync on
//! tmpfs would be free), whose type is printed. Run twice: with the claims in memory (no API
//! round trip — the goal, p99 under 2 ms per claim in the call, applies here) and read through
//! kube-rs from the in-process fake API server over loopback HTTP, with the claim status
//! written back in the background as the daemon does.

use std::{sync::Arc, time::Duration};

use knd::{
    dra::{
        self, Sockets,
        prepare::Preparer,
        proto::dra_v1::{Claim, NodePrepareResourcesRequest, dra_plugin_client::DraPluginClient},
    },
    k8s::ApiClaims,
    model::ports::ClaimApi,
    os::state::StateStore,
};
use knd_bench::{Summary, report, summarize};
use knd_testkit::{
    apiserver::FakeApi,
    claims::{CONFIG_HEAD, MemoryClaims, allocated_claim, node_devices, unix_channel},
    machines,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut summaries = Vec::new();
    let memory = MemoryClaims::default();
    let added = memory.clone();
    summaries.extend(
        suite(
            "claims in memory",
            memory,
            move |claim| added.add(claim),
            Some(Duration::from_millis(2)),
        )
        .await?,
    );
    let fake = Arc::new(FakeApi::start().await?);
    let shutdown = CancellationToken::new();
    let api = ApiClaims::new(fake.client().await?, "knd.dev", shutdown.clone());
    let target = Arc::clone(&fake);
    summaries.extend(
        suite(
            "claims from the fake API",
            api,
            move |claim| target.put_claim(claim),
            None,
        )
        .await?,
    );
    shutdown.cancel();
    report(
        "prepare",
        "Prepare latency (DRA NodePrepareResources)",
        &summaries,
    )?;
    Ok(())
}

async fn suite<C: ClaimApi>(
    label: &str,
    claims: C,
    add: impl Fn(serde_json::Value),
    goal: Option<Duration>,
) -> anyhow::Result<Vec<Summary>> {
    // On disk, where the build is: not /tmp, which may be tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let filesystem = knd_bench::filesystem_of(dir.path());
    let sockets = Sockets::new(
        "knd.dev",
        &dir.path().join("plugin"),
        &dir.path().join("registry"),
    );
    let store = Arc::new(StateStore::open(dir.path().join("state"))?);
    let preparer = Arc::new(Preparer::new(
        "knd.dev",
        node_devices("node-1", &machines::gpu_8x8()),
        store,
        claims,
    ));
    let (_health, health) = watch::channel(Vec::new());
    let shutdown = CancellationToken::new();
    let plugin = dra::serve("knd.dev", sockets.clone(), preparer, health, &shutdown)?;
    let channel = unix_channel(sockets.dra.clone()).await?;
    let mut client = DraPluginClient::new(channel);
    let parameters = format!(
        r#"{{{CONFIG_HEAD},"interface":{{"name":"net1","addresses":["10.0.0.2/24"]}},
            "routes":[{{"destination":"10.1.0.0/16","gateway":"10.0.0.1"}}]}}"#
    );

    let mut summaries = Vec::new();
    let mut next = 0_u64;
    for (batch, calls) in [(1_usize, 300_usize), (10, 60), (100, 30)] {
        let mut per_call = Vec::with_capacity(calls);
        for call in 0..calls + 2 {
            let mut request = NodePrepareResourcesRequest::default();
            for _ in 0..batch {
                next += 1;
                let (name, uid) = (format!("c{next}"), format!("uid-{next}"));
                add(allocated_claim(&name, &uid, &parameters));
                request.claims.push(Claim {
                    namespace: "ml".into(),
                    uid,
                    name,
                });
            }
            let started = std::time::Instant::now();
            let response = client.node_prepare_resources(request).await?.into_inner();
            let elapsed = started.elapsed();
            anyhow::ensure!(
                response.claims.len() == batch
                    && response.claims.values().all(|c| c.error.is_empty()),
                "a claim failed: {response:?}"
            );
            // The first two calls warm up connections and caches.
            if call >= 2 {
                per_call.push(elapsed);
            }
        }
        summaries.push(summarize(
            &format!("prepare, {label}, {batch} claims per call (per call; state on {filesystem})"),
            &per_call,
            goal.map(|g| g * u32::try_from(batch).unwrap_or(1)),
        )?);
    }
    shutdown.cancel();
    plugin.join().await;
    Ok(summaries)
}
