"""Property-based fuzzing of everything a user hands to ``vsd-run``: recipes (as mappings and as raw
bytes), command-line overrides, SRN data folders and checkpoint / weights files.

Every case runs in its own child process (``tests/fuzz_worker.py``) with a time and memory limit,
inside its own folder, and must end in exit 0, or exit 2 with one short paragraph that names the
file or key at fault: never a traceback, a hang, an out-of-memory death, or a file changed outside
the case's folder. Hypothesis draws the cases deterministically (``derandomize``), so CI sees the
same ones each run. ``VSD_FUZZ_SCALE`` multiplies the number of cases; the long run is
``pytest -m fuzz_long tests/test_fuzz_input.py`` (ten times as many, any seed).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TINY

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCALE = float(os.environ.get("VSD_FUZZ_SCALE", "1"))
CASE_TIMEOUT = 90.0  # seconds per case: a hang is a failure
CASE_MEMORY_GB = 6.0  # address space above the worker's own
CASES: Counter = Counter()  # kind -> cases run, written to the session's fuzz summary
SECONDS: Counter = Counter()  # kind -> seconds spent in its cases


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def fuzz_settings(n: int):
    return settings(
        max_examples=examples(n),
        deadline=None,
        derandomize=SCALE <= 1,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---- the worker ---------------------------------------------------------------------------------
class Worker:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "fuzz_worker.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(HERE),
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], cwd: Path) -> dict:
        job = {"argv": [str(a) for a in argv], "cwd": str(cwd), "timeout": CASE_TIMEOUT, "memory_gb": CASE_MEMORY_GB}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()
    summary = HERE.parent / ".pytest_cache" / "fuzz_cases.json"
    summary.parent.mkdir(exist_ok=True)
    old = json.loads(summary.read_text()) if summary.exists() else {}
    for kind, n in CASES.items():
        old[kind] = {"cases": n, "seconds": round(SECONDS[kind], 1)}
    summary.write_text(json.dumps(old, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """A folder of cases beside a neighbour folder that no case may touch."""
    root = tmp_path_factory.mktemp("fuzz")
    neighbour = root / "neighbour"
    (neighbour / "runs" / "x").mkdir(parents=True)
    (neighbour / "runs" / "x" / "keep.txt").write_text("keep")
    (neighbour / "keep.yaml").write_text("keep: 1\n")
    return root


def _snapshot(*roots: Path, skip: Path | None = None) -> dict:
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            if skip is not None and (d == skip or skip in d.parents):
                dirnames[:] = []
                continue
            for name in filenames + dirnames:
                p = d / name
                if skip is not None and (p == skip or skip in p.parents):
                    continue
                try:
                    st_ = p.lstat()
                except FileNotFoundError:
                    continue
                seen[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return seen


_counter = [0]


def new_case(arena: Path) -> Path:
    _counter[0] += 1
    case = arena / "cases" / f"{_counter[0]:05d}"
    case.mkdir(parents=True)
    return case


def check_outcome(result: dict, case: Path, names: list[str], what: str) -> None:
    """Exit 0, or exit 2 with one short paragraph that names one of ``names`` (a file or key)."""
    text = result["stdout"] + result["stderr"]
    where = f"{what}: rc {result['rc']}, {result['seconds']} s\n{text[-3000:]}"
    assert not result["timed_out"], f"hang (> {CASE_TIMEOUT} s) on {where}"
    assert "Traceback" not in text, f"traceback on {where}"
    assert result["rc"] in (0, 2), f"exit code {result['rc']} on {where}"
    if result["rc"] == 2:
        last = [line for line in result["stderr"].strip().splitlines() if line.strip()]
        assert last, f"exit 2 without a message on {where}"
        message = last[-1]
        assert message.startswith("error:"), f"the last line is not the error paragraph on {where}"
        assert len(message) < 1200, f"error message of {len(message)} characters on {where}"
        assert any(n in message for n in names) or "`" in message, f"the error names none of {names} on {where}"


def run_case(worker: Worker, arena: Path, case: Path, argv: list[str], names: list[str], what: str, kind: str) -> dict:
    before = _snapshot(arena, REPO / "pretrained", REPO / "examples", skip=case)
    result = worker.run(argv, case)
    after = _snapshot(arena, REPO / "pretrained", REPO / "examples", skip=case)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{what} changed files outside its folder: {changed[:5]}"
    check_outcome(result, case, names, what)
    CASES[kind] += 1
    SECONDS[kind] += result["seconds"]
    return result


# ---- hostile values -----------------------------------------------------------------------------
NASTY_NUMBERS = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0, -1, 0.0, -0.5, 1e-300, 1e308, 2**63, 2**64 + 5, -(2**70), 10**6, 180.0, 360.0])
VALUES = st.one_of(
    NASTY_NUMBERS,
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["../../escape", "/tmp", "", " ", "x" * 5000, "[", "{a: 1}", "&a [*a]", "yes", "null", "1e400"]),
    st.none(),
    st.booleans(),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _leaves(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, dict):
            keys += _leaves(v, path + ".")
    return keys


@pytest.fixture(scope="module")
def tiny_raw() -> dict:
    from vsd.core.recipe import load_recipe

    raw = load_recipe("voxel_minens.yaml", TINY + ["train.steps=1", "train.checkpoint_every=1"]).raw
    raw["data"]["skins"] = "procedural"
    return raw


def _set(d: dict, path: str, value) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {}) if isinstance(d.get(p), dict) else d.setdefault(p, {})
    d[parts[-1]] = value


def _delete(d: dict, path: str) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        d = d[p]
    d.pop(parts[-1], None)


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["set", "set", "set", "delete", "unknown"]), st.integers(0, 10**6), VALUES), min_size=1, max_size=3
)


def _mutate(raw: dict, mutations) -> dict:
    import copy

    out = copy.deepcopy(raw)
    for op, pick, value in mutations:
        keys = _leaves(out)
        if not keys:
            break
        key = keys[pick % len(keys)]
        if key.endswith(".type") or key == "data.skins":
            continue  # a plugin switch or real-skin search is a different recipe, not a bad value
        if op == "set":
            _set(out, key, value)
        elif op == "delete":
            _delete(out, key)
        else:
            _set(out, key.rsplit(".", 1)[0] + ".zz_unknown" if "." in key else "zz_unknown", value)
    return out


# ---- recipes ------------------------------------------------------------------------------------
@fuzz_settings(30)
@given(mutations=MUTATIONS)
def test_fuzz_recipe_values(worker, arena, tiny_raw, mutations):
    """A recipe with 1-3 keys set to hostile values, deleted or misspelt: validated, then (when
    accepted) trained for one step in the case folder, where its run lands."""
    case = new_case(arena)
    path = case / "recipe.yaml"
    path.write_text(yaml.safe_dump(_mutate(tiny_raw, mutations), sort_keys=False))
    r = run_case(worker, arena, case, ["recipe", path, "--dry-run"], ["recipe.yaml"], f"recipe {mutations!r}"[:400], "recipe values")
    if r["rc"] == 0:
        run_case(worker, arena, case, ["recipe", path, "--quiet"], ["recipe.yaml"], f"training {mutations!r}"[:400], "recipe values, trained")


def _alias_bomb(depth: int, width: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['1'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


RAW_RECIPES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda d, w: _alias_bomb(d, w).encode(), st.integers(3, 12), st.integers(2, 12)),
    st.builds(lambda n: ("data: " + "[" * n).encode(), st.integers(10, 60000)),
    st.builds(lambda n: ("data: " + "{a: " * n + "1" + "}" * n).encode(), st.integers(10, 5000)),
    st.builds(lambda k: f"train:\n  steps: 1\n  {k}: 1\n  {k}: 2\n".encode(), st.sampled_from(["lr", "steps", "zz"])),
    st.builds(lambda s: s.encode("utf-8", "replace"), st.text(max_size=300)),
    st.builds(lambda b: b"train:\n  steps: 1\n# " + b, st.binary(min_size=1, max_size=50).filter(lambda b: b.decode("utf-8", "ignore") != b.decode("utf-8", "replace"))),
    st.builds(lambda n: b"x: " + b"a" * n, st.sampled_from([10, 2 * 2**20])),
)


@fuzz_settings(25)
@given(text=RAW_RECIPES)
def test_fuzz_recipe_bytes(worker, arena, text):
    """Arbitrary bytes, non-UTF-8 text, alias bombs, deep nesting, duplicate keys, huge files."""
    case = new_case(arena)
    path = case / "recipe.yaml"
    path.write_bytes(text)
    run_case(worker, arena, case, ["recipe", path, "--dry-run"], ["recipe.yaml"], f"recipe bytes {text[:200]!r}", "recipe bytes")


# ---- overrides ----------------------------------------------------------------------------------
KEYS = st.one_of(
    st.sampled_from(
        ["data.image_size", "data.views", "data.fov_deg", "renderer.samples", "model.volume_size", "train.lr", "train.cond_probs",
         "seed", "name", "train.stpes", "data", "train", "model.channel_mult", "diffusion.timesteps", "sample.num_samples",
         "representation.upsample", "renderer.importance_samples", "train.batch_size", "train.grad_accum", "encoder.channels",
         "data.type", "train.heldout_views", "diffusion.sampling_steps", "a.b.c.d", ".", "..x", "data..views"]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=20),
)
OVERRIDE_TEXT = st.one_of(
    VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().replace("\n...", "").replace("\n", " ")),
    st.text(max_size=40),
    st.sampled_from(["[" * 5000, "&a [*a]", "!!python/object:os.system", "{", "1e99999", ".nan", "-.inf", "0x10", "1_000_000_000"]),
)
OVERRIDES = st.lists(
    st.one_of(st.tuples(KEYS, OVERRIDE_TEXT).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=20)).filter(lambda o: not o.startswith("-")),
    min_size=1,
    max_size=3,
)


@fuzz_settings(30)
@given(overrides=OVERRIDES)
def test_fuzz_overrides(worker, arena, overrides):
    """Command-line overrides with hostile keys and values on the tiny reference recipe."""
    case = new_case(arena)
    argv = ["recipe", "voxel_minens.yaml", *TINY, "data.skins=procedural", *overrides, "--dry-run"]
    names = ["voxel_minens.yaml", *[o.partition("=")[0].strip() for o in overrides if o.partition("=")[0].strip()]]
    run_case(worker, arena, case, argv, names, f"overrides {overrides!r}"[:400], "overrides")


# ---- data folders -------------------------------------------------------------------------------
def _write_srn(root: Path) -> None:
    from vsd.core.cameras import Cameras
    from vsd.plugins.datasets.srn import write_srn_object

    cams = Cameras.orbit(4, radius=1.3, elevation_deg=30.0, fov_deg=51.98, height=16, width=16, up_axis="z")
    g = torch.Generator().manual_seed(0)
    for split, obj in (("train", "a"), ("train", "b"), ("val", "c"), ("test", "d")):
        write_srn_object(root, split, obj, torch.rand(4, 3, 16, 16, generator=g), cams.c2w, cams.K[0], (16, 16))


NUMBER = re.compile(rb"-?\d+(\.\d+)?(e-?\d+)?")
HOSTILE_TOKENS = st.sampled_from([b"nan", b"inf", b"-inf", b"-1", b"0", b"1e308", b"abc", b"", b"1 2", b"\xff\xfe", b"1e-320"])
DATA_DAMAGE = st.lists(
    st.one_of(
        st.tuples(st.just("bytes"), st.integers(0, 10**6), st.binary(max_size=64)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6), st.integers(0, 200)),
        st.tuples(st.just("number"), st.integers(0, 10**6), st.tuples(st.integers(0, 40), HOSTILE_TOKENS)),
        st.tuples(st.just("delete"), st.integers(0, 10**6), st.none()),
        st.tuples(st.just("append"), st.integers(0, 10**6), st.binary(max_size=20)),
    ),
    min_size=1,
    max_size=3,
)


def _damage(root: Path, ops) -> list[Path]:
    hit = []
    for op, pick, arg in ops:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not files:
            break
        path = files[pick % len(files)]
        data = path.read_bytes()
        if op == "bytes":
            path.write_bytes(arg)
        elif op == "truncate":
            path.write_bytes(data[: min(arg, max(len(data) - 1, 0))])
        elif op == "number":
            matches = list(NUMBER.finditer(data))
            if not matches:
                continue
            m = matches[arg[0] % len(matches)]
            path.write_bytes(data[: m.start()] + arg[1] + data[m.end():])
        elif op == "delete":
            path.unlink()
        else:
            path.write_bytes(data + b"\n" + arg)
        hit.append(path)
    return hit


@fuzz_settings(12)
@given(ops=DATA_DAMAGE)
def test_fuzz_data_folders(worker, arena, ops):
    """A small SRN folder with 1-3 damaged files: `data check` and one training step on it both
    end cleanly, and what `check` rejects in the poses or intrinsics, training rejects too."""
    case = new_case(arena)
    root = case / "srn"
    _write_srn(root)
    hit = _damage(root, ops)
    names = [str(root), *[p.name for p in hit]]
    checked = run_case(worker, arena, case, ["data", "check", root], names, f"data check after {ops!r}"[:400], "data folders, checked")
    argv = ["recipe", REPO / "examples" / "recipes" / "voxel_cars.yaml", *TINY, f"data.root={root}", "data.prepare=null",
            "data.max_objects=null", "--out", case / "run", "--quiet"]
    trained = run_case(worker, arena, case, argv, names, f"training after {ops!r}"[:400], "data folders, trained")
    text_files = [p for p in hit if p.suffix == ".txt" and "_train" in str(p)]
    if checked["rc"] == 2 and text_files and any(str(p) in checked["stderr"] for p in text_files):
        assert trained["rc"] == 2, f"`data check` rejects {text_files} but training accepts it:\n{checked['stderr'][-1500:]}"


# ---- checkpoints and weights files --------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run: its checkpoint state and a weights file made from it."""
    from vsd.cli.main import main
    from vsd.core.checkpoint import load_checkpoint
    from vsd.core.weights import save_weights

    run = tmp_path_factory.mktemp("fuzz-run") / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "data.skins=procedural", "--out", str(run), "--quiet"]) == 0
    state = load_checkpoint(run)
    weights = save_weights(run / "model.safetensors", state, state["recipe"])
    return {"state": {k: v for k, v in state.items() if k != "path"}, "weights": weights}


STATE_DAMAGE = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 100), st.none()),
        st.tuples(st.just("value"), st.integers(0, 100), VALUES),
        st.tuples(st.just("nan"), st.integers(0, 10**6), st.sampled_from([float("nan"), float("inf")])),
        st.tuples(st.just("reshape"), st.integers(0, 10**6), st.none()),
        st.tuples(st.just("droptensor"), st.integers(0, 10**6), st.none()),
        st.tuples(st.just("recipe"), st.integers(0, 3), st.one_of(st.text(max_size=60), st.builds(lambda: _alias_bomb(10, 10)))),
        st.tuples(st.just("info"), st.integers(0, 100), VALUES),
    ),
    min_size=1,
    max_size=3,
)
BYTE_DAMAGE = st.one_of(
    st.none(),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
)


def _damage_state(state: dict, ops, tensor_keys: tuple[str, ...]) -> dict:
    import copy

    state = copy.copy(state)
    for op, pick, arg in ops:
        keys = sorted(state)
        if op == "drop" and keys:
            state.pop(keys[pick % len(keys)])
        elif op == "value" and keys:
            state[keys[pick % len(keys)]] = arg
        elif op in ("nan", "reshape", "droptensor"):
            for part in tensor_keys:
                sd = state.get(part)
                if not isinstance(sd, dict) or not sd:
                    continue
                sd = state[part] = dict(sd)
                name = sorted(sd)[pick % len(sd)]
                t = sd[name]
                if not torch.is_tensor(t):
                    continue
                if op == "droptensor":
                    sd.pop(name)
                elif op == "reshape":
                    sd[name] = torch.zeros(t.numel() + 1) if t.dim() <= 1 else torch.zeros(t.shape[0] + 1, *t.shape[1:])
                elif t.is_floating_point() and t.numel():
                    t = t.clone()
                    t.view(-1)[pick % t.numel()] = arg
                    sd[name] = t
        elif op == "recipe":
            state["recipe"] = arg
        elif op == "info" and isinstance(state.get("info"), dict) and state["info"]:
            info = state["info"] = dict(state["info"])
            info[sorted(info)[pick % len(info)]] = arg
    return state


def _damage_bytes(data: bytes, op) -> bytes:
    if op is None or not data:
        return data
    pos = min(int(op[1] * len(data)), len(data) - 1)
    if op[0] == "truncate":
        return data[:pos]
    return data[:pos] + bytes([op[2]]) + data[pos + 1:]


@fuzz_settings(20)
@given(ops=STATE_DAMAGE, raw=BYTE_DAMAGE)
def test_fuzz_checkpoints(worker, arena, trained, ops, raw):
    """A training checkpoint with keys dropped or retyped, NaN or reshaped weights, a hostile
    embedded recipe or damaged bytes: `vsd-run sample` on it ends cleanly."""
    case = new_case(arena)
    path = case / "damaged.pt"
    buf = io.BytesIO()
    torch.save(_damage_state(trained["state"], ops, ("model", "ema", "optimizer")), buf)
    path.write_bytes(_damage_bytes(buf.getvalue(), raw))
    argv = ["sample", path, "--steps", "1", "--num-samples", "1", "--out", case / "samples"]
    run_case(worker, arena, case, argv, [path.name], f"checkpoint {ops!r} {raw!r}"[:400], "checkpoints")


@fuzz_settings(20)
@given(ops=STATE_DAMAGE, raw=BYTE_DAMAGE)
def test_fuzz_weights_files(worker, arena, trained, ops, raw):
    """A safetensors weights file with its metadata (format, recipe, info, step) or tensors
    damaged, or its bytes: `vsd-run sample` on it ends cleanly."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(trained["weights"]), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    state = _damage_state({**meta, "tensors": tensors}, ops, ("tensors",))
    tensors = state.pop("tensors", None)
    tensors = tensors if isinstance(tensors, dict) and all(torch.is_tensor(t) for t in tensors.values()) else {}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in state.items()}
    case = new_case(arena)
    path = case / "damaged.safetensors"
    path.write_bytes(_damage_bytes(save({k: t.contiguous() for k, t in tensors.items()}, metadata=meta), raw))
    argv = ["sample", path, "--steps", "1", "--num-samples", "1", "--out", case / "samples"]
    run_case(worker, arena, case, argv, [path.name], f"weights {ops!r} {raw!r}"[:400], "weights files")


@pytest.mark.fuzz_long
def test_fuzz_long_run():
    """The same properties with ten times the cases and fresh random draws (minutes to hours)."""
    env = dict(os.environ, VSD_FUZZ_SCALE=str(10 * SCALE))
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-m", "not fuzz_long", "-p", "no:cacheprovider", "-x"]
    assert subprocess.run(cmd, env=env, cwd=str(REPO)).returncode == 0
