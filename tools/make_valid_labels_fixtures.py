"""Writes tests/fixtures/valid_labels_parity.npz: what timm's validate.py computes for ImageNet-A and
ImageNet-R with --valid-labels (the 200-class protocol), for CI without torch. Not part of the
package and not run by CI. Needs torch and timm (1.0.x), in a venv of their own:

  python tools/make_valid_labels_fixtures.py

A timm ViT with random weights (width 32, depth 2, 2 heads, patch 8, 16 px, 1000 classes; DeiT-III
layout) and 40 generated 16 px images, written as PNG files into an image folder per set: image i in
the folder of one of the set's 200 classes (WordNet ids, timm's _info/imagenet_{a,r}_synsets.txt),
chosen from the model's own ranking of the set's classes so that top-1 and top-5 are neither 0 nor 1:
i % 4 == 0 its first, 1 its third, 2 its 50th, 3 its last. Then validate.py's path, step by step:
create_dataset on the folder with --class-map (the synsets file: targets 0-199 in that order, empty
folders allowed), create_loader with the eval transform (crop_pct 1, so the 16 px images pass
unresized; ImageNet mean and std), the model, `output[:, valid_labels]` with --valid-labels
(_info/imagenet_{a,r}_indices.txt), and timm.utils.accuracy.

Stored: the model's weights (state-dict names), the images as uint8 (N, 16, 16, 3), per set the
WordNet id of each image's folder, timm's restricted logits (N, 200) and its top-1 / top-5 (percent).
"""
import os
import sys
import tempfile

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from make_resnet_fixtures import import_timm  # noqa: E402  (timm's torchvision workaround)

OUT = os.path.join(REPO, "tests", "fixtures", "valid_labels_parity.npz")
ARCH = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
            num_classes=1000, global_pool="token", class_token=True, no_embed_class=True, init_values=1e-4)
NUM_IMAGES, SIZE = 40, 16
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RANKS = (0, 2, 49, 199)  # which of the set's classes, in the model's order, image i % 4 belongs to


def randomised(model, generator):
    """Every parameter drawn anew, so that no term of the forward is trivially zero or one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.2 * noise)
            elif "gamma" in name:
                p.copy_(0.5 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def info_file(timm, name: str) -> str:
    return os.path.join(os.path.dirname(timm.__file__), "data", "_info", name)


def validate_with_valid_labels(timm, model, folder: str, class_map: str, valid_labels_file: str):
    """validate.py's evaluation of `folder` with --class-map and --valid-labels: (logits, top1, top5)."""
    from timm.data import create_dataset, create_loader
    from timm.utils import accuracy
    dataset = create_dataset(root=folder, name="", split="validation", class_map=class_map)
    loader = create_loader(dataset, input_size=(3, SIZE, SIZE), batch_size=16, use_prefetcher=False,
                           interpolation="bicubic", mean=MEAN, std=STD, num_workers=0, crop_pct=1.0)
    with open(valid_labels_file) as f:
        valid_labels = [int(line.rstrip()) for line in f]
    outputs, targets = [], []
    with torch.no_grad():
        for images, target in loader:
            outputs.append(model(images)[:, valid_labels])
            targets.append(target)
    output, target = torch.cat(outputs), torch.cat(targets)
    top1, top5 = accuracy(output, target, topk=(1, 5))
    return output.numpy(), float(top1), float(top5), dataset.filenames(basename=True)


def main():
    timm = import_timm()
    from PIL import Image
    from timm.models.vision_transformer import VisionTransformer
    generator = torch.Generator().manual_seed(0)
    model = randomised(VisionTransformer(**ARCH), generator)
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    normalised = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        full_logits = model(normalised).numpy()
    out = {f"model/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    out["images"] = images
    for name in ("imagenet_a", "imagenet_r"):
        synsets_file = info_file(timm, f"{name}_synsets.txt")
        wnids = open(synsets_file).read().split()
        indices = [int(i) for i in open(info_file(timm, f"{name}_indices.txt")).read().split()]
        order = np.argsort(-full_logits[:, indices], axis=1, kind="stable")  # the model's ranking of the 200
        chosen = [wnids[order[i, RANKS[i % len(RANKS)]]] for i in range(NUM_IMAGES)]
        with tempfile.TemporaryDirectory() as root:
            folder = os.path.join(root, "validation")
            for i, wnid in enumerate(chosen):
                os.makedirs(os.path.join(folder, wnid), exist_ok=True)
                Image.fromarray(images[i]).save(os.path.join(folder, wnid, f"{i:03d}.png"))
            logits, top1, top5, files = validate_with_valid_labels(timm, model, folder, synsets_file,
                                                                  info_file(timm, f"{name}_indices.txt"))
        loaded = [int(f.split(".")[0]) for f in files]  # the loader's order of the images
        inverse = np.argsort(loaded)
        out[f"{name}/wnids"] = np.array(chosen)
        out[f"{name}/logits"] = logits[inverse].astype(np.float32)
        out[f"{name}/top1"], out[f"{name}/top5"] = np.float64(top1), np.float64(top5)
        print(f"{name}: timm validate.py --valid-labels top-1 {top1:.2f} top-5 {top5:.2f}")
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
