"""Run `tritonserver`: launch it on free ports, wait until ready, supervise its backend stubs, stop it.

Also the command line that runs it in the foreground (the Makefile, the image and the Helm chart use it),
with the OpenAI-compatible frontend beside it on --openai-port (9000; 0: none), supervised the same way:

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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llava_triton import deploy
from llava_triton.frontend_process import FrontendProcess, add_frontend_arguments, config_from_args
from llava_triton.install_check import check
from llava_triton.processes import backend_stub_states, backend_stubs
from llava_triton.triton_install import PROJECT_ROOT, TritonInstall, TritonNotFoundError, find_triton, server_env

DEFAULT_HTTP_PORT = deploy.HTTP_PORT
DEFAULT_GRPC_PORT = deploy.GRPC_PORT
DEFAULT_METRICS_PORT = deploy.METRICS_PORT


class TritonServerError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log tail."""


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

    def start(self) -> TritonServer:
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
        alive, exited = backend_stub_states(process.pid)
        dead = {pid: name for pid, name in self._stubs.items() if pid not in alive}  # gone, even if reaped
        dead |= {pid: self._names.get(pid, "a model") for pid in exited}
        self._stubs.update(alive)
        self._names.update(alive)  # a stub Triton starts again later (non-decoupled models) is watched too
        if dead:
            stubs = ", ".join(f"{name} (pid {pid})" for pid, name in sorted(dead.items()))
            return f"the Python-backend stub of {stubs} exited"
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

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- command line ------------------------------------------------------------------------------

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
    frontend = parser.add_argument_group("OpenAI-compatible frontend", "llava_triton.openai_frontend, started "
                                         "beside tritonserver and supervised like it (docs/openai.md)")
    frontend.add_argument("--openai-port", type=int, default=deploy.OPENAI_PORT,
                          help="its port (default %(default)s); 0: no frontend")
    frontend.add_argument("--openai-host", default="0.0.0.0", help="the address it listens on (default %(default)s)")
    add_frontend_arguments(frontend)
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


def frontend_from_command_line(args: argparse.Namespace, server: TritonServer) -> FrontendProcess | None:
    """The OpenAI frontend a command line describes, forwarding to `server`; None with --openai-port 0."""
    if not args.openai_port:
        return None
    return FrontendProcess(server.url_grpc, port=args.openai_port, host=args.openai_host,
                           model_repository=server.model_repository, config=config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_command_line(sys.argv[1:] if argv is None else argv)
    if args.check:
        return 0 if check() else 1
    if args.model_repository is None:
        _parser().error("--model-repository is required (or --check)")
    try:
        server = server_from_command_line(args, extra)
        frontend = frontend_from_command_line(args, server)
    except (TritonNotFoundError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    openai = f", OpenAI API {frontend.url}" if frontend else ""
    print(f"serving {server.model_repository}: gRPC {server.url_grpc}, HTTP {server.url_http}, "
          f"metrics {server.url_metrics}{openai}", file=sys.stderr, flush=True)
    if args.on_backend_exit == "ignore":
        if frontend is not None:
            print("note: --on-backend-exit ignore execs tritonserver: no OpenAI frontend (--openai-port 0 "
                  "silences this)", file=sys.stderr, flush=True)
        # exec: the server takes over this process, so Ctrl-C and SIGTERM reach it directly.
        command = server.command()
        os.execve(command[0], command, server_env(server.install, server.project_root))
    return _serve_supervised(server, restart=args.on_backend_exit == "restart", frontend=frontend)


def _serve_supervised(server: TritonServer, *, restart: bool, frontend: FrontendProcess | None = None) -> int:
    """Run the server (and the OpenAI frontend) in the foreground; SIGTERM/SIGINT stop them gracefully
    (exit timeout applies).

    The server's log goes to stderr (followed from its file), like an unsupervised tritonserver, and
    so does the frontend's output. A frontend that exits is started again with `restart` (its restarts
    are noted in the log), else the launcher exits as for a dead backend. Exit code: tritonserver's on
    a requested stop; 1 when it could not start, or, without `restart`, when a backend stub, the server
    or the frontend died.
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
            if frontend is not None:  # live at once, ready once the server is; supervised from here on
                frontend.start()
            server.wait_ready()
        except TritonServerError as error:
            print(f"error: {str(error).splitlines()[0]}", file=sys.stderr, flush=True)
            return 1
        died = None
        backoff, last_restart = 1.0, -math.inf  # a frontend that keeps dying is started less and less often
        while not stop.wait(server.supervise_interval_s):
            if not restart and (died := server.what_died()):
                break
            if frontend is not None and (code := frontend.exit_code()) is not None:
                cause = f"the OpenAI frontend exited with code {code}"
                if not restart:
                    died = cause
                    break
                backoff = min(2 * backoff, 30.0) if time.monotonic() - last_restart < 30 else 1.0
                server._note(f"{cause}; starting it again in {backoff:.0f} s (restart {frontend.restarts + 1})")
                if stop.wait(backoff):
                    break
                frontend.restart()
                last_restart = time.monotonic()
        if frontend is not None:
            frontend.stop()
        code = server.stop()
        if died:
            print(f"error: {died}; exiting so that the orchestrator restarts the server", file=sys.stderr,
                  flush=True)
            return 1
        return code or 0
    finally:
        if frontend is not None:
            frontend.stop()
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
