//! Placement simulation: 10 000 allocations of one GPU + one NIC on fixture nodes whose pods come
//! and go, placed by the claim templates `knd templates` writes for the node (evaluated by the
//! allocator behind `knd explain`) versus a random GPU and NIC (the seed paper's "unaligned").
//! Reports the share of pairs per distance class. Goal: 100 % aligned with the templates.

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
        let documents = placement::node_documents(&inventory)?;
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
                "classes": CLASSES.iter().map(|c| (c.as_str(), outcome.classes.get(c).copied().unwrap_or(0))).collect::<std::collections::BTreeMap<_, _>>(),
            }));
        }
        document.notes.push(format!(
            "{machine}: {ALLOCATIONS} template allocations took {elapsed:.2?} ({:.1} µs each).",
            elapsed.as_secs_f64() * 1e6 / 10_000.0
        ));
    }
    knd_bench::print_table(&table);
    document.notes.insert(0, METHOD.to_owned());
    document.tables.push(table);
    document.charts.push(chart);
    document.data = serde_json::Value::Array(data);
    document.write(&knd_bench::results_dir())?;
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
