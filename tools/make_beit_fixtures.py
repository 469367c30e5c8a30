"""Writes tests/fixtures/beit_parity.npz: what timm's BEiT (v2 layout) and the official-style MaskSub
step compute, for CI without torch. Not part of the package and not run by CI. Needs torch and timm:

  python tools/make_beit_fixtures.py
  python tools/make_beit_fixtures.py --check_export=exported.npz --timm_model=beitv2_base_patch16_224 \
      --img_size=224   # see below

  - tiny: timm Beit (32 px, patch 8, width 64, depth 2, 4 heads, 10 classes; use_abs_pos_emb=False,
    use_rel_pos_bias=True, init_values 0.1, mean pooling + fc_norm), every parameter drawn anew (the
    LayerScale gammas, q_bias / v_bias and relative position tables included); its weights, a batch
    of images and the logits.
  - The sub-branch with given kept tokens, written from timm's modules: patch_embed -> the kept patch
    tokens -> cls token in front -> each block with its relative position bias gathered for [cls] +
    the kept positions -> fc_norm(mean of the kept tokens) -> head. Its logits, and one official-style
    MaskSub step's gradients (naver-ai/augsub's order): backward of 0.5 * soft-target CE of the main
    branch, then of 0.5 * CE of the sub-branch against the detached softmax of the main logits,
    accumulated in .grad.

--check_export loads a state dict written by `masksub_jax.models.beit.to_timm` (np.savez) into
timm.create_model(--timm_model, img_size=--img_size) with load_state_dict(strict=True), and prints
the logits of a seeded image.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from make_resnet_fixtures import import_timm  # noqa: E402  (timm's torchvision workaround)

OUT = os.path.join(REPO, "tests", "fixtures", "beit_parity.npz")
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10, use_abs_pos_emb=False,
            use_rel_pos_bias=True, init_values=0.1, global_pool="avg")
BATCH, KEEP = 4, 8  # 16 patch tokens, 8 kept


def randomised(model, generator):
    """Every parameter drawn anew: no gamma left at 0.1, no zero q_bias / v_bias or bias table."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def kept_forward(model, images, keep_idx):
    """The sub-branch: only the kept patch tokens (and cls) enter the blocks, each block's relative
    position bias gathered for [cls] + the kept positions of each example."""
    x = model.patch_embed(images)  # (B, L, D)
    batch, _, width = x.shape
    x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, width))
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1)
    positions = torch.cat([torch.zeros(batch, 1, dtype=keep_idx.dtype), keep_idx + 1], dim=1)
    for blk in model.blocks:
        attn = blk.attn
        index = attn.relative_position_index[positions[:, :, None], positions[:, None, :]]  # (B, n, n)
        bias = attn.relative_position_bias_table[index].permute(0, 3, 1, 2)  # (B, heads, n, n)
        y = blk.norm1(x)
        n = y.shape[1]
        qkv = F.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q * attn.scale) @ k.transpose(-2, -1) + bias
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, width)
        x = x + blk.gamma_1 * attn.proj(y)
        x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    return model.head(model.fc_norm(x[:, 1:].mean(1)))


def official_step_grads(model, images, targets, keep_idx):
    model.zero_grad(set_to_none=True)
    outputs = model(images)
    loss_main = torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()
    (0.5 * loss_main).backward()
    outputs_sub = kept_forward(model, images, keep_idx)
    loss_sub = torch.sum(-F.softmax(outputs.detach(), -1) * F.log_softmax(outputs_sub, dim=-1), dim=-1).mean()
    (0.5 * loss_sub).backward()
    return loss_main.item(), loss_sub.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def seeded_image(size: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32))


def check_export(path: str, name: str, img_size: int) -> None:
    timm = import_timm()
    with np.load(path) as data:
        sd = {k: torch.from_numpy(data[k]) for k in data.files}
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=sd["head.weight"].shape[0])
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        logits = model.eval()(seeded_image(img_size))
    np.save(path.replace(".npz", "_timm_logits.npy"), logits.numpy())
    print("load_state_dict(strict=True) took every key; logits[0, :5]:", logits[0, :5])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check_export")
    parser.add_argument("--timm_model", default="beitv2_base_patch16_224")
    parser.add_argument("--img_size", type=int, default=224)
    args = parser.parse_args()
    if args.check_export:
        check_export(args.check_export, args.timm_model, args.img_size)
        return

    import_timm()
    from timm.models.beit import Beit
    generator = torch.Generator().manual_seed(0)
    tiny = randomised(Beit(**TINY), generator)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    keep_idx = torch.argsort(torch.rand(BATCH, 16, generator=generator), dim=1)[:, :KEEP]
    labels, partners = torch.arange(BATCH) % 10, (torch.arange(BATCH) + 3) % 10
    targets = 0.7 * F.one_hot(labels, 10).float() + 0.3 * F.one_hot(partners, 10).float()  # mixup-like, smoothed below
    targets = targets * 0.9 + 0.1 / 10

    out = {"images": images.permute(0, 2, 3, 1).numpy(), "keep_idx": keep_idx.numpy().astype(np.int32),
           "targets": targets.numpy()}
    out.update({f"tiny/{k}": v.detach().numpy().copy() for k, v in tiny.state_dict().items()})
    out["relative_position_index"] = tiny.blocks[0].attn.relative_position_index.numpy().astype(np.int32)
    with torch.no_grad():
        out["tiny_logits"] = tiny(images).numpy()
        out["tiny_sub_logits"] = kept_forward(tiny, images, keep_idx).numpy()
        every = torch.arange(16).expand(BATCH, -1)
        assert torch.allclose(kept_forward(tiny, images, every), tiny(images), atol=1e-5)  # the restatement is timm's
    loss_main, loss_sub, grads = official_step_grads(tiny, images, targets, keep_idx)
    out["loss_main"], out["loss_sub"] = np.float32(loss_main), np.float32(loss_sub)
    out.update({f"grads/{k}": v.numpy() for k, v in grads.items()})

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e3:.0f} kB, {len(out)} arrays, keys {sorted(tiny.state_dict())[:8]}")


if __name__ == "__main__":
    main()
