"""Strict config parsing: YAML + flags, types, unknown names with close matches, every shipped YAML."""

import dataclasses
import importlib.util
from typing import Literal

import pytest

from align.config import arg, parse_config
from align.errors import ConfigError
from repo_paths import REPO


@dataclasses.dataclass
class Toy:
    lora_r: int = arg(16, "rank")
    learning_rate: float = arg(1e-4, "lr")
    name: str = arg("x", "a name")
    flag: bool = arg(False, "a switch")
    mode: Literal["a", "b"] = arg("a", "a choice")
    steps: int | None = arg(None, "optional")
    losses: list[str] = arg(["sigmoid"], "a list")


def test_defaults_yaml_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 8\nname: from-yaml\nlosses: [ipo, hinge]\n")
    cfg = parse_config(Toy, ["--config", str(path), "--lora_r", "32", "--flag", "--mode=b", "--steps", "none"])
    assert (cfg.lora_r, cfg.name, cfg.flag, cfg.mode, cfg.steps, cfg.losses) == (32, "from-yaml", True, "b", None, ["ipo", "hinge"])
    assert parse_config(Toy, ["--losses", "a,b", "--learning_rate", "3e-5"]).losses == ["a", "b"]
    assert parse_config(Toy, []).losses == ["sigmoid"]


def test_list_default_is_not_shared():
    a, b = Toy(), Toy()
    a.losses.append("x")
    assert b.losses == ["sigmoid"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lora_rank", "8"], "did you mean lora_r"),
        (["--lora_r", "eight"], "lora_r: expected an integer"),
        (["--learning_rate", "fast"], "learning_rate: expected a number"),
        (["--mode", "c"], "expected one of 'a', 'b'"),
        (["--flag", "maybe"], "expected true or false"),
        (["positional"], "unexpected argument"),
        (["--name"], "needs a value"),
    ],
)
def test_bad_flags(argv, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(Toy, argv)


def test_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rr: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'lora_rr'; did you mean lora_r"):
        parse_config(Toy, ["--config", str(bad)])
    bad.write_text("lora_r: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(Toy, ["--config", str(bad)])
    bad.write_text("lora_r: true\n")
    with pytest.raises(ConfigError, match="lora_r: expected an integer"):
        parse_config(Toy, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        parse_config(Toy, ["--config", str(tmp_path / "missing.yaml")])


def _recipe_config_class(stage: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{stage}", REPO / "recipes" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"sft": "SFTArgs", "reward": "RewardArgs", "dpo": "DPOArgs", "ppo": "PPOArgs", "grpo": "GRPOArgs", "pipeline": "PipelineArgs"}[stage], module


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_yaml_parses_strictly(path):
    stage = path.stem.split("_")[0]
    if not (REPO / "recipes" / f"{stage}.py").is_file():
        pytest.fail(f"{path.name}: no recipe recipes/{stage}.py for this config")
    class_name, module = _recipe_config_class(stage)
    cfg = parse_config(getattr(module, class_name), ["--config", str(path)])
    assert dataclasses.is_dataclass(cfg)


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_yaml_holds_only_what_differs_from_the_defaults(path):
    """One place for defaults, the config dataclass: a YAML key equal to its default would go stale when the
    default moves (ppo.yaml restated 26 of PPOArgs' 27 defaults)."""
    import yaml

    class_name, module = _recipe_config_class(path.stem.split("_")[0])
    config_class = getattr(module, class_name)
    defaults, configured = parse_config(config_class, []), parse_config(config_class, ["--config", str(path)])
    restated = [key for key in yaml.safe_load(path.read_text()) if getattr(configured, key) == getattr(defaults, key)]
    assert not restated, f"{path.name} restates the defaults of {', '.join(restated)}"


def test_pipeline_evaluation_flags_parse_strictly():
    """The evaluation flags the pipeline passes (its CPU and GPU defaults, and each pipeline config's eval_args)
    are valid eval/evaluate.py options: a renamed option fails here, not after an hour of training."""
    import shlex

    from align.evaluation.args import EvalArgs

    _, module = _recipe_config_class("pipeline")
    flag_sets = [module.CPU_EVAL, module.GPU_EVAL]
    for path in sorted((REPO / "recipes" / "configs").glob("pipeline*.yaml")):
        flag_sets.append(parse_config(module.PipelineArgs, ["--config", str(path)]).eval_args)
    for flags in flag_sets:
        cfg = parse_config(EvalArgs, shlex.split(flags))
        assert cfg.max_prompts >= 32, flags
    with pytest.raises(ConfigError, match="unknown option"):
        parse_config(EvalArgs, ["--max_prompt", "3"])
