//! The packages: `packaging/build-packages.sh` (with the debug binaries a
//! workspace build made, FERRY_PACKAGE_PROFILE=dev) writes .deb and .rpm
//! packages of both daemons, and they hold what they should, as they should:
//!
//! * the .debs, read with `dpkg-deb`: every file and its mode, root:root
//!   throughout, the conffiles, man pages that render, completions, the packaged
//!   agent.toml that holds the service back (ExecCondition=) until a stream is
//!   added, units that `systemd-analyze verify` accepts at an exposure of 2.0 or
//!   better;
//! * installed with `dpkg --root` into a throwaway root (maintainer scripts run
//!   chrootless, honouring DPKG_ROOT): the users, the state directories, the
//!   units enabled and nothing started, `ferry-exchange init` with the packaged
//!   config; upgraded to a newer build under load (the installed agent ships a
//!   file being written while dpkg replaces it, then restarts onto the new
//!   binary on the same buffer: every line once, in order), keeping the edited
//!   conffile; purged, keeping the buffer that still holds data and saying so;
//! * the .rpms, read with `rpm -qp`: files, modes, owners, %config(noreplace)
//!   files, scriptlets (run against a throwaway root), and installed with
//!   `rpm --root`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use ferry_tests::*;

/// The highest `systemd-analyze security` exposure the packaged units may have
/// (as tests/tests/service.rs holds the units in systemd/ to).
const MAX_EXPOSURE: f64 = 2.0;
const OLD: &str = "0.1.0";
const NEW: &str = "0.1.1";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, panicking with everything it said unless it succeeds; its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn on_path(name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The host tools these tests need, or a skip (a failure under CI) naming the
/// Debian package that has them.
fn host_tools(tools: &[(&str, &str)]) -> bool {
    tools.iter().all(|(tool, package)| {
        host_has(
            on_path(tool),
            &format!("{tool} is missing: install the Debian package `{package}` (apt-get install {package})"),
        )
    })
}

const DEB_TOOLS: &[(&str, &str)] = &[
    ("dpkg-deb", "dpkg"),
    ("rpmbuild", "rpm"),
    ("systemd-analyze", "systemd"),
    ("systemd-sysusers", "systemd"),
    ("deb-systemd-helper", "init-system-helpers"),
    ("groff", "groff-base"),
];

/// The packages of one version, in their own directory.
struct Built {
    dir: PathBuf,
    version: String,
    said: String,
}

impl Built {
    fn deb(&self, pkg: &str) -> PathBuf {
        let arch = run(Command::new("dpkg").arg("--print-architecture"));
        self.dir
            .join(format!("{pkg}_{}_{}.deb", self.version, arch.trim()))
    }

    fn rpm(&self, pkg: &str) -> PathBuf {
        let prefix = format!("{pkg}-{}-1.", self.version);
        std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with(&prefix) && name.ends_with(".rpm")
            })
            .unwrap_or_else(|| panic!("no {prefix}*.rpm in {}", self.dir.display()))
    }
}

/// `bash packaging/build-packages.sh` with the debug binaries beside this test's
/// (FERRY_PACKAGE_BIN_DIR: no cargo inside cargo test), into a directory of its
/// own. Built once per version for all the tests of a run: once per process
/// under `cargo test`, and under a runner that starts a process per test
/// (`cargo nextest`, NEXTEST_RUN_ID) by the first of them, under a lock, for
/// the rest of its run.
fn build(version: &'static str) -> &'static Built {
    static BUILDS: [OnceLock<Built>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = &BUILDS[usize::from(version == NEW)];
    slot.get_or_init(|| {
        let bin_dir = bin("ferry-agent").parent().unwrap().to_path_buf();
        assert!(
            bin_dir.join("ferry-gen-docs").is_file(),
            "{} is missing: run `cargo build --workspace --bins` (it builds ferry-gen-docs) first",
            bin_dir.join("ferry-gen-docs").display()
        );
        // Beside the binaries (target/debug/packages-e2e/VERSION), replaced on
        // every run.
        let root = bin_dir.join("packages-e2e");
        std::fs::create_dir_all(&root).unwrap();
        let dir = root.join(version);
        let run_id = std::env::var("NEXTEST_RUN_ID")
            .unwrap_or_else(|_| format!("process {}", std::process::id()));
        let lock_path = root.join(format!("{version}.lock"));
        let lock = std::fs::File::create(&lock_path).unwrap();
        // Held until this function returns (the file closes).
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
            0,
            "flock {}",
            lock_path.display()
        );
        let (marker, log) = (dir.join(".built-for-run"), dir.join(".build-output"));
        if std::fs::read_to_string(&marker).is_ok_and(|m| m == run_id) {
            note(format!("packages {version} built earlier in this run"));
            return Built {
                dir,
                version: version.to_string(),
                said: std::fs::read_to_string(&log).unwrap_or_default(),
            };
        }
        let _ = std::fs::remove_dir_all(&dir);
        let started = std::time::Instant::now();
        let out = Command::new("bash")
            .arg(repo_root().join("packaging/build-packages.sh"))
            .env("FERRY_PACKAGE_PROFILE", "dev")
            .env("FERRY_PACKAGE_BIN_DIR", &bin_dir)
            .env("FERRY_PACKAGE_OUT", &dir)
            .env("FERRY_PACKAGE_VERSION", version)
            .output()
            .unwrap();
        let said = text(&out);
        assert!(out.status.success(), "build-packages.sh failed:\n{said}");
        note(format!(
            "packages {version} built in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        std::fs::write(&log, &said).unwrap();
        std::fs::write(&marker, &run_id).unwrap();
        drop(lock);
        Built {
            dir,
            version: version.to_string(),
            said,
        }
    })
}

/// One line of `dpkg-deb -c`: `-rwxr-xr-x root/root 123 2026-12-06 11:00 ./usr/bin/x`.
#[derive(Debug)]
struct Entry {
    perms: String,
    owner: String,
    path: String,
}

fn deb_contents(deb: &Path) -> Vec<Entry> {
    run(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "a dpkg-deb -c line: {l}");
            let path = f[5..].join(" ");
            let path = path
                .trim_start_matches('.')
                .trim_end_matches('/')
                .to_string();
            Entry {
                perms: f[0].to_string(),
                owner: f[1].to_string(),
                path: if path.is_empty() { "/".into() } else { path },
            }
        })
        .collect()
}

/// What each package must carry, with its `ls -l` mode.
fn expected_files(pkg: &str) -> Vec<(String, &'static str)> {
    let mut v = vec![
        (format!("/usr/bin/{pkg}"), "-rwxr-xr-x"),
        (
            format!("/usr/lib/systemd/system/{pkg}.service"),
            "-rw-r--r--",
        ),
        (format!("/usr/lib/sysusers.d/{pkg}.conf"), "-rw-r--r--"),
        (format!("/usr/lib/tmpfiles.d/{pkg}.conf"), "-rw-r--r--"),
        (format!("/etc/init.d/{pkg}"), "-rwxr-xr-x"),
        ("/etc/ferry".to_string(), "drwxr-xr-x"),
        (format!("/usr/share/man/man1/{pkg}.1.gz"), "-rw-r--r--"),
        (
            format!("/usr/share/bash-completion/completions/{pkg}"),
            "-rw-r--r--",
        ),
        (
            format!("/usr/share/zsh/vendor-completions/_{pkg}"),
            "-rw-r--r--",
        ),
        (format!("/usr/share/doc/{pkg}/copyright"), "-rw-r--r--"),
    ];
    match pkg {
        "ferry-agent" => v.extend([
            // Read by the service user (0644, root-owned: no secret in it).
            ("/etc/ferry/agent.toml".to_string(), "-rw-r--r--"),
            ("/etc/logrotate.d/ferry-agent".to_string(), "-rw-r--r--"),
            (
                "/usr/share/man/man5/ferry-agent.toml.5.gz".to_string(),
                "-rw-r--r--",
            ),
            (
                "/usr/share/man/man1/ferry-agent-check-config.1.gz".to_string(),
                "-rw-r--r--",
            ),
        ]),
        _ => v.extend([
            ("/etc/ferry/exchange.toml".to_string(), "-rw-r--r--"),
            (
                "/usr/share/man/man1/ferry-exchange-init.1.gz".to_string(),
                "-rw-r--r--",
            ),
        ]),
    }
    v
}

fn conffiles(pkg: &str) -> BTreeSet<String> {
    let mut c: BTreeSet<String> = [format!("/etc/init.d/{pkg}")].into();
    match pkg {
        "ferry-agent" => {
            c.insert("/etc/ferry/agent.toml".into());
            c.insert("/etc/logrotate.d/ferry-agent".into());
        }
        _ => {
            c.insert("/etc/ferry/exchange.toml".into());
        }
    }
    c
}

/// A man page renders: gzip intact, a .TH header, groff formats it without a
/// warning, and `man -l` shows its NAME section with `want` in it.
fn check_man_page(page: &Path, want: &[&str]) {
    run(Command::new("gzip").arg("-t").arg(page));
    let roff = run(Command::new("gzip").arg("-dc").arg(page));
    assert!(
        roff.lines().any(|l| l.starts_with(".TH ")),
        "{}: no .TH header",
        page.display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" | groff -man -Tutf8 -ww -z")
        .arg("sh")
        .arg(page)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "groff warns about {}:\n{}",
        page.display(),
        text(&out)
    );
    let rendered = if on_path("man") {
        run(Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "100")
            .env_remove("MAN_KEEP_FORMATTING")
            .env("PAGER", "cat"))
    } else {
        run(Command::new("sh")
            .arg("-c")
            .arg("gzip -dc \"$1\" | groff -man -Tutf8 -P-cbou")
            .arg("sh")
            .arg(page))
    };
    // No overstrike or escapes: plain text to search.
    let rendered = rendered.replace(['\u{2010}', '\u{2212}'], "-");
    assert!(
        rendered.contains("NAME"),
        "{}: no NAME section:\n{rendered}",
        page.display()
    );
    for w in want {
        assert!(
            rendered.contains(w),
            "{} does not mention {w:?}:\n{rendered}",
            page.display()
        );
    }
}

/// Every key packaging/agent.toml documents, set (`key = `, commented or not) or
/// listed in its comments (`#   key   what it does`).
fn documented_agent_keys() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("packaging/agent.toml")).unwrap();
    let mut keys = BTreeSet::new();
    let key_like = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim_start();
        // `key = value`, set or commented out.
        if let Some((k, _)) = l.split_once(" = ") {
            if key_like(k.trim()) {
                keys.insert(k.trim().to_string());
            }
        }
        // The lists under a kind: "#   path             the outbox folder",
        // "#   password_file / password_env   the password ...".
        if line.starts_with("#   ") {
            if let Some((first, _)) = l.split_once("  ") {
                for k in first.split(" / ") {
                    if key_like(k.trim()) {
                        keys.insert(k.trim().to_string());
                    }
                }
            }
        }
    }
    // source's kind and the inline tables' own keys.
    keys.insert("kind".into());
    keys
}

/// `systemd-analyze verify` of the packaged unit in the extracted package (its
/// ExecCondition= and ExecStart= binaries are there), with systemd's own units;
/// silent, and the exposure at most MAX_EXPOSURE.
fn check_unit(x: &Path, pkg: &str) {
    let unit = x.join(format!("usr/lib/systemd/system/{pkg}.service"));
    let root = x.parent().unwrap().join(format!("verify-{pkg}"));
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(root.join("usr/lib/systemd")));
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    let in_root = root.join(format!("etc/systemd/system/{pkg}.service"));
    std::fs::copy(&unit, &in_root).unwrap();
    let (from, to) = (
        x.join(format!("usr/bin/{pkg}")),
        root.join(format!("usr/bin/{pkg}")),
    );
    if std::fs::hard_link(&from, &to).is_err() {
        std::fs::copy(&from, &to).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("--man=no")
        .arg(&in_root)
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify of the packaged {pkg}.service:\n{}",
        text(&out)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let said = text(&out);
    let line = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{said}"));
    let figure: f64 = line
        .rsplit(':')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure in {line:?}"));
    note(format!("packaged {pkg}.service: {line}"));
    assert!(
        figure <= MAX_EXPOSURE,
        "packaged {pkg}.service: exposure {figure} above {MAX_EXPOSURE}"
    );
}

/// What the .debs hold, read with dpkg-deb and checked file by file.
#[test]
fn debs_hold_what_they_should() {
    if !host_tools(DEB_TOOLS) {
        return;
    }
    let built = build(OLD);
    let t = TestDir::new("packages-deb");
    for pkg in ["ferry-agent", "ferry-exchange"] {
        let deb = built.deb(pkg);
        assert!(deb.is_file(), "{} missing:\n{}", deb.display(), built.said);

        // Control: name, the version asked for, a libc6 dependency; conffiles.
        let field = |f: &str| {
            run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f))
                .trim()
                .to_string()
        };
        assert_eq!(field("Package"), pkg);
        assert_eq!(field("Version"), OLD);
        assert!(
            field("Depends").starts_with("libc6 (>= 2."),
            "{}",
            field("Depends")
        );
        let listed: BTreeSet<String> = run(Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"))
        .lines()
        .map(str::to_string)
        .collect();
        assert_eq!(listed, conffiles(pkg), "{pkg}: DEBIAN/conffiles");
        for script in ["postinst", "prerm", "postrm"] {
            let s = run(Command::new("dpkg-deb").arg("-I").arg(&deb).arg(script));
            assert!(s.starts_with("#!/bin/sh\n"), "{pkg} {script}:\n{s}");
            assert!(s.contains(&format!("PKG={pkg}\n")), "{pkg} {script}");
        }

        // Every file root:root; the expected ones with their modes; nothing
        // writable by others, nothing in /var (state is made by postinst).
        let entries = deb_contents(&deb);
        for e in &entries {
            assert_eq!(e.owner, "root/root", "{pkg}: {e:?}");
            assert_ne!(
                e.perms.as_bytes()[8],
                b'w',
                "{pkg}: {e:?} is world-writable"
            );
            assert!(
                !e.path.starts_with("/var"),
                "{pkg}: {e:?}: state is not shipped"
            );
        }
        for (path, perms) in expected_files(pkg) {
            let e = entries
                .iter()
                .find(|e| e.path == path)
                .unwrap_or_else(|| panic!("{pkg}: no {path} in {entries:#?}"));
            assert_eq!(e.perms, perms, "{pkg}: mode of {path}");
        }

        // The files themselves.
        let x = t.mkdir(&format!("x-{pkg}"));
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
        let read = |rel: &str| std::fs::read_to_string(x.join(rel)).unwrap();
        assert_eq!(
            read(&format!("usr/lib/systemd/system/{pkg}.service")),
            std::fs::read_to_string(repo_root().join(format!("systemd/{pkg}.service"))).unwrap()
        );
        let (user, home) = match pkg {
            "ferry-agent" => ("ferry", "/var/lib/ferry"),
            _ => ("ferry-exchange", "/var/lib/ferry-exchange"),
        };
        let sysusers = read(&format!("usr/lib/sysusers.d/{pkg}.conf"));
        assert!(
            sysusers
                .lines()
                .any(|l| l.starts_with(&format!("u {user} ")) && l.contains(&format!(" {home} "))),
            "{pkg}: sysusers.d:\n{sysusers}"
        );
        let tmpfiles = read(&format!("usr/lib/tmpfiles.d/{pkg}.conf"));
        assert!(
            tmpfiles.contains(&format!("d {home} 0700 {user} {user} -\n")),
            "{pkg}: tmpfiles.d:\n{tmpfiles}"
        );
        let copyright = read(&format!("usr/share/doc/{pkg}/copyright"));
        assert!(copyright.starts_with(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        ));
        assert!(copyright.contains("\nLicense: Apache-2.0\n"), "{copyright}");
        let init = read(&format!("etc/init.d/{pkg}"));
        assert!(
            init.contains("### BEGIN INIT INFO")
                && init.contains(&format!("# Provides:          {pkg}\n"))
        );
        // Both daemons reload their configuration in place.
        for action in [
            "start)",
            "stop)",
            "restart",
            "reload)",
            "\"$DAEMON\" reload --config \"$CONFIG\"",
            "status)",
        ] {
            assert!(init.contains(action), "{pkg} init script lacks {action}");
        }
        run(Command::new("sh")
            .arg("-n")
            .arg(x.join(format!("etc/init.d/{pkg}"))));

        // Man pages and completions, from the CLI the binary parses.
        let man1 = x.join("usr/share/man/man1");
        match pkg {
            "ferry-agent" => {
                check_man_page(
                    &man1.join("ferry-agent.1.gz"),
                    &["ferry-agent", "check-config", "salvage"],
                );
                check_man_page(
                    &man1.join("ferry-agent-check-config.1.gz"),
                    &["--has-streams", "--strict"],
                );
                let keys = documented_agent_keys();
                assert!(keys.len() > 30, "{keys:?}");
                for k in [
                    "data_dir",
                    "max_retained_wal",
                    "server_id",
                    "rotated",
                    "marker_suffix",
                ] {
                    assert!(keys.contains(k), "the key scan misses {k}: {keys:?}");
                }
                // Every key the example documents is in the page (its source:
                // rendering may hyphenate a long key at a line's end).
                let five = x.join("usr/share/man/man5/ferry-agent.toml.5.gz");
                check_man_page(&five, &["ferry-agent.toml", "[[stream]]", "ExecCondition="]);
                let roff = run(Command::new("gzip").arg("-dc").arg(&five));
                for k in &keys {
                    assert!(
                        roff.contains(k.as_str()),
                        "ferry-agent.toml(5) does not describe {k}"
                    );
                }
            }
            _ => {
                check_man_page(
                    &man1.join("ferry-exchange.1.gz"),
                    &["ferry-exchange", "enroll", "serve"],
                );
                check_man_page(
                    &man1.join("ferry-exchange-init.1.gz"),
                    &["--store-dir", "--listen"],
                );
            }
        }
        let bash = read(&format!("usr/share/bash-completion/completions/{pkg}"));
        assert!(bash.contains("complete -F") && bash.contains(pkg), "{bash}");
        let zsh = read(&format!("usr/share/zsh/vendor-completions/_{pkg}"));
        assert!(zsh.starts_with(&format!("#compdef {pkg}")), "{zsh}");
        if pkg == "ferry-agent" {
            assert!(bash.contains("--has-streams") && zsh.contains("--has-streams"));
        } else {
            assert!(bash.contains("--store-dir") && zsh.contains("--store-dir"));
        }

        check_unit(&x, pkg);
    }

    // The packaged agent.toml: valid, no stream, so ExecCondition= holds the
    // agent back; one stream uncommented and it lets it start.
    let x = t.path().join("x-ferry-agent");
    let agent = x.join("usr/bin/ferry-agent");
    let toml = x.join("etc/ferry/agent.toml");
    let condition = |config: &Path| {
        Command::new(&agent)
            .args(["check-config", "--has-streams", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = condition(&toml);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("declares no [[stream]]"),
        "{}",
        text(&out)
    );
    let plain = Command::new(&agent)
        .args(["check-config", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", text(&plain));
    assert!(text(&plain).contains("0 streams"), "{}", text(&plain));
    let packaged = std::fs::read_to_string(&toml).unwrap();
    let edited = t.path().join("agent-with-a-stream.toml");
    // Local IT adds a stream.
    let with_stream = format!(
        "{packaged}\n[[stream]]\nname = \"hall-log\"\ncatalog_id = \"210100-MZ-0002\"\nsharing = \"unconditional\"\nsource = {{ kind = \"tail\", path = \"/var/log/hall/app.log\" }}\n"
    );
    std::fs::write(&edited, &with_stream).unwrap();
    let out = condition(&edited);
    assert!(out.status.success(), "{}\n{with_stream}", text(&out));
    assert!(text(&out).contains("1 stream)"), "{}", text(&out));
    // The same file minus the comment markers is packaging/agent.toml.
    let original = std::fs::read_to_string(repo_root().join("packaging/agent.toml")).unwrap();
    let streams_at = original.find("\n[[stream]]").unwrap();
    assert!(
        packaged.contains(&original[..200]),
        "the packaged file begins as packaging/agent.toml"
    );
    for l in original[streams_at..]
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        assert!(
            packaged.contains(&format!("\n#{l}\n")),
            "{l} is commented out in the package"
        );
    }
}

/// A throwaway root dpkg can install into: its database, and /etc.
fn dpkg_root(t: &TestDir) -> PathBuf {
    let root = t.mkdir("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "etc",
        "var/log",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "").unwrap();
    }
    root
}

fn dpkg(root: &Path, args: &[&str], debs: &[PathBuf]) -> Output {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", root.join("var/log/dpkg.log").display()))
        .args([
            "--force-script-chrootless",
            "--force-not-root",
            "--force-depends",
            "--force-confdef",
            "--force-confold",
        ])
        .args(args)
        .args(debs)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    let out = cmd.output().unwrap();
    note(format!("dpkg {args:?}:\n{}", text(&out)));
    out
}

fn passwd_entry(root: &Path, user: &str) -> Option<Vec<String>> {
    std::fs::read_to_string(root.join("etc/passwd"))
        .ok()?
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .find(|f| f[0] == user)
}

fn installed_version(root: &Path, pkg: &str) -> String {
    run(Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${Status} ${Version}"])
        .arg(pkg))
}

/// No process runs a binary of the throwaway root: installing started nothing.
fn nothing_runs_from(root: &Path) {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(exe) = std::fs::read_link(e.path().join("exe")) {
            assert!(
                !exe.starts_with(root),
                "process {:?} runs {} from the package root",
                e.file_name(),
                exe.display()
            );
        }
    }
}

/// Install into a throwaway root with dpkg (maintainer scripts run chrootless
/// with DPKG_ROOT), `ferry-exchange init` with the packaged config, upgrade to a
/// newer build, purge.
#[test]
fn deb_install_upgrade_purge() {
    if !host_tools(DEB_TOOLS) {
        return;
    }
    let old = build(OLD);
    let t = TestDir::new("packages-dpkg");
    let root = dpkg_root(&t);
    let debs = [old.deb("ferry-agent"), old.deb("ferry-exchange")];

    // --- install -------------------------------------------------------------
    let out = dpkg(&root, &["-i"], &debs);
    assert!(out.status.success(), "dpkg -i:\n{}", text(&out));
    for pkg in ["ferry-agent", "ferry-exchange"] {
        assert_eq!(
            installed_version(&root, pkg),
            format!("install ok installed {OLD}")
        );
    }
    for (pkg, user, home) in [
        ("ferry-agent", "ferry", "var/lib/ferry"),
        ("ferry-exchange", "ferry-exchange", "var/lib/ferry-exchange"),
    ] {
        // The system user (sysusers.d), home the state directory, no login.
        let pw = passwd_entry(&root, user).unwrap_or_else(|| panic!("no user {user} in the root"));
        assert_eq!(pw[5], format!("/{home}"), "{pw:?}");
        assert!(pw[6].ends_with("nologin"), "{pw:?}");
        let uid: u32 = pw[2].parse().unwrap();
        assert!(uid < 1000, "{user} is a system user: {pw:?}");
        // The state directory (tmpfiles.d): the user's, 0700.
        let meta = std::fs::metadata(root.join(home)).unwrap();
        assert_eq!(meta.uid(), uid, "{home} owner");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "{home} mode");
        // Enabled (deb-systemd-helper in DPKG_ROOT), SysV links too.
        let wants = root.join(format!(
            "etc/systemd/system/multi-user.target.wants/{pkg}.service"
        ));
        let link =
            std::fs::read_link(&wants).unwrap_or_else(|e| panic!("{}: {e}", wants.display()));
        assert!(
            link.ends_with(format!("systemd/system/{pkg}.service")),
            "{}",
            link.display()
        );
        let rc2: Vec<String> = std::fs::read_dir(root.join("etc/rc2.d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            rc2.iter().any(|n| n.starts_with('S') && n.ends_with(pkg)),
            "{rc2:?}"
        );
    }
    let logs = std::fs::metadata(root.join("var/log/ferry")).unwrap();
    assert_eq!(logs.permissions().mode() & 0o7777, 0o750);
    nothing_runs_from(&root);
    assert_eq!(
        std::fs::read(root.join("etc/ferry/exchange.toml")).unwrap(),
        std::fs::read(repo_root().join("packaging/exchange.toml")).unwrap()
    );

    // `ferry-exchange init` with the packaged config in place: the CA and the
    // server certificate at the paths it names (the unit's
    // ConditionPathExists=/etc/ferry/exchange.pem), the file itself kept.
    let etc = root.join("etc/ferry");
    let exchange = root.join("usr/bin/ferry-exchange");
    let said = run(Command::new(&exchange)
        .args(["init", "--name", "exchange.example.gov.cn", "--dir"])
        .arg(&etc));
    assert!(said.contains("kept as it is"), "{said}");
    for f in ["ca.pem", "exchange.pem"] {
        assert!(etc.join(f).is_file(), "init made no {f}: {said}");
    }
    for f in ["ca.key", "exchange.key"] {
        assert_eq!(
            std::fs::metadata(etc.join(f)).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert_eq!(
        std::fs::read(etc.join("exchange.toml")).unwrap(),
        std::fs::read(repo_root().join("packaging/exchange.toml")).unwrap(),
        "init keeps the packaged exchange.toml"
    );
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/ferry-exchange.service"))
        .unwrap();
    assert!(unit.contains("ConditionPathExists=/etc/ferry/exchange.pem\n"));
    let again = Command::new(&exchange)
        .args(["init", "--dir"])
        .arg(&etc)
        .output()
        .unwrap();
    assert!(
        !again.status.success() && text(&again).contains("refusing to replace"),
        "{}",
        text(&again)
    );

    // --- upgrade under load ------------------------------------------------------
    // Local IT puts the enrolment's config in place (a stream added, data_dir
    // the package's state directory); the installed agent runs from
    // /usr/bin/ferry-agent and ships a file being written to an exchange.
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll("hp-pk-01", "210102-PK", &t.path().join("enrolled"));
    let app_log = t.mkdir("hall").join("app.log");
    std::fs::write(&app_log, b"").unwrap();
    let state = root.join("var/lib/ferry");
    let edited: String = agent
        .config_text()
        .lines()
        .map(|l| {
            if l.starts_with("data_dir = ") {
                format!("data_dir = \"{}\"\n", state.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect::<String>()
        + &tail_stream("hall-log", "210100-MZ-0002", &app_log);
    std::fs::write(root.join("etc/ferry/agent.toml"), &edited).unwrap();
    agent.config = root.join("etc/ferry/agent.toml");
    agent.set_program(Some(root.join("usr/bin/ferry-agent")));
    agent.start();
    let writer = ferry_tests::faults::LineWriter::start(app_log.clone(), "u", 1000);
    ex.wait_lines("hp-pk-01", "hall-log", 300, LONG);

    // The newer packages go in while it runs; then the service restarts onto
    // the new binary (what the unit's restart on upgrade does), on the same
    // buffer.
    let new = build(NEW);
    let out = dpkg(
        &root,
        &["-i"],
        &[new.deb("ferry-agent"), new.deb("ferry-exchange")],
    );
    agent.assert_alive();
    agent.stop();
    agent.start();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let produced = writer.finish();
    ex.wait_lines("hp-pk-01", "hall-log", produced, LONG);
    std::thread::sleep(std::time::Duration::from_millis(500));
    ferry_tests::faults::Verdict::of_lines("u", produced, &ex.lines("hp-pk-01", "hall-log"))
        .assert_clean("the agent upgraded under load");
    // Stopped; its buffer stays in the state directory for purge to keep.
    agent.stop();
    assert!(
        std::fs::read_dir(&state).unwrap().next().is_some(),
        "the agent's buffer is in /var/lib/ferry"
    );
    assert!(out.status.success(), "dpkg -i (upgrade):\n{}", text(&out));
    for pkg in ["ferry-agent", "ferry-exchange"] {
        assert_eq!(
            installed_version(&root, pkg),
            format!("install ok installed {NEW}")
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("etc/ferry/agent.toml")).unwrap(),
        edited,
        "the edited conffile survives"
    );
    for leftover in [
        "agent.toml.dpkg-new",
        "agent.toml.dpkg-dist",
        "agent.toml.dpkg-old",
    ] {
        assert!(!etc.join(leftover).exists(), "{leftover}");
    }
    assert!(
        etc.join("exchange.pem").is_file(),
        "the certificates survive the upgrade"
    );
    nothing_runs_from(&root);

    // --- purge -------------------------------------------------------------------
    let out = dpkg(&root, &["--purge", "ferry-agent", "ferry-exchange"], &[]);
    let said = text(&out);
    assert!(out.status.success(), "dpkg --purge:\n{said}");
    assert!(
        said.contains("ferry-agent: kept /var/lib/ferry: it is not empty")
            && said.contains("the exchange has not acknowledged"),
        "purge says why it keeps the buffer:\n{said}"
    );
    assert!(
        std::fs::read_dir(&state).unwrap().next().is_some(),
        "the buffer is kept"
    );
    // What the packages made and nothing holds any more is gone.
    for gone in [
        "usr/bin/ferry-agent",
        "usr/bin/ferry-exchange",
        "etc/ferry/agent.toml",
        "etc/ferry/exchange.toml",
        "etc/init.d/ferry-agent",
        "etc/systemd/system/multi-user.target.wants/ferry-agent.service",
        "etc/systemd/system/multi-user.target.wants/ferry-exchange.service",
        "var/lib/ferry-exchange",
        "var/log/ferry",
    ] {
        assert!(!root.join(gone).exists(), "{gone} is left after purge");
    }
    assert!(!said.contains("kept /var/lib/ferry-exchange"), "{said}");
    // The CA `init` made is not the package's: kept, and /etc/ferry with it.
    assert!(etc.join("ca.key").is_file());
    for pkg in ["ferry-agent", "ferry-exchange"] {
        let status = Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${Status}"])
            .arg(pkg)
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&status.stdout).contains("installed"),
            "{}",
            text(&status)
        );
    }
}

/// `rpm -qp --qf` with one line per file.
fn rpm_files(rpm: &Path) -> Vec<(String, String, String)> {
    run(Command::new("rpm")
        .args([
            "-qp",
            "--qf",
            "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]",
        ])
        .arg(rpm))
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.splitn(3, ' ').collect();
        (f[0].to_string(), f[1].to_string(), f[2].to_string())
    })
    .collect()
}

/// The .rpms: files, modes, owners, %config(noreplace), scriptlets; installed with
/// `rpm --root` where that is possible (as root).
#[test]
fn rpms_hold_what_they_should() {
    if !host_tools(&[
        ("rpm", "rpm"),
        ("rpmbuild", "rpm"),
        ("systemctl", "systemd"),
        ("systemd-sysusers", "systemd"),
    ]) {
        return;
    }
    let built = build(OLD);
    let t = TestDir::new("packages-rpm");
    for pkg in ["ferry-agent", "ferry-exchange"] {
        let rpm = built.rpm(pkg);
        let q = |args: &[&str]| run(Command::new("rpm").arg("-qp").args(args).arg(&rpm));
        assert_eq!(
            q(&["--qf", "%{NAME} %{VERSION} %{LICENSE}"]),
            format!("{pkg} {OLD} Apache-2.0")
        );
        let listed: BTreeSet<String> = q(&["-l"]).lines().map(str::to_string).collect();
        let files = rpm_files(&rpm);
        for (path, perms) in expected_files(pkg) {
            assert!(listed.contains(&path), "{pkg}.rpm lacks {path}: {listed:?}");
            let (p, owner, _) = files.iter().find(|f| f.2 == path).unwrap();
            assert_eq!(p, perms, "{pkg}.rpm: mode of {path}");
            assert_eq!(owner, "root:root", "{pkg}.rpm: owner of {path}");
        }
        for (_, owner, path) in &files {
            assert_eq!(owner, "root:root", "{pkg}.rpm: {path}");
            assert!(!path.starts_with("/var"), "{pkg}.rpm ships {path}");
        }
        let config: BTreeSet<String> = q(&["-c"]).lines().map(str::to_string).collect();
        assert_eq!(config, conffiles(pkg), "{pkg}.rpm config files");
        // noreplace: RPMFILE_CONFIG (1) | RPMFILE_NOREPLACE (16).
        for l in q(&["--qf", "[%{FILEFLAGS} %{FILENAMES}\n]"]).lines() {
            let (flags, path) = l.split_once(' ').unwrap();
            let flags: u32 = flags.parse().unwrap();
            if path.starts_with("/etc/") && !path.ends_with("/etc/ferry") {
                assert_eq!(flags & 17, 17, "{path} is %config(noreplace)");
            }
        }
        let scripts = q(&["--scripts"]);
        for want in [
            "postinstall scriptlet",
            "preuninstall scriptlet",
            "postuninstall scriptlet",
            "systemd-sysusers",
            "systemd-tmpfiles",
            "try-restart",
            "ferry_purge_dirs",
        ] {
            assert!(
                scripts.contains(want),
                "{pkg}.rpm scriptlets lack {want}:\n{scripts}"
            );
        }

        // The scriptlets against a throwaway root (rpm would chroot into one with
        // no shell): the same shared code honours DPKG_ROOT.
        let sroot = t.mkdir(&format!("scriptlets-{pkg}"));
        std::fs::create_dir_all(sroot.join("etc")).unwrap();
        let cpio = on_path("cpio")
            && Command::new("sh")
                .arg("-c")
                .arg("rpm2cpio \"$1\" | (cd \"$2\" && cpio -idm --quiet)")
                .arg("sh")
                .arg(&rpm)
                .arg(&sroot)
                .status()
                .unwrap()
                .success();
        if !cpio {
            // Without cpio: the files from the .deb, which stages the same tree.
            run(Command::new("dpkg-deb")
                .arg("-x")
                .arg(built.deb(pkg))
                .arg(&sroot));
        }
        let scriptlet = |tag: &str, arg: &str| {
            let body = q(&["--qf", &format!("%{{{tag}}}")]);
            Command::new("sh")
                .arg("-c")
                .arg(body)
                .arg("sh")
                .arg(arg)
                .env("DPKG_ROOT", &sroot)
                // systemctl enable would also run the SysV hook (update-rc.d or
                // chkconfig chrooted into the root), which this bare root lacks.
                .env("SYSTEMCTL_SKIP_SYSV", "1")
                .output()
                .unwrap()
        };
        let out = scriptlet("POSTIN", "1");
        assert!(out.status.success(), "{pkg} %post:\n{}", text(&out));
        let user = if pkg == "ferry-agent" {
            "ferry"
        } else {
            "ferry-exchange"
        };
        let home = if pkg == "ferry-agent" {
            "var/lib/ferry"
        } else {
            "var/lib/ferry-exchange"
        };
        assert!(
            passwd_entry(&sroot, user).is_some(),
            "{pkg} %post made no user {user}"
        );
        assert_eq!(
            std::fs::metadata(sroot.join(home))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o700
        );
        let wants = sroot.join(format!(
            "etc/systemd/system/multi-user.target.wants/{pkg}.service"
        ));
        assert!(
            wants.symlink_metadata().is_ok(),
            "{pkg} %post enables the unit"
        );
        std::fs::write(sroot.join(home).join("data"), "stored").unwrap();
        let out = scriptlet("PREUN", "0");
        assert!(out.status.success(), "{pkg} %preun:\n{}", text(&out));
        assert!(
            wants.symlink_metadata().is_err(),
            "{pkg} %preun disables the unit"
        );
        let out = scriptlet("POSTUN", "0");
        assert!(out.status.success(), "{pkg} %postun:\n{}", text(&out));
        assert!(
            text(&out).contains(&format!("{pkg}: kept /{home}: it is not empty")),
            "{}",
            text(&out)
        );
        assert!(sroot.join(home).join("data").is_file());
    }

    // rpm --root: needs root (rpm sets owners and chroots).
    let is_root = run(Command::new("id").arg("-u")).trim() == "0";
    if !is_root {
        assert!(
            std::env::var("CI").is_err(),
            "rpm --root needs root under CI"
        );
        note("skipped: rpm --root -i needs root (not running as root, CI unset)");
        return;
    }
    let root = t.mkdir("rpmroot");
    let rpms = [built.rpm("ferry-agent"), built.rpm("ferry-exchange")];
    run(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["--nodeps", "--noscripts", "-i"])
        .args(&rpms));
    let qa = run(Command::new("rpm").arg("--root").arg(&root).args([
        "-qa",
        "--qf",
        "%{NAME} %{VERSION}\n",
    ]));
    for pkg in ["ferry-agent", "ferry-exchange"] {
        assert!(qa.contains(&format!("{pkg} {OLD}\n")), "{qa}");
        for (path, perms) in expected_files(pkg) {
            let p = root.join(path.trim_start_matches('/'));
            let meta =
                std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path}");
            let mode = meta.permissions().mode() & 0o777;
            let want = if perms.contains("rwxr-xr-x") {
                0o755
            } else {
                0o644
            };
            assert_eq!(mode, want, "{path} mode {mode:o}");
        }
    }
    assert_eq!(
        std::fs::read(root.join("etc/ferry/exchange.toml")).unwrap(),
        std::fs::read(repo_root().join("packaging/exchange.toml")).unwrap()
    );
}

/// Without systemd-sysusers and systemd-tmpfiles (a host without systemd), the
/// .deb's postinst falls back to useradd and mkdir/chown, from the same
/// sysusers.d and tmpfiles.d lines: run with a PATH that has only the basic
/// tools, against a throwaway root.
#[test]
fn deb_postinst_falls_back_without_systemd_tools() {
    if !host_tools(&[
        ("dpkg-deb", "dpkg"),
        ("rpmbuild", "rpm"),
        ("useradd", "passwd"),
    ]) {
        return;
    }
    let built = build(OLD);
    let t = TestDir::new("packages-fallback");
    let path = t.mkdir("bin");
    for tool in [
        "sh", "awk", "grep", "mkdir", "chown", "chmod", "useradd", "rmdir", "cat",
    ] {
        let found = run(Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}")));
        std::os::unix::fs::symlink(found.trim(), path.join(tool)).unwrap();
    }
    let root = t.mkdir("root");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(built.deb("ferry-agent"))
        .arg(&root));
    std::fs::create_dir_all(root.join("etc")).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        std::fs::write(root.join("etc").join(f), "").unwrap();
    }
    let postinst = run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(built.deb("ferry-agent"))
        .arg("postinst"));
    let out = Command::new(path.join("sh"))
        .arg("-c")
        .arg(&postinst)
        .args(["postinst", "configure"])
        .env_clear()
        .env("PATH", &path)
        .env("DPKG_ROOT", &root)
        .output()
        .unwrap();
    assert!(out.status.success(), "postinst:\n{}", text(&out));
    let pw = passwd_entry(&root, "ferry").expect("useradd made the ferry user");
    assert_eq!(pw[5], "/var/lib/ferry");
    let uid: u32 = pw[2].parse().unwrap();
    for (dir, mode) in [("var/lib/ferry", 0o700), ("var/log/ferry", 0o750)] {
        let meta = std::fs::metadata(root.join(dir)).unwrap();
        assert_eq!(
            (meta.uid(), meta.permissions().mode() & 0o7777),
            (uid, mode),
            "{dir}"
        );
    }
    // Run again (a reconfigure): nothing to do, no error.
    let again = Command::new(path.join("sh"))
        .arg("-c")
        .arg(&postinst)
        .args(["postinst", "configure"])
        .env_clear()
        .env("PATH", &path)
        .env("DPKG_ROOT", &root)
        .output()
        .unwrap();
    assert!(again.status.success(), "postinst again:\n{}", text(&again));
}
