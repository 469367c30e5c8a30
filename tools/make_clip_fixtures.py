"""Writes tests/fixtures/clip_parity.npz: CLIP image towers as open_clip and timm compute them, and
the official-style MaskSub step on one, for CI without torch. Not part of the package and not run by
CI. Needs torch, timm 1.0.x and open_clip_torch 3.x, in a venv of their own:

  python tools/make_clip_fixtures.py
  python tools/make_clip_fixtures.py --check_export=exported.npz   # see below

Every tower: 32 px images, patch 8, width 32, depth 2, 2 heads; every parameter drawn anew.
  - openai/: open_clip's VisionTransformer with QuickGELU (OpenAI's CLIP), saved as the whole CLIP
    model's state dict (`visual.` prefix) beside a few text-tower tensors (whose names clash with the
    tower's once the prefix is gone: positional_embedding, transformer.resblocks.0...), and
    laion/: the same with exact GELU (OpenCLIP's LAION models), saved as the tower alone. For each,
    FT-CLIP's head on open_clip's own tokens: open_clip (pool_type "tok") returns ln_post of every
    patch token; `head(tokens.mean(1))` with a random head is FT-CLIP's head(fc_norm(x[:, 1:]).mean(1))
    with ln_post's weights in fc_norm.
  - timm/: timm's vit_base_patch16_clip_quickgelu_224 at that size with global_pool="avg",
    fc_norm=False (timm's final norm on every token, then the mean of the patch tokens: FT-CLIP's
    head), 10 classes: its state dict and logits; the logits of the token-dropped forward on given
    kept patches (after the position embedding, cls kept, then norm_pre); and the official two-backward
    MaskSub step (main forward, 0.5 * soft-target CE backward, sub forward on the kept patches,
    0.5 * CE against the detached softmax of the main logits backward, gradients accumulated): its
    losses and every gradient.
  - ftclip_layer_scale/NAME: FT-CLIP's layer-decay scale (optim_factory.get_num_layer_for_vit,
    layer decay 0.6) of each parameter of its VisualTransformer of that depth, by FT-CLIP's names.

--check_export loads a state dict written by our `vit.to_timm` (np.savez) into that timm model with
load_state_dict(strict=True) and prints its logits on the fixture's images.
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

OUT = os.path.join(REPO, "tests", "fixtures", "clip_parity.npz")
SIZE, PATCH, WIDTH, DEPTH, HEADS, CLASSES, BATCH, KEEP = 32, 8, 32, 2, 2, 10, 4, 8
LAYER_DECAY = 0.6


def randomised(model, generator):
    """Every parameter drawn anew; norms' weights near 1 so that the activations stay moderate."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_norm = any(n in name for n in ("ln_", "norm")) and name.endswith("weight")
            p.copy_(1 + 0.2 * noise if is_norm else 0.2 * noise)
    return model.eval()


def open_clip_tower(act_layer, generator):
    from open_clip.transformer import VisionTransformer
    return randomised(VisionTransformer(SIZE, PATCH, WIDTH, DEPTH, HEADS, 4.0, output_dim=16, act_layer=act_layer,
                                        output_tokens=True), generator)


def ft_clip_logits(tower, images, head):
    """FT-CLIP's head on open_clip's tokens (ln_post of every patch token)."""
    with torch.no_grad():
        _, tokens = tower(images)
        return head(tokens.mean(1)).numpy()


def timm_clip(timm):
    return timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=SIZE, patch_size=PATCH,
                             embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, global_pool="avg",
                             fc_norm=False)


def token_dropped_forward(model, images, keep_idx):
    """The sub-branch: patch tokens dropped after the position embedding (cls kept), then norm_pre."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)  # cls token and pos_embed (with its cls slot)
    cls, patches = x[:, :1], x[:, 1:]
    patches = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = model.norm(model.blocks(model.norm_pre(torch.cat([cls, patches], dim=1))))
    return model.head(x[:, 1:].mean(1))


def soft_ce(logits, targets):
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def ft_clip_layer_scales():
    """optim_factory.get_num_layer_for_vit over FT-CLIP's VisualTransformer's parameter names."""
    names = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
             "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
    names += [f"transformer.resblocks.{i}.{part}" for i in range(DEPTH) for part in
              ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
               "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")]
    num_max_layer = DEPTH + 2
    values = [LAYER_DECAY ** (DEPTH + 1 - i) for i in range(num_max_layer)]

    def layer(name):
        if name in ("class_embedding", "cls_token", "mask_token", "pos_embed", "positional_embedding"):
            return 0
        if name.startswith(("patch_embed", "conv1", "ln_pre")):
            return 0
        if name.startswith("transformer.resblocks"):
            return int(name.split(".")[2]) + 1
        return num_max_layer - 1
    return {name: np.float64(values[layer(name)]) for name in names}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check_export")
    args = parser.parse_args()
    timm = import_timm()
    from open_clip.transformer import QuickGELU
    if args.check_export:
        with np.load(OUT) as fx:
            images = torch.from_numpy(fx["images"]).permute(0, 3, 1, 2)
        model = timm_clip(timm).eval()
        with np.load(args.check_export) as data:
            model.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files}, strict=True)
        with torch.no_grad():
            print(model(images).numpy().tolist())
        return

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    out = {"images": images.permute(0, 2, 3, 1).numpy()}
    head = torch.nn.Linear(WIDTH, CLASSES)
    with torch.no_grad():
        head.weight.copy_(0.2 * torch.randn(head.weight.shape, generator=generator))
        head.bias.copy_(0.2 * torch.randn(head.bias.shape, generator=generator))
    out.update({"head/weight": head.weight.detach().numpy(), "head/bias": head.bias.detach().numpy()})

    openai = open_clip_tower(QuickGELU, generator)
    out.update({f"openai/visual.{k}": v.numpy().copy() for k, v in openai.state_dict().items()})
    text = {"positional_embedding": (8, 32), "token_embedding.weight": (50, 32), "ln_final.weight": (32,),
            "transformer.resblocks.0.attn.in_proj_weight": (96, 32), "text_projection": (32, 16), "logit_scale": ()}
    out.update({f"openai/{k}": torch.randn(shape, generator=generator).numpy() for k, shape in text.items()})
    out["openai_logits"] = ft_clip_logits(openai, images, head)

    laion = open_clip_tower(torch.nn.GELU, generator)
    out.update({f"laion/{k}": v.numpy().copy() for k, v in laion.state_dict().items()})
    out["laion_logits"] = ft_clip_logits(laion, images, head)

    model = randomised(timm_clip(timm), generator)
    out.update({f"timm/{k}": v.numpy().copy() for k, v in model.state_dict().items()})
    with torch.no_grad():
        out["timm_logits"] = model(images).numpy()
    keep_idx = torch.stack([torch.randperm((SIZE // PATCH) ** 2, generator=generator)[:KEEP] for _ in range(BATCH)])
    out["keep_idx"] = keep_idx.numpy().astype(np.int32)
    with torch.no_grad():
        out["timm_sub_logits"] = token_dropped_forward(model, images, keep_idx).numpy()

    targets = F.one_hot(torch.randint(0, CLASSES, (BATCH,), generator=generator), CLASSES).float() * 0.9 + 0.01
    out["targets"] = targets.numpy()
    model.zero_grad()
    logits = model(images)
    loss_main = soft_ce(logits, targets)
    (loss_main / 2).backward()
    loss_sub = soft_ce(token_dropped_forward(model, images, keep_idx), logits.detach().softmax(-1))
    (loss_sub / 2).backward()
    out.update({"loss_main": loss_main.detach().numpy(), "loss_sub": loss_sub.detach().numpy()})
    out.update({f"grads/{k}": p.grad.numpy().copy() for k, p in model.named_parameters()})

    out.update({f"ftclip_layer_scale/{k}": v for k, v in ft_clip_layer_scales().items()})
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e3:.0f} kB, {len(out)} arrays")


if __name__ == "__main__":
    main()
