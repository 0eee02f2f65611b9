"""The `align` command: one entry point for the library's tools (installed by pip; `python -m align` is the same).

    align data check my_prefs.jsonl.gz
    align plan --model meta-llama/Llama-3.1-8B-Instruct --stage dpo --gpu_gb 24
    align eval outputs/dpo --max_prompts 50
    align compare outputs/sft outputs/dpo outputs/ppo
    align chat outputs/dpo

Each command is the `main` of its module, imported only when it runs, so `align --help` answers at once.
Training stays in the recipes, which run under `accelerate launch recipes/<stage>.py`.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from align.errors import ConfigError, cli_main

# name -> (module whose main(argv) runs it, one line for `align --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("align.data.check", "check a data source: row count and detected format, or the first bad row (align data check FILE)"),
    "plan": ("align.plan", "will it fit? expected peak memory of a training stage, from the model's config alone"),
    "eval": ("align.evaluation.run", "evaluate one policy on a fixed prompt set; every generation and score as JSON lines"),
    "compare": ("align.report.compare", "compare several runs in one report (Markdown, HTML, summary.json)"),
    "chat": ("align.models.chat", "talk to a run, a merged model or base in the terminal, or answer one --prompt"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: align COMMAND [options]      (align COMMAND --help shows its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", "Training: accelerate launch recipes/{sft,reward,dpo,ppo,grpo}.py [--config file.yaml] [--name value]"]
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv and argv[0] == "--version":
        from align import __version__

        print(f"align {__version__}")
        return
    if not argv:
        raise ConfigError(f"command line: expected a command, one of {', '.join(COMMANDS)}; see align --help")
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(COMMANDS)}"
        raise ConfigError(f"command line: unknown command {name!r}; {hint} (see align --help)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = importlib.import_module(COMMANDS[name][0]).main
    try:
        if name == "data":
            command(rest, prog="align data")
        else:
            command(rest)
    except BrokenPipeError:  # `align ... | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        sys.exit(141)  # what a shell reports for SIGPIPE


if __name__ == "__main__":
    main()
