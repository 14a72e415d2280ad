#!/bin/sh
# Builds fan.bpf.o and fan_conntrack.bpf.o (the same programs, fan_decap checking
# conntrack) from fan.bpf.c and fan.h into DIR (default: this directory; Debian:
# clang llvm libbpf-dev).
# Each object carries the SHA-256 of its source in section .fan.source, which
# the tests compare with the committed source: a clang-independent proof that
# the committed objects were built from it.
set -eu
dir=$(cd "${1:-$(dirname "$0")}" && pwd)
cd "$(dirname "$0")"
digest=$(cat fan.bpf.c fan.h | sha256sum | cut -d' ' -f1)
printf '%s' "$digest" > "$dir/source.sha256"
build() {   # OBJECT [CLANG FLAGS]
    out=$dir/$1
    shift
    clang -O2 -g -target bpf -Wall -Werror -I"/usr/include/$(uname -m)-linux-gnu" "$@" \
        -c fan.bpf.c -o "$out.tmp"
    llvm-objcopy --add-section .fan.source="$dir/source.sha256" \
        --set-section-flags .fan.source=noload,readonly "$out.tmp" "$out"
    rm -f "$out.tmp"
}
build fan.bpf.o
build fan_conntrack.bpf.o -DFAN_CONNTRACK
rm -f "$dir/source.sha256"
