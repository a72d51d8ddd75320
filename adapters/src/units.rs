//! Human units in configuration: sizes (`"512MiB"`, `"2GiB"`, `"4096"`) and
//! durations (`"30s"`, `"250ms"`, `"1h"`).

use serde::{Deserialize, Deserializer};

/// A byte size written in human units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// A duration written in human units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

/// Parses `"2GiB"`, `"512 MiB"`, `"10MB"`, `"4096"` with `bytesize`: binary
/// (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) suffixes, any case; a
/// bare number is bytes. A whole number times its unit is exact; a size past
/// what 64 bits hold is refused, not capped.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let size: bytesize::ByteSize = t.parse().map_err(|_| {
        let unit = t
            .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
            .trim();
        let known = format!("1{unit}").parse::<bytesize::ByteSize>().is_ok();
        if unit.len() < t.len() && !known {
            format!(
                "invalid size {s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )
        } else {
            format!("invalid size {s:?}: expected a number followed by a unit, e.g. \"512MiB\"")
        }
    })?;
    // bytesize saturates what does not fit.
    if size.0 == u64::MAX {
        return Err(format!("invalid size {s:?}: out of range"));
    }
    Ok(size.0)
}

/// `n` bytes in binary units (`"512 B"`, `"1.5 KiB"`, `"3.2 GiB"`).
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. \"30s\", \"250ms\", \"5m\")"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as \"512MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Duration)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        let unknown = parse_size("2 parsecs").unwrap_err();
        assert!(unknown.contains("unknown unit \"parsecs\""), "{unknown}");
        for bad in ["GiB", "-1KiB", "1.2.3KiB", ""] {
            let e = parse_size(bad).unwrap_err();
            assert!(
                e.contains("expected a number followed by a unit"),
                "{bad}: {e}"
            );
        }
        assert_eq!(parse_size("16384 TiB"), Ok(16384 << 40));
        assert!(parse_size("16777216 TiB").is_err(), "past u64");
        // Exact where f64 would round: 2^53 + 1 bytes.
        assert_eq!(parse_size("9007199254740993 B"), Ok(9_007_199_254_740_993));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration("5m"),
            Ok(std::time::Duration::from_secs(300))
        );
        assert!(parse_duration("soon").is_err());
    }
}
