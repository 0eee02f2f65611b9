"""Chat: the templates training needs, and `align chat`, a conversation with a trained policy in the terminal.

Chat templates for training: loss on assistant turns only needs `{% generation %}` markers. TRL ships
marked-up training templates for many model families (Llama 3, Qwen, Gemma, Phi, ...). ChatML templates
such as SmolLM2's are not among them, so we mark them up here: the assistant's content and its
`<|im_end|>` (so the model learns to stop) are inside the markers; everything else renders unchanged.

`align chat RUN` (also `python -m align.models.chat RUN`):

    align chat outputs/dpo                                   # a run directory: its adapter on its base
    align chat outputs/sft/merged --temperature 0.7 --top_p 0.9
    align chat base --prompt "Write a haiku about rain."     # one reply, printed; exit 0

RUN is what `align eval` takes (align.evaluation.policy.load_run): a run directory, a model directory or `base`.
Replies use the model's chat template and stream as they are generated (greedy unless --temperature is
above 0); the conversation keeps every turn until /reset. /exit, /quit or Ctrl-D ends it; Ctrl-C stops a
reply. When the conversation outgrows the model's context, the oldest turns are dropped (and it says so).
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import Literal, TextIO

from align.config import arg, parse_config
from align.errors import AlignError, ConfigError, cli_main
from align.log import get_logger

logger = get_logger(__name__, tag="chat")

_CHATML_TURN = re.compile(
    r"\{\{\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'\n'\s*\+\s*message\['content'\]\s*\+\s*'<\|im_end\|>'\s*\+\s*'\n'\s*\}\}"
)
_CHATML_MARKED = (
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
)


def has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def training_chat_template(tokenizer) -> str:
    """A template that renders like the tokenizer's own and marks assistant replies for the loss."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ConfigError("the tokenizer has no chat template; set chat_template_path to a .jinja file with {% generation %} markers")
    if has_generation_markers(template):
        return template
    if _CHATML_TURN.search(template):
        return _CHATML_TURN.sub(lambda _: _CHATML_MARKED, template)
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except Exception as err:  # noqa: BLE001 - TRL raises for templates it does not know
        raise ConfigError(
            "the model's chat template has no {% generation %} markers and no known training version "
            f"({err}); set chat_template_path to a .jinja file with them, or assistant_only_loss: false"
        ) from None
    return patched or template


# ---------------------------------------------------------------- align chat RUN


@dataclass
class ChatArgs:
    prompt: str | None = arg(None, "answer this one message, print the reply and exit; none = an interactive session")
    system: str | None = arg(None, "a system message that opens the conversation (kept by /reset); none = the template's own")
    max_new_tokens: int = arg(256, "longest reply, in tokens")
    temperature: float = arg(0.0, "0 = greedy decoding (the default); above 0 samples at this temperature")
    top_p: float = arg(1.0, "nucleus sampling: only the likeliest tokens holding this share of probability, in (0, 1]; 1 = off")
    top_k: int = arg(0, "sampling from the k likeliest tokens only; 0 = off")
    repetition_penalty: float = arg(1.0, "above 1 makes tokens already in the conversation or reply less likely (Keskar et al. 2019); 1 = off")
    no_repeat_ngram_size: int = arg(0, "never generate an n-gram of this many tokens twice; 0 = off")
    num_beams: int = arg(1, "beam search over this many beams (the reply is printed when the search ends: beams do not stream); 1 = off")
    seed: int = arg(0, "sampling seed, set once at the start")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "compute dtype; auto = bf16 where the hardware has it, else fp32")
    cpu_threads: int = arg(0, "torch threads on a CPU; 0 = auto: the cores idle at the start, at least 1; -1 = leave torch's setting")

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"config: {name}: expected {expected}, got {getattr(self, name)}")

        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "a positive number")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "a number >= 0 (0 = off)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "a number > 0 (1 = off)")
        if self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "a number >= 0 (0 = off)")
        if self.num_beams < 1:
            raise bad("num_beams", "a number >= 1 (1 = off)")
        # Greedy decoding takes the likeliest token, so a sampling filter would be silently ignored: say so
        for name, off in (("top_p", 1.0), ("top_k", 0)):
            if self.temperature == 0 and getattr(self, name) != off:
                raise ConfigError(f"config: {name}: applies only when sampling; set --temperature above 0 (0 = greedy)")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("config: prompt: expected a message, got an empty one")


def generation_config(cfg: ChatArgs, model, tokenizer):
    """transformers' GenerationConfig for `cfg`: greedy or sampled, with the repetition controls; stops at the
    tokenizer's end-of-turn token and at every end token the model's own generation config names."""
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    sampling = cfg.temperature > 0
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=sampling, num_beams=cfg.num_beams,
        temperature=cfg.temperature if sampling else None, top_p=cfg.top_p if sampling else None,
        top_k=cfg.top_k if sampling else None,  # top_k 0 is off in transformers (its default would be 50)
        repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
    )


def printable(text: str) -> str:
    """`text` without terminal control characters (a model's reply is text; an escape sequence in it must not
    drive the terminal): newlines and tabs stay, other control characters are shown as \\xNN."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else f"\\x{ord(ch):02x}" for ch in text)


def _streamer(tokenizer, out: TextIO):
    """A TextStreamer writing the reply to `out` as it is generated (whole words at a time: a word's text can
    change with the next token), through `printable`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(printable(text) + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatSession:
    """One conversation with a model: the messages so far, and one reply at a time streamed to `out`."""

    def __init__(self, model, tokenizer, cfg: ChatArgs, out: TextIO | None = None, note: TextIO | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.out, self.note = out or sys.stdout, note or sys.stderr
        self.gen_config = generation_config(cfg, model, tokenizer)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []

    def _prompt_ids(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        messages = self.messages if messages is None else messages
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fits(self, ids: list[int]) -> bool:
        return not self.context or len(ids) + self.cfg.max_new_tokens <= self.context

    def _fit_context(self) -> list[int]:
        """The prompt's token ids, after dropping the oldest exchanges (never the system message or the new
        message) until the prompt and a whole reply fit in the model's context. A new message that cannot fit
        even alone is refused, and the conversation is left as it was."""
        first = 1 if self.cfg.system else 0
        alone = self._prompt_ids(self.messages[:first] + self.messages[-1:])
        if not self._fits(alone):
            self.messages.pop()
            raise AlignError(f"the message is {len(alone)} tokens with the template; with --max_new_tokens {self.cfg.max_new_tokens} "
                             f"that is more than the model's context of {self.context} tokens: shorten it or lower --max_new_tokens")
        ids, dropped = self._prompt_ids(), 0
        while not self._fits(ids):
            del self.messages[first : first + 2]  # one user message and the reply to it
            dropped += 1
            ids = self._prompt_ids()
        if dropped:
            self.note.write(f"[chat] the {dropped} oldest exchange(s) dropped: the conversation outgrew the model's "
                            f"{self.context}-token context\n")
        return ids

    def reply(self, text: str) -> str:
        """Answer `text` in the conversation, streaming the reply to `out`; returns the reply."""
        import torch

        from align.models.generation import generate_ids

        self.messages.append({"role": "user", "content": text})
        device = next(self.model.parameters()).device
        ids = torch.tensor([self._fit_context()], device=device)
        streaming = self.cfg.num_beams == 1  # transformers streams one sequence, not a beam search
        try:
            with torch.no_grad():
                output = generate_ids(self.model, ids, torch.ones_like(ids), generation_config=self.gen_config,
                                      streamer=_streamer(self.tokenizer, self.out) if streaming else None)
        except BaseException:  # Ctrl-C in the middle of a reply: the message goes unanswered, the conversation goes on
            self.messages.pop()
            raise
        reply = self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
        if not streaming:
            self.out.write(printable(reply) + "\n")
            self.out.flush()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def load_chat_model(run: str, dtype: str = "auto"):
    """(model, tokenizer, description) of `run` for chatting: align.evaluation.policy.load_run, with a LoRA adapter
    folded into the weights on a CPU (align.models.loading.merged_copy: one matmul per layer instead of three)."""
    from align.evaluation.policy import load_run
    from align.models.loading import merged_copy

    model, tokenizer, kind, path = load_run(run, dtype)
    if kind == "adapter" and next(model.parameters()).device.type == "cpu":
        model = merged_copy(model) or model
    if not tokenizer.chat_template:
        raise AlignError(f"{run}: the tokenizer has no chat template; align chat needs a chat (instruct) model")
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    return model, tokenizer, f"{path} ({kind}, {dtype_name})"


COMMANDS_HELP = "/reset starts a new conversation, /exit (or Ctrl-D) ends it, Ctrl-C stops a reply"


def chat_loop(session: ChatSession, read=input) -> None:
    """Read messages until /exit, /quit or end of input; /reset clears the conversation."""
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            session.out.write("\n")
            return
        if not text:
            continue
        command = text.lower()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            session.out.write("(new conversation)\n")
            continue
        if command == "/help":
            session.out.write(COMMANDS_HELP + "\n")
            continue
        session.out.write("assistant> ")
        session.out.flush()
        try:
            session.reply(text)
        except KeyboardInterrupt:
            session.out.write("\n(stopped)\n")
        except AlignError as err:
            session.out.write("\n")
            session.note.write(f"error: {err}\n")
        session.out.flush()


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("Talk to a policy in the terminal: align chat RUN [--prompt TEXT] [--option value ...]\n")
        print(__doc__.split("(also `python -m align.models.chat RUN`):", 1)[1].strip("\n") + "\n")
        parse_config(ChatArgs, ["--help"])
    if not argv or argv[0].startswith("--"):
        raise ConfigError("command line: expected RUN first (a run directory, a model directory or 'base'); see --help")
    run, cfg = argv[0], parse_config(ChatArgs, argv[1:])

    import torch

    from align.trainers.common import set_cpu_threads

    threads = set_cpu_threads(cfg.cpu_threads)
    model, tokenizer, description = load_chat_model(run, cfg.dtype)
    torch.manual_seed(cfg.seed)
    session = ChatSession(model, tokenizer, cfg)
    decoding = "greedy" if cfg.temperature == 0 else f"sampling at temperature {cfg.temperature:g}"
    logger.info(f"{description}, {decoding}, {threads}")
    if cfg.prompt is not None:
        session.reply(cfg.prompt)
        return
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    logger.info(f"type a message; {COMMANDS_HELP}")
    chat_loop(session)


if __name__ == "__main__":
    main()
