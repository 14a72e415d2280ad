"""The scale plot: kernel objects per host and time until usable, against the
number of peers the underlay holds. Needs matplotlib (bench/requirements.txt)."""
from __future__ import annotations

from pathlib import Path


def have_matplotlib() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def scale_plot(raw: dict, dest: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fan, bridge = raw["fan"], raw["bridge"]
    mappings = sorted({key.split()[0] for key in fan})
    fig, (ax_obj, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks = {}
    for mapping in mappings:
        points = sorted((v["peers"], k, v) for k, v in fan.items() if k.split()[0] == mapping)
        xs = [p for p, _, _ in points]
        ticks.update({p: f"{k.split()[1]}\n{p:,} peers" for p, k, _ in points})
        label = f"fan mapping={mapping}"
        for ax, key, fmt in ((ax_obj, "total", "{:,.0f}"), (ax_time, "ready_s", "{:.3g} s")):
            ys = [v[key] for _, _, v in points]
            ax.plot(xs, ys, "o-", label=label)
            for x, y in zip(xs, ys):
                ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(4, 6),
                            fontsize=8)
    for ax, value in ((ax_obj, bridge["total"]), (ax_time, bridge["ready_s"])):
        ax.axhline(value, color="grey", linestyle="--", label="docker bridge network")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlim(min(ticks) / 2, max(ticks) * 3)
        ax.set_xlabel("underlay size")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 3)   # room for the labels
    ax_obj.set_ylabel("kernel objects added per host")
    ax_obj.set_title("kernel state per host")
    ax_time.set_ylabel("seconds until every peer is reachable")
    ax_time.set_title("network creation until usable")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest
