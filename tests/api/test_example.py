"""examples/segmentation.py, tiny: a user model and metric, search -> export -> reload without autoprune."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Loads the exported program in a fresh interpreter where importing autoprune fails.
RELOAD = """
import sys, json, torch
sys.modules["autoprune"] = None  # any import of autoprune now raises
program = torch.export.load(sys.argv[1]).module()
x, y = torch.load(sys.argv[2])
pred = program(x).argmax(1)
ious = []
for k in range(3):
    union = ((pred == k) | (y == k)).sum().item()
    ious.append(((pred == k) & (y == k)).sum().item() / union if union else 1.0)
print(json.dumps({"miou": sum(ious) / 3, "shape": list(program(x).shape)}))
"""


@pytest.mark.slow
def test_segmentation_example_end_to_end(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import segmentation
    finally:
        sys.path.remove(str(REPO / "examples"))
    import torch

    summary = segmentation.main(["--out", str(tmp_path), "--tiny"])
    assert summary["flops_ratio"] <= 0.5 + 1e-9 and summary["params_ratio"] < 1.0
    metrics = json.loads((tmp_path / "pruned" / "metrics.json").read_text())
    # the program reloaded in the example scores what the export measured with the user's test_score
    assert summary["pruned_miou"] == pytest.approx(metrics["pruned"]["test_acc"], abs=1e-9)
    assert summary["dense_miou"] == pytest.approx(metrics["dense"]["test_acc"], abs=1e-9)

    test_x, test_y = segmentation.shapes(64, seed=3)
    torch.save((test_x, test_y), tmp_path / "test.pt")
    out = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "pruned" / "model.pt2"),
                          str(tmp_path / "test.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    reloaded = json.loads(out.stdout)
    assert reloaded["shape"] == [64, 3, 32, 32]  # per-pixel logits, as the dense net gives
    assert reloaded["miou"] == pytest.approx(summary["pruned_miou"], abs=1e-6)  # the example's test set
    assert reloaded["miou"] > 0.5  # well above the 1/3 of guessing one class per image
