"""`dwsctl` as a real subprocess against a real control server; its pure helpers; and
`dwsd.api` against the same server."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from dwsd import api
from dwsd.cli import dwsctl
from dwsd.errors import ConfigError
from dwsd.store.ids import hash_bytes
from dwsd.control.client import find_socket
from dwsd.errors import UsageError
from tests.conftest import WriteConfig
from tests.test_control_support import DATA_FILES, Served, served, short_dir, \
    workspace  # noqa: F401 (fixtures)

TIMEOUT = 30
DWSCTL = [sys.executable, "-m", "dwsd.cli.dwsctl"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWSD_")}
    return env | extra


async def run_dwsctl(served: Served, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process([*DWSCTL, "--socket", os.fspath(served.socket),
                                       *args], capture_stdout=True, capture_stderr=True,
                                      check=False, env=clean_env())


def text(out: bytes) -> str:
    return out.decode("utf-8", "surrogateescape")


# -- against a live server --------------------------------------------------------------

async def test_json_list_is_an_array_of_snapshots(served: Served) -> None:
    taken = await run_dwsctl(served, "snapshot", "-t", "v1", "-m", "first\nsecond line")
    assert taken.returncode == 0, taken.stderr
    listed = await run_dwsctl(served, "--json", "list")
    assert listed.returncode == 0, listed.stderr
    [snap] = json.loads(listed.stdout)
    assert {"id", "hash", "number", "kind", "tags", "message", "time"} <= set(snap)
    assert (snap["number"], snap["kind"], snap["tags"]) == (1, "manual", ["v1"])
    assert snap["time"].endswith("Z")
    # The common options also after the command's name, as the README writes them.
    after = await run_dwsctl(served, "list", "--json")
    assert after.returncode == 0 and json.loads(after.stdout) == [snap], after.stderr


async def test_list_prints_a_table_with_the_first_message_line(served: Served) -> None:
    await run_dwsctl(served, "snapshot", "-t", "v1", "-m", "first\nsecond line")
    listed = await run_dwsctl(served, "list")
    header, row = text(listed.stdout).splitlines()
    assert header.split() == ["#", "ID", "KIND", "TAGS", "FILES", "SIZE", "MESSAGE"]
    assert row.split()[0] == "1" and " v1 " in row and row.endswith("first")
    assert "20" in row.split() and "second" not in row


async def test_snapshot_and_show(served: Served) -> None:
    taken = await run_dwsctl(served, "snapshot", "-t", "v1")
    assert text(taken.stdout).startswith("snapshot 1 (") and "[v1]" in text(taken.stdout)
    again = await run_dwsctl(served, "snapshot")
    assert text(again.stdout).startswith("no change: same content as snapshot 1")
    shown = await run_dwsctl(served, "show", "v1")
    lines = text(shown.stdout).splitlines()
    assert lines[0].split() == ["snapshot", "1"] and "resources" in lines


async def test_a_snapshot_that_only_removes_files_says_so(served: Served) -> None:
    await run_dwsctl(served, "snapshot", "-t", "v1")
    (served.data / "file-03.txt").unlink()
    (served.data / "file-04.txt").unlink()
    taken = text((await run_dwsctl(served, "snapshot", "-t", "v2")).stdout)
    assert taken.startswith("snapshot 2 (") and "; 0 changed, 2 removed, " in taken
    shown = text((await run_dwsctl(served, "show", "v2")).stdout).splitlines()
    changed = [line for line in shown if line.startswith("changed")]
    assert len(changed) == 1
    assert re.fullmatch(r"changed +0 files, 2 removed, \S+ \S*B added to the store",
                        changed[0])
    first = text((await run_dwsctl(served, "show", "v1")).stdout)
    assert "removed" not in first


async def test_restore_shows_progress_and_restores(served: Served) -> None:
    await run_dwsctl(served, "snapshot", "-t", "v1")
    for name in DATA_FILES:
        (served.data / name).write_text("changed\n")
    diff = await run_dwsctl(served, "diff", "v1")
    assert f"{len(DATA_FILES)} modified" in text(diff.stdout)
    planned = await run_dwsctl(served, "restore", "v1", "--dry-run")
    assert "  write  data/file-01.txt" in text(planned.stdout).splitlines()
    restored = await run_dwsctl(served, "restore", "v1")
    assert restored.returncode == 0, restored.stderr
    progress = [line for line in text(restored.stderr).splitlines() if "%" in line]
    assert progress and progress[-1].startswith("restore: 100%")
    assert f"{len(DATA_FILES)} files written" in text(restored.stdout)
    assert "undo with: dwsctl restore " in text(restored.stdout)
    assert (served.data / "file-01.txt").read_text() == DATA_FILES["file-01.txt"]


async def test_tag_untag_delete_prune_check(served: Served,
                                            caplog: pytest.LogCaptureFixture) -> None:
    await run_dwsctl(served, "snapshot", "-t", "v1")
    tagged = await run_dwsctl(served, "tag", "v1", "best")
    assert text(tagged.stdout).strip().endswith("as best")
    assert (await run_dwsctl(served, "untag", "best")).returncode == 0
    pruned = await run_dwsctl(served, "prune", "--dry-run")
    assert text(pruned.stdout).splitlines() == ["would delete 0 snapshot(s), keep 1"]
    checked = await run_dwsctl(served, "check", "--read-data")
    assert text(checked.stdout).startswith("store ok:")
    blob = served.workspace.store.objects.path(
        "blobs", hash_bytes(DATA_FILES["file-01.txt"].encode()))
    os.chmod(blob, 0o644)
    blob.write_bytes(b"not what it was")
    repaired = await run_dwsctl(served, "check", "--read-data", "--repair")
    assert repaired.returncode == dwsctl.EXIT_ERROR  # the problem as found
    assert text(repaired.stdout).splitlines()[-1].startswith(
        "repair: 1 corrupt blob(s) moved aside; the next full snapshot")
    assert not blob.exists() and "is corrupt: moved aside to" in caplog.text
    caplog.clear()
    deleted = await run_dwsctl(served, "delete", "v1")
    assert text(deleted.stdout).startswith("deleted snapshot 1")
    assert text((await run_dwsctl(served, "list")).stdout).strip() == "no snapshots"


async def test_daemon_error_is_one_line_and_exit_1(served: Served) -> None:
    shown = await run_dwsctl(served, "show", "nosuch")
    assert shown.returncode == dwsctl.EXIT_ERROR
    [line] = text(shown.stderr).splitlines()
    assert line.startswith("dwsctl: ") and "'nosuch'" in line and "(bad-ref)" in line


async def test_status_prints_key_values(served: Served) -> None:
    status = await run_dwsctl(served, "status")
    assert text(status.stdout).splitlines() == ["workspace: test", "queue: 0"]


# -- without a daemon -------------------------------------------------------------------

def test_daemon_not_running_is_one_line_naming_the_socket_and_exit_3(
        short_dir: Path) -> None:
    socket_path = short_dir / "nobody-here.sock"
    proc = subprocess.run([*DWSCTL, "--socket", os.fspath(socket_path), "list"],
                          capture_output=True, text=True, timeout=TIMEOUT, env=clean_env())
    assert proc.returncode == dwsctl.EXIT_NOT_RUNNING
    assert proc.stderr.splitlines() == [
        f"dwsctl: dwsd is not running (no daemon answers at {socket_path})"]


def test_config_socket_is_used(short_dir: Path, write_config: WriteConfig,
                               data_dir: Path) -> None:
    config = write_config({"data": data_dir})
    proc = subprocess.run([*DWSCTL, "--config", os.fspath(config), "status"],
                          capture_output=True, text=True, timeout=TIMEOUT, env=clean_env())
    assert proc.returncode == dwsctl.EXIT_NOT_RUNNING
    assert str(config.parent / "dwsd.sock") in proc.stderr


def test_no_socket_known_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([*DWSCTL, "list"], capture_output=True, text=True,
                          timeout=TIMEOUT, env=clean_env(XDG_CONFIG_HOME=str(tmp_path)))
    assert proc.returncode == dwsctl.EXIT_USAGE
    [line] = proc.stderr.splitlines()
    assert "no daemon socket known" in line and str(tmp_path) in line


def test_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert dwsctl.main(["--socket", "/nonexistent", "list", "-n", "0"]) == 2
    assert "not a positive integer" in capsys.readouterr().err


def test_a_snapshot_lacking_files_warns_and_exits_1(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    left_out = [{"resource": "data", "path": f"f{i:02d}", "error": "Permission denied"}
                for i in range(dwsctl.WARNINGS_SHOWN + 5)]
    result = {"snapshot": None, "created": False, "unstable": [], "unreadable": left_out}
    ns = dwsctl.build_parser().parse_args(["snapshot"])
    assert dwsctl.render_snapshot(result, ns, sys.stdout) == dwsctl.EXIT_ERROR
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "dwsctl: warning: data/f00 not captured: Permission denied"
    assert err[-1] == ("dwsctl: warning: and 5 more files not captured (--json lists "
                       "them all)")
    assert len(err) == dwsctl.WARNINGS_SHOWN + 1
    assert dwsctl.render_json("snapshot", result, sys.stdout) == dwsctl.EXIT_ERROR
    result["unreadable"] = []
    assert dwsctl.render_snapshot(result, ns, sys.stdout) == dwsctl.EXIT_OK
    assert dwsctl.render_json("snapshot", result, sys.stdout) == dwsctl.EXIT_OK


@pytest.mark.parametrize("text,escaped", [
    ("plain/ü-name", "plain/ü-name"),
    ("new\nline", "new\\nline"),                       # one diff line, not two
    ("\x1b[31mred", "\\x1b[31mred"),                     # no escape sequence to a tty
    ("back\\slash", "back\\\\slash"),                   # unambiguous
    (os.fsdecode(b"not\xffutf8"), "not\\xffutf8"),         # the byte, not U+FFFD
])
def test_names_and_messages_are_printed_escaped(text: str, escaped: str) -> None:
    assert dwsctl.shown(text) == escaped


def test_diff_prints_one_line_per_change_whatever_the_name(
        capsys: pytest.CaptureFixture[str]) -> None:
    change = {"status": "added", "path": "a\nb", "kind": "file"}
    ns = dwsctl.build_parser().parse_args(["diff", "v1"])
    dwsctl.render_diff({"data": [change]}, ns, sys.stdout)
    assert capsys.readouterr().out.splitlines() == ["added     data/a\\nb", "1 added"]


def test_diff_names_a_resource_it_could_not_compare_and_exits_1(
        capsys: pytest.CaptureFixture[str]) -> None:
    result = {"data": [{"status": "unavailable", "path": "", "kind": None}],
              "results": [{"status": "modified", "path": "r.txt", "kind": "file"}]}
    ns = dwsctl.build_parser().parse_args(["diff", "v1"])
    assert dwsctl.render_json("diff", result, sys.stdout) == dwsctl.EXIT_ERROR  # --json
    assert '"status": "unavailable"' in capsys.readouterr().out
    assert dwsctl.render_diff(result, ns, sys.stdout) == dwsctl.EXIT_ERROR
    assert capsys.readouterr().out.splitlines() == [
        "unavailable data/ (its directory cannot be read: not compared; see the daemon's "
        "log)", "modified  results/r.txt", "1 modified, 1 unavailable"]


def test_a_double_dash_given_as_the_tag_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # argparse drops it, leaving no TAG: the daemon is not asked (no socket here).
    assert dwsctl.main(["--socket", str(tmp_path / "none.sock"), "tag", "v1", "--", "--"]
                       ) == dwsctl.EXIT_USAGE
    assert capsys.readouterr().err == (
        "dwsctl: tag: TAG missing ('--' ends the options; it is not a value)\n")


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert dwsctl.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "3  the daemon is not running" in out


def test_a_broken_config_still_gives_the_socket_it_names(tmp_path: Path) -> None:
    # The daemon keeps its last good configuration when a reload refuses an edit: its
    # socket must stay reachable through the edited file.
    config = tmp_path / "dwsd.yaml"
    config.write_text("workspace: w\nsocket: run/d.sock\nbogus: 1\n")
    told: list[tuple[str, Path]] = []
    found = find_socket(None, config, {}, lambda exc, p: told.append((str(exc), p)))
    assert found == tmp_path / "run" / "d.sock"
    [(error, given)] = told
    assert error.startswith(f"{config}:3: bogus: unknown key") and given == found
    config.write_text("workspace: w\nsocket: [not, a, path\n")  # not even YAML
    with pytest.raises(ConfigError, match=r"YAML syntax error.*\(give the daemon's "
                                          r"socket with --socket\)$"):
        find_socket(None, config, {})
    proc = subprocess.run([*DWSCTL, "--config", str(config), "status"],
                          capture_output=True, text=True, timeout=TIMEOUT, env=clean_env())
    assert proc.returncode == dwsctl.EXIT_USAGE and "--socket" in proc.stderr


def test_socket_lookup_order(tmp_path: Path, write_config: WriteConfig,
                             data_dir: Path) -> None:
    config = write_config({"data": data_dir})
    from_config = config.parent / "dwsd.sock"
    env = {"DWSD_SOCKET": "/env.sock", "DWSD_CONFIG": os.fspath(config)}
    assert find_socket("/opt.sock", config, env) == Path("/opt.sock")
    assert find_socket(None, config, env) == from_config
    assert find_socket(None, None, env) == Path("/env.sock")
    assert find_socket(None, None, {"DWSD_CONFIG": os.fspath(config)}) == from_config
    home = tmp_path / "home"
    (home / "dwsd").mkdir(parents=True)
    (home / "dwsd" / "config.yaml").write_text(config.read_text())
    assert find_socket(None, None, {"XDG_CONFIG_HOME": os.fspath(home)}) == from_config
    with pytest.raises(UsageError):
        find_socket(None, None, {"XDG_CONFIG_HOME": os.fspath(tmp_path / "none")})


# -- pure helpers -----------------------------------------------------------------------

@pytest.mark.parametrize("n, shown", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                      (5 * 2**30, "5.0 GiB")])
def test_human_size(n: int, shown: str) -> None:
    assert dwsctl.human_size(n) == shown


def test_progress_line_has_a_bar_and_an_eta() -> None:
    data = {"files_done": 1, "files_total": 4, "bytes_done": 250, "bytes_total": 1000}
    line = dwsctl.progress_line("restore", data, elapsed=10.0, bar_width=8)
    assert line == "restore: [##------]  25% 1/4 files 250 B/1000 B ETA 0:30"
    done = dict(data, files_done=4, bytes_done=1000)
    assert "ETA" not in dwsctl.progress_line("restore", done, 10.0)
    assert "ETA" not in dwsctl.progress_line("restore", data, 0.5)  # too soon to say
    early = dict(data, bytes_done=5)
    assert "ETA" not in dwsctl.progress_line("restore", early, 10.0)  # too little done
    # Past a snapshot's estimated totals: what is done, no percentage or ETA.
    past = {"files_done": 1, "files_total": 0, "bytes_done": 2, "bytes_total": 0}
    assert dwsctl.progress_line("snapshot", past, 10.0, 8) == "snapshot: 1 files 2 B"


def test_plain_progress_prints_periodically_and_the_last_line() -> None:
    now = [0.0]
    out = io.StringIO()
    display = dwsctl.ProgressDisplay("restore", out, tty=False, plain_interval=2.0,
                                     clock=lambda: now[0])
    for i in range(1, 41):  # 4 s of events, 10 a second
        now[0] = i / 10
        display("progress", {"files_done": i, "files_total": 40})
    display.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("restore: 100% 40/40 files")


def test_tty_progress_redraws_one_line() -> None:
    out = io.StringIO()
    display = dwsctl.ProgressDisplay("snapshot", out, tty=True, clock=lambda: 0.0)
    display("working", {"elapsed": 3})
    display("working", {"elapsed": 4})
    display.finish()
    assert out.getvalue() == ("\r\x1b[Ksnapshot: working (0:03)"
                              "\r\x1b[Ksnapshot: working (0:04)\n")


# -- dwsd.api ---------------------------------------------------------------------------

async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with trio.fail_after(TIMEOUT):
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_api_snapshot_history_restore_delete(served: Served) -> None:
    sock = served.socket
    first = await in_thread(api.take_snapshot, "v1", "baseline", socket=sock)
    (served.data / "file-00.txt").write_text("changed\n")
    second = await in_thread(api.take_snapshot, socket=sock)
    history = await in_thread(api.get_snapshot_history, socket=sock)
    assert [(s.snapshot_number, s.hashval, s.tags) for s in history] == [
        (1, first, ["v1"]), (2, second, [])]
    newest = await in_thread(api.get_snapshot_history, reverse=True, max_count=1,
                             socket=sock)
    assert [s.hashval for s in newest] == [second]
    assert await in_thread(api.restore, "v1", only=["data"], socket=sock) == 1
    assert (served.data / "file-00.txt").read_text() == DATA_FILES["file-00.txt"]
    deleted = await in_thread(api.delete_snapshot, "v1", socket=sock)
    assert deleted.hashval == first and deleted.kind == "manual"


async def test_api_resource_info(served: Served) -> None:
    [info] = await in_thread(api.get_resource_info, socket=served.socket)
    assert info == api.ResourceInfo("data", "source-data", "local-files",
                                    str(served.data))


async def test_api_errors_carry_the_daemon_code(served: Served) -> None:
    await in_thread(api.take_snapshot, "v1", socket=served.socket)
    with pytest.raises(api.RemoteError) as info:
        await in_thread(api.restore, "v1", only=["data"], leave=["data"],
                        socket=served.socket)
    assert info.value.code == "usage" and "--only and --leave" in str(info.value)
