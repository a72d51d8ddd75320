//! `ferry-gen-docs OUT_DIR`: writes the man pages and shell completions of
//! `ferry-agent` and `ferry-exchange` from the daemons' own clap definitions
//! (`agent/src/cli.rs`, `exchange/src/cli.rs`, included here as they are), so
//! the daemons themselves need neither clap_mangen nor clap_complete.
//!
//! Writes, under OUT_DIR:
//! * `man1/ferry-agent.1`, `man1/ferry-exchange.1` and one page per subcommand
//!   (`man1/ferry-agent-run.1`, `man1/ferry-exchange-user-add.1`, ...);
//! * `bash/ferry-agent`, `bash/ferry-exchange` (bash-completion, named after the
//!   command as /usr/share/bash-completion/completions/ wants them);
//! * `zsh/_ferry-agent`, `zsh/_ferry-exchange`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

#[allow(dead_code)]
#[path = "../../../agent/src/cli.rs"]
mod agent_cli;
#[allow(dead_code)]
#[path = "../../../exchange/src/cli.rs"]
mod exchange_cli;

fn write_all(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man1 = out.join("man1");
    let bash = out.join("bash");
    let zsh = out.join("zsh");
    for d in [&man1, &bash, &zsh] {
        std::fs::create_dir_all(d)?;
    }
    for mut cmd in [agent_cli::Cli::command(), exchange_cli::Cli::command()] {
        let name = cmd.get_name().to_string();
        clap_mangen::generate_to(cmd.clone(), &man1)?;
        for (shell, path) in [
            (Shell::Bash, bash.join(&name)),
            (Shell::Zsh, zsh.join(format!("_{name}"))),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut buf);
            std::fs::write(&path, buf)?;
            written.push(path);
        }
    }
    for e in std::fs::read_dir(&man1)? {
        written.push(e?.path());
    }
    written.sort();
    Ok(written)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: ferry-gen-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match write_all(Path::new(out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-gen-docs: writing into {out}: {e}");
            ExitCode::FAILURE
        }
    }
}
