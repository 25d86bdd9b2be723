"""dwsd against cp, rsync, restic and borg on one reproducible data set, in one run.

    .venv/bin/python bench/bench.py [--dir /var/tmp/dwsd-bench] [--small] [--only STEP,...]
                                    [--repeat N] [--rounds N] [--profile] [--list]

The data set (seeded; reused when its marker matches) is about 20,000 files of 1-64 KiB in
nested directories, 200 of 1-8 MiB and four of 256 MiB (`--small`: ten times fewer/smaller).
File content is a blake3 XOF stream keyed by the seed, the path and a *generation*: unique,
incompressible and fast to make. The "1% change" rewrites the same fixed selection of files
(1% of the small ones, 1% but at least 2 of the medium ones) in place, same sizes, with the
content of another generation, so every tool sees exactly the same change:

    GEN_A       0  version A, the data set as generated (every step starts and ends here)
    GEN_B       1  the change before each tool's cold incremental run (rsync, restic, borg,
                   dwsd full walk)
    GEN_C       2  dwsd's cold dirty-path run (new bytes, same files and sizes; B is
                   already in its store, so re-using it would store nothing)
    GEN_B_WARM  3  like B, for the warm runs (new bytes for every tool)
    GEN_C_WARM  4  like C, for dwsd's warm dirty-path run

Every step is a small function registered with `@step` (harness.py), in run order; `--only`
runs some (their prerequisites are added). A step gets the `Bench` (paths, data set, helpers
for the page cache, commands, dwsd) and returns a `Result`. Targets are declared on the
step: a reference step and a ratio limit, or a limit in seconds (`higher=True` when more
is better); growth rows come from a `Result.growth`. The steps live in one module per
issue: steps_snapshot.py (snapshots), steps_restore.py (restore), steps_view.py (the FUSE
view), steps_daemon.py (the running daemon).

Prints one table and writes it (plus every step's details) as JSON to bench/out/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import blake3

from dataset import DEFAULT_SEED, Dataset
from harness import OUT_DIR, STEPS, Bench, Result, Step, mb, wait_quiet
# Importing a steps module registers its steps; this order is the run order.
import steps_snapshot  # noqa: F401  (issue 2)
import steps_restore  # noqa: F401  (issue 3)
import steps_view  # noqa: F401  (issue 4)
import steps_daemon  # noqa: F401  (issue 5)

HERE = Path(__file__).resolve().parent


def code_version() -> dict[str, Any]:
    """Which dwsd was measured: the commit, whether dwsd/ had local changes, and a hash of
    the dwsd/ sources as they were when the run started."""
    repo = HERE.parent

    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True,
                              text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    h = blake3.blake3()
    for path in sorted((repo / "dwsd").rglob("*.py")):
        h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dwsd_modified": bool(git("status", "--porcelain", "--", "dwsd")),
            "dwsd_sources": h.hexdigest()[:16]}



# -- running and reporting ----------------------------------------------------------------

def noisy(r: Result) -> bool:
    """Did other processes use much CPU while this run was timed?"""
    return bool(r.seconds) and r.extra.get("foreign_cpu_s", 0) > 0.25 * (r.seconds or 0) + 0.5


def combine(runs: list[Result]) -> Result:
    """One result from the repetitions of a step: the median time (and value) of the
    quiet runs (of all runs when none was quiet), the rest from the run closest to it;
    every time is kept in `extra["runs_s"]`."""
    if len(runs) == 1 or any(r.error is not None or r.seconds is None for r in runs):
        return runs[-1]
    quiet = [r for r in runs if not noisy(r)]
    pool = quiet or runs
    median = statistics.median(r.seconds or 0.0 for r in pool)
    closest = min(pool, key=lambda r: abs((r.seconds or 0) - median))
    extra = {**closest.extra, "runs_s": [r.seconds for r in runs],
             "foreign_cpu_s": [r.extra.get("foreign_cpu_s") for r in runs],
             "quiet_runs": len(quiet)}
    values = [r.value for r in pool if r.value is not None]
    return Result(median, closest.detail, extra, closest.growth,
                  None if any(r.ok is None for r in runs) else all(r.ok for r in runs),
                  value=statistics.median(values) if values else None)


def plan(only: list[str] | None) -> list[str]:
    if not only:
        return list(STEPS)
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in STEPS:
            raise SystemExit(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
        if name not in wanted:
            wanted.add(name)
            for req in STEPS[name].requires:
                add(req)
            if (ref := STEPS[name].ref) is not None:
                add(ref)  # a ratio needs its reference measured in the same run
    for name in only:
        add(name)
    return [n for n in STEPS if n in wanted]


def rows(results: dict[str, Result]) -> list[dict[str, Any]]:
    out = []
    for name, r in results.items():
        s = STEPS[name]
        detail = r.detail
        if "runs_s" in r.extra:
            runs = r.extra["runs_s"]
            quiet = r.extra.get("quiet_runs", len(runs))
            detail = (f"runs {min(runs):.2f}-{max(runs):.2f}"
                      + (f" ({quiet} of {len(runs)} quiet)" if quiet != len(runs) else "")
                      + f"; {detail}")
        row: dict[str, Any] = {"step": name, "seconds": r.seconds, "vs": s.ref, "ratio": None,
                               "target": None, "result": "", "detail": detail}
        if r.error is not None:
            row.update(result="ERROR", detail=r.error[:200])
            out.append(row)
            continue
        ref = results.get(s.ref) if s.ref else None
        if ref is not None and ref.seconds and r.seconds:
            row["ratio"] = ref.seconds / r.seconds if s.higher else r.seconds / ref.seconds
        if s.unit is not None and r.value is not None:
            row["detail"] = f"{r.value:.3g} {s.unit}; {row['detail']}"
        if s.limit is not None:
            row["target"], row["result"] = judge(s, r, row["ratio"])
        out.append(row)
        if r.growth is not None:
            grown, changed = r.growth
            g: dict[str, Any] = {"step": f"{name} growth", "seconds": None, "vs": "changed",
                                 "ratio": grown / changed if changed else None,
                                 "target": None, "result": "",
                                 "detail": f"{mb(grown)} for {mb(changed)} changed"}
            if s.growth_limit is not None:
                g["target"] = f"<= {s.growth_limit:g}x"
                g["result"] = "PASS" if g["ratio"] <= s.growth_limit else "MISS"
            out.append(g)
    return out


def judge(s: Step, r: Result, ratio: float | None) -> tuple[str, str]:
    """The target text of step `s` and whether `r` met it ("PASS"/"MISS")."""
    assert s.limit is not None
    if s.ref:
        value, shown = ratio, f"{s.limit:g}x"
    elif s.unit:
        value, shown = r.value, f"{s.limit:g} {s.unit}"
    else:
        value, shown = r.seconds, f"{s.limit:g} s"
    met = value is not None and (value >= s.limit if s.higher else value <= s.limit)
    return f"{'>=' if s.higher else '<='} {shown}", "PASS" if met and r.ok is not False else "MISS"


def render(table: list[dict[str, Any]]) -> str:
    head = ["step", "seconds", "vs", "ratio", "target", "result", "detail"]
    lines = [[
        r["step"], "" if r["seconds"] is None else f"{r['seconds']:.2f}", r["vs"] or "",
        "" if r["ratio"] is None else f"{r['ratio']:.2f}", r["target"] or "", r["result"],
        r["detail"]] for r in table]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    right = {1, 3}

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def run_step(b: Bench, name: str, args: argparse.Namespace, runs: list[Result],
             first_rep: int) -> None:
    """Run step `name` `args.repeat` times in a row, appending each result to `runs`;
    repetitions are numbered from `first_rep` on (tags and generations must differ)."""
    for rep in range(args.repeat):
        b.rep = first_rep + rep
        b.foreign_cpu = 0.0
        if args.quiet_wait > 0:
            waited = wait_quiet(args.quiet_wait)
            if waited >= args.quiet_wait:
                b.notes.append(f"{name}: machine still busy after waiting "
                               f"{args.quiet_wait:.0f} s; ran anyway")
        try:
            r = STEPS[name].fn(b)
        except Exception as exc:  # one broken tool must not lose the others' figures
            logging.exception("step %s failed", name)
            r = Result(error=f"{type(exc).__name__}: {exc}")
        r.extra["foreign_cpu_s"] = round(b.foreign_cpu, 2)
        if noisy(r):
            b.notes.append(f"{name}: other processes used {r.extra['foreign_cpu_s']} "
                           f"CPU-s during the step (took {r.seconds:.2f} s): noisy")
        runs.append(r)
        if r.seconds is not None:
            print(f"   {r.seconds:.2f} s  {r.detail}", flush=True)
        if r.error is not None:
            break


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/dwsd-bench"),
                    help="work directory (data set, copies, repositories, store)")
    ap.add_argument("--small", action="store_true", help="a 10x smaller data set")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--only", action="append", metavar="STEP",
                    help="run only these steps (comma-separated or repeated) and what "
                         "they need")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run each step N times in a row and report the median time")
    ap.add_argument("--rounds", type=int, default=1, metavar="N",
                    help="run all the steps N times over, in turn (A B A B ...), and "
                         "report each step's median: the machine's drift then hits a "
                         "step and its reference alike (with --only, the prerequisites "
                         "added run in the first round only)")
    ap.add_argument("--quiet-wait", type=float, default=120, metavar="S",
                    help="before each step, wait up to S seconds for other processes to "
                         "go quiet (0: don't)")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    ap.add_argument("--no-phases", dest="phases", action="store_false",
                    help="do not wrap dwsd functions to split snapshot time into phases")
    ap.add_argument("--profile", action="store_true",
                    help="sample dwsd steps with py-spy (`pip install py-spy`; raw "
                         "stacks into bench/out/; times are inflated)")
    args = ap.parse_args(argv)
    if args.list:
        for s in STEPS.values():
            print(f"{s.name:20} {s.doc}")
        return 0
    only = [n for item in args.only or [] for n in item.split(",") if n]
    names = plan(only)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    args.dir = args.dir.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    variant = "small" if args.small else "full"
    ds = Dataset(args.dir / f"data-{variant}", variant, args.seed)
    generated, gen_s = ds.ensure()
    print(f"data set {ds.root}: {len(ds.files)} files, {mb(ds.total_bytes)}; change set "
          f"{len(ds.changed)} files, {mb(ds.changed_bytes)} "
          f"({'generated' if generated else 'reused'} in {gen_s:.1f} s)", flush=True)

    version = code_version()
    print(f"dwsd at {version['commit']}{' + local changes' if version['dwsd_modified'] else ''}"
          f" (sources {version['dwsd_sources']})", flush=True)
    b = Bench(args, ds)
    runs: dict[str, list[Result]] = {name: [] for name in names}
    try:
        for rnd in range(args.rounds):
            # Later rounds repeat the steps asked for, not the prerequisites added for
            # them: what those made (a store, a copy) is there already.
            for name in names if rnd == 0 or not only else [n for n in names if n in only]:
                if runs[name] and runs[name][-1].error is not None:
                    continue  # broken in an earlier round: its error stands
                counted = f" (round {rnd + 1} of {args.rounds})" if args.rounds > 1 else ""
                print(f"-- {name}{counted}: {STEPS[name].doc}", flush=True)
                run_step(b, name, args, runs[name], first_rep=rnd * args.repeat)
                b.results[name] = combine(runs[name])  # later steps may read it
    finally:
        b.close_workspace()
        ds.apply(0)

    table = rows(b.results)
    print()
    print(render(table))
    for note in b.notes:
        print(f"note: {note}")
    OUT_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = OUT_DIR / f"bench-{stamp}-{variant}.json"
    out.write_text(json.dumps({
        "time": stamp, "argv": sys.argv, "dwsd": version, "dataset": ds.describe(),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                    "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "notes": b.notes, "table": table,
        "steps": {n: asdict(r) for n, r in b.results.items()}}, indent=2, default=str))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
