"""The workspace configuration: one YAML file read into frozen, validated dataclasses.

`load_config(path)` returns a `Config` or raises `ConfigError` whose message is ONE line,
`<file>:<line>: <key path>: <problem>`, e.g. `dwsd.yaml:7: resources[1].role: ...`.
Lines are 1-based; list indices in key paths are 0-based. A missing key is reported at
the line of the mapping that lacks it. YAML syntax errors read `<file>:<line>: YAML
syntax error: <problem>`; an unreadable file `<file>: cannot read config: <reason>`.

Rules (DESIGN §2): unknown keys are errors at every level; a key set to null is the same
as the key left out; relative paths are relative to the config file's directory and `~`
is expanded; paths are made absolute and normalised without resolving symlinks. No
resource may contain, or be, the store, the mount or another resource, and the store and
the mount may not overlap. Durations are strings such as "30s", "5m", "2h", "14d", "1w"
or "1h30m" (`parse_duration`). `load_config` blocks on reading the file.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from dwsd.errors import ConfigError, UsageError
from dwsd.snapshot.retention import KeepPolicy

ROLES = ("source-data", "intermediate-data", "code", "results")
KINDS = ("periodic", "pre-restore", "manual")
_ROOT = "(top level)"  # the key path of the whole document, in error messages

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# Units in descending order, each at most once: "1h30m" is fine, "30m1h" is a typo.
_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNIT_SECONDS = (7 * 86400, 86400, 3600, 60, 1)
_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_DEFAULT_RETENTION = {
    "periodic": KeepPolicy(last=5, hourly=24, daily=7, weekly=4),
    "pre-restore": KeepPolicy(within=dt.timedelta(days=14)),
    "manual": KeepPolicy(),
}


@dataclass(frozen=True)
class Resource:
    """A directory tree dwsd watches and snapshots; `path` is absolute and normalised."""

    name: str
    path: Path
    role: str
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointPolicy:
    """When periodic checkpoints happen: after `interval` with changes, or once `changes`
    changes piled up, in both cases after `quiet` without writes; `reconcile` is how
    often a full rescan catches events the watcher missed."""

    interval: dt.timedelta = dt.timedelta(minutes=30)
    changes: int = 100
    quiet: dt.timedelta = dt.timedelta(seconds=2)
    reconcile: dt.timedelta = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Config:
    """A validated workspace configuration. `path` is the config file, absolute."""

    path: Path
    workspace: str
    store: Path
    mount: Path | None
    socket: Path
    resources: tuple[Resource, ...]
    checkpoint: CheckpointPolicy
    retention: Mapping[str, KeepPolicy]
    allow_other: bool = False

    def resource(self, name: str) -> Resource:
        """The resource called `name`; raises `UsageError` when there is none."""
        for resource in self.resources:
            if resource.name == name:
                return resource
        known = ", ".join(r.name for r in self.resources)
        raise UsageError(f"unknown resource {name!r} (known: {known})")


def parse_duration(text: str) -> dt.timedelta:
    """Parse "30s", "5m", "2h", "14d", "1w" or a combination in that order ("1h30m").

    Zero ("0s") is accepted; callers reject it where it makes no sense. Bare numbers,
    signs, spaces and unknown units raise `UsageError`.
    """
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise UsageError(f"bad duration {text!r}: use a number and a unit (w, d, h, m, s)"
                         ", e.g. '30s', '2h' or '1h30m'")
    seconds = sum(int(n) * unit for n, unit in zip(match.groups(), _UNIT_SECONDS) if n)
    return dt.timedelta(seconds=seconds)


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CONFIG_HOME/dwsd/config.yaml (~/.config when that is unset)."""
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(config_home) / "dwsd" / "config.yaml"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the config file at `path`; raises `ConfigError`."""
    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{shown}: cannot read config: {reason}") from None
    root = _compose(text, shown)
    return _build_config(_At(root, _ROOT, shown), Path(os.path.abspath(path)))


def _compose(text: str, shown: str) -> yaml.Node:
    """The document's node graph: unlike loaded values, nodes know their line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        problem = f"{e.problem} ({e.context})" if e.context and e.problem else \
            e.problem or e.context
        raise ConfigError(f"{shown}:{line}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as e:  # its str() spans two lines
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{shown}:{line}: YAML syntax error: character "
                          f"#x{e.character:04x}: {e.reason}") from None
    if root is None:  # an empty file, or only comments
        return yaml.MappingNode("tag:yaml.org,2002:map", [],
                                start_mark=yaml.Mark(shown, 0, 0, 0, "", 0))
    return root


@dataclass(frozen=True)
class _At:
    """A YAML node, its key path and file: what an error message needs to point at it."""

    node: yaml.Node
    key: str
    file: str

    def error(self, problem: str, node: yaml.Node | None = None) -> ConfigError:
        line = (node or self.node).start_mark.line + 1
        return ConfigError(f"{self.file}:{line}: {self.key}: {problem}")

    def child(self, node: yaml.Node, key: str) -> _At:
        if self.key == _ROOT:
            return _At(node, key, self.file)
        sep = "" if key.startswith("[") else "."
        return _At(node, f"{self.key}{sep}{key}", self.file)

    def mapping(self, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, _At]:
        """The entries of a mapping with only `allowed` keys and all `required` ones.
        Optional keys set to null are left out, as if absent."""
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"must be a mapping, not {_kind(self.node)}")
        entries: dict[str, _At] = {}
        seen: set[str] = set()
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(f"keys must be names, not {_kind(key_node)}", key_node)
            key = str(key_node.value)
            if key not in allowed:
                raise self.child(key_node, key).error(
                    f"unknown key (expected: {', '.join(allowed)})")
            if key in seen:
                raise self.child(key_node, key).error("duplicate key")
            seen.add(key)
            if key in required or not _is_null(value_node):
                entries[key] = self.child(value_node, key)
        for key in required:
            if key not in entries:
                raise self.child(self.node, key).error("missing (required)")
        return entries

    def sequence(self) -> list[_At]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"must be a list, not {_kind(self.node)}")
        return [self.child(item, f"[{i}]") for i, item in enumerate(self.node.value)]

    def string(self) -> str:
        value = _scalar(self)
        if not isinstance(value, str) or not value:
            raise self.error(f"must be a non-empty string, not {_kind(self.node)}")
        return value

    def name(self) -> str:
        value = self.string()
        if not _NAME.fullmatch(value):
            raise self.error(f"bad name {value!r}: use letters, digits, '.', '_' and '-'"
                             ", not starting with '.'")
        return value

    def integer(self, minimum: int) -> int:
        value = _scalar(self)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be an integer, not {_kind(self.node)}")
        if value < minimum:
            raise self.error(f"must be at least {minimum}, not {value}")
        return value

    def boolean(self) -> bool:
        value = _scalar(self)
        if not isinstance(value, bool):
            raise self.error(f"must be true or false, not {_kind(self.node)}")
        return value

    def duration(self, allow_zero: bool) -> dt.timedelta:
        value = _scalar(self)
        if not isinstance(value, str):
            raise self.error(f"must be a duration such as '30s' or '2h', not "
                             f"{_kind(self.node)}")
        try:
            duration = parse_duration(value)
        except UsageError as e:
            raise self.error(str(e)) from None
        if not duration and not allow_zero:
            raise self.error("must be longer than zero")
        return duration

    def path(self, base: Path) -> Path:
        # abspath normalises "a/../b" without resolving symlinks, so the paths compared
        # and shown are the ones the user wrote.
        return Path(os.path.abspath(base / os.path.expanduser(self.string())))


def _scalar(at: _At) -> object:
    if not isinstance(at.node, yaml.ScalarNode):
        return at.node.value  # a list of nodes: fails every scalar type check
    try:
        return yaml.SafeLoader("").construct_object(at.node)
    except yaml.YAMLError as e:
        raise at.error(f"cannot read value: {getattr(e, 'problem', e)}") from None


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _kind(node: yaml.Node) -> str:
    """How a value is named in error messages: 'a list', 'a string ('x')'..."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = _scalar(_At(node, "", ""))
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({value!r})" if value else "an empty string"
    names = {bool: "a boolean", int: "an integer", float: "a number"}
    return f"{names.get(type(value), 'a ' + type(value).__name__)} ({node.value})"


def _build_config(root: _At, config_file: Path) -> Config:
    top = root.mapping(("workspace", "store", "mount", "socket", "resources",
                        "checkpoint", "retention", "allow_other"),
                       required=("workspace", "store", "resources"))
    base = config_file.parent
    workspace = top["workspace"].name()
    resources = _resources(top["resources"], base)
    store = top["store"].path(base)
    mount = top["mount"].path(base) if "mount" in top else None
    _check_overlaps(top, resources, store, mount)
    return Config(
        path=config_file,
        workspace=workspace,
        store=store,
        mount=mount,
        socket=top["socket"].path(base) if "socket" in top else _default_socket(workspace),
        resources=tuple(r for r, _ in resources),
        checkpoint=_checkpoint(top["checkpoint"]) if "checkpoint" in top
        else CheckpointPolicy(),
        retention=_retention(top.get("retention")),
        allow_other=top["allow_other"].boolean() if "allow_other" in top else False,
    )


def socket_only(path: str | os.PathLike[str]) -> Path | None:
    """The socket config file `path` names (or the default for its workspace name), read
    without validating anything else: for a client to reach a daemon that still runs on
    its last good configuration after an edit broke the file. None when even that much
    cannot be read. Blocks on reading the file."""
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict):
        return None
    socket, workspace = doc.get("socket"), doc.get("workspace")
    if isinstance(socket, str) and socket:
        base = Path(os.path.abspath(path)).parent
        return Path(os.path.abspath(base / os.path.expanduser(socket)))
    if socket is None and isinstance(workspace, str) and workspace:
        return _default_socket(workspace)
    return None


def _default_socket(workspace: str) -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "dwsd" / f"{workspace}.sock"
    return Path(f"/tmp/dwsd-{os.getuid()}") / f"{workspace}.sock"


def _resources(at: _At, base: Path) -> list[tuple[Resource, _At]]:
    """Each resource with the node of its path, for overlap errors to point at."""
    items = at.sequence()
    if not items:
        raise at.error("must list at least one resource")
    seen: dict[str, _At] = {}
    resources = []
    for item in items:
        keys = item.mapping(("name", "path", "role", "exclude"),
                            required=("name", "path", "role"))
        name = keys["name"].name()
        if name in seen:
            first = seen[name]
            raise keys["name"].error(f"duplicate resource name {name!r} (also "
                                     f"{first.key}, line {first.node.start_mark.line + 1})")
        seen[name] = keys["name"]
        role = keys["role"].string()
        if role not in ROLES:
            raise keys["role"].error(f"must be one of {', '.join(ROLES)}, not {role!r}")
        patterns = keys["exclude"].sequence() if "exclude" in keys else []
        resource = Resource(name=name, path=keys["path"].path(base), role=role,
                            exclude=tuple(p.string() for p in patterns))
        resources.append((resource, keys["path"]))
    return resources


def _check_overlaps(top: dict[str, _At], resources: list[tuple[Resource, _At]],
                    store: Path, mount: Path | None) -> None:
    """A snapshot that contained the store, the mount or another resource would recurse
    into itself or store the same files twice; so no two of these may nest."""
    for i, (resource, at) in enumerate(resources):
        for other, _ in resources[:i]:
            _refuse_nesting(at, resource.path, other.path, f"resource {other.name!r}")
        _refuse_nesting(top["store"], store, resource.path, f"resource {resource.name!r}")
        if mount is not None:
            _refuse_nesting(top["mount"], mount, resource.path,
                            f"resource {resource.name!r}")
    if mount is not None:
        _refuse_nesting(top["mount"], mount, store, "the store")


def _refuse_nesting(at: _At, path: Path, other: Path, other_name: str) -> None:
    """Raise at `at` if `path` and `other` are equal or one contains the other.
    `is_relative_to` compares whole components: /a/data2 is not inside /a/data."""
    if path == other:
        raise at.error(f"{path} is the same directory as {other_name}")
    if path.is_relative_to(other):
        raise at.error(f"{path} is inside {other_name} ({other})")
    if other.is_relative_to(path):
        raise at.error(f"{path} contains {other_name} ({other})")


_CHECKPOINT_KEYS: dict[str, Callable[[_At], Any]] = {
    "interval": lambda at: at.duration(allow_zero=False),
    "changes": lambda at: at.integer(minimum=1),
    # a zero quiet is meaningful: checkpoint without waiting for writes to settle
    "quiet": lambda at: at.duration(allow_zero=True),
    "reconcile": lambda at: at.duration(allow_zero=False),
}


def _checkpoint(at: _At) -> CheckpointPolicy:
    """Keys left out keep CheckpointPolicy's defaults."""
    keys = at.mapping(tuple(_CHECKPOINT_KEYS))
    return CheckpointPolicy(**{key: _CHECKPOINT_KEYS[key](value)
                               for key, value in keys.items()})


def _retention(at: _At | None) -> Mapping[str, KeepPolicy]:
    kinds = at.mapping(KINDS) if at is not None else {}
    return types.MappingProxyType(
        {kind: _keep_policy(kinds[kind]) if kind in kinds else _DEFAULT_RETENTION[kind]
         for kind in KINDS})


def _keep_policy(at: _At) -> KeepPolicy:
    keys = at.mapping(_COUNT_RULES + ("within", "tagged"))
    # Only the rules given are passed, so the others keep KeepPolicy's own defaults
    # (unused counts, `tagged` true) rather than a second copy of them here.
    rules: dict[str, Any] = {rule: keys[rule].integer(0)
                             for rule in _COUNT_RULES if rule in keys}
    if "within" in keys:
        rules["within"] = keys["within"].duration(allow_zero=False)
    if "tagged" in keys:
        rules["tagged"] = keys["tagged"].boolean()
    return KeepPolicy(**rules)
