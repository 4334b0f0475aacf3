//! An in-process Kubernetes API server for tests and benchmarks, reached over HTTP through a
//! kubeconfig exactly as the daemon reaches a real one.
//!
//! It serves the few resources knd uses — Nodes (read), ResourceSlices (list, get, create,
//! update, delete) and ResourceClaims (read, and server-side apply on the status subresource) —
//! and enforces the rules the real API server enforces on them: `resource.k8s.io/v1` validation
//! (slice and attribute limits, names, value types, immutable fields), resourceVersion
//! conflicts, UID preconditions, bearer-token authentication, status written only through the
//! status subresource, and server-side apply ownership of `status.devices` entries. Anything it
//! does not implement is answered with an error, never accepted silently.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex, MutexGuard},
};

use anyhow::Context as _;
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::{
    api::{
        core::v1::Node,
        resource::v1::{AllocatedDeviceStatus, ResourceClaim, ResourceSlice},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time},
};
use regex::Regex;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

mod authz;
mod capacity;

pub use authz::{ADMIN_TOKEN, NODE, Release, TOKEN};
use authz::{Attributes, Caller};

const RESOURCE_GROUP: &str = "resource.k8s.io/v1";

/// A running fake API server; stops when dropped.
#[derive(Debug)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    /// With TLS (as a real API server, for in-cluster clients): its CA certificate (PEM).
    ca: Option<String>,
}

/// A CA and a server certificate for `127.0.0.1` and `localhost` signed by it: the CA's PEM
/// and the server's TLS configuration.
fn tls_config() -> anyhow::Result<(String, tokio_rustls::rustls::ServerConfig)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "knd test cluster CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&key, &ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok((ca.pem(), config))
}

/// A recorded request: method and path (with the query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Bytes of the response body (JSON).
    pub response_bytes: usize,
}

/// The `(driver, pool, device, shareID)` key of a `status.devices` entry.
type DeviceKey = (String, String, String, Option<String>);

#[derive(Debug, Default)]
struct Store {
    revision: u64,
    uids: u64,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<(String, String), k8s_openapi::api::core::v1::Pod>,
    slices: BTreeMap<String, ResourceSlice>,
    claims: BTreeMap<(String, String), ResourceClaim>,
    /// `events.k8s.io/v1` Events created, in order.
    events: Vec<k8s_openapi::api::events::v1::Event>,
    /// Server-side apply: which field manager owns which `status.devices` entry, per claim.
    device_owners: BTreeMap<(String, String), BTreeMap<DeviceKey, String>>,
    /// Status codes the next requests fail with (fault injection).
    faults: VecDeque<u16>,
    /// The release whose authorisation rules apply.
    release: Release,
    requests: Vec<Request>,
    /// Every change to a ResourceSlice, in order, for watches: (revision, event type, the
    /// object as it was then).
    slice_changes: Vec<(u64, &'static str, ResourceSlice)>,
    /// Woken at every change to a ResourceSlice.
    slices_changed: Arc<tokio::sync::Notify>,
    /// Cancelled when the server stops (ends the watches).
    stopping: CancellationToken,
}

impl Store {
    /// Records a change to a ResourceSlice (at its revision) for watches, and wakes them.
    fn slice_changed(&mut self, kind: &'static str, slice: &ResourceSlice) {
        self.slice_changes
            .push((self.revision, kind, slice.clone()));
        self.slices_changed.notify_waiters();
    }

    fn next_revision(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        format!("6b6e6400-0000-4000-8000-{:012x}", self.uids)
    }

    /// A name for `metadata.generateName` `prefix`.
    fn generated_name(&self, prefix: &str) -> String {
        format!("{prefix}{:05x}", self.uids % 0xfffff)
    }
}

impl FakeApi {
    /// Starts the server on a free loopback port in the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener.into_std()?)
    }

    /// Starts the server on `listener` (bound by the caller, e.g. inside another network
    /// namespace: a socket stays in the namespace it was created in) in the current runtime.
    pub fn start_on(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let store = Arc::new(Mutex::new(Store {
            stopping: shutdown.clone(),
            ..Store::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&store));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "fake API server stopped");
            }
        });
        Ok(Self {
            store,
            addr,
            shutdown,
            ca: None,
        })
    }

    /// Starts the server on `listener` serving HTTPS, as a real API server does, with a
    /// certificate for `127.0.0.1` from a CA of its own ([`Self::ca_pem`]): what an in-cluster
    /// client (service account token, `ca.crt`, `KUBERNETES_SERVICE_HOST`) needs.
    pub fn start_tls_on(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        let (ca, config) = tls_config()?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let store = Arc::new(Mutex::new(Store {
            stopping: shutdown.clone(),
            ..Store::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&store));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _closed = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            store,
            addr,
            shutdown,
            ca: Some(ca),
        })
    }

    /// The CA certificate (PEM) of a server started with [`Self::start_tls_on`].
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_deref()
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What kubelet gives a pod of knd's service account on node [`NODE`]: the projected
    /// `token`, `ca.crt` and `namespace` files (written into `dir`, to be mounted at
    /// `/var/run/secrets/kubernetes.io/serviceaccount`) and the `KUBERNETES_SERVICE_HOST`/`_PORT`
    /// environment. Needs a server started with [`Self::start_tls_on`].
    pub fn write_service_account(&self, dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
        let ca = self
            .ca
            .as_deref()
            .context("an in-cluster client needs the API server's TLS: use start_tls_on")?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), TOKEN)?;
        std::fs::write(dir.join("ca.crt"), ca)?;
        std::fs::write(dir.join("namespace"), "knd-system")?;
        Ok(vec![
            ("KUBERNETES_SERVICE_HOST".into(), self.addr.ip().to_string()),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                self.addr.port().to_string(),
            ),
        ])
    }

    /// `http://127.0.0.1:<port>` (`https` when started with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir`: knd's service account on node [`NODE`].
    pub fn write_kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        self.write_kubeconfig_on(dir, NODE)
    }

    /// Writes a kubeconfig for this server into `dir`: knd's service account on `node` (its
    /// token carries the node's name, as a projected service account token does).
    pub fn write_kubeconfig_on(&self, dir: &Path, node: &str) -> std::io::Result<PathBuf> {
        let token = if node == NODE {
            TOKEN.to_owned()
        } else {
            format!("{TOKEN}.{node}")
        };
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n{}\
             users:\n- name: knd\n  user:\n    token: {token}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: knd\n",
            self.url(),
            self.ca.as_ref().map_or_else(String::new, |ca| {
                use base64::Engine as _;
                format!(
                    "    certificate-authority-data: {}\n",
                    base64::engine::general_purpose::STANDARD.encode(ca)
                )
            })
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// A kube client for this server, configured through a kubeconfig as the daemon is: knd on
    /// node [`NODE`].
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.client_on(NODE).await
    }

    /// A kube client of knd on `node`.
    pub async fn client_on(&self, node: &str) -> anyhow::Result<kube::Client> {
        let dir = tempfile::tempdir()?;
        let path = self.write_kubeconfig_on(dir.path(), node)?;
        Ok(knd::k8s::client(Some(&path)).await?)
    }

    /// A kube client of a cluster administrator (another driver, the scheduler, an operator).
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        self.client_as(ADMIN_TOKEN).await
    }

    async fn client_as(&self, token: &str) -> anyhow::Result<kube::Client> {
        let dir = tempfile::tempdir()?;
        let path = self.write_kubeconfig(dir.path())?;
        let text = std::fs::read_to_string(&path)?.replace(TOKEN, token);
        std::fs::write(&path, text)?;
        Ok(knd::k8s::client(Some(&path)).await?)
    }

    /// Plays the API server of `release` (1.36 unless told).
    pub fn set_release(&self, release: Release) {
        self.lock().release = release;
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("fake API store poisoned")
    }

    /// Adds a Node and returns its UID.
    pub fn add_node(&self, name: &str) -> String {
        let mut store = self.lock();
        let uid = store.next_uid();
        let revision = store.next_revision();
        store.nodes.insert(
            name.to_owned(),
            Node {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    uid: Some(uid.clone()),
                    resource_version: Some(revision),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            },
        );
        uid
    }

    /// Adds (or replaces) a pod given as API JSON.
    pub fn put_pod(&self, pod: Value) {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod).expect("a Pod");
        let key = (
            pod.metadata.namespace.clone().expect("a namespace"),
            pod.metadata.name.clone().expect("a name"),
        );
        self.lock().pods.insert(key, pod);
    }

    /// Stores a claim given as API JSON (metadata.uid required), as the scheduler leaves it.
    /// Panics on an allocation the scheduler could not have made (see [`Self::try_put_claim`]).
    pub fn put_claim(&self, claim: Value) {
        if let Err(problems) = self.try_put_claim(claim) {
            panic!("the claim's allocation is refused: {problems:?}");
        }
    }

    /// Stores a claim given as API JSON, as the scheduler leaves it, unless its allocation
    /// breaks a rule of consumable capacity (a share of a device that allows no sharing, a
    /// `shareID` that is no UUID, more consumed than the device has left): then the problems.
    pub fn try_put_claim(&self, claim: Value) -> Result<(), Vec<String>> {
        let mut claim: ResourceClaim = serde_json::from_value(claim).expect("a ResourceClaim");
        let key = (
            claim.metadata.namespace.clone().expect("a namespace"),
            claim.metadata.name.clone().expect("a name"),
        );
        let mut store = self.lock();
        let problems = {
            let slices: Vec<&ResourceSlice> = store.slices.values().collect();
            let others: Vec<&ResourceClaim> = store
                .claims
                .iter()
                .filter(|(k, _)| **k != key)
                .map(|(_, c)| c)
                .collect();
            capacity::allocation_problems(&claim, &slices, &others)
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        claim.metadata.resource_version = Some(store.next_revision());
        store.device_owners.remove(&key);
        store.claims.insert(key, claim);
        Ok(())
    }

    /// Deletes a claim.
    pub fn delete_claim(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut store = self.lock();
        store.claims.remove(&key);
        store.device_owners.remove(&key);
    }

    /// A stored claim.
    pub fn claim(&self, namespace: &str, name: &str) -> Option<ResourceClaim> {
        self.lock()
            .claims
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every stored ResourceSlice, by name.
    pub fn slices(&self) -> Vec<ResourceSlice> {
        self.lock().slices.values().cloned().collect()
    }

    /// The Events created so far.
    pub fn events(&self) -> Vec<k8s_openapi::api::events::v1::Event> {
        self.lock().events.clone()
    }

    /// Removes a slice behind the driver's back (as an administrator might).
    pub fn remove_slice(&self, name: &str) -> bool {
        let mut store = self.lock();
        let Some(mut removed) = store.slices.remove(name) else {
            return false;
        };
        removed.metadata.resource_version = Some(store.next_revision());
        store.slice_changed("DELETED", &removed);
        true
    }

    /// The next `codes.len()` requests fail with these HTTP status codes.
    pub fn fail_next(&self, codes: &[u16]) {
        self.lock().faults.extend(codes);
    }

    /// Creates `slices` as a client would (validated like any create): seeds a large cluster.
    pub fn create_slices(&self, slices: &[ResourceSlice]) -> anyhow::Result<()> {
        let mut store = self.lock();
        for slice in slices {
            let body = serde_json::to_vec(slice)?;
            if let Err(failure) = create_slice(&mut store, &body) {
                anyhow::bail!("{}", failure.message);
            }
        }
        Ok(())
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Requests that changed something (everything but GET).
    pub fn writes(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method != "GET")
            .count()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A failure as the API server reports it: a `Status` object with the HTTP code.
#[derive(Debug)]
struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(what: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{what} \"{name}\" not found"),
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(kind: &str, name: &str, errors: &[String]) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {}", errors.join(", ")),
        )
    }

    fn conflict(resource: &str, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason,
            "code": self.code.as_u16(),
        });
        (self.code, axum::Json(body)).into_response()
    }
}

type Answer = Result<(StatusCode, Value), Failure>;

async fn handle(
    State(shared): State<Arc<Mutex<Store>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut store = shared.lock().expect("fake API store poisoned");
    store.requests.push(Request {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), ToString::to_string),
        response_bytes: 0,
    });
    let caller = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(Caller::of_token);
    let Some(caller) = caller else {
        return Failure::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
            .into_response();
    };
    if let Some(code) = store.faults.pop_front() {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Failure::new(code, "InternalError", "injected fault").into_response();
    }
    let query = parse_query(uri.query().unwrap_or_default());
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    if let Some(attributes) = authz::attributes(&method, &segments, watch)
        && !authz::permits(&caller, &attributes)
    {
        let namespace = segments
            .iter()
            .position(|s| *s == "namespaces")
            .and_then(|i| segments.get(i + 1).copied());
        return forbidden(&caller, &attributes, namespace).into_response();
    }
    if watch {
        if method != Method::GET || segments != ["apis", "resource.k8s.io", "v1", "resourceslices"]
        {
            return Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the fake API server watches only ResourceSlices",
            )
            .into_response();
        }
        drop(store);
        return watch_slices(&shared, &query).unwrap_or_else(IntoResponse::into_response);
    }
    let request = Incoming {
        method: &method,
        headers: &headers,
        body: &body,
        query: &query,
        caller: &caller,
    };
    let answer = route(&mut store, &segments, &request);
    match answer {
        Ok((code, value)) => {
            let body = serde_json::to_vec(&value).unwrap_or_default();
            if let Some(last) = store.requests.last_mut() {
                last.response_bytes = body.len();
            }
            (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(failure) => failure.into_response(),
    }
}

struct Incoming<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
    body: &'a [u8],
    query: &'a BTreeMap<String, String>,
    caller: &'a Caller,
}

fn forbidden(caller: &Caller, attributes: &Attributes, namespace: Option<&str>) -> Failure {
    Failure::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        authz::forbidden_message(caller, attributes, namespace),
    )
}

fn route(store: &mut Store, segments: &[&str], request: &Incoming<'_>) -> Answer {
    let method = request.method;
    match segments {
        ["api", "v1", "namespaces", namespace, "pods", name] if method == Method::GET => store
            .pods
            .get(&((*namespace).to_owned(), (*name).to_owned()))
            .map(|pod| (StatusCode::OK, to_value(pod)))
            .ok_or_else(|| Failure::not_found("pods", name)),
        ["api", "v1", "nodes", name] if method == Method::GET => store
            .nodes
            .get(*name)
            .map(|node| (StatusCode::OK, to_value(node)))
            .ok_or_else(|| Failure::not_found("nodes", name)),
        ["apis", "resource.k8s.io", "v1", "resourceslices"] => match *method {
            Method::GET => list_slices(store, request.query),
            Method::POST => create_slice(store, request.body),
            _ => Err(not_allowed(method)),
        },
        ["apis", "resource.k8s.io", "v1", "resourceslices", name] => match *method {
            Method::GET => store
                .slices
                .get(*name)
                .map(|s| (StatusCode::OK, to_value(s)))
                .ok_or_else(|| Failure::not_found("resourceslices.resource.k8s.io", name)),
            Method::PUT => update_slice(store, name, request.body),
            Method::DELETE => delete_slice(store, name, request.body),
            _ => Err(not_allowed(method)),
        },
        [
            "apis",
            "events.k8s.io",
            "v1",
            "namespaces",
            namespace,
            "events",
        ] if method == Method::POST => create_event(store, namespace, request.body),
        [
            "apis",
            "resource.k8s.io",
            "v1",
            "namespaces",
            namespace,
            "resourceclaims",
            name,
        ] => match *method {
            Method::GET => get_claim(store, namespace, name),
            _ => Err(not_allowed(method)),
        },
        [
            "apis",
            "resource.k8s.io",
            "v1",
            "namespaces",
            namespace,
            "resourceclaims",
            name,
            "status",
        ] => match *method {
            Method::GET => get_claim(store, namespace, name),
            Method::PATCH => apply_claim_status(store, namespace, name, request),
            _ => Err(not_allowed(method)),
        },
        _ => Err(Failure::not_found(
            "the server could not find the requested resource",
            "",
        )),
    }
}

fn not_allowed(method: &Method) -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("the fake API server does not implement {method} here"),
    )
}

fn to_value<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("API objects serialize")
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 3;
                } else {
                    out.push(b'%');
                    i += 1;
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|e| Failure::bad_request(format!("cannot decode the request body: {e}")))
}

// ---------------------------------------------------------------------------------------------
// ResourceSlices

/// A watch of ResourceSlices, as the API server streams it: one JSON event per line
/// (`ADDED`, `MODIFIED`, `DELETED`) for every change after `resourceVersion` (without one, or
/// `0`: the current objects as `ADDED` first), filtered by the selectors, until
/// `timeoutSeconds` (at most an hour) or the server stops.
fn watch_slices(
    shared: &Arc<Mutex<Store>>,
    query: &BTreeMap<String, String>,
) -> Result<Response, Failure> {
    let selector = SliceSelector::parse(query)?;
    let since = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(version) => Some(
            version
                .parse::<u64>()
                .map_err(|_| Failure::bad_request(format!("invalid resourceVersion {version}")))?,
        ),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800)
        .min(3600);
    let mut watch = SliceWatch {
        shared: Arc::clone(shared),
        selector,
        last: 0,
        pending: VecDeque::new(),
        deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(timeout),
        request: 0,
    };
    {
        let mut store = shared.lock().expect("fake API store poisoned");
        watch.last = since.unwrap_or(store.revision);
        // The request recorded last is this watch's: what it streams is counted there.
        watch.request = store.requests.len().saturating_sub(1);
        if since.is_none() {
            let slices: Vec<ResourceSlice> = store.slices.values().cloned().collect();
            for slice in &slices {
                watch.push(&mut store, "ADDED", slice);
            }
        }
    }
    let stream = futures::stream::unfold(watch, |mut watch| async move {
        loop {
            if let Some(line) = watch.pending.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(line), watch));
            }
            let (notify, stopping) = {
                let store = watch.shared.lock().expect("fake API store poisoned");
                (Arc::clone(&store.slices_changed), store.stopping.clone())
            };
            let changed = notify.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            watch.catch_up();
            if !watch.pending.is_empty() {
                continue;
            }
            tokio::select! {
                () = &mut changed => {}
                () = stopping.cancelled() => return None,
                () = tokio::time::sleep_until(watch.deadline) => return None,
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// One watch's place in the changes.
struct SliceWatch {
    shared: Arc<Mutex<Store>>,
    selector: SliceSelector,
    /// The revision of the last change sent (or skipped).
    last: u64,
    pending: VecDeque<Bytes>,
    deadline: tokio::time::Instant,
    /// This watch's entry in the recorded requests.
    request: usize,
}

impl SliceWatch {
    /// Queues `slice`'s change if the watch selects it, counting its bytes as the response's.
    fn push(&mut self, store: &mut Store, kind: &str, slice: &ResourceSlice) {
        if self.selector.matches(slice) {
            let mut line = serde_json::to_vec(&json!({"type": kind, "object": to_value(slice)}))
                .unwrap_or_default();
            line.push(b'\n');
            if let Some(request) = store.requests.get_mut(self.request) {
                request.response_bytes += line.len();
            }
            self.pending.push_back(Bytes::from(line));
        }
    }

    /// Queues the changes after `last`.
    fn catch_up(&mut self) {
        let shared = Arc::clone(&self.shared);
        let mut store = shared.lock().expect("fake API store poisoned");
        let start = store
            .slice_changes
            .partition_point(|(revision, _, _)| *revision <= self.last);
        let changes: Vec<(u64, &'static str, ResourceSlice)> =
            store.slice_changes[start..].to_vec();
        for (revision, kind, slice) in &changes {
            self.push(&mut store, kind, slice);
            self.last = *revision;
        }
    }
}

/// The comma-separated terms of selector `key` in `query` (none when it is absent).
fn terms<'q>(query: &'q BTreeMap<String, String>, key: &str) -> impl Iterator<Item = &'q str> {
    query
        .get(key)
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .filter(|t| !t.is_empty())
}

/// The field and label selector of a list or watch of ResourceSlices, as the API server
/// supports them for this resource.
struct SliceSelector {
    fields: Vec<(String, String)>,
    labels: Vec<(String, String)>,
}

impl SliceSelector {
    fn parse(query: &BTreeMap<String, String>) -> Result<Self, Failure> {
        let mut fields = Vec::new();
        for term in terms(query, "fieldSelector") {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| {
                    Failure::bad_request(format!("invalid field selector term {term}"))
                })?;
            if !matches!(field, "spec.nodeName" | "spec.driver" | "metadata.name") {
                return Err(Failure::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            fields.push((field.to_owned(), value.to_owned()));
        }
        let mut labels = Vec::new();
        for term in terms(query, "labelSelector") {
            let (key, value) = term.split_once('=').ok_or_else(|| {
                Failure::bad_request(format!("the fake supports only key=value labels: {term}"))
            })?;
            labels.push((key.to_owned(), value.trim_start_matches('=').to_owned()));
        }
        Ok(Self { fields, labels })
    }

    fn matches(&self, slice: &ResourceSlice) -> bool {
        self.fields.iter().all(|(field, value)| {
            let actual = match field.as_str() {
                "spec.nodeName" => slice.spec.node_name.as_deref().unwrap_or_default(),
                "spec.driver" => slice.spec.driver.as_str(),
                _ => slice.metadata.name.as_deref().unwrap_or_default(),
            };
            actual == value
        }) && self.labels.iter().all(|(key, value)| {
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(key))
                .is_some_and(|v| v == value)
        })
    }
}

fn list_slices(store: &Store, query: &BTreeMap<String, String>) -> Answer {
    let selector = SliceSelector::parse(query)?;
    let items: Vec<Value> = store
        .slices
        .values()
        .filter(|slice| selector.matches(slice))
        .map(to_value)
        .collect();
    Ok((
        StatusCode::OK,
        json!({
            "apiVersion": RESOURCE_GROUP, "kind": "ResourceSliceList",
            "metadata": {"resourceVersion": store.revision.to_string()},
            "items": items,
        }),
    ))
}

fn create_slice(store: &mut Store, body: &[u8]) -> Answer {
    let mut slice: ResourceSlice = decode(body)?;
    let name = match (&slice.metadata.name, &slice.metadata.generate_name) {
        (Some(name), _) => name.clone(),
        (None, Some(prefix)) => store.generated_name(prefix),
        (None, None) => {
            return Err(Failure::invalid(
                "ResourceSlice.resource.k8s.io",
                "",
                &["metadata.name: Required value: name or generateName is required".into()],
            ));
        }
    };
    if slice.metadata.resource_version.is_some() {
        return Err(Failure::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    prepare_taints(store.release, &mut slice);
    capacity::prepare(store.release, &mut slice);
    let errors = validate_slice(&name, &slice);
    if !errors.is_empty() {
        return Err(Failure::invalid(
            "ResourceSlice.resource.k8s.io",
            &name,
            &errors,
        ));
    }
    if store.slices.contains_key(&name) {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("resourceslices.resource.k8s.io \"{name}\" already exists"),
        ));
    }
    slice.metadata.name = Some(name.clone());
    slice.metadata.uid = Some(store.next_uid());
    slice.metadata.resource_version = Some(store.next_revision());
    slice.metadata.generation = Some(1);
    slice.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let value = to_value(&slice);
    store.slice_changed("ADDED", &slice);
    store.slices.insert(name, slice);
    Ok((StatusCode::CREATED, value))
}

fn update_slice(store: &mut Store, name: &str, body: &[u8]) -> Answer {
    let mut slice: ResourceSlice = decode(body)?;
    let Some(old) = store.slices.get(name) else {
        return Err(Failure::not_found("resourceslices.resource.k8s.io", name));
    };
    if slice.metadata.name.as_deref() != Some(name) {
        return Err(Failure::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            slice.metadata.name.as_deref().unwrap_or_default()
        )));
    }
    let mut errors = Vec::new();
    match &slice.metadata.resource_version {
        None => errors.push(
            "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update".into(),
        ),
        Some(version) if Some(version) != old.metadata.resource_version.as_ref() => {
            return Err(Failure::conflict("resourceslices.resource.k8s.io", name));
        }
        Some(_) => {}
    }
    if let Some(uid) = &slice.metadata.uid
        && Some(uid) != old.metadata.uid.as_ref()
    {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                old.metadata.uid.as_deref().unwrap_or_default()
            ),
        ));
    }
    if slice.spec.node_name != old.spec.node_name {
        errors.push("spec.nodeName: Invalid value: field is immutable".into());
    }
    if slice.spec.driver != old.spec.driver {
        errors.push("spec.driver: Invalid value: field is immutable".into());
    }
    prepare_taints(store.release, &mut slice);
    capacity::prepare(store.release, &mut slice);
    errors.extend(validate_slice(name, &slice));
    if !errors.is_empty() {
        return Err(Failure::invalid(
            "ResourceSlice.resource.k8s.io",
            name,
            &errors,
        ));
    }
    let spec_changed = to_value(&slice.spec) != to_value(&old.spec);
    slice.metadata.uid.clone_from(&old.metadata.uid);
    slice
        .metadata
        .creation_timestamp
        .clone_from(&old.metadata.creation_timestamp);
    slice.metadata.generation =
        Some(old.metadata.generation.unwrap_or(1) + i64::from(spec_changed));
    slice.metadata.resource_version = Some(store.next_revision());
    let value = to_value(&slice);
    store.slice_changed("MODIFIED", &slice);
    store.slices.insert(name.to_owned(), slice);
    Ok((StatusCode::OK, value))
}

fn delete_slice(store: &mut Store, name: &str, body: &[u8]) -> Answer {
    let Some(old) = store.slices.get(name) else {
        return Err(Failure::not_found("resourceslices.resource.k8s.io", name));
    };
    if !body.is_empty() {
        let options: Value = decode(body)?;
        let precondition =
            |field: &str| options["preconditions"][field].as_str().map(str::to_owned);
        if let Some(uid) = precondition("uid")
            && Some(&uid) != old.metadata.uid.as_ref()
        {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!("Precondition failed: UID in precondition: {uid}"),
            ));
        }
        if let Some(version) = precondition("resourceVersion")
            && Some(&version) != old.metadata.resource_version.as_ref()
        {
            return Err(Failure::conflict("resourceslices.resource.k8s.io", name));
        }
    }
    let mut removed = store.slices.remove(name).expect("checked above");
    removed.metadata.resource_version = Some(store.next_revision());
    store.slice_changed("DELETED", &removed);
    Ok((StatusCode::OK, to_value(&removed)))
}

static DNS_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").expect("valid regex"));
static DNS_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        .expect("valid regex")
});
static C_IDENTIFIER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("valid regex"));
static CONDITION_REASON: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$").expect("valid regex"));
static QUALIFIED_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").expect("valid regex")
});

fn is_label(text: &str) -> bool {
    text.len() <= 63 && DNS_LABEL.is_match(text)
}

fn is_subdomain(text: &str, max: usize) -> bool {
    text.len() <= max && DNS_SUBDOMAIN.is_match(text)
}

/// `resource.k8s.io/v1` ResourceSlice validation (create and update).
fn validate_slice(name: &str, slice: &ResourceSlice) -> Vec<String> {
    let mut errors = Vec::new();
    if !is_subdomain(name, 253) {
        errors.push(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must \
             consist of lower case alphanumeric characters, '-' or '.'"
        ));
    }
    for (i, owner) in slice.metadata.owner_references.iter().flatten().enumerate() {
        for (field, value) in [
            ("apiVersion", &owner.api_version),
            ("kind", &owner.kind),
            ("name", &owner.name),
            ("uid", &owner.uid),
        ] {
            if value.is_empty() {
                errors.push(format!(
                    "metadata.ownerReferences[{i}].{field}: Invalid value: \"\": {field} must \
                     not be empty"
                ));
            }
        }
    }
    let spec = &slice.spec;
    if !is_subdomain(&spec.driver, 63) {
        errors.push(format!(
            "spec.driver: Invalid value: \"{}\": must be a DNS subdomain of at most 63 characters",
            spec.driver
        ));
    }
    let pool = &spec.pool;
    if pool.name.is_empty()
        || pool.name.len() > 253
        || !pool.name.split('/').all(|part| is_subdomain(part, 253))
    {
        errors.push(format!(
            "spec.pool.name: Invalid value: \"{}\": must be DNS subdomains joined by /",
            pool.name
        ));
    }
    if pool.generation < 0 {
        errors
            .push("spec.pool.generation: Invalid value: must be greater than or equal to 0".into());
    }
    if pool.resource_slice_count <= 0 {
        errors
            .push("spec.pool.resourceSliceCount: Invalid value: must be greater than zero".into());
    }
    let selections = [
        spec.node_name.is_some(),
        spec.node_selector.is_some(),
        spec.all_nodes == Some(true),
        spec.per_device_node_selection == Some(true),
    ];
    match selections.iter().filter(|s| **s).count() {
        0 => errors.push(
            "spec: Required value: exactly one of `nodeName`, `nodeSelector`, `allNodes`, \
             `perDeviceNodeSelection` is required"
                .into(),
        ),
        1 => {}
        _ => errors.push(
            "spec: Invalid value: exactly one of `nodeName`, `nodeSelector`, `allNodes`, \
             `perDeviceNodeSelection` is required, but multiple fields are set"
                .into(),
        ),
    }
    if let Some(node) = &spec.node_name
        && !is_subdomain(node, 253)
    {
        errors.push(format!("spec.nodeName: Invalid value: \"{node}\""));
    }
    errors.extend(validate_devices(
        spec.devices.as_deref().unwrap_or_default(),
        spec.shared_counters.is_some(),
    ));
    errors
}

/// The devices of a slice: count limits, names, attributes and capacities.
fn validate_devices(
    devices: &[k8s_openapi::api::resource::v1::Device],
    shared_counters: bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    let restricted = devices
        .iter()
        .any(|d| d.taints.as_ref().is_some_and(|t| !t.is_empty()) || d.consumes_counters.is_some());
    let max_devices = if restricted { 64 } else { 128 };
    if devices.len() > max_devices {
        errors.push(format!(
            "spec.devices: Too many: {}: must have at most {max_devices} items",
            devices.len()
        ));
    }
    if !devices.is_empty() && shared_counters {
        errors
            .push("spec: Invalid value: only one of devices and sharedCounters may be set".into());
    }
    let mut seen = BTreeSet::new();
    for (i, device) in devices.iter().enumerate() {
        let path = format!("spec.devices[{i}]");
        if !is_label(&device.name) {
            errors.push(format!(
                "{path}.name: Invalid value: \"{}\": a lowercase RFC 1123 label must consist of \
                 lower case alphanumeric characters or '-', and must start and end with an \
                 alphanumeric character",
                device.name
            ));
        }
        if !seen.insert(device.name.as_str()) {
            errors.push(format!("{path}.name: Duplicate value: \"{}\"", device.name));
        }
        let attributes = device.attributes.as_ref();
        let capacity = device.capacity.as_ref();
        let count = attributes.map_or(0, BTreeMap::len) + capacity.map_or(0, BTreeMap::len);
        if count > 32 {
            errors.push(format!(
                "{path}: Too many: {count}: must have at most 32 attributes and capacities combined"
            ));
        }
        for (name, attribute) in attributes.into_iter().flatten() {
            errors.extend(attribute_problems(
                &format!("{path}.attributes[{name}]"),
                name,
                attribute,
            ));
        }
        for name in capacity.into_iter().flatten().map(|(name, _)| name) {
            if let Some(problem) = attribute_name_problem(name) {
                errors.push(format!(
                    "{path}.capacity[{name}]: Invalid value: \"{name}\": {problem}"
                ));
            }
        }
        errors.extend(taint_problems(
            &path,
            device.taints.as_deref().unwrap_or_default(),
        ));
        errors.extend(capacity::device_problems(&path, device));
    }
    errors
}

/// At most this many taints on one device (1.36; 4 before).
const MAX_TAINTS: usize = 16;

/// A device's taints (KEP-5055, as 1.36 validates them): how many, keys that are label names,
/// values that are label values, effects the API knows.
fn taint_problems(
    path: &str,
    taints: &[k8s_openapi::api::resource::v1::DeviceTaint],
) -> Vec<String> {
    let mut errors = Vec::new();
    if taints.len() > MAX_TAINTS {
        errors.push(format!(
            "{path}.taints: Too many: {}: must have at most {MAX_TAINTS} items",
            taints.len()
        ));
    }
    for (i, taint) in taints.iter().enumerate() {
        let at = format!("{path}.taints[{i}]");
        if !is_qualified_name(&taint.key) {
            errors.push(format!(
                "{at}.key: Invalid value: \"{}\": name part must consist of alphanumeric \
                 characters, '-', '_' or '.', and must start and end with an alphanumeric \
                 character",
                taint.key
            ));
        }
        if let Some(value) = &taint.value
            && !(value.is_empty() || (value.len() <= 63 && QUALIFIED_NAME.is_match(value)))
        {
            errors.push(format!(
                "{at}.value: Invalid value: \"{value}\": a valid label must be an empty string \
                 or consist of alphanumeric characters, '-', '_' or '.', and must start and end \
                 with an alphanumeric character"
            ));
        }
        match taint.effect.as_str() {
            "" => errors.push(format!("{at}.effect: Required value")),
            "None" | "NoSchedule" | "NoExecute" => {}
            other => errors.push(format!(
                "{at}.effect: Unsupported value: \"{other}\": supported values: \"NoExecute\", \
                 \"NoSchedule\", \"None\""
            )),
        }
    }
    errors
}

/// A label name: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters.
fn is_qualified_name(text: &str) -> bool {
    let (prefix, name) = match text.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, text),
    };
    prefix.is_none_or(|p| !p.is_empty() && is_subdomain(p, 253))
        && !name.is_empty()
        && name.len() <= 63
        && QUALIFIED_NAME.is_match(name)
}

/// What the API server does with device taints before validating a write: before 1.36 the
/// feature is alpha and off, so they are dropped (without an error, as the real server drops
/// disabled fields); from 1.36 a taint without `timeAdded` gets the current time.
fn prepare_taints(release: Release, slice: &mut ResourceSlice) {
    for device in slice.spec.devices.iter_mut().flatten() {
        if release == Release::V1_34 {
            device.taints = None;
            continue;
        }
        for taint in device.taints.iter_mut().flatten() {
            if taint.time_added.is_none() {
                taint.time_added = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            }
        }
    }
}

/// One attribute: its name, exactly one value, string and version limits.
fn attribute_problems(
    path: &str,
    name: &str,
    attribute: &k8s_openapi::api::resource::v1::DeviceAttribute,
) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(problem) = attribute_name_problem(name) {
        errors.push(format!("{path}: Invalid value: \"{name}\": {problem}"));
    }
    let set = [
        attribute.int.is_some(),
        attribute.bool.is_some(),
        attribute.string.is_some(),
        attribute.version.is_some(),
    ]
    .into_iter()
    .filter(|s| *s)
    .count();
    if set != 1 {
        errors.push(format!(
            "{path}: Invalid value: exactly one value must be specified, found {set}"
        ));
    }
    if let Some(text) = &attribute.string
        && text.len() > 64
    {
        errors.push(format!(
            "{path}.string: Too long: may not be more than 64 bytes"
        ));
    }
    if let Some(version) = &attribute.version {
        if version.len() > 64 {
            errors.push(format!(
                "{path}.version: Too long: may not be more than 64 bytes"
            ));
        }
        if semver::Version::parse(version).is_err() {
            errors.push(format!(
                "{path}.version: Invalid value: \"{version}\": must be a string \
                 compatible with semver.org spec 2.0.0"
            ));
        }
    }
    errors
}

/// Attribute and capacity names: a C identifier of at most 32 characters, optionally after a
/// DNS subdomain of at most 63 characters and a slash.
fn attribute_name_problem(name: &str) -> Option<String> {
    let (domain, id) = match name.split_once('/') {
        Some((domain, id)) => (Some(domain), id),
        None => (None, name),
    };
    if let Some(domain) = domain
        && !is_subdomain(domain, 63)
    {
        return Some("the domain must be a DNS subdomain of at most 63 characters".into());
    }
    if id.len() > 32 || !C_IDENTIFIER.is_match(id) {
        return Some("the name must be a C identifier of at most 32 characters".into());
    }
    None
}

// ---------------------------------------------------------------------------------------------
// ResourceClaims

/// Creates an `events.k8s.io/v1` Event, with the API's validation of the fields a reporter sets.
fn create_event(store: &mut Store, namespace: &str, body: &[u8]) -> Answer {
    let mut event: k8s_openapi::api::events::v1::Event = decode(body)?;
    let mut errors = Vec::new();
    if event
        .metadata
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != namespace)
    {
        errors.push("metadata.namespace: Invalid value: does not match the request".to_owned());
    }
    let name = event.metadata.name.clone().unwrap_or_default();
    let generate = event.metadata.generate_name.clone().unwrap_or_default();
    if name.is_empty() && generate.is_empty() {
        errors.push("metadata.name: Required value: name or generateName is required".into());
    }
    if event.event_time.is_none() {
        errors.push("eventTime: Required value".into());
    }
    if !matches!(event.type_.as_deref(), Some("Normal" | "Warning")) {
        errors.push("type: Unsupported value: must be Normal or Warning".into());
    }
    for (field, value, limit) in [
        (
            "reportingController",
            event.reporting_controller.as_deref(),
            253,
        ),
        (
            "reportingInstance",
            event.reporting_instance.as_deref(),
            128,
        ),
        ("action", event.action.as_deref(), 128),
        ("reason", event.reason.as_deref(), 128),
    ] {
        match value {
            None | Some("") => errors.push(format!("{field}: Required value")),
            Some(v) if v.len() > limit => {
                errors.push(format!(
                    "{field}: Too long: may not be more than {limit} bytes"
                ));
            }
            Some(_) => {}
        }
    }
    if event.note.as_deref().is_some_and(|n| n.len() > 1024) {
        errors.push("note: Too long: may not be more than 1024 bytes".into());
    }
    if event
        .regarding
        .as_ref()
        .and_then(|r| r.kind.as_deref())
        .is_none()
    {
        errors.push("regarding.kind: Required value".into());
    }
    if !errors.is_empty() {
        return Err(Failure::invalid("events.events.k8s.io", &name, &errors));
    }
    if name.is_empty() {
        store.uids += 1;
        event.metadata.name = Some(store.generated_name(&generate));
    }
    event.metadata.namespace = Some(namespace.to_owned());
    event.metadata.resource_version = Some(store.next_revision());
    store.events.push(event.clone());
    Ok((StatusCode::CREATED, to_value(&event)))
}

fn get_claim(store: &Store, namespace: &str, name: &str) -> Answer {
    store
        .claims
        .get(&(namespace.to_owned(), name.to_owned()))
        .map(|c| (StatusCode::OK, to_value(c)))
        .ok_or_else(|| Failure::not_found("resourceclaims.resource.k8s.io", name))
}

fn device_key(status: &AllocatedDeviceStatus) -> DeviceKey {
    (
        status.driver.clone(),
        status.pool.clone(),
        status.device.clone(),
        status.share_id.clone(),
    )
}

/// Server-side apply of `status.devices` through the status subresource. Entries are a map
/// keyed by (driver, pool, device, shareID); an applier owns the entries it applied, entries it
/// stops applying are removed, and entries owned by another manager conflict unless forced.
fn apply_claim_status(
    store: &mut Store,
    namespace: &str,
    name: &str,
    request: &Incoming<'_>,
) -> Answer {
    let content_type = request
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/apply-patch+yaml" {
        return Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the fake API server implements only server-side apply on resourceclaims/status, \
                 not {content_type}"
            ),
        ));
    }
    let Some(manager) = request.query.get("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(Failure::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is \
             required for apply patch",
        ));
    };
    let force = request.query.get("force").is_some_and(|f| f == "true");
    let patch: Value = serde_yaml::from_slice(request.body)
        .map_err(|e| Failure::bad_request(format!("cannot decode the apply patch: {e}")))?;
    if patch["apiVersion"] != RESOURCE_GROUP || patch["kind"] != "ResourceClaim" {
        return Err(Failure::bad_request(
            "the apply patch must set apiVersion resource.k8s.io/v1 and kind ResourceClaim",
        ));
    }
    if patch["metadata"]["name"] != name {
        return Err(Failure::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            patch["metadata"]["name"]
        )));
    }
    if !patch["metadata"]["namespace"].is_null() && patch["metadata"]["namespace"] != namespace {
        return Err(Failure::bad_request(
            "the namespace of the object does not match the namespace on the request",
        ));
    }
    let key = (namespace.to_owned(), name.to_owned());
    let Some(claim) = store.claims.get(&key) else {
        return Err(Failure::not_found("resourceclaims.resource.k8s.io", name));
    };
    if let Some(uid) = patch["metadata"]["uid"].as_str()
        && Some(uid) != claim.metadata.uid.as_deref()
    {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                claim.metadata.uid.as_deref().unwrap_or_default()
            ),
        ));
    }
    let status = patch["status"].as_object().cloned().unwrap_or_default();
    if let Some(other) = status.keys().find(|k| *k != "devices") {
        return Err(Failure::invalid(
            "ResourceClaim.resource.k8s.io",
            name,
            &[format!(
                "status.{other}: Forbidden: the fake API server accepts only status.devices \
                 through apply"
            )],
        ));
    }
    let applied: Vec<AllocatedDeviceStatus> = match status.get("devices") {
        Some(devices) => serde_path_to_error::deserialize(devices.clone())
            .map_err(|e| Failure::bad_request(format!("cannot decode status.devices: {e}")))?,
        None => Vec::new(),
    };
    let owners = store.device_owners.entry(key.clone()).or_default().clone();
    let current = claim
        .status
        .as_ref()
        .and_then(|s| s.devices.clone())
        .unwrap_or_default();
    let (devices, new_owners, mut errors) =
        merge_applied(current.clone(), &owners, &applied, manager, force)?;
    if store.release == Release::V1_36 {
        authorize_device_writes(claim, &current, &devices, request.caller)?;
    }
    errors.extend(validate_device_statuses(claim, &devices));
    if !errors.is_empty() {
        return Err(Failure::invalid(
            "ResourceClaim.resource.k8s.io",
            name,
            &errors,
        ));
    }
    let revision = store.next_revision();
    let claim = store.claims.get_mut(&key).expect("checked above");
    let status = claim.status.get_or_insert_with(Default::default);
    status.devices = (!devices.is_empty()).then_some(devices);
    claim.metadata.resource_version = Some(revision);
    let value = to_value(&*claim);
    store.device_owners.insert(key, new_owners);
    Ok((StatusCode::OK, value))
}

/// Since 1.36: every driver whose `status.devices` entries a write changes must be allowed
/// `resourceclaims/driver` (named by the driver) with `associated-node:patch`, when the
/// caller's node is the node the claim is allocated on, or `arbitrary-node:patch`.
fn authorize_device_writes(
    claim: &ResourceClaim,
    before: &[AllocatedDeviceStatus],
    after: &[AllocatedDeviceStatus],
    caller: &Caller,
) -> Result<(), Failure> {
    let changed: BTreeSet<&str> = before
        .iter()
        .filter(|entry| !after.contains(entry))
        .chain(after.iter().filter(|entry| !before.contains(entry)))
        .map(|entry| entry.driver.as_str())
        .collect();
    let on_callers_node = caller
        .node
        .as_deref()
        .is_some_and(|node| allocated_node(claim) == Some(node));
    for driver in changed {
        let ask = |verb: &str| Attributes {
            verb: verb.to_owned(),
            group: "resource.k8s.io".to_owned(),
            resource: "resourceclaims/driver".to_owned(),
            name: Some(driver.to_owned()),
        };
        let associated = ask("associated-node:patch");
        if authz::permits(caller, &ask("arbitrary-node:patch"))
            || (on_callers_node && authz::permits(caller, &associated))
        {
            continue;
        }
        let mut failure = forbidden(caller, &associated, claim.metadata.namespace.as_deref());
        if authz::permits(caller, &associated) {
            failure.message = format!(
                "{}: the claim is not allocated on node {}",
                failure.message,
                caller
                    .node
                    .as_deref()
                    .unwrap_or("(none: the token names no node)")
            );
        }
        return Err(failure);
    }
    Ok(())
}

/// The node a claim's devices were allocated on: the one node its allocation's node selector
/// names (`metadata.name In [node]`), as the scheduler writes it for node-local devices.
fn allocated_node(claim: &ResourceClaim) -> Option<&str> {
    let terms = &claim
        .status
        .as_ref()?
        .allocation
        .as_ref()?
        .node_selector
        .as_ref()?
        .node_selector_terms;
    let [term] = terms.as_slice() else {
        return None;
    };
    let fields = term.match_fields.as_deref().unwrap_or_default();
    match fields {
        [field] if field.key == "metadata.name" && field.operator == "In" => {
            match field.values.as_deref() {
                Some([node]) => Some(node.as_str()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The entries after an apply, their owners, and problems found while merging.
type Merged = (
    Vec<AllocatedDeviceStatus>,
    BTreeMap<DeviceKey, String>,
    Vec<String>,
);

/// Server-side apply of `manager`'s `status.devices` entries onto the current ones: what the
/// entries become, who owns each, and duplicate errors; a conflict with another manager's
/// entry fails unless forced.
fn merge_applied(
    current: Vec<AllocatedDeviceStatus>,
    owners: &BTreeMap<DeviceKey, String>,
    applied: &[AllocatedDeviceStatus],
    manager: &str,
    force: bool,
) -> Result<Merged, Failure> {
    let mut entries: BTreeMap<DeviceKey, AllocatedDeviceStatus> =
        current.into_iter().map(|d| (device_key(&d), d)).collect();
    let mut new_owners = owners.clone();
    let mut applied_keys = BTreeSet::new();
    let mut errors = Vec::new();
    for (i, device) in applied.iter().enumerate() {
        let device_key = device_key(device);
        if !applied_keys.insert(device_key.clone()) {
            errors.push(format!("status.devices[{i}]: Duplicate value"));
            continue;
        }
        if let Some(owner) = owners.get(&device_key)
            && owner != manager
            && !force
        {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Apply failed with 1 conflict: conflict with \"{owner}\": \
                     .status.devices[driver=\"{}\",device=\"{}\",pool=\"{}\"]",
                    device.driver, device.device, device.pool
                ),
            ));
        }
        entries.insert(device_key.clone(), device.clone());
        new_owners.insert(device_key, manager.to_owned());
    }
    // Entries this manager applied before and no longer applies are removed.
    for (device_key, owner) in owners {
        if owner == manager && !applied_keys.contains(device_key) {
            entries.remove(device_key);
            new_owners.remove(device_key);
        }
    }
    Ok((entries.into_values().collect(), new_owners, errors))
}

/// `status.devices` rules (KEP-4817): each entry names an allocated device; conditions,
/// network data and opaque data within their limits.
fn validate_device_statuses(
    claim: &ResourceClaim,
    devices: &[AllocatedDeviceStatus],
) -> Vec<String> {
    let allocated: BTreeSet<DeviceKey> = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .map(|d| d.results.iter().flatten())
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r.driver.clone(),
                r.pool.clone(),
                r.device.clone(),
                r.share_id.clone(),
            )
        })
        .collect();
    let mut errors = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let path = format!("status.devices[{i}]");
        if !allocated.contains(&device_key(device)) {
            errors.push(format!(
                "{path}: Invalid value: must be an allocated device in the claim \
                 (driver {}, pool {}, device {})",
                device.driver, device.pool, device.device
            ));
        }
        let conditions = device.conditions.as_deref().unwrap_or_default();
        if conditions.len() > 8 {
            errors.push(format!(
                "{path}.conditions: Too many: {}: must have at most 8 items",
                conditions.len()
            ));
        }
        let mut types = BTreeSet::new();
        for (j, condition) in conditions.iter().enumerate() {
            errors.extend(
                condition_problems(condition)
                    .into_iter()
                    .map(|p| format!("{path}.conditions[{j}].{p}")),
            );
            if !types.insert(condition.type_.as_str()) {
                errors.push(format!("{path}.conditions[{j}].type: Duplicate value"));
            }
        }
        if let Some(data) = &device.data {
            let size = serde_json::to_vec(&data.0).map_or(0, |v| v.len());
            if size > 10 * 1024 {
                errors.push(format!(
                    "{path}.data: Too long: may not be more than 10240 bytes"
                ));
            }
        }
        if let Some(network) = &device.network_data {
            if network
                .interface_name
                .as_ref()
                .is_some_and(|n| n.len() > 256)
            {
                errors.push(format!(
                    "{path}.networkData.interfaceName: Too long: may not be more than 256 bytes"
                ));
            }
            if network
                .hardware_address
                .as_ref()
                .is_some_and(|n| n.len() > 128)
            {
                errors.push(format!(
                    "{path}.networkData.hardwareAddress: Too long: may not be more than 128 bytes"
                ));
            }
            let ips = network.ips.as_deref().unwrap_or_default();
            if ips.len() > 16 {
                errors.push(format!(
                    "{path}.networkData.ips: Too many: {}: must have at most 16 items",
                    ips.len()
                ));
            }
            let mut seen = BTreeSet::new();
            for (j, ip) in ips.iter().enumerate() {
                if ip.parse::<ipnet::IpNet>().is_err() {
                    errors.push(format!(
                        "{path}.networkData.ips[{j}]: Invalid value: \"{ip}\": must be a valid \
                         address in CIDR form, (e.g. 10.9.8.7/24 or 2001:db8::1/64)"
                    ));
                }
                if !seen.insert(ip) {
                    errors.push(format!(
                        "{path}.networkData.ips[{j}]: Duplicate value: \"{ip}\""
                    ));
                }
            }
        }
    }
    errors
}

/// metav1.Condition validation.
fn condition_problems(condition: &Condition) -> Vec<String> {
    let mut problems = Vec::new();
    let kind = &condition.type_;
    let name = kind.rsplit('/').next().unwrap_or_default();
    let prefix_ok = kind
        .rsplit_once('/')
        .is_none_or(|(prefix, _)| is_subdomain(prefix, 253));
    if name.is_empty() || name.len() > 63 || !QUALIFIED_NAME.is_match(name) || !prefix_ok {
        problems.push(format!(
            "type: Invalid value: \"{kind}\": must be a qualified name"
        ));
    }
    if !matches!(condition.status.as_str(), "True" | "False" | "Unknown") {
        problems.push(format!(
            "status: Unsupported value: \"{}\": supported values: \"False\", \"True\", \"Unknown\"",
            condition.status
        ));
    }
    if condition.reason.is_empty() {
        problems.push("reason: Required value".into());
    } else if condition.reason.len() > 1024 || !CONDITION_REASON.is_match(&condition.reason) {
        problems.push(format!(
            "reason: Invalid value: \"{}\": a condition reason must start with an alphabetic \
             character, optionally followed by a string of alphanumeric characters or '_,:', \
             and must end with an alphanumeric character or '_'",
            condition.reason
        ));
    }
    if condition.message.len() > 32768 {
        problems.push("message: Too long: may not be more than 32768 bytes".into());
    }
    if condition.observed_generation.is_some_and(|g| g < 0) {
        problems.push(
            "observedGeneration: Invalid value: must be greater than or equal to zero".into(),
        );
    }
    problems
}
