//! Mutual TLS through the real binary: `ringtrain certs`, a coordinator and workers that
//! only let in holders of a certificate the cluster CA signed, and the token as a second
//! factor. Every wait has a deadline.

use std::path::Path;
use std::time::Duration;

use crate::cluster::{iris_job, s, start, start_coordinator, MINUTE};
use crate::util::{ok, Proc};

/// A CA and one host certificate in `dir` (`ringtrain certs`).
fn certs(dir: &Path) {
    ok(&["certs", "--out", s(dir), "--host", "node"]);
    for f in ["ca.pem", "ca-key.pem", "node.pem", "node-key.pem"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
}

fn tls_args(dir: &Path) -> Vec<String> {
    [
        ("--tls-ca", "ca.pem"),
        ("--tls-cert", "node.pem"),
        ("--tls-key", "node-key.pem"),
    ]
    .iter()
    .flat_map(|(flag, file)| [(*flag).to_owned(), dir.join(file).display().to_string()])
    .collect()
}

/// A worker with `extra` flags and `token`, expected to be turned away: its error line.
fn refused(addr: &str, extra: &[String], token: &str) -> String {
    let mut args = vec![
        "worker",
        "--coordinator",
        addr,
        "--peer-addr",
        "127.0.0.1:0",
        "--connect-timeout-ms",
        "2000",
    ];
    args.extend(extra.iter().map(String::as_str));
    let mut w = start(&args, token);
    let (status, _, err) = w.finish(MINUTE);
    assert_eq!(status.code(), Some(1), "{}", w.describe());
    err.lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line\n{}", w.describe()))
        .to_owned()
}

#[test]
fn a_tls_job_trains_bitwise_identical_and_turns_away_strangers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    certs(&ours);
    certs(&theirs);
    let job = iris_job(tmp.path(), "tls", &[("epochs = 100", "epochs = 20")]);
    let out = tmp.path().join("run");
    let token = "tls-token";
    let tls = tls_args(&ours);
    let mut args = vec!["--workers", "2", s(&job), "--out", s(&out)];
    args.extend(tls.iter().map(String::as_str));
    let (mut coordinator, addr) = start_coordinator(&args, token);

    // Without TLS: the coordinator drops the connection; the worker says why it may be.
    let line = refused(&addr, &[], token);
    assert!(
        line.contains(&addr) && line.contains("with TLS, both sides need"),
        "{line}"
    );
    // A certificate from another CA: the coordinator's certificate fails the worker's check.
    let line = refused(&addr, &tls_args(&theirs), token);
    assert!(
        line.contains(&addr) && line.contains("invalid peer certificate"),
        "{line}"
    );
    // The right certificate, the wrong token: the token is checked too.
    let line = refused(&addr, &tls_args(&ours), "not-the-token");
    assert!(line.contains(&addr) && line.contains("wrong job token"), "{line}");

    let mut worker_args = vec!["worker", "--coordinator", &addr, "--peer-addr", "127.0.0.1:0"]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    worker_args.extend(tls_args(&ours));
    let worker_args: Vec<&str> = worker_args.iter().map(String::as_str).collect();
    let mut workers: Vec<Proc> = (0..2).map(|_| start(&worker_args, token)).collect();
    let (status, printed, _) = coordinator.finish(2 * MINUTE);
    assert!(status.success(), "{}", coordinator.describe());
    assert!(
        printed.contains("2 workers,") && printed.contains("bitwise identical"),
        "{printed}"
    );
    for w in &mut workers {
        let (status, _, _) = w.finish(Duration::from_secs(30));
        assert!(status.success(), "{}", w.describe());
    }
}
