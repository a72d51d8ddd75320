//! Alarms to the operators' own systems: every raised and cleared alarm is
//! POSTed as JSON to `[dashboard] alarm_webhook`:
//!
//! ```json
//! {"event":"raised","exchange":"exchange.example.gov.cn","alarm":{"id":"offline:hp-01:",
//!  "kind":"offline","agent":"hp-01","stream":"","message":"...","since_unix_ms":...,
//!  "cleared_unix_ms":null,"acknowledged":null}}
//! ```
//!
//! One thread sends them in order; a failed POST (no answer within 10 s, or a
//! status other than 2xx) is tried again after 1, 2, 4, 8 and 16 s, then given
//! up with a warning. Events wait in a queue of [`QUEUE`]; when it is full the
//! newest is dropped with a warning. The webhook is a notification: the alarm
//! book (`alarms.json`, the dashboard) and the journal hold every alarm.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::alarms::Alarm;

/// Events waiting to be sent.
const QUEUE: usize = 1024;
/// Waits before each new attempt at one event.
const RETRIES: [u64; 5] = [1, 2, 4, 8, 16];

#[derive(Clone)]
pub struct Webhook {
    tx: SyncSender<Value>,
}

impl Webhook {
    /// Starts the sender thread for `url`, trusting `ca` (PEM) for an
    /// `https://` URL when given, else the public web roots.
    pub fn start(url: &str, ca: Option<&Path>, exchange: &str) -> Result<Webhook> {
        let mut builder = ureq::AgentBuilder::new().timeout(Duration::from_secs(10));
        if let Some(ca) = ca {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("[dashboard] alarm_webhook_ca {}", ca.display()))?
            {
                let c =
                    c.with_context(|| format!("[dashboard] alarm_webhook_ca {}", ca.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("[dashboard] alarm_webhook_ca {}", ca.display()))?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .context("TLS for the alarm webhook")?
            .with_root_certificates(roots)
            .with_no_client_auth();
            builder = builder.tls_config(Arc::new(tls));
        }
        let agent = builder.build();
        let (tx, rx) = sync_channel(QUEUE);
        info!(url = %redact(url), "alarms go to the webhook too");
        let (url, exchange) = (url.to_string(), exchange.to_string());
        std::thread::Builder::new()
            .name("alarm-webhook".into())
            .spawn(move || send_all(&agent, &url, &exchange, rx))
            .context("starting the alarm webhook's thread")?;
        Ok(Webhook { tx })
    }

    /// Queues an alarm's `raised` or `cleared` event.
    pub fn send(&self, event: &str, alarm: &Alarm) {
        let v = json!({ "event": event, "alarm": alarm });
        match self.tx.try_send(v) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => warn!(
                alarm = %alarm.id,
                "the alarm webhook's queue is full: this event is not sent (it is in the alarm book and the journal)"
            ),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The URL without its user information (a token in it stays out of the log).
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.find('@')) {
        (Some((scheme, rest)), Some(_)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

fn send_all(agent: &ureq::Agent, url: &str, exchange: &str, rx: Receiver<Value>) {
    for mut event in rx {
        event["exchange"] = json!(exchange);
        let mut waits = RETRIES.iter();
        loop {
            let e = match agent.post(url).send_json(&event) {
                Ok(_) => break,
                Err(e) => e,
            };
            match waits.next() {
                Some(&s) => std::thread::sleep(Duration::from_secs(s)),
                None => {
                    warn!(url = %redact(url), alarm = %event["alarm"]["id"], error = %e,
                        "the alarm webhook did not take this event after {} attempts; given up (it is in the alarm book and the journal)",
                        RETRIES.len() + 1);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_in_urls_stay_out_of_the_log() {
        assert_eq!(
            redact("https://ops:s3cret@hooks.example/ferry"),
            "https://…@hooks.example/ferry"
        );
        assert_eq!(redact("http://hooks.example/x"), "http://hooks.example/x");
    }
}
