"""align.log: the `[align] message` line on the current stderr, the level from --log_level or ALIGN_LOG_LEVEL,
one line per message however many modules log, and in a multi-process run info from the main process only."""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys

import pytest

from align import log as align_log
from align.config import parse_config
from align.errors import ConfigError
from align.log import MAIN_ONLY, LogArgs, get_logger, set_level
from repo_paths import REPO


@pytest.fixture(autouse=True)
def _single_process_at_info(monkeypatch):
    for name in ("ALIGN_LOG_LEVEL", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    set_level("info")
    yield
    set_level("info")


def test_a_line_is_the_tag_and_the_message_on_stderr(capsys):
    get_logger("tests.log_a").info("data: 16 training and 0 held-out records")
    get_logger("align.rl.ppo.trainer_test", tag="ppo").warning("health warning at update 3: kl")
    get_logger("align").error("an error")
    assert capsys.readouterr() == ("", "[align] data: 16 training and 0 held-out records\n"
                                       "[ppo] health warning at update 3: kl\n[align] an error\n")


def test_the_line_goes_to_the_stderr_of_the_moment(capsys):
    """The handler looks up sys.stderr when it writes, not when it was made (pytest swaps it per test)."""
    logger = get_logger("tests.log_b")
    swapped = sys.stderr
    try:
        import io

        sys.stderr = buffer = io.StringIO()
        logger.info("to the buffer")
    finally:
        sys.stderr = swapped
    logger.info("to capsys")
    assert buffer.getvalue() == "[align] to the buffer\n"
    assert capsys.readouterr().err == "[align] to capsys\n"


@pytest.mark.parametrize("flag, shown", [
    ("debug", ["d", "i", "w", "e"]), ("info", ["i", "w", "e"]), ("warning", ["w", "e"]), ("error", ["e"]),
])
def test_log_level_flag_sets_what_is_said(flag, shown, capsys):
    cfg = parse_config(LogArgs, ["--log_level", flag])
    assert cfg.log_level == flag
    logger = get_logger("tests.log_c")
    logger.debug("d"), logger.info("i"), logger.warning("w"), logger.error("e")
    assert capsys.readouterr().err == "".join(f"[align] {m}\n" for m in shown)


def test_env_var_sets_the_level_and_the_flag_wins(monkeypatch, capsys):
    logger = get_logger("tests.log_d")
    monkeypatch.setenv("ALIGN_LOG_LEVEL", "WARNING")
    parse_config(LogArgs, [])  # no flag: the environment
    logger.info("hidden")
    logger.warning("shown")
    parse_config(LogArgs, ["--log_level", "debug"])  # the flag wins over the environment
    logger.debug("debug shown")
    assert capsys.readouterr().err == "[align] shown\n[align] debug shown\n"
    monkeypatch.setenv("ALIGN_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="ALIGN_LOG_LEVEL: expected one of debug, info, warning, error, got 'loud'"):
        set_level(None)
    with pytest.raises(ConfigError, match=re.escape("config: log_level: expected 'debug' | 'info' | 'warning' | 'error' | none, got 'verbose'")):
        parse_config(LogArgs, ["--log_level", "verbose"])


def test_every_run_config_has_the_log_level_field():
    from align.rl.ppo.config import PPOArgs
    from align.trainers.common import RunArgs  # SFT, reward, DPO and GRPO args extend it

    assert parse_config(RunArgs, ["--log_level", "error"]).log_level == "error"
    assert parse_config(PPOArgs, ["--log_level", "error"]).log_level == "error"
    pipeline = (REPO / "recipes" / "pipeline.py").read_text()
    assert "class PipelineArgs(LogArgs):" in pipeline and 'os.environ["ALIGN_LOG_LEVEL"] = cfg.log_level' in pipeline


def test_off_the_main_process_only_warnings_and_errors_with_the_rank(monkeypatch, capsys):
    logger = get_logger("tests.log_e", tag="ppo")
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "2")):  # LOCAL_RANK when RANK is not set
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.setenv(name, value)
        logger.info("data: 16 training prompts")
        logger.warning("SIGTERM: saving a checkpoint after this update")
        logger.warning("health warning at update 3: kl", extra=MAIN_ONLY)  # the same on every rank: the main says it
        logger.error("an error")
    assert capsys.readouterr().err == ("[ppo rank 1] SIGTERM: saving a checkpoint after this update\n[ppo rank 1] an error\n"
                                       "[ppo rank 2] SIGTERM: saving a checkpoint after this update\n[ppo rank 2] an error\n")
    monkeypatch.setenv("LOCAL_RANK", "0")
    logger.warning("health warning at update 3: kl", extra=MAIN_ONLY)
    assert capsys.readouterr().err == "[ppo] health warning at update 3: kl\n"


def test_a_two_process_launch_says_each_info_line_once():
    """Two processes as a launcher starts them (RANK set before Python starts): the info line once, from rank 0;
    the warning from both, rank 1's marked."""
    code = ("from align.log import get_logger; log = get_logger('__main__'); "
            "log.info('data: 16 training records'); log.warning('stopped by signal')")
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGN_LOG_LEVEL", "LOCAL_RANK")}
    stderr = ""
    for rank in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", code], env={**env, "RANK": rank, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode == 0 and result.stdout == "", result.stderr
        stderr += result.stderr
    assert stderr == "[align] data: 16 training records\n[align] stopped by signal\n[align rank 1] stopped by signal\n"


def test_no_duplicate_lines_from_many_loggers_a_root_handler_or_a_second_import(capsys):
    """get_logger from several modules shares the one handler on "align"; the line does not also reach a handler
    on the root logger (no propagation), and importing align.log again does not add a second handler."""
    root_lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            root_lines.append(record.getMessage())

    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        importlib.reload(align_log)
        loggers = [get_logger(name) for name in ("align.trainers.common", "align.data", "__main__", "tests.log_f")]
        for i, logger in enumerate(loggers):
            logger.info(f"line {i}")
    finally:
        logging.getLogger().removeHandler(collect)
    assert capsys.readouterr().err == "".join(f"[align] line {i}\n" for i in range(4))
    assert root_lines == []
    assert [h.get_name() for h in logging.getLogger("align").handlers] == [align_log.HANDLER]
