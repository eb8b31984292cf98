"""Saving and reloading pruned models without pickled code.

``pruned.pt`` holds only tensors and plain data (it loads with ``weights_only=True``): the model
name and input spec, the kept width of every unit, the policy and the state_dict. Reloading
rebuilds the dense architecture, slims it to those widths and loads the weights strictly, so
nothing from the file is ever executed.

``model.pt2`` is a ``torch.export`` program with a dynamic batch dimension, for users who have
plain PyTorch and no autoprune: ``torch.export.load("model.pt2").module()(x)``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.cost.runtimes import import_onnxruntime, onnx_program
from autoprune.errors import AutopruneError
from autoprune.model.checkpoints import read_checkpoint
from autoprune.model.zoo import MODELS, ModelSpec, build_model
from autoprune.prune.granularity import build_unit_table
from autoprune.units import UnitTable
from autoprune.units.policy import Policy

FORMAT = "autoprune.pruned"
VERSION = 1


def pruned_payload(model: nn.Module, table: UnitTable, kept, policy: Policy, model_name: str,
                   spec: ModelSpec, exclude=()) -> dict:
    """The weights-only-safe dict that :func:`load_pruned` turns back into the model."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "spec": {"num_classes": spec.num_classes, "in_channels": spec.in_channels,
                 "image_size": spec.image_size},
        "input_shape": list(table.input_shape),
        "granularity": table.granularity,
        "round_to": table.round_to,
        "exclude": list(exclude),
        "kept": {u.name: int(k) for u, k in zip(table.units, kept)},
        "policy": policy.to_dict(table),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def load_pruned(path: str | Path, allow_import: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a model written by ``autoprune apply``/``export`` (state_dict loaded strictly).

    The file names its architecture. A registered model is built from the registry; a user model
    (``package.module:function``) means importing and running that module's code, which this
    refuses unless ``allow_import`` is set: a file from elsewhere must not choose what runs.
    """
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AutopruneError(f"{path} is not an autoprune pruned model (format {FORMAT!r})")
    try:
        name, spec_fields = str(payload["model"]), dict(payload["spec"])
        input_shape, granularity = list(payload["input_shape"]), str(payload["granularity"])
        exclude, round_to = tuple(payload["exclude"]), int(payload["round_to"])
        spec = ModelSpec(**spec_fields)
    except (KeyError, TypeError, ValueError) as err:
        raise AutopruneError(f"{path} is an incomplete autoprune pruned model ({err})") from None
    if name not in MODELS and not allow_import:
        raise AutopruneError(f"{path} is a pruned {name!r}, a user model: loading it imports and runs "
                             "that code; pass allow_import=True if you trust the file")
    dense = build_model(name, spec)
    example = torch.zeros(input_shape)
    table = build_unit_table(dense, example, granularity, exclude, round_to)
    try:
        kept = [payload["kept"][u.name] for u in table.units]
    except KeyError as err:
        raise AutopruneError(f"{path} was saved from another version of {payload['model']}: "
                             f"unit {err} is unknown") from None
    model = table.strategy.skeleton(dense, table, kept)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), payload


def export_program(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write a ``torch.export`` program of ``model`` with a dynamic batch dimension."""
    model = model.eval().cpu()
    x = torch.cat([example.cpu()] * 2)  # batch 2, so the batch dimension can be made dynamic
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return Path(path)


def check_output_dir(dest: Path) -> None:
    """Refuse an output folder that cannot be made: a missing parent, or a file in its place."""
    if not dest.parent.is_dir():
        raise AutopruneError(f"output folder's parent {dest.parent} does not exist")
    if dest.exists() and not dest.is_dir():
        raise AutopruneError(f"{dest} exists and is not a folder")


class OutputDir:
    """Write files into a private temporary folder and move them into place only on success.

    Used as a context manager: if anything fails inside the block, the destination gets nothing.
    """

    def __init__(self, dest: str | Path) -> None:
        self.dest = Path(dest)

    def __enter__(self) -> Path:
        check_output_dir(self.dest)
        parent = self.dest.parent
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", dir=parent))
        except OSError as err:
            raise AutopruneError(f"cannot write into {parent}: {err.strerror}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.dest.mkdir(exist_ok=True)
                for f in sorted(self.tmp.iterdir()):
                    f.replace(self.dest / f.name)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path,
                check_inputs: torch.Tensor | None = None) -> dict:
    """Write ``model`` as ONNX (dynamic batch) and check onnxruntime agrees with PyTorch.

    Returns ``{"path", "max_abs_diff", "checked_inputs"}``; a disagreement above 1e-3 relative to
    the logits' scale is an error rather than a silently wrong file.
    """
    ort = import_onnxruntime()
    model = model.eval().cpu()
    onnx_program(model, example).save(str(path), external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = (check_inputs if check_inputs is not None else torch.cat([example.cpu()] * 2)).cpu()
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    with torch.no_grad():
        want = model(inputs).numpy()
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max()) or 1.0
    if diff > 1e-3 * scale:
        raise AutopruneError(f"onnxruntime disagrees with PyTorch on the exported model by {diff:.3g}")
    return {"path": str(path), "max_abs_diff": diff, "checked_inputs": int(inputs.shape[0])}
