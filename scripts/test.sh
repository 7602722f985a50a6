#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and integration tests
# that run real programs under the shim natively and in the PKU VM.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests preload target/release/libia2shim.so: build it first
# (`cargo test` does not rebuild a cdylib it does not link).
cargo build --release --workspace
cargo test --release --workspace
# The compatibility corpus's table (tests/corpus.rs), for the CI log.
if [ -f target/corpus-table.md ]; then
  echo "Compatibility corpus (default mode, PKU VM):"
  cat target/corpus-table.md
fi
