//! MariaDB's own binlog events, which `mysql_common` does not decode, and the
//! GTID state a resumed stream starts from.
//!
//! * GTID (0xA2), the start of every transaction: `seq_no` u64 LE, `domain_id`
//!   u32 LE, `flags2` u8 (bit 0 `FL_STANDALONE`: a statement with no `BEGIN`,
//!   such as DDL, whose one query event ends it); the server id is the event
//!   header's.
//! * GTID_LIST (0xA3) and BINLOG_CHECKPOINT (0xA1): bookkeeping, only their
//!   position matters.

use std::collections::BTreeMap;

pub(crate) const MARIADB_GTID: u8 = 0xA2;

/// One MariaDB GTID, `domain-server-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl std::fmt::Display for Gtid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

impl Gtid {
    fn parse(s: &str) -> Option<Gtid> {
        let mut it = s.trim().splitn(3, '-');
        Some(Gtid {
            domain: it.next()?.parse().ok()?,
            server: it.next()?.parse().ok()?,
            seq: it.next()?.parse().ok()?,
        })
    }
}

/// A MariaDB GTID event's body: the GTID and whether it stands alone.
pub(crate) fn parse_gtid_event(body: &[u8], server_id: u32) -> Option<(Gtid, bool)> {
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let flags2 = *body.get(12)?;
    Some((
        Gtid {
            domain,
            server: server_id,
            seq,
        },
        flags2 & 1 != 0,
    ))
}

/// The GTID state: the last GTID per replication domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GtidState(BTreeMap<u32, Gtid>);

impl GtidState {
    /// `0-1-13,1-2-5` (MariaDB's `@@gtid_binlog_pos` form); errors name the text.
    pub(crate) fn parse(s: &str) -> Result<GtidState, String> {
        let mut m = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let g = Gtid::parse(part)
                .ok_or_else(|| format!("{part:?} is not a MariaDB GTID (domain-server-seq)"))?;
            m.insert(g.domain, g);
        }
        Ok(GtidState(m))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn advance(&mut self, g: Gtid) {
        self.0.insert(g.domain, g);
    }
}

impl std::fmt::Display for GtidState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, g) in self.0.values().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{g}")?;
        }
        Ok(())
    }
}

/// A MySQL GTID `uuid:gno`.
pub(crate) fn mysql_gtid(sid: [u8; 16], gno: u64) -> String {
    let h = hex::encode(sid);
    format!(
        "{}-{}-{}-{}-{}:{gno}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn gtid_events_and_states() {
        let mut body = 14u64.to_le_bytes().to_vec();
        body.extend(0u32.to_le_bytes());
        body.push(1);
        let (g, standalone) = parse_gtid_event(&body, 1).unwrap();
        assert_eq!((g.to_string(), standalone), ("0-1-14".to_string(), true));
        assert!(parse_gtid_event(&body[..12], 1).is_none());

        let mut s = GtidState::parse("1-2-5, 0-1-13").unwrap();
        assert_eq!(s.to_string(), "0-1-13,1-2-5");
        s.advance(g);
        assert_eq!(s.to_string(), "0-1-14,1-2-5");
        assert!(GtidState::parse("").unwrap().is_empty());
        assert!(GtidState::parse("0-1").is_err());
        assert_eq!(
            mysql_gtid([0x3e; 16], 7),
            "3e3e3e3e-3e3e-3e3e-3e3e-3e3e3e3e3e3e:7"
        );
    }
}
