"""Writes the quickstart's small sentiment task: templated product reviews with positive or negative
wording, some negated ("not great" is negative), so that it is learnable in one short fine-tuning epoch
yet not a single-word lookup. Deterministic (seeded); no download.

    python examples/quickstart_data.py [OUT_DIR]      # default: examples/data/quickstart
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

POSITIVE = ["great", "excellent", "wonderful", "reliable", "delightful", "superb", "pleasant", "solid", "fantastic",
            "impressive", "comfortable", "sturdy"]
NEGATIVE = ["terrible", "awful", "flimsy", "disappointing", "broken", "useless", "poor", "noisy", "clumsy",
            "dreadful", "fragile", "annoying"]
THINGS = ["the battery", "this phone", "the blender", "the headphones", "this laptop", "the chair", "the kettle",
          "the camera", "this jacket", "the keyboard", "the tent", "the vacuum", "the backpack", "this lamp"]
TEMPLATES = ["{thing} is {adj}.", "{thing} was {adj} from day one.", "honestly, {thing} feels {adj}.",
             "i found {thing} {adj} and would say so again.", "after a month, {thing} is still {adj}.",
             "my verdict: {thing} is {adj}."]
NEGATED = ["{thing} is not {adj} at all.", "i would not call {thing} {adj}.", "{thing} is far from {adj}."]


def make_rows(n: int, rng: random.Random) -> list[tuple[str, str]]:
    rows = []
    for _ in range(n):
        positive_word = rng.random() < 0.5
        adj = rng.choice(POSITIVE if positive_word else NEGATIVE)
        negated = rng.random() < 0.25
        template = rng.choice(NEGATED if negated else TEMPLATES)
        label = positive_word != negated
        rows.append((template.format(thing=rng.choice(THINGS), adj=adj), "positive" if label else "negative"))
    return rows


def write(out_dir: Path, train: int = 480, dev: int = 160, seed: int = 13) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n in (("train", train), ("dev", dev)):
        with open(out_dir / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label"])
            writer.writerows(make_rows(n, rng))
    return out_dir


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "data" / "quickstart"
    print(f"quickstart data: {write(target)}")
