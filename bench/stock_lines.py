"""Stock lines: lines that the training data's replies repeat word for word across many prompts, and how many of
each policy's held-out replies carry them (saved evaluations, greedy replies, no generation).

    python bench/stock_lines.py --data ifprefs:sft start=outputs/base/eval ppo=outputs/ppo/eval [NAME=EVAL_DIR ...]

A line of a reply (stripped and lower-cased, at least --min_chars characters) is a stock line of the data when the
final replies to at least --min_prompts different prompts hold it: the template sentences of the built-in data's
edits ("Join us at [location] on [date] at [time].", its postscripts and end phrases) are; a policy that writes them
on held-out prompts copies the data rather than answering (a line the prompt itself quotes, such as an end phrase it
asks for, is not counted). Prints one row per stock line, ordered by how many replies of the last evaluation hold it:
the data's prompt count, then each evaluation's count of replies that hold it unasked.
"""

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "eval")]

from rescore import rescored  # noqa: E402

from align.data.load import load_sft  # noqa: E402
from align.errors import cli_main  # noqa: E402
from align.evaluation.degeneration import prompt_text  # noqa: E402


def reply_lines(reply: str, min_chars: int) -> set[str]:
    """The distinct lines of a reply, stripped and lower-cased, of at least min_chars characters."""
    return {line for line in (raw.strip().lower() for raw in reply.splitlines()) if len(line) >= min_chars}


def stock_lines(examples: Iterable[tuple[str, str]], min_prompts: int, min_chars: int) -> dict[str, int]:
    """{line: number of distinct prompts whose replies hold it} for the lines held by at least min_prompts prompts.

    examples: (prompt, reply) pairs; two replies to one prompt count that prompt once.
    """
    prompts_of: dict[str, set[str]] = defaultdict(set)
    for prompt, reply in examples:
        for line in reply_lines(reply, min_chars):
            prompts_of[line].add(prompt)
    return {line: len(prompts) for line, prompts in prompts_of.items() if len(prompts) >= min_prompts}


def unasked_lines(prompt: str, reply: str, lines: Iterable[str], min_chars: int) -> set[str]:
    """Those of `lines` that the reply holds as one of its lines and the prompt does not ask for word for word
    (an end phrase the prompt quotes is an answer, not a copy)."""
    return {line for line in reply_lines(reply, min_chars) & set(lines) if line not in prompt.lower()}


def line_counts(held: Iterable[set[str]], lines: Iterable[str]) -> dict[str, int]:
    """{line: number of the replies' sets of unasked lines (unasked_lines) that hold it}, 0 for a line none holds."""
    counts = dict.fromkeys(lines, 0)
    for found in held:
        for line in found:
            counts[line] += 1
    return counts


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=EVAL_DIR (eval/evaluate.py output with generations.jsonl)")
    parser.add_argument("--data", default="ifprefs:sft", help="SFT data whose final assistant replies are searched")
    parser.add_argument("--min_prompts", type=int, default=20, help="a stock line is held by this many prompts' replies")
    parser.add_argument("--min_chars", type=int, default=12, help="shorter lines (headers, dividers) are not counted")
    parser.add_argument("--top", type=int, default=20, help="rows to print")
    args = parser.parse_args()
    runs = dict(run.split("=", 1) for run in args.runs)

    examples = [(prompt_text(ex.messages),
                 [m["content"] for m in ex.messages if m["role"] == "assistant"][-1]) for ex in load_sft(args.data)]
    stock = stock_lines(examples, args.min_prompts, args.min_chars)
    # each reply's unasked stock lines, once: the per-line counts and the "any stock line" row both come from them
    unasked = {name: [unasked_lines(prompt_text(row["prompt"]), row["reply"], stock, args.min_chars)
                      for row in rescored(path, "greedy")] for name, path in runs.items()}
    held = {name: line_counts(unasked[name], stock) for name in runs}
    last = list(runs)[-1]
    print(f"{len(stock)} stock lines in {args.data} ({len(examples)} examples; held by >= {args.min_prompts} prompts' replies)")
    print("| line | data prompts | " + " | ".join(f"{name} replies" for name in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for line in sorted(stock, key=lambda line: (-held[last][line], -stock[line]))[: args.top]:
        print(f"| {line} | {stock[line]} | " + " | ".join(str(held[name][line]) for name in runs) + " |")
    print("| any stock line | | " + " | ".join(f"{sum(map(bool, unasked[name]))} of {len(unasked[name])}" for name in runs) + " |")


if __name__ == "__main__":
    main()
