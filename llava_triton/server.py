"""Find, configure and run `tritonserver` (and `perf_analyzer`) for this project.

Two installations are supported:

* NVIDIA's container (or any host) with `tritonserver` on PATH; its backends live in
  `$TRITON_HOME/backends` or `/opt/tritonserver/backends`.
* The server bundled in the `nvidia-pytriton` wheel of the current environment. That wheel keeps
  one Python-backend stub per Python version; the one matching this interpreter is copied to
  `backends/python/triton_python_backend_stub`, where the Python backend looks for it.

The stub embeds libpython and ignores PYTHONPATH, but every `model.py` of this project prepends
`os.environ["PYTHONPATH"]` to `sys.path` itself, so `server_env` puts the project root and this
interpreter's site-packages there.

    python -m llava_triton.server --model-repository model_repository   # foreground
    python -m llava_triton.server --check                               # verify the install
"""

from __future__ import annotations

import argparse
import atexit
import collections
import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llava_triton import deploy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HTTP_PORT = deploy.HTTP_PORT
DEFAULT_GRPC_PORT = deploy.GRPC_PORT
DEFAULT_METRICS_PORT = deploy.METRICS_PORT
STUB_NAME = "triton_python_backend_stub"
LIBB64 = "libb64.so.0d"  # perf_analyzer's only dependency outside glibc/libstdc++ besides libcudart
LIBCUDART = "libcudart.so.12"


class TritonNotFoundError(RuntimeError):
    """No usable tritonserver installation was found."""


class TritonServerError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log tail."""


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary, its backend directory and the libraries it needs."""

    server: Path
    backend_directory: Path
    ld_library_path: tuple[str, ...] = ()  # prepended to LD_LIBRARY_PATH
    source: str = "PATH"  # "PATH" or "nvidia-pytriton"

    @property
    def python_stub(self) -> Path:
        return self.backend_directory / "python" / STUB_NAME


def _site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if p))


def _pytriton_dir() -> Path | None:
    for site in _site_packages():
        candidate = Path(site) / "pytriton" / "tritonserver"
        if (candidate / "bin" / "tritonserver").is_file():
            return candidate
    return None


def _install_stub(pytriton_dir: Path) -> Path:
    """Copy the stub built for this Python version into the Python backend's directory."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = pytriton_dir / "python_backend_stubs" / version / STUB_NAME
    target = pytriton_dir / "backends" / "python" / STUB_NAME
    if not source.is_file():
        available = sorted(p.name for p in (pytriton_dir / "python_backend_stubs").iterdir())
        raise TritonNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version} "
                                  f"(it has {', '.join(available)})")
    if target.is_file() and target.stat().st_size == source.stat().st_size \
            and target.read_bytes() == source.read_bytes():
        return target
    # Copy then rename, so two processes installing at once never see a half-written stub.
    tmp = target.with_name(f".{STUB_NAME}.{os.getpid()}")
    shutil.copy2(source, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


def find_triton() -> TritonInstall:
    """The tritonserver on PATH if there is one, else the one in the nvidia-pytriton wheel."""
    on_path = shutil.which("tritonserver")
    if on_path:
        server = Path(on_path).resolve()
        candidates = [Path(os.environ["TRITON_HOME"]) / "backends"] if os.environ.get("TRITON_HOME") else []
        candidates += [Path("/opt/tritonserver/backends"), server.parent.parent / "backends"]
        for backends in candidates:
            if backends.is_dir():
                return TritonInstall(server=server, backend_directory=backends, source="PATH")
        raise TritonNotFoundError(f"found {server} but no backend directory (looked in "
                                  f"{', '.join(map(str, candidates))}); set TRITON_HOME")
    pytriton_dir = _pytriton_dir()
    if pytriton_dir is None:
        raise TritonNotFoundError(
            "no tritonserver found: not on PATH and nvidia-pytriton is not installed in "
            f"{sys.prefix}. Use NVIDIA's tritonserver container, or run `make setup` "
            "(pip install --no-deps nvidia-pytriton==0.7.0)")
    _install_stub(pytriton_dir)
    # The stub links libpython3.X.so: this interpreter's LIBDIR has it for pyenv/conda builds.
    libdir = sysconfig.get_config_var("LIBDIR")
    return TritonInstall(server=pytriton_dir / "bin" / "tritonserver",
                         backend_directory=pytriton_dir / "backends",
                         ld_library_path=(libdir,) if libdir else (),
                         source="nvidia-pytriton")


def _prepend(entries: list[str] | tuple[str, ...], existing: str | None) -> str:
    parts = list(entries) + [p for p in (existing or "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


# glibc malloc serves blocks of at least this size with mmap, so freeing one returns it to the OS.
# Why: by default glibc raises its mmap threshold to the size of the last large block freed (up
# to 32 MiB), so tritonserver's gRPC threads then carve large request buffers out of their heap
# arenas and keep them. Measured on the 2-core CI machine (Triton 2.51, embedded default): 64
# requests carrying a 20 MiB image, each refused, grew tritonserver's RssAnon by 1,019 MiB, then
# by 1,251 and 911 MiB for the next 64s (3.2 GB, no plateau); with this threshold by 181, 175 and
# 154 MiB, given back by the next requests (about 100 MiB after each round); with 4 MiB it still
# grew to about 1 GB. A user's own MALLOC_MMAP_THRESHOLD_ wins.
MALLOC_MMAP_THRESHOLD = 1 << 20


def server_env(install: TritonInstall, project_root: Path | str = PROJECT_ROOT,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver: the project and this interpreter's path on PYTHONPATH,
    ours first on LD_LIBRARY_PATH, a fixed malloc mmap threshold (see MALLOC_MMAP_THRESHOLD)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    # The order a normal interpreter uses: the project, then PYTHONPATH, then site-packages.
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = _prepend([str(Path(project_root).resolve()), *existing, *_site_packages()], None)
    if install.ld_library_path:
        env["LD_LIBRARY_PATH"] = _prepend(install.ld_library_path, env.get("LD_LIBRARY_PATH"))
    return env


# --- processes ---------------------------------------------------------------------------------

def child_pids(pid: int) -> list[int]:
    """Direct children of a process (from /proc/<pid>/task/*/children)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return children


def cmdline(pid: int) -> list[str]:
    """A process's argv; empty once it has exited (a zombie has none)."""
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def backend_stubs(server_pid: int) -> dict[int, str]:
    """{pid: model name} of the server's live Python-backend stubs (argv: stub <repo>/<model>/<v>/model.py ...)."""
    stubs = {}
    for pid in child_pids(server_pid):
        argv = cmdline(pid)
        if argv and argv[0].endswith(STUB_NAME) and len(argv) > 1:
            stubs[pid] = Path(argv[1]).parent.parent.name
    return stubs


def exited_backend_stubs(server_pid: int) -> set[int]:
    """The server's stubs that have exited but are not reaped (zombies: Triton 2.51 never reaps a dead one).

    Why not "a pid seen earlier is gone": during start-up the Python backend runs a short-lived
    stub per model (to complete its config) and reaps it; that one is not a failure.
    """
    dead = set()
    for pid in child_pids(server_pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        if STUB_NAME.startswith(comm) and rest.split()[:1] == ["Z"]:  # comm is cut to 15 characters
            dead.add(pid)
    return dead


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


SHM_DIR = Path("/dev/shm")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when the thread that started it dies.

    Why: the server runs in its own session (a Ctrl-C in the caller's terminal must not reach it
    before we stop it gracefully), so nothing else takes it down if this process is SIGKILLed;
    without this it would keep the ports and the GPU. SIGTERM, not SIGKILL: tritonserver then
    shuts down and ends its backend stubs, which a SIGKILLed server leaves running. `prctl` is
    looked up here, before the fork, so the child only makes the one call.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass(eq=False)
class TritonServer:
    """A tritonserver process. As a context manager it starts, waits until ready and stops.

    Ports left as None are picked free. Without `log_path` the log goes to a temporary file
    that `stop()` removes. tritonserver gets SIGTERM from the kernel if the thread that started it
    ends (PR_SET_PDEATHSIG), so start it from a thread that outlives it (the main thread).

    `restart_on_backend_exit=True` supervises the server once it was ready: when one of its
    Python-backend stubs dies (killed, out of memory, a crash in native code) or tritonserver
    itself exits, the server is stopped and started again on the same ports, with backoff.
    Why: Triton 2.51 restarts a dead stub only for non-decoupled models; for the decoupled
    language model it keeps reporting ready, fails every new request and never ends the streams
    the dead stub held. Stopping it ends those streams with an error (the connections close),
    readiness is refused until the new server has loaded its models, and `restarts` counts.
    """

    model_repository: Path | str
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    log_path: Path | str | None = None
    extra_args: tuple[str, ...] | list[str] = ()
    install: TritonInstall | None = None
    project_root: Path | str = PROJECT_ROOT
    exit_timeout_s: int = deploy.EXIT_TIMEOUT_S
    ready_timeout_s: float = 120.0
    restart_on_backend_exit: bool = False
    supervise_interval_s: float = 0.5
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    restarts: int = field(default=0, init=False)
    _own_log: bool = field(default=False, init=False, repr=False)
    _launches: int = field(default=0, init=False, repr=False)
    _stubs: dict[int, str] = field(default_factory=dict, init=False, repr=False)  # watched: {pid: model}
    _names: dict[int, str] = field(default_factory=dict, init=False, repr=False)  # every stub seen: {pid: model}
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)  # no more launches
    _finished: threading.Event = field(default_factory=threading.Event, init=False, repr=False)  # server terminated
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _watchdog: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} is not a directory")
        missing = [name for name in ("http_port", "grpc_port", "metrics_port") if getattr(self, name) is None]
        for name, port in zip(missing, _free_ports(len(missing))):
            setattr(self, name, port)
        if self.install is None:
            self.install = find_triton()

    @property
    def url_http(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def url_grpc(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def url_metrics(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    @property
    def shm_prefix(self) -> str:
        """The Python backend's shared-memory region names of this launch start with this.

        Why: a stub or server that is SIGKILLed leaves its regions in /dev/shm (one per model
        instance, grown with the tensors it carried); a prefix of our own lets `stop()` remove
        exactly this server's leftovers.
        """
        return f"llava_triton_{os.getpid()}_{id(self):x}_{self._launches}_"

    def command(self) -> list[str]:
        return [str(self.install.server),
                *deploy.server_args(self.model_repository, self.install.backend_directory, self.http_port,
                                    self.grpc_port, self.metrics_port, self.exit_timeout_s),
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                *self.extra_args]

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C in the caller's terminal reaches us, not the server, and the
            # SIGKILL fallback can take the backend stubs down with it.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_env(self.install, self.project_root),
                                            start_new_session=True, preexec_fn=_die_with_parent())

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("server already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path = Path(self.log_path)
        self.log_path.write_bytes(b"")
        self._stopping.clear()
        self._finished.clear()
        self._stubs = {}
        self._launch()
        atexit.register(self.stop)
        return self

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not Path(self.log_path).is_file():
            return ""
        with open(self.log_path, errors="replace") as log:
            return "".join(collections.deque(log, maxlen=lines))

    def _note(self, message: str) -> None:
        """A line of ours in the server log (the command line copies that log to stderr)."""
        line = f"[llava-triton supervisor] {message}"
        if self.log_path is not None:
            with open(self.log_path, "a") as log:
                log.write(line + "\n")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url_http}{deploy.READY_PATH}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the readiness endpoint; raise TritonServerError with the log tail on failure.

        With `restart_on_backend_exit`, the supervision starts here, once the server is ready.
        """
        self._wait_ready(timeout)
        if self.restart_on_backend_exit and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._supervise, name="tritonserver-supervisor", daemon=True)
            self._watchdog.start()

    def _wait_ready(self, timeout: float | None = None) -> None:
        process = self.process
        if process is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + (self.ready_timeout_s if timeout is None else timeout)
        while True:
            code = process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready; "
                                        f"last log lines ({self.log_path}):\n{self.log_tail()}")
            self._names.update(backend_stubs(process.pid))  # to name one that dies before the server is ready
            if self.is_ready():
                self._stubs = backend_stubs(process.pid)  # every model is loaded: its stubs run
                self._names.update(self._stubs)
                return
            if self._stopping.is_set():
                raise TritonServerError("stopped before it was ready")
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver not ready after {timeout or self.ready_timeout_s:.0f} s; "
                                        f"last log lines ({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.2)

    def what_died(self) -> str | None:
        """Why the server is broken: tritonserver exited, or a backend stub it started is gone; else None."""
        process = self.process
        if process is None:
            return None
        code = process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        alive = backend_stubs(process.pid)
        dead = {pid: name for pid, name in self._stubs.items() if pid not in alive}  # gone, even if reaped
        dead |= {pid: self._names.get(pid, "a model") for pid in exited_backend_stubs(process.pid)}
        self._stubs.update(alive)
        self._names.update(alive)  # a stub Triton starts again later (non-decoupled models) is watched too
        if dead:
            return "the Python-backend stub of " + ", ".join(f"{name} (pid {pid})" for pid, name in sorted(dead.items())) \
                   + " exited"
        return None

    def _supervise(self) -> None:
        # This thread starts the restarted servers, and a server dies with the thread that started it
        # (PR_SET_PDEATHSIG): it runs until stop() has terminated the server (`_finished`).
        backoff = 1.0
        while not self._finished.wait(self.supervise_interval_s):
            cause = None if self._stopping.is_set() else self.what_died()
            if cause is None:
                continue
            self._note(f"{cause}; restarting tritonserver (restart {self.restarts + 1})")
            while not self._stopping.is_set():
                with self._lock:
                    if self._stopping.is_set():
                        break
                    self._terminate()
                    self.restarts += 1
                    self._launches += 1
                    self._stubs = {}
                    self._launch()
                try:
                    self._wait_ready()
                except TritonServerError as error:
                    if self._stopping.is_set():
                        break
                    self._note(f"restart failed ({str(error).splitlines()[0]}); next try in {backoff:.0f} s")
                    self._stopping.wait(backoff)
                    backoff = min(2 * backoff, 60.0)
                    continue
                self._note(f"tritonserver ready again (restart {self.restarts}, "
                           f"{len(self._stubs)} backend stubs)")
                backoff = 1.0
                break

    def _terminate(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group; remove the shared memory left behind."""
        process, code = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.exit_timeout_s + 5 if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    pass
            # Also catches backend stubs left behind by a server that died or was killed.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            code = process.wait()
            self.process = None
            for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
        return code

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop supervising, then SIGTERM, wait, SIGKILL the whole process group. Returns the exit code."""
        atexit.unregister(self.stop)
        self._stopping.set()
        with self._lock:  # a restart in progress finishes launching first, then sees _stopping
            code = self._terminate(timeout)
        self._finished.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=10)
        self._watchdog = None
        if self._own_log and self.log_path is not None:
            Path(self.log_path).unlink(missing_ok=True)
            self.log_path, self._own_log = None, False
        return code

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- perf_analyzer -----------------------------------------------------------------------------

def perf_analyzer_command() -> list[str]:
    """The perf_analyzer binary of this environment's tritonclient wheel, else the one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "perf_analyzer"]
    candidates += [Path(site) / "tritonclient" / "bin" / "perf_analyzer" for site in _site_packages()]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return [on_path]
    raise TritonNotFoundError("perf_analyzer not found: install tritonclient[all] (it ships the binary)")


def _cudart_dir() -> str | None:
    for site in _site_packages():
        lib = Path(site) / "nvidia" / "cuda_runtime" / "lib"
        if (lib / LIBCUDART).is_file():
            return str(lib)
    return None


def _unresolved_libraries(binary: str, env: dict[str, str]) -> list[str]:
    result = subprocess.run(["ldd", binary], env=env, capture_output=True, text=True, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]


def _libb64_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-triton" / "lib"


def _libb64_fallback_dir() -> str | None:
    """A directory with `libb64.so.0d` pointing at the copy bundled in nvidia-pytriton.

    perf_analyzer needs Debian's libb64-0d; when it is not installed, the identical library that
    auditwheel bundled (under a mangled name) in nvidia-pytriton.libs serves.
    """
    for site in _site_packages():
        bundled = sorted((Path(site) / "nvidia_pytriton.libs").glob("libb64-*.so.0d"))
        if bundled:
            cache = _libb64_cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            link = cache / LIBB64
            if not link.exists() or link.resolve() != bundled[0].resolve():
                tmp = cache / f".{LIBB64}.{os.getpid()}"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(bundled[0])
                os.replace(tmp, link)
            return str(cache)
    return None


def perf_analyzer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment perf_analyzer needs: libcudart.so.12 (and libb64 if missing) on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    extra = [d for d in (_cudart_dir(),) if d]
    env["LD_LIBRARY_PATH"] = _prepend(extra, env.get("LD_LIBRARY_PATH"))
    try:
        binary = perf_analyzer_command()[0]
    except TritonNotFoundError:
        return env
    if any(lib.startswith("libb64") for lib in _unresolved_libraries(binary, env)):
        fallback = _libb64_fallback_dir()
        if fallback:
            env["LD_LIBRARY_PATH"] = _prepend([fallback], env["LD_LIBRARY_PATH"])
    return env


# --- command line ------------------------------------------------------------------------------

def check() -> bool:
    """Verify the installation, print what was found; False if anything is missing."""
    ok = True

    def report(good: bool, what: str) -> None:
        nonlocal ok
        ok &= good
        print(f"[{'ok' if good else 'FAIL'}] {what}")

    try:
        install = find_triton()
    except TritonNotFoundError as error:
        report(False, str(error))
        return False
    env = server_env(install)
    report(install.server.is_file(), f"tritonserver ({install.source}): {install.server}")
    report(install.backend_directory.is_dir(), f"backend directory: {install.backend_directory}")
    backend_lib = install.backend_directory / "python" / "libtriton_python.so"
    report(backend_lib.is_file(), f"Python backend: {backend_lib}")
    report(install.python_stub.is_file(), f"Python backend stub: {install.python_stub}")
    for binary in (install.server, install.python_stub):
        if binary.is_file():
            missing = _unresolved_libraries(str(binary), env)
            report(not missing, f"shared libraries of {binary.name}: "
                                + (f"missing {', '.join(missing)}" if missing else "all resolved"))
    try:
        command = perf_analyzer_command()
    except TritonNotFoundError as error:
        report(False, str(error))
        return ok
    env = perf_analyzer_env()
    result = subprocess.run([*command, "--help"], env=env, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    # `perf_analyzer --help` prints its usage and exits non-zero; a loader error means it did not run.
    runs = "--input-data" in output and "error while loading shared libraries" not in output
    fallback = str(_libb64_cache_dir()) in env["LD_LIBRARY_PATH"].split(os.pathsep)
    note = f" (libb64 from nvidia-pytriton.libs: Debian's {LIBB64} is not installed)" if fallback else ""
    report(runs, f"perf_analyzer: {command[0]}{note}" + ("" if runs else f"\n{output.strip()[-2000:]}"))
    return ok


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_triton.server", description=__doc__.split("\n")[0],
                                     epilog="Arguments after `--` go to tritonserver unchanged.")
    parser.add_argument("--model-repository", type=Path, help="the model repository to serve")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--exit-timeout-secs", type=int, default=deploy.EXIT_TIMEOUT_S,
                        help="how long in-flight requests may finish after SIGTERM")
    parser.add_argument("--ready-timeout-s", type=float, default=0,
                        help="give up when the models are not loaded after this long; 0: wait as long as it "
                             "takes (an orchestrator's startup probe decides)")
    parser.add_argument("--on-backend-exit", choices=("restart", "exit", "ignore"), default="restart",
                        help="when a Python-backend stub or tritonserver dies after start-up: restart "
                             "tritonserver on the same ports (default), exit non-zero (let Kubernetes or "
                             "systemd restart it), or ignore (exec tritonserver unsupervised)")
    parser.add_argument("--check", action="store_true", help="verify the installation and exit")
    return parser


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options, and the tritonserver flags given after `--`."""
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    return _parser().parse_args(argv), extra


def server_from_command_line(args: argparse.Namespace, extra: list[str],
                             install: TritonInstall | None = None) -> TritonServer:
    """The TritonServer a command line describes (the Helm chart's container runs one)."""
    return TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                        metrics_port=args.metrics_port, extra_args=tuple(extra), install=install,
                        exit_timeout_s=args.exit_timeout_secs, ready_timeout_s=args.ready_timeout_s or math.inf)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_command_line(sys.argv[1:] if argv is None else argv)
    if args.check:
        return 0 if check() else 1
    if args.model_repository is None:
        _parser().error("--model-repository is required (or --check)")
    try:
        server = server_from_command_line(args, extra)
    except (TritonNotFoundError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"serving {server.model_repository}: gRPC {server.url_grpc}, HTTP {server.url_http}, "
          f"metrics {server.url_metrics}", file=sys.stderr, flush=True)
    if args.on_backend_exit == "ignore":
        # exec: the server takes over this process, so Ctrl-C and SIGTERM reach it directly.
        command = server.command()
        os.execve(command[0], command, server_env(server.install, server.project_root))
    return _serve_supervised(server, restart=args.on_backend_exit == "restart")


def _serve_supervised(server: TritonServer, *, restart: bool) -> int:
    """Run the server in the foreground; SIGTERM/SIGINT stop it gracefully (exit timeout applies).

    The server's log goes to stderr (followed from its file), like an unsupervised tritonserver.
    Exit code: tritonserver's on a requested stop; 1 when it could not start, or, without
    `restart`, when a backend stub or the server died.
    """
    server.restart_on_backend_exit = restart
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
    os.close(fd)
    server.log_path = Path(name)
    follower = threading.Thread(target=_follow, args=(server.log_path, stop), daemon=True)
    follower.start()
    try:
        server.start()
        try:
            server.wait_ready()
        except TritonServerError as error:
            print(f"error: {str(error).splitlines()[0]}", file=sys.stderr, flush=True)
            return 1
        died = None
        while not stop.wait(server.supervise_interval_s):
            if not restart and (died := server.what_died()):
                break
        code = server.stop()
        if died:
            print(f"error: {died}; exiting so that the orchestrator restarts the server", file=sys.stderr,
                  flush=True)
            return 1
        return code or 0
    finally:
        server.stop()
        stop.set()
        follower.join(timeout=2)
        Path(name).unlink(missing_ok=True)


def _follow(path: Path, stop: threading.Event) -> None:
    """Copy a growing log file to stderr until `stop` is set (then the rest)."""
    with open(path, "rb") as log:
        while True:
            chunk = log.read(65536)
            if chunk:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            elif stop.wait(0.2):
                sys.stderr.buffer.write(log.read())
                sys.stderr.buffer.flush()
                return


if __name__ == "__main__":
    sys.exit(main())
