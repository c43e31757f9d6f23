"""Training throughput of the engine against a bare hand-written PyTorch loop, in one run.

    python tools/bench_train.py [CONFIG] [--epochs 3] [--repeats 3] [key=value ...]

Both loops train the same model (built by the same method) on the same dataset and transform
with the same batch size, optimizer and number of threads; the bare loop is the ten lines a
user would write (DataLoader with shuffle, forward, CE, backward, SGD step). The engine adds
its sampler, lr schedule, logging, loss checks and per-epoch checkpoint. Each side runs
`--repeats` times, alternating, and the best epoch time of each is compared.

`--heap` sets glibc's mmap threshold first (trainer/extraction.py: bounded_heap): `glibc` leaves
glibc's dynamic one, `after-pass` is what training sees after a split-wide pass (fixed 32 MB,
heap trimmed), `small` keeps the passes' 64 KB on for training. The last line gives the
process's user and system CPU seconds, which other jobs on a shared machine hardly move.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from ltrainer.trainer.config import load_config  # noqa: E402
from ltrainer.trainer.engine import Trainer  # noqa: E402


CLOCK = [time.perf_counter]   # --clock


def bare_epoch(model, dataset, batch, lr, memory_format) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4)
    model.train()
    n, t0 = 0, CLOCK[0]()
    for images, labels in loader:
        images = images.contiguous(memory_format=memory_format)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(images)
    return CLOCK[0]() - t0, n


def engine_epoch(trainer: Trainer) -> tuple[float, int]:
    t0 = CLOCK[0]()
    trainer.train_epoch()
    trainer.save_checkpoint()
    steps = trainer.data.train_loader("uniform", trainer.epoch)[1].num_batches
    return CLOCK[0]() - t0, steps * trainer.cfg.data.batch_size


def set_heap(mode: str) -> None:
    """glibc's mmap threshold for the run: see --heap."""
    from ltrainer.trainer import extraction

    if mode == "after-pass":
        with extraction.bounded_heap():
            pass
    elif mode == "small":
        extraction._mallopt(extraction.M_MMAP_THRESHOLD, extraction.HEAP_MMAP_THRESHOLD)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", default=os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU seconds (time.process_time), which other "
                        "jobs on a shared machine hardly move; fair with data.workers: 0")
    p.add_argument("--heap", choices=("glibc", "after-pass", "small"), default="glibc",
                   help="glibc's mmap threshold during the run (see above)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)   # key=value overrides may follow options
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    set_heap(args.heap)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"run.out_dir={tmp}", "engine.progress=none",
                                        "sched.warmup_epochs=0", *args.overrides])
        trainer = Trainer(cfg)
        bare_model = trainer.method.build_model().to(memory_format=trainer.memory_format)
        rates = {"bare loop": [], "engine": []}
        for _ in range(args.repeats):
            sec, n = bare_epoch(bare_model, trainer.data.train, cfg.data.batch_size,
                                cfg.optim.lr, trainer.memory_format)
            rates["bare loop"].append(n / sec)
            sec, n = engine_epoch(trainer)
            rates["engine"].append(n / sec)
        trainer.log.close()
    best = {k: max(v) for k, v in rates.items()}
    print(f"{args.clock} clock; config {os.path.basename(args.config)}: model "
          f"{cfg.model.name}, batch {cfg.data.batch_size}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats} epochs")
    print("| loop | images/s (best) | all epochs |")
    print("|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {best[k]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |")
    print(f"ratio engine / bare loop: {best['engine'] / best['bare loop']:.3f}")
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(f"heap {args.heap}: CPU time user {use.ru_utime:.1f} s + system {use.ru_stime:.1f} s "
          f"= {use.ru_utime + use.ru_stime:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
