#!/bin/sh
# Installs the pinned userspace Rust toolchain (rust-toolchain.toml), which `cargo xtask` needs
# to build at all on a machine where RUSTUP_AUTO_INSTALL=0. Everything else is installed by
# `cargo xtask setup`, which `cargo xtask test` and `cargo xtask trace` run first.
set -eu
cd "$(dirname "$0")/.."
if ! command -v rustup >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    . "$HOME/.cargo/env"
fi
command -v rustup >/dev/null 2>&1 || { echo "bootstrap: rustup is required (https://rustup.rs)" >&2; exit 1; }
toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^$toolchain"; then
    rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy
fi
# An existing toolchain may lack them (`cargo xtask test` lints first); a no-op when present.
rustup component add --toolchain "$toolchain" rustfmt clippy
