"""The units pass `systemd-analyze verify` (with ExecStart pointed at this checkout's dwsd,
since verify checks that the program exists), and their sandboxing leaves the view
mountable and visible:

- the user unit has no setting that sets no_new_privs (under it a user's setuid
  fusermount3 cannot mount: shown for real below) and none that needs a namespace;
- the system unit has no setting that gives it a mount namespace (systemd makes that
  namespace a slave of the host, which hides the view: shown for real below), and root
  mounts the view under the unit's NoNewPrivileges= and CapabilityBoundingSet=.

systemd itself is not needed (the sandbox is reproduced with setpriv and unshare), so
these run in containers whose PID 1 is not systemd."""
from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests import trees
from tests.fusehelp import (
    REPO,
    START_TIMEOUT,
    STOP_TIMEOUT,
    is_mounted,
    require_fuse,
    take_snapshot,
    unmount,
)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
DWSD = Path(sys.executable).parent / "dwsd"
NOBODY = 65534

# Settings that give the unit's processes their own mount namespace (systemd's
# exec_needs_mount_namespace(), systemd.exec(5) "PrivateMounts="). systemd remounts
# everything in it MS_SLAVE first, so a mount made inside never reaches the host, and
# MountFlags=shared does not undo that.
MOUNT_NAMESPACE = {
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork", "PrivateIPC",
    "NetworkNamespacePath", "IPCNamespacePath", "ProtectSystem", "ProtectHome",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "BindPaths", "BindReadOnlyPaths",
    "TemporaryFileSystem", "RootDirectory", "RootImage", "MountImages", "ExtensionImages",
    "ExtensionDirectories", "LogNamespace", "MountAPIVFS", "DynamicUser",
    # a user namespace: root in it cannot mount on the host, setuid binaries lose root
    "PrivateUsers",
}
# Settings that set no_new_privs in a user manager (systemd.exec(5), NoNewPrivileges=:
# seccomp-based settings imply it without CAP_SYS_ADMIN, which user services never have).
NO_NEW_PRIVS = {
    "NoNewPrivileges", "LockPersonality", "MemoryDenyWriteExecute", "RestrictAddressFamilies",
    "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "SystemCallArchitectures",
    "SystemCallFilter", "SystemCallLog", "ProtectClock", "ProtectHostname",
    "ProtectKernelLogs", "ProtectKernelModules", "ProtectKernelTunables", "PrivateDevices",
    "DynamicUser",
    # caps what fusermount3 may gain from its setuid bit
    "CapabilityBoundingSet",
}
NO = {"no", "false", "off", "0", ""}


def service_settings(unit: str) -> dict[str, str]:
    """The [Service] section's settings (the last assignment of each key wins)."""
    settings: dict[str, str] = {}
    section = None
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def verify(tmp_path: Path, unit: str, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / unit
    path.write_text(text.replace("%h/.local/bin/dwsd", str(DWSD))
                    .replace("/usr/local/bin/dwsd", str(DWSD)))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (util-linux / fuse3)")


def need_root() -> None:
    """The system unit runs as root; reproducing its sandbox needs root too."""
    if os.geteuid() == 0:
        return
    if os.environ.get("DWSD_REQUIRE_FUSE") == "1":
        pytest.fail("DWSD_REQUIRE_FUSE=1 but this test reproduces a root unit and runs "
                    f"as uid {os.geteuid()}")
    pytest.skip(f"reproduces the root system unit: needs root, runs as uid {os.geteuid()}")


@pytest.mark.parametrize("source,unit", [("dwsd.service", "dwsd.service"),
                                         ("dwsd@.service", "dwsd@demo.service")])
def test_units_verify(tmp_path: Path, source: str, unit: str) -> None:
    assert shutil.which("systemd-analyze"), "make test installs systemd (systemd-analyze)"
    proc = verify(tmp_path, unit, (UNITS / source).read_text())
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # The oracle itself must be able to fail.
    assert shutil.which("systemd-analyze"), "make test installs systemd (systemd-analyze)"
    broken = (UNITS / "dwsd.service").read_text().replace("Type=notify", "Type=bogus")
    proc = verify(tmp_path, "dwsd.service", broken)
    assert "bogus" in proc.stderr


def test_user_unit_keeps_fusermount3_working() -> None:
    settings = service_settings("dwsd.service")
    bad = sorted(k for k, v in settings.items()
                 if k in NO_NEW_PRIVS | MOUNT_NAMESPACE and v.lower() not in NO)
    assert not bad, f"dwsd.service sets {bad}: no_new_privs or a namespace stops the " \
                    "setuid fusermount3 that mounts a user's view"


def test_system_unit_mounts_in_the_hosts_namespace() -> None:
    settings = service_settings("dwsd@.service")
    bad = sorted(k for k, v in settings.items()
                 if k in MOUNT_NAMESPACE and v.lower() not in NO)
    assert not bad, f"dwsd@.service sets {bad}: its mount namespace would hide the view"
    assert settings.get("MountFlags", "shared") == "shared"
    # Root mounts with mount(2) itself: CAP_SYS_ADMIN must stay in the bounding set.
    assert "CAP_SYS_ADMIN" in settings["CapabilityBoundingSet"].split()


# --- what no_new_privs does to a user's fusermount3 ---------------------------------------

# Run as root: in a private mount namespace, a /dev/fuse as distributions ship it (0666, so
# any user may open it; mount(2) is what needs privilege), then fusermount3 as nobody.
AS_NOBODY = r"""
set -eu
scratch=$1; shift
mount -t tmpfs -o mode=0755 dwsd-test "$scratch"
mknod -m 0666 "$scratch/fuse" c "$FUSE_MAJOR" "$FUSE_MINOR"
mount --bind "$scratch/fuse" /dev/fuse
mkdir "$scratch/view"
chown 65534:65534 "$scratch/view"
rc=0
setpriv --reuid=65534 --regid=65534 --clear-groups "$@" \
    fusermount3 -o ro,nosuid,nodev,fsname=dwsd-test -- "$scratch/view" || rc=$?
if grep -q " $scratch/view " /proc/self/mountinfo; then echo mounted; fi
exit $rc
"""
# Run as a non-root user: fusermount3 directly, then unmount what it mounted.
AS_SELF = r"""
set -eu
scratch=$1; shift
rc=0
"$@" fusermount3 -o ro,nosuid,nodev,fsname=dwsd-test -- "$scratch" || rc=$?
if grep -q " $scratch " /proc/self/mountinfo; then echo mounted; fusermount3 -u "$scratch"; fi
exit $rc
"""


def fusermount3_as_a_user(no_new_privs: bool) -> subprocess.CompletedProcess[str]:
    """Ask the setuid fusermount3 for a mount as a non-root user, the way libfuse does for a
    non-root dwsd (a socket in _FUSE_COMMFD gets the /dev/fuse fd back); stdout is
    "mounted" when the mount appeared. Nothing stays mounted afterwards."""
    nnp = ["setpriv", "--no-new-privs"] if no_new_privs else []
    parent, child = socket.socketpair()
    scratch = Path(tempfile.mkdtemp(prefix="dwsd-nnp-", dir="/tmp"))
    try:
        if os.geteuid() == 0:
            rdev = os.stat("/dev/fuse").st_rdev
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", AS_NOBODY,
                    "sh", str(scratch), *nnp[1:]]
            env = {"FUSE_MAJOR": str(os.major(rdev)), "FUSE_MINOR": str(os.minor(rdev))}
        else:
            argv = ["sh", "-c", AS_SELF, "sh", str(scratch), *nnp]
            env = {}
        return subprocess.run(
            argv, pass_fds=[child.fileno()], capture_output=True, text=True, cwd="/",
            timeout=30, check=False,
            env={**os.environ, **env, "_FUSE_COMMFD": str(child.fileno())})
    finally:
        child.close()
        parent.close()  # drops the /dev/fuse fd in flight, if any
        if os.geteuid() != 0:
            unmount(scratch)
        scratch.rmdir()


@pytest.mark.parametrize("no_new_privs", [False, True], ids=["plain", "no_new_privs"])
def test_no_new_privs_stops_a_users_fusermount3(no_new_privs: bool) -> None:
    """Why the user unit sets no NoNewPrivileges= (nor anything implying it)."""
    require_fuse()
    need_tools("setpriv", "unshare", "mount", "mknod", "grep")
    mode = os.stat(shutil.which("fusermount3") or "fusermount3").st_mode
    if not mode & stat.S_ISUID:
        if os.environ.get("DWSD_REQUIRE_FUSE") == "1":
            pytest.fail("DWSD_REQUIRE_FUSE=1 but fusermount3 is not setuid root")
        pytest.skip("fusermount3 is not setuid root (users cannot mount FUSE here)")
    proc = fusermount3_as_a_user(no_new_privs)
    if no_new_privs:
        assert proc.returncode != 0 and proc.stdout == "", proc
        assert "Operation not permitted" in proc.stderr, proc
    else:
        assert proc.returncode == 0 and proc.stdout == "mounted\n", proc


# --- the system unit's sandbox, reproduced around `dwsd mount` -----------------------------

def setpriv_args(settings: dict[str, str]) -> list[str]:
    """setpriv options for the unit's NoNewPrivileges= and CapabilityBoundingSet=."""
    args = ["setpriv"]
    if settings.get("NoNewPrivileges", "no").lower() not in NO:
        args.append("--no-new-privs")
    caps = settings["CapabilityBoundingSet"].split()
    assert not any(c.startswith("~") for c in caps), "a deny list: update this test"
    args.append("--bounding-set=-all," + ",".join(
        "+" + c.lower().removeprefix("cap_") for c in caps))
    return args


@pytest.fixture
def store(tmp_path: Path) -> Path:
    require_fuse()
    need_root()
    source = tmp_path / "src"
    trees.write(source / "hello.txt", b"hello\n")
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    return tmp_path / "store"


@contextlib.contextmanager
def view_server(prefix: Sequence[str], store: Path, mountpoint: Path
                ) -> Iterator[subprocess.Popen[bytes]]:
    """`dwsd mount` run through `prefix`, once it printed its readiness line; SIGTERM and a
    clean exit at the end."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "dwsd.cli.dwsd", "mount", "--store", str(store),
         "--mount", str(mountpoint)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(START_TIMEOUT)
        line = proc.stdout.readline() if ready else b"<timeout>"
        assert line.startswith(b"mounted "), \
            f"no readiness line: {line!r}, exit {proc.poll()}"
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()
        unmount(mountpoint)


def mounted_in(pid: int, mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open(f"/proc/{pid}/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def test_root_mounts_a_visible_view_under_the_system_units_privileges(
        tmp_path: Path, store: Path) -> None:
    """NoNewPrivileges= and the bounding set are safe for root: libfuse mounts with
    mount(2) itself, no setuid helper involved."""
    need_tools("setpriv")
    prefix = setpriv_args(service_settings("dwsd@.service"))
    view = tmp_path / "view"
    with view_server(prefix, store, view):
        assert is_mounted(view), "the view is not visible in the host's namespace"
        assert (view / "v1" / "data" / "hello.txt").read_bytes() == b"hello\n"
    assert not is_mounted(view)


def test_a_namespace_as_systemd_sets_it_up_hides_the_view(
        tmp_path: Path, store: Path) -> None:
    """Why the system unit has no PrivateTmp=/ProtectSystem=/...: for those systemd makes a
    mount namespace, remounts it all slave, then applies MountFlags= (shared). The view
    mounted inside is served but never reaches the host."""
    need_tools("unshare", "mount")
    prefix = ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
              'mount --make-rshared / && exec "$@"', "sh"]
    view = tmp_path / "view"
    with view_server(prefix, store, view) as proc:
        assert mounted_in(proc.pid, view), "not mounted even inside its namespace"
        assert not is_mounted(view), "a mount in a slave namespace reached the host"
