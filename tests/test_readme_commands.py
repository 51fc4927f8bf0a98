"""Every command of the README's Quick start, Using it and Plugins and recipes sections runs.

The ```bash blocks of those sections are read from README.md and each command is run as written
(through the same ``main()`` as the ``vsd-run`` script, in a fresh folder holding a link to
``examples/``), with the options of ``FAST`` appended so that it finishes in seconds on a CPU:
click takes the last value of a repeated option and recipe overrides apply in order, so the
appended values win over the README's. The ```python blocks of Using it are run with the
replacements of ``PY_FAST``. A command whose program or subcommand is not in these tables fails
the test, so a new README command cannot go untested; the only commands not run are those of
``NOT_RUN``, and the test checks that the README holds exactly those.
"""

from __future__ import annotations

import glob
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from vsd.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN_SECTIONS = ("Quick start", "Using it", "Plugins and recipes")  # level-2 headings
PYTHON_SECTIONS = ("Using it",)

# Training runs 2 steps of the recipe's own network, started from the shipped model of the same
# recipe (so that `export` finds a surface and samples are not noise), with small sampling.
TRAIN_FAST = [
    "train.init_from=minens-voxel",
    "encoder.pass_both=true",  # as the shipped minens-voxel
    "train.lr=1e-6",
    "train.steps=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.sample_every=1000",  # the final samples only
    "train.checkpoint_every=1",
    "diffusion.sampling_steps=2",
    "sample.num_samples=1",
    "sample.turntable_frames=2",
    "sample.render_size=32",
]
FAST = {  # vsd-run subcommand -> appended arguments
    "recipe": [*TRAIN_FAST, "--quiet"],
    "recipes": [],
    "sample": ["--num-samples", "1", "--steps", "2"],
    "export": ["--steps", "2", "--resolution", "32"],
    "eval": ["--samples", "1", "--objects", "1", "--steps", "2", "--batch-size", "1", "--quiet"],
    "report": [],
    "models": [],
    "plugins": [],
    "import": [],
}
PY_FAST = {  # text in a README python block -> what runs instead
    "num_samples=4)": "num_samples=1, steps=2)",
}
NOT_RUN = {  # commands (after splitting `a && b`) -> why the test does not run them
    "pip install torch==2.13.0": "installs packages; vsd is installed already",
    "pip install -e .": "installs packages; vsd is installed already",
    'pip install -e ".[test]" -e examples/gaussian_blobs_plugin': "installs packages; vsd is installed already",
    "python -m pytest": "the test suite itself",
}


def sections(text: str) -> dict[str, str]:
    """Level-2 heading -> its text (up to the next level-2 heading)."""
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", section, flags=re.M | re.S)


def commands(block: str) -> list[tuple[str, str | None]]:
    """(command, the path its `# -> PATH` comment says it writes, or None) for each command of a
    bash block: continuation lines joined, `a && b` split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        code, _, comment = line.partition(" #")
        if not code.strip() or code.lstrip().startswith("#"):
            continue
        arrow = re.match(r"\s*(?:[^-]*)->\s*(\S+)", comment) if comment else None
        parts = [p.strip() for p in code.split("&&")]
        out += [(p, None) for p in parts[:-1]] + [(parts[-1], arrow.group(1) if arrow else None)]
    return out


def readme_commands() -> list[tuple[str, str, str | None]]:
    """(section, command, written path) for every command of the sections that run."""
    text = sections(README.read_text())
    missing = [s for s in RUN_SECTIONS if s not in text]
    assert not missing, f"README.md has no section(s) {missing}: rename them here too"
    return [(s, cmd, wrote) for s in RUN_SECTIONS for b in blocks(text[s], "bash") for cmd, wrote in commands(b)]


ORIGINAL_EXPERIMENT = "path/to/srn_cars_experiment"  # the README's released experiment: a tiny one is made there


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    import json

    from paper_fixtures import original_state, read, write_original_experiment

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VSD_MODELS_DIR", str(tmp_path / "models"))
    config = json.loads(read("paper_sampling_parity.safetensors")[0]["config"])
    write_original_experiment(tmp_path / ORIGINAL_EXPERIMENT, config, original_state(*read("paper_model_parity.safetensors")))
    return tmp_path


def run_vsd(argv: list[str]) -> int:
    sub = argv[0]
    assert sub in FAST, f"README command `vsd-run {' '.join(argv)}`: add `{sub}` to FAST in this test"
    return main([*argv, *FAST[sub]])


def test_the_readme_sections_hold_commands_and_only_the_listed_ones_are_not_run():
    cmds = readme_commands()
    per_section = {s: [c for t, c, _ in cmds if t == s] for s in RUN_SECTIONS}
    assert all(per_section.values()), f"a section that should hold commands holds none: {per_section}"
    not_run = {c for _, c, _ in cmds if not c.startswith("vsd-run ")}
    assert not_run == set(NOT_RUN), f"commands the test would not run: {sorted(not_run)}; listed: {sorted(NOT_RUN)}"
    py = [b for s in PYTHON_SECTIONS for b in blocks(sections(README.read_text())[s], "python")]
    assert py, "Using it holds no python block"
    for old in PY_FAST:
        assert any(old in b for b in py), f"PY_FAST replaces {old!r}, which no README python block holds any more"


def test_every_readme_command_runs_and_writes_what_it_says(workdir, capsys):
    ran = []
    for section, cmd, wrote in readme_commands():
        if cmd in NOT_RUN:
            continue
        argv = shlex.split(cmd)
        assert argv[0] == "vsd-run", f"{section}: `{cmd}` is not a vsd-run command; list it in NOT_RUN with the reason"
        try:
            code = run_vsd(argv[1:])
        except Exception as exc:  # noqa: BLE001 - name the README command that broke
            pytest.fail(f"README {section}: `{cmd}` raised {type(exc).__name__}: {exc}")
        out, err = capsys.readouterr()
        assert code == 0, f"README {section}: `{cmd}` exited {code}\n{out[-2000:]}\n{err[-2000:]}"
        if wrote:
            assert (workdir / wrote).exists(), f"README {section}: `{cmd}` says it writes {wrote}, which does not exist"
        ran.append(argv[1])
        if argv[1] == "recipe" and "--out" in argv and "--dry-run" not in argv:
            assert_run_outputs(workdir, argv[argv.index("--out") + 1])
    assert {"recipe", "sample", "export", "eval", "report"} <= set(ran), ran
    assert list((workdir / "meshes").glob("**/*.glb")), "export --format glb wrote no .glb under meshes/"
    assert (workdir / "runs" / "voxel_minens" / "report.html").stat().st_size > 0


def assert_run_outputs(workdir: Path, run: str) -> None:
    """The files that the Quick start's table says a run writes (those under this run's folder)."""
    table = sections(README.read_text())["Quick start"]
    paths = re.findall(r"^\| (.*?) \|", table, flags=re.M)
    patterns = [p for cell in paths for p in re.findall(r"`([^`]+)`", cell) if p.startswith(run.rstrip("/") + "/")]
    if run.rstrip("/") != "runs/voxel_minens":
        return
    assert patterns, "the Quick start's table of written files names no file of runs/voxel_minens"
    for p in patterns:
        if "tensorboard" in p and importlib.util.find_spec("tensorboard") is None:
            continue  # the table says: when the tensorboard package is installed
        assert glob.glob(str(workdir / p)), f"the Quick start's table says a run writes {p}; it did not"


def test_the_python_api_blocks_run_and_write_the_files_they_name(workdir):
    for section in PYTHON_SECTIONS:
        for block in blocks(sections(README.read_text())[section], "python"):
            code = block
            for old, new in PY_FAST.items():
                code = code.replace(old, new)
            exec(compile(code, f"README.md ({section})", "exec"), {"__name__": "readme"})
            for name in re.findall(r"\"([^\"]+\.(?:gif|glb|ply|obj|png))\"", block):
                assert (workdir / name).is_file(), f"README {section}: the python block names {name}, which it did not write"
