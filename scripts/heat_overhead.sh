#!/usr/bin/env bash
# How much slower examples/heat runs under `supervise --every 5s` than alone: runs the two
# alternately (default 3 times each, default heat size: about 20 s a run) and prints the
# median times and their ratio. Usage: scripts/heat_overhead.sh [RUNS] [heat args...]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
shift || true
cargo build --release --quiet --bin supervise --example heat
bin=target/release
store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT
plain=() supervised=() plain_cpu=() supervised_cpu=()
# Wall seconds and CPU seconds (user + system, children included) of a command.
measure() {
    /usr/bin/time -o "$store/time" -f "%e %U %S" "$@" > /dev/null 2>&1
    awk '{print $1, $2 + $3}' "$store/time"
}
for i in $(seq "$runs"); do
    read -r w c < <(measure "$bin/examples/heat" "$@")
    plain+=("$w") plain_cpu+=("$c")
    read -r w c < <(measure "$bin/supervise" --store "$store/s$i" --every 5s -- "$bin/examples/heat" "$@")
    supervised+=("$w") supervised_cpu+=("$c")
    echo "run $i: alone ${plain[-1]} s (cpu ${plain_cpu[-1]} s), supervised ${supervised[-1]} s (cpu ${supervised_cpu[-1]} s)" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f", (b / a - 1) * 100 }'; }
p=$(median "${plain[@]}") s=$(median "${supervised[@]}")
pc=$(median "${plain_cpu[@]}") sc=$(median "${supervised_cpu[@]}")
echo "median wall: alone $p s, under supervise --every 5s $s s ($(pct "$p" "$s") %)"
echo "median cpu:  alone $pc s, under supervise --every 5s $sc s ($(pct "$pc" "$sc") %)"
