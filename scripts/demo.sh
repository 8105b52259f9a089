#!/usr/bin/env bash
# Runs the heat example under supervise, kills it twice with SIGKILL, and checks that the
# resumed run ends with the same checksum as an uninterrupted run.
#
# Time (`time ./scripts/demo.sh` on an idle 2-core VM): 34 s once built (the run under
# supervise, about 18 s, then the uninterrupted run); the first time 1 min 24 s, the release
# build included (5 min 11 s of build with three other builds sharing the two cores).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v pgrep >/dev/null 2>&1; then
    echo "demo.sh needs pgrep, to find the child it kills (Debian: apt-get install procps)" >&2
    exit 1
fi

echo "== building supervise and the heat example in release mode (cargo's progress below;"
echo "   the first time about 1 min on an idle 2-core machine, then under a second)"
cargo build --release --bin supervise --example heat
bin=target/release
args=(--n 1024 --steps 24000)
store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT

echo "== supervise --every 2s -- heat ${args[*]}   (the child is killed with -9 twice)"
"$bin/supervise" --store "$store" --every 2s --backoff 500ms -- "$bin/examples/heat" "${args[@]}" \
    > "$store/out.txt" &
sup=$!
kills=0
for delay in 5 5; do
    sleep "$delay"
    child=$(pgrep -P "$sup" -x heat || true)
    if [ -n "$child" ]; then
        echo "== kill -9 $child"
        kill -9 "$child"
        kills=$((kills + 1))
    fi
done
wait "$sup"
supervised=$(awk '/^checksum/ {print $2}' "$store/out.txt")

echo "== the same run without interruption, for comparison"
plain=$("$bin/examples/heat" "${args[@]}" | awk '/^checksum/ {print $2}')

echo "supervised, killed $kills times: $supervised"
echo "uninterrupted:                $plain"
if [ "$supervised" = "$plain" ]; then
    echo "OK: identical results"
else
    echo "MISMATCH" >&2
    exit 1
fi
