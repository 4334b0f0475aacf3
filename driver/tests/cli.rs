//! The `knd` binary's discovery commands on fixture machines: what a user sees.

use std::process::{Command, Output};

use k8s_openapi::api::resource::v1::ResourceSlice;
use knd_testkit::{machines, sysfs::SysfsTree};

fn knd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knd"))
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .expect("running knd")
}

fn knd_on(tree: &SysfsTree, args: &[&str]) -> (String, String) {
    let root = tree.root().to_str().unwrap();
    let mut all = args.to_vec();
    all.extend(["--host-root", root]);
    let output = knd(&all);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "knd {all:?} failed: {stderr}");
    (stdout, stderr)
}

#[test]
fn discover_prints_the_slices_as_json_and_exclusions_on_stderr() {
    let tree = machines::gpu_8x8();
    let (stdout, stderr) = knd_on(&tree, &["discover", "--node-name", "gpu-1"]);
    let slices: Vec<ResourceSlice> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(slices.len(), 1);
    let slice = &slices[0];
    assert_eq!(slice.metadata.name.as_deref(), Some("gpu-1-knd.dev-0"));
    assert_eq!(slice.spec.pool.name, "gpu-1");
    assert_eq!(slice.spec.devices.as_ref().unwrap().len(), 8);
    let raw: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(raw[0]["apiVersion"], "resource.k8s.io/v1");
    assert_eq!(raw[0]["kind"], "ResourceSlice");
    assert!(
        stderr.contains("excluded: eth0: carries the default IPv4 route"),
        "{stderr}"
    );
    assert!(stderr.contains("excluded: lo: loopback"), "{stderr}");
}

#[test]
fn discover_yaml_and_warnings_name_the_broken_files() {
    let tree = machines::bonded();
    let (stdout, stderr) = knd_on(&tree, &["discover", "-o", "yaml", "--node-name", "n1"]);
    let documents: Vec<ResourceSlice> = stdout
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    assert_eq!(documents.len(), 1);
    let names: Vec<&str> = documents[0]
        .spec
        .devices
        .as_ref()
        .unwrap()
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["mv0", "pci-0000-86-00-0", "pci-0000-87-00-0"]);
    assert!(
        stderr.contains("warning: /sys/bus/pci/devices/0000:87:00.0/numa_node"),
        "{stderr}"
    );
    assert!(
        stderr.contains("excluded: 0000:5e:00.0: bound to user-space driver vfio-pci"),
        "{stderr}"
    );
    assert!(
        stderr.contains("excluded: eth0: part of the uplink bond0"),
        "{stderr}"
    );
}

#[test]
fn filter_selects_with_cel_and_bad_expressions_fail_clearly() {
    let tree = machines::gpu_8x8();
    let (stdout, stderr) = knd_on(
        &tree,
        &[
            "discover",
            "--filter",
            r#"device.attributes["knd.dev"].numaNode == 0"#,
        ],
    );
    let slices: Vec<ResourceSlice> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        slices[0].spec.devices.as_ref().unwrap().len(),
        4,
        "only the NICs of NUMA node 0"
    );
    assert!(stderr.contains("rejected by --filter"), "{stderr}");

    let root = tree.root().to_str().unwrap();
    let output = knd(&[
        "discover",
        "--host-root",
        root,
        "--filter",
        "device.attributes[",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("--filter") && stderr.contains("does not parse"),
        "{stderr}"
    );
}

#[test]
fn topo_json_has_the_documented_shape() {
    let tree = machines::shared_switch();
    let (stdout, _) = knd_on(&tree, &["topo", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let gpus = report["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 4);
    assert_eq!(gpus[0]["pciBusID"], "0000:13:00.0");
    assert_eq!(gpus[0]["pcieRoot"], "pci0000:10");
    assert_eq!(gpus[0]["numaNode"], 0);
    let nics = report["nics"].as_array().unwrap();
    let ens2 = nics.iter().find(|n| n["ifName"] == "ens2").unwrap();
    assert_eq!(ens2["device"], "pci-0000-19-00-0");
    assert_eq!(ens2["pciBusID"], "0000:19:00.0");
    let pairs = report["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 4 * nics.len());
    assert!(
        pairs.iter().any(|p| p["gpu"] == "0000:13:00.0"
            && p["nic"] == "0000:19:00.0"
            && p["class"] == "PXB")
    );
    for class in ["PIX", "PXB", "PHB", "NODE", "SYS"] {
        assert!(pairs.iter().any(|p| p["class"] == class), "no {class} pair");
    }
}

#[test]
fn topo_table_on_a_hyper_v_guest() {
    let tree = machines::hyperv();
    let (stdout, _) = knd_on(&tree, &["topo"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("GPU") && lines[0].contains("ib0") && lines[0].contains("ib3"));
    assert!(lines[1].starts_with("0001:00:00.0"), "{stdout}");
    assert!(
        lines[1].contains("NODE") && lines[1].contains("SYS"),
        "{stdout}"
    );
    assert!(lines[1].contains("pci0001:00"), "{stdout}");
}

#[test]
fn a_missing_host_root_is_an_error_naming_it() {
    let output = knd(&["discover", "--host-root", "/nonexistent/root"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("/nonexistent/root is not a directory"),
        "{stderr}"
    );
}

#[test]
fn both_commands_work_on_every_fixture() {
    type Fixture = (&'static str, fn() -> SysfsTree, usize);
    let fixtures: [Fixture; 5] = [
        ("gpu_8x8", machines::gpu_8x8, 8),
        ("shared_switch", machines::shared_switch, 7),
        ("hyperv", machines::hyperv, 4),
        ("sriov", machines::sriov, 4),
        ("bonded", machines::bonded, 3),
    ];
    for (name, build, devices) in fixtures {
        let tree = build();
        let (stdout, _) = knd_on(&tree, &["discover", "--node-name", name]);
        let slices: Vec<ResourceSlice> = serde_json::from_str(&stdout).unwrap();
        let published: usize = slices
            .iter()
            .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
            .sum();
        assert_eq!(published, devices, "{name}");
        let (stdout, _) = knd_on(&tree, &["topo", "-o", "json"]);
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(report["pairs"].is_array(), "{name}");
        let (table, _) = knd_on(&tree, &["topo"]);
        assert!(table.starts_with("GPU"), "{name}: {table}");
    }
}

#[test]
fn top_reads_a_metrics_endpoint_and_names_what_is_wrong_with_it() {
    use std::io::{Read as _, Write as _};
    // A one-connection-per-scrape endpoint serving a fixed exposition: two scrapes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let body = "# TYPE knd_claim_rx_bytes counter\n\
        knd_claim_rx_bytes_total{namespace=\"ml\",pod=\"p-0\",claim=\"c\",request=\"a,b\",device=\"nic-0\",interface=\"net1\"} 1000\n\
        # EOF\n";
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0_u8; 1024];
            let _read = stream.read(&mut request).unwrap();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    let url = format!("http://{address}/metrics");
    let output = knd(&[
        "top",
        "--metrics-url",
        &url,
        "--count",
        "1",
        "--interval",
        "0.1",
    ]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("POD"), "{stdout}");
    assert!(stdout.contains("ml/p-0"), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "no screen control codes when piped: {stdout:?}"
    );
    server.join().unwrap();

    let refused = knd(&[
        "top",
        "--metrics-url",
        "http://127.0.0.1:1/metrics",
        "--count",
        "1",
    ]);
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert!(!refused.status.success());
    assert!(stderr.contains("http://127.0.0.1:1/metrics"), "{stderr}");
    let bad_url = knd(&["top", "--metrics-url", "ftp://node/metrics"]);
    let stderr = String::from_utf8(bad_url.stderr).unwrap();
    assert!(
        stderr.contains("--metrics-url ftp://node/metrics: expected http://HOST:PORT/PATH"),
        "{stderr}"
    );
    let bad_interval = knd(&["top", "--interval", "0"]);
    assert!(
        String::from_utf8(bad_interval.stderr)
            .unwrap()
            .contains("outside 0.05..=3600")
    );
}
