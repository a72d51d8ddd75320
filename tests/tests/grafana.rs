//! The Grafana dashboard (`packaging/grafana/ferry.json`) and the Prometheus
//! alert rules (`packaging/grafana/ferry-alerts.yml`) stay in step with the
//! metrics the daemons export: a real exchange and a real agent (a tail
//! stream, so the per-stream series exist) are scraped, and every metric name
//! in every PromQL expression of the dashboard and the rules must be one of
//! theirs (or a source gauge some kind can export, or Prometheus' own `up`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ferry_tests::*;
use serde_json::Value;
use yaml_rust2::YamlLoader;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";
const STREAM: &str = "hall-log";

/// A file of the repository, by its path from the workspace root.
fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------------
// The exposition
// ---------------------------------------------------------------------------------

/// Every sample name an exposition's `# TYPE` lines announce, with its
/// family's type: a counter's samples are `NAME_total` (OpenMetrics; the
/// family may be announced with or without the suffix), a histogram's
/// `_bucket`, `_sum`, `_count`, a summary's `_sum`, `_count`.
fn exported(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            panic!("a malformed TYPE line: {line:?}");
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "gaugehistogram" => &["_bucket", "_gsum", "_gcount"],
            "summary" => &["", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        let base = if kind == "counter" {
            name.strip_suffix("_total").unwrap_or(name)
        } else {
            name
        };
        for s in suffixes {
            out.insert(format!("{base}{s}"), kind.to_string());
        }
    }
    out
}

/// `GET /metrics` from `addr`, or an empty string while it does not answer.
fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics").unwrap_or_default()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------
// PromQL
// ---------------------------------------------------------------------------------

/// A metric name used in a PromQL expression, and whether it is read through
/// a function meant for counters (`rate`, `irate`, `increase`, `resets`).
#[derive(Debug, PartialEq)]
struct Use {
    name: String,
    by_counter_fn: bool,
}

/// Aggregation operators: keywords even when `by`/`without` stands between
/// them and their parenthesis.
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Followed by a parenthesised list of label names.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 8] = [
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
];
const COUNTER_FNS: [&str; 4] = ["rate", "irate", "increase", "resets"];

/// The index just past the bracket closing the one at `open` (`(`/`{`/`[`),
/// string literals inside skipped.
fn skip_group(c: &[char], open: usize) -> usize {
    let (o, cl) = match c[open] {
        '(' => ('(', ')'),
        '{' => ('{', '}'),
        _ => ('[', ']'),
    };
    let mut depth = 0;
    let mut i = open;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                i = skip_string(c, i);
                continue;
            }
            x if x == o => depth += 1,
            x if x == cl => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!("unbalanced {o:?} in {:?}", c.iter().collect::<String>());
}

/// The index just past the string literal starting at `start`.
fn skip_string(c: &[char], start: usize) -> usize {
    let q = c[start];
    let mut i = start + 1;
    while i < c.len() {
        if c[i] == '\\' && q != '`' {
            i += 2;
            continue;
        }
        if c[i] == q {
            return i + 1;
        }
        i += 1;
    }
    panic!("unterminated string in {:?}", c.iter().collect::<String>());
}

fn is_ident_start(ch: char) -> bool {
    ch.is_ascii_alphabetic() || ch == '_' || ch == ':'
}

fn is_ident(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'
}

/// Every metric name in `expr`: identifiers that are not functions,
/// keywords, label names (in `{…}` matchers and `by`/`on`/… lists), numbers,
/// durations, strings or Grafana variables (`$agent`, `${x}`,
/// `$__rate_interval`).
fn metric_names(expr: &str) -> Vec<Use> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    // One entry per open parenthesis: does it belong to a counter function?
    let mut parens: Vec<bool> = Vec::new();
    let mut next_paren_counter_fn = false;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        match ch {
            '"' | '\'' | '`' => i = skip_string(&c, i),
            '{' | '[' => i = skip_group(&c, i),
            '#' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '$' => {
                i += 1;
                if c.get(i) == Some(&'{') {
                    i = skip_group(&c, i);
                } else {
                    while i < c.len() && is_ident(c[i]) {
                        i += 1;
                    }
                }
            }
            '(' => {
                parens.push(next_paren_counter_fn);
                next_paren_counter_fn = false;
                i += 1;
            }
            ')' => {
                parens.pop();
                i += 1;
            }
            d if d.is_ascii_digit()
                || (d == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration (5m, 1h30m, 1e3, 0x1f).
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                    i += 1;
                }
            }
            a if is_ident_start(a) => {
                let start = i;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let lower = word.to_ascii_lowercase();
                let mut j = i;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                let call = c.get(j) == Some(&'(');
                if GROUPING.contains(&lower.as_str()) {
                    if call {
                        i = skip_group(&c, j);
                    }
                } else if AGGREGATIONS.contains(&lower.as_str())
                    || KEYWORDS.contains(&lower.as_str())
                {
                } else if call {
                    next_paren_counter_fn = COUNTER_FNS.contains(&word.as_str());
                } else {
                    out.push(Use {
                        name: word,
                        by_counter_fn: parens.iter().any(|&p| p),
                    });
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The metric names of a Grafana variable query: `label_values(SELECTOR,
/// label)`, `label_values(label)` (none), `query_result(EXPR)`,
/// `metrics(REGEX)` (none).
fn variable_query_names(q: &str) -> Vec<Use> {
    let q = q.trim();
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return match inner.rsplit_once(',') {
            Some((selector, _label)) => metric_names(selector),
            None => Vec::new(),
        };
    }
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return metric_names(inner);
    }
    if q.starts_with("metrics(") || q.starts_with("label_names(") {
        return Vec::new();
    }
    metric_names(q)
}

/// The extractor itself, on expressions like the dashboard's.
#[test]
fn metric_names_are_told_from_labels_functions_and_variables() {
    let names = |e: &str| -> Vec<(String, bool)> {
        metric_names(e)
            .into_iter()
            .map(|u| (u.name, u.by_counter_fn))
            .collect()
    };
    assert_eq!(
        names(
            r#"sum by (agent) (rate(ferry_exchange_records_stored_total{agent=~"$agent", stream="a}b"}[$__rate_interval]))"#
        ),
        [("ferry_exchange_records_stored_total".to_string(), true)]
    );
    assert_eq!(
        names(
            "(ferry_stream_head_seq - ferry_stream_acked_seq) * on(instance) group_left(agent) ferry_agent_info{agent=~\"${agent}\"} > 1e3"
        ),
        [
            ("ferry_stream_head_seq".to_string(), false),
            ("ferry_stream_acked_seq".to_string(), false),
            ("ferry_agent_info".to_string(), false),
        ]
    );
    assert_eq!(
        names("count(up{job=\"ferry-agent\"} == 0) or vector(0) + time() - 30 * 86400"),
        [("up".to_string(), false)]
    );
    assert_eq!(
        names("sum(x) without (kind) and bool y offset 5m unless deriv(z[5m:1m])"),
        [
            ("x".to_string(), false),
            ("y".to_string(), false),
            ("z".to_string(), false)
        ]
    );
    let v: Vec<String> = variable_query_names("label_values(ferry_agent_info{a=\"b\"}, agent)")
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(v, ["ferry_agent_info"]);
    assert!(variable_query_names("label_values(agent)").is_empty());
}

// ---------------------------------------------------------------------------------
// The dashboard and the rules
// ---------------------------------------------------------------------------------

/// Every panel of the dashboard, rows' nested panels included.
fn all_panels(panels: &[Value], out: &mut Vec<Value>) {
    for p in panels {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            all_panels(nested, out);
        }
    }
}

/// The dashboard's expressions, each with where it is (for messages); checks
/// its structure on the way.
fn dashboard_exprs(d: &Value) -> Vec<(String, Vec<Use>)> {
    assert_eq!(d["schemaVersion"], 39, "schemaVersion");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource", "{ds}");
    assert_eq!(ds["query"], "prometheus", "{ds}");
    let mut defined: BTreeSet<String> = vars
        .iter()
        .map(|v| v["name"].as_str().expect("a variable's name").to_string())
        .collect();
    defined.insert("__rate_interval".into());
    defined.insert("__interval".into());
    defined.insert("__range".into());

    let mut exprs = Vec::new();
    for name in ["agent", "stream"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{v}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{v}");
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_else(|| panic!("${name} has no query: {v}"));
        let uses = variable_query_names(q);
        assert!(!uses.is_empty(), "${name}'s query {q:?} names no metric");
        exprs.push((format!("variable ${name}: {q}"), uses));
    }

    let mut panels = Vec::new();
    all_panels(d["panels"].as_array().expect("panels"), &mut panels);
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(rows, ["Fleet", "Per agent", "Sources", "Deliveries"]);
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(
                p["id"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{title:?} has no id"))
            ),
            "panel id {} twice",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(!title.is_empty(), "a panel without a title: {p}");
        for key in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][key].is_u64(), "{title:?}: gridPos.{key}");
        }
        assert_eq!(
            p["datasource"],
            serde_json::json!({"type": "prometheus", "uid": "${datasource}"}),
            "{title:?}: its datasource"
        );
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "{title:?} has no target");
        for t in targets {
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{title:?}: {t}");
            }
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| panic!("{title:?}: a target without expr: {t}"));
            for var in expr.split('$').skip(1) {
                let name: String = var
                    .trim_start_matches('{')
                    .chars()
                    .take_while(|&c| is_ident(c))
                    .collect();
                assert!(
                    defined.contains(&name),
                    "{title:?}: ${name} is no variable of the dashboard: {expr}"
                );
            }
            let uses = metric_names(expr);
            assert!(!uses.is_empty(), "{title:?}: {expr:?} names no metric");
            exprs.push((format!("panel {title:?}: {expr}"), uses));
        }
    }
    exprs
}

/// The rules' expressions; checks each rule's keys on the way.
fn rule_exprs(text: &str) -> Vec<(String, Vec<Use>)> {
    let docs = YamlLoader::load_from_str(text).expect("ferry-alerts.yml is not YAML");
    assert_eq!(docs.len(), 1, "one YAML document");
    let groups = docs[0]["groups"].as_vec().expect("groups");
    let names: Vec<&str> = groups
        .iter()
        .map(|g| g["name"].as_str().expect("a group's name"))
        .collect();
    assert_eq!(names, ["ferry-agent", "ferry-exchange"]);
    let mut alerts = BTreeSet::new();
    let mut exprs = Vec::new();
    for g in groups {
        let rules = g["rules"].as_vec().expect("rules");
        assert!(!rules.is_empty(), "group {:?} has no rule", g["name"]);
        for r in rules {
            let alert = r["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("a rule without alert: {r:?}"));
            assert!(alerts.insert(alert.to_string()), "{alert} twice");
            let expr = r["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| panic!("{alert}: no expr"));
            let r#for = r["for"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: no `for:`"));
            assert!(
                humantime::parse_duration(r#for).is_ok_and(|d| !d.is_zero()),
                "{alert}: for: {for:?}"
            );
            let severity = r["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("warning" | "critical")),
                "{alert}: labels.severity {severity:?}"
            );
            for key in ["summary", "description"] {
                assert!(
                    r["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.trim().is_empty()),
                    "{alert}: no annotations.{key}"
                );
            }
            let uses = metric_names(expr);
            assert!(!uses.is_empty(), "{alert}: {expr:?} names no metric");
            exprs.push((format!("alert {alert}: {expr}"), uses));
        }
    }
    exprs
}

/// Every name in `exprs` is in `known`, and a counter is read through
/// `rate()`/`increase()` and nothing else is.
fn check_names(exprs: &[(String, Vec<Use>)], known: &BTreeMap<String, String>) -> Vec<String> {
    let mut wrong = Vec::new();
    for (wher, uses) in exprs {
        for u in uses {
            match known.get(&u.name) {
                None => wrong.push(format!("{}: not exported — {wher}", u.name)),
                Some(kind) if (kind == "counter") != u.by_counter_fn => wrong.push(format!(
                    "{}: a {kind}{} — {wher}",
                    u.name,
                    if u.by_counter_fn {
                        " under rate()/increase() (counters only)"
                    } else {
                        " read without rate()/increase()"
                    }
                )),
                Some(_) => {}
            }
        }
    }
    wrong
}

/// The real daemons' metrics against the dashboard and the alert rules.
#[test]
fn the_dashboard_and_alerts_query_only_exported_metrics() {
    let dashboard: Value = serde_json::from_str(&read("packaging/grafana/ferry.json"))
        .expect("packaging/grafana/ferry.json is not JSON");
    let mut exprs = dashboard_exprs(&dashboard);
    exprs.extend(rule_exprs(&read("packaging/grafana/ferry-alerts.yml")));

    // An exchange with metrics and a delivery (so its delivery families
    // exist), an agent with metrics and a tail stream.
    let t = TestDir::new("grafana");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let ex_metrics = format!("127.0.0.1:{}", free_tcp_port());
    let received = t.mkdir("received");
    ex.append_config(&format!(
        "\n[metrics]\nlisten = \"{ex_metrics}\"\n\n[[delivery]]\nname = \"archive\"\nkind = \"files\"\npath = \"{}\"\nstreams = [\"*/{STREAM}\"]\n",
        received.display()
    ));
    ex.start();
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let agent_metrics = format!("127.0.0.1:{}", free_tcp_port());
    agent.edit(|t| format!("{t}\n[metrics]\nlisten = \"{agent_metrics}\"\n"));
    let log = t.mkdir("logs").join("app.log");
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0002", &log));
    let lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
    append_lines(&log, &lines);
    agent.start();

    // The agent is connected and the exchange acknowledged its lines; the
    // exchange counted them.
    let acked = format!("ferry_stream_acked_seq{{stream=\"{STREAM}\",kind=\"tail\"}}");
    let agent_text = wait_for(
        LONG,
        "the agent's metrics to show 50 lines acknowledged",
        || {
            let m = scrape(&agent_metrics);
            (sample(&m, "ferry_exchange_connected") == Some(1.0)
                && sample(&m, &acked).is_some_and(|n| n >= 50.0))
            .then_some(m)
        },
    );
    let stored =
        format!("ferry_exchange_records_stored_total{{agent=\"{AGENT}\",stream=\"{STREAM}\"}}");
    let ex_text = wait_for(SHORT, "the exchange's metrics to count 50 lines", || {
        let m = scrape(&ex_metrics);
        (sample(&m, &stored) == Some(50.0)).then_some(m)
    });
    agent.stop();
    ex.stop();

    let from_agent = exported(&agent_text);
    let from_exchange = exported(&ex_text);
    assert!(
        from_agent.contains_key("ferry_stream_buffered_bytes"),
        "{agent_text}"
    );
    assert_eq!(
        from_exchange
            .get("ferry_exchange_records_stored_total")
            .map(String::as_str),
        Some("counter"),
        "{ex_text}"
    );
    let mut known = from_agent.clone();
    known.extend(from_exchange.clone());
    // Source gauges (postgres_*, mysql_*) appear only for streams of their
    // kind: every one a kind can report, as the agent names them.
    let mut source_gauges = 0;
    for (name, _help) in ferry_adapters::all_gauges() {
        known.insert(format!("ferry_{name}"), "gauge".into());
        source_gauges += 1;
    }
    assert!(source_gauges >= 8, "all_gauges() lists {source_gauges}");
    // Prometheus' own series for each scrape target.
    known.insert("up".into(), "gauge".into());

    let wrong = check_names(&exprs, &known);
    assert!(
        wrong.is_empty(),
        "metrics the dashboard or the alert rules use wrongly:\n  {}\n\nexported by the agent: {:?}\nby the exchange: {:?}",
        wrong.join("\n  "),
        from_agent.keys().collect::<Vec<_>>(),
        from_exchange.keys().collect::<Vec<_>>()
    );

    // The dashboard covers each source kind's gauges and the main families.
    let used: BTreeSet<&str> = exprs
        .iter()
        .flat_map(|(_, u)| u.iter().map(|u| u.name.as_str()))
        .collect();
    for want in [
        "ferry_postgres_retained_wal_bytes",
        "ferry_postgres_snapshot_rows_done",
        "ferry_mysql_binlog_pos",
        "ferry_mysql_snapshot_rows_done",
        "ferry_exchange_records_stored_total",
        "ferry_exchange_alarms_active",
        "ferry_exchange_delivery_lag_seconds",
        "ferry_buffer_max_bytes",
        "ferry_agent_certificate_not_after_seconds",
        "up",
    ] {
        assert!(used.contains(want), "{want} is queried nowhere");
    }
    note(format!(
        "{} expressions, {} distinct metrics, all exported",
        exprs.len(),
        used.len()
    ));
}
