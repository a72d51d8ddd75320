//! Prometheus metrics (`[metrics] listen`): `GET /metrics` answers with the same
//! report as `ferry-agent status`, in the text exposition format, so the city's
//! monitoring can alarm on a stalled stream, a full buffer or a replication slot
//! that holds the department's WAL.

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::Reporter;
use crate::status::AgentStatus;

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
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
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

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: its help, type and samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP ferry_{name} {help}");
        let _ = writeln!(self.out, "# TYPE ferry_{name} gauge");
    }

    fn sample(&mut self, name: &str, labels: &str, value: u64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "ferry_{name} {value}");
        } else {
            let _ = writeln!(self.out, "ferry_{name}{{{labels}}} {value}");
        }
    }

    fn one(&mut self, name: &str, help: &str, value: u64) {
        self.head(name, help);
        self.sample(name, "", value);
    }
}

/// The report in Prometheus' text format. Every value is a gauge.
pub fn render(s: &AgentStatus) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.head("agent_info", "The agent: its id and software version");
    f.sample(
        "agent_info",
        &format!(
            "agent=\"{}\",version=\"{}\"",
            label(&s.agent_id),
            label(&s.version)
        ),
        1,
    );
    f.one(
        "agent_start_time_seconds",
        "When the agent started, Unix seconds",
        s.started_unix,
    );
    f.one(
        "agent_certificate_not_after_seconds",
        "When the agent's certificate expires, Unix seconds",
        s.cert_not_after_unix,
    );
    f.one(
        "exchange_connected",
        "1 while the agent is connected to the exchange",
        u64::from(s.connection.state == "connected"),
    );
    f.one(
        "exchange_transport_tcp",
        "1 while the link to the exchange is TLS over TCP (UDP blocked), 0 on QUIC",
        u64::from(s.connection.transport == "tcp"),
    );
    f.one(
        "exchange_connect_attempts",
        "Failed connection attempts since the link was last up",
        s.connection.attempts,
    );
    f.one(
        "buffer_bytes",
        "Data held in the durable buffer, bytes",
        s.buffer.bytes,
    );
    f.one(
        "bandwidth_cap_bytes_per_second",
        "The [bandwidth] cap in force, bytes per second (0: none)",
        s.bandwidth.cap_bytes_per_second.unwrap_or(0),
    );
    f.one(
        "bandwidth_sent_bytes",
        "Bytes charged against a [bandwidth] cap since the start (on the wire over QUIC)",
        s.bandwidth.sent_bytes,
    );
    f.one(
        "bandwidth_held_back_milliseconds",
        "Time spent waiting for the [bandwidth] cap since the start, milliseconds",
        (s.bandwidth.held_back_seconds * 1000.0) as u64,
    );
    f.one(
        "buffer_max_bytes",
        "The buffer's bound ([buffer] max_size), bytes",
        s.buffer.max_bytes,
    );
    f.one(
        "buffer_full",
        "1 while sources are paused because the buffer is full",
        u64::from(s.buffer.full),
    );
    f.one(
        "buffer_disk_low",
        "1 while sources are paused because data_dir's filesystem is nearly full",
        u64::from(s.buffer.disk_low),
    );
    f.one(
        "buffer_write_failing",
        "1 while writes to the buffer fail",
        u64::from(s.buffer.write_error.is_some()),
    );
    let streams: Vec<(String, &crate::status::StreamView)> = s
        .streams
        .iter()
        .map(|v| {
            (
                format!("stream=\"{}\",kind=\"{}\"", label(&v.name), label(&v.kind)),
                v,
            )
        })
        .collect();
    type Pick = fn(&crate::status::StreamView) -> u64;
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
        f.head(name, help);
        for (labels, v) in &streams {
            f.sample(name, labels, pick(v));
        }
    }
    for (name, help) in ferry_adapters::all_gauges() {
        let with: Vec<_> = streams
            .iter()
            .filter_map(|(l, v)| v.gauges.get(name).map(|n| (l, *n)))
            .collect();
        if with.is_empty() {
            continue;
        }
        f.head(name, help);
        for (labels, n) in with {
            f.sample(name, labels, n);
        }
    }
    out
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
                assert!(typed.contains(name), "{line}");
            }
        }
    }
}
