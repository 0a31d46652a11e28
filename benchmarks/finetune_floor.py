"""The training benchmark's torch side, run as a child so that ``finetune_bench.py`` itself never imports torch.

    python benchmarks/finetune_floor.py base DEMO_BASE_DIR OUT_DIR      # the larger random-weight base
    python benchmarks/finetune_floor.py floor BASE_DIR --prompt P --response R --batch B --steps N --threads T

``base`` builds a Llama of about 60M parameters with random weights and the demo base's tokenizer and chat
template (offline, seconds): big enough that a per-step cost of the training engine would show, small enough
for 2 CPUs. ``floor`` is the throughput floor the engine is measured against: a bare PyTorch loop (forward,
backward, AdamW) on the same LoRA model (every linear layer, as the engine's default), batch and row (the
conversation through the chat template, so the same sequence length), with nothing else (no data pipeline, no
callbacks, no clipping, no logging). It prints one JSON line: the median step's tokens/s, and the row's
length in tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def build_base(demo_base: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_base)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                         num_attention_heads=10, num_key_value_heads=10, head_dim=64, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def floor(base: Path, prompt: str, response: str, batch: int, steps: int, threads: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    row = tokenizer(text, add_special_tokens=False)["input_ids"]

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.tensor([row] * batch)
    mask = torch.ones_like(ids)

    def step() -> None:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):  # warm-up: allocator, AdamW state
        step()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    # the median step: a burst of other work on a shared machine moves the mean, hardly the median
    median = statistics.median(times)
    print(json.dumps({"seq": len(row), "tokens_per_s": batch * len(row) / median, "step_s": median,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("base")
    make.add_argument("demo_base", type=Path)
    make.add_argument("out", type=Path)
    run = sub.add_parser("floor")
    run.add_argument("base", type=Path)
    run.add_argument("--prompt", required=True)
    run.add_argument("--response", required=True)
    run.add_argument("--batch", type=int, required=True)
    run.add_argument("--steps", type=int, required=True)
    run.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    if args.command == "base":
        build_base(args.demo_base, args.out)
    else:
        floor(args.base, args.prompt, args.response, args.batch, args.steps, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
