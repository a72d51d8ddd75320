//! Names on the server: one subject token per agent or stream name, the subjects
//! of the record log and the keys of the buckets.
//!
//! Agent and stream names may hold `.` (NATS's token separator) and `_`; a name
//! becomes one token by keeping ASCII letters, digits and `-` and writing every
//! other byte as `_` and two uppercase hex digits (`a.b_c` is `a_2Eb_5Fc`). The
//! encoding is a bijection, so [`decode`] gives the name back for `streams()`.

/// One subject token (and key-value key token) standing for `name`.
pub(super) fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// The name a token of [`encode`] stands for (`None` if it is not one).
pub(super) fn decode(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'_' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// What the backend calls things on the server, all derived from the stream name.
#[derive(Debug, Clone)]
pub(super) struct Names {
    /// The JetStream stream holding every record message.
    pub stream: String,
}

impl Names {
    pub fn new(stream: &str) -> Self {
        Self {
            stream: stream.to_string(),
        }
    }

    /// `STREAM.rec.` — every record subject starts with it.
    fn record_prefix(&self) -> String {
        format!("{}.rec.", self.stream)
    }

    /// The subjects the stream takes: `STREAM.rec.>`.
    pub fn record_filter(&self) -> String {
        format!("{}>", self.record_prefix())
    }

    /// The subject of one (agent, stream): `STREAM.rec.AGENT.STREAM`.
    pub fn subject(&self, agent: &str, stream: &str) -> String {
        format!(
            "{}{}.{}",
            self.record_prefix(),
            encode(agent),
            encode(stream)
        )
    }

    /// The (agent, stream) of a record subject.
    pub fn parse_subject(&self, subject: &str) -> Option<(String, String)> {
        let rest = subject.strip_prefix(&self.record_prefix())?;
        let (a, s) = rest.split_once('.')?;
        Some((decode(a)?, decode(s)?))
    }

    /// The stream of the audit log: `STREAM_audit`.
    pub fn audit_stream(&self) -> String {
        format!("{}_audit", self.stream)
    }

    /// The one subject of the audit log: `STREAM.audit`.
    pub fn audit_subject(&self) -> String {
        format!("{}.audit", self.stream)
    }

    /// A key-value bucket: `STREAM_what`.
    pub fn bucket(&self, what: &str) -> String {
        format!("{}_{what}", self.stream)
    }
}

/// Key of what belongs to one (agent, stream): `AGENT.STREAM`.
pub(super) fn stream_key(agent: &str, stream: &str) -> String {
    format!("{}.{}", encode(agent), encode(stream))
}

/// The (agent, stream) of a [`stream_key`].
pub(super) fn parse_stream_key(key: &str) -> Option<(String, String)> {
    let (a, s) = key.split_once('.')?;
    if s.contains('.') {
        return None;
    }
    Some((decode(a)?, decode(s)?))
}

/// Key of one received file: `AGENT.STREAM.FILE_ID` (file ids are letters,
/// digits, `-` and `_`, so they are encoded like names).
pub(super) fn file_key(agent: &str, stream: &str, file_id: &str) -> String {
    format!("{}.{}", stream_key(agent, stream), encode(file_id))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_become_one_token_and_come_back() {
        for name in ["a1", "210100-MZ.x_y", "", "a.b.c", "_", "é", "a_2E"] {
            let t = encode(name);
            assert!(!t.contains('.'), "{t}");
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(decode(&t).as_deref(), Some(name));
        }
        let n = Names::new("FERRY");
        let subject = n.subject("agent.1", "s_2");
        assert_eq!(subject, "FERRY.rec.agent_2E1.s_5F2");
        assert_eq!(
            n.parse_subject(&subject),
            Some(("agent.1".into(), "s_2".into()))
        );
        assert_eq!(
            parse_stream_key(&stream_key("a.b", "c")),
            Some(("a.b".into(), "c".into()))
        );
        assert_eq!(decode("a_2"), None);
        assert_eq!(decode("a.b"), None);
    }
}
