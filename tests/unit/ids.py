"""Hypothesis strategies for the IDs Docker names networks and endpoints by,
and for their near misses.

A network's ID is libnetwork's (64 lower-case hexadecimal digits) or, for a
swarm-scoped network, swarmkit's (25 lower-case base-36 digits); an endpoint's
is always libnetwork's.
"""
from hypothesis import strategies as st

HEX = "0123456789abcdef"
BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def swarmkit_id(entropy: bytes) -> str:
    """swarmkit's identity.NewID from its 17 random bytes: the top bit set (so
    the number always has 27 digits), written in base 36, the first digit dropped."""
    number = int.from_bytes(entropy, "big") | 1 << 135
    digits = ""
    while number:
        number, digit = divmod(number, 36)
        digits = BASE36[digit] + digits
    return digits[1:26]


def _text(alphabet: str, size: int):
    return st.text(alphabet, min_size=size, max_size=size)


docker_ids = _text(HEX, 64)
swarm_ids = st.one_of(_text(BASE36, 25), st.binary(min_size=17, max_size=17).map(swarmkit_id))
network_ids = st.one_of(docker_ids, swarm_ids)
endpoint_ids = docker_ids


def _one_changed(ids, chars):
    return st.builds(lambda i, at, c: i[:at % len(i)] + c + i[at % len(i) + 1:],
                     ids, st.integers(0, 63), chars)


def near_misses(ids):
    """Strings one step from an ID of `ids`: a digit short or over, upper case,
    one character outside [0-9a-z] (upper-case letters, punctuation, white
    space, other scripts' digits), a newline after it."""
    return st.one_of(
        _text(HEX, 63), _text(HEX, 65), _text(BASE36, 24), _text(BASE36, 26),
        ids.filter(lambda i: i != i.upper()).map(str.upper),
        _one_changed(ids, st.characters(exclude_characters=BASE36)),
        ids.map(lambda i: i + "\n"), ids.map(lambda i: " " + i))


# Base-36 text the length of a Docker ID: no ID at all, but near either.
not_hex_64 = _text(BASE36, 64).filter(lambda i: not set(i) <= set(HEX))
bad_network_ids = st.one_of(near_misses(docker_ids), near_misses(swarm_ids), not_hex_64)
bad_endpoint_ids = st.one_of(near_misses(docker_ids), not_hex_64, swarm_ids)
