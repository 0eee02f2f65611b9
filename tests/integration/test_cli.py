"""The `align` command (align/cli.py) and `align chat` (align/models/chat.py), on tiny models: the console script pip
installs, every command's help, both flag spellings, one-line errors with exit code 2, a one-shot reply, the
conversation in process, and an interactive session in a real terminal (tmux). Also: no startup noise."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from align.cli import COMMANDS
from align.config import build_config, parse_config
from align.errors import AlignError, ConfigError
from align.models.chat import ChatArgs, ChatSession, chat_loop, load_chat_model, printable
from repo_paths import REPO

# This checkout's code, whichever checkout the installed console script was installed from
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
PAIR = {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"}


def align_command() -> list[str]:
    """The installed `align` console script; `python -m align` (the same main) where it is not installed."""
    script = shutil.which("align")
    return [script] if script else [sys.executable, "-m", "align"]


def run_align(*args: str, timeout: float = 240, cwd: str | Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*align_command(), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The exit code is 2 and stderr is one `error: ...` line (no traceback); returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr[-2000:])
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- the console script


def test_pyproject_installs_the_align_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"align": "align.cli:main"}


def test_installed_console_script_lists_every_command():
    script = shutil.which("align")
    if script is None:
        pytest.skip("the align console script is not installed here (pip install -e .)")
    proc = subprocess.run([script, "--help"], env=ENV, capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    for name, (_, line) in COMMANDS.items():
        assert f"  {name}" in proc.stdout and line in proc.stdout


def test_help_lists_commands_one_line_each():
    proc = run_align("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, (_, line) in COMMANDS.items():
        (row,) = [r for r in lines if r.split()[:1] == [name]]
        assert row.split(None, 1)[1] == line
    assert set(COMMANDS) == {"data", "plan", "eval", "compare", "chat"}


def test_each_command_shows_its_own_help_in_underscore_style():
    data = run_align("data", "check", "--help")
    assert data.returncode == 0 and "usage: align data check" in data.stdout
    assert "--on_bad_rows" in data.stdout and "--on-bad-rows" not in data.stdout
    plan = run_align("plan", "--help")
    assert plan.returncode == 0 and "align plan --model" in plan.stdout and "--gpu_gb" in plan.stdout
    chat = run_align("chat", "--help")
    assert chat.returncode == 0 and "align chat RUN" in chat.stdout
    for flag in ("--temperature", "--top_p", "--top_k", "--repetition_penalty", "--no_repeat_ngram_size", "--num_beams", "--max_new_tokens"):
        assert f"  {flag} (" in chat.stdout
    for command in ("eval", "compare"):
        proc = run_align(command, "--help")
        assert proc.returncode == 0 and f"align {command} " in proc.stdout and "--max_new_tokens (int" in proc.stdout


def test_unknown_command_is_one_error_exit_2():
    assert "unknown command 'evl'; did you mean eval?" in one_error_line(run_align("evl", "base"))
    assert "unknown command 'train'" in one_error_line(run_align("train"))
    assert "expected a command" in one_error_line(run_align())


# ---------------------------------------------------------------- data, plan, eval, compare through `align`


def test_align_data_check_takes_both_flag_spellings(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [PAIR, {"prompt": "x", "chosen": "", "rejected": "b"}, PAIR])
    stopped = run_align("data", "check", data)
    assert f"{data} line 2: field 'chosen'" in one_error_line(stopped)
    outputs = []
    for flag in ("--on_bad_rows", "--on-bad-rows"):
        proc = run_align("data", "check", data, flag, "skip")
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] == f"{data}: 2 preference pairs from 2 rows (1 skipped), format 'strings'\n"


def test_align_plan_takes_both_flag_spellings():
    reports = []
    for flag in ("--gpu_gb", "--gpu-gb"):
        proc = run_align("plan", "--stage", "dpo", flag, "12", "--json")
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    assert reports[0] == reports[1] and reports[0]["args"]["gpu_gb"] == 12
    assert "unknown option 'gpu_gbb'" in one_error_line(run_align("plan", "--gpu_gbb", "12"))


def test_align_eval_and_compare_on_a_tiny_model(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "p0", "prompt": "Say hi."}, {"id": "p1", "prompt": "Name a river."}])
    common = ["--prompts", prompts, "--modes", "greedy", "--max_prompts", "2", "--pref_data", "none", "--ppl_data", "none",
              "--dtype", "fp32"]
    first = run_align("eval", tiny_model_dir, *common, "--max_new_tokens", "4", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_align("eval", tiny_model_dir, *common, "--max-new-tokens", "4", "--out", str(tmp_path / "b"))  # dashes too
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["settings"]["max_new_tokens"] == b["settings"]["max_new_tokens"] == 4 and a["metrics"] == b["metrics"]
    report = tmp_path / "report"
    proc = run_align("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(report), "--n_bootstrap", "100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"report.md", "report.html", "summary.json"} <= {p.name for p in report.iterdir()}
    assert "max_prompts: expected a positive number" in one_error_line(run_align("eval", tiny_model_dir, "--max_prompts", "0"))


def test_eval_scripts_are_thin_and_do_not_touch_sys_path():
    for script in sorted((REPO / "eval").glob("*.py")):
        text = script.read_text()
        assert "sys.path" not in text, f"{script.name} edits sys.path"
    for name, module in (("evaluate", "align.evaluation.run"), ("compare", "align.report.compare")):
        text = (REPO / "eval" / f"{name}.py").read_text()
        assert f"from {module} import main" in text and len(text.splitlines()) < 20


# ---------------------------------------------------------------- align chat: settings


@pytest.mark.parametrize("flag,value,expected", [
    ("top_p", "1.5", "top_p: expected a number in (0, 1], got 1.5"),
    ("top_p", "0", "top_p: expected a number in (0, 1], got 0.0"),
    ("top_k", "-1", "top_k: expected a number >= 0"),
    ("temperature", "-0.5", "temperature: expected a number >= 0 (0 = greedy)"),
    ("repetition_penalty", "0", "repetition_penalty: expected a number > 0"),
    ("no_repeat_ngram_size", "-2", "no_repeat_ngram_size: expected a number >= 0"),
    ("num_beams", "0", "num_beams: expected a number >= 1"),
    ("max_new_tokens", "0", "max_new_tokens: expected a positive number"),
    ("temperature", "warm", "temperature: expected a number, got 'warm'"),
])
def test_chat_settings_are_checked(flag, value, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(ChatArgs, [f"--{flag}", value])
    assert expected in str(err.value)


def test_sampling_filters_need_sampling():
    """top_p / top_k with greedy decoding would be ignored without a word: refused, with the fix."""
    with pytest.raises(ConfigError, match=r"top_k: applies only when sampling; set --temperature above 0"):
        parse_config(ChatArgs, ["--top_k", "40"])
    cfg = parse_config(ChatArgs, ["--temperature", "0.7", "--top-k", "40", "--top_p", "0.9"])
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.7, 40, 0.9)
    assert build_config(ChatArgs, {}).temperature == 0.0  # greedy by default


def test_bad_chat_flags_are_one_error_line_exit_2(tiny_model_dir):
    assert "top_p: expected a number in (0, 1], got 1.5" in one_error_line(run_align("chat", tiny_model_dir, "--top_p", "1.5"))
    assert "num_beams: expected a number >= 1" in one_error_line(run_align("chat", tiny_model_dir, "--num-beams", "0"))
    assert "unknown option 'top_pp'; did you mean top_p" in one_error_line(run_align("chat", tiny_model_dir, "--top_pp", "1"))
    assert "expected RUN first" in one_error_line(run_align("chat", "--prompt", "hi"))
    assert "no such run directory or model" in one_error_line(run_align("chat", "outputs_typo", "--prompt", "hi"))


def test_printable_shows_control_characters_escaped():
    assert printable("a\tb\nc\x1b[2Jd\x07") == "a\tb\nc\\x1b[2Jd\\x07"
    assert printable("żółw 🐢") == "żółw 🐢"


# ---------------------------------------------------------------- align chat: the conversation, in process


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    model, tokenizer, description = load_chat_model(tiny_model_dir, "fp32")
    return model, tokenizer


def session_of(tiny_chat, **settings) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    cfg = build_config(ChatArgs, {"max_new_tokens": 8, **settings})
    return ChatSession(*tiny_chat, cfg, out=out, note=out), out


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_reply_streams_token_by_token(tiny_chat, one_thread):
    """The tiny model's greedy reply to "hi" is 12 newlines; the streamer writes each as it is generated (a
    reply written at the end would be one write), and what it wrote is the reply."""
    out = Recorder()
    session = ChatSession(*tiny_chat, build_config(ChatArgs, {"max_new_tokens": 12}), out=out, note=io.StringIO())
    reply = session.reply("hi")
    assert len([w for w in out.writes if w]) >= 6
    assert out.getvalue().strip() == reply == ""
    sampled, sampled_out = session_of(tiny_chat, temperature=1.0, max_new_tokens=16)
    import torch

    torch.manual_seed(0)
    reply = sampled.reply("hi")
    assert reply and printable(reply) in sampled_out.getvalue()  # the reply kept in the history is what was shown, trimmed


def test_conversation_keeps_history_until_reset(tiny_chat, one_thread):
    session, _ = session_of(tiny_chat, system="Be brief.")
    first = session.reply("hello")
    session.reply("and again")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first
    # the second prompt held the first exchange: the template renders it back
    rendered = session.tokenizer.apply_chat_template(session.messages[:4], tokenize=False, add_generation_prompt=True)
    assert rendered.index("hello") < rendered.index("and again")
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_loop_reads_messages_and_commands(tiny_chat, one_thread):
    session, out = session_of(tiny_chat)
    lines = iter(["hello", "", "/reset", "again", "/help", "/exit", "never read"])
    chat_loop(session, read=lambda prompt: next(lines))
    assert next(lines) == "never read"  # /exit ended it
    text = out.getvalue()
    assert text.count("assistant> ") == 2 and "(new conversation)" in text and "/reset starts a new conversation" in text
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["again"]

    def end_of_input(prompt):
        raise EOFError

    chat_loop(session, read=end_of_input)  # Ctrl-D returns


def test_a_run_directory_chats_with_its_adapter_folded_in(tiny_model_dir, tmp_path, one_thread):
    """A recipe's run directory (adapter/ naming its base): on a CPU the adapter is folded into a copy of the
    weights, and the replies are those of the adapter on its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "run" / "adapter")
    model, tokenizer, description = load_chat_model(str(tmp_path / "run"), "fp32")
    assert "(adapter, float32)" in description and not hasattr(model, "disable_adapter")  # folded
    cfg = build_config(ChatArgs, {"max_new_tokens": 6})
    folded = ChatSession(model, tokenizer, cfg, out=io.StringIO()).reply("hi")
    unfolded = ChatSession(peft_model.eval(), tokenizer, cfg, out=io.StringIO()).reply("hi")
    assert folded == unfolded


def test_oldest_exchanges_are_dropped_to_fit_the_context(tmp_path, one_thread):
    from align.testing import make_tiny_model

    small = make_tiny_model(tmp_path / "small", max_position_embeddings=72)
    model, tokenizer, _ = load_chat_model(small, "fp32")
    out = io.StringIO()
    session = ChatSession(model, tokenizer, build_config(ChatArgs, {"max_new_tokens": 8}), out=out, note=out)
    for text in ("one", "two", "three", "four"):
        session.reply(text)
        asked = session._prompt_ids(session.messages[:-1])  # the prompt of this reply
        assert len(asked) + 8 <= 72
    assert "oldest exchange(s) dropped" in out.getvalue()
    assert session.messages[-2]["content"] == "four" and "one" not in [m["content"] for m in session.messages]
    before = list(session.messages)
    with pytest.raises(AlignError, match="more than the model's context of 72 tokens"):
        session.reply("x" * 100)
    assert session.messages == before  # a message that cannot fit leaves the conversation as it was


# ---------------------------------------------------------------- align chat: one-shot and in a terminal


def test_one_shot_prompt_prints_the_reply(tiny_model_dir, tiny_chat, one_thread):
    proc = run_align("chat", tiny_model_dir, "--prompt", "hi", "--max_new_tokens", "5", "--temperature", "1", "--seed", "3",
                     "--dtype", "fp32", "--cpu_threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import torch

    session, out = session_of(tiny_chat, max_new_tokens=5, temperature=1.0)
    torch.manual_seed(3)
    session.reply("hi")
    assert proc.stdout == out.getvalue() and proc.stdout.strip()  # the same reply, and only it, on stdout
    greedy = run_align("chat", tiny_model_dir, "--prompt", "hi", "--max_new_tokens", "5")
    assert greedy.returncode == 0 and greedy.stdout.endswith("\n"), greedy.stderr[-2000:]


class Tmux:
    """A tmux server of its own (-L) with one session running `command` in a real terminal."""

    def __init__(self, command: str):
        self.socket, self.name = f"align-test-{uuid.uuid4().hex[:8]}", "chat"
        self.tmux("new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30, check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", self.name)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", text)
        self.tmux("send-keys", "-t", self.name, "Enter")

    def wait_for(self, done, timeout: float = 180) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if done(screen):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"timed out; the terminal shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_interactive_chat_in_a_real_terminal(tiny_model_dir, tmp_path):
    """Type a message, see the reply streamed, /reset, another message, /exit: the process ends with exit code 0."""
    env = " ".join(f"{k}={v}" for k, v in (("HF_HUB_OFFLINE", "1"), ("PYTHONPATH", REPO), ("OMP_NUM_THREADS", "1"),
                                           ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")))
    command = " ".join([*align_command(), "chat", tiny_model_dir, "--max_new_tokens", "12", "--temperature", "1",
                        "--dtype", "fp32", "--cpu_threads", "1"])
    marker = tmp_path / "exit_code"
    term = Tmux(f"env {env} {command}; echo $? > {marker}; echo CHAT-ENDED; sleep 600")
    try:
        term.wait_for(lambda s: s.rstrip().endswith("you>"))
        assert "/reset starts a new conversation, /exit (or Ctrl-D) ends it" in term.screen()
        term.type("hello there")
        screen = term.wait_for(lambda s: s.count("you>") == 2)
        reply = screen.split("assistant> ", 1)[1].split("you>", 1)[0]
        assert reply.strip(), screen  # the reply, printed after the assistant's prompt
        term.type("/reset")
        term.wait_for(lambda s: "(new conversation)" in s and s.count("you>") == 3)
        term.type("one more")
        term.wait_for(lambda s: s.count("assistant> ") == 2 and s.count("you>") == 4)
        term.type("/exit")
        screen = term.wait_for(lambda s: "CHAT-ENDED" in s, timeout=60)
        assert marker.read_text().strip() == "0", screen
        assert "Traceback" not in screen
    finally:
        term.close()


# ---------------------------------------------------------------- startup noise


def test_no_startup_noise_a_user_cannot_act_on(tmp_path):
    """bitsandbytes' note about the optional `kernels` package and transformers' FutureWarnings about the
    gradient -> activation checkpointing rename are dropped; other warnings of the same kinds still show."""
    code = """
import warnings, logging
warnings.simplefilter("default")
import align.data.load, align.models.loading
import bitsandbytes
from transformers import AutoModelForCausalLM
from trl import SFTConfig
SFTConfig(output_dir=%r, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True, report_to=[])
model = AutoModelForCausalLM.from_config(__import__("align.testing").testing.tiny_config(259))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
assert model.is_gradient_checkpointing
warnings.warn("`something_else` is deprecated and will be removed in v6", FutureWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes note")
""" % str(tmp_path / "trainer")
    # simplefilter("default") comes before align is imported: align's narrow filters go in front of it
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernels-community" not in proc.stderr and "gradient_checkpointing" not in proc.stderr, proc.stderr
    assert "`something_else` is deprecated" in proc.stderr and "another bitsandbytes note" in proc.stderr
