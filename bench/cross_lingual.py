"""Zero-shot cross-lingual NER, English -> Swahili, on the packaged MiniLM with the shared data.

    .venv/bin/python bench/cross_lingual.py --data ../shared/data --out runs/en-sw [--method pfeiffer|sft]
        [--mlm-steps 1000] [--task-steps 600] [--extend-vocab 3000] [--threads 2]

Runs `modfit.recipes.run_cross_lingual`: a language module per language by masked language modelling
(English: the UD English-EWT text; Swahili: the MasakhaNER training sentences without their tags), a
task module on CoNLL-2003 English stacked on the English module, then entity F1 on the MasakhaNER
Swahili test set for the task module alone, stack(en, task) and stack(sw, task) (DATE counts as O).
Prints the table and the wall time; everything is saved under --out (see the recipe's docstring).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", default="runs/en-sw")
    parser.add_argument("--base", default="default")
    parser.add_argument("--method", choices=["pfeiffer", "sft"], default="pfeiffer")
    parser.add_argument("--mlm-steps", type=int, default=1000)
    parser.add_argument("--task-steps", type=int, default=600)
    parser.add_argument("--extend-vocab", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-sentences", type=int, default=0)
    parser.add_argument("--lang-param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from modfit.cli import parse_params
    from modfit.recipes import CrossLingualSpec, run_cross_lingual
    from modfit.recipes.cross_lingual import table_markdown

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = Path(args.data)
    spec = CrossLingualSpec(
        base=args.base,
        source_text=str(data / "english_raw" / "ud_ewt_train_text.txt"),
        target_text=str(data / "masakhaner_swa" / "train.txt"),
        train=str(data / "conll2003_en" / "train.txt"),
        eval_target=str(data / "masakhaner_swa" / "test.txt"),
        out=args.out,
        method=args.method,
        mlm_steps=args.mlm_steps,
        task_steps=args.task_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        extend_vocab=args.extend_vocab,
        max_train_sentences=args.max_train_sentences,
        seed=args.seed,
        lang_params=dict(parse_params(args.lang_param)),
    )
    started = time.perf_counter()
    report = run_cross_lingual(spec)
    print(table_markdown(report.table))
    print(f"wall time {time.perf_counter() - started:.0f} s; results in {report.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
