#!/bin/sh
# Entry point of the fan-driver managed plugin (config.json "entrypoint").
#
# 1. iptables: the plugin must write its rules with the same backend as the
#    host's Docker (legacy x_tables or nf_tables), or its ACCEPT rules never
#    meet Docker's DROP policy. Like Kubernetes' iptables-wrapper, pick the
#    backend that already holds rules; FAN_IPTABLES=legacy|nft forces one.
# 2. Settings: `fan-driver check --settings --serve-refusal` returns at once
#    when FAN_UNDERLAY, FAN_ENCAP, FAN_LOG_LEVEL and FAN_IPTABLES are valid. When one is not,
#    it keeps the plugin socket up and answers every Docker request with the
#    problem and its fix: a plugin process that exits is only reported by
#    `docker plugin enable` as a socket timeout, and never explained.
# 3. exec `fan-driver serve` (socket /run/docker/plugins/fan.sock, state in
#    /var/lib/fan-driver: the host directory of the "state" mount).
set -eu

BACKENDS=/usr/local/lib/fan-driver

rules() {   # how many rules a backend holds (0 when it cannot be read)
    { "iptables-$1-save" 2>/dev/null || true; } | grep -c '^-A' || true
}

backend="${FAN_IPTABLES:-auto}"
if [ "$backend" = auto ]; then
    legacy=$(rules legacy)
    nft=$(rules nft)
    if [ "$legacy" -gt "$nft" ]; then backend=legacy; else backend=nft; fi
    echo "fan-driver plugin: iptables backend $backend (host rules: legacy $legacy, nf_tables $nft)" >&2
fi
case "$backend" in     # anything else is refused with the other settings below
    legacy|nft) PATH="$BACKENDS/iptables-$backend:$PATH"; export PATH ;;
esac

fan-driver check --settings --serve-refusal
exec fan-driver serve
