"""Find the `tritonserver` installation and build the environment it runs in.

Two installations are supported:

* NVIDIA's container (or any host) with `tritonserver` on PATH; its backends live in
  `$TRITON_HOME/backends` or `/opt/tritonserver/backends`.
* The server bundled in the `nvidia-pytriton` wheel of the current environment. That wheel keeps
  one Python-backend stub per Python version; the one matching this interpreter is copied to
  `backends/python/triton_python_backend_stub`, where the Python backend looks for it.

The stub embeds libpython and ignores PYTHONPATH, but every `model.py` of this project prepends
`os.environ["PYTHONPATH"]` to `sys.path` itself, so `server_env` puts the project root and this
interpreter's site-packages there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STUB_NAME = "triton_python_backend_stub"

# glibc malloc serves blocks of at least this size with mmap, so freeing one returns it to the OS.
# Why: by default glibc raises its mmap threshold to the size of the last large block freed (up
# to 32 MiB), so tritonserver's gRPC threads then carve large request buffers out of their heap
# arenas and keep them. Measured on the 2-core CI machine (Triton 2.51, embedded default): 64
# requests carrying a 20 MiB image, each refused, grew tritonserver's RssAnon by 1,019 MiB, then
# by 1,251 and 911 MiB for the next 64s (3.2 GB, no plateau); with this threshold by 181, 175 and
# 154 MiB, given back by the next requests (about 100 MiB after each round); with 4 MiB it still
# grew to about 1 GB. A user's own MALLOC_MMAP_THRESHOLD_ wins.
MALLOC_MMAP_THRESHOLD = 1 << 20


class TritonNotFoundError(RuntimeError):
    """No usable tritonserver installation (or perf_analyzer) was found."""


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


def site_packages() -> list[str]:
    """This interpreter's site-packages directories (purelib, then platlib if it differs)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if p))


def prepend_paths(entries: list[str] | tuple[str, ...], existing: str | None) -> str:
    """`entries` before the parts of an os.pathsep-separated `existing`, each once, empty parts dropped."""
    parts = list(entries) + [p for p in (existing or "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def unresolved_libraries(binary: str, env: dict[str, str]) -> list[str]:
    """The shared libraries `ldd` cannot find for `binary` in `env` (empty when all resolve)."""
    result = subprocess.run(["ldd", binary], env=env, capture_output=True, text=True, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]


def _pytriton_dir() -> Path | None:
    for site in site_packages():
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


def server_env(install: TritonInstall, project_root: Path | str = PROJECT_ROOT,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver: the project and this interpreter's path on PYTHONPATH,
    ours first on LD_LIBRARY_PATH, a fixed malloc mmap threshold (see MALLOC_MMAP_THRESHOLD)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    # The order a normal interpreter uses: the project, then PYTHONPATH, then site-packages.
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = prepend_paths([str(Path(project_root).resolve()), *existing, *site_packages()], None)
    if install.ld_library_path:
        env["LD_LIBRARY_PATH"] = prepend_paths(install.ld_library_path, env.get("LD_LIBRARY_PATH"))
    return env
