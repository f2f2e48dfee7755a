"""The training recipe the proxy and fresh models share: SGD with Nesterov momentum, weight
decay and a per-epoch cosine learning rate (the reference's CIFAR recipe)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_sgd(
    model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True
) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def set_cosine_lr(opt: torch.optim.Optimizer, base_lr: float, epoch: int, schedule_epochs: int) -> None:
    """Learning rate of `epoch` on a cosine schedule of `schedule_epochs` epochs."""
    for g in opt.param_groups:
        g["lr"] = 0.5 * base_lr * (1 + math.cos(math.pi * epoch / schedule_epochs))


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on cross-entropy; returns the logits and the mean loss. Labels -1 (skipped
    samples) are left out; a batch of only those still steps (DDP needs every rank's backward)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, ignore_index=-1) if bool((y >= 0).any()) else logits.sum() * 0.0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return logits, loss


def sync_from_rank0(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Give every rank rank 0's weights, buffers and momentum after an epoch.

    With uneven inputs, `Join` shadows the all-reduces of a rank that ran out of data but
    does not step its optimizer, so ranks drift apart; rank 0's state is also what the
    checkpoint holds, so this makes a resumed run continue exactly as an uninterrupted one.
    """
    import torch.distributed as dist

    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for p in model.parameters():
        state = opt.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p.data)
        tensors.append(state["momentum_buffer"])
    for t in tensors:
        dist.broadcast(t, 0)
