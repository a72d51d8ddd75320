//! One instance of the source: connect, check, resume, read binlog events into
//! transactions, commit each with the position after it.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::messages::{Record, RowOp};
use ferry_protocol::record_buf::{RecordBuf, RowHead, RowTail, ValueRef};
use futures_util::StreamExt;
use mysql_async::binlog::events::{Event, EventData, RowsEventData, TableMapEvent};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn};

use super::conn::{self, classify, variable};
use super::gtid::{mysql_gtid, parse_gtid_event, Gtid, GtidState, MARIADB_GTID};
use super::image::{bools, is_raw, Rendered};
use super::position::{MyPosition, Partial};
use super::rows::{Layout, Rows};
use super::schema::{self, Shape, MYSQL};
use super::table_map;
use super::{doctor, snapshot, split_table, MysqlConfig, SnapshotMode};
use crate::{now_unix_ms, Inflight, Records, SourceContext, SourceError};

/// A transaction is committed in pieces of at most this many changes...
const MAX_PIECE_ROWS: usize = 10_000;
/// ...or about this many bytes of records.
const MAX_PIECE_BYTES: usize = 4 << 20;
/// The server is asked for a heartbeat every second; this much silence means
/// the connection is gone.
const SILENCE: Duration = Duration::from_secs(30);
/// How often a position moved only by transactions of other tables is committed.
const IDLE_COMMIT: Duration = Duration::from_secs(1);
/// Commits in flight.
const INFLIGHT: usize = 4;

pub(crate) async fn run(cfg: MysqlConfig, ctx: SourceContext) -> Result<(), SourceError> {
    let (opts, dsn) = conn::opts(&cfg)?;
    let mut sql = conn::connect(&opts, &dsn).await?;
    doctor::preflight(&mut sql, &cfg).await?;
    let mariadb = doctor::is_mariadb(&mut sql).await?;
    let checksum = variable(&mut sql, "binlog_checksum")
        .await?
        .is_some_and(|v| !v.eq_ignore_ascii_case("NONE"));
    let resume = match &ctx.resume {
        Some(b) => Some(MyPosition::decode(b).map_err(SourceError::Fatal)?),
        None => None,
    };
    let start = match resume {
        Some(p) if p.snapshot.is_some() => {
            snapshot::run(&cfg, &ctx, &opts, &dsn, mariadb, Some(p)).await?
        }
        Some(p) => p,
        None if cfg.snapshot == SnapshotMode::Initial => {
            snapshot::run(&cfg, &ctx, &opts, &dsn, mariadb, None).await?
        }
        None => {
            let p = current_position(&mut sql, mariadb).await?;
            // Durable at once: a restart before the first change must not
            // start over at a later "current" position.
            ctx.commit(Vec::<Record>::new(), p.encode()?).await?;
            tracing::info!(position = %p.at(), gtid = %p.gtid, "starting at the server's current position");
            p
        }
    };
    let gtid = GtidState::parse(&start.gtid)
        .map_err(|e| SourceError::Fatal(format!("the stored mysql position: {e}")))?;
    still_there(&mut sql, &start).await?;

    let mut binlog = conn::connect(&opts, &dsn).await?;
    let mut setup = vec![
        // Real MariaDB GTID events, not their rewrites for an old replica.
        "SET @mariadb_slave_capability=4".to_string(),
        // A heartbeat every second while idle (nanoseconds).
        "SET @master_heartbeat_period=1000000000".to_string(),
    ];
    let by_gtid = mariadb && !gtid.is_empty();
    if by_gtid {
        setup.push(format!("SET @slave_connect_state='{gtid}'"));
    }
    for s in &setup {
        binlog
            .query_drop(s)
            .await
            .map_err(|e| classify("preparing the binlog connection", e))?;
    }
    let file = start.file.clone().into_bytes();
    let mut req = BinlogStreamRequest::new(cfg.server_id);
    if !by_gtid {
        req = req.with_filename(&file).with_pos(start.pos);
    }
    let stream = binlog
        .get_binlog_stream(req)
        .await
        .map_err(|e| classify(&format!("requesting the binlog from {}", start.at()), e))?;
    tracing::info!(from = %start.at(), gtid = %gtid, by_gtid, "reading the binlog");

    let wanted = cfg.tables.iter().cloned().collect();
    let mut reader = Reader {
        ctx: &ctx,
        opts,
        dsn,
        sql,
        wanted,
        checksum,
        file: start.file.clone(),
        seen_fde: false,
        shipped: start.schemas.clone(),
        resume_partial: start.partial.clone(),
        event_start: 0,
        submitted: start.clone(),
        read: start,
        gtid,
        shapes: HashMap::new(),
        collations: HashMap::new(),
        stale: false,
        layouts: HashMap::new(),
        txn: None,
        inflight: Inflight::new(INFLIGHT),
        before: Rendered::default(),
        after: Rendered::default(),
    };
    reader.run(stream).await
}

/// Refuses a position in a binlog file the server no longer has (purged, or
/// another server): what was between is lost, and reading on from the next
/// file would hide that. The server says so itself when asked for the stream,
/// but not always in words (MariaDB may just close the connection), so the
/// files are looked at first. Without the privilege to list them the server's
/// own answer decides.
async fn still_there(sql: &mut Conn, p: &MyPosition) -> Result<(), SourceError> {
    let files: Vec<mysql_async::Row> = match sql.query("SHOW BINARY LOGS").await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "SHOW BINARY LOGS refused; the binlog request will tell");
            return Ok(());
        }
    };
    let names: Vec<String> = files
        .iter()
        .filter_map(|r| r.get::<Option<String>, _>(0).flatten())
        .collect();
    if names.is_empty() || names.iter().any(|n| n == &p.file) {
        return Ok(());
    }
    Err(SourceError::Fatal(format!(
        "the server no longer has binlog {} that the stored position {} is in (it keeps {} to {}): the changes \
         between that position and the oldest binlog are lost, and the stream does not skip them silently. Choose: \
         copy the tables again (stop the agent, give the stream a new name in agent.toml with snapshot = \"initial\", \
         start it), or accept the gap the same way with snapshot = \"never\"; keep binlogs longer \
         (binlog_expire_logs_seconds) so it does not happen again",
        p.file,
        p.at(),
        names.first().map_or("", String::as_str),
        names.last().map_or("", String::as_str),
    )))
}

/// `SHOW MASTER STATUS` (`SHOW BINARY LOG STATUS` on MySQL 8.4+), with the
/// GTID state of that exact point on MariaDB.
pub(crate) async fn current_position(
    sql: &mut Conn,
    mariadb: bool,
) -> Result<MyPosition, SourceError> {
    let row: Option<mysql_async::Row> = match sql.query_first("SHOW MASTER STATUS").await {
        Ok(r) => r,
        // ER_PARSE_ERROR: a MySQL that only knows the new name.
        Err(mysql_async::Error::Server(s)) if s.code == 1064 => sql
            .query_first("SHOW BINARY LOG STATUS")
            .await
            .map_err(|e| classify("SHOW BINARY LOG STATUS", e))?,
        Err(e) => return Err(classify("SHOW MASTER STATUS", e)),
    };
    let row = row.ok_or_else(|| {
        SourceError::Fatal(
            "SHOW MASTER STATUS returned nothing: the server's binary log is off; start it with log_bin"
                .into(),
        )
    })?;
    let file: Option<String> = row.get(0);
    let pos: Option<u64> = row.get(1);
    let (Some(file), Some(pos)) = (file, pos) else {
        return Err(SourceError::Other(
            "SHOW MASTER STATUS: no file and position".into(),
        ));
    };
    let gtid = if mariadb {
        gtid_at(sql, &file, pos).await?
    } else {
        String::new()
    };
    Ok(MyPosition {
        file,
        pos,
        gtid,
        ..MyPosition::default()
    })
}

/// MariaDB's GTID state at `file:pos` (`BINLOG_GTID_POS`); empty without GTIDs.
pub(crate) async fn gtid_at(sql: &mut Conn, file: &str, pos: u64) -> Result<String, SourceError> {
    let g: Option<Option<String>> = sql
        .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (file, pos))
        .await
        .map_err(|e| classify("BINLOG_GTID_POS", e))?;
    Ok(g.flatten().unwrap_or_default())
}

/// A transaction being read. The binary log holds only committed
/// transactions, so its changes go to the buffer in pieces as they are read
/// (module doc, invariant 4), encoded as they are read; the last change read
/// waits in `held` until the next one or the commit event says whether it is
/// the last (`last_in_txn`).
struct Txn {
    /// `Row::txn`.
    id: String,
    mariadb_gtid: Option<Gtid>,
    /// Inside `BEGIN ... COMMIT` (else a lone statement, ended by its query).
    began: bool,
    /// `file:pos` of its first event: `Row::position`, and what a `partial`
    /// position names it by.
    begin: String,
    /// `Row::commit_time_unix_us`.
    commit_us: i64,
    /// Records read and not submitted yet, encoded.
    piece: RecordBuf,
    /// Changes in `piece`.
    piece_rows: usize,
    /// The last change read, not in `piece` yet.
    held: Option<Held>,
    /// A row tail to reuse (rows alternate between it and `held`'s).
    spare: RowTail,
    /// The text of a record's `position`, reused.
    at_text: String,
    /// Changes read, skipped ones included (the next `change_index`).
    changes: u32,
    /// Its first changes, durable before this source instance began.
    skip: u32,
    /// Whether a piece of it was submitted.
    split: bool,
}

/// A change read and encoded but for its head (`last_in_txn` is known only
/// once the next change or the commit event is read).
struct Held {
    shape: Arc<Shape>,
    op: RowOp,
    change_index: u32,
    time_unix_ms: u64,
    last: bool,
    tail: RowTail,
}

impl Txn {
    /// Writes the held change into the piece: a later record follows it.
    fn release_held(&mut self) {
        let Some(h) = self.held.take() else { return };
        self.at_text.clear();
        self.at_text.push_str(&self.begin);
        self.at_text.push_str(" n=");
        self.at_text
            .push_str(itoa::Buffer::new().format(h.change_index));
        let head = RowHead {
            schema: &h.shape.database,
            table: &h.shape.table,
            op: h.op as i32,
            txn: &self.id,
            position: self.begin.as_bytes(),
            commit_time_unix_us: self.commit_us,
            change_index: h.change_index,
            last_in_txn: h.last,
            snapshot: false,
        };
        self.piece
            .push_row(h.time_unix_ms, &self.at_text, &head, &h.tail);
        self.piece_rows += 1;
        self.spare = h.tail;
    }
}

struct Reader<'a> {
    ctx: &'a SourceContext,
    /// The row being read: its before and after images, rendered (kept
    /// from row to row).
    before: Rendered,
    after: Rendered,
    opts: mysql_async::Opts,
    dsn: conn::Dsn,
    /// Catalogue queries.
    sql: Conn,
    wanted: HashSet<String>,
    checksum: bool,
    /// The binlog file events come from now.
    file: String,
    seen_fde: bool,
    /// After the last transaction read whole (durable or about to be).
    read: MyPosition,
    /// The last position handed to the buffer.
    submitted: MyPosition,
    gtid: GtidState,
    /// Fingerprint of the shape last shipped per table (including the open
    /// transaction's).
    shipped: BTreeMap<String, String>,
    /// Table → shape and its fingerprint.
    shapes: HashMap<String, (Arc<Shape>, String)>,
    /// Collation id → character set, read when first needed.
    collations: HashMap<u16, String>,
    /// A DDL statement went by: shapes are read again at the next table map.
    stale: bool,
    /// Table id → how its values decode, from its last table map.
    layouts: HashMap<u64, Layout>,
    txn: Option<Txn>,
    /// A transaction of which the stored position says the first changes are
    /// durable: the first one read, checked and skipped by `begin`.
    resume_partial: Option<Partial>,
    /// `pos` of the event being read.
    event_start: u64,
    inflight: Inflight<()>,
}

enum Step {
    Event(Event),
    Tick,
}

impl Reader<'_> {
    async fn run(&mut self, mut stream: BinlogStream) -> Result<(), SourceError> {
        let mut tick = tokio::time::interval(IDLE_COMMIT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                biased;
                // 1. Shutdown: what is in flight still completes.
                _ = self.ctx.shutdown.cancelled() => {
                    self.inflight.drain().await?;
                    return Err(SourceError::Shutdown);
                }
                // 2. The next event, or the connection's silence.
                ev = tokio::time::timeout(SILENCE, stream.next()) => match ev {
                    Err(_) => return Err(SourceError::Other(format!(
                        "no binlog event or heartbeat from the server for {} s", SILENCE.as_secs()))),
                    Ok(None) => return Err(SourceError::Other("the server ended the binlog stream".into())),
                    Ok(Some(Err(e))) => return Err(classify("reading the binlog", e)),
                    Ok(Some(Ok(ev))) => Step::Event(ev),
                },
                // 3. Idle: move the position past other tables' transactions.
                _ = tick.tick() => Step::Tick,
            };
            match step {
                Step::Event(ev) => self.event(&stream, ev).await?,
                Step::Tick => self.idle().await?,
            }
        }
    }

    async fn idle(&mut self) -> Result<(), SourceError> {
        if self.txn.is_none() && self.read != self.submitted && self.resume_partial.is_none() {
            let mut p = self.read.clone();
            p.schemas = self.shipped.clone();
            self.submit(Vec::<Record>::new(), p).await?;
        }
        self.inflight.drain().await?;
        Ok(())
    }

    async fn submit(
        &mut self,
        records: impl Into<Records>,
        p: MyPosition,
    ) -> Result<(), SourceError> {
        let bytes = p.encode()?;
        self.inflight.push(self.ctx, records, bytes, ()).await?;
        self.submitted = p;
        Ok(())
    }

    fn at(&self, pos: u64) -> String {
        format!("{}:{pos}", self.file)
    }

    async fn event(&mut self, stream: &BinlogStream, ev: Event) -> Result<(), SourceError> {
        let h = ev.header();
        let log_pos = u64::from(h.log_pos());
        self.event_start = log_pos.saturating_sub(u64::from(h.event_size()));
        // MariaDB writes its GTID event at commit (the time of the statement
        // that committed); MySQL's GTID event states the commit time itself.
        let header_us = i64::from(h.timestamp()) * 1_000_000;
        if h.event_type_raw() == MARIADB_GTID {
            let (g, standalone) = parse_gtid_event(ev.data(), h.server_id()).ok_or_else(|| {
                SourceError::Other(format!(
                    "a MariaDB GTID event at {} is too short",
                    self.at(log_pos)
                ))
            })?;
            self.begin(g.to_string(), Some(g), !standalone, header_us)?;
            return Ok(());
        }
        let data = match ev.read_data() {
            Ok(Some(d)) => d,
            // GTID_LIST, binlog checkpoint and other MariaDB bookkeeping.
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(SourceError::Other(format!(
                    "the binlog event at {} does not decode: {e}",
                    self.at(log_pos)
                )))
            }
        };
        match data {
            EventData::FormatDescriptionEvent(_) => self.seen_fde = true,
            EventData::RotateEvent(r) => {
                let mut name = r.name_raw().to_vec();
                // The fake rotate comes before the format description, so its
                // checksum was not cut off.
                if log_pos == 0 && !self.seen_fde && self.checksum && name.len() > 4 {
                    name.truncate(name.len() - 4);
                }
                self.file = String::from_utf8(name).map_err(|_| {
                    SourceError::Other("a rotate event names a file that is not UTF-8".into())
                })?;
                if log_pos != 0 && self.txn.is_none() {
                    // A real rotate ends the old file.
                    self.read.file = self.file.clone();
                    self.read.pos = r.position();
                    self.read.partial = None;
                }
                tracing::debug!(file = %self.file, fake = log_pos == 0, "binlog rotate");
            }
            EventData::GtidEvent(g) => {
                let commit_us = match i64::try_from(g.immediate_commit_timestamp()) {
                    Ok(us) if us > 0 => us,
                    _ => header_us,
                };
                self.begin(mysql_gtid(g.sid(), g.gno()), None, false, commit_us)?
            }
            EventData::QueryEvent(q) => {
                let text = q.query();
                let s = text.trim();
                if s.eq_ignore_ascii_case("BEGIN") {
                    match &mut self.txn {
                        Some(t) => t.began = true,
                        None => self.begin(String::new(), None, true, header_us)?,
                    }
                } else if s.eq_ignore_ascii_case("COMMIT") || s.eq_ignore_ascii_case("ROLLBACK") {
                    // A ROLLBACK in the binlog only follows changes to
                    // non-transactional tables, which did happen.
                    self.finish(log_pos).await?;
                } else {
                    // DDL (or another statement logged as text).
                    self.stale = true;
                    match &self.txn {
                        Some(t) if t.began => {}
                        Some(_) => self.finish(log_pos).await?,
                        None => {
                            self.read.file = self.file.clone();
                            self.read.pos = log_pos;
                        }
                    }
                }
            }
            EventData::XidEvent(_) => self.finish(log_pos).await?,
            EventData::TableMapEvent(t) => self.table_map(&t, log_pos).await?,
            EventData::RowsEvent(re) => {
                self.rows(stream, &re, log_pos, header_us)?;
                self.submit_piece().await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A transaction starts. One still open with changes never ended: an XA
    /// transaction's `XA PREPARE`, whose changes commit later by a separate
    /// `XA COMMIT`; refused rather than lose or misplace them.
    fn begin(
        &mut self,
        id: String,
        mariadb_gtid: Option<Gtid>,
        began: bool,
        commit_us: i64,
    ) -> Result<(), SourceError> {
        if let Some(open) = self.txn.as_ref().filter(|t| t.changes > 0) {
            return Err(SourceError::Fatal(format!(
                "transaction {} in {} changed captured tables but did not commit before the next one began \
                 (an XA transaction?): XA transactions are not supported by the mysql source",
                open.id, self.file
            )));
        }
        let begin = self.at(self.event_start);
        let mut skip = 0;
        if let Some(p) = self.resume_partial.take() {
            if p.begin != begin {
                return Err(SourceError::Fatal(format!(
                    "the stored position says the first {} changes of the transaction beginning at {} are durable, \
                     but the binlog's next transaction begins at {begin}: the server's binlog is not the one \
                     the position was taken from",
                    p.done, p.begin
                )));
            }
            skip = p.done;
        }
        self.txn = Some(Txn {
            id,
            mariadb_gtid,
            began,
            begin,
            commit_us,
            piece: RecordBuf::new(),
            piece_rows: 0,
            held: None,
            spare: RowTail::default(),
            at_text: String::new(),
            changes: 0,
            skip,
            split: false,
        });
        Ok(())
    }

    async fn table_map(&mut self, t: &TableMapEvent<'_>, log_pos: u64) -> Result<(), SourceError> {
        let name = format!("{}.{}", t.database_name(), t.table_name());
        if !self.wanted.contains(&name) {
            return Ok(());
        }
        // Each table map describes the rows events after it that name its id.
        self.layouts.remove(&t.table_id());
        if self.stale {
            self.shapes.clear();
            self.stale = false;
        }
        if self.shapes.get(&name).is_some_and(|(s, _)| s.matches(t)) {
            return Ok(());
        }
        let (db, table) = split_table(&name).map_err(SourceError::Fatal)?;
        let loaded = match schema::load(&mut self.sql, db, table).await {
            // The catalogue connection may have timed out while idle
            // (wait_timeout): once more on a new one.
            Err(e) if !e.is_fatal() => {
                self.sql = conn::connect(&self.opts, &self.dsn).await?;
                schema::load(&mut self.sql, db, table).await?
            }
            r => r?,
        };
        let now = loaded.as_ref().map(|s| s.cols.len());
        let shape = match loaded.filter(|s| s.matches(t)) {
            Some(s) => s,
            None => {
                // Rows of an older shape: the table was altered (or dropped)
                // since. The table map itself names the columns when
                // binlog_row_metadata = FULL.
                if self.collations.is_empty() {
                    self.collations = table_map::collations(&mut self.sql).await?;
                }
                match table_map::from_table_map(t, &self.collations)? {
                    Some(old) if old.matches(t) => {
                        tracing::info!(table = %name, at = %self.at(log_pos), "rows of an earlier shape: columns from the table map");
                        old
                    }
                    _ => {
                        let table_now = match now {
                            Some(n) => format!("differ from the table's {n} columns now"),
                            None => "belong to a table that no longer exists".to_string(),
                        };
                        return Err(SourceError::Fatal(format!(
                            "the binlog's rows of {name} at {} have {} columns that {table_now}, and the table map \
                             does not name them: SET GLOBAL binlog_row_metadata = 'FULL' on the server lets such \
                             changes be read (later ones), or remove {name} from source.tables",
                            self.at(log_pos),
                            t.columns_count(),
                        )));
                    }
                }
            }
        };
        let fp = shape.fingerprint();
        self.shapes.insert(name, (Arc::new(shape), fp));
        Ok(())
    }

    fn rows(
        &mut self,
        stream: &BinlogStream,
        re: &RowsEventData<'_>,
        log_pos: u64,
        header_us: i64,
    ) -> Result<(), SourceError> {
        let Some(tme) = stream.get_tme(re.table_id()) else {
            return Err(SourceError::Other(format!(
                "a rows event at {} names table id {} without a table map",
                self.at(log_pos),
                re.table_id()
            )));
        };
        let name = format!("{}.{}", tme.database_name(), tme.table_name());
        if !self.wanted.contains(&name) {
            return Ok(());
        }
        let Some((shape, fp)) = self.shapes.get(&name).cloned() else {
            return Err(SourceError::Other(format!(
                "rows of {name} at {} before its table map",
                self.at(log_pos)
            )));
        };
        if self.txn.is_none() {
            self.begin(String::new(), None, false, header_us)?;
        }
        let at = self.at(log_pos);
        let ship_table = self.shipped.get(&name) != Some(&fp);
        if ship_table {
            self.shipped.insert(name.clone(), fp);
        }
        let Some(txn) = self.txn.as_mut() else {
            return Ok(());
        };
        if ship_table {
            let r = shape.table_record(&txn.begin);
            txn.release_held();
            txn.piece.push(&r);
        }
        let op = match re {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => RowOp::Insert,
            RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => RowOp::Update,
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => {
                RowOp::Delete
            }
        };
        let before_bits = bools(re.columns_before_image());
        let after_bits = bools(re.columns_after_image());
        let layout = match self.layouts.entry(re.table_id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Layout::of(tme).map_err(|e| {
                SourceError::Other(format!("the table map of {name} at {at}: {e}"))
            })?),
        };
        let mut rows = Rows::new(layout, re, before_bits.as_deref(), after_bits.as_deref())
            .map_err(|e| SourceError::Other(format!("rows of {name} at {at}: {e}")))?;
        let (mut read_before, mut read_after) = (Vec::new(), Vec::new());
        while let Some(row) = rows.next_into(&mut read_before, &mut read_after) {
            let (has_before, has_after) = row.map_err(|e| {
                SourceError::Other(format!("a row of {name} at {at} does not decode: {e}"))
            })?;
            if txn.changes < txn.skip {
                // Durable before this instance began (a split transaction).
                txn.changes += 1;
                continue;
            }
            let bad = |e: String| SourceError::Fatal(format!("{name} at {at}: {e}"));
            let (old, new) = (&mut self.before, &mut self.after);
            let before = if has_before {
                old.render(&shape, read_before.drain(..)).map_err(bad)?;
                Some(&*old)
            } else {
                None
            };
            let after = if has_after {
                new.render(&shape, read_after.drain(..)).map_err(bad)?;
                Some(&*new)
            } else {
                None
            };
            let mut tail = std::mem::take(&mut txn.spare);
            tail.clear();
            // Character columns whose value travels as bytes (`raw:COLUMN`).
            let mut raw: Vec<usize> = Vec::new();
            let mut note_raw = |i: usize, v: ValueRef<'_>| {
                if is_raw(&shape.cols[i], v) && !raw.contains(&i) {
                    raw.push(i);
                }
            };
            // `columns`: the after image (a column the server left out is
            // `Unchanged`).
            if let (Some(a), RowOp::Insert | RowOp::Update) = (after, op) {
                for (i, c) in shape.cols.iter().enumerate() {
                    let v = a.get(i).unwrap_or(ValueRef::Unchanged(true));
                    note_raw(i, v);
                    tail.column_ref(&c.name, Shape::neutral(c).value_type() as i32, v);
                }
            }
            // `old_key`: the before image's key columns for a delete and for an
            // update that changed the key; the whole before image of a table
            // without a key.
            if let Some(b) = before {
                let keyed = shape.has_key();
                let wanted =
                    match op {
                        RowOp::Delete => true,
                        RowOp::Update => {
                            !keyed
                                || shape.cols.iter().enumerate().filter(|(_, c)| c.key).any(
                                    |(i, _)| {
                                        let new = after.and_then(|a| a.get(i));
                                        new.is_some_and(|n| b.get(i).is_some_and(|o| o != n))
                                    },
                                )
                        }
                        _ => false,
                    };
                if wanted {
                    for (i, c) in shape.cols.iter().enumerate() {
                        if let Some(v) = b.get(i).filter(|_| !keyed || c.key) {
                            note_raw(i, v);
                            tail.old_key_ref(&c.name, Shape::neutral(c).value_type() as i32, v);
                        }
                    }
                }
            }
            if !raw.is_empty() {
                let flags: Vec<String> = raw
                    .iter()
                    .map(|&i| format!("raw:{}", shape.cols[i].name))
                    .collect();
                tracing::warn!(table = %name, at = %at, columns = ?flags,
                    "values that are not text in their column's character set: shipped as their bytes, marked in the row's flags");
                for f in &flags {
                    tail.flag(f);
                }
            }
            tail.source(MYSQL);
            let r = Held {
                shape: Arc::clone(&shape),
                op,
                change_index: txn.changes,
                time_unix_ms: now_unix_ms(),
                last: false,
                tail,
            };
            txn.changes += 1;
            txn.release_held();
            txn.held = Some(r);
        }
        Ok(())
    }

    /// Submits the open transaction's piece once it is full, with a position
    /// naming the transaction and how many of its changes are durable with the
    /// piece (all read but the one held).
    async fn submit_piece(&mut self) -> Result<(), SourceError> {
        let Some(txn) = self.txn.as_mut() else {
            return Ok(());
        };
        if txn.piece_rows < MAX_PIECE_ROWS && txn.piece.len() < MAX_PIECE_BYTES {
            return Ok(());
        }
        let done = txn.changes - u32::from(txn.held.is_some());
        txn.piece_rows = 0;
        txn.split = true;
        let next = RecordBuf::with_capacity(txn.piece.len());
        let piece = std::mem::replace(&mut txn.piece, next);
        // Every table record read so far is in this piece or an earlier one.
        let p = MyPosition {
            partial: Some(Partial {
                begin: txn.begin.clone(),
                done,
            }),
            schemas: self.shipped.clone(),
            ..self.read.clone()
        };
        self.submit(piece, p).await
    }

    /// The transaction ends with the event ending at `log_pos`: its last
    /// piece is committed with the position after it.
    async fn finish(&mut self, log_pos: u64) -> Result<(), SourceError> {
        let Some(mut txn) = self.txn.take() else {
            return Ok(());
        };
        if let Some(g) = txn.mariadb_gtid {
            self.gtid.advance(g);
        }
        self.read = MyPosition {
            file: self.file.clone(),
            pos: log_pos,
            gtid: self.gtid.to_string(),
            partial: None,
            schemas: self.shipped.clone(),
            snapshot: None,
        };
        if let Some(h) = txn.held.as_mut() {
            h.last = true;
        }
        txn.release_held();
        if txn.piece.is_empty() && !txn.split && txn.skip == 0 {
            return Ok(());
        }
        let p = self.read.clone();
        self.submit(txn.piece, p).await
    }
}
