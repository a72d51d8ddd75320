//! A throwaway MariaDB server for tests: `mariadb-install-db` into a temporary
//! folder, `mariadbd` on a free loopback port with the binary log in ROW format
//! (`--log-bin --binlog-format=ROW --server-id=1 --binlog-row-metadata=FULL`),
//! stopped (SIGKILL, then waited for) on drop.
//!
//! The binaries are Debian's (`mariadb-server`: `/usr/sbin/mariadbd`,
//! `/usr/bin/mariadb-install-db`; the older `mysqld`/`mysql_install_db` names are
//! tried too). A missing binary fails the test naming the package: there is no
//! silent skip, in CI (`CI=true`) or anywhere else. `mariadbd` refuses to run as
//! root without `--user`, so under root (as in CI) the data folder belongs to
//! `mysql` and the server runs with `--user=mysql`.
//!
//! Statements run through the `mariadb` command-line client over the server's
//! unix socket as `root` (unix-socket authentication), so this harness needs no
//! MySQL client library; tests connect over TCP with whatever client they test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct MariaDb {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    /// Options of `mariadbd` beyond the harness's own.
    extra: Vec<String>,
}

/// The first of `names` found in `dirs`.
fn find(names: &[&str], dirs: &[&str]) -> Option<PathBuf> {
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| Path::new(d).join(n)))
        .find(|p| p.is_file())
}

fn need(names: &[&str]) -> PathBuf {
    find(
        names,
        &["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"],
    )
    .unwrap_or_else(|| {
        panic!(
            "MariaDB not found ({}): install the Debian package mariadb-server \
             (apt-get install mariadb-server); these tests never skip",
            names.join(", ")
        )
    })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl MariaDb {
    /// Starts a fresh server; panics (naming the package to install) when MariaDB
    /// is not installed.
    pub fn start() -> MariaDb {
        Self::start_with(false).0
    }

    /// A fresh server that also takes TLS connections, with a certificate for
    /// `127.0.0.1` and `localhost` signed by a CA of its own; returns the
    /// server and the CA certificate's PEM file.
    pub fn start_tls() -> (MariaDb, PathBuf) {
        let (db, ca) = Self::start_with(true);
        (db, ca.expect("the CA file"))
    }

    fn start_with(tls: bool) -> (MariaDb, Option<PathBuf>) {
        let install = need(&["mariadb-install-db", "mysql_install_db"]);
        let dir = tempfile::Builder::new()
            .prefix("ferry-mariadb-")
            .tempdir()
            .unwrap();
        let mut extra = Vec::new();
        let mut ca_file = None;
        if tls {
            let ca = ferry_transport::pki::create_ca("Ferry test MariaDB CA").unwrap();
            let server = ferry_transport::pki::issue_server(
                &ca,
                &["127.0.0.1".to_string(), "localhost".to_string()],
            )
            .unwrap();
            let at = dir.path().join("tls");
            std::fs::create_dir(&at).unwrap();
            for (name, pem) in [
                ("ca.pem", &ca.cert_pem),
                ("server.pem", &server.cert_pem),
                ("server.key", &server.key_pem),
            ] {
                std::fs::write(at.join(name), pem).unwrap();
            }
            extra = vec![
                format!("--ssl-ca={}", at.join("ca.pem").display()),
                format!("--ssl-cert={}", at.join("server.pem").display()),
                format!("--ssl-key={}", at.join("server.key").display()),
            ];
            ca_file = Some(at.join("ca.pem"));
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let ok = Command::new("chown")
                .args(["-R", "mysql:mysql"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the test data folder to mysql failed");
        }
        let mut s = MariaDb {
            dir,
            child: None,
            port: free_port(),
            extra,
        };
        // A temporary folder of its own: bootstraps running side by side in
        // one /tmp collide on their internal temporary tables' names.
        let tmp = s.dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        if root {
            let ok = Command::new("chown")
                .arg("mysql:mysql")
                .arg(&tmp)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the server's tmp folder to mysql failed");
        }
        let mut c = Command::new(install);
        c.env("TMPDIR", &tmp)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", s.data().display()))
            .arg("--auth-root-authentication-method=socket")
            .arg("--skip-test-db");
        if root {
            c.arg("--user=mysql");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        s.launch();
        (s, ca_file)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// The server's error log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn launch(&mut self) {
        let server = need(&["mariadbd", "mysqld"]);
        let mut c = Command::new(server);
        c.arg("--no-defaults")
            .arg(format!("--datadir={}", self.data().display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.path().join("server.log").display()
            ))
            .arg(format!(
                "--tmpdir={}",
                self.dir.path().join("tmp").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!(
                "--log-bin={}",
                self.data().join("binlog").display()
            ))
            .args([
                "--binlog-format=ROW",
                "--server-id=1",
                "--binlog-row-metadata=FULL",
                "--skip-name-resolve",
                "--innodb-flush-log-at-trx-commit=2",
                "--sync-binlog=0",
                "--innodb-buffer-pool-size=32M",
                "--character-set-server=utf8mb4",
                "--default-time-zone=+08:00",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            c.arg("--user=mysql");
        }
        self.child = Some(c.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.try_sql("SELECT 1").is_ok() {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("mariadbd exited with {st}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not accept connections within 60 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Runs `sql` (one or more statements) as root through the `mariadb` client;
    /// returns its tab-separated output without column names.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let client = need(&["mariadb", "mysql"]);
        let out = Command::new(client)
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args([
                "-u",
                "root",
                "--batch",
                "--skip-column-names",
                "--default-character-set=utf8mb4",
                "-e",
                sql,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            let s = String::from_utf8_lossy(&out.stdout);
            Ok(s.strip_suffix('\n').unwrap_or(&s).to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// [`Self::try_sql`], panicking with the client's message when it fails.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("mariadb failed: {e}\nSQL: {sql}"))
    }

    /// Creates database `db` and a user `user`@`127.0.0.1` with password
    /// `password` and what a binlog reader needs: `REPLICATION SLAVE`,
    /// `REPLICATION CLIENT` and `SELECT`.
    pub fn replication_user(&self, db: &str, user: &str, password: &str) {
        self.sql(&format!(
            "CREATE DATABASE IF NOT EXISTS `{db}`;
             CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}';
             GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* TO '{user}'@'127.0.0.1';"
        ));
    }

    /// A `mysql://` URL for `user` (no password) and database `db`.
    pub fn dsn(&self, user: &str, db: &str) -> String {
        format!("mysql://{user}@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}
