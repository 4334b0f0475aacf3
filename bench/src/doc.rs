//! A suite's results as files: `<suite>.json` (everything measured), `<suite>.md` (tables and
//! notes, with the charts linked) and `<suite>-N.svg` (charts drawn with plotters).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use plotters::prelude::*;
use serde::Serialize;

/// A table: column titles and rows of cells.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// Shown above it.
    pub title: String,
    /// Column titles.
    pub columns: Vec<String>,
    /// Rows, one cell per column.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table.
    pub fn new(title: &str, columns: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            columns: columns.iter().map(|&c| c.to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        let escape = |cell: &str| cell.replace('|', "\\|");
        let mut text = format!("### {}\n\n| ", self.title);
        text.push_str(
            &self
                .columns
                .iter()
                .map(|c| escape(c))
                .collect::<Vec<_>>()
                .join(" | "),
        );
        text.push_str(" |\n| :--- |");
        text.push_str(&" ---: |".repeat(self.columns.len().saturating_sub(1)));
        text.push('\n');
        for row in &self.rows {
            text.push_str("| ");
            text.push_str(
                &row.iter()
                    .map(|c| escape(c))
                    .collect::<Vec<_>>()
                    .join(" | "),
            );
            text.push_str(" |\n");
        }
        text
    }
}

/// A chart: lines over a numeric x axis, or grouped bars over categories.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// Its title.
    pub title: String,
    /// The x axis' label.
    pub x_label: String,
    /// The y axis' label.
    pub y_label: String,
    /// Lines or bars.
    pub kind: ChartKind,
    /// `(series name, points)`; for bars, x is the category's index.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// The two kinds of chart.
#[derive(Debug, Clone, Serialize)]
pub enum ChartKind {
    /// Lines; `log_x` draws x on a log2 scale.
    Lines {
        /// Whether x is logarithmic.
        log_x: bool,
    },
    /// Bars, one group per category.
    Bars {
        /// The categories' names.
        categories: Vec<String>,
    },
}

/// One suite's results.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    /// The suite (file names).
    pub suite: String,
    /// Its heading.
    pub title: String,
    /// Paragraphs under the heading: what was measured, goals, verdicts.
    pub notes: Vec<String>,
    /// Tables.
    pub tables: Vec<Table>,
    /// Charts.
    pub charts: Vec<Chart>,
    /// Everything measured, for machines.
    pub data: serde_json::Value,
}

impl Document {
    /// An empty document.
    pub fn new(suite: &str, title: &str) -> Self {
        Self {
            suite: suite.to_owned(),
            title: title.to_owned(),
            notes: Vec::new(),
            tables: Vec::new(),
            charts: Vec::new(),
            data: serde_json::Value::Null,
        }
    }

    /// Writes JSON, Markdown and SVGs into `dir`; returns the Markdown's path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.suite));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let mut markdown = format!("## {}\n\n", self.title);
        for note in &self.notes {
            markdown.push_str(note);
            markdown.push_str("\n\n");
        }
        for table in &self.tables {
            markdown.push_str(&table.markdown());
            markdown.push('\n');
        }
        for (i, chart) in self.charts.iter().enumerate() {
            let name = format!("{}-{}.svg", self.suite, i + 1);
            draw(chart, &dir.join(&name))
                .with_context(|| format!("drawing {}", dir.join(&name).display()))?;
            let _ = write!(markdown, "![{}]({name})\n\n", chart.title);
        }
        let path = dir.join(format!("{}.md", self.suite));
        std::fs::write(&path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        println!(
            "results: {} (+ .json, {} charts)",
            path.display(),
            self.charts.len()
        );
        Ok(path)
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let y_max = chart
        .series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .map(|p| p.1)
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.1;
    match &chart.kind {
        ChartKind::Lines { log_x } => draw_lines(chart, &root, *log_x, y_max)?,
        ChartKind::Bars { categories } => draw_bars(chart, &root, categories, y_max)?,
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn draw_lines(chart: &Chart, root: &Area<'_>, log_x: bool, y_max: f64) -> anyhow::Result<()> {
    let points = chart.series.iter().flat_map(|(_, p)| p.iter());
    let transform = |x: f64| if log_x { x.max(1.0).log2() } else { x };
    let xs: Vec<f64> = points.map(|p| transform(p.0)).collect();
    let x_min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let x_max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
        (x_min, x_max)
    } else {
        (0.0, 1.0)
    };
    let mut context = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)
        .map_err(plot_error)?;
    let log = log_x;
    let format_x = move |x: &f64| {
        if log {
            human_bytes(2_f64.powf(*x))
        } else {
            format!("{x:.0}")
        }
    };
    context
        .configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&format_x)
        .draw()
        .map_err(plot_error)?;
    for (i, (name, series)) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        context
            .draw_series(LineSeries::new(
                series.iter().map(|&(x, y)| (transform(x), y)),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
    }
    context
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn draw_bars(
    chart: &Chart,
    root: &Area<'_>,
    categories: &[String],
    y_max: f64,
) -> anyhow::Result<()> {
    let groups = categories.len().max(1);
    let width = chart.series.len().max(1);
    #[expect(clippy::cast_precision_loss, reason = "a few bars")]
    let x_max = groups as f64;
    let mut context = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(plot_error)?;
    context
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .draw()
        .map_err(plot_error)?;
    // Each category's name above its group of bars.
    context
        .draw_series(categories.iter().enumerate().map(|(i, name)| {
            #[expect(clippy::cast_precision_loss, reason = "a few bars")]
            let x = i as f64;
            let top = chart
                .series
                .iter()
                .flat_map(|(_, p)| p.iter())
                .filter(|p| (p.0 - x).abs() < 1e-9)
                .map(|p| p.1)
                .fold(0.0_f64, f64::max);
            Text::new(
                name.clone(),
                (x + 0.1, top + y_max * 0.06),
                ("sans-serif", 13),
            )
        }))
        .map_err(plot_error)?;
    #[expect(clippy::cast_precision_loss, reason = "a few bars")]
    let bar = 0.8 / width as f64;
    for (i, (name, series)) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        #[expect(clippy::cast_precision_loss, reason = "a few bars")]
        let offset = 0.1 + bar * i as f64;
        context
            .draw_series(series.iter().map(|&(x, y)| {
                Rectangle::new(
                    [(x + offset, 0.0), (x + offset + bar * 0.9, y)],
                    color.filled(),
                )
            }))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    context
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// `8 B`, `4 KiB`, `16 MiB`.
pub fn human_bytes(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if (value - value.round()).abs() < 1e-9 {
        format!("{value:.0} {}", units[unit])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}
