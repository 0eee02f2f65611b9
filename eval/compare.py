"""Compare several runs in one report: the `align compare` command (align/report/compare.py), as a script.

    python eval/compare.py outputs/sft outputs/dpo outputs/ppo --out outputs/report
    python eval/compare.py outputs/dpo --help                    # every option

Needs the package installed (`pip install -e .`); the code lives in align.report.compare.
"""

from align.report.compare import main

if __name__ == "__main__":
    main()
