//! A source's errors as the agent acts on them, with real agent and exchange
//! processes and a throwaway PostgreSQL. A fatal error (a configured table that
//! does not exist) stops that stream once, with an ALARM in the journal and in
//! `status` naming the cause and the fix; the agent does not restart it every few
//! seconds, and its other streams carry on. Once the cause is fixed, a reload
//! starts the stream again without touching the others.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::time::Duration;

use ferry_tests::pg::PgServer;
use ferry_tests::*;

const AGENT: &str = "hp-ga-02";
const DEPT: &str = "210102-GA";
const DB: &str = "hukou";

#[test]
fn a_fatal_source_error_stops_only_its_stream_with_an_alarm() {
    let t = TestDir::new("source-errors");
    let server = PgServer::start();
    server.psql("postgres", &format!("CREATE DATABASE {DB}"));
    server.psql(
        DB,
        "CREATE TABLE public.person (id bigint PRIMARY KEY, name text);
         CREATE PUBLICATION ferry_pub FOR TABLE public.person;",
    );
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    // `public.gone` does not exist: no restart can make it appear.
    agent.add_stream(&postgres_stream(
        "person",
        "210100-GA-0003",
        &server.dsn(DB),
        &["public.person", "public.gone"],
        "ferry_se",
        "ferry_pub",
        "snapshot = \"never\"",
    ));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, "one\n").unwrap();
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    agent.start();

    // 1. The stream stops, and `status` says why and what to do.
    let shown = wait_for(SHORT, "the source error in status", || {
        agent.stream_status("person")["source_error"]
            .as_str()
            .map(str::to_string)
    });
    for want in [
        "ALARM",
        "table public.gone (source.tables) does not exist",
        "remove it from source.tables",
        "reload the agent",
    ] {
        assert!(shown.contains(want), "{want:?} not in {shown:?}");
    }

    // 2. It is not restarted: the agent used to start it again every 5 s.
    std::thread::sleep(Duration::from_secs(12));
    agent.assert_alive();
    let text = agent.log_since_start();
    let mentions: Vec<&str> = text.lines().filter(|l| l.contains("public.gone")).collect();
    assert_eq!(mentions.len(), 1, "the error was logged again:\n{text}");
    assert!(mentions[0].contains("ALARM"), "{}", mentions[0]);
    assert!(
        !text.contains("source failed"),
        "the stopped source was restarted:\n{text}"
    );
    let st = agent.stream_status("person");
    assert_eq!(st["source_error"].as_str(), Some(shown.as_str()), "{st}");
    assert_eq!(st["position"], "not started", "{st}");

    // 3. The agent's other stream is untouched.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(b"two\n")
        .unwrap();
    let lines = ex.wait_lines(AGENT, "hall-log", 2, LONG);
    assert_eq!(lines, ["one", "two"]);
    assert!(agent.stream_status("hall-log")["source_error"].is_null());

    // 4. Once the cause is fixed, a reload starts the stopped stream again, in
    //    the same process, and leaves the running one alone.
    server.psql(
        DB,
        "CREATE TABLE public.gone (id bigint PRIMARY KEY);
         ALTER PUBLICATION ferry_pub ADD TABLE public.gone;",
    );
    let pid = agent.pid();
    let out = std::process::Command::new(bin("ferry-agent"))
        .args(["reload", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    server.psql(DB, "INSERT INTO public.gone VALUES (1)");
    wait_until(LONG, "the stream to run again", || {
        let st = agent.stream_status("person");
        st["source_error"].is_null() && st["position"] != "not started"
    });
    assert_eq!(agent.pid(), pid);
    let text = agent.log_since_start();
    let starts = |stream: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("stream={stream} ")) && l.contains("source starting"))
            .count()
    };
    assert_eq!((starts("person"), starts("hall-log")), (2, 1), "{text}");
}
