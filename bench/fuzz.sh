#!/usr/bin/env bash
# Fuzzes the parsers of every Brickbox object type with libFuzzer (cargo-fuzz), each target
# for SECONDS_PER_TARGET seconds, from a corpus seeded with real objects, then prints a
# summary. Not part of CI. See bench/README.md ("Fuzzing").
#
#   bench/fuzz.sh [SECONDS_PER_TARGET]        default 70 (9 targets: ~11 min)
#   TARGETS="tree index" bench/fuzz.sh 600    only these targets
#   SANITIZER=none bench/fuzz.sh              no AddressSanitizer (faster, no malloc limit)
set -euo pipefail

SECS="${1:-70}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FUZZ_DIR="$ROOT/bench/fuzz"
SANITIZER="${SANITIZER:-address}"
RSS_MB="${RSS_MB:-2048}"
ALL_TARGETS="config key_file sealed_envelope sealed_payload index tree block volume catalog_content"
TARGETS="${TARGETS:-$ALL_TARGETS}"
LOG_DIR="$FUZZ_DIR/logs"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
# cargo-fuzz passes nightly-only flags (-Zsanitizer, ...); this lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1
cd "$ROOT"

echo "== building the fuzz targets (sanitizer: $SANITIZER)"
cargo fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER"

echo "== writing seeds from a real box"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
"${CARGO_TARGET_DIR:-$FUZZ_DIR/target}/$HOST/release/seeds" "$FUZZ_DIR/corpus"

mkdir -p "$LOG_DIR"
total_execs=0
total_secs=0
crashed=()
rows=()
for t in $TARGETS; do
    mkdir -p "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/artifacts/$t"
    before=$(ls "$FUZZ_DIR/corpus/$t" | wc -l)
    echo "== $t: ${SECS}s from $before inputs"
    start=$(date +%s)
    set +e
    cargo fuzz run --fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" "$t" "$FUZZ_DIR/corpus/$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb="$RSS_MB" -print_final_stats=1 \
        >"$LOG_DIR/$t.log" 2>&1
    rc=$?
    set -e
    secs=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG_DIR/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$LOG_DIR/$t.log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$LOG_DIR/$t.log" | tail -1)
    after=$(ls "$FUZZ_DIR/corpus/$t" | wc -l)
    result=ok
    if [ "$rc" -ne 0 ]; then
        result="CRASH (see $LOG_DIR/$t.log, artifacts/$t)"
        crashed+=("$t")
        grep -m3 -E "^==[0-9]+==ERROR|panicked at|SUMMARY|Test unit written" "$LOG_DIR/$t.log" | sed 's/^/    /' || true
    fi
    total_execs=$((total_execs + ${execs:-0}))
    total_secs=$((total_secs + secs))
    rows+=("| $t | ${execs:-?} | ${rate:-?} | $secs | $before → $after | ${rss:-?} | $result |")
done

echo
echo "## Fuzzing summary ($(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), sanitizer: $SANITIZER)"
echo
echo "| target | executions | exec/s | seconds | corpus | peak RSS MiB | result |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "total: ${#rows[@]} targets, $total_execs executions, ${total_secs}s, ${#crashed[@]} crashing"
[ ${#crashed[@]} -eq 0 ]
