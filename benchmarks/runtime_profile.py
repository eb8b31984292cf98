"""Where a runtime spends a forward pass: per op type and per conv layer, dense against pruned.

Used by ``benchmarks.runtime_speedup --profile RUNTIME``. A pruned model whose speedup falls
well short of its FLOPs speedup spends its time somewhere FLOPs do not count (BatchNorm, ReLU,
adds, layout reorders, per-call overhead) or in convs whose narrow widths run at a lower rate;
the two tables say which. Times are milliseconds per forward pass, averaged over the profiled
runs, each model profiled on its own (no alternation: the profile is a breakdown, the ratio
comes from the timed pairs).

* ``eager`` and ``compile``: ``torch.profiler``, op types by self CPU time. In eager mode every
  conv/linear module is wrapped in a ``record_function`` range by forward hooks, which gives its
  inclusive time (compiled graphs run no module hooks, so there are op types only).
* ``onnxruntime``: ONNX Runtime's own profiler, kernel time per node. ORT names an optimised node
  after the tensor it writes, the same in the dense and pruned exports, so nodes pair by name;
  the conv weight behind a node is found by walking the exported graph back from that tensor.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from autoprune.cost.runtimes import get_runtime, import_onnxruntime, onnx_program

TOP = 15
LAYER = "layer::"


def _weighted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _ranges(model: nn.Module) -> list:
    """Forward hooks that open a profiler range named after each conv/linear module."""
    open_ranges: dict[str, object] = {}
    handles = []
    for name, module in _weighted(model).items():
        def pre(_m, _x, name=name):
            open_ranges[name] = torch.autograd.profiler.record_function(LAYER + name).__enter__()

        def post(_m, _x, _y, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _torch_profile(model: nn.Module, x: torch.Tensor, runtime: str, threads: int, runs: int) -> dict:
    handles = _ranges(model) if runtime == "eager" else []
    try:
        run = get_runtime(runtime).prepare(model, x, threads)
        with torch.inference_mode():
            for _ in range(3):
                run()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    run()
    finally:
        for h in handles:
            h.remove()
    ops, layers = {}, {}
    for ev in prof.key_averages():
        if ev.key.startswith(LAYER):
            layers[ev.key[len(LAYER):]] = ev.cpu_time_total / 1e3 / runs
        elif ev.self_cpu_time_total > 0:
            ops[ev.key] = ev.self_cpu_time_total / 1e3 / runs
    return {"ops": ops, "layers": layers}


def _conv_of(graph, node_name: str, depth: int = 4) -> str | None:
    """The module whose weight feeds the conv ORT ran as ``node_name``: a node left as exported
    keeps its name; a node ORT rewrote to its blocked layout is named after the tensor it writes
    (``<tensor>_nchwc``), from which the search goes back, breadth first, through the elementwise
    nodes fused into the conv (ReLU, Add)."""
    weighted = ("Conv", "Gemm", "MatMul")
    for node in graph.node:
        if node.name == node_name and node.op_type in weighted and len(node.input) > 1:
            return node.input[1].removesuffix(".weight")
    producer = {out: node for node in graph.node for out in node.output}
    frontier = [node_name.removesuffix("_nchwc")]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            node = producer.get(t)
            if node is None:
                continue
            if node.op_type in weighted and len(node.input) > 1:
                return node.input[1].removesuffix(".weight")
            nxt += list(node.input)
        frontier = nxt
    return None


def _ort_profile(model: nn.Module, x: torch.Tensor, threads: int, runs: int) -> dict:
    ort = import_onnxruntime()
    proto = onnx_program(model, x).model_proto
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
        for _ in range(3 + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    # every node's kernel time, the first three runs (warm-up) left out
    per_node: dict[str, list[float]] = defaultdict(list)
    op_of = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            node = ev["name"].removesuffix("_kernel_time")
            per_node[node].append(ev["dur"] / 1e3)
            op_of[node] = ev["args"].get("op_name", "?")
    ops: dict[str, float] = defaultdict(float)
    layers = {}
    for node, times in per_node.items():
        ms = sum(times[-runs:]) / runs
        ops[op_of[node]] += ms
        if op_of[node] in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"):
            layers[_conv_of(proto.graph, node) or f"{op_of[node]} {node}"] = ms
    return {"ops": dict(ops), "layers": layers}


def profile(model: nn.Module, x: torch.Tensor, runtime: str, threads: int, runs: int = 20) -> dict:
    """``{"ops": {op type: ms}, "layers": {conv/linear module: ms}}`` per forward pass of
    ``model`` on the batch ``x``, run by ``runtime`` with ``threads`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.eval()
        if runtime == "onnxruntime":
            return _ort_profile(model, x, threads, runs)
        return _torch_profile(model, x, runtime, threads, runs)
    finally:
        torch.set_num_threads(before)


def compare(dense: nn.Module, pruned: nn.Module, x: torch.Tensor, runtime: str, threads: int,
            runs: int = 20) -> dict:
    """Dense and pruned profiles side by side: the top op types and layers by pruned time, each
    with dense and pruned ms, their ratio and (layers) the layer's FLOPs ratio."""
    d, p = (profile(m, x, runtime, threads, runs) for m in (dense, pruned))
    d_mods, p_mods = _weighted(dense), _weighted(pruned)
    total = {"dense_ms": sum(d["ops"].values()), "pruned_ms": sum(p["ops"].values())}

    def rows(kind: str) -> list[dict]:
        out = []
        for key in sorted(p[kind], key=p[kind].get, reverse=True)[:TOP]:
            dense_ms, pruned_ms = d[kind].get(key), p[kind][key]
            row = {"name": key, "dense_ms": dense_ms, "pruned_ms": pruned_ms,
                   "time_ratio": pruned_ms / dense_ms if dense_ms else None,
                   "share_of_pruned": pruned_ms / total["pruned_ms"] if total["pruned_ms"] else None}
            if kind == "layers" and key in d_mods and key in p_mods:
                # a conv's FLOPs are its weight count times its output pixels, which pruning keeps
                row["flops_ratio"] = p_mods[key].weight.numel() / d_mods[key].weight.numel()
            out.append(row)
        return out

    return {"runtime": runtime, "batch": len(x), "threads": threads, "runs": runs, **total,
            "op_types": rows("ops"), "layers": rows("layers")}


def markdown(result: dict) -> str:
    """The two tables of :func:`compare` in markdown."""
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    def ratio(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"profile ({result['runtime']}, batch {result['batch']}, {result['threads']} thread(s), "
             f"{result['runs']} runs each): total {result['dense_ms']:.1f} ms dense, "
             f"{result['pruned_ms']:.1f} ms pruned", "",
             "| op type | dense ms | pruned ms | time ratio | share of pruned |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {ms(r['dense_ms'])} | {ms(r['pruned_ms'])} | {ratio(r['time_ratio'])} | "
              f"{ratio(r['share_of_pruned'])} |" for r in result["op_types"]]
    if result["layers"]:
        lines += ["", "| layer | dense ms | pruned ms | time ratio | FLOPs ratio | share of pruned |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {ms(r['dense_ms'])} | {ms(r['pruned_ms'])} | {ratio(r['time_ratio'])} | "
                  f"{ratio(r.get('flops_ratio'))} | {ratio(r['share_of_pruned'])} |" for r in result["layers"]]
    return "\n".join(lines)
