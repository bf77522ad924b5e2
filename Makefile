# The two commands of the README: `make run` and `make test`. Each installs what it needs.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: run test deps demo-deps build demo-build lint bench soak fmt fuzz fuzz-smoke image

# Everything the tests, the benchmark and the soak use (scripts/install-deps.sh, profile `test`).
deps:
	@bash scripts/install-deps.sh test

# Only what the demo uses (docker-registry, skopeo, curl): `make run` installs no test tooling.
demo-deps:
	@bash scripts/install-deps.sh demo

build: deps
	$(CARGO) build --release --locked -p registry-facade -p test-support --bins

demo-build: demo-deps
	$(CARGO) build --release --locked -p registry-facade -p test-support --bins

# The container image without a container engine (scripts/build-image.sh with umoci): the
# release binary, its glibc libraries and the CA bundle of this machine, as an OCI layout and an
# OCI archive under target/image/ (IMAGE_TAG defaults to the workspace version, IMAGE_NAME, the
# name the archive gives the image, to docker.io/library/registry-facade).
IMAGE_TAG ?=
IMAGE_NAME ?=
image: deps
	$(CARGO) build --release --locked -p registry-facade
	bash scripts/build-image.sh $(if $(IMAGE_TAG),--tag $(IMAGE_TAG)) $(if $(IMAGE_NAME),--name $(IMAGE_NAME))

# A facade serving a composed demo workspace image from a local upstream registry.
run: demo-build
	./target/release/demo --facade ./target/release/registry-facade

# The facade side by side with a distribution pull-through cache, direct upstream and a minimal
# copy server; prints the table of ratios and writes bench/RESULTS.md (BENCH_ARGS=--quick for a
# smoke run).
BENCH_ARGS ?=
bench: build
	$(CARGO) build --release --locked -p bench
	./target/release/bench --facade ./target/release/registry-facade --out bench/RESULTS.md $(BENCH_ARGS)
	bash scripts/splice-soak.sh

# The release facade under SOAK_SECONDS of parallel pulls with injected faults (upstream cuts,
# Redis and spec server restarts); fails on any failed pull or fd/RSS growth past its bounds and
# writes bench/SOAK.md.
SOAK_SECONDS ?= 180
soak: build
	$(CARGO) build --release --locked -p e2e --bin soak
	./target/release/soak --facade ./target/release/registry-facade --seconds $(SOAK_SECONDS) --out bench/SOAK.md
	bash scripts/splice-soak.sh

# A test run builds every crate once: incremental caches would only add GiBs to its disk use
# (a clean CI run ran out of disk with them and full debug info, see Cargo.toml's profile.dev).
lint test fuzz-smoke: export CARGO_INCREMENTAL := 0

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: lint
	$(CARGO) test --workspace --locked --no-fail-fast
	$(MAKE) fuzz-smoke

# Every fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS each, from the committed seeds plus the
# corpus it grew before. cargo-fuzz runs on stable without a sanitizer (-s none); a crash fails
# the target and leaves the input under fuzz/artifacts/.
FUZZ_SECONDS ?= 10
FUZZ_TARGETS := references manifests range spec_json www_authenticate docker_config compose http_request
fuzz-smoke: deps
	cd fuzz && $(CARGO) fuzz build -s none -O
	set -e; cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t; \
	  $(CARGO) fuzz run -s none -O $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=0 2>&1 | tail -n 1; \
	  test $${PIPESTATUS[0]} -eq 0 || { echo "fuzz target $$t failed"; exit 1; }; \
	done

# Longer runs: `make fuzz FUZZ_SECONDS=600`.
fuzz: FUZZ_SECONDS = 300
fuzz: fuzz-smoke

fmt:
	$(CARGO) fmt --all
