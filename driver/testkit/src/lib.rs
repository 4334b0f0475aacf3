//! knd's test kit, a crate of its own that the product never links: throwaway hosts (network
//! namespaces), links between them and real traffic; sysfs fixtures of real machines; an
//! in-process Kubernetes API server; a kubelet stand-in; a containerd testbed.
//!
//! Everything is anonymous: a [`TestHost`] is a namespace held open by a file descriptor, so the
//! kernel destroys it — with every interface inside — when the handle is dropped, when a test
//! panics, and even when the process is killed. Nothing is left behind on the machine.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

pub mod apiserver;
pub mod claims;
pub mod daemonset;
pub mod kubelet;
pub mod links;
pub mod machines;
pub mod placement;
pub mod pods;
pub mod runtime;
pub mod sysfs;

use knd::{
    discover::inventory::{Inventory, Nic, netdev::Netdev},
    model::link::LinkStats,
    os::{netlink::Link, netns::Netns},
};

/// An inventory of NICs known only by their interface names (virtual stand-ins for hardware;
/// their device names are the interface names).
pub fn inventory_of<S: Into<String>>(interfaces: impl IntoIterator<Item = S>) -> Inventory {
    Inventory {
        nics: interfaces
            .into_iter()
            .map(|name| Nic {
                netdev: Some(Netdev {
                    name: name.into(),
                    ..Netdev::default()
                }),
                ..Nic::default()
            })
            .collect(),
        ..Inventory::default()
    }
}

/// The pool device name of the NIC whose interface on the node is `interface`.
pub fn device_named(inventory: &Inventory, interface: &str) -> Option<String> {
    inventory
        .nics
        .iter()
        .find(|n| n.netdev.as_ref().is_some_and(|d| d.name == interface))
        .map(knd::publish::resources::device_name)
}

/// True when the process may create namespaces and load eBPF programs.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A throwaway host: a fresh network namespace with `lo` up.
#[derive(Debug)]
pub struct TestHost {
    name: String,
    netns: Netns,
}

impl TestHost {
    /// Creates the host. `name` is only used in messages.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let netns = Netns::create().with_context(|| format!("creating test host {name}"))?;
        let host = Self {
            name: name.to_owned(),
            netns,
        };
        host.netlink(|link| async move { link.set_up("lo").await })?;
        Ok(host)
    }

    /// A host over an existing namespace (e.g. a pod's, opened from the path its runtime
    /// mounted); `name` is only used in messages.
    pub fn adopt(name: &str, netns: Netns) -> Self {
        Self {
            name: name.to_owned(),
            netns,
        }
    }

    /// The host's name, as given to [`TestHost::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Runs `work` on a thread inside this host's namespace.
    pub fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        self.netns
            .run(work)
            .with_context(|| format!("running inside test host {}", self.name))
    }

    /// The names of the TCX programs on `interface` in this host, ingress then egress.
    pub fn tcx_programs(&self, interface: &str) -> anyhow::Result<Vec<String>> {
        use aya::programs::{SchedClassifier, TcAttachType};
        self.run(|| {
            let mut names = Vec::new();
            for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, programs) = SchedClassifier::query_tcx(interface, direction)
                    .with_context(|| format!("querying the TCX programs of {interface}"))?;
                for program in programs {
                    names.push(program.name_as_str().unwrap_or("?").to_owned());
                }
            }
            Ok(names)
        })?
    }

    /// Runs netlink work inside this host's namespace.
    pub fn netlink<R, F, Fut>(&self, work: F) -> anyhow::Result<R>
    where
        F: FnOnce(Link) -> Fut + Send,
        Fut: Future<Output = Result<R, knd::os::netlink::Error>>,
        R: Send,
    {
        let result = self
            .netns
            .block_on(|| async move { work(Link::connect()?).await })?;
        result.with_context(|| format!("netlink in test host {}", self.name))
    }

    /// Brings `interface` up with `address/prefix_len`, after turning IPv6 off on it so that no
    /// background traffic (router solicitations, DAD, MLD) disturbs exact counts.
    pub fn configure(
        &self,
        interface: &str,
        address: IpAddr,
        prefix_len: u8,
    ) -> anyhow::Result<()> {
        self.disable_ipv6(interface)?;
        self.netlink(|link| async move {
            link.add_address(interface, address, prefix_len).await?;
            link.set_up(interface).await
        })
    }

    /// Brings `interface` up without addresses.
    pub fn set_up(&self, interface: &str) -> anyhow::Result<()> {
        self.netlink(|link| async move { link.set_up(interface).await })
    }

    /// Moves `interface` from this host into host `to`, as a driver moves a NIC into a pod.
    pub fn move_link(&self, interface: &str, to: &TestHost) -> anyhow::Result<()> {
        self.netlink(|link| async move { link.move_to(interface, to.netns()).await })
            .with_context(|| format!("moving {interface} from {} to {}", self.name, to.name))
    }

    /// Turns IPv6 off on `interface` (`net.ipv6.conf.<interface>.disable_ipv6 = 1`).
    pub fn disable_ipv6(&self, interface: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
        // /proc/sys/net resolves against the namespace of the thread that opens the file.
        self.run(|| std::fs::write(&path, "1"))?
            .with_context(|| format!("writing {path} in test host {}", self.name))
    }

    /// The kernel's counters for `interface`.
    pub fn link_stats(&self, interface: &str) -> anyhow::Result<LinkStats> {
        self.netlink(|link| async move { link.stats(interface).await })
    }

    /// Runs `ping -c count` from this host; fails unless every echo is answered.
    pub fn ping(&self, target: IpAddr, count: u32) -> anyhow::Result<()> {
        let output = self
            .run(|| {
                Command::new("ping")
                    .args([
                        "-n",
                        "-q",
                        "-c",
                        &count.to_string(),
                        "-i",
                        "0.05",
                        "-W",
                        "2",
                    ])
                    .arg(target.to_string())
                    .output()
            })?
            .context("running ping (install iputils-ping: cargo xtask setup does)")?;
        ensure!(
            output.status.success(),
            "ping {target} from {} failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stdout)
        );
        Ok(())
    }
}

/// Interfaces created in the test process's own (host) namespace, deleted on drop — for tests
/// that must see devices through the machine's real `/sys`.
#[derive(Debug)]
pub struct HostInterfaces {
    netns: Netns,
    names: Vec<String>,
}

impl HostInterfaces {
    /// A veth pair `<prefix>a` ↔ `<prefix>b` and a macvlan `<prefix>m` on `<prefix>a`, all up,
    /// in the calling process's namespace. `prefix` should be unique (e.g. include the pid).
    pub fn veth_and_macvlan(prefix: &str) -> anyhow::Result<Self> {
        let netns = Netns::current()?;
        let (a, b, m) = (
            format!("{prefix}a"),
            format!("{prefix}b"),
            format!("{prefix}m"),
        );
        let created = Self {
            netns,
            names: vec![a.clone()],
        };
        created
            .netns
            .block_on(|| async {
                let link = Link::connect()?;
                links::add_veth(&a, &b).await?;
                links::add_macvlan(&link, &m, &a).await?;
                for name in [&a, &b, &m] {
                    link.set_up(name).await?;
                }
                Ok::<_, knd::os::netlink::Error>(())
            })?
            .context("creating test interfaces in the host namespace")?;
        // The kernel updates operstate asynchronously (linkwatch): wait until all report up.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for name in [&a, &b, &m] {
            let file = format!("/sys/class/net/{name}/operstate");
            while std::fs::read_to_string(&file)
                .map(|s| s.trim().to_owned())
                .ok()
                .as_deref()
                != Some("up")
            {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "{name} did not come up within 5 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(created)
    }
}

impl Drop for HostInterfaces {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.names);
        // Deleting the veth takes its peer and the macvlan on it along.
        let _ignored = self.netns.block_on(|| async move {
            if let Ok(link) = Link::connect() {
                for name in &names {
                    let _ignored = link.delete(name).await;
                }
            }
        });
    }
}

/// Creates a veth pair: `a_if` in host `a`, `b_if` in host `b` (both down).
pub fn veth_pair(a: &TestHost, a_if: &str, b: &TestHost, b_if: &str) -> anyhow::Result<()> {
    a.netlink(|link| async move {
        links::add_veth(a_if, b_if).await?;
        link.move_to(b_if, b.netns()).await
    })
    .with_context(|| format!("creating veth {}:{a_if} <-> {}:{b_if}", a.name, b.name))
}

/// Creates a macvlan `name` (bridge mode) on `parent` inside `host` (down).
pub fn macvlan(host: &TestHost, name: &str, parent: &str) -> anyhow::Result<()> {
    host.netlink(|link| async move { links::add_macvlan(&link, name, parent).await })
        .with_context(|| format!("creating macvlan {name} on {}:{parent}", host.name))
}

/// Creates a bridge `name` in `host` with `ports` enslaved; bridge and ports are brought up
/// with IPv6 off (a switch that carries only the test's traffic).
pub fn bridge(host: &TestHost, name: &str, ports: &[&str]) -> anyhow::Result<()> {
    host.netlink(|_| async move { links::add_bridge(name).await })?;
    host.disable_ipv6(name)?;
    for port in ports {
        host.disable_ipv6(port)?;
        host.netlink(|link| async move {
            links::set_controller(&link, port, name).await?;
            link.set_up(*port).await
        })?;
    }
    host.set_up(name)
        .with_context(|| format!("bringing up bridge {name} in {}", host.name))
}

/// Sends `bytes` over one TCP connection from `client` to `server_addr` (an address of
/// `server`) and returns the number of bytes the server received.
pub fn tcp_transfer(
    client: &TestHost,
    server: &TestHost,
    server_addr: IpAddr,
    bytes: usize,
) -> anyhow::Result<usize> {
    let listener = server
        .run(|| TcpListener::bind(SocketAddr::new(server_addr, 0)))?
        .with_context(|| format!("listening on {server_addr} in {}", server.name))?;
    let target = listener.local_addr()?;
    let server_thread = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buffer = vec![0_u8; 64 * 1024];
        let mut total = 0;
        loop {
            match stream.read(&mut buffer)? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    });
    let sent = client
        .run(|| -> std::io::Result<usize> {
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            stream.set_write_timeout(Some(Duration::from_secs(20)))?;
            let chunk = vec![0x5a_u8; 64 * 1024];
            let mut sent = 0;
            while sent < bytes {
                let n = chunk.len().min(bytes - sent);
                stream.write_all(&chunk[..n])?;
                sent += n;
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        })?
        .with_context(|| format!("sending {bytes} bytes from {} to {target}", client.name))?;
    let Ok(outcome) = server_thread.join() else {
        bail!("the receiving thread panicked");
    };
    let received = outcome.with_context(|| format!("receiving on {target}"))?;
    ensure!(received == sent, "sent {sent} bytes but {received} arrived");
    Ok(received)
}
