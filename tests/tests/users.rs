//! Users and the audit log from the command line: `ferry-exchange user …` and
//! `ferry-exchange audit`, against a running exchange (through its admin
//! socket: the exchange holds the store) and against a stopped one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use ferry_tests::*;
use serde_json::Value;

fn exchange_cli(ex: &Exchange, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("ferry-exchange"));
    let config = ex.config.to_str().unwrap();
    // `user SUB --config FILE …` / `audit --config FILE …`
    let (head, rest) = if args[0] == "user" {
        args.split_at(2)
    } else {
        args.split_at(1)
    };
    cmd.args(head).args(["--config", config]).args(rest);
    cmd.env("USER", "ops1").stdin(Stdio::null());
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(ex: &Exchange, args: &[&str]) -> String {
    let out = exchange_cli(ex, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a command that must fail; its stderr.
fn refused(ex: &Exchange, args: &[&str]) -> String {
    let out = exchange_cli(ex, args);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn password_file(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
}

/// An operator adds users to a running exchange, lists them (never a hash),
/// is refused a wrong role, a short password and a name taken already, changes
/// a password and removes a user; every change is in the audit log, whose hash
/// chain `audit --verify` checks. With the exchange stopped the same commands
/// open the store themselves and the chain continues.
#[test]
fn users_are_managed_from_the_command_line_and_audited() {
    let t = TestDir::new("users");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let good = password_file(t.path(), "pw", "correct-horse-battery\n");
    let other = password_file(t.path(), "pw2", "another-long-password");
    let short = password_file(t.path(), "short", "short\n");
    let empty = password_file(t.path(), "empty", "\n");

    // Two users, through the running exchange.
    let added = ok(
        &ex,
        &[
            "user",
            "add",
            "--name",
            "li.wei",
            "--role",
            "admin",
            "--password-file",
            &good,
        ],
    );
    assert!(
        !added.contains("argon2") && !added.contains("password_hash"),
        "{added}"
    );
    assert_eq!(json_lines(&added)[0]["role"], "admin");
    ok(
        &ex,
        &[
            "user",
            "add",
            "--name",
            "wang_fang",
            "--role",
            "auditor",
            "--password-file",
            &good,
        ],
    );

    // Refusals, each saying why: (name, role, password file, what it says).
    for (name, role, file, why) in [
        ("zhao", "chief", &good, "admin, operator or auditor"),
        ("zhao", "operator", &short, "too short"),
        ("zhao", "operator", &empty, "empty"),
        ("li wei", "operator", &good, "not allowed"),
        ("li.wei", "operator", &good, "exists already"),
    ] {
        let args = [
            "user",
            "add",
            "--name",
            name,
            "--role",
            role,
            "--password-file",
            file,
        ];
        let e = refused(&ex, &args);
        assert!(e.contains(why), "{args:?}: {e}");
    }

    // The list: names, roles, how each signs in, no hash.
    let list = ok(&ex, &["user", "list"]);
    assert!(
        !list.contains("argon2") && !list.contains("password_hash"),
        "{list}"
    );
    assert!(list.contains("\"credential\":\"password\""), "{list}");
    let users = json_lines(&list);
    assert_eq!(
        users
            .iter()
            .map(|u| (
                u["name"].as_str().unwrap(),
                u["role"].as_str().unwrap(),
                u["locked"].as_bool().unwrap()
            ))
            .collect::<Vec<_>>(),
        vec![("li.wei", "admin", false), ("wang_fang", "auditor", false)]
    );

    ok(
        &ex,
        &[
            "user",
            "passwd",
            "--name",
            "wang_fang",
            "--password-file",
            &other,
        ],
    );
    ok(&ex, &["user", "remove", "--name", "wang_fang"]);
    let e = refused(&ex, &["user", "remove", "--name", "wang_fang"]);
    assert!(e.contains("no user wang_fang"), "{e}");

    // The audit log: what changed, by whom, chained.
    let out = exchange_cli(&ex, &["audit", "--verify"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("audit chain verified"),
        "{}",
        text(&out.stderr)
    );
    let log = json_lines(&text(&out.stdout));
    assert_eq!(
        log.iter()
            .map(|e| (
                e["seq"].as_u64().unwrap(),
                e["action"].as_str().unwrap(),
                e["target"].as_str().unwrap()
            ))
            .collect::<Vec<_>>(),
        vec![
            (1, "user_add", "li.wei"),
            (2, "user_add", "wang_fang"),
            (3, "user_list", ""),
            (4, "user_passwd", "wang_fang"),
            (5, "user_remove", "wang_fang"),
        ]
    );
    assert!(log.iter().all(|e| e["actor"] == "cli:ops1"), "{log:?}");
    assert_eq!(log[1]["prev_hash"], log[0]["hash"]);

    // With the exchange stopped, the commands open the store themselves.
    ex.stop();
    ok(
        &ex,
        &[
            "user",
            "add",
            "--name",
            "zhao",
            "--role",
            "operator",
            "--password-file",
            &good,
        ],
    );
    let names: Vec<Value> = json_lines(&ok(&ex, &["user", "list"]))
        .into_iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(names, vec!["li.wei", "zhao"]);
    let tail = json_lines(&ok(&ex, &["audit", "--from", "6", "--verify"]));
    assert_eq!(
        tail.iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["user_add", "user_list"]
    );
    assert_eq!(tail[0]["seq"], 6);
}

/// Two exchange nodes on one JetStream store, each told to add users by its
/// own operators at the same time: every user is known to both nodes, and the
/// audit log both print is one chain, seqs 1..=N each once.
#[test]
fn two_jetstream_nodes_append_one_audit_chain() {
    use ferry_tests::nats::NatsServer;
    let t = TestDir::new("users-js");
    let nats = NatsServer::start();
    let mut a = Exchange::init(&t.mkdir("a"));
    a.use_jetstream(&nats.url(), &nats.monitor());
    let mut b = a.another_node(&t.path().join("b"));
    a.start();
    b.start();
    let pw = password_file(t.path(), "pw", "correct-horse-battery\n");
    const EACH: usize = 8;
    std::thread::scope(|s| {
        for (node, ex) in [("a", &a), ("b", &b)] {
            let pw = pw.clone();
            s.spawn(move || {
                for i in 0..EACH {
                    let name = format!("{node}-user-{i}");
                    ok(
                        ex,
                        &[
                            "user",
                            "add",
                            "--name",
                            &name,
                            "--role",
                            "operator",
                            "--password-file",
                            &pw,
                        ],
                    );
                }
            });
        }
    });
    assert_eq!(json_lines(&ok(&b, &["user", "list"])).len(), 2 * EACH);
    for ex in [&a, &b] {
        let out = exchange_cli(ex, &["audit", "--verify"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let log = json_lines(&text(&out.stdout));
        let adds: Vec<&str> = log
            .iter()
            .filter(|e| e["action"] == "user_add")
            .map(|e| e["target"].as_str().unwrap())
            .collect();
        assert_eq!(adds.len(), 2 * EACH, "{log:?}");
        let seqs: Vec<u64> = log.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }
}

/// Enrolment and revocation from the command line work on certificate files,
/// not the store, and are recorded in the audit log all the same: on the store
/// itself when no exchange runs, through the running one's admin socket when
/// one does.
#[test]
fn enrolment_and_revocation_from_the_command_line_are_audited() {
    let t = TestDir::new("cli-audit");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    ex.enroll("a1", "210102001", &t.path().join("a1"));
    ex.start();
    ex.enroll("a2", "210103002", &t.path().join("a2"));
    let out = ex.revoke(&["--agent-id", "a1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let serial = json_lines(&text(&out.stdout))[0]["serial"].clone();
    let log = json_lines(&ok(&ex, &["audit"]));
    let find = |action: &str, target: &str| {
        log.iter()
            .find(|e| e["action"] == action && e["target"] == target)
            .unwrap_or_else(|| panic!("no {action} of {target} in {log:?}"))
            .clone()
    };
    let e1 = find("enroll", "a1");
    assert!(
        e1["actor"].as_str().is_some_and(|a| a.starts_with("cli:")),
        "{e1}"
    );
    assert_eq!(e1["detail"]["department"], "210102001");
    assert!(e1["detail"]["serial"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(find("enroll", "a2")["detail"]["department"], "210103002");
    assert_eq!(
        find("revoke", "a1")["detail"]["serials"],
        serde_json::json!([serial])
    );
    ok(&ex, &["audit", "--verify"]);
}
