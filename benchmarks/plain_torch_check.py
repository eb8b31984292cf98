"""Load an exported model with plain PyTorch and torchvision (autoprune blocked) and score it.

    python -m benchmarks.plain_torch_check EXPORT_MODEL_DIR ~/.cache/autoprune-data/cifar10-jpeg/test

Prints the top-1 accuracy of ``model.pt2`` on an ImageFolder of 32x32 CIFAR-10 images, to compare
with the ``test_acc`` that ``autoprune export`` recorded in ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="the folder export wrote (model.pt2, metrics.json)")
    ap.add_argument("folder", help="an ImageFolder of 32x32 CIFAR-10 images (the test split)")
    args = ap.parse_args()
    sys.modules["autoprune"] = None  # importing autoprune from here on fails: plain torch only

    import torch
    from torchvision import datasets, transforms

    model = torch.export.load(f"{args.model_dir}/model.pt2").module()
    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(args.folder, tf), batch_size=500, num_workers=2)
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    recorded = json.loads((Path(args.model_dir) / "metrics.json").read_text())["pruned"]
    print(f"plain torch: {correct / total:.4f} on {total} images; recorded by export: "
          f"{recorded.get('test_acc_finetuned', recorded.get('test_acc')):.4f}")


if __name__ == "__main__":
    main()
