# The two commands of the README: `make run` and `make test`. Each installs what it needs.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: run test deps build lint bench fmt

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release --locked -p registry-facade -p test-support --bins

# A facade serving a composed demo workspace image from a local upstream registry.
run: build
	./target/release/demo --facade ./target/release/registry-facade

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: lint
	$(CARGO) test --workspace --locked --no-fail-fast

fmt:
	$(CARGO) fmt --all
