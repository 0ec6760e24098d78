"""Which samples train together: global batches grouped by modality and length, split per device.

Like LLaVA's `group_by_modality_length`, samples with images and text-only samples are batched
apart (a text-only micro-batch carries no vision work) and samples of similar length share a
micro-batch (less padding). Each epoch's plan is a pure function of (lengths, modality, sizes,
seed, epoch): a resumed run recomputes it and continues at the same step, and every process of a
distributed run computes the same plan and takes its own micro-batches.

A plan is a list of optimizer steps; a step is `processes x accumulation` micro-batches of
`micro_batch_size` samples. Within a step, samples are sorted by length and cut into micro-batches,
and process r takes micro-batches r, r + P, r + 2P, ... so every process gets a similar share of
long and short ones. Samples that do not fill a last global batch are left out of that epoch
(a new shuffle next epoch); the count is reported.
"""

from __future__ import annotations

import numpy as np


def plan_epoch(
    lengths: np.ndarray,
    has_image: np.ndarray,
    global_batch: int,
    micro_batch: int,
    seed: int,
    epoch: int,
    group_by_modality_length: bool = True,
    length_window: int = 1,
) -> list[list[list[int]]]:
    """Steps -> micro-batches -> sample indices, for one epoch."""
    if global_batch % micro_batch:
        raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch}")
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    steps: list[np.ndarray] = []
    if group_by_modality_length:
        leftovers = []
        for modality in (True, False):
            idx = np.flatnonzero(has_image == modality)
            idx = idx[rng.permutation(len(idx))]
            full = len(idx) // global_batch * global_batch
            leftovers.append(idx[full:])
            window = global_batch * length_window
            for start in range(0, full, window):
                chunk = idx[start : min(start + window, full)]
                chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
                steps.extend(chunk[s : s + global_batch] for s in range(0, len(chunk), global_batch))
        # The modalities' remainders share mixed global batches; what still does not fill one is left out.
        rest = np.concatenate(leftovers)
        full = len(rest) // global_batch * global_batch
        steps.extend(rest[s : s + global_batch] for s in range(0, full, global_batch))
        steps = [steps[i] for i in rng.permutation(len(steps))]
    else:
        idx = rng.permutation(n)
        steps = [idx[s : s + global_batch] for s in range(0, n // global_batch * global_batch, global_batch)]
    plan = []
    for step in steps:
        if group_by_modality_length:
            step = step[np.argsort(-lengths[step], kind="stable")]
        plan.append([step[s : s + micro_batch].tolist() for s in range(0, global_batch, micro_batch)])
    return plan


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


def rank_micro_batches(step: list[list[int]], rank: int, num_processes: int) -> list[list[int]]:
    """This process's micro-batches of one step (interleaved, for balanced work)."""
    return step[rank::num_processes]
