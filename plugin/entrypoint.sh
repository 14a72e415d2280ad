#!/bin/sh
# Entry point of the fan-driver managed plugin (config.json "entrypoint"):
# `fan-driver serve` (socket /run/docker/plugins/fan.sock, state in
# /var/lib/fan-driver: the host directory of the "state" mount), which picks the
# iptables backend itself (fan_driver/iptables.py: the one holding the host's
# rules, unless FAN_IPTABLES names one).
#
# --refuse-when-invalid: when FAN_UNDERLAY, FAN_ENCAP, FAN_LOG_LEVEL or
# FAN_IPTABLES is invalid, the socket stays up and every Docker request is
# answered with the problem and its fix: a plugin process that exits is only
# reported by `docker plugin enable` as a socket timeout, and never explained.
set -eu

exec fan-driver serve --refuse-when-invalid
