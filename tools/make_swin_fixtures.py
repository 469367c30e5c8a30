"""Writes tests/fixtures/swin_parity.npz: what timm's Swin and the official MaskSub Swin step compute,
for CI without torch. Not part of the package and not run by CI. Needs torch and timm (1.0.x):

  python tools/make_swin_fixtures.py
  python tools/make_swin_fixtures.py --check_export=exported.npz --variant=T/4   # see below

  - tiny: timm SwinTransformer (32 px, patch 4, embed 24, depths (2, 2), heads (1, 2), window 4, 10
    classes; stage 0 shifts its windows, stage 1 attends over its whole 4x4 grid), every parameter
    drawn anew; its weights, a batch of images, the logits, and a mask_token.
  - The official sub-branch (naver-ai/augsub swin/models/swin_transformer.py, random_masking) restated
    with given kept blocks: blocks of 16 px (4x4 tokens, a 2x2 grid of blocks, 2 kept), every token of
    the others replaced by mask_token after the patch embedding's norm. Its logits, and the official
    step's gradients: backward of 0.5 * soft-target CE of the main branch, then of 0.5 * CE of the
    sub-branch against the detached softmax of the main logits, accumulated in .grad.
  - swin_t: timm's swin_tiny_patch4_window7_224 at 224 px with weights drawn from NumPy's
    default_rng(0) in state-dict order (tests/seeded.py; the test draws the same), so that only the
    names, shapes and logits are stored.

--check_export loads a state dict written by `masksub_jax.models.swin.to_timm` (np.savez) into timm's
model of --variant with load_state_dict(strict=True) and prints the logits of one seeded image.
If torchvision's build on a machine lacks CPU operators, timm's import of it is what fails; the
workaround belongs here, never in the package.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests.seeded import seeded_weights  # noqa: E402  (NumPy only)

OUT = os.path.join(REPO, "tests", "fixtures", "swin_parity.npz")
TINY = dict(img_size=32, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=10)
BATCH, BLOCK_TOKENS, KEEP = 4, 4, 2
TIMM_NAMES = {"T/4": "swin_tiny_patch4_window7_224", "S/4": "swin_small_patch4_window7_224",
              "B/4": "swin_base_patch4_window7_224"}


def randomised(model, generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def masked_forward(model, images, keep_idx, mask_token):
    """The official random_masking with given kept blocks (row-major over the block grid)."""
    x = model.patch_embed(images)  # (B, H, W, C), after its norm
    batch, h, w, _ = x.shape
    rows = h // BLOCK_TOKENS
    mask = torch.ones(batch, rows * rows)
    mask.scatter_(1, keep_idx, 0.0)  # 0 keep, 1 remove
    mask = mask.view(batch, rows, rows).repeat_interleave(BLOCK_TOKENS, 1).repeat_interleave(BLOCK_TOKENS, 2)
    x = x * (1 - mask).unsqueeze(-1) + mask_token.view(1, 1, 1, -1) * mask.unsqueeze(-1)
    return model.forward_head(model.norm(model.layers(x)))


def official_step_grads(model, images, targets, keep_idx, mask_token):
    model.zero_grad(set_to_none=True)
    mask_token.grad = None
    outputs = model(images)
    loss_main = torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()
    (0.5 * loss_main).backward()
    outputs_sub = masked_forward(model, images, keep_idx, mask_token)
    loss_sub = torch.sum(-F.softmax(outputs.detach(), -1) * F.log_softmax(outputs_sub, dim=-1), dim=-1).mean()
    (0.5 * loss_sub).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads["mask_token"] = mask_token.grad.detach().clone()
    return loss_main.item(), loss_sub.item(), grads


def seeded_image(size: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32))


def check_export(path: str, variant: str) -> None:
    import timm
    with np.load(path) as data:
        sd = {k: torch.from_numpy(data[k]) for k in data.files}
    model = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=sd["head.fc.weight"].shape[0])
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        print("load_state_dict(strict=True) took every key; logits[0, :5]:", model.eval()(seeded_image(224))[0, :5])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check_export")
    parser.add_argument("--variant", default="T/4", choices=sorted(TIMM_NAMES))
    args = parser.parse_args()
    if args.check_export:
        check_export(args.check_export, args.variant)
        return

    generator = torch.Generator().manual_seed(0)
    tiny = randomised(SwinTransformer(**TINY), generator)
    mask_token = torch.nn.Parameter(0.5 * torch.randn(1, 1, TINY["embed_dim"], generator=generator))
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    keep_idx = torch.argsort(torch.rand(BATCH, 4, generator=generator), dim=1)[:, :KEEP]
    labels, partners = torch.arange(BATCH) % 10, (torch.arange(BATCH) + 3) % 10
    targets = 0.7 * F.one_hot(labels, 10).float() + 0.3 * F.one_hot(partners, 10).float()  # mixup-like, smoothed below
    targets = targets * 0.9 + 0.1 / 10

    out = {"images": images.permute(0, 2, 3, 1).numpy(), "keep_idx": keep_idx.numpy().astype(np.int32),
           "targets": targets.numpy(), "mask_token": mask_token.detach().numpy().copy()}
    out.update({f"tiny/{k}": v.detach().numpy().copy() for k, v in tiny.state_dict().items()})
    with torch.no_grad():
        out["tiny_logits"] = tiny(images).numpy()
        out["tiny_sub_logits"] = masked_forward(tiny, images, keep_idx, mask_token).numpy()
    loss_main, loss_sub, grads = official_step_grads(tiny, images, targets, keep_idx, mask_token)
    out["loss_main"], out["loss_sub"] = np.float32(loss_main), np.float32(loss_sub)
    out.update({f"grads/{k}": v.numpy() for k, v in grads.items()})

    import timm
    swin_t = timm.create_model(TIMM_NAMES["T/4"], pretrained=False).eval()
    shapes = {k: tuple(v.shape) for k, v in swin_t.state_dict().items()}
    swin_t.load_state_dict({k: torch.from_numpy(v) for k, v in seeded_weights(shapes).items()}, strict=True)
    with torch.no_grad():
        out["swin_t_logits"] = swin_t(seeded_image(224)).numpy()
    out["swin_t_names"] = np.array(list(shapes))
    out["swin_t_shapes"] = np.array([",".join(map(str, s)) for s in shapes.values()])

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e3:.0f} kB, {len(out)} arrays")


if __name__ == "__main__":
    main()
