# fdcast: C-side build and test driver.
#
#   make lib           cargo build --release (static + shared library, include/fdcast.h)
#   make examples      c-examples/*.c -> target/c/
#   make demo          run target/c/sse_fanout on 127.0.0.1:8080
#   make c-test        C tests: static lib + ASan/UBSan, shared lib + valgrind, header check
#   make example-test  end-to-end test of the sse_fanout example
#   make demo-test     make demo and make examples as on a machine without libuv
#   make ws-chat-test  ws_chat against Python websockets/SSE clients and headless Chromium
#   make log-fanout-test  log_fanout with 100 nc/socat/Python clients
#   make uv-embed-test the libuv example, driven by the sse_fanout test
#   make ctypes-test   the C ABI from Python ctypes
#   make install       PREFIX=/usr/local DESTDIR=: header, libraries, fdcast.pc
#   make install-test  install into a temp prefix, build and run against it
#   make bench         benchmarks (bench/run.sh): tables in bench/results.md, plot
#   make rust-test     cargo test --all-targets (with the model test, the soak, resource limits)
#   make c-test-threads  the threaded C test under valgrind's helgrind
#   make deadlock-test stress with parking_lot's deadlock detector (feature deadlock-detection)
#   make soak          the soak under faults alone (SOAK_SECS, default 60)
#   make fuzz-smoke    each fuzz target for FUZZ_SECS (default 20) seconds (fuzz/smoke.sh)
#   make test          every test suite (what README and CI run), after `make deps`
#   make deps          install and start what the tests need (scripts/test-deps.sh)
#   make clean
#
# GNU make. Every recipe stops at the first failing command.

.POSIX:
.SUFFIXES:
.DELETE_ON_ERROR:
SHELL := /bin/sh

CARGO   ?= cargo
CC      := gcc
CXX     := g++
PYTHON  ?= python3
VALGRIND ?= valgrind

LIBDIR     := target/release
STATIC_LIB := $(LIBDIR)/libfdcast.a
HEADER     := include/fdcast.h
OUT        := target/c

# The system libraries the Rust static library needs, as printed by
# `cargo rustc --release -- --print native-static-libs` (-lc is implied by gcc).
NATIVE_LIBS := -lgcc_s -lutil -lrt -lpthread -lm -ldl

WARN     := -std=c11 -Wall -Wextra -Wpedantic -Werror
CFLAGS   := $(WARN) -O1 -g -Iinclude -pthread
SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer
SHARED_LINK := -L$(LIBDIR) -lfdcast -Wl,-rpath,$(abspath $(LIBDIR))

VALGRIND_FLAGS := --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --quiet
export ASAN_OPTIONS  := detect_leaks=1
export UBSAN_OPTIONS := halt_on_error=1:print_stacktrace=1

C_TESTS   := $(patsubst tests/c/%.c,%,$(wildcard tests/c/*.c))
EXAMPLES  := $(patsubst c-examples/%.c,%,$(wildcard c-examples/*.c))
DEMO_PORT ?= 8080

# Libraries an example needs besides fdcast: EXAMPLE_LIBS_<name>.
EXAMPLE_LIBS_uv_embed = $(shell pkg-config --cflags --libs libuv 2>/dev/null)
# uv_embed needs libuv: without it `make examples` skips it, saying so, and builds the rest.
HAVE_LIBUV := $(shell pkg-config --exists libuv 2>/dev/null && echo yes)
BUILDABLE_EXAMPLES := $(if $(HAVE_LIBUV),$(EXAMPLES),$(filter-out uv_embed,$(EXAMPLES)))

# $(call build_example,NAME,OUTPUT,EXTRA_CFLAGS): c-examples/NAME.c, statically linked.
build_example = $(CC) $(CFLAGS) $(3) -o $(2) c-examples/$(1).c $(STATIC_LIB) $(NATIVE_LIBS) \
  $(EXAMPLE_LIBS_$(1))
define newline


endef

# make install: GNU-style directories; DESTDIR stages the files under another root.
PREFIX       ?= /usr/local
DESTDIR      ?=
libdir       ?= $(PREFIX)/lib
includedir   ?= $(PREFIX)/include
pkgconfigdir ?= $(libdir)/pkgconfig
# Keep them out of cargo's environment (`make install` builds first): the vendored OpenSSL's
# own `make install` would honour a DESTDIR and miss its files. MAKEOVERRIDES: the same for
# the command-line copies that MAKEFLAGS would carry.
unexport DESTDIR PREFIX
MAKEOVERRIDES :=
VERSION  := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
SONAME   := libfdcast.so.$(firstword $(subst ., ,$(VERSION)))
REALNAME := libfdcast.so.$(VERSION)

.PHONY: c-test-threads deadlock-test soak fuzz-build fuzz-smoke
.PHONY: deps all lib examples demo c-test c-test-static c-test-shared header-test \
        example-test ws-chat-test log-fanout-test uv-embed-test ctypes-test \
        install uninstall install-test rust-test test clean

all: lib examples

# Programs linked with -L$(LIBDIR) -lfdcast record the soname (libfdcast.so.0):
# the link lets them find the library in place.
lib:
	$(CARGO) build --release
	test -f $(STATIC_LIB) && test -f $(LIBDIR)/libfdcast.so && test -f $(HEADER)
	ln -sf libfdcast.so $(LIBDIR)/$(SONAME)

examples: lib
	mkdir -p $(OUT)
	$(if $(HAVE_LIBUV),,@echo "examples: skipping uv_embed: pkg-config finds no libuv (apt-get install libuv1-dev)")
	$(foreach ex,$(BUILDABLE_EXAMPLES),$(call build_example,$(ex),$(OUT)/$(ex),-O2)$(newline))

# The demo builds what it runs, and nothing that needs an optional library.
demo: lib
	mkdir -p $(OUT)
	$(call build_example,sse_fanout,$(OUT)/sse_fanout,-O2)
	$(OUT)/sse_fanout $(DEMO_PORT)

# `make demo` and `make examples` as a new user on a machine without libuv (pkg-config's
# search path pointed at nothing): the demo serves, the examples build but uv_embed.
demo-test: lib
	tests/demo_test.sh

# --- C tests -----------------------------------------------------------------

c-test: header-test c-test-static c-test-shared

# Static library, AddressSanitizer + UBSan (LeakSanitizer is part of ASan).
c-test-static: lib
	mkdir -p $(OUT)/static
	for t in $(C_TESTS); do \
	  $(CC) $(CFLAGS) $(SANITIZE) -o $(OUT)/static/$$t tests/c/$$t.c \
	    $(STATIC_LIB) $(NATIVE_LIBS) || exit 1; \
	done
	for t in $(C_TESTS); do \
	  echo "== $$t (static, ASan+UBSan)"; $(OUT)/static/$$t || exit 1; \
	done

# Shared library, valgrind memcheck.
c-test-shared: lib
	mkdir -p $(OUT)/shared
	for t in $(C_TESTS); do \
	  $(CC) $(CFLAGS) -o $(OUT)/shared/$$t tests/c/$$t.c $(SHARED_LINK) || exit 1; \
	done
	for t in $(C_TESTS); do \
	  echo "== $$t (shared, valgrind)"; \
	  $(VALGRIND) $(VALGRIND_FLAGS) $(OUT)/shared/$$t || exit 1; \
	done

# The header alone must compile as strict C11 and as C++11.
header-test: lib
	mkdir -p $(OUT)
	$(CC) $(WARN) -Iinclude -c -o $(OUT)/header_only_c.o tests/c/header/header_only.c
	$(CXX) -x c++ -std=c++11 -Wall -Wextra -Wpedantic -Werror -Iinclude \
	  -c -o $(OUT)/header_only_cxx.o tests/c/header/header_only.c
	@echo "header-test: $(HEADER) compiles as C11 and C++11"

# --- example / rust tests ----------------------------------------------------

# The example test runs an ASan+UBSan build of the server, so leaks and memory
# errors in the example (or the library under it) fail the test at exit.
example-test: lib
	mkdir -p $(OUT)/static
	$(CC) $(CFLAGS) $(SANITIZE) -o $(OUT)/static/sse_fanout c-examples/sse_fanout.c \
	  $(STATIC_LIB) $(NATIVE_LIBS)
	$(PYTHON) tests/sse_fanout_test.py $(OUT)/static/sse_fanout

# ws_chat (ASan+UBSan build) against real clients: Python `websockets` and raw
# sockets, then headless Chromium (Debian's /usr/bin/chromium) driven by
# playwright-core: the chat, and pages that resume by id after the server drops
# them (resume.test.mjs). .ci/run installs all three; `npm ci` runs here if needed.
ws-chat-test: lib
	mkdir -p $(OUT)/static
	$(CC) $(CFLAGS) $(SANITIZE) -o $(OUT)/static/ws_chat c-examples/ws_chat.c \
	  $(STATIC_LIB) $(NATIVE_LIBS)
	$(PYTHON) tests/ws_chat_test.py $(OUT)/static/ws_chat
	test -d tests/browser/node_modules/playwright-core || \
	  (cd tests/browser && npm ci --no-audit --no-fund)
	cd tests/browser && WS_CHAT_BIN=$(abspath $(OUT)/static/ws_chat) node --test ws_chat.test.mjs resume.test.mjs

# log_fanout (ASan+UBSan build) with 100 nc, socat and Python clients.
log-fanout-test: lib
	mkdir -p $(OUT)/static
	$(call build_example,log_fanout,$(OUT)/static/log_fanout,$(SANITIZE))
	$(PYTHON) tests/log_fanout_test.py $(OUT)/static/log_fanout

# uv_embed serves the same HTTP as sse_fanout, so the same test drives it.
uv-embed-test: lib
	mkdir -p $(OUT)/static
	$(call build_example,uv_embed,$(OUT)/static/uv_embed,$(SANITIZE))
	$(PYTHON) tests/sse_fanout_test.py $(OUT)/static/uv_embed

ctypes-test: lib
	$(PYTHON) tests/ctypes_test.py $(LIBDIR)/libfdcast.so

# --- install -----------------------------------------------------------------

install: lib
	install -d $(DESTDIR)$(includedir) $(DESTDIR)$(libdir) $(DESTDIR)$(pkgconfigdir)
	install -m 644 $(HEADER) $(DESTDIR)$(includedir)/fdcast.h
	install -m 644 $(STATIC_LIB) $(DESTDIR)$(libdir)/libfdcast.a
	install -m 755 $(LIBDIR)/libfdcast.so $(DESTDIR)$(libdir)/$(REALNAME)
	ln -sf $(REALNAME) $(DESTDIR)$(libdir)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(libdir)/libfdcast.so
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(libdir)|' \
	  -e 's|@INCLUDEDIR@|$(includedir)|' -e 's|@VERSION@|$(VERSION)|' \
	  -e 's|@NATIVE_LIBS@|$(NATIVE_LIBS)|' fdcast.pc.in > $(DESTDIR)$(pkgconfigdir)/fdcast.pc

uninstall:
	rm -f $(DESTDIR)$(includedir)/fdcast.h $(DESTDIR)$(libdir)/libfdcast.a \
	  $(DESTDIR)$(libdir)/$(REALNAME) $(DESTDIR)$(libdir)/$(SONAME) \
	  $(DESTDIR)$(libdir)/libfdcast.so $(DESTDIR)$(pkgconfigdir)/fdcast.pc

install-test: lib
	MAKE='$(MAKE)' TEST_CC='$(CC)' sh tests/install_test.sh

# --- benchmarks --------------------------------------------------------------
# bench-build: the C bench programs (target/bench/), the registry and broker bench examples.
# bench: bench/run.sh (BENCH_ARGS=--quick for the one-minute smoke run).
BENCH_C := fanout pubsub fdcast_server slow replay lagging
.PHONY: bench bench-build
bench-build: lib
	mkdir -p target/bench
	for b in $(BENCH_C); do \
	  $(CC) $(WARN) -O2 -g -Iinclude -pthread -o target/bench/$$b bench/$$b.c bench/common.c \
	    $(STATIC_LIB) $(NATIVE_LIBS) || exit 1; \
	done
	$(CARGO) build --release --example registry_bench --example broker_bench

bench:
	bench/run.sh $(BENCH_ARGS)

rust-test:
	$(CARGO) test --release --all-targets

# --- reliability (README: Reliability) -----------------------------------------

# helgrind on the threaded C test. tests/c/helgrind.supp hides what helgrind cannot judge
# (races inside libfdcast, ordered by parking_lot futexes and Rust atomics it cannot see);
# races in the host program still fail the run.
c-test-threads: lib
	mkdir -p $(OUT)/shared
	$(CC) $(CFLAGS) -o $(OUT)/shared/test_threads tests/c/test_threads.c $(SHARED_LINK)
	$(VALGRIND) --tool=helgrind --error-exitcode=1 --suppressions=tests/c/helgrind.supp \
	  $(OUT)/shared/test_threads

deadlock-test:
	$(CARGO) test --release --features deadlock-detection --test deadlock

SOAK_SECS ?= 60
soak:
	FDCAST_SOAK_SECS=$(SOAK_SECS) $(CARGO) test --release --test soak

FUZZ_SECS ?= 20
fuzz-build:
	sh fuzz/smoke.sh build

fuzz-smoke:
	FUZZ_SECS=$(FUZZ_SECS) sh fuzz/smoke.sh run

# Installs (when missing) and starts what the suites need: tools, Chromium, PostgreSQL.
deps:
	bash scripts/test-deps.sh

test: deps rust-test c-test example-test demo-test ws-chat-test log-fanout-test uv-embed-test ctypes-test \
      install-test c-test-threads deadlock-test

clean:
	$(CARGO) clean
	rm -rf $(OUT)
