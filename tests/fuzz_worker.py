"""A fork server for the input fuzz tests: runs ``vsd-run`` argument lists in fresh child processes.

Started once per test session as ``python tests/fuzz_worker.py``; it imports vsd (and torch) but
runs no tensor operation itself, so the children it forks are clean. Protocol, one JSON object per
line on stdin: ``{"argv": [...], "cwd": "...", "timeout": s, "memory_gb": g}``; each answer, one
JSON line on stdout: ``{"rc", "seconds", "timed_out", "max_rss_mb", "stdout", "stderr"}``.

Each child runs ``vsd.cli.main.main(argv)`` in ``cwd`` with its address space limited to
``memory_gb`` above what the server already maps, one torch thread, stdout and stderr captured to
files; an exception escaping ``main`` is printed as a traceback and exits 99, so the caller sees
it. A child still running after ``timeout`` seconds is killed (``timed_out``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback


def _mapped_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(job: dict, out_path: str, err_path: str) -> None:
    os.chdir(job["cwd"])
    os.environ["HOME"] = job["cwd"]  # anything written "to the home folder" stays in the case
    os.environ["COLUMNS"] = "200"
    limit = _mapped_bytes() + int(job.get("memory_gb", 4) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    rc = 99
    try:
        import torch

        torch.set_num_threads(1)
        from vsd.cli.main import main

        rc = main(list(job["argv"]))
    except BaseException:  # noqa: BLE001 - the point is to see anything that escapes main
        traceback.print_exc()
        rc = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 98)


def run(job: dict) -> dict:
    tmp = tempfile.mkdtemp(prefix="fuzz-io-")
    out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, out_path, err_path)
    timed_out, status, usage = False, 0, None
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > job.get("timeout", 60):
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.01)
    seconds = time.monotonic() - start
    rc = os.waitstatus_to_exitcode(status)
    texts = []
    for path in (out_path, err_path):
        with open(path, errors="replace") as fh:
            texts.append(fh.read()[-20000:])
        os.unlink(path)
    os.rmdir(tmp)
    return {
        "rc": rc,
        "seconds": round(seconds, 3),
        "timed_out": timed_out,
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1) if usage else None,
        "stdout": texts[0],
        "stderr": texts[1],
    }


def serve() -> None:
    # Imported (and the plugin registry loaded) once here, inherited by every child.
    import vsd.apps.evaluation  # noqa: F401
    import vsd.apps.sampling  # noqa: F401
    import vsd.apps.training  # noqa: F401
    import vsd.cli.main  # noqa: F401
    import vsd.datatools.check  # noqa: F401
    from vsd.core.registry import get_registry

    get_registry()
    # The optimiser's first construction imports torch's compiler stack (seconds); a one-element
    # tensor starts no thread pool, so the children stay fork-safe.
    import torch

    vsd.apps.training.make_optimizer(torch.nn.Linear(1, 1), 1e-3)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve()
