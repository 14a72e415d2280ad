"""Errors the plugin reports back to Docker as {"Err": message}."""


class FanError(Exception):
    """A request that cannot be served; the message names the problem and the fix."""


class NotFound(FanError):
    """A request names a network, endpoint, pool or address this plugin does not hold."""
