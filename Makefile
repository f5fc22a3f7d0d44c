# l4lb: `make` builds the standalone BPF object (for iproute2) and the release binary.
# build.rs builds the skeleton's object through this same rule, so the clang
# flags live here only.

BPF_NAME  ?= l4lb_xdp
BPF_SRC   := src/bpf/$(BPF_NAME).bpf.c
BPF_DEPS  := $(wildcard src/bpf/*.h) $(wildcard include/*.h)
BPF_OBJ   ?= $(BPF_NAME).o
CLANG     ?= clang
BPF_EXTRA_CFLAGS ?=
# -mcpu=v3: 32-bit ALU and JMP32 instructions, so 32-bit arithmetic (the
# hash, ports, lengths) needs no zero-extension pairs (clang 14's default
# is v1).
BPF_CFLAGS := -g -O2 -target bpf -mcpu=v3 -Wall -Wextra -Werror \
	-Iinclude -I/usr/include/$(shell uname -m)-linux-gnu $(BPF_EXTRA_CFLAGS)

CARGO     ?= cargo
L4LB_BIN  ?= target/release/l4lb

# make install [PREFIX=/usr/local] [DESTDIR=]: the binary, the standalone object
# (for iproute2), manual pages and shell completions generated from the
# command line's definition, the agent's systemd unit (l4lb@DEV.service) and
# the documentation.
PREFIX    ?= /usr/local
DESTDIR   ?=
BINDIR    := $(DESTDIR)$(PREFIX)/bin
OBJDIR    := $(DESTDIR)$(PREFIX)/lib/l4lb
MANDIR    := $(DESTDIR)$(PREFIX)/share/man/man1
DOCDIR    := $(DESTDIR)$(PREFIX)/share/doc/l4lb
BASHDIR   := $(DESTDIR)$(PREFIX)/share/bash-completion/completions
ZSHDIR    := $(DESTDIR)$(PREFIX)/share/zsh/site-functions
FISHDIR   := $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
UNITDIR   := $(DESTDIR)$(PREFIX)/lib/systemd/system

.PHONY: all build deps test demo demo-scale bench clean install uninstall
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

demo-scale: deps
	scripts/demo-scale.sh

# Throughput benchmark (root, about 4 minutes): l4lb against two floors measured in
# the same run, then the path length of each row (scripts/path-length). Tables in
# bench-results/results.txt and path-length.txt, chart in
# bench-results/ratios.svg. More: make bench BENCH_ARGS="--rounds 8 --variants"
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release
	mkdir -p bench-results
	target/release/l4lb bench --chart bench-results/ratios.svg $(BENCH_ARGS) > bench-results/results.txt
	scripts/path-length > bench-results/path-length.txt
	cat bench-results/results.txt bench-results/path-length.txt

install: all
	install -d $(BINDIR) $(OBJDIR) $(MANDIR) $(DOCDIR) $(BASHDIR) $(ZSHDIR) $(FISHDIR) $(UNITDIR)
	install -m 0755 $(L4LB_BIN) $(BINDIR)/l4lb
	install -m 0644 $(BPF_OBJ) $(OBJDIR)/l4lb_xdp.o
	$(L4LB_BIN) man --out $(MANDIR)
	chmod 0644 $(MANDIR)/l4lb*.1
	$(L4LB_BIN) completions bash > $(BASHDIR)/l4lb
	$(L4LB_BIN) completions zsh > $(ZSHDIR)/_l4lb
	$(L4LB_BIN) completions fish > $(FISHDIR)/l4lb.fish
	sed 's#@BINDIR@#$(PREFIX)/bin#' systemd/l4lb@.service > $(UNITDIR)/l4lb@.service
	chmod 0644 $(UNITDIR)/l4lb@.service
	install -m 0644 README.md $(DOCDIR)/README.md
	install -d $(DOCDIR)/docs
	install -m 0644 docs/*.md docs/*.svg $(DOCDIR)/docs/

uninstall:
	rm -f $(BINDIR)/l4lb $(OBJDIR)/l4lb_xdp.o $(MANDIR)/l4lb.1 $(MANDIR)/l4lb-*.1
	rm -f $(BASHDIR)/l4lb $(ZSHDIR)/_l4lb $(FISHDIR)/l4lb.fish
	rm -f $(UNITDIR)/l4lb@.service
	rm -rf $(DOCDIR)
	-rmdir $(OBJDIR)

clean:
	rm -f l4lb_xdp.o
	rm -rf bench-results
	$(CARGO) clean
