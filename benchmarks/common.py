"""Shared pieces of the benchmarks: machine description, repeated timing, peak FLOP/s, JSON."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device="cpu") -> dict:
    """Median, quartiles, min and max of ``repeats`` timed calls (seconds) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "min": min(times), "max": max(times), "n": len(times)}


def timeit_pair(fa: Callable, fb: Callable, repeats: int = 5, warmup: int = 1, device="cpu") -> tuple[dict, dict, float]:
    """Time two functions interleaved (a, b, a, b, ...) so both see the same machine load;
    returns both timings and the ratio of medians a / b (> 1: b is faster)."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - t0)

    def stats(t):
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        return {"median": statistics.median(t), "q1": q[0], "q3": q[2], "min": min(t), "max": max(t), "n": len(t)}

    a, b = stats(ta), stats(tb)
    return a, b, a["median"] / b["median"]


def peak_flops(device="cpu", repeats: int = 5) -> dict:
    """FLOP/s this process reaches on a large float32 matmul and a wide 3D convolution: the
    practical ceiling against which a training step's achieved FLOP/s is compared."""
    dev = torch.device(device)
    n = 2048 if dev.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    mm = timeit(lambda: a @ b, repeats, 1, dev)["median"]
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(dev)
    x = torch.randn(4, 64, 16, 16, 16, device=dev)
    with torch.no_grad():
        ct = timeit(lambda: conv(x), repeats, 1, dev)["median"]
    conv_flops = 2 * 4 * 16**3 * 64 * 64 * 27
    out = {"matmul_flops": 2 * n**3 / mm, "conv3d_flops": conv_flops / ct}
    out["peak_flops"] = max(out["matmul_flops"], out["conv3d_flops"])
    return out


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call as torch.utils.flop_counter counts them (matmuls, convolutions,
    attention; not element-wise ops, grid sampling or scans)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def max_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(out_dir: Path, name: str, data: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` (dicts) with columns ``cols``."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
