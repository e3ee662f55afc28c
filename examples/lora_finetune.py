"""Train a LoRA adapter on a quantized quipsharp model from a text file (QLoRA on CPU).

    python examples/lora_finetune.py QUANTIZED_DIR train.txt --out adapter [--steps 100] [--r 8]

The quantized layers stay frozen on their native kernels; only the adapters (peft LoRA on the
attention projections by default) train. Load the result with
``quipsharp.lora.load_adapter(quipsharp.load_quantized(QUANTIZED_DIR), "adapter")`` or merge it into
a float model with ``quipsharp.lora.merge_dense``. Needs ``pip install quipsharp[hf,peft]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="quantized quipsharp directory (with its tokenizer)")
    parser.add_argument("text", help="training text: .txt (blank-line separated documents) or .jsonl (field 'text')")
    parser.add_argument("--out", required=True, help="adapter directory to write (must not exist)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--ctx", type=int, default=256, help="tokens per training window (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per step (default: %(default)s)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                        help="module names to adapt (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window draw and init (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import peft
    from transformers import AutoTokenizer

    import quipsharp
    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.lora import get_peft_model
    from quipsharp.outputs import check_output

    if args.threads:
        torch.set_num_threads(args.threads)
    out = check_output(args.out)  # new or empty: never overwrite
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(read_documents(args.text), tokenizer, args.steps * args.batch_size, args.ctx,
                                  args.seed)
    torch.manual_seed(args.seed)
    model = get_peft_model(quipsharp.load_quantized(args.model),
                           peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=args.targets))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, start = [], time.perf_counter()
    for step, tokens in enumerate(windows.split(args.batch_size)):
        optimizer.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not args.json and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}", file=sys.stderr)
    model.save_pretrained(str(out))
    summary = {"out": str(out), "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
               "seconds": time.perf_counter() - start}
    print(json.dumps(summary) if args.json else f"adapter saved to {out} (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
