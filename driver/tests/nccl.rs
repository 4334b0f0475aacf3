//! NCCL's settings from fixture machines: the GID table as the kernel shows it (free entries,
//! RoCE v1 and v2, InfiniBand), the variables, and the topology file checked two ways — against
//! the grammar of NCCL's own XML reader, and against the tree NCCL's own sysfs walk would build
//! for the same devices.

use std::{collections::BTreeMap, net::IpAddr};

use knd::{
    attach::nccl::{self, NcclError, PodNic},
    discover::inventory::{
        self, Inventory, Nic,
        rdma::{self, GidType},
    },
};
use knd_testkit::{machines, sysfs::SysfsTree};

/// Writes GID `index` of `device` port 1: its GID and, unless free, its type.
fn gid(tree: &SysfsTree, device: &str, index: u32, gid: &str, kind: Option<&str>) {
    let port = format!("/sys/class/infiniband/{device}/ports/1");
    tree.file(&format!("{port}/gids/{index}"), &format!("{gid}\n"));
    if let Some(kind) = kind {
        tree.file(
            &format!("{port}/gid_attrs/types/{index}"),
            &format!("{kind}\n"),
        );
    }
}

const FREE: &str = "0000:0000:0000:0000:0000:0000:0000:0000";

/// The table a mlx5 RoCE port shows for a netdev with `10.0.0.2` and `fd00::2`: the link-local
/// pair, then a v1 and a v2 entry per address, and free entries after.
fn roce_table(tree: &SysfsTree, device: &str, v4: &str) {
    let mapped: std::net::Ipv4Addr = v4.parse().unwrap();
    let mapped = mapped.to_ipv6_mapped().segments();
    let mapped = mapped.map(|s| format!("{s:04x}")).join(":");
    let rows = [
        ("fe80:0000:0000:0000:0000:00ff:fe00:0001", "IB/RoCE v1"),
        ("fe80:0000:0000:0000:0000:00ff:fe00:0001", "RoCE v2"),
        (mapped.as_str(), "IB/RoCE v1"),
        (mapped.as_str(), "RoCE v2"),
        ("fd00:0000:0000:0000:0000:0000:0000:0002", "IB/RoCE v1"),
        ("fd00:0000:0000:0000:0000:0000:0000:0002", "RoCE v2"),
    ];
    for (index, (value, kind)) in (0..).zip(rows) {
        gid(tree, device, index, value, Some(kind));
    }
    for index in 6..16 {
        gid(tree, device, index, FREE, None);
    }
}

fn nic<'i>(inventory: &'i Inventory, netdev: &str) -> &'i Nic {
    inventory
        .nics
        .iter()
        .find(|n| n.netdev.as_ref().is_some_and(|d| d.name == netdev))
        .unwrap()
}

fn addresses(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn the_gid_table_is_read_as_the_kernel_shows_it() {
    let tree = machines::gpu_8x8();
    roce_table(&tree, "mlx5_0", "10.0.0.2");
    // Garbage an attacker or a broken driver could leave: not an index, not a GID, an unknown
    // type. Each is left out; nothing fails.
    gid(&tree, "mlx5_0", 20, "not-a-gid", Some("RoCE v2"));
    gid(&tree, "mlx5_0", 21, "fd00::9", Some("RoCE v3"));
    tree.file("/sys/class/infiniband/mlx5_0/ports/1/gids/x7", "fd00::7\n");
    let table = rdma::gid_table(&tree.host(), "mlx5_0", 1).unwrap();
    let summary: Vec<(u32, GidType)> = table.iter().map(|e| (e.index, e.kind)).collect();
    assert_eq!(
        summary,
        [
            (0, GidType::IbOrRoceV1),
            (1, GidType::RoceV2),
            (2, GidType::IbOrRoceV1),
            (3, GidType::RoceV2),
            (4, GidType::IbOrRoceV1),
            (5, GidType::RoceV2),
        ]
    );
    assert_eq!(table[3].gid.to_ipv4_mapped(), Some([10, 0, 0, 2].into()));
    // A device without a GID table: an error naming the file.
    let error = rdma::gid_table(&tree.host(), "mlx5_1", 1).unwrap_err();
    assert!(error.path.contains("mlx5_1/ports/1"), "{error}");
}

#[test]
fn the_variables_name_the_pods_interfaces_ports_and_the_gid_of_its_address() {
    let tree = machines::gpu_8x8();
    roce_table(&tree, "mlx5_0", "10.0.0.2");
    roce_table(&tree, "mlx5_1", "10.0.1.2");
    let inventory = inventory::discover(&tree.host());
    let (v4, v4b, v6) = (
        addresses(&["10.0.0.2"]),
        addresses(&["10.0.1.2"]),
        addresses(&["fd00::2"]),
    );
    let settings = |nics: &[PodNic<'_>]| -> BTreeMap<String, String> {
        nccl::settings(&tree.host(), "ml/trainer-0", nics, &[])
            .unwrap()
            .env
            .into_iter()
            .collect()
    };
    let one = [PodNic {
        interface: "net1",
        addresses: &v4,
        nic: nic(&inventory, "enp20s0np0"),
    }];
    let env = settings(&one);
    assert_eq!(env["NCCL_SOCKET_IFNAME"], "=net1");
    assert_eq!(env["NCCL_IB_HCA"], "=mlx5_0:1");
    assert_eq!(
        env["NCCL_IB_GID_INDEX"], "3",
        "the IPv4-mapped RoCE v2 entry"
    );
    assert_eq!(env["NCCL_TOPO_FILE"], nccl::TOPOLOGY_PATH);
    // An IPv6-only pod: its v2 entry.
    let six = [PodNic {
        addresses: &v6,
        ..one[0]
    }];
    assert_eq!(settings(&six)["NCCL_IB_GID_INDEX"], "5");
    // Two NICs on the same index: one variable for both.
    let two = [
        one[0],
        PodNic {
            interface: "net2",
            addresses: &v4b,
            nic: nic(&inventory, "enp52s0np0"),
        },
    ];
    let env = settings(&two);
    assert_eq!(env["NCCL_SOCKET_IFNAME"], "=net1,net2");
    assert_eq!(env["NCCL_IB_HCA"], "=mlx5_0:1,mlx5_1:1");
    assert_eq!(env["NCCL_IB_GID_INDEX"], "3");
    // Different indexes: NCCL finds each port's entry by family and version instead.
    let mixed = [
        two[0],
        PodNic {
            addresses: &v6,
            ..two[1]
        },
    ];
    let env = settings(&mixed);
    assert!(!env.contains_key("NCCL_IB_GID_INDEX"), "{env:?}");
    assert_eq!(env["NCCL_IB_ADDR_FAMILY"], "AF_INET6");
    assert_eq!(env["NCCL_IB_ROCE_VERSION_NUM"], "2");
    // A port whose RoCE v2 entries are gone (v2 disabled): the v1 entry of the address.
    for index in [1, 3, 5] {
        gid(&tree, "mlx5_0", index, FREE, None);
    }
    assert_eq!(settings(&one)["NCCL_IB_GID_INDEX"], "2");
    // An address the port does not carry: an error naming device, port and address.
    let other = addresses(&["192.0.2.1"]);
    let error = nccl::settings(
        &tree.host(),
        "ml/p",
        &[PodNic {
            addresses: &other,
            ..one[0]
        }],
        &[],
    )
    .unwrap_err();
    assert!(matches!(error, NcclError::NoGid { .. }), "{error}");
    assert!(error.to_string().contains("mlx5_0 port 1"), "{error}");
    assert!(error.to_string().contains("192.0.2.1"), "{error}");
    // A name that would split NCCL's list: refused.
    let error = nccl::settings(
        &tree.host(),
        "ml/p",
        &[PodNic {
            interface: "a,b",
            ..one[0]
        }],
        &[],
    )
    .unwrap_err();
    assert!(matches!(error, NcclError::Name(_)), "{error}");
}

#[test]
fn an_infiniband_port_leaves_the_gid_to_nccl() {
    let tree = machines::gpu_8x8();
    tree.file(
        "/sys/class/infiniband/mlx5_0/ports/1/link_layer",
        "InfiniBand\n",
    );
    let inventory = inventory::discover(&tree.host());
    let v4 = addresses(&["10.0.0.2"]);
    let settings = nccl::settings(
        &tree.host(),
        "ml/p",
        &[PodNic {
            interface: "ib0",
            addresses: &v4,
            nic: nic(&inventory, "enp20s0np0"),
        }],
        &[],
    )
    .unwrap();
    let env: BTreeMap<String, String> = settings.env.into_iter().collect();
    assert_eq!(env["NCCL_IB_HCA"], "=mlx5_0:1");
    assert!(!env.contains_key("NCCL_IB_GID_INDEX"), "{env:?}");
}

/// One element of the topology file as NCCL's reader sees it.
#[derive(Debug)]
struct Element {
    name: String,
    attributes: BTreeMap<String, String>,
    children: Vec<Element>,
}

/// Parses `text` with the rules of NCCL's XML reader (`xmlGetNode`/`xmlLoadSub`): elements
/// only (no declaration, no text), attributes as `key="value"` separated by one space, no
/// escapes, names and values under 256 bytes, at most 16 attributes and 128 children, every
/// element closed by its own name.
fn parse_nccl_xml(text: &str) -> Result<Vec<Element>, String> {
    fn element(rest: &mut &str) -> Result<Option<(Element, bool)>, String> {
        *rest = rest.trim_start_matches([' ', '\n', '\r']);
        if rest.is_empty() {
            return Ok(None);
        }
        let body = rest.strip_prefix('<').ok_or("expecting '<'")?;
        let end = body.find('>').ok_or("unterminated tag")?;
        let (tag, after) = (&body[..end], &body[end + 1..]);
        *rest = after;
        if let Some(name) = tag.strip_prefix('/') {
            return Ok(Some((
                Element {
                    name: name.to_owned(),
                    attributes: BTreeMap::new(),
                    children: Vec::new(),
                },
                true,
            )));
        }
        let (tag, single) = tag.strip_suffix('/').map_or((tag, false), |t| (t, true));
        let mut parts = tag.split(' ');
        let name = parts.next().unwrap_or_default().to_owned();
        if name.is_empty() || name.starts_with('?') || name.starts_with('!') {
            return Err(format!("not an element NCCL reads: <{tag}>"));
        }
        let mut attributes = BTreeMap::new();
        for part in parts {
            let (key, value) = part.split_once('=').ok_or(format!("attribute {part}"))?;
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or(format!("unquoted value in {part}"))?;
            if value.contains(['"', '<', '>', '&']) || key.len() > 255 || value.len() > 255 {
                return Err(format!("{part} cannot be read"));
            }
            attributes.insert(key.to_owned(), value.to_owned());
        }
        if attributes.len() > 16 {
            return Err(format!("<{name}> has over 16 attributes"));
        }
        let mut children = Vec::new();
        if !single {
            loop {
                let (child, closing) = element(rest)?.ok_or(format!("unterminated {name}"))?;
                if closing {
                    if child.name != name {
                        return Err(format!("mismatch {name} / {}", child.name));
                    }
                    break;
                }
                children.push(child);
            }
        }
        if children.len() > 128 {
            return Err(format!("<{name}> has over 128 children"));
        }
        Ok(Some((
            Element {
                name,
                attributes,
                children,
            },
            false,
        )))
    }
    let mut rest = text;
    let mut top = Vec::new();
    while let Some((element, closing)) = element(&mut rest)? {
        if closing {
            return Err(format!("stray </{}>", element.name));
        }
        top.push(element);
    }
    Ok(top)
}

/// The children NCCL's loader accepts below each element (`ncclTopoXmlLoad*`).
fn allowed_below(parent: &str) -> &'static [&'static str] {
    match parent {
        "" => &["system"],
        "system" => &["cpu"],
        "cpu" => &["pci", "nic"],
        "pci" => &["pci", "gpu", "nic", "pcilink"],
        "gpu" => &["nvlink", "c2c"],
        "nic" => &["net"],
        _ => &[],
    }
}

/// Every `pci` element's busid with the chain of `pci` busids above it (top first), and the
/// `cpu` numaid it hangs from; checking on the way that each element is one NCCL accepts there.
fn chains(
    element: &Element,
    parent: &str,
    numa: &str,
    above: &[String],
    out: &mut BTreeMap<String, (String, Vec<String>)>,
) {
    assert!(
        allowed_below(parent).contains(&element.name.as_str()),
        "<{}> below <{parent}>",
        element.name
    );
    let numa = element
        .attributes
        .get("numaid")
        .map_or(numa, String::as_str);
    let mut here = above.to_vec();
    if element.name == "pci" {
        let busid = element.attributes["busid"].clone();
        out.insert(busid.clone(), (numa.to_owned(), above.to_vec()));
        here.push(busid);
    }
    for child in &element.children {
        chains(child, &element.name, numa, &here, out);
    }
}

/// The parents NCCL's `ncclTopoGetXmlFromSys` finds for the function at `path` (its resolved
/// sysfs directory): it cuts the path one component at a time; a component that is not a bus
/// ID means the CPU, and the second bus ID it meets is the parent, where it starts again.
fn nccl_walk(path: &str) -> Vec<String> {
    let is_bdf = |s: &str| {
        s.len() == 12
            && s.as_bytes()[4] == b':'
            && s.as_bytes()[7] == b':'
            && s.as_bytes()[10] == b'.'
    };
    let mut parents = Vec::new();
    let mut components: Vec<&str> = path.split('/').collect();
    components.pop();
    'climb: loop {
        for count in 1..=2 {
            let Some(last) = components.last() else {
                break 'climb;
            };
            if !is_bdf(last) {
                break 'climb;
            }
            if count == 2 {
                parents.push((*last).to_owned());
                components.pop();
                continue 'climb;
            }
            components.pop();
        }
    }
    parents.reverse();
    parents
}

#[test]
fn the_topology_file_is_what_nccls_reader_accepts_and_nests_as_nccl_does() {
    let tree = machines::gpu_8x8();
    roce_table(&tree, "mlx5_0", "10.0.0.2");
    roce_table(&tree, "mlx5_4", "10.0.4.2");
    let inventory = inventory::discover(&tree.host());
    let v4 = addresses(&["10.0.0.2"]);
    let v4b = addresses(&["10.0.4.2"]);
    let gpus: Vec<_> = inventory
        .gpus
        .iter()
        .filter(|g| ["0000:13:00.0", "0000:93:00.0"].contains(&g.address.as_str()))
        .collect();
    assert_eq!(gpus.len(), 2);
    let nics = [
        PodNic {
            interface: "net1",
            addresses: &v4,
            nic: nic(&inventory, "enp20s0np0"),
        },
        PodNic {
            interface: "net2",
            addresses: &v4b,
            nic: nic(&inventory, "enp148s0np0"),
        },
    ];
    let settings = nccl::settings(&tree.host(), "ml/trainer-0", &nics, &gpus).unwrap();
    let xml = &settings.topology;
    let top = parse_nccl_xml(xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
    assert_eq!(top.len(), 1, "{xml}");
    assert_eq!(top[0].name, "system");
    assert_eq!(top[0].attributes["version"], "1", "NCCL_TOPO_XML_VERSION");
    let mut found = BTreeMap::new();
    chains(&top[0], "", "", &[], &mut found);

    // Each function where NCCL's own walk of the same sysfs tree puts it: the same switch
    // above, the same NUMA node.
    for device in [
        "0000:13:00.0",
        "0000:14:00.0",
        "0000:93:00.0",
        "0000:94:00.0",
    ] {
        let resolved =
            std::fs::canonicalize(tree.root().join("sys/bus/pci/devices").join(device)).unwrap();
        let resolved = resolved.to_str().unwrap();
        let (numa, above) = &found[device];
        assert_eq!(above, &nccl_walk(resolved), "{device}\n{xml}");
        let numa_file = std::fs::read_to_string(format!("{resolved}/numa_node")).unwrap();
        assert_eq!(numa, numa_file.trim(), "{device}");
    }
    // The NICs carry the names NCCL's transports use.
    let nets: Vec<String> = xml
        .lines()
        .filter(|l| l.trim_start().starts_with("<net "))
        .map(|l| l.trim().to_owned())
        .collect();
    assert_eq!(
        nets,
        [
            r#"<net name="mlx5_0" port="1"/>"#,
            r#"<net name="net1"/>"#,
            r#"<net name="mlx5_4" port="1"/>"#,
            r#"<net name="net2"/>"#,
        ]
    );
    // The beginning, as a reader sees it (the demo prints the same lines).
    let head: Vec<&str> = xml.lines().take(4).collect();
    assert_eq!(
        head,
        [
            r#"<system version="1" name="ml/trainer-0">"#,
            r#"  <cpu numaid="0">"#,
            r#"    <pci busid="0000:11:00.0" class="0x060400">"#,
            r#"      <pci busid="0000:13:00.0" class="0x030200" vendor="0x10de" device="0x2330" subsystem_vendor="0x10de" subsystem_device="0x0001"/>"#,
        ],
        "{xml}"
    );
    // What NCCL's reader refuses, this checker refuses too.
    for bad in [
        "<?xml version=\"1.0\"?>\n<system version=\"1\"/>",
        "<system version=\"1\">\n</cpu>",
        "<system version=\"1\">",
    ] {
        assert!(parse_nccl_xml(bad).is_err(), "{bad}");
    }
}
