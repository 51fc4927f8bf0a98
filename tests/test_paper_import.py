"""Reading a released original experiment folder (vsd.core.paper.read_original_experiment).

The experiment is written by ``paper_fixtures.write_original_experiment`` in the layout the
original's train.py and hydra produce, with the random-weight state of
``fixtures/paper_model_parity.safetensors`` (made with the original code's modules). Every damaged
variant must be refused with an OriginalCheckpointError that names the file (and key), and a file
that needs unpickling of anything but tensors and plain data is never unpickled.
"""

from __future__ import annotations

import collections
import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from vsd.core.paper import OriginalCheckpointError, OriginalExperiment, PaperDenoiser, read_original_experiment
from vsd.core.paper.convert import convert_original_state_dict, strip_wrappers

from paper_fixtures import ORIGINAL_SECTION_ORDER, original_state, read, write_original_experiment

WEIGHTS = "paper_model_parity.safetensors"


@pytest.fixture(scope="module")
def source():
    meta, tensors = read(WEIGHTS)
    return json.loads(meta["config"]), original_state(meta, tensors)


@pytest.fixture(scope="module")
def written(tmp_path_factory, source):
    config, state = source
    return write_original_experiment(tmp_path_factory.mktemp("release") / "srn_cars", config, state)


@pytest.fixture
def experiment(tmp_path, written):
    """A fresh copy of the written experiment, for a test to damage."""
    return Path(shutil.copytree(written, tmp_path / "srn_cars"))


@pytest.fixture(scope="module")
def saved(written):
    """The written model.pth's dict, loaded once (the file is ours)."""
    return torch.load(written / "model.pth", map_location="cpu", weights_only=True)


@pytest.fixture
def rewrite(saved):
    def rewrite(folder: Path, change) -> Path:
        """``folder``'s model.pth replaced by a copy of the written dict that ``change`` edited."""
        checkpoint = copy.deepcopy(saved)
        change(checkpoint)
        torch.save(checkpoint, folder / "model.pth")
        return folder / "model.pth"
    return rewrite


def _refused(folder, *fragments) -> str:
    with pytest.raises(OriginalCheckpointError) as info:
        read_original_experiment(folder)
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, message
    assert "\n" not in message and info.value.exit_code == 2
    return message


# ---- a good experiment -----------------------------------------------------------------------

def test_the_written_experiment_looks_like_a_release(experiment, source, saved):
    config, _ = source
    text = (experiment / ".hydra" / "config.yaml").read_text()
    written = yaml.safe_load(text)
    assert list(written) == list(ORIGINAL_SECTION_ORDER)
    assert written["model"] == config["model"]  # the given sections are written whole
    assert written["optimization"]["ema"]["use"] is True and written["eval"]["sampling_timesteps"] == 250
    assert "input_size:\n  - 16" in text or "input_size:\n- 16" in text  # block style, as OmegaConf writes
    assert "hydra" not in written  # hydra keeps its own section in hydra.yaml
    assert "run" in yaml.safe_load((experiment / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert list(saved) == ["diffuser", "optimizer", "iteration"]  # as train.py saves model.pth
    assert all(k.startswith("_module.module.") for k in saved["diffuser"])


def test_reads_back_config_state_and_iteration(experiment, source):
    config, state = source
    exp = read_original_experiment(experiment)
    assert isinstance(exp, OriginalExperiment)
    assert exp.folder == experiment and exp.iteration == 1234 and type(exp.iteration) is int
    assert {k: exp.config[k] for k in config} == config
    assert list(exp.config) == list(ORIGINAL_SECTION_ORDER)
    assert set(exp.config) - set(config) == {"wandb", "general", "eval", "optimization"}
    assert type(exp.state_dict) is dict and exp.state_dict.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(exp.state_dict[key], value), key
    mine, theirs = strip_wrappers(exp.state_dict), strip_wrappers(state)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_denoiser_builds_from_it_with_the_fixture_weights(experiment, source):
    config, state = source
    exp = read_original_experiment(experiment)
    model = PaperDenoiser.from_original_checkpoint(exp.config, exp.state_dict)
    expected = convert_original_state_dict(state, model.config.network)
    got = model.network.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_a_snapshot_without_optimizer_and_unprefixed_keys(tmp_path, source):
    config, state = source
    bare = {k[len("_module.module."):]: v for k, v in state.items()}
    folder = write_original_experiment(tmp_path / "snap", config, bare, iteration=0, optimizer=False)
    exp = read_original_experiment(folder)
    assert exp.iteration == 0 and exp.state_dict.keys() == state.keys()


# ---- pickled objects are refused, never unpickled ----------------------------------------------

MARKER_NAME = "reduce_ran"


def _leave_marker(path: str) -> None:
    """What unpickling the objects below would call: proof that the loader ran foreign code."""
    Path(path).touch()


class _Marker:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (_leave_marker, (str(self.path),))


class _SneakyDict(collections.OrderedDict):
    def __reduce__(self):
        return (_leave_marker, (str(self.marker),))


def test_the_marker_works_when_unpickled(tmp_path):
    marker = tmp_path / MARKER_NAME
    pickle.loads(pickle.dumps({"x": _Marker(marker)}))
    assert marker.exists()


def test_a_pickled_object_is_refused_and_not_run(experiment, rewrite):
    marker = experiment.parent / MARKER_NAME
    path = rewrite(experiment, lambda c: c.update(x=_Marker(marker)))
    assert not marker.exists()
    message = _refused(experiment, str(path), "pickled Python object", "_leave_marker", "before constructing")
    assert "weights_only` set to `False" not in message and "weights_only=False" not in message
    assert not marker.exists()


def test_an_ordered_dict_subclass_is_refused_and_not_run(experiment, source, rewrite):
    _, state = source
    marker = experiment.parent / MARKER_NAME
    sneaky = _SneakyDict({"_module.module." + k: v for k, v in strip_wrappers(state).items()})
    sneaky.marker = marker
    path = rewrite(experiment, lambda c: c.update(diffuser=sneaky))
    _refused(experiment, str(path), "pickled Python object", "_leave_marker", "before constructing")
    assert not marker.exists()


class Stateful(collections.OrderedDict):
    """An innocent-looking subclass: still not plain data."""


def test_a_plain_subclass_of_dict_is_refused_too(experiment, rewrite):
    path = rewrite(experiment, lambda c: c.update(diffuser=Stateful(c["diffuser"])))
    _refused(experiment, str(path), "Stateful")


def test_a_file_that_is_not_a_torch_file(experiment):
    (experiment / "model.pth").write_bytes(b"not a checkpoint at all")
    _refused(experiment, str(experiment / "model.pth"), "torch file")


# ---- keys, kinds and values ---------------------------------------------------------------------

def test_missing_diffuser_key(experiment, rewrite):
    path = rewrite(experiment, lambda c: c.pop("diffuser"))
    _refused(experiment, str(path), "`diffuser`", "lacks")


def test_missing_iteration_key(experiment, rewrite):
    path = rewrite(experiment, lambda c: c.pop("iteration"))
    _refused(experiment, str(path), "`iteration`", "lacks")


@pytest.mark.parametrize("value", [-1, 3.0, "1234", True, None])
def test_ill_typed_iteration(experiment, value, rewrite):
    path = rewrite(experiment, lambda c: c.update(iteration=value))
    _refused(experiment, str(path), "key `iteration`", "int >= 0")


def test_non_tensor_value(experiment, rewrite):
    key = "_module.module.model.reconstructor.init_conv.weight"
    path = rewrite(experiment, lambda c: c["diffuser"].update({key: [1.0, 2.0]}))
    _refused(experiment, str(path), "key `diffuser`", key, "expected a tensor", "list")


def test_diffuser_not_a_mapping(experiment, rewrite):
    path = rewrite(experiment, lambda c: c.update(diffuser=[torch.zeros(2)]))
    _refused(experiment, str(path), "key `diffuser`", "expected a mapping")


def test_nan_weight(experiment, rewrite):
    key = "_module.module.model.reconstructor.init_conv.weight"

    def poison(c):
        c["diffuser"][key] = c["diffuser"][key].clone()
        c["diffuser"][key].view(-1)[3] = float("nan")
    path = rewrite(experiment, poison)
    _refused(experiment, str(path), "key `diffuser`", key, "1 non-finite value", "finite")


def test_inf_weight_in_a_schedule_buffer(experiment, rewrite):
    key = "_module.module.betas"
    path = rewrite(experiment, lambda c: c["diffuser"].update({key: torch.full((4,), float("inf"))}))
    _refused(experiment, str(path), key, "4 non-finite values")


def test_unexpected_top_level_key(experiment, rewrite):
    path = rewrite(experiment, lambda c: c.update(scheduler={"last_epoch": 3}))
    _refused(experiment, str(path), "`scheduler`", "unexpected")


def test_optimizer_must_be_plain_data(experiment, rewrite):
    path = rewrite(experiment, lambda c: c["optimizer"]["param_groups"][0].update(lr=torch.device("cpu")))
    _refused(experiment, str(path), "key `optimizer`", "torch.device", "plain data")


def test_a_checkpoint_that_is_not_a_dict(experiment):
    torch.save([torch.zeros(3)], experiment / "model.pth")
    _refused(experiment, str(experiment / "model.pth"), "expected a dict", "\"diffuser\"")


# ---- the folder and its config --------------------------------------------------------------------

def test_missing_folder(tmp_path):
    _refused(tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist", ".hydra/config.yaml", "model.pth")


def test_missing_config(experiment):
    (experiment / ".hydra" / "config.yaml").unlink()
    _refused(experiment, str(experiment / ".hydra" / "config.yaml"), "is missing")


def test_missing_model_pth(experiment):
    (experiment / "model.pth").unlink()
    _refused(experiment, str(experiment / "model.pth"), "is missing")


def test_bad_yaml(experiment):
    path = experiment / ".hydra" / "config.yaml"
    path.write_text("model:\n  unet: [1, 2\nrender: {}\n")
    _refused(experiment, str(path), "malformed YAML", "line")


def test_yaml_with_a_python_tag_is_not_constructed(experiment):
    marker = experiment.parent / MARKER_NAME
    path = experiment / ".hydra" / "config.yaml"
    text = f"model: !!python/object/apply:{__name__}._leave_marker [{json.dumps(str(marker))}]\n"
    path.write_text(text)
    _refused(experiment, str(path), "python/object")
    assert not marker.exists()
    yaml.unsafe_load(text)  # the control: constructing the tag is what would have run it
    assert marker.exists()


def test_yaml_that_is_not_a_mapping(experiment):
    path = experiment / ".hydra" / "config.yaml"
    path.write_text("- model\n- render\n")
    _refused(experiment, str(path), "expected a mapping")


def test_empty_yaml(experiment):
    path = experiment / ".hydra" / "config.yaml"
    path.write_text("")
    _refused(experiment, str(path), "expected a mapping")
