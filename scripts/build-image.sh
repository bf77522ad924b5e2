#!/usr/bin/env bash
# Builds the registry-facade container image without a container engine: one layer assembled
# from files of this (Debian) machine, turned into an OCI image with umoci. See deploy/README.md
# ("The image") for what the image holds and why.
#
#   scripts/build-image.sh [--binary PATH] [--out DIR] [--tag TAG] [--name NAME] [--strip-debug]
#
# Writes DIR/oci (an OCI image layout, tag TAG), DIR/registry-facade-TAG.oci.tar (that layout as
# an OCI archive naming the image NAME:TAG, for `ctr images import` and `skopeo copy
# oci-archive:`) and prints the manifest digest. Defaults: target/release/registry-facade,
# target/image, the workspace version, docker.io/library/registry-facade.
# The same binary, tag and SOURCE_DATE_EPOCH (default: the last commit's time) give the same
# bytes: file times are fixed, owners numeric, tar entries sorted, gzip without a name or time.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/registry-facade"
out="$root/target/image"
tag=""
name="docker.io/library/registry-facade"
strip_debug=0

die() { echo "build-image: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) bin="${2:?--binary needs a path}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --strip-debug) strip_debug=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

for tool in umoci ldd tar dpkg-query; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (scripts/install-deps.sh installs umoci)"
done
[ -x "$bin" ] || die "no executable at $bin (build it first: cargo build --release --locked -p registry-facade)"
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca_bundle" ] || die "$ca_bundle is missing: install Debian's ca-certificates"

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
license="$(sed -n '/^\[workspace.package\]/,/^\[/s/^license *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
tag="${tag:-$version}"
# umoci's tag grammar (the OCI ref.name annotation of the layout's index.json).
[[ "$tag" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad tag: $tag"
[[ "$name" =~ ^[a-z0-9]([a-z0-9._/:-]*[a-z0-9])?$ ]] || die "bad image name: $name"
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && ! git -C "$root" diff --quiet HEAD -- 2>/dev/null; then
  revision="$revision-dirty"
fi
epoch="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}"
[[ "$epoch" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be seconds since the epoch: $epoch"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) die "unsupported architecture $(uname -m)" ;;
esac

mkdir -p "$out"
work="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"

# The facade, and the two tools the DaemonSet's other containers run from this image: the
# store-owner init container's `chown` and the preStop hook's `sleep` (deploy/kubernetes).
install -D -m 0755 "$bin" "$rootfs/usr/local/bin/registry-facade"
if [ "$strip_debug" = 1 ]; then
  command -v objcopy >/dev/null 2>&1 || die "--strip-debug needs objcopy (binutils)"
  # Debug builds carry hundreds of MiB of DWARF that the image has no use for.
  objcopy --strip-debug "$rootfs/usr/local/bin/registry-facade"
fi
install -D -m 0755 /usr/bin/chown "$rootfs/usr/bin/chown"
install -D -m 0755 /usr/bin/sleep "$rootfs/usr/bin/sleep"

# The shared libraries they load, copied from this machine at the paths ldd reports (which are
# the paths the loader searches without an ld.so.cache), the loader itself included. There is no
# static musl build: only the one glibc toolchain exists on the build machines.
libs="$(for exe in "$bin" /usr/bin/chown /usr/bin/sleep; do
  deps="$(ldd "$exe")" || die "ldd $exe failed"
  if grep -q 'not found' <<<"$deps"; then die "ldd $exe: a library is missing: $deps"; fi
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps"
done | sort -u)"
[ -n "$libs" ] || die "ldd found no libraries for $bin (a static binary needs no loader, but this script expects glibc)"
for lib in $libs; do
  install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done

# Debian's copyright files of every package a copied file comes from (glibc and libgcc are
# shipped in the image, so their licences go with them).
# With merged /usr, dpkg may know a file under /bin or /lib rather than /usr/bin or /usr/lib.
for f in /usr/bin/chown $libs; do
  pkg=""
  for p in "$f" "$(readlink -f "$f")" "${f#/usr}" "/usr$f"; do
    pkg="$(dpkg-query -S "$p" 2>/dev/null | head -n1 | cut -d: -f1 || true)"
    [ -z "$pkg" ] || break
  done
  if [ -n "$pkg" ] && [ -f "/usr/share/doc/$pkg/copyright" ]; then
    install -D -m 0644 "/usr/share/doc/$pkg/copyright" "$rootfs/usr/share/doc/$pkg/copyright"
  fi
done

install -D -m 0644 "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
# uid/gid 65532: deploy/kubernetes/daemonset.yaml runs the facade as 65532 and the store-owner
# init container hands the store to it; a name makes `ps` and file listings readable.
cat > "$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
registry-facade:x:65532:65532:registry-facade:/nonexistent:/usr/sbin/nologin
EOF
cat > "$rootfs/etc/group" <<'EOF'
root:x:0:
registry-facade:x:65532:
EOF
# glibc's files and dns modules are built into libc.so.6 (glibc >= 2.34), so name lookups need
# no libnss_*.so; kubelet mounts /etc/hosts and /etc/resolv.conf.
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/nsswitch.conf"
mkdir -p "$rootfs/etc/registry-facade" "$rootfs/tmp" "$rootfs/var/cache/registry-facade"
chmod 1777 "$rootfs/tmp"
chmod 0755 "$rootfs/etc/registry-facade" "$rootfs/var/cache/registry-facade"
find "$rootfs" -type d -exec chmod u+rwx,go+rx,go-w {} + -o -type f -exec chmod go-w {} +
chmod 1777 "$rootfs/tmp"

# One layer, byte for byte the same for the same inputs: sorted entries, one mtime, numeric
# owners (root, except the store directory, which the non-root facade writes when nothing is
# mounted there), ustar (no pax headers with access times).
find "$rootfs" -exec touch -h -d "@$epoch" {} +
tar_opts=(--format=ustar --sort=name --numeric-owner --mtime="@$epoch" -C "$rootfs")
tops="$(cd "$rootfs" && ls -A | LC_ALL=C sort)"
# shellcheck disable=SC2086 # the top-level names have no spaces
tar "${tar_opts[@]}" --owner=0 --group=0 --exclude=var/cache/registry-facade -cf "$work/layer.tar" $tops
tar "${tar_opts[@]}" --owner=65532 --group=65532 -rf "$work/layer.tar" var/cache/registry-facade
listing="$(tar -tvf "$work/layer.tar")"
grep -q ' 65532/65532 .* var/cache/registry-facade/$' <<<"$listing" ||
  die "the store directory is not owned by 65532 in the layer"

layout="$out/oci"
rm -rf "$layout"
image="$layout:$tag"
umoci init --layout "$layout"
umoci new --image "$image"
umoci raw add-layer --image "$image" --history.created "$created" \
  --history.created_by "scripts/build-image.sh (registry-facade, glibc and CA bundle of the build machine)" \
  "$work/layer.tar"

labels=(
  "org.opencontainers.image.title=registry-facade"
  "org.opencontainers.image.description=Image-composing OCI registry facade for cloud workspaces"
  "org.opencontainers.image.version=$version"
  "org.opencontainers.image.revision=$revision"
  "org.opencontainers.image.created=$created"
  "org.opencontainers.image.licenses=$license"
)
cfg=(--image "$image" --no-history --created "$created" --os linux --architecture "$arch"
  --config.user 65532:65532
  --config.env PATH=/usr/local/bin:/usr/bin:/bin
  --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  --config.entrypoint /usr/local/bin/registry-facade
  --config.cmd run --config.cmd /etc/registry-facade/config/config.json
  --config.workingdir /
  --config.stopsignal SIGTERM
  --config.exposedports 31750/tcp --config.exposedports 9500/tcp --config.exposedports 8086/tcp)
for l in "${labels[@]}"; do
  cfg+=(--config.label "$l" --manifest.annotation "$l")
done
umoci config "${cfg[@]}"
umoci gc --layout "$layout"
# umoci writes blobs 0600; anyone who can read the output directory may read the image.
chmod -R a+rX "$layout"

# The archive is the layout in a tar. Its index.json names the image NAME:TAG, a full reference,
# so `ctr images import` stores it under the name the CRI plugin looks up for a pod's `image:`
# (a bare tag would get a date-stamped name); the layout itself keeps umoci's bare tag.
archive="$out/registry-facade-$tag.oci.tar"
stage="$work/archive"
mkdir -p "$stage"
cp -r "$layout/blobs" "$layout/oci-layout" "$stage/"
ref_name='"org.opencontainers.image.ref.name":'
sed "s|$ref_name\"$tag\"|$ref_name\"$name:$tag\"|" "$layout/index.json" > "$stage/index.json"
grep -q "$ref_name\"$name:$tag\"" "$stage/index.json" ||
  die "unexpected index.json from umoci: $(cat "$layout/index.json")"
find "$stage" -exec touch -h -d "@$epoch" {} +
tar --format=ustar --sort=name --numeric-owner --owner=0 --group=0 --mtime="@$epoch" \
  --mode=a+rX -C "$stage" -cf "$archive.tmp" oci-layout index.json blobs
mv "$archive.tmp" "$archive"

manifest="$(sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p' "$layout/index.json")"
size="$(du -sh "$layout" | cut -f1)"
echo "image $name:$tag ($arch, $size) manifest $manifest"
echo "  OCI layout:  $layout (tag $tag)"
echo "  OCI archive: $archive (named $name:$tag)"
echo "  import: ctr -n k8s.io images import $archive"
echo "  push:   skopeo copy oci:$layout:$tag docker://REGISTRY/registry-facade:$tag"
