"""Runtimes: how a deployment runs the model, so that latency is measured as it will be served.

A latency figure belongs to the runtime that produced it. Eager PyTorch, ``torch.compile`` and
ONNX Runtime run the same network differently (fused operators, other kernels, another cost per
call), so a pruned model that is 30% faster in one may be 15% faster in another. A
:class:`Runtime` turns an ``nn.Module`` and an input batch into a callable that runs one forward
pass; :mod:`autoprune.cost.latency` times that callable for whole models and for every cell of its
per-layer lookup table alike. :data:`RUNTIMES` holds the names ``--latency-runtime`` accepts.

The ONNX export with a dynamic batch dimension lives here too (:func:`onnx_program`), because the
``onnxruntime`` runtime and ``export --onnx`` (:mod:`autoprune.export.artifacts`) must run the same graph.
"""

from __future__ import annotations

import platform
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from autoprune.common.registry import Registry
from autoprune.errors import AutopruneError


class Runtime(ABC):
    """Turns a module into a callable that runs one forward pass, the thing latency is timed on.

    :meth:`prepare` is called outside ``torch.inference_mode()``, with torch's intra-op threads
    already set to ``threads``, and does everything a deployment does once (export, compile,
    open a session), so that the callable costs one forward pass and nothing else. The callable
    takes no arguments (its input is bound in ``prepare``, converted once) and is called under
    ``torch.inference_mode()``, with the same threads, many times in a row.
    """

    name: str = ""

    def check(self, device: str) -> None:
        """Raise :class:`AutopruneError` if this runtime cannot time models on ``device`` here (a
        package missing, a device it does not serve). Cheap: it runs before any work."""

    def version(self) -> str:
        """The version of what runs the model beyond torch's own (part of the latency table's
        cache key, so an upgrade measures the table again)."""
        return ""

    def channel_block(self, device: str) -> int:
        """The channel block this runtime's kernels lay tensors out in on ``device``: a tensor
        whose channels are not a multiple of it runs in a slower layout, with conversions to and
        from the blocked one around it. 1 where there is none (or none known)."""
        return 1

    @abstractmethod
    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
        """A callable that runs ``model`` (in eval mode, on ``x``'s device) on the batch ``x``."""

    def prepare_layer(self, layer: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
        """:meth:`prepare` for a cell of the latency table (a bare ``nn.Linear``, or an ``nn.Conv2d``
        alone or between two 1x1 ones in an ``nn.Sequential``), of which a table has hundreds: a
        runtime may build the cell's graph directly where that runs the same kernels and costs
        far less than its whole-model path."""
        return self.prepare(layer, x, threads)


RUNTIMES: Registry[type[Runtime]] = Registry("latency runtime")


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name`` (an unknown name is a user error listing the known ones)."""
    runtime = RUNTIMES.get(name)()
    runtime.name = name
    return runtime


@RUNTIMES.register("eager", help="PyTorch eager mode under inference_mode")
class EagerRuntime(Runtime):
    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
        return lambda: model(x)


@RUNTIMES.register("compile", help="torch.compile (Inductor; needs a C++ compiler on CPU)")
class CompileRuntime(Runtime):
    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
        # Every module of one class shares its forward's compiled-code cache, and past the
        # recompile limit (8) Dynamo silently runs eager code: the latency table compiles dozens
        # of shapes of one conv, so each preparation starts from an empty cache. A callable
        # prepared earlier stays valid; it compiles again (from Inductor's on-disk cache) on its
        # next call, which the timing's warm-up runs absorb.
        torch.compiler.reset()
        compiled = torch.compile(model, dynamic=False)  # static shapes, as a deployment serves them
        try:
            with torch.inference_mode():
                compiled(x)  # compile now, not inside a timed run
        except Exception as err:  # Dynamo and Inductor fail with many types (no compiler, no Triton)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise AutopruneError(
                f"torch.compile does not work on this machine ({type(err).__name__}: {first}); it needs "
                "a C++ compiler on CPU (Triton on GPU): install one, or use --latency-runtime eager "
                "or onnxruntime") from None
        return lambda: compiled(x)


def nchwc_block(machine: str, flags: set[str]) -> int:
    """ONNX Runtime's NCHWc channel block on a CPU: its x86 kernels (MLAS) compute convs on blocks
    of 16 channels with AVX-512F and of 8 otherwise, and a tensor whose channels are not a multiple
    of the block cannot be reordered into that layout (ResNet-56 at batch 64 on an AVX2 CPU:
    policies with any width not a multiple of 8 ran up to 17 % slower than the latency table
    predicted, while those of multiples of 8 stayed within 3 %). Other CPUs have no NCHWc kernels."""
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return 1
    return 16 if "avx512f" in flags else 8


def _cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def import_onnxruntime():
    """The ``onnxruntime`` module, or a user error that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise AutopruneError("ONNX export and the onnxruntime latency runtime need onnx, onnxscript "
                             "and onnxruntime: pip install 'autoprune[onnx]'") from None
    return onnxruntime


def onnx_program(model: nn.Module, example: torch.Tensor):
    """``model`` (put in eval mode, on CPU) exported to ONNX with a dynamic batch dimension.

    The graph is traced at batch 2 (two copies of ``example``'s first sample), so the batch
    dimension can be made dynamic. Returns a ``torch.onnx.ONNXProgram``: ``.save(path)`` writes
    the file, ``.model_proto`` is the graph in memory.
    """
    model = model.eval().cpu()
    x = torch.cat([example[:1].cpu()] * 2)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (x,), None, input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=({0: batch},), dynamo=True, verbose=False)


def layer_graph(layer: nn.Module, x: torch.Tensor):
    """The ONNX graph of a plain ``nn.Conv2d`` (Conv), an ``nn.Sequential`` of them (a chain of
    Convs) or an ``nn.Linear`` (Gemm), as the exporter writes it, at ``x``'s shape; ``None`` for
    anything else."""
    from onnx import TensorProto, helper, numpy_helper

    chain = list(layer) if type(layer) is nn.Sequential else [layer]
    inits, nodes, last = [], [], "input"
    for i, part in enumerate(chain):
        names = [last, f"weight{i}"]
        inits.append(numpy_helper.from_array(part.weight.detach().cpu().numpy(), names[1]))
        if getattr(part, "bias", None) is not None:
            names.append(f"bias{i}")
            inits.append(numpy_helper.from_array(part.bias.detach().cpu().numpy(), names[2]))
        last = "output" if i == len(chain) - 1 else f"hidden{i}"
        if type(part) is nn.Conv2d and isinstance(part.padding, tuple) and part.padding_mode == "zeros":
            nodes.append(helper.make_node("Conv", names, [last], kernel_shape=list(part.kernel_size),
                                          strides=list(part.stride), dilations=list(part.dilation),
                                          pads=[*part.padding, *part.padding], group=part.groups))
        elif type(part) is nn.Linear and x.dim() == 2 and len(chain) == 1:
            nodes.append(helper.make_node("Gemm", names, [last], transB=1))
        else:
            return None
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x.shape))]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "cell", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@RUNTIMES.register("onnxruntime", help="ONNX Runtime on CPU (pip install 'autoprune[onnx]')")
class OnnxRuntime(Runtime):
    def check(self, device: str) -> None:
        import_onnxruntime()
        if device != "cpu":
            raise AutopruneError(f"the onnxruntime latency runtime times on CPU (CPUExecutionProvider), "
                                 f"not {device}: measure latency on cpu")

    def version(self) -> str:
        return import_onnxruntime().__version__

    def channel_block(self, device: str) -> int:
        return nchwc_block(platform.machine(), _cpu_flags())

    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
        return self._session(onnx_program(model, x).model_proto, x, threads)

    def prepare_layer(self, layer: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
        # The exporter takes seconds per call and a table has hundreds of cells; the nodes it
        # would write (Convs, or a Gemm for a linear layer) are built directly in milliseconds.
        proto = layer_graph(layer, x)
        return self.prepare(layer, x, threads) if proto is None else self._session(proto, x, threads)

    def _session(self, proto, x: torch.Tensor, threads: int) -> Callable[[], object]:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
        return lambda: session.run(None, feed)


@RUNTIMES.register("semi-structured", help="2:4 layers on a GPU's sparse tensor cores, the rest dense "
                   "(PyTorch semi-structured sparsity, bfloat16; CUDA, compute capability 8.0+)")
class SemiStructuredRuntime(Runtime):
    """What an N:M-masked model gains on sparse tensor cores: every layer whose mask fits 2:4 runs
    as a sparse GEMM, every other layer as it is, all in bfloat16 and channels-last (so the dense
    model it is compared with runs in the same precision and layout)."""

    def check(self, device: str) -> None:
        from autoprune.cost.semi_structured import require_sparse_cores

        require_sparse_cores(device)

    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
        from autoprune.cost.semi_structured import semi_structured

        sparse, _ = semi_structured(model, x.device)
        sparse = sparse.to(memory_format=torch.channels_last)
        xb = x.to(torch.bfloat16)
        if xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return lambda: sparse(xb)
