//! The dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver with fantoccini) and its JSON API
//! (ureq, trusting the exchange's own CA): an operator sees two running agents
//! healthy; one is killed with `kill -9` and shows offline with an alarm, which
//! the operator acknowledges; the language switches to English and back; an
//! auditor finds the acknowledgement in the audit log and has no revoke button,
//! and the API refuses what each role may not do. Screenshots go to
//! `target/dashboard-screenshots/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use ferry_tests::{
    bin, free_tcp_port, host_has, note, tail_stream, wait_until, Agent, Exchange, TestDir, SHORT,
};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::pem::PemObject;
use serde_json::{json, Value};

fn has(path: &str) -> bool {
    Path::new(path).exists()
}

/// `ferry-exchange user add`.
fn add_user(ex: &Exchange, dir: &Path, name: &str, role: &str, password: &str) {
    let file = dir.join(format!("{name}.password"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let out = Command::new(bin("ferry-exchange"))
        .args(["user", "add", "--config"])
        .arg(&ex.config)
        .args(["--name", name, "--role", role, "--password-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ferry-exchange user add --token-file`: the new machine user's token,
/// checked to be listed as such and kept in a file only its owner reads.
fn add_token_user(ex: &Exchange, dir: &Path, name: &str, role: &str) -> String {
    let file = dir.join(format!("{name}.token"));
    let (token, listed) = ex.add_token_user(name, role, &file);
    assert_eq!(listed["credential"], "token", "{listed}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    token
}

/// An HTTPS client of the dashboard that trusts the exchange's CA.
struct Api {
    agent: ureq::Agent,
    base: String,
    cookie: Option<String>,
    csrf: Option<String>,
    /// A machine user's API token, sent as `Authorization: Bearer`.
    bearer: Option<String>,
}

impl Api {
    fn new(ex: &Exchange, port: u16) -> Api {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ex.dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Api {
            agent: ureq::AgentBuilder::new().tls_config(Arc::new(tls)).build(),
            base: format!("https://127.0.0.1:{port}"),
            cookie: None,
            csrf: None,
            bearer: None,
        }
    }

    /// Status and JSON body of a request (with the session and, for a POST,
    /// the CSRF token, when `csrf`).
    fn call(&self, method: &str, path: &str, body: Option<Value>, csrf: bool) -> (u16, Value) {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.set("Cookie", c);
        }
        if let Some(t) = &self.bearer {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if let (true, Some(t)) = (csrf, &self.csrf) {
            req = req.set("X-CSRF-Token", t);
        }
        let r = match body {
            Some(b) => req.send_json(b),
            None if method == "POST" => req.send_string(""),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let cookie = resp.header("set-cookie").map(str::to_string);
        let text = resp.into_string().unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if let (Some(c), true) = (cookie, path == "/api/login") {
            assert!(
                c.contains("HttpOnly") && c.contains("Secure") && c.contains("SameSite=Strict"),
                "{c}"
            );
        }
        (status, v)
    }

    /// The status of a POST to each of `paths`, without the CSRF token.
    fn post_all_without_csrf<'p>(&self, paths: &[&'p str]) -> Vec<(&'p str, u16)> {
        let body = json!({"language": "en", "note": ""});
        paths
            .iter()
            .map(|p| (*p, self.call("POST", p, Some(body.clone()), false).0))
            .collect()
    }

    fn login(&mut self, name: &str, password: &str) -> Value {
        let mut req = self.agent.post(&format!("{}/api/login", self.base));
        req = req.set("Content-Type", "application/json");
        let r = req
            .send_json(json!({"name": name, "password": password}))
            .unwrap_or_else(|e| panic!("login {name}: {e}"));
        let cookie = r.header("set-cookie").unwrap().to_string();
        self.cookie = Some(cookie.split(';').next().unwrap().to_string());
        let v: Value = r.into_json().unwrap();
        self.csrf = Some(v["csrf"].as_str().unwrap().to_string());
        v
    }
}

/// chromedriver on a free port, killed on drop.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// Waits until the text of the first element `css` matches `ok`.
async fn wait_text(c: &Client, css: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < end {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shot(c, "failed").await;
    let page = c.source().await.unwrap_or_default();
    panic!("{css}: never as expected within {timeout:?}; last text {last:?}; the page:\n{page}");
}

/// Clicks the element `css` finds.
async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Types `text` into the element `css` finds.
async fn type_into(c: &Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(text)
        .await
        .unwrap();
}

async fn log_in(c: &Client, base: &str, name: &str, password: &str) {
    c.goto(base).await.unwrap();
    wait_text(c, "#login-submit", SHORT, |t| !t.is_empty()).await;
    type_into(c, "#name", name).await;
    type_into(c, "#password", password).await;
    click(c, "#login-submit").await;
}

#[test]
fn operators_watch_the_fleet_in_a_real_browser() {
    let browser = "/usr/bin/chromium";
    let driver_bin = "/usr/bin/chromedriver";
    if !host_has(
        has(browser) && has(driver_bin),
        "headless Chromium is needed: install the Debian packages chromium and chromium-driver (and fonts-noto-cjk)",
    ) {
        return;
    }
    let t = TestDir::new("dashboard");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let port = free_tcp_port();
    ex.append_config(&format!(
        "\n[dashboard]\nlisten = \"127.0.0.1:{port}\"\noffline_after = \"3s\"\n"
    ));
    let secrets = t.mkdir("secrets");
    add_user(&ex, &secrets, "chief", "admin", "chief-password-1");
    add_user(&ex, &secrets, "duty", "operator", "duty-password-1");
    add_user(&ex, &secrets, "audit", "auditor", "audit-password-1");
    ex.start();

    let mut agents = Vec::new();
    for (id, dept) in [("hp-mz-01", "210102001"), ("hp-ga-02", "210103002")] {
        let a = ex.enroll(id, dept, &t.path().join(id));
        let log = t.path().join(format!("{id}.log"));
        std::fs::write(&log, "第一行\n").unwrap();
        a.add_stream(&tail_stream("events", "210000-0001", &log));
        agents.push(a);
    }
    for a in &mut agents {
        a.start();
    }

    // The API: no session, no CSRF token, wrong role, bad input.
    let mut api = Api::new(&ex, port);
    const GETS: &[&str] = &[
        "/api/session",
        "/api/overview",
        "/api/agents",
        "/api/agents/hp-mz-01",
        "/api/agents/hp-mz-01/history",
        "/api/agents/hp-mz-01/streams/events",
        "/api/alarms",
        "/api/audit",
    ];
    const POSTS: &[&str] = &[
        "/api/logout",
        "/api/language",
        "/api/agents/hp-mz-01/revoke",
        "/api/alarms/offline:hp-mz-01:/ack",
    ];
    for path in GETS {
        assert_eq!(
            api.call("GET", path, None, false).0,
            401,
            "{path} without a session"
        );
    }
    for (path, st) in api.post_all_without_csrf(POSTS) {
        assert_eq!(st, 401, "{path} without a session");
    }
    let (st, v) = api.call(
        "POST",
        "/api/login",
        Some(json!({"name": "duty", "password": "nope"})),
        false,
    );
    assert_eq!(st, 401, "{v}");
    let (st, _) = api.call("POST", "/api/login", Some(json!({"name": 3})), false);
    assert!((400..500).contains(&st), "bad input: {st}");
    let who = api.login("duty", "duty-password-1");
    assert_eq!(who["role"], "operator");
    wait_until(SHORT, "both agents online in the API", || {
        let (st, v) = api.call("GET", "/api/agents", None, false);
        st == 200
            && v.as_array().is_some_and(|a| {
                a.len() == 2
                    && a.iter().all(|x| {
                        x["online"] == true
                            && x["streams"].as_array().is_some_and(|s| s.len() == 1)
                            && x["last_seen"].as_str().is_some_and(|s| !s.is_empty())
                    })
            })
    });
    let (_, v) = api.call("GET", "/api/agents", None, false);
    assert_eq!(v[0]["id"], "hp-ga-02");
    assert_eq!(v[0]["department"], "210103002");
    for (path, st) in api.post_all_without_csrf(POSTS) {
        assert_eq!(st, 403, "{path} without the CSRF token");
    }
    let (st, v) = api.call(
        "POST",
        "/api/language",
        Some(json!({"language": "fr"})),
        true,
    );
    assert_eq!(st, 400, "{v}");
    let (st, _) = api.call("POST", "/api/agents/hp-mz-01/revoke", None, true);
    assert_eq!(st, 403, "an operator may not revoke");
    let (st, _) = api.call("GET", "/api/audit", None, false);
    assert_eq!(st, 403, "an operator may not read the audit log");
    let (st, v) = api.call("GET", "/api/agents/hp-mz-01/history?hours=24", None, false);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["streams"][0]["stream"], "events", "{v}");
    assert_eq!(api.call("GET", "/api/agents/nobody", None, false).0, 404);
    // The stream page: its declaration, what is stored, its records' metadata
    // and never their contents.
    let path = "/api/agents/hp-mz-01/streams/events";
    wait_until(SHORT, "the first line stored", || {
        let (st, v) = api.call("GET", path, None, false);
        st == 200 && v["stored_up_to"].as_u64().is_some_and(|n| n >= 1)
    });
    let (_, v) = api.call("GET", path, None, false);
    assert_eq!(v["declared"][0]["catalog_id"], "210000-0001", "{v}");
    assert_eq!(v["declared"][0]["sharing"], "unconditional", "{v}");
    assert_eq!(v["reported"]["kind"], "tail", "{v}");
    assert_eq!(v["gaps"], json!([]), "{v}");
    let last = &v["last_records"][0];
    assert_eq!(
        (&last["seq"], &last["kind"]),
        (&json!(1), &json!("line")),
        "{v}"
    );
    assert!(last["bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
    assert!(
        !v.to_string().contains("第一行"),
        "a record's contents on the stream page: {v}"
    );
    assert_eq!(
        api.call("GET", "/api/agents/hp-mz-01/streams/nothing", None, false)
            .0,
        404
    );
    let (st, v) = api.call("GET", "/api/openapi.json", None, false);
    assert_eq!((st, &v["openapi"]), (200, &json!("3.0.3")));

    // The browser.
    let driver_port = free_tcp_port();
    let child = Command::new(driver_bin)
        .arg(format!("--port={driver_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _driver = Driver(child);
    let base = format!("https://127.0.0.1:{port}/");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": browser,
                // The exchange's CA is not the browser's; the API test above
                // verified the certificate.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--ignore-certificate-errors", "--window-size=1360,900",
                         "--lang=zh-CN"],
            }),
        );
        let end = Instant::now() + SHORT;
        let c = loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{driver_port}"))
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < end => {
                    note(format!("chromedriver not ready: {e}"));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("chromedriver: {e}"),
            }
        };

        log_in(&c, &base, "duty", "duty-password-1").await;
        wait_text(&c, "#count-healthy .n", SHORT, |t| t == "2").await;
        let nav = wait_text(&c, "#nav-alarms", SHORT, |t| !t.is_empty()).await;
        assert_eq!(nav, "告警", "Simplified Chinese by default");
        shot(&c, "1-overview-healthy").await;

        // kill -9: offline within offline_after + 30 s (plus the page's 3 s refresh).
        agents[1].kill9();
        let killed = Instant::now();
        wait_text(&c, "#count-offline .n", Duration::from_secs(90), |t| {
            t == "1"
        })
        .await;
        note(format!("killed agent offline after {:?}", killed.elapsed()));
        assert!(killed.elapsed() < Duration::from_secs(3 + 30 + 15));
        shot(&c, "2-overview-one-offline").await;

        c.goto(&format!("{base}#/alarms")).await.unwrap();
        let ack = "button.ack[data-alarm='offline:hp-ga-02:']";
        wait_text(&c, ack, SHORT, |t| !t.is_empty()).await;
        type_into(&c, ".ack-note", "城东机房断电，已通知").await;
        click(&c, ack).await;
        let table = wait_text(&c, "main table", SHORT, |t| {
            t.contains("duty 已确认：城东机房断电，已通知")
        })
        .await;
        // The message itself in the user's language too.
        assert!(table.contains("起没有连接"), "{table}");
        shot(&c, "3-alarm-acknowledged").await;

        // English and back, per user.
        click(&c, "#lang").await;
        wait_text(&c, "#nav-alarms", SHORT, |t| t == "Alarms").await;
        wait_text(&c, "main h1", SHORT, |t| t == "Alarms").await;
        wait_text(&c, "main table", SHORT, |t| {
            t.contains("no connection since")
        })
        .await;
        shot(&c, "4-english").await;
        click(&c, "#lang").await;
        wait_text(&c, "#nav-alarms", SHORT, |t| t == "告警").await;

        // The auditor: the acknowledgement in the audit log, no revoke button.
        click(&c, "#logout").await;
        wait_text(&c, "#login-submit", SHORT, |t| !t.is_empty()).await;
        log_in(&c, &base, "audit", "audit-password-1").await;
        wait_text(&c, "#count-healthy .n", SHORT, |t| !t.is_empty()).await;
        c.goto(&format!("{base}#/audit")).await.unwrap();
        wait_text(&c, "main table", SHORT, |t| {
            t.contains("alarm_ack") && t.contains("offline:hp-ga-02:")
        })
        .await;
        shot(&c, "5-audit-log").await;
        c.goto(&format!("{base}#/agent/hp-mz-01")).await.unwrap();
        wait_text(&c, "main h1", SHORT, |t| t.contains("hp-mz-01")).await;
        assert!(
            c.find(Locator::Css("#revoke")).await.is_err(),
            "an auditor sees no revoke button"
        );
        shot(&c, "6-agent-as-auditor").await;
        click(&c, "a.stream-link").await;
        wait_text(&c, "#stream-catalog", SHORT, |t| t == "210000-0001").await;
        let sharing = wait_text(&c, "#stream-sharing", SHORT, |t| !t.is_empty()).await;
        assert_eq!(sharing, "无条件共享");
        let records = wait_text(&c, "#last-records", SHORT, |t| t.contains("line")).await;
        assert!(!records.contains("第一行"), "{records}");
        shot(&c, "7-stream-as-auditor").await;

        // An administrator enrols an agent from the overview.
        click(&c, "#logout").await;
        wait_text(&c, "#login-submit", SHORT, |t| !t.is_empty()).await;
        log_in(&c, &base, "chief", "chief-password-1").await;
        wait_text(&c, "#enroll-submit", SHORT, |t| t == "签发证书").await;
        for (css, text) in [
            ("#enroll-id", "hp-web-04"),
            ("#enroll-department", "210105004"),
        ] {
            type_into(&c, css, text).await;
        }
        click(&c, "#enroll-submit").await;
        let result = wait_text(&c, "#enroll-result", SHORT, |t| t.contains("agent.key")).await;
        assert!(
            result.contains("hp-web-04") && result.contains("agent.toml"),
            "{result}"
        );
        // Still offered after the page's 3 s refresh.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let later = c
            .find(Locator::Css("#enroll-result"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(later, result);
        shot(&c, "8-enrol-as-admin").await;
        c.close().await.unwrap();
    });

    // The auditor's API: reads the audit log, may not revoke.
    let mut auditor = Api::new(&ex, port);
    auditor.login("audit", "audit-password-1");
    let (st, log) = auditor.call("GET", "/api/audit", None, false);
    assert_eq!(st, 200);
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "alarm_ack" && e["actor"] == "web:duty"),
        "{log}"
    );
    let (st, _) = auditor.call("POST", "/api/agents/hp-mz-01/revoke", None, true);
    assert_eq!(st, 403);
    let (st, alarms) = auditor.call("GET", "/api/alarms", None, false);
    assert_eq!(st, 200);
    let off = alarms
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "offline:hp-ga-02:")
        .unwrap_or_else(|| panic!("{alarms}"));
    assert_eq!(off["kind"], "offline");
    assert_eq!(off["agent"], "hp-ga-02");
    assert_eq!(off["acknowledged"]["by"], "duty");
    assert!(off["since"].as_str().is_some_and(|s| !s.is_empty()));
    // The live agent never flapped.
    assert!(
        !alarms
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["agent"] == "hp-mz-01" && a["kind"] == "offline"),
        "{alarms}"
    );
    // Users: administrators only; never a hash.
    assert_eq!(auditor.call("GET", "/api/users", None, false).0, 403);
    let mut chief = Api::new(&ex, port);
    chief.login("chief", "chief-password-1");
    let new = json!({"name": "night", "role": "operator", "password": "night-shift-1"});
    assert_eq!(
        auditor
            .call("POST", "/api/users", Some(new.clone()), true)
            .0,
        403
    );
    let (st, v) = chief.call("POST", "/api/users", Some(new.clone()), true);
    assert_eq!(st, 200, "{v}");
    let (st, v) = chief.call("POST", "/api/users", Some(new), true);
    assert_eq!(st, 400, "a second user of one name: {v}");
    let bad = json!({"name": "x", "role": "boss", "password": "long-enough"});
    assert_eq!(chief.call("POST", "/api/users", Some(bad), true).0, 400);
    let (st, users) = chief.call("GET", "/api/users", None, false);
    assert_eq!(st, 200);
    assert_eq!(users.as_array().unwrap().len(), 4, "{users}");
    assert!(!users.to_string().contains("argon2"), "{users}");
    let mut night = Api::new(&ex, port);
    night.login("night", "night-shift-1");
    assert_eq!(night.call("GET", "/api/agents", None, false).0, 200);
    let (st, _) = chief.call("POST", "/api/users/night/remove", None, true);
    assert_eq!(st, 200);
    // Enrolment from the dashboard: administrators only, with the CSRF token;
    // the files it answers with run an agent.
    let body = json!({"agent_id": "hp-new-03", "department": "210104003"});
    assert_eq!(
        auditor
            .call("POST", "/api/enroll", Some(body.clone()), true)
            .0,
        403
    );
    assert_eq!(
        chief
            .call("POST", "/api/enroll", Some(body.clone()), false)
            .0,
        403,
        "no CSRF token"
    );
    let (st, v) = chief.call("POST", "/api/enroll", Some(body.clone()), true);
    assert_eq!(st, 200, "{v}");
    let (st, again) = chief.call("POST", "/api/enroll", Some(body), true);
    assert_eq!(st, 400, "{again}");
    assert!(again.to_string().contains("live certificate"), "{again}");
    let (st, bad) = chief.call(
        "POST",
        "/api/enroll",
        Some(json!({"agent_id": "no spaces", "department": "1"})),
        true,
    );
    assert_eq!(st, 400, "{bad}");
    let dir = t.mkdir("hp-new-03");
    for (name, text) in v["files"].as_object().unwrap() {
        let text = text.as_str().unwrap();
        // The packaged paths, moved into the test's directory.
        let text = text
            .replace("/etc/ferry/", &format!("{}/", dir.display()))
            .replace("/var/lib/ferry", &dir.join("data").display().to_string());
        std::fs::write(dir.join(name), text).unwrap();
    }
    assert!(v["files"]["agent.toml"]
        .as_str()
        .unwrap()
        .contains("cert = \"/etc/ferry/agent.pem\""));
    let mut fresh = Agent::at("hp-new-03", &dir);
    let log = t.path().join("hp-new-03.log");
    std::fs::write(&log, "新接入\n").unwrap();
    fresh.add_stream(&tail_stream("events", "210000-0003", &log));
    fresh.start();
    wait_until(
        SHORT,
        "the agent enrolled from the dashboard online",
        || {
            let (_, v) = chief.call("GET", "/api/agents/hp-new-03", None, false);
            v["agent"]["online"] == true
        },
    );
    let (_, log) = chief.call("GET", "/api/audit", None, false);
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "enroll"
                && e["target"] == "hp-new-03"
                && e["actor"] == "web:chief"
                && e["detail"]["serial"] == v["serial"]),
        "{log}"
    );
    drop(fresh);

    // The admin revokes the killed agent.
    let (st, v) = chief.call("POST", "/api/agents/hp-ga-02/revoke", None, true);
    assert_eq!(st, 200, "{v}");
    assert!(!v["revoked"].as_array().unwrap().is_empty(), "{v}");
}

/// A request the API refuses before reading its body (no session) still has
/// its body read, so the connection stays usable: a client that reuses it for
/// the next request (as ureq and browsers do) is not answered with a closed
/// connection.
#[test]
fn a_refused_request_leaves_its_connection_usable() {
    let t = TestDir::new("dashboard-keepalive");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let port = free_tcp_port();
    ex.append_config(&format!("\n[dashboard]\nlisten = \"127.0.0.1:{port}\"\n"));
    ex.start();
    let api = Api::new(&ex, port);
    wait_until(SHORT, "the dashboard", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // Larger than what the server reads along with the headers.
    let body = json!({"language": "en", "note": "备注".repeat(20_000)});
    for round in 0..6 {
        for path in ["/api/logout", "/api/language", "/api/alarms/x/ack"] {
            let (st, v) = api.call("POST", path, Some(body.clone()), false);
            assert_eq!(st, 401, "round {round}, {path}: {v}");
        }
    }
}

/// The city's big screen and operators' scripts read the API as machine users:
/// a token made by `user add --token-file`, sent as `Authorization: Bearer`,
/// with its role's rights and no CSRF token (it has no cookie to abuse);
/// removing the user refuses the token at once.
#[test]
fn machine_users_use_the_api_with_a_token() {
    let t = TestDir::new("dashboard-token");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let port = free_tcp_port();
    ex.append_config(&format!("\n[dashboard]\nlisten = \"127.0.0.1:{port}\"\n"));
    ex.start();
    let secrets = t.mkdir("secrets");
    let screen = add_token_user(&ex, &secrets, "bigscreen", "auditor");
    let script = add_token_user(&ex, &secrets, "ack-script", "operator");
    assert!(
        screen.starts_with("fxt_") && screen.len() == 4 + 64,
        "{screen}"
    );
    assert_ne!(screen, script);

    // A token file is never overwritten.
    let again = Command::new(bin("ferry-exchange"))
        .args(["user", "add", "--config"])
        .arg(&ex.config)
        .args(["--name", "other", "--role", "auditor", "--token-file"])
        .arg(secrets.join("bigscreen.token"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("must not exist"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(secrets.join("bigscreen.token"))
            .unwrap()
            .trim(),
        screen
    );

    let mut api = Api::new(&ex, port);
    api.bearer = Some(screen.clone());
    for path in [
        "/api/overview",
        "/api/agents",
        "/api/alarms",
        "/api/audit",
        "/api/session",
    ] {
        let (st, v) = api.call("GET", path, None, false);
        assert_eq!(st, 200, "{path}: {v}");
    }
    let (_, who) = api.call("GET", "/api/session", None, false);
    assert_eq!(
        (&who["name"], &who["role"]),
        (&json!("bigscreen"), &json!("auditor"))
    );
    // An auditor's token changes nothing, CSRF token or not.
    assert_eq!(
        api.call("POST", "/api/agents/a1/revoke", None, false).0,
        403
    );
    assert_eq!(api.call("GET", "/api/users", None, false).0, 403);
    // An operator's token acknowledges without a CSRF token (the alarm is
    // unknown here: refused for that, not for want of a token).
    let mut ops = Api::new(&ex, port);
    ops.bearer = Some(script.clone());
    let (st, v) = ops.call(
        "POST",
        "/api/alarms/offline:a1:/ack",
        Some(json!({"note": "x"})),
        false,
    );
    assert!(![401, 403].contains(&st), "{st} {v}");
    // Wrong tokens, and a password login as a machine user.
    for wrong in ["fxt_0000", "nonsense", &screen[..screen.len() - 1]] {
        let mut bad = Api::new(&ex, port);
        bad.bearer = Some(wrong.to_string());
        assert_eq!(
            bad.call("GET", "/api/overview", None, false).0,
            401,
            "{wrong}"
        );
    }
    let anon = Api::new(&ex, port);
    let (st, _) = anon.call(
        "POST",
        "/api/login",
        Some(json!({"name": "bigscreen", "password": screen})),
        false,
    );
    assert_eq!(st, 401, "a machine user cannot log in");
    // The audit log names machine users as such; the listing never holds a hash.
    let (_, log) = api.call("GET", "/api/audit", None, false);
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "user_add"
                && e["target"] == "bigscreen"
                && e["detail"]["credential"] == "token"),
        "{log}"
    );
    let list = Command::new(bin("ferry-exchange"))
        .args(["user", "list", "--config"])
        .arg(&ex.config)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.contains("\"credential\":\"token\""), "{list}");
    assert!(!list.contains(&ferry_hex_sha256(&screen)), "{list}");
    // `user passwd` does not turn a machine user into a person.
    let pw = secrets.join("pw");
    std::fs::write(&pw, "long-enough-1\n").unwrap();
    let passwd = Command::new(bin("ferry-exchange"))
        .args(["user", "passwd", "--config"])
        .arg(&ex.config)
        .args(["--name", "bigscreen", "--password-file"])
        .arg(&pw)
        .output()
        .unwrap();
    assert!(!passwd.status.success());
    assert!(
        String::from_utf8_lossy(&passwd.stderr).contains("API token"),
        "{}",
        String::from_utf8_lossy(&passwd.stderr)
    );
    // Removed: refused at once.
    let rm = Command::new(bin("ferry-exchange"))
        .args(["user", "remove", "--config"])
        .arg(&ex.config)
        .args(["--name", "bigscreen"])
        .output()
        .unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(api.call("GET", "/api/overview", None, false).0, 401);
    assert_eq!(ops.call("GET", "/api/overview", None, false).0, 200);
}

fn ferry_hex_sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}
