"""Zero-shot cross-lingual NER, English -> Swahili, on the packaged MiniLM with the shared data.

    .venv/bin/python bench/cross_lingual.py --data ../shared/data --out runs/en-sw [RECIPE OPTIONS]

`modfit recipe cross-lingual` on the shared files, with this benchmark's settings (FINAL below, the
ones the README's table was measured with) as defaults; any option of the recipe command given here
overrides them (e.g. `--method sft`, `--mlm-steps 200`, `--threads 2`). The modules are named en,
sw and ner: a language module per language by masked language modelling (English: the UD
English-EWT text; Swahili: the MasakhaNER training sentences without their tags), a task module on
CoNLL-2003 English stacked on the English module, then entity F1 on the MasakhaNER Swahili test set
for ner alone, stack(en, ner) and stack(sw, ner) (DATE counts as O). Prints the table and the wall
time; everything is saved under --out (see `modfit.recipes.cross_lingual`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The settings of the measured table (see the README's cross-lingual section), which one CPU thread
# of the 2-core machine runs in well under an hour: language modules of 1,000 MLM steps of 16
# sentences each, the Swahili one under the English module's frozen MLM head (--shared-head) and with
# 2,000 word pieces learned from the Swahili text (--extend-vocab); the task module 300 steps of 16 on
# the first 3,000 CoNLL sentences. What each setting is worth is in the README (200 MLM steps, or an
# own head for Swahili: no gain over the task module alone).
FINAL = (
    "--mlm-steps",
    "1000",
    "--task-steps",
    "300",
    "--batch-size",
    "16",
    "--max-train-sentences",
    "3000",
    "--shared-head",
    "--extend-vocab",
    "2000",
    "--threads",
    "1",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", default="runs/en-sw")
    args, recipe_options = parser.parse_known_args(argv)

    from modfit import cli

    data = Path(args.data)
    command = [
        "recipe",
        "cross-lingual",
        "--source-text",
        str(data / "english_raw" / "ud_ewt_train_text.txt"),
        "--target-text",
        str(data / "masakhaner_swa" / "train.txt"),
        "--train",
        str(data / "conll2003_en" / "train.txt"),
        "--eval-target",
        str(data / "masakhaner_swa" / "test.txt"),
        "--out",
        args.out,
        "--source-lang",
        "en",
        "--target-lang",
        "sw",
        "--task-name",
        "ner",
        *FINAL,
        *recipe_options,  # later options win
    ]
    print("modfit " + " ".join(command), flush=True)
    started = time.perf_counter()
    status = cli.main(command)
    print(f"wall time {time.perf_counter() - started:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
