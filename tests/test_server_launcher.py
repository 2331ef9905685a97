"""The launcher starts a real tritonserver with the Python backend and stops it cleanly."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from llava_triton import perf_analyzer, spec, triton_install
from llava_triton import server as server_module
from llava_triton.processes import (
    backend_stub_states,
    backend_stubs,
    child_pids,
    cmdline,
    exited_backend_stubs,
    process_tree,
)
from llava_triton.server import SHM_DIR, TritonServer, TritonServerError, free_port
from llava_triton.triton_install import PROJECT_ROOT, TritonNotFoundError, find_triton, server_env

# Decoupled like the real language model: one response per count, then the FINAL flag alone.
COUNTER_CONFIG = """
name: "counter"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "INDEX" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

COUNTER_MODEL = '''
import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from llava_triton import spec


class TritonPythonModel:
    def initialize(self, args):
        {init}

    def execute(self, requests):
        info = json.dumps({{"numpy": np.__file__, "ensemble": spec.ENSEMBLE, "executable": sys.version}})
        for request in requests:
            sender = request.get_response_sender()
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            for index in range(count):
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("INDEX", np.array([index], dtype=np.int32)),
                    pb_utils.Tensor("INFO", np.array([info.encode()], dtype=np.object_))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def write_counter_repository(root: Path, init: str = "pass") -> Path:
    model_dir = root / "counter"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(COUNTER_CONFIG)
    (model_dir / "1" / "model.py").write_text(COUNTER_MODEL.format(init=init))
    return root


def stream_counter(url: str, count: int) -> list[tuple[int, dict]]:
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    count_input = grpcclient.InferInput("COUNT", [1], "INT32")
    count_input.set_data_from_numpy(np.array([count], dtype=np.int32))
    client.async_stream_infer("counter", [count_input], enable_empty_final_response=True)
    received = []
    while True:
        result, error = responses.get(timeout=30)
        assert error is None, error
        if result.as_numpy("INDEX") is not None:
            received.append((int(result.as_numpy("INDEX")[0]), json.loads(result.as_numpy("INFO")[0])))
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return received


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_env_orders_the_path_like_an_interpreter(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/lib/already")
    install = find_triton()
    env = server_env(install, PROJECT_ROOT)
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[0] == str(PROJECT_ROOT)
    # PYTHONPATH before site-packages, as in a normal interpreter (an override must win).
    site = [i for i, p in enumerate(paths) if Path(p).name == "site-packages"]
    assert site and paths[1] == "/already/there" and min(site) > 1
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[-1] == "/lib/already"
    assert install.python_stub.is_file()


def test_every_server_keeps_no_grpc_call_state_for_reuse(tmp_path):
    # A pooled gRPC call state keeps the input buffers of the largest request it served, and
    # Triton 2.51 leaks the state of some cancelled streams with them (deploy.GRPC_INFER_ALLOCATION_POOL_SIZE).
    from llava_triton import deploy

    assert "--grpc-infer-allocation-pool-size=0" in deploy.server_args("/models", "/backends")
    assert "--grpc-infer-allocation-pool-size=0" in TritonServer(tmp_path).command()


def test_find_triton_prefers_the_server_on_path(tmp_path, monkeypatch):
    bin_dir, backends = tmp_path / "bin", tmp_path / "triton_home" / "backends"
    bin_dir.mkdir()
    backends.mkdir(parents=True)
    fake = bin_dir / "tritonserver"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("TRITON_HOME", str(backends.parent))
    install = find_triton()
    assert (install.server, install.backend_directory, install.source) == (fake.resolve(), backends, "PATH")


def test_find_triton_without_any_server_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(triton_install, "site_packages", lambda: [str(tmp_path)])
    with pytest.raises(TritonNotFoundError, match="nvidia-pytriton"):
        find_triton()


def test_check_fails_without_a_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(triton_install, "site_packages", lambda: [str(tmp_path)])
    assert server_module.main(["--check"]) == 1
    assert "[FAIL]" in capsys.readouterr().out


def test_check_exits_zero():
    result = subprocess.run([sys.executable, "-m", "llava_triton.server", "--check"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert "perf_analyzer" in result.stdout


def test_missing_repository_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        TritonServer(tmp_path / "nowhere")


def _fake_stub(tmp_path: Path) -> subprocess.Popen:
    """A child of this process that looks like a Python-backend stub of model `counter`.

    The kernel names a process after the file it executed, so a link named like the stub to this
    interpreter gives it the stub's (cut) name; argv[1] is the model.py it serves, as Triton passes it.
    """
    model_py = tmp_path / "repository" / "counter" / "1" / "model.py"
    model_py.parent.mkdir(parents=True)
    model_py.write_text("import time\ntime.sleep(60)\n")
    stub = tmp_path / triton_install.STUB_NAME
    stub.symlink_to(os.path.realpath(sys.executable))
    return subprocess.Popen([str(stub), str(model_py)])


def test_backend_stubs_name_a_stubs_model_and_exited_ones_once_they_are_zombies(tmp_path):
    stub = _fake_stub(tmp_path)
    try:
        assert backend_stubs(os.getpid()).get(stub.pid) == "counter"
        assert stub.pid in child_pids(os.getpid()) and stub.pid in process_tree(os.getpid())
        assert process_tree(os.getpid())[0] == os.getpid()
        assert stub.pid not in exited_backend_stubs(os.getpid())
        os.kill(stub.pid, signal.SIGKILL)
        # Not reaped (no wait() yet): a zombie, as Triton 2.51 leaves a dead stub.
        deadline = time.monotonic() + 10
        while psutil.Process(stub.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        live, exited = backend_stub_states(os.getpid())
        assert stub.pid in exited and stub.pid not in live and stub.pid in exited_backend_stubs(os.getpid())
        assert stub.pid not in backend_stubs(os.getpid()) and cmdline(stub.pid) == []
    finally:
        stub.kill()
        stub.wait()
    assert stub.pid not in exited_backend_stubs(os.getpid())


def test_a_process_that_is_gone_has_no_children_and_no_command_line():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: its pid names nothing now
    assert child_pids(process.pid) == [] and cmdline(process.pid) == [] and backend_stubs(process.pid) == {}
    assert exited_backend_stubs(process.pid) == set() and process_tree(process.pid) == [process.pid]
    assert cmdline(os.getpid()) == [arg for arg in sys.orig_argv if arg]  # a live one's argv, as it was started


def test_perf_analyzer_env_says_when_libb64_comes_from_nvidia_pytriton(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bundled = str(tmp_path / "llava-triton" / "lib")
    assert perf_analyzer.uses_bundled_libb64({"LD_LIBRARY_PATH": os.pathsep.join(["/x", bundled])})
    assert not perf_analyzer.uses_bundled_libb64({"LD_LIBRARY_PATH": "/x"})
    assert not perf_analyzer.uses_bundled_libb64({})


def test_perf_analyzer_missing_everywhere_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(triton_install, "site_packages", lambda: [str(tmp_path)])
    monkeypatch.setattr(perf_analyzer.sysconfig, "get_path", lambda name: str(tmp_path))
    with pytest.raises(TritonNotFoundError, match="perf_analyzer not found"):
        perf_analyzer.perf_analyzer_command()
    # Without the binary the environment still gets the CUDA runtime's directory (none here).
    assert perf_analyzer.perf_analyzer_env({"LD_LIBRARY_PATH": "/lib/already"}) == {"LD_LIBRARY_PATH": "/lib/already"}


@pytest.mark.e2e
def test_server_starts_serves_and_stops(tmp_path):
    repository = write_counter_repository(tmp_path / "repository")
    server = TritonServer(repository, log_path=tmp_path / "server.log")
    with server:
        assert server.is_ready()
        pid = server.process.pid
        received = stream_counter(server.url_grpc, 3)
        assert [index for index, _ in received] == [0, 1, 2]
        info = received[0][1]
        # The stub ignores PYTHONPATH; model.py's sys.path line makes the project and the venv importable.
        assert info["ensemble"] == spec.ENSEMBLE
        assert Path(info["numpy"]).resolve().is_relative_to(Path(sys.prefix).resolve())
        assert "# HELP" in _get(server.url_metrics)
    assert server.process is None
    assert process_gone(pid)
    assert "successfully loaded 'counter'" in (tmp_path / "server.log").read_text()


@pytest.mark.e2e
def test_broken_model_raises_with_log_tail(tmp_path):
    repository = write_counter_repository(tmp_path / "repository",
                                          init='raise RuntimeError("counter is broken on purpose")')
    server = TritonServer(repository)
    server.start()
    try:
        with pytest.raises(TritonServerError, match="broken on purpose"):
            server.wait_ready(timeout=60)
    finally:
        server.stop()
    assert server.process is None


def _start_cli(repository: Path, *options: str, openai_port: int = 0) -> tuple[subprocess.Popen, int, int]:
    """The launcher's stderr goes to repository/../launcher.log (a pipe nobody reads would fill up). No
    OpenAI frontend unless a port is given (its default port may be taken on the machine)."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    with open(repository.parent / "launcher.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "llava_triton.server", "--model-repository",
                                    str(repository), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                    "--metrics-port", str(metrics_port), "--openai-port", str(openai_port),
                                    *options],
                                   cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    return process, http_port, grpc_port


def _wait_ready(process: subprocess.Popen, http_port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if _get(f"http://localhost:{http_port}/v2/health/ready") == "":
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready (exit code {process.poll()})")


def _counter_stubs(launcher_pid: int) -> set[int]:
    """The counter model's stub pids, whether the launcher is tritonserver (exec) or its parent."""
    servers = [launcher_pid, *child_pids(launcher_pid)]
    return {pid for server in servers for pid, name in backend_stubs(server).items()
            if name == "counter"}


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.e2e
def test_cli_unsupervised_execs_tritonserver_and_stops_on_sigterm(tmp_path):
    repository = write_counter_repository(tmp_path / "repository")
    process, http_port, grpc_port = _start_cli(repository, "--on-backend-exit", "ignore")
    try:
        _wait_ready(process, http_port)
        assert [index for index, _ in stream_counter(f"localhost:{grpc_port}", 2)] == [0, 1]
        # exec: the pid we started is tritonserver itself, so SIGTERM reaches it directly.
        assert Path(psutil.Process(process.pid).exe()).name == "tritonserver"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        _kill_group(process)


def _frontends(launcher_pid: int) -> list[psutil.Process]:
    """The launcher's running OpenAI frontends (a killed one is a zombie until the launcher reaps it)."""
    frontends = []
    for child in psutil.Process(launcher_pid).children():
        try:
            if "llava_triton.openai_frontend" in " ".join(child.cmdline()):
                frontends.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return frontends


def _frontend_live(port: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return _get(f"http://127.0.0.1:{port}/health/live") == '{"status":"live"}'
        except OSError:
            time.sleep(0.2)
    return False


@pytest.mark.e2e
def test_cli_restarts_tritonserver_when_a_backend_stub_dies_and_stops_on_sigterm(tmp_path):
    repository = write_counter_repository(tmp_path / "repository")
    openai_port = free_port()
    # --on-backend-exit restart is the default; it covers the OpenAI frontend too.
    process, http_port, grpc_port = _start_cli(repository, openai_port=openai_port)
    try:
        _wait_ready(process, http_port)
        # The frontend runs beside it: live (not ready: this repository has no llava ensemble). Killed, it is
        # started again.
        assert _frontend_live(openai_port)
        (frontend,) = _frontends(process.pid)
        frontend.kill()
        deadline = time.monotonic() + 30
        while not (_frontends(process.pid) and _frontend_live(openai_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        (restarted,) = _frontends(process.pid)
        assert restarted.pid != frontend.pid and _frontend_live(openai_port)
        assert f"the OpenAI frontend exited with code {-signal.SIGKILL}; starting it again" in \
            (tmp_path / "launcher.log").read_text()
        assert [index for index, _ in stream_counter(f"localhost:{grpc_port}", 2)] == [0, 1]
        stubs = _counter_stubs(process.pid)
        assert len(stubs) == 1
        os.kill(stubs.pop(), signal.SIGKILL)
        log_path = tmp_path / "launcher.log"
        deadline = time.monotonic() + 90  # the supervisor notices within its interval, stops and starts it
        while "ready again (restart 1" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        _wait_ready(process, http_port)
        assert [index for index, _ in stream_counter(f"localhost:{grpc_port}", 3)] == [0, 1, 2]
        assert len(_counter_stubs(process.pid)) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not restarted.is_running()  # stopped with the launcher
        log = log_path.read_text()
        assert log.count("the Python-backend stub of counter") == 1 and "ready again (restart 1" in log
        assert "successfully loaded 'counter'" in log  # the server's own log reaches stderr
        # Neither launch left a shared-memory region behind (the first one's stub was SIGKILLed).
        assert not list(SHM_DIR.glob(f"llava_triton_{process.pid}_*"))
    finally:
        _kill_group(process)


@pytest.mark.e2e
def test_cli_exits_non_zero_when_the_openai_frontend_dies_for_an_orchestrator_to_restart(tmp_path):
    repository = write_counter_repository(tmp_path / "repository")
    openai_port = free_port()
    process, http_port, _ = _start_cli(repository, "--on-backend-exit", "exit", openai_port=openai_port)
    try:
        _wait_ready(process, http_port)
        assert _frontend_live(openai_port)
        _frontends(process.pid)[0].kill()
        assert process.wait(timeout=60) == 1
        log = (tmp_path / "launcher.log").read_text()
        assert "error: the OpenAI frontend exited with code" in log and "orchestrator restarts" in log
    finally:
        _kill_group(process)


@pytest.mark.e2e
def test_cli_exits_non_zero_when_a_backend_stub_dies_for_an_orchestrator_to_restart(tmp_path):
    repository = write_counter_repository(tmp_path / "repository")
    process, http_port, _ = _start_cli(repository, "--on-backend-exit", "exit")
    try:
        _wait_ready(process, http_port)
        os.kill(_counter_stubs(process.pid).pop(), signal.SIGKILL)
        assert process.wait(timeout=60) == 1
        log = (tmp_path / "launcher.log").read_text()
        assert "error: the Python-backend stub of counter" in log and "orchestrator restarts" in log
        assert not list(SHM_DIR.glob(f"llava_triton_{process.pid}_*"))
    finally:
        _kill_group(process)


@pytest.mark.e2e
def test_a_killed_launcher_takes_tritonserver_with_it(tmp_path):
    # The server runs in its own session, so a SIGKILL of the launcher alone would leave it running,
    # holding the ports (and a GPU); PR_SET_PDEATHSIG ends it, and it ends its backend stubs.
    repository = write_counter_repository(tmp_path / "repository")
    process, http_port, _ = _start_cli(repository)
    try:
        _wait_ready(process, http_port)
        servers = child_pids(process.pid)
        assert len(servers) == 1
        stubs = list(backend_stubs(servers[0]))
        assert stubs
        process.kill()
        process.wait()
        deadline = time.monotonic() + 30  # tritonserver shuts down (exit timeout 10 s) and ends its stubs
        while not all(map(_ended, [*servers, *stubs])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ended(servers[0]) and all(map(_ended, stubs))
        with pytest.raises(OSError):
            _get(f"http://localhost:{http_port}/v2/health/live")
    finally:
        _kill_group(process)


def _ended(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()
