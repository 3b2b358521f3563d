# Switchyard developer entry points.
#
#   make run    install what is missing, build the router (release) and the
#               plugins, start one standalone node on $(LISTEN)
#   make test   install what is missing (chromium/node/npm too), build plugins and
#               the workspace, check fmt and clippy (-D warnings), run every test,
#               the browser test, the Centrifugo SDK tests (centrifuge-js, -python) and
#               the client SDK tests (scripts/test-sdk.sh) included
#               (SWITCHYARD_SKIP_BROWSER=1: no browser/venv install, npm ci nor browser
#               and Centrifugo SDK tests)
#   make bench  build release, run the bench scenarios against Switchyard and
#               nats-server (installed if missing), print one comparison table
#   make fuzz   the long run of the fuzz-style property targets (FUZZ_CASES each)
#
# Override: make run LISTEN=127.0.0.1:9000 DATA_DIR=/tmp/sy
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# rustup's cargo/rustc before Debian's /usr/bin/{cargo,rustc} (from rustc-web).
export PATH := $(HOME)/.cargo/bin:$(PATH)

LISTEN      ?= 127.0.0.1:8000
CONFIG      ?= router/config/dev.toml
DATA_DIR    ?= ./data
PLUGINS_DIR ?= plugins/dist
CARGO       ?= cargo
# extra args for the test binaries, e.g. make test TEST_ARGS='--test-threads=1'
TEST_ARGS   ?=

.PHONY: all setup plugins plugin-tests build build-release run test lint bench fuzz clean help
.DEFAULT_GOAL := help

help:
	@sed -n '2,15p' Makefile | sed 's/^# \{0,1\}//'

setup:
	scripts/setup.sh

plugins:
	scripts/build-plugins.sh

plugin-tests:
	scripts/test-plugins.sh

build:
	$(CARGO) build --workspace --all-targets

build-release:
	$(CARGO) build --release -p switchyard --bin switchyard

run:
	scripts/setup.sh
	scripts/build-plugins.sh
	$(CARGO) build --release -p switchyard --bin switchyard
	mkdir -p "$(DATA_DIR)" "$(PLUGINS_DIR)"
	exec target/release/switchyard serve --config "$(CONFIG)" --listen "$(LISTEN)" --data-dir "$(DATA_DIR)" --plugins-dir "$(PLUGINS_DIR)"

test:
	scripts/setup.sh --browser --centrifugo
	scripts/build-plugins.sh
	if [ "$${SWITCHYARD_SKIP_BROWSER:-0}" = 1 ]; then \
	    echo "[test] skip: npm ci and the browser test (SWITCHYARD_SKIP_BROWSER=1)"; \
	else \
	    echo "[test] npm ci (tests/browser: playwright-core for the chat page test)"; \
	    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error; \
	    echo "[test] npm ci (tests/centrifugo: the centrifuge SDK for the Centrifugo SDK tests)"; \
	    npm ci --prefix tests/centrifugo --no-audit --no-fund --loglevel=error; \
	    echo "[test] npm ci and build (sdk/client: @switchyard/client for the mixed-room test)"; \
	    npm ci --prefix sdk/client --no-audit --no-fund --loglevel=error; \
	    npm run --prefix sdk/client --silent build; \
	fi
	if [ "$${SWITCHYARD_SKIP_BROWSER:-0}" = 1 ] && ! command -v npm >/dev/null; then \
	    echo "[test] skip: the chat page bundle check (no npm, SWITCHYARD_SKIP_BROWSER=1)"; \
	else \
	    echo "[test] the chat page bundle is current (scripts/build-web.sh --check)"; \
	    scripts/build-web.sh --check; \
	fi
	@echo "[test] cargo fmt --all -- --check"
	$(CARGO) fmt --all -- --check
	@echo "[test] cargo build --workspace --all-targets"
	$(CARGO) build --workspace --all-targets
	@echo "[test] cargo clippy --workspace --all-targets -- -D warnings"
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@echo "[test] cargo test --workspace"
	if [ "$${SWITCHYARD_SKIP_BROWSER:-0}" = 1 ]; then require=0; else require=1; fi; \
	    SWITCHYARD_REQUIRE_BROWSER=$$require $(CARGO) test --workspace --no-fail-fast -- $(TEST_ARGS)
	scripts/test-plugins.sh
	if [ "$${SWITCHYARD_SKIP_BROWSER:-0}" = 1 ] && ! command -v npm >/dev/null; then \
	    echo "[test] skip: the client SDK tests (no npm, SWITCHYARD_SKIP_BROWSER=1)"; \
	else \
	    echo "[test] the client SDK (sdk/client): npm ci, tsc --noEmit, build, node --test"; \
	    scripts/test-sdk.sh; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench:
	scripts/setup.sh --bench
	scripts/compare.sh

# The long run of the fuzz-style property targets (`make test` runs each for 256 cases):
# the client frame parser, the peer wire decoder, the plugin output decoder and the config
# parser, FUZZ_CASES inputs each (cargo-fuzz needs a nightly toolchain; these stand in).
FUZZ_CASES ?= 200000
fuzz:
	@echo "[fuzz] $(FUZZ_CASES) cases per target"
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p switchyard-proto -p switchyard-peer -p switchyard-server \
	    -p switchyard-plugin-host --lib -- any_text_parses_or_is_rejected any_peer_bytes_decode_or_fail \
	    any_guest_output_decodes_or_is_garbage any_file_text_loads_or_is_refused

all: test

clean:
	$(CARGO) clean
	rm -rf plugins/dist plugins/*/target
