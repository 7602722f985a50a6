#!/usr/bin/env bash
# The ia2shim demo: build the shim, then run a two-compartment program whose
# plugin reads the application's secret. The read is denied by the hardware
# key check (in a PKU-emulating VM when this host has no PKU) and reported.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --quiet
out=target/demo
mkdir -p "$out"
cc -g -O1 -shared -fPIC -Wl,-z,now -o "$out/libplugin.so" demo/multilib/plugin.c
cc -g -O1 -Iinclude -rdynamic -Wl,-z,now -o "$out/app" demo/multilib/app.c -L"$out" -lplugin -Wl,-rpath,"$PWD/$out"
echo "== demo: app (compartment 1) and libplugin.so (compartment 2) under ia2shim =="
set +e
IA2_REPORT=plan target/release/ia2run -- "$out/app"
status=$?
set -e
echo "== app exited with status $status (139 = killed by SIGSEGV: the secret was protected) =="
[ "$status" = 139 ]
