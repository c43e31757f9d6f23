"""GPU readiness: every GPU path of the project checked and timed in one run (issues 15, 18).

    python tools/gpu_check.py [--out docs/gpu_check] [--parts a,b] [--cpu-smoke] [--budget S]

Writes OUT.json and OUT.md (rewritten after every part, so a run cut short still leaves a
report) and prints progress. Each part runs in its own forked process group with a time
limit: a part that fails, crashes or hangs (NCCL, torch.compile, DALI) is reported with its
error or as timed out and the next part starts. The whole run stays inside --budget seconds
(default 450: under 8 minutes on one GPU); parts left when it is spent are reported skipped.

--cpu-smoke runs the same parts at tiny sizes on the CPU (what CI runs, so the script cannot
rot); parts that need CUDA are skipped with the reason. Speed targets are judged only on a GPU.
`--list` prints the parts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imported once here, so that every forked part starts with torch and the project loaded.
# Nothing here may initialise CUDA: a process that did cannot fork children that use it.
from ltrainer.tools import gpu_check_common as common  # noqa: E402
from ltrainer.tools import gpu_check_i18 as i18  # noqa: E402
from ltrainer.tools import gpu_check_parts as parts  # noqa: E402


@dataclass
class Part:
    name: str
    fn: Callable
    limit_s: int                 # on a GPU; smoke parts get SMOKE_LIMIT_S
    covers: str                  # the issue (item) it checks
    smoke_skip: str = ""         # why the CPU smoke mode skips it ("" = it runs there too)


SMOKE_LIMIT_S = 40
NEEDS_CUDA = "needs CUDA"
PARTS = [
    Part("environment", parts.part_environment, 60, "15"),
    Part("nccl", parts.part_nccl, 120, "15"),
    Part("rn50_eager", parts.part_rn50_eager, 150, "15"),
    Part("e2e_torchvision", parts.part_e2e_torchvision, 120, "15"),
    Part("e2e_dali", parts.part_e2e_dali, 120, "15"),
    Part("e2e_ffcv", parts.part_e2e_ffcv, 150, "15",
         "FFCV compiles its pipeline with numba on first use (~30 s on 2 cores); "
         "tests/test_loaders.py covers FFCV on CPU"),
    Part("moco_step", parts.part_moco_step, 90, "15"),
    Part("crt_step", parts.part_crt_step, 60, "15"),
    Part("ldam_autocast", parts.part_ldam_autocast, 30, "15"),
    Part("faiss_knn", parts.part_faiss_knn, 150, "15"),
    Part("checkpoint_resume", parts.part_checkpoint_resume, 90, "15"),
    Part("fmnist_gpu_cpu", parts.part_fmnist_gpu_cpu, 150, "15"),
    Part("deterministic_cuda", i18.part_deterministic_cuda, 60, "18.2",
         NEEDS_CUDA + ": deterministic CPU training is covered by the tests"),
    Part("float32_under_bf16", i18.part_float32_under_bf16, 60, "18.6"),
    Part("host_sync", i18.part_host_sync, 90, "18.8",
         NEEDS_CUDA + ": set_sync_debug_mode watches CUDA streams"),
    Part("dali_slow_read", i18.part_dali_slow_read, 90, "18.10"),
    Part("moco_exchange", i18.part_moco_exchange, 60, "18.11"),
    Part("staged_input", parts.part_staged_input, 60, "14.4"),
    Part("rn50_compile", parts.part_rn50_compile, 240, "15",
         NEEDS_CUDA + ": torch.compile's C++ build takes minutes on 2 CPU cores"),
]


# --------------------------------------------------------------------------- one part

def _child(part: Part, ctx_args: dict, result_path: str):
    """In the forked process: run the part, write its result, never return."""
    code = 0
    try:
        os.setsid()                       # its own process group: a timeout kills it all
        import torch

        smoke = ctx_args["smoke"]
        device = torch.device("cuda" if (not smoke and torch.cuda.is_available()) else "cpu")
        work = os.path.join(ctx_args["work"], part.name)
        os.makedirs(work, exist_ok=True)
        ctx = common.Ctx(smoke, device, work, ctx_args["work"],
                         common.SMOKE if smoke else common.FULL, ctx_args.get("fmnist_root"))
        if smoke and part.smoke_skip:
            raise common.Skip(part.smoke_skip)
        out = part.fn(ctx)
        failed = [c for c in out.get("checks", []) if c["ok"] is False]
        res = {"status": "failed" if failed else "passed", **out}
        if failed:
            res["error"] = "; ".join(f"{c['name']}: {c['value']} (target {c['target']})"
                                     for c in failed)
    except common.Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except BaseException as e:  # noqa: BLE001 - every failure is the part's result
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-4000:]}
        code = 1
    try:
        with open(result_path, "w") as f:
            json.dump(res, f, default=str)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_part(part: Part, ctx_args: dict, limit_s: float) -> dict:
    """Fork, wait at most limit_s, kill the part's whole process group if it overruns."""
    result_path = os.path.join(ctx_args["work"], f"{part.name}.result.json")
    t0 = time.perf_counter()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _child(part, ctx_args, result_path)
    status = usage = None
    try:
        while time.perf_counter() - t0 < limit_s:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return {"status": "timed_out", "error": f"no result within {limit_s:.0f} s: killed",
                    "seconds": round(time.perf_counter() - t0, 1)}
    except BaseException:        # Ctrl-C or SIGTERM: the part's own session would outlive us
        _kill_group(pid)
        raise
    _kill_group(pid)                       # anything the part left running (workers)
    seconds = round(time.perf_counter() - t0, 1)
    # CPU time of the part's process (and the children it waited for): on a shared machine
    # this, not the wall time, says what the part costs
    cpu_s = round(usage.ru_utime + usage.ru_stime, 1)
    if not os.path.exists(result_path):
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.WEXITSTATUS(status)}")
        return {"status": "failed", "error": f"the part's process died ({how}) before "
                                             f"reporting", "seconds": seconds, "cpu_s": cpu_s}
    with open(result_path) as f:
        res = json.load(f)
    res["seconds"], res["cpu_s"] = seconds, cpu_s
    return res


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


def _kill_group(pid: int):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- report

def write_report(report: dict, out: str):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json.tmp", "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(out + ".json.tmp", out + ".json")
    with open(out + ".md.tmp", "w") as f:
        f.write(markdown(report))
    os.replace(out + ".md.tmp", out + ".md")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)


def markdown(report: dict) -> str:
    env = next((p.get("figures", {}) for p in report["parts"] if p["name"] == "environment"), {})
    lines = [f"# GPU readiness check ({report['mode']})", "",
             f"{report['started']}, {report['seconds']:.0f} s of a {report['budget_s']} s "
             f"budget. Command: `{report['command']}`", "",
             f"Machine: {env.get('gpu', 'no GPU')}, torch {env.get('torch', '?')}, CUDA "
             f"{env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, NCCL {env.get('nccl', '-')}, "
             f"{env.get('cpus', '?')} CPUs", "",
             "| part | issue | status | seconds | result |", "|---|---|---|---|---|"]
    for p in report["parts"]:
        why = p.get("error") or p.get("reason") or "; ".join(
            f"{c['name']}: {_fmt(c['value'])}{' (not judged)' if c['ok'] is None else ''}"
            for c in p.get("checks", [])[:3])
        lines.append(f"| {p['name']} | {p['covers']} | **{p['status']}** | "
                     f"{p.get('seconds', 0):.1f} | {why.replace('|', '/')[:300]} |")
    for p in report["parts"]:
        if p["status"] in ("skipped",) or not (p.get("figures") or p.get("checks")):
            continue
        lines += ["", f"## {p['name']}", "", p.get("doc", ""), ""]
        for c in p.get("checks", []):
            mark = {True: "ok", False: "FAILED", None: "not judged"}[c["ok"]]
            lines.append(f"- {c['name']}: {_fmt(c['value'])} (target {c['target']}): {mark}")
        for k, v in (p.get("figures") or {}).items():
            lines.append(f"- `{k}`: {_fmt(v)}")
        if p.get("traceback"):
            lines += ["", "```", p["traceback"][-1500:], "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def select(names: str | None) -> list[Part]:
    if not names:
        return list(PARTS)
    by_name = {p.name: p for p in PARTS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "gpu_check"),
                    help="report path without extension: OUT.json and OUT.md")
    ap.add_argument("--parts", help="comma-separated part names (default: all)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 450, smoke 120)")
    ap.add_argument("--fmnist-root", default=None,
                    help="folder of the 4 Fashion-MNIST .gz files (default: data/fashion-mnist "
                         "if present, else the Debian package's)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--list", action="store_true", help="print the parts and exit")
    args = ap.parse_args(argv)
    if args.list:
        for p in PARTS:
            print(f"{p.name:20s} issue {p.covers:5s} {(p.fn.__doc__ or '').split(chr(10))[0]}")
        return 0
    chosen = select(args.parts)
    if chosen[0].name != "environment":   # it says whether there is a GPU: always first
        chosen = [PARTS[0]] + [p for p in chosen if p.name != "environment"]
    budget = args.budget or (120.0 if args.cpu_smoke else 450.0)
    fmnist = args.fmnist_root
    if fmnist is None and os.path.isdir(os.path.join(ROOT, "data", "fashion-mnist")):
        fmnist = os.path.join(ROOT, "data", "fashion-mnist")
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    ctx_args = {"smoke": args.cpu_smoke, "work": work, "fmnist_root": fmnist}
    report = {"mode": "cpu-smoke" if args.cpu_smoke else "full",
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python tools/gpu_check.py", *(argv or sys.argv[1:])]),
              "budget_s": budget, "seconds": 0.0, "parts": []}
    t0 = time.perf_counter()
    no_gpu = None
    signal.signal(signal.SIGTERM, _terminate)
    try:
        for i, part in enumerate(chosen, 1):
            left = budget - (time.perf_counter() - t0)
            # smoke parts never get more time than on a GPU, nor more than SMOKE_LIMIT_S
            limit = min(part.limit_s, SMOKE_LIMIT_S if args.cpu_smoke else part.limit_s, left)
            print(f"[{i}/{len(chosen)}] {part.name} (limit {limit:.0f} s)", flush=True)
            if no_gpu:
                res = {"status": "skipped", "reason": no_gpu}
            elif limit < 3:
                res = {"status": "skipped", "reason": f"the run's {budget:.0f} s budget is spent"}
            else:
                res = run_part(part, ctx_args, limit)
            if part.name == "environment" and not args.cpu_smoke and \
                    not res.get("figures", {}).get("cuda_available"):
                no_gpu = "no CUDA device visible: run with --cpu-smoke on a CPU machine"
            entry = {"name": part.name, "covers": part.covers,
                     "doc": " ".join((part.fn.__doc__ or "").split()), **res}
            report["parts"].append(entry)
            report["seconds"] = round(time.perf_counter() - t0, 1)
            write_report(report, args.out)
            detail = res.get("error") or res.get("reason") or ""
            print(f"    {res['status']} in {res.get('seconds', 0):.1f} s"
                  f"{': ' + detail[:400] if detail else ''}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    counts = {s: sum(p["status"] == s for p in report["parts"])
              for s in ("passed", "failed", "timed_out", "skipped")}
    print(f"{counts} in {report['seconds']:.0f} s; report: {args.out}.json, {args.out}.md")
    return 1 if counts["failed"] or counts["timed_out"] else 0


if __name__ == "__main__":
    sys.exit(main())
