//! Keeps the inventory current: rescans when the kernel reports a link or route change
//! (debounced, so a burst costs one scan) and once a minute regardless, and hands every new
//! view to whoever publishes it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    discover::inventory::{Inventory, LiveNetwork, live_network, scan_node},
    os::{host::HostRoot, netlink},
    publish::selector::Selector,
};

/// How the watcher paces its scans.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Wait this long after the first event of a burst before rescanning. Later events of the
    /// burst do not push the scan back, so a view is never older than this plus one scan.
    pub debounce: Duration,
    /// Rescan this often even without events (catches what netlink does not announce, such as
    /// sysfs-only changes). Never less than a minute in production.
    pub resync: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(150),
            resync: Duration::from_mins(1),
        }
    }
}

/// Errors that stop the watcher from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink subscription could not be set up.
    #[error("cannot subscribe to link and route changes")]
    Subscribe(#[source] netlink::Error),
}

/// A running watcher: the latest inventory, and how many scans it took to get there.
#[derive(Debug)]
pub struct Watcher {
    /// The current view; changes whenever a rescan finds something different.
    pub inventory: watch::Receiver<Arc<Inventory>>,
    scans: Arc<AtomicU64>,
    events: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Scans done so far (the first one included).
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Netlink notifications received so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Waits for the watcher task to end (after `shutdown` is cancelled).
    pub async fn join(self) {
        if let Err(err) = self.task.await {
            tracing::error!(%err, "inventory watcher task failed");
        }
    }
}

/// What a scan needs besides the host root.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only devices this `--filter` accepts are published.
    pub filter: Option<Arc<Selector>>,
    /// The Node's addresses: interfaces holding one are never published.
    pub node_addresses: Arc<[std::net::IpAddr]>,
}

/// Scans `host` once and then keeps the view current until `shutdown` is cancelled. Must be
/// called inside a tokio runtime whose thread is in the host's network namespace.
pub async fn spawn(
    host: HostRoot,
    scope: Scope,
    pacing: Pacing,
    shutdown: CancellationToken,
) -> Result<Watcher, Error> {
    // The connection lives as long as a handle to it: keep `link` in the task.
    let (mut link, mut events) = netlink::Link::subscribe().map_err(Error::Subscribe)?;
    let scans = Arc::new(AtomicU64::new(0));
    let first = rescan(&host, &scope, &scans).await;
    let (sender, receiver) = watch::channel(Arc::new(first));
    let task_scans = Arc::clone(&scans);
    let events_seen = Arc::new(AtomicU64::new(0));
    let task_events = Arc::clone(&events_seen);
    let task = tokio::spawn(async move {
        let mut pending: Option<Instant> = None;
        let mut next_resync = Instant::now() + pacing.resync;
        loop {
            let wake = pending.map_or(next_resync, |due| due.min(next_resync));
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = events.next() => {
                    if event.is_none() {
                        tracing::warn!("netlink notifications ended; resubscribing");
                        match netlink::Link::subscribe() {
                            Ok(pair) => (link, events) = pair,
                            Err(err) => {
                                tracing::error!(%err, "cannot resubscribe; next try at the resync");
                                tokio::select! {
                                    () = shutdown.cancelled() => break,
                                    () = tokio::time::sleep_until(next_resync) => {}
                                }
                                continue;
                            }
                        }
                    }
                    task_events.fetch_add(1, Ordering::Relaxed);
                    // Whatever was missed while resubscribing is caught by this rescan.
                    pending.get_or_insert_with(|| Instant::now() + pacing.debounce);
                }
                () = tokio::time::sleep_until(wake) => {
                    pending = None;
                    next_resync = Instant::now() + pacing.resync;
                    let inventory = rescan(&host, &scope, &task_scans).await;
                    sender.send_if_modified(|current| {
                        let changed = !same_view(current, &inventory);
                        if changed {
                            *current = Arc::new(inventory);
                        }
                        changed
                    });
                }
            }
        }
        drop(link);
    });
    Ok(Watcher {
        inventory: receiver,
        scans,
        events: events_seen,
        task,
    })
}

/// One scan: netlink on this runtime, the file reads on the blocking pool. Netlink is used
/// when it describes the host root's namespace (see [`LiveNetwork`]).
async fn rescan(host: &HostRoot, scope: &Scope, scans: &AtomicU64) -> Inventory {
    let live: Option<LiveNetwork> = live_network()
        .await
        .inspect_err(|err| tracing::warn!(%err, "netlink unavailable; using /proc and sysfs"))
        .ok();
    let host = host.clone();
    let scope = scope.clone();
    let scanned = tokio::task::spawn_blocking(move || {
        let mut inventory = scan_node(&host, live.as_ref(), &scope.node_addresses);
        if let Some(filter) = &scope.filter {
            filter.retain_in(&mut inventory);
        }
        inventory
    })
    .await;
    scans.fetch_add(1, Ordering::Relaxed);
    scanned.unwrap_or_else(|err| {
        tracing::error!(%err, "inventory scan panicked");
        Inventory::default()
    })
}

/// Whether two scans would publish the same thing (devices and their attributes, exclusions).
fn same_view(a: &Inventory, b: &Inventory) -> bool {
    let view = |i: &Inventory| {
        (
            i.nics
                .iter()
                .map(|n| {
                    (
                        crate::publish::resources::device_name(n),
                        crate::publish::resources::attributes(n),
                    )
                })
                .collect::<Vec<_>>(),
            i.excluded.clone(),
        )
    };
    view(a) == view(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pacing_rescans_at_most_once_a_minute_without_events() {
        let pacing = Pacing::default();
        assert!(pacing.resync >= Duration::from_mins(1));
        assert!(pacing.debounce < Duration::from_millis(500));
    }
}
