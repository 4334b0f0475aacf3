//! The deployment assets in `deploy/`: every manifest validates strictly (unknown fields are
//! errors) against the Kubernetes 1.34 OpenAPI schemas with kubernetes-validate (installed by
//! `cargo xtask setup`), the kustomizations list every manifest, and the CEL selectors and
//! attribute names the DeviceClasses and example claims use are the ones knd publishes.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use knd::{
    discover::inventory::discover,
    publish::{
        resources::{self, Value},
        selector::Selector,
    },
};
use knd_testkit::machines;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &serde_json::Value| !doc.is_null())
        .collect()
}

/// Runs kubernetes-validate strictly against 1.34 on `files`: (success, output).
fn validate(files: &[PathBuf]) -> (bool, String) {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "{} is missing: run `cargo xtask setup`",
        tool.display()
    );
    let output = Command::new(tool)
        .args(["--strict", "-k", "1.34.0"])
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn every_manifest_validates_strictly_against_kubernetes_1_34() {
    let files: Vec<PathBuf> = yaml_files("kubernetes")
        .into_iter()
        .chain(yaml_files("examples"))
        .collect();
    let expected: usize = files.iter().map(|f| documents(f).len()).sum();
    assert!(expected >= 15, "{expected} documents");
    let (ok, output) = validate(&files);
    assert!(ok, "{output}");
    let passed = output.matches(" passed for resource ").count();
    assert_eq!(
        passed, expected,
        "every document checked against a schema:\n{output}"
    );
    assert!(!output.contains("Couldn't find schema"), "{output}");
}

#[test]
fn the_validation_is_strict() {
    let dir = tempfile::tempdir().unwrap();
    let daemonset = std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).unwrap();
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        daemonset.replace("hostNetwork: true", "hostNetwrok: true"),
    )
    .unwrap();
    let (ok, output) = validate(&[typo]);
    assert!(!ok, "{output}");
    assert!(output.contains("'hostNetwrok' was unexpected"), "{output}");
}

#[test]
fn kustomizations_list_every_manifest_of_their_directory() {
    for dir in ["kubernetes", "monitoring"] {
        let kustomization = documents(&deploy().join(dir).join("kustomization.yaml"));
        let listed: BTreeSet<String> = kustomization[0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        let present: BTreeSet<String> = yaml_files(dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed, present, "deploy/{dir}/kustomization.yaml");
    }
}

/// Every CEL selector in a DeviceClass or claim template, with the class or request it is in.
fn selectors() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let files = yaml_files("kubernetes")
        .into_iter()
        .chain(yaml_files("examples"));
    for file in files {
        for doc in documents(&file) {
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let mut lists = vec![doc["spec"]["selectors"].clone()];
            for request in doc["spec"]["spec"]["devices"]["requests"]
                .as_array()
                .into_iter()
                .flatten()
            {
                lists.push(request["exactly"]["selectors"].clone());
            }
            for selector in lists.iter().filter_map(|l| l.as_array()).flatten() {
                let expression = selector["cel"]["expression"].as_str().unwrap().to_owned();
                found.push((name.clone(), expression));
            }
        }
    }
    found
}

#[test]
fn selectors_and_constraints_use_what_knd_publishes() {
    let inventory = discover(&machines::gpu_8x8().host());
    let devices: Vec<(String, std::collections::BTreeMap<String, Value>)> = inventory
        .nics
        .iter()
        .map(|nic| (resources::device_name(nic), resources::attributes(nic)))
        .collect();
    let selectors = selectors();
    assert!(selectors.len() >= 3, "{selectors:?}");
    for (owner, expression) in &selectors {
        let selector = Selector::compile(expression)
            .unwrap_or_else(|e| panic!("{owner}: `{expression}` does not compile: {e}"));
        let matching = devices
            .iter()
            .filter(|(name, attributes)| selector.matches_own(name, attributes).unwrap())
            .count();
        assert!(
            matching > 0,
            "{owner}: `{expression}` matches no device of an 8-GPU node"
        );
        if owner == "knd-rdma" {
            let non_rdma = discover(&machines::shared_switch().host());
            assert!(
                non_rdma.nics.iter().all(|nic| !selector
                    .matches_own(&resources::device_name(nic), &resources::attributes(nic))
                    .unwrap()),
                "knd-rdma must not match NICs without RDMA"
            );
        }
    }
    // matchAttribute names are attributes knd publishes on every hardware NIC.
    for file in yaml_files("examples") {
        for doc in documents(&file) {
            for constraint in doc["spec"]["spec"]["devices"]["constraints"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let attribute = constraint["matchAttribute"].as_str().unwrap();
                assert!(
                    devices.iter().all(|(_, a)| a.contains_key(attribute)),
                    "{}: matchAttribute {attribute} is not published",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn example_claim_configs_are_valid_network_configs() {
    for file in yaml_files("examples") {
        for doc in documents(&file) {
            for config in doc["spec"]["spec"]["devices"]["config"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let parameters = &config["opaque"]["parameters"];
                let text = serde_json::to_string(parameters).unwrap();
                knd::model::config::parse(text.as_bytes()).unwrap_or_else(|e| {
                    panic!("{}: {e}", file.display());
                });
            }
        }
    }
}

fn helm() -> PathBuf {
    let helm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/helm");
    assert!(
        helm.exists(),
        "{} is missing: run `cargo xtask setup`",
        helm.display()
    );
    helm
}

/// `helm template` of the chart with `values` (`key=value` pairs), into a file in `dir`.
fn render(dir: &Path, values: &[&str]) -> PathBuf {
    let mut command = Command::new(helm());
    command
        .args(["template", "knd"])
        .arg(deploy().join("helm/knd"))
        .args(["--namespace", "knd-system", "--kube-version", "1.34.0"]);
    for value in values {
        command.args(["--set", value]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = dir.join("rendered.yaml");
    std::fs::write(&path, &output.stdout).unwrap();
    path
}

#[test]
fn the_helm_chart_lints_renders_and_validates_strictly() {
    let lint = Command::new(helm())
        .arg("lint")
        .arg(deploy().join("helm/knd"))
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let rendered = render(
        dir.path(),
        &["driver.filter=device.attributes[\"knd.dev\"].rdma"],
    );
    let kinds: Vec<String> = documents(&rendered)
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    for kind in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "DeviceClass",
        "Service",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }
    let (ok, output) = validate(&[rendered]);
    assert!(ok, "{output}");
    assert_eq!(
        output.matches(" passed for resource ").count(),
        kinds.len(),
        "{output}"
    );

    // With monitoring on, the alerts are the same as deploy/monitoring's.
    let monitored = render(
        dir.path(),
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
        ],
    );
    let rule = documents(&monitored)
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let original = documents(&deploy().join("monitoring/prometheusrule.yaml"));
    assert_eq!(
        rule["spec"], original[0]["spec"],
        "the chart's alerts drifted"
    );
}

/// The flags the chart's DaemonSet passes are flags `knd run` takes (it gets as far as checking
/// the host root), and so are the environment variables of the plain manifest.
#[test]
fn the_daemonsets_configure_knd_with_flags_it_knows() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = render(
        dir.path(),
        &["driver.filter=device.attributes[\"knd.dev\"].rdma"],
    );
    let daemonset = documents(&rendered)
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let args: Vec<String> = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert!(args.len() > 10, "{args:?}");
    let missing_root = dir.path().join("no-such-host-root");
    let output = Command::new(env!("CARGO_BIN_EXE_knd"))
        .args(args.iter().filter(|a| !a.starts_with("--host-root=")))
        .arg(format!("--host-root={}", missing_root.display()))
        .env("NODE_NAME", "node-1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a directory"),
        "every flag accepted, then the missing host root refused: {stderr}"
    );

    let plain = documents(&deploy().join("kubernetes/daemonset.yaml"));
    let container = &plain[0]["spec"]["template"]["spec"]["containers"][0];
    let mut command = Command::new(env!("CARGO_BIN_EXE_knd"));
    command.args(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap()),
    );
    for variable in container["env"].as_array().unwrap() {
        if let Some(value) = variable["value"].as_str() {
            command.env(variable["name"].as_str().unwrap(), value);
        }
    }
    let output = command
        .env("NODE_NAME", "node-1")
        .env("KND_HOST_ROOT", &missing_root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a directory"), "{stderr}");
}

/// What both DaemonSets (the plain manifest and the chart's) give knd: only its own plugin
/// directory writable, no bpffs, read-only NRI, netns and host mounts, the HTTP server on the
/// node's loopback with kubelet probing it there, and the metrics leaving the node only through
/// kube-rbac-proxy (TLS, a token allowed to GET /metrics).
#[test]
fn the_daemonsets_ask_for_the_least_and_keep_the_metrics_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = render(dir.path(), &[]);
    let chart = documents(&rendered)
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let plain = documents(&deploy().join("kubernetes/daemonset.yaml")).remove(0);
    for (which, daemonset) in [("plain", &plain), ("chart", &chart)] {
        let spec = &daemonset["spec"]["template"]["spec"];
        let containers = spec["containers"].as_array().unwrap();
        let knd = &containers[0];
        let mounts: Vec<(String, bool)> = knd["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap().to_owned(),
                    m["readOnly"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        let writable: Vec<&str> = mounts
            .iter()
            .filter(|(_, ro)| !ro)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(
            writable,
            [
                "/var/lib/kubelet/plugins/knd.dev",
                "/var/lib/kubelet/plugins_registry",
                "/var/lib/knd",
                "/run/knd"
            ],
            "{which}: writable mounts"
        );
        assert!(
            !mounts
                .iter()
                .any(|(p, _)| p == "/sys/fs/bpf" || p == "/tmp"),
            "{which}: {mounts:?}"
        );
        for (path, _) in &mounts {
            assert!(
                path != "/var/lib/kubelet/plugins",
                "{which}: all of kubelet's plugins"
            );
        }
        let caps: Vec<&str> = knd["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(caps, ["NET_ADMIN", "SYS_ADMIN"], "{which}");
        assert_eq!(knd["securityContext"]["privileged"], false, "{which}");
        // The HTTP server on the loopback, probed there; no port of knd's own published.
        let text = serde_json::to_string(knd).unwrap();
        assert!(text.contains("127.0.0.1:9177"), "{which}: {text}");
        assert!(!text.contains("0.0.0.0"), "{which}: {text}");
        assert!(knd["ports"].is_null(), "{which}: {}", knd["ports"]);
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                knd[probe]["httpGet"]["host"], "127.0.0.1",
                "{which} {probe}"
            );
        }
        let proxy = containers
            .iter()
            .find(|c| c["name"] == "kube-rbac-proxy")
            .unwrap_or_else(|| panic!("{which}: no kube-rbac-proxy"));
        let args = serde_json::to_string(&proxy["args"]).unwrap();
        assert!(
            args.contains("--upstream=http://127.0.0.1:9177/"),
            "{which}: {args}"
        );
        assert!(args.contains("--secure-listen-address="), "{which}: {args}");
        assert_eq!(proxy["ports"][0]["name"], "metrics", "{which}");
    }
    // The proxy may check tokens, and the scraper's role exists; 1.36's claim-status rule too.
    for rbac in [
        std::fs::read_to_string(deploy().join("kubernetes/rbac.yaml")).unwrap(),
        std::fs::read_to_string(&rendered).unwrap(),
    ] {
        for needed in [
            "tokenreviews",
            "subjectaccessreviews",
            "nonResourceURLs: [\"/metrics\"]",
            "resourceclaims/driver",
            "associated-node:patch",
        ] {
            assert!(rbac.contains(needed), "{needed} missing");
        }
    }
}

#[test]
fn the_configuration_reference_names_every_flag_and_attribute() {
    let help = Command::new(env!("CARGO_BIN_EXE_knd"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let guide = std::fs::read_to_string(deploy().join("../docs/configuration.md")).unwrap();
    let flag = regex::Regex::new(r"--([a-z][a-z-]+)").unwrap();
    let flags: BTreeSet<&str> = flag
        .captures_iter(&help)
        .map(|c| c.get(1).unwrap().as_str())
        .filter(|f| *f != "help")
        .collect();
    assert!(flags.len() > 15, "{flags:?}");
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|f| !guide.contains(&format!("--{f}`")) && !guide.contains(&format!("--{f}/")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/install.md does not name {missing:?}"
    );
}

/// Whether the admission policy `policy` of `rbac.yaml` admits a status update by `user` on
/// `node` (None: a token without a node) from `old` to `new`: its match condition, variables
/// and validations evaluated with the `cel` crate as the API server evaluates them.
fn admits(
    policy: &serde_json::Value,
    (user, node): (&str, Option<&str>),
    old: &serde_json::Value,
    new: &serde_json::Value,
) -> Result<(), String> {
    let extra = node.map_or_else(
        || serde_json::json!({}),
        |node| serde_json::json!({"authentication.kubernetes.io/node-name": [node]}),
    );
    let request = serde_json::json!({"userInfo": {"username": user, "extra": extra}});
    let mut context = cel::Context::default();
    context.add_variable("request", &request).unwrap();
    context.add_variable("object", new).unwrap();
    context.add_variable("oldObject", old).unwrap();
    let run = |context: &cel::Context, expression: &str| {
        cel::Program::compile(expression)
            .unwrap_or_else(|e| panic!("`{expression}` does not compile: {e}"))
            .execute(context)
            .unwrap_or_else(|e| panic!("`{expression}`: {e}"))
    };
    let spec = &policy["spec"];
    let matched = spec["matchConditions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| run(&context, c["expression"].as_str().unwrap()) == cel::Value::Bool(true));
    if !matched {
        return Ok(());
    }
    let mut variables = std::collections::HashMap::new();
    for variable in spec["variables"].as_array().unwrap() {
        let value = run(&context, variable["expression"].as_str().unwrap());
        variables.insert(variable["name"].as_str().unwrap().to_owned(), value);
        let map: std::collections::HashMap<cel::objects::Key, cel::Value> = variables
            .iter()
            .map(|(k, v)| (cel::objects::Key::from(k.clone()), v.clone()))
            .collect();
        context.add_variable_from_value("variables", map);
    }
    for validation in spec["validations"].as_array().unwrap() {
        if run(&context, validation["expression"].as_str().unwrap()) != cel::Value::Bool(true) {
            return Err(validation["message"]
                .as_str()
                .or_else(|| validation["messageExpression"].as_str())
                .unwrap()
                .to_owned());
        }
    }
    Ok(())
}

/// The policy that holds 1.34 and 1.35 API servers to what 1.36 enforces through
/// `resourceclaims/driver`: a node's knd writes only the status of claims allocated on its
/// node, and only knd's entries.
#[test]
fn claim_status_is_written_only_by_the_knd_of_the_claims_node() {
    let policy = documents(&deploy().join("kubernetes/rbac.yaml"))
        .into_iter()
        .find(|d| {
            d["kind"] == "ValidatingAdmissionPolicy" && d["metadata"]["name"] == "knd-claim-status"
        })
        .expect("the claim status policy");
    let old = knd_testkit::claims::allocated_claim(
        "c",
        "uid-c",
        r#"{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig"}"#,
    );
    let entry = |driver: &str, device: &str| {
        serde_json::json!({"driver": driver, "pool": "node-1", "device": device,
            "conditions": [{"type": "Ready", "status": "True"}]})
    };
    let with = |entries: Vec<serde_json::Value>| {
        let mut claim = old.clone();
        claim["status"]["devices"] = serde_json::Value::Array(entries);
        claim
    };
    let knd = "system:serviceaccount:knd-system:knd";
    let ours = with(vec![entry("knd.dev", "pci-0000-b4-00-0")]);
    assert_eq!(admits(&policy, (knd, Some("node-1")), &old, &ours), Ok(()));
    let elsewhere = admits(&policy, (knd, Some("node-2")), &old, &ours).unwrap_err();
    assert!(elsewhere.contains("allocated elsewhere"), "{elsewhere}");
    let no_node = admits(&policy, (knd, None), &old, &ours).unwrap_err();
    assert!(no_node.contains("no node association"), "{no_node}");
    let gpu = with(vec![entry("gpu.nvidia.com", "gpu-5")]);
    let theirs = admits(&policy, (knd, Some("node-1")), &old, &gpu).unwrap_err();
    assert!(
        theirs.contains("may only write status entries of driver knd.dev"),
        "{theirs}"
    );
    // Removing another driver's entry is changing it too.
    let both = with(vec![
        entry("knd.dev", "pci-0000-b4-00-0"),
        entry("gpu.nvidia.com", "gpu-5"),
    ]);
    assert!(admits(&policy, (knd, Some("node-1")), &both, &ours).is_err());
    assert_eq!(admits(&policy, (knd, Some("node-1")), &both, &both), Ok(()));
    // Other writers (the scheduler, the GPU driver) are not this policy's business.
    assert_eq!(
        admits(&policy, ("system:kube-scheduler", None), &old, &gpu),
        Ok(())
    );
}
