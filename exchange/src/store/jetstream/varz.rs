//! Whether the server makes a write durable before it acknowledges it, read
//! from its monitoring endpoint (`GET /varz`) with a minimal HTTP/1.1 client.
//!
//! JetStream acknowledges a publish once the message is in its file store's
//! buffers and syncs them to disk every `sync_interval` (2 minutes by default):
//! an exchange that acks an agent on that acknowledgement could lose the
//! records in a power failure after the agent deleted them. `nats-server`
//! reports `jetstream.config.sync_always = true` when its jetstream block has
//! `sync_interval: always`; servers too old to report it are treated as not
//! syncing.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the monitoring endpoint says about durability.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Durability {
    pub version: String,
    pub sync_always: bool,
    /// `jetstream.config.sync_interval` as reported (nanoseconds), if any.
    pub sync_interval_ns: Option<u64>,
}

const MAX_REPLY: usize = 4 << 20;

/// `GET {monitor}/varz`, parsed.
pub(super) async fn durability(monitor: &str) -> Result<Durability, String> {
    let body = get(monitor, "/varz").await?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("{monitor}/varz is not JSON: {e}"))?;
    let js = &v["jetstream"];
    if js.is_null() {
        return Err(format!(
            "{monitor}/varz shows no JetStream: enable it in the server's configuration (a jetstream block)"
        ));
    }
    Ok(Durability {
        version: v["version"].as_str().unwrap_or("?").to_string(),
        sync_always: js["config"]["sync_always"].as_bool() == Some(true),
        sync_interval_ns: js["config"]["sync_interval"].as_u64(),
    })
}

/// The body of a 200 answer to `GET path` from an `http://HOST:PORT` endpoint.
async fn get(base: &str, path: &str) -> Result<Vec<u8>, String> {
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base:?} is not an http:// address"))?
        .trim_end_matches('/');
    let io = |e: std::io::Error| format!("GET {base}{path}: {e}");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await.map_err(io)?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(io)?;
        let mut reply = Vec::new();
        (&mut s)
            .take(MAX_REPLY as u64 + 1)
            .read_to_end(&mut reply)
            .await
            .map_err(io)?;
        Ok::<_, String>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET {base}{path}: no answer within 10 s"))??;
    if reply.len() > MAX_REPLY {
        return Err(format!("GET {base}{path}: answer over {MAX_REPLY} bytes"));
    }
    parse_reply(&reply).map_err(|e| format!("GET {base}{path}: {e}"))
}

/// The body of an HTTP/1.x 200 reply (plain or chunked).
fn parse_reply(reply: &[u8]) -> Result<Vec<u8>, String> {
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no end of headers")?;
    let head = String::from_utf8_lossy(&reply[..split]);
    let body = &reply[split + 4..];
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    let chunked = head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_vec())
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line is cut")?;
        let line = String::from_utf8_lossy(&body[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err("a chunk is cut".into());
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_and_chunked_replies_give_their_body() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_reply(plain).unwrap(), b"{}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_reply(chunked).unwrap(), b"{\"a\":1}");
        assert!(parse_reply(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
    }
}
