"""
Seeds derived from a run's seed: drcl2's one way to give a stream of random numbers its own seed
(the images' augmentations, each training step's random numbers, a pre-training step's draws of
instances and masked patches), so that a resumed run repeats the uninterrupted one's.
"""

import contextlib
import random

import numpy as np
import torch

__all__ = [
    "IMAGE_STREAM",
    "STEP_STREAM",
    "DRAW_STREAM",
    "derived_seed",
    "seed_global_random_state",
    "seeded_random_state",
]

# Tags that keep the streams apart: per image, per training step, per image of a step's draws.
IMAGE_STREAM, STEP_STREAM, DRAW_STREAM = 0, 1, 2


def derived_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and integer ``keys`` (numpy's SeedSequence hashing:
    neighbouring keys give unrelated streams)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF] + [int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_global_random_state(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch's default generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_random_state(seed: int):
    """
    Run the block with python's, numpy's and torch's global random state seeded from ``seed``, and
    give the caller's random state back afterwards (so mapping in the main process,
    ``NUM_WORKERS == 0``, or the images re-mapped at a resume, do not disturb the training step's
    random numbers).

    ``torch.manual_seed`` also reseeds every CUDA generator, so their states are saved and given
    back too where CUDA is initialised (the main process of a GPU run). Elsewhere (a CPU run, a
    DataLoader worker, which must not initialise CUDA) torch only queues that seed for a later CUDA
    start, and the step's own seeding queues its seed after it.
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    seed_global_random_state(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
