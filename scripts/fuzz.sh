#!/usr/bin/env bash
# Runs every fuzz target of shim/fuzz (cargo-fuzz, libFuzzer) for SECONDS each (default 60),
# starting from the checked-in seeds (shim/fuzz/seeds/<target>), and fails on a crash (panic,
# sanitizer report), on one allocation above 256 MiB or more than 2 GiB resident, or on one
# input taking more than 10 s. Prints the number of executions per target.
#
#   scripts/fuzz.sh [SECONDS [TARGET...]]     (targets: manifest record pack control events)
#
# Needs cargo-fuzz (installed here if missing: `cargo install cargo-fuzz --locked`). Its -Z
# flags need a nightly compiler; on stable, RUSTC_BOOTSTRAP=1 lets them through. A crashing
# input is kept in shim/fuzz/artifacts/<target>/; replay it with
# `cargo fuzz run <target> <file>` from shim/.
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/shim"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=(manifest record pack control events)
if (($# > 1)); then
    targets=("${@:2}")
fi
# Release with debug assertions and overflow checks, AddressSanitizer (cargo-fuzz's default).
cargo fuzz build

failed=()
summary=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    log="fuzz/artifacts/$target/last-run.log"
    echo "fuzz.sh: $target for ${seconds}s"
    if cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$target")
        tail -n 40 "$log"
    fi
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)"
    summary+=("$(printf '%-10s %-6s %s executions' "$target" "$status" "${execs:-?}")")
done

printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "fuzz.sh: failed: ${failed[*]} (inputs in shim/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, ${seconds}s each, no crash"
