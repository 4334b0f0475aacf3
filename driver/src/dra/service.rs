//! The gRPC services kubelet calls, mapped onto the domain types. Domain errors become gRPC
//! statuses here and nowhere else.

use std::{sync::Arc, time::SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, transport::Server};

use super::{
    prepare::{InternalError, Preparer},
    proto::{dra_v1, dra_v1beta1, health_v1, health_v1alpha1 as health, registration as reg},
};
use crate::model::ports::{ClaimApi, ClaimRef, DeviceHealth};

/// The service names kubelet accepts in `PluginInfo.supported_versions`.
pub const SUPPORTED_VERSIONS: [&str; 4] = [
    "v1.DRAPlugin",
    "v1beta1.DRAPlugin",
    "v1alpha1.DRAResourceHealth",
    "v1.DRAResourceHealth",
];

/// What kubelet said about our registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Kubelet has not answered yet.
    Pending,
    /// Kubelet accepted the plugin.
    Registered,
    /// Kubelet refused it, with its reason.
    Refused(String),
}

/// The one place where internal failures become gRPC statuses: kubelet retries on any error.
fn status(error: &InternalError) -> Status {
    match error {
        InternalError::Source { .. } => Status::unavailable(crate::model::error_chain(error)),
        InternalError::State(_) | InternalError::Task(_) => {
            Status::internal(crate::model::error_chain(error))
        }
    }
}

struct RegistrationService {
    driver: String,
    endpoint: String,
    state: watch::Sender<Registration>,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: "DRAPlugin".into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let state = if status.plugin_registered {
            tracing::info!("kubelet registered the plugin");
            Registration::Registered
        } else {
            // Kubelet retries registration by itself while the socket exists.
            tracing::error!(error = %status.error, "kubelet refused the plugin registration");
            Registration::Refused(status.error)
        };
        self.state.send_replace(state);
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

/// The registration server.
pub(super) fn registration_router(
    driver: &str,
    endpoint: &str,
    state: watch::Sender<Registration>,
) -> tonic::transport::server::Router {
    Server::builder().add_service(reg::registration_server::RegistrationServer::new(
        RegistrationService {
            driver: driver.to_owned(),
            endpoint: endpoint.to_owned(),
            state,
        },
    ))
}

struct DraService<S> {
    preparer: Arc<Preparer<S>>,
}

/// Implements one version of the DRAPlugin service; the versions differ only in their package
/// (and v1's optional `share_id`, which knd does not use).
macro_rules! dra_plugin_version {
    ($api:ident, $($share:ident)?) => {
        impl From<$api::Claim> for ClaimRef {
            fn from(claim: $api::Claim) -> Self {
                Self { namespace: claim.namespace, uid: claim.uid, name: claim.name }
            }
        }

        #[tonic::async_trait]
        impl<S: ClaimApi> $api::dra_plugin_server::DraPlugin for DraService<S> {
            async fn node_prepare_resources(
                &self,
                request: Request<$api::NodePrepareResourcesRequest>,
            ) -> Result<Response<$api::NodePrepareResourcesResponse>, Status> {
                let claims = claim_refs(request.into_inner().claims);
                let outcomes = self.preparer.prepare(&claims).await.map_err(|e| status(&e))?;
                let claims = outcomes
                    .into_iter()
                    .map(|(uid, outcome)| {
                        let response = match outcome {
                            Ok(devices) => $api::NodePrepareResourceResponse {
                                devices: devices
                                    .into_iter()
                                    .map(|d| $api::Device {
                                        request_names: d.requests,
                                        pool_name: d.pool,
                                        device_name: d.device,
                                        cdi_device_ids: Vec::new(),
                                        $($share: None,)?
                                    })
                                    .collect(),
                                error: String::new(),
                            },
                            Err(error) => $api::NodePrepareResourceResponse {
                                devices: Vec::new(),
                                error,
                            },
                        };
                        (uid, response)
                    })
                    .collect();
                Ok(Response::new($api::NodePrepareResourcesResponse { claims }))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$api::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$api::NodeUnprepareResourcesResponse>, Status> {
                let claims = claim_refs(request.into_inner().claims);
                let outcomes = self.preparer.unprepare(&claims).await.map_err(|e| status(&e))?;
                let claims = outcomes
                    .into_iter()
                    .map(|(uid, outcome)| {
                        let error = outcome.err().unwrap_or_default();
                        (uid, $api::NodeUnprepareResourceResponse { error })
                    })
                    .collect();
                Ok(Response::new($api::NodeUnprepareResourcesResponse { claims }))
            }
        }
    };
}

dra_plugin_version!(dra_v1, share_id);
dra_plugin_version!(dra_v1beta1,);

fn claim_refs<C: Into<ClaimRef>>(claims: Vec<C>) -> Vec<ClaimRef> {
    claims.into_iter().map(Into::into).collect()
}

struct HealthService {
    health: watch::Receiver<Vec<DeviceHealth>>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn health_v1alpha1(devices: &[DeviceHealth]) -> health::NodeWatchResourcesResponse {
    let now = unix_now();
    health::NodeWatchResourcesResponse {
        devices: devices
            .iter()
            .map(|d| health::DeviceHealth {
                device: Some(health::DeviceIdentifier {
                    pool_name: d.pool.clone(),
                    device_name: d.device.clone(),
                }),
                health: if d.healthy {
                    health::HealthStatus::Healthy
                } else {
                    health::HealthStatus::Unhealthy
                }
                .into(),
                last_updated_time: now,
                health_check_timeout_seconds: 0,
            })
            .collect(),
    }
}

fn health_v1(devices: &[DeviceHealth]) -> health_v1::NodeWatchResourcesResponse {
    let now = unix_now();
    health_v1::NodeWatchResourcesResponse {
        devices: devices
            .iter()
            .map(|d| health_v1::DeviceHealth {
                device: Some(health_v1::DeviceIdentifier {
                    pool_name: d.pool.clone(),
                    device_name: d.device.clone(),
                }),
                health: if d.healthy {
                    health_v1::HealthStatus::Healthy
                } else {
                    health_v1::HealthStatus::Unhealthy
                }
                .into(),
                last_updated_time: now,
                health_check_timeout_seconds: 0,
                message: d.reason.clone(),
            })
            .collect(),
    }
}

/// The full device list now and after every change, until kubelet goes away.
fn health_stream<M: Send + 'static>(
    mut health: watch::Receiver<Vec<DeviceHealth>>,
    message: fn(&[DeviceHealth]) -> M,
) -> ReceiverStream<Result<M, Status>> {
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let next = message(&health.borrow_and_update());
            if sender.send(Ok(next)).await.is_err() {
                return; // kubelet went away
            }
            if health.changed().await.is_err() {
                // No more updates (shutting down): hold the stream open until kubelet
                // closes it, rather than ending it and making kubelet retry in a loop.
                sender.closed().await;
                return;
            }
        }
    });
    ReceiverStream::new(receiver)
}

#[tonic::async_trait]
impl health::dra_resource_health_server::DraResourceHealth for HealthService {
    type NodeWatchResourcesStream =
        ReceiverStream<Result<health::NodeWatchResourcesResponse, Status>>;

    async fn node_watch_resources(
        &self,
        _request: Request<health::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        Ok(Response::new(health_stream(
            self.health.clone(),
            health_v1alpha1,
        )))
    }
}

#[tonic::async_trait]
impl health_v1::dra_resource_health_server::DraResourceHealth for HealthService {
    type NodeWatchResourcesStream =
        ReceiverStream<Result<health_v1::NodeWatchResourcesResponse, Status>>;

    async fn node_watch_resources(
        &self,
        _request: Request<health_v1::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        Ok(Response::new(health_stream(self.health.clone(), health_v1)))
    }
}

/// The DRA server: both DRAPlugin versions and the health stream on one socket.
pub(super) fn dra_router<S: ClaimApi>(
    preparer: Arc<Preparer<S>>,
    health: watch::Receiver<Vec<DeviceHealth>>,
) -> tonic::transport::server::Router {
    Server::builder()
        .add_service(dra_v1::dra_plugin_server::DraPluginServer::new(
            DraService {
                preparer: Arc::clone(&preparer),
            },
        ))
        .add_service(dra_v1beta1::dra_plugin_server::DraPluginServer::new(
            DraService { preparer },
        ))
        .add_service(
            health::dra_resource_health_server::DraResourceHealthServer::new(HealthService {
                health: health.clone(),
            }),
        )
        .add_service(
            health_v1::dra_resource_health_server::DraResourceHealthServer::new(HealthService {
                health,
            }),
        )
}
