#!/usr/bin/env bash
# `make demo` and `make examples` as a new user runs them, on a machine without libuv
# (PKG_CONFIG_LIBDIR points pkg-config at an empty search path): the demo builds what it runs
# and serves SSE; the examples build, all but uv_embed, which is skipped with a message.
# Run by `make demo-test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PKG_CONFIG_LIBDIR=/nonexistent PKG_CONFIG_PATH=
work=$(mktemp -d)
demo_pid=
cleanup() {
  [[ -n $demo_pid ]] && kill -- -"$demo_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "demo_test: FAIL: $*" >&2; exit 1; }

rm -f target/c/sse_fanout target/c/uv_embed
# Its own process group, so that the server make starts is stopped with it.
setsid make -s demo DEMO_PORT=0 >"$work/demo.out" 2>&1 &
demo_pid=$!
port=
for _ in $(seq 600); do
  port=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$work/demo.out")
  [[ -n $port ]] && break
  kill -0 "$demo_pid" 2>/dev/null || fail "make demo exited: $(cat "$work/demo.out")"
  sleep 0.1
done
[[ -n $port ]] || fail "make demo did not start serving within 60 s: $(cat "$work/demo.out")"
[[ ! -e target/c/uv_embed ]] || fail "make demo built uv_embed"

curl -sN --max-time 10 "localhost:$port/events/news" >"$work/events" &
curl_pid=$!
reached=0
for _ in $(seq 100); do
  reached=$(curl -s -d hello "localhost:$port/publish/news" | tr -dc 0-9)
  [[ $reached == 1 ]] && break
  sleep 0.1
done
[[ $reached == 1 ]] || fail "the publish reached ${reached:-nobody}, not the one subscriber"
for _ in $(seq 100); do
  grep -q '^data: hello$' "$work/events" && break
  sleep 0.1
done
grep -q '^data: hello$' "$work/events" || fail "the subscriber did not get 'data: hello'"
kill "$curl_pid" 2>/dev/null || true
echo "ok - make demo (no libuv): built sse_fanout only, served port $port, an SSE client got the publish"

make -s examples >"$work/examples.out" 2>&1 || fail "make examples failed: $(cat "$work/examples.out")"
grep -q 'skipping uv_embed' "$work/examples.out" || fail "make examples did not say it skipped uv_embed"
for example in c-examples/*.c; do
  name=$(basename "$example" .c)
  [[ $name == uv_embed ]] && continue
  [[ -x target/c/$name ]] || fail "make examples did not build $name"
done
[[ ! -e target/c/uv_embed ]] || fail "make examples built uv_embed without libuv"
echo "ok - make examples (no libuv): every example but uv_embed, which it says it skipped"
echo "demo_test: all checks passed"
