//! Prometheus metrics (`[metrics] listen`): `GET /metrics` answers with the same
//! report as `ferry-agent status`, in the OpenMetrics text format
//! (`prometheus-client`, through `ferry_metrics`), so the city's
//! monitoring can alarm on a stalled stream, a full buffer or a replication slot
//! that holds the department's WAL.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use ferry_metrics::{Collector, DescriptorEncoder, Families, CONTENT_TYPE_OPENMETRICS};

use crate::admin::Reporter;
use crate::status::{AgentStatus, StreamView};

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics.listen {addr}"))
}

pub async fn serve(listener: TcpListener, report: Reporter, shutdown: CancellationToken) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let report = report.clone();
            async move {
                (
                    [(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)],
                    render(&report()),
                )
            }
        }),
    );
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics at /metrics");
    }
    let done = shutdown.cancelled_owned();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(done)
        .await
    {
        warn!(error = %e, "the metrics endpoint failed");
    }
}

/// One scrape: the report, written as metric families.
#[derive(Debug)]
struct Snapshot(AgentStatus);

/// The report in the OpenMetrics text format. Counters are typed counters
/// (their samples end in `_total`); every other figure is a gauge, under the
/// names it has always had.
pub fn render(s: &AgentStatus) -> String {
    let registry = ferry_metrics::registry("ferry", Snapshot(s.clone()));
    ferry_metrics::render(&registry).unwrap_or_default()
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let mut f = Families { enc: &mut enc };
        f.info(
            "agent",
            "The agent: its id and software version",
            [
                ("agent", s.agent_id.clone()),
                ("version", s.version.clone()),
            ],
        )?;
        f.gauge(
            "agent_start_time_seconds",
            "When the agent started, Unix seconds",
            s.started_unix as i64,
        )?;
        f.gauge(
            "agent_certificate_not_after_seconds",
            "When the agent's certificate expires, Unix seconds",
            s.cert_not_after_unix as i64,
        )?;
        f.gauge(
            "exchange_connected",
            "1 while the agent is connected to the exchange",
            i64::from(s.connection.state == "connected"),
        )?;
        f.gauge(
            "exchange_transport_tcp",
            "1 while the link to the exchange is TLS over TCP (UDP blocked), 0 on QUIC",
            i64::from(s.connection.transport == "tcp"),
        )?;
        f.gauge(
            "exchange_connect_attempts",
            "Failed connection attempts since the link was last up",
            s.connection.attempts as i64,
        )?;
        f.gauge(
            "buffer_bytes",
            "Data held in the durable buffer, bytes",
            s.buffer.bytes as i64,
        )?;
        let bw = &s.bandwidth;
        f.gauge(
            "bandwidth_cap_bytes_per_second",
            "The [bandwidth] cap in force, bytes per second (0: none)",
            bw.cap_bytes_per_second.unwrap_or(0) as i64,
        )?;
        f.counter(
            "bandwidth_charged_bytes",
            "Bytes charged against the [bandwidth] caps since the start (on the wire over QUIC)",
            bw.sent_bytes,
        )?;
        f.counter(
            "bandwidth_held_back_seconds",
            "Time spent waiting for the [bandwidth] cap since the start, seconds",
            bw.held_back_seconds,
        )?;
        // The same two figures under their first names, typed gauge, for the
        // queries written against them (rate() wants the counters above).
        f.gauge(
            "bandwidth_sent_bytes",
            "Bytes charged against a [bandwidth] cap since the start (on the wire over QUIC); the counter is bandwidth_charged_bytes_total",
            bw.sent_bytes as i64,
        )?;
        f.gauge(
            "bandwidth_held_back_milliseconds",
            "Time spent waiting for the [bandwidth] cap since the start, milliseconds; the counter is bandwidth_held_back_seconds_total",
            (bw.held_back_seconds * 1000.0) as i64,
        )?;
        f.gauge(
            "buffer_max_bytes",
            "The buffer's bound ([buffer] max_size), bytes",
            s.buffer.max_bytes as i64,
        )?;
        f.gauge(
            "buffer_full",
            "1 while sources are paused because the buffer is full",
            i64::from(s.buffer.full),
        )?;
        f.gauge(
            "buffer_disk_low",
            "1 while sources are paused because data_dir's filesystem is nearly full",
            i64::from(s.buffer.disk_low),
        )?;
        f.gauge(
            "buffer_write_failing",
            "1 while writes to the buffer fail",
            i64::from(s.buffer.write_error.is_some()),
        )?;
        let labels = |v: &StreamView| [("stream", v.name.clone()), ("kind", v.kind.clone())];
        type Pick = fn(&StreamView) -> u64;
        let per_stream: [(&str, &str, Pick); 7] = [
            (
                "stream_head_seq",
                "Highest seq durable in the agent's buffer",
                |v| v.head_seq,
            ),
            (
                "stream_acked_seq",
                "Highest seq the exchange acknowledged",
                |v| v.acked_seq,
            ),
            (
                "stream_buffered_batches",
                "Batches waiting in the buffer for the exchange's acknowledgement",
                |v| v.buffered_batches,
            ),
            (
                "stream_buffered_bytes",
                "Bytes waiting in the buffer for the exchange's acknowledgement",
                |v| v.buffered_bytes,
            ),
            (
                "stream_source_failing",
                "1 while the stream's source is failing (see ferry-agent status)",
                |v| u64::from(v.source_error.is_some()),
            ),
            (
                "stream_ship_failing",
                "1 while the exchange refuses the stream's batches",
                |v| u64::from(v.ship_error.is_some()),
            ),
            (
                "stream_lost_records",
                "Records lost to buffer damage (recorded by salvage) not yet acknowledged past",
                |v| v.lost.iter().map(|[a, b]| b.saturating_sub(*a) + 1).sum(),
            ),
        ];
        for (name, help, pick) in per_stream {
            f.gauges(
                name,
                help,
                s.streams.iter().map(|v| (labels(v), pick(v) as i64)),
            )?;
        }
        for (name, help) in ferry_adapters::all_gauges() {
            let with: Vec<_> = s
                .streams
                .iter()
                .filter_map(|v| v.gauges.get(name).map(|n| (labels(v), *n as i64)))
                .collect();
            if !with.is_empty() {
                f.gauges(name, help, with)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BufferStatus, Connection, StreamView};

    #[test]
    fn renders_every_stream_and_the_gauges_its_source_reports() {
        let mut pg = StreamView {
            name: "household".into(),
            kind: "postgres".into(),
            head_seq: 12,
            acked_seq: 10,
            buffered_batches: 2,
            buffered_bytes: 4096,
            lost: vec![[3, 5]],
            ..Default::default()
        };
        pg.gauges
            .insert("postgres_retained_wal_bytes".into(), 1 << 20);
        let s = AgentStatus {
            agent_id: "hp-mz-01".into(),
            version: "0.1.0".into(),
            cert_not_after_unix: 1_900_000_000,
            connection: Connection {
                state: "connected".into(),
                ..Default::default()
            },
            buffer: BufferStatus {
                bytes: 4096,
                max_bytes: 1 << 30,
                ..Default::default()
            },
            streams: vec![
                pg,
                StreamView {
                    name: "hall \"log\"".into(),
                    kind: "tail".into(),
                    source_error: Some("gone".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = render(&s);
        for want in [
            "ferry_agent_info{agent=\"hp-mz-01\",version=\"0.1.0\"} 1\n",
            "ferry_exchange_connected 1\n",
            "ferry_agent_certificate_not_after_seconds 1900000000\n",
            "ferry_buffer_max_bytes 1073741824\n",
            "ferry_stream_head_seq{stream=\"household\",kind=\"postgres\"} 12\n",
            "ferry_stream_acked_seq{stream=\"household\",kind=\"postgres\"} 10\n",
            "ferry_stream_lost_records{stream=\"household\",kind=\"postgres\"} 3\n",
            "ferry_stream_source_failing{stream=\"hall \\\"log\\\"\",kind=\"tail\"} 1\n",
            "# TYPE ferry_postgres_retained_wal_bytes gauge\n",
            "# TYPE ferry_bandwidth_charged_bytes counter\n",
            "ferry_bandwidth_charged_bytes_total 0\n",
            "ferry_bandwidth_sent_bytes 0\n",
            "# EOF\n",
            "ferry_postgres_retained_wal_bytes{stream=\"household\",kind=\"postgres\"} 1048576\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        // A gauge no stream reports is left out, help and all.
        assert!(!text.contains("snapshot_rows"), "{text}");
        // Every sample line belongs to a family announced before it.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let family = ["_total", "_info"]
                    .iter()
                    .find_map(|x| name.strip_suffix(x).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{line}");
            }
        }
    }
}
