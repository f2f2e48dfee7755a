"""A DDP training loop that reads only the kept samples, with equal epochs on every rank.

    torchrun --nproc_per_node 2 examples/train_ddp.py --shards 'data/train-*.tar' --keep run/keep

gloo on CPUs, nccl on GPUs (one per process). `even_epochs=True` gives every rank and every
DataLoader worker exactly the same number of kept samples per epoch, so uneven shards never
leave one rank waiting in an all-reduce.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from streamprune import PrunedWebDataset, ToTensors, small_cnn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--keep", required=True, help="keep-list directory (RUN/keep)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes per rank")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    model = small_cnn(num_classes=10, in_channels=1).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    # made after init_process_group: the dataset takes its rank from the process group
    ds = PrunedWebDataset(args.shards, keep=args.keep, shardshuffle=100, even_epochs=True)
    batches = ds.shuffle(500).map(ToTensors(rank)).batched(args.batch_size)
    for epoch in range(args.epochs):
        ds.set_epoch(epoch)  # the same shard order on every rank, a new one each epoch
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.num_workers)
        n = steps = 0
        for x, y in loader:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n, steps = n + len(y), steps + 1
        counts = torch.tensor([n, steps], device=device)
        gathered = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts)
        if rank == 0:
            print(
                f"epoch {epoch}: samples, steps per rank = {[tuple(g.tolist()) for g in gathered]} "
                f"(expected {ds.epoch_length(world, args.num_workers)} samples each)"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
