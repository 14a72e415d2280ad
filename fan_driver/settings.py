"""The plugin's settings, read in one place: each from its flag when given, else
its environment variable, else its default (`Settings.from_environment`).

Each setting is one field below, its flag and variable beside its default, so
`serve`, `check`, `show`, the managed plugin's entry point and the settable
`env` of plugin/config.json (tests/unit/test_settings.py compares them) cannot
disagree. Pure: the environment is passed in.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Mapping, Optional, Sequence, Tuple

from .config import DEFAULT_UNDERLAY, ENCAPS, LOG_LEVELS, UnderlaySpec
from .errors import FanError

IPTABLES_SETTINGS = ("auto", "nft", "legacy")
PLUGIN_SET = ("docker plugin disable -f fan:latest && docker plugin set fan:latest {setting} && "
              "docker plugin enable fan:latest")


@dataclass(frozen=True)
class Option:
    """How one setting is given: flag, environment variable, default."""
    name: str                       # the Settings field
    flag: str
    env: str
    default: str
    help: str
    choices: Tuple[str, ...] = ()
    unmanaged: bool = True          # means something outside the managed plugin


def _option(flag: str, env: str, help: str, **more) -> dict:
    return {"option": dict(flag=flag, env=env, help=help, **more)}


@dataclass(frozen=True)
class Settings:
    socket: str = field(default="/run/docker/plugins/fan.sock", metadata=_option(
        "--socket", "FAN_SOCKET", "the plugin's unix socket"))
    state_dir: str = field(default="/var/lib/fan-driver", metadata=_option(
        "--state-dir", "FAN_STATE_DIR", "directory of the state file"))
    underlay: str = field(default=DEFAULT_UNDERLAY, metadata=_option(
        "--default-underlay", "FAN_UNDERLAY", "underlay for networks created without one"))
    encap: str = field(default="auto", metadata=_option(
        "--default-encap", "FAN_ENCAP", "encapsulation for networks created without one",
        choices=ENCAPS))
    log_level: str = field(default="info", metadata=_option(
        "--log-level", "FAN_LOG_LEVEL", "how much the plugin logs", choices=LOG_LEVELS))
    iptables: str = field(default="auto", metadata=_option(
        "--iptables", "FAN_IPTABLES", "the managed plugin's iptables backend: auto (the one "
        "holding the host's rules), nft or legacy", choices=IPTABLES_SETTINGS, unmanaged=False))

    @classmethod
    def from_environment(cls, env: Mapping[str, str],
                         flags: Optional[Mapping[str, Optional[str]]] = None) -> "Settings":
        """Each setting from `flags` (by field name; None: not given), else its
        variable in `env`, else its default."""
        flags = flags or {}
        values = {}
        for option in options():
            given = flags.get(option.name)
            values[option.name] = given if given is not None else env.get(option.env,
                                                                          option.default)
        return cls(**values)

    def problems(self) -> List[str]:
        """Each invalid setting, with what is wrong and how to fix it."""
        problems = []
        try:
            UnderlaySpec.parse(self.underlay)
        except FanError as exc:
            problems.append(_problem(option("underlay"), self.underlay, str(exc)))
        for name in ("encap", "log_level", "iptables"):
            opt, value = option(name), getattr(self, name)
            if (value.lower() if name == "log_level" else value) not in opt.choices:
                problems.append(_problem(opt, value, f"must be one of {', '.join(opt.choices)}"))
        return problems

    def describe(self) -> str:
        return (f"underlay {self.underlay}, encap {self.encap}, log level "
                f"{self.log_level.lower()}, iptables {self.iptables}")


def options() -> Tuple[Option, ...]:
    return tuple(Option(name=f.name, default=f.default, **f.metadata["option"])
                 for f in fields(Settings))


def option(name: str) -> Option:
    return next(o for o in options() if o.name == name)


def add_flags(parser, names: Sequence[str], validate: bool = True) -> None:
    """The flags of the settings `names` on an argparse parser; each defaults to
    None (not given), so that from_environment falls back to the environment.
    With `validate`, argparse refuses a flag outside its choices."""
    for opt in map(option, names):
        parser.add_argument(opt.flag, dest=opt.name, default=None,
                            choices=opt.choices if validate and opt.choices else None,
                            type=str.lower if validate and opt.name == "log_level" else None,
                            help=f"{opt.help} (default: ${opt.env} or {opt.default})")


def _problem(option: Option, value: str, why: str) -> str:
    unmanaged = f"; unmanaged: {option.flag} or {option.env}" if option.unmanaged else ""
    example = f"{option.env}={option.default}"
    return (f"setting {option.env}={value!r} is invalid: {why}. Fix: "
            f"{PLUGIN_SET.format(setting=example)} (with the plugin's name from "
            f"`docker plugin ls`){unmanaged}")
