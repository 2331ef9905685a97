"""Find `perf_analyzer` and build the environment it runs in (libcudart, and libb64 when Debian's is missing)."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from llava_triton import triton_install
from llava_triton.triton_install import TritonNotFoundError

LIBB64 = "libb64.so.0d"  # perf_analyzer's only dependency outside glibc/libstdc++ besides libcudart
LIBCUDART = "libcudart.so.12"


def perf_analyzer_command() -> list[str]:
    """The perf_analyzer binary of this environment's tritonclient wheel, else the one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "perf_analyzer"]
    candidates += [Path(site) / "tritonclient" / "bin" / "perf_analyzer" for site in triton_install.site_packages()]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return [on_path]
    raise TritonNotFoundError("perf_analyzer not found: install tritonclient[all] (it ships the binary)")


def _cudart_dir() -> str | None:
    for site in triton_install.site_packages():
        lib = Path(site) / "nvidia" / "cuda_runtime" / "lib"
        if (lib / LIBCUDART).is_file():
            return str(lib)
    return None


def _libb64_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-triton" / "lib"


def _libb64_fallback_dir() -> str | None:
    """A directory with `libb64.so.0d` pointing at the copy bundled in nvidia-pytriton.

    perf_analyzer needs Debian's libb64-0d; when it is not installed, the identical library that
    auditwheel bundled (under a mangled name) in nvidia-pytriton.libs serves.
    """
    for site in triton_install.site_packages():
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
    env["LD_LIBRARY_PATH"] = triton_install.prepend_paths(extra, env.get("LD_LIBRARY_PATH"))
    try:
        binary = perf_analyzer_command()[0]
    except TritonNotFoundError:
        return env
    if any(lib.startswith("libb64") for lib in triton_install.unresolved_libraries(binary, env)):
        fallback = _libb64_fallback_dir()
        if fallback:
            env["LD_LIBRARY_PATH"] = triton_install.prepend_paths([fallback], env["LD_LIBRARY_PATH"])
    return env


def uses_bundled_libb64(env: dict[str, str]) -> bool:
    """Whether `env` (from perf_analyzer_env) loads libb64 from nvidia-pytriton's copy."""
    return str(_libb64_cache_dir()) in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
