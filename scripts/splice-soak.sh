#!/usr/bin/env bash
# Puts the last soak report (bench/SOAK.md, written by `make soak`) into bench/RESULTS.md
# between markers, replacing an earlier copy. `make bench` rewrites RESULTS.md and `make soak`
# writes SOAK.md; both call this so RESULTS.md always carries both.
set -euo pipefail
cd "$(dirname "$0")/.."
results=bench/RESULTS.md soak=bench/SOAK.md
[ -f "$results" ] && [ -f "$soak" ] || exit 0
begin='<!-- soak report: spliced from bench/SOAK.md by scripts/splice-soak.sh -->'
end='<!-- end of soak report -->'
tmp=$(mktemp)
awk -v b="$begin" -v e="$end" '$0==b{skip=1} !skip{print} $0==e{skip=0}' "$results" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' > "$tmp"
{
  cat "$tmp"
  printf '\n%s\n\n' "$begin"
  # One level down: the soak report becomes a section of RESULTS.md.
  sed -e 's/^# /## /' "$soak"
  printf '\n%s\n' "$end"
} > "$results"
rm -f "$tmp"
