#!/usr/bin/env bash
# Mount benchmark: `brickbox mount` vs `restic mount` vs `borg mount` on the bench tree.
#
# Usage:  bench/mount.sh                 # ~2 GiB tree (the one bench/run.sh uses)
#         SCALE=0.05 bench/mount.sh      # quick run
#
# Environment: SCALE, BENCH_DIR, BRICKBOX, TOOLS as in bench/run.sh, and
#   FRESH=1    back up into new boxes even if boxes of this tree exist
#   BLOCK_SIZE Brickbox's average block size (`init --block-size`, e.g. 128KiB); its box is
#              kept apart from the default one
#
# Each tool backs up the pristine tree once (not timed; the boxes are kept in
# $BENCH_DIR/mount-work/<tool> and reused by the next run), then one mount is timed phase by
# phase, with the page cache dropped before each phase (root only). Output: a markdown report on
# stdout and in $BENCH_DIR/mount-results.md; tool output in $BENCH_DIR/logs/mount-<tool>.log.
# See bench/README.md.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SCALE=${SCALE:-1.0}
BENCH_DIR=${BENCH_DIR:-/tmp/brickbox-bench}
BRICKBOX=${BRICKBOX:-$REPO/target/release/brickbox}
TOOLS=${TOOLS:-brickbox restic borg}
FRESH=${FRESH:-0}
BLOCK_SIZE=${BLOCK_SIZE:-}
PROBE="python3 $HERE/mount_probe.py"

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(realpath "$BENCH_DIR")
WORKROOT=$BENCH_DIR/mount-work
MNT=$WORKROOT/mnt
LOGS=$BENCH_DIR/logs
RESULTS=$BENCH_DIR/mount-results.md
mkdir -p "$LOGS" "$MNT"

export BRICKBOX_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
export BORG_DISPLAY_PASSPHRASE=no BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

log() { echo "[mount-bench $(date +%H:%M:%S)] $*" >&2; }
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

[[ $(id -u) == 0 ]] || log "warning: not root: the page cache cannot be dropped and mounting may need fusermount3"
ensure_tree
TREE_BYTES=$(find "$TREE" -type f -printf '%s\n' | awk '{s+=$1} END{printf "%d", s}')
TREE_ENTRIES=$(find "$TREE" | wc -l)
SMALL_LIST=$WORKROOT/small-files.txt
(cd "$TREE" && find small -type f | sort | head -n 1000) >"$SMALL_LIST"
SMALL_COUNT=$(wc -l <"$SMALL_LIST")
BIG_RANDOM=big/random.bin
BIG_TEXT=big/text.log

now() { date +%s.%N; }

# Per tool: prepare (init + backup once), mount command, where the tree appears in the mount.
prepare_brickbox() {
  "$BRICKBOX" -r "$BOX" --db "$WORK/brickbox.db" init ${BLOCK_SIZE:+--block-size "$BLOCK_SIZE"} \
    && "$BRICKBOX" -r "$BOX" --db "$WORK/brickbox.db" backup "$TREE"
}
mount_brickbox() { echo "$BRICKBOX -r $BOX --db $WORK/brickbox.db mount $MNT"; }
root_brickbox() { echo "$MNT/versions/latest$TREE"; }

prepare_restic() { restic -r "$BOX" init && restic -r "$BOX" backup "$TREE"; }
mount_restic() { echo "restic -r $BOX mount $MNT"; }
root_restic() { echo "$MNT/snapshots/latest$TREE"; }

prepare_borg() { borg init -e repokey-blake2 "$BOX" && borg create "$BOX::bench" "$TREE"; }
mount_borg() { echo "borg mount -f $BOX::bench $MNT"; }
root_borg() { echo "$MNT$TREE"; }

declare -A R   # R[tool,metric]

bench_tool() {
  local tool=$1
  WORK=$WORKROOT/$tool
  [[ $tool == brickbox && -n $BLOCK_SIZE ]] && WORK=$WORKROOT/brickbox-blocks-$BLOCK_SIZE
  BOX=$WORK/box
  LOG=$LOGS/mount-$tool.log
  : >"$LOG"
  export BORG_BASE_DIR=$WORK/borg-home RESTIC_CACHE_DIR=$WORK/restic-cache
  if [[ $FRESH == 1 || ! -f $WORK/.ready-$TREE_NAME ]]; then
    log "$tool: backing up $TREE (not timed)"
    rm -rf "$WORK"; mkdir -p "$WORK"
    "prepare_$tool" >>"$LOG" 2>&1 || { log "$tool: backup failed, see $LOG"; return 1; }
    touch "$WORK/.ready-$TREE_NAME"
  fi
  mountpoint -q "$MNT" && umount -l "$MNT"
  local root; root=$(root_$tool)

  drop_caches
  local started
  # shellcheck disable=SC2046
  started=$($PROBE start "$LOG" "$root" -- $("mount_$tool")) || { log "$tool: mount failed, see $LOG"; return 1; }
  local pid=${started#* }
  R[$tool,ready]=${started% *}
  log "$tool: mount ready in ${R[$tool,ready]} s (pid $pid)"

  local t0
  drop_caches; t0=$(now); ls -R "$root" >/dev/null 2>>"$LOG"; R[$tool,lsr]=$(secs_since "$t0")
  R[$tool,entries]=$(ls -R "$root" 2>/dev/null | grep -cv -e '^$' -e ':$')
  drop_caches; t0=$(now); find "$root" -printf '%s %m %u\n' >/dev/null 2>>"$LOG"; R[$tool,stat]=$(secs_since "$t0")
  drop_caches
  read -r R[$tool,p50] R[$tool,p95] R[$tool,max] < <($PROBE random "$root/$BIG_RANDOM" 200 4096 42)
  drop_caches; t0=$(now); (cd "$root" && xargs -d '\n' -a "$SMALL_LIST" cat >/dev/null); R[$tool,small]=$(secs_since "$t0")
  drop_caches; t0=$(now); cat "$root/$BIG_RANDOM" >/dev/null; R[$tool,seq]=$(secs_since "$t0")
  R[$tool,seqmb]=$(mbps "$(stat -c %s "$root/$BIG_RANDOM")" "${R[$tool,seq]}")
  drop_caches; t0=$(now); cat "$root/$BIG_TEXT" >/dev/null; R[$tool,seqt]=$(secs_since "$t0")
  R[$tool,seqtmb]=$(mbps "$(stat -c %s "$root/$BIG_TEXT")" "${R[$tool,seqt]}")
  R[$tool,rss]=$($PROBE hwm "$pid")
  # Check what was read: the big file's checksum through the mount.
  if cmp -s "$TREE/$BIG_RANDOM" "$root/$BIG_RANDOM"; then R[$tool,ok]=OK; else R[$tool,ok]=MISMATCH; fi
  $PROBE stop "$pid" "$MNT"
  log "$tool: ls -R ${R[$tool,lsr]} s, stat ${R[$tool,stat]} s, seq ${R[$tool,seqmb]} MB/s, rss ${R[$tool,rss]} MiB"

  if [[ $tool == brickbox ]]; then
    local rdir=$WORK/restore
    rm -rf "$rdir"; mkdir -p "$rdir"
    drop_caches; t0=$(now)
    if "$BRICKBOX" -r "$BOX" --db "$WORK/brickbox.db" restore --target "$rdir" >>"$LOG" 2>&1; then
      R[$tool,restore]=$(secs_since "$t0")
      R[$tool,restoremb]=$(mbps "$TREE_BYTES" "${R[$tool,restore]}")
    else
      log "$tool: restore failed, see $LOG"
    fi
    rm -rf "$rdir"
  fi
}

RAN=()
for tool in $TOOLS; do
  case $tool in
    brickbox) [[ -x $BRICKBOX ]] || { log "brickbox binary $BRICKBOX not found; build it with cargo build --release"; continue; } ;;
    restic|borg) command -v "$tool" >/dev/null || { log "$tool not installed, skipping"; continue; } ;;
    *) log "unknown tool '$tool', skipping"; continue ;;
  esac
  if [[ $tool == borg ]]; then
    borg_py=$(head -n1 "$(command -v borg)" | sed -n 's/^#! *\([^ ]*\).*/\1/p')
    if ! "${borg_py:-python3}" -c 'import llfuse' 2>/dev/null && ! "${borg_py:-python3}" -c 'import pyfuse3' 2>/dev/null; then
      log "borg mount needs llfuse or pyfuse3 (apt-get install python3-llfuse); skipping borg"
      continue
    fi
  fi
  log "=== $tool"
  bench_tool "$tool" && RAN+=("$tool")
done

report() {
  local cpu ram
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  ram=$(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)
  echo "# Brickbox mount benchmark"
  echo
  echo "Machine: $(nproc) cores, ${cpu:-unknown CPU}, $ram RAM, $(uname -sr); $(date -u '+%Y-%m-%d %H:%M UTC');" \
       "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "Tree: SCALE=$SCALE, $(awk -v b="$TREE_BYTES" 'BEGIN{printf "%.1f", b/1048576}') MiB, $TREE_ENTRIES entries;" \
       "local boxes; page cache dropped before each phase: $CACHE_DROP;" \
       "Brickbox block size: ${BLOCK_SIZE:-default (256KiB)}."
  echo
  local hdr="| phase | target |" sep="|---|---:|" t
  for t in "${RAN[@]}"; do hdr+=" $t |"; sep+="---:|"; done
  echo "$hdr"; echo "$sep"
  row() {
    local label=$1 target=$2 key=$3 r="| $1 | $2 |"
    for t in "${RAN[@]}"; do r+=" ${R[$t,$key]:-–} |"; done
    echo "$r"
  }
  row "mount to ready (s)" "≤ 0.3" ready
  row "entries listed by ls -R" "" entries
  row "cold ls -R (s)" "≤ 0.3" lsr
  row "stat of every entry (s)" "≤ 0.5" stat
  row "sequential read, 400 MiB random (s)" "" seq
  row "sequential read, 400 MiB random (MB/s)" "≥ 800" seqmb
  row "sequential read, 400 MiB text (MB/s)" "" seqtmb
  row "$SMALL_COUNT small files (s)" "≤ 0.3" small
  row "random 4 KiB read p50 (ms)" "≤ 1.0" p50
  row "random 4 KiB read p95 (ms)" "≤ 4" p95
  row "random 4 KiB read max (ms)" "" max
  row "daemon peak RSS (MiB)" "≤ 100" rss
  row "bytes read match the source" "" ok
  if [[ -n ${R[brickbox,restoremb]:-} ]]; then
    local pct
    pct=$(awk -v a="${R[brickbox,seqmb]}" -v b="${R[brickbox,restoremb]}" 'BEGIN{ if (b>0) printf "%.0f", 100*a/b }')
    echo
    echo "Brickbox full restore of the tree: ${R[brickbox,restore]} s = ${R[brickbox,restoremb]} MB/s;" \
         "sequential read through the mount = $pct % of it (target ≥ 90 %)."
  fi
  echo
  echo "MB/s = 10^6 bytes per second. Logs: $LOGS/mount-<tool>.log"
}

report | tee "$RESULTS"
log "results written to $RESULTS"
