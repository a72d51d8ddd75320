//! The fleet dashboard: HTTPS (axum over tokio-rustls), the pages and the JSON
//! API behind them, served by `ferry-exchange serve` when `[dashboard] listen`
//! is set.
//!
//! Every page is one embedded single-page application (`assets/`: HTML, CSS,
//! JS, one string catalogue per language) that reads the API; nothing is fetched
//! from elsewhere, so it works with no internet access. Sessions: `POST
//! /api/login` checks the user (`users::login`: argon2, lockout, audit) and sets
//! the `ferry_session` cookie (HttpOnly, Secure, SameSite=Strict) and returns a
//! CSRF token, which every state-changing request must carry in `X-CSRF-Token`.
//! No session → 401; a role without the right → 403; bad input → 4xx with a
//! message. `api/openapi.json` documents the API (kept in the repo as
//! `exchange/src/dashboard/openapi.json`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::alarms::Alarms;
use crate::config::ExchangeConfig;
use crate::fleet::{ConnectionView, Fleet, State as Presence};
use crate::store::{now_unix_ms, AgentRecord, SharedStore, StreamHeartbeat};
use crate::users::{Action, LoginError, Role};

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ZH: &str = include_str!("assets/zh.json");
const EN: &str = include_str!("assets/en.json");
const OPENAPI: &str = include_str!("openapi.json");

const COOKIE: &str = "ferry_session";

#[derive(Clone)]
struct Session {
    name: String,
    role: Role,
    language: String,
    csrf: String,
    last_used_ms: u64,
    /// A machine user's request (`Authorization: Bearer`), not a browser's:
    /// it carries no cookie, so it needs no CSRF token.
    token: bool,
}

impl Session {
    /// Who the audit log names: `web:NAME` for a logged-in user,
    /// `token:NAME` for a machine user.
    fn actor(&self) -> String {
        if self.token {
            format!("token:{}", self.name)
        } else {
            format!("web:{}", self.name)
        }
    }
}

struct Inner {
    store: SharedStore,
    fleet: Arc<Fleet>,
    history: Arc<crate::history::History>,
    alarms: Arc<Alarms>,
    cfg: tokio::sync::watch::Receiver<Arc<ExchangeConfig>>,
    reloads: crate::admin::Reloads,
    deliveries: crate::delivery::Statuses,
    sessions: Mutex<HashMap<String, Session>>,
}

type App = Arc<Inner>;

/// An API error: its status and a message for the user.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    warn!(error = %e, "dashboard request failed");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the exchange could not answer: {e}"),
    )
}

/// Everything the dashboard needs from the running exchange.
pub struct Parts {
    pub store: SharedStore,
    pub fleet: Arc<Fleet>,
    pub history: Arc<crate::history::History>,
    pub alarms: Arc<Alarms>,
    /// The running configuration (a reload replaces it).
    pub cfg: tokio::sync::watch::Receiver<Arc<ExchangeConfig>>,
    pub reloads: crate::admin::Reloads,
    pub deliveries: crate::delivery::Statuses,
}

/// Binds `[dashboard] listen` (an error names the address) and serves until
/// `shutdown`.
pub async fn start(
    parts: Parts,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let cfg = parts.cfg.borrow().clone();
    let Some(listen) = cfg.dashboard.listen.clone() else {
        return Ok(None);
    };
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("[dashboard] listen {listen:?} is not an address:port"))?;
    let (cert, key) = match (&cfg.dashboard.cert, &cfg.dashboard.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (cfg.tls.cert.clone(), cfg.tls.key.clone()),
    };
    let tls = ferry_transport::tls::https_server_config(&cert, &key)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("[dashboard] listening on {addr}"))?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(listen = %local, "dashboard serving (https)");
    let app = Arc::new(Inner {
        store: parts.store,
        fleet: parts.fleet,
        history: parts.history,
        alarms: parts.alarms,
        cfg: parts.cfg,
        reloads: parts.reloads,
        deliveries: parts.deliveries,
        sessions: Mutex::new(HashMap::new()),
    });
    let router = router(app);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    Ok(Some(tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "dashboard: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "dashboard: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "dashboard connection ended");
                    },
                }
            });
        }
    })))
}

fn router(app: App) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/assets/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/app.css",
            get(|| async { page(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/assets/i18n/zh.json",
            get(|| async { page(ZH, "application/json") }),
        )
        .route(
            "/assets/i18n/en.json",
            get(|| async { page(EN, "application/json") }),
        )
        .route(
            "/api/openapi.json",
            get(|| async { page(OPENAPI, "application/json") }),
        )
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/session", get(session_info))
        .route("/api/language", post(language))
        .route("/api/overview", get(overview))
        .route("/api/agents", get(agents))
        .route("/api/agents/{id}", get(agent))
        .route("/api/agents/{id}/revoke", post(revoke))
        .route("/api/enroll", post(enroll))
        .route("/api/agents/{id}/history", get(history))
        .route("/api/agents/{id}/streams/{stream}", get(stream))
        .route("/api/alarms", get(alarms))
        .route("/api/alarms/{id}/ack", post(acknowledge))
        .route("/api/audit", get(audit))
        .route("/api/users", get(users).post(add_user))
        .route("/api/users/{name}/remove", post(remove_user))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such page".into()) })
        .layer(axum::middleware::map_request(read_body))
        .with_state(app)
}

/// Largest request body the API takes.
const MAX_BODY: usize = 1 << 20;

/// Reads a request's whole body before it is routed. A handler that refuses a
/// request without looking at its body (no session, no CSRF token) would
/// otherwise leave it unread, and the server then closes the connection after
/// answering: a client reusing that connection for its next request (as
/// browsers and HTTP libraries do) finds it closed.
async fn read_body(req: axum::extract::Request) -> Result<axum::extract::Request, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a request body is at most {MAX_BODY} bytes"),
        )
    })?;
    Ok(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

fn token() -> String {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    hex::encode(b)
}

fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// A machine user's API token, from `Authorization: Bearer TOKEN`.
fn bearer_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl Inner {
    /// The running configuration, as of the last reload.
    fn config(&self) -> Arc<ExchangeConfig> {
        self.cfg.borrow().clone()
    }

    /// The caller's session: a logged-in user's (the cookie), or a machine
    /// user's (`Authorization: Bearer TOKEN`, looked up in the store on each
    /// request, so `user remove` takes effect at once).
    async fn session(self: &Arc<Self>, headers: &HeaderMap) -> Result<Session, ApiError> {
        let unauthorized = || ApiError(StatusCode::UNAUTHORIZED, "log in first".into());
        if let Some(token) = bearer_of(headers) {
            let token = token.to_string();
            let user = self
                .blocking(move |app| {
                    crate::users::user_of_token(&*app.store, &token).map_err(internal)
                })
                .await?
                .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "unknown API token".into()))?;
            return Ok(Session {
                name: user.name,
                role: user.role,
                language: user.language,
                csrf: String::new(),
                last_used_ms: now_unix_ms(),
                token: true,
            });
        }
        let id = cookie_of(headers).ok_or_else(unauthorized)?;
        let now = now_unix_ms();
        let idle = self.config().dashboard.session_idle.as_millis() as u64;
        let mut m = self
            .sessions
            .lock()
            .map_err(|_| internal("sessions poisoned"))?;
        m.retain(|_, s| now.saturating_sub(s.last_used_ms) < idle);
        let s = m.get_mut(&id).ok_or_else(unauthorized)?;
        s.last_used_ms = now;
        Ok(s.clone())
    }

    /// The session, if its role may do `action` (403 if not).
    async fn allowed(
        self: &Arc<Self>,
        headers: &HeaderMap,
        action: Action,
    ) -> Result<Session, ApiError> {
        let s = self.session(headers).await?;
        if !s.role.can(action) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("the {} role may not do this", s.role.as_str()),
            ));
        }
        Ok(s)
    }

    /// As [`Inner::allowed`], for a state change: a browser's request must
    /// carry its session's CSRF token.
    async fn changing(
        self: &Arc<Self>,
        headers: &HeaderMap,
        action: Action,
    ) -> Result<Session, ApiError> {
        let s = self.allowed(headers, action).await?;
        let sent = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if !s.token && sent != Some(s.csrf.as_str()) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "missing or wrong X-CSRF-Token".into(),
            ));
        }
        Ok(s)
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Inner) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(internal)?
    }

    fn audit(&self, actor: &str, action: &str, target: &str, detail: Value) {
        if let Err(e) = self.store.append_audit(actor, action, target, detail) {
            warn!(error = %e, action, target, "cannot append to the audit log");
        }
    }
}

#[derive(Deserialize)]
struct LoginBody {
    name: String,
    password: String,
}

async fn login(State(app): State<App>, Json(body): Json<LoginBody>) -> Result<Response, ApiError> {
    let user = app
        .blocking(move |app| {
            crate::users::login(&*app.store, &body.name, &body.password, now_unix_ms()).map_err(
                |e| match e {
                    LoginError::Store(e) => internal(e),
                    other => ApiError(StatusCode::UNAUTHORIZED, other.to_string()),
                },
            )
        })
        .await?;
    let id = token();
    let s = Session {
        name: user.name.clone(),
        role: user.role,
        language: user.language.clone(),
        csrf: token(),
        last_used_ms: now_unix_ms(),
        token: false,
    };
    let body =
        json!({"name": s.name, "role": s.role.as_str(), "language": s.language, "csrf": s.csrf});
    app.sessions
        .lock()
        .map_err(|_| internal("sessions poisoned"))?
        .insert(id.clone(), s);
    let cookie = format!("{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict");
    let mut r = Json(body).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(internal)?,
    );
    Ok(r)
}

async fn logout(State(app): State<App>, headers: HeaderMap) -> Result<Response, ApiError> {
    let s = app.changing(&headers, Action::Read).await?;
    if let Some(id) = cookie_of(&headers) {
        if let Ok(mut m) = app.sessions.lock() {
            m.remove(&id);
        }
    }
    app.blocking(move |app| {
        app.audit(&s.actor(), "logout", "", json!({}));
        Ok(())
    })
    .await?;
    let mut r = Json(json!({})).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "ferry_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(r)
}

async fn session_info(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let s = app.session(&headers).await?;
    Ok(Json(
        json!({"name": s.name, "role": s.role.as_str(), "language": s.language, "csrf": s.csrf}),
    ))
}

#[derive(Deserialize)]
struct LanguageBody {
    language: String,
}

/// The user's language, kept with the user.
async fn language(
    State(app): State<App>,
    headers: HeaderMap,
    Json(body): Json<LanguageBody>,
) -> Result<Json<Value>, ApiError> {
    let s = app.changing(&headers, Action::Read).await?;
    if !matches!(body.language.as_str(), "zh" | "en") {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("language {:?}: zh or en", body.language),
        ));
    }
    if let (Some(id), Ok(mut m)) = (cookie_of(&headers), app.sessions.lock()) {
        if let Some(sess) = m.get_mut(&id) {
            sess.language = body.language.clone();
        }
    }
    let lang = body.language.clone();
    app.blocking(move |app| {
        if let Some(mut u) = app.store.user(&s.name).map_err(internal)? {
            u.language = lang;
            app.store.put_user(&u).map_err(internal)?;
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({"language": body.language})))
}

/// A stream as the dashboard shows it.
#[derive(Serialize)]
struct StreamView {
    #[serde(flatten)]
    heartbeat: StreamHeartbeat,
    /// Seqs buffered at the agent and not acknowledged.
    backlog_records: u64,
    backlog_bytes: u64,
}

/// An agent as `GET /api/agents` returns it.
#[derive(Serialize)]
struct AgentView {
    id: String,
    department: String,
    /// The department code's first six characters: its county-level
    /// division (GB/T 2260).
    district: String,
    online: bool,
    state: Presence,
    last_seen: String,
    last_seen_unix_ms: u64,
    connection: ConnectionView,
    host: String,
    software: String,
    config_digest: String,
    up_since_unix: u64,
    cert_serial: String,
    cert_not_after_unix: u64,
    buffer_bytes: u64,
    buffer_max_bytes: u64,
    buffer_full: bool,
    streams: Vec<StreamView>,
    /// Active alarms about this agent.
    alarms: usize,
    /// `healthy`, `lagging`, `offline` or `alarm`.
    health: &'static str,
}

fn rfc3339_ms(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn view(app: &Inner, rec: AgentRecord, now: u64, alarms: &[crate::alarms::Alarm]) -> AgentView {
    let connection = app
        .fleet
        .connection(&rec, now, app.config().dashboard.offline_after);
    let hb = rec.status.clone().unwrap_or_default();
    let streams: Vec<StreamView> = hb
        .streams
        .iter()
        .map(|s| StreamView {
            backlog_records: s.head_seq.saturating_sub(s.acked_seq),
            backlog_bytes: s.buffered_bytes,
            heartbeat: s.clone(),
        })
        .collect();
    let active = alarms
        .iter()
        .filter(|a| a.active() && a.agent == rec.agent_id)
        .count();
    let lagging = streams.iter().any(|s| {
        s.backlog_bytes > app.config().dashboard.backlog_alarm / 4
            || !s.heartbeat.ship_error.is_empty()
    });
    let health = if connection.state == Presence::Offline {
        "offline"
    } else if active > 0 {
        "alarm"
    } else if lagging || connection.state == Presence::Reconnecting {
        "lagging"
    } else {
        "healthy"
    };
    AgentView {
        district: rec.department.chars().take(6).collect(),
        department: rec.department,
        online: connection.online,
        state: connection.state,
        last_seen: rfc3339_ms(rec.last_seen_unix_ms),
        last_seen_unix_ms: rec.last_seen_unix_ms,
        connection,
        host: hb.host.clone(),
        software: if hb.software.is_empty() {
            rec.software
        } else {
            hb.software.clone()
        },
        config_digest: rec.config_digest,
        up_since_unix: hb.started_unix,
        cert_serial: rec.cert_serial,
        cert_not_after_unix: hb.cert_not_after_unix,
        buffer_bytes: hb.buffer_bytes,
        buffer_max_bytes: hb.buffer_max_bytes,
        buffer_full: hb.buffer_full,
        streams,
        alarms: active,
        health,
        id: rec.agent_id,
    }
}

fn all_views(app: &Inner) -> Result<Vec<AgentView>, ApiError> {
    let now = now_unix_ms();
    let alarms = app.alarms.active();
    let mut out: Vec<AgentView> = app
        .store
        .agents()
        .map_err(internal)?
        .into_iter()
        .map(|r| view(app, r, now, &alarms))
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

async fn agents(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::Read).await?;
    let views = app.blocking(all_views).await?;
    Ok(Json(json!(views)))
}

async fn agent(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::Read).await?;
    let found = app
        .blocking(move |app| {
            let now = now_unix_ms();
            let alarms = app.alarms.list();
            Ok(app
                .store
                .agent(&id)
                .map_err(internal)?
                .map(|r| (view(app, r, now, &alarms), alarms)))
        })
        .await?;
    let Some((v, alarms)) = found else {
        return Err(ApiError(StatusCode::NOT_FOUND, "no such agent".into()));
    };
    let mine: Vec<_> = alarms
        .into_iter()
        .filter(|a| a.agent == v.id)
        .take(50)
        .collect();
    Ok(Json(json!({"agent": v, "alarms": mine})))
}

/// Counts by health, overall and per district.
async fn overview(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::Read).await?;
    let views = app.blocking(all_views).await?;
    let mut total: HashMap<&str, usize> = HashMap::new();
    let mut districts: std::collections::BTreeMap<String, HashMap<&str, usize>> =
        Default::default();
    for v in &views {
        *total.entry(v.health).or_default() += 1;
        *districts
            .entry(v.district.clone())
            .or_default()
            .entry(v.health)
            .or_default() += 1;
    }
    let counts = |m: &HashMap<&str, usize>| {
        json!({
            "healthy": m.get("healthy").copied().unwrap_or(0),
            "lagging": m.get("lagging").copied().unwrap_or(0),
            "offline": m.get("offline").copied().unwrap_or(0),
            "alarm": m.get("alarm").copied().unwrap_or(0),
        })
    };
    let by_district: Vec<Value> = districts
        .iter()
        .map(|(d, m)| json!({"district": d, "counts": counts(m)}))
        .collect();
    Ok(Json(json!({
        "agents": views.len(),
        "counts": counts(&total),
        "districts": by_district,
        "active_alarms": app.alarms.active().len(),
    })))
}

async fn alarms(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::Read).await?;
    let list: Vec<Value> = app
        .alarms
        .list()
        .into_iter()
        .take(1000)
        .map(|a| {
            let mut v = json!(a);
            if let Some(o) = v.as_object_mut() {
                o.insert("since".into(), json!(rfc3339_ms(a.since_unix_ms)));
                o.insert("active".into(), json!(a.active()));
            }
            v
        })
        .collect();
    Ok(Json(json!(list)))
}

#[derive(Deserialize)]
struct AckBody {
    #[serde(default)]
    note: String,
}

async fn acknowledge(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<AckBody>,
) -> Result<Json<Value>, ApiError> {
    let s = app.changing(&headers, Action::Acknowledge).await?;
    if body.note.chars().count() > 2000 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the note is longer than 2000 characters".into(),
        ));
    }
    let a = app
        .alarms
        .acknowledge(&id, &s.name, &body.note)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e))?;
    let target = id.clone();
    let note = body.note.clone();
    app.blocking(move |app| {
        app.audit(&s.actor(), "alarm_ack", &target, json!({"note": note}));
        Ok(())
    })
    .await?;
    Ok(Json(json!(a)))
}

async fn revoke(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = app.changing(&headers, Action::Administer).await?;
    let agent = id.clone();
    let revoked = app
        .blocking(move |app| {
            let r = crate::trust::revoke(
                &app.config(),
                Some(&agent),
                None,
                ferry_transport::pki::Reason::Unspecified,
            )
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
            app.audit(
                &s.actor(),
                "revoke",
                &agent,
                json!({"serials": r.iter().map(|x| x.serial.clone()).collect::<Vec<_>>()}),
            );
            Ok(r)
        })
        .await?;
    // The running server takes the new list and closes the agent's connections.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let closed = match app.reloads.send(tx).await {
        Ok(()) => rx.await.ok().and_then(|r| r.ok()).unwrap_or(0),
        Err(_) => 0,
    };
    Ok(Json(
        json!({"revoked": revoked, "closed_connections": closed}),
    ))
}

#[derive(Deserialize)]
struct EnrollBody {
    agent_id: String,
    department: String,
    /// Replace the live certificate of an existing agent id (a reinstalled
    /// server); its old certificate is to be revoked once unused.
    #[serde(default)]
    replace: bool,
}

/// Enrols an agent (administrators): issues its certificate from the
/// exchange's CA, records and audits it, and answers with the files for the
/// agent host (`ca.pem`, `agent.pem`, `agent.key`, and an `agent.toml` for
/// the package's paths under `/etc/ferry` and `/var/lib/ferry`). The key is
/// in this answer only: the exchange keeps none.
async fn enroll(
    State(app): State<App>,
    headers: HeaderMap,
    Json(body): Json<EnrollBody>,
) -> Result<Json<Value>, ApiError> {
    let s = app.changing(&headers, Action::Administer).await?;
    let out = app
        .blocking(move |app| {
            let issued =
                crate::enroll::issue(&app.config(), &body.agent_id, &body.department, body.replace)
                    .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
            app.audit(
                &s.actor(),
                "enroll",
                &body.agent_id,
                json!({"department": body.department, "serial": issued.serial, "replace": body.replace}),
            );
            let toml = crate::enroll::agent_toml(
                &app.config(),
                &body.agent_id,
                &body.department,
                &crate::enroll::PACKAGED,
            );
            Ok(json!({
                "agent_id": body.agent_id,
                "department": body.department,
                "serial": issued.serial,
                "files": {
                    "ca.pem": issued.ca_pem,
                    "agent.pem": issued.cert_pem,
                    "agent.key": issued.key_pem,
                    "agent.toml": toml,
                },
            }))
        })
        .await?;
    Ok(Json(out))
}

/// Every user (never a password hash): administrators only.
async fn users(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::Administer).await?;
    let list = app
        .blocking(|app| {
            let now = now_unix_ms();
            let mut users = app.store.users().map_err(internal)?;
            users.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(users.iter().map(|u| u.listing(now)).collect::<Vec<_>>())
        })
        .await?;
    Ok(Json(json!(list)))
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
    role: String,
    password: String,
}

async fn add_user(
    State(app): State<App>,
    headers: HeaderMap,
    Json(body): Json<NewUser>,
) -> Result<Json<Value>, ApiError> {
    let s = app.changing(&headers, Action::Administer).await?;
    let bad = |e: anyhow::Error| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}"));
    let role: Role = body
        .role
        .parse()
        .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))?;
    crate::users::check_name(&body.name).map_err(bad)?;
    crate::users::check_password(&body.password).map_err(bad)?;
    let user = app
        .blocking(move |app| {
            let hash = crate::users::hash_password(&body.password).map_err(internal)?;
            crate::users::add_user(
                &*app.store,
                &s.actor(),
                &body.name,
                role,
                crate::users::Credential::Password(hash),
            )
            .map_err(bad)
        })
        .await?;
    Ok(Json(user.listing(now_unix_ms())))
}

async fn remove_user(
    State(app): State<App>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = app.changing(&headers, Action::Administer).await?;
    if name == s.name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "you cannot remove yourself".into(),
        ));
    }
    app.blocking(move |app| {
        crate::users::remove_user(&*app.store, &s.actor(), &name)
            .map_err(|e| ApiError(StatusCode::NOT_FOUND, format!("{e:#}")))
    })
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct HistoryQuery {
    #[serde(default = "day")]
    hours: u64,
}

fn day() -> u64 {
    24
}

/// Per stream of the agent, a point per minute over the last `hours` (at most
/// a week): acknowledged records in that minute, and the backlog.
async fn history(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::Read).await?;
    let hours = q.hours.clamp(1, 7 * 24);
    let out = app
        .blocking(move |app| {
            let rec = app
                .store
                .agent(&id)
                .map_err(internal)?
                .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no such agent".into()))?;
            let since = now_unix_ms().saturating_sub(hours * 3_600_000);
            let streams: Vec<Value> = rec
                .status
                .map(|h| h.streams)
                .unwrap_or_default()
                .iter()
                .map(|s| json!({"stream": s.name, "points": series(app, &id, &s.name, since)}))
                .collect();
            Ok(json!({"agent": id, "hours": hours, "streams": streams}))
        })
        .await?;
    Ok(Json(out))
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default = "one")]
    from: u64,
}

fn one() -> u64 {
    1
}

async fn audit(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::ReadAudit).await?;
    let entries = app
        .blocking(move |app| app.store.audit(q.from.max(1), 1000).map_err(internal))
        .await?;
    Ok(Json(json!(entries)))
}

/// A stream's history as chart points: records acknowledged in each minute and
/// the backlog at its end.
fn series(app: &Inner, agent: &str, stream: &str, since_ms: u64) -> Vec<Value> {
    app.history
        .points(agent, stream, since_ms)
        .windows(2)
        .map(|w| {
            json!({
                "t": w[1].t,
                "records": w[1].acked_seq.saturating_sub(w[0].acked_seq),
                "backlog_bytes": w[1].backlog_bytes,
            })
        })
        .collect()
}

/// How many of a stream's last records the stream page lists.
const LAST_RECORDS: u64 = 20;

/// One stream: its declaration (catalogue id, sharing class, each from the seq
/// it applied to), what the agent last reported, what is stored, the seqs
/// declared lost, each delivery's progress, 24 h of throughput, and the
/// metadata of its last records (kind, size, position, table and operation):
/// never their contents, which may be conditional data.
async fn stream(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    app.allowed(&headers, Action::Read).await?;
    let out = app
        .blocking(move |app| {
            let rec = app
                .store
                .agent(&id)
                .map_err(internal)?
                .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no such agent".into()))?;
            let reported = rec
                .status
                .as_ref()
                .and_then(|h| h.streams.iter().find(|s| s.name == name).cloned());
            if reported.is_none() && !rec.streams.contains(&name) {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("agent {id} has no stream {name}"),
                ));
            }
            let meta = app.store.stream_meta(&id, &name).map_err(internal)?;
            let next_seq = app.store.next_expected(&id, &name).map_err(internal)?;
            let gaps = app.store.gaps(&id, &name).map_err(internal)?;
            let mut last = Vec::new();
            let from = next_seq.saturating_sub(LAST_RECORDS).max(1);
            app.store
                .records(&id, &name, from, &mut |r, stored_ms| {
                    last.push(crate::records::metadata(&r, stored_ms));
                    true
                })
                .map_err(internal)?;
            last.reverse();
            let deliveries: Vec<_> = app
                .deliveries
                .snapshot()
                .into_iter()
                .filter(|d| d.agent == id && d.stream == name)
                .collect();
            let since = now_unix_ms().saturating_sub(24 * 3_600_000);
            Ok(json!({
                "agent": id,
                "stream": name,
                "reported": reported,
                "declared": meta.classes,
                "stored_up_to": next_seq - 1,
                "incarnation": meta.incarnation,
                "held": meta.hold,
                "gaps": gaps,
                "deliveries": deliveries,
                "points": series(app, &id, &name, since),
                "last_records": last,
            }))
        })
        .await?;
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(catalogue: &str) -> std::collections::BTreeMap<String, String> {
        serde_json::from_str(catalogue).unwrap()
    }

    /// The string literals that follow each `marker` in `text` (where the
    /// marker starts a word: `t("` but not `split("`).
    fn literals_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
        text.match_indices(marker)
            .filter(|(i, _)| {
                !text[..*i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
            })
            .filter_map(|(i, _)| {
                let rest = &text[i + marker.len()..];
                rest.find('"').map(|end| &rest[..end])
            })
            .collect()
    }

    #[test]
    fn both_catalogues_hold_every_string_the_page_asks_for() {
        let (zh, en) = (keys(ZH), keys(EN));
        assert_eq!(
            zh.keys().collect::<Vec<_>>(),
            en.keys().collect::<Vec<_>>(),
            "the catalogues' keys differ"
        );
        for (k, v) in zh.iter().chain(&en) {
            assert!(!v.trim().is_empty(), "{k} is empty");
        }
        let mut asked: Vec<&str> = literals_after(APP_JS, "t(\"");
        asked.extend(literals_after(APP_JS, "title: \""));
        asked.extend(literals_after(INDEX, "data-t=\""));
        asked.retain(|k| !k.is_empty() && *k != "#");
        assert!(asked.len() > 50, "{asked:?}");
        for k in asked {
            // Keys completed at run time ("health." + h) end with a dot.
            if k.ends_with('.') {
                assert!(zh.keys().any(|z| z.starts_with(k)), "no key {k}*");
                continue;
            }
            assert!(
                zh.contains_key(k),
                "app asks for {k:?}, not in the catalogues"
            );
        }
    }

    #[test]
    fn the_api_description_names_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let source = include_str!("mod.rs");
        let routes = literals_after(source, ".route(\"/api/");
        assert!(routes.len() >= 15, "{routes:?}");
        for r in routes {
            let path = format!("/api/{r}");
            // axum's {param} is OpenAPI's; only the names may differ.
            let shape =
                |p: &str| -> Vec<bool> { p.split('/').map(|s| s.starts_with('{')).collect() };
            let found = doc["paths"].as_object().unwrap().keys().any(|k| {
                shape(k) == shape(&path)
                    && k.split('/')
                        .zip(path.split('/'))
                        .all(|(a, b)| a == b || a.starts_with('{'))
            });
            assert!(found, "{path} is not in openapi.json");
        }
    }
}
