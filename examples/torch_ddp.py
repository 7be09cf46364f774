"""Trains a small transformer language model with DistributedDataParallel over collectives.

The text is the collectives package's own Python source, read character by character, so
nothing is downloaded. Rank 0 shows a progress bar (rich) with the loss and the job's
samples per second, and prints a sample of generated text at the end.

    torchrun --nproc-per-node 4 examples/torch_ddp.py                  # collectives' ring
    torchrun --nproc-per-node 4 examples/torch_ddp.py --backend gloo   # the same on gloo
    mpirun -np 4 python examples/torch_ddp.py                          # mpirun works too

    # DDP's all-reduces served by 2 reducers (CPU-only processes, here on the same machine),
    # which need the job's secret given to them:
    export COLLECTIVES_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')
    for i in 1 2; do collectives-reducer --rendezvous 127.0.0.1:29600 & done
    COLLECTIVES_NUM_REDUCERS=2 COLLECTIVES_RENDEZVOUS=127.0.0.1:29600 \\
        torchrun --nproc-per-node 4 examples/torch_ddp.py

    # gloo for the job, only the gradient buckets through collectives (a comm hook):
    torchrun --nproc-per-node 4 examples/torch_ddp.py --backend gloo --hook fp16

Needs torch and rich: the `examples` extra (pip install '/path/to/this/checkout[examples]'; scripts/demo
puts them into .venv).
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel as DDP

import collectives
import collectives.torch

HOOKS = {"allreduce": "allreduce_hook", "fp16": "fp16_compress_hook", "bf16": "bf16_compress_hook"}


class LanguageModel(nn.Module):
    """A decoder-only transformer over characters."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:n]
        return self.head(self.blocks(hidden, mask=self.causal[:n, :n], is_causal=True))


def corpus() -> str:
    """The collectives package's Python source: real text that ships with it."""
    return "\n".join(path.read_text() for path in sorted(Path(collectives.__file__).parent.rglob("*.py")))


def batch(data: torch.Tensor, size: int, context: int, generator: torch.Generator):
    starts = torch.randint(0, len(data) - context - 1, (size,), generator=generator)
    windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def sample(model: LanguageModel, prompt: torch.Tensor, length: int, context: int) -> torch.Tensor:
    tokens = prompt[None]
    for _ in range(length):
        logits = model(tokens[:, -context:])[0, -1]
        tokens = torch.cat([tokens, torch.multinomial(F.softmax(logits, -1), 1)[None]], dim=1)
    return tokens[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="collectives", help="torch.distributed backend (default: collectives)")
    parser.add_argument("--hook", choices=sorted(HOOKS), help="send DDP's gradient buckets through a collectives "
                        "Communicator with this comm hook (for another --backend)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="sequences per worker and step")
    parser.add_argument("--context", type=int, default=64, help="characters per sequence")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    if args.backend == "collectives":
        collectives.torch.init_process_group()  # torchrun, mpirun or COLLECTIVES_*
    else:
        dist.init_process_group(args.backend)
    rank, size = dist.get_rank(), dist.get_world_size()

    text = corpus()
    alphabet = sorted(set(text))
    data = torch.tensor([alphabet.index(c) for c in text], dtype=torch.long)
    torch.manual_seed(0)  # the same initial model everywhere (DDP broadcasts rank 0's anyway)
    model = LanguageModel(len(alphabet), args.context, args.width, args.layers, heads=4)
    ddp = DDP(model)
    comm = None
    if args.hook:
        comm = collectives.init()
        ddp.register_comm_hook(comm, getattr(collectives.torch.hooks, HOOKS[args.hook]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(rank)  # each worker its own batches

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}  {task.fields[rate]:.0f} samples/s"), TimeRemainingColumn()]
    with Progress(*columns, disable=rank != 0) as progress:
        task = progress.add_task(f"{size} workers, {args.backend}{f' + {args.hook} hook' if args.hook else ''}",
                                 total=args.steps, loss=math.log(len(alphabet)), rate=0.0)
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            inputs, targets = batch(data, args.batch, args.context, generator)
            loss = F.cross_entropy(ddp(inputs).flatten(0, 1), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rate = step * args.batch * size / (time.perf_counter() - started)
            progress.update(task, advance=1, loss=loss.item(), rate=rate)
    if rank == 0:
        print(f"step {args.steps}: loss {loss.item():.3f} (rank 0's batch), {rate:.0f} samples/s over {size} workers")
        prompt = data[:args.context // 2]
        print("sample:\n" + "".join(alphabet[i] for i in sample(model, prompt, 200, args.context).tolist()))
    if comm is not None:
        comm.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
