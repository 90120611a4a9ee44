"""
DRCL2 across processes: two CPU processes (gloo, detectron2's ``launch``), the model wrapped in DDP
as DefaultTrainer wraps it.

* Equivalence: the average over ranks of every loss, and every parameter's gradient after DDP's
  averaging, equal one process on the concatenated batch (same views, same seeded draws).
* Every ablation row gives every parameter a gradient on every branch (DDP without
  ``find_unused_parameters`` fails at the next step otherwise), also with < 2 instances globally.
"""

import os

import pytest
import torch
from detectron2.engine import launch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from helpers import REPO_ROOT
from helpers.model import build, view
from torch.nn.parallel import DistributedDataParallel

pytestmark = pytest.mark.usefixtures("one_thread")
ITERATION = 7  # of SOLVER.MAX_ITER 10: lambda = 0.7, non-uniform class weights
# No random anchor subsampling in the RPN (a 64 px image has 1,023 anchors): detectron2 draws it
# from torch's global generator, which differs between the two layouts.
COMMON = ["MODEL.RPN.BATCH_SIZE_PER_IMAGE", 4096, "MODEL.DRCL2.LCL.NUM_INSTANCES", 2]
SYMMETRIC, UNSUPERVISED, INFONCE = (
    ["MODEL.DRCL2.SYMMETRIC", True],
    ["MODEL.DRCL2.LCL.SUPERVISED", False],
    ["MODEL.DRCL2.HCL.LOSS", "infonce"],
)
CASES = {  # name: (options, rank 1 holds no instance); each option on and off, with and without
    "byol": ([], False),  # an empty rank, the supervised term both ways with an empty rank
    "byol_symmetric_unsupervised_rank1_empty": (SYMMETRIC + UNSUPERVISED, True),
    "infonce_symmetric_rank1_empty": (INFONCE + SYMMETRIC, True),
    "infonce_unsupervised": (INFONCE + UNSUPERVISED, False),
}


def global_batch():
    """4 images (<= 64 px: every batch pads to 64 x 64, as the concatenated one does), 1-4
    instances."""
    boxes1 = [[4, 4, 30, 30], [20, 10, 60, 40], [0, 30, 20, 60], [30, 30, 60, 60]]
    boxes2 = [[10, 6, 40, 36], [30, 14, 64, 44], [2, 20, 18, 50], [24, 28, 50, 54]]
    spec = [  # (size v1, size v2, classes)
        ((64, 64), (56, 64), [0, 1, 4, 1]),
        ((48, 64), (64, 60), [2, 4]),
        ((64, 48), (64, 64), [3, 1, 0]),
        ((60, 60), (52, 64), [4]),
    ]
    data = []
    for i, (s1, s2, classes) in enumerate(spec):
        n = len(classes)
        data.append(
            {
                "image_id": 100 + i,
                "view1": view(2 * i, s1, boxes1[:n], classes),
                "view2": view(2 * i + 1, s2, boxes2[:n], classes),
            }
        )
    return data


def rank_batches(rank1_empty: bool):
    """Rank 0: images 0-2 (uneven split); rank 1: image 3, its instances removed if asked."""
    data = global_batch()
    if rank1_empty:
        for v in ("view1", "view2"):
            data[3][v]["instances"] = data[3][v]["instances"][:0]
    return data[:3], data[3:]


def run_step(model, data, wrapper=None):
    with EventStorage(ITERATION):
        losses = (wrapper or model)(data)
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, grads


def _no_pickled_gathers(*args, **kwargs):
    raise AssertionError("DRCL2 must all-gather tensors (torch.distributed), not pickled objects")


def wrap(model):
    """DDP as DefaultTrainer builds it. Every rank built the same weights (same seed): the initial
    broadcast of ~25M float64 values over gloo is skipped."""
    return DistributedDataParallel(
        model, broadcast_buffers=False, find_unused_parameters=False, init_sync=False
    )


def _worker(out_dir):
    """Both tests' work in one launch (starting two processes costs ~12 s on 2 cores)."""
    torch.set_num_threads(1)
    rank = comm.get_rank()
    results = {"equivalence": _equivalence_steps(rank), "rows": _row_steps(rank)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(_worker, 2, dist_url="auto", args=(str(out),))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _equivalence_steps(rank):
    from drcl2.modeling.distributed import all_gather_rows

    rows = torch.full((2 * rank, 3), float(rank))  # rank 0: none, rank 1: two rows
    assert torch.equal(all_gather_rows(rows, [0, 2]), torch.ones(2, 3))
    pickled = comm.all_gather, comm.gather
    comm.all_gather = comm.gather = _no_pickled_gathers  # the step uses tensor collectives only
    results = {}
    for name, (opts, rank1_empty) in CASES.items():
        # float64: the two layouts then agree to ~1e-9 (float32 convolutions summed in another
        # order differ by ~1e-5 relative), so the 1e-5 tolerance below is far from rounding.
        model = build(*COMMON, *opts).double()
        results[name] = run_step(model, rank_batches(rank1_empty)[rank], wrap(model))
    comm.all_gather, comm.gather = pickled
    return results


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(two_processes):
    """
    Catches: per-rank means (a rank with fewer images / instances / pixels weighing as much as a
    full one), a missing world-size factor, misplaced InfoNCE positives or keys, gathered payloads
    out of rank order, draws that depend on the process layout, pickled gathers.

    "The same batch norm statistics": naiveSyncBN_N normalises with the mean and biased variance of
    the global batch, what one process's BatchNorm computes on the concatenated batch (running
    averages differ, unbiased vs biased, but no training forward reads them).
    """
    for name, (opts, rank1_empty) in CASES.items():
        model = build(*COMMON, *opts).double()
        first, second = rank_batches(rank1_empty)
        losses, grads = run_step(model, first + second)
        (losses0, grads0), (losses1, grads1) = (r["equivalence"][name] for r in two_processes)
        assert set(losses0) == set(losses1) == set(losses), name
        for k in losses:  # what DDP averages and detectron2's trainer logs: the mean over ranks
            assert (losses0[k] + losses1[k]) / 2 == pytest.approx(losses[k], abs=1e-5), (name, k)
        assert set(grads0) == set(grads1) == set(grads), name
        for n, g in grads.items():  # DDP has averaged: both ranks hold the global gradient
            assert torch.allclose(grads0[n], g, rtol=1e-5, atol=1e-5), (
                name,
                n,
                (grads0[n] - g).abs().max(),
            )
            assert torch.equal(grads0[n], grads1[n]), (name, n)
        if rank1_empty:
            assert losses1["loss_lcl_inst"] == 0.0


# ------------------------------------------------------------------------------------------------
ROWS = [
    "ablations/pretrain_hcl",
    "ablations/pretrain_hlcl",
    "ablations/pretrain_hlcl_drb",
    "ablations/pretrain_hlcl_drb_ar",
    "pretrain_2drcl",
]
LCL_ONLY = [
    "MODEL.DRCL2.HCL.ENABLED", False,
    "MODEL.DRCL2.AR.ENABLED", False,
    "MODEL.DRCL2.SR.ENABLED", False,
    "MODEL.DRCL2.RPN.ENABLED", False,
]  # fmt: skip


def row_options(name):
    """The MODEL.DRCL2 switches of an ablation row (or the LCL-only configuration) as options."""
    if name == "lcl_only":
        return LCL_ONLY
    from detectron2.config import get_cfg

    from drcl2.config import add_drcl2_config

    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", name + ".yaml"))
    d = cfg.MODEL.DRCL2
    return [
        opt
        for part in ("HCL", "LCL", "DRB", "AR", "SR", "RPN")
        for opt in (f"MODEL.DRCL2.{part}.ENABLED", d[part].ENABLED)
    ] + ["DATALOADER.SAMPLER_TRAIN", cfg.DATALOADER.SAMPLER_TRAIN]


def _row_steps(rank):
    missing = {}
    for name in ROWS + ["lcl_only"]:
        model = build(*row_options(name))
        ddp = wrap(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        data = global_batch()[rank : rank + 1]  # one image per rank
        for it, keep in enumerate((1 - rank, 0)):  # global instances: 1, then 0
            for v in ("view1", "view2"):
                data[0][v]["instances"] = global_batch()[rank][v]["instances"][:keep]
            with EventStorage(it):
                losses = ddp(data)
            sum(losses.values()).backward()  # fails at it = 1 if a parameter missed a gradient at 0
            missing[(name, it)] = [
                n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
            ]
            opt.step()
            opt.zero_grad(set_to_none=True)
    return missing


def test_every_row_gives_every_parameter_a_gradient_with_few_instances(two_processes):
    """
    Catches: a branch (LCL skipped for < 2 instances in the global batch, LCL-only rows) that
    leaves parameters without gradient: DDP then fails at the next step. One image per process
    also trains (naiveSyncBN_N normalises the MLPs over the global batch).
    """
    for r in (0, 1):
        missing = two_processes[r]["rows"]
        assert len(missing) == 2 * (len(ROWS) + 1)
        assert not any(missing.values()), {k: v for k, v in missing.items() if v}
