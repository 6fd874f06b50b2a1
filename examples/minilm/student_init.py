"""Which teacher blocks a 3-layer MiniLM student should start from, measured before any training.

    python examples/minilm/student_init.py

For each choice of 3 of all-MiniLM-L6-v2's 6 blocks, the untrained student (those blocks, in
order, on the teacher's embeddings) is evaluated on the project's sentence-pair set at max_length
64 (as distill.yaml): Spearman of its cosine similarities against the pair scores (and its share of
the teacher's), against the teacher's similarities, and the embedding cosine to the teacher.
About a CPU-minute.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHOICES = ([0, 2, 4], [1, 3, 5], [0, 2, 5], [0, 3, 5], [0, 1, 2], [3, 4, 5])


def main() -> int:
    import torch
    from torch import nn

    from model import MiniLM, tokenizer
    from pyserve.compress._sentence import SentenceTask

    torch.set_num_threads(1)
    teacher = MiniLM()
    task = SentenceTask(tokenizer(), max_length=64, verbose=False, transfer=4)
    base = task.evaluate(teacher)
    task.set_reference(teacher)
    print("| teacher blocks | Spearman vs scores | share of the teacher's | Spearman vs teacher | cosine to teacher (mean / min) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| all 6 (teacher) | {base:.4f} | 100.0% | 1.0000 | 1.0000 / 1.0000 |")
    for idx in CHOICES:
        student = copy.deepcopy(teacher)
        student.encoder.encoder.layer = nn.ModuleList([copy.deepcopy(teacher.encoder.encoder.layer[i]) for i in idx])
        d = task.details(student)
        print(f"| {', '.join(map(str, idx))} | {d['spearman_scores']:.4f} | {100 * d['spearman_scores'] / base:.1f}% | "
              f"{d['spearman_teacher']:.4f} | {d['cosine_to_fp32_mean']:.4f} / {d['cosine_to_fp32_min']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
