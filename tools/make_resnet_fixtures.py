"""Writes tests/fixtures/resnet_parity.npz (bottlenecks) and resnet_basic_parity.npz (basic blocks):
what timm's ResNet, PyTorch's BatchNorm and the official MaskSub ResNet step compute, for CI without
torch. Not part of the package and not run by CI. Needs torch and timm (1.0.x), in a venv of their own:

  python tools/make_resnet_fixtures.py                                 # both files
  python tools/make_resnet_fixtures.py --fixture=resnet_basic_parity   # one of them
  python tools/make_resnet_fixtures.py --check_export=exported.npz --variant=50   # see below

Each file holds:
  - tiny: timm ResNet (resnet_parity: bottlenecks, one per stage; resnet_basic_parity: basic blocks,
    two in stage 1 (the second with an identity shortcut) and one in the others; stage widths
    (4, 8, 16, 32), 10 classes; timm's plain stem is 64 wide; the shortcut of layer1.0 projects
    without stride, the others with stride 2), every parameter and running statistic drawn anew;
    its weights, a batch of 32 px images and the eval-mode logits.
  - One training-mode forward of tiny on that batch: its logits and the running statistics after it
    (PyTorch's BatchNorm: momentum 0.1, unbiased variance in the running estimate).
  - The official step (naver-ai/augsub resnet_rsb/train.py) restated with given kept squares: the
    main forward, backward of 0.5 * BCE against the soft mixed targets, then the sub forward on the
    image with every 16 px square not kept set to 0 (2 of 4 kept), backward of 0.5 * BCE against the
    detached sigmoid of the main logits, gradients accumulated in .grad; both forwards in training
    mode, so the running statistics move twice. Its losses, gradients and the statistics after it.
  - resnet50 (resnet_parity) / resnet18 (resnet_basic_parity): timm's model at 64 px with weights
    drawn from NumPy's default_rng(0) in state-dict order (tests/seeded.py, which the test draws
    again), so that only names, shapes and logits are stored; resnet_basic_parity also holds
    resnet34's names and shapes.

--check_export loads a state dict written by `masksub_jax.models.resnet.to_timm` (np.savez) into
timm's resnet of --variant with load_state_dict(strict=True) and prints the logits of one seeded image.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests.seeded import seeded_batchnorm_weights  # noqa: E402  (NumPy only)

FIXTURES = os.path.join(REPO, "tests", "fixtures")
BATCH, SIZE, BLOCK, KEEP = 4, 32, 16, 2


def import_timm():
    """timm imports torchvision, and a torchvision build without its CPU operators fails to import
    unless the schemas it registers kernels for (torchvision::nms, ::qnms) exist first."""
    library = torch.library.Library("torchvision", "DEF")  # noqa: F841  (kept alive while timm imports)
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            library.define(schema)
        except RuntimeError:
            pass  # this torchvision defines it
    import timm
    import_timm.library = library
    return timm


def randomised(model, generator):
    """Every parameter and running statistic drawn anew (no gamma left at 0, no variance at 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 and name.endswith("weight") else
                    0.1 * noise if p.ndim == 1 else noise / np.sqrt(np.prod(p.shape[1:])))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
            elif name.endswith("running_var"):
                b.copy_(1 + 0.2 * torch.rand(b.shape, generator=generator))
    return model


def zero_dropped_squares(images, keep_idx):
    """The official patchify / random_masking / unpatchify, restated with given kept squares
    (row-major over the grid): every pixel of the squares not kept set to 0 (NCHW)."""
    batch, _, h, w = images.shape
    rows, cols = h // BLOCK, w // BLOCK
    keep = torch.zeros(batch, rows * cols)
    keep.scatter_(1, keep_idx, 1.0)
    keep = keep.view(batch, 1, rows, cols).repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)
    return images * keep


def official_step(model, images, targets, keep_idx):
    """Two backward passes into .grad, as resnet_rsb/train.py with --bce-loss (soft targets)."""
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(images)
    loss_main = F.binary_cross_entropy_with_logits(output, targets)
    (0.5 * loss_main).backward()
    output_sub = model(zero_dropped_squares(images, keep_idx))
    loss_sub = F.binary_cross_entropy_with_logits(output_sub, torch.sigmoid(output.detach()))
    (0.5 * loss_sub).backward()
    return loss_main.item(), loss_sub.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def seeded_image(size: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32))


def check_export(path: str, variant: str) -> None:
    timm = import_timm()
    with np.load(path) as data:
        sd = {k: torch.from_numpy(data[k]) for k in data.files}
    model = timm.create_model(f"resnet{variant}", pretrained=False, num_classes=sd["fc.weight"].shape[0])
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        print("load_state_dict(strict=True) took every key; logits[0, :5]:", model.eval()(seeded_image(224))[0, :5])


def state_dict_arrays(model, prefix: str, running_only: bool = False) -> dict:
    return {f"{prefix}/{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()
            if not running_only or "running_" in k}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check_export")
    parser.add_argument("--variant", default="50", choices=["18", "34", "50", "101", "152"])
    parser.add_argument("--fixture", choices=["resnet_parity", "resnet_basic_parity"],
                        help="write only this file (default: both)")
    parser.add_argument("--out_dir", default=FIXTURES, help="where to write (default tests/fixtures)")
    args = parser.parse_args()
    if args.check_export:
        check_export(args.check_export, args.variant)
        return

    timm = import_timm()
    from timm.models.resnet import BasicBlock, Bottleneck
    # file -> (tiny model's block and blocks per stage, seeded timm model at 64 px, timm models whose
    # names and shapes are stored besides)
    fixtures = {"resnet_parity": (Bottleneck, (1, 1, 1, 1), "resnet50", ()),
                "resnet_basic_parity": (BasicBlock, (2, 1, 1, 1), "resnet18", ("resnet34",))}
    for name, (block, layers, seeded_name, other_names) in fixtures.items():
        if args.fixture in (None, name):
            out = {**tiny_arrays(block, layers), **seeded_arrays(timm, seeded_name)}
            for other in other_names:
                out.update(names_and_shapes(timm.create_model(other, pretrained=False), other))
            write(os.path.join(args.out_dir, f"{name}.npz"), out, timm)


def tiny_arrays(block, layers) -> dict:
    """The tiny model's weights, batch, eval and train-mode forwards and the official MaskSub step."""
    from timm.models.resnet import ResNet
    generator = torch.Generator().manual_seed(0)
    tiny = randomised(ResNet(block, layers, channels=(4, 8, 16, 32), num_classes=10), generator)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    keep_idx = torch.argsort(torch.rand(BATCH, (SIZE // BLOCK) ** 2, generator=generator), dim=1)[:, :KEEP]
    labels, partners = torch.arange(BATCH) % 10, (torch.arange(BATCH) + 3) % 10
    targets = 0.7 * F.one_hot(labels, 10).float() + 0.3 * F.one_hot(partners, 10).float()  # cutmix-like, soft

    out = {"images": images.permute(0, 2, 3, 1).numpy(), "keep_idx": keep_idx.numpy().astype(np.int32),
           "targets": targets.numpy()}
    out.update(state_dict_arrays(tiny, "tiny"))
    initial = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        out["tiny_logits"] = tiny.eval()(images).numpy()
        out["tiny_train_logits"] = tiny.train()(images).numpy()
    out.update(state_dict_arrays(tiny, "after_train_forward", running_only=True))

    tiny.load_state_dict(initial)
    loss_main, loss_sub, grads = official_step(tiny, images, targets, keep_idx)
    out["loss_main"], out["loss_sub"] = np.float32(loss_main), np.float32(loss_sub)
    out.update({f"grads/{k}": v.numpy() for k, v in grads.items()})
    out.update(state_dict_arrays(tiny, "after_step", running_only=True))
    return out


def names_and_shapes(model, name: str) -> dict:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {f"{name}_names": np.array(list(shapes)),
            f"{name}_shapes": np.array([",".join(map(str, s)) for s in shapes.values()])}


def seeded_arrays(timm, name: str) -> dict:
    """timm's `name` with tests/seeded.py's weights: its logits on a seeded 64 px image, names, shapes."""
    model = timm.create_model(name, pretrained=False).eval()
    out = names_and_shapes(model, name)
    seeded = seeded_batchnorm_weights({k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in seeded.items()}, strict=True)
    with torch.no_grad():
        out[f"{name}_logits"] = model(seeded_image(64)).numpy()
    return out


def write(path: str, out: dict, timm) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, **out)
    print(f"wrote {path}: {os.path.getsize(path) / 1e3:.0f} kB, {len(out)} arrays (torch {torch.__version__}, "
          f"timm {timm.__version__})")


if __name__ == "__main__":
    main()
