#!/usr/bin/env bash
# Installs what the make targets need on a fresh Debian machine, and only what is missing.
#
#   scripts/install-deps.sh [demo|test]
#
# `demo` (for `make run`): what the demo binary uses (crates/test-support/src/bin/demo.rs starts
# a docker-registry, pushes its images with skopeo and prints a skopeo/curl command to try) and a
# check that cargo is usable. `test` (the default; `make test`, `make bench`, `make soak`):
# everything, i.e. also the parts the tests talk to, js-ipfs, grpcio-tools and cargo-fuzz.
set -euo pipefail

profile=${1:-test}
case "$profile" in
  demo | test) ;;
  *) echo "install-deps: unknown profile '$profile' (use demo or test)" >&2; exit 2 ;;
esac

# Debian package:program pairs; a package is installed only when its program is missing.
pairs=(docker-registry:/usr/bin/docker-registry skopeo:/usr/bin/skopeo curl:/usr/bin/curl)
if [ "$profile" = test ]; then
  # kubernetes-client: the deploy test builds deploy/ with `kubectl kustomize`.
  pairs+=(containerd:/usr/bin/containerd redis-server:/usr/bin/redis-server umoci:/usr/bin/umoci
          wrk:/usr/bin/wrk tinyproxy:/usr/bin/tinyproxy kubernetes-client:/usr/bin/kubectl)
fi
need=()
for pair in "${pairs[@]}"; do
  pkg=${pair%%:*}; bin=${pair#*:}
  [ -x "$bin" ] || need+=("$pkg")
done
# `make image` copies Debian's CA bundle into the image (scripts/build-image.sh).
if [ "$profile" = test ] && [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then
  need+=(ca-certificates)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # Package scripts may try to start services; there is no init system to do so in CI, which is
  # fine: tests start their own instances on free loopback ports.
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "install-deps: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
  else
    echo "install-deps: cargo not found; install a Rust toolchain (rustup, Rust >= 1.85)" >&2
  fi
  exit 1
fi

[ "$profile" = demo ] && exit 0

# A real IPFS node for the cluster-cache tests: js-ipfs 0.66 (speaks the Kubo RPC API), installed
# at the repository root only when node_modules/ipfs is missing. --no-save keeps package files out
# of the tree; install scripts are not needed (prebuilt native modules are loaded at run time).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install-deps: installing nodejs npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends nodejs npm >/dev/null
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -d "$root/node_modules/ipfs" ]; then
  echo "install-deps: installing js-ipfs (npm install ipfs@0.66.1)"
  (cd "$root" && npm install --no-save --no-package-lock --no-audit --no-fund --loglevel=error ipfs@0.66.1 >/dev/null)
fi

# The e2e test of a spec server written by someone else generates Python gRPC stubs from proto/
# with grpcio-tools and serves specs with grpcio.
if ! python3 -c 'import grpc_tools, grpc' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "install-deps: installing python3 and pip"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends python3 python3-pip >/dev/null
  fi
  echo "install-deps: installing grpcio-tools (python3, --user)"
  # Debian's own python3 refuses user installs unless told that is intended.
  python3 -m pip install --user --quiet --disable-pip-version-check grpcio-tools ||
    python3 -m pip install --user --quiet --disable-pip-version-check --break-system-packages grpcio-tools
fi

# Fuzz targets (make test runs each briefly) are built with cargo-fuzz.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
