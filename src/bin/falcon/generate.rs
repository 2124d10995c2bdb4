//! `falcon generate --out DIR`: man pages and shell completions, made from the
//! same clap definitions that parse the command line.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
Failure: the command ran and found or hit a problem, reported on standard error
(for example a corrupt log under \fBlog\-inspect \-\-verify\fR).
.TP
\fB2\fR
Usage error: bad arguments, or a feature this build does not have (such as the rdma transport).
.PP
A closed pipe on standard output is not an error.
"#;

fn man_page(cmd: &clap::Command, name: &str) -> anyhow::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone()).title(name.to_uppercase());
    let mut buf = Vec::new();
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    man.render_synopsis_section(&mut buf)?;
    man.render_description_section(&mut buf)?;
    man.render_options_section(&mut buf)?;
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut buf)?;
    }
    man.render_extra_section(&mut buf)?;
    buf.write_all(EXIT_STATUS.as_bytes())?;
    if cmd.get_version().is_some() || cmd.get_long_version().is_some() {
        man.render_version_section(&mut buf)?;
    }
    Ok(buf)
}

/// Writes `DIR/man/*.1` and `DIR/completions/*`.
pub fn write_all(out: &Path) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    cmd.build();
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    for d in [&man_dir, &comp_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let write = |path: std::path::PathBuf, bytes: &[u8]| -> anyhow::Result<()> {
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    write(man_dir.join("falcon.1"), &man_page(&cmd, "falcon")?)?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("falcon-{}", sub.get_name());
        let bin = format!("falcon {}", sub.get_name());
        // One page per subcommand, and per subcommand of it (falcon-failover-drill).
        for inner in sub
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            let inner_name = format!("{name}-{}", inner.get_name());
            let inner = inner
                .clone()
                .name(inner_name.clone())
                .bin_name(format!("{bin} {}", inner.get_name()));
            write(
                man_dir.join(format!("{inner_name}.1")),
                &man_page(&inner, &inner_name)?,
            )?;
        }
        let sub = sub.clone().name(name.clone()).bin_name(bin);
        write(man_dir.join(format!("{name}.1")), &man_page(&sub, &name)?)?;
    }
    for (shell, file) in [
        (Shell::Bash, "falcon.bash"),
        (Shell::Zsh, "_falcon"),
        (Shell::Fish, "falcon.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "falcon", &mut buf);
        write(comp_dir.join(file), &buf)?;
    }
    Ok(())
}
