"""Time and peak memory of the real workload's fixed costs at its true size (issue 12 item 7):
list parsing, --dry-run, data set + sampler construction, time to the first training step,
the kNN monitor on a 437,513 x 2,048 bank sharded over 4 gloo processes, and the size of an
evaluation's results.json. Each measurement runs in a fresh process, so peaks are separate.

    python tools/make_synthetic_lt.py --out /data/synth_inat --profile inat2018 \
        --list ../shared/lists/iNaturalist18_val.txt.gz --size tiny
    python tools/make_synthetic_lt.py --out /data/synth_inlt --profile imagenet_lt \
        --counts ../shared/lists/ImageNet_LT_train_counts.json \
        --list ../shared/lists/ImageNet_LT_val.txt.gz --list ../shared/lists/ImageNet_LT_test.txt.gz
    python tools/bench_scale.py --inat /data/synth_inat --inlt /data/synth_inlt --out scale.md

A folder is what make_synthetic_lt.py writes: the list files and images/ (tiny images are
enough: only the steps measured here read any). Training runs use a tiny model (ResNet-8 at
16 px, fp32) so that what is timed is the fixed cost that grows with the data set, not the
model. Peak memory is the process's peak RSS (getrusage; wait4 for child commands).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETS = {  # name -> (config, train list, val list, test list or None, classes)
    "inat": ("configs/inat_moco_crt.yaml", "iNaturalist18_train.txt", "iNaturalist18_val.txt",
             None, 8142),
    "inlt": ("configs/imagenet_lt_moco_crt.yaml", "ImageNet_LT_train.txt", "ImageNet_LT_val.txt",
             "ImageNet_LT_test.txt", 1000),
}
SINGLE = {"inat": "configs/inat_ce.yaml", "inlt": "configs/imagenet_lt_ce.yaml"}
TINY = ["model.name=resnet8", "data.image_size=16", "engine.amp=none",
        "model.channels_last=false", "data.workers=1", "engine.progress=lines",
        "engine.log_every=1"]
KNN_BANK_DTYPE = "float16"
TARGETS = {"dryrun": ("seconds", 30.0), "first_step": ("seconds", 60.0), "knn": ("rank_mb", 1024.0),
           "results": ("bytes", 1e6)}


def data_overrides(name: str, folder: str) -> list[str]:
    _, train, val, test, _ = SETS[name]
    out = [f"data.root={os.path.join(folder, 'images')}",
           f"data.train_list={os.path.join(folder, train)}",
           f"data.val_list={os.path.join(folder, val)}"]
    return out + ([f"data.test_list={os.path.join(folder, test)}"] if test else [])


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def rss_mb() -> float:
    """This process's resident memory now (the baseline a measured step adds to)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_command(cmd: list[str], until: str | None = None, env=None, timeout: float = 400):
    """(seconds, peak RSS MB, output) of a command; with `until`, seconds to the first output
    line holding it, after which the command is stopped (its process group)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=dict(os.environ, **(env or {})))
    seconds, lines = None, []
    deadline = t0 + timeout
    for line in proc.stdout:
        lines.append(line)
        if until and until in line and seconds is None:
            seconds = time.perf_counter() - t0
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    if seconds is None:
        seconds = time.perf_counter() - t0
        if until or os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)} ended (status {status}) without "
                               f"{until or 'success'}:\n{''.join(lines[-20:])}")
    return seconds, usage.ru_maxrss / 1024.0, "".join(lines)


# ----------------------------------------------------------------------------- measurements
# Each returns a dict: seconds, peak_mb, and what it measured ("what").

def m_parse(name, folder, args):
    from ltrainer.data_pipelines.sources import open_source
    _, train, _, _, classes = SETS[name]
    base = peak_mb()
    t0 = time.perf_counter()
    src = open_source("list", os.path.join(folder, "images"), "train",
                      os.path.join(folder, train), num_classes=classes)
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_mb(), "base_mb": base,
            "what": f"{len(src.labels):,} lines, {src.num_classes:,} classes (open_source)"}


def m_dryrun(name, folder, args):
    cmd = [sys.executable, "launchers/train.py", SETS[name][0], "--dry-run",
           *data_overrides(name, folder)]
    s, mb, out = run_command(cmd)
    return {"seconds": s, "peak_mb": mb, "what": "train.py CONFIG --dry-run (whole process)"}


def m_data(name, folder, args):
    from ltrainer.data_pipelines.build import build_data
    from ltrainer.data_pipelines.samplers import build_sampler
    from ltrainer.trainer.pipeline import load_plan
    plan = load_plan(os.path.join(ROOT, SETS[name][0]), [*data_overrides(name, folder), *TINY])
    crt = next(s for s in plan if s.cfg.method.name == "crt")
    t0 = time.perf_counter()
    data = build_data(crt.cfg.data, eval_splits=())
    t1 = time.perf_counter()
    sampler = build_sampler("class_aware", data.train.source.labels,
                            batch_size=crt.cfg.data.batch_size)
    draws = len(sampler.global_order(0))
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "peak_mb": peak_mb(),
            "what": f"build_data {t1 - t0:.1f} s + class-aware sampler, one cRT epoch "
                    f"({draws:,} draws) {t2 - t1:.1f} s"}


def m_first_step(name, folder, args):
    out = tempfile.mkdtemp(prefix="bench_scale_")
    cmd = [sys.executable, "launchers/train.py", SETS[name][0], *data_overrides(name, folder),
           *TINY, f"run.out_dir={out}", "data.batch_size=64", "pretrain.data.batch_size=64",
           "moco.queue=1024"]
    s, mb, _ = run_command(cmd, until=" step 1/")
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": s, "peak_mb": mb, "what": "train.py CONFIG: start to the MoCo stage's "
                                                 "step 1 log line (ResNet-8, 16 px, batch 64)"}


def m_results(name, folder, args):
    """A single-stage CE run of one step that then evaluates on every class: results.json as the
    engine writes it."""
    out = tempfile.mkdtemp(prefix="bench_scale_")
    cmd = [sys.executable, "launchers/train.py", SINGLE[name], *data_overrides(name, folder),
           *TINY, f"run.out_dir={out}", "engine.max_steps=1", "data.batch_size=64",
           "data.eval_batch_size=512", "eval.split=val"]
    s, mb, _ = run_command(cmd)
    path = next(os.path.join(d, "results.json") for d, _, files in os.walk(out)
                if "results.json" in files)
    size = os.path.getsize(path)
    extra = sum(os.path.getsize(os.path.join(os.path.dirname(path), f))
                for f in os.listdir(os.path.dirname(path)) if f.endswith(".npz"))
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": s, "peak_mb": mb, "bytes": size,
            "what": f"results.json {size / 1e3:,.0f} KB (+ .npz {extra / 1e3:,.0f} KB) after "
                    f"a 1-step CE run evaluated on val (whole run)"}


def m_knn(name, folder, args):
    """4 gloo ranks (python bench_scale.py --knn-rank R), each embedding its shard of the bank
    through Trainer.embed and the monitor's prepare_eval, then answering query batches."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--knn-rank", str(r),
                               "--world", str(args.world), "--port", str(port),
                               "--bank", str(args.bank), "--dim", str(args.dim)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"))
             for r in range(args.world)]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    o = outs[0]
    rank_mb = max(x["peak_mb"] - x["base_mb"] for x in outs)
    per_rank = ", ".join(f"{x['peak_mb']:.0f}" for x in outs)
    added = ", ".join(f"{x['peak_mb'] - x['base_mb']:.0f}" for x in outs)
    return {"seconds": time.perf_counter() - t0, "peak_mb": max(x["peak_mb"] for x in outs),
            "rank_mb": rank_mb,
            "what": f"{args.bank:,} x {args.dim:,} bank over {args.world} ranks "
                    f"({o['rows']:,} rows each, {o['bank_mb']:.0f} MB): prepare_eval "
                    f"{o['embed_s']:.1f} s, a query batch of {o['queries']} "
                    f"{o['query_s']:.2f} s; peak RSS per rank {per_rank} MB, of which the "
                    f"monitor added {added} MB (the rest: torch and the trainer imported)"}


MEASURES = {"parse": ("list parsing", m_parse), "dryrun": ("--dry-run", m_dryrun),
            "data": ("data set + cRT sampler", m_data),
            "first_step": ("time to first training step", m_first_step),
            "knn": ("kNN monitor, 4 ranks", m_knn), "results": ("results.json", m_results)}


def knn_rank(args) -> dict:
    """One rank of the kNN measurement: the real Trainer.embed + SelfSupervised.prepare_eval /
    predict on a stand-in model whose features are random unit vectors (no images needed)."""
    import contextlib
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from ltrainer.trainer.engine import Trainer
    from ltrainer.trainer.extraction import bounded_heap
    from ltrainer.trainer.methods.ssl_base import SelfSupervised

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                            rank=args.knn_rank, world_size=args.world)
    r, w, batch, classes = args.knn_rank, args.world, 512 // args.world, 8142
    rows = len(range(r, args.bank, w))

    class Loader:   # this rank's eval batches of the train split: r, r + w, ...
        def __len__(self):
            return -(-rows // batch)

        def __iter__(self):
            g = torch.Generator().manual_seed(r)
            for a in range(0, rows, batch):
                n = min(batch, rows - a)
                yield torch.randn(n, args.dim, generator=g), torch.randint(classes, (n,),
                                                                           generator=g)

    class Identity(torch.nn.Module):
        def features(self, x):
            return x

    model = Identity()
    fake = SimpleNamespace(model=model, train_model=model, device=torch.device("cpu"),
                           data=SimpleNamespace(eval_loader=lambda split: Loader()),
                           autocast=contextlib.nullcontext, _to_device=lambda b: b,
                           info=SimpleNamespace(world_size=w, rank=r))
    fake.embed = lambda *a, **k: Trainer.embed(fake, *a, **k)
    method = SelfSupervised.__new__(SelfSupervised)
    if isinstance(method, torch.nn.Module):   # methods are modules (issue 17)
        torch.nn.Module.__init__(method)
    method.model = model
    # knn.bank_dtype as configs/inat_moco_crt.yaml sets it (tests/test_knn_monitor.py checks)
    method.cfg = SimpleNamespace(knn=SimpleNamespace(k=20, t=0.1, bank_dtype=KNN_BANK_DTYPE))
    method.data = SimpleNamespace(num_classes=classes)
    base = rss_mb()
    t0 = time.perf_counter()
    method.prepare_eval(fake)
    embed_s = time.perf_counter() - t0
    kept_mb = rss_mb() - base   # what the pass leaves held: the bank, not freed batches
    bank_mb = sum(b.element_size() * b.nelement() for b in method.bank) / 2 ** 20
    queries = torch.randn(batch, args.dim)
    t0 = time.perf_counter()
    with bounded_heap():   # as inside the engine, whose predict runs in Trainer.embed
        method.predict(model, queries)
    query_s = time.perf_counter() - t0
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": r, "rows": rows, "bank_mb": bank_mb, "embed_s": embed_s, "kept_mb": kept_mb,
            "queries": batch * w, "query_s": query_s, "peak_mb": peak_mb(), "base_mb": base}


# ----------------------------------------------------------------------------- table

def verdict(key: str, res: dict) -> str:
    if key not in TARGETS or "error" in res:
        return ""
    field, bound = TARGETS[key]
    ok = res[field] < bound
    shown = {"seconds": f"< {bound:.0f} s", "rank_mb": f"< {bound / 1024:.0f} GB per rank (added by the monitor)",
             "bytes": f"< {bound / 1e6:.0f} MB"}[field]
    return f"{shown}: {'pass' if ok else 'FAIL'}"


def table(results: list, info: str) -> str:
    lines = [info, "", "| data set | measurement | time s | peak RSS MB | target (iNat) | what |",
             "|---|---|---:|---:|---|---|"]
    for name, key, res in results:
        if "error" in res:
            lines.append(f"| {name} | {MEASURES[key][0]} | - | - | | error: {res['error']} |")
            continue
        target = verdict(key, res) if name == "inat" else ""
        lines.append(f"| {name} | {MEASURES[key][0]} | {res['seconds']:.1f} | "
                     f"{res['peak_mb']:,.0f} | {target} | {res['what']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inat", help="iNat-shaped folder (make_synthetic_lt.py --profile inat2018)")
    p.add_argument("--inlt", help="ImageNet-LT-shaped folder (--profile imagenet_lt)")
    p.add_argument("--only", default=",".join(MEASURES), help="measurements, comma-separated")
    p.add_argument("--out", help="also write the table here (Markdown)")
    p.add_argument("--bank", type=int, default=437_513, help="kNN bank rows")
    p.add_argument("--dim", type=int, default=2048, help="kNN feature dimension")
    p.add_argument("--world", type=int, default=4, help="kNN ranks")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--knn-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.knn_rank is not None:
        print(json.dumps(knn_rank(args)))
        return 0
    if args.measure:
        print(json.dumps(MEASURES[args.measure][1](args.dataset, args.folder, args)))
        return 0
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = [k for k in keys if k not in MEASURES]
    if bad:
        print(f"bench_scale: --only {','.join(bad)}: unknown; choose from {', '.join(MEASURES)}",
              file=sys.stderr)
        return 2
    sets = [(n, f) for n, f in (("inat", args.inat), ("inlt", args.inlt)) if f]
    for n, f in sets:
        if not os.path.isfile(os.path.join(f, SETS[n][1])):
            print(f"bench_scale: --{n} {f}: no {SETS[n][1]} there (make it with "
                  f"tools/make_synthetic_lt.py, see --help)", file=sys.stderr)
            return 2
    if not sets:
        print("bench_scale: give --inat FOLDER and/or --inlt FOLDER (see --help)", file=sys.stderr)
        return 2
    jobs = [(n, f, k) for n, f in sets for k in keys if not (k == "knn" and n != "inat")]
    results, start = [], time.perf_counter()
    for i, (name, folder, key) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {name}: {MEASURES[key][0]} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--measure", key, "--dataset", name,
               "--folder", folder, "--bank", str(args.bank), "--dim", str(args.dim),
               "--world", str(args.world)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            err = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
            res = {"error": err[:300]}
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append((name, key, res))
        shown = res.get("error") or f"{res['seconds']:.1f} s, {res['peak_mb']:,.0f} MB"
        print(f"[{i}/{len(jobs)}] {name}: {MEASURES[key][0]}: {shown}", file=sys.stderr, flush=True)
    import torch
    info = (f"Measured on synthetic lists shaped like the real ones (tools/make_synthetic_lt.py: "
            f"{', '.join(f'--{n} {f}' for n, f in sets)}), tiny JPEGs (16-32 px); "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"{time.perf_counter() - start:.0f} s in all.")
    text = table(results, info)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
