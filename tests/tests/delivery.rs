//! Deliveries: stored records fed on exactly once, through crashes, with the
//! sharing class enforced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";

/// Every regular file under `dir` (relative path → SHA-256), hidden ones aside.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, sha256_file(&p));
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
    // Every third delivered chunk crashes the exchange between its files and
    // its checkpoint.
    ex.set_env(
        "FERRY_FAILPOINTS",
        Some("delivery-after-write-before-checkpoint=33%return(crash)"),
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
        let sub = format!("sub{}", i % 3);
        std::fs::create_dir_all(public.join(&sub)).unwrap();
        write_atomic(&public.join(&sub), &name, &data);
        want.insert(format!("{AGENT}/public/{sub}/{name}"), sha256_hex(&data));
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
            ex.start();
        }
        let got = tree(&out);
        (got == want).then_some(got)
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
    let hidden: Vec<_> = tree(&out.join(AGENT))
        .into_keys()
        .filter(|k| k.contains(".ferry-tmp"))
        .collect();
    assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
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
