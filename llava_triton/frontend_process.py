"""Running the OpenAI-compatible frontend (llava_triton.openai_frontend) as a child process: start it, wait
until it answers, notice when it dies, start it again, stop it.

The launcher (`python -m llava_triton.server --openai-port 9000`) runs one beside tritonserver and
supervises it as it does tritonserver; the demo and the tests run one the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_triton import deploy, spec
from llava_triton.spec import FrontendConfig
from llava_triton.triton_install import PROJECT_ROOT


class FrontendError(RuntimeError):
    """The frontend exited or did not answer in time."""


@dataclass(eq=False)
class FrontendProcess:
    """`python -m llava_triton.openai_frontend` forwarding to Triton's gRPC address `triton_url`. Its output
    goes to `log_path`, or to this process's stderr without one. As a context manager it starts, waits
    until live and stops."""

    triton_url: str
    port: int = deploy.OPENAI_PORT
    host: str = "0.0.0.0"
    model_repository: Path | str | None = None
    config: FrontendConfig = field(default_factory=FrontendConfig)
    log_path: Path | str | None = None
    live_timeout_s: float = 60.0
    stop_timeout_s: float = deploy.EXIT_TIMEOUT_S + 5
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    restarts: int = field(default=0, init=False)

    @property
    def url(self) -> str:
        """The base URL of its OpenAI API, as the `openai` client takes it."""
        host = "localhost" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/v1"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "llava_triton.openai_frontend", "--triton-url", self.triton_url,
                   "--host", self.host, "--port", str(self.port)]
        if self.model_repository is not None:
            command += ["--model-repository", str(Path(self.model_repository).resolve())]
        return command + frontend_argv(self.config)

    def start(self) -> FrontendProcess:
        from llava_triton.server import _die_with_parent

        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("frontend already running")
        log = open(self.log_path, "ab") if self.log_path is not None else None  # noqa: SIM115 - the child holds it
        try:
            # Its own session, as tritonserver's: a Ctrl-C in the terminal reaches the launcher, which stops it.
            self.process = subprocess.Popen(self.command(), cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                                            stdout=log or sys.stderr, stderr=subprocess.STDOUT if log else None,
                                            start_new_session=True, preexec_fn=_die_with_parent())
        finally:
            if log is not None:
                log.close()
        return self

    def is_live(self) -> bool:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        try:
            with urllib.request.urlopen(f"http://{host}:{self.port}{deploy.OPENAI_LIVE_PATH}", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_live(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.live_timeout_s if timeout is None else timeout)
        while not self.is_live():
            code = self.exit_code()
            if code is not None:
                raise FrontendError(f"the OpenAI frontend exited with code {code} before it answered")
            if time.monotonic() > deadline:
                raise FrontendError(f"the OpenAI frontend did not answer on port {self.port} within "
                                    f"{timeout or self.live_timeout_s:.0f} s")
            time.sleep(0.1)

    def exit_code(self) -> int | None:
        """Its exit code once it has exited, else None (also None when never started)."""
        return None if self.process is None else self.process.poll()

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def __enter__(self) -> FrontendProcess:
        self.start()
        try:
            self.wait_live()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# The frontend's flags live here, not in openai_frontend, so that the launcher parses them without
# importing FastAPI.

def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_frontend_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per FrontendConfig field (--max-body-bytes, --fetch-image-urls/--no-fetch-image-urls, ...)."""
    for option in spec.frontend_options():
        kwargs: dict[str, Any] = {"dest": option.name, "default": option.default,
                                  "help": f"{option.meaning} (default {json.dumps(option.default)})".replace("%", "%%")}
        if option.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = option.type
        parser.add_argument(_option_flag(option.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> FrontendConfig:
    return FrontendConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FrontendConfig)})


def frontend_argv(config: FrontendConfig) -> list[str]:
    """The flags that give `config` (those that differ from the defaults), for a child process."""
    argv = []
    defaults = FrontendConfig()
    for option in dataclasses.fields(FrontendConfig):
        value = getattr(config, option.name)
        if value == getattr(defaults, option.name):
            continue
        if isinstance(value, bool):
            argv.append(_option_flag(option.name) if value else f"--no-{option.name.replace('_', '-')}")
        else:
            argv += [_option_flag(option.name), str(value)]
    return argv
