//! Placement simulation: 10 000 allocations of one GPU + one NIC on fixture nodes whose pods come
//! and go, placed by the claim templates `knd templates` writes for the node (evaluated by the
//! allocator behind `knd explain`) versus a random GPU and NIC (the seed paper's "unaligned").
//! Reports the share of pairs per distance class. Goal: 100 % aligned with the templates.

use std::collections::BTreeMap;

use knd::{
    cli::placement::{Catalog, Claim},
    discover::inventory,
    model::distance::Distance,
    os::host::HostRoot,
};
use knd_bench::doc::{Chart, ChartKind, Document, Table};
use knd_testkit::{
    machines,
    placement::{self, Outcome, Strategy},
};

const ALLOCATIONS: u64 = 10_000;
const METHOD: &str = "Pods arrive one after another and ask for one GPU and one NIC; when \
    nothing fits, a random running pod ends first. *Templates*: the pod names a \
    ResourceClaimTemplate from `knd templates` for the node (a random one of the per-rail \
    templates where PCIe roots hold several GPUs), allocated by the allocator behind `knd \
    explain`. *Random*: a random free GPU and a random free NIC. *Aligned*: the pair's class is \
    the best any NIC has to that GPU.";
const CLASSES: [Distance; 5] = [
    Distance::Pix,
    Distance::Pxb,
    Distance::Phb,
    Distance::Node,
    Distance::Sys,
];

const MIXED_METHOD: &str = "Mixed pods on the 8 GPU / 8 NIC node (400 Gbit/s NICs): pods of four \
    kinds arrive in random turn, each kind as often: a GPU pod (one GPU and the NIC on its PCIe \
    root, by `gpu-nic-aligned`) and network-only pods (one NIC). *Whole NICs*: every pod's NIC is \
    its alone. *Shared NICs* (`knd run --shared-nics true`): the GPU pod consumes 100 Gbit/s of \
    its NIC, network pods 1, 5 or 25 Gbit/s of one (KEP-5075 consumable capacity, as the \
    scheduler allocates it). A pod that does not fit waits while running pods end at random. \
    The simulator checks every allocation on its own: no NIC's bandwidth is ever oversubscribed.";

/// The mixed workload, NICs whole versus shared: a table row each, and the JSON.
fn mixed(data: &mut Vec<serde_json::Value>) -> anyhow::Result<(Table, bool)> {
    let mut table = Table::new(
        &format!("{ALLOCATIONS} mixed pods on 8 GPU / 8 NIC, NICs whole versus shared"),
        &[
            "NICs",
            "pods placed",
            "GPU pods aligned",
            "running pods ended to make room",
            "pods on the node when one waits (mean)",
            "most of a NIC's bandwidth allotted",
            "goal",
        ],
    );

    let inventory = inventory::discover(&HostRoot::new(machines::gpu_8x8().root()));
    let shared = knd::publish::selector::Selector::compile("true")?.shared_devices(&inventory);
    let mut outcomes = Vec::new();
    for (how, nics) in [("whole NICs", BTreeMap::new()), ("shared NICs", shared)] {
        let documents = placement::node_documents(&inventory, &nics)?;
        let catalog = Catalog::new(&documents.slices, &documents.classes)?;
        let kinds = placement::mixed_kinds(&documents, !nics.is_empty())?;
        let strategy = Strategy::Kinds(
            kinds
                .iter()
                .map(|claim| vec![claim.evaluate(&catalog)])
                .collect(),
        );
        let outcome = placement::simulate(&inventory, &catalog, &strategy, ALLOCATIONS, 1)?;
        data.push(serde_json::json!({
            "machine": "8 GPU / 8 NIC (gpu_8x8)", "placement": format!("mixed pods, {how}"),
            "allocations": outcome.allocations, "gpu_pods": outcome.pairs,
            "aligned": outcome.aligned, "shares": outcome.shares, "waits": outcome.waits,
            "pods_when_full": outcome.full_at(),
            "peak_allotted_permille": outcome.peak_allotted_permille,
        }));
        outcomes.push((how, outcome));
    }
    let [(_, whole), (_, shared)] = &outcomes[..] else {
        anyhow::bail!("two runs");
    };
    // Sharing must keep every GPU pod aligned and hold many more pods than whole NICs do.
    let met = shared.aligned == shared.pairs && shared.full_at() > 4.0 * whole.full_at();
    for (how, outcome) in &outcomes {
        #[expect(clippy::cast_precision_loss, reason = "a percentage")]
        let aligned = 100.0 * outcome.aligned as f64 / outcome.pairs.max(1) as f64;
        table.row(vec![
            (*how).to_owned(),
            outcome.allocations.to_string(),
            format!("{aligned:.1} %"),
            outcome.waits.to_string(),
            format!("{:.1}", outcome.full_at()),
            if outcome.shares == 0 {
                "(allocated whole)".to_owned()
            } else {
                let permille = outcome.peak_allotted_permille;
                format!("{}.{} %", permille / 10, permille % 10)
            },
            if *how == "shared NICs" {
                format!(
                    "aligned 100 %, > 4× the pods: {}",
                    if met { "met" } else { "MISSED" }
                )
            } else {
                String::new()
            },
        ]);
    }
    Ok((table, met))
}

fn main() -> anyhow::Result<()> {
    let mut document = Document::new("placement", "Placement: templates versus random");
    let mut table = Table::new(
        &format!("{ALLOCATIONS} allocations of 1 GPU + 1 NIC"),
        &[
            "machine",
            "placement",
            "PIX",
            "PXB",
            "PHB",
            "NODE",
            "SYS",
            "aligned",
            "goal",
        ],
    );
    let mut chart = Chart {
        title: "GPU–NIC distance class of each placement".to_owned(),
        x_label: String::new(),
        y_label: "% of placements".to_owned(),
        kind: ChartKind::Bars {
            categories: CLASSES.iter().map(|c| c.as_str().to_owned()).collect(),
        },
        series: Vec::new(),
    };
    let mut data = Vec::new();
    for (machine, tree, names) in [
        (
            "8 GPU / 8 NIC (gpu_8x8)",
            machines::gpu_8x8(),
            vec!["gpu-nic-aligned".to_owned()],
        ),
        (
            "2 GPU + 2 NIC per switch (shared_switch)",
            machines::shared_switch(),
            (0..4).map(|r| format!("gpu-nic-rail-{r}")).collect(),
        ),
    ] {
        let inventory = inventory::discover(&HostRoot::new(tree.root()));
        let documents = placement::node_documents(&inventory, &BTreeMap::new())?;
        let catalog = Catalog::new(&documents.slices, &documents.classes)?;
        let claims: Vec<Claim> = documents
            .claims
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(n, s)| Claim::compile(n, s))
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(
            claims.len() == names.len(),
            "templates {names:?} not generated"
        );
        let templated = Strategy::Templates(claims.iter().map(|c| c.evaluate(&catalog)).collect());
        let started = std::time::Instant::now();
        let with_templates = placement::simulate(&inventory, &catalog, &templated, ALLOCATIONS, 1)?;
        let elapsed = started.elapsed();
        let random = placement::simulate(&inventory, &catalog, &Strategy::Random, ALLOCATIONS, 1)?;
        for (how, outcome, goal) in [
            (templates_label(&names), &with_templates, true),
            ("random GPU and NIC".to_owned(), &random, false),
        ] {
            table.row(row(machine, &how, outcome, goal));
            if machine.starts_with('8') {
                chart.series.push((
                    how.split(' ').next().unwrap_or_default().to_owned(),
                    CLASSES
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            (
                                f64::from(u32::try_from(i).unwrap_or(0)),
                                100.0 * outcome.share(*c),
                            )
                        })
                        .collect(),
                ));
            }
            data.push(serde_json::json!({
                "machine": machine, "placement": how, "allocations": outcome.allocations,
                "aligned": outcome.aligned,
                "classes": CLASSES.iter().map(|c| (c.as_str(), outcome.classes.get(c).copied().unwrap_or(0))).collect::<BTreeMap<_, _>>(),
            }));
        }
        document.notes.push(format!(
            "{machine}: {ALLOCATIONS} template allocations took {elapsed:.2?} ({:.1} µs each).",
            elapsed.as_secs_f64() * 1e6 / 10_000.0
        ));
    }
    knd_bench::print_table(&table);
    let (mixed_table, mixed_met) = mixed(&mut data)?;
    knd_bench::print_table(&mixed_table);
    document.notes.insert(0, METHOD.to_owned());
    document.notes.push(MIXED_METHOD.to_owned());
    document.tables.push(table);
    document.tables.push(mixed_table);
    document.charts.push(chart);
    document.data = serde_json::Value::Array(data);
    document.write(&knd_bench::results_dir())?;
    anyhow::ensure!(mixed_met, "shared NICs: the goal was missed");
    Ok(())
}

fn row(machine: &str, how: &str, outcome: &Outcome, goal: bool) -> Vec<String> {
    let mut cells = vec![machine.to_owned(), how.to_owned()];
    cells.extend(
        CLASSES
            .iter()
            .map(|c| format!("{:.1} %", 100.0 * outcome.share(*c))),
    );
    #[expect(clippy::cast_precision_loss, reason = "a percentage")]
    let aligned = 100.0 * outcome.aligned as f64 / outcome.allocations.max(1) as f64;
    cells.push(format!("{aligned:.1} %"));
    cells.push(if goal {
        if outcome.aligned == outcome.allocations {
            "100 %: met".to_owned()
        } else {
            "100 %: MISSED".to_owned()
        }
    } else {
        String::new()
    });
    cells
}

/// `templates (a)` or `templates (a … z)`.
fn templates_label(names: &[String]) -> String {
    match names {
        [one] => format!("templates ({one})"),
        [first, .., last] => format!("templates ({first} … {last})"),
        [] => "templates".to_owned(),
    }
}
