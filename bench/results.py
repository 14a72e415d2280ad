"""Rows of the benchmark table: a value, the baseline it is compared with (measured
in the same run), their ratio and, where the issue sets one, a target."""
from __future__ import annotations

import json
import operator
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
       "==": lambda a, b: abs(a - b) < 1e-9}


@dataclass
class Row:
    section: str
    name: str                       # "what vs baseline"
    value: Optional[float]
    baseline: Optional[float]
    unit: str = ""
    target: Optional[tuple] = None  # (op, threshold) applied to the ratio
    ratio: Optional[float] = None   # value / baseline unless given
    note: str = ""
    error: Optional[str] = None     # NOT MEASURED: why (a failure of the run)
    unavailable: Optional[str] = None  # cannot exist on this machine (not a failure)

    def __post_init__(self):
        if self.ratio is None and self.value is not None and self.baseline:
            self.ratio = self.value / self.baseline

    @property
    def met(self) -> Optional[bool]:
        if self.target is None or self.ratio is None:
            return None
        op, threshold = self.target
        return OPS[op](round(self.ratio, 6), threshold)

    @property
    def target_text(self) -> str:
        return "" if self.target is None else f"ratio {self.target[0]} {self.target[1]:g}"

    @property
    def verdict(self) -> str:
        if self.error:
            return "NOT MEASURED"
        if self.unavailable:
            return "unavailable"
        return {None: "-", True: "met", False: "NOT MET"}[self.met]


def error_row(section: str, name: str, why: str) -> Row:
    return Row(section, name, None, None, error=why)


def fmt(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000 or value == int(value) and unit in ("", "objects"):
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 0.01 or value == 0:
        text = f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    else:
        text = f"{value:.2e}"
    return f"{text} {unit}".strip()


def fmt_ratio(ratio: Optional[float]) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 1000 else f"{ratio:.3f}" if ratio < 10 else f"{ratio:.1f}x"


COLUMNS = ("name", "value", "baseline", "ratio", "target", "verdict")


def cells(row: Row) -> list[str]:
    if row.unavailable:
        return [row.name, "-", "-", "-", row.target_text or "-", row.verdict]
    if row.error:
        return [row.name, "NOT MEASURED", "-", "-", row.target_text or "-", row.verdict]
    return [row.name, fmt(row.value, row.unit), fmt(row.baseline, row.unit),
            fmt_ratio(row.ratio), row.target_text or "-", row.verdict]


def text_table(rows: list[Row]) -> str:
    """The table printed at the end of a run, grouped by section."""
    body = [cells(r) for r in rows]
    widths = [max(len(c[i]) for c in body + [list(COLUMNS)]) for i in range(len(COLUMNS))]
    line = "  ".join("-" * w for w in widths)
    out, section = [], None

    def render(c):
        return "  ".join(v.ljust(w) if i in (0, 4, 5) else v.rjust(w)
                         for i, (v, w) in enumerate(zip(c, widths)))

    out.append(render(list(COLUMNS)))
    for row, c in zip(rows, body):
        if row.section != section:
            section = row.section
            out.append(line)
            out.append(f"[{section}]")
        out.append(render(c))
        if row.error:
            out.append(f"    !!! {row.error}")
        elif row.unavailable:
            out.append(f"    {row.unavailable}")
        elif row.note:
            out.append(f"    {row.note}")
    out.append(line)
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            out.append(f"| **{section}** |" + " |" * (len(COLUMNS) - 1))
        c = cells(row)
        if c[0].startswith("  "):   # a sub-row of the one above
            c[0] = "↳ " + c[0].strip()
        if row.error:
            c[1] = f"NOT MEASURED: {row.error}"
        elif row.unavailable:
            c[0] = f"{c[0]} <br><sub>{row.unavailable}</sub>"
        elif row.note:
            c[0] = f"{c[0]} <br><sub>{row.note}</sub>"
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in c) + " |")
    return "\n".join(out)


def median(values) -> float:
    return statistics.median(values)


def percentile(values, p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu,
            "memory": mem, "python": platform.python_version()}


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


@dataclass
class Report:
    mode: str
    machine: dict = field(default_factory=machine)
    rows: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)   # section -> seconds
    load: dict = field(default_factory=dict)       # when -> "1m 5m 15m"
    raw: dict = field(default_factory=dict)        # samples, for the plot and the docs

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    @property
    def errors(self) -> list[Row]:
        return [r for r in self.rows if r.error]

    def to_json(self) -> str:
        data = asdict(self)
        data["rows"] = [{**asdict(r), "met": r.met, "verdict": r.verdict} for r in self.rows]
        return json.dumps(data, indent=1, default=str)
