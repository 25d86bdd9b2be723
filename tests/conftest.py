"""Shared fixtures: fixture trees on real filesystems and workspaces over them."""
from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests import trees


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """An unexpected WARNING (or worse) from dwsd fails the test; tests that expect one
    clear `caplog` after asserting it."""
    caplog.set_level(logging.INFO, logger="dwsd")
    yield
    bad = [r for r in caplog.get_records("call")
           if r.levelno >= logging.WARNING and r.name.startswith("dwsd")]
    assert not bad, f"unexpected log records: {[r.getMessage() for r in bad]}"


@pytest.fixture(scope="session")
def odd_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The foundation's fixture tree of odd files (read-only for tests: don't modify)."""
    root = tmp_path_factory.mktemp("odd") / "data"
    trees.make_odd_tree(root)
    trees.settle()
    return root


WriteConfig = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Write a workspace config over the given resources {name: path}; returns its path."""
    def write(resources: dict[str, Path], roles: dict[str, str] | None = None,
              excludes: dict[str, list[str]] | None = None, store: Path | None = None,
              extra: str = "") -> Path:
        roles = roles or {}
        excludes = excludes or {}
        lines = [f"workspace: test\nstore: {store or tmp_path / 'store'}\nmount: null\n"
                 f"socket: {tmp_path / 'dwsd.sock'}\nresources:\n"]
        for name, path in resources.items():
            lines.append(f"  - name: {name}\n    path: {path}\n"
                         f"    role: {roles.get(name, 'source-data')}\n")
            if name in excludes:
                lines.append(f"    exclude: {excludes[name]!r}\n")
        lines.append(textwrap.dedent(extra))
        path = tmp_path / "dwsd.yaml"
        path.write_text("".join(lines))
        return path
    return write


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("DWSD_TESTING", "1")
