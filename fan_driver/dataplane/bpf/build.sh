#!/bin/sh
# Builds fan.bpf.o from fan.bpf.c and fan.h (Debian: clang llvm libbpf-dev).
# The object carries the SHA-256 of its source in section .fan.source, which
# the tests compare with the committed source: a clang-independent proof that
# the committed object was built from it.
set -eu
cd "$(dirname "$0")"
out=${1:-fan.bpf.o}
digest=$(cat fan.bpf.c fan.h | sha256sum | cut -d' ' -f1)
clang -O2 -g -target bpf -Wall -Werror -I"/usr/include/$(uname -m)-linux-gnu" \
    -c fan.bpf.c -o "$out.tmp"
printf '%s' "$digest" > "$out.sha256"
llvm-objcopy --add-section .fan.source="$out.sha256" \
    --set-section-flags .fan.source=noload,readonly "$out.tmp" "$out"
rm -f "$out.tmp" "$out.sha256"
