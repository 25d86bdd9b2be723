"""Config loading: the documented example, durations, path rules and exact error lines."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import textwrap
from pathlib import Path

import pytest

from dwsd.config import (KINDS, ROLES, CheckpointPolicy, Config, Resource, load_config,
                         parse_duration)
from dwsd.errors import ConfigError, UsageError
from dwsd.snapshot.retention import KeepPolicy

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "dwsd.yaml"

# The smallest valid config; bad cases below extend or alter it, so line numbers in
# their expected messages count from here.
BASE = """\
workspace: demo
store: store
resources:
  - name: data
    path: data
    role: source-data
"""

TOP_KEYS = "workspace, store, mount, socket, resources, checkpoint, retention, allow_other"
BAD_DURATION = "use a number and a unit (w, d, h, m, s), e.g. '30s', '2h' or '1h30m'"


def write(directory: Path, text: str) -> Path:
    path = directory / "dwsd.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load(directory: Path, text: str) -> Config:
    return load_config(write(directory, text))


# ---------------------------------------------------------------- the documented example

def test_example_config_loads_with_documented_values() -> None:
    config = load_config(EXAMPLE)
    var = EXAMPLE.parent.parent / "var"
    assert config.path == EXAMPLE
    assert config.workspace == "demo"
    assert (config.store, config.mount, config.socket) == (
        var / "store", var / "snapshots", var / "dwsd.sock")
    assert config.allow_other is False
    assert config.resources == (
        Resource(name="data", path=var / "demo" / "data", role="source-data",
                 exclude=("*.tmp", "__pycache__/")),
        Resource(name="code", path=var / "demo" / "code", role="code", exclude=()),
        Resource(name="results", path=var / "demo" / "results", role="results",
                 exclude=()),
    )
    assert config.checkpoint == CheckpointPolicy(
        interval=dt.timedelta(minutes=30), changes=100, quiet=dt.timedelta(seconds=2),
        reconcile=dt.timedelta(hours=1))


def test_example_config_has_design_retention() -> None:
    assert dict(load_config(EXAMPLE).retention) == {
        "periodic": KeepPolicy(last=5, hourly=24, daily=7, weekly=4),
        "pre-restore": KeepPolicy(within=dt.timedelta(days=14)),
        "manual": KeepPolicy(),
    }


def test_constants() -> None:
    assert ROLES == ("source-data", "intermediate-data", "code", "results")
    assert KINDS == ("periodic", "pre-restore", "manual")


# ---------------------------------------------------------------- durations

@pytest.mark.parametrize(("text", "expected"), [
    ("30s", dt.timedelta(seconds=30)),
    ("5m", dt.timedelta(minutes=5)),
    ("2h", dt.timedelta(hours=2)),
    ("14d", dt.timedelta(days=14)),
    ("1w", dt.timedelta(weeks=1)),
    ("1h30m", dt.timedelta(hours=1, minutes=30)),
    ("1w2d3h4m5s", dt.timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)),
    ("90m", dt.timedelta(minutes=90)),
    ("0s", dt.timedelta(0)),
])
def test_parse_duration(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", "30", "-5m", "+5m", "5 m", " 5m", "5M", "1.5h", "5x", "m", "30m1h", "1h1h",
    "5min",
])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bad duration"):
        parse_duration(text)


# ---------------------------------------------------------------- defaults and paths

def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    config = load(tmp_path, BASE)
    assert config.mount is None
    assert config.socket == Path("/run/user/1234/dwsd/demo.sock")
    assert config.checkpoint == CheckpointPolicy()
    assert config.allow_other is False
    assert config.resources[0].exclude == ()
    assert dict(config.retention) == dict(load_config(EXAMPLE).retention)


def test_default_socket_without_xdg_runtime_dir(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    config = load(tmp_path, BASE)
    assert config.socket == Path(f"/tmp/dwsd-{os.getuid()}/demo.sock")


def test_null_means_default(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "mount: null\ncheckpoint:\nretention:\n"
                  "allow_other: ~\n")
    assert config.mount is None
    assert config.checkpoint == CheckpointPolicy()
    assert config.allow_other is False


def test_relative_paths_are_relative_to_the_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    config = load(conf_dir, """\
        workspace: demo
        store: ../var/./store/
        mount: ~/snapshots
        socket: sock
        resources:
          - {name: data, path: ../var/x/../data, role: source-data}
          - {name: linked, path: ../link, role: code}
          - {name: abs, path: /srv/abs, role: results}
        """)
    assert config.store == tmp_path / "var" / "store"
    assert config.mount == tmp_path / "home" / "snapshots"
    assert config.socket == conf_dir / "sock"
    assert [r.path for r in config.resources] == [
        tmp_path / "var" / "data", tmp_path / "link", Path("/srv/abs")]


def test_sibling_paths_with_a_common_prefix_do_not_overlap(tmp_path: Path) -> None:
    config = load(tmp_path, """\
        workspace: demo
        store: data-store
        mount: data2-view
        resources:
          - {name: data, path: data, role: source-data}
          - {name: data2, path: data2, role: intermediate-data}
        """)
    assert [r.name for r in config.resources] == ["data", "data2"]


def test_given_retention_kind_replaces_its_default(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + textwrap.dedent("""\
        retention:
          periodic: {last: 3, monthly: 0, yearly: 2}
          manual: {within: 1w}
        """))
    assert config.retention["periodic"] == KeepPolicy(last=3, monthly=0, yearly=2)
    assert config.retention["pre-restore"] == KeepPolicy(within=dt.timedelta(days=14))
    assert config.retention["manual"] == KeepPolicy(within=dt.timedelta(weeks=1))


def test_retention_tagged_rule(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "retention:\n  periodic: {last: 1, tagged: false}\n")
    assert config.retention["periodic"] == KeepPolicy(last=1, tagged=False)
    assert config.retention["manual"].tagged is True


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workspace = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.retention["manual"] = KeepPolicy()  # type: ignore[index]


def test_resource_lookup(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    assert config.resource("data") is config.resources[0]
    with pytest.raises(UsageError, match="unknown resource 'nope'"):
        config.resource("nope")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read config: No such file or directory"


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read config: Is a directory"


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dwsd.yaml"
    path.write_bytes(b"workspace: d\xe9mo\n")
    with pytest.raises(ConfigError, match=r"^\S+/dwsd.yaml: cannot read config: "
                                          r"'utf-8' codec can't decode byte 0xe9"):
        load_config(path)


# ---------------------------------------------------------------- bad configs

BAD_CONFIGS = {
    "unknown top-level key": (
        BASE + "colour: blue\n",
        f"7: colour: unknown key (expected: {TOP_KEYS})"),
    "unknown nested key": (
        BASE + "checkpoint:\n  interval: 5m\n  intervall: 5m\n",
        "9: checkpoint.intervall: unknown key "
        "(expected: interval, changes, quiet, reconcile)"),
    "unknown resource key": (
        BASE + "    exclude: []\n    role2: code\n",
        "8: resources[0].role2: unknown key (expected: name, path, role, exclude)"),
    "duplicate key": (
        BASE + "store: again\n",
        "7: store: duplicate key"),
    "missing workspace": (
        BASE.replace("workspace: demo\n", ""),
        "1: workspace: missing (required)"),
    "null workspace": (
        BASE.replace("workspace: demo", "workspace:"),
        "1: workspace: must be a non-empty string, not null"),
    "bad workspace name": (
        BASE.replace("workspace: demo", "workspace: my demo"),
        "1: workspace: bad name 'my demo': use letters, digits, '.', '_' and '-', "
        "not starting with '.'"),
    "missing store": (
        BASE.replace("store: store\n", ""),
        "1: store: missing (required)"),
    "missing resources": (
        "workspace: demo\nstore: store\n",
        "1: resources: missing (required)"),
    "empty resources": (
        "workspace: demo\nstore: store\nresources: []\n",
        "3: resources: must list at least one resource"),
    "resources not a list": (
        "workspace: demo\nstore: store\nresources:\n  data: {path: data}\n",
        "4: resources: must be a list, not a mapping"),
    "resource missing path": (
        BASE.replace("    path: data\n", ""),
        "4: resources[0].path: missing (required)"),
    "bad role": (
        BASE.replace("role: source-data", "role: raw"),
        "6: resources[0].role: must be one of source-data, intermediate-data, code, "
        "results, not 'raw'"),
    "bad resource name": (
        BASE.replace("name: data", "name: .data"),
        "4: resources[0].name: bad name '.data': use letters, digits, '.', '_' and '-', "
        "not starting with '.'"),
    "resource name with a slash": (
        BASE.replace("name: data", "name: a/b"),
        "4: resources[0].name: bad name 'a/b': use letters, digits, '.', '_' and '-', "
        "not starting with '.'"),
    "exclude not a list": (
        BASE + "    exclude: '*.tmp'\n",
        "7: resources[0].exclude: must be a list, not a string ('*.tmp')"),
    "exclude entry not a string": (
        BASE + "    exclude: ['*.tmp', 3]\n",
        "7: resources[0].exclude[1]: must be a non-empty string, not an integer (3)"),
    "duplicate resource name": (
        BASE + "  - name: data\n    path: data2\n    role: code\n",
        "7: resources[1].name: duplicate resource name 'data' "
        "(also resources[0].name, line 4)"),
    "resource inside resource": (
        BASE + "  - name: sub\n    path: data/sub\n    role: code\n",
        "8: resources[1].path: {dir}/data/sub is inside resource 'data' ({dir}/data)"),
    "resource containing resource": (
        BASE + "  - name: all\n    path: .\n    role: code\n",
        "8: resources[1].path: {dir} contains resource 'data' ({dir}/data)"),
    "resource equal to resource": (
        BASE + "  - name: again\n    path: ./data/\n    role: code\n",
        "8: resources[1].path: {dir}/data is the same directory as resource 'data'"),
    "store inside resource": (
        BASE.replace("store: store", "store: data/.store"),
        "2: store: {dir}/data/.store is inside resource 'data' ({dir}/data)"),
    "resource inside store": (
        BASE.replace("path: data", "path: store/data"),
        "2: store: {dir}/store contains resource 'data' ({dir}/store/data)"),
    "mount inside resource": (
        BASE + "mount: data/view\n",
        "7: mount: {dir}/data/view is inside resource 'data' ({dir}/data)"),
    "resource inside mount": (
        BASE.replace("path: data", "path: view/data") + "mount: view\n",
        "7: mount: {dir}/view contains resource 'data' ({dir}/view/data)"),
    "mount inside store": (
        BASE + "mount: store/view\n",
        "7: mount: {dir}/store/view is inside the store ({dir}/store)"),
    "bad duration": (
        BASE + "checkpoint:\n  quiet: 2 sec\n",
        f"8: checkpoint.quiet: bad duration '2 sec': {BAD_DURATION}"),
    "bare number duration": (
        BASE + "checkpoint:\n  interval: 30\n",
        "8: checkpoint.interval: must be a duration such as '30s' or '2h', "
        "not an integer (30)"),
    "zero interval": (
        BASE + "checkpoint:\n  interval: 0m\n",
        "8: checkpoint.interval: must be longer than zero"),
    "zero changes": (
        BASE + "checkpoint:\n  changes: 0\n",
        "8: checkpoint.changes: must be at least 1, not 0"),
    "negative changes": (
        BASE + "checkpoint:\n  changes: -5\n",
        "8: checkpoint.changes: must be at least 1, not -5"),
    "string for changes": (
        BASE + "checkpoint:\n  changes: many\n",
        "8: checkpoint.changes: must be an integer, not a string ('many')"),
    "bool for changes": (
        BASE + "checkpoint:\n  changes: true\n",
        "8: checkpoint.changes: must be an integer, not a boolean (true)"),
    "float for changes": (
        BASE + "checkpoint:\n  changes: 1.5\n",
        "8: checkpoint.changes: must be an integer, not a number (1.5)"),
    "list for checkpoint": (
        BASE + "checkpoint: [30m, 100]\n",
        "7: checkpoint: must be a mapping, not a list"),
    "bad allow_other": (
        BASE + "allow_other: sometimes\n",
        "7: allow_other: must be true or false, not a string ('sometimes')"),
    "bad retention kind": (
        BASE + "retention:\n  hourly: {last: 3}\n",
        "8: retention.hourly: unknown key (expected: periodic, pre-restore, manual)"),
    "bad retention rule": (
        BASE + "retention:\n  manual: {keep: 3}\n",
        "8: retention.manual.keep: unknown key "
        "(expected: last, hourly, daily, weekly, monthly, yearly, within, tagged)"),
    "negative retention rule value": (
        BASE + "retention:\n  periodic:\n    last: 5\n    daily: -1\n",
        "10: retention.periodic.daily: must be at least 0, not -1"),
    "string retention rule value": (
        BASE + "retention:\n  periodic: {last: five}\n",
        "8: retention.periodic.last: must be an integer, not a string ('five')"),
    "bad retention within": (
        BASE + "retention:\n  pre-restore: {within: 2 weeks}\n",
        f"8: retention.pre-restore.within: bad duration '2 weeks': {BAD_DURATION}"),
    "bad retention tagged": (
        BASE + "retention:\n  manual: {tagged: 1}\n",
        "8: retention.manual.tagged: must be true or false, not an integer (1)"),
    "retention kind not a mapping": (
        BASE + "retention:\n  manual: [1]\n",
        "8: retention.manual: must be a mapping, not a list"),
    "unknown YAML tag": (
        BASE.replace("store: store", "store: !secret store"),
        "2: store: cannot read value: could not determine a constructor "
        "for the tag '!secret'"),
    "YAML syntax error": (
        BASE + "checkpoint: {interval: 5m\n",
        "8: YAML syntax error: expected ',' or '}', but got '<stream end>' "
        "(while parsing a flow mapping)"),
    "YAML bad indentation": (
        BASE.replace("    role:", "   role:"),
        "6: YAML syntax error: expected <block end>, but found "
        "'<block mapping start>' (while parsing a block collection)"),
    "two YAML documents": (
        BASE + "---\nworkspace: other\n",
        "7: YAML syntax error: but found another document "
        "(expected a single document in the stream)"),
    "control character": (
        BASE + "mount: a\x01b\n",
        "7: YAML syntax error: character #x0001: special characters are not allowed"),
    "non-mapping top level": (
        "- workspace: demo\n- store: store\n",
        "1: (top level): must be a mapping, not a list"),
    "scalar top level": (
        "just words\n",
        "1: (top level): must be a mapping, not a string ('just words')"),
    "empty file": (
        "# nothing here yet\n",
        "1: workspace: missing (required)"),
}


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS.values(), ids=BAD_CONFIGS)
def test_bad_config(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "dwsd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:" + expected.replace("{dir}", str(tmp_path))
    assert "\n" not in str(info.value)
