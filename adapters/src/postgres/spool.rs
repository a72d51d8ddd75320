//! Transactions received while still in progress (pgoutput v2 streaming), kept
//! in an unnamed temporary file until they commit or abort.
//!
//! Nothing here needs to survive a crash: the slot is never confirmed past the
//! commit of a transaction that is not durable in the buffer, so after a restart
//! the server streams every unfinished transaction again from its start. The file
//! is unnamed (`O_TMPFILE` where the filesystem has it), so a crash leaves nothing
//! behind.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use ferry_protocol::messages::Record;
use prost::Message;

/// One in-progress transaction's records, in the order they were received.
pub(crate) struct Spool {
    file: BufWriter<File>,
    pub records: u64,
    /// Fingerprints of the table shapes spooled so far, by `schema.table`.
    pub schemas: std::collections::HashMap<String, String>,
    /// Relation of the last change spooled, whose shape is known to precede it.
    pub checked: Option<u32>,
}

impl Spool {
    pub(crate) fn create(dir: &Path) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        Ok(Spool {
            file: BufWriter::with_capacity(256 << 10, tempfile::tempfile_in(dir)?),
            records: 0,
            schemas: Default::default(),
            checked: None,
        })
    }

    pub(crate) fn push(&mut self, r: &Record) -> std::io::Result<()> {
        let len = r.encoded_len();
        let mut buf = Vec::with_capacity(len + 4);
        buf.extend_from_slice(&(len as u32).to_le_bytes());
        // Encoding into a Vec with enough capacity cannot fail.
        let _ = r.encode(&mut buf);
        self.file.write_all(&buf)?;
        self.records += 1;
        Ok(())
    }

    /// Reads the records back, from the first.
    pub(crate) fn replay(self) -> std::io::Result<Replay> {
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Replay {
            file: BufReader::with_capacity(256 << 10, file),
            left: self.records,
        })
    }
}

pub(crate) struct Replay {
    file: BufReader<File>,
    left: u64,
}

impl Replay {
    pub(crate) fn next_record(&mut self) -> std::io::Result<Option<Record>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len)?;
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        self.file.read_exact(&mut buf)?;
        Record::decode(buf.as_slice())
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::messages::record::Body;

    #[test]
    fn records_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::create(&dir.path().join("spool")).unwrap();
        for i in 0..1000u64 {
            s.push(&Record {
                time_unix_ms: i,
                position: format!("p{i}"),
                body: Some(Body::Line(vec![b'x'; (i % 300) as usize])),
            })
            .unwrap();
        }
        assert_eq!(s.records, 1000);
        let mut r = s.replay().unwrap();
        for i in 0..1000u64 {
            let rec = r.next_record().unwrap().unwrap();
            assert_eq!(rec.time_unix_ms, i);
            assert_eq!(rec.position, format!("p{i}"));
        }
        assert!(r.next_record().unwrap().is_none());
        // Unnamed: nothing is left in the directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
            0
        );
    }
}
