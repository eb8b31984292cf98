"""Load an exported model with plain PyTorch and torchvision (autoprune blocked) and score it.

    python benchmarks/plain_torch_check.py EXPORT_MODEL_DIR CIFAR10_FOLDER/test

Prints the top-1 accuracy of ``model.pt2`` on an ImageFolder of 32x32 CIFAR-10 images, to compare
with the ``test_acc`` that ``autoprune export`` recorded in ``metrics.json``.
"""

from __future__ import annotations

import json
import sys

sys.modules["autoprune"] = None  # importing autoprune from here on fails: plain torch only

import torch  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

model_dir, folder = sys.argv[1], sys.argv[2]
model = torch.export.load(f"{model_dir}/model.pt2").module()
tf = transforms.Compose([transforms.ToTensor(),
                         transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder, tf), batch_size=500, num_workers=2)
correct = total = 0
with torch.no_grad():
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
recorded = json.load(open(f"{model_dir}/metrics.json"))["pruned"]
print(f"plain torch: {correct / total:.4f} on {total} images; recorded by export: "
      f"{recorded.get('test_acc_finetuned', recorded.get('test_acc')):.4f}")
