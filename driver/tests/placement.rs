//! Placement hints on fixture machines: `knd templates`' objects, the allocator behind
//! `knd explain` (selectors, constraints, explanations), the placement simulation, and both
//! commands as a user runs them.

use std::{collections::HashSet, process::Command};

use k8s_openapi::api::resource::v1::ResourceSlice;
use knd::{
    cli::{
        placement::{Catalog, Claim, Documents},
        templates,
    },
    discover::inventory::{self, Inventory},
    model::distance::Distance,
    os::host::HostRoot,
    publish::resources::{self, DRIVER_NAME, Value},
};
use knd_testkit::{
    machines,
    placement::{self, Strategy},
    sysfs::SysfsTree,
};

fn inventory_of(tree: &SysfsTree) -> Inventory {
    inventory::discover(&HostRoot::new(tree.root()))
}

fn documents(inventory: &Inventory) -> Documents {
    placement::node_documents(inventory, &std::collections::BTreeMap::new()).unwrap()
}

fn names(templates: &[templates::Template]) -> Vec<String> {
    templates
        .iter()
        .map(|t| t.object["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn templates_follow_the_topology() {
    let eight = inventory_of(&machines::gpu_8x8());
    let generated = templates::generate(&eight, "gpu.nvidia.com");
    assert_eq!(
        names(&generated),
        [
            "knd-nic",
            "knd-rdma",
            "gpu-nic-aligned",
            "gpu-nic-same-numa",
            "gpu-nic-numa0",
            "gpu-nic-numa1",
            "rdma-nic"
        ]
    );
    assert_eq!(
        generated[3].object["spec"]["spec"]["devices"]["constraints"][0]["matchAttribute"],
        "resource.kubernetes.io/numaNode"
    );
    let aligned = &generated[2].object;
    assert_eq!(
        aligned["spec"]["spec"]["devices"]["constraints"][0]["matchAttribute"],
        "resource.kubernetes.io/pcieRoot"
    );
    let numa0 = &generated[4].object["spec"]["spec"]["devices"]["requests"];
    assert_eq!(
        numa0[0]["exactly"]["selectors"][0]["cel"]["expression"],
        r#"device.attributes["resource.kubernetes.io"].pcieRoot in ["pci0000:10", "pci0000:30", "pci0000:50", "pci0000:70"]"#
    );
    assert_eq!(
        numa0[1]["exactly"]["selectors"][0]["cel"]["expression"],
        r#"device.attributes["resource.kubernetes.io"].numaNode == 0"#
    );
    // The DeviceClasses are the ones deploy/ installs.
    let deployed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/deviceclasses.yaml"
    ))
    .unwrap();
    let deployed = Documents::parse(&deployed, "deviceclasses.yaml").unwrap();
    for (i, class) in deployed.classes.iter().enumerate() {
        let ours: k8s_openapi::api::resource::v1::DeviceClass =
            serde_json::from_value(generated[i].object.clone()).unwrap();
        assert_eq!(&ours, class);
    }

    // Two GPUs and two NICs per switch: pcieRoot is ambiguous, so one template per rail.
    let shared = inventory_of(&machines::shared_switch());
    let generated = templates::generate(&shared, "gpu.nvidia.com");
    let all = names(&generated);
    for rail in [
        "gpu-nic-rail-0",
        "gpu-nic-rail-1",
        "gpu-nic-rail-2",
        "gpu-nic-rail-3",
    ] {
        assert!(all.contains(&rail.to_owned()), "{all:?}");
    }
    let rail1 = generated
        .iter()
        .find(|t| t.object["metadata"]["name"] == "gpu-nic-rail-1")
        .unwrap();
    let requests = &rail1.object["spec"]["spec"]["devices"]["requests"];
    assert_eq!(
        requests[0]["exactly"]["selectors"][0]["cel"]["expression"],
        r#"device.attributes["resource.kubernetes.io"].pciBusID == "0000:14:00.0""#
    );
    assert_eq!(
        requests[1]["exactly"]["selectors"][0]["cel"]["expression"],
        r#"device.attributes["knd.dev"].gpuPciBusID == "0000:14:00.0""#
    );
    assert!(generated[2].comment.contains("prefer the gpu-nic-rail-N"));
}

#[test]
fn the_allocator_pairs_a_gpu_with_the_nic_on_its_root_and_explains_failures() {
    let eight = inventory_of(&machines::gpu_8x8());
    let documents = documents(&eight);
    let catalog = Catalog::new(&documents.slices, &documents.classes).unwrap();
    let (name, spec) = documents
        .claims
        .iter()
        .find(|(n, _)| n == "gpu-nic-aligned")
        .unwrap();
    let claim = Claim::compile(name, spec).unwrap();
    let evaluated = claim.evaluate(&catalog);
    let allocation = evaluated.allocate(&HashSet::new()).unwrap();
    assert_eq!(allocation.node.as_deref(), Some("node-1"));
    assert_eq!(allocation.device("gpu").unwrap().device, "gpu-0");
    assert_eq!(allocation.device("nic").unwrap().device, "pci-0000-14-00-0");
    let (text, ok) = knd::cli::placement::explain(&evaluated);
    assert!(ok, "{text}");
    assert!(
        text.contains("request gpu (class gpu.nvidia.com): 8 of 16 devices match"),
        "{text}"
    );
    assert!(
        text.contains(
            "8 rejected: DeviceClass gpu.nvidia.com `device.driver == \"gpu.nvidia.com\"` is false"
        ),
        "{text}"
    );

    // GPU 0's root is full: the next GPU and its NIC.
    let mut in_use: HashSet<_> = allocation.results.iter().map(|(_, d)| d.clone()).collect();
    for vf in 0..8 {
        in_use.insert(knd::cli::placement::DeviceId {
            driver: DRIVER_NAME.into(),
            pool: "node-1".into(),
            device: format!(
                "pci-0000-14-0{}-{}",
                vf / 7,
                if vf < 7 { vf + 1 } else { 0 }
            ),
        });
    }
    let next = evaluated.allocate(&in_use).unwrap();
    assert_eq!(next.results[0].1.device, "gpu-1");
    assert_eq!(next.results[1].1.device, "pci-0000-34-00-0");

    // A NIC selector no device on GPU 0's root meets, with GPU 0 forced: the constraint is named
    // with the values each request's candidates have.
    let claim: k8s_openapi::api::resource::v1::DeviceClaim = serde_json::from_value(serde_json::json!({
        "requests": [
            {"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com", "selectors": [
                {"cel": {"expression": "device.attributes[\"resource.kubernetes.io\"].pciBusID == \"0000:13:00.0\""}}]}},
            {"name": "nic", "exactly": {"deviceClassName": "knd-rdma", "selectors": [
                {"cel": {"expression": "device.attributes[\"knd.dev\"].numaNode == 1"}}]}}
        ],
        "constraints": [{"requests": ["gpu", "nic"], "matchAttribute": "resource.kubernetes.io/pcieRoot"}]
    }))
    .unwrap();
    let claim = Claim::compile("misfit", &claim).unwrap();
    let evaluated = claim.evaluate(&catalog);
    let (text, ok) = knd::cli::placement::explain(&evaluated);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "constraint 1 (matchAttribute resource.kubernetes.io/pcieRoot over gpu, nic) cannot be \
             met: gpu has [\"pci0000:10\"]; nic has [\"pci0000:90\", \"pci0000:b0\", \"pci0000:d0\", \"pci0000:f0\"]"
        ),
        "{text}"
    );
    assert!(
        text.contains("4 rejected: the request's selector `device.attributes[\"knd.dev\"].numaNode == 1` is false"),
        "{text}"
    );

    // A class nobody gave, and requests that cannot be counted.
    let unknown: k8s_openapi::api::resource::v1::DeviceClaim = serde_json::from_value(
        serde_json::json!({"requests": [{"name": "x", "exactly": {"deviceClassName": "nope"}}]}),
    )
    .unwrap();
    let claim = Claim::compile("unknown", &unknown).unwrap();
    let (text, ok) = knd::cli::placement::explain(&claim.evaluate(&catalog));
    assert!(!ok);
    assert!(
        text.contains("16 rejected: DeviceClass nope is not among the inputs"),
        "{text}"
    );
    assert!(
        text.contains("request x wants 1 device(s) of class nope; 0 match"),
        "{text}"
    );
    let bad: k8s_openapi::api::resource::v1::DeviceClaim =
        serde_json::from_value(serde_json::json!({
            "requests": [{"name": "x", "exactly": {"deviceClassName": "knd-nic", "count": 0}}],
            "constraints": [{"requests": ["y"], "matchAttribute": "knd.dev/numaNode"}]
        }))
        .unwrap();
    let err = Claim::compile("bad", &bad).unwrap_err().to_string();
    assert!(err.contains("request x: count 0 is not positive"), "{err}");
}

#[test]
fn first_available_all_and_distinct_attribute_follow_the_api() {
    let shared = inventory_of(&machines::shared_switch());
    let documents = documents(&shared);
    let catalog = Catalog::new(&documents.slices, &documents.classes).unwrap();
    let spec = serde_json::from_value(serde_json::json!({
        "requests": [
            {"name": "gpus", "exactly": {"deviceClassName": "gpu.nvidia.com", "allocationMode": "All"}},
            {"name": "nic", "firstAvailable": [
                {"name": "pxb", "deviceClassName": "knd-nic", "selectors": [
                    {"cel": {"expression": "device.attributes[\"knd.dev\"].gpuDistance == \"PXB\""}}]},
                {"name": "any", "deviceClassName": "knd-nic"}
            ]},
            {"name": "two", "exactly": {"deviceClassName": "knd-nic", "count": 2}}
        ],
        "constraints": [{"requests": ["nic", "two"], "distinctAttribute": "knd.dev/numaNode"}]
    }))
    .unwrap();
    let claim = Claim::compile("mixed", &spec).unwrap();
    let evaluated = claim.evaluate(&catalog);
    let allocation = evaluated.allocate(&HashSet::new());
    // Three NICs with pairwise different NUMA nodes on a two-node machine: impossible.
    let failures = allocation.unwrap_err();
    assert_eq!(
        failures[0].reasons,
        [
            "constraint 1 (distinctAttribute knd.dev/numaNode over nic, two) cannot be met: \
          nic/pxb has [0]; nic/any has [0, 1]; two has [0, 1]"
        ]
    );
    let mut spec = spec;
    spec.requests.as_mut().unwrap()[2]
        .exactly
        .as_mut()
        .unwrap()
        .count = Some(1);
    let claim = Claim::compile("mixed", &spec).unwrap();
    let allocation = claim.evaluate(&catalog).allocate(&HashSet::new()).unwrap();
    let results: Vec<(&str, &str)> = allocation
        .results
        .iter()
        .map(|(r, d)| (r.as_str(), d.device.as_str()))
        .collect();
    assert_eq!(
        results,
        [
            ("gpus", "gpu-0"),
            ("gpus", "gpu-1"),
            ("gpus", "gpu-2"),
            ("gpus", "gpu-3"),
            ("nic/pxb", "pci-0000-19-00-0"),
            ("two", "pci-0000-95-00-0"),
        ]
    );
    // `All` wants every GPU: one in use fails the claim, and the reason says so.
    let busy = HashSet::from([allocation.results[0].1.clone()]);
    let failures = claim.evaluate(&catalog).allocate(&busy).unwrap_err();
    assert_eq!(
        failures[0].reasons,
        [
            "request gpus wants all devices of class gpu.nvidia.com it selects; 3 are free (1 more \
          are in use)"
        ]
    );
}

#[test]
fn templates_place_every_pair_aligned_and_random_placement_does_not() {
    for (tree, templates_of) in [
        (machines::gpu_8x8(), &["gpu-nic-aligned"][..]),
        (
            machines::shared_switch(),
            &[
                "gpu-nic-rail-0",
                "gpu-nic-rail-1",
                "gpu-nic-rail-2",
                "gpu-nic-rail-3",
            ][..],
        ),
    ] {
        let inventory = inventory_of(&tree);
        let documents = documents(&inventory);
        let catalog = Catalog::new(&documents.slices, &documents.classes).unwrap();
        let claims: Vec<Claim> = documents
            .claims
            .iter()
            .filter(|(n, _)| templates_of.contains(&n.as_str()))
            .map(|(n, s)| Claim::compile(n, s).unwrap())
            .collect();
        assert_eq!(claims.len(), templates_of.len());
        let strategy = Strategy::Templates(claims.iter().map(|c| c.evaluate(&catalog)).collect());
        let outcome = placement::simulate(&inventory, &catalog, &strategy, 500, 7).unwrap();
        assert_eq!(outcome.allocations, 500);
        assert_eq!(outcome.aligned, 500, "{outcome:?}");
        assert_eq!(
            outcome.classes.get(&Distance::Pix),
            Some(&500),
            "{outcome:?}"
        );
        let random = placement::simulate(&inventory, &catalog, &Strategy::Random, 500, 7).unwrap();
        assert!(random.aligned < 250, "{random:?}");
        assert!(random.share(Distance::Sys) > 0.2, "{random:?}");
    }
}

/// The standard `numaNode` (KEP-6072), published by knd and by the GPU driver stand-in, pairs a
/// GPU and a NIC of another driver on one NUMA node: never across the sockets.
#[test]
fn the_standard_numa_attribute_pairs_gpus_and_nics_of_two_drivers_on_one_node() {
    let inventory = inventory_of(&machines::gpu_8x8());
    let documents = documents(&inventory);
    let catalog = Catalog::new(&documents.slices, &documents.classes).unwrap();
    let (name, spec) = documents
        .claims
        .iter()
        .find(|(n, _)| n == "gpu-nic-same-numa")
        .unwrap();
    let claim = Claim::compile(name, spec).unwrap();
    let strategy = Strategy::Templates(vec![claim.evaluate(&catalog)]);
    let outcome = placement::simulate(&inventory, &catalog, &strategy, 500, 7).unwrap();
    assert_eq!(outcome.allocations, 500);
    assert!(!outcome.classes.contains_key(&Distance::Sys), "{outcome:?}");
    // With every NIC of NUMA node 0 taken, the constraint moves the pod to node 1; the same
    // claim without it pairs the first GPU (node 0) with a NIC across the sockets.
    let numa = |id: &knd::cli::placement::DeviceId| {
        let entry = catalog.devices.iter().find(|d| &d.id == id).unwrap();
        entry.attributes.get(resources::NUMA_NODE).cloned()
    };
    let busy: HashSet<_> = catalog
        .devices
        .iter()
        .filter(|d| d.id.driver == DRIVER_NAME && numa(&d.id) == Some(Value::Int(0)))
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(busy.len(), 4, "half of the 8 NICs are on node 0");
    let pair = claim.evaluate(&catalog).allocate(&busy).unwrap();
    assert_eq!(numa(pair.device("gpu").unwrap()), Some(Value::Int(1)));
    assert_eq!(numa(pair.device("nic").unwrap()), Some(Value::Int(1)));
    let mut unconstrained = spec.clone();
    unconstrained.constraints = None;
    let loose = Claim::compile(name, &unconstrained).unwrap();
    let pair = loose.evaluate(&catalog).allocate(&busy).unwrap();
    assert_eq!(numa(pair.device("gpu").unwrap()), Some(Value::Int(0)));
    assert_eq!(numa(pair.device("nic").unwrap()), Some(Value::Int(1)));
    // Without the attribute on the GPUs the constraint cannot hold: nothing is allocated.
    let mut without = self::documents(&inventory);
    for slice in &mut without.slices {
        for device in slice.spec.devices.iter_mut().flatten() {
            if slice.spec.driver == placement::GPU_DRIVER {
                device
                    .attributes
                    .as_mut()
                    .unwrap()
                    .remove(resources::NUMA_NODE);
            }
        }
    }
    let catalog = Catalog::new(&without.slices, &without.classes).unwrap();
    let failures = claim
        .evaluate(&catalog)
        .allocate(&HashSet::new())
        .unwrap_err();
    assert!(
        failures
            .iter()
            .flat_map(|f| &f.reasons)
            .any(|r| r.contains("resource.kubernetes.io/numaNode")),
        "a GPU without numaNode cannot match: {failures:?}"
    );
}

fn knd(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_knd"))
        .args(args)
        .env("NODE_NAME", "node-1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn templates_and_explain_commands() {
    let tree = machines::gpu_8x8();
    let root = tree.root().to_str().unwrap();
    let (ok, yaml, stderr) = knd(&["templates", "--host-root", root], None);
    assert!(ok, "{stderr}");
    assert!(
        yaml.starts_with("# Generated by `knd templates` for node node-1"),
        "{yaml}"
    );
    assert!(
        yaml.contains("# One GPU and one NIC on the same PCIe root complex.\n"),
        "{yaml}"
    );
    // The slices a cluster would hold: knd's and the GPU driver's, with the GPU class.
    let inventory = inventory_of(&tree);
    let mut inputs = String::new();
    let slices: Vec<ResourceSlice> = vec![
        resources::slices(&inventory, DRIVER_NAME, "node-1", 1, None).remove(0),
        placement::gpu_slice(&inventory, "node-1"),
    ];
    inputs.push_str(
        &serde_json::to_string(&serde_json::json!({"kind": "List", "items": slices})).unwrap(),
    );
    inputs.push_str("\n---\n");
    inputs.push_str(&serde_yaml::to_string(&placement::gpu_class()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let claims = dir.path().join("claims.yaml");
    std::fs::write(&claims, &yaml).unwrap();
    let (ok, text, stderr) = knd(
        &["explain", claims.to_str().unwrap(), "--slices", "-"],
        Some(&inputs),
    );
    assert!(ok, "{stderr}\n{text}");
    assert!(text.contains("claim gpu-nic-aligned\n"), "{text}");
    assert!(text.contains("allocatable on node-1:\n  gpu: gpu.nvidia.com/node-1/gpu-0\n  nic: knd.dev/node-1/pci-0000-14-00-0\n"), "{text}");
    assert!(
        text.contains("claim rdma-nic\n  request nic (class knd-rdma): 8 of 16 devices match"),
        "{text}"
    );

    // Without --slices: this node's own devices; the GPU class is unknown, so GPU claims fail
    // and the command says so.
    let (ok, text, stderr) = knd(
        &["explain", claims.to_str().unwrap(), "--host-root", root],
        None,
    );
    assert!(!ok);
    assert!(
        text.contains("DeviceClass gpu.nvidia.com is not among the inputs"),
        "{text}"
    );
    assert!(
        stderr.contains(
            "cannot be allocated: gpu-nic-aligned, gpu-nic-same-numa, gpu-nic-numa0, gpu-nic-numa1"
        ),
        "{stderr}"
    );

    // Bad inputs are named.
    std::fs::write(&claims, "kind: Pod\n").unwrap();
    let (ok, _, stderr) = knd(
        &["explain", claims.to_str().unwrap(), "--slices", "-"],
        Some(""),
    );
    assert!(!ok);
    assert!(
        stderr.contains("claims.yaml: document 1: kind Pod is none of"),
        "{stderr}"
    );
    std::fs::write(&claims, "kind: ResourceClaim\nspec: {devices: {requests: [{name: a, exactly: {deviceClassName: knd-nic, selectors: [{cel: {expression: 'device.'}}]}}]}}\n").unwrap();
    let (ok, _, stderr) = knd(
        &["explain", claims.to_str().unwrap(), "--slices", "-"],
        Some(""),
    );
    assert!(!ok);
    assert!(
        stderr.contains(
            "claim (unnamed), request a, selector 1: CEL expression `device.` does not parse"
        ),
        "{stderr}"
    );
    let (ok, _, stderr) = knd(&["explain", "-", "--slices", "-"], Some(""));
    assert!(!ok);
    assert!(stderr.contains("cannot both be standard input"), "{stderr}");
    let (ok, _, stderr) = knd(&["explain", "/nonexistent.yaml"], None);
    assert!(!ok);
    assert!(stderr.contains("cannot read /nonexistent.yaml"), "{stderr}");
}

#[test]
fn the_example_templates_are_what_knd_templates_writes() {
    // deploy/examples/ is validated strictly against the Kubernetes schemas by tests/deploy.rs;
    // this keeps the generated example current.
    let inventory = inventory_of(&machines::gpu_8x8());
    let text = templates::to_yaml(
        &templates::generate(&inventory, "gpu.nvidia.com"),
        "gpu-node",
    )
    .unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/templates-8-gpu-node.yaml"
    );
    if std::env::var_os("KND_UPDATE_EXAMPLES").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap();
    assert_eq!(
        committed, text,
        "deploy/examples/templates-8-gpu-node.yaml is stale: rerun this test with \
         KND_UPDATE_EXAMPLES=1"
    );
}

/// A NIC knd tainted as unhealthy (KEP-5055) is passed over as the scheduler passes it over,
/// `knd explain` says why, and a request that tolerates the taint gets it again.
#[test]
fn a_tainted_nic_is_skipped_unless_the_request_tolerates_it() {
    use k8s_openapi::api::resource::v1::{DeviceTaint, DeviceToleration};
    let eight = inventory_of(&machines::gpu_8x8());
    let mut documents = documents(&eight);
    let taint = |effect: &str| DeviceTaint {
        key: "knd.dev/unhealthy".into(),
        value: Some("link-down".into()),
        effect: effect.into(),
        time_added: None,
    };
    let set_taint = |documents: &mut Documents, taint: Option<DeviceTaint>| {
        for slice in &mut documents.slices {
            for device in slice.spec.devices.iter_mut().flatten() {
                if device.name == "pci-0000-14-00-0" {
                    device.taints = taint.clone().map(|t| vec![t]);
                }
            }
        }
    };
    let (name, spec) = documents
        .claims
        .iter()
        .find(|(n, _)| n == "gpu-nic-aligned")
        .cloned()
        .unwrap();
    let claim = Claim::compile(&name, &spec).unwrap();
    let pair = |documents: &Documents, claim: &Claim| {
        let catalog = Catalog::new(&documents.slices, &documents.classes).unwrap();
        let evaluated = claim.evaluate(&catalog);
        let allocation = evaluated.allocate(&HashSet::new()).unwrap();
        let (text, _) = knd::cli::placement::explain(&evaluated);
        let devices = ["gpu", "nic"].map(|r| allocation.device(r).unwrap().device.clone());
        (devices, text)
    };

    // Untainted: GPU 0 with the NIC on its root.
    assert_eq!(pair(&documents, &claim).0, ["gpu-0", "pci-0000-14-00-0"]);
    // NoSchedule and NoExecute: that NIC is out, so GPU 0 has no aligned NIC and the next
    // GPU gets its own; explain names the taint.
    for effect in ["NoSchedule", "NoExecute"] {
        set_taint(&mut documents, Some(taint(effect)));
        let (devices, text) = pair(&documents, &claim);
        assert_eq!(devices, ["gpu-1", "pci-0000-34-00-0"], "{effect}");
        assert!(
            text.contains(&format!(
                "tainted knd.dev/unhealthy=link-down:{effect}, which the request does not tolerate"
            )),
            "{text}"
        );
    }
    // A taint with effect None only informs.
    set_taint(&mut documents, Some(taint("None")));
    assert_eq!(pair(&documents, &claim).0, ["gpu-0", "pci-0000-14-00-0"]);

    // Tolerations on the NIC request, as a user writes them.
    set_taint(&mut documents, Some(taint("NoSchedule")));
    let tolerating = |toleration: DeviceToleration| {
        let mut spec = spec.clone();
        for request in spec.requests.iter_mut().flatten() {
            if request.name == "nic" {
                request.exactly.as_mut().unwrap().tolerations = Some(vec![toleration.clone()]);
            }
        }
        Claim::compile(&name, &spec).unwrap()
    };
    let exists = DeviceToleration {
        key: Some("knd.dev/unhealthy".into()),
        operator: Some("Exists".into()),
        ..DeviceToleration::default()
    };
    assert_eq!(
        pair(&documents, &tolerating(exists.clone())).0,
        ["gpu-0", "pci-0000-14-00-0"]
    );
    let equal = |value: &str, effect: Option<&str>| DeviceToleration {
        key: Some("knd.dev/unhealthy".into()),
        operator: Some("Equal".into()),
        value: Some(value.into()),
        effect: effect.map(Into::into),
        ..DeviceToleration::default()
    };
    assert_eq!(
        pair(
            &documents,
            &tolerating(equal("link-down", Some("NoSchedule")))
        )
        .0,
        ["gpu-0", "pci-0000-14-00-0"]
    );
    // Another value, another effect or another key: not tolerated.
    for toleration in [
        equal("flapping", None),
        equal("link-down", Some("NoExecute")),
        DeviceToleration {
            key: Some("example.com/other".into()),
            ..exists
        },
    ] {
        assert_eq!(
            pair(&documents, &tolerating(toleration.clone())).0,
            ["gpu-1", "pci-0000-34-00-0"],
            "{toleration:?}"
        );
    }
}

/// A node with one shared 10G NIC (`nic0`, as knd publishes it) and one NIC allocated whole.
fn catalog_slices() -> Vec<ResourceSlice> {
    let mut device: k8s_openapi::api::resource::v1::Device =
        serde_json::from_value(serde_json::json!({"name": "nic0"})).unwrap();
    resources::make_shared(&mut device, 10_000_000_000);
    vec![
        serde_json::from_value(serde_json::json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": "node-1-knd.dev-0"},
            "spec": {"driver": "knd.dev", "nodeName": "node-1",
                "pool": {"name": "node-1", "generation": 1, "resourceSliceCount": 1},
                "devices": [device, {"name": "nic1"}]}}))
        .unwrap(),
    ]
}

/// Consumable capacity as the scheduler applies it (KEP-5075): a shared NIC is allocated to
/// claim after claim, each consuming its requested bandwidth rounded up by the request policy
/// (or the policy's default), until what is left does not cover a request; `knd explain` shows
/// the share and says why a request does not fit.
#[test]
fn shares_of_a_shared_nic_are_allocated_until_its_bandwidth_is_spent() {
    use knd::cli::placement::Usage;
    let class: k8s_openapi::api::resource::v1::DeviceClass =
        serde_json::from_value(serde_json::json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
            "metadata": {"name": "knd-shared-nic"},
            "spec": {"selectors": [{"cel": {"expression":
                "device.driver == \"knd.dev\" && device.allowMultipleAllocations"}}]}}))
        .unwrap();
    let catalog = Catalog::new(&catalog_slices(), &[class]).unwrap();
    let claim = |bandwidth: Option<&str>| {
        let mut exactly = serde_json::json!({"deviceClassName": "knd-shared-nic"});
        if let Some(b) = bandwidth {
            exactly["capacity"] = serde_json::json!({"requests": {"bandwidth": b}});
        }
        let spec: k8s_openapi::api::resource::v1::DeviceClaim =
            serde_json::from_value(serde_json::json!({"requests": [{"name": "nic",
                "exactly": exactly}]}))
            .unwrap();
        Claim::compile("share", &spec).unwrap()
    };
    let mut usage = Usage::default();
    let mut take = |claim: &Claim| {
        let evaluated = claim.evaluate(&catalog);
        let outcome = evaluated.allocate_with(&usage);
        if let Ok(allocation) = &outcome {
            usage.take(allocation);
        }
        outcome.map(|a| (a.results[0].1.device.clone(), a.consumed[0]["bandwidth"]))
    };
    // 3G, 15M (rounded up to the 10M step: 20M), nothing named (the 1G default).
    assert_eq!(take(&claim(Some("3G"))), Ok(("nic0".into(), 3_000_000_000)));
    assert_eq!(take(&claim(Some("15M"))), Ok(("nic0".into(), 20_000_000)));
    assert_eq!(take(&claim(None)), Ok(("nic0".into(), 1_000_000_000)));
    // 5.98G left: 5G fits, then 1G does not.
    assert_eq!(take(&claim(Some("5G"))), Ok(("nic0".into(), 5_000_000_000)));
    let refused = take(&claim(Some("1G"))).unwrap_err();
    assert!(
        refused[0].reasons[0].contains("0 match (1 more have too little capacity left)"),
        "{refused:?}"
    );
    // More than the NIC has is never allocatable, and explain says why; nic1 is not shared.
    let too_big = claim(Some("20G"));
    let evaluated = too_big.evaluate(&catalog);
    let (text, ok) = knd::cli::placement::explain(&evaluated);
    assert!(!ok);
    assert!(
        text.contains(
            "capacity bandwidth: 20000000000 rounds to 20000000000, above the maximum 10000000000"
        ),
        "{text}"
    );
    assert!(
        text.contains("device.allowMultipleAllocations` is false"),
        "nic1 is rejected by the class: {text}"
    );
    let two = claim(Some("2G"));
    let evaluated = two.evaluate(&catalog);
    let (text, ok) = knd::cli::placement::explain(&evaluated);
    assert!(ok, "{text}");
    assert!(
        text.contains("nic: knd.dev/node-1/nic0 (a share: bandwidth 2G)"),
        "{text}"
    );
}

/// `knd templates --shared-nics`: the share template of a node whose NICs are shared is
/// allocated as a share of one of them; a node without shared NICs gets no such template.
#[test]
fn the_share_template_gets_a_share_of_a_shared_nic() {
    use knd::cli::placement::Usage;
    let inventory = inventory_of(&machines::gpu_8x8());
    let selector = knd::publish::selector::Selector::compile("true").unwrap();
    let shared = selector.shared_devices(&inventory);
    assert!(!shared.is_empty(), "the fixture's NICs report their speed");
    let template = templates::share(&shared).unwrap();
    assert!(templates::share(&std::collections::BTreeMap::new()).is_none());
    let slices = resources::slices_of(
        &inventory,
        (DRIVER_NAME, "node-1", 1),
        None,
        &std::collections::BTreeMap::new(),
        &shared,
    );
    let classes: Vec<k8s_openapi::api::resource::v1::DeviceClass> = templates::device_classes()
        .into_iter()
        .map(|t| serde_json::from_value(t.object).unwrap())
        .collect();
    let catalog = Catalog::new(&slices, &classes).unwrap();
    let spec: k8s_openapi::api::resource::v1::DeviceClaim =
        serde_json::from_value(template.object["spec"]["spec"]["devices"].clone()).unwrap();
    let claim = Claim::compile("nic-share-1g", &spec).unwrap();
    let allocation = claim
        .evaluate(&catalog)
        .allocate_with(&Usage::default())
        .unwrap();
    assert!(shared.contains_key(&allocation.results[0].1.device));
    assert_eq!(allocation.consumed[0]["bandwidth"], 1_000_000_000);
}

/// The placement simulator with consumable capacity (KEP-5075): on a node whose NICs are shared,
/// GPU pods take 100 Gbit/s of the NIC on their PCIe root and network pods 1–25 Gbit/s of any;
/// every GPU pod stays aligned, shares are packed up to exactly a NIC's capacity and never past
/// it (the simulator checks each allocation apart from the allocator), and the node holds many
/// more pods than when each pod takes a NIC whole.
#[test]
fn shared_nics_hold_more_pods_keep_gpu_pods_aligned_and_never_oversubscribe() {
    use knd::cli::placement::Usage;
    let inventory = inventory_of(&machines::gpu_8x8());
    let shared = knd::publish::selector::Selector::compile("true")
        .unwrap()
        .shared_devices(&inventory);
    assert_eq!(shared.len(), 8, "{shared:?}");
    let mut outcomes = Vec::new();
    for nics in [std::collections::BTreeMap::new(), shared] {
        let documents = placement::node_documents(&inventory, &nics).unwrap();
        let catalog = Catalog::new(&documents.slices, &documents.classes).unwrap();
        let kinds = placement::mixed_kinds(&documents, !nics.is_empty()).unwrap();
        assert_eq!(kinds.len(), 4);
        let strategy = Strategy::Kinds(kinds.iter().map(|c| vec![c.evaluate(&catalog)]).collect());
        let outcome = placement::simulate(&inventory, &catalog, &strategy, 2000, 3).unwrap();
        assert_eq!(outcome.allocations, 2000);
        assert_eq!(outcome.aligned, outcome.pairs, "{outcome:?}");
        // Each kind arrives about as often: a quarter are GPU pods.
        assert!((400..600).contains(&outcome.pairs), "{outcome:?}");
        outcomes.push(outcome);

        // Giving back what an allocation took frees exactly that.
        let mut usage = Usage::default();
        let first = kinds[1].evaluate(&catalog).allocate_with(&usage).unwrap();
        usage.take(&first);
        let second = kinds[1].evaluate(&catalog).allocate_with(&usage).unwrap();
        usage.take(&second);
        usage.give_back(&first);
        usage.give_back(&second);
        assert_eq!(usage, Usage::default());
    }
    let (whole, shared) = (&outcomes[0], &outcomes[1]);
    assert_eq!(whole.shares, 0);
    assert_eq!(whole.peak_allotted_permille, 0);
    assert_eq!(
        shared.shares, shared.allocations,
        "every pod's NIC is a share"
    );
    assert_eq!(
        shared.peak_allotted_permille, 1000,
        "shares fill a NIC to its capacity: {shared:?}"
    );
    assert!(whole.full_at() <= 8.0, "{whole:?}");
    assert!(
        shared.full_at() > 4.0 * whole.full_at(),
        "{shared:?} vs {whole:?}"
    );
}
