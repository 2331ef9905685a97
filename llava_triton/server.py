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
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

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


def server_env(install: TritonInstall, project_root: Path | str = PROJECT_ROOT,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver: the project and this interpreter's path on PYTHONPATH,
    ours first on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    # The order a normal interpreter uses: the project, then PYTHONPATH, then site-packages.
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = _prepend([str(Path(project_root).resolve()), *existing, *_site_packages()], None)
    if install.ld_library_path:
        env["LD_LIBRARY_PATH"] = _prepend(install.ld_library_path, env.get("LD_LIBRARY_PATH"))
    return env


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


@dataclass(eq=False)
class TritonServer:
    """A tritonserver process. As a context manager it starts, waits until ready and stops.

    Ports left as None are picked free. Without `log_path` the log goes to a temporary file
    that `stop()` removes.
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
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _own_log: bool = field(default=False, init=False, repr=False)

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

    def command(self) -> list[str]:
        return [str(self.install.server),
                *deploy.server_args(self.model_repository, self.install.backend_directory, self.http_port,
                                    self.grpc_port, self.metrics_port, self.exit_timeout_s),
                *self.extra_args]

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("server already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path = Path(self.log_path)
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C in the caller's terminal reaches us, not the server, and the
            # SIGKILL fallback can take the backend stubs down with it.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_env(self.install, self.project_root),
                                            start_new_session=True)
        atexit.register(self.stop)
        return self

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not Path(self.log_path).is_file():
            return ""
        with open(self.log_path, errors="replace") as log:
            return "".join(collections.deque(log, maxlen=lines))

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url_http}{deploy.READY_PATH}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the readiness endpoint; raise TritonServerError with the log tail on failure."""
        if self.process is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + (self.ready_timeout_s if timeout is None else timeout)
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready; "
                                        f"last log lines ({self.log_path}):\n{self.log_tail()}")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver not ready after {timeout or self.ready_timeout_s:.0f} s; "
                                        f"last log lines ({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group. Returns the exit code."""
        atexit.unregister(self.stop)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_triton.server", description=__doc__.split("\n")[0],
                                     epilog="Arguments after `--` go to tritonserver unchanged.")
    parser.add_argument("--model-repository", type=Path, help="the model repository to serve")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--check", action="store_true", help="verify the installation and exit")
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    if args.check:
        return 0 if check() else 1
    if args.model_repository is None:
        parser.error("--model-repository is required (or --check)")
    try:
        server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, extra_args=tuple(extra))
    except (TritonNotFoundError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    command = server.command()
    print(f"serving {server.model_repository}: gRPC {server.url_grpc}, HTTP {server.url_http}, "
          f"metrics {server.url_metrics}", file=sys.stderr, flush=True)
    # exec: the server takes over this process, so Ctrl-C and SIGTERM reach it directly.
    os.execve(command[0], command, server_env(server.install, server.project_root))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
