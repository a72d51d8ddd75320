//! Deliveries: stored records fed on exactly once, through crashes, with the
//! sharing class enforced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";

/// Every file name under `dir`, hidden ones included.
fn walkdir_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Files land under `PATH/AGENT/STREAM/` whole, each once, through `kill -9`
/// of the exchange at random and in the window between writing a file and its
/// checkpoint; a conditional stream is not delivered through a wildcard, an
/// unconditional one is; `deliveries` reports the checkpoints, live and offline.
#[test]
fn received_files_are_delivered_whole_through_exchange_crashes() {
    let t = TestDir::new("delivery-files");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let out = t.path().join("delivered");
    ex.append_config(&format!(
        "\n[[delivery]]\nname = \"archive\"\nkind = \"files\"\npath = \"{}\"\nstreams = [\"{AGENT}/named\", \"*/open\", \"*/public\"]\n",
        out.display()
    ));
    // The first delivered chunk crashes the exchange between its files and its
    // checkpoint; after that, every third one.
    ex.set_env(
        "FERRY_FAILPOINTS",
        Some("delivery-after-write-before-checkpoint=return(crash)"),
    );
    ex.start();
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let named = t.mkdir("named");
    let open = t.mkdir("open");
    let public = t.mkdir("public");
    agent.add_stream(&outbox_stream("named", "210100-MZ-0001", &named));
    agent.add_stream(&outbox_stream("open", "210100-MZ-0002", &open));
    agent.add_stream(
        &outbox_stream("public", "210100-MZ-0003", &public)
            .replace("sharing = \"conditional\"", "sharing = \"unconditional\""),
    );
    agent.start();
    let mut want = BTreeMap::new();
    for i in 0..40 {
        let data = random_bytes(1000 + i * 997);
        let name = format!("m-{i:03}.csv");
        want.insert(format!("{AGENT}/named/{name}"), sha256_hex(&data));
        write_atomic(&named, &name, &data);
        write_atomic(&public, &name, &data);
        want.insert(format!("{AGENT}/public/{name}"), sha256_hex(&data));
        write_atomic(&open, &name, &data);
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let mut crashes = 0;
    let got = wait_for(LONG, "every file delivered", || {
        if !ex.is_running() {
            crashes += 1;
            ex.wait_exit(SHORT);
            ex.set_env(
                "FERRY_FAILPOINTS",
                Some("delivery-after-write-before-checkpoint=33%return(crash)"),
            );
            ex.spawn();
        }
        let got = tree(&out);
        // Caught up too: a delivery still applying chunks would meet its
        // armed failpoint, and the SIGTERM below could crash the exchange.
        let caught_up = || {
            ex.try_deliveries()
                .is_some_and(|l| l.len() == 3 && l.iter().all(|v| v["lag_records"] == 0))
        };
        (got == want && caught_up()).then_some(got)
    });
    note(format!(
        "{} files delivered; the exchange crashed {crashes} times in the window",
        got.len()
    ));
    // Stable: nothing more arrives, nothing half-written is left visible.
    ex.stop();
    ex.set_env("FERRY_FAILPOINTS", None);
    ex.start();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tree(&out),
        want,
        "the delivered tree changed after a restart"
    );
    let tmp: Vec<_> = walkdir_names(&out.join(AGENT))
        .into_iter()
        .filter(|k| k.contains(".ferry-tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    // The open stream is conditional: stored, but never delivered by `*/open`.
    assert_eq!(ex.files(AGENT, "open").len(), 40);
    assert!(!out.join(AGENT).join("open").exists());

    let check = |lines: Vec<serde_json::Value>, how: &str| {
        let by: BTreeMap<String, &serde_json::Value> = lines
            .iter()
            .map(|l| (l["stream"].as_str().unwrap().to_string(), l))
            .collect();
        assert_eq!(by.len(), 3, "{how}: {lines:?}");
        for s in ["named", "public", "open"] {
            let l = by[s];
            assert_eq!(l["delivery"], "archive", "{how}: {l}");
            assert_eq!(l["agent"], AGENT, "{how}: {l}");
            assert_eq!(l["lag_records"], 0, "{how}: {l}");
            assert!(l["last_error"].is_null(), "{how}: {l}");
        }
        // The checkpoint is the last seq, passed records included.
        assert!(
            by["named"]["checkpoint"].as_u64().unwrap() >= 40,
            "{how}: {lines:?}"
        );
    };
    let live = wait_for(SHORT, "every stream caught up", || {
        let l = ex.deliveries();
        (l.len() == 3 && l.iter().all(|v| v["lag_records"] == 0)).then_some(l)
    });
    check(live, "live");
    ex.stop();
    check(ex.deliveries(), "offline");
    agent.stop();
}

/// A fingerprint of a pgbench table: row count and an MD5 over every row in key
/// order (char columns right-trimmed: `char(n)` pads, text keeps what it got).
fn fingerprint(server: &ferry_tests::pg::PgServer, db: &str, table: &str) -> String {
    let (cols, order) = match table.rsplit('.').next().unwrap_or(table) {
        "pgbench_accounts" => ("aid||','||bid||','||abalance||','||rtrim(filler)", "aid"),
        "pgbench_branches" => ("bid||','||bbalance||','||coalesce(rtrim(filler),'')", "bid"),
        "pgbench_tellers" => (
            "tid||','||bid||','||tbalance||','||coalesce(rtrim(filler),'')||','||coalesce(note,'')",
            "tid",
        ),
        _ => (
            "tid||','||bid||','||aid||','||delta||','||mtime::text",
            "tid, bid, aid, delta, mtime",
        ),
    };
    server.psql(
        db,
        &format!("SELECT count(*) || ' ' || coalesce(md5(string_agg({cols}, ';' ORDER BY {order})), '-') FROM {table}"),
    )
}

const PGBENCH_TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// PostgreSQL's own pgbench workload captured by the agent and delivered into
/// mirror tables of another database while the agent and the exchange (with
/// its delivery) are killed `-9` again and again, and a column is added
/// mid-stream: the mirror equals the source row by row (every balance, every
/// history row once). The stream is conditional, so a second delivery that
/// names it only through a wildcard receives nothing.
#[test]
fn postgres_delivery_mirrors_pgbench_through_kills() {
    let t = TestDir::new("delivery-pgbench");
    let server = ferry_tests::pg::PgServer::start();
    server.psql("postgres", "CREATE DATABASE bank");
    server.psql("postgres", "CREATE DATABASE city");
    let pgbench = |args: &[&str]| {
        let out = server
            .command("pgbench")
            .args(args)
            .arg(server.dsn("bank"))
            .output()
            .expect("pgbench (Debian package postgresql-contrib or postgresql)");
        assert!(
            out.status.success(),
            "pgbench {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    pgbench(&["-i", "-q", "-s", "1"]);
    server.psql(
        "bank",
        &format!(
            "CREATE PUBLICATION ferry_pub FOR TABLE {}",
            PGBENCH_TABLES.join(", ")
        ),
    );
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    ex.append_config(&format!(
        "\n[[delivery]]\nname = \"base\"\nkind = \"postgres\"\ndsn = \"{dsn}\"\nschema = \"bank\"\nstreams = [\"{AGENT}/bank\"]\n\
         \n[[delivery]]\nname = \"open\"\nkind = \"postgres\"\ndsn = \"{dsn}\"\nschema = \"open\"\nstreams = [\"*/bank\"]\n",
        dsn = server.dsn("city")
    ));
    ex.start();
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let tables: Vec<String> = PGBENCH_TABLES
        .iter()
        .map(|t| format!("public.{t}"))
        .collect();
    let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
    agent.add_stream(&postgres_stream(
        "bank",
        "210100-JR-0001",
        &server.dsn("bank"),
        &tables,
        "ferry_bank",
        "ferry_pub",
        "heartbeat_interval = \"1s\"",
    ));
    agent.start();

    let workload = {
        let cmd = server.command("pgbench");
        let dsn = server.dsn("bank");
        std::thread::spawn(move || {
            let mut cmd = cmd;
            let out = cmd
                .args(["-n", "-c", "2", "-T", "12"])
                .arg(dsn)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "pgbench run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
    };
    let mut kills = 0;
    for round in 0..7 {
        std::thread::sleep(Duration::from_millis(1500));
        if round % 2 == 0 {
            agent.kill9();
            agent.start();
        } else {
            ex.kill9();
            ex.start();
        }
        kills += 1;
        if round == 2 {
            server.psql(
                "bank",
                "ALTER TABLE pgbench_tellers ADD COLUMN note text; UPDATE pgbench_tellers SET note = 'teller ' || tid WHERE tid % 2 = 0",
            );
        }
    }
    workload.join().unwrap();
    // A last kill of each after the workload.
    ex.kill9();
    ex.start();
    agent.kill9();
    agent.start();
    kills += 2;
    let want: Vec<String> = PGBENCH_TABLES
        .iter()
        .map(|t| fingerprint(&server, "bank", t))
        .collect();
    let stop_lsn = server.current_wal_lsn();
    wait_until(
        LONG,
        "the agent to catch up and the exchange to acknowledge",
        || {
            let s = agent.stream_status("bank");
            let pos = s["position"].as_str().unwrap_or_default();
            pos.starts_with("streaming")
                && pg_position_lsn(pos).is_some_and(|l| l >= stop_lsn)
                && s["acked_seq"] == s["head_seq"]
        },
    );
    let got = wait_for(LONG, "the mirror to equal the source", || {
        let base = ex
            .deliveries()
            .into_iter()
            .find(|l| l["delivery"] == "base")?;
        if base["lag_records"] != 0 {
            return None;
        }
        let got: Vec<String> = PGBENCH_TABLES
            .iter()
            .map(|t| {
                server
                    .try_psql("city", &format!("SELECT 1 FROM bank.{t} LIMIT 0"))
                    .map(|_| fingerprint(&server, "city", &format!("bank.{t}")))
                    .unwrap_or_default()
            })
            .collect();
        (got == want).then_some(got)
    });
    note(format!(
        "mirror equals the source after {kills} kills: {:?}",
        PGBENCH_TABLES.iter().zip(&got).collect::<Vec<_>>()
    ));
    assert!(
        !want[3].starts_with("0 "),
        "pgbench wrote no history: {want:?}"
    );
    // The wildcard delivery passed every record and created nothing.
    let open = server.psql(
        "city",
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'open'",
    );
    assert_eq!(
        open, "0",
        "a conditional stream reached a wildcard delivery"
    );
    let lines = ex.deliveries();
    assert!(lines.iter().all(|l| l["last_error"].is_null()), "{lines:?}");
    agent.stop();
}

/// `[store] retain`: once every delivery naming a stream has passed its records
/// and they are older than the age, the exchange removes them (and the bytes of
/// the files they carried); a stream named by a delivery that cannot deliver
/// (its database unreachable) keeps everything; the delivered files stay.
#[test]
fn retention_removes_only_what_every_delivery_passed() {
    let t = TestDir::new("delivery-retain");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let out = t.path().join("delivered");
    let cfg = std::fs::read_to_string(&ex.config).unwrap();
    std::fs::write(
        &ex.config,
        cfg.replace("[store]\n", "[store]\nretain = \"2s\"\n"),
    )
    .unwrap();
    ex.append_config(&format!(
        "\n[[delivery]]\nname = \"archive\"\nkind = \"files\"\npath = \"{}\"\nstreams = [\"{AGENT}/gone\", \"{AGENT}/kept\"]\n\
         \n[[delivery]]\nname = \"unreachable\"\nkind = \"postgres\"\ndsn = \"host=127.0.0.1 port={} dbname=x user=x connect_timeout=1\"\nschema = \"m\"\nstreams = [\"{AGENT}/kept\"]\n",
        out.display(),
        free_tcp_port()
    ));
    ex.start();
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let gone = t.mkdir("gone");
    let kept = t.mkdir("kept");
    agent.add_stream(&outbox_stream("gone", "210100-MZ-0001", &gone));
    agent.add_stream(&outbox_stream("kept", "210100-MZ-0002", &kept));
    agent.start();
    for i in 0..10 {
        let data = random_bytes(5000 + i);
        write_atomic(&gone, &format!("g{i}.csv"), &data);
        write_atomic(&kept, &format!("k{i}.csv"), &data);
    }
    wait_until(LONG, "both streams delivered to the files", || {
        tree(&out).len() == 20
    });
    let stored = ex.dir.join("store").join("files").join(AGENT);
    wait_until(LONG, "the delivered stream's records removed", || {
        ex.records(AGENT, "gone").is_empty()
    });
    assert_eq!(
        std::fs::read_dir(stored.join("gone")).map_or(0, |d| d.count()),
        0,
        "file bytes of removed records are still stored"
    );
    assert_eq!(ex.files(AGENT, "kept").len(), 10);
    assert_eq!(std::fs::read_dir(stored.join("kept")).unwrap().count(), 10);
    assert_eq!(tree(&out).len(), 20, "delivered files must stay");
    let lines = ex.deliveries();
    let stuck = lines
        .iter()
        .find(|l| l["delivery"] == "unreachable")
        .map(|l| l.to_string())
        .unwrap_or_default();
    note(format!("the unreachable delivery: {stuck}"));
    // More records after retention continue the stream.
    write_atomic(&gone, "after.csv", b"after");
    wait_until(LONG, "the new file delivered", || {
        out.join(AGENT).join("gone").join("after.csv").exists()
    });
    agent.stop();
}
