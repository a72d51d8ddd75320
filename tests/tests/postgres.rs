//! The postgres source end to end: real `ferry-exchange` and `ferry-agent`
//! processes and a throwaway PostgreSQL (see `ferry_tests::pg`). The agent is killed
//! with SIGKILL at random moments (during the initial snapshot and while streaming)
//! and PostgreSQL is restarted once, while a writer keeps changing the table; in the
//! end the exchange's records, applied by primary key, equal the table row by row,
//! every streamed change is there exactly once, and the slot was never confirmed
//! past what the agent had durable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_tests::pg::{self, PgServer};
use ferry_tests::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const AGENT: &str = "hp-ga-01";
const DEPT: &str = "210102-GA";
const STREAM: &str = "person";
const DB: &str = "hukou";
const SLOT: &str = "ferry_hp_ga_01";
/// Rows in the table before the agent first starts.
const ROWS: i64 = 20_000;
/// Columns of `public.person`, in table order.
const COLUMNS: [&str; 6] = ["id", "name", "city", "amount", "updated", "note"];
const CITIES: [&str; 6] = ["沈阳", "大连", "鞍山", "抚顺", "本溪", "丹东"];

fn setup_database(server: &PgServer) {
    server.psql("postgres", &format!("CREATE DATABASE {DB}"));
    server.psql(
        DB,
        &format!(
            "CREATE TABLE public.person (id bigint PRIMARY KEY, name text, city text,
                 amount numeric(20,4), updated timestamptz, note text);
             INSERT INTO public.person
               SELECT g, 'name-' || g, (ARRAY['{}'])[1 + g % {}],
                      round(g * 1.2345, 4), timestamptz '2024-01-01 08:00:00+08' + g * interval '1 minute',
                      CASE WHEN g % 7 = 0 THEN NULL ELSE 'seed' END
               FROM generate_series(1, {ROWS}) g;
             CREATE PUBLICATION ferry_pub FOR TABLE public.person;",
            CITIES.join("','"),
            CITIES.len()
        ),
    );
}

// ---------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------

/// What the writer did.
#[derive(Debug, Default)]
struct Written {
    committed: u64,
    rolled_back: u64,
    /// Transactions that failed (the server restarting): outcome unknown, which
    /// the row-by-row comparison does not care about.
    failed: u64,
    big: u64,
}

/// Keeps inserting, updating and deleting rows of `public.person` in transactions
/// of 1 to 6 statements (random ids, some statements touching several rows); one
/// transaction in ten is rolled back, its writes marked `note = 'ROLLBACK-n'`. On
/// request (`big`) one transaction updates every row (about 20,000), more than the
/// source commits to its buffer in one piece. Reconnects when the server goes away.
struct Writer {
    stop: Arc<AtomicBool>,
    big: Arc<AtomicU32>,
    handle: JoinHandle<Written>,
}

impl Writer {
    fn start(dsn: String, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let big = Arc::new(AtomicU32::new(0));
        let (s, b) = (stop.clone(), big.clone());
        let handle = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(write_until(dsn, seed, s, b))
            })
            .unwrap();
        Writer { stop, big, handle }
    }

    /// Asks for one big transaction.
    fn big_transaction(&self) {
        self.big.fetch_add(1, Ordering::SeqCst);
    }

    fn finish(self) -> Written {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("the writer thread panicked")
    }
}

fn random_statement(rng: &mut rand::rngs::StdRng, next_id: &mut i64, note: &str) -> String {
    let city = CITIES[rng.random_range(0..CITIES.len())];
    let amount = format!(
        "{}.{:04}",
        rng.random_range(-1_000_000i64..1_000_000_000),
        rng.random_range(0..10_000)
    );
    let note = if note.is_empty() {
        match rng.random_range(0..4) {
            0 => "NULL".to_string(),
            1 => "'改'".to_string(),
            _ => format!("'w{}'", rng.random_range(0..1_000_000)),
        }
    } else {
        format!("'{note}'")
    };
    let any_id = rng.random_range(1..=*next_id);
    match rng.random_range(0..20) {
        // A new row.
        0..=4 => {
            *next_id += 1;
            format!(
                "INSERT INTO public.person VALUES ({}, md5(random()::text), '{city}', {amount}, clock_timestamp(), {note});",
                *next_id
            )
        }
        // A row that may exist (or was deleted before): re-inserted or left alone.
        5 | 6 => format!(
            "INSERT INTO public.person VALUES ({any_id}, 'again', '{city}', {amount}, clock_timestamp(), {note}) ON CONFLICT (id) DO NOTHING;"
        ),
        7..=13 => format!(
            "UPDATE public.person SET name = md5(random()::text), city = '{city}', amount = {amount}, updated = clock_timestamp(), note = {note} WHERE id = {any_id};"
        ),
        // Several rows in one statement.
        14 | 15 => format!(
            "UPDATE public.person SET amount = amount + 1.0001, updated = clock_timestamp(), note = {note} WHERE id BETWEEN {any_id} AND {any_id} + 7;"
        ),
        16..=18 => format!("DELETE FROM public.person WHERE id = {any_id};"),
        _ => format!("DELETE FROM public.person WHERE id BETWEEN {any_id} AND {any_id} + 3;"),
    }
}

async fn write_until(
    dsn: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    big: Arc<AtomicU32>,
) -> Written {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = Written::default();
    let mut next_id = ROWS;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut bigs_done = 0;
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = client.as_ref() else {
            match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    client = Some(c);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        let rollback = rng.random_range(0..10) == 0;
        let mut sql = String::from("BEGIN;");
        let is_big = big.load(Ordering::SeqCst) > bigs_done;
        if is_big {
            bigs_done += 1;
            sql.push_str(
                "UPDATE public.person SET amount = amount + 0.5, updated = clock_timestamp();",
            );
        } else {
            let note = if rollback {
                format!("ROLLBACK-{}", w.rolled_back + 1)
            } else {
                String::new()
            };
            for _ in 0..rng.random_range(1..=6) {
                sql.push_str(&random_statement(&mut rng, &mut next_id, &note));
            }
        }
        sql.push_str(if rollback && !is_big {
            "ROLLBACK;"
        } else {
            "COMMIT;"
        });
        match c.batch_execute(&sql).await {
            Ok(()) if rollback && !is_big => w.rolled_back += 1,
            Ok(()) => {
                w.committed += 1;
                w.big += u64::from(is_big);
            }
            Err(_) => {
                w.failed += 1;
                client = None;
            }
        }
        // Pacing only: a steady stream of transactions rather than a flood.
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..6))).await;
    }
    w
}

// ---------------------------------------------------------------------------------
// The slot never runs ahead of the agent's durable position
// ---------------------------------------------------------------------------------

/// Samples, until stopped, the slot's `confirmed_flush_lsn` and then the LSN of the
/// position durable in the agent (from `status`: the buffer's committed position).
/// The durable position only moves forward, across restarts too, so reading the
/// slot first makes `confirmed <= durable` a valid check even though the two reads
/// are not atomic.
struct FlushWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, Vec<String>)>,
}

impl FlushWatch {
    fn start(server: Arc<PgServer>, agent_config: PathBuf) -> FlushWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("flush-watch".into())
            .spawn(move || {
                let mut compared = 0u64;
                let mut violations = Vec::new();
                while !s.load(Ordering::SeqCst) {
                    if let Some(confirmed) = server.slot_confirmed_flush(DB, SLOT) {
                        let durable = Agent::status_at(&agent_config).and_then(|st| {
                            let pos = st["streams"][0]["position"].as_str()?.to_string();
                            Some((pg_position_lsn(&pos)?, pos))
                        });
                        if let Some((d, pos)) = durable {
                            compared += 1;
                            if confirmed > d {
                                violations.push(format!(
                                    "confirmed_flush_lsn {} is past the agent's durable position {pos:?}",
                                    lsn_text(confirmed)
                                ));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (compared, violations)
            })
            .unwrap();
        FlushWatch { stop, handle }
    }

    /// Stops; returns how many samples were compared, and the violations.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("the flush watch panicked")
    }
}

fn lsn_text(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

// ---------------------------------------------------------------------------------
// Status helpers
// ---------------------------------------------------------------------------------

/// The stream's position description, if the agent answers.
fn position(agent: &Agent) -> Option<String> {
    let st = agent.status_json()?;
    st["streams"][0]["position"].as_str().map(str::to_string)
}

/// `rows_done` of a snapshot position description
/// (`snapshot public.person (1/1): 1500/~20000 rows; ...`).
fn snapshot_rows(position: &str) -> Option<u64> {
    if !position.starts_with("snapshot ") {
        return None;
    }
    let rest = &position[position.find("): ")? + 3..];
    rest.split(['/', ' ']).next()?.parse().ok()
}

// ---------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------

type Row = BTreeMap<String, Option<String>>;

fn json_columns(v: &Value) -> Row {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let text = match v {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        other => panic!("column {k}: unexpected value {other} (not text)"),
                    };
                    (k.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Applies the exchange's records in seq order and checks the stream's own
/// invariants; returns the applied table and (snapshot rows, streamed changes).
fn apply_records(records: &[Value]) -> (BTreeMap<i64, Row>, usize, usize) {
    let mut table: BTreeMap<i64, Row> = BTreeMap::new();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    // (commit_lsn, change, last_in_txn) of the previous streamed change.
    let mut prev: Option<(u64, u64, bool)> = None;
    let (mut snapshot_rows, mut streamed, mut schemas) = (0, 0, 0);
    // (seq, item): the rows of a snapshot block share their record's seq.
    let mut last: Option<(u64, u64)> = None;
    for r in records {
        let seq = r["seq"].as_u64().expect("seq");
        let at = (seq, r["item"].as_u64().unwrap_or(0));
        assert!(
            last.is_none_or(|l| at > l),
            "records out of seq order at {r}"
        );
        assert!(
            r.get("item").is_none() || r["row"]["snapshot"] == true,
            "only snapshot rows share a seq: {r}"
        );
        last = Some(at);
        if r.get("schema").is_some() {
            schemas += 1;
            continue;
        }
        let Some(row) = r.get("row") else {
            panic!("a record that is neither row nor schema: {r}");
        };
        assert_eq!(row["schema"], "public", "{r}");
        assert_eq!(row["table"], "person", "{r}");
        let cols = json_columns(&row["columns"]);
        if let Some(Some(note)) = cols.get("note") {
            assert!(
                !note.starts_with("ROLLBACK-"),
                "a change of a rolled-back transaction reached the exchange: {r}"
            );
        }
        let id_of = |c: &Row| -> i64 {
            c.get("id")
                .and_then(|v| v.as_deref())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no id in {r}"))
        };
        let snapshot = row["snapshot"] == true;
        if snapshot {
            assert!(
                prev.is_none(),
                "a snapshot row after streamed changes began: {r}"
            );
            assert_eq!(row["op"], "insert", "{r}");
            snapshot_rows += 1;
            table.insert(id_of(&cols), cols);
            continue;
        }
        streamed += 1;
        let commit_lsn = row["commit_lsn"]
            .as_str()
            .and_then(pg::parse_lsn)
            .unwrap_or_else(|| panic!("no commit_lsn in {r}"));
        let change = row["change"].as_u64().expect("change");
        let last = row["last_in_txn"] == true;
        assert!(
            seen.insert((commit_lsn, change)),
            "change {change} of the transaction committed at {} arrived twice (second at seq {seq})",
            lsn_text(commit_lsn)
        );
        match prev {
            Some((pl, pc, plast)) if pl == commit_lsn => {
                assert!(
                    !plast && change == pc + 1,
                    "transaction {} is not contiguous: change {change} follows change {pc} (last_in_txn {plast}) at seq {seq}",
                    lsn_text(commit_lsn)
                );
            }
            Some((pl, pc, plast)) => {
                assert!(
                    commit_lsn > pl,
                    "commit order broken: transaction {} after {} at seq {seq}",
                    lsn_text(commit_lsn),
                    lsn_text(pl)
                );
                assert!(
                    plast,
                    "transaction {} ended at change {pc} without last_in_txn, then {} began (seq {seq})",
                    lsn_text(pl),
                    lsn_text(commit_lsn)
                );
                assert_eq!(
                    change,
                    0,
                    "transaction {} begins at change {change} (seq {seq})",
                    lsn_text(commit_lsn)
                );
            }
            None => assert_eq!(
                change, 0,
                "the first streamed change is not a transaction's first: {r}"
            ),
        }
        prev = Some((commit_lsn, change, last));
        match row["op"].as_str() {
            Some("insert") | Some("update") => {
                assert_eq!(
                    cols.keys().map(String::as_str).collect::<HashSet<_>>(),
                    COLUMNS.iter().copied().collect::<HashSet<_>>(),
                    "every column of a new row: {r}"
                );
                if row["op"] == "update" {
                    if let Some(old) = row.get("old_key") {
                        // The key changed (the writer never does that).
                        panic!("an update with an old key: {old}");
                    }
                }
                table.insert(id_of(&cols), cols);
            }
            Some("delete") => {
                let old = json_columns(&row["old_key"]);
                table.remove(&id_of(&old));
            }
            other => panic!("unexpected op {other:?}: {r}"),
        }
    }
    if let Some((l, _, last)) = prev {
        assert!(
            last,
            "the last streamed transaction {} has no last_in_txn",
            lsn_text(l)
        );
    }
    assert!(schemas >= 1, "no schema record before the rows");
    (table, snapshot_rows, streamed)
}

fn table_rows(server: &PgServer) -> BTreeMap<i64, Row> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = server.client(DB).await;
        pg::text_rows(&client, "SELECT * FROM public.person")
            .await
            .into_iter()
            .map(|row| {
                let row: Row = row.into_iter().collect();
                let id = row["id"].as_deref().unwrap().parse().unwrap();
                (id, row)
            })
            .collect()
    })
}

fn assert_same_table(got: &BTreeMap<i64, Row>, want: &BTreeMap<i64, Row>) {
    if got == want {
        return;
    }
    let missing: Vec<&i64> = want
        .keys()
        .filter(|k| !got.contains_key(k))
        .take(10)
        .collect();
    let extra: Vec<&i64> = got
        .keys()
        .filter(|k| !want.contains_key(k))
        .take(10)
        .collect();
    let differ: Vec<String> = want
        .iter()
        .filter_map(|(k, w)| {
            let g = got.get(k)?;
            (g != w).then(|| format!("id {k}: exchange {g:?}, table {w:?}"))
        })
        .take(10)
        .collect();
    panic!(
        "the applied records differ from the table: {} rows vs {} in the table; missing ids (first 10): {missing:?}; ids not in the table (first 10): {extra:?}; differing rows (first 10):\n{}",
        got.len(),
        want.len(),
        differ.join("\n")
    );
}

// ---------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------

/// A PostgreSQL server with `public.person`, an exchange, and an enrolled agent
/// (not started) with the `person` stream and `extra` source keys.
fn start_all(name: &str, extra: &str) -> (TestDir, Arc<PgServer>, Exchange, Agent) {
    let t = TestDir::new(name);
    let server = Arc::new(PgServer::start());
    setup_database(&server);
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = person_agent(&ex, &t, &server, extra);
    (t, server, ex, agent)
}

/// An agent enrolled at `ex` with one postgres stream of `public.person`;
/// `extra` adds source keys.
fn person_agent(ex: &Exchange, t: &TestDir, server: &PgServer, extra: &str) -> Agent {
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.add_stream(&postgres_stream(
        STREAM,
        "210100-GA-0003",
        &server.dsn(DB),
        &["public.person"],
        SLOT,
        "ferry_pub",
        extra,
    ));
    agent
}

/// Waits until the agent's durable position is past `lsn` and the exchange has
/// acknowledged everything buffered.
fn wait_caught_up(agent: &mut Agent, lsn: u64) {
    wait_until(
        LONG,
        "the agent to catch up and the exchange to acknowledge",
        || {
            let s = agent.stream_status(STREAM);
            let pos = s["position"].as_str().unwrap_or_default();
            pos.starts_with("streaming")
                && pg_position_lsn(pos).is_some_and(|l| l >= lsn)
                && s["acked_seq"] == s["head_seq"]
        },
    );
}

/// How a run ended (see [`stop_writer_and_converge`]).
struct Converged {
    written: Written,
    /// The stream's status once caught up.
    status: Value,
    /// Times the flush watch compared the slot with the durable position.
    compared: u64,
}

/// Stops the writer, waits until the agent's durable position is past its last
/// commit and the exchange acknowledged everything, then checks the end state:
/// the slot was never confirmed past the agent's durable position, no source error
/// or shipping alarm, no gap at the exchange, and the records, applied by primary
/// key, equal the table row by row (every streamed change once, in commit order:
/// [`apply_records`]).
fn stop_writer_and_converge(
    writer: Writer,
    agent: &mut Agent,
    ex: &Exchange,
    server: &PgServer,
    watch: FlushWatch,
) -> Converged {
    let written = writer.finish();
    let stop_lsn = server.current_wal_lsn();
    note(format!(
        "writer stopped at {}: {written:?}",
        lsn_text(stop_lsn)
    ));
    // The 1 s heartbeat moves the durable position past the last transaction.
    wait_caught_up(agent, stop_lsn);
    let (compared, violations) = watch.finish();
    note(format!("slot/durable position compared {compared} times"));
    assert!(
        violations.is_empty(),
        "the slot ran ahead of the agent's durable position ({} times), e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    let status = agent.stream_status(STREAM);
    assert!(status["source_error"].is_null(), "source error: {status}");
    assert!(status["ship_error"].is_null(), "shipping alarm: {status}");
    assert!(
        ex.gaps(AGENT, STREAM).is_empty(),
        "the exchange reports gaps"
    );
    let records = ex.records(AGENT, STREAM);
    let (applied, snapshot_rows, streamed) = apply_records(&records);
    // Rows deleted before a resumed copy reached them are not copied, rows
    // inserted meanwhile are: about ROWS in all.
    assert!(
        snapshot_rows as i64 >= ROWS * 9 / 10,
        "only {snapshot_rows} snapshot rows"
    );
    let table = table_rows(server);
    assert_same_table(&applied, &table);
    note(format!(
        "{} rows equal row by row ({snapshot_rows} snapshot rows, {streamed} streamed changes)",
        table.len()
    ));
    Converged {
        written,
        status,
        compared,
    }
}

/// `public.person` with 20,000 rows is captured with `snapshot = "initial"` in
/// chunks of 500 rows while a writer keeps inserting, updating and deleting (some
/// transactions rolled back, two of every row). The agent is killed with
/// SIGKILL 22 times and restarted each time: the first kills while the snapshot is
/// being copied (each after it made progress), the rest while it streams (some
/// within 150 ms of being spawned); PostgreSQL is restarted (`pg_ctl restart -m
/// fast`) once in the middle. Then the records at the exchange, applied by primary
/// key, equal the table row by row; every streamed change is there once, in commit
/// order, transactions whole and contiguous; nothing of a rolled-back transaction
/// arrived; and the slot was never confirmed past the agent's durable position.
#[test]
fn agent_killed_during_snapshot_and_streaming_converges_to_the_table() {
    let started = Instant::now();
    // Rate-limited so that the copy spans several kills.
    let (_t, server, mut ex, mut agent) = start_all(
        "pg-crash",
        "snapshot = \"initial\", snapshot_chunk_rows = 500, snapshot_rows_per_second = 4000, heartbeat_interval = \"1s\"",
    );
    let seed: u64 = rand::rng().random();
    note(format!("writer seed {seed}"));
    let writer = Writer::start(server.dsn(DB), seed);
    let watch = FlushWatch::start(server.clone(), agent.config.clone());
    let mut rng = rand::rng();
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    agent.edit(|t| format!("{t}\n[metrics]\nlisten = \"{metrics}\"\n"));

    // The first start must not be killed before its first position is durable:
    // a slot without a stored position is refused (by design, see the source's
    // docs), so wait for the snapshot position.
    agent.start();
    wait_until(SHORT, "the snapshot to begin", || {
        agent.assert_alive();
        position(&agent).is_some_and(|p| p.starts_with("snapshot"))
    });
    // The snapshot's progress and the slot's retained WAL, for Prometheus.
    let labels = format!("{{stream=\"{STREAM}\",kind=\"postgres\"}}");
    wait_until(SHORT, "the snapshot's progress in the metrics", || {
        http_get(&metrics, "/metrics").is_some_and(|m| {
            [
                "postgres_snapshot_rows_done",
                "postgres_snapshot_rows_estimate",
            ]
            .iter()
            .all(|g| m.contains(&format!("ferry_{g}{labels} ")))
        })
    });

    const KILLS: usize = 22;
    const PG_RESTART_AT: usize = 13;
    const MAX_SNAPSHOT_KILLS: usize = 6;
    const BIG_AT: [usize; 2] = [8, 17];
    let mut partial_kills = 0;
    let mut snapshot_kills = 0;
    let mut streaming_kills = 0;
    let mut last_rows = 0;
    for i in 0..KILLS {
        if i > 0 {
            if i % 5 == 4 && snapshot_kills > 0 {
                agent.spawn();
                std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
            } else {
                agent.start();
            }
        }
        if BIG_AT.contains(&i) {
            writer.big_transaction();
        }
        if i == PG_RESTART_AT {
            // PostgreSQL goes away under the running agent; the source must
            // reconnect by itself and carry on from its durable position.
            wait_until(SHORT, "the agent to stream", || {
                position(&agent).is_some_and(|p| p.starts_with("streaming"))
            });
            server.restart_fast();
            let after = server.current_wal_lsn();
            note(format!("PostgreSQL restarted at {}", lsn_text(after)));
            wait_until(
                LONG,
                "the agent to stream past the PostgreSQL restart",
                || {
                    agent.assert_alive();
                    position(&agent)
                        .and_then(|p| pg_position_lsn(&p))
                        .is_some_and(|l| l >= after)
                },
            );
        }
        let mut pos = position(&agent).unwrap_or_default();
        if pos.starts_with("snapshot") && snapshot_kills >= MAX_SNAPSHOT_KILLS {
            // Enough kills during the copy: the rest while streaming.
            wait_until(LONG, "the snapshot to complete", || {
                agent.assert_alive();
                position(&agent).is_some_and(|p| p.starts_with("streaming"))
            });
            pos = position(&agent).unwrap_or_default();
        }
        if pos.starts_with("snapshot") {
            // Kill after the copy made progress since the last kill.
            let mut done = false;
            wait_until(LONG, "the snapshot to make progress", || {
                agent.assert_alive();
                match position(&agent) {
                    Some(p) if p.starts_with("streaming") => {
                        done = true;
                        true
                    }
                    Some(p) => snapshot_rows(&p).is_some_and(|n| n > last_rows),
                    None => false,
                }
            });
            if !done {
                std::thread::sleep(Duration::from_millis(rng.random_range(0..800)));
            }
        } else if i == BIG_AT[1] {
            // Try to kill while the big transaction is partly buffered (what
            // `partial` in the position is for); opportunistic, as the window is
            // short.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15)
                && !position(&agent).is_some_and(|p| p.contains("in progress"))
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        } else if !pos.is_empty() {
            std::thread::sleep(Duration::from_millis(rng.random_range(100..=1200)));
        }
        let before = position(&agent).unwrap_or_else(|| "(starting)".into());
        agent.kill9();
        partial_kills += usize::from(before.contains("in progress"));
        if let Some(n) = snapshot_rows(&before) {
            snapshot_kills += 1;
            last_rows = n;
        } else {
            streaming_kills += 1;
        }
        note(format!("kill {}: {before}", i + 1));
    }
    agent.start();
    note(format!(
        "agent killed {KILLS} times ({snapshot_kills} during the snapshot, {streaming_kills} while streaming or starting, {partial_kills} with a transaction partly buffered)"
    ));
    assert!(
        snapshot_kills >= 2,
        "only {snapshot_kills} kills landed during the snapshot"
    );

    let end = stop_writer_and_converge(writer, &mut agent, &ex, &server, watch);
    let written = &end.written;
    assert!(
        written.committed > 100,
        "the writer committed only {written:?}"
    );
    assert!(
        written.rolled_back > 5,
        "the writer rolled back only {written:?}"
    );
    assert!(
        written.big >= 1,
        "no big transaction committed: {written:?}"
    );
    assert!(
        end.compared >= 10,
        "the flush watch compared only {} samples",
        end.compared
    );
    // The metrics say what status says.
    let s = &end.status;
    let m = http_get(&metrics, "/metrics").expect("metrics answer");
    for want in [
        format!("ferry_stream_acked_seq{labels} {}", s["acked_seq"]),
        format!("ferry_stream_head_seq{labels} {}", s["head_seq"]),
        format!("ferry_stream_source_failing{labels} 0"),
        "ferry_exchange_connected 1".to_string(),
    ] {
        assert!(m.contains(&want), "{want:?} not in the metrics:\n{m}");
    }
    for g in ["postgres_retained_wal_bytes", "postgres_durable_lsn"] {
        assert!(m.contains(&format!("ferry_{g}{labels} ")), "no {g}:\n{m}");
    }
    note(format!("{:.0} s in all", started.elapsed().as_secs_f64()));
    agent.stop();
    ex.stop();
    // Stops the server (the Drop of the last reference).
    drop(server);
}

/// The link between agent and exchange misbehaves all through the snapshot and
/// the stream, under a concurrent writer: 5 % of datagrams lost, 20 ms (± 5 ms) of
/// delay, 3 % reordered and 1 % duplicated, both ways; the link is cut for 8 s
/// while the snapshot copies and again while changes stream (a transaction larger
/// than one buffer piece among them), and the exchange is killed with SIGKILL once.
/// The agent buffers through all of it; afterwards the records at the exchange,
/// applied by primary key, equal the table row by row, every streamed change is
/// there once and in commit order, the exchange shows no gap, and the slot was
/// never confirmed past the agent's durable position.
/// The named window between a commit made durable in the agent's buffer and its
/// confirmation to the slot (`postgres-after-commit-before-confirm`): the agent
/// aborts exactly there three times while a writer changes the table, restarts,
/// and the records applied by key equal the table, every change once, the slot
/// never ahead of the durable position.
#[test]
fn a_crash_between_the_durable_commit_and_the_slot_confirmation_repeats_no_row() {
    let (_t, server, ex, mut agent) = start_all(
        "pg-window",
        "snapshot = \"initial\", heartbeat_interval = \"1s\"",
    );
    let seed: u64 = rand::rng().random();
    note(format!("writer seed {seed}"));
    let writer = Writer::start(server.dsn(DB), seed);
    let watch = FlushWatch::start(server.clone(), agent.config.clone());
    for round in 0..3 {
        agent.set_env(
            "FERRY_FAILPOINTS",
            "postgres-after-commit-before-confirm=20*off->1*return(crash)",
        );
        agent.spawn();
        let st = agent.wait_exit(LONG);
        assert!(!st.success(), "round {round}: {st}");
        assert!(
            agent.log_since_start().contains("failpoint: crashing here"),
            "round {round}: the agent did not stop in the window"
        );
    }
    agent.unset_env("FERRY_FAILPOINTS");
    agent.start();
    stop_writer_and_converge(writer, &mut agent, &ex, &server, watch);
    agent.stop();
}

#[test]
fn a_bad_link_and_a_killed_exchange_lose_and_repeat_no_row() {
    use ferry_tests::faults::{Faults, UdpProxy};
    let started = Instant::now();
    let t = TestDir::new("pg-faults");
    let server = Arc::new(PgServer::start());
    setup_database(&server);
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    proxy.set(Faults {
        drop: 0.05,
        duplicate: 0.01,
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        reorder: 0.03,
        cut: false,
    });
    let mut agent = person_agent(
        &ex,
        &t,
        &server,
        "snapshot = \"initial\", snapshot_chunk_rows = 1000, snapshot_rows_per_second = 2000, heartbeat_interval = \"1s\"",
    );
    agent.set("address", &format!("\"{}\"", proxy.address()));
    let seed: u64 = rand::rng().random();
    note(format!("writer seed {seed}"));
    let writer = Writer::start(server.dsn(DB), seed);
    let watch = FlushWatch::start(server.clone(), agent.config.clone());
    agent.start();
    wait_until(SHORT, "the snapshot to begin", || {
        agent.assert_alive();
        position(&agent).is_some_and(|p| p.starts_with("snapshot"))
    });

    // Cut while the snapshot copies: it goes on into the buffer.
    let before = position(&agent)
        .and_then(|p| snapshot_rows(&p))
        .unwrap_or(0);
    proxy.cut(true);
    std::thread::sleep(Duration::from_secs(8));
    let s = agent.stream_status(STREAM);
    let during = s["position"].as_str().and_then(snapshot_rows);
    assert!(
        during.is_some_and(|n| n > before)
            || s["position"]
                .as_str()
                .is_some_and(|p| p.starts_with("streaming")),
        "the snapshot went on while the link was cut: {s}"
    );
    assert!(
        s["head_seq"].as_u64() > s["acked_seq"].as_u64(),
        "nothing buffered during the cut: {s}"
    );
    proxy.cut(false);
    note(format!("link back after a cut during the snapshot: {s}"));

    ex.kill9();
    std::thread::sleep(Duration::from_millis(500));
    ex.start();
    wait_until(LONG, "the snapshot to complete", || {
        agent.assert_alive();
        position(&agent).is_some_and(|p| p.starts_with("streaming"))
    });

    // Cut while streaming, with a transaction larger than one piece in it.
    writer.big_transaction();
    proxy.cut(true);
    std::thread::sleep(Duration::from_secs(8));
    proxy.cut(false);
    std::thread::sleep(Duration::from_secs(2));
    let end = stop_writer_and_converge(writer, &mut agent, &ex, &server, watch);
    assert!(
        end.written.committed > 50,
        "the writer committed only {:?}",
        end.written
    );
    let st = proxy.stats();
    note(format!(
        "proxy dropped {}, duplicated {}, reordered {} datagrams; {:.0} s in all",
        st.dropped.load(Ordering::Relaxed),
        st.duplicated.load(Ordering::Relaxed),
        st.reordered.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    ));
    agent.stop();
    ex.stop();
    drop(server);
}

/// One transaction of about 200 MB (100,000 rows of 2 kB that do not compress),
/// larger than the server's `logical_decoding_work_mem` (64 MB by default), so the
/// server streams it while it is in progress. The agent is killed with SIGKILL while the
/// transaction is still open and part of it spooled; after the restart the server
/// streams it again from its start; at its commit it reaches the exchange whole,
/// once, in one transaction, and the agent never held it in memory.
#[test]
fn a_200_mb_transaction_arrives_whole_and_the_agent_stays_small() {
    const BIG: i64 = 100_000;
    let (_t, server, mut ex, mut agent) = start_all(
        "pg-200mb",
        "snapshot = \"never\", heartbeat_interval = \"1s\"",
    );
    agent.start();
    wait_until(SHORT, "the agent to stream", || {
        position(&agent).is_some_and(|p| p.starts_with("streaming"))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(server.client(DB));
    rt.block_on(client.batch_execute(&format!(
        "BEGIN; INSERT INTO public.person
           SELECT {ROWS} + g, 'big-' || g, '沈阳', g, timestamptz '2024-01-01 08:00:00+08',
                  (SELECT string_agg(md5(g::text || '-' || i), '') FROM generate_series(1, 62) i)
           FROM generate_series(1, {BIG}) g"
    )))
    .unwrap();
    // The server has streamed (part of) it to the agent: kill the agent with the
    // transaction still open, then start it again.
    let spooling = "receiving a transaction in progress";
    wait_until(LONG, "the server to stream the open transaction", || {
        agent.assert_alive();
        agent.log_since_start().contains(spooling)
    });
    agent.kill9();
    agent.start();
    rt.block_on(client.batch_execute("COMMIT")).unwrap();
    let stop_lsn = server.current_wal_lsn();
    wait_caught_up(&mut agent, stop_lsn);
    let pid = agent.pid().expect("the agent runs");
    let hwm_kib = ferry_tests::bench::rss_kib(pid as u32, "VmHWM");
    let streamed = server
        .try_psql(
            DB,
            &format!("SELECT sum(stream_bytes) FROM pg_stat_replication_slots WHERE slot_name = '{SLOT}'"),
        )
        .unwrap_or_default();
    note(format!(
        "server streamed {streamed} bytes in progress; agent peak RSS after the restart {} MiB",
        hwm_kib >> 10
    ));
    assert!(
        hwm_kib < 160 << 10,
        "the agent's peak RSS {hwm_kib} kB: it held the transaction in memory"
    );
    let records = ex.records(AGENT, STREAM);
    let (applied, _, streamed_changes) = apply_records(&records);
    assert_eq!(streamed_changes as i64, BIG, "every row once");
    let lsns: HashSet<&str> = records
        .iter()
        .filter_map(|r| r["row"]["commit_lsn"].as_str())
        .collect();
    assert_eq!(lsns.len(), 1, "one transaction");
    assert_same_table(
        &applied,
        &table_rows(&server)
            .into_iter()
            .filter(|(id, _)| *id > ROWS)
            .collect(),
    );
    agent.stop();
    ex.stop();
}
