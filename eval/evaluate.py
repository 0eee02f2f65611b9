"""Evaluate one policy on a fixed prompt set: the `align eval` command (align/evaluation/run.py), as a script.

    python eval/evaluate.py outputs/dpo                                  # -> outputs/dpo/eval/
    python eval/evaluate.py base --modes greedy --max_prompts 50         # the untrained default model
    python eval/evaluate.py outputs/dpo --help                           # every option

Needs the package installed (`pip install -e .`); the code lives in align.evaluation.
"""

from align.evaluation.run import main

if __name__ == "__main__":
    main()
