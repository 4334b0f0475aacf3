//! `knd run`: the node daemon. Keeps the inventory current and published as ResourceSlices,
//! serves kubelet's DRA calls, reports device health, answers `/healthz` and `/readyz`, and
//! shuts down within a bounded time on SIGTERM.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, routing::get};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    discover::inventory::Inventory,
    dra::{
        self, Registration, Sockets,
        prepare::{ClaimHooks, NodeDevices, Preparer},
    },
    k8s::{self, ApiClaims, Publisher},
    model::ports::{DeviceHealth, Taint},
    nri,
    observe::{
        health,
        metrics::{self, Telemetry},
    },
    os::{
        backoff::Backoff,
        host::HostRoot,
        netns::Netns,
        state::{self, StateStore},
    },
    publish::{
        resources::TaintEffect,
        selector::{self, Selector},
        watch::{self as inventory_watch, Pacing},
    },
};

/// Instances of the counting programs kept loaded ahead, so a pod's start only links them.
const READY_PROGRAMS: usize = 4;

/// How often the pool is compared with the API even when the inventory did not change (repairs
/// slices deleted or edited by someone else).
const REPUBLISH_EVERY: Duration = Duration::from_mins(1);

/// `knd run` flags; each can also come from the environment variable shown.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// This node's name (the pool name; slices are owned by this Node).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig file; in-cluster configuration when absent.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The DRA driver name (a DNS subdomain of at most 63 characters).
    #[arg(long, env = "KND_DRIVER_NAME", default_value = crate::publish::resources::DRIVER_NAME,
          value_parser = parse_driver_name)]
    pub driver_name: String,
    /// Where the DRA socket (`dra.sock`) is created.
    #[arg(
        long,
        env = "KND_PLUGIN_DIR",
        default_value = "/var/lib/kubelet/plugins/knd.dev"
    )]
    pub plugin_dir: PathBuf,
    /// Kubelet's plugin registry, where the registration socket is created.
    #[arg(
        long,
        env = "KND_REGISTRY_DIR",
        default_value = "/var/lib/kubelet/plugins_registry"
    )]
    pub registry_dir: PathBuf,
    /// The container runtime's NRI socket.
    #[arg(long, env = "KND_NRI_SOCKET", default_value = "/var/run/nri/nri.sock")]
    pub nri_socket: PathBuf,
    /// This plugin's NRI index (two digits; plugins with lower indexes run first).
    #[arg(long, env = "KND_NRI_INDEX", default_value = "10")]
    pub nri_index: String,
    /// The host's root as mounted in the container (sysfs, procfs and devfs are read below it).
    #[arg(long, env = "KND_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,
    /// Where prepared claims are recorded (durably: kept across reboots) and the pods' NCCL
    /// topology files written.
    #[arg(long, env = "KND_STATE_DIR", default_value = "/var/lib/knd")]
    pub state_dir: PathBuf,
    /// Where the pods' attachments are recorded: kept across a restart of knd, not across a
    /// reboot (they describe namespaces a reboot ends), so in memory (tmpfs) on a node.
    #[arg(long, env = "KND_RUN_DIR", default_value = "/run/knd")]
    pub run_dir: PathBuf,
    /// The state directory as the container runtime sees it, when knd runs in a container that
    /// mounts it at another path (default: `--state-dir`). The pods' NCCL topology files are
    /// written below it and bind-mounted into their containers from there.
    #[arg(long, env = "KND_RUNTIME_STATE_DIR")]
    pub runtime_state_dir: Option<PathBuf>,
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`. The node's loopback
    /// by default: the metrics name every tenant's pods and claims, so they are scraped through
    /// an authenticating proxy (the chart's kube-rbac-proxy), not served to the network.
    #[arg(long, env = "KND_METRICS_ADDR", default_value = "127.0.0.1:9177")]
    pub metrics_addr: SocketAddr,
    /// Publish only devices this CEL expression accepts.
    #[arg(long, env = "KND_FILTER")]
    pub filter: Option<String>,
    /// Publish the NICs this CEL expression accepts as shared NICs: allocatable to many claims
    /// at once, each consuming part of the link's `bandwidth` (consumable capacity, Kubernetes
    /// 1.36+), attached as a macvlan child in the pod and held to its share by knd's eBPF
    /// policer. A shared NIC is only shared (a claim wanting it whole asks for all of its
    /// bandwidth). Only NICs whose link speed the kernel reports can be shared.
    #[arg(long, env = "KND_SHARED_NICS")]
    pub shared_nics: Option<String>,
    /// The root of the cgroup v2 hierarchy the TCP RTT program attaches to (default: the
    /// `cgroup2` mount of the root in knd's mount table, e.g. `/sys/fs/cgroup/unified` on hybrid
    /// nodes, `/sys/fs/cgroup` on cgroup v2 ones). Checked to be a hierarchy's root.
    #[arg(long, env = "KND_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// At most this many claimed interfaces are measured and exported (the metrics'
    /// cardinality guard); more are counted in `knd_telemetry_refused_total`.
    #[arg(long, env = "KND_METRICS_MAX_INTERFACES", default_value_t = 1000)]
    pub metrics_max_interfaces: usize,
    /// Seconds between device health checks (link state, carrier changes, error counters).
    #[arg(long, env = "KND_HEALTH_INTERVAL", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub health_interval: u64,
    /// Seconds over which carrier flaps and error-counter rises are counted; a device is healthy
    /// again after this long without either.
    #[arg(long, env = "KND_HEALTH_WINDOW", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub health_window: u64,
    /// Carrier changes within the window that make a device unhealthy (flapping).
    #[arg(long, env = "KND_HEALTH_FLAPS", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub health_flaps: u64,
    /// Rise of one error counter within the window that makes a device unhealthy.
    #[arg(long, env = "KND_HEALTH_ERRORS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub health_errors: u64,
    /// The taint a device judged unhealthy gets in the ResourceSlice
    /// (`knd.dev/unhealthy=<link-down|flapping|errors>`): `NoSchedule` (the scheduler allocates
    /// it to no new claim), `NoExecute` (also evicts the pods using it), or `off`. Removed after
    /// the device has been healthy for a whole `--health-window`. Needs an API server with
    /// device taints (on by default from Kubernetes 1.36); older ones drop them, which is
    /// logged once.
    #[arg(
        long,
        env = "KND_UNHEALTHY_TAINT",
        value_enum,
        default_value = "NoSchedule"
    )]
    pub unhealthy_taint: UnhealthyTaint,
    /// At least this many seconds between two publications of the pool (the first is at
    /// once): a node whose links flap changes its devices' state and taints often, and rewrites
    /// its ResourceSlices at most this often.
    #[arg(long, env = "KND_PUBLISH_INTERVAL", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub publish_interval: u64,
    /// What to do when a claim's NIC is far from the GPU allocated with it: `ignore`, `warn`
    /// (record the class in the claim status and metrics, log), or `enforce` (also fail the
    /// prepare). The claim's `topology.require` sets the worst acceptable class (default PXB).
    #[arg(long, env = "KND_ALIGNMENT_POLICY", value_enum, default_value = "warn")]
    pub alignment_policy: dra::alignment::Policy,
    /// Seconds to finish in-flight work after SIGTERM before exiting anyway.
    #[arg(long, env = "KND_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    pub shutdown_timeout: u64,
}

/// `--unhealthy-taint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnhealthyTaint {
    /// No taints.
    #[value(name = "off")]
    Off,
    /// `NoSchedule`.
    #[value(name = "NoSchedule")]
    NoSchedule,
    /// `NoExecute` (evicts the pods using the device).
    #[value(name = "NoExecute")]
    NoExecute,
}

impl UnhealthyTaint {
    const fn effect(self) -> Option<TaintEffect> {
        match self {
            Self::Off => None,
            Self::NoSchedule => Some(TaintEffect::NoSchedule),
            Self::NoExecute => Some(TaintEffect::NoExecute),
        }
    }
}

fn parse_driver_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.split('.').all(crate::publish::resources::is_dns_label);
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "`{name}` is not a DNS subdomain of at most 63 characters (e.g. knd.dev)"
        ))
    }
}

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host root is not a directory.
    #[error("--host-root {0} is not a directory")]
    HostRoot(PathBuf),
    /// The filter does not compile.
    #[error("--filter: {0}")]
    Filter(#[from] selector::Error),
    /// The shared-NIC selector does not compile.
    #[error("--shared-nics: {0}")]
    SharedNics(#[source] selector::Error),
    /// The state or run directory cannot be used (the error names the path).
    #[error("--state-dir/--run-dir: {0}")]
    State(#[from] state::Error),
    /// The API client cannot be set up.
    #[error(transparent)]
    Api(#[from] k8s::Error),
    /// The inventory watcher cannot start.
    #[error(transparent)]
    Watch(#[from] inventory_watch::Error),
    /// The kubelet plugin sockets cannot be served.
    #[error(transparent)]
    Plugin(#[from] dra::Error),
    /// The NRI plugin's name or index is refused.
    #[error("NRI")]
    NriIdentity(#[from] nri::plugin::IdentityError),
    /// knd's own network namespace cannot be opened (the NRI hooks move devices back to it).
    #[error("NRI: cannot open knd's own network namespace")]
    OwnNamespace(#[source] crate::os::netns::Error),
    /// The HTTP server cannot listen.
    #[error("--metrics-addr {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// What `/readyz` and `/metrics` look at.
#[derive(Debug, Clone)]
struct Health {
    registration: watch::Receiver<Registration>,
    slices_ready: Arc<AtomicBool>,
    metrics: Arc<prometheus_client::registry::Registry>,
    /// What is ready but degraded (shown by `/readyz`, which still answers 200).
    degraded: Vec<String>,
}

impl Health {
    fn new(
        registration: watch::Receiver<Registration>,
        slices_ready: Arc<AtomicBool>,
        telemetry: &Arc<Telemetry>,
    ) -> Self {
        Self {
            registration,
            slices_ready,
            metrics: Arc::new(telemetry.registry()),
            degraded: telemetry
                .rtt_problem()
                .map(|p| format!("TCP RTT is not measured: {p}"))
                .into_iter()
                .collect(),
        }
    }

    /// `None` when ready, else why not.
    fn not_ready(&self) -> Option<String> {
        let mut reasons = Vec::new();
        match &*self.registration.borrow() {
            Registration::Registered => {}
            Registration::Pending => {
                reasons.push("kubelet has not registered the plugin yet".into());
            }
            Registration::Refused(why) => {
                reasons.push(format!("kubelet refused the plugin: {why}"));
            }
        }
        if !self.slices_ready.load(Ordering::Relaxed) {
            reasons.push("the ResourceSlices are not published yet".to_owned());
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn main(args: RunArgs) -> Result<(), Error> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::error!(%err, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        signals.cancel();
    });
    run(args, shutdown).await
}

/// The listener of `/metrics`, `/healthz` and `/readyz`.
async fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Metrics { addr, source })
}

/// The compiled `--filter` and `--shared-nics`.
type Selectors = (Option<Arc<Selector>>, Option<Arc<Selector>>);

fn selectors(args: &RunArgs) -> Result<Selectors, Error> {
    let compile = |text: &Option<String>| text.as_deref().map(Selector::compile).transpose();
    let filter = compile(&args.filter)?.map(Arc::new);
    let shared = compile(&args.shared_nics)
        .map_err(Error::SharedNics)?
        .map(Arc::new);
    Ok((filter, shared))
}

/// Where the pods' NCCL topology files go: under the state directory as knd sees it, and as
/// the runtime sees the same directory (they differ when knd runs in a container).
fn nccl_files(args: &RunArgs, host: &HostRoot) -> nri::pods::NcclFiles {
    nri::pods::NcclFiles {
        host: host.clone(),
        dir: args.state_dir.join("nccl"),
        runtime_dir: args
            .runtime_state_dir
            .as_ref()
            .unwrap_or(&args.state_dir)
            .join("nccl"),
    }
}

/// Runs the daemon until `shutdown` is cancelled, then stops within `--shutdown-timeout`.
pub async fn run(args: RunArgs, shutdown: CancellationToken) -> Result<(), Error> {
    if !args.host_root.is_dir() {
        return Err(Error::HostRoot(args.host_root));
    }
    let host = HostRoot::new(&args.host_root);
    let (filter, shared) = selectors(&args)?;
    let store = Arc::new(StateStore::open_in(&args.state_dir, &args.run_dir)?);
    if !state::in_memory(&args.run_dir) {
        tracing::warn!(run_dir = %args.run_dir.display(), "the run directory is not in memory (tmpfs): every pod start writes its records to disk");
    }
    let client = k8s::client(args.kubeconfig.as_deref()).await?;
    let driver = args.driver_name.clone();
    let node = args.node_name.clone();

    let scope = inventory_scope(client.clone(), &node, filter).await;
    let watcher =
        inventory_watch::spawn(host.clone(), scope, Pacing::default(), shutdown.clone()).await?;
    let first = Arc::clone(&watcher.inventory.borrow());
    tracing::info!(
        devices = first.nics.len(),
        excluded = first.excluded.len(),
        "inventory scanned"
    );
    let cgroup = args
        .cgroup_root
        .clone()
        .or_else(crate::observe::telemetry::default_cgroup_root);
    let telemetry = Arc::new(
        Telemetry::new(cgroup.as_deref(), args.metrics_max_interfaces)
            .with_host_root(host.clone())
            .with_ready_programs(READY_PROGRAMS),
    );
    let (health_rx, taints_rx, health_task) = start_health(
        &args,
        HealthSources {
            host: host.clone(),
            inventory: watcher.inventory.clone(),
            store: Arc::clone(&store),
            pool: node.clone(),
            telemetry: Arc::clone(&telemetry),
        },
        shutdown.clone(),
    )
    .await;
    let slices_ready = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_loop(
        Publisher::new(client.clone(), &driver, &node)
            .with_taint_effect(args.unhealthy_taint.effect())
            .with_shared(shared.clone()),
        telemetry.published_devices.clone(),
        PublishTriggers {
            inventory: watcher.inventory.clone(),
            taints: taints_rx,
            interval: Duration::from_secs(args.publish_interval),
        },
        Arc::clone(&slices_ready),
        shutdown.clone(),
    ));

    let claims = ApiClaims::new(client, &driver, shutdown.clone()).on_node(&node);
    let identity = nri::plugin::Identity::new("knd", &args.nri_index)?;
    let hooks = Arc::new(
        nri::pods::NodeHooks::new(
            Arc::clone(&store),
            watcher.inventory.clone(),
            Netns::current().map_err(Error::OwnNamespace)?,
            Arc::new(claims.clone()),
        )
        .with_telemetry(Arc::clone(&telemetry))
        .with_nccl(nccl_files(&args, &host)),
    );
    let nri_task = tokio::spawn(nri::plugin::run(
        args.nri_socket.clone(),
        identity,
        Arc::clone(&hooks),
        shutdown.clone(),
    ));
    let preparer = preparer(
        &args,
        &watcher,
        (store, claims.clone(), shared),
        &telemetry,
        &hooks,
    );
    let sockets = Sockets::new(&driver, &args.plugin_dir, &args.registry_dir);
    let plugin = dra::serve(&driver, sockets, preparer, health_rx, &shutdown)?;

    let health = Health::new(plugin.registration.clone(), slices_ready, &telemetry);
    let listener = bind_metrics(args.metrics_addr).await?;
    let http = tokio::spawn(serve_http(listener, health, shutdown.clone()));
    tracing::info!(%driver, %node, metrics = %args.metrics_addr, "knd is running");

    shutdown.cancelled().await;
    let grace = Duration::from_secs(args.shutdown_timeout);
    stop(
        grace,
        plugin,
        watcher,
        [publisher, health_task, nri_task, http],
        (&claims, &hooks),
    )
    .await;
    Ok(())
}

/// What the inventory scans with: the `--filter` and the Node's addresses (interfaces holding
/// one are never published; read once: kubelet sets them before pods, this one included, are
/// scheduled to the node).
async fn inventory_scope(
    client: kube::Client,
    node: &str,
    filter: Option<Arc<Selector>>,
) -> inventory_watch::Scope {
    let node_addresses = match k8s::node_addresses(client, node).await {
        Ok(addresses) => addresses,
        Err(err) => {
            tracing::warn!(%err, "cannot read the Node's addresses; excluding by default route only");
            Vec::new()
        }
    };
    inventory_watch::Scope {
        filter,
        node_addresses: node_addresses.into(),
    }
}

/// The DRA side's preparer: claims checked against this node's pool and live inventory, their
/// GPU alignment as the flags say, each call's duration recorded.
fn preparer(
    args: &RunArgs,
    watcher: &inventory_watch::Watcher,
    (store, claims, shared): (Arc<StateStore>, ApiClaims, Option<Arc<Selector>>),
    telemetry: &Telemetry,
    pods: &Arc<nri::pods::NodeHooks<ApiClaims>>,
) -> Arc<Preparer<ApiClaims>> {
    let node = NodeDevices {
        pool: args.node_name.clone(),
        inventory: watcher.inventory.clone(),
        shared,
    };
    Arc::new(
        Preparer::new(args.driver_name.clone(), node, store, claims)
            .with_durations(telemetry.prepare_seconds.clone())
            .with_alignment(alignment(args, watcher, telemetry))
            // A prepared claim's NICs get their counting programs linked while still on the
            // host: the pod's start then only resets the counters.
            .with_hooks(ClaimHooks {
                prepared: {
                    let pods = Arc::clone(pods);
                    Arc::new(move |claim| pods.stage(claim))
                },
                released: {
                    let pods = Arc::clone(pods);
                    Arc::new(move |uid| pods.unstage(uid))
                },
            }),
    )
}

/// GPU–NIC alignment checking as the flags say, over the live inventory.
fn alignment(
    args: &RunArgs,
    watcher: &inventory_watch::Watcher,
    telemetry: &Telemetry,
) -> dra::alignment::Alignment {
    dra::alignment::Alignment {
        policy: args.alignment_policy,
        inventory: watcher.inventory.clone(),
        distances: telemetry.gpu_nic_distance.clone(),
    }
}

/// Waits up to `grace` for everything to finish after shutdown was requested.
async fn stop(
    grace: Duration,
    plugin: dra::Plugin,
    watcher: inventory_watch::Watcher,
    tasks: [tokio::task::JoinHandle<()>; 4],
    (claims, hooks): (&ApiClaims, &nri::pods::NodeHooks<ApiClaims>),
) {
    let stopped = tokio::time::timeout(grace, async {
        plugin.join().await;
        watcher.join().await;
        for task in tasks {
            let _ignored = task.await;
        }
        // What they left running in the background: telemetry attachments, then the claims'
        // status writes and Events.
        hooks.drained().await;
        claims.drained().await;
    })
    .await;
    if stopped.is_err() {
        tracing::warn!(?grace, "shutdown took too long; exiting anyway");
    } else {
        tracing::info!("stopped");
    }
}

/// What the health loop reads devices from.
struct HealthSources {
    host: HostRoot,
    inventory: watch::Receiver<Arc<Inventory>>,
    store: Arc<StateStore>,
    pool: String,
    telemetry: Arc<Telemetry>,
}

/// Where the health loop's verdicts go: kubelet's stream, and the taints for the slices.
struct HealthOutputs {
    health: watch::Sender<Vec<DeviceHealth>>,
    taints: watch::Sender<BTreeMap<String, Taint>>,
    tainting: health::Taints,
}

impl HealthOutputs {
    /// Takes one round of verdicts.
    fn send(&mut self, now: Vec<DeviceHealth>) {
        let unix_seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        if self
            .tainting
            .update(std::time::Instant::now(), unix_seconds, &now)
        {
            let current = self.tainting.current();
            tracing::info!(
                tainted = ?current.iter().map(|(d, t)| format!("{d}={}", t.cause.as_str())).collect::<Vec<_>>(),
                "unhealthy taints changed"
            );
            self.taints.send_replace(current);
        }
        self.health.send_if_modified(|devices| {
            for device in &now {
                let before = devices.iter().find(|d| d.device == device.device);
                if before.is_none_or(|b| b.healthy != device.healthy) {
                    tracing::info!(
                        device = %device.device,
                        healthy = device.healthy,
                        reason = %device.reason,
                        "device health changed"
                    );
                }
            }
            let changed = *devices != now;
            *devices = now;
            changed
        });
    }
}

/// Judges every device once, then starts [`health_loop`].
async fn start_health(
    args: &RunArgs,
    sources: HealthSources,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<Vec<DeviceHealth>>,
    watch::Receiver<BTreeMap<String, Taint>>,
    tokio::task::JoinHandle<()>,
) {
    let mut tracker = health::Tracker::new(health::Policy {
        window: Duration::from_secs(args.health_window),
        flaps: args.health_flaps,
        errors: args.health_errors,
    });
    let inventory = Arc::clone(&sources.inventory.borrow());
    let initial = health::assess(
        &mut tracker,
        &sources.host,
        &inventory,
        &health::attached(&sources.store),
        &sources.pool,
    )
    .await;
    sources.telemetry.set_device_health(&initial);
    let (health, receiver) = watch::channel(Vec::new());
    let (taints, taints_rx) = watch::channel(BTreeMap::new());
    let mut outputs = HealthOutputs {
        health,
        taints,
        tainting: health::Taints::new(Duration::from_secs(args.health_window)),
    };
    outputs.send(initial);
    let interval = Duration::from_secs(args.health_interval);
    let task = tokio::spawn(health_loop(tracker, sources, outputs, interval, shutdown));
    (receiver, taints_rx, task)
}

/// Judges every device's health every `interval` and whenever the inventory changes; kubelet's
/// stream gets the list whenever a device's health or reason changes.
async fn health_loop(
    mut tracker: health::Tracker,
    mut sources: HealthSources,
    mut outputs: HealthOutputs,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = sources.inventory.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(interval) => {}
        }
        let inventory = Arc::clone(&sources.inventory.borrow_and_update());
        let store = Arc::clone(&sources.store);
        let attached = tokio::task::spawn_blocking(move || health::attached(&store))
            .await
            .unwrap_or_default();
        let now = health::assess(
            &mut tracker,
            &sources.host,
            &inventory,
            &attached,
            &sources.pool,
        )
        .await;
        sources.telemetry.set_device_health(&now);
        outputs.send(now);
    }
}

/// What makes the pool be published again: a new inventory or new taints, at most once per
/// `interval`.
struct PublishTriggers {
    inventory: watch::Receiver<Arc<Inventory>>,
    taints: watch::Receiver<BTreeMap<String, Taint>>,
    interval: Duration,
}

/// Publishes every new inventory and every new set of taints, at most once per interval (and
/// re-checks the API once a minute), retrying with backoff.
async fn publish_loop(
    mut publisher: Publisher,
    published_devices: prometheus_client::metrics::gauge::Gauge,
    mut triggers: PublishTriggers,
    slices_ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        let current = Arc::clone(&triggers.inventory.borrow_and_update());
        let taints = triggers.taints.borrow_and_update().clone();
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_secs(30));
        loop {
            match publisher.publish_tainted(&current, &taints).await {
                Ok(result) => {
                    if result.created + result.updated + result.deleted > 0 {
                        tracing::info!(
                            generation = result.generation,
                            slices = result.slices,
                            devices = result.devices,
                            created = result.created,
                            updated = result.updated,
                            deleted = result.deleted,
                            tainted = taints.len(),
                            "published the pool"
                        );
                    }
                    published_devices.set(i64::try_from(result.devices).unwrap_or(i64::MAX));
                    slices_ready.store(true, Ordering::Relaxed);
                    break;
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot publish the pool; retrying");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            }
        }
        let changed = tokio::select! {
            () = shutdown.cancelled() => return,
            changed = triggers.inventory.changed() => changed,
            changed = triggers.taints.changed() => changed,
            () = tokio::time::sleep(REPUBLISH_EVERY) => Ok(()),
        };
        if changed.is_err() {
            return;
        }
        // Bounded: however often links flap, one publication per interval (what changed
        // meanwhile is in the next one).
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(started + triggers.interval) => {}
        }
    }
}

/// At most this many scrapes run at once; more are answered 503 at once.
const CONCURRENT_SCRAPES: usize = 2;

static SCRAPES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CONCURRENT_SCRAPES);

/// `/metrics`: encoded on a blocking thread (it reads kernel maps and sysfs), never on the
/// async workers that serve kubelet and the runtime; concurrent scrapes are bounded.
async fn scrape(State(health): State<Health>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let Ok(_permit) = SCRAPES.try_acquire() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{CONCURRENT_SCRAPES} scrapes are running already\n"),
        )
            .into_response();
    };
    let registry = Arc::clone(&health.metrics);
    match tokio::task::spawn_blocking(move || metrics::encode(&registry)).await {
        Ok(text) => (
            [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(scrape))
        .route(
            "/readyz",
            get(|State(health): State<Health>| async move {
                match health.not_ready() {
                    None if health.degraded.is_empty() => (StatusCode::OK, "ready\n".to_owned()),
                    None => (
                        StatusCode::OK,
                        format!("ready, degraded: {}\n", health.degraded.join("; ")),
                    ),
                    Some(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        )
        .with_state(health);
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%err, "the HTTP server stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A collector that blocks every scrape until the test opens it, counting those waiting.
    #[derive(Debug, Default)]
    struct Gate {
        state: Mutex<(usize, bool)>,
        changed: Condvar,
    }

    impl Gate {
        fn waiting(&self) -> usize {
            self.state.lock().unwrap().0
        }

        fn open(&self) {
            self.state.lock().unwrap().1 = true;
            self.changed.notify_all();
        }
    }

    #[derive(Debug)]
    struct Blocking(Arc<Gate>);

    impl Collector for Blocking {
        fn encode(&self, _: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let mut state = self.0.state.lock().unwrap();
            state.0 += 1;
            self.0.changed.notify_all();
            while !state.1 {
                state = self.0.changed.wait(state).unwrap();
            }
            Ok(())
        }
    }

    /// The status code of `GET path`.
    async fn get(address: SocketAddr, path: &str) -> u16 {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: knd\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
    }

    /// Out of the box the metrics (every tenant's namespaces, pods and claims) are served on
    /// the node's loopback only, never on the node's addresses.
    #[test]
    fn the_metrics_stay_on_the_loopback_unless_told() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["knd", "--node-name", "n1"]).unwrap();
        assert!(
            cli.run.metrics_addr.ip().is_loopback(),
            "{}",
            cli.run.metrics_addr
        );
        assert_eq!(cli.run.metrics_addr.port(), 9177);
    }

    /// Scrapes are encoded off the async workers (the server here has one, and stays
    /// responsive while two scrapes hang), and a third concurrent scrape is refused instead of
    /// piling up.
    #[tokio::test(flavor = "current_thread")]
    async fn scrapes_are_bounded_and_never_hold_the_async_workers() {
        let gate = Arc::new(Gate::default());
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Blocking(Arc::clone(&gate))));
        let (_registration, registration) = watch::channel(Registration::Registered);
        let health = Health {
            registration,
            slices_ready: Arc::new(AtomicBool::new(true)),
            metrics: Arc::new(registry),
            degraded: Vec::new(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_http(listener, health, shutdown.clone()));

        let hanging: Vec<_> = (0..CONCURRENT_SCRAPES)
            .map(|_| tokio::spawn(get(address, "/metrics")))
            .collect();
        while gate.waiting() < CONCURRENT_SCRAPES {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(get(address, "/metrics").await, 503, "a third scrape");
        assert_eq!(
            get(address, "/healthz").await,
            200,
            "the server still answers"
        );
        gate.open();
        for scrape in hanging {
            assert_eq!(scrape.await.unwrap(), 200);
        }
        assert_eq!(get(address, "/metrics").await, 200, "slots are given back");
        shutdown.cancel();
        server.await.unwrap();
    }
}
