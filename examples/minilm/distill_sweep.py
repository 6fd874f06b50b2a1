"""What longer training and other loss weights buy the 3-layer MiniLM student, epoch by epoch.

    python examples/minilm/distill_sweep.py [--runs base long kl] [--epochs 6] [--out sweep.json]

Each run distills a student from the teacher blocks of ``examples/minilm/distill.yaml`` (0, 3, 5) with
:func:`pyserve.compress.distill.distill_train` (the recipe's code path; the linear learning-rate decay
spans the run's epochs), one thread, on the transfer sentences at max_length 64, and after every epoch
measures it in fp32 on the sentence-pair set: the Spearman between the student's and the teacher's
cosine similarities (issue 7's "similarity correlation"), the Spearman against the pair scores and
the embedding cosine to the teacher. Output: one Markdown row per (run, epoch) with the CPU minutes
spent so far. int8 after distillation moves these by about 0.001 (README, "BERT on CPUs").

``--artifact A.pyserve [B.pyserve ...]`` measures built artifacts instead (loaded on the native
kernels, as served), and adds a check against over-fitting the pair set's kind of sentences: the
Spearman between the artifact's and the teacher's cosine similarities on 2,000 random pairs of 400
of Python's documentation sentences (``pyserve.datasets.transfer_sentences``, not in the
``everyday`` training set; seed 0), with the untrained 0, 3, 5 student beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: run name -> (DistillConfig overrides, transfer sets: None = pydoc's 779 sentences, as distill.yaml)
RUNS = {
    "base": ({}, None),                                                         # distill.yaml's weights
    "kl": ({"weight_kl": 20.0, "temperature": 1.0}, None),                      # sharper, heavier similarity KL
    "lr": ({"lr": 3e-4}, None),                                                 # faster
    "output": ({"weight_kl": 5.0, "weight_output": 30.0, "weight_cosine": 0.0}, None),  # embeddings only
    "everyday": ({}, ("everyday", "pydoc")),                                    # + in-domain sentences
    "everyday-output": ({"weight_kl": 5.0, "weight_output": 30.0, "weight_cosine": 0.0}, ("everyday", "pydoc")),
    "everyday-only": ({"weight_kl": 5.0, "weight_output": 30.0, "weight_cosine": 0.0}, ("everyday",)),
}
RECIPE = {"from_layers": (0, 3, 5), "lr": 1e-4, "temperature": 2.0, "weight_kl": 5.0, "weight_cosine": 1.0,
          "weight_output": 10.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["base"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--artifact", type=Path, nargs="+", help="measure these built artifacts instead of training")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.threads < 1:
        print("distill_sweep: --epochs and --threads must be >= 1", file=sys.stderr)
        return 2

    import torch

    from model import MiniLM, tokenizer
    from pyserve.compress._sentence import SentenceTask
    from pyserve.compress.distill import DistillConfig, distill_train, find_layer_stack, make_student

    torch.set_num_threads(args.threads)
    teacher = MiniLM()
    if args.artifact:
        return measure_artifacts(args.artifact, teacher)
    rows = []
    print("| run | epoch | Spearman vs teacher | Spearman vs scores | cosine to teacher (mean / min) | CPU min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for run in args.runs:
        overrides, sets = RUNS[run]
        cfg = DistillConfig(**{**RECIPE, **overrides, "epochs": args.epochs})
        task = SentenceTask(tokenizer(), max_length=64, verbose=False, seed=0, transfer_sets=sets or ("pydoc",))
        task.set_reference(teacher)
        torch.manual_seed(0)
        student, path, _ = make_student(teacher, None, None, cfg.from_layers)
        _, s_stack = find_layer_stack(student, path)
        _, t_stack = find_layer_stack(teacher)
        t0 = time.process_time()

        def report(epoch, model, run=run, t0=t0):
            d = task.details(model)
            row = {"run": run, "epoch": epoch + 1, **d, "cpu_min": (time.process_time() - t0) / 60}
            rows.append(row)
            print(f"| {run} | {epoch + 1} | {d['spearman_teacher']:.4f} | {d['spearman_scores']:.4f} | "
                  f"{d['cosine_to_fp32_mean']:.4f} / {d['cosine_to_fp32_min']:.4f} | {row['cpu_min']:.1f} |", flush=True)

        report(-1, student)
        distill_train(student, teacher, task, cfg, student_stack=s_stack, teacher_stack=t_stack, on_epoch=report)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    return 0


def heldout_spearman(model, teacher, task, n_sentences: int = 400, n_pairs: int = 2000) -> float:
    """Spearman between ``model``'s and ``teacher``'s cosine similarities on random pairs of Python
    documentation sentences (seed 0)."""
    import numpy as np

    from pyserve.compress._sentence import spearman
    from pyserve.datasets import transfer_sentences

    sents = transfer_sentences(n_sentences, sets=("pydoc",))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(sents), n_pairs), rng.integers(0, len(sents), n_pairs)
    keep = a != b
    a, b = a[keep], b[keep]

    def sims(m):
        e = task.embed(m, sents)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return (e[a] * e[b]).sum(1)

    return spearman(sims(model), sims(teacher))


def measure_artifacts(paths, teacher) -> int:
    import copy

    from torch import nn

    from model import tokenizer
    from pyserve import artifact
    from pyserve.artifact.kernels import native_module
    from pyserve.compress._sentence import SentenceTask

    task = SentenceTask(tokenizer(), max_length=64, verbose=False)
    task.set_reference(teacher)
    untrained = copy.deepcopy(teacher)
    untrained.encoder.encoder.layer = nn.ModuleList([copy.deepcopy(teacher.encoder.encoder.layer[i]) for i in (0, 3, 5)])
    models = {"untrained 0, 3, 5 student (fp32)": untrained}
    models.update({str(p): native_module(artifact.load_artifact(p))[0] for p in paths})
    print("| model | Spearman vs teacher (pairs) | Spearman vs scores | cosine to teacher (mean / min) | "
          "Spearman vs teacher (random pydoc pairs) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, m in models.items():
        d = task.details(m)
        print(f"| {name} | {d['spearman_teacher']:.4f} | {d['spearman_scores']:.4f} | {d['cosine_to_fp32_mean']:.4f} / "
              f"{d['cosine_to_fp32_min']:.4f} | {heldout_spearman(m, teacher, task):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
