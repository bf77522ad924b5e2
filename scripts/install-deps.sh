#!/usr/bin/env bash
# Installs what `make run`, `make test` and `make bench` need on a fresh Debian machine, and only
# what is missing: the real parts the tests talk to, and a check that cargo is usable.
set -euo pipefail

need=()
for pair in docker-registry:/usr/bin/docker-registry skopeo:/usr/bin/skopeo containerd:/usr/bin/containerd \
            redis-server:/usr/bin/redis-server umoci:/usr/bin/umoci wrk:/usr/bin/wrk curl:/usr/bin/curl tinyproxy:/usr/bin/tinyproxy; do
  pkg=${pair%%:*}; bin=${pair#*:}
  [ -x "$bin" ] || need+=("$pkg")
done
# `make image` copies Debian's CA bundle into the image (scripts/build-image.sh).
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # Package scripts may try to start services; there is no init system to do so in CI, which is
  # fine: tests start their own instances on free loopback ports.
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

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

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "install-deps: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
  else
    echo "install-deps: cargo not found; install a Rust toolchain (rustup, Rust >= 1.85)" >&2
  fi
  exit 1
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
