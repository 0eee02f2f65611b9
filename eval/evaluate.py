"""Evaluate one policy on a fixed prompt set; write every generation and score as JSON lines.

    python eval/evaluate.py outputs/dpo                                  # -> outputs/dpo/eval/
    python eval/evaluate.py base --modes greedy --max_prompts 50         # the untrained default model
    python eval/evaluate.py outputs/ppo --reward_model outputs/reward --prompts my_prompts.jsonl
    python eval/evaluate.py outputs/dpo --help                           # every option

RUN is a run directory (adapter/ or merged/), a model directory, or `base`. See align/evaluation.py for
what is measured and the files written (generations.jsonl, prefs.jsonl, ppl.jsonl, summary.json).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.config import parse_config  # noqa: E402
from align.errors import ConfigError, cli_main  # noqa: E402
from align.evaluation import EvalArgs, evaluate  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        parse_config(EvalArgs, ["--help"])
    if not argv or argv[0].startswith("--"):
        raise ConfigError("command line: expected RUN first (a run directory, a model directory or 'base'); see --help")
    cfg = parse_config(EvalArgs, argv[1:])
    evaluate(argv[0], cfg)


if __name__ == "__main__":
    main()
