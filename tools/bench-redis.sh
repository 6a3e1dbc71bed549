#!/usr/bin/env bash
# Durable SET/GET throughput and latency of a tidewal node against Redis
# with `appendonly yes` + `appendfsync always`, with redis-benchmark
# (`-t set,get -d 100 -P 1`) at 1, 8 and 64 clients, on the same disk and in
# the same run. Runs alternate (tidewal, Redis, tidewal, ...) and each figure
# is the median of REPEAT runs, so drift on a shared machine hits both.
#
# Usage: tools/bench-redis.sh [--quick]
#   env: CLIENTS="1 8 64" REPEAT=3 REQUESTS_PER_CLIENT=... BENCH_DIR=...
# Needs redis-benchmark (Debian: redis-tools); Redis is compared only when
# redis-server is installed (Debian: redis-server).
set -euo pipefail

cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"1 8 64"}
REPEAT=${REPEAT:-3}
if [[ "${1:-}" == "--quick" ]]; then REPEAT=1; CLIENTS=${CLIENTS:-"1 8"}; fi
# Under the target dir: the real disk, not a tmpfs.
BENCH_DIR=${BENCH_DIR:-$PWD/target/bench-redis}
TIDEWAL_PORT=${TIDEWAL_PORT:-7390}
REDIS_PORT=${REDIS_PORT:-7391}

command -v redis-benchmark >/dev/null || { echo "redis-benchmark not found: apt-get install redis-tools" >&2; exit 2; }
cargo build --release --quiet --bin tidewal
rm -rf "$BENCH_DIR"; mkdir -p "$BENCH_DIR"/tidewal "$BENCH_DIR"/redis
echo "filesystem: $(df -T "$BENCH_DIR" | awk 'NR==2 {print $2 " on " $1}')"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

./target/release/tidewal node --data-dir "$BENCH_DIR/tidewal" --listen 127.0.0.1:$TIDEWAL_PORT \
  --admin "" --commit-level local ${TIDEWAL_ARGS:-} 2>"$BENCH_DIR/tidewal.log" &
pids+=($!)
have_redis=0
if command -v redis-server >/dev/null; then
  redis-server --port $REDIS_PORT --dir "$BENCH_DIR/redis" --appendonly yes --appendfsync always \
    --save "" --daemonize no --logfile "$BENCH_DIR/redis.log" &
  pids+=($!)
  have_redis=1
else
  echo "redis-server not installed: tidewal figures only" >&2
fi
for port in $TIDEWAL_PORT $([[ $have_redis == 1 ]] && echo $REDIS_PORT); do
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
done

# One redis-benchmark run: prints "set_rps set_p50 set_p99 get_rps get_p50 get_p99".
run() {
  local port=$1 clients=$2
  local n=$(( clients * ${REQUESTS_PER_CLIENT:-$(( clients == 1 ? 5000 : 1500 ))} ))
  redis-benchmark -p "$port" -t set,get -d 100 -P 1 -c "$clients" -n "$n" -r 100000 --csv 2>/dev/null |
    awk -F'","' '/^"SET"|^"GET"/ { gsub(/"/, "", $0); split($0, f, ","); printf "%s %s %s ", f[2], f[5], f[7] }
                 END { print "" }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -A fig
for c in $CLIENTS; do
  for r in $(seq "$REPEAT"); do
    read -r -a t <<<"$(run $TIDEWAL_PORT "$c")"
    for i in 0 1 2 3 4 5; do fig[tidewal,$c,$i]+="${t[$i]} "; done
    if [[ $have_redis == 1 ]]; then
      read -r -a x <<<"$(run $REDIS_PORT "$c")"
      for i in 0 1 2 3 4 5; do fig[redis,$c,$i]+="${x[$i]} "; done
    fi
  done
done

med() { tr ' ' '\n' <<<"${fig[$1]}" | grep -v '^$' | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

echo
echo "redis-benchmark -t set,get -d 100 -P 1, median of $REPEAT runs; latency in ms"
printf "%-4s %-7s | %10s %7s %7s | %10s %7s %7s | %9s %9s\n" \
  op clients "tidewal/s" p50 p99 "redis/s" p50 p99 "ratio" "p99 lower"
for op in set get; do
  base=0; [[ $op == get ]] && base=3
  for c in $CLIENTS; do
    trps=$(med "tidewal,$c,$base"); tp50=$(med "tidewal,$c,$((base+1))"); tp99=$(med "tidewal,$c,$((base+2))")
    if [[ $have_redis == 1 ]]; then
      rrps=$(med "redis,$c,$base"); rp50=$(med "redis,$c,$((base+1))"); rp99=$(med "redis,$c,$((base+2))")
      lower=$(awk -v a="$tp99" -v b="$rp99" 'BEGIN { print (a < b) ? "yes" : "no" }')
    else
      rrps=0; rp50=-; rp99=-; lower=-
    fi
    printf "%-4s %-7s | %10.0f %7s %7s | %10.0f %7s %7s | %9s %9s\n" \
      "$op" "$c" "$trps" "$tp50" "$tp99" "$rrps" "$rp50" "$rp99" "$(ratio "$trps" "$rrps")" "$lower"
  done
done
echo
echo "bar: durable SET >= 1.5x Redis at 64 clients, >= 1x at 1 client, with a lower p99"
