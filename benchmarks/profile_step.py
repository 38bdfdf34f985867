"""Where a training step's GPU time goes: the CUDA kernels of one Vim step, by total time.

    python benchmarks/profile_step.py [--model vim_tiny_patch16_224] [--batch 128] [--bf16]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import timm
import vim  # noqa: F401  (registers the Vim models)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    model = timm.create_model(args.model).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)  # as main.py builds it
    images = torch.randn(args.batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (args.batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
