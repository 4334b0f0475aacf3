//! Per-claim telemetry as Prometheus metrics: the eBPF maps of every watched interface and pod
//! namespace are read when `/metrics` is scraped (nothing is copied in between), labelled with
//! the claim, pod and device they belong to; the driver's own work (prepare and attach
//! latencies, published devices) alongside. Series of a claim disappear with its pod.

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use knd_common::{RTT_BUCKETS, RttStats, SIZE_MIN_SHIFT, class, roce};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    model::link::LinkStats,
    observe::telemetry::{
        self, AttachmentId, RdmaPortCounters, SocketProbes, TrafficDetail, TrafficProbes,
    },
    os::{host::HostRoot, netns::Netns},
};

/// Who a watched interface belongs to: the label values of its series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimLabels {
    /// The claim's (and pod's) namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The claim's name.
    pub claim: String,
    /// The claim's request(s) the device satisfies, comma-separated.
    pub request: String,
    /// The device (in knd's pool).
    pub device: String,
    /// The interface's name in the pod.
    pub interface: String,
}

impl ClaimLabels {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("namespace", self.namespace.clone()),
            ("pod", self.pod.clone()),
            ("claim", self.claim.clone()),
            ("request", self.request.clone()),
            ("device", self.device.clone()),
            ("interface", self.interface.clone()),
        ]
    }
}

#[derive(Debug)]
struct Watched {
    pod_uid: String,
    labels: ClaimLabels,
    counting: Counting,
    cookie: u64,
    rdma: Vec<String>,
}

/// Programs counting on one interface, from a known moment.
#[derive(Debug)]
struct Counting {
    attachment: AttachmentId,
    /// The counters, read by scrapes without the probes' lock.
    reader: Arc<telemetry::TrafficReader>,
    /// A bandwidth share's policer runs on the interface too (its drops are exported).
    policed: bool,
    /// When counting started (seconds since the epoch).
    since: f64,
    /// The kernel's counters of the interface when counting started, if read then (an
    /// interface that arrives in a pod: knd's totals are the kernel's less these, exactly).
    baseline: Option<LinkStats>,
}

/// Counting that started as the interface arrived in its pod, before it was set up there; the
/// claim's labels come when the pod's record is complete ([`Telemetry::watch`]).
#[derive(Debug)]
struct Arrived {
    pod_uid: String,
    interface: String,
    counting: Counting,
}

/// Counting linked to a claimed NIC on the host ahead of its pod (the links follow the device
/// into the pod): the pod's start then only resets the counters.
#[derive(Debug)]
struct Staged {
    claim_uid: String,
    device: String,
    counting: Counting,
}

#[derive(Debug, Default)]
struct Probes {
    traffic: TrafficProbes,
    sockets: Option<SocketProbes>,
    /// The RTT map, read by scrapes without the probes' lock.
    rtt: Option<Arc<telemetry::RttReader>>,
    watched: Vec<Watched>,
    arrived: Vec<Arrived>,
    staged: Vec<Staged>,
    refused: u64,
    /// Shares whose TCP connections are paced: (pod UID, namespace cookie, address).
    paced: Vec<(String, u64, std::net::IpAddr)>,
}

/// Program instances loaded ahead of need, refilled in the background.
#[derive(Debug, Default)]
struct Pool {
    ready: Mutex<Vec<telemetry::Loaded>>,
    /// How many to keep ready (0: none, every attachment loads its own).
    target: usize,
    /// Wakes the refiller.
    refill: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

/// The node's telemetry: the probes, what they watch, and the driver's own metrics.
#[derive(Debug)]
pub struct Telemetry {
    probes: Mutex<Probes>,
    pool: Arc<Pool>,
    max_claims: usize,
    host: HostRoot,
    /// NodePrepareResources calls, seconds.
    pub prepare_seconds: Histogram,
    /// Attaching one pod's interfaces (RunPodSandbox's work), seconds.
    pub attach_seconds: Histogram,
    /// Of that, the kernel's requests that put the interfaces in the pod (moves, shares'
    /// creation), seconds: the rest is knd's own work.
    pub attach_kernel_seconds: Histogram,
    /// Devices in the published pool.
    pub published_devices: Gauge,
    /// Pods whose interfaces could not be attached.
    pub attach_failures: prometheus_client::metrics::counter::Counter,
    /// Pod records that could not be read and were moved aside.
    pub quarantined_records: prometheus_client::metrics::counter::Counter,
    /// GPU–NIC distance class of prepared claims with GPUs (rank 0 PIX … 4 SYS).
    pub gpu_nic_distance: prometheus_client::metrics::family::Family<DistanceLabels, Gauge>,
    /// Each device's health as reported to kubelet (1 healthy, 0 not), by device.
    pub device_healthy: prometheus_client::metrics::family::Family<DeviceLabel, Gauge>,
    /// 1 when the sock_ops program measures TCP RTT on the node's cgroup v2 root, else 0.
    pub rtt_enabled: Gauge,
    /// Why TCP RTT is not measured (`None` when it is).
    rtt_problem: Option<String>,
}

/// The `device` label of the device health gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct DeviceLabel {
    /// The device's name in knd's pool.
    pub device: String,
}

impl Telemetry {
    /// Telemetry for at most `max_claims` watched interfaces (the cardinality guard: more are
    /// counted in `knd_telemetry_refused_total`, not exported). TCP RTT is measured when the
    /// sock_ops program can be attached to `cgroup` (a cgroup v2 directory); otherwise that is
    /// logged and the RTT series are absent.
    pub fn new(cgroup: Option<&Path>, max_claims: usize) -> Self {
        let attached = match cgroup {
            None => Err(
                "no cgroup v2 hierarchy is mounted where knd runs (mount the host's \
                         /sys/fs/cgroup)"
                    .to_owned(),
            ),
            Some(dir) => telemetry::check_cgroup_root(dir).and_then(|()| {
                SocketProbes::attach(dir).map_err(|error| {
                    format!(
                        "cannot attach the sock_ops program to {}: {}",
                        dir.display(),
                        crate::model::error_chain(&error)
                    )
                })
            }),
        };
        let (sockets, rtt_problem) = match attached {
            Ok(probes) => (Some(probes), None),
            Err(problem) => {
                tracing::error!(%problem, "TCP RTT and retransmits are NOT measured");
                (None, Some(problem))
            }
        };
        let rtt_enabled = Gauge::default();
        rtt_enabled.set(i64::from(sockets.is_some()));
        let rtt = sockets.as_ref().and_then(|s| {
            s.reader()
                .inspect_err(
                    |e| tracing::warn!(error = %crate::model::error_chain(e), "cannot read the RTT map"),
                )
                .ok()
                .map(Arc::new)
        });
        Self {
            probes: Mutex::new(Probes {
                sockets,
                rtt,
                ..Probes::default()
            }),
            pool: Arc::default(),
            max_claims,
            host: HostRoot::new("/"),
            // 100 µs … ~3.3 s.
            prepare_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            attach_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            attach_kernel_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            published_devices: Gauge::default(),
            attach_failures: prometheus_client::metrics::counter::Counter::default(),
            quarantined_records: prometheus_client::metrics::counter::Counter::default(),
            device_healthy: prometheus_client::metrics::family::Family::default(),
            gpu_nic_distance: prometheus_client::metrics::family::Family::default(),
            rtt_enabled,
            rtt_problem,
        }
    }

    /// Why TCP RTT is not measured on this node (`None` when it is).
    pub fn rtt_problem(&self) -> Option<&str> {
        self.rtt_problem.as_deref()
    }

    /// Keeps `count` instances of the counting programs loaded and verified ahead of need
    /// (refilled on a thread of its own), so attaching at a pod's start only links them.
    #[must_use]
    pub fn with_ready_programs(mut self, count: usize) -> Self {
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let pool = Arc::new(Pool {
            ready: Mutex::default(),
            target: count,
            refill: Mutex::new(Some(wake.clone())),
        });
        let weak = Arc::downgrade(&pool);
        let spawned = std::thread::Builder::new()
            .name("knd-bpf-pool".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    let Some(pool) = weak.upgrade() else { return };
                    while lock(&pool.ready).len() < pool.target {
                        // Loaded without any lock held: scrapes and attachments go on.
                        match telemetry::Loaded::new() {
                            Ok(loaded) => lock(&pool.ready).push(loaded),
                            Err(error) => {
                                tracing::warn!(error = %crate::model::error_chain(&error), "cannot load the counting programs ahead");
                                return;
                            }
                        }
                    }
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the program pool");
        }
        wake.send(()).ok();
        self.pool = pool;
        self
    }

    /// A loaded instance from the pool, asking for another.
    fn ready(&self) -> Option<telemetry::Loaded> {
        let ready = lock(&self.pool.ready).pop();
        if let Some(wake) = lock(&self.pool.refill).as_ref() {
            wake.send(()).ok();
        }
        ready
    }

    /// A loaded instance from the pool, else one loaded now.
    fn loaded(&self) -> telemetry::Result<telemetry::Loaded> {
        self.ready().map_or_else(telemetry::Loaded::new, Ok)
    }

    /// Instances loaded and waiting.
    pub fn ready_programs(&self) -> usize {
        lock(&self.pool.ready).len()
    }

    /// Links the counting programs to `interface` on the host: the NIC of `device` prepared for
    /// claim `claim_uid`, before its pod starts. TCX links stay with the device when it moves
    /// into the pod, so [`Self::arrive`] then only resets the counters — the kernel's two RCU
    /// grace periods of linking are spent here, off the pod's start. Blocking.
    pub fn stage(
        &self,
        claim_uid: &str,
        device: &str,
        host: &Netns,
        interface: &str,
    ) -> telemetry::Result<()> {
        let staged = |probes: &Probes| {
            probes
                .staged
                .iter()
                .any(|s| s.claim_uid == claim_uid && s.device == device)
        };
        if staged(&self.probes()) {
            return Ok(());
        }
        let loaded = self.loaded()?;
        let mut probes = self.probes();
        if staged(&probes) {
            return Ok(());
        }
        let counting = start_counting(
            &mut probes.traffic,
            loaded,
            (host, interface, telemetry::Classifiers::Counting),
            None,
        )?;
        probes.staged.push(Staged {
            claim_uid: claim_uid.to_owned(),
            device: device.to_owned(),
            counting,
        });
        Ok(())
    }

    /// Whether `device` of claim `claim_uid` has its programs linked ahead.
    pub fn is_staged(&self, claim_uid: &str, device: &str) -> bool {
        self.probes()
            .staged
            .iter()
            .any(|s| s.claim_uid == claim_uid && s.device == device)
    }

    /// Unlinks what was linked ahead for claim `claim_uid` and not taken by a pod.
    pub fn unstage(&self, claim_uid: &str) {
        let mut probes = self.probes();
        let Probes {
            traffic, staged, ..
        } = &mut *probes;
        staged.retain(|s| {
            if s.claim_uid != claim_uid {
                return true;
            }
            traffic.detach(s.counting.attachment).ok();
            false
        });
    }

    /// Starts counting on `interface`, which has just arrived in `pod_ns` for pod `pod_uid`
    /// and is not up yet, with `classifiers` (a share's police as well): every frame it
    /// carries in the pod is counted. `baseline` is the kernel's counters of the interface
    /// now. Blocking (links programs in the namespace); the claim's labels and series follow
    /// with [`Self::watch`]. Only an instance loaded ahead is used: loading is never done on a
    /// pod's start. With none ready (a burst of pods, knd just started) it returns `false` and
    /// the interface is counted from [`Self::watch`] on.
    pub fn arrive(
        &self,
        (claim_uid, device): (&str, &str),
        pod_uid: &str,
        (pod_ns, interface, classifiers): (&Netns, &str, telemetry::Classifiers),
        baseline: LinkStats,
    ) -> telemetry::Result<bool> {
        {
            let mut probes = self.probes();
            if let Some(index) = probes
                .staged
                .iter()
                .position(|s| s.claim_uid == claim_uid && s.device == device)
            {
                // Linked ahead: what it counted on the host goes; the device carries nothing
                // while it is down, so the pod's count starts exactly here.
                let mut counting = probes.staged.swap_remove(index).counting;
                let reset = probes
                    .traffic
                    .reset(counting.attachment)
                    .and_then(|()| probes.traffic.moved(counting.attachment, pod_ns, interface));
                if let Err(error) = reset {
                    probes.traffic.detach(counting.attachment).ok();
                    return Err(error);
                }
                counting.baseline = Some(baseline);
                counting.since = unix_seconds();
                probes.arrived.push(Arrived {
                    pod_uid: pod_uid.to_owned(),
                    interface: interface.to_owned(),
                    counting,
                });
                return Ok(true);
            }
        }
        let Some(loaded) = self.ready() else {
            return Ok(false);
        };
        let mut probes = self.probes();
        if probes.watched.len() + probes.arrived.len() >= self.max_claims {
            return Ok(false);
        }
        let counting = start_counting(
            &mut probes.traffic,
            loaded,
            (pod_ns, interface, classifiers),
            Some(baseline),
        )?;
        probes.arrived.push(Arrived {
            pod_uid: pod_uid.to_owned(),
            interface: interface.to_owned(),
            counting,
        });
        Ok(true)
    }

    /// Holds `interface` of pod `pod_uid` (in `pod_ns`) to a bandwidth share of `bandwidth`
    /// bits per second: the policer on the interface's counting instance ([`ShareLimits`]:
    /// egress always, ingress when `police_ingress`), and the pacing of the pod's TCP
    /// connections from `addresses`, where the sock_ops program runs. Counting is started here
    /// if it did not start on arrival. Blocking. Idempotent.
    pub fn enforce_share(
        &self,
        (pod_uid, pod_ns, interface): (&str, &Netns, &str),
        bandwidth: u64,
        police_ingress: bool,
        addresses: &[std::net::IpAddr],
    ) -> telemetry::Result<()> {
        let rate = bandwidth / 8;
        let policer = knd_common::Policer::new(rate, knd_common::policer_burst(rate));
        let limits = telemetry::ShareLimits {
            ingress: police_ingress.then_some(policer),
            egress: Some(policer),
        };
        let find = |probes: &Probes| {
            probes
                .arrived
                .iter()
                .find(|a| a.pod_uid == pod_uid && a.interface == interface)
                .map(|a| a.counting.attachment)
                .or_else(|| {
                    probes
                        .watched
                        .iter()
                        .find(|w| w.pod_uid == pod_uid && w.labels.interface == interface)
                        .map(|w| w.counting.attachment)
                })
        };
        if find(&self.probes()).is_none() {
            let loaded = self.loaded()?;
            let mut probes = self.probes();
            if find(&probes).is_none() {
                let counting = start_counting(
                    &mut probes.traffic,
                    loaded,
                    (pod_ns, interface, telemetry::Classifiers::Policing),
                    None,
                )?;
                probes.arrived.push(Arrived {
                    pod_uid: pod_uid.to_owned(),
                    interface: interface.to_owned(),
                    counting,
                });
            }
        }
        let mut probes = self.probes();
        let attachment = find(&probes).ok_or(telemetry::Error::NoSuchInterface {
            interface: interface.to_owned(),
            namespace: pod_ns.to_string(),
        })?;
        probes.traffic.police(attachment, limits)?;
        let Probes {
            arrived, watched, ..
        } = &mut *probes;
        for counting in arrived
            .iter_mut()
            .map(|a| &mut a.counting)
            .chain(watched.iter_mut().map(|w| &mut w.counting))
            .filter(|c| c.attachment == attachment)
        {
            counting.policed = true;
        }
        let cookie = pod_ns.cookie()?;
        let Probes { sockets, paced, .. } = &mut *probes;
        let Some(sockets) = sockets.as_mut() else {
            tracing::warn!(
                interface,
                "no sock_ops program: the share's TCP connections are not paced, only policed"
            );
            return Ok(());
        };
        // TCP paces IP packets; the policer meters frames, 14 bytes of Ethernet header more
        // per packet (0.9 % at a 1500-byte MTU): paced at 1/64 under the share, a flow at its
        // pace never meets the policer.
        let paced_rate = rate - rate / 64;
        for &address in addresses {
            sockets.pace(cookie, address, paced_rate)?;
            let entry = (pod_uid.to_owned(), cookie, address);
            if !paced.contains(&entry) {
                paced.push(entry);
            }
        }
        Ok(())
    }

    /// Reads RDMA counters below `host` instead of `/` (the daemon's `--host-root`).
    #[must_use]
    pub fn with_host_root(mut self, host: HostRoot) -> Self {
        self.host = host;
        self
    }

    fn probes(&self) -> MutexGuard<'_, Probes> {
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the RTT program is attached.
    pub fn measures_rtt(&self) -> bool {
        self.probes().sockets.is_some()
    }

    /// Starts watching `labels.interface` inside `pod_ns` for pod `pod_uid` (programs loaded
    /// and attached there; counting starts now), and the hardware counters of the RDMA devices
    /// `rdma` behind it. Blocking: loads eBPF programs. Watching an interface already watched for
    /// this pod is a no-op. It counts with the programs linked on the interface's arrival or by
    /// [`Self::enforce_share`], else with counting-only ones: a share is enforced first.
    pub fn watch(
        &self,
        pod_uid: &str,
        pod_ns: &Netns,
        labels: ClaimLabels,
        rdma: Vec<String>,
    ) -> telemetry::Result<()> {
        let mut probes = self.probes();
        if probes
            .watched
            .iter()
            .any(|w| w.pod_uid == pod_uid && w.labels.interface == labels.interface)
        {
            return Ok(());
        }
        if probes.watched.len() >= self.max_claims {
            probes.refused += 1;
            tracing::warn!(
                claim = %labels.claim,
                limit = self.max_claims,
                "not watching another interface: the series limit is reached"
            );
            return Ok(());
        }
        let cookie = pod_ns.cookie()?;
        // Counting since the interface arrived, if it did under this knd; else from now.
        let early = probes
            .arrived
            .iter()
            .position(|a| a.pod_uid == pod_uid && a.interface == labels.interface);
        let counting = if let Some(index) = early {
            probes.arrived.swap_remove(index).counting
        } else {
            drop(probes);
            let loaded = self.loaded()?;
            probes = self.probes();
            start_counting(
                &mut probes.traffic,
                loaded,
                (pod_ns, &labels.interface, telemetry::Classifiers::Counting),
                None,
            )?
        };
        let first_of_pod = !probes.watched.iter().any(|w| w.cookie == cookie);
        if let Some(sockets) = probes.sockets.as_mut()
            && first_of_pod
            && let Err(error) = sockets.watch(cookie)
        {
            tracing::warn!(error = %crate::model::error_chain(&error), "cannot measure the pod's TCP RTT");
        }
        probes.watched.push(Watched {
            pod_uid: pod_uid.to_owned(),
            labels,
            counting,
            cookie,
            rdma,
        });
        Ok(())
    }

    /// Stops watching everything of pod `pod_uid`; its series go.
    pub fn unwatch_pod(&self, pod_uid: &str) {
        let mut probes = self.probes();
        let Probes {
            traffic,
            sockets,
            watched,
            arrived,
            paced,
            ..
        } = &mut *probes;
        paced.retain(|(uid, cookie, address)| {
            if uid != pod_uid {
                return true;
            }
            if let Some(sockets) = sockets.as_mut() {
                sockets.unpace(*cookie, *address).ok();
            }
            false
        });
        arrived.retain(|a| {
            if a.pod_uid != pod_uid {
                return true;
            }
            traffic.detach(a.counting.attachment).ok();
            false
        });
        let mut cookies = Vec::new();
        watched.retain(|w| {
            if w.pod_uid != pod_uid {
                return true;
            }
            if let Err(error) = traffic.detach(w.counting.attachment) {
                tracing::warn!(error = %crate::model::error_chain(&error), "detaching the traffic programs");
            }
            cookies.push(w.cookie);
            false
        });
        if let Some(sockets) = sockets.as_mut() {
            for cookie in cookies {
                if !watched.iter().any(|w| w.cookie == cookie)
                    && let Err(error) = sockets.unwatch(cookie)
                {
                    tracing::warn!(error = %crate::model::error_chain(&error), "forgetting a pod's RTT");
                }
            }
        }
    }

    /// Whether pod `pod_uid` has any interface watched.
    pub fn watches(&self, pod_uid: &str) -> bool {
        self.probes().watched.iter().any(|w| w.pod_uid == pod_uid)
    }

    /// A registry with every metric of this telemetry.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::default();
        registry.register(
            "knd_prepare_duration_seconds",
            "NodePrepareResources calls from kubelet",
            self.prepare_seconds.clone(),
        );
        registry.register(
            "knd_attach_duration_seconds",
            "Attaching a pod's claimed interfaces at RunPodSandbox",
            self.attach_seconds.clone(),
        );
        registry.register(
            "knd_attach_kernel_duration_seconds",
            "Of knd_attach_duration_seconds, the kernel's requests that put the interfaces in \
             the pod (moving a NIC, creating a share); the rest is knd's own work",
            self.attach_kernel_seconds.clone(),
        );
        registry.register(
            "knd_published_devices",
            "Devices in the published ResourceSlices",
            self.published_devices.clone(),
        );
        registry.register(
            "knd_attach_failures",
            "Pods whose claimed interfaces could not be attached at RunPodSandbox",
            self.attach_failures.clone(),
        );
        registry.register(
            "knd_quarantined_pod_records",
            "Pod records knd could not read and moved aside (state/pods/quarantine); the \
             interfaces they described need a look by hand",
            self.quarantined_records.clone(),
        );
        registry.register(
            "knd_device_healthy",
            "Device health as reported to kubelet: 1 healthy, 0 unhealthy (the reason is logged \
             and sent to kubelet)",
            self.device_healthy.clone(),
        );
        registry.register(
            "knd_claim_gpu_nic_distance",
            "Distance class between a claimed NIC and the closest GPU of its claim: 0 PIX, 1 PXB, \
             2 PHB, 3 NODE, 4 SYS (also the class label)",
            self.gpu_nic_distance.clone(),
        );
        registry.register(
            "knd_telemetry_rtt_enabled",
            "1 when the sock_ops program measures TCP RTT and retransmits on the node's cgroup v2 \
             root, 0 when not (the reason is logged and shown by /readyz)",
            self.rtt_enabled.clone(),
        );
        registry.register_collector(Box::new(ClaimCollector(Arc::clone(self))));
        registry
    }

    /// Sets the health gauge of every device in `devices`; devices gone from the list lose
    /// their series.
    pub fn set_device_health(&self, devices: &[crate::model::ports::DeviceHealth]) {
        self.device_healthy.clear();
        for device in devices {
            self.device_healthy
                .get_or_create(&DeviceLabel {
                    device: device.device.clone(),
                })
                .set(i64::from(device.healthy));
        }
    }
}

/// Encodes `registry` in the Prometheus text format (OpenMetrics).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(%error, "encoding metrics");
    }
    text
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
struct ClaimCollector(Arc<Telemetry>);

/// What one watched interface reads at scrape time.
/// Links `loaded` on `interface` in `netns` and opens its counters for scrapes.
fn start_counting(
    traffic: &mut TrafficProbes,
    loaded: telemetry::Loaded,
    (netns, interface, classifiers): (&Netns, &str, telemetry::Classifiers),
    baseline: Option<LinkStats>,
) -> telemetry::Result<Counting> {
    let attachment = traffic.attach_loaded(loaded, netns, interface, classifiers)?;
    let reader = match traffic.reader(attachment) {
        Ok(reader) => Arc::new(reader),
        Err(error) => {
            traffic.detach(attachment).ok();
            return Err(error);
        }
    };
    Ok(Counting {
        attachment,
        reader,
        policed: false,
        since: unix_seconds(),
        baseline,
    })
}

/// Now, in seconds since the epoch.
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Reading {
    labels: Vec<(&'static str, String)>,
    policed: bool,
    since: f64,
    baseline: Option<LinkStats>,
    detail: TrafficDetail,
    rtt: Option<RttStats>,
    rdma: Vec<(String, RdmaPortCounters)>,
}

fn with(labels: &[(&'static str, String)], more: &[(&'static str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .chain(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
        .collect()
}

type Counter = ConstCounter<u64>;

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Vec<(String, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        Counter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// `(sum, count, buckets)` of a log2 histogram in Prometheus form.
type HistogramSeries = (Vec<(String, String)>, f64, u64, Vec<(f64, u64)>);

fn histogram_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[HistogramSeries],
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, sum, count, buckets) in series {
        family
            .encode_family(labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                *sum, *count, buckets, None,
            )?;
    }
    Ok(())
}

/// Bucket bounds: `bound(i)` for all but the last bucket, which is `+Inf`.
fn buckets(counts: &[u64], bound: impl Fn(usize) -> f64) -> Vec<(f64, u64)> {
    let last = counts.len().saturating_sub(1);
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| (if i == last { f64::INFINITY } else { bound(i) }, n))
        .collect()
}

impl Collector for ClaimCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Under the lock only what to read (handles of their own on the maps); the kernel and
        // sysfs reads after it, so a pod's stop (which unwatches under the lock) never waits
        // for a scrape.
        let (targets, rtt, watched, refused) = {
            let probes = self.0.probes();
            let targets: Vec<_> = probes
                .watched
                .iter()
                .map(|w| {
                    (
                        w.labels.pairs(),
                        Arc::clone(&w.counting.reader),
                        (w.counting.since, w.counting.baseline, w.counting.policed),
                        w.cookie,
                        w.rdma.clone(),
                    )
                })
                .collect();
            (
                targets,
                probes.rtt.clone(),
                probes.watched.len(),
                probes.refused,
            )
        };
        let readings: Vec<Reading> = targets
            .into_iter()
            .filter_map(|(labels, reader, (since, baseline, policed), cookie, rdma)| {
                let detail = reader
                    .detail()
                    .inspect_err(
                        |e| tracing::warn!(error = %crate::model::error_chain(e), "reading counters"),
                    )
                    .ok()?;
                let rtt = rtt.as_ref().and_then(|r| r.rtt(cookie).ok().flatten());
                let rdma = rdma
                    .iter()
                    .flat_map(|device| {
                        telemetry::rdma_counters(&self.0.host, device)
                            .into_iter()
                            .map(|port| (device.clone(), port))
                    })
                    .collect();
                Some(Reading {
                    labels,
                    policed,
                    since,
                    baseline,
                    detail,
                    rtt,
                    rdma,
                })
            })
            .collect();
        let gauge = encoder.encode_descriptor(
            "knd_telemetry_watched_interfaces",
            "Claimed interfaces whose traffic is measured",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(watched).unwrap_or(i64::MAX)).encode(gauge)?;
        let counter = encoder.encode_descriptor(
            "knd_telemetry_refused",
            "Interfaces not measured because the series limit was reached",
            None,
            MetricType::Counter,
        )?;
        Counter::new(refused).encode(counter)?;

        encode_since(&mut encoder, &readings)?;
        encode_traffic(&mut encoder, &readings)?;
        encode_rdma(&mut encoder, &readings)?;
        encode_rtt(&mut encoder, &readings)
    }
}

/// When each claim's counting started and the interface's own counters then: knd's totals
/// equal the kernel's counters of the interface less these.
fn encode_since(
    encoder: &mut DescriptorEncoder,
    readings: &[Reading],
) -> Result<(), std::fmt::Error> {
    if readings.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(
        "knd_claim_attached_timestamp_seconds",
        "When knd started counting the claimed interface (as it arrived in the pod, before it \
         was set up there, unless knd restarted since)",
        None,
        MetricType::Gauge,
    )?;
    for r in readings {
        ConstGauge::new(r.since).encode(family.encode_family(&with(&r.labels, &[]))?)?;
    }
    let mut bytes = Vec::new();
    let mut packets = Vec::new();
    for r in readings {
        if let Some(b) = r.baseline {
            for (direction, octets, frames) in [
                ("rx", b.rx_bytes, b.rx_packets),
                ("tx", b.tx_bytes, b.tx_packets),
            ] {
                bytes.push((with(&r.labels, &[("direction", direction)]), octets));
                packets.push((with(&r.labels, &[("direction", direction)]), frames));
            }
        }
    }
    for (name, help, series) in [
        (
            "knd_claim_baseline_bytes",
            "The interface's own byte counters when knd started counting it",
            &bytes,
        ),
        (
            "knd_claim_baseline_packets",
            "The interface's own frame counters when knd started counting it",
            &packets,
        ),
    ] {
        if series.is_empty() {
            continue;
        }
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in series {
            ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX))
                .encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

/// One of the four totals.
#[derive(Clone, Copy)]
enum Pick {
    RxBytes,
    TxBytes,
    RxPackets,
    TxPackets,
}

impl Pick {
    fn of(self, detail: &TrafficDetail) -> u64 {
        match self {
            Self::RxBytes => detail.rx.total().bytes,
            Self::TxBytes => detail.tx.total().bytes,
            Self::RxPackets => detail.rx.total().packets,
            Self::TxPackets => detail.tx.total().packets,
        }
    }
}

/// What the policers of bandwidth shares dropped, by direction (only for policed claims).
fn encode_policed(
    encoder: &mut DescriptorEncoder,
    readings: &[Reading],
) -> Result<(), std::fmt::Error> {
    if readings.is_empty() {
        return Ok(());
    }
    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    for r in readings.iter().filter(|r| r.policed) {
        for (direction, dropped) in [("rx", r.detail.policed_rx), ("tx", r.detail.policed_tx)] {
            let labels = with(&r.labels, &[("direction", direction)]);
            packets.push((labels.clone(), dropped.packets));
            bytes.push((labels, dropped.bytes));
        }
    }
    if packets.is_empty() {
        // Declared with the other claim series even when no claim is a share, so dashboards
        // and alerts can name them.
        for (name, help) in [
            (
                "knd_claim_policed_packets",
                "Frames the policer of the claim's bandwidth share dropped",
            ),
            (
                "knd_claim_policed_bytes",
                "Bytes the policer of the claim's bandwidth share dropped",
            ),
        ] {
            encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        }
        return Ok(());
    }
    counter_family(
        encoder,
        "knd_claim_policed_packets",
        "Frames the policer of the claim's bandwidth share dropped",
        &packets,
    )?;
    counter_family(
        encoder,
        "knd_claim_policed_bytes",
        "Bytes the policer of the claim's bandwidth share dropped",
        &bytes,
    )
}

/// Bytes and frames: totals, by class, RoCEv2 by opcode class, frame sizes.
fn encode_traffic(
    encoder: &mut DescriptorEncoder,
    readings: &[Reading],
) -> Result<(), std::fmt::Error> {
    let encoder = &mut *encoder;
    for (name, help, pick) in [
        (
            "knd_claim_rx_bytes",
            "Bytes the claimed interface received",
            Pick::RxBytes,
        ),
        (
            "knd_claim_tx_bytes",
            "Bytes the claimed interface sent",
            Pick::TxBytes,
        ),
        (
            "knd_claim_rx_packets",
            "Frames the claimed interface received",
            Pick::RxPackets,
        ),
        (
            "knd_claim_tx_packets",
            "Frames the claimed interface sent",
            Pick::TxPackets,
        ),
    ] {
        let series: Vec<_> = readings
            .iter()
            .map(|r| (with(&r.labels, &[]), pick.of(&r.detail)))
            .collect();
        counter_family(encoder, name, help, &series)?;
    }
    encode_policed(encoder, readings)?;
    let mut class_bytes = Vec::new();
    let mut class_packets = Vec::new();
    let mut roce_packets = Vec::new();
    let mut roce_bytes = Vec::new();
    let mut sizes = Vec::new();
    for r in readings {
        for (direction, detail) in [("rx", &r.detail.rx), ("tx", &r.detail.tx)] {
            for (i, name) in class::NAMES.iter().enumerate() {
                let labels = with(&r.labels, &[("direction", direction), ("class", name)]);
                class_bytes.push((labels.clone(), detail.classes[i].bytes));
                class_packets.push((labels, detail.classes[i].packets));
            }
            for (i, name) in roce::NAMES.iter().enumerate() {
                if detail.roce[i].packets > 0 {
                    let labels = with(
                        &r.labels,
                        &[("direction", direction), ("opcode_class", name)],
                    );
                    roce_bytes.push((labels.clone(), detail.roce[i].bytes));
                    roce_packets.push((labels, detail.roce[i].packets));
                }
            }
            let total = detail.total();
            #[expect(
                clippy::cast_precision_loss,
                reason = "a byte sum as a float sample sum"
            )]
            let sum = total.bytes as f64;
            sizes.push((
                with(&r.labels, &[("direction", direction)]),
                sum,
                total.packets,
                buckets(&detail.sizes, |i| {
                    f64::from(1_u32 << (SIZE_MIN_SHIFT + u32::try_from(i).unwrap_or(0)))
                }),
            ));
        }
    }
    counter_family(
        encoder,
        "knd_claim_class_bytes",
        "Bytes by direction and traffic class (tcp, udp, roce, other)",
        &class_bytes,
    )?;
    counter_family(
        encoder,
        "knd_claim_class_packets",
        "Frames by direction and traffic class (tcp, udp, roce, other)",
        &class_packets,
    )?;
    counter_family(
        encoder,
        "knd_claim_roce_packets",
        "RoCEv2 frames by direction and BTH opcode class",
        &roce_packets,
    )?;
    counter_family(
        encoder,
        "knd_claim_roce_bytes",
        "RoCEv2 bytes by direction and BTH opcode class",
        &roce_bytes,
    )?;
    histogram_family(
        encoder,
        "knd_claim_frame_size_bytes",
        "Frame sizes by direction (GSO/GRO super-frames count once)",
        &sizes,
    )?;

    Ok(())
}

/// The RDMA devices' port and hardware counters (sysfs), by device and port.
fn encode_rdma(
    encoder: &mut DescriptorEncoder,
    readings: &[Reading],
) -> Result<(), std::fmt::Error> {
    type Series = Vec<(Vec<(String, String)>, u64)>;
    let (mut tx_bytes, mut rx_bytes, mut tx_packets, mut rx_packets): (
        Series,
        Series,
        Series,
        Series,
    ) = Default::default();
    let (mut cnp, mut hw): (Series, Series) = Default::default();
    for r in readings {
        for (device, port) in &r.rdma {
            let number = port.port.to_string();
            let labels = with(&r.labels, &[("rdma_device", device), ("port", &number)]);
            tx_bytes.push((labels.clone(), port.tx_bytes));
            rx_bytes.push((labels.clone(), port.rx_bytes));
            tx_packets.push((labels.clone(), port.tx_packets));
            rx_packets.push((labels.clone(), port.rx_packets));
            for (kind, counter) in [("sent", "np_cnp_sent"), ("handled", "rp_cnp_handled")] {
                if let Some(value) = port.hw.get(counter) {
                    let mut labels = labels.clone();
                    labels.push(("kind".to_owned(), kind.to_owned()));
                    cnp.push((labels, *value));
                }
            }
            for (name, value) in &port.hw {
                let mut labels = labels.clone();
                labels.push(("counter".to_owned(), name.clone()));
                hw.push((labels, *value));
            }
        }
    }
    counter_family(
        encoder,
        "knd_claim_rdma_tx_bytes",
        "Bytes the claimed RDMA port sent (port_xmit_data x 4)",
        &tx_bytes,
    )?;
    counter_family(
        encoder,
        "knd_claim_rdma_rx_bytes",
        "Bytes the claimed RDMA port received (port_rcv_data x 4)",
        &rx_bytes,
    )?;
    counter_family(
        encoder,
        "knd_claim_rdma_tx_packets",
        "Packets the claimed RDMA port sent",
        &tx_packets,
    )?;
    counter_family(
        encoder,
        "knd_claim_rdma_rx_packets",
        "Packets the claimed RDMA port received",
        &rx_packets,
    )?;
    counter_family(
        encoder,
        "knd_claim_rdma_cnp",
        "RoCE congestion notifications sent (as notification point) and handled (as reaction point)",
        &cnp,
    )?;
    counter_family(
        encoder,
        "knd_claim_rdma_hw_events",
        "Every hardware counter of the claimed RDMA port, by name",
        &hw,
    )
}

/// TCP round-trip times and retransmissions of each claim's pod.
fn encode_rtt(
    encoder: &mut DescriptorEncoder,
    readings: &[Reading],
) -> Result<(), std::fmt::Error> {
    let mut rtts = Vec::new();
    let mut retransmits = Vec::new();
    for r in readings {
        if let Some(rtt) = &r.rtt {
            #[expect(clippy::cast_precision_loss, reason = "microsecond sums as seconds")]
            let sum = rtt.sum_us as f64 / 1e6;
            rtts.push((
                with(&r.labels, &[]),
                sum,
                rtt.samples,
                buckets(&rtt.buckets, |i| {
                    f64::from(1_u32 << i.min(RTT_BUCKETS - 1)) / 1e6
                }),
            ));
            retransmits.push((with(&r.labels, &[]), rtt.retransmits));
        }
    }
    histogram_family(
        encoder,
        "knd_claim_tcp_rtt_seconds",
        "Smoothed TCP round-trip time samples of the pod's connections",
        &rtts,
    )?;
    counter_family(
        encoder,
        "knd_claim_tcp_retransmits",
        "TCP segments the pod retransmitted",
        &retransmits,
    )?;
    Ok(())
}

/// Labels of `knd_claim_gpu_nic_distance`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct DistanceLabels {
    /// Claim namespace.
    pub namespace: String,
    /// Claim name.
    pub claim: String,
    /// Our device.
    pub device: String,
    /// The GPU's PCI address.
    pub gpu: String,
    /// The distance class.
    pub class: String,
}
