"""Times the official-style PyTorch MaskSub step against ours, on the same machine, interleaved.

Not part of the package and not run by CI. Needs torch and timm next to masksub_jax:

  python tools/official_step_torch.py --variant=S/16 --batch=16                 # CPU, float32
  python tools/official_step_torch.py --variant=B/16 --batch=128 --bf16         # GPU, AMP / bfloat16

The PyTorch step follows naver-ai/augsub's DeiT engine: timm's DeiT-III model, BCE on binarised
targets, the main loss backward (halved), then the token-dropped sub forward against the detached
sigmoid of the main logits and its backward (halved), then one timm Lamb step. Mixup is left out
of both sides (it costs the same in each). Our side is `masksub_jax.bench.measure_steps` with mixup
off. Each round runs one step of each of the four (torch/ours x baseline/MaskSub); medians.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.optim import Lamb  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from masksub_jax import bench  # noqa: E402
from masksub_jax import config as config_lib  # noqa: E402

TIMM_NAMES = {"S/16": "deit3_small_patch16_224", "B/16": "deit3_base_patch16_224",
              "L/16": "deit3_large_patch16_224", "H/14": "deit3_huge_patch14_224"}


def token_dropped_forward(model, images, ratio):
    """The official sub-branch forward: drop patch tokens after pos_embed (MAE argsort), keep cls."""
    x = model.patch_embed(images)
    x = x + model.pos_embed
    batch, tokens, width = x.shape
    keep = int(tokens * (1 - ratio))
    ids = torch.argsort(torch.rand(batch, tokens, device=x.device), dim=1)[:, :keep]
    x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, width))
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1)
    x = model.norm(model.blocks(model.pos_drop(x)))
    return model.head(x[:, 0])


def make_torch_steps(args, device):
    model = timm.create_model(TIMM_NAMES[args.variant], pretrained=False, img_size=args.image_size,
                              num_classes=1000, drop_path_rate=0.1).to(device).train()
    decayed = {n: p.ndim > 1 and n not in ("pos_embed", "cls_token") for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decayed[n]]
    no_decay = [p for n, p in model.named_parameters() if not decayed[n]]
    optimizer = Lamb([{"params": decay, "weight_decay": 0.03}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=3e-3)
    criterion = torch.nn.BCEWithLogitsLoss()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    targets = torch.nn.functional.one_hot(torch.randint(0, 1000, (args.batch,), device=device), 1000).float()
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)  # noqa: E731

    def baseline():
        with autocast():
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def masksub():
        with autocast():
            outputs = model(images)
            loss = criterion(outputs, targets)
        (loss / 2).backward()
        with autocast():
            outputs_sub = token_dropped_forward(model, images, 0.5)
            loss_sub = criterion(outputs_sub, outputs.detach().sigmoid())
        (loss_sub / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"torch none": baseline, "torch masking": masksub}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="S/16", choices=sorted(TIMM_NAMES))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="torch AMP bf16 / our bfloat16 compute")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch_steps = make_torch_steps(args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in torch_steps}
    for step in torch_steps.values():  # warm-up
        step()
        step()
    sync()

    config = config_lib.base()
    config.model.variant, config.data.image_size, config.batch_size = args.variant, args.image_size, args.batch
    config.model.drop_path, config.optim.lr = 0.1, 3e-3
    config.mixup.mixup_alpha = config.mixup.cutmix_alpha = 0.0
    config.model.dtype = "bfloat16" if args.bf16 else "float32"
    # Our steps are compiled and warmed up first, then timed in the same interleaved rounds.
    ours = {}
    for mode in ("none", "masking"):
        ours[f"ours {mode}"] = bench.StepRunner(config, mode, ratio=0.5, num_classes=1000, warmup=2)
        times[f"ours {mode}"] = []
    for _ in range(args.rounds):
        for name, step in torch_steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
        for name, runner in ours.items():
            times[name].append(runner.timed_step())

    median = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{args.variant} at {args.image_size} px, batch {args.batch}, {'bf16' if args.bf16 else 'float32'}, "
          f"on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}, "
          f"timm {timm.__version__}; {args.rounds} interleaved rounds, medians")
    for name, seconds in median.items():
        print(f"  {name:<14} {seconds * 1e3:9.1f} ms  {args.batch / seconds:8.1f} img/s")
    print(f"  MaskSub / baseline: torch {median['torch masking'] / median['torch none']:.3f}, "
          f"ours {median['ours masking'] / median['ours none']:.3f}")
    print(f"  ours / torch: baseline {median['ours none'] / median['torch none']:.3f}, "
          f"MaskSub {median['ours masking'] / median['torch masking']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "median_s": median, "times_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
