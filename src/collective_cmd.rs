//! `ringtrain bench allreduce` and the hidden `ringtrain collective-peer`.
//!
//! The bench starts `--workers` copies of this very binary on 127.0.0.1, each
//! running `collective-peer`. A peer binds port 0, prints its address as one
//! JSON line (`{"event":"listening","rank":R,"addr":"127.0.0.1:P"}`), reads the
//! ring's addresses from one stdin line (`peers ADDR0 ADDR1 ...`), joins the
//! ring and runs its mode, printing one JSON line per result. The job token
//! travels in the `RINGTRAIN_TOKEN` environment variable, never on the command
//! line.
#![allow(clippy::print_stdout)] // reason: the peers' JSON lines and the bench table are this module's output

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use ringtrain_collective::{Communicator, GrpcConfig, ReduceOp};
use serde_json::json;

/// Environment variable carrying the job token to peers.
pub const TOKEN_ENV: &str = "RINGTRAIN_TOKEN";

/// `ringtrain bench allreduce`: nccl-tests style all-reduce figures.
#[derive(Args, Debug, Clone)]
pub struct BenchAllreduceArgs {
    /// Number of local worker processes in the ring.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Message sizes, comma-separated, with optional KiB/MiB suffix
    /// (default: 4 KiB to 64 MiB by factors of 4).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub bytes: Vec<usize>,
    /// Timed iterations per size (default: about 256 MiB of traffic, 5..=200).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed iterations per size before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Payload bytes per pipelined message.
    #[arg(long, default_value_t = ringtrain_collective::DEFAULT_PART_BYTES, value_parser = parse_size)]
    pub part_bytes: usize,
    /// Runtime threads per worker for network I/O.
    #[arg(long, default_value_t = 1)]
    pub io_threads: usize,
    /// Print one JSON line per size instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Run rank r inside network namespace NETNS[r] (`ip netns exec`), e.g. the simulated
    /// hosts of `cargo xtask cluster-sim up`; one per worker, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub netns: Vec<String>,
    /// Rank r serves its ring link on IP[r] (default 127.0.0.1); one per worker,
    /// comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub listen: Vec<String>,
    /// The rate of each rank's link in Gbit/s (e.g. a `tc` shaped 1gbit link): adds busbw
    /// as a fraction of it, the physical limit of a ring.
    #[arg(long)]
    pub link_gbit: Option<f64>,
    /// Mutual TLS on every link, with a CA made for the run (to measure what TLS costs).
    #[arg(long)]
    pub tls: bool,
}

/// What a peer does once the ring is up.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    /// Time all-reduces of `--sizes`; rank 0 prints one result line per size.
    Bench,
    /// All-reduce deterministic inputs once and print a digest of the result
    /// and whether it matches the documented ring order bit for bit.
    Check,
    /// All-reduce `--len` elements `--rounds` times (0 = until failure),
    /// printing a line after each round.
    Soak,
}

/// `ringtrain collective-peer` (hidden): one rank of a local ring.
#[derive(Args, Debug, Clone)]
pub struct PeerArgs {
    #[arg(long)]
    pub rank: usize,
    #[arg(long)]
    pub world: usize,
    #[arg(long, value_enum)]
    pub mode: PeerMode,
    /// Address to bind (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[arg(long, default_value = "local")]
    pub job_id: String,
    /// Shared job token.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    pub token: String,
    /// Receive deadline in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// How long to wait for the peer list and for the ring to come up.
    #[arg(long, default_value_t = 30_000)]
    pub connect_timeout_ms: u64,
    #[arg(long, default_value_t = ringtrain_collective::DEFAULT_PART_BYTES, value_parser = parse_size)]
    pub part_bytes: usize,
    #[arg(long, default_value_t = 1)]
    pub io_threads: usize,
    /// Bench: sizes in bytes.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Vec<usize>,
    #[arg(long)]
    pub iters: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Check/soak: elements of the buffer.
    #[arg(long, default_value_t = 1000)]
    pub len: usize,
    /// Check: seed of the inputs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Soak: rounds (0 = until failure).
    #[arg(long, default_value_t = 0)]
    pub rounds: u64,
    #[command(flatten)]
    pub tls: crate::certs_cmd::TlsArgs,
}

/// Parse `4096`, `4K`, `4KiB`, `64M`, `64MiB`, `1G`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 4KiB or 64MiB"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn default_iters(bytes: usize) -> usize {
    ((256usize << 20) / bytes.max(1)).clamp(5, 200)
}

/// Run one rank of a local ring (the hidden `collective-peer` subcommand).
pub fn run_peer(args: PeerArgs) -> anyhow::Result<()> {
    // A peer only moves bytes; BLAS threads would only compete for the cores.
    ringtrain_tensor::threads::set_blas_threads(1);
    let listener = std::net::TcpListener::bind(&args.listen).with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr().context("read the bound address")?;
    println!(
        "{}",
        json!({"event": "listening", "rank": args.rank, "addr": addr.to_string()})
    );

    let connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    let peers = read_peers(connect_timeout)?;
    if peers.len() != args.world {
        bail!("got {} peer addresses for a world of {}", peers.len(), args.world);
    }
    let mut config = GrpcConfig::new(args.rank, peers, args.job_id.clone(), args.token.clone());
    config.timeout = Duration::from_millis(args.timeout_ms);
    config.connect_timeout = connect_timeout;
    config.part_bytes = args.part_bytes;
    config.tls = args.tls.load()?;
    let mut comm = Communicator::connect(&config, listener, args.io_threads)
        .with_context(|| format!("rank {} joins the ring", args.rank))?;

    match args.mode {
        PeerMode::Bench => peer_bench(&mut comm, &args),
        PeerMode::Check => peer_check(&mut comm, &args),
        PeerMode::Soak => peer_soak(&mut comm, &args),
    }
}

/// One stdin line `peers ADDR...`, waited for at most `timeout`.
fn read_peers(timeout: Duration) -> anyhow::Result<Vec<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = std::io::stdin().lock().read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    let line = rx
        .recv_timeout(timeout)
        .map_err(|_| anyhow::anyhow!("no peer list on stdin within {timeout:?}"))?
        .context("read the peer list from stdin")?;
    let mut words = line.split_whitespace();
    if words.next() != Some("peers") {
        bail!("expected a line `peers ADDR0 ADDR1 ...` on stdin, got {line:?}");
    }
    Ok(words.map(str::to_owned).collect())
}

fn peer_bench(comm: &mut Communicator, args: &PeerArgs) -> anyhow::Result<()> {
    let n = comm.world();
    let expect = (1..=n).map(|r| r as f32).sum::<f32>() / n as f32;
    for &bytes in &args.sizes {
        let elems = (bytes / 4).max(1);
        // One buffer per size, filled once: the loop itself allocates nothing.
        let mut buf = vec![(comm.rank() + 1) as f32; elems];
        for _ in 0..args.warmup {
            comm.all_reduce_mean(&mut buf).context("warm-up all-reduce")?;
        }
        let iters = args.iters.unwrap_or_else(|| default_iters(bytes)).max(1);
        comm.barrier().context("barrier before timing")?;
        let mut total = Duration::ZERO;
        let mut best = Duration::MAX;
        for _ in 0..iters {
            let start = Instant::now();
            comm.all_reduce_mean(&mut buf).context("timed all-reduce")?;
            let took = start.elapsed();
            total += took;
            best = best.min(took);
        }
        // The mean of 1..=N is exact in f32 and a fixed point of the mean.
        if let Some(i) = buf.iter().position(|&v| v != expect) {
            bail!(
                "rank {}: element {i} is {} after the all-reduce, expected {expect}",
                comm.rank(),
                buf[i]
            );
        }
        if comm.rank() == 0 {
            println!(
                "{}",
                json!({
                    "event": "result", "bytes": elems * 4, "iters": iters,
                    "avg_us": total.as_secs_f64() * 1e6 / iters as f64,
                    "best_us": best.as_secs_f64() * 1e6,
                })
            );
        }
    }
    Ok(())
}

fn peer_check(comm: &mut Communicator, args: &PeerArgs) -> anyhow::Result<()> {
    let n = comm.world();
    let len = args.len;
    let inputs: Vec<Vec<f32>> = (0..n)
        .map(|r| ringtrain_collective::check_inputs(args.seed, r, len))
        .collect();
    let mut buf = inputs[comm.rank()].clone();
    comm.all_reduce(&mut buf, ReduceOp::Sum).context("all-reduce")?;

    // The documented order: chunk c is summed from rank c around the ring.
    let mut model = vec![0.0f32; len];
    for c in 0..n {
        let (base, extra) = (len / n, len % n);
        let start = c * base + c.min(extra);
        for i in start..start + base + usize::from(c < extra) {
            let mut acc = inputs[c][i];
            for j in 1..n {
                acc += inputs[(c + j) % n][i];
            }
            model[i] = acc;
        }
    }
    let matches_model = buf.iter().zip(&model).all(|(a, b)| a.to_bits() == b.to_bits());
    let mut max_err = 0.0f64;
    for (i, v) in buf.iter().enumerate() {
        let seq: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
        max_err = max_err.max((f64::from(*v) - seq).abs());
    }
    let digest = buf.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3)
    });
    println!(
        "{}",
        json!({
            "event": "check", "rank": comm.rank(), "len": len,
            "digest": format!("{digest:016x}"), "matches_model": matches_model,
            "max_abs_err_vs_f64_sum": max_err,
        })
    );
    Ok(())
}

fn peer_soak(comm: &mut Communicator, args: &PeerArgs) -> anyhow::Result<()> {
    let mut buf = vec![1.0f32; args.len];
    let mut round = 0u64;
    while args.rounds == 0 || round < args.rounds {
        comm.all_reduce_mean(&mut buf)
            .with_context(|| format!("round {round}"))?;
        round += 1;
        println!("{}", json!({"event": "round", "rank": comm.rank(), "round": round}));
    }
    Ok(())
}

/// Children of the bench, killed when dropped (also on error paths).
struct Peers {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    lines: mpsc::Receiver<(usize, String)>,
}

impl Drop for Peers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Peers {
    /// Starts rank r inside `netns[r]` when given, listening on `listen[r]`:0 when given.
    fn spawn(
        n: usize,
        token: &str,
        extra: &[String],
        (netns, listen): (&[String], &[String]),
        env: &[(&'static str, std::path::PathBuf)],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("find the ringtrain executable")?;
        let (tx, lines) = mpsc::channel();
        let mut peers = Peers {
            children: Vec::new(),
            stdins: Vec::new(),
            lines,
        };
        for rank in 0..n {
            let mut command = match netns.get(rank) {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(&exe);
                    c
                }
                None => Command::new(&exe),
            };
            let listen: Vec<String> = listen
                .get(rank)
                .map(|ip| vec!["--listen".to_owned(), format!("{ip}:0")])
                .unwrap_or_default();
            let mut child = command
                .arg("collective-peer")
                .args(&listen)
                .args(["--rank", &rank.to_string(), "--world", &n.to_string()])
                .args(extra)
                .env(TOKEN_ENV, token)
                .envs(env.iter().cloned())
                // The peers only move bytes: no BLAS or rayon threads competing for the cores.
                .env("RINGTRAIN_THREADS", "1")
                // Otherwise OpenBLAS starts an idle server thread per process at load time, which
                // spins on sched_yield (~13% of the CPU of a 2-process 4 MiB run on 2 cores).
                .env("OPENBLAS_NUM_THREADS", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("start peer {rank} ({})", exe.display()))?;
            peers.stdins.push(child.stdin.take());
            let stdout = child.stdout.take().context("peer stdout")?;
            peers.children.push(child);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((rank, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(peers)
    }

    /// Next JSON line from any peer, within `deadline`.
    fn next(&mut self, deadline: Instant) -> anyhow::Result<(usize, serde_json::Value)> {
        let left = deadline.saturating_duration_since(Instant::now());
        let (rank, line) = self.lines.recv_timeout(left).map_err(|_| {
            let exited: Vec<String> = self
                .children
                .iter_mut()
                .enumerate()
                .filter_map(|(r, c)| c.try_wait().ok().flatten().map(|s| format!("rank {r} exited with {s}")))
                .collect();
            anyhow::anyhow!(
                "no output from the peers in time; {}",
                if exited.is_empty() {
                    "all still running".into()
                } else {
                    exited.join(", ")
                }
            )
        })?;
        let value = serde_json::from_str(&line).with_context(|| format!("rank {rank} printed {line:?}"))?;
        Ok((rank, value))
    }

    fn wait_all(&mut self, deadline: Instant) -> anyhow::Result<()> {
        for (rank, child) in self.children.iter_mut().enumerate() {
            loop {
                if let Some(status) = child.try_wait().context("wait for a peer")? {
                    if !status.success() {
                        bail!("rank {rank} failed with {status} (its error is above)");
                    }
                    break;
                }
                if Instant::now() > deadline {
                    bail!("rank {rank} did not finish in time");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

/// A token that differs per run (not a secret worth more than the loopback it guards).
fn local_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{}-{nanos:x}", std::process::id())
}

/// `ringtrain bench allreduce`.
pub fn run_bench_allreduce(args: BenchAllreduceArgs) -> anyhow::Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    for (flag, list) in [("--netns", &args.netns), ("--listen", &args.listen)] {
        if !list.is_empty() && list.len() != args.workers {
            bail!("{flag} names {} ranks for --workers {}", list.len(), args.workers);
        }
    }
    if args.link_gbit.is_some_and(|g| !g.is_finite() || g <= 0.0) {
        bail!("--link-gbit must be positive");
    }
    let sizes: Vec<usize> = if args.bytes.is_empty() {
        // 4 KiB, 16 KiB, ..., 16 MiB, 64 MiB.
        (0..8).map(|i| 4096usize << (2 * i)).collect()
    } else {
        args.bytes.clone()
    };
    // This process only waits for its children: keep OpenBLAS's idle threads off the cores.
    ringtrain_tensor::threads::set_blas_threads(1);
    let n = args.workers;
    let size_list: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let mut extra = vec![
        "--mode".to_owned(),
        "bench".to_owned(),
        "--job-id".to_owned(),
        "bench".to_owned(),
        "--sizes".to_owned(),
        size_list.join(","),
        "--warmup".to_owned(),
        args.warmup.to_string(),
        "--part-bytes".to_owned(),
        args.part_bytes.to_string(),
        "--io-threads".to_owned(),
        args.io_threads.to_string(),
    ];
    if let Some(iters) = args.iters {
        extra.extend(["--iters".to_owned(), iters.to_string()]);
    }
    let tls = args
        .tls
        .then(crate::certs_cmd::Throwaway::new)
        .transpose()
        .context("make the run's TLS certificates")?;
    let env = tls.as_ref().map(|t| t.env().to_vec()).unwrap_or_default();
    let mut peers = Peers::spawn(n, &local_token(), &extra, (&args.netns, &args.listen), &env)?;

    let startup = Instant::now() + Duration::from_secs(30);
    let mut addrs = vec![String::new(); n];
    let mut seen = 0;
    while seen < n {
        let (rank, v) = peers.next(startup)?;
        if v["event"] == "listening" {
            addrs[rank] = v["addr"].as_str().context("listening line without addr")?.to_owned();
            seen += 1;
        }
    }
    let line = format!("peers {}\n", addrs.join(" "));
    for (rank, stdin) in peers.stdins.iter_mut().enumerate() {
        let mut stdin = stdin.take().context("peer stdin")?;
        stdin
            .write_all(line.as_bytes())
            .with_context(|| format!("send the peer list to rank {rank}"))?;
    }

    let factor = 2.0 * (n as f64 - 1.0) / n as f64;
    if !args.json {
        let hosts = if args.netns.is_empty() {
            "127.0.0.1".to_owned()
        } else {
            format!("network namespaces {}", args.netns.join(","))
        };
        println!(
            "# ringtrain bench allreduce: {n} workers on {hosts}, float32 mean, gRPC ring, parts of {}",
            human(args.part_bytes)
        );
        println!("# busbw = algbw x 2(N-1)/N (nccl-tests); GB/s = 1e9 bytes/s");
        if let Some(g) = args.link_gbit {
            println!("# of_link = busbw / link rate ({g} Gbit/s = {:.3} GB/s)", g / 8.0);
        }
        println!(
            "{:>10} {:>12} {:>6} {:>12} {:>12} {:>12} {:>12} {:>12}{}",
            "size",
            "count",
            "iters",
            "avg_us",
            "best_us",
            "algbw_GB/s",
            "busbw_GB/s",
            "best_busbw",
            if args.link_gbit.is_some() { "      of_link" } else { "" }
        );
    }
    let mut results = 0;
    // Generous: the largest size at a pessimistic 20 MB/s, times the iterations.
    let per_size = |bytes: usize| Duration::from_secs(30) + Duration::from_secs_f64(bytes as f64 / 20e6 * 250.0);
    let mut deadline = Instant::now() + per_size(sizes[0]);
    while results < sizes.len() {
        let (rank, v) = peers.next(deadline)?;
        if v["event"] != "result" {
            continue;
        }
        let bytes = v["bytes"].as_u64().context("result without bytes")? as f64;
        let avg = v["avg_us"].as_f64().context("result without avg_us")?;
        let best = v["best_us"].as_f64().context("result without best_us")?;
        let iters = v["iters"].as_u64().unwrap_or(0);
        let algbw = bytes / (avg * 1e-6) / 1e9;
        let busbw = algbw * factor;
        let best_busbw = bytes / (best * 1e-6) / 1e9 * factor;
        // GB/s over the link's GB/s (Gbit/s / 8).
        let of_link = args.link_gbit.map(|g| busbw / (g / 8.0));
        if args.json {
            println!(
                "{}",
                json!({"workers": n, "bytes": bytes, "iters": iters, "avg_us": avg, "best_us": best,
                       "algbw_gbps": algbw, "busbw_gbps": busbw, "best_busbw_gbps": best_busbw, "rank": rank,
                       "link_gbit": args.link_gbit, "of_link": of_link})
            );
        } else {
            println!(
                "{:>10} {:>12} {:>6} {:>12.1} {:>12.1} {:>12.3} {:>12.3} {:>12.3}{}",
                human(bytes as usize),
                bytes as usize / 4,
                iters,
                avg,
                best,
                algbw,
                busbw,
                best_busbw,
                of_link.map_or(String::new(), |f| format!("{f:>13.3}"))
            );
        }
        results += 1;
        if let Some(&next) = sizes.get(results) {
            deadline = Instant::now() + per_size(next);
        }
    }
    peers.wait_all(Instant::now() + Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert!(parse_size("4 parsecs").is_err());
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(100), "100 B");
    }
}
