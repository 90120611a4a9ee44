"""DRCL2 under DDP: two CPU processes (gloo) through detectron2's launch, as DefaultTrainer wraps it."""
import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from test_modeling import LOSS_KEYS, batch, build


def _worker(out_dir):
    rank = comm.get_rank()
    model = build()  # same seed: same initial weights on both ranks
    # DefaultTrainer's settings (create_ddp_model adds device_ids, which only GPUs take)
    ddp = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=False)
    data = batch()
    if rank == 1:  # uneven ranks: one image, and no instance at all on this rank
        data = data[:1]
        for v in ("view1", "view2"):
            data[0][v]["instances"] = data[0][v]["instances"][:0]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    records = []
    for it in range(2):  # a second step fails in DDP if any parameter missed a gradient
        with EventStorage(it):
            losses = ddp(data)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        model.update_target(it)
        records.append({"losses": {k: v.item() for k, v in losses.items()}, "grads": grads})
    torch.save({"records": records, "params": model.state_dict()}, f"{out_dir}/rank{rank}.pt")


def test_two_process_ddp_steps(tmp_path):
    launch(_worker, 2, dist_url="auto", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for a, b in zip(r0["records"], r1["records"]):
        assert set(a["losses"]) == set(b["losses"]) == LOSS_KEYS
        assert all(torch.isfinite(torch.tensor(v)) for v in a["losses"].values())
        assert set(a["grads"]) == set(b["grads"])
        for n in a["grads"]:  # DDP averaged every gradient, synchronised BN included
            assert torch.allclose(a["grads"][n], b["grads"][n], atol=1e-6), n
    for k, v in r0["params"].items():  # online and target stay identical across ranks
        assert torch.allclose(v.float(), r1["params"][k].float(), atol=1e-6), k
    assert r1["records"][0]["losses"]["loss_lcl_inst"] == 0.0  # no instance on rank 1
