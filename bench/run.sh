#!/usr/bin/env bash
# bench/run.sh [--quick]: fdcast's benchmarks (docs/performance.md). Builds the programs
# (make bench-build), runs them, and prints the tables with ratios fdcast / other.
#
#   full     (under 5 minutes) writes bench/results.md and bench/deliveries.png
#   --quick  (under 1 minute) small sizes, one run each, results in target/bench/; the smoke
#            check CI runs: it fails (exit 1) if any receiver misses a byte, never on a time
#
# Programs (see the comment at the top of each): bench/fanout.c (part 1, physical limit),
# bench/pubsub.c + bench/fdcast_server.c (part 2, Redis), bench/registry.rs (parts 3 and 4,
# registry costs and contention), bench/slow.c (part 5, slow consumers),
# bench/pg_crossprocess.rs (part 6), bench/brokers.rs (part 7: PostgreSQL, Redis, Redis Cluster
# (three primaries it starts itself) and NATS from one process to two others, against a
# baseline publisher of each; and, part 7.4, Redis and NATS with history shared through the
# broker against the same runs without), bench/replay.c (part 8: CPU of replaying 1,000 missed messages
# to one fd, per mode, against its 100 µs target), bench/lagging.c (part 9: RSS of readers
# that stop reading, with history on and off). Each runs its contenders alternating, reps
# times, and reports medians; bench/report.py makes the tables of parts 1-5.
# Needs redis-server, redis-cli and redis-benchmark (redis-tools; installed with apt-get when
# missing; Redis 7 for the cluster's sharded pub/sub), PostgreSQL and NATS for parts 6-7
# (FDCAST_PG_URL, FDCAST_REDIS_URL, FDCAST_NATS_URL; broker_bench skips, with a note, an
# engine whose server does not answer) and, for the plot, matplotlib (installed with pip when
# missing; the quick run makes no plot).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: bench/run.sh [--quick]" >&2; exit 2 ;;
esac

redis_packages=()
command -v redis-server >/dev/null 2>&1 || redis_packages+=(redis-server)
if ! command -v redis-benchmark >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  redis_packages+=(redis-tools)
fi
if ((${#redis_packages[@]})); then
  echo "bench: installing ${redis_packages[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${redis_packages[@]}" >/dev/null
fi
if ((!quick)) && ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "bench: installing matplotlib" >&2
  python3 -m pip install -q --disable-pip-version-check matplotlib ||
    echo "bench: no matplotlib, no plot" >&2
fi

make -s bench-build >&2
# Run private copies, so that a rebuild by someone else meanwhile cannot swap them mid-run.
B=$(mktemp -d target/bench/run.XXXXXX)
trap 'rm -rf "$B"' EXIT
cargo build --release -q --example pg_crossprocess
cp target/bench/{fanout,pubsub,fdcast_server,slow,replay,lagging} \
  target/release/examples/{registry_bench,pg_crossprocess,broker_bench} "$B"/
raw=$B/results.txt
if ((quick)); then
  md=target/bench/quick-results.md png=
else
  md=bench/results.md png=bench/deliveries.png
fi
: >"$raw"
failed=0
start=$SECONDS

# run CMD...: prints what runs, keeps its RESULT lines; a failing program fails the run.
run() {
  local t0=$SECONDS
  printf '+ %s\n' "$*" >&2
  if ! "$@" | tee -a "$raw" >&2; then
    echo "bench: FAILED: $*" >&2
    failed=1
  fi
  printf '  (%d s)\n' $((SECONDS - t0)) >&2
}

if ((quick)); then
  for n in 1 100 10000; do run $B/fanout transport=unix n=$n s=64 deliveries=20000 reps=1; done
  for n in 1 100 1000; do run $B/fanout transport=tcp n=$n s=64 deliveries=20000 reps=1; done
  for t in unix tcp; do run $B/fanout transport=$t n=100 s=1024 deliveries=20000 reps=1; done
  run $B/fanout part=fdcheck transport=unix n=100 s=64 deliveries=20000 reps=1 \
    contenders=raw,raw-checked,corked,corked-checked
  run $B/fanout part=history transport=unix n=100 s=64 deliveries=20000 reps=1 \
    contenders=raw,raw-history,corked,corked-history
  run $B/pubsub n=100 s=64 deliveries=50000 reps=1 server=$B/fdcast_server
  run $B/registry_bench --quick
  run $B/slow n=100 s=1024 m=1400 reps=1
else
  # deliveries per run (at least K=16 messages): about 0.3 s for the slowest contender
  for t in unix tcp; do
    for s in 64 1024; do
      d=$([[ $t == unix ]] && echo 100000 || echo 40000)
      ((s > 64)) && d=$((d / 2))
      for n in 1 10 100 1000 10000; do
        run $B/fanout transport=$t n=$n s=$s deliveries=$d reps=5
      done
    done
  done
  for n in 100 1000; do
    run $B/fanout part=fdcheck transport=unix n=$n s=64 deliveries=100000 reps=5 \
      contenders=raw,raw-checked,corked,corked-checked
    run $B/fanout part=history transport=unix n=$n s=64 deliveries=100000 reps=5 \
      contenders=raw,raw-history,corked,corked-history
  done
  for n in 100 1000; do run $B/pubsub n=$n s=64 deliveries=1000000 reps=3 server=$B/fdcast_server; done
  run $B/registry_bench
  run $B/slow n=400 s=1024 m=1400 reps=3
fi

# A full run also rewrites docs/performance.md's summary from the same rows.
summary_args=()
if ((!quick)); then summary_args=(--summary docs/performance.md); fi
python3 bench/report.py "$raw" "$md" $png ${summary_args[@]+"${summary_args[@]}"}
cp "$raw" "${md%.md}.txt"

# Cross-process fan-out through PostgreSQL: publish in this process, bytes on a
# socket in another; the receiver checks every message arrived once, in order.
{
  echo
  echo "## 6. Cross-process through PostgreSQL"
  echo
  echo "Publisher and receiver in two processes, each with its own registry and connection to"
  echo "the local server; SSE framing; latency is publish → bytes read from the receiver's socket"
  echo "(CLOCK_MONOTONIC, shared by both processes). \`offered/s\` max: as fast as publishes go."
  echo
  echo "| messages | offered/s | published/s | received/s | p50 µs | p99 µs | max µs |"
  echo "|---|---|---|---|---|---|---|"
} >>"$md"
if ((quick)); then
  pg_runs=("2000 0")
else
  pg_runs=("20000 0" "10000 1000" "10000 5000")
fi
for r in "${pg_runs[@]}"; do
  printf '+ pg_crossprocess %s\n' "$r" >&2
  # shellcheck disable=SC2086
  if ! $B/pg_crossprocess $r >>"$md"; then
    echo "bench: FAILED: pg_crossprocess $r" >&2
    failed=1
  fi
done

# Cross-process through PostgreSQL, Redis, Redis Cluster and NATS against a baseline publisher
# of each
# (bench/brokers.rs): throughput, latency at 10,000/s, interest routing, and Redis and NATS
# throughput with shared history (Redis streams, JetStream) on against off. Every receiver
# checks every message on every socket (once, in order).
broker_args=()
if ((quick)); then broker_args=(--quick); fi
echo >>"$md"
printf '+ broker_bench %s\n' "${broker_args[*]}" >&2
t0=$SECONDS
if ! $B/broker_bench ${broker_args[@]+"${broker_args[@]}"} >>"$md"; then
  echo "bench: FAILED: broker_bench ${broker_args[*]}" >&2
  failed=1
fi
printf '  (%d s)\n' $((SECONDS - t0)) >&2
# Replaying 1,000 missed 64-byte messages to one fd, per mode (bench/replay.c): CPU µs per
# replay against the 100 µs target.
replay_reps=300
if ((quick)); then replay_reps=30; fi
echo >>"$md"
printf '+ replay m=1000 s=64 reps=%d\n' "$replay_reps" >&2
t0=$SECONDS
if ! $B/replay m=1000 s=64 reps=$replay_reps >>"$md"; then
  echo "bench: FAILED: replay" >&2
  failed=1
fi
printf '  (%d s)\n' $((SECONDS - t0)) >&2
# Readers that stop reading, inside a history as long as the run, with history on and off
# (bench/lagging.c): RSS, and one reader that then catches up with every message, in order.
if ((quick)); then lagging_args=(n=1000 m=1000); else lagging_args=(n=10000 m=10000); fi
echo >>"$md"
printf '+ lagging %s\n' "${lagging_args[*]}" >&2
t0=$SECONDS
if ! $B/lagging "${lagging_args[@]}" >>"$md"; then
  echo "bench: FAILED: lagging ${lagging_args[*]}" >&2
  failed=1
fi
printf '  (%d s)\n' $((SECONDS - t0)) >&2
echo >&2
echo "bench: $((SECONDS - start)) s; tables in $md${png:+, plot in $png}" >&2
if ((failed)); then
  echo "bench: FAILED: some receiver did not get every byte, or a program failed (see above)" >&2
  exit 1
fi
