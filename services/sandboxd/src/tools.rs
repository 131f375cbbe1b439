//! Running the host's tools (`ip`, `iptables`, `mount`, `btrfs`) and reading their verdict.

use std::path::Path;
use std::process::Command;

/// Runs `args[0]` with the rest; its stdout on success, its stderr in the error otherwise.
pub fn run(args: &[&str]) -> std::io::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(std::io::Error::other(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether something is mounted at `path`.
pub fn is_mountpoint(path: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}
