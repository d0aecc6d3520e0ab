#!/usr/bin/env python3
"""The baseline of scripts/gpu-bench, measured in the same run on the same GPU: one MoE
layer with Mixtral-8x7B shapes (hidden 4096, FFN 14336, 8 experts, top-2, bf16) through
PyTorch's torch._grouped_mm (what issue 4's table quotes for an H100), with the same
method as our gpu_bench: random routing fixed per activation set, CUDA events, warm-up,
median of >= 30 runs, rotating over 3 layers' weights and 4 activation sets.

The timed region is the layer given its routing: permute (sort by expert, gather rows,
groups padded to 16 rows), grouped gate+up GEMM, SiLU*up, grouped down GEMM, weighting
and the per-token sum (index_add_). Our kernels time the same work from a host-made plan.

    python3 scripts/gpu-bench-torch.py [--tokens 1,8,64,512,4096] [--runs 50]
"""
import argparse
import sys

H, F, E, K = 4096, 14336, 8, 2
LAYERS, ACT_SETS, WARMUP, ALIGN = 3, 4, 5, 16


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,8,64,512,4096")
    p.add_argument("--runs", type=int, default=50)
    a = p.parse_args()
    try:
        import torch
        import torch.nn.functional as fn
    except ImportError as e:
        print(f"gpu-bench-torch: no PyTorch here ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu-bench-torch: PyTorch sees no CUDA device", file=sys.stderr)
        return 2
    if not hasattr(torch, "_grouped_mm"):
        print(f"gpu-bench-torch: torch {torch.__version__} has no _grouped_mm", file=sys.stderr)
        return 2
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    # [E, N, K] row-major per expert, passed transposed: the layout grouped_mm wants.
    w13 = [torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16, generator=g) * H**-0.5
           for _ in range(LAYERS)]
    w2 = [torch.randn(E, H, F, device=dev, dtype=torch.bfloat16, generator=g) * F**-0.5
          for _ in range(LAYERS)]

    def layer(x, w13, w2, flat, order, tok, dest, offs, wsorted, rows):
        xs = torch.zeros(rows, H, device=dev, dtype=torch.bfloat16)
        xs[dest] = x[tok]
        gu = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
        act = fn.silu(gu[:, :F]) * gu[:, F:]
        y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)
        out = torch.zeros(x.shape[0], H, device=dev, dtype=torch.float32)
        out.index_add_(0, tok, y[dest].float() * wsorted[:, None])
        return out

    def routing(t):
        logits = torch.randn(t, E, device=dev, generator=g)
        w, idx = torch.topk(torch.softmax(logits, -1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        tok = order // K
        counts = torch.bincount(flat, minlength=E)
        padded = (counts + ALIGN - 1) // ALIGN * ALIGN
        pend = torch.cumsum(padded, 0)
        pstart = pend - padded
        start = torch.cumsum(counts, 0) - counts
        se = flat[order]
        dest = pstart[se] + torch.arange(flat.numel(), device=dev) - start[se]
        rows = t * K + ALIGN * E
        return (flat, order, tok, dest, pend.to(torch.int32), w.flatten()[order], rows,
                int((counts > 0).sum()))

    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}); "
          f"layer: hidden {H}, FFN {F}, {E} experts, top-{K}, bf16, torch._grouped_mm")
    print()
    print("|     T | experts | median ms |   min ms |   p90 ms | TFLOP/s |")
    print("|------:|--------:|----------:|---------:|---------:|--------:|")
    for t in [int(s) for s in a.tokens.split(",")]:
        sets = []
        for _ in range(ACT_SETS):
            x = torch.randn(t, H, device=dev, dtype=torch.bfloat16, generator=g)
            sets.append((x, routing(t)))
        touched = sets[0][1][-1]
        run = lambda i: layer(sets[(i // LAYERS) % ACT_SETS][0], w13[i % LAYERS], w2[i % LAYERS],
                              *sets[(i // LAYERS) % ACT_SETS][1][:-1])
        try:
            for i in range(WARMUP):
                run(i)
            torch.cuda.synchronize()
        except Exception as e:  # an unsupported shape or layout: say so, keep going
            print(f"| {t:>5} | {touched:>7} | failed: {str(e).splitlines()[0][:60]} |")
            continue
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(a.runs)]
        for i, (s, e) in enumerate(ev):
            s.record()
            run(i)
            e.record()
        torch.cuda.synchronize()
        ms = sorted(s.elapsed_time(e) for s, e in ev)
        med = ms[len(ms) // 2]
        flops = 2.0 * t * K * 3 * H * F
        print(f"| {t:>5} | {touched:>7} | {med:>9.3f} | {ms[0]:>8.3f} | "
              f"{ms[len(ms) * 9 // 10]:>8.3f} | {flops / (med * 1e-3) / 1e12:>7.1f} |")
    print(f"({a.runs} timed runs per row after {WARMUP} warm-up runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
