#!/usr/bin/env bash
# Trust benchmark: catalog recreation, verification and maintenance on the benchmark tree
# with 10 versions, plus larger runs of the crash/corruption campaigns.
#
# Usage:  bench/trust.sh                    # ~2 GiB tree, 10 versions
#         SCALE=0.05 bench/trust.sh         # quick run
#         CAMPAIGN_SCALE=10 bench/trust.sh  # also run the campaigns 10x larger than in CI
#
# Environment: SCALE, BENCH_DIR, BRICKBOX as for bench/run.sh; VERSIONS (default 10);
# CAMPAIGN_SCALE (default 0: campaigns not run). Output: a markdown table on stdout and in
# $BENCH_DIR/trust-results.md; command output in $BENCH_DIR/logs/trust.log.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SCALE=${SCALE:-1.0}
VERSIONS=${VERSIONS:-10}
CAMPAIGN_SCALE=${CAMPAIGN_SCALE:-0}
BENCH_DIR=${BENCH_DIR:-/tmp/brickbox-bench}
BRICKBOX=${BRICKBOX:-$REPO/target/release/brickbox}
mkdir -p "$BENCH_DIR/logs"
BENCH_DIR=$(realpath "$BENCH_DIR")
SRC=$BENCH_DIR/trust-src
BOX=$BENCH_DIR/work/trust/box
DB=$BENCH_DIR/work/trust/catalog.sqlite
LOG=$BENCH_DIR/logs/trust.log
OUT=$BENCH_DIR/trust-results.md
export BRICKBOX_PASSWORD=bench

[[ -x $BRICKBOX ]] || { echo "error: $BRICKBOX not found; run 'cargo build --release' first" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "error: GNU time missing: apt-get install -y time" >&2; exit 1; }

log() { echo "[trust $(date +%H:%M:%S)] $*" >&2; }
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
bb() { "$BRICKBOX" -r "$BOX" --db "$DB" "$@"; }

# Runs a brickbox command with a cold cache; records seconds and peak RSS (MiB) under NAME.
declare -A SECS RSS NOTE
timed() {
    local name=$1
    shift
    drop_caches
    local tf
    tf=$(mktemp)
    /usr/bin/time -f '%e %M' -o "$tf" "$BRICKBOX" -r "$BOX" --db "$DB" "$@" >>"$LOG" 2>&1 || {
        echo "error: '$*' failed, see $LOG" >&2
        exit 1
    }
    read -r s kb <"$tf"
    rm -f "$tf"
    SECS[$name]=$s
    RSS[$name]=$((kb / 1024))
    log "$name: ${s}s, $((kb / 1024)) MiB"
}

ensure_tree
rm -rf "$SRC" "$BENCH_DIR/work/trust"
mkdir -p "$BENCH_DIR/work/trust"
cp -a "$TREE" "$SRC"
rm -f "$SRC/.done"
: >"$LOG"

# One round of changes: a few hundred small files edited, some added and removed, a big file
# appended to. Deterministic per round.
mutate() {
    python3 - "$SRC" "$1" <<'EOF'
import os, random, sys
src, rnd = sys.argv[1], int(sys.argv[2])
rng = random.Random(rnd)
small = []
for root, _, files in os.walk(os.path.join(src, "small")):
    small.extend(os.path.join(root, f) for f in files)
small.sort()
for path in rng.sample(small, min(200, len(small))):
    with open(path, "ab") as f:
        f.write(rng.randbytes(rng.randrange(100, 4000)))
for i in range(50):
    with open(os.path.join(src, "small", f"new-{rnd}-{i}.bin"), "wb") as f:
        f.write(rng.randbytes(rng.randrange(1000, 60000)))
for path in rng.sample(small, min(20, len(small))):
    os.remove(path)
with open(os.path.join(src, "big", "random.bin"), "ab") as f:
    f.write(rng.randbytes(1 << 20))
EOF
}

log "init and $VERSIONS backups"
bb init -q
for ((v = 1; v <= VERSIONS; v++)); do
    [[ $v -gt 1 ]] && mutate "$v"
    bb backup "$SRC" -q >>"$LOG" 2>&1
done
BOX_BYTES=$(du -sb "$BOX" | cut -f1)
VOLUMES=$(ls "$BOX/data" | wc -l)

log "measuring"
rm -f "$DB" "$DB-wal" "$DB-shm"
timed recreate recreate-db
timed nochange_after_recreate backup "$SRC" --json
ADDED=$(grep -o '"bytes_added": [0-9]*' "$LOG" | tail -1 | grep -o '[0-9]*$' || true)
NOTE[nochange_after_recreate]="re-reads every file (the change-detection cache is local); added ${ADDED:-?} bytes"
timed nochange backup "$SRC" -q
timed verify verify
timed verify_all verify --all --read-data
timed repair_noop repair
timed list_broken list-broken-files
timed forget forget --keep-last 5
timed compact compact
timed verify_after verify --all --read-data

{
    echo "## Trust benchmark"
    echo
    echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "Tree: scale $SCALE ($(du -sh "$TREE" | cut -f1)), $VERSIONS versions, box $((BOX_BYTES / 1048576)) MiB in $VOLUMES volumes; page cache dropped before each step."
    echo
    echo "| step | seconds | peak RSS (MiB) | note |"
    echo "|---|---:|---:|---|"
    for k in recreate nochange_after_recreate nochange verify verify_all repair_noop list_broken forget compact verify_after; do
        echo "| $k | ${SECS[$k]} | ${RSS[$k]} | ${NOTE[$k]:-} |"
    done
    echo
    echo "Target: recreate-db ≤ 10 s for ~2 GiB / 22k files / 10 versions."
} | tee "$OUT"

if [[ $CAMPAIGN_SCALE -gt 0 ]]; then
    log "campaigns at scale $CAMPAIGN_SCALE (debug build of the tests)"
    (cd "$REPO" && BRICKBOX_CAMPAIGN_SCALE=$CAMPAIGN_SCALE cargo test -p brickbox --test e2e campaign -- --nocapture 2>&1 |
        grep -E "campaign \(|test result" | tee -a "$OUT")
fi
