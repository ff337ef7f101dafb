# Helpers shared by the bench scripts. Source it after setting HERE (this folder), SCALE,
# BENCH_DIR (absolute) and a `log` function:
#   TREE, TREE_NAME    the cached generated tree for SCALE (`ensure_tree` makes it once)
#   drop_caches        sync and drop the page cache (as root; CACHE_DROP=yes|no says which)
#   secs_since T0      seconds since T0, a `date +%s.%N` value
#   mbps BYTES SECS    10^6 bytes per second
# shellcheck shell=bash

GEN_VERSION=$(sed -n 's/^GEN_VERSION = \([0-9]*\).*/\1/p' "$HERE/gen_tree.py")
TREE_NAME=tree-v$GEN_VERSION-scale-$SCALE
TREE=$BENCH_DIR/$TREE_NAME

# Generated once per (generator version, SCALE) and kept; the ".done" stamp sits outside
# the tree (so it is not backed up) and an interrupted generation is redone.
ensure_tree() {
  [[ -f $TREE.done ]] && return 0
  command -v python3 >/dev/null || { echo "error: python3 is required to generate the source tree" >&2; exit 1; }
  log "generating source tree (SCALE=$SCALE) in $TREE"
  rm -rf "$TREE"
  local t0
  t0=$(date +%s.%N)
  python3 "$HERE/gen_tree.py" "$TREE" --scale "$SCALE" >&2 || { echo "error: tree generation failed" >&2; exit 1; }
  touch "$TREE.done"
  log "generated in $(secs_since "$t0") s"
}

CACHE_DROP=no
if [[ $(id -u) == 0 ]] && sync && echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then CACHE_DROP=yes; fi
drop_caches() {
  sync
  [[ $CACHE_DROP == yes ]] && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null
  return 0
}

secs_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.3f", b-a}'; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN{ if (s > 0) printf "%.0f", b/1e6/s; else print "n/a" }'; }
