"""gitignore-style exclusion of paths inside a resource.

Supported, as in gitignore: `*`, `?`, `[...]` (never matching `/`), `**` across
directories, a trailing `/` for directories only, a leading or inner `/` anchoring the
pattern at the resource root (otherwise it matches at any depth), and `!` to re-include.
The last matching pattern wins; an excluded directory is not entered at all.
Paths are bytes relative to the resource root, without a leading slash.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[bytes]
    dir_only: bool
    negate: bool


class ExcludeMatcher:
    def __init__(self, patterns: Iterable[str]) -> None:
        self.rules = tuple(_compile(p) for p in patterns if p.strip() and
                           not p.startswith("#"))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def excluded(self, relpath: bytes, is_dir: bool) -> bool:
        """True when `relpath` (a file, or a directory when `is_dir`) is excluded."""
        result = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relpath):
                result = not rule.negate
        return result


def _compile(pattern: str) -> _Rule:
    negate = pattern.startswith("!")
    if negate:
        pattern = pattern[1:]
    dir_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    body = _translate(pattern.encode("utf-8", "surrogateescape"))
    prefix = b"" if anchored else b"(?:.*/)?"
    return _Rule(re.compile(prefix + body + rb"\Z", re.DOTALL), dir_only, negate)


def _translate(pat: bytes) -> bytes:
    out: list[bytes] = []
    i = 0
    while i < len(pat):
        c = pat[i:i + 1]
        if pat.startswith(b"**/", i):
            out.append(b"(?:.*/)?")
            i += 3
        elif pat.startswith(b"/**", i) and i + 3 == len(pat):
            out.append(b"/.*")
            i += 3
        elif pat.startswith(b"**", i):
            out.append(b".*")
            i += 2
        elif c == b"*":
            out.append(b"[^/]*")
            i += 1
        elif c == b"?":
            out.append(b"[^/]")
            i += 1
        elif c == b"[" and (end := pat.find(b"]", i + 2)) != -1:
            body = pat[i + 1:end].replace(b"\\", b"\\\\")
            if body.startswith(b"!"):
                body = b"^" + body[1:]
            out.append(b"[" + body + b"]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return b"".join(out)
