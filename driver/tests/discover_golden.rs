//! `knd discover` and `knd topo` print exactly the recorded output on every test-kit machine:
//! what a node publishes does not change unless a change means it to.
//!
//! The recorded output lives in `tests/golden/`. To record it again (after a change that is
//! meant to change what is published), run with `KND_BLESS=1`; `KND_BIN` runs another `knd`
//! binary instead of this build's (how the records were made with the code before a refactor).

use std::{path::PathBuf, process::Command};

use knd_testkit::{machines, sysfs::SysfsTree};

fn machines() -> Vec<(&'static str, SysfsTree)> {
    vec![
        ("gpu_8x8", machines::gpu_8x8()),
        ("gpu_8x8_with_vfs", machines::gpu_8x8_with_vfs(8)),
        (
            "two_gpu_rails",
            machines::two_gpu_rails(["nic0", "nic1", "nic2", "nic3"]),
        ),
        ("shared_switch", machines::shared_switch()),
        ("hyperv", machines::hyperv()),
        ("sriov", machines::sriov()),
        ("bonded", machines::bonded()),
    ]
}

fn knd(args: &[&str]) -> String {
    let binary = std::env::var_os("KND_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_knd")), PathBuf::from);
    let output = Command::new(&binary)
        .args(args)
        .env("NODE_NAME", "node-1")
        .output()
        .expect("knd runs");
    assert!(
        output.status.success(),
        "knd {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("knd prints UTF-8")
}

fn check(name: &str, actual: &str) -> Option<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KND_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("golden directory");
        std::fs::write(&path, actual).expect("write the golden file");
        return None;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err} (record it with KND_BLESS=1)", path.display()));
    (expected != actual).then(|| format!("{name} differs from {}", path.display()))
}

#[test]
fn every_machine_publishes_and_prints_what_was_recorded() {
    let mut differences = Vec::new();
    for (name, tree) in machines() {
        let root = tree.root().to_str().expect("UTF-8 path").to_owned();
        for (suffix, args) in [
            (
                "discover.yaml",
                vec!["discover", "--host-root", &root, "-o", "yaml"],
            ),
            ("topo.txt", vec!["topo", "--host-root", &root]),
        ] {
            // The temporary root never appears in what is published.
            let output = knd(&args).replace(&root, "<root>");
            differences.extend(check(&format!("{name}.{suffix}"), &output));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}
