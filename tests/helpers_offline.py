"""Running a command under a network guard: any connection to a non-local address and any DNS
lookup is recorded (and refused), at two levels:

- Python: a ``sitecustomize`` put first on ``PYTHONPATH`` wraps ``socket.socket.connect``,
  ``socket.getaddrinfo`` and ``socket.create_connection`` in every interpreter the command starts;
- the kernel: where ``strace`` is installed, the command runs under ``strace -f`` tracing
  ``connect``/``sendto``/``sendmsg``, which also sees what C and C++ libraries do (onnxruntime's
  telemetry, absl): a non-loopback address or port 53 (DNS) is a violation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = r'''
import os, socket

_LOG = os.environ.get("KERAS_CSPINE_NET_LOG")
_LOCAL = ("localhost", "127.0.0.1", "::1", "", "0.0.0.0")


def _local(host):
    host = str(host)
    return host in _LOCAL or host.startswith("127.")


def _refuse(kind, what):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {kind} {what}\n")
    raise OSError(f"network access refused by the test guard: {kind} {what}")


_connect = socket.socket.connect
_getaddrinfo = socket.getaddrinfo
_create_connection = socket.create_connection


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse("connect", address)
    return _connect(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _local(host if not isinstance(host, bytes) else host.decode()):
        _refuse("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


def create_connection(address, *args, **kwargs):
    if not _local(address[0]):
        _refuse("create_connection", address)
    return _create_connection(address, *args, **kwargs)


socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
socket.create_connection = create_connection
'''

_CALL = re.compile(r"\b(connect|sendto|sendmsg)\(\d+, .*sa_family=AF_INET6?")
_PORT = re.compile(r"sin6?_port=htons\((\d+)\)")
_ADDR = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def strace_available() -> bool:
    return shutil.which("strace") is not None


def run_guarded(*args: str, workdir: Path, timeout: float = 900, env: dict | None = None):
    """Run ``python -m keras_cspine ARGS`` under the guard; returns ``(result, violations)``."""
    guard = workdir / "net_guard"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = guard / "python.log"
    trace = guard / "strace.log"
    for path in (log, trace):
        path.unlink(missing_ok=True)
    full_env = {**os.environ, **(env or {}), "KERAS_CSPINE_NET_LOG": str(log),
                "PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "keras_cspine", *args]
    if strace_available():
        command = ["strace", "-f", "-qq", "-e", "signal=none", "-e", "trace=connect,sendto,sendmsg", "-o",
                   str(trace), *command]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=full_env, cwd=REPO)  # fmt: skip
    violations = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    if trace.is_file():
        for line in trace.read_text(encoding="utf-8", errors="replace").splitlines():
            port, addr = _PORT.search(line), _ADDR.search(line)
            if not _CALL.search(line) or not port or not addr:
                continue
            address = addr.group(1) or addr.group(2)
            loopback = address.startswith("127.") or address in ("::1", "0.0.0.0")
            if int(port.group(1)) == 53 or not loopback:
                violations.append(f"kernel: {line.strip()}")
    return result, violations
