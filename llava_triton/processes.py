"""The processes of a running tritonserver: its children, their command lines, its Python-backend stubs.

Read through psutil. A process that is gone (or that we may not read) has no children and no
command line here, rather than an exception: the server and its stubs can end at any moment.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from llava_triton.triton_install import STUB_NAME


def _children(pid: int, recursive: bool = False) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=recursive)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, zombies included; empty when it is gone."""
    return [child.pid for child in _children(pid)]


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    return [pid, *(child.pid for child in _children(pid, recursive=True))]


def cmdline(pid: int) -> list[str]:
    """A process's argv without empty arguments; empty once it has exited (a zombie has none)."""
    try:
        return [arg for arg in psutil.Process(pid).cmdline() if arg]
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        return []


def backend_stub_states(server_pid: int) -> tuple[dict[int, str], set[int]]:
    """The server's Python-backend stubs: {pid: model name} of the live ones, and the pids of those that
    have exited but are not reaped (zombies: Triton 2.51 never reaps a dead one).

    A live stub's argv is `stub <repo>/<model>/<version>/model.py ...`. A zombie has no argv, so it
    is known by its name, the kernel's, cut to 15 characters. Why not "a pid seen earlier is
    gone": during start-up the Python backend runs a short-lived stub per model (to complete its
    config) and reaps it; that one is not a failure. One look at the process table for both, since
    the supervisor asks twice a second.
    """
    live, exited = {}, set()
    for child in _children(server_pid):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                if STUB_NAME.startswith(child.name()):
                    exited.add(child.pid)
                continue
            argv = [arg for arg in child.cmdline() if arg]
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended (or reaped) meanwhile
            continue
        if argv and argv[0].endswith(STUB_NAME) and len(argv) > 1:
            live[child.pid] = Path(argv[1]).parent.parent.name
    return live, exited


def backend_stubs(server_pid: int) -> dict[int, str]:
    """{pid: model name} of the server's live Python-backend stubs."""
    return backend_stub_states(server_pid)[0]


def exited_backend_stubs(server_pid: int) -> set[int]:
    """The server's stubs that have exited but are not reaped (see backend_stub_states)."""
    return backend_stub_states(server_pid)[1]
