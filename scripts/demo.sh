#!/usr/bin/env bash
# Runs the heat example under supervise, kills it twice with SIGKILL, and checks that the
# resumed run ends with the same checksum as an uninterrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin supervise --example heat
bin=target/release
args=(--n 1024 --steps 12000)
store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT

echo "== supervise --every 2s -- heat ${args[*]}   (the child is killed with -9 twice)"
"$bin/supervise" --store "$store" --every 2s --backoff 500ms -- "$bin/examples/heat" "${args[@]}" \
    > "$store/out.txt" &
sup=$!
for delay in 5 6; do
    sleep "$delay"
    child=$(pgrep -P "$sup" -x heat || true)
    if [ -n "$child" ]; then
        echo "== kill -9 $child"
        kill -9 "$child"
    fi
done
wait "$sup"
supervised=$(awk '/^checksum/ {print $2}' "$store/out.txt")

echo "== the same run without interruption, for comparison"
plain=$("$bin/examples/heat" "${args[@]}" | awk '/^checksum/ {print $2}')

echo "supervised, killed twice: $supervised"
echo "uninterrupted:            $plain"
if [ "$supervised" = "$plain" ]; then
    echo "OK: identical results"
else
    echo "MISMATCH" >&2
    exit 1
fi
