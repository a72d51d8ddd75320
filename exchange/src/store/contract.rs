#![allow(clippy::unwrap_used)]

use ferry_protocol::batch::encode_records;
use ferry_protocol::messages::{record::Body, Record, RecordList};

use std::path::Path;

use ferry_protocol::messages::{FileChunk, FileEnd, Lost, StreamDecl};
use ferry_protocol::session::StreamPlan;
use sha2::{Digest, Sha256};

use super::*;

/// Opens (or reopens) a backend over `dir`.
type Open = fn(&Path) -> SharedStore;
/// A second handle on the store `open` made over `dir`, as another exchange
/// node would hold it where the backend has nodes (else the same handle).
type Another = fn(&Path, &SharedStore) -> SharedStore;

/// Runs every contract test against one backend.
macro_rules! contract {
    ($backend:ident, $open:expr, $another:expr) => {
        mod $backend {
            const OPEN: super::Open = $open;
            const ANOTHER: super::Another = $another;
            #[test]
            fn users_are_kept_listed_changed_and_removed() {
                super::users_are_kept_listed_changed_and_removed(OPEN)
            }
            #[test]
            fn five_failed_logins_lock_an_account_until_passwd() {
                super::five_failed_logins_lock_an_account_until_passwd(OPEN)
            }
            #[test]
            fn concurrent_audit_appends_make_one_unbroken_chain() {
                super::concurrent_audit_appends_make_one_unbroken_chain(OPEN, ANOTHER)
            }
            #[test]
            fn a_changed_audit_entry_breaks_the_chain_at_its_seq() {
                super::a_changed_audit_entry_breaks_the_chain_at_its_seq(OPEN)
            }
            #[test]
            fn batches_read_back_in_order_and_resends_are_duplicates() {
                super::batches_read_back_in_order_and_resends_are_duplicates(OPEN)
            }
            #[test]
            fn a_refused_batch_refuses_its_streams_later_batches_and_leaves_no_gap() {
                super::a_refused_batch_refuses_its_streams_later_batches_and_leaves_no_gap(OPEN)
            }
            #[test]
            fn a_declared_loss_is_the_only_way_past_a_missing_seq() {
                super::a_declared_loss_is_the_only_way_past_a_missing_seq(OPEN)
            }
            #[test]
            fn a_new_incarnation_is_held_until_an_operator_decides() {
                super::a_new_incarnation_is_held_until_an_operator_decides(OPEN)
            }
            #[test]
            fn streams_list_what_is_stored_with_their_declared_class() {
                super::streams_list_what_is_stored_with_their_declared_class(OPEN)
            }
            #[test]
            fn subscribers_wake_after_a_durable_commit() {
                super::subscribers_wake_after_a_durable_commit(OPEN)
            }
            #[test]
            fn a_received_file_reads_back_whole_and_resends_store_nothing_twice() {
                super::a_received_file_reads_back_whole_and_resends_store_nothing_twice(OPEN)
            }
            #[test]
            fn the_registry_keeps_the_last_record_of_each_agent() {
                super::the_registry_keeps_the_last_record_of_each_agent(OPEN)
            }
        }
    };
}

contract!(
    embedded,
    super::open_embedded,
    // One process holds the store: its threads share the handle.
    |_, store| store.clone()
);
// A nats-server of its own per test (started at the first open of a directory);
// another open is another node on that server.
contract!(
    jetstream,
    crate::store::jetstream::tests::open_for,
    |dir, _| crate::store::jetstream::tests::open_for(dir)
);

/// Opens the embedded store over `dir`.
fn open_embedded(dir: &Path) -> SharedStore {
    match Embedded::open(dir, 1 << 20) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => panic!("opening the embedded store: {e}"),
    }
}

/// Lines that do not compress, so the batch entry is far over `INLINE_MAX`.
fn noisy_lines(first: u64, n: u64) -> Vec<Vec<u8>> {
    (first..first + n)
        .map(|i| {
            let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..120)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b'!' + (x % 90) as u8
                })
                .collect()
        })
        .collect()
}

fn batch(stream: &str, first: u64, lines: &[Vec<u8>]) -> Incoming {
    let e = encode_records(&RecordList {
        records: lines
            .iter()
            .map(|l| Record {
                time_unix_ms: 1,
                position: String::new(),
                body: Some(Body::Line(l.clone())),
            })
            .collect(),
    })
    .unwrap();
    Incoming {
        agent: "a1".into(),
        item: Item::Batch(e.into_batch(stream.into(), first)),
    }
}

fn stored_lines(store: &dyn Backend, stream: &str) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    store
        .records("a1", stream, 1, &mut |r, _| {
            if let Some(Body::Line(l)) = r.record.body {
                out.push((r.seq, l));
            }
            true
        })
        .unwrap();
    out
}

/// Batches large and small read back in seq order after a reopen; a resend of
/// what is stored is acked as a duplicate and not stored again.
pub(super) fn batches_read_back_in_order_and_resends_are_duplicates(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let big1 = noisy_lines(1, 2000);
    let small = noisy_lines(2001, 3);
    let big2 = noisy_lines(2004, 2000);
    {
        let store = open(dir.path());
        let acks = store.commit_group(&[
            batch("s", 1, &big1),
            batch("s", 2001, &small),
            batch("t", 1, &small),
        ]);
        assert_eq!(
            acks.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            vec![2000, 2003, 3]
        );
        // A resend of what is stored is a duplicate, acked and not stored again.
        let acks = store.commit_group(&[batch("s", 1, &big1), batch("s", 2004, &big2)]);
        assert_eq!(
            acks.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            vec![2003, 4003]
        );
    }
    let store = open(dir.path());
    let want: Vec<(u64, Vec<u8>)> = big1
        .iter()
        .chain(&small)
        .chain(&big2)
        .cloned()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l))
        .collect();
    assert_eq!(stored_lines(&*store, "s"), want);
    assert_eq!(stored_lines(&*store, "t").len(), 3);
    assert_eq!(store.next_expected("a1", "s").unwrap(), 4004);
}

fn lost(stream: &str, from: u64, to: u64) -> Incoming {
    Incoming {
        agent: "a1".into(),
        item: Item::Lost(Lost {
            stream: stream.into(),
            from_seq: from,
            to_seq: to,
            reason: "damaged".into(),
        }),
    }
}

/// A batch the store refuses is not a gap: the later batches of its stream in the
/// same group are refused too (the agent resends from the next seq), other
/// streams go on, and no gap is recorded.
pub(super) fn a_refused_batch_refuses_its_streams_later_batches_and_leaves_no_gap(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let lines = noisy_lines(1, 3);
    let mut bad = batch("s", 4, &lines);
    if let Item::Batch(b) = &mut bad.item {
        b.record_count = 5; // does not match its payload: refused by the check
    }
    let results = store.commit_group(&[
        batch("s", 1, &lines),
        bad,
        batch("s", 7, &lines),
        batch("t", 1, &lines),
    ]);
    assert_eq!(results[0].as_ref().unwrap(), &3);
    assert!(
        matches!(results[1], Err(StoreError::Invalid(_))),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(StoreError::Resend(_))),
        "{:?}",
        results[2]
    );
    assert_eq!(results[3].as_ref().unwrap(), &3);
    assert_eq!(store.next_expected("a1", "s").unwrap(), 4);
    assert!(store.gaps("a1", "s").unwrap().is_empty());
    // Alone in a later group, a batch past the missing seq is refused as well.
    let results = store.commit_group(&[batch("s", 7, &lines)]);
    assert!(matches!(results[0], Err(StoreError::Resend(_))));
    // The resend continues the stream.
    let results = store.commit_group(&[batch("s", 4, &lines), batch("s", 7, &lines)]);
    assert_eq!(
        results.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        vec![6, 9]
    );
    assert_eq!(stored_lines(&*store, "s").len(), 9);
}

/// Only a declared loss moves a stream past seqs that never arrived; it is
/// recorded as a gap with its reason, acknowledged, and idempotent.
pub(super) fn a_declared_loss_is_the_only_way_past_a_missing_seq(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let lines = noisy_lines(1, 3);
    let results = store.commit_group(&[
        batch("s", 1, &lines),
        lost("s", 4, 10),
        batch("s", 11, &lines),
        lost("s", 4, 10),
    ]);
    assert_eq!(
        results.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        vec![3, 10, 13, 13]
    );
    let gaps = store.gaps("a1", "s").unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        (gaps[0].from, gaps[0].to, gaps[0].reason.as_str()),
        (4, 10, "damaged")
    );
    // A declaration past the next seq is refused, not recorded.
    let results = store.commit_group(&[lost("s", 20, 30)]);
    assert!(matches!(results[0], Err(StoreError::Resend(_))));
    assert_eq!(store.gaps("a1", "s").unwrap().len(), 1);
}

fn decl(incarnation: &str, head: u64, acked: u64) -> StreamDecl {
    StreamDecl {
        name: "s".into(),
        incarnation: incarnation.into(),
        head_seq: head,
        acked_seq: acked,
        ..Default::default()
    }
}

/// A wiped buffer (new incarnation) is held durably, across a restart of the
/// exchange and a reconnect; refusing keeps it held; accepting continues the
/// stream after a recorded boundary, the new buffer's seq 1 stored as the
/// exchange's next.
pub(super) fn a_new_incarnation_is_held_until_an_operator_decides(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let lines = noisy_lines(1, 3);
    {
        let store = open(dir.path());
        let p = store.plan_stream("a1", &decl("old", 0, 0)).unwrap();
        assert_eq!((p.next_seq, p.held.is_none()), (1, true));
        store.commit_group(&[batch("s", 1, &lines), batch("s", 4, &lines)]);
        let p = store.plan_stream("a1", &decl("new", 150, 0)).unwrap();
        assert!(p.held.as_deref().unwrap().contains("new buffer"), "{p:?}");
    }
    let store = open(dir.path());
    // Sticky: the old buffer coming back does not lift it either.
    let p = store.plan_stream("a1", &decl("old", 6, 6)).unwrap();
    assert!(p.held.is_some());
    assert_eq!(store.holds().unwrap().len(), 1);
    store
        .resolve("a1", "s", &Decision::Refuse("not ours".into()))
        .unwrap();
    let p = store.plan_stream("a1", &decl("new", 150, 0)).unwrap();
    assert!(p.held.as_deref().unwrap().contains("not ours"), "{p:?}");
    let meta = store.resolve("a1", "s", &Decision::Accept).unwrap();
    assert_eq!((meta.offset, meta.boundaries[0].from_seq), (6, 7));
    let p = store.plan_stream("a1", &decl("new", 150, 0)).unwrap();
    assert_eq!(
        p,
        StreamPlan {
            next_seq: 7,
            offset: 6,
            held: None
        }
    );
    assert!(store.holds().unwrap().is_empty());
    // Deciding on a stream that is not held is an error.
    assert!(store.resolve("a1", "s", &Decision::Accept).is_err());
}

fn decl_class(catalog: &str, sharing: Sharing) -> StreamDecl {
    StreamDecl {
        catalog_id: catalog.into(),
        sharing: sharing as i32,
        ..decl("i1", 0, 0)
    }
}

/// Every stream with something stored is listed with its next seq; a change of
/// catalogue id or sharing class applies from the next seq stored, and the
/// earlier records keep the class they were stored under.
pub(super) fn streams_list_what_is_stored_with_their_declared_class(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let lines = noisy_lines(1, 3);
    {
        let store = open(dir.path());
        store
            .plan_stream("a1", &decl_class("c-1", Sharing::Conditional))
            .unwrap();
        store.commit_group(&[batch("s", 1, &lines)]);
        store
            .plan_stream("a1", &decl_class("c-1", Sharing::Unconditional))
            .unwrap();
        store.commit_group(&[batch("s", 4, &lines)]);
        // The same declaration again records nothing new.
        store
            .plan_stream("a1", &decl_class("c-1", Sharing::Unconditional))
            .unwrap();
    }
    let store = open(dir.path());
    let streams = store.streams().unwrap();
    assert_eq!(streams.len(), 1, "{streams:?}");
    let s = &streams[0];
    assert_eq!(
        (s.agent.as_str(), s.stream.as_str(), s.next_seq),
        ("a1", "s", 7)
    );
    assert_eq!(s.meta.classes.len(), 2, "{:?}", s.meta.classes);
    assert_eq!(s.meta.class_at(3).unwrap().sharing, "conditional");
    assert_eq!(s.meta.class_at(4).unwrap().sharing, "unconditional");
    assert_eq!(s.meta.class_at(4).unwrap().catalog_id, "c-1");
    assert!(s.meta.class_at(0).is_none());
}

/// A subscriber sees a change only once a commit stored something durable.
pub(super) fn subscribers_wake_after_a_durable_commit(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut rx = store.subscribe();
    rx.borrow_and_update();
    assert!(!rx.has_changed().unwrap());
    store.commit_group(&[batch("s", 1, &noisy_lines(1, 2))]);
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    let mut seen = Vec::new();
    store
        .records("a1", "s", 2, &mut |r, _| {
            seen.push(r.seq);
            true
        })
        .unwrap();
    assert_eq!(seen, vec![2]);
}

fn chunk(id: &str, offset: u64, data: &[u8], end: Option<&[u8]>) -> Record {
    Record {
        time_unix_ms: 1,
        position: String::new(),
        body: Some(Body::FileChunk(FileChunk {
            file_id: id.into(),
            path: format!("in/{id}.csv"),
            offset,
            data: data.to_vec(),
            end: end.map(|whole| FileEnd {
                size: whole.len() as u64,
                sha256: Sha256::digest(whole).to_vec(),
            }),
        })),
    }
}

fn records_batch(stream: &str, first: u64, records: Vec<Record>) -> Incoming {
    let e = encode_records(&RecordList { records }).unwrap();
    Incoming {
        agent: "a1".into(),
        item: Item::Batch(e.into_batch(stream.into(), first)),
    }
}

/// A file sent in chunks across groups reads back whole once complete; a file
/// whose bytes do not match its digest is named as rejected; resending the
/// chunks stores nothing twice.
pub(super) fn a_received_file_reads_back_whole_and_resends_store_nothing_twice(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let whole: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (a, b) = whole.split_at(100_000);
    let first = records_batch("d", 1, vec![chunk("f1", 0, a, None)]);
    let rest = records_batch("d", 2, vec![chunk("f1", 100_000, b, Some(&whole))]);
    assert_eq!(
        *store
            .commit_group(&[first])
            .first()
            .unwrap()
            .as_ref()
            .unwrap(),
        1
    );
    assert_eq!(
        *store
            .commit_group(&[rest])
            .first()
            .unwrap()
            .as_ref()
            .unwrap(),
        2
    );
    let again = records_batch("d", 2, vec![chunk("f1", 100_000, b, Some(&whole))]);
    assert_eq!(
        *store
            .commit_group(&[again])
            .first()
            .unwrap()
            .as_ref()
            .unwrap(),
        2
    );
    let f = store.file("a1", "d", "f1").unwrap().unwrap();
    assert_eq!((f.status.as_str(), f.size, f.seq), ("complete", 300_000, 2));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut store.open_file("a1", "d", "f1").unwrap(), &mut got).unwrap();
    assert!(got == whole, "the file read back differs");
    assert_eq!(store.files("a1", "d").unwrap().len(), 1);
    // Bytes that do not hash to the declared digest.
    let mut wrong = whole.clone();
    wrong[5] ^= 1;
    let bad = records_batch("d", 3, vec![chunk("f2", 0, &wrong, Some(&whole))]);
    assert_eq!(
        *store
            .commit_group(&[bad])
            .first()
            .unwrap()
            .as_ref()
            .unwrap(),
        3
    );
    assert_eq!(store.rejected_files("a1", "d", 1, 3).unwrap(), vec!["f2"]);
    assert_eq!(
        store.file("a1", "d", "f2").unwrap().unwrap().status,
        "sha256-mismatch"
    );
}

pub(super) fn the_registry_keeps_the_last_record_of_each_agent(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for (id, seen) in [("a1", 1), ("a2", 2), ("a1", 3)] {
        store
            .put_agent(&AgentRecord {
                agent_id: id.into(),
                department: "210100-MZ".into(),
                last_seen_unix_ms: seen,
                ..Default::default()
            })
            .unwrap();
    }
    let mut agents = store.agents().unwrap();
    agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    assert_eq!(
        agents
            .iter()
            .map(|a| (a.agent_id.as_str(), a.last_seen_unix_ms))
            .collect::<Vec<_>>(),
        vec![("a1", 3), ("a2", 2)]
    );
    assert_eq!(store.agent("a2").unwrap().unwrap().department, "210100-MZ");
    assert!(store.agent("a3").unwrap().is_none());
}

fn user(name: &str, role: crate::users::Role, password: &str) -> User {
    User::new(
        name,
        role,
        crate::users::Credential::Password(crate::users::hash_password(password).unwrap()),
        now_unix_ms(),
    )
    .unwrap()
}

/// Users are kept across a reopen, listed, changed in place and removed;
/// removing one that is not there says so.
pub(super) fn users_are_kept_listed_changed_and_removed(open: Open) {
    use crate::users::Role;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        assert!(store.users().unwrap().is_empty());
        store
            .put_user(&user("li.wei", Role::Admin, "password-1"))
            .unwrap();
        store
            .put_user(&user("wang_fang-2", Role::Auditor, "password-2"))
            .unwrap();
    }
    let store = open(dir.path());
    let mut names: Vec<String> = store.users().unwrap().into_iter().map(|u| u.name).collect();
    names.sort();
    assert_eq!(names, vec!["li.wei", "wang_fang-2"]);
    let mut u = store.user("wang_fang-2").unwrap().unwrap();
    assert_eq!((u.role, u.language.as_str()), (Role::Auditor, "zh"));
    assert!(crate::users::verify_password(
        &u.password_hash,
        "password-2"
    ));
    u.role = Role::Operator;
    u.language = "en".into();
    store.put_user(&u).unwrap();
    assert_eq!(store.user("wang_fang-2").unwrap().unwrap(), u);
    assert!(store.remove_user("li.wei").unwrap());
    assert!(!store.remove_user("li.wei").unwrap());
    assert!(store.user("li.wei").unwrap().is_none());
    assert_eq!(store.users().unwrap().len(), 1);
}

/// Five wrong passwords in a row lock the account for 15 minutes (even the
/// right password is refused then); every attempt is audited; a new password
/// (`user passwd`) unlocks it; a success resets the count.
pub(super) fn five_failed_logins_lock_an_account_until_passwd(open: Open) {
    use crate::users::{login, set_password, LoginError, Role, LOCKOUT_MS};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .put_user(&user("zhao", Role::Operator, "right-password"))
        .unwrap();
    let t = 1_000_000;
    assert!(matches!(
        login(&*store, "nobody", "right-password", t),
        Err(LoginError::Unknown)
    ));
    // Four failures, then a success: the count starts again.
    for _ in 0..4 {
        assert!(matches!(
            login(&*store, "zhao", "wrong", t),
            Err(LoginError::WrongPassword)
        ));
    }
    assert_eq!(store.user("zhao").unwrap().unwrap().failed_logins, 4);
    login(&*store, "zhao", "right-password", t).unwrap();
    assert_eq!(store.user("zhao").unwrap().unwrap().failed_logins, 0);
    // Five in a row lock it.
    for _ in 0..5 {
        assert!(matches!(
            login(&*store, "zhao", "wrong", t),
            Err(LoginError::WrongPassword)
        ));
    }
    let until = t + LOCKOUT_MS;
    assert_eq!(
        store.user("zhao").unwrap().unwrap().locked_until_unix_ms,
        until
    );
    match login(&*store, "zhao", "right-password", t + 60_000) {
        Err(LoginError::Locked { until_ms }) => assert_eq!(until_ms, until),
        other => panic!("{other:?}"),
    }
    // The lock runs out by itself...
    login(&*store, "zhao", "right-password", until).unwrap();
    for _ in 0..5 {
        let _ = login(&*store, "zhao", "wrong", until);
    }
    assert!(matches!(
        login(&*store, "zhao", "right-password", until + 1),
        Err(LoginError::Locked { .. })
    ));
    // ...or a new password lifts it.
    assert!(set_password(
        &*store,
        "zhao",
        crate::users::hash_password("new-password").unwrap()
    )
    .unwrap());
    let u = login(&*store, "zhao", "new-password", until + 2).unwrap();
    assert_eq!((u.failed_logins, u.locked_until_unix_ms), (0, 0));
    assert!(!set_password(&*store, "nobody", String::new()).unwrap());
    // Every attempt is in the audit log.
    let log = crate::audit::read_all(&*store, 1).unwrap();
    let count = |action: &str| log.iter().filter(|e| e.action == action).count();
    assert_eq!(
        (count("login"), count("login_failed"), count("login_locked")),
        (3, 15, 2)
    );
    assert_eq!(log[0].actor, "web:nobody");
    crate::audit::verify_chain(&log).unwrap();
}

/// Appenders on several threads, half of them through a second handle (a
/// second node where the backend has nodes), take seqs 1..=N once each and
/// leave one unbroken chain.
pub(super) fn concurrent_audit_appends_make_one_unbroken_chain(open: Open, another: Another) {
    const THREADS: usize = 6;
    const EACH: usize = 15;
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let second = another(dir.path(), &first);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = if t % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            s.spawn(move || {
                for i in 0..EACH {
                    store
                        .append_audit(
                            &format!("cli:t{t}"),
                            "user_add",
                            &format!("u{t}-{i}"),
                            serde_json::json!({"i": i}),
                        )
                        .unwrap();
                }
            });
        }
    });
    let n = (THREADS * EACH) as u64;
    for store in [&first, &second] {
        let log = crate::audit::read_all(&**store, 1).unwrap();
        assert_eq!(
            log.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>()
        );
        crate::audit::verify_chain(&log).unwrap();
        let mut targets: Vec<&str> = log.iter().map(|e| e.target.as_str()).collect();
        targets.sort();
        targets.dedup();
        assert_eq!(
            targets.len() as u64,
            n,
            "an append was stored twice or lost"
        );
    }
    // Paging: a window from the middle.
    let page = first.audit(11, 5).unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![11, 12, 13, 14, 15]
    );
    assert!(first.audit(n + 1, 5).unwrap().is_empty());
    // The next append continues the chain, from either handle.
    let e = second
        .append_audit("cli:root", "revoke", "a1", serde_json::json!({}))
        .unwrap();
    assert_eq!(e.seq, n + 1);
    assert_eq!(e.prev_hash, first.audit(n, 1).unwrap()[0].hash);
}

/// What the store gives back verifies; an entry changed after the fact (here
/// in what was read) breaks the chain at its seq or the next.
pub(super) fn a_changed_audit_entry_breaks_the_chain_at_its_seq(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for i in 0..5 {
            store
                .append_audit(
                    "cli:root",
                    "user_add",
                    &format!("u{i}"),
                    serde_json::json!({"role": "admin"}),
                )
                .unwrap();
        }
    }
    let store = open(dir.path());
    let log = crate::audit::read_all(&*store, 1).unwrap();
    assert_eq!(log.len(), 5);
    crate::audit::verify_chain(&log).unwrap();
    let mut changed = log.clone();
    changed[2].detail = serde_json::json!({"role": "auditor"});
    assert!(crate::audit::verify_chain(&changed)
        .unwrap_err()
        .starts_with("seq 3:"));
    changed[2].hash = changed[2].computed_hash();
    assert!(crate::audit::verify_chain(&changed)
        .unwrap_err()
        .starts_with("seq 4:"));
}
