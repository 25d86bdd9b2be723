"""`dwsd` entry point (placeholder until the daemon lands)."""
import sys


def main() -> int:
    print("dwsd: the daemon is not built yet; see `make run` for the workspace demo",
          file=sys.stderr)
    return 2
