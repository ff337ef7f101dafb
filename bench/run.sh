#!/usr/bin/env bash
# Brickbox benchmark: brickbox vs restic vs borg on the same generated tree.
#
# Usage:  bench/run.sh                 # full run (~2 GiB source tree)
#         SCALE=0.02 bench/run.sh      # quick run (~40 MiB)
#
# Environment:
#   SCALE      size/count multiplier for the source tree (default 1.0)
#   BENCH_DIR  work area: cached trees, boxes, logs, results (default /tmp/brickbox-bench)
#   BRICKBOX   brickbox binary (default <repo>/target/release/brickbox)
#   TOOLS      tools to try, in order (default "brickbox restic borg");
#              restic/borg are skipped when not installed
#
# Output: a markdown report on stdout and in $BENCH_DIR/results.md;
#         every tool command's stdout+stderr in $BENCH_DIR/logs/<tool>.log.
# See bench/README.md for what is measured and how.

set -uo pipefail   # no -e: a failing tool must not stop the benchmark

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SCALE=${SCALE:-1.0}
BENCH_DIR=${BENCH_DIR:-/tmp/brickbox-bench}
BRICKBOX=${BRICKBOX:-$REPO/target/release/brickbox}
TOOLS=${TOOLS:-brickbox restic borg}

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(realpath "$BENCH_DIR")          # tools store absolute paths
SRC=$BENCH_DIR/src          # working copy that is backed up (same path for every tool)
LOGS=$BENCH_DIR/logs
RESULTS=$BENCH_DIR/results.md
mkdir -p "$LOGS"

export BRICKBOX_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
export BORG_DISPLAY_PASSPHRASE=no BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

PHASES=(initial nochange changes restore single)
declare -A PHASE_NAME=(
  [initial]="initial backup" [nochange]="no-change backup"
  [changes]="backup after a day of changes" [restore]="full restore (latest)"
  [single]="single-file restore")

# Results: SECS[tool,phase], RSS[tool,phase] (MiB), plus per-tool extras.
declare -A SECS RSS BOX_INITIAL BOX_FINAL LOCAL_STATE VERIFY VERIFY1 STATUS FAILED_AT

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
# TREE (the pristine cached tree), drop_caches, secs_since, mbps.
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# ---------------------------------------------------------------- prerequisites
if [[ ! -x /usr/bin/time ]]; then
  echo "error: /usr/bin/time (GNU time) not found; install it with: apt-get install -y time" >&2
  exit 1
fi
# -------------------------------------------------------------- source tree
# The page cache is dropped before every phase (root; skipped otherwise).
ensure_tree

# Sum of regular-file sizes (bytes) of a tree.
tree_bytes() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END{printf "%d", s}'; }
# Apparent size (bytes) of a path, 0 if missing.
path_bytes() { if [[ -e $1 ]]; then du -sb "$1" | cut -f1; else echo 0; fi; }

TREE_BYTES=$(tree_bytes "$TREE")
TREE_FILES=$(find "$TREE" -type f | wc -l)
TREE_DIRS=$(find "$TREE" -type d | wc -l)
# The single-file-restore target: first file of a directory mutate.py never touches.
SINGLE_REL=$(cd "$TREE" && find small/g00/d000 -type f | sort | head -n1)
SINGLE_ABS=$SRC/$SINGLE_REL

# ---------------------------------------------------------------- helpers
# timed TOOL PHASE CMD...: run CMD under GNU time, record seconds and peak RSS.
# Returns the command's exit status.  All output goes to the tool's log.
timed() {
  local tool=$1 phase=$2; shift 2
  local tf=$WORK/time.$phase
  drop_caches
  echo "=== [$phase] $*" >>"$LOG"
  /usr/bin/time -f '%e %M' -o "$tf" "$@" >>"$LOG" 2>&1
  local rc=$?
  if (( rc != 0 )); then
    echo "=== [$phase] FAILED with exit status $rc" >>"$LOG"
    FAILED_AT[$tool]="${PHASE_NAME[$phase]} (exit status $rc)"
    log "$tool: $phase FAILED (exit $rc), see $LOG"
    return $rc
  fi
  local secs kib
  read -r secs kib < <(tail -n1 "$tf")
  SECS[$tool,$phase]=$secs
  RSS[$tool,$phase]=$(awk -v k="$kib" 'BEGIN{printf "%.0f", k/1024}')
  log "$tool: $phase ${secs}s, peak RSS ${RSS[$tool,$phase]} MiB"
}

# untimed TOOL CMD...: setup steps (init) - logged, failure counts as tool failure.
untimed() {
  echo "=== [setup] ${*:2}" >>"$LOG"
  "${@:2}" >>"$LOG" 2>&1 || { log "$1: setup command failed: ${*:2}"; FAILED_AT[$1]="setup: ${*:2}"; return 1; }
}

# Per-tool commands.  BOX, DB (brickbox only), WORK are set by bench_tool.
# Each restore_* restores the latest version into $1 (an empty directory).
init_brickbox()    { untimed brickbox "$BRICKBOX" -r "$BOX" --db "$DB" init; }
backup_brickbox()  { timed brickbox "$1" "$BRICKBOX" -r "$BOX" --db "$DB" backup "$SRC"; }
restore_brickbox() { timed brickbox restore "$BRICKBOX" -r "$BOX" --db "$DB" restore --target "$1"; }
single_brickbox()  { timed brickbox single "$BRICKBOX" -r "$BOX" --db "$DB" restore latest "$SINGLE_ABS" --target "$1"; }

init_restic()      { untimed restic restic -r "$BOX" init; }
backup_restic()    { timed restic "$1" restic -r "$BOX" backup "$SRC"; }
restore_restic()   { timed restic restore restic -r "$BOX" restore latest --target "$1"; }
single_restic()    { timed restic single restic -r "$BOX" restore latest --target "$1" --include "$SINGLE_ABS"; }

# borg keeps its cache/keys under BORG_BASE_DIR; archives are bench-1..3.
# borg stores paths without the leading '/' and extracts into the cwd, so
# restores run via `env -C DIR` (env execs borg, so RSS is borg's own).
BORG_N=0
init_borg()        { BORG_N=0; untimed borg borg init -e repokey-blake2 "$BOX"; }
backup_borg()      { BORG_N=$((BORG_N + 1)); timed borg "$1" borg create "$BOX::bench-$BORG_N" "$SRC"; }
restore_borg()     { timed borg restore env -C "$1" borg extract "$BOX::bench-$BORG_N"; }
single_borg()      { timed borg single env -C "$1" borg extract "$BOX::bench-$BORG_N" "${SINGLE_ABS#/}"; }

tool_version() {
  case $1 in
    brickbox) if [[ -x $BRICKBOX ]]; then
                "$BRICKBOX" --version 2>/dev/null | head -n1 || echo "brickbox (version unknown)"
              else echo "binary $BRICKBOX not found"; fi ;;
    restic)   restic version 2>/dev/null | head -n1 ;;
    borg)     borg --version 2>/dev/null | head -n1 ;;
  esac
}

# bench_tool TOOL: run all phases for one tool; stop at the first failure.
bench_tool() {
  local tool=$1
  WORK=$BENCH_DIR/work/$tool
  BOX=$WORK/box
  DB=$WORK/brickbox.db
  LOG=$LOGS/$tool.log
  rm -rf "$WORK"; mkdir -p "$WORK"
  : >"$LOG"
  [[ $tool == borg ]] && export BORG_BASE_DIR=$WORK/borg-home
  [[ $tool == restic ]] && export RESTIC_CACHE_DIR=$WORK/restic-cache
  STATUS[$tool]=fail

  if [[ $tool == brickbox && ! -x $BRICKBOX ]]; then
    log "brickbox: binary $BRICKBOX not found or not executable"
    echo "binary $BRICKBOX not found" >>"$LOG"
    FAILED_AT[$tool]="binary $BRICKBOX not found"
    return 1
  fi
  log "$tool: $(tool_version "$tool")"

  # Fresh copy of the pristine tree at the same absolute path for every tool.
  rm -rf "$SRC"
  cp -a --reflink=auto "$TREE" "$SRC" || { FAILED_AT[$tool]="copying the source tree"; return 1; }

  "init_$tool" || return 1
  "backup_$tool" initial || return 1
  BOX_INITIAL[$tool]=$(path_bytes "$BOX")
  "backup_$tool" nochange || return 1

  log "$tool: applying a day of changes"
  python3 "$HERE/mutate.py" "$SRC" --scale "$SCALE" >>"$LOG" 2>&1 || { FAILED_AT[$tool]="mutate.py"; return 1; }
  RESTORED_BYTES=$(tree_bytes "$SRC")   # what a full restore must write
  "backup_$tool" changes || return 1
  BOX_FINAL[$tool]=$(path_bytes "$BOX")
  LOCAL_STATE[$tool]=$(( $(path_bytes "$DB") + $(path_bytes "$WORK/restic-cache") + $(path_bytes "$WORK/borg-home") ))

  # Full restore into an empty dir, then verify against the (mutated) source.
  local rdir=$WORK/restore
  mkdir -p "$rdir"
  "restore_$tool" "$rdir" || return 1
  if diff -r --no-dereference -q "$SRC" "$rdir/${SRC#/}" >>"$LOG" 2>&1; then
    VERIFY[$tool]=OK
  else
    VERIFY[$tool]=MISMATCH
  fi
  log "$tool: full restore verification: ${VERIFY[$tool]}"
  rm -rf "$rdir"

  # Single small file.
  local sdir=$WORK/restore-one
  mkdir -p "$sdir"
  "single_$tool" "$sdir" || return 1
  local got
  got=$(find "$sdir" -type f | wc -l)
  if [[ $got == 1 ]] && cmp -s "$SINGLE_ABS" "$sdir/${SINGLE_ABS#/}"; then
    VERIFY1[$tool]=OK
  else
    VERIFY1[$tool]="MISMATCH ($got files)"
  fi
  log "$tool: single-file restore verification: ${VERIFY1[$tool]}"
  rm -rf "$sdir"
  STATUS[$tool]=ok
}

# ---------------------------------------------------------------- run
RAN=()
for tool in $TOOLS; do
  case $tool in
    brickbox) ;;
    restic|borg) command -v "$tool" >/dev/null || { log "$tool not installed, skipping"; continue; } ;;
    *) log "unknown tool '$tool', skipping"; continue ;;
  esac
  RAN+=("$tool")
  log "=== $tool"
  bench_tool "$tool"
done
rm -rf "$SRC"

# ---------------------------------------------------------------- report
fmt_mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
# ratio A B: A/B with 2 decimals, "–" when either is missing/zero.
ratio() {
  [[ -n ${1:-} && -n ${2:-} ]] || { echo "–"; return; }
  awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 > 0 && a != "") printf "%.2f", a/b; else printf "–" }'
}
# cell TOOL VALUE: the value, or "fail" when the tool failed and value is unset.
cell() { if [[ -n ${2:-} ]]; then echo "$2"; elif [[ ${STATUS[$1]:-} == ok ]]; then echo "–"; else echo "fail"; fi; }

has() { [[ " ${RAN[*]} " == *" $1 "* ]]; }
OTHERS=(); for t in restic borg; do has "$t" && OTHERS+=("$t"); done
RESTORED_BYTES=${RESTORED_BYTES:-$TREE_BYTES}

report() {
  local cpu ram
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  ram=$(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)
  echo "# Brickbox benchmark"
  echo
  echo "Machine: $(nproc) cores, ${cpu:-unknown CPU}, $ram RAM, $(uname -sr); $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Source: SCALE=$SCALE, $(fmt_mib "$TREE_BYTES") MiB in $TREE_FILES files, $TREE_DIRS dirs." \
       "Page cache dropped before each phase: $CACHE_DROP."
  for t in "${RAN[@]}"; do echo "- $t: $(tool_version "$t")"; done
  echo

  # Table 1: time and peak RSS per phase.
  local hdr="| phase |" sep="|---|"
  for t in "${RAN[@]}"; do hdr+=" $t s | $t MiB |"; sep+="---:|---:|"; done
  for t in "${OTHERS[@]}"; do hdr+=" $t/brickbox time |"; sep+="---:|"; done
  echo "$hdr"; echo "$sep"
  local p t row
  for p in "${PHASES[@]}"; do
    row="| ${PHASE_NAME[$p]} |"
    for t in "${RAN[@]}"; do
      row+=" $(cell "$t" "${SECS[$t,$p]:-}") | $(cell "$t" "${RSS[$t,$p]:-}") |"
    done
    for t in "${OTHERS[@]}"; do row+=" $(ratio "${SECS[$t,$p]:-}" "${SECS[brickbox,$p]:-}") |"; done
    echo "$row"
  done
  echo

  # Table 2: sizes, throughput, verification.
  hdr="| metric |"; sep="|---|"
  for t in "${RAN[@]}"; do hdr+=" $t |"; sep+="---:|"; done
  for t in "${OTHERS[@]}"; do hdr+=" $t/brickbox |"; sep+="---:|"; done
  echo "$hdr"; echo "$sep"
  local -A V
  for t in "${RAN[@]}"; do
    V[$t,bi]=${BOX_INITIAL[$t]:+$(fmt_mib "${BOX_INITIAL[$t]}")}
    V[$t,bf]=${BOX_FINAL[$t]:+$(fmt_mib "${BOX_FINAL[$t]}")}
    V[$t,ls]=${LOCAL_STATE[$t]:+$(fmt_mib "${LOCAL_STATE[$t]}")}
    V[$t,ti]=${SECS[$t,initial]:+$(awk -v b="$TREE_BYTES" -v s="${SECS[$t,initial]}" 'BEGIN{ if (s>0) printf "%.1f", b/1e6/s; else print "inf" }')}
    V[$t,tr]=${SECS[$t,restore]:+$(awk -v b="$RESTORED_BYTES" -v s="${SECS[$t,restore]}" 'BEGIN{ if (s>0) printf "%.1f", b/1e6/s; else print "inf" }')}
    V[$t,vf]=${VERIFY[$t]:-}
    V[$t,v1]=${VERIFY1[$t]:-}
  done
  local k
  for k in "bi;box size after initial backup (MiB);r" "bf;box size after all 3 backups (MiB);r" \
           "ls;local state: brickbox db, restic/borg cache (MiB);r" "ti;initial backup throughput (MB/s);" \
           "tr;full restore throughput (MB/s);" "vf;full restore verification;" "v1;single-file restore verification;"; do
    IFS=';' read -r key label want_ratio <<<"$k"
    row="| $label |"
    for t in "${RAN[@]}"; do row+=" $(cell "$t" "${V[$t,$key]:-}") |"; done
    for t in "${OTHERS[@]}"; do
      if [[ $want_ratio == r ]]; then row+=" $(ratio "${V[$t,$key]:-}" "${V[brickbox,$key]:-}") |"; else row+=" |"; fi
    done
    echo "$row"
  done
  echo
  echo "Times are wall-clock seconds; RSS is peak resident set (GNU time %M). Ratios are other/brickbox (>1: brickbox faster/smaller)."
  echo "MB/s = source bytes (10^6) / seconds. Logs: $LOGS/<tool>.log"
  for t in "${RAN[@]}"; do
    [[ ${STATUS[$t]} == ok ]] || echo "- **$t failed** at ${FAILED_AT[$t]:-unknown step}; see $LOGS/$t.log"
  done
}

report | tee "$RESULTS"
log "results written to $RESULTS"
