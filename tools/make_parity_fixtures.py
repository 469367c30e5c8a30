"""Writes tests/fixtures/parity.npz: what timm and the official MaskSub step compute, for CI without torch.

Not part of the package and not run by CI. Needs torch and timm:

  python tools/make_parity_fixtures.py

Small timm ViTs with random weights (width 32, depth 2, 2 heads, patch 4, 16 px, 10 classes):
  - deit3: DeiT-III layout (no cls slot in pos_embed, LayerScale); augreg: MAE / augreg layout (cls
    slot, no LayerScale). Their weights, one batch of images and both models' logits.
  - The official MaskSub step on deit3, restated from naver-ai/augsub's DeiT engine: main forward,
    backward of 0.5 * loss, then the token-dropped sub forward (patch tokens gathered after pos_embed
    with the given kept indices, cls kept) against the detached teacher, backward of 0.5 * loss_sub,
    gradients accumulated in .grad; for BCE (binarised targets, sigmoid teacher) and CE (soft targets,
    softmax teacher).
  - One timm Lamb step from the deit3 weights with the BCE gradients (DeiT-III parameter groups).
  - timm's resample_abs_pos_embed of the deit3 pos_embed to 6x6 and 3x3 grids.
If torchvision's build on a machine lacks CPU operators, timm's import of it is what fails; the
workaround (importing timm with torchvision stubbed) belongs here, never in the package.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from timm.optim import Lamb

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity.npz")
ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
            num_classes=10, global_pool="token", class_token=True)
BATCH, KEEP, LR, WEIGHT_DECAY = 4, 8, 4e-3, 0.05


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


def token_dropped_forward(model, images, keep_idx):
    """The official sub-branch forward: patch tokens gathered after pos_embed, the cls token kept."""
    x = model.patch_embed(images) + model.pos_embed
    x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return model.head(model.norm(model.blocks(x))[:, 0])


def official_step_grads(model, images, targets, keep_idx, loss):
    """Two backward passes accumulated, as in augsub's engine: returns (loss_main, loss_sub, grads)."""
    model.zero_grad(set_to_none=True)
    outputs = model(images)
    if loss == "bce":
        loss_main = F.binary_cross_entropy_with_logits(outputs, targets.gt(0.0).float())
    else:
        loss_main = torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()
    (0.5 * loss_main).backward()
    outputs_sub = token_dropped_forward(model, images, keep_idx)
    if loss == "bce":
        loss_sub = F.binary_cross_entropy_with_logits(outputs_sub, outputs.detach().sigmoid())
    else:
        loss_sub = torch.sum(-F.softmax(outputs.detach(), -1) * F.log_softmax(outputs_sub, dim=-1), dim=-1).mean()
    (0.5 * loss_sub).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss_main.item(), loss_sub.item(), grads


def main():
    generator = torch.Generator().manual_seed(0)
    deit3 = randomised(VisionTransformer(**ARCH, no_embed_class=True, init_values=1e-4), generator)
    augreg = randomised(VisionTransformer(**ARCH, no_embed_class=False, init_values=None), generator)
    images = torch.randn(BATCH, 3, 16, 16, generator=generator)
    num_patches = deit3.patch_embed.num_patches
    keep_idx = torch.argsort(torch.rand(BATCH, num_patches, generator=generator), dim=1)[:, :KEEP]
    labels, partners = torch.arange(BATCH) % 10, (torch.arange(BATCH) + 3) % 10
    targets = 0.7 * F.one_hot(labels, 10).float() + 0.3 * F.one_hot(partners, 10).float()  # mixup-like

    out = {"images": images.permute(0, 2, 3, 1).numpy(), "keep_idx": keep_idx.numpy().astype(np.int32),
           "targets": targets.numpy()}
    out.update({f"deit3/{k}": v.detach().numpy().copy() for k, v in deit3.state_dict().items()})
    out.update({f"augreg/{k}": v.detach().numpy().copy() for k, v in augreg.state_dict().items()})
    with torch.no_grad():
        out["deit3_logits"] = deit3(images).numpy()
        out["deit3_sub_logits"] = token_dropped_forward(deit3, images, keep_idx).numpy()
        out["augreg_logits"] = augreg(images).numpy()
        for grid in (6, 3):
            out[f"pos_embed_{grid}x{grid}"] = resample_abs_pos_embed(
                deit3.pos_embed, new_size=[grid, grid], num_prefix_tokens=0).numpy()
    for loss in ("bce", "ce"):
        loss_main, loss_sub, grads = official_step_grads(deit3, images, targets, keep_idx, loss)
        out[f"{loss}_loss_main"], out[f"{loss}_loss_sub"] = np.float32(loss_main), np.float32(loss_sub)
        out.update({f"{loss}_grads/{k}": v.numpy() for k, v in grads.items()})

    # One Lamb step with the BCE gradients, DeiT-III's groups: no decay on 1-D, pos_embed, cls_token.
    _, _, grads = official_step_grads(deit3, images, targets, keep_idx, "bce")
    decayed = {n: p.ndim > 1 and n not in ("pos_embed", "cls_token") for n, p in deit3.named_parameters()}
    optimizer = Lamb([{"params": [p for n, p in deit3.named_parameters() if decayed[n]], "weight_decay": WEIGHT_DECAY},
                      {"params": [p for n, p in deit3.named_parameters() if not decayed[n]], "weight_decay": 0.0}],
                     lr=LR, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
    optimizer.step()
    out.update({f"lamb_after/{k}": v.detach().numpy().copy() for k, v in deit3.state_dict().items()})
    out["lamb_lr"], out["lamb_weight_decay"] = np.float32(LR), np.float32(WEIGHT_DECAY)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e3:.0f} kB, {len(out)} arrays")


if __name__ == "__main__":
    main()
