"""The one benchmark command: data path, control plane and scale of the fan,
each figure a ratio against a baseline measured in the same run.

    python3 -m bench.run [--short] [--json FILE] [--markdown FILE] [--plot FILE]

Needs root, like the e2e tests (it builds its own network namespaces, prefix
`fanlab-bench-`, and runs a dockerd and a plugin in each), plus iperf3 and, for
the plot, matplotlib (bench/requirements.txt). The full run takes 13-16 minutes
on 2 CPUs (the /16 underlay with per-peer routes is most of it) and writes the
plot to docs/benchmarks.png; --short takes about a minute, measures the /24
underlay only, and is what CI runs (tests/e2e/test_bench_short.py) so that this
command cannot rot. Progress goes to stderr, the table to stdout. The exit
status is 0 when everything was measured (targets met or not: benchmarks are
not tests), 2 when something could not be measured, 3 when this machine lacks
what the benchmark needs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import control, datapath, scale
from bench.lab import REPO, BenchLab, requirements_missing
from bench.plot import have_matplotlib, scale_plot
from bench.results import Report, error_row, load_average, markdown_table, text_table

SECTIONS = ("datapath", "control", "api", "scale")
DEFAULT_PLOT = REPO / "docs" / "benchmarks.png"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--short", action="store_true",
                   help="one short round of everything, /24 underlay only (CI)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections (default: all of {','.join(SECTIONS)})")
    p.add_argument("--json", type=Path, help="write every figure and sample here")
    p.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    p.add_argument("--plot", type=Path,
                   help=f"scale plot (PNG); default {DEFAULT_PLOT.relative_to(REPO)} "
                        "for a full run, a temporary file for --short")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def section(report: Report, name: str, fn, *args) -> None:
    """Run one section; a failure becomes a NOT MEASURED row, and the rest goes on."""
    report.load[name] = load_average()
    log(f"--- {name} (load average {report.load[name]})")
    started = time.monotonic()
    try:
        fn(*args)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        report.add(error_row(name, f"{name}: the section failed", f"{type(exc).__name__}: {exc}"))
    report.timings[name] = time.monotonic() - started
    log(f"{name}: {report.timings[name]:.1f} s")


def ensure_fan_network(bl: BenchLab) -> str:
    """The network the docker run benchmark uses: the data path's, or a new one."""
    h = bl.hosts["h28"]
    net, args = datapath.fan_network("vxlan", "ebpf")
    if net not in h.cli("network", "ls", "--format", "{{.Name}}").stdout.split():
        h.cli(*args, net)
    return net


def clean_hosts(bl: BenchLab) -> None:
    """Nothing of the earlier sections left to disturb the scale counts (the
    swarm is gone already: run_sections leaves it after the data path)."""
    for h in bl.hosts.values():
        h.dockerd.reset()
        h.containers.clear()


def run_all(args, report: Report) -> None:
    try:
        run_sections(args, report)
    except Exception as exc:   # the lab itself: nothing measured, but say why
        traceback.print_exc(file=sys.stderr)
        report.add(error_row("lab", "lab: setup or teardown failed",
                             f"{type(exc).__name__}: {exc}"))


def run_sections(args, report: Report) -> None:
    short = args.short
    with BenchLab(log=log) as bl:
        report.timings["setup"] = sum(bl.setup_seconds.values())
        log("lab up: " + ", ".join(f"{k} {v:.1f} s" for k, v in bl.setup_seconds.items()))
        if "datapath" in args.only:
            section(report, datapath.SECTION, datapath.run, bl, report, short, log)
            datapath.leave_swarm(bl)   # swarm's gossip is load the later sections should not see
        if "control" in args.only:
            section(report, control.SECTION_RUN,
                    lambda: control.run(bl, report, short, ensure_fan_network(bl), log))
        if "api" in args.only:
            section(report, control.SECTION_API, control.run_api, bl, report, short, log)
        if "scale" in args.only:
            clean_hosts(bl)
            section(report, scale.SECTION, scale.run, bl, report, short, log)
        started = time.monotonic()
    report.timings["teardown"] = time.monotonic() - started


def header(report: Report) -> str:
    m = report.machine
    return (f"fan-driver benchmarks ({report.mode} run)\n"
            f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['memory']}, kernel {m['kernel']}, "
            f"Python {m['python']}\n"
            "load average (1/5/15 min): " +
            ", ".join(f"{when} {load}" for when, load in report.load.items()))


def write_plot(args, report: Report) -> None:
    if "scale" not in report.raw or not report.raw["scale"].get("fan"):
        return
    if not have_matplotlib():
        log("matplotlib is not installed: no plot (pip install -r bench/requirements.txt)")
        return
    # A short run draws the plot too, so that its code cannot rot, then drops it.
    scratch = None
    dest = args.plot
    if dest is None and args.short:
        scratch = Path(tempfile.mkdtemp(prefix="fanlab-bench-plot-"))
        dest = scratch / "benchmarks.png"
    dest = dest or DEFAULT_PLOT
    m = report.machine
    try:
        scale_plot(report.raw["scale"], dest,
                   title=f"fan-driver scale, {report.mode} run: {m['nproc']} CPUs {m['cpu']}, "
                         f"kernel {m['kernel']}")
        log(f"plot: {dest} ({dest.stat().st_size} bytes)")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = requirements_missing()
    if missing:
        print("bench: cannot run here; missing: " + "; ".join(missing), file=sys.stderr)
        return 3
    if not args.short and "scale" in args.only and not have_matplotlib():
        print("bench: a full run draws the scale plot: pip install -r bench/requirements.txt",
              file=sys.stderr)
        return 3
    report = Report(mode="short" if args.short else "full")
    report.load["start"] = load_average()
    started = time.monotonic()
    run_all(args, report)
    report.load["end"] = load_average()
    report.timings["total"] = time.monotonic() - started
    write_plot(args, report)
    print(header(report))
    print(text_table(report.rows))
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items()))
    if args.json:
        args.json.write_text(report.to_json())
    if args.markdown:
        args.markdown.write_text(header(report).replace("\n", "  \n") + "\n\n" +
                                 markdown_table(report.rows) + "\n")
    if report.errors:
        print(f"NOT MEASURED: {len(report.errors)} figure(s); see the rows marked above",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
