//! The `knd` command line: subcommands, their arguments, and what each one runs.

pub mod placement;
pub mod templates;
pub mod top;
pub mod topo;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    discover::inventory::{self, Inventory},
    observe::telemetry::{self, InterfaceTraffic, TrafficProbes},
    os::{
        host::HostRoot,
        netns::{self, Netns},
    },
    publish::resources,
};

/// knd — Kubernetes Network Driver (DRA + NRI) with in-kernel telemetry.
#[derive(Debug, Parser)]
#[command(name = "knd", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `knd=debug`); default from
    /// `RUST_LOG`, else `info`.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of `knd discover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SliceFormat {
    /// A JSON array of ResourceSlice objects.
    Json,
    /// A YAML stream, one document per ResourceSlice.
    Yaml,
}

/// Output formats of `knd topo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopoFormat {
    /// A GPU×NIC matrix for people.
    Table,
    /// `{"gpus":[…],"nics":[…],"pairs":[…]}`.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: publish this node's devices, serve kubelet's DRA calls, report health.
    Run(Box<crate::daemon::RunArgs>),
    /// Print the ResourceSlices this node would publish; excluded devices and unreadable files
    /// go to stderr with the reason.
    Discover {
        /// Read sysfs, procfs and devfs under this directory instead of `/`.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
        /// The node (and pool) name; default: `$NODE_NAME`, else the host's hostname.
        #[arg(long)]
        node_name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = SliceFormat::Json)]
        output: SliceFormat,
        /// Publish only devices this CEL expression accepts, e.g.
        /// `device.attributes["knd.dev"].rdma`.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Print the JSON Schema of the claim configuration (`knd.dev/v1alpha1` NetworkConfig).
    ConfigSchema,
    /// Print the GPU×NIC distance matrix (PIX/PXB/PHB/NODE/SYS).
    Topo {
        /// Read sysfs under this directory instead of `/`.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = TopoFormat::Table)]
        output: TopoFormat,
        /// Consider only devices this CEL expression accepts.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Print DeviceClasses and ResourceClaimTemplates for this node's topology: a GPU with its
    /// aligned NIC (same PCIe root, or per rail where roots hold several GPUs), NUMA-aligned
    /// pairs, RDMA NICs.
    Templates {
        /// Read sysfs under this directory instead of `/`.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
        /// The GPU driver's DeviceClass.
        #[arg(long, default_value = crate::cli::templates::DEFAULT_GPU_CLASS)]
        gpu_class: String,
        /// The node's `knd run --shared-nics` expression: adds a template for a share of
        /// the NICs it makes shared.
        #[arg(long)]
        shared_nics: Option<String>,
        /// The node named in the header; default: `$NODE_NAME`, else the host's hostname.
        #[arg(long)]
        node_name: Option<String>,
    },
    /// Evaluate the claims in a file (ResourceClaim or ResourceClaimTemplate, YAML or JSON)
    /// against ResourceSlices and DeviceClasses: which devices each request's selectors accept,
    /// which constraint fails and why, and the devices the scheduler would allocate. Exits with
    /// an error when a claim cannot be allocated.
    Explain {
        /// The file with the claims (may also hold DeviceClasses and ResourceSlices); `-` reads
        /// standard input.
        claim: PathBuf,
        /// ResourceSlices and DeviceClasses (e.g. `kubectl get resourceslices,deviceclasses -o
        /// yaml`); `-` reads standard input. Default: the slices this node would publish.
        #[arg(long)]
        slices: Option<PathBuf>,
        /// Without `--slices`: read sysfs under this directory instead of `/`.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
    },
    /// Every claimed interface on this node, live: rx/tx Gbit/s and packets/s, TCP RTT p50/p99
    /// and retransmits, RDMA Gbit/s and CNPs/s, from the daemon's metrics endpoint.
    Top {
        /// The daemon's metrics endpoint.
        #[arg(
            long,
            env = "KND_METRICS_URL",
            default_value = "http://127.0.0.1:9177/metrics"
        )]
        metrics_url: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Print each table below the last instead of redrawing the screen (the default when
        /// the output is not a terminal).
        #[arg(long)]
        no_redraw: bool,
    },
    /// Attach knd's traffic counters to one interface and print its rates every interval.
    Watch {
        /// The interface to watch.
        #[arg(long, short = 'i')]
        interface: String,
        /// Network namespace the interface lives in (e.g. /run/netns/NAME or /proc/PID/ns/net);
        /// default: knd's own.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Seconds between lines.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Stop after this many lines (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
}

/// Errors a subcommand reports to the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or entering a namespace failed.
    #[error(transparent)]
    Netns(#[from] netns::Error),
    /// Loading, attaching or reading the eBPF programs failed.
    #[error(transparent)]
    Telemetry(#[from] telemetry::Error),
    /// The `--filter` expression is invalid.
    #[error("--filter: {0}")]
    Filter(#[from] crate::publish::selector::Error),
    /// `--shared-nics` does not compile.
    #[error("--shared-nics: {0}")]
    SharedNics(#[source] crate::publish::selector::Error),
    /// The host root is not a directory.
    #[error("--host-root {0} is not a directory")]
    HostRoot(PathBuf),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::Error),
    /// Reading the daemon's metrics failed.
    #[error(transparent)]
    Scrape(#[from] top::ScrapeError),
    /// An input file could not be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Both inputs of `knd explain` were `-`.
    #[error("the claim file and --slices cannot both be standard input (`-`)")]
    BothStdin,
    /// The claim file holds no claim.
    #[error("{0} holds no ResourceClaim or ResourceClaimTemplate")]
    NoClaims(PathBuf),
    /// The inputs are malformed.
    #[error(transparent)]
    Placement(#[from] placement::Error),
    /// A claim cannot be allocated.
    #[error("cannot be allocated: {0}")]
    NotAllocatable(String),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Writing the output failed.
    #[error("cannot write the output")]
    Output(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn parse_interval(value: &str) -> Result<f64, String> {
    let seconds: f64 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number of seconds"))?;
    if (0.05..=3600.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("interval {seconds} s is outside 0.05..=3600"))
    }
}

/// Sets up logging to stderr.
pub fn init_tracing(filter: Option<&str>) {
    let filter = filter
        .map(tracing_subscriber::EnvFilter::new)
        .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(Error::Runtime)?;
            runtime.block_on(crate::daemon::main(*args))?;
            Ok(())
        }
        Command::Watch {
            interface,
            netns,
            interval,
            count,
        } => watch(&interface, netns.as_deref(), interval, count),
        Command::Top {
            metrics_url,
            interval,
            count,
            no_redraw,
        } => top(&metrics_url, interval, count, no_redraw),
        Command::Discover {
            host_root,
            node_name,
            output,
            filter,
        } => {
            let host = host_root_checked(host_root)?;
            let inventory = discover_filtered(&host, filter.as_deref())?;
            report_to_stderr(&inventory);
            let node = node_name.unwrap_or_else(|| node_name_of(&host));
            let slices = resources::slices(&inventory, resources::DRIVER_NAME, &node, 1, None);
            let text = match output {
                SliceFormat::Json => {
                    serde_json::to_string_pretty(&slices).map_err(|e| Error::Output(Box::new(e)))?
                }
                SliceFormat::Yaml => {
                    let mut text = String::new();
                    for slice in &slices {
                        text.push_str("---\n");
                        text.push_str(
                            &serde_yaml::to_string(slice)
                                .map_err(|e| Error::Output(Box::new(e)))?,
                        );
                    }
                    text
                }
            };
            println!("{}", text.trim_end());
            Ok(())
        }
        Command::Templates {
            host_root,
            gpu_class,
            node_name,
            shared_nics,
        } => print_templates(host_root, &gpu_class, node_name, shared_nics.as_deref()),
        Command::Explain {
            claim,
            slices,
            host_root,
        } => explain(&claim, slices.as_deref(), host_root),
        Command::ConfigSchema => {
            print!("{}", crate::model::config::json_schema());
            Ok(())
        }
        Command::Topo {
            host_root,
            output,
            filter,
        } => {
            let host = host_root_checked(host_root)?;
            let inventory = discover_filtered(&host, filter.as_deref())?;
            for warning in &inventory.warnings {
                eprintln!("warning: {warning}");
            }
            let report = topo::Report::new(&inventory);
            match output {
                TopoFormat::Table => print!("{}", report.table()),
                TopoFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .map_err(|e| Error::Output(Box::new(e)))?
                ),
            }
            Ok(())
        }
    }
}

/// `knd templates`.
fn print_templates(
    host_root: PathBuf,
    gpu_class: &str,
    node_name: Option<String>,
    shared_nics: Option<&str>,
) -> Result<(), Error> {
    let host = host_root_checked(host_root)?;
    let inventory = inventory::discover(&host);
    report_to_stderr(&inventory);
    let node = node_name.unwrap_or_else(|| node_name_of(&host));
    let mut templates = templates::generate(&inventory, gpu_class);
    if let Some(expression) = shared_nics {
        let selector =
            crate::publish::selector::Selector::compile(expression).map_err(Error::SharedNics)?;
        templates.extend(templates::share(&selector.shared_devices(&inventory)));
    }
    print!(
        "{}",
        templates::to_yaml(&templates, &node).map_err(|e| Error::Output(Box::new(e)))?
    );
    Ok(())
}

fn read_input(path: &std::path::Path) -> Result<String, Error> {
    let text = if path == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    text.map_err(|source| Error::Input {
        path: path.to_owned(),
        source,
    })
}

fn explain(
    claim: &std::path::Path,
    slices: Option<&std::path::Path>,
    host_root: PathBuf,
) -> Result<(), Error> {
    use crate::cli::placement::{Catalog, Claim, Documents};
    let stdin = std::path::Path::new("-");
    if claim == stdin && slices == Some(stdin) {
        return Err(Error::BothStdin);
    }
    let mut documents = Documents::parse(&read_input(claim)?, &claim.display().to_string())?;
    if documents.claims.is_empty() {
        return Err(Error::NoClaims(claim.to_owned()));
    }
    if let Some(path) = slices {
        documents.extend(Documents::parse(
            &read_input(path)?,
            &path.display().to_string(),
        )?);
    } else {
        let host = host_root_checked(host_root)?;
        let inventory = inventory::discover(&host);
        let node = node_name_of(&host);
        documents.slices.extend(resources::slices(
            &inventory,
            resources::DRIVER_NAME,
            &node,
            1,
            None,
        ));
    }
    // knd's own classes, unless the inputs define them.
    for template in templates::device_classes() {
        let name = &template.object["metadata"]["name"];
        let given = documents
            .classes
            .iter()
            .any(|c| c.metadata.name.as_deref() == name.as_str());
        if !given {
            documents.classes.push(
                serde_json::from_value(template.object).map_err(|e| Error::Output(Box::new(e)))?,
            );
        }
    }
    let catalog = Catalog::new(&documents.slices, &documents.classes)?;
    let mut failed = Vec::new();
    for (name, spec) in &documents.claims {
        let compiled = Claim::compile(name, spec)?;
        let (text, allocatable) = placement::explain(&compiled.evaluate(&catalog));
        print!("{text}");
        if !allocatable {
            failed.push(name.clone());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::NotAllocatable(failed.join(", ")))
    }
}

fn host_root_checked(path: PathBuf) -> Result<HostRoot, Error> {
    if path.is_dir() {
        Ok(HostRoot::new(path))
    } else {
        Err(Error::HostRoot(path))
    }
}

/// [`discover`], then `--filter` (compiled first, so a bad expression fails before the scan).
fn discover_filtered(host: &HostRoot, filter: Option<&str>) -> Result<Inventory, Error> {
    let selector = filter
        .map(crate::publish::selector::Selector::compile)
        .transpose()?;
    let mut inventory = inventory::discover(host);
    if let Some(selector) = &selector {
        selector.retain_in(&mut inventory);
    }
    Ok(inventory)
}

fn report_to_stderr(inventory: &Inventory) {
    for exclusion in &inventory.excluded {
        eprintln!("excluded: {}: {}", exclusion.device, exclusion.reason);
    }
    for warning in &inventory.warnings {
        eprintln!("warning: {warning}");
    }
}

/// `$NODE_NAME`, else the host's `/etc/hostname`, else this machine's hostname.
fn node_name_of(host: &HostRoot) -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            host.read("/etc/hostname")
                .ok()
                .flatten()
                .filter(|n| !n.is_empty())
        })
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "localhost".to_owned())
        .to_lowercase()
}

fn top(url: &str, interval: f64, count: Option<u64>, no_redraw: bool) -> Result<(), Error> {
    use std::io::{IsTerminal as _, Write as _};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let redraw = !no_redraw && std::io::stdout().is_terminal();
    let period = Duration::from_secs_f64(interval);
    runtime.block_on(async {
        let mut previous = top::scrape(url).await?;
        let mut taken = std::time::Instant::now();
        for _ in 0..count.unwrap_or(u64::MAX) {
            tokio::time::sleep(period).await;
            let now = top::scrape(url).await?;
            let elapsed = taken.elapsed();
            taken = std::time::Instant::now();
            let table = top::render(&top::rows(&previous, &now, elapsed));
            let mut out = std::io::stdout().lock();
            let written = if redraw {
                // Home and clear, then the table.
                write!(out, "\x1b[H\x1b[2J{table}")
            } else {
                writeln!(out, "{table}")
            };
            written
                .and_then(|()| out.flush())
                .map_err(|e| Error::Output(Box::new(e)))?;
            previous = now;
        }
        Ok(())
    })
}

fn watch(
    interface: &str,
    netns: Option<&std::path::Path>,
    interval: f64,
    count: Option<u64>,
) -> Result<(), Error> {
    let netns = match netns {
        Some(path) => Netns::open(path)?,
        None => Netns::current()?,
    };
    let mut probes = TrafficProbes::new();
    let id = probes.attach(&netns, interface)?;
    println!("watching {interface} in {netns} (TCX ingress+egress); Ctrl-C to stop");
    println!("{}", RateLine::header());
    let mut previous = probes.traffic(id)?;
    let period = Duration::from_secs_f64(interval);
    for _ in 0..count.unwrap_or(u64::MAX) {
        std::thread::sleep(period);
        let now = probes.traffic(id)?;
        println!("{}", RateLine::between(&previous, &now, interval));
        previous = now;
    }
    probes.detach(id)?;
    Ok(())
}

/// One line of rates between two readings of an interface's counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLine {
    /// Received bits per second.
    pub rx_bps: f64,
    /// Sent bits per second.
    pub tx_bps: f64,
    /// Received frames per second.
    pub rx_pps: f64,
    /// Sent frames per second.
    pub tx_pps: f64,
    /// Totals since attachment.
    pub total: InterfaceTraffic,
}

impl RateLine {
    /// Rates over `seconds` from `before` to `after`. Counters only grow; a reset (detach and
    /// re-attach) yields zero rates rather than huge ones.
    pub fn between(before: &InterfaceTraffic, after: &InterfaceTraffic, seconds: f64) -> Self {
        #[expect(clippy::cast_precision_loss, reason = "rates are for display")]
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
        Self {
            rx_bps: rate(before.rx.bytes, after.rx.bytes) * 8.0,
            tx_bps: rate(before.tx.bytes, after.tx.bytes) * 8.0,
            rx_pps: rate(before.rx.packets, after.rx.packets),
            tx_pps: rate(before.tx.packets, after.tx.packets),
            total: *after,
        }
    }

    /// The column titles matching [`RateLine`]'s `Display`.
    pub fn header() -> &'static str {
        "   rx Mbit/s    tx Mbit/s    rx pkt/s    tx pkt/s     rx bytes     tx bytes"
    }
}

impl std::fmt::Display for RateLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>12.2} {:>12.2} {:>11.0} {:>11.0} {:>12} {:>12}",
            self.rx_bps / 1e6,
            self.tx_bps / 1e6,
            self.rx_pps,
            self.tx_pps,
            self.total.rx.bytes,
            self.total.tx.bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use knd_common::TrafficCounters;

    use super::*;

    fn traffic(rx: (u64, u64), tx: (u64, u64)) -> InterfaceTraffic {
        InterfaceTraffic {
            rx: TrafficCounters {
                packets: rx.0,
                bytes: rx.1,
            },
            tx: TrafficCounters {
                packets: tx.0,
                bytes: tx.1,
            },
        }
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let line = RateLine::between(
            &traffic((10, 1_000), (5, 500)),
            &traffic((30, 251_000), (15, 1_500)),
            2.0,
        );
        assert!((line.rx_bps - 1_000_000.0).abs() < 1e-6, "{line:?}");
        assert!((line.tx_bps - 4_000.0).abs() < 1e-6, "{line:?}");
        assert!((line.rx_pps - 10.0).abs() < 1e-9);
        assert!((line.tx_pps - 5.0).abs() < 1e-9);
    }

    #[test]
    fn a_counter_reset_gives_zero_not_a_wraparound() {
        let line = RateLine::between(
            &traffic((10, 1_000), (5, 500)),
            &traffic((0, 0), (0, 0)),
            1.0,
        );
        assert!(line.rx_bps.abs() < f64::EPSILON && line.tx_pps.abs() < f64::EPSILON);
    }

    #[test]
    fn interval_is_validated_with_a_clear_message() {
        assert!(parse_interval("0.5").is_ok());
        assert!(parse_interval("abc").unwrap_err().contains("not a number"));
        assert!(parse_interval("0").unwrap_err().contains("outside"));
        let err = Cli::try_parse_from(["knd", "watch"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--interface"), "{err}");
    }
}
