"""2:4 on sparse tensor cores: per-layer and end-to-end latency of a 2:4 model against dense (issue 26).

On a lent GPU (one call of ``benchmarks/finetune_on_gpu.sh`` with ``JOBS=nm24`` runs it):

    python -m benchmarks.semi_structured_latency --model resnet18 --batch 256 --device cuda \\
        --out benchmarks/results/semi-structured-resnet18-cuda.json

Every conv and linear layer whose input channels divide into groups of 4 is cut to 2:4 by weight
magnitude (the stem, with 3 input channels, stays dense); the weights are the CIFAR-10 fixture's
where ``../shared`` has it (latency does not depend on them). Three forms of each layer, and of
the whole model, all in ``--dtype`` (bfloat16), channels-last, run on the layer's own input:

* ``conv``: the masked layer as it is, cuDNN's convolution (what a user runs without sparse kernels);
* ``gemm``: the same layer as one dense GEMM over channels-last patches
  (:class:`~autoprune.cost.semi_structured.GemmConv2d`), what the sparse kernel replaces;
* ``sparse``: that GEMM with the weight in PyTorch's semi-structured form (CUDA, sm80+ only).

So ``sparse / gemm`` is what the sparse tensor cores buy, and ``sparse / conv`` what a user gets.
Each figure is the median over ``--rounds`` rounds in which the forms run in turn, ``--inner``
calls each (CUDA events on a GPU). Layers the conversion leaves dense say why. On a CPU the
``sparse`` form is skipped with the reason and the rest runs (to check the script, not to report).
The end-to-end check is the converted model's largest output difference from the masked one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from autoprune.cost.semi_structured import check_semi_structured, semi_structured
from autoprune.errors import AutopruneError
from autoprune.model.checkpoints import load_weights
from autoprune.model.zoo import ModelSpec, build_model
from autoprune.prune.patterns import NM, fits_nm, nm_mask
from benchmarks.common import fixture, machine, write_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def masked_model(name: str) -> nn.Module:
    """The model (fixture weights where present) with every layer that fits 2:4 cut to it."""
    model = build_model(name, ModelSpec(10, 3, 32))
    try:
        load_weights(model, fixture(name))
    except (SystemExit, AutopruneError, FileNotFoundError):
        pass  # random weights: the timings are the same
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and fits_nm(module.weight.shape, NM(2, 4)):
                module.weight.mul_(nm_mask(module.weight.abs(), NM(2, 4)))
    return model.eval()


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each conv/linear layer's input on ``x``, by name."""
    seen, hooks = {}, []

    def keep(name: str):
        def hook(module, args, output) -> None:  # returns nothing: the output stays the layer's
            seen[name] = args[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(keep(name)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def timed(forms: dict[str, tuple[nn.Module, torch.Tensor]], rounds: int, inner: int, cuda: bool) -> dict[str, float]:
    """Median milliseconds per call of each form, the forms run in turn each round."""
    per = {k: [] for k in forms}
    with torch.no_grad():
        for _ in range(3):  # warm-up: kernels chosen, caches filled
            for module, x in forms.values():
                module(x)
        for _ in range(rounds):
            for key, (module, x) in forms.items():
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(inner):
                        module(x)
                    end.record()
                    torch.cuda.synchronize()
                    per[key].append(start.elapsed_time(end) / inner)
                else:
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        module(x)
                    per[key].append((time.perf_counter() - t0) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda, dtype = args.device.startswith("cuda"), DTYPES[args.dtype]

    masked = masked_model(args.model)
    conv = masked.to(device=args.device, dtype=dtype).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    gemm, report = semi_structured(conv, args.device, dtype, sparse=False)
    try:
        sparse, sparse_report = semi_structured(conv, args.device, dtype)
        why_not = ""
    except AutopruneError as err:
        sparse, sparse_report, why_not = None, [], str(err)
    refused = {r.name: r.why for r in sparse_report if not r.converted}
    inputs = layer_inputs(conv, x)

    rows = []
    print(f"# {args.model} 2:4, batch {args.batch}, {args.dtype}, {args.device}; {machine()}"
          + (f"\n# no sparse form: {why_not}" if why_not else ""))
    print(f"{'layer':24s} {'matrix':>12s} {'conv ms':>9s} {'gemm ms':>9s} {'sparse ms':>9s} "
          f"{'sp/gemm':>8s} {'sp/conv':>8s}")
    for r in report:
        row = {**r.to_dict()}
        if r.converted:
            forms = {"conv": (conv.get_submodule(r.name), inputs[r.name]),
                     "gemm": (gemm.get_submodule(r.name), inputs[r.name])}
            if sparse is not None and r.name not in refused:
                forms["sparse"] = (sparse.get_submodule(r.name), inputs[r.name])
            row["ms"] = timed(forms, args.rounds, args.inner, cuda)
            row["sparse_why"] = refused.get(r.name, why_not) if "sparse" not in forms else ""
        rows.append(row)
        ms = row.get("ms", {})
        sp = ms.get("sparse")
        print(f"{r.name:24s} {r.rows:5d}x{r.cols:<6d} {ms.get('conv', float('nan')):9.3f} "
              f"{ms.get('gemm', float('nan')):9.3f} {sp if sp is not None else float('nan'):9.3f} "
              f"{sp / ms['gemm'] if sp else float('nan'):8.3f} {sp / ms['conv'] if sp else float('nan'):8.3f}"
              + (f"  ({r.why or refused.get(r.name)})" if r.why or r.name in refused else ""))

    whole = {"conv": (conv, x), "gemm": (gemm, x)}
    if sparse is not None:
        whole["sparse"] = (sparse, x)
    end_to_end = timed(whole, args.rounds, args.inner, cuda)
    check = check_semi_structured(conv, sparse, x[:64]) if sparse is not None else None
    gemm_check = check_semi_structured(conv, gemm, x[:64])
    print("end to end ms: " + ", ".join(f"{k} {v:.3f}" for k, v in end_to_end.items())
          + (f"; sparse / conv x{end_to_end['sparse'] / end_to_end['conv']:.3f}" if sparse is not None else "")
          + f"; largest output difference from the masked model: gemm {gemm_check:.2g}"
          + (f", sparse {check:.2g}" if check is not None else "") + " (of its largest output)")
    if args.out:
        write_results(args.out, {"machine": machine(), "model": args.model, "batch": args.batch,
                                 "dtype": args.dtype, "device": args.device, "rounds": args.rounds,
                                 "inner": args.inner, "layers": rows, "end_to_end_ms": end_to_end,
                                 "gemm_check": gemm_check, "sparse_check": check, "sparse_why": why_not})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
