//! Kubelet's side of a DRA plugin, over the real unix sockets: plugin registration (as kubelet's
//! plugin watcher does it) and NodePrepareResources.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::claims::unix_channel;
use knd::dra::proto::{dra_v1, registration as reg};

/// Dials the registration socket until it answers (a killed daemon leaves a stale one behind),
/// reads the plugin's info and accepts the registration. Gives up after `patience`.
pub async fn register(socket: &Path, patience: Duration) -> anyhow::Result<reg::PluginInfo> {
    let deadline = Instant::now() + patience;
    loop {
        let attempt = async {
            let channel = unix_channel(socket.to_path_buf()).await?;
            let mut client = reg::registration_client::RegistrationClient::new(channel);
            let info = client.get_info(reg::InfoRequest {}).await?.into_inner();
            client
                .notify_registration_status(reg::RegistrationStatus {
                    plugin_registered: true,
                    error: String::new(),
                })
                .await?;
            anyhow::Ok(info)
        };
        match attempt.await {
            Ok(info) => return Ok(info),
            Err(err) if Instant::now() >= deadline => {
                return Err(err).with_context(|| {
                    format!("registration at {} never succeeded", socket.display())
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One NodePrepareResources call on the plugin's socket.
pub async fn prepare(
    socket: &Path,
    claims: Vec<dra_v1::Claim>,
) -> anyhow::Result<dra_v1::NodePrepareResourcesResponse> {
    let channel = unix_channel(socket.to_path_buf()).await?;
    let response = dra_v1::dra_plugin_client::DraPluginClient::new(channel)
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest { claims })
        .await?;
    let response = response.into_inner();
    if let Some((uid, claim)) = response.claims.iter().find(|(_, c)| !c.error.is_empty()) {
        bail!("claim {uid}: {}", claim.error);
    }
    Ok(response)
}

/// One NodeUnprepareResources call on the plugin's socket.
pub async fn unprepare(socket: &Path, claims: Vec<dra_v1::Claim>) -> anyhow::Result<()> {
    let channel = unix_channel(socket.to_path_buf()).await?;
    let response = dra_v1::dra_plugin_client::DraPluginClient::new(channel)
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest { claims })
        .await?
        .into_inner();
    if let Some((uid, claim)) = response.claims.iter().find(|(_, c)| !c.error.is_empty()) {
        bail!("claim {uid}: {}", claim.error);
    }
    Ok(())
}
