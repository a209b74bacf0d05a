"""A small training loop shared by the recipes: SGD with Nesterov momentum, cosine learning rate.

Method-specific pieces plug in as callables: ``penalty(model)`` is added to the loss (slope, gate
or priority regularizers) and ``after_step()`` runs after each optimizer step (slope clipping,
skip-fade schedule).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graphfold.train.data import random_shift

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "fit"]


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    max_shift: int = 1,
    seed: int = 0,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[], object] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> float:
    """Train ``model`` in place for ``epochs`` and return the mean loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    # Weight decay would pull Layer Folding slopes towards 0, against their own regularizer.
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in named if not name.endswith("slope")], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name.endswith("slope")], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = max(epochs * steps_per_epoch, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    model.train()
    last = float("nan")
    with tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            running = 0.0
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                inputs = random_shift(x[idx], max_shift, generator)
                loss = F.cross_entropy(model(inputs), y[idx])
                if penalty is not None:
                    loss = loss + penalty(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if after_step is not None:
                    after_step()
                running += loss.item() * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            last = running / len(x)
            logger.debug("%s: epoch loss %.4f", desc, last)
    return last


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int((model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(x), 1)
