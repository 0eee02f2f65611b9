"""The canonical data records. Every adapter returns these, and they are checked where data enters.

A chat message is a dict `{"role": "system" | "user" | "assistant", "content": str}`.

- `PreferencePair`: a prompt (chat messages ending with a user turn) with a chosen and a rejected
  assistant reply.
- `SFTExample`: a conversation (chat messages with at least one assistant turn).
- `PromptRecord`: a prompt with no reply, for generation (PPO rollouts, evaluation).

`constraints` carries the machine-checkable instructions of the built-in data (see align.evaluation.verifier); it
is None for data that has none: a list of `{"type": name, ...args}` objects, kept unchanged. `id` is the
row's own id where the data has one. `source` says where the record came from, for error messages
("prefs.jsonl line 3", "prefs.csv row 2 (line 3)", "hf:name[train] row 5").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from align.errors import DataError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def short_repr(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters so that one bad value cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_messages(messages: Any, where: str, *, field_name: str = "messages") -> list[Message]:
    """Validate a list of chat messages; return it as plain {role, content} dicts."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field_name}': expected a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{field_name}[{i}]': expected a {{role, content}} object, got {type(msg).__name__}")
        missing = [k for k in ("role", "content") if k not in msg]
        if missing:
            raise DataError(f"{where}: field '{field_name}[{i}]': missing key {missing[0]!r}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise DataError(f"{where}: field '{field_name}[{i}].role': unknown role {short_repr(role)}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{field_name}[{i}].content': expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_reply(reply: Any, where: str, name: str) -> str:
    if not isinstance(reply, str):
        raise DataError(f"{where}: field '{name}': expected a string reply, got {type(reply).__name__}")
    if not reply.strip():
        raise DataError(f"{where}: field '{name}': the reply is empty")
    return reply


def _check_prompt(prompt: list[Message], where: str) -> None:
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: field 'prompt': has no user turn")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt': must end with a user turn, ends with {prompt[-1]['role']!r}")
    if not prompt[-1]["content"].strip():
        raise DataError(f"{where}: field 'prompt': the last user turn is empty")


def check_constraints(constraints: Any, where: str) -> list[dict] | None:
    """None, or a list of `{"type": name, ...args}` objects (returned unchanged)."""
    if constraints is None:
        return None
    if not isinstance(constraints, list):
        raise DataError(f"{where}: field 'constraints': expected a list of {{type, ...}} objects, got {type(constraints).__name__}")
    for i, c in enumerate(constraints):
        if not isinstance(c, dict):
            raise DataError(f"{where}: field 'constraints[{i}]': expected a {{type, ...}} object, got {type(c).__name__}")
        if not isinstance(c.get("type"), str) or not c["type"]:
            raise DataError(f"{where}: field 'constraints[{i}].type': expected the constraint's name as a string")
    return constraints


def check_id(value: Any, where: str) -> str | None:
    """None, or the row id as a string (integer ids are common in CSV and Parquet files)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field 'id': expected a string or an integer, got {type(value).__name__}")


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float (JSON integers can overflow a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_margin(margin: Any, where: str) -> float | None:
    if margin is None:
        return None
    if not is_finite_number(margin):
        raise DataError(f"{where}: field 'margin': expected a finite number, got {short_repr(margin)}")
    return float(margin)


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    source: str = "?"
    constraints: list[dict] | None = None
    margin: float | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        self.prompt = check_messages(self.prompt, self.source, field_name="prompt")
        _check_prompt(self.prompt, self.source)
        self.chosen = _check_reply(self.chosen, self.source, "chosen")
        self.rejected = _check_reply(self.rejected, self.source, "rejected")
        if self.chosen.strip() == self.rejected.strip():
            raise DataError(f"{self.source}: fields 'chosen' and 'rejected': identical replies carry no preference")
        self.constraints = check_constraints(self.constraints, self.source)
        self.margin = _check_margin(self.margin, self.source)
        self.id = check_id(self.id, self.source)

    def to_trl(self) -> dict[str, Any]:
        """TRL's conversational preference format."""
        row: dict[str, Any] = {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }
        if self.margin is not None:
            row["margin"] = self.margin
        return row


@dataclass
class SFTExample:
    messages: list[Message]
    source: str = "?"
    constraints: list[dict] | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        self.messages = check_messages(self.messages, self.source)
        self.constraints = check_constraints(self.constraints, self.source)
        self.id = check_id(self.id, self.source)
        if not any(m["role"] == "user" for m in self.messages):
            raise DataError(f"{self.source}: field 'messages': has no user turn")
        replies = [m for m in self.messages if m["role"] == "assistant"]
        if not replies:
            raise DataError(f"{self.source}: field 'messages': has no assistant turn to train on")
        for i, m in enumerate(self.messages):
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{self.source}: field 'messages[{i}].content': the assistant reply is empty")

    def to_trl(self) -> dict[str, Any]:
        return {"messages": self.messages}


@dataclass
class PromptRecord:
    prompt: list[Message]
    source: str = "?"
    constraints: list[dict] | None = None
    reference_reply: str | None = field(default=None)
    id: str | None = None

    def __post_init__(self) -> None:
        self.prompt = check_messages(self.prompt, self.source, field_name="prompt")
        _check_prompt(self.prompt, self.source)
        if self.reference_reply is not None and not isinstance(self.reference_reply, str):
            raise DataError(f"{self.source}: field 'reference_reply': expected a string, got {type(self.reference_reply).__name__}")
        self.constraints = check_constraints(self.constraints, self.source)
        self.id = check_id(self.id, self.source)

    def to_trl(self) -> dict[str, Any]:
        """TRL's conversational prompt-only format."""
        return {"prompt": self.prompt}
