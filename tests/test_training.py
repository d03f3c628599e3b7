"""puzzle/training.py, the toolkit BLD and GKD share: each recipe's schedule and data order are the ones it
had before the toolkit (the references below are the recipes' former code), bit for bit."""

import math

import numpy as np
import pytest
import torch

from puzzle import training


def bld_factor_before(steps, warmup_fraction, min_lr_ratio):
    """library/bld.py's `cosine_with_warmup` before the toolkit."""
    warmup = max(1, round(steps * warmup_fraction)) if steps > 1 else 0

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def gkd_lr_before(step, steps, warmup_steps, lr, min_lr):
    """distill/trainer.py's `lr_at` before the toolkit."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def bld_batches_before(blocks, batch_size, seed):
    """library/bld.py's `endless_batches` before the toolkit."""
    batch_size = min(batch_size, len(blocks))
    epoch = 0
    while True:
        order = np.random.default_rng(seed + epoch).permutation(len(blocks))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(np.asarray(blocks[order[start : start + batch_size]], dtype=np.int64))
        epoch += 1


@pytest.mark.parametrize("steps, fraction, ratio", [(1, 0.3, 0.1), (2, 0.3, 0.1), (48, 0.3, 0.1), (97, 0.05, 0.3),
                                                    (10, 0.0, 0.5), (7, 1.0, 0.1)])
def test_bld_schedule_is_its_former_one_bit_for_bit(steps, fraction, ratio):
    before = bld_factor_before(steps, fraction, ratio)
    warmup = training.warmup_steps(steps, fraction)
    now = [training.cosine_lr(s, steps=steps, warmup=warmup, peak=1.0, floor=ratio) for s in range(steps + 3)]
    assert now == [before(s) for s in range(steps + 3)]


@pytest.mark.parametrize("steps, warmup, lr, min_lr", [(100, 10, 1e-4, 1e-5), (7, 2, 2e-3, 2e-4), (5, 0, 3e-3, 3e-3),
                                                       (3, 5, 1e-3, 1e-4)])
def test_gkd_schedule_is_its_former_one_bit_for_bit(steps, warmup, lr, min_lr):
    now = [training.cosine_lr(s, steps=steps, warmup=warmup, peak=lr, floor=min_lr) for s in range(steps + 3)]
    assert now == [gkd_lr_before(s, steps, warmup, lr, min_lr) for s in range(steps + 3)]


@pytest.mark.parametrize("n, batch_size", [(30, 4), (8, 4), (3, 4), (5, 1)])
def test_bld_batch_stream_is_its_former_order(n, batch_size):
    blocks = np.arange(n * 2).reshape(n, 2)
    stream = training.BatchStream(blocks, batch_size, 7, straddle=False, epoch_seed=training.sum_seed)
    before = bld_batches_before(blocks, batch_size, 7)
    for i, batch in zip(range(3 * n), stream):
        assert torch.equal(batch, next(before)) and torch.equal(stream[i], batch), i


def test_param_groups_decay_matrices_only():
    layer, norm = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)
    params = [*layer.parameters(), *norm.parameters()]
    decayed, rest = training.param_groups(params, 0.1)
    assert decayed["weight_decay"] == 0.1 and decayed["params"] == [layer.weight]
    assert rest["weight_decay"] == 0.0 and rest["params"] == [layer.bias, norm.weight, norm.bias]


def test_due_every_nth_and_the_last():
    assert [c for c in range(1, 12) if training.due(c, 4, 10)] == [4, 8, 10]
