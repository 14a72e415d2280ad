#!/bin/sh
# Entry point of the fan-driver managed plugin (config.json "entrypoint").
#
# 1. Settings (fan_driver/settings.py): `fan-driver check --settings --serve-refusal`
#    returns at once when FAN_UNDERLAY, FAN_ENCAP, FAN_LOG_LEVEL and FAN_IPTABLES
#    are valid. When one is not, it keeps the plugin socket up and answers every
#    Docker request with the problem and its fix: a plugin process that exits is
#    only reported by `docker plugin enable` as a socket timeout, and never explained.
# 2. exec `fan-driver serve` (socket /run/docker/plugins/fan.sock, state in
#    /var/lib/fan-driver: the host directory of the "state" mount). It picks the
#    iptables backend itself (fan_driver/iptables.py: the one holding the host's
#    rules, unless FAN_IPTABLES names one).
set -eu

fan-driver check --settings --serve-refusal
exec fan-driver serve
