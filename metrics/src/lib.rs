//! The agent's and the exchange's `GET /metrics`: each scrape takes a snapshot
//! of the live state and writes it through one [`Collector`] in the OpenMetrics
//! text format (`prometheus-client`), so a counter is typed a counter (its
//! samples end in `_total`) and a gauge a gauge. [`Families`] writes one
//! family per call from the snapshot's values.

use std::fmt;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::{
    EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::Registry;

/// What `GET /metrics` answers with.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry holding `collector`, every name prefixed `prefix_`.
pub fn registry(prefix: &str, collector: impl Collector) -> Registry {
    let mut r = Registry::with_prefix(prefix);
    r.register_collector(Box::new(collector));
    r
}

/// One scrape's answer, ending with OpenMetrics' `# EOF`.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Writes metric families through a collector's encoder.
pub struct Families<'a, 'e> {
    pub enc: &'a mut DescriptorEncoder<'e>,
}

impl Families<'_, '_> {
    fn one(&mut self, name: &str, help: &str, metric: impl EncodeMetric) -> fmt::Result {
        let m = self
            .enc
            .encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(m)
    }

    fn many<L: EncodeLabelSet, M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl IntoIterator<Item = (L, M)>,
    ) -> fmt::Result {
        let mut m = self.enc.encode_descriptor(name, help, None, kind)?;
        for (labels, metric) in samples {
            metric.encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: impl EncodeGaugeValue) -> fmt::Result {
        self.one(name, help, ConstGauge::new(v))
    }

    pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
        self.many(name, help, MetricType::Gauge, samples)
    }

    pub fn counter(&mut self, name: &str, help: &str, v: impl EncodeCounterValue) -> fmt::Result {
        self.one(name, help, ConstCounter::new(v))
    }

    pub fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
        self.many(name, help, MetricType::Counter, samples)
    }

    /// An info family: `NAME_info{labels} 1`.
    pub fn info<L: EncodeLabelSet + Clone + std::hash::Hash + Eq>(
        &mut self,
        name: &str,
        help: &str,
        labels: L,
    ) -> fmt::Result {
        self.one(name, help, Info::new(labels))
    }
}
