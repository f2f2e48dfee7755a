"""Training a fresh model on a keep-list's samples and measuring its test accuracy: the
evidence that a keep-list is good. Reads through `PrunedWebDataset`, in one process (CPU
or one GPU), with the proxy's recipe and a cosine schedule over the run's epochs.

The budget rule (`budget`): `steps` (default) trains every subset for as many SGD steps as
the full-data run of `epochs` epochs, i.e. `round(epochs * N / kept)` epochs of the subset,
so a pruned set is judged near the convergence its size allows and not by how few steps it
got; `epochs` trains every subset for `epochs` epochs (fewer steps on smaller subsets, the
cheaper protocol that favours easy samples).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds

from streamprune.errors import InputError, SettingsError
from streamprune.formats.keeplist import KeepList
from streamprune.loader import PrunedWebDataset
from streamprune.progress import progress_bar
from streamprune.settings import BUDGETS
from streamprune.shards.urls import expand_urls
from streamprune.training.decode import SampleDecoder, ToTensors
from streamprune.training.models import build_model
from streamprune.training.recipe import make_sgd, set_cosine_lr, train_step


@dataclass
class TrainResult:
    """Test accuracy of a model trained on a subset, and what it took."""

    test_accuracy: float
    train_samples: int  # per epoch
    epochs: int  # epochs run (more than asked on a subset under the `steps` budget)
    seconds: float
    model: torch.nn.Module = field(repr=False)  # the trained model
    history: list[dict] = field(default_factory=list)  # per epoch: loss, accuracy (training)

    def figures(self) -> dict:
        """Everything but the model, JSON-able (benchmark logs)."""
        return {k: v for k, v in vars(self).items() if k != "model"}


def train_subset(
    train_urls: str | list[str],
    test_urls: str | list[str],
    keep: KeepList | str | os.PathLike | None,
    *,
    epochs: int = 10,
    model: str | None = None,
    num_classes: int = 10,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    loader_workers: int = 1,
    augment_images: bool = True,
    budget: str = "steps",
    decoder: SampleDecoder | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train a fresh model dev the kept samples (all when `keep` is None) and return its
    accuracy dev `test_urls`. `epochs` is the full-data run's length; `budget` (`steps` or
    `epochs`) says how a subset's run is sized (see the module). `decoder`: how samples become
    examples (default: `cls` labels, images at their own size; `recorder.run_decoder` gives a
    recorded run's). On CPU the same arguments train the same weights: initialisation, shard
    and sample order and the workers' augmentation all derive from `seed`."""
    train_urls, test_urls = expand_urls(train_urls), expand_urls(test_urls)
    keep = keep if keep is None or isinstance(keep, KeepList) else KeepList.load(keep)
    epochs = subset_epochs(epochs, keep, budget)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    decoder = decoder or SampleDecoder()
    first = next(iter(wds.WebDataset(test_urls, shardshuffle=False, nodesplitter=None, workersplitter=None)))
    net = build_model(model, tuple(decoder(first)[0].shape), num_classes).to(dev)
    opt = make_sgd(net, lr)
    t0, history, n = time.perf_counter(), [], 0
    for epoch in range(epochs):
        s = seed * 100003 + epoch  # a new shard and sample order each epoch
        base = (
            wds.WebDataset(train_urls, shardshuffle=100, seed=s)
            if keep is None
            else PrunedWebDataset(train_urls, keep=keep, shardshuffle=100, seed=s)
        )
        train = base.shuffle(1000, seed=s).map(ToTensors(s, augment_images, decoder=decoder)).batched(batch_size)
        set_cosine_lr(opt, lr, epoch, epochs)
        net.train()
        n, loss_sum, correct = 0, 0.0, 0
        loader = torch.utils.data.DataLoader(train, batch_size=None, num_workers=loader_workers)
        for x, y in progress_bar(
            loader, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", leave=False, disable=not progress
        ):
            x, y = x.to(dev, non_blocking=True), torch.as_tensor(y).to(dev, non_blocking=True)
            logits, loss = train_step(net, opt, x, y)
            n += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch, "loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)})
    seconds = time.perf_counter() - t0
    return TrainResult(accuracy_on(net, test_urls, dev, batch_size, decoder), n, epochs, seconds, net, history)


def subset_epochs(epochs: int, keep: KeepList | None, budget: str = "steps") -> int:
    """Epochs to train on `keep`'s samples: `epochs` for all samples or the `epochs` budget,
    `round(epochs * N / kept)` (as many steps as the full run) for the `steps` budget."""
    if budget not in BUDGETS:
        raise SettingsError(f"budget must be one of {list(BUDGETS)}, not {budget!r}")
    if epochs < 1:
        raise SettingsError(f"epochs must be >= 1, not {epochs}")
    if keep is None or budget == "epochs":
        return epochs
    total = int(keep.samples.sum()) if keep.samples is not None else int(keep.manifest.get("n_rows", 0))
    if len(keep) == 0 or total <= 0:
        raise SettingsError(f"cannot size a steps budget for a keep-list of {len(keep)} of {total} samples")
    return max(epochs, int(np.floor(epochs * total / len(keep) + 0.5)))


@torch.no_grad()
def accuracy_on(
    net: torch.nn.Module,
    test_urls: str | list[str],
    device: torch.device,
    batch_size: int = 256,
    decoder: SampleDecoder | None = None,
) -> float:
    """Top-1 accuracy of `net` on every sample of `test_urls` (decoded by `decoder`, unaugmented)."""
    net.eval()
    data = (
        wds.WebDataset(expand_urls(test_urls), shardshuffle=False, nodesplitter=None)
        .map(ToTensors(0, False, decoder=decoder))
        .batched(batch_size)
    )
    right = total = 0
    for x, y in data:
        pred = net(x.to(device)).argmax(1).cpu()
        right += int((pred == torch.as_tensor(y)).sum())
        total += len(y)
    if not total:
        raise InputError(f"no test samples in {test_urls!r}")
    return right / total
