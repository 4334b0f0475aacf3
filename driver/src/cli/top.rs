//! `knd top`: every claimed interface on the node, live, from the daemon's `/metrics`.
//!
//! Two scrapes `interval` apart give rates (rx/tx Gbit/s and packets/s, TCP retransmits/s, RDMA
//! Gbit/s and CNPs/s) and the TCP round-trip times sampled in between (p50/p99 through an
//! HDR histogram fed with the histogram buckets' deltas: a percentile is reported as the upper
//! bound of the log2 bucket it falls in).
//!
//! The exposition is parsed here: label values may contain commas (the `request` label lists a
//! device's requests), which the text-format parser crates split on.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;

/// A sample line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics line {line}: {reason}: `{text}`")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub reason: &'static str,
    /// The line (cut to 120 characters).
    pub text: String,
}

/// One sample: metric name (with its `_total`/`_bucket`/… suffix), labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Name as exposed.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses Prometheus / OpenMetrics text: comments and blank lines are skipped, every other
/// line must be `name{label="value",…} value [timestamp]`.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|(index, line)| {
            parse_line(line).map_err(|reason| ParseError {
                line: index + 1,
                reason,
                text: line.chars().take(120).collect(),
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().map_err(|_| "bad value")?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `key="value",…}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(
    mut text: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Ok(after);
        }
        let equals = text.find('=').ok_or("unterminated labels")?;
        let key = text[..equals].trim();
        if key.is_empty() {
            return Err("empty label name");
        }
        text = text[equals + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = text.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("unterminated label value")?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        text = &text[end + 1..];
    }
}

/// Which claimed interface a row is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    /// Namespace of the pod and claim.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Claim name.
    pub claim: String,
    /// Device in knd's pool.
    pub device: String,
    /// Interface name in the pod.
    pub interface: String,
}

impl Interface {
    fn of(labels: &BTreeMap<String, String>) -> Option<Self> {
        let get = |key: &str| labels.get(key).cloned();
        Some(Self {
            namespace: get("namespace")?,
            pod: get("pod")?,
            claim: get("claim")?,
            device: get("device")?,
            interface: get("interface")?,
        })
    }
}

/// One claimed interface over one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Whose.
    pub interface: Interface,
    /// Received, Gbit/s.
    pub rx_gbps: f64,
    /// Sent, Gbit/s.
    pub tx_gbps: f64,
    /// Received frames per second.
    pub rx_pps: f64,
    /// Sent frames per second.
    pub tx_pps: f64,
    /// Median TCP RTT sampled in the interval (upper bound of its bucket).
    pub rtt_p50: Option<Duration>,
    /// 99th percentile TCP RTT sampled in the interval (upper bound of its bucket).
    pub rtt_p99: Option<Duration>,
    /// TCP segments retransmitted per second.
    pub retransmits_per_s: f64,
    /// RDMA received, Gbit/s (hardware counters).
    pub rdma_rx_gbps: f64,
    /// RDMA sent, Gbit/s.
    pub rdma_tx_gbps: f64,
    /// CNPs sent and handled per second.
    pub cnps_per_s: f64,
    /// Frames the bandwidth share's policer dropped per second (both directions).
    pub policed_per_s: f64,
}

/// Sums of each counter per interface: `(metric, interface) -> value`.
fn totals(samples: &[Sample]) -> BTreeMap<(&str, Interface), f64> {
    let mut totals = BTreeMap::new();
    for sample in samples {
        if let Some(interface) = Interface::of(&sample.labels) {
            *totals
                .entry((sample.name.as_str(), interface))
                .or_insert(0.0) += sample.value;
        }
    }
    totals
}

/// Cumulative RTT bucket counts per interface: `interface -> [(le seconds, count)]`.
fn rtt_buckets(samples: &[Sample]) -> BTreeMap<Interface, Vec<(f64, f64)>> {
    let mut buckets: BTreeMap<Interface, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.name == "knd_claim_tcp_rtt_seconds_bucket")
    {
        let (Some(interface), Some(le)) = (
            Interface::of(&sample.labels),
            sample.labels.get("le").and_then(|le| match le.as_str() {
                "+Inf" => Some(f64::INFINITY),
                other => other.parse().ok(),
            }),
        ) else {
            continue;
        };
        buckets
            .entry(interface)
            .or_default()
            .push((le, sample.value));
    }
    for list in buckets.values_mut() {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    buckets
}

/// RTT p50 and p99 of the samples that arrived between two cumulative bucket lists.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "bucket counts and microsecond bounds are small non-negative integers"
)]
fn rtt_percentiles(
    before: Option<&Vec<(f64, f64)>>,
    now: &[(f64, f64)],
) -> (Option<Duration>, Option<Duration>) {
    let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2) else {
        return (None, None);
    };
    let cumulative_before = |le: f64| {
        before
            .and_then(|list| list.iter().find(|(l, _)| l.total_cmp(&le).is_eq()))
            .map_or(0.0, |(_, count)| *count)
    };
    let mut below = 0.0;
    let mut largest_finite = 1_u64;
    for &(le, count) in now {
        let in_interval = (count - cumulative_before(le)).max(0.0);
        let in_bucket = (in_interval - below).max(0.0);
        below = below.max(in_interval);
        let micros = if le.is_finite() {
            largest_finite = (le * 1e6).round().max(1.0) as u64;
            largest_finite
        } else {
            largest_finite.saturating_mul(2)
        };
        if in_bucket > 0.0 {
            let _ignored = histogram.record_n(micros, in_bucket.round() as u64);
        }
    }
    if histogram.is_empty() {
        return (None, None);
    }
    // The bucket's bound itself (recorded exactly), not the top of its HDR precision band.
    let at = |q: f64| {
        Some(Duration::from_micros(
            histogram.lowest_equivalent(histogram.value_at_quantile(q)),
        ))
    };
    (at(0.5), at(0.99))
}

/// The rows for the interval between two scrapes, sorted by namespace, pod, claim, device.
/// Interfaces only in `now` (just attached) are measured from zero; interfaces gone from
/// `now` are left out.
pub fn rows(before: &[Sample], now: &[Sample], interval: Duration) -> Vec<Row> {
    let seconds = interval.as_secs_f64().max(1e-3);
    let (old, new) = (totals(before), totals(now));
    let rate = |metric: &str, interface: &Interface| {
        let key = (metric, interface.clone());
        let delta = new.get(&key).copied().unwrap_or(0.0) - old.get(&key).copied().unwrap_or(0.0);
        delta.max(0.0) / seconds
    };
    let (old_rtt, new_rtt) = (rtt_buckets(before), rtt_buckets(now));
    let mut interfaces: Vec<&Interface> = new
        .keys()
        .filter(|(metric, _)| *metric == "knd_claim_rx_bytes_total")
        .map(|(_, interface)| interface)
        .collect();
    interfaces.sort();
    interfaces
        .into_iter()
        .map(|interface| {
            let (rtt_p50, rtt_p99) = new_rtt.get(interface).map_or((None, None), |now| {
                rtt_percentiles(old_rtt.get(interface), now)
            });
            Row {
                rx_gbps: rate("knd_claim_rx_bytes_total", interface) * 8.0 / 1e9,
                tx_gbps: rate("knd_claim_tx_bytes_total", interface) * 8.0 / 1e9,
                rx_pps: rate("knd_claim_rx_packets_total", interface),
                tx_pps: rate("knd_claim_tx_packets_total", interface),
                rtt_p50,
                rtt_p99,
                retransmits_per_s: rate("knd_claim_tcp_retransmits_total", interface),
                rdma_rx_gbps: rate("knd_claim_rdma_rx_bytes_total", interface) * 8.0 / 1e9,
                rdma_tx_gbps: rate("knd_claim_rdma_tx_bytes_total", interface) * 8.0 / 1e9,
                cnps_per_s: rate("knd_claim_rdma_cnp_total", interface),
                policed_per_s: rate("knd_claim_policed_packets_total", interface),
                interface: interface.clone(),
            }
        })
        .collect()
}

fn micros(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_owned(), |d| format!("{}", d.as_micros()))
}

/// The table: a header line and one line per row.
pub fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<28} {:<8} {:<18} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>9}\n",
        "POD",
        "IFACE",
        "DEVICE",
        "RX Gb/s",
        "TX Gb/s",
        "RX pkt/s",
        "TX pkt/s",
        "RTT p50",
        "RTT p99",
        "RETX/s",
        "RDMA RX",
        "RDMA TX",
        "CNP/s",
        "POLICED/s"
    );
    for row in rows {
        let pod = format!("{}/{}", row.interface.namespace, row.interface.pod);
        let _ignored = writeln!(
            out,
            "{:<28} {:<8} {:<18} {:>8.3} {:>8.3} {:>10.0} {:>10.0} {:>6}us {:>6}us {:>7.0} {:>8.3} {:>8.3} {:>7.0} {:>9.0}",
            cut(&pod, 28),
            cut(&row.interface.interface, 8),
            cut(&row.interface.device, 18),
            row.rx_gbps,
            row.tx_gbps,
            row.rx_pps,
            row.tx_pps,
            micros(row.rtt_p50),
            micros(row.rtt_p99),
            row.retransmits_per_s,
            row.rdma_rx_gbps,
            row.rdma_tx_gbps,
            row.cnps_per_s,
            row.policed_per_s,
        );
    }
    if rows.is_empty() {
        out.push_str("(no claimed interfaces on this node)\n");
    }
    out
}

fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(width - 1).collect();
        cut.push('~');
        cut
    }
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The URL is not `http://HOST:PORT/PATH`.
    #[error("--metrics-url {0}: expected http://HOST:PORT/PATH")]
    Url(String),
    /// Connecting or talking HTTP failed.
    #[error("{url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The body is not metrics text.
    #[error("{url}: {source}")]
    Parse {
        /// The URL.
        url: String,
        /// The line that could not be read.
        #[source]
        source: ParseError,
    },
}

/// GETs `url` (plain HTTP, as the daemon serves it) and parses the samples.
pub async fn scrape(url: &str) -> Result<Vec<Sample>, ScrapeError> {
    use http_body_util::{BodyExt as _, Empty};
    let uri: hyper::Uri = url.parse().map_err(|_| ScrapeError::Url(url.to_owned()))?;
    if uri.scheme_str() != Some("http") {
        return Err(ScrapeError::Url(url.to_owned()));
    }
    let Some(host) = uri.host() else {
        return Err(ScrapeError::Url(url.to_owned()));
    };
    let port = uri.port_u16().unwrap_or(80);
    let http = |reason: String| ScrapeError::Http {
        url: url.to_owned(),
        reason,
    };
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| http(e.to_string()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, host)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http(e.to_string()))?;
    if !response.status().is_success() {
        return Err(http(format!("HTTP {}", response.status())));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?
        .to_bytes();
    driver.abort();
    let text = String::from_utf8_lossy(&body);
    parse(&text).map_err(|source| ScrapeError::Parse {
        url: url.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS: &str = r#"namespace="ml",pod="trainer-0",claim="nic",request="a,b",device="nic-0",interface="net1""#;

    fn scrape_text(rx_bytes: u64, rx_packets: u64, rtt: [u64; 3], cnp: u64) -> String {
        format!(
            "# HELP knd_claim_rx_bytes Bytes.\n# TYPE knd_claim_rx_bytes counter\n\
             knd_claim_rx_bytes_total{{{LABELS}}} {rx_bytes}\n\
             knd_claim_tx_bytes_total{{{LABELS}}} 0\n\
             knd_claim_rx_packets_total{{{LABELS}}} {rx_packets}\n\
             knd_claim_tcp_rtt_seconds_bucket{{{LABELS},le=\"0.000016\"}} {}\n\
             knd_claim_tcp_rtt_seconds_bucket{{{LABELS},le=\"0.000032\"}} {}\n\
             knd_claim_tcp_rtt_seconds_bucket{{{LABELS},le=\"+Inf\"}} {}\n\
             knd_claim_rdma_cnp_total{{{LABELS},rdma_device=\"mlx5_0\",port=\"1\",kind=\"sent\"}} {cnp}\n\
             knd_claim_rdma_cnp_total{{{LABELS},rdma_device=\"mlx5_0\",port=\"1\",kind=\"handled\"}} {cnp}\n\
             knd_claim_policed_packets_total{{{LABELS},direction=\"tx\"}} {cnp}\n\
             # EOF\n",
            rtt[0], rtt[1], rtt[2]
        )
    }

    #[test]
    fn label_values_with_commas_quotes_and_escapes_survive() {
        let samples =
            parse("m_total{a=\"x,y\",b=\"say \\\"hi\\\"\",c=\"back\\\\slash\"} 7 1700000000\n")
                .unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].labels["a"], "x,y");
        assert_eq!(samples[0].labels["b"], "say \"hi\"");
        assert_eq!(samples[0].labels["c"], "back\\slash");
        assert!((samples[0].value - 7.0).abs() < f64::EPSILON);
    }

    #[test]
    fn garbage_is_an_error_naming_the_line() {
        let error = parse("# fine\nok 1\nbroken{a=\"x\" 1\n").unwrap_err();
        assert_eq!(error.line, 3);
        assert_eq!(error.reason, "unterminated labels");
        assert_eq!(parse("m NaNa\n").unwrap_err().reason, "bad value");
        assert_eq!(
            parse("m{a=x} 1\n").unwrap_err().reason,
            "label value not quoted"
        );
        assert_eq!(
            parse("{a=\"x\"} 1\n").unwrap_err().reason,
            "bad metric name"
        );
    }

    #[test]
    fn rates_and_rtt_percentiles_come_from_the_interval_only() {
        let before = parse(&scrape_text(1_000, 10, [100, 100, 100], 5)).unwrap();
        // In 2 s: 250 MB, 1 000 frames; 90 RTT samples ≤ 16 µs, 10 in (16, 32] µs.
        let now = parse(&scrape_text(250_001_000, 1_010, [190, 200, 200], 25)).unwrap();
        let rows = rows(&before, &now, Duration::from_secs(2));
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.interface.pod, "trainer-0");
        assert_eq!(row.interface.device, "nic-0");
        assert!((row.rx_gbps - 1.0).abs() < 1e-9, "{}", row.rx_gbps);
        assert!((row.rx_pps - 500.0).abs() < 1e-9);
        assert!((row.cnps_per_s - 20.0).abs() < 1e-9, "sent + handled");
        assert!(
            (row.policed_per_s - 10.0).abs() < 1e-9,
            "{}",
            row.policed_per_s
        );
        assert_eq!(row.rtt_p50, Some(Duration::from_micros(16)));
        assert_eq!(row.rtt_p99, Some(Duration::from_micros(32)));
        let table = render(&rows);
        assert!(table.starts_with("POD"), "{table}");
        assert!(table.contains("ml/trainer-0"), "{table}");
        assert!(table.contains("16us"), "{table}");
    }

    #[test]
    fn an_idle_interface_has_no_rtt_and_zero_rates() {
        let text = scrape_text(5, 1, [3, 3, 3], 0);
        let samples = parse(&text).unwrap();
        let rows = rows(&samples, &samples, Duration::from_secs(1));
        assert_eq!(rows[0].rtt_p50, None);
        assert!(rows[0].rx_gbps.abs() < f64::EPSILON);
        assert!(render(&rows).contains(" -us"));
    }

    #[test]
    fn no_interfaces_says_so() {
        assert!(render(&[]).contains("no claimed interfaces"));
    }
}
