//! Results of one benchmark run and their presentation: the [`Report`] that `--json`
//! prints (one object per run), percentile extraction from HDR histograms, the human
//! summary, and the side-by-side comparison table `switchyard bench table` prints from
//! several JSON-lines files. It is pure data and formatting: it must never do I/O beyond
//! what its caller hands it, and never measure anything itself.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histograms track, in microseconds (60 s); larger values saturate.
pub(crate) const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("histogram bounds")
}

/// Percentiles of a latency distribution, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    /// None for an empty histogram.
    pub(crate) fn from_hist(h: &Histogram<u64>) -> Option<LatencySummary> {
        (!h.is_empty()).then(|| LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        })
    }

    /// `p50 1.234 ms  p90 …` on one line.
    pub(crate) fn line(&self) -> String {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}  ({} samples)",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            ms(self.mean_us as u64),
            self.count
        )
    }
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// The load that was offered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Params {
    pub channels: usize,
    pub subscribers_per_channel: usize,
    pub publishers: usize,
    pub inflight: usize,
    /// When permits come back: `batch` or `each` (empty in reports from before the flag).
    #[serde(default)]
    pub flow: String,
    /// Total publishes/s over all publishers; None = as fast as acknowledged.
    pub rate: Option<f64>,
    pub payload_bytes: usize,
    /// Idle connections requested (connections scenario).
    pub connections: usize,
}

/// Counts over the whole run (warm-up included), after the drain: what "adds up" means.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Totals {
    /// Publishes written to the wire.
    pub sent: u64,
    /// Publishes acknowledged (Switchyard: a reply; NATS: covered by a PONG).
    pub acked: u64,
    /// Sum over sent publishes of the subscribers of their channel.
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub missing: u64,
    /// Error replies, `-ERR` lines and publisher failures.
    pub errors: u64,
    /// Subscribers closed by the server or failed while reading.
    pub closed_subscribers: u64,
    /// Connections that could not be opened and subscribed.
    pub failed_connections: u64,
}

/// The connections scenario's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConnReport {
    pub requested: usize,
    pub opened: usize,
    pub connect_secs: f64,
    pub connects_per_s: f64,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_kib: Option<u64>,
    pub server_rss_per_connection_kib: Option<f64>,
    pub generator_rss_kib: Option<u64>,
    /// Length of the idle window (`--idle-window`), if measured.
    #[serde(default)]
    pub idle_window_s: Option<f64>,
    /// Server CPU while every connection idled, in % of one core.
    #[serde(default)]
    pub server_idle_cpu_percent: Option<f64>,
    /// Server RSS at the end of the idle window.
    #[serde(default)]
    pub server_rss_after_idle_kib: Option<u64>,
}

/// One run against one target: what `--json` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Report {
    /// The scenario, or the `--label` given for it.
    pub scenario: String,
    /// `switchyard` or `nats`.
    pub target: String,
    pub pub_url: String,
    pub sub_urls: Vec<String>,
    pub params: Params,
    pub warmup_s: f64,
    /// Length of the measurement window.
    pub window_s: f64,
    /// Publishes acknowledged within the window.
    pub published: u64,
    pub publishes_per_s: f64,
    /// Deliveries received within the window.
    pub delivered: u64,
    pub delivered_per_s: f64,
    /// Publish→deliver latency of the messages published within the window.
    pub latency: Option<LatencySummary>,
    /// Publish→acknowledgement round trip within the window (NATS: PUB…PING→PONG).
    pub ack_rtt: Option<LatencySummary>,
    /// Server CPU seconds within the window (needs `--server-pid`).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    pub server_cpu_s_per_million_delivered: Option<f64>,
    /// The generator's own CPU use within the window, percent of one core.
    pub generator_cpu_pct: Option<f64>,
    pub totals: Totals,
    pub connections: Option<ConnReport>,
    pub warnings: Vec<String>,
}

impl Report {
    /// True when every expected delivery arrived and nothing failed.
    pub(crate) fn adds_up(&self) -> bool {
        let t = &self.totals;
        t.missing == 0 && t.errors == 0 && t.closed_subscribers == 0 && t.delivered == t.expected_deliveries
    }

    /// The human summary printed on stdout without `--json`.
    pub(crate) fn human(&self) -> String {
        let mut s = String::new();
        let p = &self.params;
        let _ = writeln!(s, "== {} summary ({}) ==", self.scenario, self.target);
        let _ = writeln!(s, "publish url:        {}", self.pub_url);
        if self.sub_urls.iter().any(|u| *u != self.pub_url) {
            let _ = writeln!(s, "subscriber urls:    {}", self.sub_urls.join(" "));
        }
        if let Some(c) = &self.connections {
            let _ = writeln!(s, "connections:        {} of {} opened and subscribed", c.opened, c.requested);
            let _ = writeln!(
                s,
                "connect rate:       {:.0} connections/s ({:.2}s incl. subscribe)",
                c.connects_per_s, c.connect_secs
            );
            match (c.server_rss_before_kib, c.server_rss_after_kib, c.server_rss_per_connection_kib) {
                (Some(b), Some(a), Some(per)) => {
                    let _ =
                        writeln!(s, "server RSS:         {b} KiB before, {a} KiB after: {per:.2} KiB per connection");
                }
                _ => {
                    let _ = writeln!(s, "server RSS:         n/a (pass --server-pid)");
                }
            }
            if let Some(g) = c.generator_rss_kib {
                let _ = writeln!(s, "generator RSS:      {g} KiB");
            }
            if let (Some(w), Some(cpu)) = (c.idle_window_s, c.server_idle_cpu_percent) {
                let rss = c.server_rss_after_idle_kib.map_or("n/a".into(), |k| format!("{k} KiB"));
                let _ = writeln!(s, "server idle CPU:    {cpu:.2}% of a core over {w:.0}s (RSS after: {rss})");
            }
        } else {
            let _ = writeln!(
                s,
                "setup:              {} channels x {} subscribers, {} publishers x {} in flight (acked per {}), payload {} B, {}",
                p.channels,
                p.subscribers_per_channel,
                p.publishers,
                p.inflight,
                if p.flow == "each" { "publish" } else { "batch" },
                p.payload_bytes,
                p.rate.map(|r| format!("{r} publishes/s")).unwrap_or_else(|| "as fast as acknowledged".into())
            );
            let _ = writeln!(s, "window:             {:.2}s after {:.1}s warm-up", self.window_s, self.warmup_s);
            let _ = writeln!(s, "publishes:          {} = {:.0}/s", self.published, self.publishes_per_s);
            let _ = writeln!(s, "deliveries:         {} = {:.0}/s", self.delivered, self.delivered_per_s);
            if let Some(l) = &self.latency {
                let _ = writeln!(s, "publish->deliver:   {}", l.line());
            }
            if let Some(l) = &self.ack_rtt {
                let _ = writeln!(s, "publish->ack:       {}", l.line());
            }
        }
        if let Some(c) = self.server_cpu_s {
            let _ = writeln!(s, "server cpu:         {c:.2}s = {:.0}% of one core", self.server_cpu_pct.unwrap_or(0.0));
        }
        if let Some(c) = self.server_cpu_s_per_million_delivered {
            let _ = writeln!(s, "server cpu/1M:      {c:.3} s per million delivered");
        }
        if let Some(g) = self.generator_cpu_pct {
            let _ = writeln!(s, "generator cpu:      {g:.0}% of one core");
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "totals:             sent {} acked {} expected deliveries {} delivered {} missing {} errors {} closed {} failed connections {}",
            t.sent, t.acked, t.expected_deliveries, t.delivered, t.missing, t.errors, t.closed_subscribers, t.failed_connections
        );
        for w in &self.warnings {
            let _ = writeln!(s, "WARNING:            {w}");
        }
        s
    }

    /// The rows this report contributes to a comparison table: (metric, value).
    pub(crate) fn metrics(&self) -> Vec<(Metric, Option<f64>)> {
        if let Some(c) = &self.connections {
            return vec![
                (Metric::Count("connections opened"), Some(c.opened as f64)),
                (Metric::Rate("connect rate"), Some(c.connects_per_s)),
                (Metric::Kib("server RSS per connection"), c.server_rss_per_connection_kib),
                (Metric::Mib("server RSS after"), c.server_rss_after_kib.map(|k| k as f64)),
                (Metric::Percent("server idle CPU"), c.server_idle_cpu_percent),
            ];
        }
        let lat = |f: fn(&LatencySummary) -> u64| self.latency.as_ref().map(|l| f(l) as f64);
        vec![
            (Metric::Rate("delivered msgs/s"), Some(self.delivered_per_s)),
            (Metric::Rate("publishes/s"), Some(self.publishes_per_s)),
            (Metric::Latency("latency p50"), lat(|l| l.p50_us)),
            (Metric::Latency("latency p90"), lat(|l| l.p90_us)),
            (Metric::Latency("latency p99"), lat(|l| l.p99_us)),
            (Metric::Latency("latency p99.9"), lat(|l| l.p999_us)),
            (Metric::Seconds("server CPU s / 1M deliveries"), self.server_cpu_s_per_million_delivered),
            (Metric::Percent("server CPU"), self.server_cpu_pct),
            (Metric::Percent("generator CPU"), self.generator_cpu_pct),
            (Metric::Count("missing deliveries"), Some(self.totals.missing as f64)),
        ]
    }
}

/// A table row's metric, with how its value is printed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Metric {
    Rate(&'static str),
    /// Microseconds, printed in ms.
    Latency(&'static str),
    Seconds(&'static str),
    Percent(&'static str),
    Kib(&'static str),
    /// KiB, printed in MiB.
    Mib(&'static str),
    Count(&'static str),
}

impl Metric {
    pub(crate) fn name(&self) -> &'static str {
        match *self {
            Metric::Rate(n)
            | Metric::Latency(n)
            | Metric::Seconds(n)
            | Metric::Percent(n)
            | Metric::Kib(n)
            | Metric::Mib(n)
            | Metric::Count(n) => n,
        }
    }

    pub(crate) fn format(&self, v: Option<f64>) -> String {
        let Some(v) = v else { return "n/a".into() };
        match self {
            Metric::Rate(_) | Metric::Count(_) => thousands(v.round() as u64),
            Metric::Latency(_) => format!("{:.2} ms", v / 1000.0),
            Metric::Seconds(_) => format!("{v:.2} s"),
            Metric::Percent(_) => format!("{v:.0}%"),
            Metric::Kib(_) => format!("{v:.1} KiB"),
            Metric::Mib(_) => format!("{:.1} MiB", v / 1024.0),
        }
    }
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// first / second, when both are there and the second is not zero.
pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        (Some(a), Some(b)) if a == 0.0 && b == 0.0 => "=".into(),
        _ => "n/a".into(),
    }
}

/// A Markdown table: scenario | metric | one column per input | ratio of the first two.
/// Scenarios appear in the order of the first column's reports (then any the others add).
pub(crate) fn comparison_table(columns: &[(String, Vec<Report>)]) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    for (_, reports) in columns {
        for r in reports {
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
    }
    let mut header = vec!["scenario".to_string(), "metric".to_string()];
    header.extend(columns.iter().map(|(name, _)| name.clone()));
    let with_ratio = columns.len() >= 2;
    if with_ratio {
        header.push(format!("ratio ({} / {})", columns[0].0, columns[1].0));
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for sc in scenarios {
        let per_col: Vec<Option<&Report>> =
            columns.iter().map(|(_, reports)| reports.iter().find(|r| r.scenario == sc)).collect();
        // the metric list of the first report present
        let Some(template) = per_col.iter().flatten().next() else { continue };
        for (i, (metric, _)) in template.metrics().into_iter().enumerate() {
            let values: Vec<Option<f64>> =
                per_col.iter().map(|r| r.and_then(|r| r.metrics().get(i).and_then(|m| m.1))).collect();
            let mut row = vec![if i == 0 { sc.to_string() } else { String::new() }, metric.name().to_string()];
            row.extend(values.iter().map(|v| metric.format(*v)));
            if with_ratio {
                row.push(ratio(values[0], values[1]));
            }
            rows.push(row);
        }
    }
    markdown(&header, &rows)
}

/// Renders rows as an aligned Markdown table.
pub(crate) fn markdown(header: &[String], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < width.len() {
                width[i] = width[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (i, w) in width.iter().enumerate() {
            let cell = cells.get(i).map(String::as_str).unwrap_or("");
            let pad = w - cell.chars().count();
            // numbers right-aligned, the two label columns left-aligned
            if i < 2 {
                let _ = write!(s, " {cell}{} |", " ".repeat(pad));
            } else {
                let _ = write!(s, " {}{cell} |", " ".repeat(pad));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header);
    let sep: Vec<String> = width
        .iter()
        .enumerate()
        .map(|(i, w)| if i < 2 { "-".repeat(*w) } else { format!("{}:", "-".repeat(w - 1)) })
        .collect();
    out.push_str(&line(&sep));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// Parses a JSON-lines file of reports (blank lines ignored).
pub(crate) fn parse_reports(text: &str) -> Result<Vec<Report>, serde_json::Error> {
    text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(target: &str, delivered_per_s: f64, p99: u64) -> Report {
        Report {
            scenario: "fanout".into(),
            target: target.into(),
            pub_url: "ws://127.0.0.1:1/ws".into(),
            sub_urls: vec!["ws://127.0.0.1:1/ws".into()],
            params: Params { channels: 2, subscribers_per_channel: 3, publishers: 1, inflight: 8, ..Params::default() },
            warmup_s: 1.0,
            window_s: 2.0,
            published: 10,
            publishes_per_s: 5.0,
            delivered: 30,
            delivered_per_s,
            latency: Some(LatencySummary {
                count: 30,
                p50_us: 100,
                p90_us: 200,
                p99_us: p99,
                p999_us: p99,
                max_us: p99,
                mean_us: 120.5,
            }),
            totals: Totals { sent: 10, acked: 10, expected_deliveries: 30, delivered: 30, ..Totals::default() },
            ..Report::default()
        }
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let s = LatencySummary::from_hist(&h).unwrap();
        assert_eq!(s.count, 1000);
        // 3 significant digits: values are exact to within 0.1%
        assert!((499..=501).contains(&s.p50_us), "{s:?}");
        assert!((899..=901).contains(&s.p90_us), "{s:?}");
        assert!((989..=991).contains(&s.p99_us), "{s:?}");
        assert!((998..=1000).contains(&s.p999_us), "{s:?}");
        assert_eq!(s.max_us, 1000);
        assert!((s.mean_us - 500.5).abs() < 1.0);
        assert!(LatencySummary::from_hist(&new_hist()).is_none());
        // beyond the bound saturates instead of failing
        h.saturating_record(MAX_LATENCY_US * 10);
        assert!(h.max() >= MAX_LATENCY_US);
    }

    #[test]
    fn json_round_trip() {
        let mut r = sample("switchyard", 15.0, 900);
        r.connections =
            Some(ConnReport { requested: 5, opened: 5, server_rss_before_kib: Some(1), ..Default::default() });
        r.warnings.push("w".into());
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains('\n'));
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let two = format!("{text}\n\n{}\n", serde_json::to_string(&sample("nats", 1.0, 2)).unwrap());
        let parsed = parse_reports(&two).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].target, "nats");
    }

    #[test]
    fn adds_up_checks_every_count() {
        let mut r = sample("switchyard", 15.0, 900);
        assert!(r.adds_up());
        r.totals.delivered = 29;
        r.totals.missing = 1;
        assert!(!r.adds_up());
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "n/a");
        assert_eq!(ratio(Some(0.0), Some(0.0)), "=");
        assert_eq!(ratio(None, Some(2.0)), "n/a");
        assert_eq!(Metric::Latency("x").format(Some(1500.0)), "1.50 ms");
        assert_eq!(Metric::Rate("x").format(Some(12345.6)), "12,346");
        assert_eq!(Metric::Kib("x").format(None), "n/a");
    }

    #[test]
    fn comparison_table_lines_up() {
        let a = vec![sample("switchyard", 200_000.0, 2000)];
        let b = vec![sample("nats", 100_000.0, 1000)];
        let t = comparison_table(&[("Switchyard".into(), a), ("nats-server".into(), b)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("| scenario | metric"), "{t}");
        assert!(lines[0].contains("| Switchyard |") && lines[0].contains("ratio (Switchyard / nats-server)"), "{t}");
        assert!(lines[1].starts_with("| ---"), "{t}");
        // every line has the same width and the same number of cells
        assert!(lines.iter().all(|l| l.chars().count() == lines[0].chars().count()), "{t}");
        assert!(lines.iter().all(|l| l.matches('|').count() == 6), "{t}");
        let deliv = lines.iter().find(|l| l.contains("delivered msgs/s")).unwrap();
        assert!(deliv.starts_with("| fanout "), "{deliv}");
        assert!(
            deliv.contains("200,000") && deliv.contains("100,000") && deliv.trim_end().ends_with("2.00 |"),
            "{deliv}"
        );
        let p99 = lines.iter().find(|l| l.contains("latency p99 ")).unwrap();
        assert!(p99.contains("2.00 ms") && p99.contains("1.00 ms"), "{p99}");
        // the scenario name appears once, on its first row
        assert_eq!(t.matches("fanout").count(), 1, "{t}");
    }

    #[test]
    fn missing_scenario_in_one_column_prints_na() {
        let mut conn = sample("switchyard", 0.0, 0);
        conn.scenario = "connections".into();
        conn.connections = Some(ConnReport {
            requested: 10,
            opened: 10,
            connects_per_s: 5000.0,
            server_rss_per_connection_kib: Some(10.5),
            ..Default::default()
        });
        let t = comparison_table(&[("A".into(), vec![conn]), ("B".into(), vec![])]);
        let row = t.lines().find(|l| l.contains("RSS per connection")).unwrap();
        assert!(row.contains("10.5 KiB") && row.contains("n/a"), "{row}");
    }
}
