//! Prometheus text exposition for the services, through prometheus-client.
//!
//! The services keep their own cheap counters (plain atomics, per-worker counters merged by a
//! metrics thread) and describe a snapshot of them on each scrape with an [`Exposition`];
//! prometheus-client writes the text format (0.0.4): `# HELP`/`# TYPE` lines, escaping, the
//! `_total` suffix of counters, label sets and histogram buckets.

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The content type of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug)]
enum Samples {
    Counter(Vec<(Vec<(&'static str, String)>, u64)>),
    Gauge(Vec<(Vec<(&'static str, String)>, i64)>),
    Histogram {
        sum: f64,
        count: u64,
        /// (upper bound, samples in this bucket alone).
        buckets: Vec<(f64, u64)>,
    },
}

#[derive(Debug)]
struct Family {
    name: String,
    help: &'static str,
    samples: Samples,
}

/// A snapshot of one service's metrics, rendered as Prometheus text.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

/// A counter's name without the `_total` prometheus-client appends.
fn base(name: &str) -> String {
    name.strip_suffix("_total").unwrap_or(name).to_owned()
}

impl Exposition {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter (`name` may end in `_total`; the exposition always does).
    pub fn counter(&mut self, name: &str, help: &'static str, v: u64) -> &mut Self {
        self.counters(name, help, "", [(String::new(), v)])
    }

    /// A counter family with one label: one sample per `(label value, count)`.
    pub fn counters(
        &mut self,
        name: &str,
        help: &'static str,
        label: &'static str,
        samples: impl IntoIterator<Item = (String, u64)>,
    ) -> &mut Self {
        self.counters_by(
            name,
            help,
            &[label],
            samples.into_iter().map(|(value, v)| (vec![value], v)),
        )
    }

    /// A counter family with several labels: one sample per `(label values, count)`, the
    /// values in the order of `labels`.
    pub fn counters_by(
        &mut self,
        name: &str,
        help: &'static str,
        labels: &[&'static str],
        samples: impl IntoIterator<Item = (Vec<String>, u64)>,
    ) -> &mut Self {
        let samples = samples
            .into_iter()
            .map(|(values, v)| (label_set(labels, values), v))
            .collect();
        self.families.push(Family {
            name: base(name),
            help,
            samples: Samples::Counter(samples),
        });
        self
    }

    /// A gauge.
    pub fn gauge(&mut self, name: &str, help: &'static str, v: i64) -> &mut Self {
        self.gauges(name, help, "", [(String::new(), v)])
    }

    /// A gauge family with one label: one sample per `(label value, value)`.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &'static str,
        label: &'static str,
        samples: impl IntoIterator<Item = (String, i64)>,
    ) -> &mut Self {
        let samples = samples
            .into_iter()
            .map(|(value, v)| (label_set(&[label], vec![value]), v))
            .collect();
        self.families.push(Family {
            name: name.to_owned(),
            help,
            samples: Samples::Gauge(samples),
        });
        self
    }

    /// A histogram: `buckets` are (upper bound, samples in that bucket alone), ascending; the
    /// `+Inf` bucket is `count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &'static str,
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    ) -> &mut Self {
        self.families.push(Family {
            name: name.to_owned(),
            help,
            samples: Samples::Histogram {
                sum,
                count,
                buckets,
            },
        });
        self
    }

    /// The text exposition, every name under `prefix` (e.g. `peerlink_relay`).
    pub fn render(self, prefix: &str) -> String {
        let mut registry = Registry::with_prefix(prefix);
        registry.register_collector(Box::new(Collector(self.families)));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// The label pairs of one sample; an empty label name (an unlabelled metric) is left out.
fn label_set(labels: &[&'static str], values: Vec<String>) -> Vec<(&'static str, String)> {
    labels
        .iter()
        .copied()
        .zip(values)
        .filter(|(label, _)| !label.is_empty())
        .collect()
}

#[derive(Debug)]
struct Collector(Vec<Family>);

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.samples {
                Samples::Counter(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::Histogram { .. } => MetricType::Histogram,
            };
            let mut m = encoder.encode_descriptor(&f.name, f.help, None, kind)?;
            match &f.samples {
                Samples::Counter(samples) => {
                    for (labels, v) in samples {
                        m.encode_family(labels)?
                            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
                    }
                }
                Samples::Gauge(samples) => {
                    for (labels, v) in samples {
                        m.encode_family(labels)?.encode_gauge(v)?;
                    }
                }
                Samples::Histogram {
                    sum,
                    count,
                    buckets,
                } => m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_families_and_histograms_in_the_text_format() {
        let mut e = Exposition::new();
        e.counter("logins_total", "Successful logins.", 3)
            .counters(
                "forwarded_packets_total",
                "Datagrams relayed, by direction.",
                "direction",
                [("client_to_peer".into(), 5), ("peer_to_client".into(), 7)],
            )
            .gauge("sessions_open", "Open \"sessions\"\nnow.", 2)
            .gauges(
                "connections_open",
                "Open connections, by transport.",
                "transport",
                [("tcp".into(), 4), ("tls".into(), 1)],
            )
            .counters_by(
                "closed_total",
                "Connections closed, by transport and reason.",
                &["transport", "reason"],
                [(vec!["tcp".into(), "idle".into()], 6)],
            )
            .histogram(
                "latency_microseconds",
                "In-relay latency.",
                120.0,
                4,
                vec![(10.0, 1), (100.0, 2)],
            );
        let text = e.render("peerlink_test");
        for line in [
            "# TYPE peerlink_test_logins_total counter",
            "peerlink_test_logins_total 3",
            "peerlink_test_forwarded_packets_total{direction=\"client_to_peer\"} 5",
            "peerlink_test_forwarded_packets_total{direction=\"peer_to_client\"} 7",
            "# TYPE peerlink_test_sessions_open gauge",
            "peerlink_test_sessions_open 2",
            "peerlink_test_connections_open{transport=\"tcp\"} 4",
            "peerlink_test_connections_open{transport=\"tls\"} 1",
            "peerlink_test_closed_total{transport=\"tcp\",reason=\"idle\"} 6",
            "# TYPE peerlink_test_latency_microseconds histogram",
            "peerlink_test_latency_microseconds_bucket{le=\"10\"} 1",
            "peerlink_test_latency_microseconds_bucket{le=\"100\"} 3",
            "peerlink_test_latency_microseconds_bucket{le=\"+Inf\"} 4",
            "peerlink_test_latency_microseconds_sum 120.0",
            "peerlink_test_latency_microseconds_count 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // HELP text is escaped, never a second line.
        assert!(text.contains("Open \"sessions\"\\nnow."), "{text}");
    }
}
