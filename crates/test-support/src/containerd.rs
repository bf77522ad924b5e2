//! A real containerd (Debian 1.6.20) as a pulling client, private to one test: its own root,
//! state dir and sockets in a temp dir, driven with `ctr`.
//!
//! Needs root (containerd refuses to manage its root otherwise). It does not touch a system
//! containerd: every path it writes (root, state, gRPC and ttrpc sockets, the `opt` plugin's
//! dir) is in the temp dir, and no container is ever run. The CRI plugin is disabled unless
//! [`Options::cri_registry_config_path`] asks for it (then it pulls as the kubelet would, see
//! `crate::cri`, with its CNI dirs in the temp dir, its streaming server on a loopback port and
//! no pod ever started). Images are unpacked with the `native`
//! snapshotter, which copies directories instead of mounting overlays, so it works without
//! overlayfs and leaves no mounts behind; its committed snapshots are plain directories that can
//! be read while containerd runs.
//!
//! This type's methods run no container. A test may (tests/e2e/image_run.rs runs the facade's
//! image with `ctr run` and runc through [`Containerd::ctr`]); it must delete its tasks before
//! this is dropped, because runc shims and their containers outlive containerd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use facade_oci::media_types as mt;
use facade_oci::{Digest, ImageConfigView, ParsedManifest, Platform};

use crate::image::sha256_digest;
use crate::proc::run_bytes;
use crate::proc::{KillOnDrop, have};

/// The namespace every `ctr` call uses.
pub const NAMESPACE: &str = "test";

/// The namespace of the images the CRI plugin pulls; `ctr` calls use it when CRI is on.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The snapshotter images are unpacked with.
pub const SNAPSHOTTER: &str = "native";

/// How long one pull may take.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

const START_TIMEOUT: Duration = Duration::from_secs(20);
const CTR_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start containerd beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Enable the CRI plugin with `[plugins."io.containerd.grpc.v1.cri".registry] config_path`
    /// set to this directory (the `certs.d` holding `<host>/hosts.toml`).
    pub cri_registry_config_path: Option<PathBuf>,
    /// Run containerd in a private mount namespace (`unshare --mount`) with this file
    /// bind-mounted onto `/etc/hosts`, so host names resolve as a node's hosts file says without
    /// touching this machine's.
    pub etc_hosts: Option<PathBuf>,
}

/// A running containerd; killed on drop (the temp dir then goes with it).
pub struct Containerd {
    // Field order matters: the process dies before its directory is removed.
    proc: KillOnDrop,
    socket: PathBuf,
    namespace: &'static str,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Whether this machine can run it: the binaries exist and we are root.
    pub fn available() -> bool {
        have("containerd") && have("ctr") && is_root()
    }

    /// Starts containerd and waits (at most 20 s) until `ctr version` gets an answer.
    pub fn start() -> anyhow::Result<Containerd> {
        Self::start_with(Options::default())
    }

    /// [`Containerd::start`] with [`Options`].
    pub fn start_with(opts: Options) -> anyhow::Result<Containerd> {
        anyhow::ensure!(have("containerd") && have("ctr"), "containerd or ctr is not installed");
        anyhow::ensure!(is_root(), "containerd needs root");
        let dir = tempfile::Builder::new().prefix("containerd-").tempdir()?;
        let socket = dir.path().join("containerd.sock");
        // sun_path holds 108 bytes, and containerd adds ".ttrpc" for its second socket.
        anyhow::ensure!(
            socket.as_os_str().len() + ".ttrpc".len() < 108,
            "socket path {} is too long for a unix socket; set TMPDIR to a shorter dir",
            socket.display()
        );
        let cfg = dir.path().join("config.toml");
        let mut text = config_toml(dir.path(), &socket, opts.cri_registry_config_path.is_none());
        if let Some(config_path) = &opts.cri_registry_config_path {
            text.push_str(&cri_config_toml(dir.path(), config_path));
        }
        std::fs::write(&cfg, text)?;
        let cmd = match &opts.etc_hosts {
            None => {
                let mut cmd = Command::new("containerd");
                cmd.arg("--config").arg(&cfg);
                cmd
            }
            Some(hosts) => {
                anyhow::ensure!(have("unshare") && have("mount"), "unshare or mount (util-linux) is not installed");
                // unshare makes the new namespace's mounts private, so the bind mount is seen by
                // this containerd only; `exec` keeps the pid, which KillOnDrop kills.
                let mut cmd = Command::new("unshare");
                cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(r#"mount --bind "$1" /etc/hosts && exec containerd --config "$2""#)
                    .arg("sh")
                    .arg(hosts)
                    .arg(&cfg);
                cmd
            }
        };
        let proc = KillOnDrop::spawn("containerd", cmd, &dir.path().join("containerd.log"))?;
        let namespace = if opts.cri_registry_config_path.is_some() { CRI_NAMESPACE } else { NAMESPACE };
        let mut c = Containerd { proc, socket, namespace, dir };
        c.wait_ready()?;
        Ok(c)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Err(e) = self.proc.check_running() {
                anyhow::bail!("{e}: {}", self.log());
            }
            if self.socket.exists() {
                let mut cmd = self.ctr();
                cmd.arg("version");
                if run_bytes(cmd, Duration::from_secs(5)).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "containerd did not answer on {} within {START_TIMEOUT:?}: {}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr --address <socket> -n test` (`-n k8s.io` with CRI), for anything this type has no
    /// method for.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(["-n", self.namespace]);
        cmd
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's root dir (content store, metadata, snapshots).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr images pull --plain-http --snapshotter native` of `image` (`127.0.0.1:P/remote/ID:latest`)
    /// for the host platform: fetches every blob (containerd checks digests and sizes) and
    /// unpacks the layers. Returns the image's chain ID (the top snapshot's name).
    pub fn pull(&self, image: &str) -> anyhow::Result<String> {
        let mut cmd = self.ctr();
        cmd.args(["images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, "--print-chainid", image]);
        let out = run_bytes(cmd, PULL_TIMEOUT).map_err(|e| anyhow::anyhow!("{e}\ncontainerd log:\n{}", self.log()))?;
        let out = String::from_utf8_lossy(&out);
        out.lines()
            .find_map(|l| l.trim().strip_prefix("image chain ID: "))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| anyhow::anyhow!("ctr printed no chain ID: {out}"))
    }

    /// The manifest digest containerd recorded for `image` (the image's target, or the host
    /// platform's entry when the target is an index).
    pub fn manifest_digest(&self, image: &str) -> anyhow::Result<String> {
        let (media_type, target) = self.image_target(image)?;
        if !mt::is_index(&media_type) {
            return Ok(target);
        }
        let index = self.content(&target)?;
        let ParsedManifest::Index(view) = ParsedManifest::parse(&index, Some(&media_type))? else {
            anyhow::bail!("{image}: target {target} is not an index");
        };
        let d = view.select(&Platform::host()).ok_or_else(|| anyhow::anyhow!("{image}: no entry for this platform"))?;
        Ok(d.digest.as_str().to_string())
    }

    /// Regular files of the unpacked rootfs of a pulled `image`, path relative to the rootfs
    /// (no leading `/`) → contents. Reads the top committed snapshot's directory through a
    /// temporary read-only view, which for the native snapshotter is that directory itself.
    pub fn rootfs_files(&self, image: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let chain_id = self.chain_id(image)?;
        static VIEWS: AtomicU64 = AtomicU64::new(0);
        let key = format!("rootfs-view-{}", VIEWS.fetch_add(1, Ordering::Relaxed));
        let mut cmd = self.ctr();
        cmd.args(["snapshots", "--snapshotter", SNAPSHOTTER, "view", "--mounts", &key, &chain_id]);
        let mounts: serde_json::Value = serde_json::from_slice(&run_bytes(cmd, CTR_TIMEOUT)?)?;
        let result = match mounts[0]["Source"].as_str() {
            Some(src) if mounts[0]["Type"] == "bind" => read_tree(Path::new(src)),
            _ => Err(anyhow::anyhow!("unexpected mounts for the {SNAPSHOTTER} snapshotter: {mounts}")),
        };
        let mut cmd = self.ctr();
        cmd.args(["snapshots", "--snapshotter", SNAPSHOTTER, "rm", &key]);
        // `ctr snapshots view` holds no lease, so containerd's garbage collector (run after the
        // pull's lease is deleted) may already have removed the view: gone is what we want. The
        // files read were the committed parent's, which the image keeps.
        match run_bytes(cmd, CTR_TIMEOUT) {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(e),
        }
        result
    }

    /// The chain ID of `image`'s layers, computed from its config in the content store.
    pub fn chain_id(&self, image: &str) -> anyhow::Result<String> {
        let manifest_digest = self.manifest_digest(image)?;
        let manifest = self.content(&manifest_digest)?;
        let ParsedManifest::Image(m) = ParsedManifest::parse(&manifest, None)? else {
            anyhow::bail!("{image}: {manifest_digest} is not an image manifest");
        };
        let config = ImageConfigView::parse(&self.content(m.config.digest.as_str())?)?;
        chain_id(&config.diff_ids).ok_or_else(|| anyhow::anyhow!("{image} has no layers"))
    }

    /// A blob from containerd's content store.
    pub fn content(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let mut cmd = self.ctr();
        cmd.args(["content", "get", digest]);
        run_bytes(cmd, CTR_TIMEOUT)
    }

    /// (media type, digest) of the image record, from `ctr images ls name==IMAGE`.
    fn image_target(&self, image: &str) -> anyhow::Result<(String, String)> {
        let mut cmd = self.ctr();
        cmd.args(["images", "ls", &format!("name=={image}")]);
        let out = String::from_utf8_lossy(&run_bytes(cmd, CTR_TIMEOUT)?).into_owned();
        // Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS; none of the first three has spaces.
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&image) && cols.len() >= 3)
            .map(|cols| (cols[1].to_string(), cols[2].to_string()))
            .ok_or_else(|| anyhow::anyhow!("containerd has no image {image}: {out}"))
    }
}

/// The OCI chain ID of a layer stack: `chain(0) = diff_id(0)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff_id(n))` (image-spec config.md).
pub fn chain_id(diff_ids: &[Digest]) -> Option<String> {
    let mut it = diff_ids.iter();
    let mut chain = it.next()?.as_str().to_string();
    for d in it {
        chain = sha256_digest(format!("{chain} {}", d.as_str()).as_bytes());
    }
    Some(chain)
}

fn is_root() -> bool {
    // No libc dependency for geteuid: /proc/self/status has "Uid: real effective saved fs".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().nth(1) == Some("0"))))
        .unwrap_or(false)
}

fn config_toml(dir: &Path, socket: &Path, disable_cri: bool) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        disabled = if disable_cri { r#""io.containerd.grpc.v1.cri""# } else { "" },
        socket = socket.display(),
        opt = dir.join("opt").display(),
    )
}

/// The CRI plugin's section (containerd 1.6, config version 2): images go to the `native`
/// snapshotter (no overlayfs needed, readable with [`Containerd::rootfs_files`]); CNI is pointed
/// at empty temp dirs (no pod network is ever set up, CRI only logs that none is configured);
/// SELinux, AppArmor and cgroups are off because no container runs; the streaming server gets a
/// free loopback port; registry hosts come from `config_path` only.
fn cri_config_toml(dir: &Path, config_path: &Path) -> String {
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  disable_cgroup = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{config_path}"
"#,
        snapshotter = SNAPSHOTTER,
        cni = dir.join("cni").display(),
        config_path = config_path.display(),
    )
}

/// Regular files under `root`, relative paths joined with `/` → contents. Symlinks are not
/// followed.
pub fn read_tree(root: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                let rel = entry.path().strip_prefix(root)?.to_string_lossy().into_owned();
                files.insert(rel, std::fs::read(entry.path())?);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_follows_the_spec() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(std::slice::from_ref(&a)).unwrap(), a.as_str());
        let expected = sha256_digest(format!("{} {}", a.as_str(), b.as_str()).as_bytes());
        assert_eq!(chain_id(&[a, b]).unwrap(), expected);
    }
}
