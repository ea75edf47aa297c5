"""Forward+backward time and peak memory of the CKD relation terms: ours vs the materialising baseline.

The baseline is the reference code's formulation, written here: the angle relation forms every
difference vector r_j - r_i as an (n, n, d) tensor per sample and layer (or (n, w, d) for the window,
(L', L', d) per token for LTR), normalises it and takes batched inner products.

How memory is measured: every (term, implementation, size) runs in a fresh subprocess. After the
inputs are allocated, the process resets its peak-RSS counter (writing 5 to /proc/self/clear_refs)
and records its RSS; after forward+backward it reads the peak (VmHWM). The table reports peak minus
that starting RSS: the memory the loss itself needed. The child runs under an address-space limit
(default 22 GiB) so that a baseline that cannot fit fails cleanly with "OOM" instead of swapping or
waking the kernel's OOM killer.

Usage: python benchmarks/ckd_loss.py [--lengths 128 256 512] [--batch 32] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TERMS = ("wr_angle_full", "wr_angle_window", "ltr_angle", "wr_pair", "ltr_pair")


# ---------------------------------------------------------------- baseline (reference formulation)
def _baseline(term: str, s_layers, t_layers, mask, window: int = 21):
    import torch
    import torch.nn.functional as F

    def angle_full(x):  # (B, n, d) -> (B, n, n, n), the reference's materialising form
        diff = x.unsqueeze(1) - x.unsqueeze(2)
        unit = F.normalize(diff, p=2, dim=-1)
        return torch.matmul(unit, unit.transpose(-1, -2))

    def angle_window(x):  # clamped windows of width w around each vertex: (B, n, w, w)
        n = x.shape[1]
        half = (window - 1) // 2
        idx = (torch.arange(n)[:, None] + torch.arange(-half, half + 1)[None, :]).clamp(0, n - 1)
        neighbours = x[:, idx]  # (B, n, w, d)
        unit = F.normalize(neighbours - x.unsqueeze(2), p=2, dim=-1)
        return torch.matmul(unit, unit.transpose(-1, -2))

    def pair_cos(x):
        unit = F.normalize(x, dim=-1)
        sim = unit @ unit.transpose(-1, -2)
        eye = torch.eye(sim.shape[-1], dtype=torch.bool)
        return sim.masked_fill(eye, float("-inf"))

    def kl(t, s):
        p = torch.softmax(t, -1)
        return (p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).nan_to_num().sum()

    total = 0.0
    if term in ("wr_angle_full", "wr_angle_window"):
        fn = angle_full if term == "wr_angle_full" else angle_window
        for s, t in zip(s_layers, t_layers):
            with torch.no_grad():
                t_angle = fn(t)
            total = total + F.mse_loss(fn(s), t_angle)
    elif term == "ltr_angle":
        s = torch.stack(s_layers, 2).flatten(0, 1)
        t = torch.stack(t_layers, 2).flatten(0, 1)
        with torch.no_grad():
            t_angle = angle_full(t)
        total = F.mse_loss(angle_full(s), t_angle)
    elif term == "wr_pair":
        for s, t in zip(s_layers, t_layers):
            total = total + kl(pair_cos(t).detach(), pair_cos(s))
    elif term == "ltr_pair":
        s = torch.stack(s_layers, 2).flatten(0, 1)
        t = torch.stack(t_layers, 2).flatten(0, 1)
        total = kl(pair_cos(t).detach(), pair_cos(s))
    return total


# ---------------------------------------------------------------- ours
def _ours(term: str, s_layers, t_layers, mask):
    from ckd import Features, ModelShape, TaskShape, build_objective

    kinds = {"wr_angle_full": ("wr_angle", {"window": None}), "wr_angle_window": ("wr_angle", {"window": 21}),
             "ltr_angle": ("ltr_angle", {}), "wr_pair": ("wr_pair", {}), "ltr_pair": ("ltr_pair", {})}
    kind, options = kinds[term]
    layers = len(s_layers)
    pairs = [[i, i] for i in range(layers)]
    objective = build_objective(  # one head: the relation terms read no attention, and any width divides by 1
        {"terms": {kind: {"layers": pairs, **options}}},
        ModelShape(layers - 1, s_layers[0].shape[-1], 1),
        ModelShape(layers - 1, t_layers[0].shape[-1], 1),
        TaskShape(2),
    )
    loss, _ = objective(Features(s_layers, mask), Features(t_layers, mask))
    return loss


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _child(args: argparse.Namespace) -> None:
    import torch

    limit = int(args.mem_limit_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, n, layers = args.batch, args.length, args.layers
    s_layers = [torch.randn(b, n, args.student_width, requires_grad=True) for _ in range(layers)]
    t_layers = [torch.randn(b, n, args.teacher_width) for _ in range(layers)]
    mask = torch.ones(b, n, dtype=torch.long)
    fn = _ours if args.impl == "ours" else _baseline
    # Warm up on a tiny input so one-time costs (imports, kernel selection) stay out of the numbers.
    tiny = [torch.randn(1, 8, t.shape[-1], requires_grad=t.requires_grad) for t in s_layers + t_layers]
    fn(args.term, tiny[:layers], tiny[layers:], torch.ones(1, 8, dtype=torch.long)).backward()
    del tiny
    times = []
    peak = 0
    try:
        for _ in range(args.repeats):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            start_rss = _rss_kib("VmRSS")
            t0 = time.perf_counter()
            loss = fn(args.term, s_layers, t_layers, mask)
            loss.backward()
            times.append(time.perf_counter() - t0)
            peak = max(peak, _rss_kib("VmHWM") - start_rss)
            for s in s_layers:
                s.grad = None
            del loss
        result = {"ok": True, "seconds": sorted(times)[len(times) // 2], "peak_mib": peak / 1024}
    except (RuntimeError, MemoryError) as err:
        result = {"ok": False, "error": "OOM" if "memory" in str(err).lower() or isinstance(err, MemoryError) else str(err)[:80]}
    print(json.dumps(result))


def _run_one(args: argparse.Namespace, term: str, impl: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--term", term, "--impl", impl, "--length", str(length),
           "--batch", str(args.batch), "--layers", str(args.layers), "--student-width", str(args.student_width),
           "--teacher-width", str(args.teacher_width), "--threads", str(args.threads),
           "--repeats", str(args.repeats if length <= 128 else 1), "--mem-limit-gib", str(args.mem_limit_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"ok": False, "error": "OOM (killed)" if proc.returncode < 0 else f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--term", default="wr_angle_full")
    parser.add_argument("--impl", default="ours")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--terms", nargs="+", default=list(TERMS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=7, help="aligned layers L' (embedding output included)")
    parser.add_argument("--student-width", type=int, default=312)
    parser.add_argument("--teacher-width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-limit-gib", type=float, default=22.0)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--skip-baseline-above", type=int, default=10**9,
                        help="do not run the baseline at lengths above this (it cannot fit anyway)")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    print(f"B={args.batch}, L'={args.layers}, student d={args.student_width}, teacher d={args.teacher_width}, "
          f"{args.threads} threads, forward+backward, median of {args.repeats} at n<=128 (1 above)")
    header = "| term | n | ours: s | ours: peak MiB | baseline: s | baseline: peak MiB | speed-up | memory ratio |"
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for term in args.terms:
            ours = _run_one(args, term, "ours", length)
            if length > args.skip_baseline_above:
                base = {"ok": False, "error": "not run"}
            else:
                base = _run_one(args, term, "baseline", length)

            def fmt(r, key, spec):
                return format(r[key], spec) if r.get("ok") else r.get("error", "?")

            speed = f"{base['seconds'] / ours['seconds']:.1f}x" if ours.get("ok") and base.get("ok") else "-"
            memory = f"{base['peak_mib'] / max(ours['peak_mib'], 1):.1f}x" if ours.get("ok") and base.get("ok") else "-"
            print(f"| {term} | {length} | {fmt(ours, 'seconds', '.2f')} | {fmt(ours, 'peak_mib', '.0f')} | "
                  f"{fmt(base, 'seconds', '.2f')} | {fmt(base, 'peak_mib', '.0f')} | {speed} | {memory} |", flush=True)


if __name__ == "__main__":
    main()
