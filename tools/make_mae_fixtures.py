"""Writes tests/fixtures/mae_parity.npz: timm's global-pool ViT (MAE's fine-tuning model) on random
weights, for CI without torch. Not part of the package and not run by CI. Needs torch and timm:

  python tools/make_mae_fixtures.py

A small timm VisionTransformer (16 px, patch 4, width 32, depth 2, 2 heads, 10 classes) with
global_pool="avg" (so fc_norm after the mean of the patch tokens, no final norm), a cls slot in
pos_embed and no LayerScale, as MAE fine-tunes it; every parameter drawn anew. Its weights, a batch
of images and the logits.
"""
import os

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "mae_parity.npz")


def main():
    generator = torch.Generator().manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                              global_pool="avg", class_token=True, no_embed_class=False, init_values=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    model.eval()
    images = torch.randn(4, 3, 16, 16, generator=generator)
    out = {"images": images.permute(0, 2, 3, 1).numpy()}
    out.update({f"avg/{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()})
    with torch.no_grad():
        out["avg_logits"] = model(images).numpy()
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e3:.0f} kB, {len(out)} arrays, keys {sorted(model.state_dict())[:6]}")


if __name__ == "__main__":
    main()
