"""How often saved evaluations write the keywords the held-out prompts ask for: the topic's word and the unrelated
words of eval (tools/ifprefs_edits.EVAL_EXTRA_KEYWORDS) counted apart, greedy replies, no generation.

    python bench/keyword_rates.py start=outputs/base/eval sft=outputs/sft/eval [NAME=EVAL_DIR ...]

For each evaluation: of the prompts that ask to include a keyword, in how many the reply has every unrelated word
asked for, every topic word asked for, and meets the include_keywords constraint; with coherent strict and the
degenerate count on those prompts (align.evaluation.metrics.judge_again: today's degeneration check).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "eval")]

from ifprefs_edits import EVAL_EXTRA_KEYWORDS  # noqa: E402
from rescore import rescored  # noqa: E402

from align.errors import cli_main  # noqa: E402
from align.evaluation.verifier import verify  # noqa: E402


def asked(row: dict, unrelated: bool) -> list[str]:
    return [w for c in row["constraints"] if c["type"] == "include_keywords" for w in c["keywords"]
            if (w in EVAL_EXTRA_KEYWORDS) == unrelated]


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=EVAL_DIR (eval/evaluate.py output with generations.jsonl)")
    runs = dict(a.split("=", 1) for a in parser.parse_args().runs)
    rows = {k: {r["prompt_id"]: r for r in rescored(v, "greedy")} for k, v in runs.items()}
    first = next(iter(rows.values()))
    ids = [i for i, r in first.items() if asked(r, True) or asked(r, False)]
    print(f"{len(ids)} prompts ask to include a keyword")
    for unrelated, label in ((True, "unrelated word"), (False, "topic word")):
        sel = [i for i in ids if asked(first[i], unrelated)]
        counts = [f"{k} {sum(all(w.lower() in rows[k][i]['reply'].lower() for w in asked(rows[k][i], unrelated)) for i in sel)}/{len(sel)}"
                  for k in runs]
        print(f"{label} written: " + ", ".join(counts))
    for k in runs:
        met = sum(verify(rows[k][i]["reply"], [c]).strict for i in ids for c in rows[k][i]["constraints"] if c["type"] == "include_keywords")
        print(f"{k}: include_keywords met {met}/{len(ids)}; coherent strict {sum(rows[k][i]['coherent_strict'] for i in ids)}, "
              f"degenerate {sum(rows[k][i]['degenerate'] for i in ids)} on these prompts")


if __name__ == "__main__":
    main()
