"""Check that tritonserver, its Python backend and perf_analyzer are installed and load (`--check`)."""

from __future__ import annotations

import subprocess

from llava_triton.perf_analyzer import LIBB64, perf_analyzer_command, perf_analyzer_env, uses_bundled_libb64
from llava_triton.triton_install import TritonNotFoundError, find_triton, server_env, unresolved_libraries


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
            missing = unresolved_libraries(str(binary), env)
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
    bundled = uses_bundled_libb64(env)
    note = f" (libb64 from nvidia-pytriton.libs: Debian's {LIBB64} is not installed)" if bundled else ""
    report(runs, f"perf_analyzer: {command[0]}{note}" + ("" if runs else f"\n{output.strip()[-2000:]}"))
    return ok
