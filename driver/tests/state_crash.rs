//! The state store under SIGKILL: a child process rewrites records as fast as it can (durable
//! and unsynced writes alternating) and is killed at arbitrary instants; after every kill the
//! store must reopen with every record readable and no acknowledged write lost.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use knd::{
    model::records::{PreparedClaim, PreparedDevice},
    os::state::StateStore,
};

const CHILD_ENV: &str = "KND_STATE_CRASH_CHILD";
const BASE_ENV: &str = "KND_STATE_CRASH_BASE";

fn record(key: &str, generation: u64) -> PreparedClaim {
    PreparedClaim {
        uid: key.into(),
        namespace: "ns".into(),
        name: format!("gen-{generation}"),
        pod_uids: vec![format!("pod-{generation}")],
        devices: vec![PreparedDevice {
            requests: vec!["nic".into()],
            pool: "node".into(),
            // Long enough that a write is several pages: a torn write would show.
            device: format!("pci-{generation:0>4000}"),
            config: knd::model::config::default_config(),
            topology: None,
            share: None,
        }],
    }
}

/// The child: rewrites keys k0..k7 with increasing generations, acknowledging each on stdout,
/// until it is killed. Run on its own (no environment), it does 200 writes in a scratch store and
/// checks that the last generation of every key is what the store holds.
#[test]
fn writer_child() {
    let scratch = tempfile::tempdir().unwrap();
    let (dir, base, limit) = match std::env::var_os(CHILD_ENV) {
        Some(dir) => {
            let base: u64 = std::env::var(BASE_ENV).unwrap().parse().unwrap();
            (std::path::PathBuf::from(dir), base, u64::MAX)
        }
        None => (scratch.path().to_path_buf(), 1, 200),
    };
    let store = StateStore::open(&dir).unwrap();
    for generation in base..base.saturating_add(limit) {
        let key = format!("k{}", generation % 8);
        // Every other write skips the fsyncs (what a pod record before a move does): a SIGKILL
        // must lose neither kind.
        if generation % 2 == 0 {
            store.claims.put(&key, &record(&key, generation)).unwrap();
        } else {
            store
                .claims
                .put_unsynced(&key, &record(&key, generation))
                .unwrap();
        }
        println!("{key} {generation}");
    }
    let records = store.claims.all().unwrap();
    assert_eq!(records.len(), 8);
    for (key, claim) in records {
        let generation: u64 = claim.name.trim_start_matches("gen-").parse().unwrap();
        assert!(generation > 192, "{key} holds generation {generation}");
        assert_eq!(claim, record(&key, generation));
    }
}

#[test]
fn sigkill_at_any_instant_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    let mut writes = 0_usize;
    for round in 0..12_u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "writer_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .env(BASE_ENV, ((round + 1) * 1_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (acks, received) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((key, generation)) = line.split_once(' ')
                    && let Ok(generation) = generation.parse::<u64>()
                    && acks.send((key.to_owned(), generation)).is_err()
                {
                    break;
                }
            }
        });
        // Vary the instant, counted from the child's own progress rather than from its start
        // (a loaded machine can spend the first 100 ms starting the test binary): wait for a
        // varying number of acknowledged writes, then 0–3 ms more, so the kill lands inside a
        // later write at a different point each round.
        let wanted = 5 + 2 * usize::try_from(round).unwrap();
        let mut seen = Vec::new();
        while seen.len() < wanted {
            match received.recv_timeout(Duration::from_secs(20)) {
                Ok(ack) => seen.push(ack),
                Err(err) => panic!(
                    "round {round}: the writer acknowledged only {} writes: {err}",
                    seen.len()
                ),
            }
        }
        std::thread::sleep(Duration::from_micros((round * 397) % 3000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        seen.extend(received.try_iter());
        writes += seen.len();
        for (key, generation) in seen {
            let entry = acknowledged.entry(key).or_default();
            *entry = (*entry).max(generation);
        }

        let store = StateStore::open(dir.path()).unwrap();
        let records = store
            .claims
            .all()
            .expect("every record readable after SIGKILL");
        for (key, claim) in &records {
            let generation: u64 = claim.name.trim_start_matches("gen-").parse().unwrap();
            assert_eq!(
                claim,
                &record(key, generation),
                "record {key} is not one that was written"
            );
            let floor = acknowledged.get(key).copied().unwrap_or(0);
            assert!(
                generation >= floor,
                "{key}: found generation {generation}, {floor} was acknowledged"
            );
        }
        for key in acknowledged.keys() {
            assert!(records.iter().any(|(k, _)| k == key), "{key} vanished");
        }
    }
    // Each round waited for its writes (5, 7, … 27) before the kill, so the kills landed
    // mid-write at twelve different points of the store's life.
    eprintln!("{writes} acknowledged writes across 12 kills");
}
