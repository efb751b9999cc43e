//! The run report: a human table and a JSON document, with the server's RSS and the gateway's
//! own metrics scraped before and after.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stats::Stats;

/// Resident set size of a process, in KiB (Linux `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time (user + system) this process has used.
pub fn own_cpu() -> Duration {
    cpu_of("self").unwrap_or_default()
}

/// CPU time (user + system, every thread) process `pid` has used.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    cpu_of(&pid.to_string())
}

fn cpu_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// Sums every `gateway_*` sample by metric name (labels folded together).
pub async fn scrape(server: SocketAddr) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(server),
    )
    .await
    else {
        return out;
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return out;
    }
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body)).await;
    let text = String::from_utf8_lossy(&body);
    for line in text.lines().filter(|l| l.starts_with("gateway_")) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if let Ok(v) = value.parse::<f64>() {
            *out.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    out
}

#[derive(Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub scenario: String,
    pub parameters: serde_json::Value,
    pub duration_s: f64,
    pub connections: u64,
    pub connect_failures: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub requests: u64,
    /// Server-pushed inbox frames received (`conversation_response`, `notification_response`).
    pub pushed: u64,
    pub errors: u64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub closes: BTreeMap<u16, u64>,
    pub delivery_latency: Percentiles,
    pub reply_latency: Percentiles,
    pub generator_cpu: f64,
    /// The server's CPU use over the measured window (every thread; 1.0 = one core), when its
    /// PID was given.
    pub server_cpu: Option<f64>,
    pub generator_saturated: bool,
    pub server_rss_kib_before: Option<u64>,
    pub server_rss_kib_after: Option<u64>,
    pub server_rss_kib_per_connection: Option<f64>,
    pub server_metrics_delta: BTreeMap<String, f64>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        scenario: &str,
        parameters: serde_json::Value,
        stats: &Stats,
        duration: Duration,
        generator_cpu: f64,
        server_cpu: Option<f64>,
        rss: (Option<u64>, Option<u64>),
        before: &BTreeMap<String, f64>,
        after: &BTreeMap<String, f64>,
    ) -> Report {
        let secs = duration.as_secs_f64().max(1e-9);
        let connections = stats.connected.get();
        let mut delta = BTreeMap::new();
        for (name, value) in after {
            let d = value - before.get(name).copied().unwrap_or(0.0);
            if name.ends_with("_total") || name.ends_with("_count") || name.ends_with("_sum") {
                delta.insert(name.clone(), d);
            } else {
                delta.insert(name.clone(), *value);
            }
        }
        Report {
            scenario: scenario.to_owned(),
            parameters,
            duration_s: secs,
            connections,
            connect_failures: stats.connect_failures.get(),
            sent: stats.sent.get(),
            acked: stats.acked.get(),
            delivered: stats.delivered.get(),
            requests: stats.requests.get(),
            pushed: stats.pushed.get(),
            errors: stats.errors.get(),
            sent_per_s: stats.sent.get() as f64 / secs,
            delivered_per_s: stats.delivered.get() as f64 / secs,
            closes: stats.closes.borrow().clone(),
            delivery_latency: Percentiles::of(&stats.delivery_latency.borrow()),
            reply_latency: Percentiles::of(&stats.reply_latency.borrow()),
            generator_cpu,
            generator_saturated: generator_cpu > 0.9,
            server_cpu,
            server_rss_kib_before: rss.0,
            server_rss_kib_after: rss.1,
            server_rss_kib_per_connection: match rss {
                (Some(b), Some(a)) if connections > 0 => {
                    Some(a.saturating_sub(b) as f64 / connections as f64)
                }
                _ => None,
            },
            server_metrics_delta: delta,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        let mut out = String::new();
        out.push_str(&format!("scenario            {}\n", self.scenario));
        out.push_str(&format!("parameters          {}\n", self.parameters));
        out.push_str(&format!("measured            {:.1} s\n", self.duration_s));
        out.push_str(&format!(
            "connections         {} ({} failed)\n",
            self.connections, self.connect_failures
        ));
        out.push_str(&format!(
            "sent                {} ({:.0}/s)\n",
            self.sent, self.sent_per_s
        ));
        out.push_str(&format!("acknowledged        {}\n", self.acked));
        out.push_str(&format!(
            "delivered           {} ({:.0}/s)\n",
            self.delivered, self.delivered_per_s
        ));
        out.push_str(&format!("other requests      {}\n", self.requests));
        if self.pushed > 0 {
            out.push_str(&format!(
                "inbox events        {} ({:.0}/s)\n",
                self.pushed,
                self.pushed as f64 / self.duration_s
            ));
        }
        out.push_str(&format!("errors              {}\n", self.errors));
        out.push_str(&format!("closes by code      {:?}\n", self.closes));
        for (name, p) in [
            ("delivery latency ms", &self.delivery_latency),
            ("reply latency ms   ", &self.reply_latency),
        ] {
            out.push_str(&format!(
                "{name}  p50 {} p90 {} p99 {} p99.9 {} max {} (n={})\n",
                ms(p.p50_us),
                ms(p.p90_us),
                ms(p.p99_us),
                ms(p.p999_us),
                ms(p.max_us),
                p.count
            ));
        }
        out.push_str(&format!(
            "generator cpu       {:.0} %{}\n",
            self.generator_cpu * 100.0,
            if self.generator_saturated {
                "  WARNING: above 90 %, the generator may be the bottleneck"
            } else {
                ""
            }
        ));
        if let Some(cpu) = self.server_cpu {
            out.push_str(&format!("server cpu          {:.0} %\n", cpu * 100.0));
        }
        if let (Some(b), Some(a)) = (self.server_rss_kib_before, self.server_rss_kib_after) {
            out.push_str(&format!("server rss          {b} KiB -> {a} KiB"));
            if let Some(per) = self.server_rss_kib_per_connection {
                out.push_str(&format!(" ({per:.2} KiB per connection)"));
            }
            out.push('\n');
        }
        for key in [
            "gateway_deliveries_total",
            "gateway_frames_in_total",
            "gateway_errors_total",
            "gateway_slow_consumer_closes_total",
            "gateway_outbound_queue_drops_total",
        ] {
            if let Some(v) = self.server_metrics_delta.get(key) {
                out.push_str(&format!("server {key:<36} +{v}\n"));
            }
        }
        out
    }
}
