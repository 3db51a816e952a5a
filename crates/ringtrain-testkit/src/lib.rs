//! Simulated hosts on one machine, for the tests and benches of what crosses a network.
//!
//! A [`Cluster`] is N Linux network namespaces (the hosts) plugged into a switch: a bridge in
//! a namespace of its own. Each host has loopback and one interface, `eth0`, with the address
//! `10.77.0.(i+1)/24`. Nothing routes out of the switch, so no packet leaves the cluster, and
//! two clusters never see each other (each switch is its own namespace, so their addresses may
//! repeat).
//!
//! ```text
//!   {name}-h0  eth0 10.77.0.1 ──veth── p0 ┐
//!   {name}-h1  eth0 10.77.0.2 ──veth── p1 ├── br0   (in {name}-sw)
//!   {name}-h2  eth0 10.77.0.3 ──veth── p2 ┘
//! ```
//!
//! * **Rate:** a `tbf` qdisc on both ends of a host's link (its `eth0` egress and its switch
//!   port's egress, which is the host's ingress) makes a full-duplex link of that rate, as a
//!   NIC of that speed would. `netem` (delay, loss) is not available on every kernel; `tbf` is.
//! * **Cut:** [`Cluster::cut`] sets a host's `eth0` down: its packets vanish, nobody gets a
//!   reset, as when a cable is pulled or a switch port dies (unlike a killed process, whose
//!   kernel closes its connections).
//! * **Lifetime:** dropping a `Cluster` deletes its namespaces (processes still inside keep
//!   theirs alive until they exit, so kill them first). Names carry the creating process id
//!   (`rt{pid}x{n}`), so parallel test processes never collide, and namespaces left by a run
//!   that was killed are recognised by their dead pid and removed by the next
//!   [`Cluster::for_test`].
//!
//! Needs root and iproute2 (`ip`, `tc`); [`Cluster::check_available`] says which is missing.
//! Runs commands, so it is for tests, benches and `cargo xtask cluster-sim` only.
//!
//! Also [`shared_data`]: the tests' way to the datasets of `../shared/data`.

use std::ffi::OsStr;
use std::fmt;
use std::net::Ipv4Addr;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `SUB` of the shared datasets (`../shared/data/SUB` beside the checkout whose root is
/// `repo`), or `None` when it is missing: then the test returns early and a skip line goes
/// straight to the terminal (past the test harness's capture, so a green run says what it did
/// not check). Under `CI=true` a missing dataset fails the test instead: CI has the data, and a
/// test that asserts nothing must not pass there.
///
/// # Panics
/// Under `CI=true`, when the dataset is missing.
pub fn shared_data(repo: &std::path::Path, sub: &str) -> Option<std::path::PathBuf> {
    use std::io::Write;
    let dir = repo.join("../shared/data").join(sub);
    if dir.exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} not found (CI=true: the shared datasets must be there)",
        dir.display()
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED: {} not found", dir.display());
    None
}

/// The host interface's name, the same in every host.
pub const DEV: &str = "eth0";

/// What went wrong while building or changing a cluster.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command (`ip`, `tc`) could not run or failed.
    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },
    /// Network namespaces need root.
    #[error("simulated hosts need root (network namespaces); this process runs as uid {uid}")]
    NotRoot { uid: String },
    /// A rate that is not like `1gbit`.
    #[error("bad link rate {text:?}: {reason}")]
    Rate { text: String, reason: String },
    /// More hosts than the /24 has addresses, or none.
    #[error("a cluster has 1 to 250 hosts, not {hosts}")]
    Hosts { hosts: usize },
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// A link rate in bits per second, written like tc's rates: `1gbit`, `10gbit`, `500mbit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub bits_per_sec: u64,
}

impl Rate {
    /// The rate in bytes per second.
    pub fn bytes_per_sec(self) -> f64 {
        self.bits_per_sec as f64 / 8.0
    }

    /// tbf's bucket: 2 ms at the rate, at least 128 KiB, so one segmentation-offloaded
    /// packet (up to 64 KiB) always fits and the timer's granularity does not cap the rate.
    fn burst_bytes(self) -> u64 {
        (self.bits_per_sec / 8 / 500).max(128 << 10)
    }
}

impl FromStr for Rate {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Rate> {
        let t = s.trim().to_ascii_lowercase();
        let bad = |reason: &str| NetError::Rate {
            text: s.to_owned(),
            reason: reason.to_owned(),
        };
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| bad("expected a number and a unit, like 1gbit"))?;
        let mult = match unit {
            "bit" => 1,
            "kbit" => 1_000,
            "mbit" => 1_000_000,
            "gbit" => 1_000_000_000,
            _ => return Err(bad("the unit must be bit, kbit, mbit or gbit")),
        };
        match n.checked_mul(mult) {
            Some(0) | None => Err(bad("must be positive and below 2^64 bit/s")),
            Some(bits_per_sec) => Ok(Rate { bits_per_sec }),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bits_per_sec;
        if b.is_multiple_of(1_000_000_000) {
            write!(f, "{}gbit", b / 1_000_000_000)
        } else if b.is_multiple_of(1_000_000) {
            write!(f, "{}mbit", b / 1_000_000)
        } else {
            write!(f, "{b}bit")
        }
    }
}

/// One simulated host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub netns: String,
    /// The address of its `eth0`.
    pub ip: Ipv4Addr,
}

/// N hosts on one switch; see the crate docs. Removed when dropped unless [`Cluster::keep`]
/// was called.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    hosts: Vec<Host>,
    rate: Option<Rate>,
    keep: bool,
}

impl Cluster {
    /// `Ok` when this process can make namespaces: root, `ip` and `tc` run, and a probe
    /// namespace can be made and removed (a container without the capability cannot).
    pub fn check_available() -> Result<()> {
        let uid = output(Command::new("id").arg("-u"))?;
        if uid.trim() != "0" {
            return Err(NetError::NotRoot { uid: uid.trim().into() });
        }
        output(Command::new("ip").arg("-V"))?;
        output(Command::new("tc").arg("-V"))?;
        static PROBE: AtomicUsize = AtomicUsize::new(0);
        let probe = format!(
            "rt{}x{}-probe",
            std::process::id(),
            1_000_000 + PROBE.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &probe])?;
        ip(&["netns", "del", &probe])
    }

    /// A cluster for one test: a fresh name unique to this process, after removing what
    /// killed runs left behind.
    pub fn for_test(hosts: usize, rate: Option<Rate>) -> Result<Cluster> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        remove_stale()?;
        let name = format!("rt{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        Cluster::create(&name, hosts, rate)
    }

    /// Builds `hosts` hosts named `{name}-h{i}` on a switch `{name}-sw`. Whatever was made is
    /// removed again when a step fails.
    pub fn create(name: &str, hosts: usize, rate: Option<Rate>) -> Result<Cluster> {
        if !(1..=250).contains(&hosts) {
            return Err(NetError::Hosts { hosts });
        }
        // Built in place, so an early return drops (and removes) what exists so far.
        let mut cluster = Cluster {
            name: name.to_owned(),
            hosts: Vec::with_capacity(hosts),
            rate,
            keep: false,
        };
        let sw = cluster.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let netns = format!("{name}-h{i}");
            let ip_addr = Ipv4Addr::new(10, 77, 0, i as u8 + 1);
            let port = format!("p{i}");
            ip(&["netns", "add", &netns])?;
            cluster.hosts.push(Host {
                netns: netns.clone(),
                ip: ip_addr,
            });
            ip(&[
                "-n", &netns, "link", "add", DEV, "type", "veth", "peer", "name", &port, "netns", &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &netns, "addr", "add", &format!("{ip_addr}/24"), "dev", DEV])?;
            ip(&["-n", &netns, "link", "set", DEV, "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        }
        if let Some(rate) = rate {
            cluster.set_rate(rate)?;
        }
        Ok(cluster)
    }

    /// The cluster's name (the prefix of its namespaces).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hosts, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The rate every link is limited to, if any.
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.name)
    }

    /// `program` to be run inside host `host` (`ip netns exec NETNS program`); add arguments
    /// and environment as to any command. `ip netns exec` replaces itself with the program,
    /// so the child's pid is the program's.
    pub fn command(&self, host: usize, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host].netns]).arg(program);
        c
    }

    /// Limits every link (both directions) to `rate`.
    pub fn set_rate(&mut self, rate: Rate) -> Result<()> {
        let (r, burst) = (rate.to_string(), rate.burst_bytes().to_string());
        let sw = self.switch();
        for (i, h) in self.hosts.iter().enumerate() {
            let port = format!("p{i}");
            for (ns, dev) in [(h.netns.as_str(), DEV), (sw.as_str(), port.as_str())] {
                tc(&[
                    "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &r, "burst", &burst, "latency",
                    "25ms",
                ])?;
            }
        }
        self.rate = Some(rate);
        Ok(())
    }

    /// Cuts host `host` off the network: its `eth0` goes down, so its packets vanish and its
    /// peers receive nothing, not even a reset.
    pub fn cut(&self, host: usize) -> Result<()> {
        ip(&["-n", &self.hosts[host].netns, "link", "set", DEV, "down"])
    }

    /// Leaves the namespaces in place when dropped (for `cargo xtask cluster-sim up`);
    /// [`remove`] takes them down later.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.keep {
            let _ = remove(&self.name);
        }
    }
}

/// Deletes every namespace of the cluster `name`; returns how many there were.
pub fn remove(name: &str) -> Result<usize> {
    let prefix = format!("{name}-");
    let mine: Vec<String> = namespaces()?.into_iter().filter(|n| n.starts_with(&prefix)).collect();
    for n in &mine {
        ip(&["netns", "del", n])?;
    }
    Ok(mine.len())
}

/// Removes the clusters of [`Cluster::for_test`] whose creating process is gone.
pub fn remove_stale() -> Result<()> {
    for n in namespaces()? {
        let Some(pid) = n
            .strip_prefix("rt")
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Another test process may be removing it at the same moment.
            let _ = ip(&["netns", "del", &n]);
        }
    }
    Ok(())
}

/// The names in `ip netns list` (each line is `NAME` or `NAME (id: K)`).
pub fn namespaces() -> Result<Vec<String>> {
    Ok(output(Command::new("ip").args(["netns", "list"]))?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn ip(args: &[&str]) -> Result<()> {
    output(Command::new("ip").args(args)).map(drop)
}

fn tc(args: &[&str]) -> Result<()> {
    output(Command::new("tc").args(args)).map(drop)
}

/// Runs `cmd` to completion; its stdout, or an error with the command line and its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|e| NetError::Command {
        command: command.clone(),
        reason: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            reason: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_tc_and_print_back() {
        assert_eq!("1gbit".parse::<Rate>().unwrap().bits_per_sec, 1_000_000_000);
        assert_eq!("10Gbit".parse::<Rate>().unwrap().to_string(), "10gbit");
        assert_eq!("500mbit".parse::<Rate>().unwrap().bytes_per_sec(), 62_500_000.0);
        for bad in ["", "gbit", "1", "1gb", "0mbit", "99999999999gbit"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_bucket_holds_an_offloaded_packet_and_two_milliseconds() {
        assert_eq!("1gbit".parse::<Rate>().unwrap().burst_bytes(), 250_000);
        assert_eq!("100mbit".parse::<Rate>().unwrap().burst_bytes(), 128 << 10);
    }
}
