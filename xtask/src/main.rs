//! `cargo xtask`: the project's two commands and their set-up.
//!
//! - `cargo xtask demo`: install what is missing, build, train the main job, print metrics.
//! - `cargo xtask ci`: install what is missing, then formatting, lints and the whole test suite
//!   (what `.ci/run` runs).
//!
//! System packages come from Debian's apt. As root they are installed directly; otherwise
//! through `sudo -n` when passwordless sudo is available; otherwise the command stops and
//! prints the one `apt-get` line a user must run.
#![allow(clippy::print_stdout)] // reason: a developer tool that reports what it does

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the build needs: OpenBLAS (linked by `openblas-src` with its `system`
/// feature, so nothing is downloaded at build time) and pkg-config to find it.
const APT_PACKAGES: &[&str] = &["libopenblas-dev", "pkg-config"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    std::env::set_current_dir(&root).with_context(|| format!("enter {}", root.display()))?;
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("ci") => ci(),
        Some("deps") => ensure_system_packages(),
        _ => {
            println!("usage: cargo xtask <demo|ci|deps>");
            println!("  demo  install missing system packages, build, train the main job");
            println!("  ci    install missing system packages, check formatting and lints, run all tests");
            println!("  deps  only install missing system packages");
            Ok(())
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn demo(extra: &[String]) -> Result<()> {
    ensure_system_packages()?;
    run(Command::new("cargo").args(["build", "--bin", "ringtrain"]))?;
    let mut cmd = Command::new("target/debug/ringtrain");
    // The main job: a local two-worker cluster (coordinator + 2 worker processes, ring all-reduce).
    cmd.args([
        "launch",
        "--workers",
        "2",
        "examples/iris-mlp.toml",
        "--out",
        "runs/iris-mlp",
    ])
    .args(extra);
    run(&mut cmd)
}

fn ci() -> Result<()> {
    ensure_system_packages()?;
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run(Command::new("cargo").args(["test", "--workspace", "--no-fail-fast"]))
}

fn ensure_system_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("missing system packages {missing:?} and no apt-get here: install OpenBLAS and pkg-config with your package manager");
    }
    println!("xtask: installing {}", missing.join(" "));
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    let prefix: Vec<&str> = if is_root {
        Vec::new()
    } else if Command::new("sudo")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        vec!["sudo", "-n"]
    } else {
        bail!(
            "missing system packages; run: sudo apt-get update && sudo apt-get install -y {}",
            missing.join(" ")
        );
    };
    let apt = |args: &[&str]| -> Result<()> {
        let mut all = prefix.clone();
        all.push("apt-get");
        all.extend_from_slice(args);
        let mut cmd = Command::new(all[0]);
        cmd.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<()> {
    println!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
