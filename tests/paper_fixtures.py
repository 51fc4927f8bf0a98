"""Reading the golden fixtures of the original code's outputs (``tests/fixtures/paper_*.safetensors``).

Their weights are stored as int8 times a power of two (the exponents in the metadata) to keep the
files small; the original code ran on exactly those values.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures"


def read(name: str) -> tuple[dict, dict]:
    """(metadata, tensors) of ``tests/fixtures/<name>``."""
    with safe_open(str(FIXTURES / name), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def original_state(meta: dict, tensors: dict) -> dict:
    """The original-format state dict held under ``state/`` keys, de-quantised."""
    exps = json.loads(meta["exponents"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            name = key[len("state/"):]
            state[name] = value.float() * 2.0 ** exps[name] if name in exps else value
    return state
