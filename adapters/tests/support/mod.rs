#![allow(dead_code)]

pub mod committer;
pub mod model;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferry_adapters::postgres::PostgresConfig;
use ferry_tests::pg;

/// A source config for database `db` of `server`, fast heartbeat.
pub fn config(server: &pg::PgServer, db: &str, tables: &[&str], slot: &str) -> PostgresConfig {
    let mut c = PostgresConfig::new(server.dsn(db), tables, slot, "ferry_pub");
    c.heartbeat_interval = ferry_adapters::Duration(std::time::Duration::from_secs(1));
    c
}

/// Checks, until dropped, that the slot's `confirmed_flush_lsn` never passes the
/// LSN of the last durable position (DESIGN invariant 1).
pub struct FlushWatch {
    stop: Arc<AtomicBool>,
    violation: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FlushWatch {
    pub async fn start(
        server: &pg::PgServer,
        db: &str,
        slot: &str,
        store: &committer::Store,
    ) -> FlushWatch {
        let client = server.client(db).await;
        let stop = Arc::new(AtomicBool::new(false));
        let violation = Arc::new(Mutex::new(None));
        let (s, v, store, slot) = (
            stop.clone(),
            violation.clone(),
            store.clone(),
            slot.to_string(),
        );
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                // Read the slot first: the durable position only moves forward.
                if let Some(c) = pg::confirmed_flush(&client, &slot).await {
                    // Before the first position there is nothing to compare with.
                    if let Some(d) = store.durable_lsn().filter(|&d| c > d) {
                        *v.lock().unwrap() = Some(format!(
                            "confirmed_flush_lsn {c:X} is past the durable position {d:X}"
                        ));
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        FlushWatch {
            stop,
            violation,
            task,
        }
    }

    pub async fn check(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        if let Some(v) = self.violation.lock().unwrap().take() {
            panic!("{v}");
        }
    }
}

/// Keeps changing `public.acct (id int primary key, balance int, note text)` in
/// transactions of 1 to `max_txn` statements (updates, inserts, deletes) until
/// stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    pub async fn start(
        server: &pg::PgServer,
        db: &str,
        existing: i32,
        max_txn: usize,
        seed: u64,
    ) -> Writer {
        use rand::{Rng, SeedableRng};
        let client = server.client(db).await;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut next_id = 1_000_000 + existing;
            let mut txns = 0;
            while !s.load(Ordering::Relaxed) {
                let n = rng.random_range(1..=max_txn);
                let mut sql = String::from("BEGIN;");
                for _ in 0..n {
                    let id = rng.random_range(1..=existing);
                    match rng.random_range(0..10) {
                        0..=4 => sql.push_str(&format!(
                            "UPDATE public.acct SET balance = balance + 1, note = md5(random()::text) WHERE id = {id};"
                        )),
                        5..=7 => {
                            next_id += 1;
                            sql.push_str(&format!(
                                "INSERT INTO public.acct VALUES ({next_id}, {id}, 'new');"
                            ));
                        }
                        _ => sql.push_str(&format!("DELETE FROM public.acct WHERE id = {id};")),
                    }
                }
                sql.push_str("COMMIT;");
                client.batch_execute(&sql).await.unwrap();
                txns += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            txns
        });
        Writer { stop, task }
    }

    /// Stops writing; returns how many transactions were committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Creates `public.acct` with rows `1..=n` and the publication `ferry_pub`.
pub async fn acct(client: &tokio_postgres::Client, n: i32) {
    client
        .batch_execute(&format!(
            "CREATE TABLE public.acct (id int PRIMARY KEY, balance int, note text);
             INSERT INTO public.acct SELECT g, g, md5(g::text) FROM generate_series(1, {n}) g;
             CREATE PUBLICATION ferry_pub FOR TABLE public.acct;"
        ))
        .await
        .unwrap();
}

/// Commits a marker row and waits until the capture has it: every transaction
/// committed before it has then arrived too.
pub async fn catch_up(
    client: &tokio_postgres::Client,
    run: &mut committer::Running,
    store: &committer::Store,
) {
    client
        .batch_execute("INSERT INTO public.acct VALUES (-1, 0, 'marker')")
        .await
        .unwrap();
    run.wait_for("the marker row", 60, || {
        store.any_record(|r| match &r.body {
            Some(ferry_protocol::messages::record::Body::Row(c)) => c
                .columns
                .iter()
                .any(|x| x.name == "note" && model::text(x).as_deref() == Some("marker")),
            _ => false,
        })
    })
    .await;
}
