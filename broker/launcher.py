"""Run a real Mosquitto from the repo's ``mosquitto.conf`` (tests, local development).

The broker gets its own folder holding the rendered config, ACL, password file, TLS
material, persistence and its log. Ports default to free ones so parallel tests never
collide.

Ownership when running as root: Mosquitto drops privileges to the config's ``user``
(``mosquitto``) right after opening its listeners, and then still needs to read the ACL and
password files (on start and on every SIGHUP) and to write its persistence file. So the
launcher chowns the whole folder to that account and checks that every parent directory is
traversable by it, failing with a clear message instead of a broker that starts and then
cannot save. The log is opened by us and handed over as stderr, so it needs no chown.

Membership changes reach a running broker without a restart: :func:`update_files` rewrites
the ACL, password file and CRL in its folder, and :func:`reload_running` sends SIGHUP to
the Mosquitto whose pid the launcher recorded there (``mosquitto.pid``), which re-reads all
three and keeps every connection.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from broker.config import BrokerPorts, default_template, render_config
from broker.pki import write_private, write_public

__all__ = [
    "BrokerError",
    "BrokerMaterial",
    "MosquittoBroker",
    "free_port",
    "free_ports",
    "reload_running",
    "running_pid",
    "update_files",
    "which_mosquitto",
]

_READY_TIMEOUT = 10.0
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_PORTS_FROM = 10000
_MIN_SPAN = 1000
_STOP_TIMEOUT = 5.0
_LOG_TAIL_LINES = 40
PID_FILE = "mosquitto.pid"
CONF_FILE = "mosquitto.conf"


class BrokerError(RuntimeError):
    """Mosquitto is missing, would not start, or died; the message carries its log tail."""


@dataclass(frozen=True, kw_only=True)
class BrokerMaterial:
    """Everything a broker needs besides its config: TLS material, ACL, password file."""

    ca_cert: bytes
    server_key: bytes
    server_cert: bytes
    acl: str
    passwords: str
    crl: bytes
    """PEM CRL of the CA: revoked device certificates (may list none)."""


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; a default elsewhere)."""
    try:
        low, high = Path(_EPHEMERAL_RANGE_FILE).read_text(encoding="ascii").split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago.

    They are drawn below the kernel's ephemeral range: a port from that range, free when
    chosen, can be taken by any process's outgoing connection before the listener binds
    it (or while a test has its broker stopped), which failed runs with "Address already
    in use". Random draws keep parallel test workers apart; each is checked by binding it.
    """
    low = _PORTS_FROM
    high = _ephemeral_range()[0]
    if high - low < _MIN_SPAN:
        low, high = 0, 0  # no room below the range: let the kernel pick
    draw = random.SystemRandom()
    # Hold all sockets open until every port is chosen so none is handed out twice.
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            port = draw.randrange(low, high) if high else 0
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    return free_ports(1)[0]


def which_mosquitto() -> str:
    """Locate the ``mosquitto`` executable (PATH, then /usr/sbin, where Debian puts it).

    Raises:
        BrokerError: Mosquitto is not installed.
    """
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        msg = "mosquitto not found on PATH or in /usr/sbin; install it: apt-get install mosquitto"
        raise BrokerError(msg)
    return found


def _can_traverse(path: Path, uid: int, gid: int) -> bool:
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def running_pid(folder: Path) -> int | None:
    """The pid of the Mosquitto serving ``folder`` (recorded by :class:`MosquittoBroker`),
    or None when none runs there. A recorded pid is trusted only while that process is a
    Mosquitto started on this folder's config, so a reused pid is never signalled."""
    folder = folder.resolve()
    try:
        pid = int((folder / PID_FILE).read_text(encoding="ascii").strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if str(folder / CONF_FILE).encode() not in cmdline:
        return None
    return pid


def _folder_owner(folder: Path) -> tuple[int, int] | None:
    """uid/gid to give a rewritten file: the folder's owner, when we may chown (root)."""
    if os.geteuid() != 0:
        return None
    st = folder.stat()
    return st.st_uid, st.st_gid


def update_files(
    folder: Path, *, acl: str | None = None, passwords: str | None = None, crl: bytes | None = None
) -> None:
    """Atomically replace the ACL, password file and/or CRL of the broker in ``folder``,
    owned like the folder (Mosquitto re-reads them as the account it dropped to).

    Raises:
        OSError: the folder is missing or not writable.
    """
    owner = _folder_owner(folder)
    for name, data, write in (
        ("acl", None if acl is None else acl.encode(), write_private),
        ("passwords", None if passwords is None else passwords.encode(), write_private),
        ("crl.pem", crl, write_public),
    ):
        if data is None:
            continue
        path = folder / name
        write(path, data)
        if owner is not None:
            os.chown(path, *owner)


def reload_running(folder: Path) -> bool:
    """SIGHUP the Mosquitto serving ``folder``: it re-reads the ACL, password file and CRL,
    keeping every connection. Returns False when no broker runs there. The reload happens
    moments later, in Mosquitto's own loop."""
    pid = running_pid(folder)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


class MosquittoBroker:
    """A Mosquitto process serving the devices, services and websockets listeners.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``run_as`` is the
    account Mosquitto drops to when started as root (default: ``mosquitto``, as in the
    production config); it is ignored when not root, since then no drop happens.
    """

    def __init__(
        self,
        *,
        folder: Path,
        material: BrokerMaterial,
        ports: BrokerPorts | None = None,
        host: str = "127.0.0.1",
        executable: str | None = None,
        run_as: str | None = None,
        template: str | None = None,
    ) -> None:
        self._folder = folder.resolve()
        self._material = material
        if ports is None:
            devices, services, websockets = free_ports(3)
            ports = BrokerPorts(devices=devices, services=services, websockets=websockets)
        self._ports = ports
        self._host = host
        self._executable = executable
        self._run_as = run_as
        self._template = template
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- properties -----------------------------------------------------------------

    @property
    def ports(self) -> BrokerPorts:
        """The listener ports (stable across a stop and a start)."""
        return self._ports

    @property
    def host(self) -> str:
        """The address every listener binds and clients connect to."""
        return self._host

    @property
    def folder(self) -> Path:
        """The broker's folder (config, ACL, passwords, TLS files, data, log)."""
        return self._folder

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients verify the broker with."""
        return self._folder / "ca.crt"

    @property
    def log_file(self) -> Path:
        """Mosquitto's stderr (appended to across restarts)."""
        return self._folder / "mosquitto.log"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything Mosquitto logged so far."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self) -> str:
        return "\n".join(self.log_text().splitlines()[-_LOG_TAIL_LINES:])

    # -- files ------------------------------------------------------------------------

    def _account(self) -> tuple[int, int] | None:
        """uid/gid Mosquitto will run as, or None when it keeps our identity."""
        if os.geteuid() != 0:
            return None
        name = self._run_as or "mosquitto"
        try:
            entry = pwd.getpwnam(name)
        except KeyError as exc:
            msg = f"user {name!r} does not exist; pass run_as= an existing account"
            raise BrokerError(msg) from exc
        return entry.pw_uid, entry.pw_gid

    def _write_files(self) -> None:
        folder = self._folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        account = self._account()
        run_as = None
        if account is not None:
            run_as = self._run_as or "mosquitto"
        template = self._template if self._template is not None else default_template()
        conf = render_config(
            template, folder=folder, ports=self._ports, run_as=run_as, bind_address=self._host
        )
        m = self._material
        write_public(folder / CONF_FILE, conf.encode())
        write_public(folder / "ca.crt", m.ca_cert)
        write_public(folder / "server.crt", m.server_cert)
        write_private(folder / "server.key", m.server_key)
        write_private(folder / "acl", m.acl.encode())
        write_private(folder / "passwords", m.passwords.encode())
        write_public(folder / "crl.pem", m.crl)
        if account is not None:
            self._chown(account)

    def _chown(self, account: tuple[int, int]) -> None:
        uid, gid = account
        if uid == 0:
            return
        for parent in reversed(self._folder.parents):
            if not _can_traverse(parent, uid, gid):
                msg = (
                    f"{parent} is not traversable by uid {uid}, so mosquitto cannot reach"
                    f" {self._folder} after dropping privileges; use a folder under a"
                    " world-traversable directory (e.g. tempfile.mkdtemp() + chmod 0o755)"
                    " or pass run_as='root'"
                )
                raise BrokerError(msg)
        for path in [self._folder, *self._folder.rglob("*")]:
            os.chown(path, uid, gid, follow_symlinks=False)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Self:
        """Write the broker's files, start Mosquitto and wait until every listener accepts.

        Raises:
            BrokerError: Mosquitto is missing, exited, or did not open its listeners in time.
        """
        if self.running:
            msg = "broker already running"
            raise BrokerError(msg)
        executable = self._executable or which_mosquitto()
        self._write_files()
        self._spawn(executable)
        try:
            self._wait_ready()
        except BaseException:
            self._terminate(_STOP_TIMEOUT)
            raise
        return self

    def _spawn(self, executable: str) -> None:
        self._log = self.log_file.open("ab")
        self._proc = subprocess.Popen(
            [executable, "-c", str(self._folder / CONF_FILE)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            # Own process group: a Ctrl-C on the test run must not race our own shutdown.
            start_new_session=True,
        )
        # Ours, not Mosquitto's pid_file: that one is written before privileges drop and
        # left behind on SIGKILL; running_pid() checks this one against the live process.
        write_public(self._folder / PID_FILE, f"{self._proc.pid}\n".encode())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        pending = list(self._ports.as_tuple())
        while pending:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                msg = f"mosquitto exited with {code} while starting:\n{self._log_tail()}"
                raise BrokerError(msg)
            port = pending[0]
            try:
                with socket.create_connection((self._host, port), timeout=0.5):
                    pending.pop(0)
                    continue
            except OSError:
                if time.monotonic() > deadline:
                    msg = f"mosquitto did not listen on {port} in time:\n{self._log_tail()}"
                    raise BrokerError(msg) from None
            # Startup takes a few ms; polling the port is the only readiness signal it gives.
            time.sleep(0.02)

    def _terminate(self, timeout: float) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._proc = None
        (self._folder / PID_FILE).unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """SIGTERM (Mosquitto then saves its persistence file) and wait; SIGKILL after timeout."""
        self._terminate(timeout)

    def kill(self) -> None:
        """SIGKILL: no final save, for durability tests."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._terminate(0)

    def reload(
        self, *, acl: str | None = None, passwords: str | None = None, crl: bytes | None = None
    ) -> None:
        """Replace the ACL, password file and/or CRL and make Mosquitto re-read them (SIGHUP).

        Raises:
            BrokerError: the broker is not running.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            msg = "broker not running"
            raise BrokerError(msg)
        update_files(self._folder, acl=acl, passwords=passwords, crl=crl)
        # A later start() rewrites every file from the material: keep what was reloaded.
        material = self._material
        self._material = replace(
            material,
            acl=material.acl if acl is None else acl,
            passwords=material.passwords if passwords is None else passwords,
            crl=material.crl if crl is None else crl,
        )
        proc.send_signal(signal.SIGHUP)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort so a forgotten broker does not outlive the test run.
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
