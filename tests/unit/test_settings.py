"""The settings object (fan_driver/settings.py) against its other homes: the
managed plugin's plugin/config.json and plugin/entrypoint.sh."""
import json
import re
from pathlib import Path

from fan_driver.settings import Settings, option, options

PLUGIN = Path(__file__).resolve().parents[2] / "plugin"
# The settings the managed plugin offers (`docker plugin set`); the others are its own.
MANAGED = [option(name) for name in ("underlay", "encap", "log_level", "iptables")]


def settable_env() -> dict:
    config = json.loads((PLUGIN / "config.json").read_text())
    return {e["name"]: e for e in config["env"] if "value" in e.get("settable", ())}


def test_config_json_offers_exactly_the_managed_settings_with_their_defaults():
    env = settable_env()
    managed = {o.env: o.default for o in MANAGED}
    assert {name: e["value"] for name, e in env.items()} == managed


def test_config_json_describes_every_choice_of_a_setting():
    env = settable_env()
    for opt in MANAGED:
        if opt.choices:
            missing = [c for c in opt.choices if c not in env[opt.env]["description"]]
            assert not missing, f"{opt.env}'s description lacks {missing}"


def test_config_json_mounts_the_state_directory_where_serve_keeps_it():
    config = json.loads((PLUGIN / "config.json").read_text())
    assert Settings().state_dir in [m["destination"] for m in config["mounts"]]
    assert Path(Settings().socket).name == config["interface"]["socket"]


def test_the_entry_point_restates_no_setting():
    script = (PLUGIN / "entrypoint.sh").read_text()
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "FAN_" in line or "iptables" in line]


def test_a_flag_wins_over_the_environment_which_wins_over_the_default():
    env = {"FAN_ENCAP": "ipip", "FAN_UNDERLAY": "eth1/24"}
    settings = Settings.from_environment(env, {"encap": "vxlan", "underlay": None})
    assert (settings.encap, settings.underlay, settings.log_level) == ("vxlan", "eth1/24",
                                                                        "info")
    assert Settings.from_environment({}) == Settings()


def test_every_setting_has_its_own_flag_and_variable():
    assert len({o.flag for o in options()}) == len({o.env for o in options()}) == len(options())
    assert all(o.env.startswith("FAN_") and o.flag.startswith("--") for o in options())
    assert option("iptables").unmanaged is False


def test_the_readme_lists_the_managed_settings_with_their_defaults():
    readme = (PLUGIN.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(FAN_[A-Z_]+)` \| `([^`]*)` \|", readme, re.M))
    assert rows == {o.env: o.default for o in MANAGED}
