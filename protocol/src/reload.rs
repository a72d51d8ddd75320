//! What a configuration reload changes among named sections (the agent's
//! streams, the exchange's deliveries), said the same way by both daemons in
//! their logs and their `reload` commands' answers.

use std::collections::BTreeMap;

/// Compares `old` and `new`, each a section's name and a rendering of its
/// settings, and says what was added, removed and changed, e.g.
/// `"added c; removed b; changed a"` (`what` prefixes each: `"delivery "`
/// gives `"delivery added: x"`). Empty when nothing differs.
pub fn named_changes(
    what: &str,
    old: impl IntoIterator<Item = (String, String)>,
    new: impl IntoIterator<Item = (String, String)>,
) -> Vec<String> {
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) =
        (old.into_iter().collect(), new.into_iter().collect());
    let list = |verb: &str, names: Vec<&String>| {
        (!names.is_empty()).then(|| {
            let names: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
            let sep = if what.is_empty() { " " } else { ": " };
            format!("{what}{verb}{sep}{}", names.join(", "))
        })
    };
    [
        list("added", b.keys().filter(|n| !a.contains_key(*n)).collect()),
        list(
            "removed",
            a.keys().filter(|n| !b.contains_key(*n)).collect(),
        ),
        list(
            "changed",
            b.iter()
                .filter(|(n, v)| a.get(*n).is_some_and(|o| o != *v))
                .map(|(n, _)| n)
                .collect(),
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn says_what_was_added_removed_and_changed() {
        let old = pairs(&[("a", "1"), ("b", "1"), ("d", "1")]);
        let new = pairs(&[("a", "2"), ("c", "1"), ("d", "1")]);
        assert_eq!(
            named_changes("", old.clone(), new.clone()),
            ["added c", "removed b", "changed a"]
        );
        assert_eq!(
            named_changes("delivery ", old.clone(), new),
            [
                "delivery added: c",
                "delivery removed: b",
                "delivery changed: a"
            ]
        );
        assert!(named_changes("", old.clone(), old).is_empty());
    }
}
