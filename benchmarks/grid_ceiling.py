"""The resolution ceiling of a voxel grid: a free D^3 grid (no network) fitted to each test object's
views with the model's own renderer; what any model with that output grid could score at most.

    python benchmarks/grid_ceiling.py minens-voxel 16 3    # model, D, objects (run where data/ is)
"""
import sys, math, torch, vsd
from vsd.core.cameras import Cameras
from vsd.representations.voxel_grid import VoxelField
torch.set_num_threads(1)
name, D, nobj = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = vsd.load(name, device="cpu"); model = pipe.model
ds = model.recipe.data.build(split="test")
bound = model.info.bound if hasattr(model, "info") else 0.5
res = []
for idx in range(nobj):
    item = ds[idx]
    imgs = ((item["images"] + 1) / 2).clamp(0, 1)
    V, H, W = imgs.shape[0], imgs.shape[-2], imgs.shape[-1]
    cams = Cameras(item["c2w"][None], item["K"][None], H, W)
    raw = torch.zeros(1, 4, D, D, D); raw[:, 0] = -3.0
    raw.requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=0.05)
    for it in range(400):
        sigma = torch.nn.functional.softplus(raw[:, :1]) * (D / (2 * bound))
        field = VoxelField(torch.cat([sigma, torch.sigmoid(raw[:, 1:])], 1), bound)
        out = model.render(field, cams)
        loss = ((out["rgb"] - imgs[None]) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        mse = ((out["rgb"].clamp(0, 1) - imgs[None]) ** 2).flatten(2).mean(-1)[0]
    p = (-10 * torch.log10(mse)).tolist()
    res.append(sum(p) / len(p)); print(idx, [round(x, 2) for x in p], flush=True)
print(name, "D", D, "mean fitted PSNR over all views", round(sum(res) / len(res), 2))
