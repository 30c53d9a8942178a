# fdcast: C-side build and test driver.
#
#   make lib           cargo build --release (static + shared library, include/fdcast.h)
#   make examples      c-examples/*.c -> target/c/
#   make demo          run target/c/sse_fanout on 127.0.0.1:8080
#   make c-test        C tests: static lib + ASan/UBSan, shared lib + valgrind, header check
#   make example-test  end-to-end test of the sse_fanout example
#   make rust-test     cargo test --all-targets
#   make test          every test suite (what README and CI run)
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

.PHONY: all lib examples demo c-test c-test-static c-test-shared header-test \
        example-test rust-test test clean

all: lib examples

lib:
	$(CARGO) build --release
	test -f $(STATIC_LIB) && test -f $(LIBDIR)/libfdcast.so && test -f $(HEADER)

examples: lib
	mkdir -p $(OUT)
	for ex in $(EXAMPLES); do \
	  $(CC) $(CFLAGS) -O2 -o $(OUT)/$$ex c-examples/$$ex.c $(STATIC_LIB) $(NATIVE_LIBS) || exit 1; \
	done

demo: examples
	$(OUT)/sse_fanout $(DEMO_PORT)

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

rust-test:
	$(CARGO) test --release --all-targets

test: rust-test c-test example-test

clean:
	$(CARGO) clean
	rm -rf $(OUT)
