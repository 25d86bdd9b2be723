"""`python -m dwsd.cli.demo --config FILE`: make the demo workspace of the example config
(a few files in each resource, only where missing) and print what to try once the daemon
runs. `make run` calls it, then starts `dwsd`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwsd.config import load_config
from dwsd.errors import DwsdError

DEMO_FILES = {
    "data": {"iris.csv": "sepal_length,sepal_width,species\n5.1,3.5,setosa\n7.0,3.2,"
                         "versicolor\n6.3,3.3,virginica\n",
             "raw/README": "raw measurements go here\n"},
    "code": {"train.py": "import csv\nrows = list(csv.DictReader(open('../data/iris.csv')))"
                         "\nprint(len(rows), 'rows')\n"},
    "results": {"metrics.json": '{"accuracy": 0.93}\n'},
}


def make_demo(config_path: Path) -> list[Path]:
    """Create the demo files that are missing; return those created."""
    config = load_config(config_path)
    created = []
    for resource in config.resources:
        for rel, text in DEMO_FILES.get(resource.name, {}).items():
            path = resource.path / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                created.append(path)
        resource.path.mkdir(parents=True, exist_ok=True)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dwsd-demo")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        created = make_demo(args.config)
        config = load_config(args.config)
    except DwsdError as exc:
        print(f"dwsd-demo: {exc}", file=sys.stderr)
        return 1
    ctl = f".venv/bin/dwsctl --config {args.config}"
    print(f"demo workspace ready ({len(created)} files created); starting dwsd.\n"
          f"In another terminal, try:\n"
          f"  {ctl} snapshot -t first -m 'demo baseline'\n"
          f"  {ctl} list\n"
          f"  ls {config.mount}/  &&  cat {config.mount}/first/data/iris.csv\n"
          f"  echo '4.9,3.0,setosa' >> {config.resources[0].path}/iris.csv\n"
          f"  {ctl} diff first\n"
          f"  {ctl} restore first --only data\n"
          f"  {ctl} status\n"
          f"Stop dwsd with Ctrl-C.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
