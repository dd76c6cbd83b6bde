"""Train a small classifier with LARS on several processes, under DDP or FSDP2.

    torchrun --nproc_per_node=2 examples/train_ddp_fsdp.py --parallel fsdp2
    torchrun --nproc_per_node=2 examples/train_ddp_fsdp.py --parallel ddp

Runs on the CPU with the gloo backend, or on one GPU per process with NCCL when CUDA is
available. The data is synthetic: labels from a fixed random "teacher" network, so the example
needs no download. Each process trains on its own slice of every global batch, which is what
makes the batch large, and LARS's layer-wise trust ratios keep the large learning rate stable.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from torchlars import LARS, exclude_bias_and_norm


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 256), nn.LayerNorm(256), nn.ReLU(),
        nn.Linear(256, 256), nn.LayerNorm(256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def global_batch(step: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every process (each then takes its slice)."""
    generator = torch.Generator().manual_seed(step)
    teacher = torch.Generator().manual_seed(1234)
    inputs = torch.randn(size, 32, generator=generator)
    labels = (inputs @ torch.randn(32, 10, generator=teacher)).argmax(dim=1)
    return inputs.to(device), labels.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", choices=["ddp", "fsdp2"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch size")
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every process
    model = make_model().to(device)
    if args.parallel == "ddp":
        # Parameters and (averaged) gradients are replicated: every norm is already whole.
        model = DistributedDataParallel(model)
    else:
        # Every parameter becomes a DTensor sharded across the processes. LARS takes each
        # layer's norm over the whole parameter, with one all-reduce per step for all layers.
        mesh = init_device_mesh(device.type, (world_size,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    # Biases and LayerNorm parameters are left out of the adaptation, as large-batch recipes do.
    base = torch.optim.SGD(exclude_bias_and_norm(model, weight_decay=5e-4), lr=args.lr, momentum=0.9)
    optimizer = LARS(base, trust_coef=0.001, clip=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(base, max_lr=args.lr, total_steps=args.steps)

    local_batch = args.batch_size // world_size
    for step in range(args.steps):
        inputs, labels = global_batch(step, args.batch_size, device)
        inputs = inputs[rank * local_batch : (rank + 1) * local_batch]
        labels = labels[rank * local_batch : (rank + 1) * local_batch]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0 or step == args.steps - 1:
            loss = loss.detach()
            dist.all_reduce(loss)
            if rank == 0:
                print(f"{args.parallel} step {step:3d}  loss {loss.item() / world_size:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
