//! A throwaway PostgreSQL server for tests: `initdb` into a temporary folder, a
//! free loopback port, `wal_level = logical`, trust authentication for
//! 127.0.0.1 (plus a password-only role `pwuser`), stopped on drop.
//!
//! The server binaries come from `/usr/lib/postgresql/<version>/bin` (Debian's
//! layout; they are not on PATH). PostgreSQL refuses to run as root, so under root
//! (as in CI) the data folder belongs to `postgres` and the tools run through
//! `runuser -u postgres --`.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio_postgres::{Client, NoTls};

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// `fsync` on the server (off unless started with [`PgServer::start_durable`]).
    fsync: bool,
    /// TLS on (`ssl = on`, see [`PgServer::start_tls`]).
    tls: bool,
    pub port: u16,
}

fn find_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found: install the Debian package postgresql (apt-get install postgresql)"
        ),
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl PgServer {
    pub fn start() -> PgServer {
        PgServer::start_with(false, false)
    }

    /// A server that makes its commits durable (`fsync = on`), as in production.
    pub fn start_durable() -> PgServer {
        PgServer::start_with(true, false)
    }

    /// A server with TLS (`ssl = on`), its certificate issued for 127.0.0.1 by the
    /// CA in [`PgServer::tls_ca`]. The role `tlsuser`, when created, may connect
    /// only over TLS (pg_hba `hostnossl ... reject`).
    pub fn start_tls() -> PgServer {
        PgServer::start_with(false, true)
    }

    /// The PEM certificate of a CA unrelated to any server's.
    pub fn unrelated_ca_pem() -> String {
        ferry_transport::pki::create_ca("unrelated CA")
            .unwrap()
            .cert_pem
    }

    /// The PEM certificate of the CA of a [`PgServer::start_tls`] server.
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_with(fsync: bool, tls: bool) -> PgServer {
        let bin = find_bin();
        let dir = tempfile::Builder::new()
            .prefix("ferry-pg-")
            .tempdir()
            .unwrap();
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the test data folder to postgres failed");
        }
        let s = PgServer {
            dir,
            bin,
            as_postgres,
            fsync,
            tls,
            port: free_port(),
        };
        s.run(
            "initdb",
            &[
                "-D",
                s.data().to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        std::fs::write(
            s.data().join("pg_hba.conf"),
            "local all all trust\n\
             hostnossl all tlsuser 127.0.0.1/32 reject\n\
             hostnossl replication tlsuser 127.0.0.1/32 reject\n\
             host all pwuser 127.0.0.1/32 scram-sha-256\n\
             host replication pwuser 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        if tls {
            let ca = ferry_transport::pki::create_ca("ferry test PostgreSQL CA").unwrap();
            let server =
                ferry_transport::pki::issue_server(&ca, &["127.0.0.1".to_string()]).unwrap();
            std::fs::write(s.tls_ca(), &ca.cert_pem).unwrap();
            let crt = s.data().join("server.crt");
            let key = s.data().join("server.key");
            std::fs::write(&crt, &server.cert_pem).unwrap();
            std::fs::write(&key, &server.key_pem).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            if s.as_postgres {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&crt)
                    .arg(&key)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown of the server certificate to postgres failed");
            }
        }
        s.pg_ctl_start();
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn bin(&self, tool: &str) -> PathBuf {
        self.bin.join(tool)
    }

    /// A command for a server tool, as the right user.
    pub fn command(&self, tool: &str) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin(tool));
            c
        } else {
            Command::new(self.bin(tool))
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10 \
             -c fsync={} -c timezone=Asia/Shanghai -c max_connections=50{}",
            self.port,
            self.dir.path().display(),
            if self.fsync { "on" } else { "off" },
            if self.tls {
                " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
            } else {
                ""
            }
        );
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    fn pg_ctl_stop(&self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }

    /// Crash-stops the server and starts it again on the same port.
    pub fn restart(&self) {
        self.pg_ctl_stop();
        self.pg_ctl_start();
    }

    /// `pg_ctl restart -m fast`: a clean shutdown (sessions terminated, checkpoint
    /// written), then the server starts again on the same port with the same
    /// settings. A fast shutdown waits for each logical walsender's client to
    /// report that it has received the server's last sent position. Returns
    /// whether the restart finished within `secs`; if not, the server is stopped
    /// immediately and started again, so a caller still sees PostgreSQL go away
    /// under a running client.
    pub fn restart_fast_within(&self, secs: u32) -> bool {
        let log = self.dir.path().join("server.log");
        let out = self
            .command("pg_ctl")
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "-t",
                &secs.to_string(),
                "restart",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            return true;
        }
        crate::note(format!(
            "fast restart did not finish in {secs} s ({}); stopping immediately instead",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        self.restart();
        false
    }

    /// [`PgServer::restart_fast_within`] 30 s, asserting that it finished: a
    /// client of a logical slot must never hold up a DBA's clean shutdown.
    pub fn restart_fast(&self) {
        assert!(
            self.restart_fast_within(30),
            "a fast shutdown of PostgreSQL waited more than 30 s; server log:\n{}",
            self.log()
        );
    }

    /// A `psql` command connected to database `db` as `postgres` over TCP: no
    /// `.psqlrc`, unaligned tuples-only output, stop at the first error. Client
    /// tools need not run as `postgres`.
    pub fn psql_command(&self, db: &str) -> Command {
        let mut c = Command::new(self.bin("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.dsn(db));
        c
    }

    /// Runs `sql` (one or more statements, one implicit transaction) in database
    /// `db` through `psql`; panics with psql's output when it fails. Returns stdout
    /// without the final newline.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql in database {db} failed: {e}\nSQL: {sql}"))
    }

    /// [`PgServer::psql`] that reports failure (the server restarting, say) as `Err`.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self
            .psql_command(db)
            .arg("-c")
            .arg(sql)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        while s.ends_with('\n') {
            s.pop();
        }
        Ok(s)
    }

    /// `pg_current_wal_lsn()` of the server, through `psql`.
    pub fn current_wal_lsn(&self) -> u64 {
        let s = self.psql("postgres", "SELECT pg_current_wal_lsn()");
        parse_lsn(&s).unwrap_or_else(|| panic!("not an LSN: {s:?}"))
    }

    /// The slot's `confirmed_flush_lsn` through `psql`; `None` when the slot does
    /// not exist or the server does not answer.
    pub fn slot_confirmed_flush(&self, db: &str, slot: &str) -> Option<u64> {
        let s = self
            .try_psql(
                db,
                &format!(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
                    slot.replace('\'', "''")
                ),
            )
            .ok()?;
        parse_lsn(s.trim())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `host=127.0.0.1 port=... user=postgres dbname=...`.
    pub fn dsn(&self, db: &str) -> String {
        self.dsn_as("postgres", db)
    }

    pub fn dsn_as(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    pub async fn client(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.dsn(db), NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates database `db` and returns a client of it.
    pub async fn database(&self, db: &str) -> Client {
        let admin = self.client("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        self.client(db).await
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.pg_ctl_stop();
    }
}

/// The slot's `confirmed_flush_lsn`, if the slot exists.
pub async fn confirmed_flush(client: &Client, slot: &str) -> Option<u64> {
    let rows = client
        .query(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()?;
    let s: Option<String> = rows.first()?.get(0);
    parse_lsn(&s?)
}

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Every row of `sql`, values as text (the server's output functions).
pub async fn text_rows(client: &Client, sql: &str) -> Vec<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    for m in client.simple_query(sql).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let row = r
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_string(), r.get(i).map(str::to_string)))
                .collect();
            out.push(row);
        }
    }
    out
}
