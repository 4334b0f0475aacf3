//! Attaching a claimed interface to a pod and giving it back, on real namespaces: a node (a
//! throwaway namespace standing in for the host) with a veth NIC cabled to a switch, and pods
//! that already have an `eth0`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use knd::{
    attach,
    model::{
        config::{self, NetworkConfig},
        records::HostSide,
    },
};
use knd_testkit::{TestHost, veth_pair};

/// The changeable device features of `interface` in `netns`, with their wanted state.
async fn features_of(netns: &knd::os::netns::Netns, interface: &str) -> BTreeMap<String, bool> {
    let name = interface.to_owned();
    netns
        .block_on_async(move || async move {
            let mut ethtool = knd::os::ethtool::Ethtool::connect(&name).unwrap();
            ethtool.features(&name).await.unwrap().changeable
        })
        .await
        .unwrap()
}

fn config(json: &str) -> NetworkConfig {
    let text = format!(r#"{{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig",{json}}}"#);
    let parsed = config::parse(text.as_bytes()).unwrap();
    parsed.validate(config::DeviceLimits::default()).unwrap();
    parsed
}

/// The host side without the interface index, which the kernel reassigns when an interface
/// changes namespace and its index is taken there.
fn portable(mut side: HostSide) -> HostSide {
    side.link.index = 0;
    side
}

/// A node with NIC `enp1` (MTU 1500, 192.168.50.2/24, a route to 10.50.0.0/16 via the switch,
/// a static neighbor) and a pod with its own `eth0`.
fn node_and_pod() -> (TestHost, TestHost, TestHost) {
    let node = TestHost::new("node").unwrap();
    let switch = TestHost::new("switch").unwrap();
    let pod = TestHost::new("pod").unwrap();
    veth_pair(&node, "enp1", &switch, "sw1").unwrap();
    veth_pair(&pod, "eth0", &switch, "sw2").unwrap();
    node.configure("enp1", "192.168.50.2".parse().unwrap(), 24)
        .unwrap();
    switch
        .configure("sw1", "192.168.50.1".parse().unwrap(), 24)
        .unwrap();
    node.netlink(|link| async move {
        let route = knd::model::link::Route {
            gateway: Some("192.168.50.1".parse().unwrap()),
            ..knd::model::link::Route::new("10.50.0.0/16".parse().unwrap(), 254)
        };
        link.add_route("enp1", &route).await?;
        link.add_neighbor(
            "enp1",
            "192.168.50.77".parse().unwrap(),
            "02:00:00:00:50:77",
        )
        .await
    })
    .unwrap();
    (node, switch, pod)
}

fn wanted_config() -> NetworkConfig {
    config(
        r#""interface":{"name":"net1","mtu":9000,"hardwareAddr":"02:00:00:00:00:42","addresses":["10.9.0.2/24"],
                        "gsoMaxSize":131072,"groMaxSize":131072,"gsoIPv4MaxSize":98304,"groIPv4MaxSize":81920,
                        "arpIgnore":1,"arpAnnounce":2,"dhcp":false,"disableEbpfPrograms":false},
           "ethtool":{"features":{"rx-gro":true,"tx-checksum-ip-generic":false}},
           "routes":[{"destination":"10.99.0.0/16","gateway":"10.9.0.1"},
                     {"destination":"10.98.0.0/16","source":"10.9.0.2","scope":"link","table":100}],
           "neighbors":[{"destination":"10.9.0.1","hardwareAddr":"02:00:00:00:00:01"}],
           "rules":[{"priority":100,"source":"10.9.0.0/24","table":100},
                    {"priority":101,"destination":"10.97.0.0/16","table":101}],
           "sysctls":{"net.ipv4.conf.net1.arp_notify":"1"}"#,
    )
}

/// What the wanted configuration makes of `net1` inside the pod.
async fn check_inside_the_pod(pod: &TestHost) {
    let inside = attach::record(pod.netns(), "net1").await.unwrap();
    assert_eq!(inside.link.mtu, 9000);
    assert!(inside.link.up);
    assert_eq!(inside.nets(), ["10.9.0.2/24".parse().unwrap()]);
    assert_eq!(inside.link.offload_sizes.gso_max_size, Some(131_072));
    assert_eq!(inside.link.offload_sizes.gro_max_size, Some(131_072));
    assert_eq!(inside.link.offload_sizes.gso_ipv4_max_size, Some(98_304));
    assert_eq!(inside.link.offload_sizes.gro_ipv4_max_size, Some(81_920));
    assert_eq!(inside.neighbors.len(), 1, "the pod's static neighbor");
    assert_eq!(inside.routes.len(), 2, "{:?}", inside.routes);
    let via = inside.routes.iter().find(|r| r.table == 254).unwrap();
    assert_eq!(via.gateway, Some("10.9.0.1".parse::<IpAddr>().unwrap()));
    let on_link = inside.routes.iter().find(|r| r.table == 100).unwrap();
    assert_eq!(
        (on_link.scope, on_link.source),
        (
            knd::model::link::SCOPE_LINK,
            Some("10.9.0.2".parse::<IpAddr>().unwrap())
        ),
        "{on_link:?}"
    );
    let pod_clone = pod.netns().try_clone().unwrap();
    let sysctls = tokio::task::spawn_blocking(move || {
        pod_clone.run(|| {
            ["arp_ignore", "arp_announce", "arp_notify"].map(|setting| {
                std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/net1/{setting}"))
                    .unwrap()
                    .trim()
                    .to_owned()
            })
        })
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        sysctls,
        ["1", "2", "1"],
        "arpIgnore, arpAnnounce and a sysctl"
    );
    let features = features_of(pod.netns(), "net1").await;
    assert_eq!(features.get("rx-gro"), Some(&true));
    assert_eq!(features.get("tx-checksum-ip-generic"), Some(&false));
    let pod_clone = pod.netns().try_clone().unwrap();
    let rules = tokio::task::spawn_blocking(move || {
        pod_clone.run(|| {
            std::process::Command::new("ip")
                .args(["-4", "rule", "show"])
                .output()
                .unwrap()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(
        rules.contains("100:\tfrom 10.9.0.0/24 lookup 100"),
        "{rules}"
    );
    assert!(
        rules.contains("101:\tfrom all to 10.97.0.0/16 lookup 101"),
        "{rules}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn an_interface_is_configured_in_the_pod_and_restored_exactly_on_the_host() {
    let (node, switch, pod) = tokio::task::spawn_blocking(node_and_pod).await.unwrap();
    let wanted = wanted_config();
    let before = attach::record_for(node.netns(), "enp1", &wanted)
        .await
        .unwrap();
    assert_eq!(
        before.features,
        [
            ("rx-gro".to_owned(), false),
            ("tx-checksum-ip-generic".to_owned(), true)
        ]
        .into(),
        "the host's state of the features the claim changes"
    );
    assert_eq!(before.link.mtu, 1500);
    assert_eq!(before.nets(), ["192.168.50.2/24".parse().unwrap()]);
    assert_eq!(before.routes.len(), 1, "{:?}", before.routes);
    assert_eq!(before.neighbors.len(), 1, "{:?}", before.neighbors);
    assert_eq!(before.link.offload_sizes.gso_max_size, Some(65536));

    let side = attach::attach(node.netns(), pod.netns(), &before, "net1", &wanted)
        .await
        .unwrap();
    assert_eq!(side.name, "net1");
    assert_eq!(side.mac.as_deref(), Some("02:00:00:00:00:42"));
    check_inside_the_pod(&pod).await;
    let node_view = attach::record(node.netns(), "enp1").await;
    assert!(
        node_view
            .unwrap_err()
            .to_string()
            .contains("does not exist"),
        "gone from the node"
    );

    assert!(side.place.is_some(), "where it is in the pod is recorded");
    attach::detach(node.netns(), Some(pod.netns()), "net1", &before, side.place)
        .await
        .unwrap();
    let after = attach::record_for(node.netns(), "enp1", &wanted)
        .await
        .unwrap();
    assert_eq!(
        portable(after),
        portable(before.clone()),
        "name, MTU, MAC, up, GSO/GRO sizes, addresses, routes and neighbors as before"
    );
    assert!(attach::record(pod.netns(), "net1").await.is_err());
    let features = features_of(node.netns(), "enp1").await;
    assert_eq!(
        features.get("rx-gro"),
        Some(&false),
        "host features restored"
    );
    assert_eq!(features.get("tx-checksum-ip-generic"), Some(&true));
    // Detaching again is harmless.
    attach::detach(node.netns(), Some(pod.netns()), "net1", &before, side.place)
        .await
        .unwrap();
    assert_eq!(
        portable(
            attach::record_for(node.netns(), "enp1", &wanted)
                .await
                .unwrap()
        ),
        portable(before.clone())
    );
    drop(switch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_failed_step_is_named_and_undone() {
    let (node, _switch, pod) = tokio::task::spawn_blocking(node_and_pod).await.unwrap();
    let before = attach::record(node.netns(), "enp1").await.unwrap();
    // The gateway is not on any connected network: the route step fails after the move.
    let unreachable = config(
        r#""interface":{"name":"net1","mtu":4000,"addresses":["10.9.0.2/24"]},
           "routes":[{"destination":"10.99.0.0/16","gateway":"172.31.0.1"}]"#,
    );
    let error = attach::attach(node.netns(), pod.netns(), &before, "net1", &unreachable)
        .await
        .unwrap_err();
    assert_eq!(error.interface, "enp1");
    assert_eq!(error.step, "add route to 10.99.0.0/16");
    assert!(!error.reason.is_empty());
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone()),
        "undone"
    );
    assert!(attach::record(pod.netns(), "net1").await.is_err());

    // A name the pod already uses: the move itself fails, nothing changes.
    let taken = config(r#""interface":{"name":"eth0"}"#);
    let error = attach::attach(node.netns(), pod.netns(), &before, "eth0", &taken)
        .await
        .unwrap_err();
    assert_eq!(error.step, "move into the pod as eth0");
    assert!(
        error
            .reason
            .contains("already has an interface called eth0"),
        "{error}"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone())
    );

    // A feature the device cannot change: named, and everything undone.
    let fixed = config(r#""ethtool":{"features":{"rx-lro":true}}"#);
    let error = attach::attach(node.netns(), pod.netns(), &before, "net1", &fixed)
        .await
        .unwrap_err();
    assert_eq!(error.step, "ethtool", "{error}");
    assert!(
        error.reason.contains("cannot change feature rx-lro"),
        "{error}"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone())
    );

    // What knd does not do is refused before anything moves, even in a record written by an
    // older knd whose prepare let it through.
    let private = config::parse(
        br#"{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig","ethtool":{"privateFlags":{"legacy-rx":true}}}"#,
    )
    .unwrap();
    let error = attach::attach(node.netns(), pod.netns(), &before, "net1", &private)
        .await
        .unwrap_err();
    assert!(
        error
            .reason
            .contains("ethtool.privateFlags: driver private flags are not supported"),
        "{error}"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone())
    );
}

/// A NIC the kernel hands back from a dying pod comes with the MAC address the claim gave it;
/// another host interface may carry that address too. Release finds the device by what was
/// recorded of it on the host and nobody in the pod can change — the permanent MAC or parent
/// device of hardware, the peer of a veth as here (see `netlink::recorded`) — so the host
/// interface carrying the claim's MAC is left exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_nic_handed_back_by_a_dying_pod_is_never_found_by_the_mac_the_claim_set() {
    let (node, switch, pod) = tokio::task::spawn_blocking(node_and_pod).await.unwrap();
    let before = attach::record(node.netns(), "enp1").await.unwrap();
    let wanted = config(
        r#""interface":{"name":"net1","mtu":9000,"hardwareAddr":"02:00:00:00:00:43","addresses":["10.9.0.2/24"]}"#,
    );
    attach::attach(node.netns(), pod.netns(), &before, "net1", &wanted)
        .await
        .unwrap();
    // The pod's namespace dies: the kernel hands the NIC back to the host under a name of its
    // choosing and with the pod's MAC (emulated). A host interface `decoy` also has that MAC
    // (set after the attach, which would have refused it).
    let node_ns = node.netns().try_clone().unwrap();
    pod.netlink(|link| async move { link.move_renamed("net1", &node_ns, "dev77").await })
        .unwrap();
    veth_pair(&node, "decoy", &switch, "sw9").unwrap();
    node.netlink(|link| async move { link.set_mac("decoy", "02:00:00:00:00:43").await })
        .unwrap();
    let decoy = attach::record(node.netns(), "decoy").await.unwrap();
    attach::detach(node.netns(), None, "net1", &before, None)
        .await
        .unwrap();
    assert_eq!(
        attach::record(node.netns(), "decoy").await.unwrap(),
        decoy,
        "the interface with the claim's MAC is untouched"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before),
        "host MAC, MTU, addresses, routes and neighbors restored"
    );
}

/// The fields of a JSON Schema node, as paths (`routes[].gateway`; a map such as `sysctls` is
/// one field).
fn schema_fields(root: &serde_json::Value, node: &serde_json::Value, path: &str) -> Vec<String> {
    if let Some(reference) = node["$ref"].as_str() {
        let name = reference.trim_start_matches("#/$defs/");
        return schema_fields(root, &root["$defs"][name], path);
    }
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    if let Some(properties) = node["properties"].as_object() {
        return properties
            .iter()
            .flat_map(|(key, sub)| schema_fields(root, sub, &join(key)))
            .collect();
    }
    if node.get("items").is_some() {
        return schema_fields(root, &node["items"], &format!("{path}[]"));
    }
    for alternatives in ["anyOf", "oneOf"] {
        if let Some(variants) = node[alternatives].as_array() {
            return variants
                .iter()
                .flat_map(|v| schema_fields(root, v, path))
                .collect();
        }
    }
    if node["type"] == "null" {
        return Vec::new();
    }
    vec![path.to_owned()]
}

/// Every path present in a JSON value, intermediate ones included (`routes[]`, `routes[].table`).
fn value_paths(value: &serde_json::Value, path: &str, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, sub) in map {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                value_paths(sub, &here, out);
                out.insert(here);
            }
        }
        serde_json::Value::Array(items) => {
            let here = format!("{path}[]");
            for item in items {
                value_paths(item, &here, out);
            }
            out.insert(here);
        }
        _ => {}
    }
}

/// Nothing in the claim configuration is silently ignored: every field of its JSON Schema is
/// set in [`wanted_config`] (whose effect the root tests above read back from the kernel), or
/// applied by another stage (named here with the test that reads its effect), or refused at
/// prepare with an error naming it.
#[test]
fn every_configuration_field_is_applied_or_refused() {
    let schema: serde_json::Value = serde_json::from_str(&config::json_schema()).unwrap();
    let fields: BTreeSet<String> = schema_fields(&schema, &schema, "").into_iter().collect();
    assert!(fields.len() > 30, "{fields:?}");
    let mut in_the_kernel_test = BTreeSet::new();
    value_paths(
        &serde_json::to_value(wanted_config()).unwrap(),
        "",
        &mut in_the_kernel_test,
    );
    let elsewhere = [
        (
            "telemetry.enabled",
            "telemetry.rs a_claim_with_telemetry_off_gets_no_programs_and_no_series",
        ),
        (
            "topology.require",
            "alignment.rs (prepare checks the NIC's class to the claim's GPU)",
        ),
        (
            "nccl.env",
            "pods.rs a_claim_asking_for_nccl_gets_its_variables_and_topology_file, \
             nccl.rs (variables, GID choice, topology file)",
        ),
        (
            "share.mode",
            "pods.rs a_share_is_made_in_the_pod_held_to_its_bandwidth_and_deleted_at_release \
             (bridge, the default; the mode is set when the child is created)",
        ),
        (
            "share.policeIngress",
            "tcx_counters.rs an_ingress_policer_drops_what_exceeds_the_share_after_it_was_counted; \
             prepare refuses `share` on a device allocated whole",
        ),
        (
            "rdma.mode",
            "pods.rs shared_rdma_gives_every_container_the_claimed_nics_verbs_devices \
             (`exclusive` is refused below)",
        ),
    ];
    let refused = [
        ("interface.dhcp", r#""interface":{"dhcp":true}"#),
        (
            "interface.disableEbpfPrograms",
            r#""interface":{"disableEbpfPrograms":true}"#,
        ),
        (
            "ethtool.privateFlags",
            r#""ethtool":{"privateFlags":{"rx_striding_rq":true}}"#,
        ),
        ("rdma.mode", r#""rdma":{"mode":"exclusive"}"#),
    ];
    for (field, json) in refused {
        let text = format!(r#"{{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig",{json}}}"#);
        let error = config::parse(text.as_bytes())
            .and_then(|c| c.validate(config::DeviceLimits::default()))
            .expect_err(json);
        assert_eq!(error.path, field, "{error}");
    }
    let unaccounted: Vec<&String> = fields
        .iter()
        .filter(|field| {
            !in_the_kernel_test.contains(*field)
                && !elsewhere.iter().any(|(f, _)| f == field)
                && !refused.iter().any(|(f, _)| f == field)
        })
        .collect();
    assert!(
        unaccounted.is_empty(),
        "fields neither applied in a test nor refused: {unaccounted:?}"
    );
    // And the lists name only real fields.
    for field in elsewhere
        .iter()
        .map(|e| e.0)
        .chain(refused.iter().map(|r| r.0))
    {
        assert!(fields.contains(field), "{field} is not in the schema");
    }
}

/// Runs `ip` with `args` inside `host`; its standard output.
fn ip(host: &TestHost, args: &[&str]) -> String {
    let output = host
        .run(|| {
            std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// What iproute2 — an independent reader — dumps of `enp1`'s addresses (IPv4 and IPv6) and
/// routes (both families, every table), as JSON, without what differs by nature after a round
/// trip: the interface index and the seconds ticking off finite lifetimes (checked apart).
fn host_dump(node: &TestHost) -> (serde_json::Value, Vec<(String, u64, u64)>) {
    let mut lifetimes = Vec::new();
    let mut addresses: serde_json::Value =
        serde_json::from_str(&ip(node, &["-d", "-j", "address", "show", "dev", "enp1"])).unwrap();
    for link in addresses.as_array_mut().unwrap() {
        let link = link.as_object_mut().unwrap();
        link.remove("ifindex");
        for address in link["addr_info"].as_array_mut().unwrap() {
            let address = address.as_object_mut().unwrap();
            let (valid, preferred) = (
                address.remove("valid_life_time").unwrap().as_u64().unwrap(),
                address
                    .remove("preferred_life_time")
                    .unwrap()
                    .as_u64()
                    .unwrap(),
            );
            lifetimes.push((address["local"].to_string(), valid, preferred));
        }
    }
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let dump: serde_json::Value = serde_json::from_str(&ip(
            node,
            &[
                family, "-d", "-j", "route", "show", "table", "all", "dev", "enp1",
            ],
        ))
        .unwrap();
        for mut route in dump.as_array().unwrap().iter().cloned() {
            // A prefix route of an address with a lifetime expires with it.
            if let Some(expires) = route.as_object_mut().unwrap().remove("expires") {
                lifetimes.push((route["dst"].to_string(), expires.as_u64().unwrap(), 0));
            }
            routes.push(route);
        }
    }
    routes.sort_by_key(ToString::to_string);
    (
        serde_json::json!({"addresses": addresses, "routes": routes}),
        lifetimes,
    )
}

/// [`node_and_pod`], with IPv6 on `enp1` and more on it: addresses with a label, without a
/// prefix route, with a broadcast and a metric, with lifetimes; routes of protocols boot, static,
/// dhcp and bgp in tables main, 100 and 200, onlink, with a source, with metrics.
fn node_with_a_rich_host_side() -> (TestHost, TestHost, TestHost) {
    let (node, switch, pod) = node_and_pod();
    node.run(|| {
        // IPv6 on, without duplicate address detection (a tentative state is not a field).
        for key in ["all", "default", "enp1"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/accept_dad"), "0").unwrap();
        }
        std::fs::write("/proc/sys/net/ipv6/conf/enp1/disable_ipv6", "0").unwrap();
    })
    .unwrap();
    for command in [
        "address add 192.168.51.2/24 dev enp1 label enp1:two noprefixroute",
        "address add 192.168.52.2/24 broadcast 192.168.52.255 dev enp1 metric 77",
        "address add fd00:50::2/64 dev enp1 nodad",
        "address add fd00:51::2/64 dev enp1 nodad valid_lft 3600 preferred_lft 1800",
        "route add 198.18.20.0/24 via 192.168.50.1 dev enp1",
        "route add 198.18.21.0/24 via 10.255.0.1 dev enp1 onlink table 100 metric 50 \
         proto static",
        "route add 198.18.22.0/24 dev enp1 scope link proto dhcp table 200 src 192.168.50.2",
        "route add 198.18.23.0/24 via 192.168.50.1 dev enp1 mtu lock 1400 advmss 1300 \
         initcwnd 10 congctl reno",
        "-6 route add fd00:99::/64 via fd00:50::1 dev enp1 proto static metric 300 table 100",
        "-6 route add 2001:db8:1::/48 dev enp1 proto 186",
    ] {
        let args: Vec<&str> = command.split_whitespace().collect();
        ip(&node, &args);
    }
    (node, switch, pod)
}

/// The host gets its interface back exactly: addresses with their flags, labels, scopes,
/// broadcast and lifetimes; routes in several tables with their protocol (`boot` as `ip route
/// add` makes them, `dhcp`, `static`), scope, metric, flags (onlink), preferred source and
/// metrics (mtu lock, advmss, initcwnd, congestion control) — IPv4 and IPv6, compared field for
/// field with iproute2's dump before the attachment and after the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn the_host_gets_every_route_and_address_back_field_for_field() {
    let (node, _switch, pod) = tokio::task::spawn_blocking(node_with_a_rich_host_side)
        .await
        .unwrap();
    let (before, lifetimes_before) = host_dump(&node);
    let text = before.to_string();
    for field in [
        "\"protocol\":\"boot\"",
        "\"protocol\":\"dhcp\"",
        "\"table\":\"100\"",
        "\"table\":\"200\"",
        "onlink",
        "\"congestion\":\"reno\"",
        "\"label\":\"enp1:two\"",
        "noprefixroute",
        "\"protocol\":\"bgp\"",
    ] {
        assert!(text.contains(field), "the setup has {field}: {text}");
    }

    let wanted = wanted_config();
    let recorded = attach::record_for(node.netns(), "enp1", &wanted)
        .await
        .unwrap();
    let side = attach::attach(node.netns(), pod.netns(), &recorded, "net1", &wanted)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    attach::detach(
        node.netns(),
        Some(pod.netns()),
        "net1",
        &recorded,
        side.place,
    )
    .await
    .unwrap();
    let (after, lifetimes_after) = host_dump(&node);
    let lines = |dump: &serde_json::Value| -> Vec<String> {
        dump["routes"]
            .as_array()
            .unwrap()
            .iter()
            .chain(dump["addresses"][0]["addr_info"].as_array().unwrap())
            .map(ToString::to_string)
            .collect()
    };
    let (was, is) = (lines(&before), lines(&after));
    let gone: Vec<&String> = was.iter().filter(|l| !is.contains(l)).collect();
    let new: Vec<&String> = is.iter().filter(|l| !was.contains(l)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "lost: {gone:#?}\nnew: {new:#?}"
    );
    assert_eq!(after, before, "the same, in the same order");
    check_lifetimes(&lifetimes_before, &lifetimes_after);
}

/// Finite lifetimes go on from where they were (what was left, less the time away); forever
/// stays forever. Entries are `(what, valid or expiry, preferred or 0 for a route's expiry)`.
fn check_lifetimes(
    lifetimes_before: &[(String, u64, u64)],
    lifetimes_after: &[(String, u64, u64)],
) {
    assert_eq!(lifetimes_after.len(), lifetimes_before.len());
    for ((address, valid, preferred), (_, valid_before, preferred_before)) in
        lifetimes_after.iter().zip(lifetimes_before)
    {
        let forever = u64::from(u32::MAX);
        if *preferred_before == 0 {
            // A route's expiry.
            assert!(
                *valid <= *valid_before && *valid + 5 >= *valid_before,
                "{address}: expires in {valid_before} s before, {valid} s after"
            );
        } else if *valid_before == forever {
            assert_eq!((*valid, *preferred), (forever, forever), "{address}");
        } else {
            assert!(
                *valid < *valid_before && *valid + 5 >= *valid_before,
                "{address}: valid {valid_before} s before, {valid} s after"
            );
            assert!(
                *preferred < *preferred_before && *preferred + 5 >= *preferred_before,
                "{address}: preferred {preferred_before} s before, {preferred} s after"
            );
        }
    }
}

/// IPv4 per-interface settings over netlink (the path knd takes where `/proc/sys` is read-only,
/// in its container) land where procfs shows them, zero values included, and each name maps
/// to the kernel's id of that setting.
#[test]
#[ignore = "needs root: creates network namespaces"]
fn ipv4_interface_settings_over_netlink_are_what_procfs_shows() {
    use knd::os::netlink::ipv4_devconf_id;
    let host = TestHost::new("host").unwrap();
    let peer = TestHost::new("peer").unwrap();
    veth_pair(&host, "v0", &peer, "p0").unwrap();
    let read = |setting: &str| {
        let path = format!("/proc/sys/net/ipv4/conf/v0/{setting}");
        host.run(|| std::fs::read_to_string(&path).unwrap())
            .unwrap()
            .trim()
            .to_owned()
    };
    let settings = [
        ("arp_ignore", 2_u32),
        ("arp_announce", 1),
        ("rp_filter", 0),
        ("accept_local", 1),
        ("arp_evict_nocarrier", 0),
        ("forwarding", 1),
    ];
    // Defaults that differ from the wanted values, so that every write is visible.
    for (setting, value) in [("rp_filter", "2"), ("arp_evict_nocarrier", "1")] {
        let path = format!("/proc/sys/net/ipv4/conf/v0/{setting}");
        host.run(|| std::fs::write(&path, value).unwrap()).unwrap();
    }
    let ids: Vec<(u16, u32)> = settings
        .iter()
        .map(|(name, value)| (ipv4_devconf_id(name).unwrap(), *value))
        .collect();
    host.netlink(|link| async move { link.set_ipv4_conf("v0", &ids).await })
        .unwrap();
    for (setting, value) in settings {
        assert_eq!(read(setting), value.to_string(), "{setting}");
    }
    assert_eq!(
        ipv4_devconf_id("mc_forwarding"),
        None,
        "only the kernel sets it"
    );
    assert_eq!(ipv4_devconf_id("no_such_setting"), None);
}
