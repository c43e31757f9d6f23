"""Is it faster to train one run with all cores, or several 1-thread runs side by side?

    python tools/bench_threads.py [--model resnet8] [--batch 128] [--steps 20]

Times forward + backward + SGD steps of a model on random 28-px images: one process with
cores threads, then `cores` processes with 1 thread each at the same time. The total images/s
of each way and their ratio decide `run_table.py --jobs`.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time



def images_per_second(model_name: str, batch: int, steps: int, threads: int) -> float:
    import torch

    from ltrainer.trainer.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last
    model = create_model(model_name, 10, in_channels=1).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    for i in range(steps + 3):   # 3 warm-up steps
        if i == 3:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def _worker(args):
    return images_per_second(*args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet8")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")   # a fresh interpreter per measurement: clean thread pools
    with ctx.Pool(1) as pool:
        one = pool.apply(images_per_second, (args.model, args.batch, args.steps, args.cores))
    with ctx.Pool(args.cores) as pool:
        each = pool.map(_worker, [(args.model, args.batch, args.steps, 1)] * args.cores)
    print(f"{args.model}, batch {args.batch}, {args.steps} timed steps, {args.cores} cores")
    print("| way | images/s (total) |\n|---|---|")
    print(f"| 1 process x {args.cores} threads | {one:.0f} |")
    print(f"| {args.cores} processes x 1 thread | {sum(each):.0f} "
          f"({', '.join(f'{v:.0f}' for v in each)}) |")
    print(f"ratio (processes / threads): {sum(each) / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
