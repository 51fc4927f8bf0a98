"""Run by torchrun in tests/test_distributed.py: train a tiny recipe and record, per rank, the
items it trained on and a digest of its final parameters."""

import json
import sys

import torch

from vsd.apps.training import Trainer
from vsd.core.recipe import load_recipe

from conftest import TINY

out, *overrides = sys.argv[1:]
resume = "--resume" in overrides
overrides = [o for o in overrides if o != "--resume"]
recipe = load_recipe("voxel_minens.yaml", TINY + overrides)


class Recording(Trainer):
    seen: list = []

    def _batch(self, idx, positions, seed):
        self.seen.append([int(i) for i in idx])
        return super()._batch(idx, positions, seed)


t = Recording(recipe, out, quiet=True, resume=resume)
t.run()
rank = t.dist.rank
params = torch.cat([p.detach().flatten() for p in t.model.parameters()])
with open(f"{out}/rank{rank}.json", "w") as fh:
    m1 = torch.cat([t.opt.state[p]["exp_avg"].flatten() for p in t.model.parameters()])
    json.dump({"seen": t.seen, "params": params.tolist()[:2000], "param_sum": float(params.double().sum()), "grad_avg": m1.tolist()}, fh)
