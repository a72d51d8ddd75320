#![allow(clippy::unwrap_used)]

use super::*;

fn delivery(streams: &[&str]) -> DeliverySection {
    DeliverySection {
        name: "d".into(),
        kind: DeliveryKind::Files,
        streams: streams.iter().map(|s| s.to_string()).collect(),
        path: Some("/nonexistent".into()),
        dsn: None,
        password_file: None,
        schema: None,
        bookkeeping: "ferry".into(),
    }
}

fn class(sharing: &str) -> ClassChange {
    ClassChange {
        from_seq: 1,
        catalog_id: "c".into(),
        sharing: sharing.into(),
        since_unix_ms: 0,
    }
}

#[test]
fn patterns_parse_agent_and_stream_with_wildcards() {
    assert!(Pattern::parse("a1/s").unwrap().exact());
    assert!(!Pattern::parse("*/s").unwrap().exact());
    assert!(!Pattern::parse("a1/*").unwrap().exact());
    for bad in ["a1", "a1/s/x", "/s", "a1/", "a b/s", "*s/t", "../s"] {
        assert!(Pattern::parse(bad).is_none(), "{bad:?} parsed");
    }
}

/// A wildcard reaches only unconditional records; naming a stream exactly is
/// the approval a conditional one needs; a record stored before any class was
/// recorded counts as conditional.
#[test]
fn wildcards_reach_only_unconditional_records() {
    let sub = Subscription::new(&delivery(&["*/open", "a1/named", "a2/*"]));
    let (u, c) = (class("unconditional"), class("conditional"));
    assert!(sub.admits("a9", "open", Some(&u)));
    assert!(!sub.admits("a9", "open", Some(&c)));
    assert!(!sub.admits("a9", "open", None));
    assert!(sub.admits("a1", "named", Some(&c)));
    assert!(sub.admits("a1", "named", None));
    assert!(!sub.admits("a1", "other", Some(&u)));
    assert!(sub.admits("a2", "x", Some(&u)));
    assert!(!sub.admits("a2", "x", Some(&c)));
    assert!(sub.names("a2", "x") && sub.names("a9", "open") && !sub.names("a9", "x"));
}

/// The class in force for a record is the last one declared at or before its seq.
#[test]
fn a_class_change_applies_from_its_seq_on() {
    let meta = crate::store::StreamMeta {
        classes: vec![
            ClassChange {
                from_seq: 1,
                ..class("conditional")
            },
            ClassChange {
                from_seq: 50,
                ..class("unconditional")
            },
        ],
        ..Default::default()
    };
    let sub = Subscription::new(&delivery(&["*/s"]));
    assert!(!sub.admits("a", "s", meta.class_at(49)));
    assert!(sub.admits("a", "s", meta.class_at(50)));
}
