# l4lb: `make` builds the standalone BPF object (for iproute2) and the release binary.
# build.rs builds the skeleton's object through this same rule, so the clang
# flags live here only.

BPF_NAME  ?= l4lb_xdp
BPF_SRC   := src/bpf/$(BPF_NAME).bpf.c
BPF_DEPS  := $(wildcard src/bpf/*.h) $(wildcard include/*.h)
BPF_OBJ   ?= $(BPF_NAME).o
CLANG     ?= clang
BPF_EXTRA_CFLAGS ?=
BPF_CFLAGS := -g -O2 -target bpf -Wall -Wextra -Werror \
	-Iinclude -I/usr/include/$(shell uname -m)-linux-gnu $(BPF_EXTRA_CFLAGS)

CARGO     ?= cargo

.PHONY: all build deps test demo bench clean
all: $(BPF_OBJ) build

$(BPF_OBJ): $(BPF_SRC) $(BPF_DEPS)
	$(CLANG) $(BPF_CFLAGS) -c $(BPF_SRC) -o $@

build:
	$(CARGO) build --release

deps:
	scripts/install-deps.sh

test: deps
	scripts/test.sh

demo: deps
	scripts/demo.sh

# Throughput benchmark (root, about 4 minutes): l4lb against two floors measured in
# the same run. Tables in bench-results/results.txt, chart in
# bench-results/ratios.svg. More: make bench BENCH_ARGS="--rounds 8 --variants"
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release
	mkdir -p bench-results
	target/release/l4lb bench --chart bench-results/ratios.svg $(BENCH_ARGS) > bench-results/results.txt
	cat bench-results/results.txt

clean:
	rm -f l4lb_xdp.o
	rm -rf bench-results
	$(CARGO) clean
