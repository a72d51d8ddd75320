//! `ferry-agent doctor`'s checks of the link to the exchange: the certificate
//! files, the agent certificate's expiry, DNS, a QUIC handshake over UDP (and
//! whether the exchange then keeps the connection, which it does not for a
//! revoked or foreign certificate), and TLS over TCP on the same port, each
//! problem with what to do. No session is opened: a running agent's
//! connection is left alone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_adapters::{now_unix_ms, DoctorCheck};
use ferry_protocol::messages::{frame::Msg, Probe};
use ferry_transport::tls::{client_config, identity_in_file, tcp_client_config, TlsFiles};
use ferry_transport::{FrameReader, FrameWriter, Link};

use crate::config::AgentConfig;
use crate::status;

/// How long each network step may take.
const WITHIN: Duration = Duration::from_secs(5);
/// How long a connection that failed is watched for the exchange's reason.
const WATCH: Duration = Duration::from_millis(1500);
/// Clocks further apart than this are a problem.
const MAX_SKEW: Duration = Duration::from_secs(2);

fn check(name: &str, ok: bool, detail: String, fix: Option<String>) -> DoctorCheck {
    DoctorCheck {
        name: name.to_string(),
        ok,
        detail,
        fix: fix.filter(|_| !ok),
    }
}

/// Why the exchange closed a connection right after the handshake.
fn refusal(why: &str) -> String {
    if why.to_ascii_lowercase().contains("revoked") {
        format!("the exchange refused this agent's certificate as revoked ({why})")
    } else {
        format!("the exchange closed the connection after the handshake: {why}")
    }
}

pub async fn checks(cfg: &AgentConfig) -> Vec<DoctorCheck> {
    let mut out = Vec::new();
    let x = &cfg.exchange;
    let files = TlsFiles {
        ca: &x.ca,
        cert: &x.cert,
        key: &x.key,
    };
    let enrol_fix = format!(
        "the exchange operators issue these with `ferry-exchange enroll`: put ca.pem, agent.pem and agent.key \
         (mode 0600, owned by the agent's user) where exchange.ca/cert/key point ({}, {}, {})",
        x.ca.display(),
        x.cert.display(),
        x.key.display()
    );
    let (quic, tcp) = match (client_config(&files), tcp_client_config(&files)) {
        (Ok(q), Ok(t)) => {
            out.push(check(
                "exchange: certificate files",
                true,
                String::new(),
                None,
            ));
            (q, t)
        }
        (Err(e), _) | (_, Err(e)) => {
            out.push(check(
                "exchange: certificate files",
                false,
                format!("{e:#}"),
                Some(enrol_fix),
            ));
            return out;
        }
    };
    if let Ok(id) = identity_in_file(&x.cert) {
        let now = status::now_unix();
        let days = (id.not_after_unix - now as i64) / 86_400;
        let (ok, detail) = match status::cert_alarm(id.not_after_unix.max(0) as u64, now) {
            Some(alarm) => (false, alarm),
            None => (
                true,
                format!(
                    "agent {} (serial {}), {days} days left",
                    id.agent_id, id.serial
                ),
            ),
        };
        out.push(check(
            "exchange: agent certificate",
            ok,
            detail,
            Some(format!(
                "ask the exchange operators for a new certificate (`ferry-exchange enroll --replace` for agent {}), \
                 install it and restart the agent",
                id.agent_id
            )),
        ));
    }

    let server_name = cfg.server_name();
    let addr = match tokio::time::timeout(WITHIN, tokio::net::lookup_host(&x.address)).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            // As the shipper: IPv4 first.
            match addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
            {
                Some(a) => {
                    let all: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    out.push(check(
                        "exchange: DNS",
                        true,
                        format!("{} is {}", x.address, all.join(", ")),
                        None,
                    ));
                    a
                }
                None => {
                    out.push(check(
                        "exchange: DNS",
                        false,
                        format!("{} resolves to no address", x.address),
                        Some("check exchange.address, or give the exchange's IP address".into()),
                    ));
                    return out;
                }
            }
        }
        Ok(Err(e)) => {
            out.push(check(
                "exchange: DNS",
                false,
                format!("{}: {e}", x.address),
                Some(
                    "check exchange.address and this host's resolver (/etc/resolv.conf), or give the exchange's IP address"
                        .into(),
                ),
            ));
            return out;
        }
        Err(_) => {
            out.push(check(
                "exchange: DNS",
                false,
                format!("no answer for {} within {WITHIN:?}", x.address),
                Some("check this host's resolver (/etc/resolv.conf), or give the exchange's IP address".into()),
            ));
            return out;
        }
    };

    let cert_fix = format!(
        "exchange.ca must be the exchange's CA (ca.pem from enrolment), and the exchange's certificate must name {server_name:?} \
         (set exchange.server_name to a name it has)"
    );
    let refused_fix = "the exchange does not accept this agent's certificate: it was revoked, or comes from another \
                       exchange's CA; ask the exchange operators to enrol the agent again"
        .to_string();
    // QUIC over UDP.
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // The exchange's answer to the probe, over QUIC or else over TCP.
    let mut answered: Option<Answer> = None;
    let quic_ok = match quinn::Endpoint::client(bind) {
        Err(e) => {
            out.push(check(
                "exchange: QUIC (UDP)",
                false,
                format!("cannot open a UDP socket: {e}"),
                None,
            ));
            false
        }
        Ok(endpoint) => {
            let started = Instant::now();
            let r = match endpoint.connect_with(quic, addr, &server_name) {
                Err(e) => Err((format!("{e}"), Some(cert_fix.clone()))),
                Ok(connecting) => match tokio::time::timeout(WITHIN, connecting).await {
                    Err(_) | Ok(Err(quinn::ConnectionError::TimedOut)) => Err((
                        format!("no QUIC handshake with {addr} within {WITHIN:?}"),
                        Some(format!(
                            "UDP port {} to the exchange is blocked or the exchange is down: open UDP {} from this host \
                             (the agent falls back to TLS over TCP on the same port, which is slower)",
                            addr.port(),
                            addr.port()
                        )),
                    )),
                    Ok(Err(e)) => Err((format!("{e}"), Some(cert_fix.clone()))),
                    Ok(Ok(conn)) => {
                        let ms = started.elapsed().as_millis();
                        let link = Link::Quic(conn.clone());
                        let r = match ask(&link).await {
                            Ok(answer) => {
                                answered = Some(answer);
                                Ok(format!("handshake with {server_name} at {addr} in {ms} ms"))
                            }
                            Err(why) => Err((why, Some(refused_fix.clone()))),
                        };
                        conn.close(0u32.into(), b"doctor done");
                        r
                    }
                },
            };
            endpoint.close(0u32.into(), b"doctor done");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            match r {
                Ok(d) => {
                    out.push(check("exchange: QUIC (UDP)", true, d, None));
                    true
                }
                Err((d, fix)) => {
                    out.push(check("exchange: QUIC (UDP)", false, d, fix));
                    false
                }
            }
        }
    };

    // TLS over TCP on the same port: the fallback where UDP is blocked.
    let started = Instant::now();
    match ferry_transport::link::connect_tcp(addr, &server_name, &tcp).await {
        Ok(link) => {
            let ms = started.elapsed().as_millis();
            // TLS 1.3 checks the client's certificate after the client's side
            // of the handshake: a refusal shows as the link closing.
            match ask(&link).await {
                Err(why) => out.push(check(
                    "exchange: TLS over TCP",
                    false,
                    why,
                    Some(refused_fix),
                )),
                Ok(answer) => {
                    answered.get_or_insert(answer);
                    out.push(check(
                        "exchange: TLS over TCP",
                        true,
                        format!(
                            "handshake with {server_name} at {addr} in {ms} ms{}",
                            if quic_ok {
                                ""
                            } else {
                                " (the agent ships over this while QUIC does not get through)"
                            }
                        ),
                        None,
                    ))
                }
            }
            link.close(0, b"doctor done");
        }
        Err(e) => {
            let text = format!("{e:#}");
            let fix = if text.contains("certificate") || text.contains("InvalidCertificate") {
                cert_fix
            } else {
                format!(
                    "TCP port {} to the exchange is blocked or the exchange is down: check exchange.address and the firewalls on the way",
                    addr.port()
                )
            };
            out.push(check("exchange: TLS over TCP", false, text, Some(fix)));
        }
    }
    if let Some(answer) = answered {
        out.push(clock_check(&answer));
    }
    out
}

/// What the exchange answered the doctor's probe.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// Its clock: `ahead_ms` ahead of this host's (behind when negative),
    /// give or take `within_ms` (half the round trip).
    Clock {
        ahead_ms: i64,
        within_ms: u64,
        software: String,
    },
    /// An exchange older than the probe: the connection was accepted, the
    /// clock is not known.
    Older(String),
}

/// Asks the exchange for its clock on `link` (no session is opened). `Err`:
/// the exchange refused the connection or did not answer, in words.
async fn ask(link: &Link) -> Result<Answer, String> {
    let asked = async {
        let (send, recv) = link.open_bi().await.map_err(|e| e.to_string())?;
        let mut to = FrameWriter::new(send);
        let mut from = FrameReader::new(recv, 1 << 16);
        let sent_ms = now_unix_ms();
        let sent = Instant::now();
        to.send(Msg::Probe(Probe {}))
            .await
            .map_err(|e| format!("{e:#}"))?;
        let reply = from.next().await.map_err(|e| format!("{e:#}"))?;
        let rtt_ms = sent.elapsed().as_millis() as u64;
        Ok::<_, String>(match reply {
            Some(Msg::ProbeReply(r)) => Answer::Clock {
                ahead_ms: r.unix_ms as i64 - (sent_ms + rtt_ms / 2) as i64,
                within_ms: rtt_ms.div_ceil(2),
                software: r.software,
            },
            Some(Msg::Error(e)) => Answer::Older(e.message),
            Some(_) => Answer::Older("an unexpected frame".into()),
            None => return Err("the exchange closed the stream without an answer".into()),
        })
    };
    match tokio::time::timeout(WITHIN, asked).await {
        Ok(Ok(answer)) => Ok(answer),
        // A refusal closes the connection: its reason says why.
        Ok(Err(e)) => {
            let why = tokio::time::timeout(WATCH, link.closed())
                .await
                .map(|c| c.to_string())
                .unwrap_or(e);
            Err(refusal(&why))
        }
        Err(_) => Err(format!(
            "the exchange completed the handshake but answered nothing within {WITHIN:?}"
        )),
    }
}

/// The clock check from the exchange's answer: records carry this host's
/// capture times, the dashboard ages them by the exchange's clock, and
/// bandwidth schedules follow this host's.
fn clock_check(answer: &Answer) -> DoctorCheck {
    match answer {
        Answer::Clock {
            ahead_ms,
            within_ms,
            software,
        } => {
            let off = ahead_ms.unsigned_abs();
            let (ok, how) = if off.saturating_sub(*within_ms) <= MAX_SKEW.as_millis() as u64 {
                (true, "in step with".to_string())
            } else if *ahead_ms > 0 {
                (false, format!("{} behind", seconds(off)))
            } else {
                (false, format!("{} ahead of", seconds(off)))
            };
            check(
                "exchange: clock",
                ok,
                format!(
                    "this host's clock is {how} the exchange's ({ahead_ms:+} ms, ±{within_ms} ms; exchange {software})"
                ),
                Some(format!(
                    "set this host's clock from the city's time servers (`timedatectl set-ntp true`, or chrony); \
                     the agent stamps records with it, so the dashboard's ages and lags are off by as much, \
                     and bandwidth schedules follow it (more than {}s apart counts as a problem)",
                    MAX_SKEW.as_secs()
                )),
            )
        }
        Answer::Older(said) => check(
            "exchange: clock",
            true,
            format!("not checked: the exchange is older than this agent and does not tell its time ({said})"),
            None,
        ),
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}
