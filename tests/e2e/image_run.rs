//! The container image `make image` builds (scripts/build-image.sh) runs the way the DaemonSet
//! runs it, in a real containerd with runc: the store-owner init container's `chown` and the
//! installer's `setup` as root, then the facade as the image's non-root user on a read-only root
//! filesystem with the DaemonSet's arguments and an installer-shaped config; it becomes ready,
//! a workspace is pulled through it from a real upstream registry (skopeo and containerd), the
//! preStop hook's `sleep` runs, and SIGTERM ends it cleanly as PID 1.
//!
//! `ctr run` (containerd 1.6) has no `--user` and replaces the whole argv, so the root steps run
//! with `ctr tasks exec --user 0` in a container of the image, and argv is built the way kubelet
//! builds it: the image's `Entrypoint` followed by the pod's `args`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use registry_facade::setup::{CA_FILE, INSTALLER_CA, hosts_toml};
use serde_json::json;
use test_support::cargo_bin::cargo_bin;
use test_support::containerd::{Containerd, SNAPSHOTTER};
use test_support::proc::{free_port, have, run_bytes};
use test_support::registry::Registry;
use test_support::skopeo;
use yaml_rust2::{Yaml, YamlLoader};

const TAG: &str = "e2e";
/// The name `ctr images import` gives the archive's image (its index.json's ref.name).
const IMAGE: &str = "docker.io/library/registry-facade:e2e";
/// The DaemonSet's facade user (deploy/kubernetes/daemonset.yaml).
const FACADE_UID: u32 = 65532;
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
const CTR_TIMEOUT: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longer than the config's `facade.shutdownGrace` (5s below): SIGTERM must end the process.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const STORE: &str = "/var/cache/registry-facade";
const CONFIG_DIR: &str = "/etc/registry-facade/config";
const PULL_SECRET_DIR: &str = "/etc/registry-facade/pull-secret";
const SETUP_HOST: &str = "reg.example.test";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `scripts/build-image.sh` on the debug binary (debug info stripped), into `out`.
fn build_image(bin: &Path, out: &Path) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/build-image.sh")).arg("--binary").arg(bin).arg("--out").arg(out).args([
        "--tag",
        TAG,
        "--strip-debug",
    ]);
    String::from_utf8(run_bytes(cmd, BUILD_TIMEOUT).unwrap()).unwrap()
}

/// A container of the image with its task; killed and deleted on drop (runc shims outlive
/// containerd, so a task left behind would keep running after the test).
struct Task<'a> {
    ctr: &'a Containerd,
    id: String,
    log: PathBuf,
}

/// A bind mount: host path, container path, read-only.
type Mount<'p> = (&'p Path, &'p str, bool);

impl<'a> Task<'a> {
    /// `ctr run --detach` with host networking and a read-only root filesystem, as the
    /// DaemonSet's containers run (`readOnlyRootFilesystem: true`).
    fn run(ctr: &'a Containerd, id: &str, mounts: &[Mount<'_>], argv: &[String], log: PathBuf) -> Task<'a> {
        let mut cmd = ctr.ctr();
        cmd.args(["run", "--detach", "--snapshotter", SNAPSHOTTER, "--net-host", "--read-only"]);
        cmd.arg("--log-uri").arg(format!("file://{}", log.display()));
        for (src, dst, ro) in mounts {
            let mode = if *ro { "ro" } else { "rw" };
            cmd.arg("--mount").arg(format!("type=bind,src={},dst={dst},options=rbind:{mode}", src.display()));
        }
        cmd.arg(IMAGE).arg(id).args(argv);
        // The guard exists before the container does, so a half-created one is cleaned up too.
        let task = Task { ctr, id: id.to_string(), log };
        run_bytes(cmd, CTR_TIMEOUT).unwrap_or_else(|e| panic!("ctr run {id}: {e}\n{}", ctr.log()));
        task
    }

    /// (pid, status) from `ctr tasks ls`, or `None` when there is no task.
    fn state(&self) -> Option<(u32, String)> {
        let mut cmd = self.ctr.ctr();
        cmd.args(["tasks", "ls"]);
        let out = String::from_utf8(run_bytes(cmd, CTR_TIMEOUT).ok()?).ok()?;
        out.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 3 && cols[0] == self.id).then(|| (cols[1].parse().unwrap_or(0), cols[2].to_string()))
        })
    }

    fn is_running(&self) -> bool {
        self.state().is_some_and(|(_, s)| s == "RUNNING")
    }

    /// Waits (bounded) until the task is no longer running.
    fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// `ctr tasks exec` of `argv` in this container, as `user` (the container's own user when
    /// `None`); returns stdout, fails with the exit status and output.
    fn exec(&self, exec_id: &str, user: Option<&str>, argv: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.ctr.ctr();
        cmd.args(["tasks", "exec", "--exec-id", exec_id]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        cmd.arg(&self.id).args(argv);
        Ok(String::from_utf8_lossy(&run_bytes(cmd, CTR_TIMEOUT)?).into_owned())
    }

    /// Deletes the stopped task; returns what `ctr` said on stderr (it warns about a non-zero
    /// exit status there).
    fn delete(&self) -> String {
        let mut cmd = self.ctr.ctr();
        cmd.args(["tasks", "delete", &self.id]);
        let (_, _, stderr) = output(cmd, CTR_TIMEOUT);
        stderr
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Task<'_> {
    fn drop(&mut self) {
        if self.state().is_some() {
            let mut kill = self.ctr.ctr();
            kill.args(["tasks", "kill", "--signal", "SIGKILL", &self.id]);
            let _ = output(kill, CTR_TIMEOUT);
            self.wait_stopped(Duration::from_secs(10));
            let mut rm = self.ctr.ctr();
            rm.args(["tasks", "delete", "--force", &self.id]);
            let _ = output(rm, CTR_TIMEOUT);
        }
        let mut rm = self.ctr.ctr();
        rm.args(["containers", "delete", &self.id]);
        let _ = output(rm, CTR_TIMEOUT);
    }
}

/// Runs `cmd` with a time limit; (success, stdout, stderr). For `ctr` calls whose stderr matters
/// even when they succeed. Their output is small, so waiting before reading cannot block them.
fn output(mut cmd: Command, timeout: Duration) -> (bool, String, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let Ok(mut child) = cmd.spawn() else { return (false, String::new(), "cannot spawn".into()) };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status.is_some_and(|s| s.success()), out, err)
}

/// The status of `GET path` on `addr`, or `None` when nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The first document of a YAML file under deploy/kubernetes.
fn k8s_yaml(name: &str) -> Yaml {
    let text = std::fs::read_to_string(repo_root().join("deploy/kubernetes").join(name)).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().unwrap_or_else(|| panic!("not a list: {y:?}")).iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// A directory the container user may read (bind mounts keep host modes).
fn world_readable_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn write_readable(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Regular files under `dir` with their owner uid.
fn owners(dir: &Path) -> BTreeMap<PathBuf, u32> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                found.insert(e.path(), md.uid());
            }
        }
    }
    found
}

/// What the image is made of, read back from its OCI layout (every blob checked against its
/// digest): the DaemonSet's expectations of user, entrypoint and environment, and every file
/// the three containers need.
fn check_layout(layout: &Path, bin: &Path) -> Vec<String> {
    let image = skopeo::read_oci_layout(layout, TAG).unwrap();
    let cfg = &image.config["config"];
    assert_eq!(cfg["User"], json!(format!("{FACADE_UID}:{FACADE_UID}")));
    let entrypoint: Vec<String> = serde_json::from_value(cfg["Entrypoint"].clone()).unwrap();
    assert_eq!(entrypoint, ["/usr/local/bin/registry-facade"]);
    let env: Vec<&str> = cfg["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"), "{env:?}");
    let path = env.iter().find_map(|e| e.strip_prefix("PATH=")).expect("PATH in Env");
    assert!(path.split(':').any(|d| d == "/usr/bin"), "chown and sleep are found on PATH {path}");
    assert_eq!(cfg["Labels"]["org.opencontainers.image.title"], "registry-facade");
    assert_eq!(image.manifest["annotations"]["org.opencontainers.image.title"], "registry-facade");
    assert_eq!(image.config["os"], "linux");

    let rootfs = image.rootfs();
    for f in ["usr/local/bin/registry-facade", "usr/bin/chown", "usr/bin/sleep", "lib64/ld-linux-x86-64.so.2"] {
        assert!(rootfs.contains_key(f), "the image has no {f}");
    }
    assert_eq!(
        rootfs["etc/ssl/certs/ca-certificates.crt"],
        std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap(),
        "the build machine's CA bundle"
    );
    assert!(String::from_utf8_lossy(&rootfs["etc/passwd"]).contains(&format!(":{FACADE_UID}:{FACADE_UID}:")));
    // Every library the binary loads is in the image at the path the loader looks for it.
    let mut ldd = Command::new("ldd");
    ldd.arg(bin);
    let ldd = String::from_utf8(run_bytes(ldd, CTR_TIMEOUT).unwrap()).unwrap();
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        assert!(rootfs.contains_key(lib.trim_start_matches('/')), "{lib} (from ldd) is not in the image");
    }
    entrypoint
}

#[test]
fn image_runs_as_the_daemonset_runs_it_and_serves_a_pull() {
    // `make test` installs containerd (runc comes with it) and umoci, and CI runs as root; a
    // machine without them fails here loudly rather than skipping.
    assert!(Containerd::available(), "containerd/ctr missing or not root: run `make deps` as root");
    assert!(have("umoci") && have("runc"), "umoci or runc missing: run `make deps` as root");

    // The image, built twice from the same binary: the same bytes both times.
    let bin = cargo_bin("registry-facade", "registry-facade").unwrap();
    let out = tempfile::Builder::new().prefix("image-").tempdir().unwrap();
    let started = Instant::now();
    let printed = build_image(&bin, &out.path().join("a"));
    let build_time = started.elapsed();
    build_image(&bin, &out.path().join("b"));
    let archive_name = format!("registry-facade-{TAG}.oci.tar");
    let archive = out.path().join("a").join(&archive_name);
    assert!(
        std::fs::read(&archive).unwrap() == std::fs::read(out.path().join("b").join(&archive_name)).unwrap(),
        "two builds of the same binary differ"
    );
    assert!(printed.contains(&archive.display().to_string()), "the script prints where the image is: {printed}");
    eprintln!("image built in {build_time:?}: {}", printed.lines().next().unwrap_or(""));
    let entrypoint = check_layout(&out.path().join("a/oci"), &bin);

    // The DaemonSet's pod, as far as the image is concerned.
    let ds = k8s_yaml("daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    let named = |list: &Yaml, name: &str| -> Yaml {
        list.as_vec().unwrap().iter().find(|c| c["name"].as_str() == Some(name)).unwrap().clone()
    };
    let facade = named(&pod["containers"], "registry-facade");
    let store_owner = strings(&named(&pod["initContainers"], "store-owner")["command"]);
    let pre_stop = strings(&facade["lifecycle"]["preStop"]["exec"]["command"]);
    let facade_args = strings(&facade["args"]);
    let config_arg = facade_args.last().unwrap();
    assert!(
        config_arg.starts_with(&format!("{CONFIG_DIR}/")),
        "the ConfigMap is mounted at {CONFIG_DIR}: {config_arg}"
    );

    // Upstream: a base image (Docker schema 2) and an IDE image (OCI) on a real registry.
    let reg = Registry::start().unwrap();
    e2e::upstream::push_base_and_ide(&reg);

    // The pod's volumes, on this machine.
    let dir = tempfile::Builder::new().prefix("image-run-").tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let (port, metrics_port, probe_port) = (free_port(), free_port(), free_port());
    world_readable_dir(&d("config"));
    world_readable_dir(&d("pull-secret"));
    // The installer's rendering (see the README's Configuration): every reference key it writes,
    // no TLS (tls with empty paths), a fixed spec file instead of ws-manager, loopback listeners.
    let config = json!({
        "registry": {
            "port": port,
            "prefix": "",
            "staticLayer": [],
            "fixedSpecFN": format!("{CONFIG_DIR}/specs.json"),
            "store": STORE,
            "requireAuth": false,
            "tls": {"ca": "", "crt": "", "key": ""}
        },
        "dockerAuth": format!("{PULL_SECRET_DIR}/config.json"),
        "pprofAddr": "127.0.0.1:6060",
        "prometheusAddr": format!("127.0.0.1:{metrics_port}"),
        "readinessProbeAddr": format!("127.0.0.1:{probe_port}"),
        "facade": {"listenHost": "127.0.0.1", "shutdownGrace": "5s"}
    });
    let config_file = Path::new(config_arg).file_name().unwrap();
    write_readable(&d("config").join(config_file), config.to_string());
    let specs = json!({"ws": {"baseRef": format!("{}/base:1", reg.host()), "ideRef": format!("{}/ide:1", reg.host())}});
    write_readable(&d("config/specs.json"), specs.to_string());
    write_readable(&d("pull-secret/config.json"), r#"{"auths":{}}"#);
    // The hostPath store starts root-owned, as kubelet creates it (DirectoryOrCreate).
    std::fs::create_dir(d("store")).unwrap();
    std::fs::set_permissions(d("store"), std::fs::Permissions::from_mode(0o755)).unwrap();
    // An emptyDir is world-writable.
    std::fs::create_dir(d("tmp")).unwrap();
    std::fs::set_permissions(d("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // The node for setup: its hosts file and containerd's certs.d, and the installer's CA mount.
    std::fs::create_dir_all(d("node/etc/containerd/certs.d")).unwrap();
    std::fs::write(d("node/etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_pem =
        rcgen::CertificateParams::new(vec![SETUP_HOST.to_string()]).unwrap().self_signed(&ca_key).unwrap().pem();
    write_readable(&d("gitpod-ca.crt"), &ca_pem);

    let ctr = Containerd::start().unwrap();
    let mut import = ctr.ctr();
    import.args(["images", "import", "--snapshotter", SNAPSHOTTER]).arg(&archive);
    let imported = String::from_utf8(run_bytes(import, CTR_TIMEOUT).unwrap()).unwrap();
    assert!(imported.contains(IMAGE), "ctr images import named the image {IMAGE}: {imported}");

    // Init containers, as root: store-owner's chown of the hostPath store, then the installer's
    // setup. They run in a container of the image whose own process is `sleep`.
    {
        let (store, node, ca) = (d("store"), d("node"), d("gitpod-ca.crt"));
        let init = Task::run(
            &ctr,
            "init",
            &[(store.as_path(), STORE, false), (node.as_path(), "/mnt/dst", false), (ca.as_path(), INSTALLER_CA, true)],
            &["sleep".to_string(), "120".to_string()],
            d("init.log"),
        );
        assert!(init.is_running(), "sleep runs from the image: {}", init.log());
        let store_owner: Vec<&str> = store_owner.iter().map(String::as_str).collect();
        init.exec("store-owner", Some("0"), &store_owner).unwrap();
        let mut setup_argv: Vec<&str> = entrypoint.iter().map(String::as_str).collect();
        let hostname = format!("--hostname={SETUP_HOST}");
        setup_argv.extend(["setup", "--hostfs=/mnt/dst", &hostname, "--port=31750"]);
        init.exec("setup", Some("0"), &setup_argv).unwrap_or_else(|e| panic!("setup: {e}\n{}", init.log()));
    }
    let store_md = std::fs::metadata(d("store")).unwrap();
    assert_eq!((store_md.uid(), store_md.gid()), (FACADE_UID, FACADE_UID), "store-owner chowned the store");
    let certs = d(&format!("node/etc/containerd/certs.d/{SETUP_HOST}:31750"));
    assert_eq!(std::fs::read_to_string(certs.join("hosts.toml")).unwrap(), hosts_toml(SETUP_HOST, 31750, true));
    assert_eq!(std::fs::read_to_string(certs.join(CA_FILE)).unwrap(), ca_pem);
    let hosts = std::fs::read_to_string(d("node/etc/hosts")).unwrap();
    assert!(hosts.lines().any(|l| l.split_whitespace().eq(["127.0.0.1", SETUP_HOST])), "{hosts}");

    // The facade: the image's user, the DaemonSet's args after the entrypoint.
    let argv: Vec<String> = entrypoint.iter().chain(&facade_args).cloned().collect();
    let (config_dir, pull_secret, store, tmp) = (d("config"), d("pull-secret"), d("store"), d("tmp"));
    let run_at = Instant::now();
    let task = Task::run(
        &ctr,
        "registry-facade",
        &[
            (config_dir.as_path(), CONFIG_DIR, true),
            (pull_secret.as_path(), PULL_SECRET_DIR, true),
            (store.as_path(), STORE, false),
            (tmp.as_path(), "/tmp", false),
        ],
        &argv,
        d("facade.log"),
    );
    let probe = format!("127.0.0.1:{probe_port}");
    let deadline = Instant::now() + READY_TIMEOUT;
    let ready_after = loop {
        if http_status(&probe, "/ready") == Some(200) {
            break run_at.elapsed();
        }
        assert!(task.is_running(), "the facade exited before it was ready:\n{}", task.log());
        assert!(Instant::now() < deadline, "not ready within {READY_TIMEOUT:?}:\n{}", task.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let (pid, _) = task.state().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    assert!(uid.split_whitespace().all(|u| u == FACADE_UID.to_string()), "the facade runs as {uid}");
    eprintln!("ready {ready_after:?} after ctr run");

    // A workspace through the facade in the container, by skopeo and by containerd.
    let host = format!("127.0.0.1:{port}");
    let pulled = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci(&format!("{host}/fixed/ws:latest"), pulled.path(), "ws")
        .unwrap_or_else(|e| panic!("skopeo pull through the container: {e}\n{}", task.log()));
    let files = skopeo::read_oci_layout(pulled.path(), "ws").unwrap().rootfs();
    assert_eq!(files["etc/base-file"], b"from the base");
    assert_eq!(files["ide/bin/ide"], b"#!/bin/sh\necho ide\n");
    let image = format!("{host}/fixed/ws:latest");
    ctr.pull(&image).unwrap_or_else(|e| panic!("containerd pull through the container: {e}\n{}", task.log()));
    assert_eq!(ctr.rootfs_files(&image).unwrap()["etc/base-file"], b"from the base");
    assert_eq!(http_status(&host, "/v2/remote/not-a-valid-image/manifests/latest"), Some(404));
    let stored = owners(&d("store"));
    assert!(!stored.is_empty(), "the facade stored nothing");
    assert!(stored.values().all(|&u| u == FACADE_UID), "the store is written by the facade's user: {stored:?}");

    // Termination: the preStop hook (as the container's user), then SIGTERM to PID 1.
    let pre_stop: Vec<&str> = pre_stop.iter().map(String::as_str).collect();
    task.exec("pre-stop", None, &pre_stop).unwrap();
    let mut term = ctr.ctr();
    term.args(["tasks", "kill", "--signal", "SIGTERM", "registry-facade"]);
    run_bytes(term, CTR_TIMEOUT).unwrap();
    assert!(task.wait_stopped(STOP_TIMEOUT), "SIGTERM did not stop the facade:\n{}", task.log());
    let warning = task.delete();
    assert!(!warning.contains("non-zero exit"), "the facade exited with an error: {warning}\n{}", task.log());
}
