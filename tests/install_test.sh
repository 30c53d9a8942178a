#!/bin/sh
# `make install` like any C library (run by `make install-test`):
#
#   1. make install PREFIX=<tmp>/prefix installs include/fdcast.h, lib/libfdcast.a,
#      lib/libfdcast.so.X.Y.Z (soname libfdcast.so.X), the links libfdcast.so.X and
#      libfdcast.so, and lib/pkgconfig/fdcast.pc;
#   2. the shared library exports only fdcast_* symbols (nm -D --defined-only; any other
#      is listed);
#   3. with PKG_CONFIG_PATH on the prefix, `pkg-config --cflags --libs fdcast` builds
#      c-examples/sse_fanout.c against the installed header and library (no -Iinclude),
#      the program records NEEDED libfdcast.so.X, loads it from the prefix, and serves a
#      publish, then exits 0 on SIGTERM; --static adds the native libraries;
#   4. DESTDIR stages under another root while fdcast.pc keeps the real prefix, and
#      make uninstall removes every installed file.
#
# Usage: MAKE=make TEST_CC=gcc sh tests/install_test.sh   (from the repository root)
# (not CC: it would reach cargo through the nested make and rebuild every C dependency)
set -eu

MAKE=${MAKE:-make}
cc_bin=${TEST_CC:-gcc}
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
MAJOR=${VERSION%%.*}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/fdcast-install-test.XXXXXX")
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
ok() { echo "ok - $*"; }

# --- 1. the files ------------------------------------------------------------
prefix=$tmp/prefix
$MAKE --no-print-directory install PREFIX="$prefix" >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log" >&2; fail "make install PREFIX=$prefix failed"; }
lib=$prefix/lib
for f in include/fdcast.h lib/libfdcast.a "lib/libfdcast.so.$VERSION" lib/pkgconfig/fdcast.pc; do
  [ -f "$prefix/$f" ] && [ ! -L "$prefix/$f" ] || fail "$f is not installed as a file"
done
[ "$(readlink "$lib/libfdcast.so.$MAJOR")" = "libfdcast.so.$VERSION" ] ||
  fail "libfdcast.so.$MAJOR is not a link to libfdcast.so.$VERSION"
[ "$(readlink "$lib/libfdcast.so")" = "libfdcast.so.$MAJOR" ] ||
  fail "libfdcast.so is not a link to libfdcast.so.$MAJOR"
cmp -s include/fdcast.h "$prefix/include/fdcast.h" || fail "installed header differs"
soname=$(readelf -d "$lib/libfdcast.so.$VERSION" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = "libfdcast.so.$MAJOR" ] || fail "SONAME is '$soname', expected libfdcast.so.$MAJOR"
ok "make install PREFIX=...: header, libfdcast.a, libfdcast.so.$VERSION (SONAME $soname)," \
  "links, fdcast.pc"

# --- 2. exported symbols -----------------------------------------------------
nm -D --defined-only "$lib/libfdcast.so.$VERSION" | awk '{ print $NF }' >"$tmp/symbols"
count=$(grep -c '^fdcast_' "$tmp/symbols" || true)
[ "$count" -gt 20 ] || fail "only $count fdcast_* symbols exported"
if grep -v '^fdcast_' "$tmp/symbols" >"$tmp/others"; then
  echo "symbols exported besides fdcast_*:" >&2
  cat "$tmp/others" >&2
  fail "the shared library exports $(wc -l <"$tmp/others") non-fdcast_ symbols"
fi
ok "the shared library exports only fdcast_* symbols ($count)"

# --- 3. pkg-config, build, link, run -------------------------------------------
export PKG_CONFIG_PATH="$lib/pkgconfig"
[ "$(pkg-config --modversion fdcast)" = "$VERSION" ] || fail "pkg-config --modversion fdcast"
flags=$(pkg-config --cflags --libs fdcast | sed 's/ *$//')
[ "$flags" = "-I$prefix/include -L$lib -lfdcast" ] || fail "pkg-config --cflags --libs: '$flags'"
static=$(pkg-config --static --libs fdcast)
case "$static" in
*"-lfdcast -lgcc_s -lutil -lrt -lpthread -lm -ldl"*) ;;
*) fail "pkg-config --static --libs fdcast: '$static'" ;;
esac
# shellcheck disable=SC2086 # word splitting of pkg-config output is intended
"$cc_bin" -std=c11 -Wall -Wextra -Wpedantic -Werror -O1 -pthread -o "$tmp/sse_fanout" \
  c-examples/sse_fanout.c $flags || fail "building sse_fanout with pkg-config flags"
needed=$(readelf -d "$tmp/sse_fanout" | sed -n 's/.*(NEEDED).*\[\(libfdcast[^]]*\)\]/\1/p')
[ "$needed" = "libfdcast.so.$MAJOR" ] ||
  fail "sse_fanout NEEDED '$needed', expected libfdcast.so.$MAJOR"
resolved=$(LD_LIBRARY_PATH=$lib ldd "$tmp/sse_fanout" |
  awk -v name="libfdcast.so.$MAJOR" '$1 == name { print $3 }')
[ "$resolved" = "$lib/libfdcast.so.$MAJOR" ] || fail "libfdcast.so.$MAJOR resolves to '$resolved'"
ok "pkg-config --cflags --libs fdcast builds sse_fanout: NEEDED $needed, loaded from the prefix"

LD_LIBRARY_PATH=$lib "$tmp/sse_fanout" 0 >"$tmp/server.out" 2>&1 &
server_pid=$!
port=
i=0
while [ -z "$port" ]; do
  i=$((i + 1))
  [ "$i" -le 200 ] || fail "installed sse_fanout did not report its port: $(cat "$tmp/server.out")"
  kill -0 "$server_pid" 2>/dev/null || fail "installed sse_fanout exited: $(cat "$tmp/server.out")"
  sleep 0.05
  port=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/server.out")
done
grep -q "(fdcast $VERSION)" "$tmp/server.out" || fail "server did not print fdcast $VERSION"
answer=$(curl -s -S --max-time 10 -d hello "http://127.0.0.1:$port/publish/news") ||
  fail "publish to the installed sse_fanout failed"
[ "$answer" = "0" ] || fail "publish answered '$answer', expected 0"
kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
server_pid=
[ "$rc" -eq 0 ] || fail "installed sse_fanout exited $rc on SIGTERM"
ok "the installed build runs: fdcast $VERSION, publish answered, exit 0 on SIGTERM"

# --- 4. DESTDIR and uninstall ------------------------------------------------
stage=$tmp/stage
$MAKE --no-print-directory install DESTDIR="$stage" PREFIX=/opt/fdcast >"$tmp/install2.log" 2>&1 ||
  { cat "$tmp/install2.log" >&2; fail "make install DESTDIR=... failed"; }
[ -f "$stage/opt/fdcast/lib/libfdcast.so.$VERSION" ] || fail "DESTDIR: library not staged"
grep -qx 'prefix=/opt/fdcast' "$stage/opt/fdcast/lib/pkgconfig/fdcast.pc" ||
  fail "DESTDIR: fdcast.pc does not say prefix=/opt/fdcast"
if grep -q "$stage" "$stage/opt/fdcast/lib/pkgconfig/fdcast.pc"; then
  fail "DESTDIR leaked into fdcast.pc"
fi
$MAKE --no-print-directory uninstall DESTDIR="$stage" PREFIX=/opt/fdcast >/dev/null 2>&1 ||
  fail "make uninstall failed"
left=$(find "$stage" \( -type f -o -type l \) | sed "s|^$stage||")
[ -z "$left" ] || fail "make uninstall left: $left"
ok "DESTDIR stages under a root, fdcast.pc naming the real prefix; make uninstall removes it all"

echo "install_test: all checks passed"
